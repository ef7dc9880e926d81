"""Config translation refuses what the networks do not implement, naming the option, instead of loading weights
into a network that would compute something else."""

import pytest

from sdfast.models import UNetConfig


@pytest.mark.parametrize("option, value", [
    ("downsample_padding", 0), ("mid_block_scale_factor", 2.0), ("resnet_out_scale_factor", 0.5),
    ("timestep_post_act", "silu"), ("time_embedding_act_fn", "gelu"), ("resnet_skip_time_act", True),
    ("cross_attention_norm", "group_norm"), ("class_embed_type", "timestep"), ("conv_in_kernel", 7),
])
def test_unet_config_refuses_unimplemented_options(option, value):
    with pytest.raises(ValueError, match=f"unet config {option}={value!r} is not supported"):
        UNetConfig.from_diffusers({option: value})


def test_unet_config_accepts_the_defaults_written_out():
    cfg = UNetConfig.from_diffusers({"downsample_padding": 1, "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
                                     "attention_head_dim": [5, 10, 20, 20]})
    assert cfg.num_heads == (5, 10, 20, 20)  # diffusers' legacy name: heads, not head dim
