"""When to checkpoint, how a checkpoint reaches the store, how a run resumes, and how it stops.

- **Periodic** checkpoints every ``spec.checkpoint.everySteps`` optimizer steps and/or every
  ``everyMinutes`` (rank 0's clock decides), at every evaluation that improves the best metric (when
  ``keepBest``), and at the last step. Every rank must take part in a save, so after every optimizer
  step the ranks agree on three flags with one tiny all-reduce (MAX): *time to save*, *SIGTERM seen*,
  *loss not finite*. Step-based decisions need no agreement: every rank counts the same steps.
- **Saving** is transformers' own ``_save_checkpoint`` (model or adapter, optimizer, scheduler,
  scaler, per-rank RNG states, trainer state; DeepSpeed's sharded states) into the local staging
  directory. Then the ranks meet at a barrier, and local rank 0 of every node hands the directory to
  the :class:`Uploader`: one background thread, at most one upload in flight (a new save waits for
  the previous upload), training goes on meanwhile. Node 0 commits (manifest last), rotates
  (``keepLast`` + the best), and reports the kept checkpoints.
- **Resume** (``resume: auto``): rank 0 finds the newest committed checkpoint, checks its config hash
  (:func:`finetune_operator.api.trainer_config.checkpoint_hash`: model, task, method, data, training,
  distributed) and world size, and broadcasts the decision. Node 0 downloads it and verifies every
  file's sha256 against the manifest; a checkpoint that does not verify is uncommitted (a warning
  names it) and the next older committed one is tried, so a corrupt checkpoint costs the steps since
  the previous one, not the run. Every rank learns the checkpoint that verified; local rank 0 of
  every other node downloads it (verified too); transformers restores weights, optimizer, scheduler,
  RNG and trainer state and
  fast-forwards the sampler past the batches already trained (it skips batch indices: no sample is
  loaded or collated again). ``resume: never`` deletes the job's old checkpoints and starts over.
- **SIGTERM** (preemption, eviction, drain): the handler only raises a flag; at the next optimizer
  step all ranks agree, save, wait for the commit, and exit with 85. Before training starts (or with
  ``saveOnPreemption: false``) there is nothing to save: the process exits with 85 at once.
- **Non-finite loss**: all ranks stop at the step where any rank's loss became NaN/inf, without
  saving it, after the upload in flight (of an earlier, good step) is committed; exit 4.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_operator.api.trainer_config import CHECKPOINT_HASH_FIELDS, TrainerConfig, checkpoint_hash
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from transformers import TrainerCallback

from . import distributed
from .checkpoint_store import (
    BestMetric,
    CheckpointError,
    CheckpointStore,
    Manifest,
    UploadResult,
    best_checkpoint,
    step_of,
)
from .distributed import World
from .errors import ConfigError, Diverged, NonFiniteLoss, Preempted
from .faults import LossFaults
from .telemetry import TrainingMetrics
from .training_args import BEST_METRICS

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3


def best_metric(spec: FineTuneJobSpec, *, has_eval: bool) -> BestMetric | None:
    """The metric that ranks checkpoints: early stopping's (whose best model is loaded at the end),
    else the eval loss under keepBest; None without periodic evaluation, or with neither."""
    t = spec.training
    if not has_eval or t.evaluation.every_steps is None:
        return None
    if t.early_stopping is not None:
        return BestMetric(BEST_METRICS[t.early_stopping.metric], t.early_stopping.greater_is_better)
    if spec.checkpoint.keep_best:
        return BestMetric("eval_loss", False)
    return None


def open_store(config: TrainerConfig) -> CheckpointStore | None:
    if config.checkpoint_dir is None:
        return None
    c = config.spec.checkpoint
    return CheckpointStore(
        config.checkpoint_dir,
        config_hash=checkpoint_hash(config.spec),
        endpoint_url=c.endpoint_url,
        region=c.region,
        base_dir=config.base_dir,
    )


# ---- resume -------------------------------------------------------------------------------------


@dataclass
class ResumePlan:
    manifest: Manifest | None = None  #: the checkpoint to resume from
    best: Manifest | None = None  #: the best committed checkpoint (for load-best-at-end)
    kept: list[Manifest] | None = None  #: every committed checkpoint (status.checkpoints)
    metric: BestMetric | None = None  #: what ranks them for keepBest (to pick another best after a fallback)


def _decide(config: TrainerConfig, world: World, store: CheckpointStore, zero_stage: int | None) -> ResumePlan:
    c = config.spec.checkpoint
    if c.resume == "never":
        removed = store.delete_all()
        if removed:
            log.warning("resume: never — deleted %d earlier checkpoint(s) under %s", len(removed), store.uri)
        return ResumePlan(kept=[])
    removed = store.clean_partial()
    if removed:
        print(f"removed {len(removed)} uncommitted checkpoint(s) under {store.uri}: steps {removed}", flush=True)
    committed = store.committed()
    if not committed:
        return ResumePlan(kept=[])
    newest = committed[-1]
    expected = checkpoint_hash(config.spec)
    if newest.config_hash != expected:
        fields = ", ".join(f"spec.{f}" for f in sorted(CHECKPOINT_HASH_FIELDS))
        raise ConfigError(
            f"spec.checkpoint: the newest checkpoint {newest.uri} was written by a different spec (config hash "
            f"{newest.config_hash[:12]}…, this spec {expected[:12]}…; it covers {fields}). Resuming would mix "
            "two trainings: restore the spec, or set spec.checkpoint.resume: never to start over (its "
            "checkpoints are deleted)"
        )
    if newest.world_size != world.world_size:
        if newest.zero_stage:
            raise ConfigError(
                f"spec.checkpoint: {newest.uri} was written by {newest.world_size} ranks with DeepSpeed ZeRO-"
                f"{newest.zero_stage}, whose optimizer state is partitioned per rank; this run has "
                f"{world.world_size} ranks. Resume with {newest.world_size} ranks, or set "
                "spec.checkpoint.resume: never to start over"
            )
        log.warning(
            "resuming %s (written by %d ranks) with %d ranks: weights, optimizer and scheduler are restored; the "
            "data position is re-derived from the step count, so samples are exactly skipped only when the "
            "global batch size is unchanged, and ranks without an RNG file start from the seed",
            newest.uri,
            newest.world_size,
            world.world_size,
        )
    best = None
    metric = best_metric(config.spec, has_eval=True)
    if metric is not None:
        best = best_checkpoint(committed, metric)
    return ResumePlan(manifest=newest, best=best, kept=committed, metric=metric)


def plan_resume(config: TrainerConfig, world: World, store: CheckpointStore, zero_stage: int | None) -> ResumePlan:
    """Rank 0 decides (clean-up, newest committed, compatibility); every rank gets the same plan."""
    decision: ResumePlan | str | None = None
    if world.is_main:
        try:
            decision = _decide(config, world, store, zero_stage)
        except ConfigError as exc:
            decision = str(exc)
    decision = distributed.broadcast_object(decision)
    if isinstance(decision, str):
        raise ConfigError(decision)
    assert decision is not None
    return decision


def fetch(plan: ResumePlan, store: CheckpointStore, local_root: Path, world: World) -> str | None:
    """Download the resume checkpoint (and the best one) on every node; return the local path.

    Node 0 goes first and falls back past checkpoints that do not verify; ``plan`` is updated on
    every rank to the checkpoints actually used (manifest, best, kept).
    """
    if plan.manifest is None:
        if world.is_local_main and local_root.exists():
            shutil.rmtree(local_root, ignore_errors=True)  # stale staging of an earlier attempt
        distributed.barrier()
        return None
    started = time.monotonic()
    outcome: tuple[Manifest, Manifest | None, list[int]] | str | None = None
    if world.is_main:
        try:
            outcome = _fetch_verified(plan, store, local_root, world)
        except CheckpointError as exc:
            outcome = str(exc)  # every rank fails with it, none waits for a checkpoint that never comes
    outcome = distributed.broadcast_object(outcome)
    if isinstance(outcome, str):
        raise CheckpointError(outcome)
    assert outcome is not None
    manifest, best, bad = outcome
    plan.manifest, plan.best = manifest, best
    plan.kept = [m for m in plan.kept or [] if m.step not in bad]
    if world.is_local_main and not world.is_main:
        _stage(store, manifest, best, local_root)  # the checkpoint node 0 verified: the same objects
    distributed.barrier()
    if world.is_main:
        print(
            f"resuming from {manifest.uri} (step {manifest.step}, {manifest.bytes:,} B downloaded and verified "
            f"in {time.monotonic() - started:.1f}s)",
            flush=True,
        )
    return str(local_root / f"checkpoint-{manifest.step}")


def _fetch_verified(
    plan: ResumePlan, store: CheckpointStore, local_root: Path, world: World
) -> tuple[Manifest, Manifest | None, list[int]]:
    """Node 0: download the newest committed checkpoint that verifies (and the best one at or before
    it); uncommit each one that does not. Returns (resume checkpoint, best, steps found corrupt)."""
    newest = plan.manifest
    assert newest is not None
    # Older checkpoints are candidates when they come from the same training (the newest passed the
    # spec checks) and can be restored with this world size.
    candidates = [
        m
        for m in reversed(plan.kept or [newest])
        if m.step <= newest.step
        and m.config_hash == newest.config_hash
        and (m.world_size == world.world_size or not m.zero_stage)
    ]
    bad: list[int] = []
    # A best checkpoint staged by an earlier attempt stays: its verified files are not downloaded again.
    staged_best = {f"checkpoint-{plan.best.step}"} if plan.best is not None else set()
    for manifest in candidates:
        if not _download_or_uncommit(store, manifest, local_root, keep=staged_best, bad=bad):
            continue
        resume_dir = f"checkpoint-{manifest.step}"
        best = None
        while plan.metric is not None:  # the best checkpoint up to the resume point that verifies
            usable = [m for m in plan.kept or [] if m.step <= manifest.step and m.step not in bad]
            best = best_checkpoint(usable, plan.metric)
            if best is None or best.step == manifest.step:
                break
            if _download_or_uncommit(store, best, local_root, keep={resume_dir}, bad=bad):
                break
        best_dir = local_root / f"checkpoint-{best.step}" if best is not None else None
        _clear_staging(local_root, {resume_dir} | ({best_dir.name} if best_dir else set()))
        _relocate_best(local_root / resume_dir / "trainer_state.json", best_dir, best)
        return manifest, best, bad
    corrupt = ", ".join(store.dir_uri(step) for step in bad) or "none"
    raise CheckpointError(
        f"spec.checkpoint: no committed checkpoint under {store.uri} verifies against its manifest (corrupt, "
        f"now uncommitted: {corrupt}); the next attempt starts from the beginning"
    )


def _download_or_uncommit(
    store: CheckpointStore, manifest: Manifest, local_root: Path, *, keep: set[str], bad: list[int]
) -> bool:
    """Download ``manifest`` into the staging directory (removing other staged checkpoints not in
    ``keep``); on a file that does not verify, uncommit the checkpoint, record it in ``bad`` and
    return False."""
    target = local_root / f"checkpoint-{manifest.step}"
    _clear_staging(local_root, keep | {target.name})
    try:
        store.download(manifest, target)
        return True
    except CheckpointError as exc:
        bad.append(manifest.step)
        shutil.rmtree(target, ignore_errors=True)
        try:
            store.uncommit(manifest.step)
            what = "uncommitted it (its files stay until the next clean-up)"
        except OSError as uncommit_error:
            what = f"could not uncommit it ({uncommit_error})"
        log.warning(
            "resume: checkpoint-%d (%s) is corrupt: %s; %s, falling back to the next older committed checkpoint",
            manifest.step,
            manifest.uri,
            exc,
            what,
        )
        return False


def _stage(store: CheckpointStore, manifest: Manifest, best: Manifest | None, local_root: Path) -> None:
    """Other nodes: download the checkpoints node 0 chose (and verified)."""
    target = local_root / f"checkpoint-{manifest.step}"
    keep = {target.name} | ({f"checkpoint-{best.step}"} if best else set())
    _clear_staging(local_root, keep)
    store.download(manifest, target)
    best_dir = None
    if best is not None:
        best_dir = local_root / f"checkpoint-{best.step}"
        if best.step != manifest.step:
            store.download(best, best_dir)
    _relocate_best(target / "trainer_state.json", best_dir, best)


def _clear_staging(local_root: Path, keep: set[str]) -> None:
    """Remove staged checkpoints other than ``keep`` (stale ones of an earlier attempt)."""
    if local_root.exists():
        for stale in local_root.iterdir():
            if stale.name not in keep:
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()


def _relocate_best(state_file: Path, best_dir: Path | None, best: Manifest | None) -> None:
    """Point the trainer state's best checkpoint at the local copy (it was saved on another machine)."""
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text(encoding="utf-8"))
    recorded = state.get("best_global_step")
    if best_dir is not None and best is not None and (recorded is None or recorded == best.step):
        state["best_model_checkpoint"] = str(best_dir)
    else:
        state["best_model_checkpoint"] = None
    state_file.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")


# ---- SIGTERM ------------------------------------------------------------------------------------


class Preemption:
    """SIGTERM handling: a flag during training, an immediate exit (85) outside it."""

    def __init__(self, *, save: bool, metrics: TrainingMetrics | None = None):
        self.save = save
        self.metrics = metrics
        self.requested = False
        self.in_training = False
        self.received_at: float | None = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.requested = True
            self.received_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.preempted()
            where = "saving at the next step" if self.in_training and self.save else "exiting"
            print(f"SIGTERM received: {where}", flush=True)
        if not (self.in_training and self.save):
            raise Preempted("SIGTERM outside training: nothing to save")


# ---- uploads ------------------------------------------------------------------------------------


class Uploader:
    """Uploads checkpoints on a background thread, one at a time, and commits them on node 0."""

    def __init__(
        self,
        store: CheckpointStore,
        *,
        world: World,
        keep_last: int,
        best: BestMetric | None,
        zero_stage: int | None,
        metrics: TrainingMetrics | None = None,
        on_commit: Callable[[Manifest, list[Manifest]], None] | None = None,
    ):
        self.store = store
        self.world = world
        self.keep_last = keep_last
        self.best = best
        self.zero_stage = zero_stage
        self.metrics = metrics
        self.on_commit = on_commit
        self._thread: threading.Thread | None = None
        self.last_result: UploadResult | None = None
        self.last_error: BaseException | None = None
        self.committed: Manifest | None = None

    def submit(
        self, local_dir: Path, step: int, *, epoch: float | None, metrics: dict[str, float], keep: str | None = None
    ) -> float:
        """Start uploading ``local_dir``; first waits for the upload in flight. Returns seconds waited.
        Afterwards the local staging directories up to ``step`` are removed, except ``keep`` (the
        best model's, which transformers loads at the end)."""
        started = time.monotonic()
        self.wait()
        waited = time.monotonic() - started
        self._thread = threading.Thread(
            target=self._run, args=(local_dir, step, epoch, metrics, keep), name=f"ckpt-upload-{step}", daemon=True
        )
        self._thread.start()
        return waited

    def wait(self) -> UploadResult | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.last_result

    def _run(
        self, local_dir: Path, step: int, epoch: float | None, metrics: dict[str, float], keep: str | None
    ) -> None:
        result = None
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                result = self.store.upload(
                    local_dir,
                    step,
                    world_size=self.world.world_size,
                    nodes=self.world.nodes,
                    node_rank=self.world.node_rank,
                    epoch=epoch,
                    zero_stage=self.zero_stage,
                    metrics=metrics,
                )
                break
            except Exception as exc:  # storage errors of every kind: retried, then reported
                self.last_error = exc
                log.warning("checkpoint-%d: upload attempt %d/%d failed: %s", step, attempt, UPLOAD_ATTEMPTS, exc)
                if attempt < UPLOAD_ATTEMPTS:
                    time.sleep(2.0 * attempt)
        if result is None:
            if self.metrics is not None:
                self.metrics.upload_failed()
            log.error("checkpoint-%d was NOT saved to %s; training goes on", step, self.store.uri)
            return
        self.last_result = result
        self.last_error = None
        if self.metrics is not None:
            self.metrics.observe_upload(result.seconds, result.bytes)
        if result.manifest is not None:
            try:
                kept = self.store.rotate(self.keep_last, self.best, protect=())
            except Exception as exc:
                log.warning("checkpoint rotation failed (retried after the next save): %s", exc)
                kept = [result.manifest]
            self.committed = result.manifest
            if self.metrics is not None:
                self.metrics.committed(step, result.manifest.committed_at)
            if self.on_commit is not None:
                self.on_commit(result.manifest, kept)
        clean_staging(local_dir.parent, upto=step, keep=keep)


def clean_staging(root: Path, *, upto: int, keep: str | None) -> None:
    """Remove the local checkpoint directories up to step ``upto``, except ``keep``."""
    kept = Path(keep).resolve() if keep else None
    for path in root.glob("checkpoint-*"):
        step = step_of(path.name)
        if step is not None and step <= upto and path.resolve() != kept:
            shutil.rmtree(path, ignore_errors=True)


# ---- the callback -------------------------------------------------------------------------------


class LossWatch:
    """Sees the loss of every training micro-batch: the test fault hook applies here, and the
    checkpoint callback asks at the end of each optimizer step whether any loss of it was non-finite."""

    def __init__(self, faults: LossFaults | None = None):
        self.faults = faults or LossFaults()
        self._step: list[Any] = []

    def observe(self, loss: Any, *, step: int, training: bool) -> Any:
        """The micro-batch ``loss`` of optimizer step ``step`` (1-based), after the fault hook."""
        loss = self.faults.apply(loss, step=step, training=training)
        if training:
            self._step.append(loss.detach())
        return loss

    def take(self) -> float | None:
        """The sum of the step's micro-batch losses (None before any); starts the next step."""
        losses, self._step = self._step, []
        if not losses:
            return None
        total = losses[0].float().sum()
        for loss in losses[1:]:
            total = total + loss.float().sum()
        return float(total.item())  # one device sync a step, as the running loss's


@dataclass(frozen=True)
class Divergence:
    """A loss that diverged: from ``onset`` (the first step of the first window above the factor),
    detected at ``detected``; ``loss`` None when it was non-finite."""

    onset: int
    detected: int
    loss: float | None
    lowest: float | None


class DivergenceWatch:
    """Spike detection (``spec.training.divergence.lossFactor``): the mean loss of each logging window
    (``logEverySteps`` optimizer steps, averaged over the ranks by the caller) against the lowest window
    mean so far. ``consecutiveLogs`` windows in a row above ``lossFactor`` times it make a divergence,
    which began at the first of them. Windows above it do not lower the minimum."""

    def __init__(self, *, factor: float | None, consecutive: int, window: int):
        self.factor, self.consecutive, self.window = factor, consecutive, window
        self.lowest: float | None = None
        self.above: list[tuple[int, float]] = []  #: (first step, mean) of the windows above, in a row
        self.total, self.steps, self.start = 0.0, 0, 0

    @property
    def enabled(self) -> bool:
        return self.factor is not None

    def add(self, step: int, loss: float) -> bool:
        """This rank's loss of optimizer step ``step``; True when the step closes a window (the caller
        then averages :meth:`window_mean` over the ranks and hands it to :meth:`judge`)."""
        if self.steps == 0:
            self.start = step
        self.total += loss
        self.steps += 1
        return step % self.window == 0

    def window_mean(self) -> float:
        mean = self.total / max(self.steps, 1)
        self.total, self.steps = 0.0, 0
        return mean

    def judge(self, step: int, mean: float) -> Divergence | None:
        """The window ending at ``step`` had mean loss ``mean`` (over every rank)."""
        assert self.factor is not None
        if self.lowest is not None and mean > self.factor * self.lowest:
            self.above.append((self.start, mean))
            if len(self.above) >= self.consecutive:
                return Divergence(onset=self.above[0][0], detected=step, loss=mean, lowest=self.lowest)
            return None
        self.above = []
        self.lowest = mean if self.lowest is None else min(self.lowest, mean)
        return None


class LearningRateScale(TrainerCallback):
    """After k rollbacks the learning rate is ``learningRateScale``**k of the spec's: applied once the
    optimizer and scheduler are restored (a resumed checkpoint holds the rates it was trained with, so
    the factor applied is the target over the one its scheduler already carries — never twice)."""

    def __init__(self, scale: float, learning_rate: float):
        self.scale, self.learning_rate = scale, learning_rate

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if optimizer is None or scheduler is None:
            return
        present = float(scheduler.base_lrs[0]) / self.learning_rate
        factor = self.scale / present
        if abs(factor - 1.0) < 1e-9:
            return
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        log.info("learning rate scaled by %g after rollbacks (now %g of the spec's)", factor, self.scale)


class CheckpointCallback(TrainerCallback):
    """The one owner of saves: decides when the Trainer saves (transformers' own save schedule is
    overridden at every step), hands each save to the uploader (the store rotates what is kept), and
    ends the run on SIGTERM or a non-finite loss.

    Saves happen at the checkpoint cadence (``everySteps``/``everyMinutes``), at the last step, on
    preemption, and at every evaluation that improves ``best`` — also without a store when
    ``keep_best_model`` (early stopping loads the best model at the end, so it must be on disk).
    """

    def __init__(
        self,
        spec: FineTuneJobSpec,
        *,
        world: World,
        store: CheckpointStore | None,
        uploader: Uploader | None,
        preemption: Preemption,
        best: BestMetric | None,
        keep_best_model: bool,
        resumed: Manifest | None,
        best_so_far: Manifest | None,
        loss_watch: LossWatch,
        metrics: TrainingMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        c = spec.checkpoint
        self.clock = clock  #: the seconds everyMinutes counts (rank 0's monotonic clock)
        self.world = world
        self.store = store
        self.uploader = uploader
        self.preemption = preemption
        self.best = best
        self.keep_best_model = keep_best_model
        self.loss_watch = loss_watch
        self.metrics = metrics
        self.every_steps = c.every_steps
        self.every_seconds = c.every_minutes * 60 if c.every_minutes else None
        self.grace_seconds = c.grace_period_seconds
        self.saved_step: int | None = resumed.step if resumed else None
        self.best_value = best.value(best_so_far) if (best and best_so_far) else None
        self.eval_metrics: dict[int, dict[str, float]] = {}
        t = spec.training
        self.on_divergence = t.on_divergence
        self.divergence_spec = t.divergence
        self.divergence = DivergenceWatch(
            factor=t.divergence.loss_factor, consecutive=t.divergence.consecutive_logs, window=t.log_every_steps
        )
        self.training = False
        self.preempting = False
        self.last_save = clock()

    # Training window: saves are only ever requested between train begin and end.
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = True
        self.last_save = self.clock()
        self.preemption.in_training = True
        if self.preemption.requested:  # SIGTERM arrived while the model was being prepared
            raise Preempted("SIGTERM before the first step", self.saved_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = False

    def _loss_nonfinite(self) -> tuple[bool, float | None]:
        value = self.loss_watch.take()
        if value is None:
            return False, None
        return (not math.isfinite(value)), value

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        time_due = bool(
            self.store is not None
            and self.world.is_main
            and self.every_seconds is not None
            and self.clock() - self.last_save >= self.every_seconds
        )
        nonfinite, value = self._loss_nonfinite()
        time_due, preempt, nonfinite_any = distributed.agree(
            [time_due, self.preemption.requested, nonfinite], device=args.device
        )
        if nonfinite_any:
            if self.on_divergence == "rollback":
                self._roll_back(Divergence(onset=step, detected=step, loss=None, lowest=self.divergence.lowest))
            self._stop_nonfinite(step, value if nonfinite else None)
        if self.divergence.enabled and value is not None and self.divergence.add(step, value):
            mean = distributed.mean(self.divergence.window_mean(), device=args.device)
            diverged = self.divergence.judge(step, mean)
            if diverged is not None:
                self._diverged(diverged)
        if preempt and not self.preempting:
            self.preempting = True
            control.should_training_stop = True
            control.should_evaluate = False
        wanted = self.store is not None and (
            time_due
            or self.preempting
            or (self.every_steps is not None and step % self.every_steps == 0)
            or step >= state.max_steps
        )
        # Assigned, not or-ed: transformers' own schedule (at evaluations, for load_best_model_at_end)
        # does not decide; an improving evaluation asks for its save in on_evaluate.
        control.should_save = wanted and step != self.saved_step
        if self.preempting and not control.should_save:
            self._finish_preemption(step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **_: Any) -> None:
        if not self.training or not metrics or state.global_step == 0:
            return  # an evaluation before the first step is the baseline, not a checkpoint candidate
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.eval_metrics[state.global_step] = numeric
        if self.best is None or (self.store is None and not self.keep_best_model):
            return
        value = numeric.get(self.best.name)
        if value is None or not math.isfinite(value):
            return
        if self.best_value is None or self.best.better(value, self.best_value):
            self.best_value = value
            if state.global_step != self.saved_step:
                control.should_save = True  # a new best is made durable at once

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        self.saved_step = step
        self.last_save = self.clock()
        if self.store is not None:
            distributed.barrier()  # every rank's files are on disk before the upload starts
            if self.world.is_local_main and self.uploader is not None:
                waited = self.uploader.submit(
                    Path(args.output_dir) / f"checkpoint-{step}",
                    step,
                    epoch=state.epoch,
                    metrics=self.eval_metrics.get(step, {}),
                    keep=state.best_model_checkpoint,
                )
                if waited > 1.0:
                    log.info("checkpoint-%d waited %.1fs for the previous upload", step, waited)
        elif self.world.is_local_main:
            # No store: a save only keeps the best model for the end; the older ones go.
            clean_staging(Path(args.output_dir), upto=step, keep=state.best_model_checkpoint)
        if self.preempting:
            self._finish_preemption(step)

    def _wait_uploads(self) -> None:
        if self.uploader is not None and self.world.is_local_main:
            self.uploader.wait()
        distributed.barrier()

    def _finish_preemption(self, step: int) -> None:
        self._wait_uploads()
        committed = self.uploader.committed if self.uploader else None
        elapsed = time.monotonic() - (self.preemption.received_at or time.monotonic())
        if self.world.is_main:
            where = f"checkpoint-{committed.step} committed at {committed.uri}" if committed else "nothing to save"
            print(f"preempted at step {step}: {where}, {elapsed:.1f}s after SIGTERM", flush=True)
            if elapsed > self.grace_seconds:
                log.warning("the preemption save took %.0fs, more than gracePeriodSeconds", elapsed)
        raise Preempted(f"preempted at step {step}", step)

    def _diverged(self, d: Divergence) -> None:
        if self.on_divergence == "rollback":
            self._roll_back(d)
        self._wait_uploads()
        raise Diverged(
            f"training loss diverged: {_window(d)}; spec.training.onDivergence fail: stopped without saving",
            d.onset,
            rollback=False,
        )

    def _roll_back(self, d: Divergence) -> None:
        """Remove the checkpoints written since the divergence began and end the attempt (exit 86), or,
        with every rollback allowed used, fail it (exit 6). Rank 0 decides; every rank raises the same."""
        self._wait_uploads()
        verdict: tuple[bool, str] | None = None
        if self.world.is_main:
            verdict = self._record_rollback(d)
        verdict = distributed.broadcast_object(verdict)
        assert verdict is not None
        rollback, message = verdict
        raise Diverged(message, d.onset, rollback=rollback)

    def _record_rollback(self, d: Divergence) -> tuple[bool, str]:
        store, spec = self.store, self.divergence_spec
        assert store is not None  # onDivergence rollback needs spec.checkpoint.uri (admission)
        records = store.read_rollbacks()
        what = _window(d)
        if len(records) >= spec.max_rollbacks:
            return False, f"training loss diverged again after {len(records)} rollbacks (maxRollbacks): {what}"
        removed = [m.step for m in store.committed() if m.step >= d.onset]
        for step in removed:
            store.delete(step)
        scale = spec.learning_rate_scale ** (len(records) + 1)
        records.append(
            {
                "step": d.onset,
                "detected_step": d.detected,
                "loss": d.loss,
                "lowest_loss": d.lowest,
                "removed_checkpoints": removed,
                "resumed_from": -1,  # filled by the next attempt (checkpointing.note_resume)
                "learning_rate_scale": scale,
                "time": datetime.now(UTC).isoformat(),
            }
        )
        store.write_rollbacks(records)
        gone = f"removed checkpoints {removed}" if removed else "no checkpoint was written since"
        return True, (
            f"training loss diverged: {what}; rollback {len(records)} of {spec.max_rollbacks}: {gone}; the next "
            f"attempt resumes before step {d.onset} with the learning rate at {scale:g} of the spec's"
        )

    def _stop_nonfinite(self, step: int, value: float | None) -> None:
        self._wait_uploads()
        committed = self.uploader.committed if self.uploader else None
        kept = f"the last good checkpoint is {committed.uri}" if committed else "no checkpoint was committed"
        what = f"became {value}" if value is not None else "became non-finite on another rank"
        raise NonFiniteLoss(f"training loss {what} at step {step}; stopped without saving it; {kept}", step)


def _window(d: Divergence) -> str:
    if d.loss is None:
        return f"the loss became non-finite at step {d.detected}"
    return (
        f"mean loss {d.loss:.4g} since step {d.onset} (windows above the lossFactor up to step {d.detected}; "
        f"lowest window mean before: {d.lowest:.4g})"
    )


def rollbacks_after_resume(store: CheckpointStore | None, plan: ResumePlan, world: World) -> list[dict[str, Any]]:
    """The divergences rolled back before this attempt (rank 0 reads them, every rank gets them); the
    latest one records where this attempt resumed from, once."""
    records: list[dict[str, Any]] = []
    if store is not None and world.is_main:
        records = store.read_rollbacks()
        if records and records[-1].get("resumed_from", -1) == -1:
            records[-1]["resumed_from"] = plan.manifest.step if plan.manifest is not None else None
            store.write_rollbacks(records)
    return distributed.broadcast_object(records)
