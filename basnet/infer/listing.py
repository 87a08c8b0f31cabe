"""Listing units into rows: which output each input gets, and which inputs are already done.

Runs in Ray tasks (``basnet.infer.ray_pipeline``), one per unit, and yields rows folder by folder
as it goes, so the first images are decoded while other folders are still being listed. Each
folder is listed once, sorted, and its output folder once (the skip-existing rule: an input whose
mask exists is ``skipped`` without being read; ``--overwrite`` redoes it). Rows are dicts of the
columns in ``ROW_COLUMNS``: ``kind`` is ``image`` or ``tar`` for work still to do, empty for an
input settled here (``skipped``, or ``failed`` for a name that cannot be mapped safely) and for a
file of a listed folder that is not an image (``not_image``: counted by the job, not an input).
"""

from __future__ import annotations

import os
import posixpath
import time
from typing import Iterator, Sequence

import numpy as np

from basnet import storage
from basnet.errors import first_line
from basnet.imaging import has_image_suffix
from basnet.infer.inputs import TAR_SUFFIX, manifest_root, read_manifest
from basnet.infer.manifest import FAILED, NOT_IMAGE, PENDING, SKIPPED
from basnet.infer.naming import OutputNames, UnsafeNameError, clean_part, is_under, output_uri, printable, safe_parts

__all__ = ["ROW_COLUMNS", "assign_outputs", "unit_rows", "list_batch"]

ROW_COLUMNS = ("input", "source", "kind", "output", "status", "error", "list_s")
_CHUNK = 1024  # rows per yielded batch


def _row(source: str, kind: str, output: str, status: str, error: str = "") -> dict:
    return {"input": printable(source), "source": source, "kind": kind, "output": output, "status": status,
            "error": printable(error)}


def _existing(out_folder: str, overwrite: bool, suffix: str) -> set[str]:
    """Names of the outputs already in one output folder (one listing; none with ``--overwrite``)."""
    return set() if overwrite else {n for n in storage.list_folder(out_folder)[0] if n.lower().endswith(suffix)}


def assign_outputs(sources: Sequence[str], root: str, output_root: str, *, overwrite: bool,
                   suffix: str = ".png") -> list[dict]:
    """Rows for inputs anywhere under ``root``, in the order given (a manifest's order decides which
    of ``x.jpg`` and ``x.png`` keeps ``x.png``); each output folder is listed once."""
    names, rows, existing = OutputNames(suffix), [], {}
    for source in sources:
        try:
            if not is_under(source, root):
                raise UnsafeNameError(f"not under the root {root} (set --root)")
            relative = storage.relative_to(source, root)
            if relative.lower().endswith(TAR_SUFFIX):
                folder = "/".join(safe_parts(relative[: -len(TAR_SUFFIX)]))
                rows.append(_row(source, "tar", output_uri(output_root, folder), PENDING))
                continue
            out = output_uri(output_root, names.claim(relative))
        except (UnsafeNameError, storage.StorageError) as exc:
            rows.append(_row(source, "", "", FAILED, str(exc)))
            continue
        out_folder, name = posixpath.split(out) if storage.is_s3(out) else os.path.split(out)
        if out_folder not in existing:
            existing[out_folder] = _existing(out_folder, overwrite, suffix)
        done = name in existing[out_folder]
        rows.append(_row(source, "" if done else "image", out, SKIPPED if done else PENDING))
    return rows


def _folder_rows(folder: str, names: list[str], root: str, output_root: str, overwrite: bool,
                 suffix: str) -> list[dict]:
    """Rows for one folder's files (sorted names), claiming output names within the folder; a file
    that is neither an image nor a shard is a ``not_image`` row, counted by the job, never masked."""
    if not (folder == root or is_under(folder, root)):
        wanted = [n for n in names if has_image_suffix(n) or n.lower().endswith(TAR_SUFFIX)]
        return [_row(storage.join(folder, n), "", "", FAILED, f"not under the root {root} (set --root)")
                for n in wanted]
    relative = storage.relative_to(folder, root)
    parts = [] if relative in (".", "") else safe_parts(relative)
    out_folder = output_uri(output_root, "/".join(parts)) if parts else output_root
    existing, claimed, rows = None, OutputNames(suffix), []
    for name in names:
        source = storage.join(folder, name)
        if name.lower().endswith(TAR_SUFFIX):
            shard = "/".join([*parts, clean_part(name[: -len(TAR_SUFFIX)])])
            rows.append(_row(source, "tar", output_uri(output_root, shard), PENDING))
            continue
        if not has_image_suffix(name):
            rows.append(_row(source, "", "", NOT_IMAGE))
            continue
        try:
            out_name = claimed.claim_in("", clean_part(name))
        except UnsafeNameError as exc:
            rows.append(_row(source, "", "", FAILED, str(exc)))
            continue
        if existing is None:
            existing = _existing(out_folder, overwrite, suffix)
        out = storage.join(out_folder, out_name)
        done = out_name in existing
        rows.append(_row(source, "" if done else "image", out, SKIPPED if done else PENDING))
    return rows


def _walk(folder: str, recursive: bool, output_root: str, seen: set) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) for a folder and, if ``recursive``, every folder below it,
    depth-first in sorted order; the output tree and symbolic-link loops are left out."""
    if not storage.is_s3(folder):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            return
        seen.add((stat.st_dev, stat.st_ino))
    files, dirs = storage.list_folder(folder)
    yield folder, files
    if recursive:
        for name in dirs:
            sub = storage.join(folder, name)
            if not (sub == output_root or is_under(sub, output_root)):
                yield from _walk(sub, True, output_root, seen)


def unit_rows(unit: dict, *, root: str, root_given: bool, output_root: str, overwrite: bool,
              suffix: str = ".png") -> Iterator[list[dict]]:
    """The rows of one listing unit (``basnet.infer.inputs``), a folder (or a chunk) at a time."""
    kind = unit["kind"]
    if kind == "folder":
        for folder, names in _walk(unit["uri"], unit["recursive"], output_root, set()):
            rows = _folder_rows(folder, names, root, output_root, overwrite, suffix)
            for i in range(0, len(rows), _CHUNK):
                yield rows[i:i + _CHUNK]
        return
    if kind == "manifest":
        sources = read_manifest(unit["uri"])
        root = root if root_given else manifest_root(sources, root)
    else:
        sources = list(unit["uris"]) if kind == "images" else [unit["uri"]]
    rows = assign_outputs(sources, root, output_root, overwrite=overwrite, suffix=suffix)
    for i in range(0, len(rows), _CHUNK):
        yield rows[i:i + _CHUNK]


def list_batch(batch: dict[str, np.ndarray], **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data stage: units in (one a batch), rows out as they are found, with the seconds each
    row's listing took (its share of its chunk). A unit whose listing fails (storage refused it)
    becomes one ``failed`` row naming the unit, so the job counts it and watches for systemic causes."""
    for unit in _units(batch):
        start = time.perf_counter()
        try:
            for rows in unit_rows(unit, **kwargs):
                yield _columns(rows, (time.perf_counter() - start) / max(len(rows), 1))
                start = time.perf_counter()
        except OSError as exc:
            where = unit["uri"] or f"{len(unit['uris'])} images"
            yield _columns([_row(where, "", "", FAILED, f"cannot list: {first_line(exc)}")],
                           time.perf_counter() - start)


def _columns(rows: list[dict], list_s: float) -> dict[str, np.ndarray]:
    columns = {key: np.array([r[key] for r in rows], dtype=object) for key in ROW_COLUMNS[:-1]}
    columns["list_s"] = np.full(len(rows), list_s)
    return columns


def _units(batch: dict[str, np.ndarray]) -> Iterator[dict]:
    for i in range(len(batch["kind"])):
        yield {key: batch[key][i] for key in batch}

