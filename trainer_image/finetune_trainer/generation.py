"""Generation for the ``bleu`` and ``rouge`` metrics: the model completes eval prompts, the completions
are scored against the records' own (:mod:`.scoring.generation`).

At each evaluation that asks for them (``spec.training.evaluation.metrics``), the first
``evaluation.generation.samples`` eval prompts (:mod:`.data.eval_prompts`) are completed greedily, at
most ``generation.maxNewTokens`` tokens each, stopping at the end of text or, for ``chat``, at the end
of the assistant turn (the special token the chat template closes a turn with). Under torchrun each
rank generates its share (prompts ``rank``, ``rank + world``, ...), in batches of
``perDeviceBatchSize`` prompts of similar length, left-padded; the decoded texts are gathered on every
rank and scored there, in record order: the scores are those of the same pairs whatever the number
of ranks (corpus BLEU and mean ROUGE over the same set). Under DeepSpeed ZeRO-3 every rank runs the
same number of batches (a short share repeats a prompt, whose completion is dropped) with
``synced_gpus``, as each forward pass gathers the partitioned weights from every rank.

Rank 0 writes the last evaluation's pairs to ``samples.jsonl`` in the work directory (one line each:
``where``, ``prompt`` — the prompt tokens decoded, special tokens kept —, ``reference``,
``generation``, the sample's own sentence ``bleu`` and/or ``rougeL``, and the ``step``); the outputs
carry it (:data:`.outputs.SAMPLES_FILE`). The last evaluation is the one after training, of the model
the outputs hold (with early stopping, the best checkpoint's, loaded at the end).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from finetune_operator.api.tasks import GENERATION_METRICS
from finetune_operator.api.v1alpha1 import FineTuneJobSpec, GenerationEvalSpec

from .distributed import World
from .scoring.generation import generation_metrics


@dataclass(frozen=True)
class Prompt:
    """One eval prompt: its tokens, the reference completion, and its record."""

    ids: list[int]
    reference: str
    where: str


def prompts_of(dataset: Any, limit: int) -> list[Prompt]:
    """The first ``limit`` rows of an ``eval_prompts`` split (:mod:`.data.eval_prompts`)."""
    rows = dataset.select(range(min(limit, len(dataset))))
    return [Prompt(list(r["prompt_ids"]), r["reference"], r["where"]) for r in rows]


def stop_ids(tokenizer: Any, model: Any, data_format: str) -> list[int]:
    """The tokens a completion ends at: the model's end-of-text tokens (its generation config's, and the
    tokenizer's), and for ``chat`` the special token the chat template closes an assistant turn with
    (``<|im_end|>`` in ChatML) when it has one (a special token of the tokenizer, or an added one
    marked special)."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if data_format == "chat":
        marker = "\x00end-of-turn probe\x00"
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        after = rendered[rendered.index(marker) + len(marker) :] if marker in rendered else ""
        following = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        added = getattr(tokenizer, "added_tokens_decoder", {})
        if following and (
            following[0] in tokenizer.all_special_ids or getattr(added.get(following[0]), "special", False)
        ):
            ids.add(int(following[0]))
    return sorted(ids)


def complete(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    stop: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    batches: int | None = None,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Greedy completions of ``prompts`` (token ids each, up to its first ``stop`` token, excluded), in
    batches of ``batch_size`` prompts of similar length, left-padded with ``pad_token_id``. ``batches``:
    run that many batches (ZeRO-3: every rank the same), repeating the first prompt to fill them."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    if batches is not None:
        filler = order[:1] or [-1]
        order += filler * (batches * batch_size - len(order))
    stops = set(stop)
    out: dict[int, list[int]] = {}
    with torch.no_grad():
        for first in range(0, len(order), batch_size):
            chosen = order[first : first + batch_size]
            rows = [list(prompts[i]) if i >= 0 else [pad_token_id] for i in chosen]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=model.device)
            attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_token_id,
                eos_token_id=list(stop) or None,
                use_cache=True,
                synced_gpus=synced_gpus,
            )
            for index, new in zip(chosen, generated[:, width:].tolist(), strict=True):
                if index < 0 or index in out:
                    continue  # a filler row
                end = next((k for k, token in enumerate(new) if token in stops), len(new))
                out[index] = new[:end]
    return [out[i] for i in range(len(prompts))]


def _gather(items: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Every rank's (index, text) pairs, on every rank, in index order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[list[tuple[int, str]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        items = [pair for part in parts for pair in part or []]
    return sorted(items)


class GenerationEval:
    """The generation metrics of one run's evaluations (module docstring)."""

    def __init__(
        self,
        spec: FineTuneJobSpec,
        prompts: list[Prompt],
        tokenizer: Any,
        *,
        world: World,
        batch_size: int,
        samples_file: Path | None,
    ):
        self.metrics = tuple(m for m in spec.eval_metrics() if m in GENERATION_METRICS)
        self.settings = spec.training.evaluation.generation or GenerationEvalSpec()
        self.format = spec.data.format
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.world = world
        self.batch_size = batch_size
        self.samples_file = samples_file

    @classmethod
    def for_run(
        cls,
        spec: FineTuneJobSpec,
        eval_prompts: Any,
        tokenizer: Any,
        *,
        world: World,
        batch_size: int,
        work_dir: Path,
    ) -> GenerationEval | None:
        """The run's generation metrics, or None when its evaluations ask for none (or it has no eval
        prompts: no eval data)."""
        from .outputs import SAMPLES_FILE

        if world.is_main:  # a work directory used before must not pass an older run's samples on
            (work_dir / SAMPLES_FILE).unlink(missing_ok=True)
        if eval_prompts is None or not any(m in GENERATION_METRICS for m in spec.eval_metrics()):
            return None
        settings = spec.training.evaluation.generation or GenerationEvalSpec()

        return cls(
            spec,
            prompts_of(eval_prompts, settings.samples),
            tokenizer,
            world=world,
            batch_size=batch_size,
            samples_file=work_dir / SAMPLES_FILE if world.is_main else None,
        )

    def evaluate(
        self, model: Any, *, prefix: str = "eval", step: int = 0, synced_gpus: bool = False
    ) -> dict[str, float]:
        """Generate this rank's share, gather the texts, score them: ``{prefix}_bleu``,
        ``{prefix}_rouge1``, ``{prefix}_rouge2``, ``{prefix}_rougeL`` (those asked for); rank 0 writes
        the samples."""
        rank, size = self.world.rank, self.world.world_size
        mine = list(range(rank, len(self.prompts), size))
        per_rank = math.ceil(len(self.prompts) / size)
        completions = complete(
            model,
            [self.prompts[i].ids for i in mine],
            pad_token_id=self.tokenizer.pad_token_id,
            stop=stop_ids(self.tokenizer, model, self.format),
            max_new_tokens=self.settings.max_new_tokens,
            batch_size=self.batch_size,
            batches=math.ceil(per_rank / self.batch_size) if synced_gpus else None,
            synced_gpus=synced_gpus,
        )
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        gathered = _gather(list(zip(mine, texts, strict=True)))
        generations = [text for _, text in gathered]
        references = [self.prompts[i].reference for i, _ in gathered]
        scores, each = generation_metrics(generations, references, self.metrics)
        if self.samples_file is not None:
            self._write_samples(gathered, each, step)
        return {f"{prefix}_{name}": value for name, value in scores.items()}

    def _write_samples(self, gathered: list[tuple[int, str]], each: list[dict[str, float]], step: int) -> None:
        assert self.samples_file is not None

        def lines() -> Iterator[str]:
            for (index, generation), own in zip(gathered, each, strict=True):
                prompt = self.prompts[index]
                line = {
                    "where": prompt.where,
                    "prompt": self.tokenizer.decode(prompt.ids, skip_special_tokens=False),
                    "reference": prompt.reference,
                    "generation": generation,
                    **own,
                    "step": step,
                }
                yield json.dumps(line, ensure_ascii=False) + "\n"

        self.samples_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.samples_file.with_name(self.samples_file.name + ".partial")
        with partial.open("w", encoding="utf-8") as fh:
            fh.writelines(lines())
        partial.replace(self.samples_file)
