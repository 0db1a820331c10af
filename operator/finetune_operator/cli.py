"""The ``finetune`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .api import crd as crd_module
from .api import sweep_crd
from .api.trainer_config import EXIT_INVALID_CONFIG
from .api.v1alpha1 import FineTuneJob
from .api.validation import InvalidSpec, check_file, load_jobs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="finetune-operator")
def main() -> None:
    """Fine-tune language models on Kubernetes, or on this machine, from one FineTuneJob manifest."""


#: Files a directory argument contributes, as `kubectl apply -f DIR` takes them (JSON is YAML too).
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def validate(files: tuple[Path, ...], quiet: bool) -> None:
    """Check FineTuneJob and FineTuneSweep manifests offline; print every error as FILE:LINE: FIELD: MESSAGE.

    Directories are searched for *.yaml, *.yml and *.json files. Documents of other kinds are skipped
    (and named); exit status 1 when any file or manifest is invalid, or when none was found.
    """
    paths: list[Path] = []
    for f in files:
        if f.is_dir():
            paths.extend(sorted(p for p in f.rglob("*") if p.suffix in MANIFEST_SUFFIXES and p.is_file()))
        else:
            paths.append(f)
    failed = 0
    checked = 0
    for path in paths:
        result = check_file(path)
        if result.errors:
            failed += 1
            for error in result.errors:
                click.echo(str(error), err=True)
        for doc in result.documents:
            if doc.errors:
                failed += 1
                for error in doc.errors:
                    click.echo(str(error), err=True)
            elif doc.job is not None:
                checked += 1
                if not quiet:
                    click.echo(f"{path}:{doc.doc.start_line}: FineTuneJob {doc.job.metadata.name} is valid")
            elif doc.sweep is not None:
                checked += 1
                if not quiet:
                    click.echo(f"{path}:{doc.doc.start_line}: FineTuneSweep {doc.sweep.metadata.name} is valid")
            elif not quiet:
                click.echo(f"{path}:{doc.doc.start_line}: skipped {doc.skipped}: not a FineTuneJob")
    if checked == 0 and failed == 0:
        click.echo("no FineTuneJob manifests found", err=True)
        sys.exit(1)
    if failed:
        click.echo(f"{failed} invalid manifest(s)", err=True)
        sys.exit(1)


@main.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the CRD here instead of standard output.",
)
@click.option(
    "--kind", type=click.Choice(["FineTuneJob", "FineTuneSweep"]), default="FineTuneJob", show_default=True,
    help="The resource whose CRD to print.",
)  # fmt: skip
def crd(output: Path | None, kind: str) -> None:
    """Print the FineTuneJob (or FineTuneSweep) CustomResourceDefinition generated from the typed API."""
    text = crd_module.render() if kind == "FineTuneJob" else sweep_crd.render()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


def _one_job(manifest: Path, job_name: str | None) -> FineTuneJob:
    """The manifest's FineTuneJob (``job_name`` when it holds several), validated as `finetune validate`
    does; exit 2 with every error as FILE:LINE: FIELD: MESSAGE otherwise."""
    try:
        jobs = load_jobs(manifest)
    except InvalidSpec as exc:
        for error in exc.errors:
            click.echo(str(error), err=True)
        sys.exit(2)
    if job_name:
        jobs = [j for j in jobs if j.metadata.name == job_name]
    if len(jobs) != 1:
        names = ", ".join(j.metadata.name for j in jobs) or "none"
        click.echo(f"{manifest}: expected one FineTuneJob (use --job NAME); found {names}", err=True)
        sys.exit(2)
    return jobs[0]


def _require_trainer(command: str) -> None:
    import importlib.util

    if importlib.util.find_spec("finetune_trainer") is None:
        click.echo(f"error: finetune {command} needs the trainer: pip install 'finetune-operator[trainer]'", err=True)
        sys.exit(2)


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--job", "job_name", help="Name of the FineTuneJob to run when the file holds several.")
@click.option("--nproc", type=click.IntRange(min=1), help="Training processes (default: procsPerNode, or 1 on CPU).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where checkpoints, outputs and logs go (default: runs/<job name>).",
)
def run(manifest: Path, job_name: str | None, nproc: int | None, workdir: Path | None) -> None:
    """Train a FineTuneJob on this machine (CPU or local GPUs) under torchrun.

    First the preflight, as the operator runs it (unless spec.preflight.mode is skip; see `finetune
    plan`): bad data exits 3 before the model is opened, a configuration error 2, and a job whose
    memory estimate exceeds spec.resources.gpuMemory 5 unless spec.preflight.allowWillNotFit.
    """
    from .local_run import LocalDependencyError, run_local

    job = _one_job(manifest, job_name)
    if job.spec.distributed.nodes > 1:
        click.echo(
            f"note: spec.distributed.nodes is {job.spec.distributed.nodes}; running on this machine only", err=True
        )
    workdir = workdir or Path("runs") / job.metadata.name
    click.echo(f"finetune: running {job.metadata.name} in {workdir}", err=True)
    try:
        code = run_local(job, manifest=manifest, workdir=workdir, nproc=nproc)
    except LocalDependencyError as exc:
        click.echo(f"{manifest}: {exc}", err=True)
        code = EXIT_INVALID_CONFIG
    sys.exit(code)


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the trials' runs go, one directory each (default: runs/<sweep name>).",
)
@click.option(
    "--export-study",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the trials as an Optuna study in this SQLite file (optuna-dashboard sqlite:///PATH).",
)
def sweep(manifest: Path, workdir: Path | None, export_study: Path | None) -> None:
    """Run a FineTuneSweep on this machine: its trials one after another, each a `finetune run` of the
    template with the trial's parameters, chosen by the operator's study logic (Optuna).

    A trial the pruner stops is stopped (its process, at an evaluation) and counted Pruned. Prints the
    trials and the best. Exit status: 0 when a trial completed, 1 when none did, 2 an invalid manifest.
    Run again, a sweep goes on from the trials its workdir holds.
    """
    from .api.validation import load_sweeps
    from .local_sweep import export_study as export
    from .local_sweep import observations, run_sweep, table

    _require_trainer("sweep")
    try:
        sweeps = load_sweeps(manifest)
    except InvalidSpec as exc:
        for error in exc.errors:
            click.echo(str(error), err=True)
        sys.exit(2)
    if len(sweeps) != 1:
        click.echo(f"{manifest}: expected one FineTuneSweep; found {len(sweeps)}", err=True)
        sys.exit(2)
    (one,) = sweeps
    workdir = workdir or Path("runs") / one.metadata.name
    click.echo(f"finetune: sweeping {one.metadata.name} in {workdir}", err=True)
    status = run_sweep(one, manifest=manifest, workdir=workdir, log=lambda line: click.echo(line, err=True))
    click.echo(table(one, status))
    if export_study is not None:
        export(one, observations(status), export_study)
        click.echo(f"study: {export_study} (optuna-dashboard sqlite:///{export_study})")
    sys.exit(0 if status.best_trial is not None else 1)


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--job", "job_name", help="Name of the FineTuneJob to plan when the file holds several.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the trainer config, the model's config and tokenizer, and the result go (default: runs/<job name>).",
)
@click.option(
    "-o", "--output", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="json: the preflight result (status.preflight's fields) with gpuMemory and fits.",
)  # fmt: skip
def plan(manifest: Path, job_name: str | None, workdir: Path | None, output_format: str) -> None:
    """Check a FineTuneJob without training: the operator's preflight, run here.

    Every record checked (each problem as file:line: reason), the model's config and tokenizer read
    (never its weights), token lengths, truncation, tokens and optimizer steps of one epoch, write access
    to the checkpoint and output URIs, and the GPU memory per rank, checked against
    spec.resources.gpuMemory. Exit status: 0 ready to train; 2 an invalid manifest or configuration;
    3 bad data; 5 the job cannot fit in the GPU memory (a certain OOM).
    """
    from .api.trainer_config import EXIT_INVALID_DATA
    from .local_run import EXIT_WILL_NOT_FIT, LocalDependencyError, preflight_local
    from .plan import plan_text

    _require_trainer("plan")
    job = _one_job(manifest, job_name)
    name = job.metadata.name
    try:
        checked = preflight_local(job, manifest=manifest, workdir=workdir or Path("runs") / name, capture=True)
    except LocalDependencyError as exc:
        click.echo(f"{manifest}: {exc}", err=True)
        sys.exit(EXIT_INVALID_CONFIG)
    result = checked.result
    if result is None:
        click.echo(checked.stderr.rstrip(), err=True)
        click.echo(f"error: the preflight exited {checked.returncode} without a result", err=True)
        sys.exit(checked.returncode or 1)
    fits = checked.fits(job.spec)
    code = checked.returncode
    if code == 0 and fits is False and not job.spec.preflight.allow_will_not_fit:
        code = EXIT_WILL_NOT_FIT
    if output_format == "json":
        body = result.model_copy(update={"gpu_memory": job.spec.resources.gpu_memory_bytes, "fits": fits})
        click.echo(body.model_dump_json(by_alias=True, exclude_none=True))
    else:
        verdict = {
            0: "ready to train" if fits is not False else "ready to train (spec.preflight.allowWillNotFit)",
            EXIT_INVALID_DATA: "bad data",
            EXIT_WILL_NOT_FIT: "will not fit in GPU memory",
        }.get(code, "invalid configuration")
        click.echo(plan_text(name, result, job.spec, verdict=verdict))
    sys.exit(code)


@main.command()
@click.argument("run_dir", metavar="RUN_DIR_OR_URI")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the PNG plots (default: RUN_DIR/report; ./report for object storage).",
)
def report(run_dir: str, output: Path | None) -> None:
    """Summarize a training run and plot its loss, eval loss, learning rate and throughput.

    RUN_DIR_OR_URI is a `finetune run --workdir` directory, its metrics.jsonl, or a copy in object
    storage (s3://bucket/prefix).
    """
    from .report import ReportError, load, plot, summary

    try:
        run = load(run_dir)
    except ReportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(summary(run))
    if output is None:
        local = Path(run_dir.removeprefix("file://"))
        if "://" in run_dir and not run_dir.startswith("file://"):
            output = Path("report")
        else:
            output = (local.parent if local.suffix == ".jsonl" else local) / "report"
    for path in plot(run, output):
        click.echo(f"plot: {path}")


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("output", metavar="OUTPUT")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Records of the job's data format: a file or directory, local or in object storage.",
)
@click.option("--artifact", type=click.Choice(["merged", "adapter"]), help="Default: merged if present, else adapter.")
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the predictions (JSON lines) here instead of standard output.",
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Longest generated text (causal-LM tasks).")  # fmt: skip
def predict(output: str, input_uri: str, artifact: str | None, predictions: Path | None, max_new_tokens: int) -> None:
    """Run a job's saved model on records, to check what was trained.

    OUTPUT is the job's output: its spec.output.uri, or an artifact URI of its status or summary
    (`finetune run` without spec.output.uri writes WORKDIR/storage/local/NAME/output). Every record
    gives one JSON line: its file and line, the prediction and the reference; the task's scores over
    the records go to standard error. Needs the trainer's dependencies
    (`pip install 'finetune-operator[trainer]'`).
    """
    import subprocess

    _require_trainer("predict")
    argv = [sys.executable, "-m", "finetune_trainer.predict", output, "--input", input_uri]
    argv += ["--max-new-tokens", str(max_new_tokens)]
    if artifact:
        argv += ["--artifact", artifact]
    if predictions:
        argv += ["--predictions", str(predictions)]
    sys.exit(subprocess.run(argv, check=False).returncode)
