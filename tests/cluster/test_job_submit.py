"""The README's local-cluster path: `ray start --head`, a job client that must carry the head's
token, and the head stopped afterwards. (`ray job submit --working-dir .` of jobs/train.py, with
`ray job status` and `ray job logs`, is tests/cluster/test_node_loss.py's training test, against
a multi-node cluster.)

The head is this test's own: its own ports, temporary folder and authentication token (Ray
enables token authentication on local clusters, so every client call carries
``RAY_AUTH_MODE=token`` and the token's path). It runs as ``ray start --head --block`` and is
stopped by terminating that process: `ray stop` would stop every Ray instance on the machine,
the test session's own included.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from basnet.ray_init import free_ports

from local_cluster import RAY, cluster_env, ray_cli

READY = "Ray runtime started"


def _await_line(proc: subprocess.Popen, marker: str) -> None:
    """Reads the process's output until ``marker`` shows up (then keeps draining it in the
    background, so the pipe never fills); fails if the process exits first."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return
    raise RuntimeError("`ray start --head` exited before the head was up:\n" + "".join(seen[-30:]))


def _await_http(url: str, timeout_s: float = 120) -> None:
    """The dashboard (the job server) answers HTTP a moment after the node reports it started."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer, even "unauthorized", means the server is up
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # polling a socket that has no event to await


def _stop(proc: subprocess.Popen, root: str) -> None:
    proc.terminate()  # `ray start --block` tears its node down on SIGTERM
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if root in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes of the test head still running: {left}"


@pytest.fixture
def head():
    """A one-node Ray cluster started with `ray start --head`; yields (client env, dashboard URL)."""
    from ray._private.services import get_node_ip_address

    root = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's Unix sockets live under it
    env = cluster_env(root)
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
    cmd = [RAY, "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(runtime_env), "--num-cpus", "2", "--disable-usage-stats"]
    # Every process of the head inherits RAY_ADDRESS, so Ray's own State API calls from its
    # actors find this cluster even when others run on the machine.
    head_env = dict(env, RAY_ADDRESS=f"{get_node_ip_address()}:{gcs}")
    proc = subprocess.Popen(cmd, env=head_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _await_line(proc, READY)
        url = f"http://127.0.0.1:{dashboard}"
        _await_http(url + "/api/version")
        yield env, url
    finally:
        _stop(proc, root)
        shutil.rmtree(root, ignore_errors=True)


def test_job_client_without_the_token_is_refused(head):
    env, url = head
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    refused = ray_cli(bare, "job", "list", "--address", url)
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr

    allowed = ray_cli(env, "job", "list", "--address", url)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
