"""What a client may ask the server for: a JSON body in, a checked ``GenerationRequest`` out.

Plain Python (no Ray, no FastAPI), so the rules can be read and tested on their own. The fields the Python API has
too (``steps``, ``guidance``, ``width`` / ``height``, ``seed``, ``scheduler``, ``n``, ``strength``, ``image``,
``loras``, ``controls``) go through its rules, ``sdfast.request.Request.check`` and ``fit``, with the server's limits
as ``sdfast.request.Limits``: each field has one rule and one message for the API, the CLI and the server, worded
here with the JSON names (``n=5: over the limit of 4 (limits.max_images)``). What only a server has stays here: the
body's shape (a JSON object of single values, but for ``loras`` and ``controls``; a hostile body is a 413 or a 422,
never a 500), the limits of its own (``max_side``, ``max_prompt_chars``, ``max_body_bytes``, ``max_loras``,
``max_controls``), base64 uploads that reach three decoders only, the one model it serves, the LoRAs and
ControlNets it offers by name, and ``output``. Every field is named in ``FIELDS``; anything else is refused, so no
request can name a file path, a model on disk or a pipeline option the server does not expose. ``body_schema`` is
the same shape as JSON Schema, for the OpenAPI document the server publishes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import inspect
import io
import json
from dataclasses import dataclass, field

from PIL import Image

from .. import request as shared
from ..control.controls import MAX_CONTROL_SCALE, Control
from ..request import MAX_GUIDANCE, MAX_LORA_SCALE, MAX_SEED, ModelFacts, Request, read_image
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
    max_loras: int = 4  # LoRAs one request may name; each merge touches most of the U-Net's weights
    max_controls: int = 2  # ControlNets one request may use; each runs about half a U-Net per step

    def request_limits(self) -> shared.Limits:
        """The limits the shared rules (``Request.check``, ``fit``) hold one request to."""
        return shared.Limits(max_pixels=self.max_pixels, max_images=self.max_images, max_steps=self.max_steps,
                             max_image_pixels=self.max_image_pixels)


# A JSON field -> the field of ``Request.check`` it fills (None: the server's own); "image" and "strength" are for
# img2img only. A field left out or null takes ``Request.check``'s default (negative_prompt: "").
FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "guidance": "guidance_scale",
          "width": "width", "height": "height", "seed": "seed", "scheduler": "scheduler", "n": "batch_size",
          "model": None, "output": None, "strength": "strength", "image": "image", "loras": "loras",
          "controls": "controls"}
IMG2IMG_ONLY = ("image", "strength")
STRINGS = ("prompt", "negative_prompt", "model", "output", "image")  # the shared rules type the other fields
# The fields that hold more than one value: loras a JSON object {name: scale}, controls a JSON array of objects.
CONTAINERS = {"loras": dict, "controls": list}
CONTROL_FIELDS = ("model", "image", "scale", "start", "end")  # of one object in controls: Control's fields
# A shared rule's field as a client names it ("size": the output's, as the model fits it).
JSON_NAMES = {field: name for name, field in FIELDS.items() if field not in (None, name)} | {"size": "width x height"}


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
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale) of LoRAs in the server's folder, sorted by name
    controls: tuple[Control, ...] = ()  # ControlNets of the server's folder by name, checked, images decoded (RGB)
    # (name, scale, start, end, the image's size and SHA-256 of its RGB pixels) per control, made once here
    control_key: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "control_key", tuple((c.model, float(c.scale), float(c.start), float(c.end),
                                                       _digest(c.image)) for c in self.controls))

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one ``Pipeline.generate`` call and give the same pixels as alone:
        same size, steps, scheduler, guidance (the sampler applies one scale to the batch), LoRAs at the same
        scales (they are merged into the weights the whole batch runs through) and the same controls: the same
        ControlNets in the same order, at the same scales and windows, reading pictures of identical pixels
        (``control_key``). ``generate`` takes one list of controls for the whole call, and a ControlNet reads each
        row's own latents with that one map, so each image is still the one its request draws alone. Requests
        with controls are batched rather than always run alone, since clients that share a control map (a layout,
        a pose template) are the usual case; hashing the decoded pixels (once per request, on the front) makes
        two uploads of one picture batch even when their files differ (PNG vs WebP, other metadata). None: never
        batched. img2img is not (``generate`` takes one input image), nor are schedulers that draw fresh noise
        at every step (a batch shares one generator, so a batched image would differ from the same seed alone)."""
        if self.image is not None or self.scheduler in STOCHASTIC_SCHEDULERS:
            return None
        return (self.width, self.height, self.steps, self.scheduler, float(self.guidance), self.loras,
                self.control_key)


def _digest(image: Image.Image) -> tuple:
    """What tells two control pictures apart: their size, mode and the SHA-256 of their pixels."""
    return image.size, image.mode, hashlib.sha256(image.tobytes()).hexdigest()


def body_schema(kind: str, limits: Limits) -> dict:
    """The JSON Schema of a ``kind`` body, as the server's OpenAPI document publishes it: each field's type, bounds
    and default as the rules (the shared ones and the server's, at ``limits``) check them. It describes the body
    for clients and tools; ``parse_request`` decides (e.g. ``start < end``, ``width x height`` within
    ``max_pixels``, the names a server offers are not in it)."""
    shared_defaults = {p.name: p.default for p in inspect.signature(Request.check).parameters.values()}
    control_defaults = {p.name: p.default for p in inspect.signature(Control).parameters.values()}

    def optional(schema: dict, default=None, **more) -> dict:  # null is the same as leaving the field out
        enum = {"enum": [*schema["enum"], None]} if "enum" in schema else {}
        return {**schema, "type": [schema["type"], "null"], **enum, **more,
                **({"default": default} if default is not None else {})}

    def number(low, high, default=None, **more) -> dict:
        return optional({"type": "number", "minimum": low, "maximum": high}, default, **more)

    picture = {"type": "string", "contentEncoding": "base64", "description": "a PNG, JPEG or WebP file, base64"}
    control = {"type": "object", "additionalProperties": False, "required": ["model", "image"], "properties": {
        "model": {"type": "string", "description": "a ControlNet this server offers (GET /v1/models)"},
        "image": {**picture, "description": "the control map (resized to the output), PNG, JPEG or WebP, base64"},
        "scale": number(-MAX_CONTROL_SCALE, MAX_CONTROL_SCALE, control_defaults["scale"]),
        "start": number(0, 1, control_defaults["start"], description="the fraction of the steps it starts at"),
        "end": number(0, 1, control_defaults["end"], description="the fraction it ends at, after start")}}
    prompt = {"type": "string", "maxLength": limits.max_prompt_chars}
    side = optional({"type": "integer", "minimum": 8, "maximum": limits.max_side, "multipleOf": 8},
                    description="the model's own size when left out (img2img: the input's; else a control map's)")
    properties = {
        "prompt": {**prompt, "minLength": 1},
        "negative_prompt": optional(prompt),
        "steps": optional({"type": "integer", "minimum": 1, "maximum": limits.max_steps}, shared_defaults["steps"]),
        "guidance": number(-MAX_GUIDANCE, MAX_GUIDANCE, shared_defaults["guidance_scale"]),
        "width": side, "height": side,
        "seed": optional({"type": "integer", "minimum": 0, "maximum": MAX_SEED}, description="drawn when absent"),
        "scheduler": optional({"type": "string", "enum": sorted(SCHEDULERS)}, shared_defaults["scheduler"]),
        "n": optional({"type": "integer", "minimum": 1, "maximum": limits.max_images}, shared_defaults["batch_size"]),
        "model": optional({"type": "string"}, description="the served model's id (GET /v1/models), or nothing"),
        "output": optional({"type": "string", "enum": ["json", "png"]}, "json"),
        "loras": optional({"type": "object", "maxProperties": limits.max_loras,
                           "additionalProperties": {"type": "number", "minimum": -MAX_LORA_SCALE,
                                                    "maximum": MAX_LORA_SCALE}},
                          description="{NAME: scale} of LoRAs this server offers (GET /v1/models)"),
        "controls": optional({"type": "array", "maxItems": limits.max_controls, "items": control},
                             description="ControlNets this server offers (GET /v1/models), each with its control "
                                         "map; a map also sets the output's size when none is given"),
        "image": picture,
        "strength": number(0, 1, shared_defaults["strength"]),
    }
    fields = [name for name in FIELDS if kind == "img2img" or name not in IMG2IMG_ONLY]
    return {"type": "object", "additionalProperties": False, "properties": {f: properties[f] for f in fields},
            "required": ["prompt", "image"] if kind == "img2img" else ["prompt"]}


def parse_request(body: bytes, kind: str, limits: Limits, model_id: str, model: ModelFacts,
                  loras: frozenset[str] = frozenset(), controlnets: frozenset[str] = frozenset()) -> GenerationRequest:
    """``body`` (JSON) of a ``kind`` ("txt2img" or "img2img") request, checked against ``limits``; ``model_id`` is
    the one model this server runs (a request may name it, and nothing else), ``model`` its facts
    (``Pipeline.facts``), whose own size fills a side a txt2img request leaves out; ``loras`` and ``controlnets``
    the names of the LoRAs and ControlNets the server offers (``--lora-dir``, ``--controlnet-dir``)."""
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
    for name, value in data.items():  # the shared rules show a value in their message: a scalar, never a tree
        if name == "loras" and isinstance(value, dict):
            _check_loras(value, limits, loras)
        elif name == "controls" and value is not None:
            _check_controls(value, limits, controlnets)
        elif isinstance(value, (dict, list)):
            wanted = {dict: "a JSON object", list: "a JSON array"}.get(CONTAINERS.get(name), "a single value")
            raise RequestError(422, f"field {name!r} holds a JSON {'object' if isinstance(value, dict) else 'array'}"
                                    f": send {wanted}")
    try:
        return _check({name: data.get(name) for name in FIELDS}, kind, limits, model_id, model)
    except shared.RequestError as e:
        raise RequestError(422, e.worded(JSON_NAMES, "=")) from None


def _check(v: dict, kind: str, limits: Limits, model_id: str, model: ModelFacts) -> GenerationRequest:
    """The server's own rules around the shared ones (null is the same as absent); a mistake is a
    ``sdfast.request.RequestError``, which ``parse_request`` words with the JSON names. An upload is read before
    the shared rules run (they take the picture), bounded by ``max_body_bytes`` and, from its header,
    ``max_image_pixels``."""
    def fail(field: str, value, rule: str):
        raise shared.RequestError(field, value, rule)

    for name in STRINGS:
        if v[name] is not None and not isinstance(v[name], str):
            fail(name, v[name], "need a string")
    if not v["prompt"]:
        fail("prompt", v["prompt"], "required: say what to draw")
    for name in ("prompt", "negative_prompt"):
        if v[name] is not None and len(v[name]) > limits.max_prompt_chars:
            fail(name, v[name], f"{len(v[name])} characters is over the limit of {limits.max_prompt_chars} "
                                "(limits.max_prompt_chars; CLIP reads the first 77 tokens): shorten it")
    if v["model"] is not None and v["model"] != model_id:
        fail("model", v["model"], f"not served here: this server runs {model_id!r} (GET /v1/models)")
    output = v["output"] or "json"
    if output not in ("json", "png"):
        fail("output", output, "use 'json' (base64 images, seed, timings) or 'png' (one image's bytes)")
    fields = {FIELDS[name]: value for name, value in v.items()
              if value is not None and FIELDS[name] not in (None, "prompt", "negative_prompt", "image")}
    image = None if v["image"] is None else _upload(v["image"], limits)
    fields["controls"] = [Control(c["model"], _upload(c["image"], limits, f"controls[{i}].image"),
                                  **{f: c[f] for f in CONTROL_FIELDS[2:] if c.get(f) is not None})
                          for i, c in enumerate(v["controls"] or ())]  # their shape checked by _check_controls
    request = Request.check(v["prompt"], v["negative_prompt"] or "", image=image, limits=limits.request_limits(),
                            **fields)
    if kind == "img2img" and image is None:
        fail("image", None, "required for img2img: the input picture as base64 (PNG, JPEG or WebP bytes)")
    if output == "png" and request.batch_size != 1:
        fail("output", output, f"returns one image but n={request.batch_size}: ask for output='json' to get several")
    for name in ("width", "height"):  # before fit, so that a strip is refused for its side, not its pixels
        if v[name] is not None and v[name] > limits.max_side:
            fail(name, v[name], f"over the limit of {limits.max_side} (limits.max_side): ask for a smaller size")
    request = request.fit(model)
    if max(request.width, request.height) > limits.max_side:  # a side the model or the input image filled in
        fail("size", f"{request.width}x{request.height}", f"a side is over the limit of {limits.max_side} "
                                                          "(limits.max_side): pass a smaller width and height")
    return GenerationRequest(request.prompts[0], request.negative_prompts[0], request.steps, request.guidance_scale,
                             request.width, request.height, request.seed, request.scheduler, request.batch_size,
                             output, request.image, request.strength, tuple(sorted((request.loras or {}).items())),
                             request.controls)


def _check_loras(value: dict, limits: Limits, offered: frozenset[str]) -> None:
    """``loras``: at most ``max_loras`` names of LoRAs this server offers, each with a scalar scale (its range is
    the shared rule's)."""
    if len(value) > limits.max_loras:
        raise RequestError(422, f"loras names {len(value)} LoRAs, over the limit of {limits.max_loras} "
                                "(limits.max_loras): use fewer")
    for name, scale in value.items():
        if name not in offered:
            shown = ", ".join(map(repr, sorted(offered)[:8])) or "none (the server was started without --lora-dir)"
            raise RequestError(422, f"loras: no LoRA named {_show(name)} on this server; it offers {shown} "
                                    "(GET /v1/models lists them)")
        if isinstance(scale, (dict, list)):
            raise RequestError(422, f"loras: the scale of {_show(name)} holds a JSON "
                                    f"{'object' if isinstance(scale, dict) else 'array'}: send a number")


def _check_controls(value, limits: Limits, offered: frozenset[str]) -> None:
    """``controls``' shape: a JSON array of at most ``max_controls`` objects, each naming a ControlNet this server
    offers, its image a string, its numbers single values (their ranges are the shared rule's, and the image is
    read by ``_upload``)."""
    if not isinstance(value, list):
        raise RequestError(422, f"controls={_show(value)}: need a JSON array of objects such as "
                                '[{"model": NAME, "image": BASE64, "scale": 1, "start": 0, "end": 1}]')
    if len(value) > limits.max_controls:
        raise RequestError(422, f"controls holds {len(value)} objects, over the limit of {limits.max_controls} "
                                "(limits.max_controls): use fewer")
    for i, control in enumerate(value):
        name = f"controls[{i}]"
        if not isinstance(control, dict):
            raise RequestError(422, f"{name} holds {_kind(control)}: send an object such as "
                                    '{"model": NAME, "image": BASE64, "scale": 1, "start": 0, "end": 1}')
        unknown = sorted(set(control) - set(CONTROL_FIELDS))
        if unknown:
            raise RequestError(422, f"{name}: unknown field(s) {', '.join(map(_show, unknown[:3]))}: the fields are "
                                    f"{', '.join(CONTROL_FIELDS)}")
        for part in ("model", "image"):
            if not isinstance(control.get(part), str):
                what = "the name of a ControlNet (GET /v1/models)" if part == "model" else \
                    "the control picture as base64 (PNG, JPEG or WebP bytes)"
                raise RequestError(422, f"{name}.{part} holds {_kind(control.get(part))}: need a string, {what}")
        for part in CONTROL_FIELDS[2:]:
            if isinstance(control.get(part), (dict, list)):
                raise RequestError(422, f"{name}.{part} holds {_kind(control[part])}: send a number")
        if control["model"] not in offered:
            shown = ", ".join(map(repr, sorted(offered)[:8])) or \
                "none (the server was started without --controlnet-dir)"
            raise RequestError(422, f"{name}.model={_show(control['model'])}: no ControlNet of that name on this "
                                    f"server; it offers {shown} (GET /v1/models lists them)")


def _kind(value) -> str:
    """A JSON value's kind, as a message names it (never the value: it may be a tree, or a whole image)."""
    kinds = {dict: "a JSON object", list: "a JSON array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _upload(text: str, limits: Limits, name: str = "image") -> Image.Image:
    """base64 -> a picture read by the shared rule (its size checked from the header before it is decoded), with
    only the PNG, JPEG and WebP decoders in reach of a client's bytes; ``name``: the field, as messages say it."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise shared.RequestError(name, text, "not valid base64: send the file's bytes base64-encoded") from None
    try:
        return read_image(io.BytesIO(data), limits.request_limits(), formats=IMAGE_FORMATS)
    except shared.RequestError as e:
        raise shared.RequestError(name, e.value, e.rule) from None


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


def _show(value) -> str:
    """A client's field name as a message shows it: one line (``repr`` escapes newlines and lone surrogates),
    shortened."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS - 10]}...({len(text)} characters)"
