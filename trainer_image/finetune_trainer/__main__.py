"""``python -m finetune_trainer --config FILE``: the trainer's entry point, launched by torchrun.

Exit codes (shared with the operator's podFailurePolicy): 0 done; 2 invalid config; 3 invalid data
(every bad record printed as file:line); 4 non-finite loss; 85 preempted with state saved.
"""

from __future__ import annotations

import argparse
import logging
import sys

from finetune_operator.trainer_config import EXIT_INVALID_CONFIG, EXIT_INVALID_DATA, load_trainer_config
from pydantic import ValidationError

from .errors import ConfigError
from .records import DataError


def main(argv: list[str] | None = None) -> int:
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
    from .recipes import causal_lm

    try:
        if config.spec.task.type not in ("sft", "pretrain"):
            print(f"spec.task.type {config.spec.task.type} is not supported by this trainer yet", file=sys.stderr)
            return EXIT_INVALID_CONFIG
        causal_lm.run(config)
    except DataError as exc:
        print(f"invalid data:\n{exc}", file=sys.stderr)
        return EXIT_INVALID_DATA
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
