"""The forward process, shown: an image as training sees it at chosen timesteps, what the sampler then undoes.

The image is encoded by the model's VAE (a seeded posterior sample, scaled like the training latents), noised with the
model's own training schedule, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4; the scheduler's
``add_noise``), and decoded back to pixels. One noise draw serves every timestep, so a strip shows the same noise
growing over the picture."""

from __future__ import annotations

import torch
from PIL import Image

from .pipeline import Pipeline
from .request import Request, RequestError, read_image
from .sampler import from_pil, to_pil
from .schedulers import make_scheduler


@torch.inference_mode()
def forward_process(pipe: Pipeline, image, timesteps: list[int], seed: int = 0) -> list[Image.Image]:
    """``image`` (PIL, a path or a file) at each of ``timesteps`` (0 .. the schedule's last), at the model's size
    multiple nearest below the picture's own."""
    picture = read_image(image)
    schedule = make_scheduler("ddim", pipe.scheduler_config).alphas_cumprod  # any scheduler: the training schedule
    last = len(schedule) - 1
    for t in timesteps:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= last:
            raise RequestError("timesteps", t, f"need integers in 0..{last} (the training schedule's steps)")
    r = Request.check("", image=picture, seed=seed).fit(pipe.facts)
    pixels = (from_pil(r.image, r.width, r.height) * 2 - 1).to(pipe.device, pipe.dtype)  # (1, 3, H, W) in [-1, 1]
    generator = torch.Generator("cpu").manual_seed(seed)
    latent = pipe.vae.encode(pixels, generator)  # (1, 4, h, w): a posterior sample, scaled, as img2img draws it
    noise = pipe.initial_noise(seed, r.width, r.height)
    frames = []
    for t in timesteps:
        abar = schedule[t].to(pipe.device, torch.float32)
        noisy = abar.sqrt() * latent.float() + (1 - abar).sqrt() * noise.float()
        frames += to_pil(pipe.vae.decode(noisy.to(pipe.dtype)))
    return frames
