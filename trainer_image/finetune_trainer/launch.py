"""``python -m finetune_trainer.launch [torchrun flags] -m finetune_trainer --config FILE``

torchrun, with two differences:

- it exits with the exit code of the first rank that failed, instead of a blanket 1. The trainer's
  codes (invalid config or data, non-finite loss, preempted) must survive to the pod's status, where
  the operator's podFailurePolicy decides between failing and retrying, and to ``finetune run``'s
  caller. A rank killed by a signal N gives 128 + N, as a shell would.
- SIGTERM (sent to the container's first process on preemption, eviction or node drain) is forwarded
  to the ranks, which save and exit with 85 on their own; torchrun would instead give them 30 seconds
  and then kill them. The pod's grace period bounds the save (spec.checkpoint.gracePeriodSeconds).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args
from torch.distributed.run import run as torchrun


def exit_code(exc: ChildFailedError) -> int:
    _rank, failure = exc.get_first_failure()
    code = failure.exitcode
    return 128 - code if code < 0 else (code or 1)


def forward_sigterm(signum: int, frame: Any) -> None:
    """Pass SIGTERM on to the ranks (this launcher's children) and keep supervising them."""
    import psutil

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # torchrun installs its own handlers for these when it starts the ranks; SIGTERM stays ours.
    handled = [s.strip() for s in str(args.signals_to_handle).split(",")]
    args.signals_to_handle = ",".join(s for s in handled if s and s != "SIGTERM")
    signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        torchrun(args)
    except ChildFailedError as exc:
        return exit_code(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
