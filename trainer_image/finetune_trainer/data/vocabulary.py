"""Domain vocabulary mined from the data (``spec.model.mineTokens``), added to the tokenizer.

A word (a run of letters, digits and underscores with at least one letter, case kept) is mined when it
occurs at least ``minCount`` times in the corpus (``mineTokens.corpus``'s ``column``; by default every
text of the training records, the ones ``evalSplit`` holds out excepted) and the tokenizer, as loaded
with ``addTokens`` but without them (:func:`base_pieces`), splits it into at least ``minPieces``
tokens, alone and after a space (:func:`pieces`); the ``maxTokens`` most frequent are added, ties in
code-point order. A word that already is a token of the tokenizer (one of ``addTokens``) is not mined
again.

The words are chosen once per data and tokenizer, by the rank that builds the tokenized cache
(:func:`.pipeline.is_builder`), and written beside that cache as ``vocabulary-<key>.json`` (its key
hashes the data's, the tokenizer's before the words and ``mineTokens``); every other rank waits for
that file and reads the same words, so every rank's tokenizer is the same, and a later run of the same
data and model reads them instead of counting again. The words are added with ``add_tokens`` before
the data is tokenized (the tokenized cache's key is the tokenizer's with them); the new embedding rows
start as the mean of their pieces' embeddings (:func:`..modeling.grow_embeddings`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import ColumnMapping, MineTokensSpec
from transformers import PreTrainedTokenizerBase

from .. import storage
from ..distributed import World
from . import pipeline
from .records import FORMATS, DataError, Record, scan

_WORD = re.compile(r"\w+")


def base_pieces(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids the tokenizer splits ``text`` into, as if no token had been added to it (a fast
    tokenizer's normalizer, pre-tokenizer and model; a slow one's own splitting), without special
    tokens."""
    if tokenizer.is_fast:
        backend = tokenizer.backend_tokenizer
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        pieces = (
            [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
            if backend.pre_tokenizer is not None
            else [normalized]
        )
        return [token.id for piece in pieces for token in backend.model.tokenize(piece)]
    tokens: list[str] = tokenizer._tokenize(text)  # a slow tokenizer's splitter, which ignores added tokens
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return list(ids) if isinstance(ids, list) else [ids]


def words(texts: Iterable[str]) -> Iterator[str]:
    """The words of the texts: runs of letters, digits and underscores with at least one letter."""
    for text in texts:
        for word in _WORD.findall(text):
            if any(c.isalpha() for c in word):
                yield word


def strings(value: Any) -> Iterator[str]:
    """Every string inside a record's value (a text, a list of messages, QA answers...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def choose(counts: Counter[str], tokenizer: PreTrainedTokenizerBase, spec: MineTokensSpec) -> list[str]:
    """The words to add: ``minCount`` occurrences or more, split into ``minPieces`` pieces or more, not
    a token already; the ``maxTokens`` most frequent, ties in code-point order."""
    known = set(tokenizer.get_vocab())
    chosen: list[str] = []
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count < spec.min_count or len(chosen) >= spec.max_tokens:
            break
        if word not in known and pieces(tokenizer, word) >= spec.min_pieces:
            chosen.append(word)
    return chosen


def pieces(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    """How many tokens the tokenizer (without its added tokens) splits a word into: alone or after a
    space, whichever is fewer (byte-level BPE vocabularies hold most words with their leading space,
    ``Ġapple``: alone, ``apple`` would be two pieces)."""
    return min(len(base_pieces(tokenizer, word)), len(base_pieces(tokenizer, " " + word)))


class _CountingSink:
    """A :class:`.records.RecordSink` counting the words of the corpus's column, file by file (a
    defective file's words are dropped, as its records are)."""

    def __init__(self, column: str):
        self.column = column
        self.counts: Counter[str] = Counter()
        self._file: Counter[str] = Counter()

    def begin(self, path: str) -> None:
        self._file = Counter()

    def add(self, record: Record) -> None:
        self._file.update(words([record.data[self.column]]))

    def commit(self) -> None:
        self.counts.update(self._file)
        self._file = Counter()

    def discard(self) -> None:
        self._file = Counter()


def count_words(config: TrainerConfig, checked: pipeline.Checked, world: World) -> Counter[str]:
    """The words of the corpus and how often each occurs."""
    spec = config.spec.model.mine_tokens
    assert spec is not None
    if spec.corpus is not None:
        sink = _CountingSink(spec.column)
        columns = ColumnMapping(text=spec.column)
        found = scan(spec.corpus, "text", columns, base_dir=config.base_dir, sink=sink)
        problems, total = found.problems("text", columns)
        if problems:
            raise DataError([f"spec.model.mineTokens.corpus: {p}" for p in problems], total=total)
        return sink.counts
    if not checked.has_records:  # a committed cache of this data exists: read it again (for this rank)
        fresh = pipeline.check(config, world, reread=True)
        checked.by_source, checked.split = fresh.by_source, fresh.split
    data = config.spec.data
    fields = [getattr(data.columns, attr) for attr in FORMATS[data.format].COLUMNS]
    counts: Counter[str] = Counter()
    for record in checked.train:
        counts.update(words(s for f in fields for s in strings(record.data.get(f))))
    return counts


def vocabulary_key(config: TrainerConfig, checked: pipeline.Checked, tokenizer: PreTrainedTokenizerBase) -> str:
    """What the mined words depend on: the data, the tokenizer before them, ``mineTokens`` (and the
    corpus's files)."""
    spec = config.spec.model.mine_tokens
    assert spec is not None
    corpus = (
        [
            pipeline.file_fingerprint(p, config.base_dir)
            for p in storage.list_files(spec.corpus.uri, base_dir=config.base_dir, suffixes=tuple(pipeline._suffixes()))
        ]
        if spec.corpus is not None
        else None
    )
    described = {
        "data": checked.data_key,
        "tokenizer": pipeline.tokenizer_key(tokenizer),
        "mineTokens": spec.model_dump(mode="json", by_alias=True),
        "corpus": corpus,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def mine(
    config: TrainerConfig, tokenizer: PreTrainedTokenizerBase, checked: pipeline.Checked, world: World
) -> list[str]:
    """The mined words (module docstring): read beside the tokenized cache, or counted and written
    there by the rank that builds it while the others wait for them."""
    spec = config.spec.model.mine_tokens
    assert spec is not None
    fs, root = pipeline._root_fs(config)
    path = f"{root}/{checked.data_key}/vocabulary-{vocabulary_key(config, checked, tokenizer)[:32]}.json"

    def ready() -> bool:
        fs.invalidate_cache()
        return bool(fs.exists(path))

    if not ready():
        if pipeline.is_builder(config, world):
            chosen = choose(count_words(config, checked, world), tokenizer, spec)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(f"{path}.partial", json.dumps({"tokens": chosen}).encode())
            fs.mv(f"{path}.partial", path)
        else:
            pipeline._wait(ready, f"the mined vocabulary {path}")
    tokens: list[str] = json.loads(fs.cat_file(path))["tokens"]
    return tokens


def extend(
    config: TrainerConfig, tokenizer: PreTrainedTokenizerBase, checked: pipeline.Checked, world: World
) -> list[str]:
    """Add the mined words to the tokenizer (``spec.model.mineTokens``; none without it); return them."""
    if config.spec.model.mine_tokens is None:
        return []
    tokens = mine(config, tokenizer, checked, world)
    if tokens:
        tokenizer.add_tokens(tokens)
    if world.is_main:
        print(f"vocabulary: {len(tokens)} mined token(s) added: {', '.join(tokens[:20])}", flush=True)
    return tokens
