"""What bulk masking reads, and how its listing is split into units that Ray tasks list in parallel.

An input is a folder or prefix (walked recursively), one image, one ``.tar`` shard, a manifest
(text, one path a line; or Parquet with a ``path`` column), or, for library callers, an explicit
list of images. The driver only resolves what the input is (:func:`resolve_input`, cheap checks,
no listing); the listing itself runs in Ray tasks, one per unit:

* a folder input: the root's own files are one unit, and each subfolder's tree another; while
  there are fewer than ``MIN_UNITS`` units the split goes one level deeper (up to
  ``MAX_SPLIT_DEPTH``), found by one task (:func:`discover_units`);
* one image, one shard, a manifest: one unit (a manifest's collision rule needs its whole folders);
* an explicit list: units of whole folders, about ``UNIT_IMAGES`` images each.

Units never split a folder, so the collision rule (``basnet.infer.naming``) gives the same names
however the work is split. ``basnet.infer.listing`` turns a unit into rows.
"""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from basnet import storage
from basnet.errors import UsageError, first_line
from basnet.imaging import has_image_suffix
from basnet.infer.config import InferConfig
from basnet.infer.monitor import storage_failure
from basnet.infer.naming import canonical, is_under

__all__ = ["TAR_SUFFIX", "MIN_UNITS", "InputSpec", "resolve_input", "discover_units", "image_units",
           "read_manifest", "manifest_root"]

TAR_SUFFIX = ".tar"
MIN_UNITS = 32  # split a folder tree until it gives this many listing tasks (or MAX_SPLIT_DEPTH)
MAX_SPLIT_DEPTH = 3
UNIT_IMAGES = 1000


@dataclass(frozen=True)
class InputSpec:
    """What ``--input`` is: ``folder``, ``file`` (an image or a tar shard), ``manifest`` or
    ``images`` (an explicit list), and the folder outputs mirror (``root``; for a manifest without
    ``--root``, the manifest's folder unless its entries lie elsewhere, decided by its task)."""

    kind: str
    uri: str
    root: str
    root_given: bool = False


def resolve_input(cfg: InferConfig, images: Sequence[str] | None = None) -> InputSpec:
    """Checks ``--input`` without listing it: it exists, and a manifest is one (a Parquet file's
    schema names a path column; a text file starts as UTF-8).

    Raises:
        UsageError: Missing, unreadable, or not a folder, image, shard or manifest.
        JobFailed: Storage refused access (credentials, permissions, no such bucket).
    """
    if images is not None:
        return InputSpec("images", "", canonical(cfg.root or cfg.input), True)
    uri = cfg.input
    try:
        if storage.is_dir(uri):
            return InputSpec("folder", canonical(uri), canonical(cfg.root or uri), bool(cfg.root))
        if not storage.exists(uri):
            raise UsageError(f"input not found: {uri} (pass a folder, a .tar shard, a manifest or an image)")
        parent = canonical(cfg.root or posixpath.dirname(uri.rstrip("/")))
        if uri.lower().endswith(TAR_SUFFIX) or has_image_suffix(uri):
            return InputSpec("file", canonical(uri), parent, bool(cfg.root))
        _check_manifest(uri)
    except OSError as exc:
        raise storage_failure("--input", uri, exc) from None
    return InputSpec("manifest", canonical(uri), parent, bool(cfg.root))


def _check_manifest(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if uri.lower().endswith(".parquet"):
        try:
            with fs.open_input_file(path) as f:
                _manifest_column_name(pq.read_schema(f), uri)
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"manifest {uri} is not a readable Parquet file ({first_line(exc)})") from None
        return
    with fs.open_input_stream(path) as f:
        head = f.read(65536)
    try:
        head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the 64 KiB boundary
            raise UsageError(f"manifest {uri} is not UTF-8 text: pass a folder, a .tar shard, "
                             "a text manifest (one path a line) or a .parquet manifest") from None


def _manifest_column_name(schema: pa.Schema, uri: str) -> str:
    for name in ("path", "input", "image", "uri"):
        if name in schema.names:
            return name
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if len(strings) == 1:
        return strings[0]
    raise UsageError(f"Parquet manifest {uri} has no 'path' column: name the column of image paths 'path'")


def _manifest_entries(uri: str, data: bytes) -> list[str]:
    if uri.lower().endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"manifest {uri} is not a readable Parquet file ({exc})") from None
        column = table.column(_manifest_column_name(table.schema, uri)).to_pylist()
        return [str(v).strip() for v in column if v is not None]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"manifest {uri} is not UTF-8 text: pass a folder, a .tar shard, "
                         "a text manifest (one path a line) or a .parquet manifest") from None
    return [line.strip() for line in text.splitlines()]


def read_manifest(uri: str) -> list[str]:
    """Image URIs listed by a text (one a line, ``#`` comments) or Parquet (``path`` column) manifest.

    Relative entries are resolved against the manifest's folder; duplicates are dropped.
    """
    base = posixpath.dirname(str(uri).rstrip("/"))
    out: dict[str, None] = {}
    for entry in _manifest_entries(uri, storage.read_bytes(uri)):
        if not entry or entry.startswith("#"):
            continue
        if "://" not in entry and not os.path.isabs(entry):
            entry = storage.join(base, entry)
        out[canonical(entry)] = None
    if not out:
        raise UsageError(f"manifest {uri} lists no paths")
    return list(out)


def manifest_root(entries: Sequence[str], preferred: str) -> str:
    """``preferred`` (the manifest's folder) when it holds every entry, else their deepest common folder."""
    if all(is_under(e, preferred) for e in entries):
        return preferred
    if len({storage.is_s3(e) for e in entries}) > 1:
        raise UsageError("the manifest mixes s3:// and local paths: pass --root to say what outputs mirror")
    return storage.common_folder(entries)


def discover_units(spec: InputSpec, output_root: str) -> list[dict]:
    """The listing units of a folder input: the root's own files, and subfolder trees split level
    by level until there are ``MIN_UNITS`` units. Lists folders only (one level each), so the
    caller keeps a small list; a Ray task runs it for the job."""
    if spec.kind != "folder":
        return [{"kind": spec.kind, "uri": spec.uri, "recursive": False, "uris": []}]
    units, frontier = [], [spec.uri]
    for depth in range(MAX_SPLIT_DEPTH + 1):
        deeper = len(units) + len(frontier) < MIN_UNITS and depth < MAX_SPLIT_DEPTH
        if not deeper:
            break
        next_level = []
        for folder in frontier:
            units.append(_unit(folder, recursive=False))
            next_level += [d for d in _subfolders(folder) if not _is_output(d, output_root)]
        frontier = next_level
    return units + [_unit(folder, recursive=True) for folder in frontier]


def _unit(folder: str, *, recursive: bool) -> dict:
    return {"kind": "folder", "uri": folder, "recursive": recursive, "uris": []}


def _subfolders(folder: str) -> list[str]:
    return [storage.join(folder, name) for name in storage.list_folder(folder)[1]]


def _is_output(folder: str, output_root: str) -> bool:
    return folder == output_root or is_under(folder, output_root)


def image_units(images: Sequence[str]) -> list[dict]:
    """Units of an explicit image list: whole folders, about ``UNIT_IMAGES`` images each."""
    by_folder: dict[str, list[str]] = {}
    for uri in dict.fromkeys(canonical(i) for i in images):
        by_folder.setdefault(posixpath.dirname(uri), []).append(uri)
    units, current = [], []
    for folder in sorted(by_folder):
        current += by_folder[folder]
        if len(current) >= UNIT_IMAGES:
            units.append({"kind": "images", "uri": "", "recursive": False, "uris": current})
            current = []
    if current:
        units.append({"kind": "images", "uri": "", "recursive": False, "uris": current})
    return units
