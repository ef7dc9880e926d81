"""Morph one prompt's image into another's: frames generated along a path between their noises and text embeddings.

The initial noises are blended by spherical interpolation, which keeps a blend of two unit-variance Gaussian draws
at the norm such draws have (a straight line between them passes through lower-variance noise, which the model
turns into flat, washed-out images; Shoemake 1985, used for latent walks since White 2016, "Sampling Generative
Networks"). The text embeddings are blended linearly, and so are SDXL's pooled text embeddings (its U-Net's
``text_embeds``), which carry the prompt too. Every frame runs ``Pipeline.generate`` with the blended ``latents`` and
``prompt_embeds`` (+ ``pooled_prompt_embeds``), so the two end frames are exactly
``pipe.generate(prompt_a, seed=seed)`` and ``pipe.generate(prompt_b, seed=seed_b)``.
"""

from __future__ import annotations

import torch
from PIL import Image

from .pipeline import Pipeline
from .schedulers import STOCHASTIC_SCHEDULERS


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between ``a`` (t = 0) and ``b`` (t = 1), treating each as one flat vector; exactly
    ``a`` and ``b`` at the ends, linear when they are (nearly) parallel."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if theta < 1e-4:
        return (1 - t) * a + t * b
    wa, wb = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (wa * a.double() + wb * b.double()).to(a.dtype)


def interpolate(pipe: Pipeline, prompt_a: str, prompt_b: str, frames: int = 8, *, seed: int = 0,
                seed_b: int | None = None, steps: int = 20, guidance_scale: float = 7.5, scheduler: str = "euler",
                negative_prompt: str | None = None, width: int | None = None,
                height: int | None = None) -> list[Image.Image]:
    """``frames`` images from ``prompt_a`` (with the noise of ``seed``) to ``prompt_b`` (with the noise of
    ``seed_b``, by default the same ``seed``: then only the prompt changes along the strip)."""
    if frames < 2:
        raise ValueError(f"frames={frames}: need at least 2 (the two ends)")
    if scheduler in STOCHASTIC_SCHEDULERS:  # frames would flicker; the end frames' noise could not be replayed
        raise ValueError(f"scheduler {scheduler!r} adds fresh noise at every step; interpolate with a "
                         "deterministic one (euler, ddim, dpmpp_2m, ...)")
    seed_b = seed if seed_b is None else seed_b
    # per prompt: the context (P, 77, C) and, for SDXL, the pooled text (P, 1280), else None
    (embeds_a, pooled_a), (embeds_b, pooled_b) = (
        pipe.encode_prompt(p, negative_prompt, guidance_scale=guidance_scale, pooled=True)
        for p in (prompt_a, prompt_b))
    noise_a, noise_b = (pipe.initial_noise(s, width, height) for s in (seed, seed_b))
    images = []
    for i in range(frames):
        t = i / (frames - 1)
        embeds = (1 - t) * embeds_a + t * embeds_b  # exactly embeds_a at t = 0 and embeds_b at t = 1
        pooled = None if pooled_a is None else (1 - t) * pooled_a + t * pooled_b
        result = pipe.generate(None, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                               latents=slerp(noise_a, noise_b, t), steps=steps, guidance_scale=guidance_scale,
                               scheduler=scheduler, width=width, height=height, seed=seed)
        images.extend(result.images)
    return images


def strip(images: list[Image.Image]) -> Image.Image:
    """The images side by side, left to right."""
    out = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out
