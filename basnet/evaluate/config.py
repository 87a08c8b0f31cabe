"""The evaluation job's options, and what ``--data``/``--weights`` resolve to before anything runs."""

from __future__ import annotations

from dataclasses import dataclass

from basnet.config import PRECISIONS, check_options, option
from basnet.data.discovery import Pair, evaluation_pairs
from basnet.errors import ConfigError
from basnet.imaging.refine import REFINES
from basnet.quality import NORMALIZES, ON_NO_OBJECT

__all__ = ["EvalConfig", "SAMPLE_TOKEN", "resolve_eval_data", "WeightsPlan", "plan_weights"]

SAMPLE_TOKEN = "sample"  # --data / --eval-data value meaning the embedded sample's held-out images
_DEFAULT_IMAGE_SIZE = 256  # the paper's test size


@dataclass
class EvalConfig:
    """Options of ``jobs/evaluate.py``: score existing masks, or predict and then score."""

    pred: str | None = option(None, "folder of predicted masks (local, file:// or s3://); use with --gt")
    gt: str | None = option(None, "folder of ground-truth masks, or a DUTS-layout root holding DUTS-TE; "
                                "use with --pred")
    images: str | None = option(None, "folder of the input images, for the contact sheets (default: "
                                    "guessed beside --gt, e.g. DUTS-TE-Image next to DUTS-TE-Mask)")
    weights: str | None = option(None, "checkpoint directory, model.pt or published basnet.pth to predict "
                                     "with; use with --data")
    data: str | None = option(None, "DUTS-layout root, or a root holding images/ and masks/, or 'sample' "
                                  "(the embedded sample's held-out images); use with --weights")
    out: str = option("eval", "where metrics.json, metrics.md, per_image.parquet and the pictures go "
                            "(and predictions/ with --weights)")
    image_size: int | None = option(None, "side the model sees with --weights, a multiple of 32 (default: "
                                        "the checkpoint's training size, else 256)", multiple_of=32)
    batch_size: int = option(8, "images per inference batch with --weights", positive=True)
    precision: str = option("auto", "with --weights: auto (bf16 on GPUs that support it, fp16 on older "
                                  "GPUs, fp32 on CPU), fp32, bf16 or fp16", choices=PRECISIONS)
    refine: str = option("none", "with --weights: how masks reach the images' size: none (the test protocol's "
                                 "plain upsampling, comparable with published figures) or guided (the photo "
                                 "guides the edges; the images are also masked plainly and both rows printed)",
                         choices=REFINES)
    normalize: str = option("minmax", "with --weights: minmax (each map stretched to 0-1, the test protocol's) or "
                                      "none (the model's sigmoid as it is)", choices=NORMALIZES)
    on_no_object: str = option("keep", "with --weights: keep the mask of an image whose map holds nothing "
                                       "salient, or score an empty one", choices=ON_NO_OBJECT)
    sheet_rows: int = option(8, "images in each of the worst.png and best.png contact sheets", positive=True)
    skip_unpaired: bool = option(False, "with --data: skip images without a mask instead of failing")
    blocks: int | None = option(None, "parallel scoring tasks (default: from the cluster's CPUs and the "
                                    "number of images)", positive=True)
    verbose: bool = option(False, "show Ray's own INFO logs on the console")

    def mode(self) -> str:
        """``"pred"`` or ``"weights"``; raises ConfigError unless exactly one mode is complete."""
        pred_mode = self.pred is not None or self.gt is not None
        weights_mode = self.weights is not None or self.data is not None
        if pred_mode and weights_mode:
            raise ConfigError("--pred/--gt and --weights/--data are two different modes: pass one pair")
        if pred_mode and (self.pred is None or self.gt is None):
            missing = "--gt" if self.gt is None else "--pred"
            raise ConfigError(f"--pred and --gt go together: add {missing}")
        if weights_mode and (self.weights is None or self.data is None):
            missing = "--data" if self.data is None else "--weights"
            raise ConfigError(f"--weights and --data go together: add {missing}")
        if not pred_mode and not weights_mode:
            raise ConfigError("nothing to evaluate: pass --pred DIR --gt DIR, or --weights SOURCE --data DIR")
        self.check()
        for flag, value, default in (("--refine", self.refine, "none"), ("--normalize", self.normalize, "minmax"),
                                     ("--on-no-object", self.on_no_object, "keep")):
            if pred_mode and value != default:
                raise ConfigError(f"{flag} is for --weights (the masks of --pred are scored as they are): drop it")
        return "pred" if pred_mode else "weights"

    def check(self) -> None:
        check_options(self)


def resolve_eval_data(data: str, *, skip_unpaired: bool = False, val_fraction: float = 0.1,
                      seed: int = 0) -> tuple[str, list[Pair]]:
    """``(label, pairs)`` to evaluate for ``data``.

    Args:
        data: A DUTS-layout root, a root holding ``images/`` + ``masks/``, or ``"sample"`` (the
            embedded sample's held-out images, the ones training validates on).
        skip_unpaired: Leave unpaired files out instead of failing.
        val_fraction: The held-out share, when the root has no DUTS-TE (as in training).
        seed: The held-out draw's seed (as in training).
    """
    if data == SAMPLE_TOKEN:
        from basnet.data.sample import ensure_sample

        root = ensure_sample()
        label = f"embedded sample, held-out images ({root})"
    else:
        root = label = data
    pairs = evaluation_pairs(root, skip_unpaired=skip_unpaired, val_fraction=val_fraction, seed=seed)
    return label, pairs


@dataclass(frozen=True)
class WeightsPlan:
    """What ``--weights``/``--data`` resolve to, before anything is predicted."""

    weights: str
    dataset: str
    pairs: list[Pair]
    image_size: int


def plan_weights(weights: str, data: str, *, image_size: int | None = None,
                 skip_unpaired: bool = False) -> WeightsPlan:
    """Checks the weights and finds the pairs; the checkpoint's training config supplies defaults.

    The image size defaults to the training size (else 256) and a held-out split uses the
    training run's ``val_fraction`` and ``seed``, so a checkpoint is scored on what it validated on.

    Raises:
        CheckpointError: The weights cannot be read.
        DataError: Nothing to evaluate under ``data``.
    """
    from basnet.checkpoint import checkpoint_config

    trained = checkpoint_config(weights) or {}
    label, pairs = resolve_eval_data(data, skip_unpaired=skip_unpaired, seed=trained.get("seed", 0),
                                     val_fraction=trained.get("val_fraction", 0.1))
    size = image_size or trained.get("image_size") or _DEFAULT_IMAGE_SIZE
    return WeightsPlan(weights=weights, dataset=label, pairs=pairs, image_size=int(size))
