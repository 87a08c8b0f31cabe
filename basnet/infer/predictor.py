"""Stage 2 of bulk masking: the model, run by one actor per replica.

On ``--runtime torch`` the replica imports torch; on ``--runtime onnxruntime`` it imports ONNX
Runtime and NumPy only (``basnet.export.ort``): torch alone is 0.47 GB resident per process, more
than a third of what the session holds. This module imports neither at its top.

Out of memory is the batch's fault, not the model's: the predictor halves its batch and goes on
(at the smaller size for the rest of its life), down to one image. Any other exception from the
model is raised as ``ModelError`` (the job restarts the replica and then stops, naming the cause):
recording it per image would make a broken model (a CUDA error, a driver mismatch) look like a
collection of bad images.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np

from basnet.infer.manifest import PENDING
from basnet.quality import minmax

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["MaskPredictor", "ModelError", "is_out_of_memory", "load_weights"]


def load_weights(uri: str, image_size: int | None, runtime: str) -> tuple[dict[str, np.ndarray] | np.ndarray | str, int]:
    """What the replicas load, and the side masks are predicted at (``image_size``, else the
    checkpoint's training size, or the side an export's metadata names): the state dict, as NumPy
    arrays, for ``torch``; for ``onnxruntime`` and a checkpoint, the checkpoint exported here as a
    uint8 array of the ONNX file's bytes (batch, height and width stay dynamic); for a ``.onnx``
    file, its URI once the file is checked here (each replica reads it: torch is never imported,
    and the graph is not held in the object store, whose pages a replica that read it would keep
    resident beside its session).

    Raises:
        CheckpointError, UsageError: Weights that cannot be loaded; a node without the onnx extra.
    """
    from basnet import storage
    from basnet.errors import CheckpointError, UsageError, first_line
    from basnet.infer.config import is_onnx, torch_instead

    if runtime != "onnxruntime":
        from basnet.checkpoint import load_for_inference

        model, size = load_for_inference(uri, image_size)
        # NumPy arrays, not tensors: Ray writes them into the object store without a pickled copy,
        # and a replica's model uses them there, in shared memory (see MaskPredictor).
        return {k: v.numpy() for k, v in model.state_dict().items()}, size
    try:  # the replicas need onnxruntime (this node stands for theirs), an export onnxscript
        import onnx, onnxruntime  # noqa: E401, F401

        if not is_onnx(uri):
            import onnxscript  # noqa: F401
        from basnet.export.ort import SIZE_KEY, onnx_image_size
    except ImportError as exc:  # the driver had them; this node has not
        raise UsageError(f"--runtime onnxruntime: {exc} on a node of the cluster: install the onnx extra "
                         f"on every node, or {torch_instead(uri)}") from None
    if not is_onnx(uri):
        from basnet.checkpoint import load_for_inference
        from basnet.export.onnx_model import onnx_bytes

        model, size = load_for_inference(uri, image_size)
        return _array(onnx_bytes(model, image_size=size)), size
    try:
        if storage.is_s3(uri):
            trained = onnx_image_size(storage.read_bytes(uri), uri)  # also refuses a file that is not ONNX
        else:  # only the small fields are read (a seek past each weight)
            with open(storage.filesystem(uri)[1], "rb") as f:
                trained = onnx_image_size(f, uri)
    except (OSError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot read {uri}: {first_line(exc)}") from None
    if not (image_size or trained):
        raise UsageError(f"{uri} does not name the side it was trained at (no {SIZE_KEY} metadata: not written by "
                         "jobs/export.py): pass --image-size")
    return uri, image_size or trained


def _array(graph: bytes) -> np.ndarray:
    """An ONNX graph as a uint8 array: a replica reads it in the object store's memory, where a
    ``bytes`` would be copied out (350 MB more in every replica)."""
    return np.frombuffer(graph, np.uint8)


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """Tensors sharing the memory of ``state``'s arrays. An array from the object store is
    read-only: an eval-mode model never writes its weights, and a copy to a GPU leaves it behind."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


class ModelError(RuntimeError):
    """The model failed on a batch for a reason other than its size."""


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA or CPU allocation failure (``torch.OutOfMemoryError``, or the CPU allocator's or ONNX
    Runtime's message)."""
    text = str(exc)
    torch = sys.modules.get("torch")  # never imported for this: a torch error means torch is loaded
    return ((torch is not None and isinstance(exc, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "Failed to allocate memory" in text)


class MaskPredictor:
    """Raw saliency maps at the model's size for a decoded batch (normalised, and judged, by the
    write stage); rows not pending pass through.

    Args:
        state_dict: BASNet weights, tensors or NumPy arrays (used in place: read-only arrays from Ray's
            object store stay there, shared by the replicas of a node); with ``runtime="onnxruntime"``,
            the model exported to ONNX: its bytes (or a uint8 array of them), or a ``.onnx`` file's URI.
        device: Where the model runs.
        precision: ``--precision`` (auto: bf16 on GPUs that support it, fp16 on older ones, fp32 on CPU).
        channels_last: ``--channels-last`` (None: on GPUs).
        compile: ``--compile``: torch.compile the model.
        image_size: The side of the decoded images (their bytes hold ``image_size**2 * 3`` values).
        runtime: ``torch``, or ``onnxruntime`` (CPU only, and torch is never imported).
        threads: Intra-op CPU threads (None: torch's where it is loaded, else one per CPU).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor] | bytes, *, device: torch.device | str = "cpu",
                 precision: str = "auto", channels_last: bool | None = None, compile: bool = False,
                 image_size: int = 256, runtime: str = "torch", threads: int | None = None) -> None:
        self.size = image_size
        self.max_batch: int | None = None  # lowered after an out-of-memory error
        self.session = None
        if runtime == "onnxruntime":
            if str(device) != "cpu":
                raise ValueError("the onnxruntime runtime runs on the CPU")
            from basnet import storage
            from basnet.export.ort import ort_session

            self.device_type = "cpu"
            uri = state_dict if isinstance(state_dict, str) else "the model"
            if isinstance(state_dict, str) and storage.is_s3(state_dict):  # a .onnx file's URI
                state_dict = storage.read_bytes(state_dict)  # to a temporary file, then freed
            elif isinstance(state_dict, str):  # a local path: ONNX Runtime reads it
                state_dict = storage.filesystem(state_dict)[1]
                if not os.path.isfile(state_dict):
                    from basnet.errors import CheckpointError

                    raise CheckpointError(f"{uri} is not on this node of the cluster: pass --weights as an s3:// "
                                          "URI or a path every node sees")
            try:
                self.session = ort_session(state_dict, threads=threads or _torch_threads())  # bytes, array or path
            except Exception as exc:  # ONNX Runtime's own classes (Fail, InvalidGraph, ...) derive from Exception
                if not type(exc).__module__.startswith("onnxruntime"):
                    raise
                from basnet.errors import CheckpointError, first_line

                raise CheckpointError(f"ONNX Runtime cannot load {uri}: {first_line(exc)}: pass a model written by "
                                      "jobs/export.py, or a training checkpoint") from None
            self.input_name = self.session.get_inputs()[0].name
            return
        import torch

        from basnet.device import compile_model, memory_format, resolve_precision
        from basnet.model import BASNet

        if threads:
            torch.set_num_threads(threads)
        self.device = device = torch.device(device)
        self.device_type = device.type
        self.precision = resolve_precision(precision, device)
        self.memory_format = memory_format(channels_last, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same input size
        with torch.device("meta"):  # no random init of 87 M parameters that are overwritten next
            model = BASNet()
        model.load_state_dict(_tensors(state_dict), strict=True, assign=True)
        self.model = compile_model(model.to(device).eval().to(memory_format=self.memory_format), compile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``prob``: each pending row's raw map (float32 bytes, before normalisation, which the write
        stage does and judges the mask by); ``infer_s``: its share of the time."""
        out = {k: v for k, v in batch.items() if k != "image"}
        pending = np.flatnonzero(np.asarray(batch["status"] == PENDING, dtype=bool))
        n = len(batch["status"])
        probs = np.full(n, b"", dtype=object)
        infer_s = np.zeros(n)
        if len(pending):
            start = time.perf_counter()
            images = np.stack([np.frombuffer(batch["image"][i], np.uint8).reshape(self.size, self.size, 3)
                               for i in pending])
            for i, prob in zip(pending, self.predict_raw(images)):
                probs[i] = prob.tobytes()
            infer_s[pending] = (time.perf_counter() - start) / len(pending)
        return {**out, "prob": probs, "infer_s": infer_s}

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The test protocol's maps: ``predict_raw``'s, min-max normalised per image."""
        return minmax(self.predict_raw(images))

    def predict_raw(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, S, S) raw maps (the refined output's sigmoid) of uint8 (N, S, S, 3) images, in
        chunks the memory allows."""
        maps, start = [], 0
        while start < len(images):
            size = min(self.max_batch or len(images), len(images) - start)
            try:
                maps.append(self._forward(images[start:start + size]))
                start += size
            except Exception as exc:
                if not is_out_of_memory(exc) or size == 1:
                    raise ModelError(f"{type(exc).__name__}: {exc}") from exc
                self.max_batch = max(1, size // 2)
                logger.warning("out of memory on a batch of %d images: going on with %d", size, self.max_batch)
                if self.device_type == "cuda":
                    sys.modules["torch"].cuda.empty_cache()
        return np.concatenate(maps)

    def _forward(self, images: np.ndarray) -> np.ndarray:
        if self.session is not None:  # the exported graph's first output is the refined map's sigmoid
            from basnet.export.ort import model_input

            # One image per run: batches of 4 gained ONNX Runtime under 2 % at 320 px on the CPU, and
            # each image of a batch adds its activations to the peak (2.27 against 1.32 GB).
            return np.concatenate([self.session.run(None, {self.input_name: model_input(images[i:i + 1])})[0][:, 0]
                                   for i in range(len(images))])
        import torch

        from basnet.predict import predict_raw

        tensor = torch.from_numpy(np.ascontiguousarray(images))
        return predict_raw(self.model, tensor, device=self.device, precision=self.precision,
                           memory_format=self.memory_format).numpy()


def _torch_threads() -> int:
    """torch's intra-op threads where torch is loaded (a caller that set them), else the CPUs."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else (os.cpu_count() or 1)
