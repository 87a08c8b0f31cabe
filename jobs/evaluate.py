"""Score saliency masks against ground truth (MAE, F, S, E, weighted F, relaxed boundary F) with Ray.

    python jobs/evaluate.py --pred masks/ --gt /data/DUTS --out eval/          # existing masks vs DUTS-TE
    python jobs/evaluate.py --pred s3://b/masks --gt s3://b/DUTS-TE/DUTS-TE-Mask --out s3://b/eval
    python jobs/evaluate.py --weights runs/basnet/epoch_0100 --data /data/DUTS --out eval/
    python jobs/evaluate.py --weights basnet.pth --data sample                  # the embedded sample
    ray job submit --working-dir . -- python jobs/evaluate.py ...

Writes metrics.json, metrics.md, per_image.parquet, pr_curve.png, f_curve.png, worst.png and
best.png under --out (and the masks under --out/predictions with --weights); prints the table last.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basnet.config import parse_config  # noqa: E402
from basnet.console import print_last, setup_logging  # noqa: E402
from basnet.errors import main_guard  # noqa: E402
from basnet.evaluate.config import EvalConfig, plan_weights  # noqa: E402
from basnet.evaluate.matching import prepare_folders  # noqa: E402
from basnet.ray_init import init_ray  # noqa: E402


@main_guard
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EvalConfig, argv, __doc__.splitlines()[0])
    mode = cfg.mode()
    setup_logging(cfg.verbose)
    # Resolve every path before starting Ray, so a wrong argument fails in one line and at once.
    if mode == "pred":
        matching = prepare_folders(cfg.pred, cfg.gt, images=cfg.images)
    else:
        plan = plan_weights(cfg.weights, cfg.data, image_size=cfg.image_size, skip_unpaired=cfg.skip_unpaired)
    init_ray(verbose=cfg.verbose)
    from basnet.evaluate import ray_scoring
    from basnet.evaluate.report import summary_text, write_report

    if mode == "pred":
        evaluation = ray_scoring.evaluate_matching(matching, dataset=cfg.gt, predictions=cfg.pred,
                                                   blocks=cfg.blocks)
    else:
        evaluation = ray_scoring.predict_and_evaluate(plan.weights, plan.pairs, out=cfg.out,
                                                      dataset=plan.dataset, image_size=plan.image_size,
                                                      batch_size=cfg.batch_size, precision=cfg.precision,
                                                      blocks=cfg.blocks, refine=cfg.refine,
                                                      normalize=cfg.normalize, on_no_object=cfg.on_no_object)
    write_report(evaluation, cfg.out, sheet_rows=cfg.sheet_rows)
    print_last(summary_text(evaluation, cfg.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
