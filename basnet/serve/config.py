"""The masking service's options: one ``ServeConfig`` for ``jobs/serve.py`` and ``configs/serve.yaml``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from basnet import storage
from basnet.config import PRECISIONS, check_options, option
from basnet.errors import ConfigError, UsageError
from basnet.imaging import DEFAULT_MAX_PIXELS, FORMATS, REFINES
from basnet.quality import NORMALIZES, ON_NO_OBJECT

__all__ = ["ServeConfig", "AUTO"]

AUTO = "auto"  # --num-replicas auto: Serve's autoscaling


@dataclass
class ServeConfig:
    """Everything the service needs; ``None`` means "resolved from the weights or the cluster"."""

    weights: str | None = option(None, "a training checkpoint directory, its model.pt, or the published "
                                     "basnet.pth (local or s3://); loaded once per replica")
    host: str = option("127.0.0.1", "address the HTTP server listens on (0.0.0.0 to accept other machines)")
    port: int = option(8000, "HTTP port", within=(1, 65535))
    format: str = option("mask", "the answer when a request names no ?format=: mask (8-bit soft saliency), "
                               "binary (0/255 at the threshold) or rgba (the image with the mask as alpha)",
                         choices=FORMATS)
    threshold: float = option(0.5, "the default ?threshold= for binary masks, in [0, 1]", within=(0, 1))
    refine: str | None = option(None, "the default ?refine=: none (plain bilinear upsampling) or guided (the photo "
                                      "guides the edges; cut-outs get re-estimated edge colours) (default: guided "
                                      "for rgba, none for mask and binary, as the bulk job)", choices=REFINES)
    normalize: str = option("minmax", "the default ?normalize=: minmax (each map stretched to 0-1, the test "
                                      "protocol's) or none (the model's sigmoid as it is)", choices=NORMALIZES)
    on_no_object: str = option("keep", "the default ?on_no_object=: keep the mask of an image whose map holds "
                                       "nothing salient, or answer an empty one", choices=ON_NO_OBJECT)
    image_size: int | None = option(None, "model input side, a multiple of 32 (default: the checkpoint's "
                                        "training size; 256 for published weights)", multiple_of=32)
    precision: str = option("auto", "auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; "
                                  "or fp32, bf16, fp16", choices=PRECISIONS)
    channels_last: bool | None = option(None, "channels_last (NHWC) model and inputs (default: on GPUs)")
    compile: bool = option(False, "torch.compile the model in each replica (slower start, faster batches)")
    max_batch_size: int | None = option(None, "most concurrent requests one model call serves, 1 turns batching "
                                              "off (default: 8 on GPUs; on CPUs as the bulk job's batch: 8 at "
                                              "64 px, 2 at 128 px, 1 above: batches cost more than they save "
                                              "there)", positive=True)
    batch_wait_ms: float = option(5.0, "how long a batch waits for more requests once its first has come",
                                  at_least=0)
    max_bytes: int = option(128 * 2**20, "refuse (413) request bodies larger than this many bytes (128 MiB: a "
                                         "100 MP camera JPEG fits)", positive=True)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse (413) images with more pixels than this (200 MP, as the "
                                                 "bulk job)", positive=True)
    full_decode: bool = option(False, "decode JPEGs at full size before resizing for the model, as the bulk "
                                      "job's --full-decode (default: reduced, see docs/infer.md)")
    num_replicas: str = option("1", "model replicas: a number, or 'auto' for Serve's autoscaling "
                                  "(1 to 100 replicas, aiming at one batch in flight each)")
    num_gpus_per_replica: float | None = option(None, "GPUs per replica (default 1 if the cluster has GPUs, "
                                                    "else 0)", at_least=0)
    num_cpus_per_replica: float | None = option(None, "CPUs per replica, also its torch threads on CPU "
                                                    "(default 1 with a GPU; without, a node's CPUs "
                                                    "shared among the replicas)", positive=True)
    name: str = option("basnet", "Serve application name")
    address: str | None = option(None, "Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    verbose: bool = option(False, "show Ray's own INFO logs on the console")

    def check(self) -> None:
        """Raises ConfigError or UsageError naming the first bad option (no Ray, no torch)."""
        if not self.weights:
            raise ConfigError("--weights is required (see --help)")
        check_options(self)
        self.replicas()
        if not self.host.strip():
            raise ConfigError("--host is empty: use 127.0.0.1 (this machine) or 0.0.0.0 (every interface)")
        try:
            found = storage.exists(self.weights)
        except OSError as exc:
            raise UsageError(f"cannot look up --weights {self.weights}: {exc}") from None
        if not found:
            raise UsageError(f"checkpoint not found: {self.weights} (pass a training checkpoint directory, "
                             "its model.pt, or a basnet.pth file)")

    def replicas(self) -> int | str:
        """``--num-replicas`` as Serve takes it: a positive int or ``"auto"``."""
        text = str(self.num_replicas).strip().lower()
        if text == AUTO:
            return AUTO
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"--num-replicas must be a positive number or 'auto', got {self.num_replicas!r}")
        return int(text)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
