"""Starting a local Ray for a job (basnet/ray_init.py)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import os, psutil
from basnet.ray_init import init_ray
init_ray(num_cpus=1, dashboard=False)
import ray
children = [" ".join(p.cmdline()) for p in psutil.Process(os.getpid()).children(recursive=True)]
print(len(children), sum(c.startswith("ray-dashboard-") for c in children), ray.available_resources().get("CPU"))
"""


def test_a_local_ray_started_without_the_dashboard_runs_none_of_its_module_processes():
    # The masking job starts its Ray so. With the dashboard, each of its modules (ray-dashboard-JobHead,
    # -StateHead, ...) is a process of its own: ten of them, about 1 GB in all (docs/infer.md).
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    processes, dashboards, cpus = proc.stdout.split()
    assert int(processes) >= 2 and int(dashboards) == 0 and float(cpus) == 1.0, proc.stdout
