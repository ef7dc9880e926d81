"""Random ControlNets for the tiny reference models, and control images, shared by the ControlNet tests."""

import numpy as np
import torch
from PIL import Image


def random_controlnet(unet, seed: int):
    """diffusers' ControlNet copied from ``unet`` (as training starts), with every weight then drawn at random: the
    zero convolutions too, so that the residuals are not zero."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


def control_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
