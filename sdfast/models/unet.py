"""The Stable Diffusion 1.x / 2.x / XL U-Net: noisy latent (B, 4, H/8, W/8) + timestep + text context -> noise.

SDXL is the same network with other numbers (levels without attention, a transformer depth per level, 2048-wide
context) plus one addition: the "text_time" embedding of the pooled text and the micro-conditioning numbers (sizes,
crop), added to the timestep embedding (Podell et al. 2023, "SDXL", section 2.2).

Parameter names are diffusers' ``UNet2DConditionModel`` keys, so a diffusers ``unet/`` folder loads with no renames.
Reference: diffusers/models/unets/unet_2d_condition.py, unet_2d_blocks.py, transformers/transformer_2d.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, GroupNorm
from .unet_config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float, max_period: float = 10000.0):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as in DDPM (diffusers' get_timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding added in between and a 1x1 shortcut when channels change."""

    def __init__(self, cin: int, cout: int, temb_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps, silu=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        if temb_dim is not None:
            self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = GroupNorm(groups, cout, eps, silu=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        # diffusers adds the projected time embedding to h, then normalises; the seam takes the add as its shift,
        # so a fused kernel reads h once instead of writing h + temb out first
        shift = self.time_emb_proj(F.silu(temb)) if temb is not None else None  # (B, Cout)
        h = self.conv2(self.norm2(h, shift))
        shortcut = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return shortcut + h


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is diffusers' (parameter-free) dropout: kept as Identity so the keys stay net.0 / net.2
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text context, GEGLU feed-forward; pre-LayerNorm, residual each."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel for SD: GroupNorm, project in, transformer blocks over H*W tokens, project out."""

    def __init__(self, channels: int, heads: int, depth: int, cfg: UNetConfig):
        super().__init__()
        self.linear = cfg.linear_projection
        self.norm = GroupNorm(cfg.norm_groups, channels, 1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if self.linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, cfg.context_dim, cfg.upcast_attention) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)
        if self.linear:
            h_ = self.proj_in(h_.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, C)
        else:
            h_ = self.proj_in(h_).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        for block in self.transformer_blocks:
            h_ = block(h_, context)
        if self.linear:
            h_ = self.proj_out(h_).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            h_ = self.proj_out(h_.reshape(b, h, w, c).permute(0, 3, 1, 2))  # (B, C, H, W)
        return h_ + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # ``size`` keeps odd latent sizes aligned with their skip connection (e.g. 72 -> 36 -> 18 -> 9 -> 18)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, level: int, cfg: UNetConfig, temb_dim: int, final: bool):
        super().__init__()
        n = cfg.layers_per_block[level]
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if j == 0 else cout, cout, temb_dim, cfg.norm_groups, cfg.norm_eps) for j in range(n))
        if cfg.attention[level]:
            self.attentions = nn.ModuleList(
                SpatialTransformer(cout, cfg.num_heads[level], cfg.transformer_depth[level], cfg) for _ in range(n))
        if not final:
            self.downsamplers = nn.ModuleList([Downsample(cout)])

    def forward(self, x, temb, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[j](x, context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, cprev: int, cout: int, cskip_last: int, level: int, cfg: UNetConfig, temb_dim: int, final: bool):
        super().__init__()
        n = cfg.layers_per_block[level] + 1
        self.resnets = nn.ModuleList(
            ResnetBlock((cprev if j == 0 else cout) + (cskip_last if j == n - 1 else cout), cout, temb_dim,
                        cfg.norm_groups, cfg.norm_eps)
            for j in range(n))
        if cfg.attention[level]:
            self.attentions = nn.ModuleList(
                SpatialTransformer(cout, cfg.num_heads[level], cfg.transformer_depth[level], cfg) for _ in range(n))
        if not final:
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x, skips: list[torch.Tensor], temb, context, upsample_size=None) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                x = self.attentions[j](x, context)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig, temb_dim: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, temb_dim, cfg.norm_groups, cfg.norm_eps) for _ in range(2))
        self.attentions = nn.ModuleList(
            [SpatialTransformer(channels, cfg.num_heads[-1], cfg.transformer_depth[-1], cfg)])

    def forward(self, x, temb, context) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNetEncoder(nn.Module):
    """The half a U-Net and a ControlNet share, under the same parameter names: the input convolution, the time (and
    SDXL's added) embedding, the down blocks and the middle block."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_channels
        temb_dim = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        if cfg.added_time_dim is not None:
            self.add_embedding = TimestepEmbedding(cfg.added_cond_dim, temb_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], i, cfg, temb_dim, final=i == len(ch) - 1) for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], cfg, temb_dim)

    def embed(self, x: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor | None,
              time_ids: torch.Tensor | None) -> torch.Tensor:
        """The timestep embedding (B, 4*C0), plus SDXL's added embedding."""
        cfg = self.config
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        emb = timestep_embedding(t, cfg.block_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(emb.to(x.dtype))  # (B, 4*C0)
        if cfg.added_time_dim is not None:
            temb = temb + self._added_embedding(text_embeds, time_ids, x.dtype)
        return temb

    def encode(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``h`` (the input convolution's output) through the down blocks and the middle block: the middle block's
        output and the skips, top to bottom (``h`` first)."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips.extend(block_skips)
        return self.mid_block(h, temb, context), skips

    def _added_embedding(self, text_embeds, time_ids, dtype) -> torch.Tensor:
        """SDXL's "text_time" embedding: pooled text and sinusoidal micro-conditioning numbers -> (B, 4*C0)."""
        cfg = self.config
        if text_embeds is None or time_ids is None:
            raise ValueError("this is an SDXL U-Net: pass text_embeds (B, pooled width) and time_ids (B, n), "
                             "as Pipeline.generate does")
        b = text_embeds.shape[0]
        width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.added_time_dim
        if width != cfg.added_cond_dim or time_ids.shape[0] != b:
            raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} make "
                             f"{width} added inputs but this U-Net takes {cfg.added_cond_dim}: pooled width + "
                             f"{cfg.added_time_dim} per micro-conditioning number, one row per sample")
        times = timestep_embedding(time_ids.reshape(-1), cfg.added_time_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        times = times.reshape(b, -1)  # (B, n * added_time_dim)
        return self.add_embedding(torch.cat([text_embeds.float(), times], dim=-1).to(dtype))  # (B, 4*C0)


class UNet(UNetEncoder):
    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        ch = cfg.block_channels
        temb_dim = 4 * ch[0]
        ups = []
        for i, level in enumerate(reversed(range(len(ch)))):
            cprev = ch[min(level + 1, len(ch) - 1)]  # channels coming up from the level below
            ups.append(UpBlock(cprev, ch[level], ch[max(level - 1, 0)], level, cfg, temb_dim, final=level == 0))
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = GroupNorm(cfg.norm_groups, ch[0], cfg.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, down_residuals: tuple[torch.Tensor, ...] | None = None,
                mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) latents; t: () or (B,) timesteps; context: (B, N, context_dim) text embeddings.
        SDXL only (``config.added_time_dim`` set): text_embeds (B, P) pooled text, time_ids (B, n) micro-conditioning.
        ControlNet (``sdfast.control``): ``down_residuals`` are added to the skips (one per skip, top to bottom) and
        ``mid_residual`` to the middle block's output, as diffusers' ``down_block_additional_residuals``."""
        temb = self.embed(x, t, text_embeds, time_ids)
        x, skips = self.encode(self.conv_in(x), temb, context)
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips else None
            x = block(x, block_skips, temb, context, size)
        return self.conv_out(self.conv_norm_out(x))
