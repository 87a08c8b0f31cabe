"""The README's pictures under docs/img/, from what `make demo` wrote.

    make demo
    .venv/bin/python tools/readme_images.py            # reads demo_out/

Writes docs/img/demo_curves.png (the demo run's curves.png), demo_best.png (the evaluation's
contact sheet of its best held-out images) and serve_page.png: the masking service's page (``python
jobs/serve.py`` with the demo's best checkpoint) in headless Chromium after one of the sample's
held-out images was dropped on it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from basnet.data.sample import generate_sample  # noqa: E402
from basnet.ray_init import free_port  # noqa: E402
from basnet.train.curves import CURVES_FILE, HISTORY_FILE  # noqa: E402


def serve_page(weights: str, out: Path, image: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), "--weights", weights, "--port",
                             str(port)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        if not proc.stdout.readline().startswith("serving"):
            raise SystemExit("the service did not start")
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 600})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("!document.getElementById('info').textContent.startsWith('loading')")
            page.set_input_files("#file", str(image))
            page.wait_for_function("['mask', 'cutout'].every(id => document.getElementById(id).naturalWidth > 0)",
                                   timeout=120_000)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    print(f"wrote {out}")


def best_checkpoint(run: Path) -> str:
    """The kept checkpoint with the lowest validation MAE, from the run's history."""
    history = json.loads((run / HISTORY_FILE).read_text())
    kept = [r for r in history if (run / f"epoch_{r['epoch']:04d}").is_dir()]
    return str(run / f"epoch_{min(kept, key=lambda r: r['val_mae'])['epoch']:04d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=str(REPO / "demo_out"), help="what make demo wrote")
    parser.add_argument("--out", default=str(REPO / "docs" / "img"))
    args = parser.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = demo / "runs" / "demo"
    for source, name in ((run / CURVES_FILE, "demo_curves.png"), (demo / "eval" / "best.png", "demo_best.png")):
        shutil.copyfile(source, out / name)
        print(f"wrote {out / name}")
    sample = Path(generate_sample(tempfile.mkdtemp()))  # the demo's own sample: its held-out images
    image = sorted((sample / "DUTS-TE" / "DUTS-TE-Image").iterdir())[1]
    serve_page(best_checkpoint(run), out / "serve_page.png", image)


if __name__ == "__main__":
    main()
