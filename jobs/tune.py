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

from basnet.console import setup_logging  # noqa: E402
from basnet.errors import main_guard  # noqa: E402
from basnet.ray_init import init_ray  # noqa: E402
from basnet.tune.config import parse_search_args  # noqa: E402
from basnet.tune.space import check_search_alg, search_space  # noqa: E402


@main_guard
def main(argv: list[str] | None = None) -> int:
    base, search, fixed = parse_search_args(argv, __doc__.splitlines()[0])
    setup_logging(base.verbose)
    # Every mistake in the options or the space is refused here, before Ray or any trial starts.
    dims = search_space(search, base, fixed)
    check_search_alg(search.search_alg, dims)
    init_ray(verbose=base.verbose)
    from basnet.tune.ray_search import run_search

    outcome = run_search(base, search, dims)
    if outcome.best is None:
        print("error: no trial produced a checkpoint (see the trials table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
