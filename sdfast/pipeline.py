"""Prompt to pixels: ``load`` a checkpoint, then ``Pipeline.generate``. The only place the stages meet."""

from __future__ import annotations

import random
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

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side: 8 for SD (one halving per VAE level but the last)."""
        return 2 ** (len(self.vae.config.block_channels) - 1)


    @torch.inference_mode()
    def generate(self, prompt: str | list[str] | None, negative_prompt: str | list[str] | None = None, *,
                 width: int | None = None, height: int | None = None, steps: int = 30, guidance_scale: float = 7.5,
                 scheduler: str = "euler", seed: int | None = None, batch_size: int = 1, clip_skip: int = 1,
                 latents: torch.Tensor | None = None, image: Image.Image | str | Path | None = None,
                 strength: float = 0.8, long_prompts: bool = False, preview_every: int = 0,
                 preview_decode: str = "linear", callback: Callable | None = None,
                 prompt_embeds: torch.Tensor | None = None) -> GenerationResult:
        """Text to image, or image to image when ``image`` is given.

        ``batch_size`` images per prompt; ``clip_skip`` 1 = last CLIP layer, 2 = penultimate (the webui's slider);
        ``latents`` (B, 4, H/8, W/8) is user-given unit-variance initial noise; ``image`` + ``strength`` is img2img
        (VAE-encode, noise to the strength's timestep, denoise the remaining steps). ``preview_every`` N > 0 adds
        previews every N steps, a linear latent-to-RGB map or, with ``preview_decode="vae"``, a full VAE decode.
        ``callback(step, timestep, latents)`` runs after every step; returning False stops the loop early.
        ``prompt_embeds`` replaces ``prompt`` (pass None) and ``negative_prompt``: text embeddings made by
        ``encode_prompt`` with the same ``guidance_scale`` (e.g. blends of two prompts' embeddings).
        The same seed gives the same images on the same device and backend (noise is drawn on the CPU).
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either a prompt or prompt_embeds (from encode_prompt), not both or neither")
        if latents is not None and image is not None:
            raise ValueError("latents= is the initial noise of text to image; img2img (image=) draws its own noise "
                             "from the seed: pass one or the other")
        init_image = _read_image(image) if image is not None else None
        width, height = self._size(width, height, init_image)
        self._check(width, height, steps, scheduler, batch_size, strength, preview_every, preview_decode,
                    guidance_scale)
        seed = random.randrange(2**63) if seed is None else int(seed)
        generator = torch.Generator("cpu").manual_seed(seed)
        recorder = Recorder(self.device)
        previews: list[tuple[int, list[Image.Image]]] = []

        with recorder.span("total"):
            with recorder.span("text_encoder"):
                if prompt_embeds is None:
                    prompt_embeds = self.encode_prompt(prompt, negative_prompt, guidance_scale=guidance_scale,
                                                       clip_skip=clip_skip, long_prompts=long_prompts)
            context = self._check_embeds(prompt_embeds, guidance_scale).repeat_interleave(batch_size, dim=0)
            shape = self._latent_shape(len(context) // (2 if guidance_scale > 1.0 else 1), width, height)
            sched = make_scheduler(scheduler, self.scheduler_config)
            sched.set_timesteps(steps, self.device)
            if init_image is None:
                start = 0
                x = self._initial_noise(shape, latents, generator) * sched.init_noise_sigma
            else:
                start, x = self._noised_image(init_image, width, height, shape, sched, steps, strength, generator,
                                              recorder)

            def preview(step: int, x0: torch.Tensor) -> None:
                if preview_decode == "vae":
                    previews.append((step, to_pil(self.vae.decode(x0.to(self.dtype)))))
                else:
                    previews.append((step, latent_preview(x0, (width, height))))

            x = denoise(self.unet, sched, x, context, guidance_scale=guidance_scale, start=start,
                        generator=generator, recorder=recorder, callback=callback, preview=preview,
                        preview_every=preview_every)
            with recorder.span("vae_decode"):
                decoded = self.vae.decode(x)
        if not (torch.isfinite(x).all() and torch.isfinite(decoded).all()):
            raise FloatingPointError(
                f"the result holds NaN or Inf (dtype {self.dtype}): the model overflowed. Load it with "
                "dtype=torch.float32 or torch.bfloat16 instead of showing a black image")
        return GenerationResult(to_pil(decoded), x, Timings.from_spans(recorder.resolve(), self.device), seed,
                                previews)

    # -- the stages --

    @torch.inference_mode()
    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                      guidance_scale: float = 7.5, clip_skip: int = 1, long_prompts: bool = False) -> torch.Tensor:
        """Text embeddings as ``generate`` uses them: (2P, 77*K, C) ordered [negatives; prompts] when guiding
        (``guidance_scale`` > 1), else the P prompts' (P, 77*K, C); long prompts are encoded 77 tokens at a time
        and concatenated (K chunks)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt={prompt!r}: need a string or a non-empty list of strings")
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt")
        layers = self.text_encoder.config.num_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip={clip_skip} is out of range: use 1..{layers} (1 = last layer)")
        texts = negatives + prompts if guidance_scale > 1.0 else prompts
        ids = self.tokenizer.encode(texts, long_prompts=long_prompts).to(self.device)  # (T, K, 77)
        t, k, length = ids.shape
        hidden, _ = self.text_encoder(ids.view(t * k, length), clip_skip=clip_skip)  # (T*K, 77, C)
        return hidden.view(t, k * length, -1).to(self.dtype)

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
        with recorder.span("vae_encode"):
            init = self.vae.encode(pixels, generator)  # (1, 4, h, w)
        init = init.expand(shape[0], -1, -1, -1)
        noise = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        return start, sched.add_noise(init, noise, start)

    # -- input checks: one clear message per mistake --

    def _size(self, width, height, image) -> tuple[int, int]:
        if image is not None:  # img2img keeps the picture's size unless told otherwise
            f = self.vae_scale_factor
            return width or image.width // f * f, height or image.height // f * f
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
    """Load a Stable Diffusion 1.x / 2.x checkpoint: a diffusers folder, or an original-layout single file
    (``.safetensors``; ``.ckpt`` only through ``weights_only=True``). Weights land directly in ``dtype`` on
    ``device``. Raises ``CheckpointError`` naming the problem for anything that cannot load. ``path`` None loads
    the small shapes model that ships with sdfast (``DEFAULT_MODEL``), offline.

    ``overrides`` (single files only) sets config fields the weights cannot reveal, in diffusers' config names,
    e.g. ``{"scheduler": {"prediction_type": "epsilon"}, "unet": {"upcast_attention": True}}`` for an SD 2.x
    file that the defaults (v-prediction at 768 px for 2.x) do not describe.

    ``backend`` "onnxruntime" or "tensorrt" runs exported graphs instead of the torch modules (``sdfast.backends``;
    ``backend_options`` go there). ``path`` may then also be a folder written by ``sdfast export``, which loads
    with no torch weights and in the dtype it was exported in; a checkpoint is exported on the fly, once.
    ``dtype`` None means fp32 for a checkpoint."""
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
    dtype = torch.float32 if dtype is None else dtype
    final_device = device
    if backend != "torch":
        device = torch.device("cpu")  # the other backends export their graphs from a CPU copy
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
                    device, dtype)
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
