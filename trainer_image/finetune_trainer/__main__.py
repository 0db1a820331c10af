"""``python -m finetune_trainer --config FILE``: the trainer's entry point, launched by torchrun.

``python -m finetune_trainer preflight --config FILE [--result FILE] [--world-size N]`` runs the
preflight instead (:mod:`.preflight`: data, tokenizer, write access and memory checked on a CPU, no
weights loaded; exit 0, 2 or 3 as below).

Exit codes (shared with the operator's podFailurePolicy, defined in finetune_operator.api.trainer_config):

==  ================================================================================================
0   done: outputs written
2   invalid configuration (permanent), including a checkpoint written by a different spec
3   invalid data (permanent): every bad record printed as file:line
4   non-finite loss (permanent): the loss became NaN/inf; the last good checkpoint is kept
6   diverged (permanent): the loss rose above spec.training.divergence.lossFactor times its lowest, or
    diverged again after the last rollback allowed (maxRollbacks)
85  preempted (retriable): SIGTERM handled, the state at the current step committed; resumes there
86  rolled back (retriable; spec.training.onDivergence rollback): the checkpoints written since the
    divergence began are removed; the next attempt resumes before it with a scaled learning rate
==  ================================================================================================

The reason of a failure is printed and, when the file exists (Kubernetes' default
``terminationMessagePath``), written to ``/dev/termination-log`` (``FINETUNE_TERMINATION_LOG``
overrides the path).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from finetune_operator.api.trainer_config import (
    EXIT_DIVERGED,
    EXIT_INVALID_CONFIG,
    EXIT_INVALID_DATA,
    EXIT_NONFINITE_LOSS,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_ROLLBACK,
    load_trainer_config,
)
from pydantic import ValidationError

from .data.records import DataError
from .errors import ConfigError, Diverged, NonFiniteLoss, Preempted


def termination_message(text: str) -> None:
    """Leave the reason where Kubernetes reads it into the container's status (best effort)."""
    path = os.environ.get("FINETUNE_TERMINATION_LOG", "/dev/termination-log")
    if int(os.environ.get("RANK", "0")) != 0 or not os.path.exists(path):
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text[-4000:])
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["preflight"]:
        from . import preflight

        return preflight.main(args_in[1:])
    parser = argparse.ArgumentParser(prog="finetune_trainer", description=__doc__)
    parser.add_argument("--config", required=True, help="trainer config JSON (written by the operator or finetune run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_trainer_config(args.config)
    except (OSError, ValidationError) as exc:
        print(f"invalid trainer config {args.config}: {exc}", file=sys.stderr)
        return EXIT_INVALID_CONFIG

    from . import distributed
    from .recipes import recipe_for

    try:
        recipe_for(config.spec.task.type)(config)
    except DataError as exc:
        print(f"invalid data:\n{exc}", file=sys.stderr)
        termination_message(f"invalid data:\n{exc}")
        return EXIT_INVALID_DATA
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        termination_message(f"invalid configuration: {exc}")
        return EXIT_INVALID_CONFIG
    except NonFiniteLoss as exc:
        print(f"non-finite loss: {exc}", file=sys.stderr)
        termination_message(f"non-finite loss: {exc}")
        return EXIT_NONFINITE_LOSS
    except Diverged as exc:
        print(f"diverged: {exc}", file=sys.stderr)
        termination_message(f"diverged: {exc}")
        return EXIT_ROLLBACK if exc.rollback else EXIT_DIVERGED
    except Preempted as exc:
        termination_message(f"preempted: {exc}")
        return EXIT_PREEMPTED
    finally:
        distributed.teardown()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
