"""``sdfast bench --controlnet``: every row, the baseline's too, runs with one ControlNet at scale 1 over the whole
schedule. The ControlNet is a copy of the benchmarked U-Net's encoder (as ControlNet training starts) with random
zero convolutions, written once as a diffusers folder beside the run, so both sides load the same weights; its map
is a fixed seeded picture at each row's size. Timing does not depend on the weights' values, only on their shapes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NAME = "bench"


def random_controlnet(model: Path, seed: int = 0) -> Path:
    """A ControlNet for the diffusers folder ``model``, in a new temporary folder (diffusers' format)."""
    if not (model / "model_index.json").is_file():
        raise ValueError(f"--controlnet builds its ControlNet from a diffusers folder's U-Net, and {model} is not "
                         "one: benchmark a diffusers folder (or --arch)")
    from diffusers import ControlNetModel, UNet2DConditionModel

    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(model / "unet"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zero = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
        for name, p in net.named_parameters():
            if name.startswith(zero):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)  # not zero: the residuals are real work
    folder = Path(tempfile.mkdtemp(prefix="sdfast-bench-controlnet-"))
    net.save_pretrained(folder)
    return folder


def control_map(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
