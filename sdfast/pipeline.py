"""Prompt to pixels: ``load`` a checkpoint, then ``Pipeline.generate``. The only place the stages meet."""

from __future__ import annotations

import functools
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import backends
from .checkpoint import CheckpointError, load_diffusers, load_single_file
from .sampler import denoise, latent_preview, to_pil
from .schedulers import SCHEDULERS, make_scheduler
from .timing import Recorder, Timings
from .tokenizer import Tokenizer

# The small model trained on synthetic shapes that ships inside sdfast (sdfast/shapes/train.py): what load() and
# the CLI use when no model is named.
DEFAULT_MODEL = Path(__file__).parent / "data" / "default_model"

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: torch.Tensor  # (B, 4, H/8, W/8): the final latents, before the VAE
    timings: Timings
    seed: int  # the seed used (drawn at random when none was given), to reproduce the images
    previews: list[tuple[int, list[Image.Image]]] = field(default_factory=list)  # (step, one image per sample)


@dataclass
class Pipeline:
    """A loaded Stable Diffusion model: tokenizer, the three networks and the scheduler's config."""

    tokenizer: Tokenizer
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    # SDXL: the OpenCLIP bigG encoder (projected pooled output) and its tokenizer, and diffusers' pipeline options
    # force_zeros_for_empty_prompt / requires_aesthetics_score. The refiner has only these (tokenizer and
    # text_encoder None).
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Tokenizer | None = None
    options: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side: 8 for SD (one halving per VAE level but the last)."""
        return 2 ** (len(self.vae.config.block_channels) - 1)

    @property
    def is_xl(self) -> bool:
        """An SDXL model (base or refiner): its U-Net takes the "text_time" added conditioning."""
        return getattr(self.unet.config, "added_time_dim", None) is not None


    @torch.inference_mode()
    def generate(self, prompt: str | list[str] | None, negative_prompt: str | list[str] | None = None, *,
                 width: int | None = None, height: int | None = None, steps: int = 30, guidance_scale: float = 7.5,
                 scheduler: str = "euler", seed: int | None = None, batch_size: int = 1, clip_skip: int = 1,
                 latents: torch.Tensor | None = None, image: Image.Image | str | Path | None = None,
                 strength: float = 0.8, long_prompts: bool = False, preview_every: int = 0,
                 preview_decode: str = "linear", callback: Callable | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
                 negative_crops_coords_top_left: tuple[int, int] | None = None,
                 negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, denoising_start: float | None = None,
                 denoising_end: float | None = None) -> GenerationResult:
        """Text to image, or image to image when ``image`` is given.

        ``batch_size`` images per prompt; ``clip_skip`` 1 = last CLIP layer, 2 = penultimate (the webui's slider);
        ``latents`` (B, 4, H/8, W/8) is user-given unit-variance initial noise; ``image`` + ``strength`` is img2img
        (VAE-encode, noise to the strength's timestep, denoise the remaining steps). ``preview_every`` N > 0 adds
        previews every N steps, a linear latent-to-RGB map or, with ``preview_decode="vae"``, a full VAE decode.
        ``callback(step, timestep, latents)`` runs after every step; returning False stops the loop early.
        ``prompt_embeds`` replaces ``prompt`` (pass None) and ``negative_prompt``: text embeddings made by
        ``encode_prompt`` with the same ``guidance_scale`` (e.g. blends of two prompts' embeddings).
        The same seed gives the same images on the same device and backend (noise is drawn on the CPU).

        SDXL only, with diffusers' meanings and defaults: ``pooled_prompt_embeds`` goes with ``prompt_embeds``
        (``encode_prompt(..., pooled=True)``); ``original_size`` / ``target_size`` (height, width; default the
        output size), ``crops_coords_top_left`` (default (0, 0)) and their ``negative_*`` variants (default: the
        positive ones) are the micro-conditioning; the refiner takes ``aesthetic_score`` / ``negative_aesthetic_score``
        instead of target sizes. A None ``negative_prompt`` gives zero negative embeddings when the model's
        ``force_zeros_for_empty_prompt`` says so (SDXL base), an explicit "" is encoded.
        Base + refiner hand-off (any model): ``denoising_end`` in (0, 1) stops after that fraction of the noise
        schedule and returns the still noisy ``latents``; ``denoising_start`` continues such ``latents`` from there
        (e.g. ``refiner.generate(prompt, latents=base_result.latents, denoising_start=0.8)``).
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either a prompt or prompt_embeds (from encode_prompt), not both or neither")
        if latents is not None and image is not None:
            raise ValueError("latents= is the initial noise of text to image; img2img (image=) draws its own noise "
                             "from the seed: pass one or the other")
        init_image = _read_image(image) if image is not None else None
        width, height = self._size(width, height, init_image, latents)
        self._check(width, height, steps, scheduler, batch_size, strength, preview_every, preview_decode,
                    guidance_scale)
        self._check_xl(prompt_embeds, pooled_prompt_embeds, original_size, target_size, negative_original_size,
                       negative_target_size, crops_coords_top_left, negative_crops_coords_top_left, aesthetic_score,
                       negative_aesthetic_score)
        self._check_denoising_range(denoising_start, denoising_end, latents, init_image)
        seed = random.randrange(2**63) if seed is None else int(seed)
        generator = torch.Generator("cpu").manual_seed(seed)
        recorder = Recorder(self.device)
        previews: list[tuple[int, list[Image.Image]]] = []

        with recorder.span("total"):
            with recorder.span("text_encoder"):
                if prompt_embeds is None:
                    prompt_embeds, pooled_prompt_embeds = self.encode_prompt(
                        prompt, negative_prompt, guidance_scale=guidance_scale, clip_skip=clip_skip,
                        long_prompts=long_prompts, pooled=True)
            context = self._check_embeds(prompt_embeds, guidance_scale).repeat_interleave(batch_size, dim=0)
            shape = self._latent_shape(len(context) // (2 if guidance_scale > 1.0 else 1), width, height)
            unet = self.unet
            if self.is_xl:  # the same U-Net call, with SDXL's pooled text and micro-conditioning bound to it
                unet = functools.partial(unet, **self._added_conditioning(
                    pooled_prompt_embeds.repeat_interleave(batch_size, dim=0), len(context), guidance_scale,
                    width, height, original_size, crops_coords_top_left, target_size, negative_original_size,
                    negative_crops_coords_top_left, negative_target_size, aesthetic_score, negative_aesthetic_score))
            sched = make_scheduler(scheduler, self.scheduler_config)
            sched.set_timesteps(steps, self.device)
            end = self._denoising_end_index(sched, denoising_end)
            if denoising_start is not None:  # hand-off: these latents are part-denoised already, not noise
                start = self._denoising_start_index(sched, denoising_start)
                x = self._initial_noise(shape, latents, generator)
            elif init_image is None:
                start = 0
                x = self._initial_noise(shape, latents, generator) * sched.init_noise_sigma
            else:
                start, x = self._noised_image(init_image, width, height, shape, sched, steps, strength, generator,
                                              recorder)

            def preview(step: int, x0: torch.Tensor) -> None:
                if preview_decode == "vae":
                    previews.append((step, to_pil(self._decode(x0.to(self.dtype))[0])))
                else:
                    previews.append((step, latent_preview(x0, (width, height))))

            x = denoise(unet, sched, x, context, guidance_scale=guidance_scale, start=start, end=end,
                        generator=generator, recorder=recorder, callback=callback, preview=preview,
                        preview_every=preview_every)
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f"the latents hold NaN or Inf (dtype {self.dtype}): the U-Net overflowed. Load the model with "
                    "dtype=torch.float32 or torch.bfloat16 instead of showing a black image")
            if denoising_end is not None:  # a hand-off: the latents are still noisy, only the next model decodes
                return GenerationResult([], x, Timings.from_spans(recorder.resolve(), self.device), seed, previews)
            with recorder.span("vae_decode"):
                decoded, vae_dtype, fallback = self._decode(x)
        if not torch.isfinite(decoded).all():
            raise FloatingPointError(f"the decoded image holds NaN or Inf even in {vae_dtype}: the VAE overflowed; "
                                     "load the model with dtype=torch.float32 instead of showing a black image")
        timings = Timings.from_spans(recorder.resolve(), self.device)
        timings.vae_dtype, timings.vae_fallback = str(vae_dtype).removeprefix("torch."), fallback
        return GenerationResult(to_pil(decoded), x, timings, seed, previews)

    # -- the stages --

    @torch.inference_mode()
    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                      guidance_scale: float = 7.5, clip_skip: int = 1, long_prompts: bool = False,
                      pooled: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings as ``generate`` uses them: (2P, 77*K, C) ordered [negatives; prompts] when guiding
        (``guidance_scale`` > 1), else the P prompts' (P, 77*K, C); long prompts are encoded 77 tokens at a time
        and concatenated (K chunks). ``pooled=True`` returns (embeddings, pooled): SDXL's projected pooled text
        (2P or P, 1280), from the first chunk, which ``generate`` needs beside SDXL's ``prompt_embeds``; None for
        SD 1.x / 2.x.

        SDXL: C = 768 + 1280, the two encoders' hidden states side by side; ``clip_skip`` 1 is SDXL's own
        penultimate layer, without the final LayerNorm (diffusers' ``clip_skip=None``; N is diffusers' N - 1)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt={prompt!r}: need a string or a non-empty list of strings")
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt")
        # (tokenizer, encoder) pairs: SD 1.x / 2.x one, SDXL two (concatenated), the refiner only the second
        towers = [(tok, enc) for tok, enc in ((self.tokenizer, self.text_encoder),
                                               (self.tokenizer_2, self.text_encoder_2)) if enc is not None]
        # SDXL conditions on the penultimate layer, un-normalised: its clip_skip N is layer N + 1 from the end
        deeper = 1 if self.is_xl else 0
        layers = min(enc.config.num_layers for _, enc in towers) - deeper
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip={clip_skip} is out of range: use 1..{layers} (1 = the model's own layer)")
        guide = guidance_scale > 1.0
        # diffusers' SDXL: no negative prompt + force_zeros_for_empty_prompt = zero negative embeddings
        zeros = guide and negative_prompt is None and self.options.get("force_zeros_for_empty_prompt", False)
        texts = prompts if zeros or not guide else negatives + prompts
        states = []
        for tokenizer, encoder in towers:
            ids = tokenizer.encode(texts, long_prompts=long_prompts).to(self.device)  # (T, K, 77)
            t, k, length = ids.shape
            raw = {"final_norm": False} if self.is_xl else {}
            hidden, pool = encoder(ids.view(t * k, length), clip_skip=clip_skip + deeper, **raw)  # (T*K, 77, C)
            states.append(hidden.view(t, k * length, -1))
        context = torch.cat(states, dim=-1).to(self.dtype)  # (T, 77*K, sum of C)
        pool = pool.view(t, k, -1)[:, 0].to(self.dtype) if self.is_xl else None  # (T, P): the first chunk's
        if zeros:
            context = torch.cat([torch.zeros_like(context), context])
            pool = torch.cat([torch.zeros_like(pool), pool])
        return (context, pool) if pooled else context

    def initial_noise(self, seed: int, width: int | None = None, height: int | None = None) -> torch.Tensor:
        """The unit-variance noise (1, 4, H/8, W/8) that ``generate`` starts one text-to-image picture from for
        ``seed``; passed back as ``latents`` (with the same seed) it gives the same picture."""
        width, height = self._size(width, height, None)
        return self._initial_noise(self._latent_shape(1, width, height), None,
                                   torch.Generator("cpu").manual_seed(seed))

    def _latent_shape(self, n: int, width: int, height: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return n, self.unet.config.in_channels, height // f, width // f

    def _initial_noise(self, shape, latents, generator) -> torch.Tensor:
        if latents is None:
            return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)} but this request needs {shape} "
                             "(batch = prompts x batch_size, channels, height/8, width/8)")
        return latents.to(self.device, self.dtype)

    def _noised_image(self, image, width, height, shape, sched, steps, strength, generator, recorder):
        """img2img: the VAE latent of ``image``, noised to the timestep where the last ``strength`` of the
        schedule starts (as diffusers' StableDiffusionImg2ImgPipeline). Returns (start index, latents)."""
        first = steps - min(int(steps * strength), steps)
        start = first * sched.order
        if start >= len(sched.timesteps):
            raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step; "
                             "raise strength or steps")
        sched.set_begin_index(start)
        pixels = _image_tensor(image, width, height).to(self.device, self.dtype)
        with recorder.span("vae_encode"), self._vae_in(self._vae_dtype):
            init = self.vae.encode(pixels.to(self._vae_dtype), generator).to(self.dtype)  # (1, 4, h, w)
        init = init.expand(shape[0], -1, -1, -1)
        noise = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        return start, sched.add_noise(init, noise, start)

    # -- SDXL's added conditioning, the hand-off between base and refiner, and the overflow-safe VAE --

    def _added_conditioning(self, pooled, rows, guidance_scale, width, height, original_size, crops, target_size,
                            negative_original_size, negative_crops, negative_target_size, aesthetic_score,
                            negative_aesthetic_score) -> dict[str, torch.Tensor]:
        """SDXL's text_embeds (B', 1280) and time_ids (B', 6 or 5), ordered like the context ([negatives;
        prompts] when guiding), as diffusers' SDXL pipelines make them (Podell et al. 2023, sections 2.2-2.3):
        original size + crop top-left + target size, or, for the refiner, + aesthetic score instead."""
        original = tuple(original_size or (height, width))
        target = tuple(target_size or (height, width))
        crops = tuple(crops)
        # diffusers' rules, kept exactly: negative crops default to (0, 0), not to the positive crops; the base
        # model uses negative sizes only when both are given (else the positive ids), the refiner always has its own
        negative_crops = tuple(negative_crops) if negative_crops is not None else (0, 0)
        negative_original = tuple(negative_original_size or original)
        negative_target = tuple(negative_target_size or target)
        if self.options.get("requires_aesthetics_score", False):
            ids = original + crops + (aesthetic_score,)
            negative_ids = negative_original + negative_crops + (negative_aesthetic_score,)
        else:
            ids = original + crops + target
            both = negative_original_size is not None and negative_target_size is not None
            negative_ids = negative_original + negative_crops + negative_target if both else ids
        guide = guidance_scale > 1.0
        if pooled.ndim != 2 or len(pooled) != rows:
            raise ValueError(f"pooled_prompt_embeds of shape {tuple(pooled.shape)} do not fit prompt_embeds: need one "
                             "row per prompt_embeds row (encode_prompt(..., pooled=True) makes both)")
        n = len(pooled) // (2 if guide else 1)
        rows = [negative_ids] * n + [ids] * n if guide else [ids] * n
        time_ids = torch.tensor(rows, dtype=torch.float32, device=self.device)  # (B', 6 or 5)
        return {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": time_ids}

    def _denoising_end_index(self, sched, denoising_end: float | None) -> int | None:
        """Where a run that hands off at ``denoising_end`` stops: after the timesteps at or above the cutoff."""
        if denoising_end is None:
            return None
        cutoff = round(self._train_steps * (1.0 - denoising_end))
        return int((sched.timesteps >= cutoff).sum())

    def _denoising_start_index(self, sched, denoising_start: float) -> int:
        """Where a run that takes over at ``denoising_start`` begins (diffusers' SDXL img2img get_timesteps): at
        the timesteps below the cutoff, one earlier for a second-order scheduler so that it starts on a pair."""
        cutoff = round(self._train_steps * (1.0 - denoising_start))
        count = int((sched.timesteps < cutoff).sum())
        if sched.order == 2 and count % 2 == 0:
            count += 1
        start = len(sched.timesteps) - count
        sched.set_begin_index(start)
        return start

    @property
    def _train_steps(self) -> int:
        return self.scheduler_config.get("num_train_timesteps", 1000)

    def _decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.dtype, bool]:
        """VAE decode that never returns an overflowed picture when another precision can avoid it: SDXL's VAE
        (``force_upcast``) decodes in fp32 when the model runs in fp16, as in diffusers; any decode that still
        gives NaN / Inf in fp16 or bf16 runs again in fp32. Returns (pixels, the dtype used, whether that retry
        happened); the caller checks the result is finite."""
        dtype = self._vae_dtype
        with self._vae_in(dtype):
            decoded = self.vae.decode(latents.to(dtype))
        if torch.isfinite(decoded).all() or dtype == torch.float32 or not isinstance(self.vae, nn.Module):
            return decoded, dtype, False
        with self._vae_in(torch.float32):
            return self.vae.decode(latents.float()), torch.float32, True

    @property
    def _vae_dtype(self) -> torch.dtype:
        """fp32 for SDXL's VAE (config ``force_upcast``) in an fp16 pipeline: it overflows in fp16; else the
        pipeline's dtype (bf16 has fp32's range)."""
        if self.is_xl and self.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            return torch.float32
        return self.dtype

    @contextmanager
    def _vae_in(self, dtype: torch.dtype):
        """The VAE's weights in ``dtype`` for the duration (cast in place and back, as diffusers' upcast does: no
        second copy is kept; the fp16 -> fp32 -> fp16 round trip is exact)."""
        if dtype == self.dtype or not isinstance(self.vae, nn.Module):
            yield
            return
        self.vae.to(dtype)
        try:
            yield
        finally:
            self.vae.to(self.dtype)

    # -- input checks: one clear message per mistake --

    def _size(self, width, height, image, latents=None) -> tuple[int, int]:
        f = self.vae_scale_factor
        if image is not None:  # img2img keeps the picture's size unless told otherwise
            return width or image.width // f * f, height or image.height // f * f
        if latents is not None and latents.ndim == 4:  # given latents (e.g. a base model's hand-off) set the size
            return width or latents.shape[-1] * f, height or latents.shape[-2] * f
        default = self.unet.config.sample_size * self.vae_scale_factor
        return width or default, height or default

    def _check(self, width, height, steps, scheduler, batch_size, strength, preview_every, preview_decode,
               guidance_scale) -> None:
        for name, value in (("width", width), ("height", height), ("batch_size", batch_size),
                            ("preview_every", preview_every)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r}: need an integer")
        if not isinstance(guidance_scale, (int, float, np.number)) or isinstance(guidance_scale, bool):
            raise ValueError(f"guidance_scale={guidance_scale!r}: need a number")
        f = self.vae_scale_factor
        if width % f or height % f or width <= 0 or height <= 0:
            raise ValueError(f"size {width}x{height} is not a positive multiple of {f}: use e.g. "
                             f"{max(f, width // f * f)}x{max(f, height // f * f)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(sorted(SCHEDULERS))}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r}: need an integer >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: need at least 1 image per prompt")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength} is outside [0, 1]")
        if preview_every < 0 or preview_decode not in ("linear", "vae"):
            raise ValueError(f"previews: preview_every={preview_every} must be >= 0 and preview_decode="
                             f"{preview_decode!r} one of 'linear', 'vae'")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale} is not a finite number")

    def _check_xl(self, prompt_embeds, pooled_prompt_embeds, *micro) -> None:
        """SDXL's extra inputs: pooled embeddings with prompt_embeds; micro-conditioning only for SDXL models."""
        defaults = (None, None, None, None, (0, 0), None, 6.0, 2.5)
        given = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in micro)  # [0, 0] from JSON is (0, 0)
        if not self.is_xl:
            if pooled_prompt_embeds is not None or given != defaults:
                raise ValueError("pooled_prompt_embeds, original_size, crops_coords_top_left, target_size, their "
                                 "negative_* variants and aesthetic scores are SDXL conditioning; this is an SD 1.x "
                                 "/ 2.x model: leave them out")
            return
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("an SDXL model needs pooled_prompt_embeds with prompt_embeds: "
                             "use encode_prompt(..., pooled=True), which returns both")
        for name, value in zip(("original_size", "target_size", "negative_original_size", "negative_target_size",
                                "crops_coords_top_left", "negative_crops_coords_top_left"), micro):
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
                    isinstance(v, (int, float, np.number)) and np.isfinite(v) for v in value)):
                raise ValueError(f"{name}={value!r}: need two numbers, (height, width) or (top, left)")

    def _check_denoising_range(self, start, end, latents, image) -> None:
        for name, value in (("denoising_start", start), ("denoising_end", end)):
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name}={value} is outside (0, 1): it is the fraction of the noise schedule "
                                 "already done (start) or to do (end)")
        if start is not None and end is not None and start >= end:
            raise ValueError(f"denoising_start={start} must be below denoising_end={end}")
        if start is not None and (latents is None or image is not None):
            raise ValueError("denoising_start continues part-denoised latents: pass latents=result.latents of a "
                             "run with denoising_end (and no image)")

    def _check_embeds(self, embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        width = self.unet.config.context_dim
        guide = guidance_scale > 1.0
        if embeds.ndim != 3 or embeds.shape[-1] != width or (guide and len(embeds) % 2):
            raise ValueError(f"prompt_embeds of shape {tuple(embeds.shape)} do not fit: need (P, 77*K, {width}), "
                             "stacked [negatives; prompts] when guidance_scale > 1 (as encode_prompt makes them "
                             "with the same guidance_scale)")
        return embeds.to(self.device, self.dtype)


def load(path=None, device="cpu", dtype=None, *, overrides: dict | None = None, backend: str = "torch",
         **backend_options) -> Pipeline:
    """Load a Stable Diffusion 1.x / 2.x / XL checkpoint: a diffusers folder, or an original-layout single file
    (``.safetensors``; ``.ckpt`` only through ``weights_only=True``). Weights land directly in ``dtype`` on
    ``device``. Raises ``CheckpointError`` naming the problem for anything that cannot load. ``path`` None loads
    the small shapes model that ships with sdfast (``DEFAULT_MODEL``), offline.

    ``overrides`` (single files only) sets config fields the weights cannot reveal, in diffusers' config names,
    e.g. ``{"scheduler": {"prediction_type": "epsilon"}, "unet": {"upcast_attention": True}}`` for an SD 2.x
    file that the defaults (v-prediction at 768 px for 2.x) do not describe.

    ``backend`` "onnxruntime" or "tensorrt" runs exported graphs instead of the torch modules (``sdfast.backends``;
    ``backend_options`` go there). ``path`` may then also be a folder written by ``sdfast export``, which loads
    with no torch weights and in the dtype it was exported in; a checkpoint is exported on the fly, once.
    ``backend`` "triton" (sdfast's Triton kernels, CUDA graphs) or "compile" (``torch.compile``) converts the torch
    modules on ``device``. ``dtype`` None means fp32 for a checkpoint, fp16 for triton / compile on a GPU."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    device = _device(device)
    path = Path(path).expanduser() if path is not None else DEFAULT_MODEL
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a diffusers folder or a .safetensors / .ckpt file")
    backends.check(backend)
    if (path / "manifest.json").is_file():  # a folder written by `sdfast export`: graphs, no torch weights
        return backends.load_export(path, backend, device=device, dtype=dtype, **backend_options)
    if dtype is None:  # the triton / compile backends are built around fp16 on a GPU (their kernels, tensor cores)
        fp16 = backend in ("triton", "compile") and device.type == "cuda"
        dtype = torch.float16 if fp16 else torch.float32
    final_device = device
    if backend not in backends.IN_PLACE:
        device = torch.device("cpu")  # the export backends export their graphs from a CPU copy
    if path.is_dir():
        if overrides:
            raise ValueError("overrides apply to single files; a diffusers folder's config.json files say it all")
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is a folder without model_index.json: not a diffusers pipeline folder "
                                  "(pass the folder that holds model_index.json, unet/, vae/, text_encoder/)")
        parts = load_diffusers(path, device, dtype)
    else:
        parts = load_single_file(path, device, dtype, overrides)
    pipe = Pipeline(parts.tokenizer, parts.text_encoder, parts.unet, parts.vae, parts.scheduler_config,
                    device, dtype, parts.text_encoder_2, parts.tokenizer_2, parts.options)
    return backends.apply(backend, pipe, device=final_device, **backend_options)


def _device(device) -> torch.device:
    """``device`` as a torch.device that exists here, or a ValueError saying what is available."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name: use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if not count:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU (torch "
                             f"{torch.__version__}): use device='cpu'")
        if (device.index or 0) >= count:
            raise ValueError(f"device {str(device)!r} does not exist: this machine has {count} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported: use 'cpu' or 'cuda'")
    return device


def _read_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {str(image)!r}: {e}") from e


def _image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL -> (1, 3, H, W) in [-1, 1], resized to (width, height) when it differs (diffusers' preprocessing)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0
