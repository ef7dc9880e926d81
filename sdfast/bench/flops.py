"""FLOPs of one U-Net call, counted from the model's shapes: the work the device must do, whatever the backend.

The U-Net is built on the meta device (no memory, no weights) and run on meta tensors under torch's
``FlopCounterMode``, which counts 2 FLOPs per multiply-add of every convolution and matrix product
(``torch/utils/flop_counter.py``: conv, mm/addmm/bmm and the attention kernels' QK^T and PV). Norms, activations
and elementwise ops are not counted (well under 1% of SD's total). Divided by a measured latency this gives the
achieved TFLOP/s that the report sets beside the device's peak.

For scale: SD 1.5 at 512x512 with guidance (U-Net batch 2, 77 tokens) is 1.607 TFLOP per step, of which 0.252 is
attention's two matrix products; the often-quoted 1.354 TFLOP counts the projections and convolutions only.
SDXL at 1024x1024, guided, is 13.52 TFLOP per step, 1.57 of them in attention (tests/bench/test_arch.py).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import UNet, UNetConfig


@functools.cache
def unet_flops(config: UNetConfig, batch: int, latent_height: int, latent_width: int, tokens: int = 77) -> int:
    """FLOPs of ``UNet(config)`` on ``batch`` latents (B, C, latent_height, latent_width) cross-attending to
    ``tokens`` text tokens. A guided step runs the U-Net on batch 2 x images (negative and positive prompt)."""
    with torch.device("meta"):
        unet = UNet(config)
        x = torch.empty(batch, config.in_channels, latent_height, latent_width)  # (B, C, h, w)
        context = torch.empty(batch, tokens, config.context_dim)  # (B, N, C_text)
        added = {}
        if config.added_time_dim is not None:
            # SDXL's added inputs: only their total width (added_cond_dim, the add_embedding's input) costs FLOPs,
            # so one micro-conditioning number and the rest as pooled text count the same as SDXL's 6 + 1280
            added = {"text_embeds": torch.empty(batch, config.added_cond_dim - config.added_time_dim),  # (B, P)
                     "time_ids": torch.empty(batch, 1)}  # (B, 1)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.empty(()), context, **added)
    return counter.get_total_flops()
