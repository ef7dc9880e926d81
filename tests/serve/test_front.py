"""The HTTP front without a Ray cluster: FastAPI's TestClient on the front's routes, with a stand-in for the pipeline
deployment's handle. Status codes, JSON errors, the API key and timeouts; what replicas do is in test_app.py."""

import asyncio
import base64
import io
import struct
import time
import zlib
from types import SimpleNamespace

import pytest
from PIL import Image

from sdfast.serve import HAS_SERVE
from sdfast.serve.options import ServeOptions

pytestmark = [pytest.mark.skipif(not HAS_SERVE, reason='needs the serve extra: pip install -e ".[serve]"'),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray's own pydantic-v1-style fields
KEY = "0123456789abcdef-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Response:
    """What ``handle.method.remote()`` returns: awaitable once, cancellable."""

    def __init__(self, coroutine):
        self.coroutine, self.cancelled = coroutine, False

    def __await__(self):
        return self.coroutine.__await__()

    def cancel(self):
        self.cancelled = True


class Method:
    def __init__(self, fn):
        self.fn, self.calls, self.responses = fn, [], []

    def remote(self, *args):
        self.calls.append(args)
        self.responses.append(Response(self.fn(*args)))
        return self.responses[-1]


class Pipeline:
    """The pipeline deployment's handle: a model of ``size``; ``generate`` takes ``seconds`` or raises ``error``,
    ``info`` takes ``info_seconds`` or raises ``info_error``."""

    def __init__(self, size=(64, 64), seconds=0.0, error=None, info_error=None, info_seconds=0.0):
        async def info():
            await asyncio.sleep(info_seconds)
            if info_error is not None:
                raise info_error
            facts = {"vae_scale_factor": 8, "default_size": size[0], "latent_channels": 4, "clip_layers": 12,
                     "is_xl": False, "aesthetic": False}  # as a replica reports Pipeline.facts
            return {"width": size[0], "height": size[1], "max_batch": 4, "device": "cpu", "dtype": "float32",
                    "facts": facts, "loras": [], "controlnets": []}

        async def generate(request, deadline):
            await asyncio.sleep(seconds)
            if error is not None:
                raise error
            return {"pngs": [png(Image.new("RGB", (request.width, request.height)))] * request.n,
                    "seed": request.seed, "timings": {}, "batch_images": request.n, "replica": "r", "node": "n"}

        self.info, self.generate = Method(info), Method(generate)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def serve_front(monkeypatch):
    """``serve_front(pipeline, **options)``: a TestClient on the front's FastAPI app whose routes run on a front
    that calls ``pipeline``, from a loopback client. Ray binds a route's ``self`` through
    ``serve.get_replica_context().servable_object``; here that is the front."""
    from fastapi.testclient import TestClient
    from ray import serve

    from sdfast.serve import app as served

    front_class = served.Front.__bases__[0]  # the class under @serve.ingress, without Ray's replica wrapper
    clients = []

    def make(pipeline, client_host="127.0.0.1", **options):
        front = front_class(pipeline, ServeOptions(**{"api_key": KEY, **options}).to_dict(), "default")
        monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=front))
        clients.append(TestClient(served.api, client=(client_host, 50000)))
        clients[-1].front = front
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def error_of(r, status: int) -> str:
    assert r.status_code == status and r.headers["content-type"] == "application/json", (r.status_code, r.text)
    message = r.json()["error"]
    assert "\n" not in message and " object at 0x" not in message and "/" not in message.split(":")[0], message
    return message


def bomb() -> str:
    """A PNG header that declares 20000x20000 pixels (400 Mpx), base64."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
                            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")).decode()


def test_a_missing_side_is_the_models_own_and_both_are_checked_before_generating(serve_front):
    pipeline = Pipeline(size=(512, 512))
    client = serve_front(pipeline)
    r = client.post("/v1/txt2img", json={"prompt": "a red circle", "height": 20000, "steps": 1, "n": 4}, headers=AUTH)
    assert "height=20000: over the limit of 4096 (limits.max_side)" in error_of(r, 422)
    r = client.post("/v1/txt2img", json={"prompt": "a red circle", "width": 4096}, headers=AUTH)
    assert "width x height='4096x512': 2.0 Mpx is over the limit of 1.0 Mpx per image" in error_of(r, 422)
    assert pipeline.generate.calls == []
    r = client.post("/v1/txt2img", json={"prompt": "a red circle", "height": 256, "seed": 3}, headers=AUTH)
    assert r.status_code == 200 and r.json()["seed"] == 3, r.text
    (request, deadline), = pipeline.generate.calls
    assert (request.width, request.height) == (512, 256) and len(pipeline.info.calls) == 1  # asked once


@pytest.mark.parametrize("body,message", [
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
     "seed=999999999999...(5000 digits): over 4294967295: seeds run 0 .. 2**32 - 1"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deep"),
    (b'{"prompt": "\\udcff"}', "prompt='\\udcff': holds a character that is not Unicode text (a lone surrogate"),
    (b'{"prompt": "x", "image": "' + bomb().encode() + b'"}', "image='the image': cannot read it: Image size "
                                                              "(400000000 pixels) exceeds limit"),
    (b'{"prompt": "x", "image": "' + base64.b64encode(b"hello, world") + b'"}',
     "image='the image': cannot read it: not a PNG/JPEG/WEBP picture"),
], ids=["seed", "nesting", "surrogate", "bomb", "not-an-image"])
def test_hostile_bodies_are_json_422s(serve_front, body, message):
    pipeline = Pipeline()
    r = serve_front(pipeline).post("/v1/img2img", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert message in error_of(r, 422) and pipeline.generate.calls == []


def test_the_docs_are_off_and_the_schema_needs_the_key(serve_front, monkeypatch):
    monkeypatch.delenv("SDFAST_API_KEY", raising=False)
    client = serve_front(Pipeline())
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert "missing or wrong API key" in error_of(client.get("/openapi.json"), 401)
    assert "missing or wrong API key" in error_of(client.get("/openapi.json", headers={"Authorization": "Bearer x"}),
                                                  401)
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert "/v1/txt2img" in schema["paths"] and "/openapi.json" not in schema["paths"]
    keyless = serve_front(Pipeline(), client_host="10.1.2.3", api_key=None)
    assert "answers loopback clients only" in error_of(keyless.get("/openapi.json"), 403)


def test_the_key_is_compared_in_constant_time(serve_front, monkeypatch):
    from sdfast.serve import app as served

    seen = []
    monkeypatch.setattr(served.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or a == b)
    client = serve_front(Pipeline())
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert seen == [(b"Bearer nope", f"Bearer {KEY}".encode()), (f"Bearer {KEY}".encode(),) * 2]


def test_a_timeout_is_a_504_that_cancels_the_call_and_the_replica_knows_the_deadline(serve_front):
    pipeline = Pipeline(seconds=30)
    start = time.time()
    r = serve_front(pipeline, request_timeout_s=0.3).post("/v1/txt2img", json={"prompt": "x"}, headers=AUTH)
    assert "no answer within request_timeout_s=0.3" in error_of(r, 504) and time.time() - start < 10
    (_, deadline), = pipeline.generate.calls
    assert start + 0.3 <= deadline <= time.time() + 0.3 and pipeline.generate.responses[0].cancelled


def test_a_replica_that_dropped_a_request_past_its_deadline_is_a_504(serve_front):
    from ray.exceptions import RayTaskError

    from sdfast.serve.batching import Cancelled

    error = RayTaskError("generate", "Traceback ...", Cancelled("stopped after step 3: no one waits"))
    r = serve_front(Pipeline(error=error)).post("/v1/txt2img", json={"prompt": "x"}, headers=AUTH)
    assert "no answer within request_timeout_s" in error_of(r, 504)


def test_a_burst_on_a_new_front_asks_the_replicas_once(serve_front):
    pipeline = Pipeline(size=(512, 256), info_seconds=0.05)
    front = serve_front(pipeline).front

    async def burst():
        return await asyncio.gather(*[front._model_info() for _ in range(8)])

    assert [(i["width"], i["height"]) for i in asyncio.run(burst())] == [(512, 256)] * 8
    assert len(pipeline.info.calls) == 1


def test_no_replica_to_describe_the_model_is_a_503(serve_front):
    from ray.serve.exceptions import BackPressureError

    client = serve_front(Pipeline(info_error=BackPressureError(num_queued_requests=16, max_queued_requests=16)))
    for r in (client.post("/v1/txt2img", json={"prompt": "x"}, headers=AUTH), client.get("/v1/models", headers=AUTH)):
        assert "no replica could describe the model yet" in error_of(r, 503) and r.headers["retry-after"] == "2"
