"""The denoising loop: classifier-free guidance around the U-Net, the scheduler update, per-step timing, previews.

Plain functions of a U-Net callable, a scheduler (``sdfast.schedulers``) and tensors; ``pipeline.py`` prepares the
inputs and decodes the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .schedulers import Scheduler
from .schedulers.parameterisation import x0_at_alpha
from .timing import Recorder

@dataclass(frozen=True)
class LatentRGB:
    """An affine map from latent channels to RGB in [-1, 1], ``rgb = latent @ matrix + bias``: the cheap preview.
    Colours and layout, no fine detail. Only a VAE whose latents are close to linear in colour has one: SD 1.x /
    2.x's and SDXL's (the least-squares factors the webui and ComfyUI use); ``for_vae`` says None for any other
    (the shipped default model's small VAE mixes colour non-linearly: its best linear map draws its green star
    black on white), whose previews are decoded instead."""

    matrix: torch.Tensor  # (C, 3)
    bias: torch.Tensor  # (3,)

    @classmethod
    def for_vae(cls, config) -> "LatentRGB | None":
        """The map of SD 1.x / 2.x's VAE or of SDXL's, told apart by their architecture and scaling factor."""
        if config.latent_channels != 4 or tuple(config.block_channels) != (128, 256, 512, 512):
            return None
        factors = _LATENT_RGB.get(round(config.scaling_factor, 5))
        return None if factors is None else cls(torch.tensor(factors), torch.zeros(3))

    def __call__(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Image.Image]:
        """(B, C, h, w) latents, scaled as the U-Net sees them -> RGB previews resized to ``size`` (W, H)."""
        rgb = torch.einsum("bchw,cr->brhw", latents.float(), self.matrix.to(latents.device))
        return to_pil(rgb + self.bias.to(latents.device).view(1, 3, 1, 1), size)


# Rows: latent channels; columns: R, G, B. By the VAE's scaling factor: SD 1.x / 2.x (0.18215), SDXL (0.13025).
_LATENT_RGB = {
    0.18215: [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
              [-0.2120, -0.2616, -0.7177]],
    0.13025: [[0.3920, 0.4054, 0.4549], [-0.2634, -0.0196, 0.0653], [0.0568, 0.1687, -0.0755],
              [-0.3112, -0.2359, -0.2076]],
}


@dataclass
class Conditioning:
    """What the U-Net is conditioned on, one row per U-Net batch row: [negatives; prompts] when guiding.
    ``context`` (B', 77*K, C) is the text; ``added`` holds the model family's other inputs by the U-Net's keyword
    names (SDXL: ``text_embeds`` (B', 1280) and ``time_ids`` (B', 6 or 5); nothing for SD 1.x / 2.x), so every
    backend's U-Net is called the same way: ``unet(x, t, context, **added)``. ``controls`` are the ControlNets of
    the call (``sdfast.control.Active``: a network, its image rows, scale and schedule window)."""

    context: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    controls: tuple = ()

    def at(self, call: int, calls: int) -> Conditioning:
        """The conditioning of model call ``call`` of ``calls``: the controls whose window holds it."""
        if not self.controls:
            return self
        return replace(self, controls=tuple(c for c in self.controls if c.acts_at(call, calls)))


def control_residuals(controls, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      added: dict[str, torch.Tensor]) -> dict[str, object]:
    """The U-Net's ``down_residuals`` / ``mid_residual`` from ``controls`` ((ControlNet, image, scale) each; the
    scale a float, or a 0-dim tensor inside a CUDA graph), summed in order as diffusers' MultiControlNetModel does;
    {} for none."""
    down, mid = None, None
    for net, image, scale in controls:
        d, m = net(x, t, context, image, scale, **added)
        down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
    return {} if down is None else {"down_residuals": down, "mid_residual": mid}


def unet_output(unet: Callable, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The U-Net's output for ``x`` under ``cond``. A U-Net that runs the ControlNets itself (``runs_controls``:
    the triton backend's CUDA graphs, each holding the ControlNets and the U-Net of a step) is handed the controls;
    any other, their residuals."""
    if cond.controls and getattr(unet, "runs_controls", False):
        return unet(x, t, cond.context, controls=cond.controls, **cond.added)
    controls = [(c.net, c.image, c.scale) for c in cond.controls]
    return unet(x, t, cond.context, **cond.added, **control_residuals(controls, x, t, cond.context, cond.added))


def guided(unet: Callable, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022). ``cond`` is [negative; prompt] stacked on the batch axis
    when ``scale > 1``, and the prompt alone otherwise (then the U-Net runs once, on the conditional half)."""
    if scale <= 1.0:
        return unet_output(unet, x, t, cond)
    uncond, positive = unet_output(unet, torch.cat([x, x]), t, cond).chunk(2)
    return uncond + scale * (positive - uncond)


def predicted_x0(scheduler: Scheduler, x_in: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The model's estimate of the clean latent at this step, from the U-Net's (variance-preserving) input.

    Every scheduler here hands the U-Net x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, so x0 follows from its
    output whatever the scheduler does next (epsilon or v parameterisation, DDPM eq. 15 / Salimans & Ho 2022)."""
    index = int(t.float().round().clamp(0, len(scheduler.alphas_cumprod) - 1))
    abar = scheduler.alphas_cumprod[index].to(x_in.device, torch.float32)
    return x0_at_alpha(scheduler.config.prediction_type, out.float(), x_in.float(), abar)


def to_pil(images: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers' image processor does."""
    arrays = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    pils = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]
    if size is not None:
        pils = [p if p.size == size else p.resize(size, Image.BILINEAR) for p in pils]
    return pils


def from_pil(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL -> (1, 3, height, width) in [0, 1], resized when its size differs (Lanczos, as diffusers' image
    processor)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def denoise(unet: Callable, scheduler: Scheduler, latents: torch.Tensor, cond: Conditioning, *,
            guidance_scale: float, start: int, generator: torch.Generator | None, recorder: Recorder,
            end: int | None = None,
            callback: Callable | None = None, preview: Callable[[int, torch.Tensor], None] | None = None,
            preview_every: int = 0) -> torch.Tensor:
    """Run the scheduler's model calls from index ``start`` to ``end`` (None: the last; or until ``callback``
    returns False). A run that stops early (``end``) hands its still noisy latents to another model (SDXL refiner).

    ``callback(step, timestep, latents)`` sees the latents after each step (1-based step count); ``preview(step, x0)``
    gets the model's clean-latent estimate every ``preview_every`` steps and at the last step."""
    timesteps = scheduler.timesteps[start:end]
    for step, t in enumerate(timesteps, start=1):
        index = start + step - 1
        with recorder.span("step"):
            with recorder.span("unet"):
                x_in = scheduler.scale_model_input(latents, index)
                out = guided(unet, x_in, t, cond.at(step - 1, len(timesteps)), guidance_scale)
            with recorder.span("scheduler"):
                latents = scheduler.step(out, index, latents, generator)
        if preview is not None and preview_every and (step % preview_every == 0 or step == len(timesteps)):
            with recorder.span("preview"):
                preview(step, predicted_x0(scheduler, x_in, t, out))
        if callback is not None and callback(step, t, latents) is False:
            break
    return latents
