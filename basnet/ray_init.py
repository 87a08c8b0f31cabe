"""Starting or joining Ray for a job: the cluster, the workers' environment, the console.

Imports Ray only inside ``init_ray``, so a job can check its arguments before Ray is loaded.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

__all__ = ["init_ray", "runtime_env", "started_local_ray", "free_port", "free_ports", "REPO_ROOT"]

REPO_ROOT = str(Path(__file__).resolve().parents[1])

# Variables a worker on another node needs to reach the same storage as the driver.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "BASNET_SAMPLE_DIR")


def runtime_env() -> dict:
    """Environment for every Ray worker: storage credentials and the project on the path."""
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env["RAY_DATA_LOG_LEVEL"] = os.environ.get("RAY_DATA_LOG_LEVEL", "WARNING")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": env}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that nothing listens on now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    return free_ports(1)[0]


_started_here = False

# Ray starts its workers at niceness 15, below every ordinary process: on a machine that also runs
# other work (a laptop, a CI runner, a shared box), each Ray worker then got about 3 % of a core
# and a 2-minute training test did not finish in 10 (docs/design.md, "Stalls"). A Ray this job
# starts for itself runs its workers at the job's own priority; a cluster keeps what its nodes
# were started with, and RAY_worker_niceness set by the user wins here too.
_NICENESS_VARIABLE = "RAY_worker_niceness"


def _local_system_config() -> dict:
    return {} if _NICENESS_VARIABLE in os.environ else {"worker_niceness": 0}


def started_local_ray() -> bool:
    """Whether this process started the Ray it uses (one machine, nothing will be added to it)."""
    return _started_here


def _dashboard_available() -> bool:
    """``ray[default]`` brings the dashboard (and the State API); a bare ``ray`` install lacks it."""
    from ray._private.utils import get_dashboard_dependency_error

    return get_dashboard_dependency_error() is None


def init_ray(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False,
             dashboard: bool = True) -> None:
    """Joins the cluster named by ``address`` or ``RAY_ADDRESS`` (set inside ``ray job submit``),
    else starts a local Ray on this machine. Ray's own INFO logs stay off the console unless
    ``verbose``; what workers print (the training job's epoch lines) still reaches it.

    ``dashboard=False`` starts a local Ray without the dashboard, for jobs that use neither it nor
    the State API (Ray Train does): its dozen processes hold about 1 GB and take a second of the
    start on 2 cores. A cluster keeps what it was started with."""
    global _started_here
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = runtime_env()
    quiet = {} if verbose else {"logging_level": logging.WARNING}
    if address:
        # Named for every worker too: with several Ray instances on one machine, Ray Train's
        # placement-group cleaner would otherwise have to guess which cluster to ask.
        env["env_vars"]["RAY_ADDRESS"] = address
        ray.init(address=address, runtime_env=env, **quiet)
    elif dashboard and _dashboard_available():
        # Ray Train's placement-group cleaner finds the dashboard through the State API; with
        # several Ray instances on one machine it cannot guess which, so name ours explicitly.
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = api
        env["env_vars"]["RAY_API_SERVER_ADDRESS"] = api
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, runtime_env=env, _system_config=_local_system_config(), **quiet)
    else:  # e.g. a GPU image with Ray installed from wheels, without the [default] extra
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env,
                 _system_config=_local_system_config(), **quiet)
    _started_here = not address
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
