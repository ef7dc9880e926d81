"""Random models at SD shapes: the presets have the released networks' sizes (SD 1.5, 2.1, XL), the written folder
loads in sdfast and in diffusers as the same weights, and the FLOP count matches the known SD 1.5 figure."""

import dataclasses
import json

import pytest
import torch

import sdfast
from sdfast.bench.arch import PRESETS, preset, random_init, random_model, text_encoder_json, unet_json, vae_json
from sdfast.bench.flops import unet_flops
from sdfast.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet, UNetConfig, VAEConfig


def _params(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


# Parameter counts of the released networks (diffusers / transformers models of the SD 1.5 and 2.1 repositories).
@pytest.mark.parametrize("name, unet, text, vae", [
    ("sd15", 859_520_964, 123_060_480, 83_653_863),
    ("sd21", 865_910_724, 340_387_840, 83_653_863),
])
def test_presets_have_the_released_sizes(name, unet, text, vae):
    arch = PRESETS[name]
    assert _params(lambda: UNet(arch.unet)) == unet
    assert _params(lambda: CLIPTextModel(arch.text_encoder)) == text
    assert _params(lambda: AutoencoderKL(arch.vae)) == vae


def test_sdxl_preset_has_the_released_sizes():
    """SDXL base 1.0: U-Net, CLIP ViT-L, OpenCLIP bigG with its projection, the SD VAE (same shapes, own scaling)."""
    arch = PRESETS["sdxl"]
    assert _params(lambda: UNet(arch.unet)) == 2_567_463_684
    assert _params(lambda: CLIPTextModel(arch.text_encoder)) == 123_060_480
    assert _params(lambda: CLIPTextModel(arch.text_encoder_2)) == 694_659_840
    assert _params(lambda: AutoencoderKL(arch.vae)) == 83_653_863
    assert arch.size == 1024 and arch.vae.scaling_factor == 0.13025 and arch.unet.context_dim == 768 + 1280


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_configs_round_trip_and_match_diffusers_networks(name):
    """The JSON written for each preset reads back as the same configs, and diffusers / transformers build networks
    with exactly our parameter names and shapes from it (checked on the meta device: no memory, full SD shapes)."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFText
    from transformers import CLIPTextModelWithProjection as HFProjected

    arch = PRESETS[name]
    configs = unet_json(arch.unet), vae_json(arch.vae, arch.size), text_encoder_json(arch.text_encoder)
    assert UNetConfig.from_diffusers(configs[0]) == arch.unet
    assert VAEConfig.from_diffusers(configs[1]) == arch.vae
    assert CLIPTextConfig.from_transformers(configs[2]) == arch.text_encoder
    with torch.device("meta"):
        pairs = [(UNet(arch.unet), UNet2DConditionModel.from_config(configs[0])),
                 (AutoencoderKL(arch.vae), DiffusersVAE.from_config(configs[1])),
                 (CLIPTextModel(arch.text_encoder), HFText(HFConfig(**configs[2])))]
        if arch.is_xl:  # SDXL's second encoder, with its projected pooled output
            config_2 = text_encoder_json(arch.text_encoder_2)
            assert CLIPTextConfig.from_transformers(config_2, has_projection=True) == arch.text_encoder_2
            assert config_2["architectures"] == ["CLIPTextModelWithProjection"]
            pairs.append((CLIPTextModel(arch.text_encoder_2), HFProjected(HFConfig(**config_2))))
    for ours, theirs in pairs:
        shapes = {k.removeprefix("text_model."): tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes


def test_random_init_is_seeded_and_complete():
    build = lambda: UNet(PRESETS["tiny"].unet)  # noqa: E731
    with torch.device("meta"):
        a, b, c = build(), build(), build()
    a, b, c = random_init(a, 0), random_init(b, 0), random_init(c, 1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert torch.isfinite(pa).all(), name
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    assert torch.equal(a.conv_norm_out.weight, torch.ones_like(a.conv_norm_out.weight))


def test_random_model_loads_as_the_same_weights_in_sdfast_and_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = random_model("tiny", tmp_path)
    assert random_model("tiny", tmp_path) == folder  # cached: written once
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    ours = sdfast.load(folder)
    theirs = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                     requires_safety_checker=False)
    x, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor(500.0)
    ids = ours.tokenizer.encode(["a red circle"]).view(1, 77)
    with torch.no_grad():
        torch.testing.assert_close(ours.unet(x, t, context), theirs.unet(x, t, context).sample)
        torch.testing.assert_close(ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0])
        torch.testing.assert_close(ours.vae.decode(x[:1]), theirs.vae.decode(x[:1] / 0.18215).sample)


def test_tiny_sdxl_model_loads_as_the_same_weights_in_sdfast_and_diffusers(tmp_path):
    """The SDXL folder: both encoders (the second saved as transformers' CLIPTextModelWithProjection), the U-Net's
    added conditioning, Euler, and the base model's zero negative embeddings."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = random_model("tiny-sdxl", tmp_path)
    ours = sdfast.load(folder)
    theirs = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False)
    assert ours.is_xl and ours.xl_options["force_zeros_for_empty_prompt"]
    assert isinstance(theirs.scheduler, EulerDiscreteScheduler) and theirs.vae.config.scaling_factor == 0.13025
    x, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64), torch.tensor(500.0)
    pooled, time_ids = torch.randn(2, 16), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    ids = ours.tokenizer_2.encode(["a red circle"]).view(1, 77)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.unet(x, t, context, text_embeds=pooled, time_ids=time_ids),
            theirs.unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample)
        torch.testing.assert_close(ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0])
        hf = theirs.text_encoder_2(ids, output_hidden_states=True)
        hidden, projected = ours.text_encoder_2(ids)
        torch.testing.assert_close(hidden, hf.last_hidden_state)
        torch.testing.assert_close(projected, hf.text_embeds)


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown --arch 'sd3'; choose one of sd15, sd21, sdxl, tiny, tiny-sdxl"):
        random_model("sd3", tmp_path)


def test_unet_flops_match_the_known_sd15_count():
    """SD 1.5 at 512x512, guided (batch 2), 77 tokens: 1.3544 TFLOP in convolutions and projections (the figure
    quoted for SD 1.5) plus 0.2521 TFLOP in attention's QK^T and PV = 4 * B * heads * N * M * head_dim summed over
    the 16 transformer blocks (self- and cross-attention)."""
    unet = PRESETS["sd15"].unet
    attention = 0
    for side, channels, blocks in ((64, 320, 5), (32, 640, 5), (16, 1280, 5), (8, 1280, 1)):
        n = side * side
        attention += blocks * 4 * 2 * (n * n + n * 77) * channels  # heads * head_dim = channels
    assert attention == 252_104_540_160
    assert unet_flops(unet, 2, 64, 64) == 1_354_442_342_400 + attention
    assert unet_flops(unet, 4, 64, 64) == 2 * unet_flops(unet, 2, 64, 64)


def test_unet_flops_count_sdxl_added_embedding_and_attention():
    """SDXL at 1024x1024, guided: the count equals a run with SDXL's real added inputs (pooled 1280 + 6 numbers);
    the added embedding (Linear 2816 -> 1280, SiLU, Linear 1280 -> 1280) is all the same U-Net without it lacks;
    attention's QK^T and PV (the batched matmuls) over its 70 transformer blocks, 10 at 64x64 with 640 channels and
    60 at 32x32 with 1280, are 1.568 of the 13.522 TFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = preset("sdxl").unet
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        UNet(unet)(torch.empty(2, 4, 128, 128), torch.empty(()), torch.empty(2, 77, 2048),
                   text_embeds=torch.empty(2, 1280), time_ids=torch.empty(2, 6))
    assert unet_flops(unet, 2, 128, 128) == counter.get_total_flops() == 13_522_472_796_160
    attention = sum(blocks * 4 * 2 * (n * n + n * 77) * channels
                    for n, channels, blocks in ((64 * 64, 640, 10), (32 * 32, 1280, 60)))
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm] == attention
    plain = dataclasses.replace(unet, added_time_dim=None, added_cond_dim=0)
    assert unet_flops(unet, 2, 128, 128) - unet_flops(plain, 2, 128, 128) == 2 * 2 * (2816 + 1280) * 1280
