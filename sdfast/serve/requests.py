"""What a client may ask the server for, and the limits it is held to: JSON in, a checked ``GenerationRequest`` out.

Plain Python (no Ray, no FastAPI), so the rules can be read and tested on their own. Every field is named in
``FIELDS``; anything else is refused, so no request can name a file path, a model on disk or a pipeline option the
server does not expose. Each rejection is a ``RequestError`` whose HTTP status (413 for an oversized body, 422 for
everything else) and one-line message name the field, the limit and the fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
from dataclasses import dataclass

from PIL import Image

from ..interpolate import STOCHASTIC_SCHEDULERS
from ..schedulers import SCHEDULERS


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP code, the message says what to change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may cost. The defaults admit SD 1.5 / 2.1 at their own sizes with room to spare, and
    refuse requests that would hold a replica for minutes or exhaust its memory."""

    max_pixels: int = 1024 * 1024  # width x height of the output; SD 1.5 runs at 512x512 = 262,144
    max_steps: int = 150  # a 150-step SD 1.5 image is ~1.5 s on an H100; more buys nothing visible
    max_images: int = 4  # images per request ("n"); the batcher may still group several requests
    max_prompt_chars: int = 2000  # CLIP reads 77 tokens (~300 characters); the rest is cut, so longer is a mistake
    max_body_bytes: int = 8 * 2**20  # the whole JSON body, base64 image included
    max_image_pixels: int = 4096 * 4096  # a decoded upload; guards against decompression bombs


# field: (type(s), default). "image" and "strength" are for img2img only.
FIELDS = {
    "prompt": (str, None),
    "negative_prompt": (str, ""),
    "steps": (int, 30),
    "guidance": ((int, float), 7.5),
    "width": (int, None),
    "height": (int, None),
    "seed": (int, None),
    "scheduler": (str, "euler"),
    "n": (int, 1),
    "model": (str, None),
    "output": (str, "json"),
    "strength": ((int, float), 0.8),
    "image": (str, None),
}
IMG2IMG_ONLY = ("image", "strength")


@dataclass(frozen=True)
class GenerationRequest:
    """One checked request. ``seed`` is always set (the front draws one when the client gave none), so a retry on
    another replica paints the same picture."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    width: int | None  # None: the model's own size
    height: int | None
    seed: int
    scheduler: str
    n: int  # images for this prompt
    output: str  # "json" (base64 PNGs, seed, timings) or "png" (the bytes of one image)
    image: Image.Image | None = None  # img2img input, decoded
    strength: float = 0.8

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one ``Pipeline.generate`` call and give the same pixels as alone:
        same size, steps, scheduler and guidance (the sampler applies one scale to the batch). None: never
        batched. img2img is not (``generate`` takes one input image), nor are schedulers that draw fresh noise
        at every step (a batch shares one generator, so a batched image would differ from the same seed alone)."""
        if self.image is not None or self.scheduler in STOCHASTIC_SCHEDULERS:
            return None
        return (self.width, self.height, self.steps, self.scheduler, float(self.guidance))


def parse_request(body: bytes, kind: str, limits: Limits, model_id: str) -> GenerationRequest:
    """``body`` (JSON) of a ``kind`` ("txt2img" or "img2img") request, checked against ``limits``; ``model_id`` is
    the one model this server runs (a request may name it, and nothing else)."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes is over the limit max_body_bytes="
                                f"{limits.max_body_bytes}: send a smaller image")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(422, f"the body is not JSON ({e}): send a JSON object such as "
                                '{"prompt": "a red circle"}') from None
    if not isinstance(data, dict):
        raise RequestError(422, "the body must be a JSON object such as {\"prompt\": \"a red circle\"}")
    allowed = [f for f in FIELDS if kind == "img2img" or f not in IMG2IMG_ONLY]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))} for {kind}: the fields are "
                                f"{', '.join(allowed)}")
    values = {}
    for name in allowed:
        types, default = FIELDS[name]
        value = data.get(name, default)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            expected = types.__name__ if isinstance(types, type) else "a number"
            raise RequestError(422, f"field {name!r} must be {expected}, not {type(value).__name__}")
        values[name] = value
    return _check(values, kind, limits, model_id)


def _check(v: dict, kind: str, limits: Limits, model_id: str) -> GenerationRequest:
    def fail(message: str):
        raise RequestError(422, message)

    if not v["prompt"]:
        fail("field 'prompt' is required: say what to draw")
    for name in ("prompt", "negative_prompt"):
        if len(v[name]) > limits.max_prompt_chars:
            fail(f"{name} of {len(v[name])} characters is over the limit max_prompt_chars={limits.max_prompt_chars}"
                 " (CLIP reads the first 77 tokens): shorten it")
    if v["model"] is not None and v["model"] != model_id:
        fail(f"model {v['model']!r} is not served here: this server runs {model_id!r} (GET /v1/models)")
    if not 1 <= v["steps"] <= limits.max_steps:
        fail(f"steps={v['steps']} is outside 1..{limits.max_steps} (limit max_steps)")
    if not 1 <= v["n"] <= limits.max_images:
        fail(f"n={v['n']} images is outside 1..{limits.max_images} (limit max_images)")
    if not -1e3 <= v["guidance"] <= 1e3:
        fail(f"guidance={v['guidance']} is outside [-1000, 1000]: use e.g. 7.5 (<= 1 turns guidance off)")
    for name in ("width", "height"):
        if v[name] is not None and (v[name] <= 0 or v[name] % 8):
            fail(f"{name}={v[name]} is not a positive multiple of 8")
    if v["width"] and v["height"] and v["width"] * v["height"] > limits.max_pixels:
        fail(f"{v['width']}x{v['height']} is {v['width'] * v['height']} pixels, over the limit max_pixels="
             f"{limits.max_pixels}: ask for a smaller size")
    if v["scheduler"] not in SCHEDULERS:
        fail(f"unknown scheduler {v['scheduler']!r}; choose one of {', '.join(sorted(SCHEDULERS))}")
    if v["output"] not in ("json", "png"):
        fail(f"output={v['output']!r}: use 'json' (base64 images, seed, timings) or 'png' (one image's bytes)")
    if v["output"] == "png" and v["n"] != 1:
        fail(f"output='png' returns one image but n={v['n']}: ask for output='json' to get several")
    seed = v["seed"] if v["seed"] is not None else random.randrange(2**63)
    if not 0 <= seed < 2**63:
        fail(f"seed={seed} is outside 0..2**63-1")
    image, strength = None, 0.8
    if kind == "img2img":
        if v["image"] is None:
            fail("field 'image' is required for img2img: the input picture as base64 (PNG or JPEG bytes)")
        image = _decode_image(v["image"], limits)
        strength = float(v["strength"])
        if not 0.0 <= strength <= 1.0:
            fail(f"strength={strength} is outside [0, 1]")
        width, height = v["width"] or image.width // 8 * 8, v["height"] or image.height // 8 * 8
        if width * height > limits.max_pixels:  # img2img keeps the input's size unless told otherwise
            fail(f"img2img output {width}x{height} is {width * height} pixels, over the limit max_pixels="
                 f"{limits.max_pixels}: pass a smaller width and height, or a smaller image")
    return GenerationRequest(v["prompt"], v["negative_prompt"], v["steps"], float(v["guidance"]), v["width"],
                             v["height"], seed, v["scheduler"], v["n"], v["output"], image, strength)


def _decode_image(text: str, limits: Limits) -> Image.Image:
    """base64 -> RGB picture; the header's size is checked before any pixel is decoded."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "field 'image' is not valid base64: send the file's bytes base64-encoded") from None
    try:
        img = Image.open(io.BytesIO(data))
    except OSError as e:
        raise RequestError(422, f"field 'image' is not a readable picture ({e}): send PNG or JPEG bytes") from None
    if img.width * img.height > limits.max_image_pixels:
        raise RequestError(422, f"input image {img.width}x{img.height} is over the limit max_image_pixels="
                                f"{limits.max_image_pixels}: downscale it first")
    try:
        return img.convert("RGB")
    except OSError as e:
        raise RequestError(422, f"field 'image' does not decode ({e}): send an intact PNG or JPEG") from None
