"""The controls against forgetting (``training.forgetting``) as a causal-LM recipe composes them.

- :class:`ForgettingTrainer`: transformers' Trainer with the EWC penalty added to every training
  micro-batch's loss (:mod:`.ewc`), its value logged as ``ewc_penalty``, and the replay sampler
  (:mod:`.data.replay`) as the training sampler. The causal-LM Trainer derives from it; without EWC
  and replay it is transformers' Trainer.
- :func:`mix`: the training dataset of a run with replay (training and replay rows, the sampler, the
  callback that sets its epoch), or the training rows alone.
- :func:`attach`: the anchor estimated (or read back on resume) and the sampler handed to the Trainer,
  before ``train()``.
- :func:`report_general`: general-text perplexity before training into ``status.progress``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback

from . import ewc as anchors
from .data.replay import MixedRows, ReplaySampler
from .data.sampling import EpochSetter

if TYPE_CHECKING:
    from finetune_operator.api.v1alpha1 import FineTuneJobSpec

    from .data.pipeline import Checked, PreparedData
    from .harness import Run, Training


class ForgettingTrainer(Trainer):
    """transformers' Trainer with the EWC penalty (when :attr:`ewc` is set) and the replay sampler
    (when :attr:`replay_sampler` is set)."""

    ewc: anchors.Anchor | None = None
    replay_sampler: ReplaySampler | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ewc_penalties: list[torch.Tensor] = []

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler[int] | None:
        if self.replay_sampler is not None:
            return self.replay_sampler
        return super()._get_train_sampler(train_dataset)

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.ewc is None or not model.training:
            return result
        penalty = self.ewc.penalty()
        self._ewc_penalties.append(penalty.detach())
        # As transformers' training_step scales the loss for gradient accumulation: a loss normalized
        # by the items of the whole accumulated batch is summed over the micro-batches as it is, any
        # other is divided by the accumulation steps there. The penalty must count once per step.
        scaled = (
            self.loss_is_scaled_for_ga
            if getattr(self, "loss_is_scaled_for_ga", None) is not None
            else (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )
        term = penalty / self.current_gradient_accumulation_steps if scaled else penalty
        if isinstance(result, tuple):
            return (result[0] + term.to(result[0].device), *result[1:])
        return result + term.to(result.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._ewc_penalties:
            logs = {**logs, "ewc_penalty": float(torch.stack(self._ewc_penalties).mean())}
            self._ewc_penalties = []
        super().log(logs, start_time)


@dataclass
class Mix:
    """A run's training dataset: the training rows, with the replay rows and their sampler under replay."""

    dataset: torch.utils.data.Dataset[dict[str, Any]]
    sampler: ReplaySampler | None = None
    callbacks: list[TrainerCallback] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows of an epoch (the steps are counted from them)."""
        return len(self.sampler) if self.sampler is not None else len(self.dataset)  # type: ignore[arg-type]


def mix(
    spec: FineTuneJobSpec, data: PreparedData, train: torch.utils.data.Dataset[dict[str, Any]], keys: tuple[str, ...]
) -> Mix:
    """The training dataset: ``train``, or (``forgetting.replay``) the training and replay rows with the
    sampler that mixes them (:mod:`.data.replay`)."""
    from .data.pipeline import TokenRows

    replay = spec.training.forgetting.replay if spec.training.forgetting is not None else None
    if replay is None:
        return Mix(train)
    assert data.replay is not None  # the pipeline tokenizes the replay source of such a run
    mixed = MixedRows(train, TokenRows(data.replay, keys))
    sampler = ReplaySampler(mixed.train_rows, mixed.replay_rows, replay.ratio, spec.training.seed)
    return Mix(mixed, sampler, [EpochSetter(sampler)])


def attach(
    training: Training,
    mixed: Mix,
    *,
    run: Run,
    checked: Checked,
    data: PreparedData,
    general: torch.utils.data.Dataset[dict[str, Any]] | None,
    train: torch.utils.data.Dataset[dict[str, Any]],
    keys: tuple[str, ...],
) -> None:
    """Hand the replay sampler to the Trainer, and (``forgetting.ewc``) the anchor: estimated on the
    Fisher data, or read back from its store when the run resumes (:mod:`.ewc`)."""
    from .data.pipeline import TokenRows

    trainer = training.trainer
    assert isinstance(trainer, ForgettingTrainer)
    trainer.replay_sampler = mixed.sampler
    spec = run.spec
    forgetting = spec.training.forgetting
    if forgetting is None or forgetting.ewc is None:
        return
    rows: torch.utils.data.Dataset[dict[str, Any]]
    if data.fisher is not None:
        rows = TokenRows(data.fisher, keys)
        source = "spec.training.forgetting.ewc.fisherData" if forgetting.ewc.fisher_data else "the replay data"
    elif general is not None:
        rows, source = general, "spec.training.forgetting.generalEval"
    else:
        rows, source = train, "the training data"
    model = trainer.model
    assert model is not None and trainer.data_collator is not None
    trainer.ewc = anchors.prepare(
        run.config,
        model,
        rows,  # type: ignore[arg-type]
        trainer.data_collator,
        source=source,
        data_key=checked.data_key,
        world=run.world,
        device=training.prepared.args.device,
        resumed=training.prepared.plan.manifest is not None,
        autocast=trainer.autocast_smart_context_manager,
    )


def report_general(run: Run, trainer: Trainer, metrics: dict[str, float]) -> None:
    """The general-text perplexity of the evaluation before training (step 0) into status.progress
    (``generalPerplexityBefore``; the latest evaluation's is ``generalPerplexity``)."""
    value = metrics.get("general_perplexity")
    if run.status is not None and value is not None and trainer.state.global_step == 0:
        run.status.update(general_perplexity_before=value)
