"""Serve BASNet masks over HTTP on Ray Serve: POST an image, get its mask as a PNG.

    python jobs/serve.py --weights runs/basnet/epoch_0100                # http://127.0.0.1:8000/
    curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/mask?format=rgba' -o cut.png
    serve run configs/serve.yaml                                            # the same app from a config file
    ray job submit --working-dir . -- python jobs/serve.py --weights s3://bucket/basnet.pth --host 0.0.0.0

Routes: POST /mask (the image as the body or as a multipart form's 'file'; ?format=mask|binary|rgba,
?threshold=), GET /info, GET /healthz, and GET / (a web page). Errors are JSON {"error": ...} with
status 400, 413 or 415. Serves until Ctrl-C (or SIGTERM), then removes the application.

Exit status: 0 after Ctrl-C; 2 for bad arguments (before Ray starts).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basnet.config import parse_config  # noqa: E402
from basnet.console import setup_logging  # noqa: E402
from basnet.errors import UsageError, main_guard  # noqa: E402
from basnet.ray_init import init_ray  # noqa: E402
from basnet.serve.config import ServeConfig  # noqa: E402


def _check_port_free(host: str, port: int) -> None:
    """With a local Ray the proxy listens here: a port already taken fails now, in one line."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}): pick a free --port or "
                             "another --host") from None


def _stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@main_guard
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv, __doc__.splitlines()[0])
    setup_logging(cfg.verbose)
    cfg.check()  # every argument error surfaces here, before Ray starts
    if not (cfg.address or os.environ.get("RAY_ADDRESS")):
        _check_port_free(cfg.host, cfg.port)
    init_ray(cfg.address, verbose=cfg.verbose)
    from basnet.serve.ray_app import serve_forever

    _stop_on_sigterm()
    serve_forever(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
