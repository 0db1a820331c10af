"""Google Cloud Storage and Azure Blob Storage emulators on loopback, for the gs:// and az:// tests.

Beside moto's S3 server (tests/conftest.py), these are real servers of those stores' APIs, reached
through the same fsspec filesystems (gcsfs, adlfs) the trainer uses in a pod:

- fake-gcs-server (Go, built from its module) speaks the GCS JSON API; clients find it through
  ``STORAGE_EMULATOR_HOST``, as Google's own clients do.
- Azurite (Node, from npm) is Microsoft's Azure Storage emulator; clients reach its blob service through
  an ``AZURE_STORAGE_CONNECTION_STRING`` with its well-known development account.

``hack/testcluster.py build`` builds both into ``~/.cache/finetune-operator/testcluster`` (hack/test.sh
starts that build in the background before any test). A test needing one waits for a build under way
and fails, saying how to build it, when there is none: it never skips.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from polling import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
BUILD_WAIT_S = float(os.environ.get("FINETUNE_EMULATOR_BUILD_TIMEOUT", "1800"))
START_TIMEOUT_S = 60.0

#: Azurite's development account: public, documented, the same in every installation.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _testcluster() -> ModuleType:
    """hack/testcluster.py (stdlib-only), where the emulators' versions, builds and cache live."""
    name = "finetune_testcluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "hack" / "testcluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def built_binary(component: str, binary: str) -> Path:
    """The cached binary of a hack/testcluster.py component, once built; the test fails if it is not."""
    testcluster = _testcluster()
    comp = testcluster.COMPONENTS[component]
    if not testcluster.wait_until_built(comp, BUILD_WAIT_S):
        how = (
            f"the build under way did not finish within {BUILD_WAIT_S:.0f}s"
            if testcluster.build_under_way(comp)
            else f"build it with `python3 hack/testcluster.py build {component}`"
        )
        pytest.fail(
            f"{component} {comp.version} is not built (no {comp.path(binary)}): {how} (hack/test.sh builds it "
            "in the background before the tests run)",
            pytrace=False,
        )
    return Path(comp.path(binary))


@dataclass
class Emulator:
    """A running emulator: its process, its log, and the environment that points clients at it."""

    name: str
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


def _start(name: str, argv: list[str], log: Path, ready: str, probe: str, env: dict[str, str]) -> Emulator:
    out = log.open("wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out.close()
    emulator = Emulator(name, ready, env, proc, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(probe, timeout=5) as response:
                return bool(response.status < 500)
        except urllib.error.HTTPError as refused:  # an answer all the same
            return refused.code < 500

    try:
        wait_for(f"{name} to answer on {probe}", up, timeout=START_TIMEOUT_S, interval=0.2)
    except BaseException:
        emulator.stop()
        raise
    return emulator


def start_fake_gcs_server(workdir: Path) -> Emulator:
    """fake-gcs-server on a free loopback port, objects in memory."""
    binary = built_binary("fake-gcs-server", "fake-gcs-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(binary),
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-backend",
        "memory",
        # Resumable uploads (large files) continue at the Location the server returns: this one.
        "-external-url",
        url,
        "-public-host",
        f"127.0.0.1:{port}",
        "-log-level",
        "warn",
    ]
    return _start(
        "fake-gcs-server",
        argv,
        workdir / "fake-gcs-server.log",
        url,
        f"{url}/storage/v1/b",
        {"STORAGE_EMULATOR_HOST": url},
    )


def start_azurite(workdir: Path) -> Emulator:
    """Azurite's blob service on a free loopback port, its data under ``workdir``."""
    binary = built_binary("azurite", "azurite-blob")
    port = free_port()
    url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    argv = [
        str(binary),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(workdir / "azurite"),
        # azure-storage-blob may speak a newer service version than this Azurite knows.
        "--skipApiVersionCheck",
        "--silent",
    ]
    connection_string = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={url};"
    )
    return _start(
        "azurite",
        argv,
        workdir / "azurite.log",
        url,
        # Any answer will do (an anonymous listing is refused with 4xx): the service is up.
        f"{url}?comp=list",
        {"AZURE_STORAGE_CONNECTION_STRING": connection_string},
    )
