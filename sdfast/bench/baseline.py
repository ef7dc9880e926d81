"""The baseline every row is compared with: diffusers' ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline``
for an SDXL folder) on the same weights, timed like sdfast.

It runs as diffusers ships it (SDPA attention, its default processor), in the run's dtype, with the diffusers
scheduler of the same method, the same prompt, seed and steps. Its stages are timed with sdfast's ``Recorder``
(CUDA events on the GPU) through public hooks only: forward hooks around the text encoder (SDXL: both, summed),
the U-Net and the VAE decoder, and ``callback_on_step_end`` at the end of each step. So ``unet`` is the U-Net
forward alone (sdfast's also holds the guidance arithmetic), ``scheduler`` is everything from the U-Net's end to the
step's end (guidance and the scheduler update), and ``step`` runs from one step's end to the next: the same work as
sdfast's step.

With ``compile_mode``, the baseline is diffusers as its own guide tunes it for ``torch.compile``: channels-last
U-Net weights, fused QKV projections (``fuse_qkv_projections``), the U-Net compiled with ``fullgraph=True``. That is
the strongest PyTorch-native peer, and the row sdfast's ``triton`` backend has to beat.
"""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from ..checkpoint import read_json
from ..models import UNetConfig
from ..timing import Recorder, Timings
from .control import control_map

HAS_DIFFUSERS = all(importlib.util.find_spec(m) is not None for m in ("diffusers", "transformers"))

# sdfast scheduler name -> the diffusers class of the same method, and the config switch that selects the variant.
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


class DiffusersBaseline:
    """``generate(...) -> Timings`` over diffusers' pipeline loaded from a diffusers folder."""

    def __init__(self, model: Path, device: torch.device, dtype: torch.dtype, scheduler: str, *,
                 compile_mode: str | None = None, compiler: str | None = None, controlnet: Path | None = None):
        if not HAS_DIFFUSERS:
            raise ValueError('the diffusers baseline needs diffusers and transformers: pip install "sdfast[bench]" '
                             "(or run without the baseline: --no-baseline)")
        if not (Path(model) / "model_index.json").is_file():
            raise ValueError(f"the diffusers baseline loads diffusers folders only, and {model} is not one: "
                             "benchmark a diffusers folder (or --arch), or run with --no-baseline")
        import diffusers

        self.device = device
        xl = _is_xl(Path(model))
        extra = {"controlnet": diffusers.ControlNetModel.from_pretrained(controlnet, torch_dtype=dtype)} \
            if controlnet is not None else {}
        if xl:  # no invisible watermark: sdfast adds none, so it would be time for nothing
            cls = diffusers.StableDiffusionXLControlNetPipeline if extra else diffusers.StableDiffusionXLPipeline
            pipe = cls.from_pretrained(model, torch_dtype=dtype, add_watermarker=False, **extra)
        else:
            cls = diffusers.StableDiffusionControlNetPipeline if extra else diffusers.StableDiffusionPipeline
            pipe = cls.from_pretrained(model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
                                       **extra)
        self.controlled = controlnet is not None
        name, switches = DIFFUSERS_SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **switches)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        if compile_mode is not None or compiler is not None:
            _compile(pipe, compile_mode, compiler or "inductor")
        self.unet_config = UNetConfig.from_diffusers(dict(pipe.unet.config))
        self.vae_scale_factor = pipe.vae_scale_factor
        self.recorder = Recorder(device)
        self._open: dict[str, AbstractContextManager] = {}
        for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if encoder is not None:  # SD: one encoder; SDXL: two, one after the other
                self._timed(encoder, "text_encoder")
        self._timed(pipe.vae.decoder, "vae_decode")
        pipe.unet.register_forward_pre_hook(self._unet_start)
        pipe.unet.register_forward_hook(self._unet_end)

    def generate(self, prompt: str, *, width: int, height: int, steps: int, guidance_scale: float, seed: int,
                 batch_size: int) -> Timings:
        self.recorder = Recorder(self.device)
        self._open.clear()
        extra = {"image": control_map(width, height)} if self.controlled else {}
        with self.recorder.span("total"):
            # no negative prompt, as sdfast's runs: both encode "" for SD 1.x / 2.x, and give zero embeddings
            # where an SDXL model says force_zeros_for_empty_prompt
            self.pipe(prompt, negative_prompt=None, width=width, height=height, num_inference_steps=steps,
                      guidance_scale=guidance_scale, num_images_per_prompt=batch_size,
                      generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=self._step_end,
                      **extra)
        return Timings.from_spans(self.recorder.resolve(), self.device)

    # -- the hooks: a span opens in one callback and closes in another --

    def _start(self, name: str) -> None:
        span = self.recorder.span(name)
        span.__enter__()
        self._open[name] = span

    def _end(self, name: str) -> None:
        self._open.pop(name).__exit__(None, None, None)

    def _timed(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self._start(name))
        module.register_forward_hook(lambda *_: self._end(name))

    def _unet_start(self, *_) -> None:
        if "step" not in self._open:  # the first step; later ones open where the previous one ended
            self._start("step")
        self._start("unet")

    def _unet_end(self, *_) -> None:
        self._end("unet")
        self._start("scheduler")

    def _step_end(self, pipe, index: int, timestep, kwargs: dict) -> dict:
        self._end("scheduler")
        self._end("step")
        if index + 1 < pipe.num_timesteps:
            self._start("step")
        return kwargs


def _compile(pipe, mode: str | None, compiler: str) -> None:
    """diffusers' torch.compile recipe, in place: channels-last, fused QKV, the U-Net compiled whole. The hooks that
    time the U-Net sit on the compiled module's wrapper, outside the graph."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.fuse_qkv_projections()
    if mode is None:  # the compile backend's own default, so speedup_compiled compares like with like
        from ..backends.compile import CompileOptions

        mode = CompileOptions.mode
    pipe.unet = torch.compile(pipe.unet, mode=mode if compiler == "inductor" else None, backend=compiler,
                              fullgraph=True)


def _is_xl(model: Path) -> bool:
    """An SDXL diffusers folder (base or refiner): its U-Net has the "text_time" added embedding."""
    return read_json(model / "unet" / "config.json").get("addition_embed_type") == "text_time"
