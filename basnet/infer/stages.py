"""The two CPU stages of bulk masking, as plain functions on numpy batches (no torch, no Ray).

Stage 1, ``decode_batch``: listed rows in, decoded rows out; an image is read, decoded (EXIF
applied) and resized to the model's side; a tar shard is streamed front to back and expanded into
one row per member image. A file that cannot be read or decoded becomes a ``failed`` row instead of
an exception. Stage 3, ``write_batch``: each pending row's map resized back to the image's original
size, rendered (``basnet.imaging.render_output``) and written atomically.

Pixels travel as bytes columns (``image``: the resized uint8 RGB; ``prob``: the float32 map), empty
for rows that carry none (settled or failed ones), so a run that skips a million done inputs moves
no pixels for them. Each stage adds its seconds to the row (``read_s``, ``decode_s``, ...): the
manifest and the summary show where a run's time went. The model, stage 2, is
``basnet.infer.predictor``; ``basnet.infer.ray_pipeline`` wires the three into a Ray Data pipeline.
"""

from __future__ import annotations

import tarfile
import time
from typing import Iterator

import numpy as np

from basnet import storage
from basnet.errors import first_line
from basnet.imaging import ImageDecodeError, decode_for_model, has_image_suffix, render_output
from basnet.infer.manifest import FAILED, PENDING, SKIPPED, STAGES, WRITTEN
from basnet.infer.naming import OutputNames, UnsafeNameError, output_uri, printable
from basnet.quality import finish, no_figures

__all__ = ["DECODED_COLUMNS", "decode_batch", "write_batch", "read_error"]

DECODED_COLUMNS = ("input", "output", "status", "error", "width", "height", "image", "data", *STAGES)
READ_ERROR = "cannot read: "  # how a read failure's error starts (the job watches for systemic ones)


def read_error(exc: BaseException) -> str:
    return READ_ERROR + first_line(exc)


class _Rows:
    """Decoded rows as columns, flushed every ``size`` rows."""

    def __init__(self, size: int) -> None:
        self.size, self.rows = size, []

    def add(self, display: str, output: str, status: str, error: str = "", *, width: int = 0, height: int = 0,
            image: bytes = b"", data: bytes = b"", list_s: float = 0.0, read_s: float = 0.0,
            decode_s: float = 0.0) -> dict | None:
        self.rows.append({"input": printable(display), "output": output, "status": status,
                          "error": printable(error), "width": width, "height": height, "image": image,
                          "data": data, "list_s": list_s, "read_s": read_s, "decode_s": decode_s, "infer_s": 0.0,
                          "encode_s": 0.0, "write_s": 0.0})
        return self.flush() if len(self.rows) >= self.size else None

    def flush(self) -> dict[str, np.ndarray] | None:
        if not self.rows:
            return None
        rows, self.rows = self.rows, []
        batch = {key: np.array([r[key] for r in rows], dtype=object) for key in DECODED_COLUMNS}
        for key in ("width", "height"):
            batch[key] = batch[key].astype(np.int64)
        for key in STAGES:
            batch[key] = batch[key].astype(np.float64)
        return batch


def _decode_into(out: _Rows, display: str, output: str, data: bytes, *, size: int, max_pixels: int,
                 reduced: bool, keep_bytes: bool, list_s: float, read_s: float) -> dict | None:
    start = time.perf_counter()
    try:
        decoded = decode_for_model(data, size, max_pixels=max_pixels, reduced=reduced)
    except ImageDecodeError as exc:
        return out.add(display, output, FAILED, str(exc), list_s=list_s, read_s=read_s,
                       decode_s=time.perf_counter() - start)
    return out.add(display, output, PENDING, width=decoded.width, height=decoded.height,
                   image=decoded.image.tobytes(), data=data if keep_bytes else b"", list_s=list_s, read_s=read_s,
                   decode_s=time.perf_counter() - start)


def _image(out: _Rows, source: str, output: str, list_s: float, **kwargs) -> dict | None:
    start = time.perf_counter()
    try:
        data = storage.read_bytes(source)
    except Exception as exc:  # one unreadable object must not fail the job (the job watches for all of them)
        return out.add(source, output, FAILED, read_error(exc), list_s=list_s, read_s=time.perf_counter() - start)
    return _decode_into(out, source, output, data, list_s=list_s, read_s=time.perf_counter() - start, **kwargs)


def _shard(out: _Rows, shard: str, folder: str, *, overwrite: bool, suffix: str, **kwargs) -> Iterator[dict]:
    """Streams a shard once, front to back (no seeks, so an S3 shard is read in one GET)."""
    existing = set() if overwrite else set(storage.list_files(folder, [suffix]))
    names, seen = OutputNames(suffix), 0
    try:
        fs, path = storage.filesystem(shard)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isdir() or not has_image_suffix(member.name):
                    continue  # webdataset shards also hold .json/.txt/.cls sidecars
                seen += 1
                if (full := _member(out, tar, member, shard, names, folder, existing, **kwargs)) is not None:
                    yield full
    except Exception as exc:  # truncated or corrupt shard: keep what was read, record the rest
        if (full := out.add(shard, "", FAILED, f"unreadable tar shard after {seen} images: {exc}")) is not None:
            yield full


def _member(out: _Rows, tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str, names: OutputNames,
            folder: str, existing: set[str], **kwargs) -> dict | None:
    display = f"{shard}#{member.name}"
    try:
        output = output_uri(folder, names.claim(member.name))
    except UnsafeNameError as exc:
        return out.add(display, "", FAILED, str(exc))
    if output in existing:
        return out.add(display, output, SKIPPED)
    if not member.isfile():
        return out.add(display, output, FAILED, "not a regular file in the tar (a link or device)")
    start = time.perf_counter()
    data = tar.extractfile(member).read()
    return _decode_into(out, display, output, data, list_s=0.0, read_s=time.perf_counter() - start, **kwargs)


def decode_batch(batch: dict[str, np.ndarray], *, size: int, max_pixels: int, keep_bytes: bool, overwrite: bool,
                 batch_size: int, reduced: bool = True, suffix: str = ".png") -> Iterator[dict[str, np.ndarray]]:
    """Stage 1: listed rows in, decoded rows out, at most ``batch_size`` rows per yielded batch.

    Each image is decoded for the model (reduced, for a large JPEG, unless ``reduced`` is off) and
    resized to ``size``; its original size (after EXIF rotation) is kept for the way back. Image
    bytes travel on only for ``--format rgba`` and ``--refine guided`` (``keep_bytes``). Rows the
    listing settled (``kind`` empty: skipped, refused, not images) pass through untouched.
    ``suffix``: the outputs' (a shard's members are named here).
    """
    out = _Rows(batch_size)
    opts = {"size": size, "max_pixels": max_pixels, "reduced": reduced, "keep_bytes": keep_bytes}
    for i, kind in enumerate(batch["kind"]):
        source, output, list_s = str(batch["source"][i]), str(batch["output"][i]), float(batch["list_s"][i])
        if kind == "image":
            full = [_image(out, source, output, list_s, **opts)]
        elif kind == "tar":
            full = _shard(out, source, output, overwrite=overwrite, suffix=suffix, **opts)
        else:
            full = [out.add(str(batch["input"][i]), output, str(batch["status"][i]), str(batch["error"][i]),
                            list_s=list_s)]
        yield from (b for b in full if b is not None)
    if (rest := out.flush()) is not None:
        yield rest


def write_batch(batch: dict[str, np.ndarray], *, fmt: str, threshold: float, size: int, encoding: str = "png",
                max_pixels: int | None = None, refine: str = "none", normalize: str = "minmax",
                on_no_object: str = "keep") -> dict[str, np.ndarray]:
    """Stage 3: renders each pending row's output at its image's size from its raw map (normalised as
    ``normalize`` says; empty for a ``no_object`` row under ``on_no_object="empty"``), encodes it in
    ``encoding`` and writes it atomically; returns the manifest's columns, the quality figures of
    each written mask included (``basnet.quality.finish``)."""
    status = np.array(batch["status"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    encode_s, write_s = np.zeros(len(status)), np.zeros(len(status))
    quality = no_figures(len(status))
    for i in np.flatnonzero(status == PENDING):
        start = time.perf_counter()
        try:
            raw = np.frombuffer(batch["prob"][i], dtype=np.float32).reshape(size, size)
            prob, figures = finish(raw, normalize=normalize, on_no_object=on_no_object)
            for key, value in figures.items():
                quality[key][i] = value
            encoded = render_output(prob, int(batch["height"][i]), int(batch["width"][i]), fmt=fmt,
                                    threshold=threshold, source=batch["data"][i], encoding=encoding,
                                    max_pixels=max_pixels, refine=refine)
            encode_s[i] = time.perf_counter() - start
            storage.write_bytes(str(batch["output"][i]), encoded)
            status[i] = WRITTEN
        except Exception as exc:  # a failed PUT or encode is this input's failure only
            status[i], error[i] = FAILED, printable(f"cannot write: {exc}")
        write_s[i] = time.perf_counter() - start - encode_s[i]
    out = {key: batch[key] for key in ("input", "output", "width", "height", "list_s", "read_s", "decode_s",
                                       "infer_s")}
    return {**out, **quality, "status": status, "error": error, "encode_s": encode_s, "write_s": write_s}
