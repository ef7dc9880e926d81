"""ControlNets over HTTP: the server offers the ControlNets of one folder by name, a request's ``controls`` are
checked by the shared rules (422s in the JSON names, never a 500), batch only with the same controls, and one
request through the front and a real replica paints what ``pipe.generate(..., controls=...)`` paints."""

import base64
import dataclasses
import inspect
import io
import json
import pickle
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import sdfast
from controlnets import control_image, random_controlnet
from sdfast.cli import main
from sdfast.control import Control
from sdfast.loading import DEFAULT_MODEL
from sdfast.request import ModelFacts
from sdfast.serve import HAS_SERVE
from sdfast.serve.batching import generate_batch
from sdfast.serve.controlnets import listing
from sdfast.serve.options import ServeOptions
from sdfast.serve.requests import GenerationRequest, Limits, RequestError, body_schema, parse_request

FACTS = ModelFacts(vae_scale_factor=8, default_size=64, latent_channels=4, clip_layers=2, is_xl=False, aesthetic=False)
OFFERED = frozenset({"edges", "pose"})
KEY = "0123456789abcdef-test"
needs_serve = pytest.mark.skipif(not HAS_SERVE, reason='needs the serve extra: pip install -e ".[serve]"')


def b64(image: Image.Image, format="PNG", **save) -> str:
    buf = io.BytesIO()
    image.save(buf, format=format, **save)
    return base64.b64encode(buf.getvalue()).decode()


MAP = control_image(0)  # 64x64 RGB noise
MAP_B64 = b64(MAP)


def parse(kind="txt2img", limits=Limits(), **fields):
    return parse_request(json.dumps({"prompt": "a red circle", **fields}).encode(), kind, limits, "tiny", FACTS,
                         controlnets=OFFERED)


def refused(body: str, kind="txt2img", limits=Limits()) -> str:
    with pytest.raises(RequestError) as e:
        parse_request(body.encode(), kind, limits, "tiny", FACTS, controlnets=OFFERED)
    message = str(e.value)
    assert e.value.status == 422 and "\n" not in message and len(message) < 400, message
    assert MAP_B64[:20] not in message  # never the upload echoed back
    return message


def test_controls_become_checked_controls_in_either_kind():
    req = parse(controls=[{"model": "edges", "image": MAP_B64, "scale": 0.5, "start": 0.1, "end": 0.9},
                          {"model": "pose", "image": b64(Image.new("RGBA", (64, 64))), "scale": None}])
    first, second = req.controls
    assert (first.model, first.scale, first.start, first.end) == ("edges", 0.5, 0.1, 0.9)
    assert np.array_equal(np.asarray(first.image), np.asarray(MAP)) and first.image.mode == "RGB"
    assert (second.model, second.scale, second.start, second.end) == ("pose", 1.0, 0.0, 1.0)  # null: the default
    assert second.image.getpixel((0, 0)) == (255, 255, 255)  # transparency over white, as for image
    assert parse().controls == () and parse(controls=None).controls == () and parse(controls=[]).controls == ()
    img2img = parse("img2img", image=b64(Image.new("RGB", (64, 64))), controls=[{"model": "edges", "image": MAP_B64}])
    assert img2img.controls[0].model == "edges" and img2img.image is not None


def test_a_control_map_sets_the_size_when_none_is_given():
    wide = b64(Image.new("RGB", (100, 64)))
    assert (parse(controls=[{"model": "edges", "image": wide}]).width, parse().width) == (96, 64)
    assert parse(width=64, controls=[{"model": "edges", "image": wide}]).width == 64


@pytest.mark.parametrize("control,message", [
    ({"scale": 11}, "controls[0].scale=11: outside [-10, 10] (1: as trained, 0: off)"),
    ({"scale": -10.5}, "controls[0].scale=-10.5: outside [-10, 10]"),
    ({"scale": "1"}, "controls[0].scale='1': need a"),  # the shared rule's words
    ({"scale": True}, "controls[0].scale=True: need a"),
    ({"start": 0.5, "end": 0.2}, "controls[0].start=[0.5, 0.2]: need 0 <= start < end <= 1"),
    ({"end": 1.5}, "controls[0].start=[0.0, 1.5]: need 0 <= start < end <= 1"),
    ({"start": -0.1}, "controls[0].start=[-0.1, 1.0]: need 0 <= start < end <= 1"),
    ({"model": "nope"}, "controls[0].model='nope': no ControlNet of that name on this server; it offers 'edges', "
                        "'pose' (GET /v1/models lists them)"),
    ({"model": "../edges"}, "controls[0].model='../edges': no ControlNet of that name"),
    ({"model": "/etc/passwd"}, "controls[0].model='/etc/passwd': no ControlNet of that name"),
    ({"model": None}, "controls[0].model holds null: need a string, the name of a ControlNet (GET /v1/models)"),
    ({"model": ["edges"]}, "controls[0].model holds a JSON array: need a string"),
    ({"image": None}, "controls[0].image holds null: need a string, the control picture as base64"),
    ({"image": 12}, "controls[0].image holds a number: need a string"),
    ({"image": {"png": "AAAA"}}, "controls[0].image holds a JSON object: need a string"),
    ({"image": "not base64!"}, "controls[0].image='not base64!': not valid base64"),
    ({"image": base64.b64encode(b"hello, world").decode()},
     "controls[0].image='the image': cannot read it: not a PNG/JPEG/WEBP picture"),
    ({"image": b64(Image.new("RGB", (8, 8)), format="BMP")},
     "controls[0].image='the image': cannot read it: not a PNG/JPEG/WEBP picture"),
    ({"image": b64(Image.new("RGB", (128, 64)))}, "controls[0].image='the image': 128x64 pixels is over the limit"),
    ({"scale": [1]}, "controls[0].scale holds a JSON array: send a number"),
    ({"end": {"at": 1}}, "controls[0].end holds a JSON object: send a number"),
    ({"path": "/models/x.safetensors"}, "controls[0]: unknown field(s) 'path': the fields are model, image, scale, "
                                        "start, end"),
])
def test_each_mistake_in_a_control_is_a_422_in_json_names(control, message):
    body = json.dumps({"prompt": "x", "controls": [{"model": "edges", "image": MAP_B64, **control}]})
    got = refused(body, limits=Limits(max_image_pixels=64 * 64))
    assert message in got, got


def test_the_second_control_is_named_as_such():
    body = json.dumps({"prompt": "x", "controls": [{"model": "edges", "image": MAP_B64},
                                                   {"model": "pose", "image": MAP_B64, "scale": 11}]})
    assert "controls[1].scale=11: outside [-10, 10]" in refused(body)


@pytest.mark.parametrize("body,message", [
    ('{"prompt": "x", "controls": [' + ",".join(['{"model": "edges", "image": "A"}'] * 3) + "]}",
     "controls holds 3 objects, over the limit of 2 (limits.max_controls): use fewer"),
    ('{"prompt": "x", "controls": [' + ",".join(["0"] * 200_000) + "]}",
     "controls holds 200000 objects, over the limit of 2 (limits.max_controls)"),
    ('{"prompt": "x", "controls": "edges"}', "controls='edges': need a JSON array of objects such as [{\"model\""),
    ('{"prompt": "x", "controls": {"model": "edges", "image": "AAAA"}}', "controls={'model': 'edges', 'image'"),
    ('{"prompt": "x", "controls": 3}', "controls=3: need a JSON array"),
    ('{"prompt": "x", "controls": ["edges"]}', "controls[0] holds a string: send an object such as {\"model\""),
    ('{"prompt": "x", "controls": [[{"model": "edges"}]]}', "controls[0] holds a JSON array: send an object"),
    ('{"prompt": "x", "controls": [null]}', "controls[0] holds null: send an object"),
    ('{"prompt": "x", "controls": [' + "[" * 500 + "]" * 500 + "]}", "controls[0] holds a JSON array"),
    ('{"prompt": "x", "controls": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deep"),
    ('{"prompt": "x", "controls": [{"model": "edges", "image": "' + MAP_B64 + '", "scale": ' + "9" * 5000 + "}]}",
     "controls[0].scale=999999999999...(5000 digits): outside [-10, 10]"),
], ids=["three", "huge", "string", "object", "number", "string-item", "array-item", "null-item", "deep-item",
        "too-deep", "long-int"])
def test_hostile_controls_are_422s(body, message):
    got = refused(body)
    assert message in got, got


def test_no_controlnets_offered_says_so():
    with pytest.raises(RequestError, match=r"controls\[0\].model='edges': no ControlNet of that name on this "
                                           r"server; it offers none \(the server was started without "
                                           r"--controlnet-dir\)"):
        parse_request(json.dumps({"prompt": "x", "controls": [{"model": "edges", "image": MAP_B64}]}).encode(),
                      "txt2img", Limits(), "tiny", FACTS)


def test_the_batch_key_holds_the_controls_names_numbers_and_pixels():
    def key(**control):
        return parse(width=64, height=64, steps=4, controls=[{"model": "edges", "image": MAP_B64, **control}]
                     ).batch_key()

    base = key()
    assert base == key(scale=1, start=0, end=1)  # the defaults, spelled out
    assert base == key(image=b64(MAP, format="WEBP", lossless=True))  # another file of the same pixels
    assert base == parse(width=64, height=64, steps=4, seed=9, prompt="another", n=2,
                         controls=[{"model": "edges", "image": MAP_B64}]).batch_key()  # per-request fields differ
    for change in ({"model": "pose"}, {"scale": 0.9}, {"start": 0.1}, {"end": 0.9},
                   {"image": b64(control_image(1))}):
        assert key(**change) != base, change
    plain = parse(width=64, height=64, steps=4).batch_key()
    two = parse(width=64, height=64, steps=4, controls=[{"model": "edges", "image": MAP_B64},
                                                        {"model": "pose", "image": MAP_B64}]).batch_key()
    swapped = parse(width=64, height=64, steps=4, controls=[{"model": "pose", "image": MAP_B64},
                                                            {"model": "edges", "image": MAP_B64}]).batch_key()
    assert len({plain, base, two, swapped}) == 4
    assert parse("img2img", image=MAP_B64, controls=[{"model": "edges", "image": MAP_B64}]).batch_key() is None
    req = parse(controls=[{"model": "edges", "image": MAP_B64}])
    assert pickle.loads(pickle.dumps(req)).batch_key() == req.batch_key()  # as the front hands it to a replica


def test_the_published_schema_describes_controls():
    schema = body_schema("txt2img", Limits(max_controls=3))
    controls = schema["properties"]["controls"]
    assert controls["type"] == ["array", "null"] and controls["maxItems"] == 3
    item = controls["items"]
    assert item["required"] == ["model", "image"] and item["additionalProperties"] is False
    assert set(item["properties"]) == {"model", "image", "scale", "start", "end"}
    assert item["properties"]["scale"]["maximum"] == 10 and item["properties"]["end"]["default"] == 1.0
    assert "image" not in schema["properties"] and "image" in body_schema("img2img", Limits())["required"]
    assert schema["additionalProperties"] is False


def test_the_folder_lists_diffusers_folders_and_files_by_name(tmp_path):
    (tmp_path / "edges").mkdir()
    (tmp_path / "edges" / "config.json").write_text("{}")
    (tmp_path / "no-config").mkdir()  # not a ControlNet
    for name in ("pose.safetensors", "depth.pth", "notes.txt", ".hidden.safetensors", "lora.ckpt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path.parent / "escape.safetensors").write_bytes(b"")  # beside the folder: never offered
    assert sorted(listing(tmp_path, 8)) == ["depth", "edges", "pose"]
    assert listing(None, 8) == {}
    with pytest.raises(ValueError, match="holds 3 ControlNets, over max_controlnets=2"):
        ServeOptions(controlnet_dir=str(tmp_path), max_controlnets=2)
    (tmp_path / "edges.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="holds two ControlNets named 'edges' \\(edges and edges.safetensors\\)"):
        listing(tmp_path, 8)


def test_a_bad_folder_fails_before_any_replica_starts_on_any_backend(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="is not a folder"):
        ServeOptions(controlnet_dir=str(tmp_path / "missing"))
    for backend in ("torch", "onnxruntime", "tensorrt"):  # the export backends run ControlNets' graphs too
        assert ServeOptions(controlnet_dir=str(tmp_path), backend=backend).controlnet_dir == str(tmp_path)
    if HAS_SERVE:  # the command checks its options before it starts Ray
        monkeypatch.delenv("SDFAST_API_KEY", raising=False)
        assert main(["serve", "--controlnet-dir", str(tmp_path / "missing")]) == 2
        assert "is not a folder" in capsys.readouterr().err


# --- one request through the front and a real replica, without Ray -----------------------------------------------

class Response:
    """What ``handle.method.remote()`` returns: awaitable once, cancellable."""

    def __init__(self, coroutine):
        self.coroutine = coroutine

    def __await__(self):
        return self.coroutine.__await__()

    def cancel(self):
        pass


class Handle:
    """The pipeline deployment's handle over one real replica; arguments and answers pass through pickle, as they
    do between Ray actors."""

    def __init__(self, replica):
        self.generate, self.info = self._method(replica.generate), self._method(replica.info)

    @staticmethod
    def _method(fn):
        def remote(*args):
            async def call():
                out = fn(*pickle.loads(pickle.dumps(args)))
                return pickle.loads(pickle.dumps(await out if inspect.isawaitable(out) else out))
            return Response(call())
        return SimpleNamespace(remote=remote)


@pytest.fixture(scope="module")
def served_controlnets(tmp_path_factory):
    """A folder with one random ControlNet made for the shipped default model's U-Net."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("served-controlnets")
    unet = UNet2DConditionModel.from_pretrained(DEFAULT_MODEL / "unet").float()
    random_controlnet(unet, seed=3).save_pretrained(folder / "edges")
    return folder


@pytest.fixture
def app(served_controlnets, monkeypatch):
    """A TestClient on the front's routes, whose pipeline handle is one real replica of the default model with
    ``--controlnet-dir``, built by its own ``__init__`` (loading, warm-up) outside Ray."""
    import ray
    from fastapi.testclient import TestClient
    from ray import serve

    from sdfast.serve import app as served

    holder = SimpleNamespace(servable_object=None, replica_id=SimpleNamespace(to_full_id_str=lambda: "replica-1"),
                             _deployment_config=SimpleNamespace(max_ongoing_requests=4))  # read by serve.batch
    monkeypatch.setattr(serve, "get_replica_context", lambda: holder)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-1"))
    options = ServeOptions(controlnet_dir=str(served_controlnets), api_key=KEY, max_batch=2, batch_wait_s=1.0,
                           warmup_steps=1).to_dict()
    replica = served.PipelineReplica(options)
    holder.servable_object = served.Front.__bases__[0](Handle(replica), options, "default")
    with TestClient(served.api, client=("127.0.0.1", 50000), headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@needs_serve
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic-v1-style fields
def test_a_request_with_controls_paints_what_the_api_paints(app, served_controlnets):
    models = app.get("/v1/models").json()["data"][0]
    assert models["controlnets"] == ["edges"] and models["limits"]["max_controls"] == 2
    schema = app.get("/openapi.json").json()
    body_of = schema["paths"]["/v1/img2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body_of["properties"]["controls"]["maxItems"] == 2

    control = {"model": "edges", "image": b64(control_image(5)), "scale": 0.8, "start": 0.0, "end": 0.75}
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "scheduler": "ddim", "seed": 7,
            "controls": [control]}
    r = app.post("/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    pipe = sdfast.load()
    pipe.controlnets.load(served_controlnets / "edges", "edges")

    def direct(seed, **more):
        return np.asarray(pipe.generate("a red circle", "blurry", steps=4, scheduler="ddim", seed=seed, controls=[
            Control("edges", control_image(5), scale=0.8, start=0.0, end=0.75)], **more).images[0], dtype=np.int16)

    want = direct(7)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), dtype=np.int16)
    assert np.abs(got - want).max() <= 1
    plain = np.asarray(pipe.generate("a red circle", "blurry", steps=4, scheduler="ddim", seed=7).images[0],
                       dtype=np.int16)
    assert np.abs(plain - want).max() > 10  # the ControlNet did steer the picture

    # two requests with the same controls share one call and each still paints its own seed's picture
    answers = [None, None]

    def post(i):
        answers[i] = app.post("/v1/txt2img", json={**body, "seed": 11 + i})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, answer in enumerate(answers):
        assert answer.status_code == 200 and answer.json()["batch_images"] == 2, answer.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))), dtype=np.int16)
        assert np.abs(got - direct(11 + i)).max() <= 1

    r = app.post("/v1/txt2img", json={**body, "controls": [{**control, "model": "pose"}]})
    assert r.status_code == 422 and "it offers 'edges'" in r.json()["error"], r.text
    r = app.post("/v1/txt2img", json={**body, "controls": [{**control, "scale": 11}]})
    assert r.status_code == 422 and r.json()["error"].startswith("controls[0].scale=11: outside"), r.text


def test_batched_requests_with_the_same_controls_equal_each_alone(served_controlnets):
    pipe = sdfast.load()
    pipe.controlnets.load(served_controlnets / "edges", "edges")
    controls = (Control("edges", control_image(2).convert("RGB"), 1.2, 0.25, 1.0),)

    def request(seed, n=1):
        return GenerationRequest("a blue square", "blurry", 4, 7.5, 64, 64, seed, "dpmpp_2m", n, "json",
                                 controls=controls)

    requests = [request(3), request(4, n=2)]
    assert requests[0].batch_key() == requests[1].batch_key()
    batched = generate_batch(pipe, requests)
    assert [g.batch_images for g in batched] == [3, 3]
    for req, got in zip(requests, batched):
        alone = generate_batch(pipe, [req])[0]
        for a, b in zip(alone.pngs, got.pngs):
            assert np.abs(np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
                          - np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)).max() <= 1
    other = dataclasses.replace(request(5), controls=(dataclasses.replace(controls[0], scale=1.0),))
    with pytest.raises(ValueError, match="cannot share one call"):
        generate_batch(pipe, [request(3), other])
