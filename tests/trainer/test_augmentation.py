"""spec.data.augmentation: EDA copies and back-translated copies of the training records, made in the
data pipeline before tokenization (:mod:`finetune_trainer.data.augmentation`)."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from finetune_operator.api.trainer_config import JobIdentity, TrainerConfig
from finetune_operator.api.v1alpha1 import EDAOperation, FineTuneJobSpec
from finetune_trainer.data import augmentation, pipeline
from finetune_trainer.data.records import where_of
from finetune_trainer.distributed import World
from tiny import COLORS, build_tokenizer, chat_rows, classification_rows, prompt_completion_rows, write_jsonl
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MarianConfig, MarianMTModel

ALONE = World(rank=0, local_rank=0, world_size=1, local_world_size=1)
EDA_ALL = {
    "synonymReplacement": {"alpha": 0.3, "copies": 2},
    "randomInsertion": {"alpha": 0.2},
    "randomSwap": {"alpha": 0.3},
    "randomDeletion": {"alpha": 0.3},
}


def config_for(
    tmp_path: Path, data: dict[str, Any], *, seed: int = 7, work: str = "work", **spec: Any
) -> TrainerConfig:
    full = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "org/model"},
            "task": spec.pop("task", {"type": "sft"}),
            "data": data,
            "training": {"maxSteps": 1, "perDeviceBatchSize": 8, "seed": seed},
            "metrics": {"enabled": False},
        }
    )
    return TrainerConfig(
        job=JobIdentity(namespace="local", name="aug"),
        spec=full,
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / work),
    )


def augmented(config: TrainerConfig, tmp_path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The training records after augmentation, as (where, record), as the pipeline makes them."""
    checked = pipeline.check(config, ALONE)
    records = checked.records("train")
    assert records is not None
    work = Path(tempfile.mkdtemp(dir=tmp_path, prefix="augmented-"))
    out = augmentation.augment(config, records, work, pipeline._Mapper(work, "test"))
    return [(where_of(r["file"], r["line"], r["unit"]), json.loads(r["record"])) for r in out]


def test_eda_copies_are_seeded_counted_tagged_and_leave_eval_and_targets_alone(tmp_path: Path) -> None:
    rows = prompt_completion_rows(20, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    data = {"train": {"uri": str(train)}, "evalSplit": 0.25, "maxSeqLength": 64, "augmentation": EDA_ALL}
    config = config_for(tmp_path, data)
    first = augmented(config, tmp_path)
    # 15 training records (5 held out), each followed by its 2 + 1 + 1 + 1 copies.
    assert len(first) == 15 * (1 + 5)
    sources = [w for w, _ in first if "(" not in w]
    assert len(sources) == 15
    tags = [w.split(" (", 1)[1].rstrip(")") for w, _ in first[1:6]]
    assert tags == [
        "synonymReplacement 1",
        "synonymReplacement 2",
        "randomInsertion 1",
        "randomSwap 1",
        "randomDeletion 1",
    ]
    by_line = {int(w.rsplit(":", 1)[1]): r for w, r in first if "(" not in w}
    changed = 0
    for where, record in first:
        line = int(where.split(":")[-1].split(" ")[0])
        assert where.startswith(f"{train}:{line}")
        source = rows[line - 1]
        assert by_line[line] == source  # the source record itself, unchanged
        assert record["completion"] == source["completion"]  # the target is never changed
        changed += record["prompt"] != source["prompt"]
        if "randomSwap" in where:
            assert sorted(record["prompt"].split()) == sorted(source["prompt"].split())
        if "randomDeletion" in where:
            assert set(record["prompt"].split()) <= set(source["prompt"].split())
    assert changed >= 15 * 4  # nearly every copy differs from its source (a swap may swap equal words)

    assert augmented(config_for(tmp_path, data, work="again"), tmp_path) == first  # same seed, same copies
    other = augmented(config_for(tmp_path, data, seed=8), tmp_path)
    assert len(other) == len(first)
    assert sum(a != b for a, b in zip(other, first, strict=True)) > 15  # another split and other copies

    # Through the pipeline: the rows trained on are the augmented records; the eval rows are the held-out
    # records as written.
    tokenizer = build_tokenizer()
    prepared = pipeline.prepare(config, tokenizer, world=ALONE)
    assert prepared.stats.train_records == len(prepared.train) == 90
    assert prepared.eval is not None and len(prepared.eval) == 5
    held = sorted(rows[i - 1]["prompt"] + rows[i - 1]["completion"] for i in range(1, 21) if i not in by_line)
    assert sorted(tokenizer.decode(ids, skip_special_tokens=True) for ids in prepared.eval["input_ids"]) == held


def test_each_format_changes_its_input_only(tmp_path: Path) -> None:
    """chat: the user messages; classification: the text, its label kept."""
    chats = chat_rows(4)
    train = write_jsonl(tmp_path / "chat.jsonl", chats)
    data = {"train": {"uri": str(train)}, "format": "chat", "augmentation": {"randomSwap": {"alpha": 0.5}}}
    out = augmented(config_for(tmp_path, data), tmp_path)
    assert len(out) == 8
    for (_, source), (where, copy) in zip(out[::2], out[1::2], strict=True):
        assert where.endswith("(randomSwap 1)")
        for a, b in zip(source["messages"], copy["messages"], strict=True):
            if a["role"] == "user":
                assert sorted(a["content"].split()) == sorted(b["content"].split())
            else:
                assert a == b
        assert [m["content"] for m in source["messages"] if m["role"] == "user"] != [
            m["content"] for m in copy["messages"] if m["role"] == "user"
        ]

    rows = classification_rows(6)
    train = write_jsonl(tmp_path / "cls.jsonl", rows)
    data = {"train": {"uri": str(train)}, "format": "classification", "augmentation": {"randomDeletion": {}}}
    task = {"type": "classification", "classification": {"numLabels": len(COLORS), "labels": COLORS}}
    out = augmented(config_for(tmp_path, data, task=task), tmp_path)
    assert len(out) == 12
    for (_, source), (_, copy) in zip(out[::2], out[1::2], strict=True):
        assert copy["label"] == source["label"]
        assert set(copy["text"].split()) <= set(source["text"].split())


def test_eda_operations_keep_whitespace_and_use_wordnet() -> None:
    op = EDAOperation(alpha=0.5)
    text = "  The Happy farmer sells apples.\n"
    replaced = augmentation.synonym_replacement(text, op, random.Random(0))
    assert replaced.startswith("  ") and replaced.endswith(".\n")
    words, new = text.split(), replaced.split()
    # "The" is a stop word; the others are replaced by WordNet synonyms of theirs (case and "." kept).
    assert new[0] == "The" and new != words
    synonyms = augmentation.synonyms()
    assert "glad" in synonyms["happy"] and "husbandman" in synonyms["farmer"]
    assert replaced != text
    assert augmentation.random_deletion("one", op, random.Random(0)) == "one"
    assert augmentation.random_swap(text, op, random.Random(1)).endswith("\n")
    inserted = augmentation.random_insertion(text, op, random.Random(2))
    assert len(inserted.split()) > len(words)


ALPHA_TEXT = "happy big car house quick dog run fast small city tree music river stone light old new bright cold road"


@pytest.mark.parametrize("name", augmentation.OPERATIONS)
def test_alpha_sets_how_much_changes(name: str) -> None:
    """max(1, alpha x words) changes (synonymReplacement, randomInsertion, randomSwap), or each word
    deleted with probability alpha (randomDeletion)."""
    operation = augmentation.EDA[name]
    words = ALPHA_TEXT.split()
    if name == "randomDeletion":
        text = " ".join(words * 10)  # 200 words
        few = [len(operation(text, EDAOperation(alpha=0.05), random.Random(s)).split()) for s in range(5)]
        many = [len(operation(text, EDAOperation(alpha=0.5), random.Random(s)).split()) for s in range(5)]
        assert 170 <= sum(few) / 5 <= 199 and 70 <= sum(many) / 5 <= 130
        return
    for alpha, changes in ((0.05, 1), (0.25, 5)):
        new = operation(ALPHA_TEXT, EDAOperation(alpha=alpha), random.Random(3)).split()
        if name == "randomSwap":
            moved = sum(a != b for a, b in zip(words, new, strict=True))
            assert moved == 2 if changes == 1 else 2 < moved <= 2 * changes
        elif name == "randomInsertion":  # a synonym may be of several words
            assert changes <= len(new) - len(words) <= 3 * changes
        else:
            assert len(set(words) - set(new)) == changes


def tiny_translator(directory: Path, seed: int) -> Path:
    """A tiny MarianMT model (random weights) with the tiny BPE tokenizer, saved like a Hub model."""
    tokenizer = build_tokenizer()
    config = MarianConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=None,
    )
    torch.manual_seed(seed)
    MarianMTModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def by_hand(model_dir: Path, texts: list[str], max_new_tokens: int) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_new_tokens)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    decoded: list[str] = tokenizer.batch_decode(out, skip_special_tokens=True)
    return decoded


def test_back_translation_runs_both_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = tiny_translator(tmp_path / "en-xx", seed=1)
    backward = tiny_translator(tmp_path / "xx-en", seed=2)
    rows = prompt_completion_rows(6, seed=2)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    bt = {"forward": str(forward), "backward": str(backward), "copies": 2, "maxNewTokens": 8, "batchSize": 4}
    data = {"train": {"uri": str(train)}, "augmentation": {"backTranslation": bt, "randomSwap": {}}}
    config = config_for(tmp_path, data)
    sizes: list[int] = []
    call = augmentation.Translator.__call__

    def counted(self: augmentation.Translator, texts: list[str], **kwargs: Any) -> list[str]:
        sizes.append(len(texts))
        return call(self, texts, **kwargs)

    monkeypatch.setattr(augmentation.Translator, "__call__", counted)
    out = augmented(config, tmp_path)
    assert sizes == [4] * 4 + [2] * 4  # batchSize records a batch: 2 copies x (forward, backward)
    assert len(out) == 6 * (1 + 1 + 2)
    translated = [(w, r) for w, r in out if "backTranslation" in w]
    assert [w for w, _ in translated] == [f"{train}:{i} (backTranslation {c})" for i in range(1, 7) for c in (1, 2)]
    there = by_hand(forward, [r["prompt"] for r in rows], 8)
    back = by_hand(backward, there, 8)
    expected = [b.strip() or r["prompt"] for b, r in zip(back, rows, strict=True)]
    assert [r["prompt"] for _, r in translated[::2]] == expected  # the greedy copy is the models' translation
    assert all(e != r["prompt"] for e, r in zip(expected, rows, strict=True))  # gibberish, but translated
    assert [r["prompt"] for _, r in translated[1::2]] != expected  # the second copy is sampled
    assert [r["completion"] for _, r in translated] == [r["completion"] for r in rows for _ in (1, 2)]
    assert augmented(config_for(tmp_path, data, work="again"), tmp_path) == out  # sampling is seeded too


def test_a_missing_translation_model_names_its_field(tmp_path: Path) -> None:
    from finetune_trainer.errors import ConfigError

    train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(2))
    empty = tmp_path / "empty"
    empty.mkdir()
    bt = {"forward": str(empty), "backward": str(empty)}
    config = config_for(tmp_path, {"train": {"uri": str(train)}, "augmentation": {"backTranslation": bt}})
    with pytest.raises(ConfigError, match=r"spec\.data\.augmentation\.backTranslation\.forward"):
        augmented(config, tmp_path)


def test_the_records_stay_on_disk(tmp_path: Path) -> None:
    """The copies are Arrow files a batch at a time, memory-mapped back (not a list held in memory)."""
    train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(2500, seed=4))
    config = config_for(tmp_path, {"train": {"uri": str(train)}, "augmentation": {"randomSwap": {"copies": 2}}})
    checked = pipeline.check(config, ALONE)
    records = checked.records("train")
    assert records is not None
    work = tmp_path / "w"
    work.mkdir()
    out = augmentation.augment(config, records, work, pipeline._Mapper(work, "disk"))
    assert isinstance(out, datasets.Dataset) and len(out) == 7500
    assert [Path(f["filename"]).name for f in out.cache_files] == ["train-augmented.arrow"]
