"""The Ray Serve application: an HTTP front (FastAPI ingress) and a pipeline deployment of warm replicas.

    client --HTTP--> Ray Serve proxy --> Front (checks, auth, retry) --handle--> Pipeline replicas (batching, GPU)

The front turns each HTTP request into a checked ``GenerationRequest`` (``requests.py``) with a fixed seed, and
calls the pipeline deployment through a handle. Ray Serve's router keeps each replica's queue bounded
(``max_ongoing_requests``) and the callers' queue too (``max_queued_requests``); beyond them the front answers 503
with ``Retry-After``. When a replica dies mid-request, the controller starts a new one and the front retries the
request once on another replica, with the same seed, so the client gets the same image or a clear error.

Each replica owns one GPU (``num_gpus=1``) where the cluster has GPUs, else CPU cores, loads the model once and
draws a warm-up image at batch 1 and at its largest batch before Ray Serve sends it traffic.
"""

import asyncio
import base64
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from .batching import Generated, default_size, engine_max_batch, generate_batch
from .options import ServeOptions, is_loopback
from .requests import GenerationRequest, RequestError, parse_request

APP_NAME = "sdfast"
MAX_BATCH_QUEUES = 64  # distinct shapes with their own batch queue per replica; further shapes run unbatched


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
                                dtype=opts.dtype or ("fp16" if cuda else "fp32"), backend=opts.backend)
        self.size = default_size(self.pipe)
        self.max_batch = min(opts.max_batch, engine_max_batch(self.pipe) or opts.max_batch)
        self.batch_wait_s = opts.batch_wait_s
        self.device = ThreadPoolExecutor(1, thread_name_prefix="sdfast-device")  # one call on the device at a time
        self.queues: dict[tuple, object] = {}
        self.where = {"replica": serve.get_replica_context().replica_id.to_full_id_str(),  # its actor name
                      "node": ray.get_runtime_context().get_node_id()}
        for n in sorted({1, self.max_batch}):  # engines, kernels and allocator warm for both batch sizes
            warm = GenerationRequest("warm-up", "", opts.warmup_steps, 7.5, *self.size, 0, "euler", n, "json")
            generate_batch(self.pipe, [warm])

    def info(self) -> dict:
        return {"width": self.size[0], "height": self.size[1], "max_batch": self.max_batch,
                "device": str(self.pipe.device), "dtype": str(self.pipe.dtype).removeprefix("torch.")}

    async def generate(self, request: GenerationRequest) -> dict:
        start = time.perf_counter()
        if request.image is None:
            request = dataclasses.replace(request, width=request.width or self.size[0],
                                          height=request.height or self.size[1])
        key = request.batch_key()
        if key is None or request.n >= self.max_batch or (key not in self.queues and
                                                           len(self.queues) >= MAX_BATCH_QUEUES):
            result = (await self._run([request]))[0]
        else:
            if key not in self.queues:
                self.queues[key] = serve.batch(max_batch_size=self.max_batch, batch_wait_timeout_s=self.batch_wait_s,
                                               batch_size_fn=lambda rs: sum(r.n for r in rs))(self._run)
            result = await self.queues[key](request)
        timings = {**result.timings, "replica_ms": (time.perf_counter() - start) * 1e3}
        return {"pngs": result.pngs, "seed": result.seed, "timings": timings, "batch_images": result.batch_images,
                **self.where}

    async def _run(self, requests: list[GenerationRequest]) -> list[Generated]:
        return await asyncio.get_running_loop().run_in_executor(self.device, generate_batch, self.pipe, requests)


# Defined before Front: serve.ingress captures the names the routes use when the class is made.
async def _awaited(response):
    return await response


def _error(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"error": message}, status, headers=headers)


api = FastAPI(title="sdfast", description="Stable Diffusion on Ray Serve: POST /v1/txt2img, /v1/img2img")


@serve.ingress(api)
class Front:
    """HTTP in, checked requests out; errors become one-line JSON messages with the right status."""

    def __init__(self, pipeline, options: dict, model_id: str):
        self.pipeline = pipeline
        self.options = ServeOptions(**options)
        self.model_id = model_id
        self._info: dict | None = None

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        if self._info is None:
            self._info = await self.pipeline.info.remote()
        return {"data": [{"id": self.model_id, "backend": self.options.backend, **self._info,
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
            req = parse_request(await self._body(request), kind, self.options.limits, self.model_id)
        except RequestError as e:
            return _error(e.status, str(e))
        for attempt in (1, 2):
            response = self.pipeline.generate.remote(req)
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
        if request.headers.get("authorization", "") != f"Bearer {key}":
            return JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer KEY'"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return None

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
