"""SDXL end to end: ``Pipeline.generate`` equals diffusers' ``StableDiffusionXLPipeline`` (and the refiner's
``StableDiffusionXLImg2ImgPipeline``) on the same tiny random weights, noise and scheduler; an original-layout single
file loads to the same model (checked against diffusers' own converters); the VAE never hands back an overflow."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sdfast
from sdfast.bench.arch import preset
from sdfast.request import Request
from conftest import rel_err
from original_layout import to_original
from sdfast import infer_config, layouts

STEPS = 4
LATENT_TOL = 1e-4
PROMPT = "a red circle at the top left"


def reference_scheduler(ref, name):
    import diffusers

    cls, extra = {"euler": ("EulerDiscreteScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler", {})}[name]
    return getattr(diffusers, cls).from_config({**ref.scheduler_config, **extra})


@pytest.fixture(scope="module")
def pipes(sdxl, sdxl_refiner):
    return {"base": (sdxl, sdfast.load(sdxl.path)), "refiner": (sdxl_refiner, sdfast.load(sdxl_refiner.path))}


def reference_latents(ref, seed=11, **kwargs):
    """diffusers' SDXL latents, at sdfast's default guidance (7.5; diffusers' SDXL default is 5)."""
    return ref.pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="latent", guidance_scale=7.5,
                    **kwargs).images


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("negative", ["blurry", None])
def test_txt2img_matches_diffusers(pipes, scheduler, negative):
    """Non-square, with a negative prompt and without one (then force_zeros_for_empty_prompt gives zero negative
    embeddings, as in diffusers)."""
    ref, pipe = pipes["base"]
    ref.pipe.scheduler = reference_scheduler(ref, scheduler)
    kwargs = dict(negative_prompt=negative, num_inference_steps=STEPS, width=64, height=48)
    expected = reference_latents(ref, **kwargs)
    result = pipe.generate(PROMPT, negative_prompt=negative, steps=STEPS, scheduler=scheduler, seed=11, width=64,
                           height=48)
    assert result.latents.shape == (1, 4, 6, 8)
    assert rel_err(result.latents, expected) < LATENT_TOL
    if scheduler == "euler" and negative is None:
        images = ref.pipe(PROMPT, generator=torch.Generator().manual_seed(11), guidance_scale=7.5, **kwargs).images
        diff = np.abs(np.asarray(result.images[0], np.int16) - np.asarray(images[0], np.int16))
        assert diff.max() <= 1
        assert result.timings.vae_dtype == "float32" and result.timings.vae_fallback is False


def test_default_size_follows_the_unet(pipes):
    """The tiny model's sample_size 8 gives 64 px; SDXL's released sample_size 128 gives 1024 px, as a request
    without a size is fitted to it (checked without running the 1024 px image)."""
    ref, pipe = pipes["base"]
    assert pipe.generate(PROMPT, steps=1, seed=1).images[0].size == (64, 64)
    released = sdfast.load(ref.path)
    released.unet.config = dataclasses.replace(released.unet.config, sample_size=128)
    assert released.default_size == 1024 == preset("sdxl").size
    assert (Request.check(PROMPT).fit(released.facts).width, Request.check(PROMPT).fit(released.facts).height) == (
        1024, 1024)


@pytest.mark.parametrize("negative", [
    dict(negative_original_size=(256, 256), negative_crops_coords_top_left=(4, 0), negative_target_size=(128, 96)),
    dict(negative_original_size=(256, 256)),  # one negative size alone: diffusers then uses the positive ids
    dict(negative_original_size=(256, 256), negative_target_size=(128, 96)),  # negative crops default to (0, 0)
])
def test_micro_conditioning_matches_diffusers(pipes, negative):
    ref, pipe = pipes["base"]
    ref.pipe.scheduler = reference_scheduler(ref, "euler")
    micro = dict(original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(64, 64), **negative)
    expected = reference_latents(ref, num_inference_steps=STEPS, width=64, height=64, negative_prompt="blurry",
                                 **micro)
    result = pipe.generate(PROMPT, negative_prompt="blurry", steps=STEPS, seed=11, width=64, height=64, **micro)
    assert rel_err(result.latents, expected) < LATENT_TOL
    plain = pipe.generate(PROMPT, negative_prompt="blurry", steps=STEPS, seed=11, width=64, height=64)
    assert rel_err(plain.latents, expected) > 1e-3  # the numbers change the result


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(pipes, clip_skip):
    """sdfast's clip_skip N is diffusers' N - 1 (None for 1). diffusers applies it to the prompt only, never to the
    negative prompt; sdfast to both, so the prompt half is compared."""
    ref, pipe = pipes["base"]
    with torch.no_grad():
        embeds, _, pooled, _ = ref.pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False,
                                                      clip_skip=None if clip_skip == 1 else clip_skip - 1)
    context, ours_pooled = pipe.encode_prompt(PROMPT, guidance_scale=1.0, clip_skip=clip_skip, pooled=True)
    assert context.shape == (1, 77, 80)
    assert rel_err(context, embeds) < 1e-6
    assert rel_err(ours_pooled, pooled) < 1e-6
    with pytest.raises(ValueError, match=r"clip_skip=4: out of range: use 1\.\.3"):
        pipe.encode_prompt(PROMPT, clip_skip=4)


def test_long_prompts_are_chunked_like_sd1(pipes):
    _, pipe = pipes["base"]
    long = ", ".join(["a red circle"] * 30)  # > 75 tokens
    context, pooled = pipe.encode_prompt(long, "blurry", long_prompts=True, pooled=True)
    assert context.shape == (2, 154, 80) and pooled.shape == (2, 24)
    first = pipe.encode_prompt(long, "blurry", pooled=True)  # truncated: the first chunk only
    assert rel_err(context[:, :77], first[0]) < 1e-6 and rel_err(pooled, first[1]) < 1e-6
    result = pipe.generate(long, negative_prompt="blurry", long_prompts=True, steps=1, seed=3)
    assert torch.isfinite(result.latents).all()


def test_prompt_embeds_round_trip(pipes):
    _, pipe = pipes["base"]
    context, pooled = pipe.encode_prompt(PROMPT, pooled=True)
    direct = pipe.generate(PROMPT, steps=2, seed=5)
    given = pipe.generate(None, prompt_embeds=context, pooled_prompt_embeds=pooled, steps=2, seed=5)
    assert torch.equal(direct.latents, given.latents)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds=None: an SDXL model needs them with prompt_embeds.*pooled=True"):
        pipe.generate(None, prompt_embeds=context, steps=2)


def test_base_refiner_hand_off_matches_diffusers(pipes):
    """Base to denoising_end, refiner (second encoder only, aesthetic scores) from denoising_start on."""
    (ref, base), (ref_refiner, refiner) = pipes["base"], pipes["refiner"]
    ref.pipe.scheduler = reference_scheduler(ref, "euler")
    ref_refiner.pipe.scheduler = reference_scheduler(ref_refiner, "euler")
    size = dict(width=64, height=48)
    handed = reference_latents(ref, num_inference_steps=8, denoising_end=0.75, **size)
    expected = ref_refiner.pipe(PROMPT, image=handed, num_inference_steps=8, denoising_start=0.75, guidance_scale=7.5,
                                generator=torch.Generator().manual_seed(12), output_type="latent").images
    first = base.generate(PROMPT, steps=8, seed=11, denoising_end=0.75, **size)
    assert len(first.timings.step_ms) == 6 and first.timings.steps == 8  # 8 Euler steps, the first 3/4 of them
    assert first.timings.summary().startswith("8 steps (6 U-Net calls)")
    assert first.images == [] and first.timings.vae_decode_ms == 0  # noisy latents are not decoded
    assert rel_err(first.latents, handed) < LATENT_TOL
    # the size comes from the handed latents (64x48 here, not the refiner's default)
    second = refiner.generate(PROMPT, latents=first.latents, steps=8, seed=12, denoising_start=0.75)
    assert len(second.timings.step_ms) == 2
    assert rel_err(second.latents, expected) < LATENT_TOL


def test_sdxl_input_errors(pipes, sd1):
    _, pipe = pipes["base"]
    with pytest.raises(ValueError, match=r"denoising_start=0.5: continues part-denoised latents"):
        pipe.generate(PROMPT, steps=2, denoising_start=0.5)
    with pytest.raises(ValueError, match=r"denoising_end=1.5: outside \(0, 1\)"):
        pipe.generate(PROMPT, steps=2, denoising_end=1.5)
    with pytest.raises(ValueError, match=r"original_size=\[64\]: need two numbers"):
        pipe.generate(PROMPT, steps=2, original_size=(64,))
    with pytest.raises(ValueError, match=r"target_size=\['64', 64\]: need two numbers"):
        pipe.generate(PROMPT, steps=2, target_size=("64", 64))
    sd = sdfast.load(sd1.path)
    with pytest.raises(ValueError, match=r"SDXL conditioning; this is an SD 1.x / 2.x model"):
        sd.generate(PROMPT, steps=2, original_size=(64, 64))
    sd.generate(PROMPT, steps=1, crops_coords_top_left=[0, 0])  # the default, as JSON writes it: accepted


# -- the VAE never returns an overflow as a picture --


def test_fp16_sdxl_decodes_in_fp32(pipes):
    """SDXL's VAE config says force_upcast: an fp16 pipeline decodes in fp32 (and puts the VAE back in fp16)."""
    ref, fp32_pipe = pipes["base"]
    pipe = sdfast.load(ref.path, dtype=torch.float16)
    # the same starting noise for both, drawn once in fp32: a seeded fp16 randn is not the fp32 stream on every
    # torch version (2.11 draws a different one), so seed=1 alone would compare two different pictures
    noise = fp32_pipe.initial_noise(seed=1)
    result = pipe.generate(PROMPT, steps=2, seed=1, latents=noise)
    assert result.timings.vae_dtype == "float32" and result.timings.vae_fallback is False
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float16}
    fp32 = fp32_pipe.generate(PROMPT, steps=2, seed=1, latents=noise)
    assert rel_err(result.latents.float(), fp32.latents) < 1e-2


def test_overflowing_decode_falls_back_to_fp32(sd1):
    """An fp16 decode that overflows runs again in fp32 and says so in the timings; a decode that is not finite
    even in fp32 is an error, never a black picture."""
    pipe = sdfast.load(sd1.path, dtype=torch.float16)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.fill_(1000.0)  # fp16 overflows (> 65504), fp32 does not
    result = pipe.generate(PROMPT, steps=2, seed=1)
    assert result.timings.vae_fallback is True and result.timings.vae_dtype == "float32"
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float16}
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        pipe.generate(PROMPT, steps=2, seed=1)


# -- the original single-file layout (Stability's sgm: conditioner.embedders.*) --

# What the tiny networks' weights cannot say (infer_configs assumes the SDXL release's values).
UNREVEALED = {"unet": {"attention_head_dim": [2, 2, 4], "norm_num_groups": 8, "addition_time_embed_dim": 8,
                       "sample_size": 8},
              "vae": {"norm_num_groups": 8}, "text_encoder": {"num_attention_heads": 4},
              "text_encoder_2": {"num_attention_heads": 4}}


def _config(model) -> dict:
    return dict(model.config) if isinstance(model.config, dict) else model.config.to_dict()


def _state(model) -> dict:
    """sdfast's parameter names: transformers' CLIPTextModelWithProjection nests the text model (text_model.)."""
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}


def _write_single_file(ref, path, family):
    parts = ["unet", "vae", "text_encoder_2"] + (["text_encoder"] if family == "sdxl" else [])
    file = {}
    for name in parts:
        model = getattr(ref.pipe, name)
        file |= to_original(name, _config(model), _state(model), family)
    prefix = layouts.TEXT_PREFIXES[family]["text_encoder_2"]
    file[prefix + "logit_scale"] = torch.tensor(4.6052)  # OpenCLIP's, unused
    file["alphas_cumprod"] = torch.rand(1000)
    save_file(file, str(path))
    return file


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_single_file_generates_like_the_folder(pipes, tmp_path, model):
    ref, folder_pipe = pipes[model]
    family = "sdxl" if model == "base" else "sdxl_refiner"
    path = tmp_path / "model.safetensors"
    _write_single_file(ref, path, family)
    overrides = {k: v for k, v in UNREVEALED.items() if k != "text_encoder" or family == "sdxl"}
    pipe = sdfast.load(path, overrides={**overrides, "scheduler": {"timestep_spacing": "leading"}})
    assert pipe.xl_options == folder_pipe.xl_options
    assert (pipe.text_encoder is None) == (model == "refiner")
    assert pipe.vae.config.scaling_factor == 0.13025
    kwargs = dict(steps=3, seed=4, width=64, height=48)
    if model == "refiner":
        latents = torch.randn(1, 4, 6, 8)
        kwargs.update(latents=latents, denoising_start=0.5)
    assert torch.equal(pipe.generate(PROMPT, **kwargs).latents, folder_pipe.generate(PROMPT, **kwargs).latents)


def test_diffusers_converters_agree(pipes, tmp_path):
    """diffusers' single_file_utils read the file sdfast's table wrote back to the reference's tensors."""
    from diffusers.loaders import single_file_utils as sfu

    ref, _ = pipes["base"]
    path = tmp_path / "model.safetensors"
    _write_single_file(ref, path, "sdxl")
    file = load_file(str(path))

    def same(got, model):
        want = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
        got = {k.removeprefix("text_model."): v for k, v in got.items()}
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)

    same(sfu.convert_ldm_unet_checkpoint(file, _config(ref.pipe.unet)), ref.pipe.unet)
    same(sfu.convert_ldm_vae_checkpoint(file, _config(ref.pipe.vae)), ref.pipe.vae)
    same(sfu.convert_ldm_clip_checkpoint(file, remove_prefix=layouts.SDXL_CLIP_PREFIX.removesuffix("text_model.")),
         ref.pipe.text_encoder)
    same(sfu.convert_open_clip_checkpoint(ref.pipe.text_encoder_2, file, prefix=layouts.SDXL_OPENCLIP_PREFIX),
         ref.pipe.text_encoder_2)


def test_real_sdxl_sizes():
    """Full-size SDXL base networks on the meta device: detection, the inferred configs (the release's) and every
    rule's shape."""
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils

    def clip(cls, **kw):
        return cls(transformers.CLIPTextConfig(**kw))

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "unet": diffusers.UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816),
            "vae": diffusers.AutoencoderKL(
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024, scaling_factor=0.13025,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
            "text_encoder": clip(transformers.CLIPTextModel, hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                                 hidden_act="quick_gelu"),
            "text_encoder_2": clip(transformers.CLIPTextModelWithProjection, hidden_size=1280,
                                   intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                   projection_dim=1280, hidden_act="gelu"),
        }
        file = {}
        for name, model in models.items():
            file |= to_original(name, _config(model), _state(model), "sdxl")
    shapes = {k: tuple(v.shape) for k, v in file.items()}
    assert infer_config.detect_family(shapes) == "sdxl"
    assert single_file_utils.infer_diffusers_model_type(file) == "xl_base"
    configs = infer_config.infer_configs(shapes)
    assert configs["pipeline"] == {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
    assert (configs["pad_token"], configs["pad_token_2"]) == ("<|endoftext|>", "!")
    for component, model in models.items():
        want = _config(model)
        for field, value in configs[component].items():
            if field in ("_class_name", "architectures"):
                continue
            expected = want[field]
            assert value == (list(expected) if isinstance(expected, tuple) else expected), (component, field)
        state = _state(model)
        rules = layouts.original_rules(component, configs[component], "sdxl")
        assert {r.target for r in rules} == set(state)
        for r in rules:
            assert tuple(layouts.transform(r.transform)(file[r.source]).shape) == tuple(state[r.target].shape), r


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_diffusers(pipes, strength):
    """SDXL base img2img from a picture against StableDiffusionXLImg2ImgPipeline on the same components: the VAE's
    posterior sample, the added noise and the micro-conditioning (the picture's size) in diffusers' order."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    ref, pipe = pipes["base"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_i2i = StableDiffusionXLImg2ImgPipeline(**ref.pipe.components, requires_aesthetics_score=False)
    ref_i2i.scheduler = reference_scheduler(ref, "euler")
    ref_i2i.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    expected = ref_i2i(PROMPT, image=image, strength=strength, num_inference_steps=5, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(4), output_type="latent").images
    result = pipe.generate(PROMPT, image=image, strength=strength, steps=5, scheduler="euler", seed=4)
    assert result.latents.shape == (1, 4, 6, 8)
    assert rel_err(result.latents, expected) < LATENT_TOL
