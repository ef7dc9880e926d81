"""ControlNet: the network and both file layouts against diffusers' ControlNetModel, and generation against diffusers'
ControlNet pipelines (one and two ControlNets, a scale, a start / end window, img2img, SDXL) on tiny random models."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

import sdfast
from conftest import rel_err
from controlnets import control_image, random_controlnet
from sdfast.checkpoint import CheckpointError
from sdfast.control import Control, load_controlnet
from sdfast.control.loading import original_rules
from sdfast.request import RequestError

LATENT_TOL = 1e-4


@pytest.fixture(scope="module")
def controlnets(sd1, tmp_path_factory):
    """Two random SD 1.x ControlNets for the sd1 reference, saved as diffusers folders."""
    folder = tmp_path_factory.mktemp("controlnets")
    nets = [random_controlnet(sd1.pipe.unet, seed) for seed in (1, 2)]
    for i, net in enumerate(nets):
        net.save_pretrained(folder / f"c{i}")
    return nets, [folder / f"c{i}" for i in range(2)]


@pytest.fixture(scope="module")
def pipe(sd1, controlnets):
    pipe = sdfast.load(sd1.path)
    for path in controlnets[1]:
        pipe.controlnets.load(path)
    return pipe


def test_network_matches_diffusers(controlnets):
    """Residuals of every skip and of the middle block, with a scale, through the diffusers-folder loader."""
    (ref, _), (path, _) = controlnets
    net = load_controlnet(path)
    assert net.config.num_parameters() == sum(p.numel() for p in net.parameters())
    gen = torch.Generator().manual_seed(0)
    x, context, image = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen), \
        torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        down_ref, mid_ref = ref(x, torch.tensor(321), context, image, conditioning_scale=0.7, return_dict=False)
        down, mid = net(x, torch.tensor(321), context, image, 0.7)
    assert len(down) == len(down_ref) == 6  # conv_in; 2 resnets + the downsampler; 2 resnets
    for a, b in zip(down, down_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mid, mid_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_original_layout_matches_diffusers_conversion(controlnets, tmp_path, prefix):
    """An original-layout file (lllyasviel's names, with or without ``control_model.``) written from the reference's
    weights through our key table: diffusers' own converter reads it back to the same state dict (so the table is
    right), and our loader infers the config from its shapes and equals the reference network."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    (ref, _), _ = controlnets
    state = ref.state_dict()
    original = {r.source: state[r.target].clone() for r in original_rules(dict(ref.config))}
    assert len(original) == len(state)
    converted = convert_controlnet_checkpoint({f"control_model.{k}": v for k, v in original.items()},
                                              dict(ref.config))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)
    path = tmp_path / "control_sd15_test.safetensors"
    save_file({prefix + k: v for k, v in original.items()}, str(path))
    net = load_controlnet(path)
    expected = load_controlnet(controlnets[1][0]).config  # heads are not in the weights: those follow the family
    for field in ("block_channels", "attention", "layers_per_block", "context_dim", "embedding_channels",
                  "conditioning_channels", "linear_projection"):
        assert getattr(net.config, field) == getattr(expected, field)
    got = net.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_loader_errors(controlnets, sd1, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_controlnet(tmp_path / "missing.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "notcn.safetensors"))
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "notcn.safetensors")
    (ref, _), _ = controlnets
    state = ref.state_dict()
    original = {r.source: state[r.target] for r in original_rules(dict(ref.config))}
    original.pop("zero_convs.3.0.weight")
    save_file(original, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 keys: controlnet_down_blocks.3.weight"):
        load_controlnet(tmp_path / "broken.safetensors")


def reference_pipeline(sd1, nets, img2img: bool = False):
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetImg2ImgPipeline, \
        StableDiffusionControlNetPipeline

    cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
    parts = {k: v for k, v in sd1.pipe.components.items() if k not in ("scheduler",)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cls(**parts, controlnet=nets if len(nets) > 1 else nets[0],
                  scheduler=EulerDiscreteScheduler.from_config(sd1.scheduler_config))
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("case", ["one", "scaled window", "two"])
def test_txt2img_matches_diffusers(sd1, controlnets, pipe, case):
    nets, paths = controlnets
    images = [control_image(0), control_image(1)]
    if case == "one":
        ref_args, controls = dict(controlnet_conditioning_scale=1.0), [Control("c0", images[0])]
    elif case == "scaled window":
        ref_args = dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.25, control_guidance_end=0.75)
        controls = [Control("c0", images[0], 0.6, 0.25, 0.75)]
    else:
        ref_args = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.5],
                        control_guidance_end=[1.0, 1.0])
        controls = [Control("c0", images[0], 0.8), Control("c1", images[1], 0.5, 0.5)]
    ref = reference_pipeline(sd1, nets[: len(controls)])
    expected = ref("a red circle", image=images if len(controls) > 1 else images[0], num_inference_steps=4,
                   guidance_scale=7.5, generator=torch.Generator().manual_seed(3), output_type="latent",
                   **ref_args).images
    result = pipe.generate("a red circle", steps=4, scheduler="euler", seed=3, controls=controls)
    assert rel_err(result.latents, expected) < LATENT_TOL
    plain = pipe.generate("a red circle", steps=4, scheduler="euler", seed=3)
    assert rel_err(plain.latents, expected) > 1e-2  # the control changed the picture


def test_img2img_matches_diffusers(sd1, controlnets, pipe):
    nets, _ = controlnets
    ref = reference_pipeline(sd1, nets[:1], img2img=True)
    init, control = control_image(5), control_image(6)
    expected = ref("a red circle", image=init, control_image=control, strength=0.6, num_inference_steps=5,
                   controlnet_conditioning_scale=0.9, generator=torch.Generator().manual_seed(4),
                   output_type="latent").images
    result = pipe.generate("a red circle", image=init, strength=0.6, steps=5, scheduler="euler", seed=4,
                           controls=[Control("c0", control, 0.9)])
    assert rel_err(result.latents, expected) < LATENT_TOL


def test_sdxl_matches_diffusers(sdxl, tmp_path):
    from diffusers import StableDiffusionXLControlNetPipeline

    net = random_controlnet(sdxl.pipe.unet, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusionXLControlNetPipeline(**sdxl.pipe.components, controlnet=net)
    ref.set_progress_bar_config(disable=True)
    image = control_image(8)
    expected = ref("a red circle", image=image, num_inference_steps=4, controlnet_conditioning_scale=0.8,
                   guidance_scale=7.5, generator=torch.Generator().manual_seed(5), output_type="latent").images
    net.save_pretrained(tmp_path / "xl")
    pipe = sdfast.load(sdxl.path)
    pipe.controlnets.load(tmp_path / "xl")
    result = pipe.generate("a red circle", steps=4, seed=5, controls=[Control("xl", image, 0.8)])
    assert rel_err(result.latents, expected) < LATENT_TOL


def test_size_follows_the_control_image(pipe):
    result = pipe.generate("a red circle", steps=1, seed=0, controls=[Control("c0", control_image(0, size=72))])
    assert result.images[0].size == (72, 72)


def test_request_errors(pipe, sdxl, controlnets):
    image = control_image(0)
    for controls, field in [
        ([Control("nope", image)], "controls[0].model"),
        ([Control("c0", image, float("nan"))], "controls[0].scale"),
        ([Control("c0", image, 11.0)], "controls[0].scale"),
        ([Control("c0", image, 1.0, 0.6, 0.4)], "controls[0].start"),
        ([Control("c0", "/no/such/file.png")], "controls[0].image"),
        ([{"model": "c0"}], "controls[0]"),
        ("c0", "controls"),
    ]:
        with pytest.raises(RequestError) as err:
            pipe.generate("a red circle", steps=1, seed=0, controls=controls)
        assert err.value.field == field
    xl = sdfast.load(sdxl.path)
    with pytest.raises(ValueError, match="made for another model: its context_dim"):
        xl.controlnets.load(controlnets[1][0])
