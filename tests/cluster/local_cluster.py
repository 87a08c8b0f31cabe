"""A multi-node Ray cluster on one machine, hosted by a child process the tests talk to.

``ray.cluster_utils.Cluster`` starts every node's processes (GCS, raylets, dashboard) from the
process that builds it and writes the cluster's address into Ray's temporary folder. Built inside
the pytest process it would share global state with the session's own Ray, so it lives in a child
process instead (``python tests/cluster/local_cluster.py SPEC``) with its own ``RAY_TMPDIR`` and its own
authentication token. The parent sends one JSON command per line on the child's stdin and reads
one JSON reply per line on its stdout; closing stdin shuts the cluster down.

Commands: ``{"op": "remove", "node_id": ID}`` kills every process of that worker node (the way a
machine is lost); ``{"op": "add", "args": {...}}`` adds a worker node; ``{"op": "actors",
"class_name": NAME}`` maps each live actor of that class to the node it runs on, and lists their
process IDs.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from basnet.ray_init import free_port

__all__ = ["RAY", "ClusterSpec", "LocalCluster", "cluster_env", "ray_cli"]

RAY = str(Path(sys.executable).with_name("ray"))  # this environment's `ray` command
REPO = Path(__file__).resolve().parents[2]


def ray_cli(env: dict, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``ray *args`` from the repository's root, with ``env``; its output captured."""
    return subprocess.run([RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def cluster_env(root: str) -> dict[str, str]:
    """Environment for every process of a test cluster and of the drivers that join it.

    A token of its own under ``root`` (never the user's ``~/.ray/auth_token``), token
    authentication on, a private Ray temporary folder, and no 30 s drain on SIGTERM.
    """
    token = os.path.join(root, "auth_token")
    if not os.path.exists(token):
        with open(token, "w") as f:
            f.write(secrets.token_hex(32))
    # Ray's job client prefers RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, to its --address flag,
    # and the session's own ray.init() sets the former in this process: drop both, and any token.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": token,
        "RAY_TMPDIR": os.path.join(root, "t"),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # A killed node is marked dead after 3 missed health checks of 1 s (15 s by default: 5 of 3 s).
        # A killed raylet refuses the check at once; a slow one still has the default 10 s to answer,
        # so a loaded machine does not lose nodes it still has.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        # The job's `python` must be this interpreter, with torch and the project.
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),
    })
    return env


@dataclass
class ClusterSpec:
    """Node shapes: ``head`` and each of ``workers`` are keyword arguments of ``Cluster.add_node``."""

    head: dict = field(default_factory=lambda: {"num_cpus": 1})
    workers: list[dict] = field(default_factory=list)


class LocalCluster:
    """Parent-side handle of a cluster hosted by ``python tests/cluster/local_cluster.py``.

    Args:
        spec: The node shapes.
        root: A short folder for the token and Ray's temporary files (Unix sockets live under
            it, and their paths must stay under about 100 characters).
    """

    def __init__(self, spec: ClusterSpec, root: str) -> None:
        self.root = root
        self.env = cluster_env(root)
        os.makedirs(self.env["RAY_TMPDIR"], exist_ok=True)
        self._log = open(os.path.join(root, "cluster.log"), "w")
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(spec.__dict__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=self.env)
        try:
            started = self._reply()
        except Exception:
            self.close()
            raise
        self.address: str = started["address"]
        self.dashboard_url: str = started["dashboard_url"]
        self.head_node_id: str = started["head"]
        self.worker_node_ids: list[str] = started["workers"]

    def _reply(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster process exited; see {self._log.name}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"cluster command failed: {reply['error']}")
        return reply

    def _call(self, **command) -> dict:
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def remove_worker(self, node_id: str) -> None:
        """Kills every process of one worker node and waits until they are gone."""
        self._call(op="remove", node_id=node_id)
        self.worker_node_ids.remove(node_id)

    def add_worker(self, **node_args) -> str:
        node_id = self._call(op="add", args=node_args)["node_id"]
        self.worker_node_ids.append(node_id)
        return node_id

    def actors(self, class_name: str) -> dict[str, str]:
        """Every live actor of ``class_name``: actor ID -> the ID of the node it runs on."""
        return self._call(op="actors", class_name=class_name)["actors"]

    def actor_pids(self, class_name: str) -> list[int]:
        """The process IDs of every live actor of ``class_name`` (all nodes run on this machine)."""
        return self._call(op="actors", class_name=class_name)["pids"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()  # the child's cue to shut every node down
            try:
                self._proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


# ---------------------------------------------------------------- the child process


def _head_args(head: dict) -> dict:
    """Own ports for everything that would otherwise take a fixed default (6379, 8265, 52365).

    ``RAY_ADDRESS`` is set before any node starts, so every Ray process of this cluster inherits
    it: Ray Train's placement-group cleaner looks its controller up through the State API, and
    with several Ray instances on one machine it would otherwise guess which one to ask.
    """
    from ray._private.services import get_node_ip_address

    port = free_port()
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    return {"gcs_server_port": port, "include_dashboard": True, "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(), **head}


def _serve(spec: dict, replies: TextIO) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args=_head_args(spec["head"]))
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    nodes = {}
    for args in spec["workers"]:
        node = cluster.add_node(**args)
        nodes[node.node_id] = node
    cluster.wait_for_nodes(timeout=120)  # generous: a loaded CI machine starts raylets slowly
    head = cluster.head_node
    _send(replies, {"address": cluster.address, "dashboard_url": f"http://{head.webui_url}",
                    "head": head.node_id, "workers": list(nodes)})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            try:
                _send(replies, _handle(cluster, nodes, command))
            except Exception as exc:  # reported to the parent, which raises it in the test
                _send(replies, {"error": f"{type(exc).__name__}: {exc}"})
    finally:
        cluster.shutdown()


def _handle(cluster, nodes: dict, command: dict) -> dict:
    op = command["op"]
    if op == "remove":
        cluster.remove_node(nodes.pop(command["node_id"]), allow_graceful=False)
        return {"removed": command["node_id"]}
    if op == "add":
        node = cluster.add_node(**command["args"])
        nodes[node.node_id] = node
        return {"node_id": node.node_id}
    if op == "actors":
        table = cluster.global_state.actor_table(None, actor_state_name="ALIVE")
        mine = {actor_id: a for actor_id, a in table.items() if a["ActorClassName"] == command["class_name"]}
        return {"actors": {actor_id: a["Address"]["NodeID"] for actor_id, a in mine.items()},
                "pids": [a["Pid"] for a in mine.values()]}
    raise ValueError(f"unknown command {op!r}")


def _send(replies: TextIO, message: dict) -> None:
    replies.write(json.dumps(message) + "\n")
    replies.flush()


if __name__ == "__main__":
    # Replies keep the real stdout; anything else printed here (Ray's own messages) goes to stderr.
    reply_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _serve(json.loads(sys.argv[1]), reply_stream)
