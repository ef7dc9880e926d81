"""Same-shape requests through one generate call: each request gets the picture its seed gives alone (no Ray)."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

import sdfast
from sdfast.serve.batching import Cancelled, engine_max_batch, generate_batch
from sdfast.serve.requests import GenerationRequest


@pytest.fixture(scope="module")
def pipe(sd1):
    return sdfast.load(sd1.path)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def request(prompt, seed, n=1, **kw):
    return GenerationRequest(prompt, "blurry", 4, 7.5, 64, 64, seed, kw.pop("scheduler", "dpmpp_2m"), n, "json", **kw)


def test_a_batch_paints_what_each_seed_paints_alone(pipe):
    requests = [request("a red circle", 3), request("a blue square", 11, n=2), request("a green line", 5)]
    batched = generate_batch(pipe, requests)
    assert [len(g.pngs) for g in batched] == [1, 2, 1] and [g.seed for g in batched] == [3, 11, 5]
    assert all(g.batch_images == 4 for g in batched)
    for req, got in zip(requests, batched):
        alone = generate_batch(pipe, [req])[0]
        assert alone.batch_images == req.n
        for a, b in zip(alone.pngs, got.pngs):  # equal up to float rounding of a different batch size
            assert np.abs(pixels(a) - pixels(b)).max() <= 1
    direct = pipe.generate("a blue square", "blurry", width=64, height=64, steps=4, scheduler="dpmpp_2m", seed=11,
                           batch_size=2).images
    assert np.abs(pixels(batched[1].pngs[1]) - np.asarray(direct[1], dtype=np.int16)).max() <= 1


def test_requests_of_different_shapes_are_refused_as_a_batch(pipe):
    with pytest.raises(ValueError, match="cannot share one call"):
        generate_batch(pipe, [request("a", 1), dataclasses.replace(request("b", 2), steps=5)])
    with pytest.raises(ValueError, match="cannot share one call"):  # stochastic: never batched
        generate_batch(pipe, [request("a", 1, scheduler="euler_a"), request("b", 2, scheduler="euler_a")])


@pytest.mark.parametrize("requests", [[request("a red circle", 3)], [request("a", 1), request("b", 2)]],
                         ids=["alone", "batched"])
def test_a_stopped_call_ends_after_the_step_it_was_told_in(pipe, requests):
    asked = []

    def stop() -> bool:  # asked before the call, then after each step: True after step 2 of 4
        asked.append(True)
        return len(asked) > 2

    with pytest.raises(Cancelled, match="stopped after step 2: no one waits for these images"):
        generate_batch(pipe, requests, stop)
    with pytest.raises(Cancelled, match="before the first step"):
        generate_batch(pipe, requests, lambda: True)


def test_timings_name_every_network(pipe):
    got = generate_batch(pipe, [request("a red circle", 3)])[0]
    assert set(got.timings) >= {"text_encoder_ms", "unet_ms", "vae_decode_ms", "total_ms"}
    assert got.timings["steps"] == 4 and got.timings["unet_ms"] > 0


def test_sizes_and_batch_caps_of_the_torch_backend(pipe):
    assert pipe.default_size == 64
    assert engine_max_batch(pipe) is None  # eager torch takes any batch


def test_engines_cap_the_batch_by_their_profiles():
    """TensorRT engines fix the batch in their optimisation profiles: a call holds as many images as every profile
    of the U-Net (two latents per image under guidance) and of the VAE decoder admits; ONNX Runtime takes any."""
    from types import SimpleNamespace

    from sdfast.backends import exported
    from sdfast.backends.onnxruntime import Session
    from sdfast.backends.tensorrt import EngineSet
    from sdfast.models import UNetConfig, VAEConfig

    def engines(name, *max_rows):  # one engine per profile, each admitting 1..rows rows
        return EngineSet([SimpleNamespace(meta={"profiles": [{name: [[1, 4, 8, 8], [1, 4, 8, 8], [rows, 4, 8, 8]]}]})
                          for rows in max_rows], device=None, onnx_file=None)

    def pipe_on(unet_run, decode_run):
        return SimpleNamespace(unet=exported.UNet(unet_run, UNetConfig()),
                               vae=exported.VAE(None, decode_run, VAEConfig()))

    assert engine_max_batch(pipe_on(engines("sample", 16, 8), engines("latent", 8))) == 4
    assert engine_max_batch(pipe_on(engines("sample", 16), engines("latent", 3))) == 3
    assert engine_max_batch(pipe_on(engines("sample", 1), engines("latent", 1))) == 1  # never 0
    any_batch = Session.__new__(Session)  # a graph with a dynamic batch axis
    assert engine_max_batch(pipe_on(any_batch, any_batch)) is None


def test_a_batch_larger_than_the_pipelines_default_limit_runs():
    """A server with --max-batch 32 calls generate with room for 32 images (the pipeline's own default is 16)."""
    from sdfast.serve.batching import pipeline_limits
    from sdfast.serve.requests import Limits

    limits = pipeline_limits(Limits(), 32)
    assert limits.max_images == 32 and limits.max_pixels == Limits().max_pixels
