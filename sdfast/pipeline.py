"""Prompt to pixels: ``Pipeline.generate`` (``sdfast.load`` makes the pipeline). The only place the stages meet."""

from __future__ import annotations

import copy
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image
from torch import nn

from .control.controls import Active, ControlNets
from .lora import LoRAs
from .models import image_side
from .request import ModelFacts, Request, RequestError, texts
from .sampler import Conditioning, LatentRGB, denoise, from_pil, to_pil
from .schedulers import make_scheduler
from .timing import Recorder, Timings
from .tokenizer import Tokenizer

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
    # SDXL: the OpenCLIP bigG encoder (projected pooled output) and its tokenizer, and diffusers' SDXL pipeline options
    # force_zeros_for_empty_prompt / requires_aesthetics_score. The refiner has only these (tokenizer and
    # text_encoder None).
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Tokenizer | None = None
    xl_options: dict = field(default_factory=dict)
    # the words the model was trained on, when its folder says (vocabulary.json: the shipped default model's):
    # prompts with others get a warning rather than a silently unrelated picture
    vocabulary: frozenset[str] | None = None
    # the backend's conversion of a ControlNet module as it is added (``pipe.controlnets``); None: the backend runs
    # no ControlNets
    control_step: Callable[[nn.Module], nn.Module] | None = None
    # the export backends' way from a ControlNet file to its exported graph (``pipe.controlnets.load``,
    # ``sdfast.backends.exported.ControlGraphs``); None: files load as torch modules, through ``control_step``
    control_loader: Callable | None = None
    # one call at a time (run()), and the VAE's twins in other dtypes (_vae()): per pipeline, never copied over
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)
    _twins: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _loras: LoRAs | None = field(default=None, init=False, repr=False, compare=False)
    _controlnets: ControlNets | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def latent_rgb(self) -> LatentRGB | None:
        """The cheap preview's latent-to-RGB map of this model's VAE (SD 1.x / 2.x, SDXL), or None: previews decode."""
        return LatentRGB.for_vae(self.vae.config)

    @property
    def loras(self) -> LoRAs:
        """The LoRAs loaded into this pipeline (``pipe.loras.load(path, scale)``, ``set_scale``, ``unload``)."""
        if self._loras is None:
            self._loras = LoRAs(self, self._lock)
        return self._loras

    @property
    def controlnets(self) -> ControlNets:
        """The ControlNets this pipeline holds by name (``pipe.controlnets.load(path)``), for ``controls=``."""
        if self._controlnets is None:
            self._controlnets = ControlNets(self, self._lock)
        return self._controlnets

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side: 8 for SD (one halving per VAE level but the last)."""
        return image_side(1, len(self.vae.config.block_channels))

    @property
    def is_xl(self) -> bool:
        """An SDXL model (base or refiner): its U-Net takes the "text_time" added conditioning."""
        return getattr(self.unet.config, "added_time_dim", None) is not None


    @property
    def default_size(self) -> int:
        """The image side the model was trained at (its latent side times the VAE's factor): ``generate``'s size
        when none is given."""
        return image_side(self.unet.config.sample_size, len(self.vae.config.block_channels))

    @property
    def facts(self) -> ModelFacts:
        """What a request is checked against (``Request.fit``)."""
        deeper = 1 if self.is_xl else 0  # SDXL reads one layer before the end: its clip_skip 1 is that layer
        layers = min(enc.config.num_layers for enc in (self.text_encoder, self.text_encoder_2) if enc is not None)
        return ModelFacts(self.vae_scale_factor, self.default_size, self.unet.config.in_channels, layers - deeper,
                          self.is_xl, self.xl_options.get("requires_aesthetics_score", False),
                          self.latent_rgb is not None)

    def generate(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 **fields) -> GenerationResult:
        """Text to image, or image to image when ``image`` is given: ``run(Request.check(prompt, ...))``.

        Fields (``sdfast.request.Request.check``; every mistake is a ``RequestError`` naming the field): ``width``,
        ``height`` (default: the model's size); ``steps``; ``guidance_scale``; ``scheduler``; ``seed``;
        ``batch_size`` images per prompt; ``clip_skip`` 1 = last CLIP layer, 2 = penultimate (the webui's slider);
        ``latents`` (B, 4, H/8, W/8) user-given unit-variance initial noise; ``image`` + ``strength`` is img2img
        (VAE-encode, noise to the strength's timestep, denoise the remaining steps); ``long_prompts``;
        ``preview_every`` N > 0 adds previews every N steps: ``preview_decode`` "linear" (a latent-to-RGB map,
        SD 1.x / 2.x and SDXL VAEs), "vae" (a full decode) or "auto" (linear where there is a map); ``callback(step, timestep, latents)`` runs after every step,
        returning False stops the loop early; ``prompt_embeds`` replaces ``prompt`` (pass None) and
        ``negative_prompt``: embeddings made by ``encode_prompt`` with the same ``guidance_scale``; ``loras``
        ``{name: scale}`` of loaded LoRAs for this call (default: ``pipe.loras`` at their scales); ``controls`` a list
        of ``sdfast.control.Control(model, image, scale=1, start=0, end=1)``: ControlNets (by their name in
        ``pipe.controlnets``) steering the U-Net with their control images (which also set the size, when none is
        given), over the [start, end] fraction of the schedule; ``limits``
        (``sdfast.request.Limits``: pixels, images per call, steps) raises the bounds.
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
        return self.run(Request.check(prompt, negative_prompt, **fields))

    @torch.inference_mode()
    def run(self, request: Request) -> GenerationResult:
        """The six stages of a checked request: conditioning, initial latents, denoise, decode. Calls from several
        threads run one at a time (CUDA graphs, IO bindings and the VAE's fp32 twin are per pipeline)."""
        r = request.fit(self.facts)
        generator = torch.Generator("cpu").manual_seed(r.seed)
        recorder = Recorder(self.device)
        previews: list[tuple[int, list[Image.Image]]] = []
        self._check_vocabulary(r)
        with self._lock, recorder.span("total"):
            self._use_loras(r)
            with recorder.span("text_encoder"):
                cond = self.conditioning(r)
            sched = make_scheduler(r.scheduler, self.scheduler_config)
            start, end = self._window(sched, r)
            x = self._initial_latents(r, sched, start, len(cond.context) // (2 if r.guided else 1), generator,
                                      recorder)

            linear = self.latent_rgb if r.preview_decode != "vae" else None

            def preview(step: int, x0: torch.Tensor) -> None:
                previews.append((step, linear(x0, (r.width, r.height)) if linear is not None
                                 else to_pil(self._decode(x0.to(self.dtype))[0])))

            x = denoise(self.unet, sched, x, cond, guidance_scale=r.guidance_scale, start=start, end=end,
                        generator=generator, recorder=recorder, callback=r.callback, preview=preview,
                        preview_every=r.preview_every)
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f"the latents hold NaN or Inf (dtype {self.dtype}): the U-Net overflowed. Load the model with "
                    "dtype=torch.float32 or torch.bfloat16 instead of showing a black image")
            if r.denoising_end is not None:  # a hand-off: the latents are still noisy, only the next model decodes
                return GenerationResult([], x, Timings.from_spans(recorder.resolve(), self.device, r.steps), r.seed,
                                        previews)
            with recorder.span("vae_decode"):
                decoded, vae_dtype, fallback = self._decode(x)
        if not torch.isfinite(decoded).all():
            raise FloatingPointError(f"the decoded image holds NaN or Inf even in {vae_dtype}: the VAE overflowed; "
                                     "load the model with dtype=torch.float32 instead of showing a black image")
        timings = Timings.from_spans(recorder.resolve(), self.device, r.steps)
        timings.vae_dtype, timings.vae_fallback = str(vae_dtype).removeprefix("torch."), fallback
        return GenerationResult(to_pil(decoded), x, timings, r.seed, previews)

    def conditioning(self, r: Request) -> Conditioning:
        """What the U-Net is conditioned on for every image of the request: the text context, and for SDXL the
        pooled text and micro-conditioning numbers beside it; [negatives; prompts] when guiding."""
        embeds, pooled = r.prompt_embeds, r.pooled_prompt_embeds
        if embeds is None:
            embeds, pooled = self.encode_prompt(
                list(r.prompts), None if r.negative_prompts is None else list(r.negative_prompts),
                guidance_scale=r.guidance_scale, clip_skip=r.clip_skip, long_prompts=r.long_prompts, pooled=True)
        context = self._check_embeds(embeds, r.guidance_scale).repeat_interleave(r.batch_size, dim=0)
        added = {}
        if self.is_xl:
            added = self._added_conditioning(pooled.repeat_interleave(r.batch_size, dim=0), len(context), r)
        return Conditioning(context, added, self._controls(r, len(context)))

    def _controls(self, r: Request, rows: int) -> tuple[Active, ...]:
        """The request's controls with their networks and image rows (every row reads the same map)."""
        active = []
        for i, c in enumerate(r.controls):
            if isinstance(c.model, str) and c.model not in self.controlnets:
                raise RequestError(f"controls[{i}].model", c.model, "no such ControlNet is loaded (loaded: "
                                   f"{', '.join(map(repr, self.controlnets.names)) or 'none'}): load it first")
            named = isinstance(c.model, str)
            net = self.controlnets[c.model] if named else self.controlnets.prepare(c.model, convert=False)
            image = from_pil(c.image, r.width, r.height).expand(rows, -1, -1, -1).to(self.device, self.dtype)
            active.append(Active(net, image, c.scale, c.start, c.end))
        return tuple(active)

    # -- the stages --

    def _check_vocabulary(self, r: Request) -> None:
        """The notice for words neither the model nor the LoRAs this call uses were trained on."""
        if self.vocabulary is None or r.prompts is None:
            return
        used = self.loras.scales if r.loras is None else r.loras
        known = self.vocabulary.union(*(self.loras[name].words for name in used if name in self.loras))
        unknown = sorted({w for p in r.prompts for w in re.findall(r"[a-z]+", p.lower())} - known)
        if unknown:
            warnings.warn(OutsideVocabulary(unknown, known), stacklevel=3)

    def _use_loras(self, r: Request) -> None:
        """Merge the request's LoRAs (or the loaded ones at their default scales) into the weights."""
        if r.loras is None and self._loras is None:
            return
        wanted = self.loras.scales if r.loras is None else r.loras
        unknown = [name for name in wanted if name not in self.loras]
        if unknown:
            raise RequestError("loras", unknown[0], f"no such LoRA is loaded (loaded: "
                               f"{', '.join(map(repr, self.loras.scales)) or 'none'}): load it first")
        self.loras.apply(wanted)

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
        with self._lock:  # the text encoders are shared with run() (CUDA graphs, ORT bindings, engine contexts)
            return self._encode_prompt(prompt, negative_prompt, guidance_scale, clip_skip, long_prompts, pooled)

    def _encode_prompt(self, prompt, negative_prompt, guidance_scale, clip_skip, long_prompts, pooled):
        prompts = list(texts("prompt", prompt))
        negatives = list(texts("negative_prompt", negative_prompt if negative_prompt is not None else ""))
        if len(negatives) == 1:
            negatives *= len(prompts)
        if len(negatives) != len(prompts):
            raise RequestError("negative_prompt", negative_prompt, f"{len(negatives)} negative prompts for "
                               f"{len(prompts)} prompts: give one, or one per prompt")
        # (tokenizer, encoder) pairs: SD 1.x / 2.x one, SDXL two (concatenated), the refiner only the second
        towers = [(tok, enc) for tok, enc in ((self.tokenizer, self.text_encoder),
                                               (self.tokenizer_2, self.text_encoder_2)) if enc is not None]
        # SDXL conditions on the penultimate layer, un-normalised: its clip_skip N is layer N + 1 from the end
        deeper = 1 if self.is_xl else 0
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= self.facts.clip_layers:
            raise RequestError("clip_skip", clip_skip, f"out of range: use 1..{self.facts.clip_layers} (1 = the "
                               "model's own layer)")
        guide = guidance_scale > 1.0
        # diffusers' SDXL: no negative prompt + force_zeros_for_empty_prompt = zero negative embeddings
        zeros = guide and negative_prompt is None and self.xl_options.get("force_zeros_for_empty_prompt", False)
        encoded = prompts if zeros or not guide else negatives + prompts
        states = []
        for tokenizer, encoder in towers:
            ids = tokenizer.encode(encoded, long_prompts=long_prompts).to(self.device)  # (T, K, 77)
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

    def initial_noise(self, seed: int, width: int | None = None, height: int | None = None, n: int = 1
                      ) -> torch.Tensor:
        """The unit-variance noise (n, 4, H/8, W/8) that ``generate`` starts n text-to-image pictures from for
        ``seed`` (batch_size n); passed back as ``latents`` (with the same seed) it gives the same pictures."""
        r = Request.check("", width=width, height=height, seed=seed, batch_size=n).fit(self.facts)
        return self._noise(n, r, torch.Generator("cpu").manual_seed(r.seed))

    def _noise(self, n: int, r: Request, generator: torch.Generator) -> torch.Tensor:
        """(n, C, H/8, W/8) standard normal noise from ``generator``, drawn on the CPU (the same on any device)."""
        f = self.vae_scale_factor
        shape = (n, self.unet.config.in_channels, r.height // f, r.width // f)
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    def _initial_latents(self, r: Request, sched, start: int, n: int, generator, recorder) -> torch.Tensor:
        """Where denoising starts: the request's latents (a hand-off's as they are, noise scaled to the scheduler),
        noise from the seed, or for img2img the VAE latent of the image noised to the start timestep (as diffusers'
        StableDiffusionImg2ImgPipeline)."""
        if r.latents is not None:
            f = self.vae_scale_factor
            shape = (n, self.unet.config.in_channels, r.height // f, r.width // f)
            if tuple(r.latents.shape) != shape:
                raise RequestError("latents", r.latents, f"this request needs shape {shape} (prompts x batch_size, "
                                   "channels, height/8, width/8)")
            latents = r.latents.to(self.device, self.dtype)
            return latents if r.denoising_start is not None else latents * sched.init_noise_sigma
        if r.image is None:
            return self._noise(n, r, generator) * sched.init_noise_sigma
        pixels = (from_pil(r.image, r.width, r.height) * 2 - 1).to(self.device, self.dtype)  # in [-1, 1]
        with recorder.span("vae_encode"):
            vae, dtype = self._vae(self._vae_dtype)
            init = vae.encode(pixels.to(dtype), generator).to(self.dtype)  # (1, 4, h, w)
        return sched.add_noise(init.expand(n, -1, -1, -1), self._noise(n, r, generator), start)

    def _window(self, sched, r: Request) -> tuple[int, int | None]:
        return sched.window(r.steps, self.device, strength=r.strength if r.image is not None else None,
                            denoising_start=r.denoising_start, denoising_end=r.denoising_end)

    # -- SDXL's added conditioning and the overflow-safe VAE --

    def _added_conditioning(self, pooled: torch.Tensor, rows: int, r: Request) -> dict[str, torch.Tensor]:
        """SDXL's text_embeds (B', 1280) and time_ids (B', 6 or 5), ordered like the context ([negatives;
        prompts] when guiding), as diffusers' SDXL pipelines make them (Podell et al. 2023, sections 2.2-2.3):
        original size + crop top-left + target size, or, for the refiner, + aesthetic score instead."""
        m = r.micro
        original = tuple(m.original_size or (r.height, r.width))
        target = tuple(m.target_size or (r.height, r.width))
        crops = tuple(m.crops_coords_top_left)
        # diffusers' rules, kept exactly: negative crops default to (0, 0), not to the positive crops; the base
        # model uses negative sizes only when both are given (else the positive ids), the refiner always has its own
        negative_crops = tuple(m.negative_crops_coords_top_left or (0, 0))
        negative_original = tuple(m.negative_original_size or original)
        negative_target = tuple(m.negative_target_size or target)
        if self.xl_options.get("requires_aesthetics_score", False):
            ids = original + crops + (m.aesthetic_score,)
            negative_ids = negative_original + negative_crops + (m.negative_aesthetic_score,)
        else:
            ids = original + crops + target
            both = m.negative_original_size is not None and m.negative_target_size is not None
            negative_ids = negative_original + negative_crops + negative_target if both else ids
        if pooled is None or pooled.ndim != 2 or len(pooled) != rows:
            raise RequestError("pooled_prompt_embeds", pooled, "do not fit prompt_embeds: need one row per "
                               "prompt_embeds row (encode_prompt(..., pooled=True) makes both)")
        n = len(pooled) // (2 if r.guided else 1)
        table = [negative_ids] * n + [ids] * n if r.guided else [ids] * n
        time_ids = torch.tensor(table, dtype=torch.float32, device=self.device)  # (B', 6 or 5)
        return {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": time_ids}

    def _decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.dtype, bool]:
        """VAE decode that never returns an overflowed picture when another precision can avoid it: SDXL's VAE
        (``force_upcast``) decodes in fp32 when the model runs in fp16, as in diffusers; any decode that still
        gives NaN / Inf in fp16 or bf16 runs again in fp32. Returns (pixels, the dtype used, whether that retry
        happened); the caller checks the result is finite."""
        vae, dtype = self._vae(self._vae_dtype)
        decoded = vae.decode(latents.to(dtype))
        if torch.isfinite(decoded).all() or dtype == torch.float32:
            return decoded, dtype, False
        vae, dtype = self._vae(torch.float32)
        if dtype != torch.float32:  # an exported graph runs in its export's dtype only
            return decoded, self.dtype, False
        return vae.decode(latents.float()), torch.float32, True

    @property
    def _vae_dtype(self) -> torch.dtype:
        """fp32 for SDXL's VAE (config ``force_upcast``) in an fp16 pipeline: it overflows in fp16; else the
        pipeline's dtype (bf16 has fp32's range)."""
        return self.vae.config.compute_dtype(self.dtype, self.is_xl)

    def _vae(self, dtype: torch.dtype) -> tuple:
        """The VAE in ``dtype`` and the dtype it runs in: the pipeline's own, or an fp32 twin kept beside it and
        refreshed from the live weights at each use (so in-place weight changes reach it), never a cast of the
        shared weights. An exported VAE runs in its own dtype."""
        if dtype == self.dtype or not isinstance(self.vae, nn.Module):
            return self.vae, self.dtype
        key = (id(self.vae), dtype)  # a VAE swapped in (pipe.vae = ...) gets a twin of its own
        twin = self._twins.get(key)
        if twin is None:
            self._twins.clear()
            twin = self._twins[key] = copy.deepcopy(self.vae).to(dtype)
        else:
            twin.load_state_dict(self.vae.state_dict())
        return twin, dtype

    def _check_embeds(self, embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        width = self.unet.config.context_dim
        guide = guidance_scale > 1.0
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width or (
                guide and len(embeds) % 2):
            raise RequestError("prompt_embeds", embeds, f"do not fit: need (P, 77*K, {width}), stacked [negatives; "
                               "prompts] when guidance_scale > 1 (as encode_prompt makes them with the same "
                               "guidance_scale)")
        return embeds.to(self.device, self.dtype)


class OutsideVocabulary(UserWarning):
    """A prompt with words the model never saw in training (known only for models whose folder lists them)."""

    def __init__(self, words: list[str], vocabulary: frozenset[str]):
        self.words = words
        shown = ", ".join(map(repr, words[:5])) + (f" and {len(words) - 5} more" if len(words) > 5 else "")
        super().__init__(f"{shown}: not among the words this model was trained on, so expect a picture unrelated "
                         f"to them; it knows: {', '.join(sorted(vocabulary))}")
