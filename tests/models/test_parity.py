"""Each network, loaded by ``sdfast.load`` from a saved diffusers folder, equals the reference on the same weights."""

import pytest
import torch

import sdfast
from conftest import rel_err

TOL = 1e-5  # relative L2 error, fp32


@pytest.fixture
def loaded(ref):
    return ref, sdfast.load(ref.path)


@torch.no_grad()
def test_unet_matches_diffusers(loaded):
    ref, pipe = loaded
    torch.manual_seed(0)
    cfg = ref.pipe.unet.config
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999.0, 21.0])
    context = torch.randn(2, 77, cfg.cross_attention_dim)
    expected = ref.pipe.unet(x, t, context).sample
    assert rel_err(pipe.unet(x, t, context), expected) < TOL
    # a scalar timestep is broadcast over the batch, as diffusers does
    assert rel_err(pipe.unet(x, torch.tensor(500), context), ref.pipe.unet(x, 500, context).sample) < TOL


@torch.no_grad()
def test_unet_odd_latent_size_matches_diffusers(sd1):
    """Latent sides that do not halve evenly (e.g. 9x7) upsample to the skip connection's size."""
    pipe = sdfast.load(sd1.path)
    x, context = torch.randn(1, 4, 9, 7), torch.randn(1, 77, 32)
    expected = sd1.pipe.unet(x, 10, context).sample
    assert rel_err(pipe.unet(x, torch.tensor(10), context), expected) < TOL


@torch.no_grad()
def test_vae_matches_diffusers(loaded):
    ref, pipe = loaded
    torch.manual_seed(0)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    dist = ref.pipe.vae.encode(image).latent_dist
    expected = dist.sample(torch.Generator().manual_seed(7)) * ref.pipe.vae.config.scaling_factor
    latents = pipe.vae.encode(image, torch.Generator().manual_seed(7))
    assert latents.shape == (2, 4, 8, 8)
    assert rel_err(latents, expected) < TOL
    z = torch.randn(2, 4, 8, 8)
    expected = ref.pipe.vae.decode(z / ref.pipe.vae.config.scaling_factor).sample
    decoded = pipe.vae.decode(z)
    assert decoded.shape == (2, 3, 64, 64)
    assert rel_err(decoded, expected) < TOL


@torch.no_grad()
def test_text_encoder_matches_transformers(loaded):
    ref, pipe = loaded
    ids = pipe.tokenizer.encode(["a photograph of an astronaut riding a horse", "", "x " * 40])[:, 0]  # (B, 77)
    out = ref.pipe.text_encoder(ids, output_hidden_states=True)
    hidden, pooled = pipe.text_encoder(ids)
    assert rel_err(hidden, out.last_hidden_state) < TOL
    assert rel_err(pooled, out.pooler_output) < TOL


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
@torch.no_grad()
def test_clip_skip_matches_reference_hidden_states(loaded, clip_skip):
    """clip_skip counts like the webui (1 = last layer); the picked hidden state gets the final LayerNorm, which is
    what diffusers' ``clip_skip=clip_skip - 1`` computes (done by hand here: diffusers 0.42's own path fails on
    transformers 5's flattened text model)."""
    ref, pipe = loaded
    ids = pipe.tokenizer.encode(["a red circle on a white background", "a blue square"])[:, 0]
    te = ref.pipe.text_encoder
    states = te(ids, output_hidden_states=True).hidden_states
    expected = te.final_layer_norm(states[-clip_skip])
    hidden, _ = pipe.text_encoder(ids, clip_skip=clip_skip)
    assert rel_err(hidden, expected) < TOL


def test_clip_skip_out_of_range_is_a_clear_error(sd1):
    pipe = sdfast.load(sd1.path)
    ids = pipe.tokenizer.encode("a cat")[:, 0]
    with pytest.raises(ValueError, match=r"clip_skip=5 is out of range.*4 layers.*1\.\.4"):
        pipe.text_encoder(ids, clip_skip=5)


def test_projected_pooled_output(tmp_path):
    """A text encoder saved with a projection (CLIPTextModelWithProjection) returns the projected pooled output."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdfast import layouts
    from sdfast.checkpoint import materialize, sources_from_rules
    from sdfast.weight_files import WeightFile
    from sdfast.models import CLIPTextConfig as OurConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=16, bos_token_id=0, eos_token_id=999)
    ref = CLIPTextModelWithProjection(cfg).eval()
    ref.save_pretrained(tmp_path)
    weights = WeightFile([tmp_path / "model.safetensors"])
    ours = materialize(lambda: CLIPTextModel(OurConfig.from_transformers(cfg.to_dict(), has_projection=True)),
                       sources_from_rules(layouts.diffusers_rules("text_encoder", weights.keys())),
                       weights, component="text_encoder")
    ids = torch.randint(1, 998, (2, 16))
    ids[0, 5], ids[1, 11] = 999, 999
    with torch.no_grad():
        assert rel_err(ours(ids)[1], ref(ids).text_embeds) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_land_in_the_requested_dtype(sd1, dtype):
    pipe = sdfast.load(sd1.path, dtype=dtype)
    for net in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in net.parameters()} == {dtype}
        assert not any(p.is_meta for p in net.parameters())
    reference = sd1.pipe.unet.state_dict()["conv_in.weight"].to(dtype)
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], reference)


@pytest.mark.slow
@torch.no_grad()
def test_full_sd15_unet_shapes_match_diffusers():
    """One U-Net forward at the real SD 1.5 shapes (random weights, 64x64 latents, batch 1): ~860M parameters."""
    from diffusers import UNet2DConditionModel

    from sdfast.models import UNet, UNetConfig

    torch.manual_seed(0)
    with torch.device("meta"):
        ref = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # else diffusers defaults to SD 1.5
    ref = ref.to_empty(device="cpu").eval()
    for p in ref.parameters():  # fast random init: real-scale values, not a trained model's
        p.normal_(0, 0.02)
    cfg = UNetConfig.from_diffusers(dict(ref.config))
    assert cfg == UNetConfig()  # our defaults are SD 1.5 too
    with torch.device("meta"):
        ours = UNet(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    x, context = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)
    expected = ref(x, 981, context).sample
    assert rel_err(ours.eval()(x, torch.tensor(981), context), expected) < TOL
