"""One place that turns a URI into a filesystem, so nothing else branches on local versus S3.

URIs are local paths (``/data/x``, ``relative/x``), ``file:///data/x`` or ``s3://bucket/key``.
S3 endpoint and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so the same command
works on AWS and on any S3-compatible store.
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid
from typing import Iterable, Sequence
from urllib.parse import urlparse

import pyarrow.fs as pafs

from basnet.errors import UserError

__all__ = [
    "filesystem",
    "is_s3",
    "join",
    "read_bytes",
    "read_head",
    "write_bytes",
    "exists",
    "list_files",
    "list_folder",
    "relative_to",
    "common_prefix",
    "common_folder",
    "StorageError",
]


class StorageError(UserError):
    """A URI that cannot be used (unknown scheme, missing object)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret,
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    # Small requests fail fast instead of retrying for minutes against a wrong endpoint, but one
    # request may take long: completing the multipart upload of a 1 GB checkpoint assembles it
    # server-side (minutes on a busy S3-compatible server). The SDK's default 3 s request timeout
    # made such a completion time out, and its retry then failed for an upload already completed.
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    kwargs.update(connect_timeout=10, request_timeout=600)
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem the AWS environment variables describe (cached per endpoint)."""
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    return _s3(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"), region)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Returns ``(filesystem, path)`` for a URI; the path is what the filesystem expects."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    elif "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Joins path parts onto a URI with ``/`` (also for local paths)."""
    uri = str(uri)
    if is_s3(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def _to_uri(original: str, path: str) -> str:
    """Maps a filesystem path back into the scheme the caller used."""
    if is_s3(original):
        return "s3://" + path
    if str(original).startswith("file://"):
        return "file://" + path
    return path


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        # One read of the whole object: stream reads are slow on some S3-compatible servers.
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such file: {uri}") from exc


def read_head(uri: str, size: int) -> bytes:
    """The first ``size`` bytes of a file (on S3, one ranged read)."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read(size)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such file: {uri}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Writes atomically: a reader never sees a truncated file.

    Locally the bytes go to a hidden temporary name in the same folder, then ``os.replace``;
    on S3 a single PUT is atomic already.
    """
    fs, path = filesystem(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(uri: str, suffixes: Iterable[str] | None = None) -> list[str]:
    """All files under a folder or prefix, recursively, as sorted URIs in the caller's scheme.

    Hidden files (a name starting with ``.``, e.g. our own temporary files) are left out.
    A missing folder gives an empty list.
    """
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    out = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File or info.base_name.startswith("."):
            continue
        if wanted and not info.base_name.lower().endswith(wanted):
            continue
        out.append(_to_uri(uri, info.path))
    return sorted(out)


def list_folder(uri: str) -> tuple[list[str], list[str]]:
    """One level of a folder or prefix: ``(file names, subfolder names)``, each sorted.

    Hidden files are left out (not hidden folders, as :func:`list_files`); symbolic links are
    followed. A missing folder gives two empty lists. Locally this is one ``os.scandir``, which
    keeps no per-file objects: a folder of a million files lists in about a second.
    """
    fs, path = filesystem(uri)
    files, dirs = [], []
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir():
                        dirs.append(entry.name)
                    elif entry.is_file() and not entry.name.startswith("."):
                        files.append(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            pass
    else:
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)):
            if info.type == pafs.FileType.Directory:
                dirs.append(info.base_name)
            elif info.type == pafs.FileType.File and not info.base_name.startswith("."):
                files.append(info.base_name)
    return sorted(files), sorted(dirs)


def common_prefix(uris: Sequence[str]) -> str:
    """The longest shared ``/``-separated prefix of some URIs (``/`` when they share nothing)."""
    if not uris:
        raise ValueError("common_prefix needs at least one URI")
    shared = str(uris[0]).rstrip("/").split("/")
    for uri in uris[1:]:
        parts = str(uri).rstrip("/").split("/")
        n = 0
        while n < min(len(shared), len(parts)) and shared[n] == parts[n]:
            n += 1
        shared = shared[:n]
    return "/".join(shared) or "/"


def common_folder(files: Sequence[str]) -> str:
    """The deepest folder holding every file URI (for one file, its own folder)."""
    return common_prefix([posixpath.dirname(str(f).rstrip("/")) for f in files])


def relative_to(uri: str, root: str) -> str:
    """The ``/``-separated path of ``uri`` below ``root`` (both in the same scheme)."""
    _, path = filesystem(uri)
    _, base = filesystem(root)
    rel = posixpath.relpath(path.replace(os.sep, "/"), base.replace(os.sep, "/"))
    if rel.startswith(".."):
        raise StorageError(f"{uri} is not under {root}")
    return rel
