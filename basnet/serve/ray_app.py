"""The masking service on Ray Serve: the ``Masker`` deployment, its application builder, the job's start.

One replica holds one model. A request is read, checked and decoded on its own (``basnet.serve.http``,
in a thread, so the event loop keeps taking requests); only decoded images join a batch
(``@serve.batch``), which runs in the replica's one model thread; the raw map comes back to its
request, which finishes it as its options say and takes its quality figures (``basnet.quality.finish``:
the answer's ``X-Mask-Confidence`` and ``X-Mask-No-Object`` headers, the bulk job's manifest figures),
then renders it at the image's original size exactly as the bulk job does
(``basnet.imaging.render_output``). Out of memory halves
the batch (``MaskPredictor``); a model that fails three batches in a row fails its health check and
Serve replaces the replica.

``build_app(args)`` is the application builder ``serve run`` / ``serve deploy`` call with the
``args`` of configs/serve.yaml; ``serve_forever(cfg)`` is ``jobs/serve.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from basnet.config import from_dict, option_type
from basnet.errors import UsageError
from basnet.imaging import FORMATS, REFINES, default_refine, render_output
from basnet.infer.config import cpu_batch_size
from basnet.quality import NORMALIZES, ON_NO_OBJECT, finish
from basnet.serve.config import ServeConfig
from basnet.serve.http import RequestError, decode_upload, error_json, mask_options, read_upload

logger = logging.getLogger(__name__)

__all__ = ["Masker", "build_app", "serve_forever", "DEPLOYMENT"]

DEPLOYMENT = "Masker"
PAGE = Path(__file__).with_name("page.html")
GPU_BATCH = 8  # --max-batch-size's default on GPUs
MODEL_FAILURES = 3  # batches failing in a row before the replica reports itself unhealthy
_FORM_SLACK = 64 * 1024  # a multipart form's own bytes around the file


def _json(status: int, payload: dict, **headers: str) -> Response:
    return Response(json.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _answer(raw: np.ndarray, upload, options, max_pixels: int) -> tuple[bytes, dict]:
    """An answer's PNG and its quality figures: the raw map finished as the request's options say
    (``basnet.quality.finish``, as the bulk job's write stage does), then rendered at the upload's size."""
    prob, quality = finish(raw, normalize=options.normalize, on_no_object=options.on_no_object)
    png = render_output(prob, upload.height, upload.width, fmt=options.format, threshold=options.threshold,
                        source=upload.data, max_pixels=max_pixels, refine=options.refine)
    return png, quality


def _error(exc: RequestError) -> Response:
    return Response(error_json(exc.message), status_code=exc.status, media_type="application/json")


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Masker:
    """A Serve replica: the HTTP routes and the batched model."""

    def __init__(self, config: dict) -> None:
        import torch

        from basnet.checkpoint import load_for_inference
        from basnet.infer.predictor import MaskPredictor

        self.cfg = cfg = ServeConfig(**config)
        assigned = ray.get_runtime_context().get_assigned_resources()
        use_gpu = assigned.get("GPU", 0) > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.threads = torch.get_num_threads()
        if not use_gpu:  # Ray sets OMP_NUM_THREADS=1 in workers: the replica's CPUs are its threads
            self.threads = max(1, int(assigned.get("CPU", 1)))
            torch.set_num_threads(self.threads)
        model, self.size = load_for_inference(cfg.weights, cfg.image_size)
        self.predictor = MaskPredictor(model.state_dict(), device=self.device,
                                       precision=cfg.precision, channels_last=cfg.channels_last,
                                       compile=cfg.compile, image_size=self.size)
        self.page = PAGE.read_bytes()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="basnet-model")
        self.max_batch_size = cfg.max_batch_size or (GPU_BATCH if use_gpu else cpu_batch_size(self.size))
        self.predict.set_max_batch_size(self.max_batch_size)
        self.predict.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
        self.stats = {"requests": 0, "masks": 0, "refused": 0, "batches": 0, "largest_batch": 0, "no_object": 0,
                      "confidence_deciles": [0] * 10}  # masks answered, by confidence: [0, 0.1), ... [0.9, 1]
        self.failures_in_a_row, self.last_failure = 0, ""
        self.started = time.time()

    # --- the model -------------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Maps at the model's side for a batch of decoded images (one model call in the model thread)."""
        from basnet.infer.predictor import ModelError

        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(images))
        try:
            maps = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, self.predictor.predict_raw, np.stack(images))
        except ModelError as exc:
            self.failures_in_a_row, self.last_failure = self.failures_in_a_row + 1, str(exc)
            raise
        self.failures_in_a_row = 0
        return list(maps)

    def check_health(self) -> None:
        """Serve's health check: a model that keeps failing gets its replica replaced."""
        if self.failures_in_a_row >= MODEL_FAILURES:
            raise RuntimeError(f"the model failed {self.failures_in_a_row} batches in a row: {self.last_failure}")

    # --- HTTP ------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        path, method = self._path(request), request.method
        routes = {"/": self._page, "/healthz": self._healthz, "/info": self._info, "/mask": self._mask}
        if path not in routes:
            return _json(404, {"error": f"no route {path}: use POST /mask, GET /info, GET /healthz or GET /"})
        allowed = "POST" if path == "/mask" else "GET"
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            return _json(405, {"error": f"{path} takes {allowed}, not {method}"}, Allow=allowed)
        return await routes[path](request)

    @staticmethod
    def _path(request: Request) -> str:
        path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return "/" + path.strip("/")

    async def _page(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def _healthz(self, request: Request) -> Response:
        healthy = self.failures_in_a_row < MODEL_FAILURES
        return _json(200 if healthy else 503, {"status": "ok" if healthy else "model failing"})

    async def _info(self, request: Request) -> Response:
        cfg = self.cfg
        device = str(self.device)
        if self.device.type == "cuda":
            import torch

            device += f" ({torch.cuda.get_device_name(self.device)})"
        return _json(200, {
            "weights": cfg.weights, "image_size": self.size, "precision": self.predictor.precision.name,
            "device": device, "threads": self.threads, "replicas": await self._replicas(),
            "max_batch_size": self.max_batch_size, "batch_wait_ms": cfg.batch_wait_ms, "formats": list(FORMATS),
            "default_format": cfg.format, "default_threshold": cfg.threshold, "refines": list(REFINES),
            "default_refine": {f: cfg.refine or default_refine(f) for f in FORMATS}, "normalizes": list(NORMALIZES),
            "default_normalize": cfg.normalize, "on_no_object": list(ON_NO_OBJECT),
            "default_on_no_object": cfg.on_no_object, "max_bytes": cfg.max_bytes,
            "max_pixels": cfg.max_pixels,
            "replica": {"pid": os.getpid(), "rss_bytes": _rss_bytes(), "uptime_s": round(time.time() - self.started, 1),
                        **self.stats},
        })

    async def _replicas(self) -> int | None:
        """Running replicas of this deployment, as the Serve controller counts them."""
        def count() -> int | None:
            context = serve.get_replica_context()
            app = serve.status().applications[context.app_name]
            return app.deployments[context.deployment].replica_states.get("RUNNING")

        try:
            return await asyncio.to_thread(count)
        except Exception as exc:  # informative only: never fail /info over it
            logger.debug("cannot count replicas: %s", exc)
            return None

    async def _mask(self, request: Request) -> Response:
        from basnet.infer.predictor import ModelError

        self.stats["requests"] += 1
        try:
            options = mask_options(request.query_params, default_format=self.cfg.format,
                                   default_threshold=self.cfg.threshold, default_refine=self.cfg.refine,
                                   default_normalize=self.cfg.normalize, default_on_no_object=self.cfg.on_no_object)
            content_type = request.headers.get("content-type", "")
            body = await self._body(request, multipart=content_type.lower().startswith("multipart/"))
            data, filename = await asyncio.to_thread(read_upload, body, content_type)  # a form's parse can be slow
            if len(data) > self.cfg.max_bytes:
                raise RequestError(413, f"the image is {len(data)} bytes, above --max-bytes {self.cfg.max_bytes}")
            upload = await asyncio.to_thread(decode_upload, data, size=self.size, max_pixels=self.cfg.max_pixels,
                                             reduced=not self.cfg.full_decode, filename=filename)
            raw = await self.predict(upload.image)
            png, quality = await asyncio.to_thread(_answer, raw, upload, options, self.cfg.max_pixels)
        except RequestError as exc:
            self.stats["refused"] += 1
            return _error(exc)
        except ModelError as exc:
            return _json(503, {"error": f"the model failed on this batch: {exc}"})
        self.stats["masks"] += 1
        self.stats["no_object"] += bool(quality["no_object"])
        self.stats["confidence_deciles"][min(9, int(quality["confidence"] * 10))] += 1
        stem = Path(upload.filename).stem or "mask"
        name = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in stem)[:100]  # Latin-1 header
        return Response(png, media_type="image/png", headers={
            "Content-Disposition": f'inline; filename="{name}.{options.format}.png"',
            "X-Image-Size": f"{upload.width}x{upload.height}",
            # the manifest's figures, exactly (repr: the shortest text that reads back as the same float)
            "X-Mask-Confidence": repr(float(quality["confidence"])),
            "X-Mask-No-Object": "true" if quality["no_object"] else "false"})

    async def _body(self, request: Request, *, multipart: bool) -> bytes:
        """The body, refused (413) as soon as it passes the limit (a form gets room for its own bytes)."""
        limit = self.cfg.max_bytes + (_FORM_SLACK if multipart else 0)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the body is {declared} bytes, above --max-bytes {self.cfg.max_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over --max-bytes {self.cfg.max_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)


def _deployment_options(cfg: ServeConfig) -> dict:
    """Replicas, resources and queue bounds from the options (a Serve config file's ``deployments``
    entry overrides any of them)."""
    replicas = cfg.replicas()
    gpus = cfg.num_gpus_per_replica or 0.0
    cpus = cfg.num_cpus_per_replica or 1.0
    batch = cfg.max_batch_size or GPU_BATCH  # the largest a replica picks by itself
    options = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
               # room for one batch running and the next one forming
               "max_ongoing_requests": max(2 * batch, 4),
               "health_check_period_s": 10}
    if replicas == "auto":
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 100,
                                         "target_ongoing_requests": max(2, batch)}
    else:
        options["num_replicas"] = replicas
    return options


def build_app(args: dict) -> serve.Application:
    """The application builder of ``serve run basnet.serve.ray_app:build_app weights=...`` and of
    configs/serve.yaml: ``args`` are ``ServeConfig``'s options (strings from the command line are
    converted as the flags convert them)."""
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    values = {k: _coerce(fields[k], v) if k in fields else v for k, v in args.items()}
    cfg = from_dict(ServeConfig, values, source="the application's args")  # refuses unknown keys
    ignored = [k for k in ("host", "port", "address") if k in args]
    if ignored:
        raise UsageError(f"{ignored[0]} is not an application arg: set http_options (host, port) in the Serve "
                         "config file, and the cluster with --address")
    cfg.check()
    if ray.is_initialized():  # `serve run` and `serve deploy` build where Ray is up: size from the cluster
        cfg = resolve_resources(cfg)
    return _deployment(cfg)


def _coerce(field: dataclasses.Field, value):
    """``serve run ... key=value`` passes strings; numbers and booleans are converted as the flags do."""
    kind = option_type(ServeConfig, field)
    if not isinstance(value, str) or kind is str:
        return value
    if kind is bool:
        return value.strip().lower() in ("1", "true", "yes", "on")
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{field.name}={value!r} is not a {kind.__name__}") from None


def _logging(cfg: ServeConfig) -> dict:
    return {"log_level": "INFO" if cfg.verbose else "WARNING"}


def _deployment(cfg: ServeConfig) -> serve.Application:
    deployment = serve.deployment(Masker, name=DEPLOYMENT).options(**_deployment_options(cfg),
                                                                   logging_config=_logging(cfg))
    return deployment.bind(cfg.to_dict())


def resolve_resources(cfg: ServeConfig) -> ServeConfig:
    """GPUs and CPUs per replica from the cluster: one GPU each where there are GPUs; else a node's CPUs
    shared among the replicas (at least one each). A cluster that cannot hold the replicas is refused
    here, in one line, instead of Serve waiting forever for them."""
    total = ray.cluster_resources()
    gpus = cfg.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) >= 1 else 0.0
    replicas = cfg.replicas()
    first = 1 if replicas == "auto" else replicas  # autoscaling starts from one and adds nodes
    cpus = cfg.num_cpus_per_replica
    if cpus is None:
        node_cpus = min((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"]), default=1)
        cpus = 1.0 if gpus else float(max(1, int(node_cpus // first)))
    for name, each, flag in (("GPU", gpus, "--num-gpus-per-replica"), ("CPU", cpus, "--num-cpus-per-replica")):
        if each and first * each > total.get(name, 0):
            raise UsageError(f"{first} replica(s) x {each:g} {name} need more than the cluster's "
                             f"{total.get(name, 0):g} {name}: lower {flag} or --num-replicas")
    return dataclasses.replace(cfg, num_gpus_per_replica=gpus, num_cpus_per_replica=cpus)


def serve_forever(cfg: ServeConfig, *, ready: threading.Event | None = None,
                  stop: threading.Event | None = None) -> str:
    """Deploys the service on the Ray this process joined, prints its URL and serves until ``stop``
    (or Ctrl-C); returns the URL. Serve's HTTP proxy listens on ``--host``:``--port``."""
    cfg = resolve_resources(cfg)
    if not cfg.verbose:  # Serve's controller, proxy and replicas log every deployment step at INFO
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=_logging(cfg))
    serve.run(_deployment(cfg), name=cfg.name, route_prefix="/")
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{shown}:{cfg.port}/"
    print(f"serving {cfg.weights} at {url} ({cfg.replicas()} replica(s), {cfg.num_cpus_per_replica:g} CPU and "
          f"{cfg.num_gpus_per_replica:g} GPU each); POST {url}mask, page at {url}; Ctrl-C stops", flush=True)
    if ready is not None:
        ready.set()
    try:
        (stop or threading.Event()).wait()
    except KeyboardInterrupt:
        pass
    print("stopping", flush=True)
    serve.delete(cfg.name)
    return url
