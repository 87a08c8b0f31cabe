"""Load on the masking service: requests/s and latency with batching on and off, then a memory soak.

    python bench/serve_load.py                      # random weights, 64 and 256 px, C = 1, 8, 32
    python bench/serve_load.py --weights runs/demo/epoch_0003 --sizes 64 --soak 20000

Each configuration starts ``python jobs/serve.py`` as a user would (its own local Ray, 127.0.0.1 only)
and sends a bounded number of requests from C concurrent clients, each on its own keep-alive
connection. Batching on is ``--max-batch-size 8``, off is ``--max-batch-size 1``. The soak sends
``--soak`` requests (64 px, batching on, 8 clients) and prints the replica's resident memory (its
pid from GET /info) after a warm-up and at the end: the goal is under 5 % growth, with every request
answered (200s + errors = sent, and the replica's own mask count agrees).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from basnet.ray_init import free_port  # noqa: E402


def jpeg(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    blob = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    image[blob] = (40, 200, 90)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Service:
    """``jobs/serve.py`` in a subprocess, stopped with Ctrl-C."""

    def __init__(self, weights: str, size: int, batch: int, wait_ms: float) -> None:
        self.port = free_port()
        cmd = [sys.executable, str(REPO / "jobs" / "serve.py"), "--weights", weights, "--port", str(self.port),
               "--image-size", str(size), "--max-batch-size", str(batch), "--batch-wait-ms", str(wait_ms)]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        banner = self.proc.stdout.readline()
        if not banner.startswith("serving"):
            self.proc.kill()
            raise SystemExit(f"the service did not start: {banner!r}")
        self.startup_s = time.perf_counter() - self.started

    def info(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", "/info")
        return json.loads(conn.getresponse().read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=120)


def load(port: int, images: list[bytes], clients: int, requests: int) -> dict:
    """``requests`` POSTs from ``clients`` threads; latencies of the 200s, counts of everything."""
    latencies, statuses, errors, lock = [], {}, [], threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                conn.request("POST", "/mask", body=images[i % len(images)], headers={"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                response.read()
                seconds = time.perf_counter() - start
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if response.status == 200:
                        latencies.append(seconds)
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"sent": requests, "ok": statuses.get(200, 0), "statuses": statuses, "errors": errors,
            "rps": len(latencies) / wall, "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
            "p99": np.percentile(lat, 99), "wall": wall}


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


class RssSampler(threading.Thread):
    """The replica's resident memory every ``every`` seconds, while a soak runs."""

    def __init__(self, pid: int, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.done = pid, every, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.samples.append(rss_mb(self.pid))


def soak(weights: str, n: int, clients: int, wait_ms: float) -> None:
    service = Service(weights, 64, 8, wait_ms)
    try:
        images = [jpeg(64, seed) for seed in range(16)]
        load(service.port, images, clients, 200)  # warm-up: allocator pools, first batches
        info = service.info()["replica"]
        pid, masks_before = info["pid"], info["masks"]
        start_mb = rss_mb(pid)
        sampler = RssSampler(pid)
        sampler.start()
        result = load(service.port, images, clients, n)
        sampler.done.set()
        end = service.info()["replica"]
        end_mb = rss_mb(pid)
    finally:
        service.stop()
    growth = (end_mb / start_mb - 1) * 100
    answered = sum(result["statuses"].values())
    tenths = [sampler.samples[int(i * (len(sampler.samples) - 1) / 9)] for i in range(10)] if sampler.samples else []
    print(f"\nsoak: {n} requests of 64 px from {clients} clients in {result['wall']:.0f} s "
          f"({result['rps']:.1f} req/s, p50 {result['p50']:.0f} ms, p99 {result['p99']:.0f} ms)")
    print(f"  replica RSS after warm-up {start_mb:.0f} MB, at the end {end_mb:.0f} MB: growth {growth:+.2f} % "
          f"(goal under 5 %: {'met' if growth < 5 else 'NOT met'}); during the soak min "
          f"{min(sampler.samples, default=0):.0f}, max {max(sampler.samples, default=0):.0f} MB; by tenths: "
          + " ".join(f"{mb:.0f}" for mb in tenths))
    print(f"  sent {n}, answered {answered} ({result['statuses']}), transport errors {len(result['errors'])}, "
          f"replica masks +{end['masks'] - masks_before} in {end['batches'] - info['batches']} batches, same replica: "
          f"{end['pid'] == pid}; counts add up: "
          f"{answered == n and result['ok'] == end['masks'] - masks_before and not result['errors']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="weights to serve (default: random BASNet weights)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[160, 32],
                        help="requests per configuration, one per size (at least C each)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--soak", type=int, default=5000, help="soak requests (0: no soak)")
    parser.add_argument("--soak-clients", type=int, default=8)
    parser.add_argument("--skip-load", action="store_true", help="the soak only")
    args = parser.parse_args()
    weights = args.weights
    if weights is None:
        import torch

        from basnet.model import BASNet

        weights = str(Path(tempfile.mkdtemp()) / "basnet.pth")
        torch.manual_seed(0)
        torch.save(BASNet().state_dict(), weights)
    rows = []
    per_size = list(zip(args.sizes, args.requests + args.requests[-1:] * len(args.sizes)))
    for size, requests in [] if args.skip_load else per_size:
        images = [jpeg(size, seed) for seed in range(16)]
        for batch in (8, 1):
            service = Service(weights, size, batch, args.batch_wait_ms)
            try:
                load(service.port, images, 2, 8)  # warm-up
                for clients in args.clients:
                    result = load(service.port, images, clients, max(requests, clients))
                    rows.append((size, clients, batch, result))
                    print(f"{size} px C={clients:<3} max batch {batch}: {result['rps']:6.2f} req/s  p50 "
                          f"{result['p50']:7.0f}  p95 {result['p95']:7.0f}  p99 {result['p99']:7.0f} ms  "
                          f"({result['ok']}/{result['sent']} ok, startup {service.startup_s:.1f} s)", flush=True)
            finally:
                service.stop()
    if rows:
        table(args, rows)
    if args.soak:
        soak(weights, args.soak, args.soak_clients, args.batch_wait_ms)


def table(args, rows) -> None:
    print("\n| size | C | req/s on (8) | req/s off (1) | ratio | p50 / p95 / p99 on, ms | p50 / p95 / p99 off, ms |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for clients in args.clients:
            on = next(r for s, c, b, r in rows if (s, c, b) == (size, clients, 8))
            off = next(r for s, c, b, r in rows if (s, c, b) == (size, clients, 1))
            print(f"| {size} px | {clients} | {on['rps']:.2f} | {off['rps']:.2f} | {on['rps'] / off['rps']:.2f}x | "
                  f"{on['p50']:.0f} / {on['p95']:.0f} / {on['p99']:.0f} | "
                  f"{off['p50']:.0f} / {off['p95']:.0f} / {off['p99']:.0f} |")


if __name__ == "__main__":
    main()
