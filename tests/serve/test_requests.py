"""Request parsing and limits (plain Python, no Ray): every refusal names the field or the limit."""

import asyncio
import base64
import io
import json

import pytest
from PIL import Image

from sdfast.cli import main
from sdfast.serve.loadtest import run_load
from sdfast.serve.options import ServeOptions
from sdfast.serve.requests import Limits, RequestError, parse_request

LIMITS = Limits(max_pixels=128 * 128, max_steps=50, max_images=2, max_prompt_chars=40, max_body_bytes=4000,
                max_image_pixels=64 * 64)


def png_b64(size=(64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def parse(kind="txt2img", **fields):
    return parse_request(json.dumps(fields).encode(), kind, LIMITS, "tiny")


def test_defaults_and_a_drawn_seed():
    a, b = parse(prompt="a red circle"), parse(prompt="a red circle")
    assert (a.steps, a.guidance, a.scheduler, a.n, a.output, a.width, a.image) == (30, 7.5, "euler", 1, "json",
                                                                                 None, None)
    assert 0 <= a.seed < 2**63 and a.seed != b.seed  # fixed before dispatch, so a retry redraws the same image


def test_batch_key_groups_only_what_one_call_can_hold():
    base = dict(prompt="x", width=64, height=64, steps=4, seed=1)
    key = parse(**base).batch_key()
    assert parse(**{**base, "prompt": "y", "seed": 2, "n": 2, "negative_prompt": "z"}).batch_key() == key
    for change in ({"steps": 5}, {"width": 72}, {"scheduler": "ddim"}, {"guidance": 3.0}):
        assert parse(**{**base, **change}).batch_key() != key
    assert parse(**{**base, "scheduler": "euler_a"}).batch_key() is None  # fresh noise per step: never batched
    assert parse("img2img", image=png_b64(), **base).batch_key() is None


@pytest.mark.parametrize("fields,status,message", [
    ({"prompt": "x", "steps": 51}, 422, "steps=51 is outside 1..50 (limit max_steps)"),
    ({"prompt": "x", "n": 3}, 422, "n=3 images is outside 1..2 (limit max_images)"),
    ({"prompt": "x", "width": 256, "height": 256}, 422, "over the limit max_pixels=16384"),
    ({"prompt": "x" * 41}, 422, "prompt of 41 characters is over the limit max_prompt_chars=40"),
    ({"prompt": "x", "negative_prompt": "y" * 41}, 422, "negative_prompt of 41 characters"),
    ({"prompt": "x" * 30, "negative_prompt": "y" * 4000}, 413, "over the limit max_body_bytes=4000"),
    ({"prompt": "x", "width": 60}, 422, "width=60 is not a positive multiple of 8"),
    ({"prompt": "x", "scheduler": "nope"}, 422, "unknown scheduler 'nope'"),
    ({"prompt": "x", "steps": "4"}, 422, "field 'steps' must be int, not str"),
    ({"prompt": "x", "steps": True}, 422, "field 'steps' must be int, not bool"),
    ({"steps": 4}, 422, "field 'prompt' is required"),
    ({"prompt": "x", "model": "/models/other.safetensors"}, 422, "is not served here: this server runs 'tiny'"),
    ({"prompt": "x", "model_path": "/etc/passwd"}, 422, "unknown field(s) 'model_path'"),
    ({"prompt": "x", "image": "AAAA"}, 422, "unknown field(s) 'image' for txt2img"),
    ({"prompt": "x", "output": "png", "n": 2}, 422, "output='png' returns one image but n=2"),
    ({"prompt": "x", "seed": -1}, 422, "seed=-1 is outside 0..2**63-1"),
])
def test_txt2img_refusals(fields, status, message):
    with pytest.raises(RequestError, match=None) as e:
        parse(**fields)
    assert e.value.status == status and message in str(e.value), str(e.value)


@pytest.mark.parametrize("fields,message", [
    ({}, "field 'image' is required for img2img"),
    ({"image": "not base64!"}, "field 'image' is not valid base64"),
    ({"image": base64.b64encode(b"not a picture").decode()}, "field 'image' is not a readable picture"),
    ({"image": png_b64((72, 64))}, "input image 72x64 is over the limit max_image_pixels=4096"),
    ({"image": png_b64(), "strength": 1.5}, "strength=1.5 is outside [0, 1]"),
])
def test_img2img_refusals(fields, message):
    with pytest.raises(RequestError) as e:
        parse("img2img", prompt="x", **fields)
    assert e.value.status == 422 and message in str(e.value), str(e.value)


def test_body_that_is_not_a_json_object():
    for body, message in ((b"{", "the body is not JSON"), (b"[1]", "must be a JSON object")):
        with pytest.raises(RequestError, match=message):
            parse_request(body, "txt2img", LIMITS, "tiny")


def test_img2img_decodes_the_upload():
    req = parse("img2img", prompt="x", image=png_b64(), strength=0.5)
    assert req.image.size == (64, 64) and req.image.mode == "RGB" and req.strength == 0.5


def test_a_public_bind_needs_an_api_key(monkeypatch):
    monkeypatch.delenv("SDFAST_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"binding to 0.0.0.0 exposes the server .* \$SDFAST_API_KEY"):
        ServeOptions(host="0.0.0.0")
    assert ServeOptions(host="0.0.0.0", api_key="k").api_key == "k"
    monkeypatch.setenv("SDFAST_API_KEY", "from-env")
    assert ServeOptions(host="::").api_key == "from-env"
    assert ServeOptions(host="localhost", api_key=None).host == "localhost"


def test_serve_options_from_a_config():
    opts = ServeOptions.from_dict({"replicas": 2, "limits": {"max_steps": 10}})
    assert opts.limits.max_steps == 10 and opts.max_ongoing_requests == 2 * opts.max_batch
    with pytest.raises(ValueError, match="unknown serve option.*replica_count"):
        ServeOptions.from_dict({"replica_count": 2})
    with pytest.raises(ValueError, match="could never fill a batch"):
        ServeOptions(max_batch=8, max_ongoing_requests=4)


def test_the_serve_command_refuses_before_starting_anything(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("SDFAST_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert main(["serve", str(tmp_path / "missing")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "binding to 0.0.0.0" in lines[0] and "does not exist" in lines[1]


def test_the_load_test_stays_on_loopback():
    with pytest.raises(ValueError, match="only targets loopback servers, not '10.0.0.1'"):
        asyncio.run(run_load("http://10.0.0.1:8000", requests=1))


def test_the_deploy_examples_hold_valid_serve_options(monkeypatch):
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    deploy = Path(__file__).parents[2] / "deploy"
    config = yaml.safe_load((deploy / "serve_config.yaml").read_text())
    service = yaml.safe_load((deploy / "rayservice.yaml").read_text())
    monkeypatch.setenv("SDFAST_API_KEY", "k")  # both bind 0.0.0.0, so both need the key
    for cfg in (config, yaml.safe_load(service["spec"]["serveConfigV2"])):
        (app,) = cfg["applications"]
        assert app["import_path"] == "sdfast.serve.app:app_builder"
        opts = ServeOptions.from_dict(app["args"])
        assert opts.host == cfg["http_options"]["host"] and opts.model.startswith("/models/")


def test_import_sdfast_never_imports_ray():
    import subprocess
    import sys

    code = "import sys, sdfast, sdfast.serve, sdfast.serve.requests; assert 'ray' not in sys.modules, 'ray'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
