"""Run the laptop examples with `finetune run` and check their summaries (called by hack/examples.sh).

Each example is a manifest of examples/ whose model ships with a Python package (``pkg://``): it runs
as written, on this machine's CPUs. What is checked, from each run's summary.json:

- ``quickstart``: held-out perplexity at least halves; general-text perplexity (forgetting) at most
  doubles.
- ``ticket-routing``: macro F1 rises by at least 0.3; and the same manifest without
  ``balanceClassWeights`` (run here too, from a copy in the work directory) recalls the minority
  queues — those holding at most 10% of the training tickets — less well than the weighted run does
  (the mean of their recalls).
- ``company-facts-qa``: exact match and F1 rise by at least 0.3 each.
- ``reward-model``: pairwise accuracy on the held-out pairs rises by at least 0.3, to at least 0.9.
- ``dpo``: reward accuracy on the held-out pairs rises by at least 0.3, and the mean margin turns positive.
- ``forgetting-ewc``: held-out perplexity falls; and the same manifest without ``ewc`` (run here too, from
  a copy in the work directory) ends with a higher general-text perplexity than the EWC run (EWC keeps
  more of the base model's general ability), both runs the same steps and seed.
- ``grpo`` (against the reward model of ``reward-model``, run first if this work directory has no run of
  it): the mean reward of the second half of the run is above the first half's, and the reward of the
  replies to held-out tickets rises.
- ``ppo`` (against the same reward model, run first if absent): as ``grpo``, and the KL to the base model
  stays below 1.
- ``distill`` (from ``ftj://distill-teacher``, a copy of ``quickstart`` saving its merged model, run
  first if this work directory has no run of it): the held-out KL to the teacher (``eval_kd_loss``)
  falls by at least a quarter, and the student-teacher top-1 agreement rises.
- ``pipeline-cpt-then-sft`` (its two jobs in file order, ``--job cpt`` then ``--job sft``, side by side
  in the work directory): the continual pre-training lowers the perplexity of held-out ticket text;
  the SFT trains from cpt's merged model (its provenance names that artifact's URI) and at least halves
  held-out perplexity, and general-text perplexity at most doubles over the pipeline.

Prints every figure it checks and exits 1 if any check fails.

    .venv/bin/python hack/examples.py [NAME ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FINETUNE = Path(sys.executable).with_name("finetune")

Summary = dict[str, Any]
#: A check's verdict: the line to print, and whether it passed (None: a figure shown, not checked).
Verdict = tuple[str, bool | None]


def run(manifest: Path, workdir: Path, job: str | None = None) -> Summary:
    """`finetune run MANIFEST` (`--job JOB`: one job of a file of several); its summary."""
    started = time.monotonic()
    log = workdir.with_suffix(".log")
    what = f"{manifest.name} --job {job}" if job else manifest.name
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.run(
            [str(FINETUNE), "run", str(manifest), *(["--job", job] if job else []), "--workdir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    print(f"  {what}: exit {proc.returncode} in {time.monotonic() - started:.0f} s (log: {log})", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n" + log.read_text(encoding="utf-8")[-4000:])
    summary: Summary = json.loads((workdir / "summary.json").read_text(encoding="utf-8"))
    return summary


def rises(summary: Summary, metric: str, *, by: float) -> Verdict:
    before, after = summary["before"][metric], summary["after"][metric]
    return f"{metric} {before:.3f} -> {after:.3f} (must rise by {by})", after - before >= by


def quickstart(manifest: Path, workdir: Path) -> list[Verdict]:
    s = run(manifest, workdir / "quickstart")
    (b, a), (gb, ga) = ((s["before"][k], s["after"][k]) for k in ("eval_perplexity", "general_perplexity"))
    return [
        (f"eval_perplexity {b:.2f} -> {a:.2f} (must at least halve)", a <= 0.5 * b),
        (f"general_perplexity {gb:.2f} -> {ga:.2f} (must at most double)", ga <= 2 * gb),
    ]


def minority_classes(manifest: Path, job: dict[str, Any]) -> list[str]:
    """The classes holding at most 10% of the training records."""
    data = job["spec"]["data"]
    label = data.get("columns", {}).get("label", "label")
    path = (manifest.parent / data["train"]["uri"]).resolve()
    counts = collections.Counter(json.loads(line)[label] for line in path.read_text(encoding="utf-8").splitlines())
    total = sum(counts.values())
    return [name for name in job["spec"]["task"]["classification"]["labels"] if counts[name] <= 0.1 * total]


def ticket_routing(manifest: Path, workdir: Path) -> list[Verdict]:
    job = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    weighted = run(manifest, workdir / "ticket-routing")
    # The same job without class weights: a copy whose data paths are absolute, so that it runs from here.
    unweighted_job = json.loads(json.dumps(job))
    unweighted_job["metadata"]["name"] += "-unweighted"
    del unweighted_job["spec"]["task"]["classification"]["balanceClassWeights"]
    for source in ("train", "eval"):
        uri = unweighted_job["spec"]["data"][source]["uri"]
        unweighted_job["spec"]["data"][source]["uri"] = str((manifest.parent / uri).resolve())
    copy = workdir / "ticket-routing-unweighted.yaml"
    copy.write_text(yaml.safe_dump(unweighted_job, sort_keys=False), encoding="utf-8")
    unweighted = run(copy, workdir / "ticket-routing-unweighted")

    minority = minority_classes(manifest, job)
    verdicts = [rises(weighted, "eval_f1", by=0.3)]
    for name, s in (("weighted", weighted), ("unweighted", unweighted)):
        recalls = ", ".join(
            f"{c} {s['after'][f'eval_recall_{c}']:.3f}" for c in job["spec"]["task"]["classification"]["labels"]
        )
        verdicts.append((f"{name}: macro F1 {s['after']['eval_f1']:.3f}, recall: {recalls}", None))

    def mean_recall(s: Summary) -> float:
        return sum(s["after"][f"eval_recall_{c}"] for c in minority) / len(minority)

    w, u = mean_recall(weighted), mean_recall(unweighted)
    verdicts.append((f"minority ({', '.join(minority)}) mean recall: weighted {w:.3f} vs unweighted {u:.3f}", w > u))
    return verdicts


def forgetting_ewc(manifest: Path, workdir: Path) -> list[Verdict]:
    job = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    anchored = run(manifest, workdir / "forgetting-ewc")
    # The same job without EWC: a copy whose data paths are absolute, so that it runs from here.
    plain_job = json.loads(json.dumps(job))
    plain_job["metadata"]["name"] += "-plain"
    del plain_job["spec"]["training"]["forgetting"]["ewc"]
    spec = plain_job["spec"]
    for source in (spec["data"]["train"], spec["data"]["eval"], spec["training"]["forgetting"]["generalEval"]):
        source["uri"] = str((manifest.parent / source["uri"]).resolve())
    copy = workdir / "forgetting-ewc-plain.yaml"
    copy.write_text(yaml.safe_dump(plain_job, sort_keys=False), encoding="utf-8")
    plain = run(copy, workdir / "forgetting-ewc-plain")
    (b, a), (gb, ga) = (
        (anchored["before"][k], anchored["after"][k]) for k in ("eval_perplexity", "general_perplexity")
    )
    gp = plain["after"]["general_perplexity"]
    return [
        (f"eval_perplexity {b:.2f} -> {a:.2f} (must fall)", a < b),
        (f"without EWC: eval_perplexity -> {plain['after']['eval_perplexity']:.2f}", None),
        (f"general_perplexity {gb:.2f} -> {ga:.2f} with EWC, -> {gp:.2f} without (must be lower with)", ga < gp),
    ]


def company_facts_qa(manifest: Path, workdir: Path) -> list[Verdict]:
    s = run(manifest, workdir / "company-facts-qa")
    return [rises(s, "eval_exact_match", by=0.3), rises(s, "eval_f1", by=0.3)]


def reward_model(manifest: Path, workdir: Path) -> list[Verdict]:
    s = run(manifest, workdir / "support-reward")  # its job name: grpo's ftj://support-reward finds it there
    after = s["after"]["eval_accuracy"]
    return [
        rises(s, "eval_accuracy", by=0.3),
        (f"eval_accuracy after {after:.3f} (must be at least 0.9)", after >= 0.9),
        (f"eval_margin {s['before']['eval_margin']:.3f} -> {s['after']['eval_margin']:.3f}", None),
    ]


def dpo(manifest: Path, workdir: Path) -> list[Verdict]:
    s = run(manifest, workdir / "support-dpo")
    margin = s["after"]["eval_rewards/margins"]
    return [rises(s, "eval_accuracy", by=0.3), (f"eval margin after {margin:.3f} (> 0)", margin > 0)]


def grpo(manifest: Path, workdir: Path) -> list[Verdict]:
    if not (workdir / "support-reward" / "summary.json").is_file():
        reward_model(EXAMPLES / "reward-model.yaml", workdir)
    s = run(manifest, workdir / "support-grpo")
    first, second = s["reward_mean_first_half"], s["reward_mean_second_half"]
    return [
        (f"mean reward: first half {first:.3f}, second half {second:.3f} (must rise)", second > first),
        rises(s, "eval_reward", by=0.0),
    ]


def ppo(manifest: Path, workdir: Path) -> list[Verdict]:
    if not (workdir / "support-reward" / "summary.json").is_file():
        reward_model(EXAMPLES / "reward-model.yaml", workdir)
    s = run(manifest, workdir / "support-ppo")
    first, second, kl = s["reward_mean_first_half"], s["reward_mean_second_half"], s["kl_max"]
    return [
        (f"mean reward: first half {first:.3f}, second half {second:.3f} (must rise)", second > first),
        rises(s, "eval_reward", by=0.0),
        (f"largest KL to the base model {kl:.3f} (must stay below 1)", kl < 1.0),
        (f"clip fraction {s['clip_fraction_last']:.3f}, value loss {s['value_loss_last']:.3f} (last)", None),
    ]


def distill(manifest: Path, workdir: Path) -> list[Verdict]:
    # The teacher, ftj://distill-teacher: quickstart's LoRA SFT renamed, saving its merged model (a copy
    # whose data paths are absolute, so that it runs from here), unless this work directory has it.
    if not (workdir / "distill-teacher" / "summary.json").is_file():
        job = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text(encoding="utf-8"))
        job["metadata"]["name"] = "distill-teacher"
        job["spec"]["output"] = {"save": "merged"}
        spec = job["spec"]
        for source in (spec["data"]["train"], spec["data"]["eval"], spec["training"]["forgetting"]["generalEval"]):
            source["uri"] = str((EXAMPLES / source["uri"]).resolve())
        copy = workdir / "distill-teacher.yaml"
        copy.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
        run(copy, workdir / "distill-teacher")
    s = run(manifest, workdir / "distill-student")
    (b, a) = (s["before"]["eval_kd_loss"], s["after"]["eval_kd_loss"])
    return [
        (f"eval_kd_loss (T^2 KL to the teacher) {b:.3f} -> {a:.3f} (must fall by a quarter)", a <= 0.75 * b),
        rises(s, "eval_agreement", by=0.0),
        (f"eval_perplexity {s['before']['eval_perplexity']:.2f} -> {s['after']['eval_perplexity']:.2f}", None),
    ]


def pipeline_cpt_then_sft(manifest: Path, workdir: Path) -> list[Verdict]:
    # As its header says: cpt, then sft, whose ftj://cpt is the run beside it (workdir/cpt).
    cpt = run(manifest, workdir / "cpt", job="cpt")
    sft = run(manifest, workdir / "sft", job="sft")
    merged = next(a for a in cpt["artifacts"] if a["kind"] == "merged")
    (cb, ca), (b, a) = ((s["before"]["eval_perplexity"], s["after"]["eval_perplexity"]) for s in (cpt, sft))
    gb, ga = cpt["before"]["general_perplexity"], sft["after"]["general_perplexity"]
    return [
        (f"cpt: eval_perplexity (ticket text) {cb:.2f} -> {ca:.2f} (must fall)", ca < cb),
        (f"sft: model {sft['provenance']['model']['uri']} (must be cpt's merged model)", None),
        ("sft trained from cpt's merged model", sft["provenance"]["model"]["uri"] == merged["uri"]),
        (f"sft: eval_perplexity {b:.2f} -> {a:.2f} (must at least halve)", a <= 0.5 * b),
        (f"general_perplexity {gb:.2f} before cpt -> {ga:.2f} after sft (must at most double)", ga <= 2 * gb),
    ]


CHECKS: dict[str, Callable[[Path, Path], list[Verdict]]] = {
    "quickstart": quickstart,
    "ticket-routing": ticket_routing,
    "company-facts-qa": company_facts_qa,
    "forgetting-ewc": forgetting_ewc,
    "reward-model": reward_model,
    "dpo": dpo,
    "grpo": grpo,
    "ppo": ppo,
    "distill": distill,
    "pipeline-cpt-then-sft": pipeline_cpt_then_sft,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", choices=[*CHECKS, []], metavar="NAME", help=", ".join(CHECKS))
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a new temporary directory)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="finetune-examples-"))
    workdir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.names or list(CHECKS):
        print(f"{name}:", flush=True)
        for line, ok in CHECKS[name](EXAMPLES / f"{name}.yaml", workdir):
            print(f"  {'    ' if ok is None else 'ok  ' if ok else 'FAIL'} {line}", flush=True)
            if ok is False:
                failed.append(f"{name}: {line}")
    if failed:
        raise SystemExit("failed:\n" + "\n".join(failed))
    print("every example ran and did what it claims")


if __name__ == "__main__":
    main()
