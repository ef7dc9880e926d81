"""Pipeline benchmarks: each network and a whole generation, sdfast's torch backend beside diffusers on the same
weights (see conftest.py for the model, device and options).

    python -m pytest benchmarks/test_pipeline.py --benchmark-group-by=group --sdfast-arch sd15

Groups pair sdfast with diffusers, so pytest-benchmark's table shows the ratio; the U-Net rows carry the achieved
TFLOP/s (FLOPs counted from the shapes) in ``extra_info``. With ``--benchmark-disable`` (CI) every benchmark runs once
as a smoke test; the assertions check shapes, never timings. For the full matrix of backends, sizes and batches,
with reports, use ``sdfast bench``.
"""

from __future__ import annotations

import pytest
import torch

from sdfast.bench.flops import unet_flops

PROMPT = "a photograph of an astronaut riding a horse"


def _latents(case, pipe):
    """Guided U-Net inputs: latents (2B, 4, h, w), a timestep, text embeddings (2B, 77, C)."""
    side = case.size // pipe.vae_scale_factor
    x = torch.randn(2 * case.batch, pipe.unet.config.in_channels, side, side, device=case.device, dtype=case.dtype)
    context = pipe.encode_prompt([PROMPT] * case.batch)  # (2B, 77, C): negatives then prompts
    return x, torch.tensor(500.0, device=case.device), context


def _throughput(benchmark, case, pipe):
    side = case.size // pipe.vae_scale_factor
    flops = unet_flops(pipe.unet.config, 2 * case.batch, side, side)
    benchmark.extra_info.update(flops=flops, device=torch.cuda.get_device_name() if case.device.type == "cuda"
                                else "cpu", shape=f"{case.arch} {case.size}px batch {case.batch}")
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["tflops_at_median"] = flops / benchmark.stats.stats.median / 1e12


@pytest.mark.benchmark(group="unet")
def test_unet_sdfast(benchmark, case, pipe, synced):
    x, t, context = _latents(case, pipe)
    with torch.inference_mode():
        out = benchmark(synced(pipe.unet), x, t, context)
    assert out.shape == x.shape
    _throughput(benchmark, case, pipe)


@pytest.mark.benchmark(group="unet")
def test_unet_diffusers(benchmark, case, pipe, diffusers_pipe, synced):
    x, t, context = _latents(case, pipe)
    with torch.inference_mode():
        out = benchmark(synced(lambda *a: diffusers_pipe.unet(*a).sample), x, t, context)
    assert out.shape == x.shape
    _throughput(benchmark, case, pipe)


@pytest.mark.benchmark(group="text_encoder")
def test_text_encoder_sdfast(benchmark, case, pipe, synced):
    ids = pipe.tokenizer.encode([PROMPT] * 2 * case.batch).view(-1, 77).to(case.device)
    with torch.inference_mode():
        hidden, _ = benchmark(synced(pipe.text_encoder), ids)
    assert hidden.shape == (2 * case.batch, 77, pipe.text_encoder.config.hidden_size)


@pytest.mark.benchmark(group="text_encoder")
def test_text_encoder_diffusers(benchmark, case, pipe, diffusers_pipe, synced):
    ids = pipe.tokenizer.encode([PROMPT] * 2 * case.batch).view(-1, 77).to(case.device)
    with torch.inference_mode():
        hidden = benchmark(synced(lambda i: diffusers_pipe.text_encoder(i)[0]), ids)
    assert hidden.shape == (2 * case.batch, 77, pipe.text_encoder.config.hidden_size)


@pytest.mark.benchmark(group="vae_decode")
def test_vae_decode_sdfast(benchmark, case, pipe, synced):
    side = case.size // pipe.vae_scale_factor
    z = torch.randn(case.batch, 4, side, side, device=case.device, dtype=case.dtype)
    with torch.inference_mode():
        image = benchmark(synced(pipe.vae.decode), z)
    assert image.shape == (case.batch, 3, case.size, case.size)


@pytest.mark.benchmark(group="vae_decode")
def test_vae_decode_diffusers(benchmark, case, pipe, diffusers_pipe, synced):
    side = case.size // pipe.vae_scale_factor
    z = torch.randn(case.batch, 4, side, side, device=case.device, dtype=case.dtype)
    with torch.inference_mode():
        image = benchmark(synced(lambda latents: diffusers_pipe.vae.decode(latents).sample), z)
    assert image.shape == (case.batch, 3, case.size, case.size)


@pytest.mark.benchmark(group="generate")
def test_generate_sdfast(benchmark, case, pipe):
    result = benchmark(pipe.generate, PROMPT, width=case.size, height=case.size, steps=case.steps, seed=0,
                       batch_size=case.batch)  # returns PIL images: synchronised by the copy to the host
    assert len(result.images) == case.batch and len(result.timings.unet_ms) == case.steps


@pytest.mark.benchmark(group="generate")
def test_generate_diffusers(benchmark, case, diffusers_pipe):
    from diffusers import EulerDiscreteScheduler

    diffusers_pipe.scheduler = EulerDiscreteScheduler.from_config(diffusers_pipe.scheduler.config)  # sdfast's default
    images = benchmark(lambda: diffusers_pipe(PROMPT, width=case.size, height=case.size, num_inference_steps=case.steps,
                                              num_images_per_prompt=case.batch,
                                              generator=torch.Generator("cpu").manual_seed(0)).images)
    assert len(images) == case.batch
