"""`sdfast serve` on a real local Ray cluster (one per module): HTTP in, the pipeline's images out; limits, auth,
backpressure, a bounded load run and a replica killed under load, with no request lost."""

import asyncio
import base64
import io
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdfast
from controlnets import control_image, random_controlnet
from sdfast.control import Control
from sdfast.loading import DEFAULT_MODEL
from sdfast.serve import HAS_SERVE
from sdfast.serve.options import ServeOptions

pytestmark = [pytest.mark.skipif(not HAS_SERVE, reason='needs the serve extra: pip install -e ".[serve]"'),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray's own pydantic-v1-style fields
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two CPU replicas of the shipped default model behind the front, with an API key (allowed on loopback) and
    one random ControlNet offered (``edges``)."""
    import ray
    from diffusers import UNet2DConditionModel
    from ray import serve

    from sdfast.serve.app import start

    controlnets = tmp_path_factory.mktemp("controlnets")
    unet = UNet2DConditionModel.from_pretrained(DEFAULT_MODEL / "unet").float()
    random_controlnet(unet, seed=3).save_pretrained(controlnets / "edges")
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="warning")
    options = ServeOptions(model=None, replicas=2, port=free_port(), api_key=KEY, batch_wait_s=0.05,
                           warmup_steps=1, controlnet_dir=str(controlnets))
    try:
        start(options)
        yield options
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def client(server):
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def test_txt2img_draws_the_pipelines_image_and_a_seed_redraws_its_bytes(server, client):
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "seed": 7, "scheduler": "ddim"}
    first = client.post("/v1/txt2img", json=body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["seed"] == 7 and len(out["images"]) == 1 and out["attempts"] == 1
    assert out["timings"]["steps"] == 4 and out["timings"]["unet_ms"] > 0 and out["timings"]["text_encoder_ms"] > 0
    direct = sdfast.load().generate("a red circle", "blurry", steps=4, seed=7, scheduler="ddim").images[0]
    assert np.abs(decode(out["images"][0]) - np.asarray(direct, dtype=np.int16)).max() <= 1
    png = client.post("/v1/txt2img", json={**body, "output": "png"})
    assert png.headers["content-type"] == "image/png" and png.headers["x-seed"] == "7"
    assert png.content == base64.b64decode(out["images"][0])  # same seed, same bytes (on either replica)
    drawn = client.post("/v1/txt2img", json={"prompt": "a red circle", "steps": 2}).json()
    again = client.post("/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": drawn["seed"]}).json()
    assert again["images"] == drawn["images"]  # a server-drawn seed reproduces too


def test_img2img_keeps_the_input_size(client):
    buf = io.BytesIO()
    Image.new("RGB", (72, 64), (200, 30, 30)).save(buf, format="PNG")
    r = client.post("/v1/img2img", json={"prompt": "a red square", "image": base64.b64encode(buf.getvalue()).decode(),
                                         "strength": 0.5, "steps": 4, "seed": 1})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (72, 64)
    assert r.json()["timings"]["vae_encode_ms"] > 0


def test_models_and_health(client):
    assert client.get("/healthz").json() == {"ok": True}
    (model,) = client.get("/v1/models").json()["data"]
    assert model["id"] == "default" and (model["width"], model["height"]) == (64, 64)  # a name, never a path
    assert model["device"] == "cpu" and model["max_batch"] == 4 and model["limits"]["max_steps"] == 150
    assert model["controlnets"] == ["edges"] and model["limits"]["max_controls"] == 2  # names, never paths


def test_a_control_map_steers_the_picture_as_the_api_does(server, client):
    buf = io.BytesIO()
    control_image(5).save(buf, format="PNG")
    control = {"model": "edges", "image": base64.b64encode(buf.getvalue()).decode(), "scale": 0.8, "end": 0.75}
    r = client.post("/v1/txt2img", json={"prompt": "a red circle", "steps": 4, "seed": 7, "controls": [control]})
    assert r.status_code == 200, r.text
    pipe = sdfast.load()
    pipe.controlnets.load(Path(server.controlnet_dir) / "edges", "edges")
    direct = pipe.generate("a red circle", steps=4, seed=7,
                           controls=[Control("edges", control_image(5), scale=0.8, end=0.75)]).images[0]
    assert np.abs(decode(r.json()["images"][0]) - np.asarray(direct, dtype=np.int16)).max() <= 1
    r = client.post("/v1/txt2img", json={"prompt": "x", "controls": [{**control, "model": "/models/canny"}]})
    assert r.status_code == 422 and "it offers 'edges'" in r.json()["error"], r.text


@pytest.mark.parametrize("body,status,message", [
    ({"prompt": "x", "steps": 151}, 422, "steps=151: over the limit of 150 (limits.max_steps)"),
    ({"prompt": "x", "width": 2048, "height": 2048}, 422, "width x height='2048x2048': 4.0 Mpx is over the limit of "
                                                          "1.0 Mpx per image (limits.max_pixels)"),
    ({"prompt": "x", "n": 5}, 422, "n=5: over the limit of 4 (limits.max_images)"),
    ({"prompt": "x" * 2001}, 422, "2001 characters is over the limit of 2000 (limits.max_prompt_chars"),
    ({"prompt": "x", "model": "/models/sd15.safetensors"}, 422, "model='/models/sd15.safetensors': not served here"),
    ({"prompt": "x", "image": "AAAA"}, 422, "unknown field(s) 'image' for txt2img"),
    ({"prompt": "x", "scheduler": "nope"}, 422, "scheduler='nope': unknown; choose one of"),
    ({"prompt": "a red circle", "height": 20000, "steps": 1, "n": 4}, 422,
     "height=20000: over the limit of 4096 (limits.max_side)"),
    ({"prompt": "x", "seed": 2**64}, 422, "seed=18446744073709551616: over 4294967295: seeds run 0 .. 2**32 - 1"),
])
def test_bad_input_gets_its_status_and_names_the_limit(client, body, status, message):
    r = client.post("/v1/txt2img", json=body)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_an_oversized_upload_is_413(client):
    image = base64.b64encode(b"\0" * (8 * 2**20)).decode()
    r = client.post("/v1/img2img", json={"prompt": "x", "image": image})
    assert r.status_code == 413 and "max_body_bytes=8388608" in r.json()["error"]


def test_the_api_key_is_required(server, client):
    import httpx

    url = f"http://127.0.0.1:{server.port}"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/v1/txt2img", json={"prompt": "x", "steps": 1}, headers=headers)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/openapi.json").status_code == 401 and httpx.get(f"{url}/docs").status_code == 404
    assert "/v1/img2img" in httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()["paths"]
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no key


def test_a_timed_out_request_frees_its_replica_within_a_step(server):
    """One replica, one request at a time: a request of ~4 s gets its 504 at 0.5 s, and the next request is
    answered at once, not after the first one's remaining steps."""
    import httpx
    from ray import serve

    from sdfast.serve.app import build_app

    tight = ServeOptions(model=server.model, port=server.port, max_batch=1, max_ongoing_requests=1,
                         request_timeout_s=0.5, warmup_steps=1, cpus_per_replica=0.5)
    serve.run(build_app(tight), name="timeout", route_prefix="/timeout")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}/timeout", timeout=60) as c:
            slow = c.post("/v1/txt2img", json={"prompt": "x", "steps": 150, "n": 4})
            start = time.monotonic()
            quick = c.post("/v1/txt2img", json={"prompt": "x", "steps": 1})
            waited = time.monotonic() - start
    finally:
        serve.delete("timeout")
    assert slow.status_code == 504 and "request_timeout_s=0.5" in slow.json()["error"], slow.text
    assert quick.status_code == 200 and waited < 2.0, (quick.text, waited)


def test_a_full_queue_answers_503_with_retry_after(server):
    """A second app with one replica, one request in it and one waiting: the rest are turned away at once."""
    import httpx
    from ray import serve

    from sdfast.serve.app import build_app

    tight = ServeOptions(model=server.model, port=server.port, max_batch=1, max_ongoing_requests=1,
                         max_queued_requests=1, retry_after_s=3, warmup_steps=1, cpus_per_replica=0.5)
    serve.run(build_app(tight), name="tight", route_prefix="/tight")

    async def burst():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}/tight", timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/txt2img", json={"prompt": "x", "steps": 40, "seed": i})
                                          for i in range(8)])

    try:
        answers = asyncio.run(burst())
    finally:
        serve.delete("tight")
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 503}, codes  # each answered: done, or turned away with a time to come back
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "3" and "max_queued_requests=1" in r.json()["error"]


def test_a_bounded_load_run_loses_nothing_and_batches(server):
    from sdfast.serve.loadtest import run_load

    result = asyncio.run(run_load(f"http://127.0.0.1:{server.port}", requests=40, concurrency=10, duration_s=60,
                                  payload={"steps": 4}, api_key=KEY))
    assert result["lost"] == 0 and result["errors"] == {} and result["ok"] + result["rejected"] == 40, result
    assert result["ok"] == 40 and max(result["batch_sizes"]) > 1  # 10 in flight, 2 replicas: batches form


def test_a_replica_killed_under_load_is_replaced_and_no_request_is_lost(server):
    from sdfast.serve.loadtest import kill_replica, run_load

    result = asyncio.run(run_load(f"http://127.0.0.1:{server.port}", requests=60, concurrency=8, duration_s=90,
                                  payload={"steps": 30}, api_key=KEY, kill_after_s=1.0, kill=kill_replica))
    # run_load stops sending at duration_s, so a slow machine issues fewer than 60: each one sent is answered, and
    # enough were sent that requests were queued on both replicas when one died.
    assert result["killed"] and result["issued"] >= 2 * 8, result
    assert result["lost"] == 0 and result["errors"] == {} and result["ok"] + result["rejected"] == result["issued"], \
        result
    assert result["attempts"].get(2, 0) >= 1, result  # the requests in flight on it were retried on the other
    _wait_for_two_replicas()


def _wait_for_two_replicas() -> None:
    """Ray Serve replaces a killed replica: both run again within a minute."""
    from ray import serve

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = serve.status().applications["sdfast"].deployments["Pipeline"].replica_states
        if states.get("RUNNING") == 2:
            break
        time.sleep(0.5)
    assert states.get("RUNNING") == 2, states


def test_a_soak_of_mixed_requests_with_a_replica_killed_loses_nothing(server):
    """200 requests at concurrency 8, every fourth a careless or hostile one (BAD_REQUESTS), one replica killed a
    second in: every bad one is a JSON 4xx, every good one an image or a 503 with Retry-After, none lost."""
    from sdfast.serve.loadtest import BAD_REQUESTS, kill_replica, run_load

    result = asyncio.run(run_load(f"http://127.0.0.1:{server.port}", requests=200, concurrency=8, duration_s=240,
                                  payload={"steps": 4}, api_key=KEY, kill_after_s=1.0, kill=kill_replica,
                                  bad_every=4))
    assert result["killed"] and result["lost"] == 0 and result["errors"] == {}, result
    assert result["refused"] == 50 and result["ok"] + result["rejected"] == 150, result
    assert len(BAD_REQUESTS) == 8  # every one of them was sent (50 bad requests cycle through the 8)
    _wait_for_two_replicas()


def test_the_load_command_writes_json_and_markdown(server, tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("load", Path(__file__).parents[2] / "benchmarks" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    monkeypatch.setenv("SDFAST_API_KEY", KEY)
    out = tmp_path / "run"
    assert load.main(["--url", f"http://127.0.0.1:{server.port}", "--requests", "6", "--concurrency", "3",
                      "--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["ok"] == 6 and result["lost"] == 0 and result["payload"]["steps"] == 2
    assert "| 6 | 6 | 0 | 0 | 0 |" in out.with_suffix(".md").read_text()
