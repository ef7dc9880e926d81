"""The Ray Serve application: an HTTP front (FastAPI ingress) and a pipeline deployment of warm replicas.

    client --HTTP--> Ray Serve proxy --> Front (checks, auth, retry) --handle--> Pipeline replicas (batching, GPU)

The front turns each HTTP request into a ``GenerationRequest`` with a fixed seed, checked by the Python API's rules
against the served model's facts and the server's limits (``requests.py``), and calls the pipeline deployment
through a handle. Ray Serve's router keeps each replica's queue bounded
(``max_ongoing_requests``) and the callers' queue too (``max_queued_requests``); beyond them the front answers 503
with ``Retry-After``. When a replica dies mid-request, the controller starts a new one and the front retries the
request once on another replica, with the same seed, so the client gets the same image or a clear error.

Each replica owns one GPU (``num_gpus=1``) where the cluster has GPUs, else CPU cores, loads the model and the
offered ControlNets once and draws a warm-up image at batch 1 and at its largest batch (and one more through every
ControlNet) before Ray Serve sends it traffic.
"""

import asyncio
import base64
import copy
import dataclasses
import hmac
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from ..backends import control_options
from ..control import Control
from ..request import ModelFacts
from . import controlnets
from .batching import Cancelled, Generated, engine_max_batch, generate_batch, pipeline_limits
from .loras import LoRACache, listing
from .options import ServeOptions, is_loopback
from .requests import GenerationRequest, RequestError, body_schema, parse_request

APP_NAME = "sdfast"
MAX_BATCH_QUEUES = 64  # distinct shapes with their own batch queue per replica; further shapes run unbatched


@dataclasses.dataclass
class Job:
    """A request on a replica, with what tells the device thread that no one waits for it any more."""

    request: GenerationRequest
    deadline: float | None  # time.time() past which the caller has given up
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def dropped(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.time() > self.deadline)


class PipelineReplica:
    """One model on one device. Requests with the same ``batch_key`` share a ``@serve.batch`` queue of their own,
    so a shape never waits for another shape's batch to fill; all of them take turns on the one device thread."""

    def __init__(self, options: dict):
        import torch

        import sdfast

        opts = ServeOptions(**options)
        cuda = torch.cuda.is_available()
        if not cuda:
            torch.set_num_threads(max(1, int(opts.cpus_per_replica)))
        self.pipe = sdfast.load(opts.model, device="cuda" if cuda else "cpu",
                                dtype=opts.dtype or ("fp16" if cuda else "fp32"), backend=opts.backend,
                                **control_options(opts.backend, opts.controlnet_dir is not None))
        self.size = (self.pipe.default_size, self.pipe.default_size)
        self.loras = LoRACache(self.pipe, listing(opts.lora_dir), opts.max_loaded_loras)
        for name, path in controlnets.listing(opts.controlnet_dir, opts.max_controlnets).items():
            self.pipe.controlnets.load(path, name)  # all of them, now: see sdfast.serve.controlnets
        self.max_batch = min(opts.max_batch, engine_max_batch(self.pipe) or opts.max_batch)
        self.limits = pipeline_limits(opts.limits, self.max_batch)
        self.batch_wait_s = opts.batch_wait_s
        self.device = ThreadPoolExecutor(1, thread_name_prefix="sdfast-device")  # one call on the device at a time
        self.queues: dict[tuple, object] = {}
        self.where = {"replica": serve.get_replica_context().replica_id.to_full_id_str(),  # its actor name
                      "node": ray.get_runtime_context().get_node_id()}
        grey = Image.new("RGB", self.size, (128, 128, 128))
        every = tuple(Control(name, grey) for name in self.pipe.controlnets.names)
        for n in sorted({1, self.max_batch}):  # engines, kernels and allocator warm for both batch sizes
            for controls in [()] + [every] * bool(every):  # and each ControlNet (compile compiles it at first use)
                warm = GenerationRequest("warm-up", "", opts.warmup_steps, 7.5, *self.size, 0, "euler", n, "json",
                                         controls=controls)
                generate_batch(self.pipe, [warm], limits=self.limits)

    def info(self) -> dict:
        """What the front shows clients (/v1/models) and, in ``facts``, what it checks their requests against."""
        return {"width": self.size[0], "height": self.size[1], "max_batch": self.max_batch,
                "device": str(self.pipe.device), "dtype": str(self.pipe.dtype).removeprefix("torch."),
                "facts": dataclasses.asdict(self.pipe.facts), "loras": sorted(self.loras.files),
                "controlnets": sorted(self.pipe.controlnets.names)}

    async def generate(self, request: GenerationRequest, deadline: float | None = None) -> dict:
        """``deadline`` (``time.time()``): when the caller stops waiting. Past it, or once the caller cancels
        (a timeout, a client gone), the device drops this request within a step."""
        start = time.perf_counter()
        job = Job(request, deadline)
        key = request.batch_key()
        try:
            if key is None or request.n >= self.max_batch or (key not in self.queues and
                                                               len(self.queues) >= MAX_BATCH_QUEUES):
                result = (await self._run([job]))[0]
            else:
                if key not in self.queues:
                    self.queues[key] = serve.batch(max_batch_size=self.max_batch,
                                                   batch_wait_timeout_s=self.batch_wait_s,
                                                   batch_size_fn=lambda jobs: sum(j.request.n for j in jobs))(self._run)
                result = await self.queues[key](job)
        except asyncio.CancelledError:  # the caller's cancel; the device thread reads the flag after each step
            job.cancelled.set()
            raise
        timings = {**result.timings, "replica_ms": (time.perf_counter() - start) * 1e3}
        return {"pngs": result.pngs, "seed": result.seed, "timings": timings, "batch_images": result.batch_images,
                **self.where}

    async def _run(self, jobs: list[Job]) -> list[Generated]:
        """One call on the device; it stops early once every job in it is dropped (batch-mates still waiting keep
        it going)."""
        def stop() -> bool:
            return all(job.dropped() for job in jobs)

        def call() -> list[Generated]:
            requests = [job.request for job in jobs]
            self.loras.ensure(name for name, _ in requests[0].loras)  # a batch shares one LoRA set
            return generate_batch(self.pipe, requests, stop, self.limits)

        return await asyncio.get_running_loop().run_in_executor(self.device, call)


# Defined before Front: serve.ingress captures the names the routes use when the class is made.
async def _awaited(response):
    return await response


def _error(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"error": message}, status, headers=headers)


# No /docs or /redoc: those pages fetch the schema without the API key (and their scripts from a CDN); the schema is
# at /openapi.json behind the key.
api = FastAPI(title="sdfast", description="Stable Diffusion on Ray Serve: POST /v1/txt2img, /v1/img2img",
              docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(api)
class Front:
    """HTTP in, checked requests out; errors become one-line JSON messages with the right status."""

    def __init__(self, pipeline, options: dict, model_id: str):
        self.pipeline = pipeline
        self.options = ServeOptions(**options)
        self.model_id = model_id
        self._info: dict | None = None
        self._info_lock = asyncio.Lock()  # a burst on a new front asks the replicas once, not once per request

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        schema = copy.deepcopy(request.app.openapi())  # FastAPI's, cached: each front adds the bodies at its limits
        for kind in ("txt2img", "img2img"):
            schema["paths"][f"/v1/{kind}"]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": body_schema(kind, self.options.limits)}}}
        return schema

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            info = await self._model_info()
        except RequestError as e:
            return _error(e.status, str(e), self.options.retry_after_s)
        shown = {key: value for key, value in info.items() if key != "facts"}
        return {"data": [{"id": self.model_id, "backend": self.options.backend, **shown,
                          "limits": dataclasses.asdict(self.options.limits)}]}

    @api.post("/v1/txt2img")
    async def txt2img(self, request: Request):
        return await self._generate("txt2img", request)

    @api.post("/v1/img2img")
    async def img2img(self, request: Request):
        return await self._generate("img2img", request)

    async def _generate(self, kind: str, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = await self._body(request)
            info = await self._model_info()
            req = parse_request(body, kind, self.options.limits, self.model_id, ModelFacts(**info["facts"]),
                                frozenset(info["loras"]), frozenset(info["controlnets"]))
        except RequestError as e:
            return _error(e.status, str(e), self.options.retry_after_s if e.status == 503 else None)
        for attempt in (1, 2):
            response = self.pipeline.generate.remote(req, time.time() + self.options.request_timeout_s)
            try:
                result = await asyncio.wait_for(_awaited(response), self.options.request_timeout_s)
                break
            except BackPressureError:
                return _error(503, "every replica is busy and the queue is full (max_queued_requests="
                                   f"{self.options.max_queued_requests}): retry later", self.options.retry_after_s)
            except asyncio.TimeoutError:
                response.cancel()
                return _error(504, f"no answer within request_timeout_s={self.options.request_timeout_s}: "
                                   "the servers are overloaded or the request is too large")
            except (RayActorError, ReplicaUnavailableError, RayTaskError) as e:
                cause = e.cause if isinstance(e, RayTaskError) else e
                if isinstance(cause, Cancelled):  # the replica's clock passed the deadline before ours did
                    return _error(504, f"no answer within request_timeout_s={self.options.request_timeout_s}: "
                                       "the servers are overloaded or the request is too large")
                if not isinstance(cause, (RayActorError, ReplicaUnavailableError)):
                    # the pipeline refused the request (e.g. a shape no engine covers) or failed on it
                    status = 422 if isinstance(cause, ValueError) else 500
                    return _error(status, str(cause).strip().splitlines()[-1])
                if attempt == 2:  # the replica died; the controller is replacing it
                    return _error(503, "the request failed on two replicas that died while serving it: retry "
                                       "later", self.options.retry_after_s)
        if req.output == "png":
            return Response(result["pngs"][0], media_type="image/png",
                            headers={"X-Seed": str(result["seed"]), "X-Batch-Images": str(result["batch_images"])})
        return {"images": [base64.b64encode(p).decode() for p in result["pngs"]], "seed": result["seed"],
                "timings": result["timings"], "batch_images": result["batch_images"], "attempts": attempt,
                "replica": result["replica"], "node": result["node"]}

    def _denied(self, request: Request) -> JSONResponse | None:
        """Without an API key only loopback clients are answered (also when a config bound a public address)."""
        key = self.options.api_key
        if key is None:
            client = request.client.host if request.client else ""
            if client and not is_loopback(client):
                return _error(403, "this server has no API key, so it answers loopback clients only: start it "
                                   "with $SDFAST_API_KEY set")
            return None
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {key}".encode()):
            return JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer KEY'"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _model_info(self) -> dict:
        """The replicas' model (its facts check requests; its own size fills a side a request leaves out), asked
        once; a 503 while no replica can answer."""
        async with self._info_lock:
            if self._info is None:
                try:
                    self._info = await asyncio.wait_for(_awaited(self.pipeline.info.remote()),
                                                        self.options.request_timeout_s)
                except (BackPressureError, asyncio.TimeoutError, RayActorError, ReplicaUnavailableError,
                        RayTaskError):
                    raise RequestError(503, "no replica could describe the model yet (starting, busy or "
                                            "replaced): retry later") from None
        return self._info

    async def _body(self, request: Request) -> bytes:
        """The body, read no further than the size limit (so an oversized upload is never held in memory)."""
        limit = self.options.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body of {declared} bytes is over the limit max_body_bytes={limit}: "
                                    "send a smaller image")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over the limit max_body_bytes={limit}: send a smaller "
                                        "image")
            chunks.append(chunk)
        return b"".join(chunks)


def model_id(model: str | None) -> str:
    """The name clients see: the model's file or folder name, never its path on the server."""
    return "default" if model is None else Path(model).name


def build_app(options: ServeOptions):
    """The bound application; where the cluster has GPUs (``gpus="auto"``), each pipeline replica takes one."""
    gpu = options.gpus == "1" or (options.gpus == "auto" and ray.is_initialized()
                                  and ray.cluster_resources().get("GPU", 0) >= 1)
    actor = {"num_gpus": 1} if gpu else {"num_cpus": options.cpus_per_replica}
    pipeline = serve.deployment(PipelineReplica).options(
        name="Pipeline", num_replicas=options.replicas, ray_actor_options=actor,
        max_ongoing_requests=options.max_ongoing_requests, max_queued_requests=options.max_queued_requests,
        graceful_shutdown_timeout_s=options.request_timeout_s,  # drain: in-flight requests finish first
        graceful_shutdown_wait_loop_s=0.5)
    capacity = options.replicas * (options.max_ongoing_requests + options.max_queued_requests)
    front = serve.deployment(Front).options(
        name="Front", num_replicas=1, ray_actor_options={"num_cpus": 0},
        # Room for every request the pipeline may hold and more: the front answers the excess 503 itself, with
        # a message; the proxy's own 503 (also with Retry-After) is the last resort.
        max_ongoing_requests=capacity + 64, max_queued_requests=capacity + 64,
        backpressure_config=BackpressureConfig(retry_after_s=options.retry_after_s),
        graceful_shutdown_timeout_s=options.request_timeout_s)
    opts = options.to_dict()
    return front.bind(pipeline.bind(opts), opts, model_id(options.model))


def app_builder(args: dict):
    """For ``serve run`` / ``serve deploy`` configs: ``import_path: sdfast.serve.app:app_builder`` with ``args``
    holding ``ServeOptions`` fields (see deploy/serve_config.yaml)."""
    return build_app(ServeOptions.from_dict(args))


def start(options: ServeOptions, address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (default: start a private local one, never a stray cluster found on
    this machine) and run the application on it; returns once every replica is warm. The HTTP proxy runs on the
    head node only: one endpoint, and nodes sharing one machine do not fight over its port."""
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False, logging_level="warning")
    serve.start(proxy_location="HeadOnly", http_options={"host": options.host, "port": options.port})
    serve.run(build_app(options), name=APP_NAME, route_prefix="/")
