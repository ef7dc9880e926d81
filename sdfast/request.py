"""One generation request, checked once: every field's rule and its one error text live here.

``Request.check(**fields)`` applies the rules that need no model (types, ranges, limits, reading the input image),
before anything large is allocated or loaded; ``request.fit(model)`` applies the ones that do (the default size,
multiples of the VAE's factor, the CLIP layer range, SDXL-only inputs) and returns the request the pipeline runs.
The Python API (``Pipeline.generate``), the CLI and ``sdfast serve`` go through these two calls (the server with its
own limits as ``Limits``, before it dispatches to a replica); a mistake is a ``RequestError`` (a ``ValueError``)
that names the field, the value and the fix, which the CLI words with its flag names and the server with its JSON
field names (``worded``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .schedulers import SCHEDULERS

# Noise is drawn by torch's CPU generator, whose Mersenne Twister keeps a seed's low 32 bits (5 and 5 + 2**32 paint
# the same picture) and whose manual_seed wraps a negative seed onto a positive one: so a seed is 0 .. 2**32 - 1,
# where every seed paints a picture of its own.
MAX_SEED = 2**32 - 1
# Far past any useful scale (7.5 is usual, 20 already burns the image): a typo such as 75000 would overflow fp16.
MAX_GUIDANCE = 1000.0
MAX_LORA_SCALE = 10.0  # beyond this a LoRA's update swamps the weights: overflow in fp16, noise in any dtype


class RequestError(ValueError):
    """A request that cannot run: ``field`` and ``value`` say what, ``rule`` what to do instead."""

    def __init__(self, field: str, value, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{field}={_show(value)}: {rule}")

    def worded(self, names: dict[str, str], joiner: str = " ") -> str:
        """The message with the field as a caller names it: the CLI's ``--steps 0: need an integer >= 1``, a JSON
        body's ``n=0: need an integer >= 1`` (``joiner="="``); a field ``names`` leaves out keeps ``field=``."""
        name = names.get(self.field, names.get(self.field.split("[")[0], self.field))  # controls[1].scale: controls
        shown = f"{name} {self.field}=" if "[" in self.field and name != self.field else \
            f"{name}{'=' if name == self.field else joiner}"
        return f"{shown}{_show(self.value)}: {self.rule}"


def _show(value) -> str:
    """A value as an error shows it: short, and never an object's repr (a path or an address)."""
    if isinstance(value, (str, bool, int, float, type(None))) or isinstance(value, np.number):
        text = repr(value.item() if isinstance(value, np.number) else value)
        if isinstance(value, str):
            text = text.encode("ascii", "backslashreplace").decode()
        return text if len(text) <= 120 else text[:80] + f"...({len(text)} characters)"
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, dict):
        items = [f"{_show(k)}: {_show(v)}" for k, v in list(value.items())[:4]]
        return "{" + ", ".join(items) + (", ..." if len(value) > 4 else "") + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value[:4]) + (", ..." if len(value) > 4 else "") + "]"
    return f"<{type(value).__name__}>"


@dataclass(frozen=True)
class Limits:
    """What one call may cost, checked before anything is allocated. The defaults admit every released SD model
    at several times its own size; raise them for larger work (``generate(..., limits=Limits(max_images=64))``)."""

    max_pixels: int = 4 * 2**20  # per image: 2048x2048 (SDXL's own 1024x1024 is 1 Mpx)
    max_images: int = 16  # prompts x batch_size in one call
    max_steps: int = 1000  # the noise schedule has 1000 training timesteps
    max_image_pixels: int = 8192 * 8192  # an input picture, from its header, before it is decoded


@dataclass(frozen=True)
class ModelFacts:
    """What the rules need to know of a model (``Pipeline.facts``)."""

    vae_scale_factor: int  # pixels per latent cell along a side: 8 for SD
    default_size: int  # the image side it was trained at
    latent_channels: int
    clip_layers: int  # clip_skip runs 1..clip_layers
    is_xl: bool  # SDXL's micro-conditioning applies
    aesthetic: bool  # the SDXL refiner: aesthetic scores instead of target sizes
    linear_preview: bool = True  # its VAE has a linear latent-to-RGB map (SD 1.x / 2.x, SDXL): cheap previews


@dataclass(frozen=True)
class Micro:
    """SDXL's micro-conditioning (diffusers' names and defaults; sizes as (height, width), crops as (top, left))."""

    original_size: tuple | None = None
    crops_coords_top_left: tuple = (0, 0)
    target_size: tuple | None = None
    negative_original_size: tuple | None = None
    negative_crops_coords_top_left: tuple | None = None
    negative_target_size: tuple | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclass(frozen=True)
class Request:
    """A checked generation: text to image, image to image (``image``), or a hand-off between two models
    (``denoising_end`` / ``denoising_start``). Built by ``check``; ``width`` / ``height`` are None until ``fit``."""

    prompts: tuple[str, ...] | None  # None: prompt_embeds given instead
    negative_prompts: tuple[str, ...] | None  # None: none given (SDXL base: zero embeddings)
    width: int | None
    height: int | None
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    batch_size: int
    clip_skip: int
    long_prompts: bool
    image: Image.Image | None  # img2img input, RGB
    strength: float
    latents: torch.Tensor | None  # user-given unit-variance initial noise, or a hand-off's part-denoised latents
    preview_every: int
    preview_decode: str
    callback: Callable | None
    prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor | None
    micro: Micro
    denoising_start: float | None
    denoising_end: float | None
    loras: dict[str, float] | None  # this call's LoRAs by name with their scales; None: the pipeline's defaults
    controls: tuple = ()  # sdfast.control.Control, checked, images read
    limits: Limits = dataclasses.field(default=Limits(), compare=False)  # what fit() holds the final size to

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def images(self) -> int:
        """Pictures this call makes: prompts (or embedding rows) x batch_size."""
        rows = len(self.prompts) if self.prompts is not None else len(self.prompt_embeds) // (2 if self.guided else 1)
        return rows * self.batch_size

    @classmethod
    def check(cls, prompt=None, negative_prompt=None, *, width=None, height=None, steps=30, guidance_scale=7.5,
              scheduler="euler", seed=None, batch_size=1, clip_skip=1, long_prompts=False, image=None,
              strength=0.8, latents=None, preview_every=0, preview_decode="auto", callback=None,
              prompt_embeds=None, pooled_prompt_embeds=None, denoising_start=None, denoising_end=None,
              loras=None, controls=None, limits: Limits = Limits(), **micro) -> "Request":
        """Every rule that needs no model, in the order a reader would check them. ``micro``: SDXL's
        ``original_size``, ``crops_coords_top_left``, ``target_size``, their ``negative_*`` and the aesthetic
        scores."""
        unknown = sorted(set(micro) - {f.name for f in dataclasses.fields(Micro)})
        if unknown:
            raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}")
        if (prompt is None) == (prompt_embeds is None):
            raise RequestError("prompt", prompt, "pass either a prompt or prompt_embeds (from encode_prompt), not "
                               "both or neither")
        if prompt_embeds is not None and negative_prompt is not None:
            raise RequestError("negative_prompt", negative_prompt, "prompt_embeds hold the negatives already "
                               "(encode_prompt(prompt, negative_prompt, ...)): leave negative_prompt out")
        if prompt_embeds is not None and not isinstance(prompt_embeds, torch.Tensor):
            raise RequestError("prompt_embeds", prompt_embeds, "need a tensor, as encode_prompt makes it")
        prompts = None if prompt is None else texts("prompt", prompt)
        negatives = None if negative_prompt is None else texts("negative_prompt", negative_prompt)
        if prompts is not None and negatives is not None:
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            elif len(negatives) != len(prompts):
                raise RequestError("negative_prompt", negative_prompt, f"{len(negatives)} negative prompts for "
                                   f"{len(prompts)} prompts: give one, or one per prompt")
        for name, value in (("width", width), ("height", height)):
            if value is not None:
                _integer(name, value, 1, limits.max_pixels, "max_pixels")  # a side over it cannot fit
        steps = _integer("steps", steps, 1, limits.max_steps, "max_steps")
        batch_size = _integer("batch_size", batch_size, 1, limits.max_images, "max_images")
        clip_skip = _integer("clip_skip", clip_skip, 1, 64)
        preview_every = _integer("preview_every", preview_every, 0, 1_000_000)
        if abs(number("guidance_scale", guidance_scale)) > MAX_GUIDANCE:
            raise RequestError("guidance_scale", guidance_scale, f"outside [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}]: "
                               "use e.g. 7.5 (<= 1 turns guidance off)")
        strength = number("strength", strength)
        if not 0.0 <= strength <= 1.0:
            raise RequestError("strength", strength, "outside [0, 1] (0 keeps the image, 1 ignores it)")
        if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
            raise RequestError("scheduler", scheduler, f"unknown; choose one of {', '.join(sorted(SCHEDULERS))}")
        if not isinstance(preview_decode, str) or preview_decode not in ("auto", "linear", "vae"):
            raise RequestError("preview_decode", preview_decode, "choose 'linear' (cheap), 'vae' (full decode) or "
                               "'auto' (linear where the model's VAE has a linear map, else vae)")
        if not isinstance(long_prompts, bool):
            raise RequestError("long_prompts", long_prompts, "need True or False")
        if callback is not None and not callable(callback):
            raise RequestError("callback", callback, "need a function callback(step, timestep, latents)")
        seed = random.randrange(MAX_SEED + 1) if seed is None else _seed(seed)
        if latents is not None and image is not None:
            raise RequestError("latents", latents, "latents= is the initial noise of text to image; img2img "
                               "(image=) draws its own noise from the seed: pass one or the other")
        if latents is not None and (not isinstance(latents, torch.Tensor) or latents.ndim != 4):
            raise RequestError("latents", latents, "need a tensor (B, channels, height/8, width/8)")
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None and not 0.0 < number(name, value) < 1.0:
                raise RequestError(name, value, "outside (0, 1): it is the fraction of the noise schedule "
                                   "already done (start) or to do (end)")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise RequestError("denoising_start", denoising_start, f"must be below denoising_end={denoising_end}")
        if denoising_start is not None and (latents is None or image is not None):
            raise RequestError("denoising_start", denoising_start, "continues part-denoised latents: pass "
                               "latents=result.latents of a run with denoising_end (and no image)")
        request = cls(prompts, negatives, width, height, steps, float(guidance_scale), scheduler, seed, batch_size,
                      clip_skip, long_prompts, None if image is None else read_image(image, limits), float(strength),
                      latents, preview_every, preview_decode, callback, prompt_embeds, pooled_prompt_embeds,
                      _micro(micro), denoising_start, denoising_end, _loras(loras), _controls(controls, limits),
                      limits)
        if request.images > limits.max_images:
            rows = request.images // batch_size
            raise RequestError("batch_size", batch_size, f"{rows} prompt(s) x {batch_size} is {request.images} "
                               f"images, over the limit of {limits.max_images} per call (limits.max_images): make "
                               "fewer")
        if width is not None and height is not None:
            _pixels(width, height, limits)
        return request

    def fit(self, model: ModelFacts) -> "Request":
        """The rules that need the model: the size (the given one, else the input image's or the latents', else
        the model's own), its multiple, the CLIP layer range and SDXL-only inputs. Returns the request with its
        size set."""
        f = model.vae_scale_factor
        width, height = self.width, self.height
        given = self.image if self.image is not None else self.controls[0].image if self.controls else None
        if given is not None:  # img2img and ControlNets keep the picture's size unless told otherwise
            width, height = width or given.width // f * f, height or given.height // f * f
        elif self.latents is not None:  # given latents (e.g. a base model's hand-off) set the size
            width, height = width or self.latents.shape[-1] * f, height or self.latents.shape[-2] * f
        # None, not 0: a picture under one latent cell a side keeps its 0 and is refused below
        width = model.default_size if width is None else width
        height = model.default_size if height is None else height
        if width % f or height % f or width <= 0 or height <= 0:
            raise RequestError("size", f"{width}x{height}", f"not a positive multiple of {f}: use e.g. "
                               f"{max(f, width // f * f)}x{max(f, height // f * f)}")
        _pixels(width, height, self.limits)
        if self.preview_decode == "linear" and self.preview_every and not model.linear_preview:
            raise RequestError("preview_decode", "linear", "this model's VAE has no linear latent-to-RGB map (SD "
                               "1.x / 2.x's and SDXL's have): use 'vae' or 'auto'")
        if self.clip_skip > model.clip_layers:
            raise RequestError("clip_skip", self.clip_skip, f"out of range: use 1..{model.clip_layers} (1 = the "
                               "model's own layer)")
        if not model.is_xl and (self.pooled_prompt_embeds is not None or self.micro != Micro()):
            raise RequestError("original_size", "...", "pooled_prompt_embeds, original_size, crops_coords_top_left, "
                               "target_size, their negative_* variants and aesthetic scores are SDXL conditioning; "
                               "this is an SD 1.x / 2.x model: leave them out")
        if model.is_xl and self.prompt_embeds is not None and self.pooled_prompt_embeds is None:
            raise RequestError("pooled_prompt_embeds", None, "an SDXL model needs them with prompt_embeds: use "
                               "encode_prompt(..., pooled=True), which returns both")
        return dataclasses.replace(self, width=width, height=height)


# -- the rules --


def _integer(name: str, value, low: int, high: float, limit: str | None = None) -> int:
    """An integer in low..high; ``limit``: the ``Limits`` field that sets ``high``, named in the message (the
    Python API raises it with ``limits=Limits(...)``, a server's clients read it from the server)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RequestError(name, value, "need an integer")
    if not low <= value <= high:
        raise RequestError(name, value, f"need an integer >= {low}" if value < low else
                           f"over the limit of {high}" + (f" (limits.{limit})" if limit else ""))
    return int(value)


def _loras(value) -> dict[str, float] | None:
    """None (the pipeline's loaded LoRAs at their scales) or {name: scale}; whether each is loaded is the
    pipeline's to say."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(name, str) and name for name in value):
        raise RequestError("loras", value, "need a mapping of loaded LoRA names to scales, e.g. {'style': 0.8} "
                           "({} for none)")
    return {name: lora_scale("loras", name, scale) for name, scale in value.items()}


def lora_scale(field: str, name: str, scale) -> float:
    """A LoRA's scale: a finite number within +-MAX_LORA_SCALE."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)) or not math.isfinite(scale) \
            or abs(scale) > MAX_LORA_SCALE:
        raise RequestError(field, {name: scale}, f"a LoRA's scale must be a number in [-{MAX_LORA_SCALE:g}, "
                           f"{MAX_LORA_SCALE:g}] (1: as trained, 0: off)")
    return float(scale)


def _controls(value, limits: Limits) -> tuple:
    # imported here: sdfast.control's rules read pictures with this module's read_image
    from .control.controls import check_controls
    return check_controls(value, limits)


def _seed(value) -> int:
    seed = _integer("seed", value, 0, math.inf)
    if seed > MAX_SEED:  # what the generator would make of it (it refuses 2**64 and over): say so, never alias
        raise RequestError("seed", value, f"over {MAX_SEED}: " + (
            f"torch's CPU generator keeps a seed's low 32 bits, so this seed paints the picture of seed "
            f"{seed % 2**32}: pass that" if seed < 2**64 else "seeds run 0 .. 2**32 - 1"))
    return seed


def number(name: str, value) -> float:
    """A finite number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise RequestError(name, value, "need a number")
    if not math.isfinite(value):
        raise RequestError(name, value, "not a finite number")
    return float(value)


def texts(name: str, value) -> tuple[str, ...]:
    """A string or a non-empty list of strings, each one valid Unicode text (a lone surrogate cannot be encoded)."""
    texts = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError(name, value, "need a string or a non-empty list of strings")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(name, text, f"holds a character that is not Unicode text (a lone surrogate at "
                               f"position {e.start}): remove it") from None
    return texts


def _pixels(width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise RequestError("size", f"{width}x{height}", f"{width * height / 2**20:.1f} Mpx is over the limit of "
                           f"{limits.max_pixels / 2**20:.1f} Mpx per image (limits.max_pixels): use a smaller size")


def _micro(fields: dict) -> Micro:
    """SDXL's micro-conditioning: each size two finite numbers (JSON's [0, 0] is (0, 0)), each score a number."""
    checked = {}
    for name, value in fields.items():
        if name.endswith("aesthetic_score"):
            checked[name] = number(name, value)
        elif value is not None:
            if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
                    isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in value):
                raise RequestError(name, value, "need two numbers, (height, width) or (top, left)")
            checked[name] = tuple(value)
    return Micro(**checked)


def read_image(image, limits: Limits = Limits(), formats: tuple[str, ...] | None = None) -> Image.Image:
    """An input picture as RGB: a PIL image, or a path / file object read with its size checked from the header
    before anything is decoded (a small file can declare a huge picture); ``formats``: the only decoders a file
    may reach (a server's uploads). 16-bit and 32-bit grey pictures are scaled to 8 bits rather than clipped;
    transparency is dropped onto white."""
    if not isinstance(image, (Image.Image, str, Path)) and not hasattr(image, "read"):
        raise RequestError("image", image, "need a PIL image, a path or an open binary file")
    if not isinstance(image, Image.Image):
        source = str(image) if isinstance(image, (str, Path)) else "the image"
        try:
            with Image.open(image, formats=formats) as opened:
                _check_size(opened, limits, source)
                opened.load()
                image = opened.copy()
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow's parsers raise many kinds of error on hostile bytes
            unknown = f"not a {'/'.join(formats)} picture" if formats else "not a picture PIL can read"
            reason = unknown if isinstance(e, Image.UnidentifiedImageError) else \
                (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise RequestError("image", source, f"cannot read it: {reason}") from None
    _check_size(image, limits, "the image")
    return to_rgb(image)


def _check_size(image: Image.Image, limits: Limits, source: str) -> None:
    if image.width * image.height > limits.max_image_pixels:
        raise RequestError("image", source, f"{image.width}x{image.height} pixels is over the limit of "
                           f"{limits.max_image_pixels / 2**20:.0f} Mpx for an input picture "
                           "(limits.max_image_pixels): resize it first")


def to_rgb(image: Image.Image) -> Image.Image:
    """A picture as 8-bit RGB, as a viewer shows it: 16 / 32-bit grey scaled (``convert`` would clip it to white),
    transparency over white (``convert`` would show whatever colour hides under it)."""
    if image.mode.startswith("I"):  # 16 / 32-bit grey: PIL's convert("RGB") would clip everything over 255
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0)
        top = 65535.0 if image.mode.startswith("I;16") or 255 < peak <= 65535 else max(peak, 255.0)
        image = Image.fromarray(np.clip(np.round(values / top * 255), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")
