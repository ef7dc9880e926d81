"""End to end: ``Pipeline.generate`` equals diffusers' pipelines on the same weights, noise and scheduler."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sdfast
from conftest import rel_err
from sdfast.bench.baseline import DIFFUSERS_SCHEDULERS
from sdfast.request import RequestError

DIFFUSERS = DIFFUSERS_SCHEDULERS  # sdfast name -> (diffusers class, extra config)
STEPS = 4
LATENT_TOL = 1e-4


def reference_scheduler(ref, name):
    import diffusers

    cls, extra = DIFFUSERS[name]
    return getattr(diffusers, cls).from_config({**ref.scheduler_config, **extra})


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.fixture(scope="module")
def pipes(sd1, sd2):
    return {"sd1": (sd1, sdfast.load(sd1.path)), "sd2": (sd2, sdfast.load(sd2.path))}


@pytest.mark.parametrize("model", ["sd1", "sd2"])
@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS))
def test_txt2img_matches_diffusers(pipes, model, scheduler):
    """Same seed (the initial noise, and the step noise of euler_a / lcm, come from one CPU generator in the same
    order as diffusers'), same prompts: final latents within 1e-4 relative, pixels within 1/255."""
    ref, pipe = pipes[model]
    ref.pipe.scheduler = reference_scheduler(ref, scheduler)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5, width=64, height=64)
    expected = ref.pipe("a red circle at the top left", generator=torch.Generator().manual_seed(11),
                        output_type="latent", **kwargs).images
    expected_images = ref.pipe("a red circle at the top left", generator=torch.Generator().manual_seed(11),
                               **kwargs).images
    result = pipe.generate("a red circle at the top left", negative_prompt="blurry", steps=STEPS,
                           scheduler=scheduler, seed=11, width=64, height=64)
    assert result.latents.shape == (1, 4, 8, 8)
    assert rel_err(result.latents, expected) < LATENT_TOL
    assert np.abs(pixels(result.images) - pixels(expected_images)).max() <= 1


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_batch_without_guidance_and_with_clip_skip_match_diffusers(pipes, scheduler):
    """Two prompts x two images each; guidance_scale 1 runs only the conditional half; clip_skip=2 equals
    diffusers' clip_skip=1 (diffusers counts skipped layers, we count like the webui)."""
    ref, pipe = pipes["sd1"]
    ref.pipe.scheduler = reference_scheduler(ref, scheduler)
    prompts = ["a blue square", "a green star on a textured background"]
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for guidance in (1.0, 5.0):
        expected = ref.pipe(prompts, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=guidance,
                            latents=noise.clone(), output_type="latent").images
        result = pipe.generate(prompts, steps=STEPS, guidance_scale=guidance, batch_size=2, scheduler=scheduler,
                               latents=noise.clone())
        assert len(result.images) == 4
        assert rel_err(result.latents, expected) < LATENT_TOL


def test_clip_skip_matches_reference_embeddings(pipes):
    """diffusers 0.42's clip_skip path fails on transformers 5's flattened text model, so the reference prompt
    embeddings are computed by hand (penultimate hidden state + final LayerNorm) and handed to diffusers."""
    ref, pipe = pipes["sd1"]
    ref.pipe.scheduler = reference_scheduler(ref, "ddim")
    te = ref.pipe.text_encoder
    ids = pipe.tokenizer.encode(["", "a small yellow triangle"])[:, 0]
    states = te(ids, output_hidden_states=True).hidden_states
    neg, pos = te.final_layer_norm(states[-2]).chunk(2)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=STEPS,
                            latents=noise.clone(), output_type="latent").images
    result = pipe.generate("a small yellow triangle", steps=STEPS, scheduler="ddim", clip_skip=2,
                           latents=noise.clone())
    assert rel_err(result.latents, expected) < LATENT_TOL


@pytest.mark.parametrize("model", ["sd1", "sd2"])
@pytest.mark.parametrize("scheduler,strength", [("euler", 0.6), ("ddim", 0.75), ("euler_a", 1.0), ("unipc", 0.5)])
def test_img2img_matches_diffusers(pipes, model, scheduler, strength):
    """The posterior sample of the VAE, the added noise and any step noise come from the seeded generator in
    diffusers' order, so img2img is reproducible against StableDiffusionImg2ImgPipeline exactly."""
    from diffusers import StableDiffusionImg2ImgPipeline

    ref, pipe = pipes[model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_i2i = StableDiffusionImg2ImgPipeline(**ref.pipe.components)
    ref_i2i.scheduler = reference_scheduler(ref, scheduler)
    ref_i2i.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    expected = ref_i2i("a red circle", image=image, strength=strength, num_inference_steps=5,
                       generator=torch.Generator().manual_seed(4), output_type="latent").images
    result = pipe.generate("a red circle", image=image, strength=strength, steps=5, scheduler=scheduler, seed=4)
    assert rel_err(result.latents, expected) < LATENT_TOL


def test_seed_reproducible_and_distinct(pipes):
    _, pipe = pipes["sd1"]
    a = pipe.generate("a cat", steps=2, seed=123)
    b = pipe.generate("a cat", steps=2, seed=123)
    c = pipe.generate("a cat", steps=2, seed=124)
    assert torch.equal(a.latents, b.latents) and a.seed == 123
    assert not torch.equal(a.latents, c.latents)
    d = pipe.generate("a cat", steps=2)
    assert torch.equal(pipe.generate("a cat", steps=2, seed=d.seed).latents, d.latents)


def test_callback_sees_every_step_and_can_stop(pipes):
    _, pipe = pipes["sd1"]
    seen = []

    def callback(step, t, latents):
        seen.append((step, int(t), tuple(latents.shape)))
        return step < 3

    result = pipe.generate("a cat", steps=6, scheduler="euler", seed=0, callback=callback)
    assert [s for s, _, _ in seen] == [1, 2, 3]
    assert seen[0][2] == (1, 4, 8, 8)
    assert len(result.timings.unet_ms) == 3 and len(result.images) == 1


def test_previews_sharpen_towards_the_result(pipes):
    """Previews every 2 steps show the model's clean-latent estimate, decoded ("auto": this tiny VAE has no linear
    latent-to-RGB map); the last one is the final latent's estimate, so it ends at the final image."""
    _, pipe = pipes["sd1"]
    result = pipe.generate("a cat", steps=6, scheduler="euler", seed=0, preview_every=2)
    assert [step for step, _ in result.previews] == [2, 4, 6]
    assert all(im.size == (64, 64) for _, ims in result.previews for im in ims)
    # Euler's last step lands on its clean estimate, so the last preview is the preview of the result's latents
    final = np.asarray(result.images[0], dtype=np.float64)
    dist = [np.abs(np.asarray(ims[0], dtype=np.float64) - final).mean() for _, ims in result.previews]
    assert dist[-1] < 1.0 and dist[0] > dist[-1]
    vae = pipe.generate("a cat", steps=2, scheduler="euler", seed=0, preview_every=1, preview_decode="vae")
    assert [step for step, _ in vae.previews] == [1, 2] and vae.previews[0][1][0].size == (64, 64)
    assert vae.timings.preview_ms > 0
    with pytest.raises(RequestError, match="preview_decode='linear': this model's VAE has no linear"):
        pipe.generate("a cat", steps=2, preview_every=1, preview_decode="linear")


def test_long_prompts_are_chunked(pipes):
    _, pipe = pipes["sd1"]
    long = "a red circle and " * 30
    with pytest.warns(UserWarning, match="truncated"):
        pipe.generate(long, steps=1, seed=0)
    chunked = pipe.generate(long, steps=1, seed=0, long_prompts=True)
    short = pipe.generate(long, steps=1, seed=0, long_prompts=True, guidance_scale=1.0)
    assert chunked.latents.shape == short.latents.shape == (1, 4, 8, 8)
    with pytest.warns(UserWarning, match="truncated"):
        truncated = pipe.encode_prompt(long, guidance_scale=1.0)
    embeds = pipe.encode_prompt(long, guidance_scale=1.0, long_prompts=True)
    assert truncated.shape[1] == 77 and embeds.shape[1] == 154  # 2 chunks of 75 tokens + start/end each
    torch.testing.assert_close(embeds[:, :77], truncated)  # the first chunk is the truncated prompt
    assert not torch.allclose(embeds[:, 77:], truncated)  # the second chunk carries the dropped words


def test_timings_cover_every_stage(pipes):
    _, pipe = pipes["sd1"]
    t = pipe.generate("a cat", steps=3, seed=0).timings
    assert len(t.unet_ms) == len(t.scheduler_ms) == len(t.step_ms) == 3
    assert t.text_encoder_ms > 0 and t.vae_decode_ms > 0
    assert t.total_ms >= sum(t.step_ms) + t.vae_decode_ms
    assert all(s >= u for s, u in zip(t.step_ms, t.unet_ms))
    assert "3 steps" in t.summary() and set(t.stats["step_ms"]) == {"p50", "p90", "p99", "min", "mean"}


@pytest.mark.parametrize("kwargs,message", [
    (dict(width=60), r"size='60x64': not a positive multiple of 8: use e.g. 56x64"),
    (dict(scheduler="dpm_fast"), r"scheduler='dpm_fast': unknown; choose one of"),
    (dict(steps=0), r"steps=0: need an integer >= 1"),
    (dict(strength=1.5, image=Image.new("RGB", (64, 64))), r"strength=1.5: outside \[0, 1\]"),
    (dict(strength=0.1, steps=4, image=Image.new("RGB", (64, 64))), r"leaves no denoising step"),
    (dict(clip_skip=9), r"clip_skip=9: out of range: use 1..4"),
    (dict(latents=torch.zeros(1, 4, 4, 4), width=64), r"latents=tensor\(1, 4, 4, 4\): this request needs shape \(1, 4, 4, 8\)"),
    (dict(image="/nonexistent.png"), r"image='/nonexistent.png': cannot read it"),
    (dict(negative_prompt=["a", "b"]), r"2 negative prompts for 1 prompts"),
    (dict(width=64.0), r"width=64.0: need an integer"),
    (dict(batch_size="2"), r"batch_size='2': need an integer"),
    (dict(guidance_scale="7"), r"guidance_scale='7': need a number"),
    (dict(guidance_scale=float("nan")), r"guidance_scale=nan: not a finite number"),
    (dict(latents=torch.zeros(1, 4, 8, 8), image=Image.new("RGB", (64, 64))), r"pass one or the other"),
])
def test_bad_input_is_a_clear_error(pipes, kwargs, message):
    _, pipe = pipes["sd1"]
    with pytest.raises(ValueError, match=message):
        pipe.generate("a cat", **{"steps": 2, **kwargs})


@pytest.mark.parametrize("prompt", [[], ["a", 3], 5])
def test_prompt_must_be_text(pipes, prompt):
    _, pipe = pipes["sd1"]
    with pytest.raises(ValueError, match="need a string or a non-empty list of strings"):
        pipe.generate(prompt, steps=1)


@pytest.mark.parametrize("device, message", [("cuda:7", "no CUDA GPU|does not exist"), ("tpu", "not a device name"),
                                             ("meta", "not supported")])
def test_load_refuses_devices_it_cannot_use(sd1, device, message):
    with pytest.raises(ValueError, match=message):
        sdfast.load(sd1.path, device=device)


def test_nan_is_never_returned_as_an_image(pipes, monkeypatch):
    _, pipe = pipes["sd1"]
    monkeypatch.setattr(pipe.vae, "decode", lambda z: torch.full((z.shape[0], 3, 64, 64), float("nan")))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        pipe.generate("a cat", steps=1, seed=0)
