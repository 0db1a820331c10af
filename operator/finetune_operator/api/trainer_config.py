"""The trainer's configuration, derived from a FineTuneJob by one pure function.

The operator (which renders it into a ConfigMap) and ``finetune run`` (which writes it to the work
directory) both call :func:`build_trainer_config`, so a job trains the same way in a cluster and on a
laptop. The trainer reads nothing else: no environment lookups decide *what* to train, only *where*
this process sits in the gang (torchrun's RANK/WORLD_SIZE/...).

Both also start the trainer the same way, :func:`trainer_command` (torchrun through our launcher), with
the same object-storage environment, :func:`storage_environment`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import SpecModel
from .v1alpha1 import GCS_URI_SCHEMES, Dependency, FineTuneJob, FineTuneJobSpec, uri_scheme

#: Exit codes of the trainer, shared by the trainer (which exits with them) and the operator (whose
#: Job podFailurePolicy fails at once on the permanent ones and retries the others).
EXIT_OK = 0
EXIT_INVALID_CONFIG = 2  #: bad config or data: permanent, retrying cannot help
EXIT_INVALID_DATA = 3  #: a dataset record is malformed: permanent
EXIT_PREEMPTED = 85  #: SIGTERM handled and full state committed: retriable, resumes from there
EXIT_NONFINITE_LOSS = 4  #: loss became NaN/inf: permanent; the last good checkpoint is kept
#: the loss diverged (above spec.training.divergence.lossFactor), or diverged again after the last rollback
#: allowed: permanent
EXIT_DIVERGED = 6
#: the loss diverged and spec.training.onDivergence is rollback: the checkpoints since the divergence began
#: are removed; retriable, the next attempt resumes before it with a lower learning rate
EXIT_ROLLBACK = 86
PERMANENT_EXIT_CODES = (EXIT_INVALID_CONFIG, EXIT_INVALID_DATA, EXIT_NONFINITE_LOSS, EXIT_DIVERGED)
#: Exit codes of ``python -m finetune_trainer preflight`` (:func:`preflight_command`): 0 the data is valid,
#: 2 the config is invalid, 3 the data is not (its result's ``problems`` say where). Any other exit (a crash,
#: OOMKilled, a network failure) is retriable: the operator runs the preflight again.
PREFLIGHT_EXIT_CODES = (EXIT_OK, EXIT_INVALID_CONFIG, EXIT_INVALID_DATA)
#: The file the preflight (and the trainer) writes its termination message to; in a pod, the container's
#: ``terminationMessagePath``. The preflight's is its PreflightResult as compact JSON.
TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"
TERMINATION_LOG = "/dev/termination-log"
#: The kubelet keeps at most this many bytes of a termination message.
TERMINATION_MESSAGE_MAX_BYTES = 4096


class JobIdentity(SpecModel):
    """Which FineTuneJob this trainer runs for."""

    namespace: str = Field(description="Namespace of the FineTuneJob ('local' for `finetune run`).")
    name: str = Field(description="Name of the FineTuneJob.")


class TrainerConfig(SpecModel):
    """Everything the trainer needs, resolved: the spec plus where things live."""

    version: Literal[1] = Field(default=1, description="Config format version.")
    job: JobIdentity = Field(description="The job this run belongs to.")
    spec: FineTuneJobSpec = Field(description="The FineTuneJob spec, validated.")
    base_dir: str | None = Field(
        default=None, description="Directory that relative data and model paths resolve against."
    )
    checkpoint_dir: str | None = Field(
        default=None, description="This job's checkpoint prefix: <checkpoint.uri>/<namespace>/<name>."
    )
    output_dir: str = Field(description="Where the results (adapter / merged model) are written.")
    work_dir: str = Field(description="Local scratch space: downloaded models and data, logs.")
    model_digests: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "SHA-256 of the output manifest of each model taken from another FineTuneJob (an `ftj://` URI "
            "the spec here holds resolved), by its URI: the trainer verifies it before loading."
        ),
    )

    def dumps(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_none=True, mode="json"), indent=2, sort_keys=True)


#: The spec sections that decide what a checkpoint holds and how training continues from it. They are
#: immutable once the job exists; the others (runPolicy, resources, output, metrics, checkpoint
#: cadence) may change between attempts — suspending and resuming a job must not orphan its checkpoints.
CHECKPOINT_HASH_FIELDS = frozenset({"model", "task", "method", "data", "training", "distributed"})


def checkpoint_hash(spec: FineTuneJobSpec) -> str:
    """sha256 of the training-defining part of the spec, recorded in every checkpoint's manifest:
    a checkpoint is resumed only by a spec with the same value."""
    dumped = spec.model_dump(by_alias=True, mode="json", include=set(CHECKPOINT_HASH_FIELDS))
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def build_trainer_config(
    job: FineTuneJob,
    *,
    namespace: str | None = None,
    base_dir: str | Path | None = None,
    default_storage: str | None = None,
    work_dir: str | Path = "/tmp/finetune",
    dependencies: Sequence[Dependency] = (),
) -> TrainerConfig:
    """Derive the trainer config from a FineTuneJob.

    ``default_storage`` is used for checkpoints and outputs when the spec names none (``finetune run``
    passes its work directory). ``base_dir`` is where relative paths resolve (the manifest's directory).
    ``dependencies`` resolve the spec's ``ftj://`` model URIs (every one must be: ValueError otherwise):
    the config's spec holds the models' URIs, and ``model_digests`` what the trainer verifies.
    """
    ns = namespace or job.metadata.namespace or "default"
    name = job.metadata.name
    spec = job.spec
    resolved = {d.field: d for d in dependencies}
    missing = sorted(set(spec.job_references()) - set(resolved))
    if missing:
        raise ValueError(f"unresolved model references: {', '.join(missing)}")
    if resolved:
        spec = spec.with_models({field: d.uri for field, d in resolved.items()})
    checkpoint_root = spec.checkpoint.uri or default_storage
    checkpoint_dir = _join(checkpoint_root, ns, name) if checkpoint_root else None
    if spec.output.uri:
        output_dir = spec.output.uri
    elif checkpoint_dir:
        output_dir = _join(checkpoint_dir, "output")
    else:
        output_dir = str(Path(work_dir) / "output")
    return TrainerConfig(
        job=JobIdentity(namespace=ns, name=name),
        spec=spec,
        base_dir=str(base_dir) if base_dir is not None else None,
        checkpoint_dir=checkpoint_dir,
        output_dir=output_dir,
        work_dir=str(work_dir),
        model_digests={d.uri: d.sha256 for d in resolved.values()},
    )


def load_trainer_config(path: str | Path) -> TrainerConfig:
    return TrainerConfig.model_validate_json(Path(path).read_text(encoding="utf-8"))


#: ``python -m LAUNCHER_MODULE [torchrun flags] -m TRAINER_MODULE --config FILE`` starts the trainer: our
#: torchrun wrapper, then the trainer on every rank.
LAUNCHER_MODULE = "finetune_trainer.launch"
TRAINER_MODULE = "finetune_trainer"


@dataclass(frozen=True)
class Rendezvous:
    """One node's place in a multi-node gang: torchrun's static rendezvous at node 0's address.

    The values are strings so that a pod can pass ``$(VAR)`` references, which the kubelet expands.
    """

    nodes: int
    node_rank: str
    master_addr: str
    master_port: str


def trainer_command(
    config_file: str | Path, *, nproc_per_node: int, python: str = "python", rendezvous: Rendezvous | None = None
) -> list[str]:
    """The argv that trains: torchrun (through the launcher) running the trainer on every rank.

    With a ``rendezvous``, one node of the operator's gang (its pods); without, one standalone node
    (``finetune run``). Never a shell string.
    """
    if rendezvous is None:
        gang = ["--standalone", "--nnodes=1"]
    else:
        gang = [
            f"--nnodes={rendezvous.nodes}",
            f"--node-rank={rendezvous.node_rank}",
            f"--master-addr={rendezvous.master_addr}",
            f"--master-port={rendezvous.master_port}",
        ]
    return [
        python,
        "-m",
        LAUNCHER_MODULE,
        *gang,
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        TRAINER_MODULE,
        "--config",
        str(config_file),
    ]


PREFLIGHT_SUBCOMMAND = "preflight"


def preflight_command(config_file: str | Path, *, python: str = "python") -> list[str]:
    """The argv of the preflight: one process, no torchrun (``python -m finetune_trainer preflight --config
    FILE``). The operator's preflight pod and ``finetune run`` / ``finetune plan`` run it alike."""
    return [python, "-m", TRAINER_MODULE, PREFLIGHT_SUBCOMMAND, "--config", str(config_file)]


def storage_environment(spec: FineTuneJobSpec) -> dict[str, str]:
    """Environment of the trainer for ``spec.checkpoint``'s object store, from its ``endpointUrl`` and
    ``region``: for a ``gs://`` uri ``STORAGE_EMULATOR_HOST`` (the variable Google's clients and gcsfs
    read), otherwise ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` (S3; the API refuses both for ``az://``,
    whose connection string names its endpoint, and a region for ``gs://``).

    The checkpoint store reads both from the config; these variables are how the model, data and output
    URIs on the same store reach it too. Set by the operator in every pod and by ``finetune run`` for its
    trainer (where they win over the caller's own). Credentials are not here: a pod gets them from the
    Secret in ``checkpoint.credentials``, ``finetune run`` from the caller's environment.
    """
    env: dict[str, str] = {}
    endpoint = spec.checkpoint.endpoint_url
    if endpoint:
        gcs = uri_scheme(spec.checkpoint.uri) in GCS_URI_SCHEMES
        env["STORAGE_EMULATOR_HOST" if gcs else "AWS_ENDPOINT_URL"] = endpoint
    if spec.checkpoint.region:
        env["AWS_REGION"] = spec.checkpoint.region
    return env
