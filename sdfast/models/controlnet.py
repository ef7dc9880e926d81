"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a trainable copy
of the U-Net's encoder half that reads a control image (edges, pose, depth, a layout map) and adds its features to
the U-Net's skips and middle block through zero-initialised 1x1 convolutions.

The copy is ``unet.UNetEncoder`` itself (same blocks, same parameter names), plus the two parts only a ControlNet has:
the control image's embedding (four small conv stages down to the latent's resolution) and the zero convolutions.
Parameter names are diffusers' ``ControlNetModel`` keys. Reference: diffusers/models/controlnets/controlnet.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNetEncoder
from .unet_config import UNetConfig, _conv


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    conditioning_channels: int = 3  # the control image's channels
    # the control image's embedding: a 3x3 conv per width, each but the first after a stride-2 conv, so three
    # halvings bring a 512 px image to the 64x64 latent (SD's VAE factor 8)
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False  # the control image's channels in BGR order (some original checkpoints)
    global_pool: bool = False  # residuals averaged over space (the "shuffle" ControlNet)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> ControlNetConfig:
        """Translate a diffusers ``ControlNetModel`` config; refuses what this network does not implement."""
        order = cfg.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet config controlnet_conditioning_channel_order={order!r}: expected 'rgb' or "
                             "'bgr'")
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        mirror = [name.replace("Down", "Up") for name in reversed(down)]  # no up blocks: only the encoder exists
        unet = UNetConfig.from_diffusers({**cfg, "up_block_types": mirror})
        return cls(**{f: getattr(unet, f) for f in UNetConfig.__dataclass_fields__},
                   conditioning_channels=cfg.get("conditioning_channels", 3),
                   embedding_channels=tuple(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
                   bgr=order == "bgr", global_pool=bool(cfg.get("global_pool_conditions", False)))

    def skip_channels(self) -> list[int]:
        """The channels of each skip the U-Net's encoder hands up, top to bottom (what each residual must match)."""
        ch, channels = self.block_channels, [self.block_channels[0]]
        for i, c in enumerate(ch):
            channels += [c] * (self.layers_per_block[i] + (i < len(ch) - 1))
        return channels

    def num_parameters(self) -> int:
        """The weights of ``ControlNet(self)``: the shared encoder, the image embedding and the zero convolutions."""
        ch, e = self.block_channels, self.embedding_channels
        embedding = _conv(self.conditioning_channels, e[0], 3) + sum(
            _conv(a, a, 3) + _conv(a, b, 3) for a, b in pairwise(e)) + _conv(e[-1], ch[0], 3)
        zero = sum(_conv(c, c, 1) for c in self.skip_channels()) + _conv(ch[-1], ch[-1], 1)
        return self.encoder_parameters() + embedding + zero


class ConditioningEmbedding(nn.Module):
    """The control image (B, C, H, W) -> features (B, C0, H/8, W/8) added to the latent's input convolution; the
    last conv starts at zero, so an untrained ControlNet changes nothing."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in pairwise(widths):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(image))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class ControlNet(UNetEncoder):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg)
        ch = cfg.block_channels
        self.controlnet_cond_embedding = ConditioningEmbedding(ch[0], cfg.conditioning_channels, cfg.embedding_channels)
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in cfg.skip_channels())
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, image: torch.Tensor,
                scale: float = 1.0, text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The residuals for the U-Net's skips (top to bottom) and for its middle block, times ``scale``.
        x, t, context (and SDXL's text_embeds, time_ids) as the U-Net's; image: (B, C, 8h, 8w) in [0, 1] for latents
        (B, 4, h, w)."""
        if self.config.bgr:
            image = image.flip(1)
        temb = self.embed(x, t, text_embeds, time_ids)
        h = self.conv_in(x) + self.controlnet_cond_embedding(image.to(x.dtype))
        mid, skips = self.encode(h, temb, context)
        down = [conv(s) * scale for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(mid) * scale
        if self.config.global_pool:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid
