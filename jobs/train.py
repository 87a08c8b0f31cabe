"""Train BASNet data-parallel with Ray Train on DUTS-layout data streamed by Ray Data.

    python jobs/train.py                                  # the embedded sample, whatever the machine has
    python jobs/train.py --data /data/DUTS --storage s3://bucket/runs --num-workers 8 --gpu
    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/DUTS ...

Re-running with the same --name (and --storage) resumes from the run's last checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basnet.cli import init_ray, main_guard, setup_logging  # noqa: E402
from basnet.config import TrainConfig, parse_config  # noqa: E402


@main_guard
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, __doc__.splitlines()[0]).resolved()
    setup_logging(cfg.verbose)
    # Every user error fails here, in one line and before Ray starts, not inside the workers.
    from basnet.model import check_backbone_weights
    from basnet.ray_train import resolve_data

    split = resolve_data(cfg)
    check_backbone_weights(cfg.backbone_weights)
    if cfg.eval_data:  # a wrong --eval-data fails now, not after hours of training
        from basnet.evaluation import resolve_eval_data

        resolve_eval_data(cfg.eval_data, skip_unpaired=cfg.skip_unpaired, val_fraction=cfg.val_fraction,
                          seed=cfg.seed)
    init_ray(verbose=cfg.verbose)
    from basnet.ray_train import fit

    outcome = fit(cfg, split=split)
    if outcome.best_checkpoint is None:
        print("error: training produced no checkpoint", file=sys.stderr)
        return 1
    if cfg.eval_data:
        from basnet.ray_eval import evaluate_checkpoint

        evaluate_checkpoint(outcome.best_checkpoint, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
