"""Property test of the request parser: whatever JSON a client sends, the answer is a checked request or a clean
refusal (413/422, one short line), never another exception that the front would turn into a 500."""

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdfast.request import ModelFacts
from sdfast.schedulers import SCHEDULERS
from sdfast.serve.requests import FIELDS, GenerationRequest, Limits, RequestError, parse_request

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

LIMITS = Limits(max_pixels=256 * 256, max_side=512, max_steps=50, max_images=4, max_prompt_chars=200,
                max_body_bytes=64 * 1024, max_image_pixels=512 * 512)
MODEL = ModelFacts(vae_scale_factor=8, default_size=64, latent_channels=4, clip_layers=12, is_xl=False,
                   aesthetic=False)  # its own size: 64x64


def _b64(img: Image.Image, **save) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return base64.b64encode(buf.getvalue()).decode()


def _bomb_header() -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


IMAGES = [_b64(Image.new("RGB", (72, 64), (200, 30, 30))), _b64(Image.fromarray(np.full((16, 16), 999, np.uint16))),
          _b64(Image.new("RGBA", (24, 8), (0, 0, 0, 0))), _b64(Image.new("P", (8, 8)), transparency=0),
          _b64(Image.new("RGB", (4, 4))), _b64(Image.new("L", (1024, 8))), _bomb_header(),
          base64.b64encode(b"not a picture").decode(), "not base64!"]

# JSON text, built as text so that it can hold what json.dumps cannot write: integers of thousands of digits.
text = st.text(st.characters(exclude_categories=()), max_size=30)  # lone surrogates included
scalars = st.one_of(
    st.sampled_from(["null", "true", "false", "NaN", "Infinity", "-Infinity", "1e999", "-0", "0.5", "1.0"]),
    st.integers().map(str),
    st.integers(-2**70, 2**70).map(str),
    st.tuples(st.sampled_from(["", "-"]), st.integers(1, 6000)).map(lambda t: t[0] + "9" * t[1]),
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),
    text.map(json.dumps),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
    st.dictionaries(text.map(json.dumps), inner, max_size=4).map(
        lambda d: "{" + ",".join(f"{k}:{v}" for k, v in d.items()) + "}")), max_leaves=12)
deep = st.integers(1, 5000).map(lambda n: "[" * n + "]" * n)


PLAUSIBLE = {  # per field: a good value first, then limits and their neighbours
    "prompt": ["a red circle", "", "x" * 201],
    "negative_prompt": ["blurry", ""],
    "steps": [1, 50, 51, 0, -1],
    "guidance": [7.5, 1, 1000, 1000.5, -1000],
    "width": [8, 64, 512, 520, 60, 0, -8],
    "height": [8, 64, 512, 520, 60, 0, -8],
    "seed": [0, 2**32 - 1, 2**32, 2**64, -1, -2**63],
    "scheduler": sorted(SCHEDULERS),
    "n": [1, 4, 5, 0],
    "model": ["tiny", "/etc/passwd"],
    "output": ["json", "png"],
    "strength": [0.0, 0.8, 1.0, 1.5],
    "image": IMAGES,
    "controls": [[{"model": "edges", "image": IMAGES[0], "scale": 0.5, "start": 0.1, "end": 0.9}], [],
                 [{"model": "edges", "image": IMAGES[2]}, {"model": "edges", "image": IMAGES[4], "scale": None}],
                 [{"model": "edges", "image": IMAGES[0]}] * 3, [{"model": "../edges", "image": IMAGES[0]}],
                 [{"model": "edges", "image": IMAGES[6]}], [{"model": "edges", "image": IMAGES[8]}],
                 [{"model": "edges", "image": IMAGES[0], "scale": 11}],
                 [{"model": "edges", "image": IMAGES[0], "start": 0.9, "end": 0.1}],
                 [{"model": "edges"}], [{"model": "edges", "image": IMAGES[0], "path": "/etc/passwd"}], ["edges"]],
}
OFFERED_CONTROLNETS = frozenset({"edges"})


@st.composite
def bodies(draw, kind: str) -> bytes:
    """Mostly a JSON object of the kind's fields, each there or not, now and then with a stranger among them;
    else any JSON, or any bytes."""
    shape = draw(st.sampled_from(["fields"] * 6 + ["json", "deep", "bytes"]))
    if shape == "json":
        return draw(values).encode()
    if shape == "deep":
        return draw(deep).encode()
    if shape == "bytes":
        return draw(st.binary(max_size=64))
    fields = {}
    for name in PLAUSIBLE:
        present = draw(st.integers(0, 9)) > (0 if name in ("prompt", "image") else 4)
        if present and (kind == "img2img" or name not in ("image", "strength")):
            odds = draw(st.integers(0, 19))  # 1 in 20 any JSON, 1 in 40 deep nesting, about half the good value
            fields[name] = (draw(values) if odds == 0 else draw(st.sampled_from([draw(deep), draw(values)]))
                            if odds == 1 else json.dumps(PLAUSIBLE[name][0] if odds < 11 else
                                                         draw(st.sampled_from(PLAUSIBLE[name]))))
    if draw(st.integers(0, 5)) == 0:
        fields[draw(st.one_of(st.sampled_from(sorted(FIELDS)), text))] = draw(values)
    return ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}").encode()


@hypothesis.settings(max_examples=200, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(kind_and_body=st.sampled_from(["txt2img", "img2img"]).flatmap(
    lambda kind: st.tuples(st.just(kind), bodies(kind))))
def test_any_body_is_a_checked_request_or_a_clean_refusal(kind_and_body):
    kind, body = kind_and_body
    try:
        req = parse_request(body, kind, LIMITS, "tiny", MODEL, controlnets=OFFERED_CONTROLNETS)
    except RequestError as e:
        message = str(e)
        assert e.status in (413, 422), (e.status, message)
        assert message and "\n" not in message and len(message) < 400, message
        assert " object at 0x" not in message and "Traceback" not in message, message
        message.encode()  # JSON-ready: no lone surrogate echoed back
        return
    assert isinstance(req, GenerationRequest) and set(json.loads(body)) <= set(FIELDS)
    assert 1 <= req.steps <= LIMITS.max_steps and 1 <= req.n <= LIMITS.max_images and 0 <= req.seed < 2**32
    assert req.width % 8 == 0 and req.height % 8 == 0 and 8 <= min(req.width, req.height)
    assert max(req.width, req.height) <= LIMITS.max_side and req.width * req.height <= LIMITS.max_pixels
    assert req.scheduler in SCHEDULERS and req.output in ("json", "png") and np.isfinite(req.guidance)
    req.prompt.encode(), req.negative_prompt.encode()
    assert (req.image is None) == (kind == "txt2img") and (req.image is None or req.image.mode == "RGB")
    key = req.batch_key()
    assert len(req.controls) <= LIMITS.max_controls and (key is None or isinstance(hash(key), int))  # a queue's name
    for c in req.controls:
        assert c.model in OFFERED_CONTROLNETS and c.image.mode == "RGB" and abs(c.scale) <= 10
        assert 0 <= c.start < c.end <= 1
