"""Parallel evaluation with Ray Data, and the evaluation of a trained checkpoint.

The pairs to score become the rows of a dataset; each block is one ``map_batches`` task that
scores its pairs with :func:`basnet.evaluate.scoring.score_pairs` and returns its partial
:class:`~basnet.evaluate.scoring.Scores` (pickled, one row per task). The driver merges them with
``SODMetrics.merge``; ``SODMetrics.compute`` takes exactly rounded means, so the merged figures
equal a single-process evaluation bit for bit, however the pairs were split.

With weights instead of predictions, the bulk-masking pipeline (:mod:`basnet.infer.ray_pipeline`) writes
the masks under ``<out>/predictions`` (mirroring the images' relative paths, ``.png``) first.
"""

from __future__ import annotations

import logging
import math
import os
import pickle

import numpy as np
import ray
import ray.data

from basnet import storage
from basnet.console import print_last
from basnet.data.discovery import Pair
from basnet.evaluate.config import resolve_eval_data
from basnet.evaluate.matching import EvalPair, Matching, prepare_folders
from basnet.evaluate.report import summary_text, write_report
from basnet.evaluate.scoring import Evaluation, Scores, finish_scores, score_pairs
from basnet.quality import QUALITY_COLUMNS
from basnet.train.config import TrainConfig
from basnet.train.curves import CURVES_FILE

__all__ = ["score_parallel", "evaluate_matching", "evaluate_folders_parallel", "predict_and_evaluate",
           "evaluate_checkpoint", "default_blocks"]

logger = logging.getLogger(__name__)

_MAX_BLOCKS = 200
_IMAGES_PER_BLOCK = 50  # enough work per task that scheduling costs little


def default_blocks(n_pairs: int) -> int:
    """Scoring tasks for ``n_pairs``: two per cluster CPU at least, at most one per pair."""
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, min(n_pairs, _MAX_BLOCKS, max(2 * cpus, math.ceil(n_pairs / _IMAGES_PER_BLOCK))))


def _score_block(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One task: score a block of pairs, return the pickled partial Scores as a single row."""
    pairs = [EvalPair(key=str(k), pred=str(p), gt=str(g), image=str(i) or None)
             for k, p, g, i in zip(batch["key"], batch["pred"], batch["gt"], batch["image"])]
    task = ray.get_runtime_context().get_task_id() or f"pid-{os.getpid()}"
    return {"scores": np.array([pickle.dumps(score_pairs(pairs, task=task))], dtype=object)}


def score_parallel(pairs: list[EvalPair], *, blocks: int | None = None) -> Scores:
    """Scores ``pairs`` in Ray Data tasks and merges the parts on the driver.

    Args:
        pairs: The pairs to score.
        blocks: Number of tasks (default :func:`default_blocks`), at most one per pair.

    Returns:
        The merged :class:`Scores`; ``tasks`` lists one id per part.
    """
    if not pairs:
        raise ValueError("score_parallel needs at least one pair")
    blocks = min(len(pairs), blocks or default_blocks(len(pairs)))
    rows = [{"key": p.key, "pred": p.pred, "gt": p.gt, "image": p.image or ""} for p in pairs]
    # batch_size=None: one batch per block, so every block is its own task and partial result.
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        _score_block, batch_size=None, batch_format="numpy")
    merged = Scores()
    for part in ds.take_all():
        merged.merge(pickle.loads(part["scores"]))
    logger.info("scored %d images in %d tasks", len(merged.metrics), len(merged.tasks))
    return merged


def evaluate_matching(matching: Matching, *, dataset: str, predictions: str, checkpoint: str | None = None,
                      blocks: int | None = None) -> Evaluation:
    """Scores the pairs of ``matching`` in parallel on the running Ray cluster."""
    scores = score_parallel(matching.pairs, blocks=blocks)
    finish_scores(scores, matching)
    return Evaluation(scores=scores, matching=matching, dataset=dataset, predictions=predictions,
                      checkpoint=checkpoint)


def evaluate_folders_parallel(pred: str, gt: str, *, images: str | None = None,
                              blocks: int | None = None) -> Evaluation:
    """:func:`basnet.evaluate.scoring.evaluate_folders`, scored in parallel on the running Ray cluster."""
    matching = prepare_folders(pred, gt, images=images)
    return evaluate_matching(matching, dataset=gt, predictions=pred, blocks=blocks)


def _predict_masks(weights: str, images: list[str], *, pred_dir: str, image_size: int | None,
                   batch_size: int, precision: str, refine: str = "none", normalize: str = "minmax",
                   on_no_object: str = "keep") -> dict[str, dict]:
    """Masks exactly ``images`` with the bulk-masking pipeline; returns image URI -> its manifest row
    (``output``: the mask's URI, and the mask's quality figures).

    Masks mirror the images' paths relative to their common folder; existing masks are
    overwritten, so a reused output folder never feeds another model's masks into the scores.
    """
    from basnet.infer.config import InferConfig
    from basnet.infer.manifest import read_run_manifest
    from basnet.infer.ray_pipeline import run_inference

    cfg = InferConfig(output=pred_dir, weights=weights, root=storage.common_folder(images), image_size=image_size,
                      batch_size=batch_size, precision=precision, overwrite=True, refine=refine, normalize=normalize,
                      on_no_object=on_no_object)
    summary = run_inference(cfg, images=images)
    logger.info("masking: %s", summary.line())
    rows = read_run_manifest(summary).to_pylist()
    failed = [row for row in rows if row["status"] != "written"]
    if failed:
        logger.warning("%d images could not be masked; their ground truth counts as without prediction "
                       "(first: %s: %s)", len(failed), failed[0]["input"], failed[0]["error"])
    return {row["input"]: row for row in rows if row["status"] == "written"}


def _match_masks(pairs: list[Pair], masks: dict[str, dict], pred_dir: str) -> Matching:
    """Pairs each written mask with its ground truth; images without a mask and stray masks listed."""
    from basnet.infer.naming import canonical, printable

    root = storage.common_folder([p.image for p in pairs])
    found, missing = [], []
    for pair in pairs:
        row = masks.get(printable(canonical(pair.image)))
        if row is None:
            missing.append(pair.mask)
            continue
        key = storage.relative_to(pair.image, root).rsplit(".", 1)[0]
        found.append(EvalPair(key=key, pred=row["output"], gt=pair.mask, image=pair.image))
    if not found:
        raise storage.StorageError(f"no mask was written under {pred_dir}; see the masking log above")
    stray = set(storage.list_files(pred_dir, suffixes=(".png",))) - {row["output"] for row in masks.values()}
    return Matching(pairs=sorted(found, key=lambda p: p.key), preds_without_gt=sorted(stray),
                    gt_without_pred=sorted(missing))


def predict_and_evaluate(weights: str, pairs: list[Pair], *, out: str, dataset: str,
                         image_size: int | None = None, batch_size: int = 8, precision: str = "auto",
                         blocks: int | None = None, refine: str = "none", normalize: str = "minmax",
                         on_no_object: str = "keep") -> Evaluation:
    """Masks the images of ``pairs`` with ``weights``, then scores the masks against ``pairs``' masks.

    Args:
        weights: Checkpoint directory, ``model.pt`` or published state-dict file.
        pairs: Image/mask pairs to evaluate.
        out: Output folder; the masks go to ``<out>/predictions``.
        dataset: How the data is named in the report.
        image_size: Side the model sees (default: the checkpoint's training size, else 256).
        batch_size: Images per inference batch.
        precision: ``--precision`` of the masking (see ``basnet.device``).
        blocks: Scoring tasks (default from the cluster).
        refine: ``none`` (the test protocol's plain upsampling) or ``guided``; a guided evaluation
            also masks the images plainly (into ``<out>/predictions-plain``) and keeps those figures
            in ``plain_metrics``, to be printed beside its own.
        normalize, on_no_object: The bulk job's ``--normalize`` and ``--on-no-object``. Each scored
            row gets its mask's quality figures; the report ranks the errors by the confidence.

    Returns:
        The :class:`Evaluation`.
    """
    def run(pred_dir: str, how: str) -> Evaluation:
        masks = _predict_masks(weights, [p.image for p in pairs], pred_dir=pred_dir, image_size=image_size,
                               batch_size=batch_size, precision=precision, refine=how, normalize=normalize,
                               on_no_object=on_no_object)
        evaluation = evaluate_matching(_match_masks(pairs, masks, pred_dir), dataset=dataset,
                                       predictions=pred_dir, checkpoint=weights, blocks=blocks)
        by_mask = {row["output"]: row for row in masks.values()}
        for scored in evaluation.scores.rows:
            scored.update({key: by_mask[scored["pred"]][key] for key in QUALITY_COLUMNS})
        return evaluation

    evaluation = run(storage.join(out, "predictions"), refine)
    evaluation.refine, evaluation.normalize, evaluation.on_no_object = refine, normalize, on_no_object
    if refine != "none":
        evaluation.plain_metrics = run(storage.join(out, "predictions-plain"), "none").metrics()
    return evaluation


def evaluate_checkpoint(checkpoint_uri: str, cfg: TrainConfig) -> Evaluation:
    """Evaluates a training run's checkpoint on ``cfg.eval_data``; prints the metrics table, then names
    the run's curves and the evaluation's contact sheets.

    Args:
        checkpoint_uri: The checkpoint directory (local or ``s3://``).
        cfg: The run's resolved config: ``eval_data`` (a DUTS-layout root or ``"sample"``),
            ``eval_out`` (default ``<storage>/<name>/eval``), ``image_size``, ``batch_size``, and the
            held-out split's ``val_fraction``/``seed``.

    Returns:
        The :class:`Evaluation`; the report files are under the output folder.
    """
    label, pairs = resolve_eval_data(cfg.eval_data, skip_unpaired=cfg.skip_unpaired,
                                     val_fraction=cfg.val_fraction, seed=cfg.seed)
    out = cfg.eval_out or storage.join(cfg.storage, cfg.name, "eval")
    logger.info("evaluating %s on %d images of %s", checkpoint_uri, len(pairs), label)
    evaluation = predict_and_evaluate(checkpoint_uri, pairs, out=out, dataset=label,
                                      image_size=cfg.image_size, batch_size=cfg.batch_size or 8,
                                      precision=cfg.precision)
    write_report(evaluation, out)
    pictures = [storage.join(cfg.storage, cfg.name, CURVES_FILE), storage.join(out, "worst.png"),
                storage.join(out, "best.png")]
    # after everything the logs and workers printed
    print_last(summary_text(evaluation, out) + "\n\npictures: " + "  ".join(pictures))
    return evaluation

