"""The trainer image, built step by step without a container engine, trains one step as its pod would.

What this proves. ``trainer_image/Dockerfile`` is parsed, not restated: its FROM, ENV, WORKDIR, COPY,
RUN, USER and ENTRYPOINT lines are replayed in order into a fresh directory that stands for the image's
filesystem. ``RUN pip install ...`` runs as written in a fresh virtualenv (``python -m venv`` of the
FROM line's Python minor version; here python:3.11 and this machine's python3.11 agree), so the lock
alone must install: ``--no-deps -r trainer_image/requirements.lock``, then ``--no-deps .`` of the files
the COPY lines copied from the build context (the repository as it is on disk, untracked files too, as
``docker build .`` sees it). Nothing is reached but the package registries (pip's own configuration of
this machine). Then ``pip check`` (every dependency of every installed package is in the lock), every
requirement of ``finetune-operator[trainer]`` installed at a version it allows (pip check does not look at
extras), and ``finetune_trainer`` imported from that virtualenv, not from the checkout. Finally the pod
the operator renders for a one-step job (``builders.config_map`` and ``builders.pod_template``) is run
as Kubernetes would: its command must begin with the image's ENTRYPOINT (a pod's ``command`` replaces
it), ``$(VAR)`` references are expanded from its env, which lies over the image's ENV; it runs in the
pod's workingDir, as the pod's runAsUser/runAsGroup (which must be the Dockerfile's USER and the uid its
useradd creates), with no supplementary groups and HF_HUB_OFFLINE=1, and it must exit 0 having trained
one step and written the output the summary names. The virtualenv and the copied files are root-owned
and read-only to that user (the container's root filesystem is read-only); only the mounts (/workspace,
the checkpoint store) are writable.

Liberties, each one forced by the absence of a container engine. The virtualenv stands for the base
image's /usr/local Python: its interpreter is the first python3.11 here that the trainer's user can run
(this machine's python3, pyenv's 3.11.7, lives under /root, mode 0700, so here it is Debian's
/usr/bin/python3.11, 3.11.2, where the image has 3.11.14); its pip is the one ``ensurepip`` bundles with
that interpreter, not the base image's; it is first on PATH. Container paths under the build's
WORKDIRs and the pod's mounts are directories below one temporary root (/tmp and /dev/shm stay this
machine's own, as in the contract e2e test). pip keeps its cache (~/.cache/pip, outside the
repository): PIP_NO_CACHE_DIR from the Dockerfile's ENV only keeps the cache out of the image's layer,
and decides where wheels come from, not what is installed. When the tests do not run as root (CI's
runner user) the run stays this non-root user, and the virtualenv and copied files are made read-only
instead of root-owned.

What it cannot prove: the base image's layers (its Python build, Debian's libraries and glibc), the apt
packages (g++ and ninja are checked on this machine's PATH instead: DeepSpeed compiles its ops with
them), a CUDA device or the NVIDIA container toolkit, and the image's final size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tiny
from finetune_operator import builders
from finetune_operator.api.trainer_config import LAUNCHER_MODULE
from finetune_operator.api.validation import validate_object
from polling import free_port_pair

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
#: Where the Dockerfile's own comment builds it from: `docker build -f trainer_image/Dockerfile .`.
CONTEXT = REPO
#: OS packages the Dockerfile installs with apt-get, and the command each must put on PATH.
APT_PROVIDES = {"g++": "g++", "ninja-build": "ninja"}
#: Pod mounts that stay this machine's own directories (scratch space, shared with the other tests).
SCRATCH_MOUNTS = ("/tmp", "/dev/shm")
BUILD_TIMEOUT = 3600  # a cold pip cache downloads the CUDA wheels, ~3.5 GB
RUN_TIMEOUT = 600


class CannotReplay(AssertionError):
    """A Dockerfile line this test does not know how to replay: teach it rather than skip the line."""

    def __init__(self, line: int, text: str, why: str):
        super().__init__(
            f"trainer_image/Dockerfile:{line}: cannot replay `{text}`: {why} "
            "(teach tests/trainer/test_image_steps.py this step)"
        )


# --- the Dockerfile, parsed into steps ------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    sources: list[str]  #: relative to the build context
    dest: str  #: absolute container path


@dataclass(frozen=True)
class Pip:
    args: list[str]  #: after `pip`
    workdir: str
    env: dict[str, str]  #: the image's ENV at this step


@dataclass(frozen=True)
class AddUser:
    uid: int
    home: str


@dataclass
class Image:
    base: str = ""
    steps: list[Copy | Pip | AddUser] = field(default_factory=list)
    apt_packages: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    build_workdirs: list[str] = field(default_factory=list)
    user: str = "root"
    entrypoint: list[str] = field(default_factory=list)


def instructions(text: str) -> Iterator[tuple[int, str, str]]:
    """(line, KEYWORD, arguments) of each instruction: comments dropped, continuation lines joined."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        yield start, keyword.upper(), args.strip()
    assert not pending, "trainer_image/Dockerfile ends inside a continued line"


def _container_path(path: str, workdir: str) -> str:
    return os.path.normpath(path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}") + (
        "/" if path.endswith("/") else ""
    )


def _run_commands(line: int, script: str) -> list[list[str]]:
    """A RUN line's shell form as its `&&`-joined commands; any other shell syntax cannot be replayed."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token == "&&":
            commands.append([])
        elif set(token) <= set("();<>|&"):
            raise CannotReplay(line, f"RUN {script}", f"shell syntax {token!r} (only `&&` between commands)")
        elif "$" in token or "`" in token:
            raise CannotReplay(line, f"RUN {script}", "shell expansion")
        else:
            commands[-1].append(token)
    return commands


def parse_image(text: str) -> Image:
    image = Image()
    for line, keyword, args in instructions(text):
        if keyword == "FROM":
            if image.base:
                raise CannotReplay(line, f"FROM {args}", "a multi-stage build")
            image.base = args
        elif keyword == "ENV":
            tokens = shlex.split(args)
            pairs = [t.partition("=") for t in tokens] if "=" in tokens[0] else [(tokens[0], "=", " ".join(tokens[1:]))]
            for name, _, value in pairs:
                if "$" in value:
                    raise CannotReplay(line, f"ENV {args}", "variable expansion in a value")
                image.env[name] = value
        elif keyword == "WORKDIR":
            image.workdir = _container_path(args, image.workdir)
            image.build_workdirs.append(image.workdir)
        elif keyword == "COPY":
            tokens = json.loads(args) if args.startswith("[") else args.split()
            if any(t.startswith("--") for t in tokens):
                raise CannotReplay(line, f"COPY {args}", "COPY flags")
            *sources, dest = tokens
            image.steps.append(Copy(sources, _container_path(dest, image.workdir)))
        elif keyword == "RUN":
            if args.startswith("["):
                raise CannotReplay(line, f"RUN {args}", "the exec form")
            for command in _run_commands(line, args):
                _run_step(image, line, command)
        elif keyword == "USER":
            image.user = args
        elif keyword == "ENTRYPOINT":
            if not args.startswith("["):
                raise CannotReplay(line, f"ENTRYPOINT {args}", "the shell form (a pod's command could not append)")
            image.entrypoint = json.loads(args)
        else:
            raise CannotReplay(line, f"{keyword} {args}", f"{keyword} is not replayed")
    return image


def _run_step(image: Image, line: int, command: list[str]) -> None:
    text = shlex.join(command)
    if command[:1] == ["pip"] or command[:3] == ["python", "-m", "pip"]:
        args = command[1:] if command[0] == "pip" else command[3:]
        image.steps.append(Pip(args, image.workdir, dict(image.env)))
    elif command == ["apt-get", "update"] or command == ["rm", "-rf", "/var/lib/apt/lists/*"]:
        pass  # apt's own bookkeeping
    elif command[:2] == ["apt-get", "install"]:
        image.apt_packages += [arg for arg in command[2:] if not arg.startswith("-")]
    elif command[:1] == ["useradd"]:
        opts: dict[str, str] = {}
        words = iter(command[1:])
        for word in words:
            if word in ("--uid", "--home-dir"):
                opts[word] = next(words, "")
            elif word == "--create-home":
                opts[word] = ""
            elif word.startswith("-") or "name" in opts:
                raise CannotReplay(line, text, f"useradd's {word}")
            else:
                opts["name"] = word
        if not {"--uid", "--home-dir", "--create-home"} <= set(opts):
            raise CannotReplay(line, text, "useradd without --uid, --create-home and --home-dir")
        image.steps.append(AddUser(int(opts["--uid"]), opts["--home-dir"]))
    else:
        raise CannotReplay(line, text, "an unknown command")


def assert_installs_from_the_lock_alone(image: Image) -> None:
    """The lock is installed first, and no pip step resolves a dependency of its own (``--no-deps``)."""
    pips = [step.args for step in image.steps if isinstance(step, Pip)]
    assert pips and all(args[0] == "install" and "--no-deps" in args for args in pips), pips
    assert pips[0][-2:] == ["-r", "trainer_image/requirements.lock"], pips[0]


def test_the_dockerfile_parses_into_steps_this_test_replays() -> None:
    """Cheap and first: every line of the Dockerfile is one this test replays, the ENTRYPOINT is the
    operator's launcher, the USER is the pod's uid, and every install step takes the lock's pins alone."""
    image = parse_image(DOCKERFILE.read_text(encoding="utf-8"))
    assert image.entrypoint == ["python", "-m", LAUNCHER_MODULE]
    assert image.user == str(builders.TRAINER_UID)
    assert_installs_from_the_lock_alone(image)
    with pytest.raises(CannotReplay, match=r"Dockerfile:2: cannot replay `RUN curl -sSf https://x \| sh`"):
        parse_image("FROM python:3.11\nRUN curl -sSf https://x | sh\n")
    with pytest.raises(CannotReplay, match=r"Dockerfile:2: cannot replay `ARG V=1`"):
        parse_image("FROM python:3.11\nARG V=1\n")


# --- the replay -------------------------------------------------------------------------------------


@dataclass
class Build:
    """The image, built: ``root`` stands for its filesystem, ``venv`` for its Python."""

    root: Path
    venv: Path
    image: Image
    timings: list[tuple[str, float]] = field(default_factory=list)

    def took(self, what: str, started: float) -> None:
        """Record (and show, under ``pytest -s``) how long a step took."""
        self.timings.append((what, time.monotonic() - started))
        print(f"image step: {what}: {self.timings[-1][1]:.1f}s", flush=True)

    def local(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def run(self, argv: list[str], *, what: str, cwd: Path, env: dict[str, str], timeout: float) -> str:
        started = time.monotonic()
        proc = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False, umask=0o022
        )
        self.took(what, started)
        assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"
        return proc.stdout


def registry_environment(venv: Path) -> dict[str, str]:
    """What a RUN step sees of this machine: PATH (the virtualenv first, as /usr/local/bin in the image),
    HOME (pip's cache) and pip's, the proxies' and the certificates' settings (how the registries are reached)."""
    keep = ("HOME", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in keep or k.upper() in keep}
    env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def reachable(path: Path) -> bool:
    """Whether a user other than root can reach ``path`` (every directory above it searchable by others)."""
    return os.geteuid() != 0 or all(os.stat(p).st_mode & stat.S_IXOTH for p in path.parents)


def interpreter_for(base: str) -> str:
    """This machine's interpreter of the FROM line's Python minor version (python:3.11.14-slim → python3.11)
    that the trainer's user can run: the virtualenv links to it, and its standard library stays where it is."""
    match = re.match(r"(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)", base)
    assert match, f"FROM {base}: not a python base image, whose Python this test could stand in for"
    wanted = f"python{match[1]}.{match[2]}"
    found = [shutil.which(wanted), f"/usr/local/bin/{wanted}", f"/usr/bin/{wanted}"]
    candidates = [c for c in found if c and Path(c).exists()]
    if not candidates:
        warnings.warn(f"no {wanted} here (FROM {base}): the virtualenv uses {sys.executable}", stacklevel=2)
        candidates = [sys.executable]
    for candidate in candidates:
        probe = [candidate, "-c", "import sys; print(sys.base_prefix)"]
        prefix = subprocess.run(probe, capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        if reachable(Path(prefix) / "lib"):
            return candidate
    raise AssertionError(f"none of {candidates} is reachable by a non-root user (a home directory of mode 0700?)")


def copy_into(build: Build, step: Copy) -> None:
    """COPY as Docker does: a directory's contents into the destination, files into a destination
    directory (ending in / or with several sources) or onto the destination path."""
    dockerignores = [CONTEXT / ".dockerignore", DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")]
    present = [str(p.relative_to(REPO)) for p in dockerignores if p.exists()]
    assert not present, f"{present}: this test does not apply .dockerignore patterns yet (teach copy_into)"
    dest = build.local(step.dest)
    for pattern in step.sources:
        matches = sorted(CONTEXT.glob(pattern))
        assert matches, f"COPY {pattern}: nothing in the build context matches"
        for source in matches:
            if source.is_dir():
                shutil.copytree(source, dest, dirs_exist_ok=True, symlinks=True)
            elif step.dest.endswith("/") or len(step.sources) > 1 or dest.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / source.name)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)


def readonly(tree: Path) -> None:
    """Take away every write bit (the image's layers are read-only to the trainer; root is not bound by it)."""
    for directory, _, files in os.walk(tree):
        for name in [directory, *(os.path.join(directory, f) for f in files)]:
            mode = os.lstat(name).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(name, stat.S_IMODE(mode) & ~0o222)


def writable_again(tree: Path) -> None:
    for directory, _, _ in os.walk(tree):
        os.chmod(directory, stat.S_IMODE(os.lstat(directory).st_mode) | stat.S_IWUSR)


@dataclass(frozen=True)
class RunAs:
    """Who the pod runs as: the pod's runAsUser when we are root, else this (non-root) user."""

    uid: int
    gid: int

    @property
    def subprocess_args(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)
        return path


def build_image(root: Path, image: Image, run_as: RunAs) -> Build:
    build = Build(root, root / "venv", image)
    missing = [p for p in image.apt_packages if p not in APT_PROVIDES]
    assert not missing, f"apt-get install {missing}: which command does each provide? (add it to APT_PROVIDES)"
    for package, command in APT_PROVIDES.items():
        if package in image.apt_packages:
            assert shutil.which(command, path="/usr/local/bin:/usr/bin:/bin"), (
                f"the image installs {package} with apt-get; this machine has no {command}"
            )
    env = registry_environment(build.venv)
    build.run([interpreter_for(image.base), "-m", "venv", str(build.venv)], what="venv", cwd=root, env=env, timeout=300)
    for step in image.steps:
        if isinstance(step, Copy):
            copy_into(build, step)
        elif isinstance(step, Pip):
            step_env = {**env, **{k: v for k, v in step.env.items() if k != "PIP_NO_CACHE_DIR"}}
            cwd = build.local(step.workdir)
            cwd.mkdir(parents=True, exist_ok=True)
            argv = [str(build.python), "-m", "pip", *step.args]
            build.run(argv, what=f"pip {shlex.join(step.args)}", cwd=cwd, env=step_env, timeout=BUILD_TIMEOUT)
        else:
            home = run_as.own(build.local(step.home))
            os.chmod(home, 0o700)
    build.run([str(build.python), "-m", "pip", "check"], what="pip check", cwd=root, env=env, timeout=300)
    for workdir in image.build_workdirs:
        if build.local(workdir).exists() and workdir not in [s.home for s in image.steps if isinstance(s, AddUser)]:
            readonly(build.local(workdir))
    readonly(build.venv)
    return build


# --- the pod, run -------------------------------------------------------------------------------------


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command arguments."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


class PathMap:
    """Container paths under the given prefixes → the same paths below the build's root."""

    def __init__(self, build: Build, prefixes: list[str]):
        self.build = build
        self.prefixes = sorted({p.rstrip("/") for p in prefixes}, key=len, reverse=True)

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            for prefix in self.prefixes:
                if value == prefix or value.startswith(prefix + "/"):
                    return str(self.build.local(value))
                value = value.replace(f"={prefix}/", f"={self.build.local(prefix)}/")
            return value
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


@pytest.fixture
def image_root() -> Iterator[Path]:
    """A root the trainer's user can reach (pytest's tmp_path is private to root), removed afterwards:
    the virtualenv's ~6 GB are not kept for the next run."""
    root = Path(tempfile.mkdtemp(prefix="finetune-image-steps-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        writable_again(root)
        # ~6 GB in ~75,000 files: 15 s on an idle disk, over 2 minutes on a busy one. A detached rm
        # does it while the suite moves on (the shell returns at once; rm outlives it).
        subprocess.run(["sh", "-c", 'rm -rf -- "$1" >/dev/null 2>&1 &', "sh", str(root)], check=True, timeout=60)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_image_steps_train_one_step_from_the_lock_alone(image_root: Path, tiny_model: Path) -> None:
    image = parse_image(DOCKERFILE.read_text(encoding="utf-8"))
    root = image_root
    namespace = "ml-team"
    # The job: the tiny model and its data where the trainer's user can read them, a file:// store it can write.
    model = root / "model"
    shutil.copytree(tiny_model, model)
    for directory, _, files in os.walk(model):  # save_pretrained leaves model.safetensors 0600
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    data = root / "data"
    data.mkdir(mode=0o755)
    train = tiny.write_jsonl(data / "train.jsonl", tiny.prompt_completion_rows(32))
    rendezvous = free_port_pair()
    metrics = rendezvous + 1
    manifest = tiny.job_manifest("image", model, train, training__maxSteps=1)
    manifest["spec"]["distributed"] = {"procsPerNode": 1, "rendezvousPort": rendezvous}
    manifest["spec"]["metrics"] = {"enabled": True, "port": metrics}
    manifest["spec"]["checkpoint"] = {"uri": f"file://{root}/storage"}
    ftj = validate_object(manifest)
    settings = builders.OperatorSettings()
    config_map = builders.config_map(ftj, namespace, "0f7c6a4e-0000-0000-0000-000000000000", settings)
    pod = builders.pod_template(ftj, namespace, 0, settings)["spec"]
    [container] = pod["containers"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    assert image.user == str(security["runAsUser"]), "the Dockerfile's USER is not the pod's runAsUser"
    assert [s.uid for s in image.steps if isinstance(s, AddUser)] == [security["runAsUser"]]
    run_as = RunAs(security["runAsUser"], security["runAsGroup"]) if os.geteuid() == 0 else RunAs(os.getuid(), 0)
    assert_installs_from_the_lock_alone(image)

    build = build_image(root, image, run_as)

    mounts = [m["mountPath"] for m in container["volumeMounts"] if m["mountPath"] not in SCRATCH_MOUNTS]
    to_local = PathMap(build, [*mounts, *image.build_workdirs])
    for mount in mounts:
        if not build.local(mount).exists():
            build.local(mount).mkdir(parents=True, mode=0o755)
    run_as.own(build.local("/workspace"))  # the pod's emptyDir, over the user's home
    run_as.own(root / "storage")  # the object store the job writes
    config_dir = build.local(builders.CONFIG_DIR)
    for key, text in config_map["data"].items():
        (config_dir / key).write_text(json.dumps(to_local(json.loads(text))))
        (config_dir / key).chmod(0o644)
    # The container's environment: the image's ENV, under the pod's env (Kubernetes' order).
    env = {k: to_local(v) for k, v in image.env.items()}
    env["PATH"] = f"{build.venv / 'bin'}:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = to_local(var["value"])
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
        else:
            raise AssertionError(f"the pod's env {var}: not known to this test")
    env.update({"JOB_COMPLETION_INDEX": "0", "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1"})
    command = [to_local(expand(arg, env)) for arg in container["command"]]
    assert command[: len(image.entrypoint)] == image.entrypoint, (
        f"the pod's command {command} does not start with the image's ENTRYPOINT {image.entrypoint}"
    )
    cwd = to_local(container["workingDir"])
    assert container["workingDir"] in image.build_workdirs, "the pod runs where the Dockerfile copied nothing"

    def as_the_pod(argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
            **run_as.subprocess_args,
        )
        build.took(what, started)
        return proc

    site = as_the_pod(["python", "-c", CHECK_INSTALLED], "import finetune_trainer")
    assert site.returncode == 0, site.stdout + site.stderr
    assert Path(site.stdout.strip()).is_relative_to(build.venv), f"imported {site.stdout}, not the virtualenv's"

    proc = as_the_pod([*image.entrypoint, *command[len(image.entrypoint) :]], "entrypoint: one training step")
    timings = ", ".join(f"{what} {seconds:.1f}s" for what, seconds in build.timings)
    assert proc.returncode == 0, f"{timings}\n{(proc.stdout + proc.stderr)[-6000:]}"

    work = Path(to_local(builders.WORK_DIR))
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["world_size"] == 1, summary
    assert (work / "summary.json").stat().st_uid == run_as.uid
    [loss] = tiny.train_losses(work)
    assert loss == loss and 0 < loss < 20
    output = root / "storage" / namespace / "image" / "output"
    manifest_file = output / "manifest.json"
    files = json.loads(manifest_file.read_text())["files"]
    assert any(entry["path"].startswith("adapter/") for entry in files), files
    for entry in files:
        assert sha256_file(output / entry["path"]) == entry["sha256"], entry
    assert [(a["kind"], a["sha256"]) for a in summary["artifacts"]] == [("adapter", sha256_file(manifest_file))]


#: Run in the image's Python as the pod's user: every requirement of finetune-operator[trainer] is
#: installed at a version it allows (pip check ignores extras), then where finetune_trainer comes from.
CHECK_INSTALLED = """
from importlib.metadata import distribution, version, PackageNotFoundError
from packaging.requirements import Requirement
unmet = []
for req in map(Requirement, distribution("finetune-operator").requires or []):
    if req.marker is not None and not req.marker.evaluate({"extra": "trainer"}):
        continue
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            unmet.append(f"{req} (installed {version(req.name)})")
    except PackageNotFoundError:
        unmet.append(f"{req} (not installed)")
assert not unmet, "the lock lacks: " + ", ".join(unmet)
import finetune_trainer, finetune_trainer.launch
print(finetune_trainer.__file__)
"""
