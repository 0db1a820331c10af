"""The ``finetune`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .api import crd as crd_module
from .api.validation import InvalidSpec, is_finetunejob, read_documents, validate_document


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="finetune-operator")
def main() -> None:
    """Fine-tune language models on Kubernetes, or on this machine, from one FineTuneJob manifest."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def validate(files: tuple[Path, ...], quiet: bool) -> None:
    """Check FineTuneJob manifests offline; print every error as FILE:LINE: FIELD: MESSAGE."""
    paths: list[Path] = []
    for f in files:
        paths.extend(sorted(p for p in f.rglob("*.y*ml")) if f.is_dir() else [f])
    failed = 0
    checked = 0
    for path in paths:
        try:
            documents = list(read_documents(path))
        except InvalidSpec as exc:
            failed += 1
            for error in exc.errors:
                click.echo(str(error), err=True)
            continue
        for doc in documents:
            if not is_finetunejob(doc.data):
                continue
            checked += 1
            try:
                job = validate_document(doc)
            except InvalidSpec as exc:
                failed += 1
                for error in exc.errors:
                    click.echo(str(error), err=True)
            else:
                if not quiet:
                    click.echo(f"{path}:{doc.start_line}: FineTuneJob {job.metadata.name} is valid")
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
def crd(output: Path | None) -> None:
    """Print the FineTuneJob CustomResourceDefinition generated from the typed API."""
    text = crd_module.render()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
