"""One way to reach files wherever they are: local paths, ``file://``, ``s3://``, ``gs://``, ``az://``.

Everything goes through fsspec (s3fs, gcsfs, adlfs), so tests against servers on loopback (moto's S3,
fake-gcs-server, Azurite) exercise the same code as production. Credentials come from the environment
(in a cluster: a Secret the operator injects, see ``finetune_operator.api.trainer_config``), as each
store's own SDK reads them:

- ``s3://``: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or any botocore source); an S3-compatible
  endpoint from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), a region from ``AWS_REGION``.
- ``gs://``: Google's default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, workload identity); a
  GCS-compatible endpoint (an emulator) from ``STORAGE_EMULATOR_HOST``, as Google's clients read it.
- ``az://``: ``AZURE_STORAGE_CONNECTION_STRING`` (account and key or SAS, and the endpoint), or
  ``AZURE_STORAGE_ACCOUNT_NAME`` with a key, SAS token, service principal or workload identity.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")
GCS_SCHEMES = ("gs", "gcs")


def is_remote(uri: str) -> bool:
    return uri.split("://", 1)[0] in REMOTE_SCHEMES if "://" in uri else False


def storage_options(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> dict[str, Any]:
    """fsspec options for a URI, from the environment (``endpoint_url``/``region`` win when given)."""
    if uri.startswith("s3://"):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, Any] = {}
        if endpoint:
            options["endpoint_url"] = endpoint
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["client_kwargs"] = {"region_name": region}
        return options
    if scheme_of(uri) in GCS_SCHEMES:
        endpoint = endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint and endpoint != "default":
            # Google's clients accept a bare host:port here and mean http.
            return {"endpoint_url": endpoint if "://" in endpoint else f"http://{endpoint}"}
    return {}


def scheme_of(uri: str) -> str:
    """The scheme of a URI (``s3``, ``gs``, ...), or ``""`` for a path."""
    return uri.split("://", 1)[0] if "://" in uri else ""


def local_path(uri: str, base_dir: str | None = None) -> str:
    """A local path for a non-remote URI: ``file://`` stripped, relative paths joined to base_dir."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if not os.path.isabs(uri) and base_dir:
        return os.path.normpath(os.path.join(base_dir, uri))
    return uri


def filesystem(
    uri: str, base_dir: str | None = None, *, endpoint_url: str | None = None, region: str | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the in-filesystem path of a URI."""
    if is_remote(uri):
        options = storage_options(uri, endpoint_url=endpoint_url, region=region)
        if scheme_of(uri) in GCS_SCHEMES and "endpoint_url" in options:
            # Not Google's service: gcsfs's default class would first ask Google's Storage Control API
            # (gRPC, which no emulator serves) for each bucket's layout, and time out on every call.
            from gcsfs.core import GCSFileSystem

            gcs = GCSFileSystem(**options)
            return gcs, gcs._strip_protocol(uri)
        fs, path = url_to_fs(uri, **options)
        return fs, path
    return fsspec.filesystem("file"), local_path(uri, base_dir)


def _url(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    if is_remote(like):
        protocol = like.split("://", 1)[0]
        return f"{protocol}://{path}"
    return path


def list_files(uri: str, *, base_dir: str | None = None, suffixes: tuple[str, ...] = ()) -> list[str]:
    """The files at ``uri``: the file itself, or the files under a directory/prefix with these suffixes."""
    fs, path = filesystem(uri, base_dir)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        return [_url(fs, path, uri)]
    found = sorted(p for p in fs.find(path) if not suffixes or p.lower().endswith(suffixes))
    return [_url(fs, p, uri) for p in found]


def read_bytes(uri: str, *, base_dir: str | None = None) -> bytes:
    fs, path = filesystem(uri, base_dir)
    data: bytes = fs.cat_file(path)
    return data


def download(uri: str, cache_root: str | Path) -> Path:
    """Copy a remote file or prefix into the local cache (once) and return the local path.

    The copy lands in a temporary directory first and is renamed into place when complete, so a
    crashed download is never mistaken for a finished one.
    """
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = Path(cache_root) / digest
    if target.exists():
        return target
    fs, path = filesystem(uri)
    partial = Path(cache_root) / f".{digest}.partial-{os.getpid()}"
    partial.mkdir(parents=True, exist_ok=True)
    if fs.isfile(path):
        fs.get(path, str(partial / Path(path).name))
    else:
        fs.get(path.rstrip("/") + "/", str(partial), recursive=True)
    partial.rename(target)
    return target


def upload(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory's contents to ``uri`` (nothing to do when it already is that directory)."""
    local_dir = Path(local_dir)
    if not is_remote(uri):
        target = Path(local_path(uri))
        if target.resolve() != local_dir.resolve():
            shutil.copytree(local_dir, target, dirs_exist_ok=True)
        return
    fs, path = filesystem(uri)
    fs.put(str(local_dir).rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
