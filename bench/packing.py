"""Packing: tokens/s with packing ÷ tokens/s without, on mixed-length SFT data (goal ≥ 1.8).

Same model, data, batch size and steps; only ``spec.data.packing`` differs. Tokens are real
(non-padding) tokens, counted by the trainer's collator.

    .venv/bin/python bench/packing.py [--steps 30]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from _common import build_model, finetune_run, tiny


def mixed_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion pairs whose lengths range from a few tokens to a few hundred (long-tailed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        fruit = rng.choice(list(tiny.FRUIT))
        color, taste = tiny.FRUIT[fruit]
        repeat = int(rng.paretovariate(1.2)) if rng.random() < 0.8 else rng.randint(20, 60)
        rows.append(
            {
                "prompt": f"tell me about the {fruit}.",
                "completion": " " + " ".join([f"the {fruit} is {color} and {taste}."] * min(repeat, 60)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    model_dir = build_model(root / "model")
    train = tiny.write_jsonl(root / "train.jsonl", mixed_rows(3000))
    results = {}
    for packing in (False, True):
        manifest = tiny.job_manifest(
            f"packing-{str(packing).lower()}",
            model_dir,
            train,
            data={"train": {"uri": str(train)}, "format": "promptCompletion", "maxSeqLength": 512, "packing": packing},
            training={"maxSteps": args.steps, "learningRate": 1e-3, "perDeviceBatchSize": 8, "logEverySteps": 5},
        )
        summary = finetune_run(manifest, root / f"packing-{packing}")
        results[packing] = summary["tokens_per_second"]
        print(f"packing={packing}: {results[packing]:,.0f} tokens/s")
    print(f"packing speed-up: packed / unpacked tokens/s = {results[True] / results[False]:.2f} (goal >= 1.8)")


if __name__ == "__main__":
    main()
