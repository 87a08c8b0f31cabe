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

from basnet.config import parse_config  # noqa: E402
from basnet.console import setup_logging  # noqa: E402
from basnet.errors import main_guard  # noqa: E402
from basnet.ray_init import init_ray  # noqa: E402
from basnet.train.config import TrainConfig, resolve_data  # noqa: E402


@main_guard
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, __doc__.splitlines()[0]).resolved()
    setup_logging(cfg.verbose)
    # Every user error fails here, in one line and before Ray starts, not inside the workers.
    from basnet.model import check_backbone_weights

    split = resolve_data(cfg)
    check_backbone_weights(cfg.backbone_weights)
    if cfg.eval_data:  # a wrong --eval-data fails now, not after hours of training
        from basnet.evaluate.config import resolve_eval_data

        resolve_eval_data(cfg.eval_data, skip_unpaired=cfg.skip_unpaired, val_fraction=cfg.val_fraction,
                          seed=cfg.seed)
    init_ray(verbose=cfg.verbose)
    from basnet.train.ray_trainer import fit

    outcome = fit(cfg, split=split)
    if outcome.best_checkpoint is None:
        print("error: training produced no checkpoint", file=sys.stderr)
        return 1
    if cfg.eval_data:
        from basnet.evaluate.ray_scoring import evaluate_checkpoint

        evaluate_checkpoint(outcome.best_checkpoint, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
