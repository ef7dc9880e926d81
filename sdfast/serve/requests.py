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

from ..request import MAX_SEED, to_rgb
from ..schedulers import SCHEDULERS, STOCHASTIC_SCHEDULERS

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # the only decoders an upload reaches
LONGEST_INT = 40  # digits (and sign) of the longest JSON integer read as a number; longer ones fail every limit
SHOWN_CHARS = 40  # of a client's value in a message


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
    max_side: int = 4096  # each side of the output: a 64x16384 strip fits max_pixels but no model draws it well
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
    width: int  # of the output: as asked, else the model's own size (txt2img) or the input's (img2img)
    height: int
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


def parse_request(body: bytes, kind: str, limits: Limits, model_id: str, size: tuple[int, int]) -> GenerationRequest:
    """``body`` (JSON) of a ``kind`` ("txt2img" or "img2img") request, checked against ``limits``; ``model_id`` is
    the one model this server runs (a request may name it, and nothing else), ``size`` its own (width, height),
    which fills a side a txt2img request leaves out."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes is over the limit max_body_bytes="
                                f"{limits.max_body_bytes}: send a smaller image")
    try:
        data = json.loads(body, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(422, f"the body is not JSON ({e}): send a JSON object such as "
                                '{"prompt": "a red circle"}') from None
    except RecursionError:
        raise RequestError(422, 'JSON nested too deep: send a flat JSON object such as {"prompt": "a red circle"}') \
            from None
    if not isinstance(data, dict):
        raise RequestError(422, "the body must be a JSON object such as {\"prompt\": \"a red circle\"}")
    allowed = [f for f in FIELDS if kind == "img2img" or f not in IMG2IMG_ONLY]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise RequestError(422, f"unknown field(s) {', '.join(map(_show, unknown[:3]))}{more} for {kind}: the "
                                f"fields are {', '.join(allowed)}")
    values = {}
    for name in allowed:
        types, default = FIELDS[name]
        value = data.get(name)
        if value is None:  # absent or null
            value = default
        elif not isinstance(value, types) or isinstance(value, bool):
            expected = types.__name__ if isinstance(types, type) else "a number"
            shown = "" if isinstance(value, (dict, list)) else f" ({_show(value)})"
            raise RequestError(422, f"field {name!r} must be {expected}, not {_type_name(value)}{shown}")
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError as e:  # a lone surrogate ("\udcff"): not text the tokenizer can read
                raise RequestError(422, f"field {name!r} holds {value[e.start]!r} at index {e.start}, a lone "
                                        "surrogate that is no Unicode character: send UTF-8 text") from None
        values[name] = value
    return _check(values, kind, limits, model_id, size)


def _check(v: dict, kind: str, limits: Limits, model_id: str, size: tuple[int, int]) -> GenerationRequest:
    """The limits, cheapest first: an upload's pixels are decoded last, once its header's size has passed."""
    def fail(message: str):
        raise RequestError(422, message)

    if not v["prompt"]:
        fail("field 'prompt' is required: say what to draw")
    for name in ("prompt", "negative_prompt"):
        if len(v[name]) > limits.max_prompt_chars:
            fail(f"{name} of {len(v[name])} characters is over the limit max_prompt_chars={limits.max_prompt_chars}"
                 " (CLIP reads the first 77 tokens): shorten it")
    if v["model"] is not None and v["model"] != model_id:
        fail(f"model {_show(v['model'])} is not served here: this server runs {model_id!r} (GET /v1/models)")
    if not 1 <= v["steps"] <= limits.max_steps:
        fail(f"steps={v['steps']} is outside 1..{limits.max_steps} (limit max_steps)")
    if not 1 <= v["n"] <= limits.max_images:
        fail(f"n={v['n']} images is outside 1..{limits.max_images} (limit max_images)")
    if not -1e3 <= v["guidance"] <= 1e3:
        fail(f"guidance={v['guidance']} is outside [-1000, 1000]: use e.g. 7.5 (<= 1 turns guidance off)")
    for name in ("width", "height"):
        if v[name] is not None and (v[name] <= 0 or v[name] % 8):
            fail(f"{name}={v[name]} is not a positive multiple of 8")
        if v[name] is not None and v[name] > limits.max_side:
            fail(f"{name}={v[name]} is over the limit max_side={limits.max_side}: ask for a smaller size")
    if v["scheduler"] not in SCHEDULERS:
        fail(f"unknown scheduler {_show(v['scheduler'])}; choose one of {', '.join(sorted(SCHEDULERS))}")
    if v["output"] not in ("json", "png"):
        fail(f"output={_show(v['output'])}: use 'json' (base64 images, seed, timings) or 'png' (one image's bytes)")
    if v["output"] == "png" and v["n"] != 1:
        fail(f"output='png' returns one image but n={v['n']}: ask for output='json' to get several")
    seed = v["seed"] if v["seed"] is not None else random.randrange(MAX_SEED + 1)
    if not 0 <= seed <= MAX_SEED:  # sdfast.request.MAX_SEED says why: larger seeds repeat smaller ones' pictures
        fail(f"seed={seed} is outside 0..{MAX_SEED} (2**32 - 1): send a non-negative integer below 2**32, or none "
             "for a drawn one")
    image, strength = None, 0.8
    if kind == "img2img":
        if v["image"] is None:
            fail("field 'image' is required for img2img: the input picture as base64 (PNG, JPEG or WebP bytes)")
        if not 0.0 <= v["strength"] <= 1.0:
            fail(f"strength={v['strength']} is outside [0, 1]")
        strength = float(v["strength"])
        image = _open_image(v["image"], limits)
        origin = "the input's size"  # img2img keeps it unless told otherwise
        width, height = v["width"] or image.width // 8 * 8, v["height"] or image.height // 8 * 8
    else:
        origin = "the model's own size"
        width, height = v["width"] or size[0], v["height"] or size[1]
    filled = " and ".join(name for name in ("width", "height") if v[name] is None)
    shape = f"{width}x{height}" + (f" ({filled}: {origin})" if filled else "")
    if min(width, height) < 8:
        fail(f"output {shape} has a side under 8 pixels: pass width and height, or send a larger image")
    if max(width, height) > limits.max_side:
        fail(f"output {shape} has a side over the limit max_side={limits.max_side}: pass a smaller width and height")
    if width * height > limits.max_pixels:
        fail(f"{shape} is {width * height} pixels, over the limit max_pixels={limits.max_pixels}: ask for a smaller "
             "size")
    if image is not None:
        image = _rgb(image)
    return GenerationRequest(v["prompt"], v["negative_prompt"], v["steps"], float(v["guidance"]), width, height,
                             seed, v["scheduler"], v["n"], v["output"], image, strength)


def _open_image(text: str, limits: Limits) -> Image.Image:
    """base64 -> an opened picture: its header is read and its size checked, none of its pixels decoded."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "field 'image' is not valid base64: send the file's bytes base64-encoded") from None
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(422, "field 'image' declares a size Pillow calls a decompression bomb, far over the "
                                f"limit max_image_pixels={limits.max_image_pixels}: downscale it first") from None
    except Exception:  # Pillow's parsers raise many kinds of error on hostile bytes; each is the client's mistake
        raise RequestError(422, "field 'image' is not a PNG, JPEG or WebP image (cannot identify it): send one of "
                                "those, base64-encoded") from None
    if img.width * img.height > limits.max_image_pixels:
        raise RequestError(422, f"input image {img.width}x{img.height} is over the limit max_image_pixels="
                                f"{limits.max_image_pixels}: downscale it first")
    return img


def _rgb(img: Image.Image) -> Image.Image:
    """The picture as 8-bit RGB (``sdfast.request.to_rgb``), decoded now that its header has passed."""
    try:
        return to_rgb(img)
    except Exception:  # a truncated or corrupt body behind a valid header: Pillow's decoders raise many kinds
        raise RequestError(422, "field 'image' does not decode (truncated or corrupt): send an intact PNG, JPEG or "
                                "WebP image") from None


def _parse_int(text: str) -> int:
    """A JSON integer; one of over ``LONGEST_INT`` characters is kept as a ``_LongInt`` instead of converted
    (Python refuses over 4300 digits, and a few thousand cost quadratic time)."""
    return int(text) if len(text) <= LONGEST_INT else _LongInt(text)


class _LongInt(int):
    """An integer longer than any limit: it compares as +-10**40, so every range check refuses it, and prints
    shortened."""

    def __new__(cls, text: str):
        self = super().__new__(cls, -10**LONGEST_INT if text.startswith("-") else 10**LONGEST_INT)
        self.text = f"{text[:12]}...({len(text.lstrip('-'))} digits)"
        return self

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def _type_name(value) -> str:
    return "int" if isinstance(value, _LongInt) else type(value).__name__


def _show(value) -> str:
    """A client's scalar as a message shows it: one line (``repr`` escapes newlines and lone surrogates), shortened."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS - 10]}...({len(text)} characters)"
