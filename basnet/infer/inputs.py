"""What bulk masking reads: a folder or prefix, one image, a tar shard, or a manifest (text or
Parquet); and which output each input gets, settling inputs already done or unusable on the driver.
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
from basnet.errors import UsageError
from basnet.infer.config import InferConfig
from basnet.infer.manifest import SKIPPED, failed_row
from basnet.infer.naming import OutputNames, UnsafeNameError, canonical, is_under, output_uri, safe_parts
from basnet.transforms import IMAGE_SUFFIXES, has_image_suffix

__all__ = ["TAR_SUFFIX", "WorkItem", "read_manifest", "list_inputs", "collect_inputs", "assign_outputs"]

TAR_SUFFIX = ".tar"


@dataclass
class WorkItem:
    """One row of the pipeline's input: an image file, or a tar shard expanded by its decode task."""

    kind: str  # "image" or "tar"
    source: str  # the image's or shard's URI
    output: str  # the mask's URI; for a shard, the folder its masks go under


def _manifest_column(table: pa.Table, uri: str) -> list:
    for name in ("path", "input", "image", "uri"):
        if name in table.column_names:
            return table.column(name).to_pylist()
    strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if len(strings) == 1:
        return table.column(strings[0]).to_pylist()
    raise UsageError(f"Parquet manifest {uri} has no 'path' column: name the column of image paths 'path'")


def _manifest_entries(uri: str, data: bytes) -> list[str]:
    if uri.lower().endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"manifest {uri} is not a readable Parquet file ({exc})") from None
        return [str(v).strip() for v in _manifest_column(table, uri) if v is not None]
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


def _common_root(entries: Sequence[str], preferred: str) -> str:
    """``preferred`` when it holds every entry, else the entries' deepest common folder."""
    if all(is_under(e, preferred) for e in entries):
        return preferred
    if len({storage.is_s3(e) for e in entries}) > 1:
        raise UsageError("the manifest mixes s3:// and local paths: pass --root to say what outputs mirror")
    return storage.common_folder(entries)


def list_inputs(uri: str, output_root: str) -> list[str]:
    """Images and tar shards under a folder, recursively; anything under the output is left out."""
    found = storage.list_files(uri, IMAGE_SUFFIXES + (TAR_SUFFIX,))
    return [f for f in found if not is_under(f, output_root)]


def collect_inputs(cfg: InferConfig, output_root: str, images: Sequence[str] | None) -> tuple[list[str], str]:
    """Returns the input URIs and the root their outputs mirror.

    Raises:
        UsageError: The input is missing, unreadable, or holds no images.
    """
    if images is not None:
        root = cfg.root or cfg.input
        return list(dict.fromkeys(canonical(i) for i in images)), canonical(root)
    uri = cfg.input
    try:
        if storage.is_dir(uri):
            return list_inputs(uri, output_root), canonical(cfg.root or uri)
        if not storage.exists(uri):
            raise UsageError(f"input not found: {uri} (pass a folder, a .tar shard, a manifest or an image)")
        if uri.lower().endswith(TAR_SUFFIX) or has_image_suffix(uri):
            return [canonical(uri)], canonical(cfg.root or posixpath.dirname(uri.rstrip("/")))
        entries = read_manifest(uri)
    except OSError as exc:
        raise UsageError(f"cannot read --input {uri}: {str(exc).splitlines()[0]}") from None
    preferred = canonical(cfg.root or posixpath.dirname(uri.rstrip("/")))
    return entries, preferred if cfg.root else _common_root(entries, preferred)


def assign_outputs(sources: Sequence[str], root: str, output_root: str,
                   existing: set[str]) -> tuple[list[WorkItem], list[dict]]:
    """Maps inputs to outputs; inputs already done (in ``existing``) or unusable are settled here."""
    names, items, decided = OutputNames(), [], []
    for source in sources:
        try:
            if not is_under(source, root):
                raise UnsafeNameError(f"not under the root {root} (set --root)")
            relative = storage.relative_to(source, root)
            if relative.lower().endswith(TAR_SUFFIX):
                folder = "/".join(safe_parts(relative[: -len(TAR_SUFFIX)]))
                items.append(WorkItem("tar", source, output_uri(output_root, folder)))
                continue
            out = output_uri(output_root, names.claim(relative))
        except (UnsafeNameError, storage.StorageError) as exc:
            decided.append(failed_row(source, str(exc)))
            continue
        if out in existing:
            decided.append({**failed_row(source, ""), "output": out, "status": SKIPPED})
        else:
            items.append(WorkItem("image", source, out))
    return items, decided
