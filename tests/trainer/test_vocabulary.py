"""spec.model.mineTokens: domain words mined from the data, added to the tokenizer, their embedding rows
started as the mean of their pieces' (:mod:`finetune_trainer.data.vocabulary`,
:func:`finetune_trainer.modeling.grow_embeddings`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_operator.api.trainer_config import JobIdentity, TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer import modeling
from finetune_trainer.data import pipeline, vocabulary
from finetune_trainer.data.records import DataError
from finetune_trainer.distributed import World
from finetune_trainer.methods.added_tokens import output_embeddings, weight
from runs import RunResult
from test_data_options import MISLEADING_SUFFIX, write_as
from tiny import build_tokenizer, job_manifest, prompt_completion_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

ALONE = World(rank=0, local_rank=0, world_size=1, local_world_size=1)

#: (word, occurrences): with minPieces 4 and minCount 3, the tiny tokenizer's split of each (alone or
#: after a space, the fewer) is checked below.
CORPUS = [
    ("watermelon", 6),  # 6 pieces: mined first
    ("Pomegranate", 4),  # 7 pieces; ties with kiwi and pomegranate: code-point order, P < k < p
    ("kiwi", 4),  # 4 pieces
    ("pomegranate", 4),  # 7 pieces
    ("lychee", 2),  # 4 pieces, but too rare
    ("fig", 5),  # 3 pieces: too few
    ("apple", 10),  # a token already (after a space)
    ("2024", 8),  # no letter: not a word
]
PIECES = {"watermelon": 6, "Pomegranate": 7, "kiwi": 4, "pomegranate": 7, "lychee": 4, "fig": 3, "apple": 1}


def corpus_rows() -> list[dict[str, str]]:
    rows = []
    for word, count in CORPUS:
        for i in range(count):
            rows.append({"prompt": f"what color is the {word}?", "completion": f" it is red {i}"})
    return rows


def config_for(tmp_path: Path, train: Path, mine: dict[str, Any], **extra: Any) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "org/model", "mineTokens": mine, **extra},
            "task": {"type": "sft"},
            "data": {"train": {"uri": str(train)}, "maxSeqLength": 64},
            "training": {"maxSteps": 1, "seed": 7},
            "metrics": {"enabled": False},
        }
    )
    return TrainerConfig(
        job=JobIdentity(namespace="local", name="vocab"),
        spec=spec,
        checkpoint_dir=str(tmp_path / "ckpt"),
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
    )


def test_mining_picks_the_frequent_words_split_into_many_pieces(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    for word, expected in PIECES.items():  # the hand-made corpus's premise, by the tokenizer's own calls
        alone = len(tokenizer(word, add_special_tokens=False)["input_ids"])
        spaced = len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        assert min(alone, spaced) == expected, word
    train = write_jsonl(tmp_path / "train.jsonl", corpus_rows())
    config = config_for(tmp_path, train, {"minPieces": 4, "minCount": 3, "maxTokens": 3})
    checked = pipeline.check(config, ALONE)
    before = len(tokenizer)
    assert vocabulary.extend(config, tokenizer, checked, ALONE) == ["watermelon", "Pomegranate", "kiwi"]
    assert len(tokenizer) == before + 3
    assert tokenizer(" watermelon")["input_ids"][-1] == tokenizer.convert_tokens_to_ids("watermelon")

    more = config_for(tmp_path, train, {"minPieces": 4, "minCount": 3, "maxTokens": 10})
    assert vocabulary.extend(more, build_tokenizer(), checked, ALONE) == [
        "watermelon",
        "Pomegranate",
        "kiwi",
        "pomegranate",
    ]
    # An addTokens token is not mined again.
    listed = config_for(tmp_path, train, {"minPieces": 4, "minCount": 3}, addTokens=["kiwi"])
    tok = build_tokenizer()
    tok.add_tokens(["kiwi"])
    assert "kiwi" not in vocabulary.extend(listed, tok, checked, ALONE)


def test_every_rank_reads_the_words_the_builder_chose(tmp_path: Path) -> None:
    """The builder (global rank 0 with a checkpoint directory) writes the words beside the cache; another
    rank reads them, without the records (it has none), and its tokenizer ends the same."""
    train = write_jsonl(tmp_path / "train.jsonl", corpus_rows())
    config = config_for(tmp_path, train, {"minPieces": 4, "minCount": 3, "maxTokens": 3})
    other = World(rank=1, local_rank=1, world_size=2, local_world_size=2)
    builder_tok, other_tok = build_tokenizer(), build_tokenizer()
    checked = pipeline.check(config, ALONE)
    words = vocabulary.extend(config, builder_tok, checked, ALONE)
    elsewhere = pipeline.check(config, other)
    assert not elsewhere.has_records
    assert vocabulary.extend(config, other_tok, elsewhere, other) == words
    assert pipeline.tokenizer_key(other_tok) == pipeline.tokenizer_key(builder_tok)
    saved = list((tmp_path / "ckpt" / "data-cache" / checked.data_key).glob("vocabulary-*.json"))
    assert [json.loads(p.read_text()) for p in saved] == [{"tokens": words}]


def test_a_corpus_of_its_own_is_mined_and_its_defects_named(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(4))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"body": f"the {w} grows"} for w, n in CORPUS for _ in range(n)])
    config = config_for(tmp_path, train, {"corpus": {"uri": str(corpus)}, "column": "body", "minPieces": 4})
    checked = pipeline.check(config, ALONE)
    assert vocabulary.extend(config, build_tokenizer(), checked, ALONE) == ["watermelon"]  # minCount 5
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"body": "kiwi"}, {"text": "no body"}])
    config = config_for(tmp_path, train, {"corpus": {"uri": str(broken)}, "column": "body"})
    with pytest.raises(DataError, match=rf"spec.model.mineTokens.corpus: {broken}:2: missing column 'body'"):
        vocabulary.extend(config, build_tokenizer(), checked, ALONE)


@pytest.mark.parametrize("file_type", ["csv", "json", "jsonl", "parquet"])
def test_the_corpus_is_read_as_its_declared_file_type_up_to_max_samples(file_type: str, tmp_path: Path) -> None:
    """A corpus with a misleading extension is read as its fileType; maxSamples keeps its first records."""
    train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(4))
    rows = [{"text": f"the {w} grows"} for w, n in CORPUS for _ in range(n)]
    corpus = write_as(tmp_path / f"corpus{MISLEADING_SUFFIX[file_type]}", file_type, rows)
    source = {"uri": str(corpus), "fileType": file_type}
    config = config_for(tmp_path, train, {"corpus": source, "minPieces": 4, "minCount": 4})
    checked = pipeline.check(config, ALONE)
    assert vocabulary.extend(config, build_tokenizer(), checked, ALONE) == [
        "watermelon",
        "Pomegranate",
        "kiwi",
        "pomegranate",
    ]
    # The first 10 records: watermelon 6 times, Pomegranate 4 times.
    limited = config_for(tmp_path, train, {"corpus": {**source, "maxSamples": 10}, "minPieces": 4, "minCount": 4})
    assert vocabulary.extend(limited, build_tokenizer(), checked, ALONE) == ["watermelon", "Pomegranate"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_new_rows_are_the_mean_of_their_pieces(tied: bool, tiny_model: Path, tiny_model_tied: Path) -> None:
    directory = tiny_model_tied if tied else tiny_model
    tokenizer = AutoTokenizer.from_pretrained(directory)
    pieces = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("<fruit>", "watermelon")}
    original = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer.add_tokens(["<fruit>", "watermelon"])
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    new_ids = modeling.grow_embeddings(model, tokenizer)
    assert new_ids == [len(tokenizer) - 2, len(tokenizer) - 1]
    pairs = [(weight(model.get_input_embeddings()), weight(original.get_input_embeddings()))]
    head, old_head = output_embeddings(model), output_embeddings(original)
    assert head is not None and old_head is not None
    assert (weight(head) is weight(model.get_input_embeddings())) == tied
    if not tied:
        pairs.append((weight(head), weight(old_head)))
    for new, old in pairs:
        assert new.shape[0] == old.shape[0] + 2
        for token_id, word in zip(new_ids, ("<fruit>", "watermelon"), strict=True):
            torch.testing.assert_close(new[token_id], old[pieces[word]].mean(dim=0))
        torch.testing.assert_close(new[: old.shape[0]], old)  # the other rows unchanged


def test_the_preflight_mines_as_the_run_does(tmp_path: Path, tiny_model: Path) -> None:
    """The preflight adds the same words before it tokenizes, so the run reads the cache it built; its
    figures count the augmented records."""
    from finetune_trainer import preflight
    from test_preflight import config_for as preflight_config

    rows = corpus_rows()
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    manifest = job_manifest(
        "vocab-preflight",
        tiny_model,
        train,
        model__mineTokens={"minPieces": 4, "minCount": 3, "maxTokens": 3},
        data__augmentation={"randomSwap": {"copies": 2}},
    )
    config = preflight_config(tmp_path, manifest)
    outcome = preflight.preflight(config)
    assert outcome.exit_code == 0, outcome.reason
    assert outcome.result.train_records == len(rows) * 3
    assert outcome.result.cache_hit is False
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    checked = pipeline.check(config, ALONE)
    assert vocabulary.extend(config, tokenizer, checked, ALONE) == ["watermelon", "Pomegranate", "kiwi"]
    assert pipeline.prepare(config, tokenizer, world=ALONE, checked=checked).stats.cache_hit


def test_two_ranks_train_with_augmentation_and_mined_tokens(
    tmp_path: Path, tiny_model: Path, finetune_run: Callable[..., RunResult]
) -> None:
    rows = corpus_rows() * 3
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    manifest = job_manifest(
        "vocab-2-ranks",
        tiny_model,
        train,
        model__mineTokens={"minPieces": 4, "minCount": 3, "maxTokens": 3},
        data__augmentation={"randomSwap": {"alpha": 0.2}, "randomDeletion": {"alpha": 0.1}},
        training__maxSteps=6,
    )
    result = finetune_run(manifest, "--nproc", "2")
    assert result.returncode == 0, result.output[-6000:]
    summary = result.summary()
    assert summary["world_size"] == 2
    assert summary["mined_tokens"] == ["watermelon", "Pomegranate", "kiwi"]
    assert f"data: {len(rows) * 3} training records" in result.output  # each record and its 2 copies
    losses = result.losses
    assert len(losses) == 6 and all(0 < loss < 20 for loss in losses)
    saved = AutoTokenizer.from_pretrained(result.workdir / "storage" / "local" / "vocab-2-ranks" / "output" / "adapter")
    assert {"watermelon", "Pomegranate", "kiwi"} <= set(saved.get_vocab())
