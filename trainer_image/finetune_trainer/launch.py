"""``python -m finetune_trainer.launch [torchrun flags] -m finetune_trainer --config FILE``

torchrun, with two differences:

- it exits with the exit code of the first rank that failed, instead of a blanket 1. The trainer's
  codes (invalid config or data, non-finite loss, preempted) must survive to the pod's status, where
  the operator's podFailurePolicy decides between failing and retrying, and to ``finetune run``'s
  caller. A rank killed by a signal N gives 128 + N, as a shell would.
- SIGTERM (sent to the container's first process on preemption, eviction or node drain) is forwarded
  to the ranks, which save and exit with 85 on their own; torchrun would instead give them 30 seconds
  and then kill them. The pod's grace period bounds the save (spec.checkpoint.gracePeriodSeconds).
- when a rank exits with one of the trainer's own codes (permanent failures, preemption), the reason
  the rank printed stays the last thing in the log (and in the termination message the operator reads
  back): torch elastic's failure report ("failed (exitcode: ...)", the signals sent to the other ranks)
  is left out. It stays for every other exit, a crash that may be a bug.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from types import FrameType

from finetune_operator.api.trainer_config import EXIT_PREEMPTED, PERMANENT_EXIT_CODES
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args
from torch.distributed.run import run as torchrun

#: Exit codes of ranks that already said why they stopped.
EXPLAINED_EXIT_CODES = frozenset({*PERMANENT_EXIT_CODES, EXIT_PREEMPTED})
ELASTIC_LOGGERS = "torch.distributed.elastic"


class ExplainedExitFilter(logging.Filter):
    """Drops torch elastic's failure report once a rank exits with an explained code, and every elastic
    record after it (the closing signals sent to the other ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.quiet:
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("failed (exitcode: %s)") and args and args[0] in EXPLAINED_EXIT_CODES:
            self.quiet = True
            return False
        return True


def quiet_explained_exits() -> ExplainedExitFilter:
    """Install the filter on every torch elastic logger (a logger's filters see only its own records)."""
    flt = ExplainedExitFilter()
    for name in list(logging.root.manager.loggerDict):
        if name == ELASTIC_LOGGERS or name.startswith(ELASTIC_LOGGERS + "."):
            logging.getLogger(name).addFilter(flt)
    return flt


def exit_code(exc: ChildFailedError) -> int:
    _rank, failure = exc.get_first_failure()
    code = failure.exitcode
    return 128 - code if code < 0 else (code or 1)


def forward_sigterm(signum: int, frame: FrameType | None) -> None:
    """Pass SIGTERM on to the ranks (this launcher's children) and keep supervising them."""
    import psutil

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)  # type: ignore[no-untyped-call]  # unannotated in torch
    # torchrun installs its own handlers for these when it starts the ranks; SIGTERM stays ours.
    handled = [s.strip() for s in str(args.signals_to_handle).split(",")]
    args.signals_to_handle = ",".join(s for s in handled if s and s != "SIGTERM")
    signal.signal(signal.SIGTERM, forward_sigterm)
    quiet_explained_exits()
    try:
        torchrun(args)  # type: ignore[no-untyped-call]  # unannotated in torch
    except ChildFailedError as exc:
        return exit_code(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
