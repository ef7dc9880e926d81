"""Several same-shape requests through one ``Pipeline.generate`` call, each still painting its own seed's picture.

A batch is only formed from requests whose ``GenerationRequest.batch_key()`` is equal (size, steps, scheduler,
guidance, LoRAs, controls). Each request's initial noise is drawn exactly as ``generate`` draws it for that request
alone (a fresh CPU generator seeded with its seed), and the batch is handed that noise as ``latents``; with
deterministic schedulers the batched images therefore equal the unbatched ones, up to the last bit of float
arithmetic that a different batch size may change.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends import exported
from ..request import Limits as RequestLimits
from .requests import GenerationRequest, Limits


def pipeline_limits(limits: Limits, max_batch: int) -> RequestLimits:
    """The pipeline's limits for a server's calls: the server's own (checked per request before dispatch), with
    room for a whole batch of its largest requests in one call."""
    return RequestLimits(max_pixels=limits.max_pixels, max_images=max(max_batch, limits.max_images),
                         max_steps=limits.max_steps, max_image_pixels=limits.max_image_pixels)


@dataclass
class Generated:
    """One request's answer: its PNG files, its seed, and the timings of the call that made them."""

    pngs: list[bytes]
    seed: int
    timings: dict  # milliseconds per network for the whole call (see ``timing_summary``)
    batch_images: int  # images made by that call: this request's and its batch-mates'


def engine_max_batch(pipe) -> int | None:
    """The most images one call can hold, or None when the backend takes any number: only networks over exported
    graphs have a limit (TensorRT engines: the largest batch in every optimisation profile). The U-Net sees twice
    the images under guidance; the VAE decodes each once."""
    limits = []
    if isinstance(pipe.unet, exported.UNet) and (latents := pipe.unet.max_batch()) is not None:
        limits.append(latents // 2)
    if isinstance(pipe.vae, exported.VAE) and (latents := pipe.vae.max_decode_batch()) is not None:
        limits.append(latents)
    return max(1, min(limits)) if limits else None


class Cancelled(Exception):
    """No one waits for a call's images any more (cancelled, or past the deadline): it stopped early."""


def generate_batch(pipe, requests: list[GenerationRequest], stop: Callable[[], bool] | None = None,
                   limits: RequestLimits = RequestLimits()) -> list[Generated]:
    """Run ``requests`` (one, or several with the same ``batch_key()``) as one call. ``stop()`` is asked before the
    call and after each step; once it says True, the call raises ``Cancelled`` at once (rather than return False
    to ``generate``, which would still decode images no one will get), so the device is free within a step."""
    def callback(step, timestep, latents):
        if stop():
            raise Cancelled(f"stopped after step {step}: no one waits for these images")

    first = requests[0]
    if stop is not None and stop():
        raise Cancelled("stopped before the first step: no one waits for these images")
    hook = callback if stop is not None else None
    if len(requests) == 1:
        result = pipe.generate(first.prompt, first.negative_prompt, width=first.width, height=first.height,
                               steps=first.steps, guidance_scale=first.guidance, scheduler=first.scheduler,
                               seed=first.seed, batch_size=first.n, image=first.image, strength=first.strength,
                               callback=hook, limits=limits, loras=dict(first.loras), controls=list(first.controls))
        return [Generated(_pngs(result.images), result.seed, timing_summary(result.timings), first.n)]
    keys = {r.batch_key() for r in requests}
    if len(keys) != 1 or None in keys:
        raise ValueError(f"requests with batch keys {keys} cannot share one call: group them by batch_key()")
    prompts = [r.prompt for r in requests for _ in range(r.n)]
    negatives = [r.negative_prompt for r in requests for _ in range(r.n)]
    # (sum n, C, h, w): each request's noise as generate(seed=r.seed, batch_size=r.n) draws it alone
    latents = torch.cat([pipe.initial_noise(r.seed, r.width, r.height, r.n) for r in requests])
    result = pipe.generate(prompts, negatives, width=first.width, height=first.height, steps=first.steps,
                           guidance_scale=first.guidance, scheduler=first.scheduler, seed=first.seed,
                           latents=latents, callback=hook, limits=limits, loras=dict(first.loras),
                           controls=list(first.controls))  # equal keys: every request's controls are these
    timings, pngs, out, start = timing_summary(result.timings), _pngs(result.images), [], 0
    for r in requests:
        out.append(Generated(pngs[start:start + r.n], r.seed, timings, len(prompts)))
        start += r.n
    return out


def timing_summary(timings) -> dict:
    """Per-network milliseconds of one ``generate`` call, JSON-ready (the per-step lists stay on the server)."""
    unet = timings.stats.get("unet_ms", {})
    return {"text_encoder_ms": timings.text_encoder_ms, "unet_ms": sum(timings.unet_ms),
            "unet_step_p50_ms": unet.get("p50", 0.0), "scheduler_ms": sum(timings.scheduler_ms),
            "vae_encode_ms": timings.vae_encode_ms, "vae_decode_ms": timings.vae_decode_ms,
            "total_ms": timings.total_ms, "steps": len(timings.step_ms), "device": timings.device}


def _pngs(images) -> list[bytes]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
