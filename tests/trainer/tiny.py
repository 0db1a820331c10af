"""Tiny models and datasets, built from a config in seconds, for CPU training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

WORDS = (
    "apple banana cherry grape lemon mango orange peach pear plum red green blue yellow purple small large "
    "sweet sour fruit tree grows in the a is of and what color taste size answer question tell me about"
).split()
FRUIT = {
    "apple": ("red", "sweet"),
    "banana": ("yellow", "sweet"),
    "cherry": ("red", "sour"),
    "grape": ("purple", "sweet"),
    "lemon": ("yellow", "sour"),
    "mango": ("orange", "sweet"),
    "orange": ("orange", "sour"),
    "peach": ("orange", "sweet"),
    "pear": ("green", "sweet"),
    "plum": ("purple", "sour"),
}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer() -> Any:
    """The tiny models' BPE tokenizer (a ``PreTrainedTokenizerFast``), trained on the fruit vocabulary,
    with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(400)]
    corpus += [f"user assistant system {w}?" for w in WORDS]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>", bos_token=None)
    fast.chat_template = CHATML
    return fast


def llama_config(tokenizer: Any, *, tie_embeddings: bool = False, **overrides: Any) -> Any:
    """The tiny models' ``LlamaConfig``: 2 layers, hidden size 64, grouped-query attention (4 heads,
    2 key/value heads); ``overrides`` set other config fields (e.g. ``attention_bias=True``)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **overrides,
    )


def build_tiny_model(directory: Path, *, tie_embeddings: bool = False, seed: int = 0) -> Path:
    """A 2-layer Llama with a BPE tokenizer trained on the fruit vocabulary; saved like a Hub model."""
    import torch
    from transformers import LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    fast = build_tokenizer()
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(fast, tie_embeddings=tie_embeddings))
    pretrain(model, fast, seed=seed)
    model.save_pretrained(directory)
    return directory


def pretrain(model: Any, tokenizer: Any, *, seed: int, steps: int = 150) -> None:
    """A short pre-training on fruit sentences, so the base model knows something to adapt."""
    import torch

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts = [" ".join(rng.choice(text_rows(1, rng.randrange(10**6)))["text"] for _ in range(1)) for _ in range(16)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def prompt_completion_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        fruit = rng.choice(list(FRUIT))
        color, taste = FRUIT[fruit]
        if rng.random() < 0.5:
            rows.append({"prompt": f"what color is the {fruit}?", "completion": f" the {fruit} is {color}"})
        else:
            rows.append({"prompt": f"what taste is the {fruit}?", "completion": f" the {fruit} is {taste}"})
    return rows


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(list(FRUIT), 2)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "answer about fruit"},
                    {"role": "user", "content": f"what color is the {a}?"},
                    {"role": "assistant", "content": f"the {a} is {FRUIT[a][0]}"},
                    {"role": "user", "content": f"and the {b}?"},
                    {"role": "assistant", "content": f"the {b} is {FRUIT[b][0]}"},
                ]
            }
        )
    return rows


#: The classes of :func:`classification_rows`: each fruit's color, in label-id order.
COLORS = ["red", "yellow", "purple", "orange", "green"]


def classification_rows(n: int, seed: int = 0, *, multi_label: bool = False) -> list[dict[str, Any]]:
    """Sentences about a fruit labelled with its color (``COLORS``), imbalanced as the fruits' colors
    are (orange 3 in 10, green 1 in 10); with ``multi_label``, about two fruits, labelled with both
    colors (a list of one when they share it)."""
    rng = random.Random(seed)
    templates = ("the {} grows on a tree", "tell me about the {}", "a small {} is in the fruit", "what is the {}")
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        if multi_label:
            a, b = rng.sample(list(FRUIT), 2)
            colors = sorted({FRUIT[a][0], FRUIT[b][0]}, key=COLORS.index)
            rows.append({"text": f"the {a} and the {b}", "label": colors})
        else:
            fruit = rng.choice(list(FRUIT))
            rows.append({"text": rng.choice(templates).format(fruit), "label": FRUIT[fruit][0]})
    return rows


def preference_rows(n: int, seed: int = 0, *, chat: bool = False) -> list[dict[str, Any]]:
    """``preference`` records about the fruits' colors: the prompt asks a fruit's color, ``chosen``
    says the true one and ``rejected`` a wrong one (another fruit's color). Plain text (a prompt and
    responses that follow it), or with ``chat`` a conversation (the prompt a system and a user
    message, each response one assistant message)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        fruit = rng.choice(list(FRUIT))
        color = FRUIT[fruit][0]
        wrong = rng.choice([c for c in COLORS if c != color])
        if chat:
            prompt = [
                {"role": "system", "content": "answer about fruit"},
                {"role": "user", "content": f"what color is the {fruit}?"},
            ]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": f"the {fruit} is {color}"}],
                    "rejected": [{"role": "assistant", "content": f"the {fruit} is {wrong}"}],
                }
            )
        else:
            rows.append(
                {
                    "prompt": f"what color is the {fruit}?",
                    "chosen": f" the {fruit} is {color}",
                    "rejected": f" the {fruit} is {wrong}",
                }
            )
    return rows


def text_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        fruit = rng.choice(list(FRUIT))
        color, taste = FRUIT[fruit]
        length = rng.randint(1, 6)
        rows.append({"text": " ".join([f"the {fruit} is {color} and {taste}."] * length)})
    return rows


def qa_rows(n: int, seed: int = 0, *, fruits: int = 3, unanswerable: float = 0.0) -> list[dict[str, Any]]:
    """SQuAD-style records: a context of ``fruits`` fruit sentences, a question about the color or
    taste of one of them with its answer at its offset; a fraction ``unanswerable`` ask about a fruit
    the context does not mention, with empty answer lists (SQuAD v2)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = rng.sample(list(FRUIT), fruits + 1)
        mentioned, absent = chosen[:fruits], chosen[fruits]
        context = " ".join(f"the {f} is {FRUIT[f][0]} and {FRUIT[f][1]}." for f in mentioned)
        attribute = rng.randrange(2)
        question = f"what {('color', 'taste')[attribute]} is the"
        if rng.random() < unanswerable:
            rows.append(
                {"question": f"{question} {absent}?", "context": context, "answers": {"text": [], "answer_start": []}}
            )
            continue
        fruit = rng.choice(mentioned)
        sentence = f"the {fruit} is {FRUIT[fruit][0]} and "
        answer = FRUIT[fruit][attribute]
        start = context.index(sentence) + (len(f"the {fruit} is ") if attribute == 0 else len(sentence))
        assert context[start : start + len(answer)] == answer
        rows.append(
            {
                "question": f"{question} {fruit}?",
                "context": context,
                "answers": {"text": [answer], "answer_start": [start]},
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def job_manifest(name: str, model_dir: Path, train: Path, **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": str(model_dir), "dtype": "fp32"},
        "task": {"type": "sft"},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]}},
        "data": {"train": {"uri": str(train)}, "format": "promptCompletion", "maxSeqLength": 64},
        "training": {
            "maxSteps": 20,
            "learningRate": 3e-3,
            "scheduler": "constant",
            "perDeviceBatchSize": 8,
            "logEverySteps": 1,
            "seed": 7,
        },
        "distributed": {"procsPerNode": 1},
        "resources": {"gpusPerNode": 0},
        # `finetune run` checks a job in a preflight process before training (~10 s of CPU): the runs
        # that test training skip it; test_preflight.py, the every-task and every-example runs and the
        # quickstart run it as users do.
        "preflight": {"mode": "skip"},
    }
    for dotted, value in spec_overrides.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(workdir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(workdir) if "loss" in m]


#: QLoRA on the tiny model: bf16 weights around the 4-bit base, fp32 compute on CPU.
QLORA = {
    "method": {
        "type": "qlora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"computeDtype": "fp32"},
    },
    "model__dtype": "bf16",
}
