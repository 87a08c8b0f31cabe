"""Mask every image of a collection with BASNet: Ray Data batch inference, one PNG per image.

    python jobs/infer.py --input /data/photos --output /data/masks --weights runs/basnet/epoch_0100
    python jobs/infer.py --input s3://bucket/shards --output s3://bucket/cutouts --weights basnet.pth \\
        --format rgba --actors 4 --num-gpus-per-actor 1 --batch-size 32
    python jobs/infer.py --input /data/photos --output /data/masks --weights basnet.onnx   # ONNX Runtime, CPUs
    ray job submit --working-dir . -- python jobs/infer.py --input s3://... --output s3://... --weights ...

Each mask's confidence and a no_object flag go to the manifest (see docs/infer.md); --review N
writes a contact sheet of the N least confident to <output>/_review/.
Re-running with the same --output skips inputs whose mask exists (--overwrite redoes them); --dry-run
prints what a run would do. Each run writes its manifest to <output>/_manifest/part-<run>-NNNN.parquet
and its resolved config to <output>/_config/config-<run>.yaml.

Exit status: 0 when the run is done; 1 when it failed or was stopped (a model that keeps failing,
storage that refuses access, more failed inputs than --max-failed-fraction, none written, or a
pipeline that delivered nothing for --stall-timeout); 2 for bad arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basnet.config import parse_config  # noqa: E402
from basnet.console import setup_logging  # noqa: E402
from basnet.errors import JobFailed, main_guard  # noqa: E402
from basnet.infer.config import InferConfig  # noqa: E402
from basnet.infer.local import runs_here  # noqa: E402
from basnet.infer.manifest import not_images_line  # noqa: E402
from basnet.infer.plan import plan_inference  # noqa: E402
from basnet.ray_init import init_ray  # noqa: E402


@main_guard
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(InferConfig, argv, __doc__.splitlines()[0])
    setup_logging(cfg.verbose)
    plan = plan_inference(cfg)  # every argument error surfaces here, before Ray starts
    if runs_here(plan.config):  # one machine, no cluster: no Ray to start (docs/infer.md)
        from basnet.infer.local import dry_run_local as dry_run, execute_local as execute
    else:
        # No dashboard for a Ray started here: masking needs neither it nor the State API (docs/infer.md).
        init_ray(plan.config.address, verbose=cfg.verbose, dashboard=False)
        from basnet.infer.ray_pipeline import dry_run, execute

    if cfg.dry_run:
        print("\n".join(dry_run(plan).lines()), flush=True)
        return 0
    try:
        summary = execute(plan)
    except JobFailed:
        print(f"manifest of what was done in {plan.output_root}/_manifest/ (run {plan.run_id})", flush=True)
        raise
    print(summary.line(), flush=True)
    if others := not_images_line(summary.not_images):
        print(others, flush=True)
    if summary.quality:
        print(summary.quality, flush=True)
    if summary.review:
        print(f"least confident masks: {'  '.join(summary.review.values())}", flush=True)
    print(summary.stages_line(), flush=True)
    print(f"masks in {summary.output}, manifest {', '.join(summary.manifest)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
