"""``python -m finetune_trainer.launch [torchrun flags] -m finetune_trainer --config FILE``

torchrun, with one difference: it exits with the exit code of the first rank that failed, instead of
a blanket 1. The trainer's codes (invalid config or data, non-finite loss, preempted) must survive to
the pod's status, where the operator's podFailurePolicy decides between failing and retrying, and to
``finetune run``'s caller. A rank killed by a signal N gives 128 + N, as a shell would.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args
from torch.distributed.run import run as torchrun


def exit_code(exc: ChildFailedError) -> int:
    _rank, failure = exc.get_first_failure()
    code = failure.exitcode
    return 128 - code if code < 0 else (code or 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torchrun(args)
    except ChildFailedError as exc:
        return exit_code(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
