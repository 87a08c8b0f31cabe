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
    CPU. Should the child fail, the graph is optimised here instead (with a warning).

    Without ONNX Runtime's CPU memory arena: the arena keeps the largest batch's activations for
    the session's life (0.3-2 GB at 320 px) and saved no measurable time.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="basnet-ort-") as tmp:
        source = model if isinstance(model, str) else os.path.join(tmp, "graph.onnx")
        if not isinstance(model, str):  # an array or bytes: ONNX Runtime reads the file, no copy here
            with open(source, "wb") as f:
                f.write(memoryview(model))
        optimised = os.path.join(tmp, "optimised.onnx")
        child = subprocess.run([sys.executable, "-c", _OPTIMISE, source, optimised], capture_output=True, text=True)
        if child.returncode == 0:
            return ort.InferenceSession(optimised, _options(threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                        providers=["CPUExecutionProvider"])
        logger.warning("optimising the ONNX graph in a child process failed (%s): optimising it here, which "
                       "holds about 0.6 GB more", (child.stderr.strip().splitlines() or ["no output"])[-1])
        return ort.InferenceSession(source, _options(threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                                    providers=["CPUExecutionProvider"])


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


def onnx_image_size(model: bytes, source: str) -> int | None:
    """The side an exported model was trained at (its ``SIZE_KEY`` metadata), or None if it has none,
    after checking it is a self-contained ONNX model taking one (N, 3, H, W) image.

    Raises:
        CheckpointError: It is not (the message names ``source``).
    """
    import onnx
    from google.protobuf.message import DecodeError

    from basnet.errors import CheckpointError, first_line

    hint = "pass one written by jobs/export.py, or a training checkpoint"
    try:
        proto = onnx.load_model_from_string(model)
    except (DecodeError, ValueError) as exc:
        raise CheckpointError(f"{source} is not an ONNX model ({type(exc).__name__}: {first_line(exc)}): "
                              f"{hint}") from None
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    if len(inputs) != 1 or len(dims) != 4 or dims[1].dim_value not in (0, 3):
        raise CheckpointError(f"{source} is not an ONNX model of one (N, 3, H, W) image input: {hint}")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise CheckpointError(f"{source} keeps its weights in external data files: {hint} (one file)")
    value = {p.key: p.value for p in proto.metadata_props}.get(SIZE_KEY)
    return int(value) if value and value.isdigit() else None
