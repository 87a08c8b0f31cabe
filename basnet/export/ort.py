"""An exported BASNet without torch: its metadata, its ONNX Runtime session and the session's input.

What a bulk-masking replica on the ONNX path imports (``--runtime onnxruntime``), and the task that
checks an exported file for it, so those processes hold the session and nothing of torch (0.47 GB
resident once imported). ``model_input`` gives the float32 values ``basnet.device.to_model_input``
gives, computed the same way in NumPy. The child process that optimises a graph (``_OPTIMISE``)
repeats ``_options``' settings in its own few lines: it imports nothing of this package.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from typing import BinaryIO

import numpy as np

from basnet.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

# The child of ``ort_session``: saves argv[1] optimised for this CPU at argv[2]. Self-contained, so it
# runs wherever ONNX Runtime does (a Ray worker whose sys.path is not a child's).
_OPTIMISE = """
import sys
import onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 3
options.enable_cpu_mem_arena = False
options.intra_op_num_threads = 1
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.optimized_model_filepath = sys.argv[2]
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
"""

__all__ = ["SIZE_KEY", "model_input", "onnx_image_size", "ort_session"]

SIZE_KEY = "basnet.image_size"  # metadata: the side masks are predicted at unless told otherwise

_MEAN = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
_STD = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)


def model_input(images: np.ndarray) -> np.ndarray:
    """A uint8 (N, H, W, 3) batch as the graph's float32 (N, 3, H, W) input: scaled to [0, 1], then
    normalised with the ImageNet mean and std (float32 throughout, as ``to_model_input``)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3), got {tuple(images.shape)}")
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((x - _MEAN) / _STD)


def ort_session(model: str | bytes | np.ndarray, *, threads: int | None = None):
    """An ONNX Runtime CPU session of an exported file (a path), its bytes or a uint8 array of them;
    ``threads``: intra-op threads (default: ONNX Runtime's, one per physical core).

    ONNX Runtime's full optimisation (blocked NCHWc convolutions: the fast layout on these CPUs)
    keeps the weights about three times over once the session is made (1.05 GB for BASNet's 0.35 GB,
    against 0.42 GB with basic optimisation, which runs 16-26 % slower). So a short-lived child
    process optimises the graph and saves it, and this process loads the optimised graph as it is:
    the same outputs, bit for bit, at the full optimisation's speed, holding 0.42 GB (measured at
    320 px on 2 cores, docs/infer.md). The child runs on this machine, so the saved layout fits its
    CPU, and the optimised graph is kept in this machine's cache (``cache_dir``) for the next
    session of the same graph. Should the child fail, the graph is optimised here instead (with a
    warning).

    Without ONNX Runtime's CPU memory arena: the arena keeps the largest batch's activations for
    the session's life (0.3-2 GB at 320 px) and saved no measurable time.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="basnet-ort-") as tmp:
        source = model if isinstance(model, str) else os.path.join(tmp, "graph.onnx")
        if not isinstance(model, str):  # an array or bytes: ONNX Runtime reads the file, no copy here
            with open(source, "wb") as f:
                f.write(memoryview(model))
        optimised, error = _cached_optimised(source)
        if optimised is not None:
            try:
                return _session(optimised, threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            except Exception as exc:  # removed by another process's eviction, or unreadable: make it afresh
                logger.warning("cannot load the cached optimised graph %s (%s): optimising again", optimised, exc)
        if error is None:  # no cache, or its graph would not load: the child writes here instead
            optimised = os.path.join(tmp, "optimised.onnx")
            error = _optimise(source, optimised)
        if error is None:
            return _session(optimised, threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        logger.warning("optimising the ONNX graph in a child process failed (%s): optimising it here, which "
                       "holds about 0.6 GB more", error)
        return _session(source, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def _session(path: str, threads: int | None, level):
    import onnxruntime as ort

    return ort.InferenceSession(path, _options(threads, level), providers=["CPUExecutionProvider"])


def _optimise(source: str, target: str) -> str | None:
    """Runs the optimising child; None when it wrote ``target``, else the last line it printed."""
    child = subprocess.run([sys.executable, "-c", _OPTIMISE, source, target], capture_output=True, text=True)
    return None if child.returncode == 0 else (child.stderr.strip().splitlines() or ["no output"])[-1]


# ---------------------------------------------------------------- the optimised graphs of this machine

CACHE_ENV = "BASNET_ORT_CACHE"  # a folder, or "off"; default ~/.cache/basnet/ort
CACHE_KEEP = 2  # optimised graphs kept per machine (about 0.35 GB each for BASNet), the last used
_STALE_S = 3600  # a partial file this old is a crashed optimiser's


def cache_dir() -> str | None:
    """Where this machine keeps optimised graphs, or None when ``BASNET_ORT_CACHE=off``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "basnet", "ort")
    return None if root.lower() in ("off", "none", "0") else root


def _cache_key(source: str) -> str:
    """The graph's bytes, ONNX Runtime's version and this CPU's instruction sets: the optimised
    layout (blocked NCHWc convolutions) depends on all three. SHA-1 of 350 MB: about 0.2 s here."""
    import hashlib
    import platform

    import onnxruntime as ort

    digest = hashlib.sha1(f"{ort.__version__}|{platform.machine()}|{_cpu_flags()}|".encode())
    with open(source, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        import platform

        return platform.processor()


def _cached_optimised(source: str) -> tuple[str | None, str | None]:
    """The optimised graph of ``source`` in this machine's cache, made now if it is not there: the
    replicas of a node wait for one optimiser (a file lock) instead of each running its own (each
    peaks at 1.05 GB), and a later run's replicas skip it (1.9 s of a 2.4 s session start at BASNet's
    size). Returns ``(path, None)``; ``(None, error)`` when the optimiser ran here and failed (the
    caller does not run it again); ``(None, None)`` when there is no usable cache folder."""
    root = cache_dir()
    if root is None:
        return None, None
    try:
        os.makedirs(root, exist_ok=True)
        key = _cache_key(source)
        target = os.path.join(root, f"{key}.onnx")
        with open(os.path.join(root, f"{key}.lock"), "a") as lock:
            _lock(lock)
            if os.path.exists(target):
                os.utime(target)  # the last used are kept
                return target, None
            partial = f"{target}.{os.getpid()}.partial"
            if (error := _optimise(source, partial)) is not None:
                if os.path.exists(partial):
                    os.unlink(partial)
                return None, error
            os.replace(partial, target)  # whole or absent: a reader never sees a file half written
        _evict(root)
        return target, None
    except OSError as exc:  # a read-only or full disk: optimise without keeping the result
        logger.warning("cannot keep optimised ONNX graphs in %s (%s): set %s to another folder, or off",
                       root, exc, CACHE_ENV)
        return None, None


def _lock(file) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no waiting for another process's optimiser
        return
    fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed


def _evict(root: str) -> None:
    """Keeps the ``CACHE_KEEP`` last-used graphs (with their lock files) and no stale partial file."""
    import time

    try:  # best effort: another replica may be evicting at the same time
        entries = [(e.path, e.stat().st_mtime) for e in os.scandir(root)]
    except OSError:
        return
    graphs = sorted(((m, p) for p, m in entries if p.endswith(".onnx")), reverse=True)
    old = [(p, p.removesuffix(".onnx") + ".lock") for _, p in graphs[CACHE_KEEP:]]
    old += [(p,) for p, m in entries if p.endswith(".partial") and time.time() - m > _STALE_S]
    for path in (name for names in old for name in names):
        try:
            os.unlink(path)
        except OSError:
            pass


def _options(threads: int | None, level):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's concern
    options.enable_cpu_mem_arena = False
    # Idle intra-op threads sleep instead of spinning: at 320 px on 2 threads 2.03 against 2.13 s an
    # image alone, 3.96 against 4.24 CPU seconds, and in a job the spinning took the cores its decode
    # and write tasks needed (docs/infer.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = level
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def onnx_image_size(model: bytes | BinaryIO, source: str) -> int | None:
    """The side an exported model was trained at (its ``SIZE_KEY`` metadata), or None if it has none,
    after checking it is a self-contained ONNX model taking one (N, 3, H, W) image. ``model``: its
    bytes, or a seekable binary file (only its small fields are read: ``basnet.export.onnx_header``).

    Raises:
        CheckpointError: It is not (the message names ``source``).
    """
    from google.protobuf.message import DecodeError

    from basnet.errors import CheckpointError, first_line
    from basnet.export.onnx_header import read_header

    hint = "pass one written by jobs/export.py, or a training checkpoint"
    try:
        header = read_header(model)
    except (DecodeError, ValueError) as exc:
        raise CheckpointError(f"{source} is not an ONNX model ({type(exc).__name__}: {first_line(exc)}): "
                              f"{hint}") from None
    inputs = [i for i in header.inputs if i.name not in header.initializers]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    if len(inputs) != 1 or len(dims) != 4 or dims[1].dim_value not in (0, 3):
        raise CheckpointError(f"{source} is not an ONNX model of one (N, 3, H, W) image input: {hint}")
    if header.external:
        raise CheckpointError(f"{source} keeps its weights in external data files: {hint} (one file)")
    value = header.metadata.get(SIZE_KEY)
    return int(value) if value and value.isdigit() else None
