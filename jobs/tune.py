"""Search BASNet's training hyperparameters with Ray Tune: each trial is a Ray Train run.

    python jobs/tune.py                                   # the embedded sample, a small default space
    python jobs/tune.py --data /data/DUTS --storage s3://bucket/tune --name duts-lr --epochs 8 \\
        --num-samples 16 --space configs/tune.yaml
    ray job submit --working-dir . -- python jobs/tune.py --data s3://bucket/DUTS ...

Running again with the same --name (and --storage) resumes an interrupted search: finished trials
are kept, unfinished ones continue from their last checkpoint. The best trial's config is written
as <storage>/<name>/best.yaml, for `python jobs/train.py --config best.yaml`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basnet.cli import init_ray, main_guard, setup_logging  # noqa: E402


@main_guard
def main(argv: list[str] | None = None) -> int:
    setup_logging(verbose="--verbose" in (sys.argv[1:] if argv is None else argv))  # before Ray is imported
    from basnet.ray_tune import check_search_alg, parse_search_args, run_search, search_space

    base, search, fixed = parse_search_args(argv, __doc__.splitlines()[0])
    # Every mistake in the options or the space is refused here, before Ray or any trial starts.
    dims = search_space(search, base, fixed)
    check_search_alg(search, dims)
    init_ray(verbose=base.verbose)
    outcome = run_search(base, search, dims)
    if outcome.best is None:
        print("error: no trial produced a checkpoint (see the trials table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
