"""How bulk masking starts on a huge collection: seconds to the first mask, and the driver's memory.

    python bench/plan_scale.py --n 100000
    python bench/plan_scale.py --n 1000000 --watch 60

Builds ``--n`` loose JPEGs (hard links to 64 small files, 1000 a folder; kept under ``--root`` for the
next run), then runs ``jobs/infer.py`` as a user would (its own local Ray, the model at 32 px,
random weights) and measures, in one run:

* the seconds from starting the job to its first mask on disk;
* the driver process's peak resident memory, sampled every 0.1 s until ``--watch`` seconds after
  the first mask (the run is then stopped: masking a million images on 2 CPUs takes hours);
* the masks written by then;
* ``--dry-run``'s wall time to the counts.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PER_FOLDER = 1000
SOURCES = 64


def build_tree(root: str, n: int) -> str:
    """``n`` hard links to 64 small JPEGs in folders of 1000 (ext4 allows 65,000 links to a
    file); reused when already complete."""
    from PIL import Image

    import numpy as np

    tree = os.path.join(root, f"n{n}")
    done = os.path.join(tree, ".complete")
    if os.path.exists(done):
        return tree
    os.makedirs(tree, exist_ok=True)
    sources = []
    for i in range(SOURCES):
        path = os.path.join(root, f"source{i}.jpg")
        if not os.path.exists(path):
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path, quality=90)
        sources.append(path)
    start = time.perf_counter()
    for f in range((n + PER_FOLDER - 1) // PER_FOLDER):
        folder = os.path.join(tree, f"d{f:05d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(f * PER_FOLDER, min(n, (f + 1) * PER_FOLDER)):
            target = os.path.join(folder, f"img{i:07d}.jpg")
            if not os.path.exists(target):
                os.link(sources[i % SOURCES], target)
    open(done, "w").close()
    print(f"built {n} files in {time.perf_counter() - start:.0f} s under {tree}", flush=True)
    return tree


def weights_file(root: str) -> str:
    path = os.path.join(root, "random-basnet.pth")
    if not os.path.exists(path):
        import torch

        from basnet.model import BASNet

        torch.manual_seed(0)
        torch.save(BASNet().state_dict(), path)
    return path


def first_png(folder: str) -> bool:
    """Any mask yet? (the output mirrors folders of 1000, so this looks at few entries)"""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir() and not entry.name.startswith("_"):
                    with os.scandir(entry.path) as inner:
                        if any(e.name.endswith(".png") for e in inner):
                            return True
    except FileNotFoundError:
        pass
    return False


def count_pngs(folder: str) -> int:
    return sum(1 for dirpath, _, files in os.walk(folder) for f in files if f.endswith(".png"))


def run_job(tree: str, out: str, weights: str, watch: float, extra: list[str]) -> dict:
    cmd = [sys.executable, "jobs/infer.py", "--input", tree, "--output", out, "--weights", weights,
           "--image-size", "32", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    driver = psutil.Process(proc.pid)
    peak, first, deadline = 0, None, None
    while proc.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        now = time.perf_counter()
        if first is None and first_png(out):
            first, deadline = now - start, now + watch
        if deadline is not None and now > deadline:
            break
        time.sleep(0.1)  # sampling memory: there is no event to await
    ended = proc.poll() is not None
    if not ended:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = proc.stdout.read()
    return {"seconds": time.perf_counter() - start, "first": first, "peak_mb": peak / 2**20, "ended": ended,
            "output": output}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--root", default="/tmp/basnet-plan-scale")
    parser.add_argument("--watch", type=float, default=30.0, help="seconds to keep running after the first mask")
    args = parser.parse_args(argv)
    os.makedirs(args.root, exist_ok=True)
    tree = build_tree(args.root, args.n)
    weights = weights_file(args.root)
    out = os.path.join(args.root, f"out-{args.n}-{os.getpid()}")

    dry = run_job(tree, out + "-dry", weights, 0, ["--dry-run"])
    dry_line = next((line for line in dry["output"].splitlines() if line.startswith("dry run")), dry["output"][-300:])
    run = run_job(tree, out, weights, args.watch, [])
    written = count_pngs(out)
    print(f"\nn = {args.n} loose 48 px JPEGs in folders of {PER_FOLDER}, model at 32 px, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"  dry run:            {dry['seconds']:.1f} s wall  ({dry_line})")
    print(f"  first mask written: {run['first']:.1f} s after the job started" if run["first"] is not None
          else "  first mask written: never")
    print(f"  driver peak RSS:    {run['peak_mb']:.0f} MB (sampled every 0.1 s for {run['seconds']:.0f} s)")
    print(f"  masks written:      {written} by {run['seconds']:.0f} s "
          f"({'the run ended' if run['ended'] else 'then stopped'})")
    if run["first"] is None:
        print(run["output"][-2000:])
    subprocess.run(["rm", "-rf", out, out + "-dry"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
