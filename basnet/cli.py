"""What every job shares: one-line errors with exit status 2, logging, and starting or joining Ray."""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Callable

__all__ = ["UsageError", "main_guard", "init_ray", "setup_logging"]

REPO_ROOT = str(Path(__file__).resolve().parents[1])

# Variables a worker on another node needs to reach the same storage as the driver.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "BASNET_SAMPLE_DIR")


class UsageError(ValueError):
    """A mistake in the job's arguments or inputs that the user can fix."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from basnet.checkpoint import CheckpointError
    from basnet.config import ConfigError
    from basnet.data import DataError
    from basnet.storage import StorageError

    return UsageError, ConfigError, DataError, CheckpointError, StorageError


def main_guard(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Runs a job's main; a user error becomes one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs) or 0
        except _user_errors() as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray Data's per-operator progress bars flood job logs; the jobs print their own summaries.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")


def runtime_env() -> dict:
    """Environment for every Ray worker: storage credentials and the project on the path."""
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env["RAY_DATA_LOG_LEVEL"] = os.environ.get("RAY_DATA_LOG_LEVEL", "WARNING")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": env}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Joins the cluster named by ``address`` or ``RAY_ADDRESS`` (set inside ``ray job submit``),
    else starts a local Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = runtime_env()
    if address:
        # Named for every worker too: with several Ray instances on one machine, Ray Train's
        # placement-group cleaner would otherwise have to guess which cluster to ask.
        env["env_vars"]["RAY_ADDRESS"] = address
        ray.init(address=address, runtime_env=env)
    else:
        # Ray Train's placement-group cleaner finds the dashboard through the State API; with
        # several Ray instances on one machine it cannot guess which, so name ours explicitly.
        port = _free_port()
        api = f"http://127.0.0.1:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = api
        env["env_vars"]["RAY_API_SERVER_ADDRESS"] = api
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, runtime_env=env)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
