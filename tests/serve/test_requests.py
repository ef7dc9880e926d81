"""Request parsing and limits (plain Python, no Ray): every refusal names the field or the limit."""

import asyncio
import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdfast.cli import main
from sdfast.request import ModelFacts
from sdfast.serve.loadtest import run_load
from sdfast.serve.options import ServeOptions
from sdfast.serve.requests import Limits, RequestError, parse_request

LIMITS = Limits(max_pixels=128 * 128, max_side=256, max_steps=50, max_images=2, max_prompt_chars=40,
                max_body_bytes=4000, max_image_pixels=64 * 64)
KEY = "0123456789abcdef"  # long enough for a public bind


def png_b64(size=(64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def model(side=64) -> ModelFacts:
    """An SD 1.x model drawing ``side`` x ``side`` by default, as a replica reports it (``Pipeline.facts``)."""
    return ModelFacts(vae_scale_factor=8, default_size=side, latent_channels=4, clip_layers=12, is_xl=False,
                      aesthetic=False)


def parse(kind="txt2img", side=64, **fields):
    return parse_request(json.dumps(fields).encode(), kind, LIMITS, "tiny", model(side))


def refusal(body: bytes, kind="txt2img", limits=LIMITS, side=64) -> RequestError:
    with pytest.raises(RequestError) as e:
        parse_request(body, kind, limits, "tiny", model(side))
    message = str(e.value)
    assert "\n" not in message and " object at 0x" not in message and len(message) < 300, message
    return e.value


def test_defaults_and_a_drawn_seed():
    a, b = parse(prompt="a red circle"), parse(prompt="a red circle")
    assert (a.steps, a.guidance, a.scheduler, a.n, a.output, a.width, a.image) == (30, 7.5, "euler", 1, "json",
                                                                                 64, None)
    assert 0 <= a.seed < 2**32 and a.seed != b.seed  # fixed before dispatch, so a retry redraws the same image


def test_batch_key_groups_only_what_one_call_can_hold():
    base = dict(prompt="x", width=64, height=64, steps=4, seed=1)
    key = parse(**base).batch_key()
    assert parse(**{**base, "prompt": "y", "seed": 2, "n": 2, "negative_prompt": "z"}).batch_key() == key
    for change in ({"steps": 5}, {"width": 72}, {"scheduler": "ddim"}, {"guidance": 3.0}):
        assert parse(**{**base, **change}).batch_key() != key
    assert parse(**{**base, "scheduler": "euler_a"}).batch_key() is None  # fresh noise per step: never batched
    assert parse("img2img", image=png_b64(), **base).batch_key() is None


@pytest.mark.parametrize("fields,status,message", [  # the shared rules' texts (sdfast.request), in JSON names
    ({"prompt": "x", "steps": 51}, 422, "steps=51: over the limit of 50 (limits.max_steps)"),
    ({"prompt": "x", "n": 3}, 422, "n=3: over the limit of 2 (limits.max_images)"),
    ({"prompt": "x", "width": 256, "height": 256}, 422, "width x height='256x256': 0.1 Mpx is over the limit of "
                                                        "0.0 Mpx per image (limits.max_pixels)"),
    ({"prompt": "x" * 41}, 422, "prompt='xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx': 41 characters is over the "
                                "limit of 40 (limits.max_prompt_chars"),
    ({"prompt": "x", "negative_prompt": "y" * 41}, 422, "negative_prompt='yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy': "
                                                        "41 characters"),
    ({"prompt": "x" * 30, "negative_prompt": "y" * 4000}, 413, "over the limit max_body_bytes=4000"),
    ({"prompt": "x", "width": 60}, 422, "width x height='60x64': not a positive multiple of 8: use e.g. 56x64"),
    ({"prompt": "x", "scheduler": "nope"}, 422, "scheduler='nope': unknown; choose one of ddim, "),
    ({"prompt": "x", "steps": "4"}, 422, "steps='4': need an integer"),
    ({"prompt": "x", "steps": True}, 422, "steps=True: need an integer"),
    ({"steps": 4}, 422, "prompt=None: required: say what to draw"),
    ({"prompt": "x", "model": "/models/other.safetensors"}, 422, "model='/models/other.safetensors': not served "
                                                                 "here: this server runs 'tiny'"),
    ({"prompt": "x", "model_path": "/etc/passwd"}, 422, "unknown field(s) 'model_path'"),
    ({"prompt": "x", "image": "AAAA"}, 422, "unknown field(s) 'image' for txt2img"),
    ({"prompt": "x", "output": "png", "n": 2}, 422, "output='png': returns one image but n=2"),
    ({"prompt": "x", "seed": -1}, 422, "seed=-1: need an integer >= 0"),
    ({"prompt": "x", "seed": 2**64}, 422, "seed=18446744073709551616: over 4294967295: seeds run 0 .. 2**32 - 1"),
    ({"prompt": "x", "seed": 2**32 + 5}, 422, "seed=4294967301: over 4294967295: torch's CPU generator keeps a "
                                              "seed's low 32 bits, so this seed paints the picture of seed 5"),
    ({"prompt": "x", "seed": -2**63}, 422, "seed=-9223372036854775808: need an integer >= 0"),  # torch: 2**63
])
def test_txt2img_refusals(fields, status, message):
    with pytest.raises(RequestError, match=None) as e:
        parse(**fields)
    assert e.value.status == status and message in str(e.value), str(e.value)


@pytest.mark.parametrize("fields,message", [
    ({}, "image=None: required for img2img"),
    ({"image": "not base64!"}, "image='not base64!': not valid base64"),
    ({"image": base64.b64encode(b"not a picture").decode()}, "image='the image': cannot read it: not a PNG/JPEG/WEBP "
                                                             "picture"),
    ({"image": png_b64((72, 64))}, "image='the image': 72x64 pixels is over the limit of 0 Mpx for an input picture "
                                   "(limits.max_image_pixels)"),
    ({"image": png_b64(), "strength": 1.5}, "strength=1.5: outside [0, 1]"),
])
def test_img2img_refusals(fields, message):
    with pytest.raises(RequestError) as e:
        parse("img2img", prompt="x", **fields)
    assert e.value.status == 422 and message in str(e.value), str(e.value)


def test_body_that_is_not_a_json_object():
    for body, message in ((b"{", "the body is not JSON"), (b"[1]", "must be a JSON object")):
        with pytest.raises(RequestError, match=message):
            parse_request(body, "txt2img", LIMITS, "tiny", model())


def test_img2img_decodes_the_upload():
    req = parse("img2img", prompt="x", image=png_b64(), strength=0.5)
    assert req.image.size == (64, 64) and req.image.mode == "RGB" and req.strength == 0.5


@pytest.mark.parametrize("fields,side,message", [
    ({"height": 20000, "steps": 1, "n": 2}, 64, "height=20000: over the limit of 16384 (limits.max_pixels)"),
    ({"width": 264}, 64, "width=264: over the limit of 256 (limits.max_side)"),
    ({"height": 256}, 128, "width x height='128x256': 0.0 Mpx is over the limit of 0.0 Mpx per image"),
    ({"width": 256}, 128, "width x height='256x128': 0.0 Mpx is over the limit"),
    ({}, 256, "width x height='256x256': 0.1 Mpx is over the limit"),
])
def test_one_side_is_checked_with_the_models_own_filling_the_other(fields, side, message):
    e = refusal(json.dumps({"prompt": "a red circle", **fields}).encode(), side=side)
    assert e.status == 422 and message in str(e), str(e)
    assert (parse(side=64, prompt="x", height=256).width, parse(side=64, prompt="x").height) == (64, 64)


def test_the_probes_tall_strip_is_refused_under_the_default_limits():
    body = json.dumps({"prompt": "a red circle", "height": 20000, "steps": 1, "n": 4}).encode()
    assert "height=20000: over the limit of 4096 (limits.max_side)" in str(refusal(body, limits=Limits(), side=512))
    body = json.dumps({"prompt": "a red circle", "height": 4096}).encode()
    assert "width x height='512x4096': 2.0 Mpx is over the limit of 1.0 Mpx per image (limits.max_pixels)" in str(
        refusal(body, limits=Limits(), side=512))


@pytest.mark.parametrize("body,message", [
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
     "seed=999999999999...(5000 digits): over 4294967295: seeds run 0 .. 2**32 - 1"),
    (b'{"prompt": "x", "seed": -' + b"9" * 5000 + b"}", "seed=-99999999999...(5000 digits): need an integer >= 0"),
    (b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}", "steps=999999999999...(5000 digits): over the limit of 150"),
    (b'{"prompt": ' + b"1" * 5000 + b"}", "prompt=111111111111...(5000 digits): need a string"),
    (b'{"prompt": "x", "width": ' + b"8" * 5000 + b"}", "width=888888888888...(5000 digits): over the limit"),
    (b'{"prompt": "x", "guidance": ' + b"9" * 5000 + b"}", "guidance=999999999999...(5000 digits): outside "
                                                           "[-1000, 1000]"),
    (b'{"prompt": "x", "guidance": NaN}', "guidance=nan: not a finite number"),
    (b'{"prompt": "x", "guidance": 1e999}', "guidance=inf: not a finite number"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deep"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deep"),
    (b'{"prompt": "\\udcff"}', r"prompt='\udcff': holds a character that is not Unicode text (a lone surrogate at "
                               "position 0)"),
    (b'{"prompt": "x", "negative_prompt": "ok \\ud800"}', r"negative_prompt='ok \ud800': holds a character that is "
                                                          "not Unicode text (a lone surrogate at position 3)"),
    (b'{"prompt": "x", "steps": [[1]]}', "field 'steps' holds a JSON array: send a single value"),
    (b'{"prompt": "x", "model": "' + b"m" * 5000 + b'"}', "model='" + "m" * 79 + "...(5002 characters): not served "
                                                          "here"),
    (b'{"prompt": "x", "a": 1, "b": 2, "c": 3, "d\\n": 4}', r"unknown field(s) 'a', 'b', 'c' and 1 more for txt2img"),
    (b"\xff\xfe\x00", "the body is not JSON"),
], ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else "")
def test_hostile_values_are_one_line_422s(body, message):
    e = refusal(body, limits=Limits())
    assert e.status == 422 and message in str(e), str(e)


def test_seeds_are_what_torch_takes_and_null_means_the_default():
    """0 .. 2**32 - 1: torch's CPU generator keeps a seed's low 32 bits, so a larger seed would silently repeat a
    smaller one's picture (and a negative one wraps onto a positive one)."""
    import torch

    assert parse(prompt="x", seed=2**32 - 1).seed == 2**32 - 1 and parse(prompt="x", seed=0).seed == 0
    assert torch.equal(torch.randn(4, generator=torch.Generator().manual_seed(5)),
                       torch.randn(4, generator=torch.Generator().manual_seed(5 + 2**32)))  # why 2**32 is refused
    req = parse(prompt="x", steps=None, guidance=None, scheduler=None, n=None, seed=None)
    assert (req.steps, req.guidance, req.scheduler, req.n) == (30, 7.5, "euler", 1) and 0 <= req.seed < 2**32


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixels: what a decompression bomb shows a reader
    before it inflates."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def image_body(data: bytes, **fields) -> bytes:
    return json.dumps({"prompt": "x", "image": base64.b64encode(data).decode(), **fields}).encode()


def encoded(img: Image.Image, fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("data,message", [
    (png_header(20000, 20000), "image='the image': cannot read it: Image size (400000000 pixels) exceeds limit of "
                               "178956970 pixels, could be decompression bomb DOS attack."),
    (png_header(5000, 5000), "image='the image': 5000x5000 pixels is over the limit of 16 Mpx for an input picture "
                             "(limits.max_image_pixels)"),
    (png_header(64, 64), "image='the image': cannot read it: "),  # truncated: Pillow names what is missing
    (b"GIF89a" + bytes(64), "image='the image': cannot read it: not a PNG/JPEG/WEBP picture"),  # no GIF decoder
    (encoded(Image.new("RGB", (5, 5))), "width x height='0x0': not a positive multiple of 8: use e.g. 8x8"),
    (encoded(Image.new("RGB", (4200, 8))), "width x height='4200x8': a side is over the limit of 4096 "
                                           "(limits.max_side)"),
], ids=lambda v: "" if isinstance(v, bytes) else v[:40])
def test_an_upload_is_sized_from_its_header_before_it_decodes(data, message):
    e = refusal(image_body(data), "img2img", limits=Limits())
    assert e.status == 422 and message in str(e), str(e)


@pytest.mark.parametrize("img,pixel", [
    (Image.fromarray(np.full((64, 64), 40000, np.uint16)), (156, 156, 156)),  # "I;16": 40000 / 257, not white
    (Image.new("RGBA", (64, 64), (200, 0, 0, 0)), (255, 255, 255)),  # transparent: the white behind it
    (Image.new("RGBA", (64, 64), (200, 0, 0, 255)), (200, 0, 0)),
    (Image.new("LA", (64, 64), (0, 128)), (127, 127, 127)),  # half-transparent black over white
    (Image.new("1", (64, 64), 1), (255, 255, 255)),
])
def test_an_upload_becomes_the_rgb_a_viewer_shows(img, pixel):
    req = parse_request(image_body(encoded(img)), "img2img", Limits(), "tiny", model())
    assert req.image.mode == "RGB" and req.image.size == (64, 64)
    assert req.image.getpixel((0, 0)) == pytest.approx(pixel, abs=1), img.mode


def test_a_palette_upload_with_a_transparent_colour():
    img = Image.new("P", (64, 64), 1)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.putpixel((1, 0), 0)
    req = parse_request(image_body(encoded(img, transparency=1)), "img2img", Limits(), "tiny", model())
    assert req.image.getpixel((0, 0)) == (255, 255, 255) and req.image.getpixel((1, 0)) == (0, 0, 0)


def test_a_public_bind_refuses_a_guessable_key(monkeypatch):
    monkeypatch.delenv("SDFAST_API_KEY", raising=False)
    with pytest.raises(ValueError, match="binding to 0.0.0.0 exposes the server"):
        ServeOptions(host="0.0.0.0", api_key="")  # an empty key is no key
    for key in ("change-me", KEY[:-1]):
        with pytest.raises(ValueError, match=f"an API key of {len(key)} characters, which anyone may guess .* at "
                                             "least 16 random characters"):
            ServeOptions(host="0.0.0.0", api_key=key)
    monkeypatch.setenv("SDFAST_API_KEY", "change-me")
    with pytest.raises(ValueError, match="with an API key of 9 characters, which anyone may guess"):
        ServeOptions(host="0.0.0.0")
    assert ServeOptions(host="127.0.0.1").api_key == "change-me"  # loopback: any key, only this machine reaches it
    with pytest.raises(ValueError, match="what an HTTP header cannot carry"):
        ServeOptions(api_key=KEY + " ")


def test_a_public_bind_needs_an_api_key(monkeypatch):
    monkeypatch.delenv("SDFAST_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"binding to 0.0.0.0 exposes the server .* \$SDFAST_API_KEY"):
        ServeOptions(host="0.0.0.0")
    assert ServeOptions(host="0.0.0.0", api_key=KEY).api_key == KEY
    monkeypatch.setenv("SDFAST_API_KEY", KEY + "-env")
    assert ServeOptions(host="::").api_key == KEY + "-env"
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
    monkeypatch.setenv("SDFAST_API_KEY", KEY)  # both bind 0.0.0.0, so both need the key (from the environment)
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
