"""SDXL's networks, loaded by ``sdfast.load`` from saved diffusers folders, equal diffusers' / transformers' on the
same random weights: the U-Net with its "text_time" added embedding (base: 6 micro-conditioning numbers, refiner: 5),
levels without attention and a transformer depth per level; the OpenCLIP-bigG-like encoder's raw penultimate hidden
state and projected pooled output."""

import pytest
import torch

import sdfast
from conftest import rel_err

TOL = 1e-5  # relative L2 error, fp32


@pytest.fixture(scope="module")
def base(sdxl):
    return sdxl, sdfast.load(sdxl.path)


@pytest.mark.parametrize("model", ["sdxl", "sdxl_refiner"])
@torch.no_grad()
def test_unet_matches_diffusers(request, model):
    ref = request.getfixturevalue(model)
    pipe = sdfast.load(ref.path)
    cfg = ref.pipe.unet.config
    assert pipe.unet.config.transformer_depth == tuple(cfg.transformer_layers_per_block)
    assert pipe.unet.config.attention[0] is False  # the first level has no attention, as in SDXL
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 6)
    t = torch.tensor([999.0, 21.0])
    context = torch.randn(2, 77, cfg.cross_attention_dim)
    pooled = torch.randn(2, ref.pipe.text_encoder_2.config.projection_dim)
    numbers = 5 if model == "sdxl_refiner" else 6
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0][:numbers]] * 2)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    expected = ref.pipe.unet(x, t, context, added_cond_kwargs=added).sample
    assert rel_err(pipe.unet(x, t, context, pooled, time_ids), expected) < TOL
    # the micro-conditioning does reach the output
    assert rel_err(pipe.unet(x, t, context, pooled, time_ids * 0.5), expected) > 1e-3


def test_unet_without_added_conditioning_is_a_clear_error(base):
    _, pipe = base
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 80)
    with pytest.raises(ValueError, match="SDXL U-Net: pass text_embeds"):
        pipe.unet(x, torch.tensor(10), context)
    with pytest.raises(ValueError, match="make 64 added inputs but this U-Net takes 72"):
        pipe.unet(x, torch.tensor(10), context, torch.randn(1, 24), torch.randn(1, 5))


@pytest.mark.parametrize("clip_skip", [1, 2])
@torch.no_grad()
def test_text_encoders_match_transformers(base, clip_skip):
    """SDXL reads both encoders' raw (un-normalised) hidden state one layer before the end, clip_skip counting
    from there; the pooled output is the second encoder's projected end-of-text state (its text_embeds)."""
    ref, pipe = base
    ids = pipe.tokenizer_2.encode(["a photograph of an astronaut riding a horse", "", "x " * 40])[:, 0]  # (B, 77)
    for ours, theirs in ((pipe.text_encoder, ref.pipe.text_encoder), (pipe.text_encoder_2, ref.pipe.text_encoder_2)):
        out = theirs(ids, output_hidden_states=True)
        hidden, pooled = ours(ids, clip_skip=clip_skip + 1, final_norm=False)
        assert rel_err(hidden, out.hidden_states[-(clip_skip + 1)]) < TOL
    assert pooled.shape == (3, 24)
    assert rel_err(pooled, out.text_embeds) < TOL
