"""The two CPU stages of bulk masking, as plain functions on numpy batches (no torch, no Ray).

Stage 1, ``decode_batch``: work items in (an image URI, or a tar shard streamed front to back),
decoded rows out, each image resized to the model's size; a file that cannot be read or decoded
becomes a ``failed`` row instead of an exception. Stage 3, ``write_batch``: each pending row's map
resized back to the image's original size, rendered (``basnet.transforms.render_output``) and
written atomically. The model (stage 2) is ``basnet.infer.predictor.MaskPredictor``;
``basnet.infer.ray_pipeline`` wires the three into a Ray Data pipeline.
"""

from __future__ import annotations

import tarfile
import time
from typing import Any, Iterator

import numpy as np

from basnet import storage
from basnet.infer.manifest import FAILED, PENDING, SKIPPED, WRITTEN, failed_row
from basnet.infer.naming import OutputNames, UnsafeNameError, output_uri, printable
from basnet.transforms import ImageDecodeError, decode_image, has_image_suffix, render_output, resize_image

__all__ = ["decode_batch", "write_batch"]


def _pending_row(input_uri: str, output: str, data: bytes, *, size: int, max_pixels: int,
                 keep_bytes: bool, start: float) -> tuple[dict, np.ndarray | None]:
    """Decodes one input; a failure becomes a failed row instead of an exception."""
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return failed_row(input_uri, str(exc), output, time.perf_counter() - start), None
    height, width = image.shape[:2]
    resized = resize_image(image, size)
    row = {"input": printable(input_uri), "output": output, "width": width, "height": height,
           "status": PENDING, "error": "", "seconds": time.perf_counter() - start,
           "data": data if keep_bytes else b""}
    return row, resized


def _image_row(item: dict, **kwargs: Any) -> tuple[dict, np.ndarray | None]:
    start = time.perf_counter()
    try:
        data = storage.read_bytes(item["source"])
    except Exception as exc:  # one unreadable object must not fail the job
        return failed_row(item["source"], f"cannot read: {exc}", item["output"],
                          time.perf_counter() - start), None
    return _pending_row(item["source"], item["output"], data, start=start, **kwargs)


def _tar_member_row(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str, names: OutputNames,
                    folder: str, existing: set[str], **kwargs: Any) -> tuple[dict, np.ndarray | None]:
    start = time.perf_counter()
    display = f"{shard}#{member.name}"
    try:
        out = output_uri(folder, names.claim(member.name))
    except UnsafeNameError as exc:
        return failed_row(display, str(exc)), None
    if out in existing:
        return {**failed_row(display, ""), "output": out, "status": SKIPPED}, None
    if not member.isfile():
        return failed_row(display, "not a regular file in the tar (a link or device)", out), None
    data = tar.extractfile(member).read()
    return _pending_row(display, out, data, start=start, **kwargs)


def _tar_rows(item: dict, *, overwrite: bool, **kwargs: Any) -> Iterator[tuple[dict, np.ndarray | None]]:
    """Streams a shard once, front to back (no seeks, so S3 shards are read in one GET)."""
    shard, folder = item["source"], item["output"]
    existing = set() if overwrite else set(storage.list_files(folder, [".png"]))
    names, seen = OutputNames(), 0
    try:
        fs, path = storage.filesystem(shard)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isdir() or not has_image_suffix(member.name):
                    continue  # webdataset shards also hold .json/.txt/.cls sidecars
                seen += 1
                yield _tar_member_row(tar, member, shard, names, folder, existing, **kwargs)
    except Exception as exc:  # truncated or corrupt shard: keep what was read, record the rest
        yield failed_row(shard, f"unreadable tar shard after {seen} images: {exc}"), None


def _batch_from_rows(rows: list[tuple[dict, np.ndarray | None]], size: int) -> dict[str, np.ndarray]:
    """Columns for Ray Data; failed and skipped rows carry a zero image so the column stays dense."""
    blank = np.zeros((size, size, 3), np.uint8)
    batch = {key: np.array([r[key] for r, _ in rows], dtype=object)
             for key in ("input", "output", "status", "error")}
    batch["width"] = np.array([r["width"] for r, _ in rows], dtype=np.int64)
    batch["height"] = np.array([r["height"] for r, _ in rows], dtype=np.int64)
    batch["seconds"] = np.array([r["seconds"] for r, _ in rows], dtype=np.float64)
    batch["data"] = np.array([r.get("data", b"") for r, _ in rows], dtype=object)
    batch["image"] = np.stack([blank if image is None else image for _, image in rows])
    return batch


def decode_batch(batch: dict[str, np.ndarray], *, size: int, max_pixels: int, keep_bytes: bool,
                 overwrite: bool, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Stage 1: work items in, decoded rows out, at most ``batch_size`` rows per yielded batch.

    Each image is resized to ``size`` for the model; its original size (after EXIF rotation) is
    kept for the way back. Image bytes travel on only for ``--format rgba`` (``keep_bytes``).
    """
    kwargs = {"size": size, "max_pixels": max_pixels, "keep_bytes": keep_bytes}
    rows: list[tuple[dict, np.ndarray | None]] = []
    for kind, source, output in zip(batch["kind"], batch["source"], batch["output"]):
        item = {"source": str(source), "output": str(output)}
        produced = ([_image_row(item, **kwargs)] if kind == "image"
                    else _tar_rows(item, overwrite=overwrite, **kwargs))
        for row in produced:
            rows.append(row)
            if len(rows) >= batch_size:
                yield _batch_from_rows(rows, size)
                rows = []
    if rows:
        yield _batch_from_rows(rows, size)


def write_batch(batch: dict[str, np.ndarray], *, fmt: str, threshold: float) -> dict[str, np.ndarray]:
    """Stage 3: writes each pending row's output atomically; returns the manifest columns."""
    status = np.array(batch["status"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    seconds = np.array(batch["seconds"], dtype=np.float64)
    for i in np.flatnonzero(status == PENDING):
        start = time.perf_counter()
        try:
            png = render_output(batch["prob"][i], int(batch["height"][i]), int(batch["width"][i]),
                                fmt=fmt, threshold=threshold, source=batch["data"][i])
            storage.write_bytes(str(batch["output"][i]), png)
            status[i] = WRITTEN
        except Exception as exc:  # a failed PUT or encode is this input's failure only
            status[i], error[i] = FAILED, printable(f"cannot write: {exc}")
        seconds[i] += time.perf_counter() - start
    return {"input": batch["input"], "output": batch["output"], "width": batch["width"],
            "height": batch["height"], "status": status, "error": error, "seconds": seconds}
