"""The Stable Diffusion 1.x / 2.x / XL U-Net: noisy latent (B, 4, H/8, W/8) + timestep + text context -> noise.

SDXL is the same network with other numbers (levels without attention, a transformer depth per level, 2048-wide
context) plus one addition: the "text_time" embedding of the pooled text and the micro-conditioning numbers (sizes,
crop), added to the timestep embedding (Podell et al. 2023, "SDXL", section 2.2).

Parameter names are diffusers' ``UNet2DConditionModel`` keys, so a diffusers ``unet/`` folder loads with no renames.
Reference: diffusers/models/unets/unet_2d_condition.py, unet_2d_blocks.py, transformers/transformer_2d.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, GroupNorm


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # per level, top to bottom: does the down block (and its mirror up block) have spatial transformers?
    attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # per level; SD 1.x: 8 everywhere, SD 2.x: channels / 64
    context_dim: int = 768
    norm_groups: int = 32
    norm_eps: float = 1e-5
    linear_projection: bool = False  # SD 2.x: transformer proj_in / proj_out are Linear, SD 1.x: 1x1 Conv
    upcast_attention: bool = False  # SD 2.1-v: attention in fp32 (it overflows in fp16)
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64  # latent side it was trained at: 64 -> 512 px (SD 1.x, 2.x-base), 96 -> 768 px (2.x-v)
    # SDXL's "text_time" added embedding: each micro-conditioning number (original size, crop, target size; the
    # refiner: aesthetic score instead of target size) gets an ``added_time_dim``-wide sinusoidal embedding (256);
    # with the pooled text they make ``added_cond_dim`` inputs (1280 + 6 * 256 = 2816 base, 1280 + 5 * 256 refiner).
    # None: no added embedding (SD 1.x / 2.x).
    added_time_dim: int | None = None
    added_cond_dim: int = 0

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """Translate a diffusers ``unet/config.json``; refuses options this U-Net does not implement."""
        unsupported = {
            "class_embed_type": None, "time_cond_proj_dim": None,
            "encoder_hid_dim": None, "dual_cross_attention": False, "only_cross_attention": False,
            "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "conv_in_kernel": 3,
            "conv_out_kernel": 3, "mid_block_type": "UNetMidBlock2DCrossAttn", "center_input_sample": False,
            "attention_type": "default", "act_fn": "silu", "num_class_embeds": None, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
            "timestep_post_act": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
            "cross_attention_norm": None, "encoder_hid_dim_type": None, "class_embeddings_concat": False,
            "mid_block_only_cross_attention": None,
        }
        for key, default in unsupported.items():
            if cfg.get(key, default) != default:
                raise ValueError(f"unet config {key}={cfg[key]!r} is not supported by sdfast's U-Net "
                                 f"(supported: {default!r}); this is not an SD 1.x / 2.x / XL U-Net")
        added = cfg.get("addition_embed_type")
        if added not in (None, "text_time"):
            raise ValueError(f"unet config addition_embed_type={added!r} is not supported by sdfast's U-Net "
                             "(supported: None for SD 1.x / 2.x, 'text_time' for SDXL)")
        if added and not (cfg.get("addition_time_embed_dim") and cfg.get("projection_class_embeddings_input_dim")):
            raise ValueError("unet config addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim (SDXL: 256 and 2816)")
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        up = cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
        known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False, "CrossAttnUpBlock2D": True, "UpBlock2D": False}
        for name in (*down, *up):
            if name not in known:
                raise ValueError(f"unet block type {name!r} is not supported; expected one of {sorted(known)}")
        attention = tuple(known[name] for name in down)
        if tuple(known[name] for name in reversed(up)) != attention:
            raise ValueError(f"unet up_block_types {up} do not mirror down_block_types {down}")
        levels = len(down)

        def per_level(value, name):
            values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
            if len(values) != levels:
                raise ValueError(f"unet config {name}={value!r} must have one entry per block ({levels})")
            return values

        # diffusers' legacy naming: in SD 1.x / 2.x configs ``attention_head_dim`` holds the number of heads
        # (num_attention_heads is unset); see the note in unet_2d_condition.py.
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        if cfg.get("reverse_transformer_layers_per_block") is not None:
            raise ValueError("unet config reverse_transformer_layers_per_block is not supported")
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
            attention=attention,
            layers_per_block=per_level(cfg.get("layers_per_block", 2), "layers_per_block"),
            transformer_depth=per_level(cfg.get("transformer_layers_per_block", 1), "transformer_layers_per_block"),
            num_heads=per_level(heads, "attention_head_dim"),
            context_dim=cfg.get("cross_attention_dim", 768),
            norm_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            linear_projection=cfg.get("use_linear_projection", False),
            upcast_attention=cfg.get("upcast_attention", False),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0),
            sample_size=cfg.get("sample_size") or 64,
            added_time_dim=cfg.get("addition_time_embed_dim") if added else None,
            added_cond_dim=(cfg.get("projection_class_embeddings_input_dim") or 0) if added else 0,
        )

    def num_parameters(self) -> int:
        """The number of weights ``UNet(self)`` holds, by arithmetic alone (no module is built): what a loader compares
        with a weight file before building anything (tests check it against the built network)."""
        ch, levels = self.block_channels, len(self.block_channels)
        temb = 4 * ch[0]
        total = _conv(self.in_channels, ch[0], 3) + _linear(ch[0], temb) + _linear(temb, temb)
        if self.added_time_dim is not None:
            total += _linear(self.added_cond_dim, temb) + _linear(temb, temb)

        def transformer(c: int, level: int) -> int:
            inner = self.num_heads[level] * (c // self.num_heads[level])
            block = (3 * 2 * c + 3 * c * inner + _linear(inner, c)  # norms, self-attention
                     + c * inner + 2 * self.context_dim * inner + _linear(inner, c)  # cross-attention
                     + _linear(c, 8 * c) + _linear(4 * c, c))  # GEGLU feed-forward
            return 2 * c + 2 * _linear(c, c) + self.transformer_depth[level] * block  # norm, proj_in / proj_out

        for i in range(levels):
            cin, cout, n = ch[max(i - 1, 0)], ch[i], self.layers_per_block[i]
            total += sum(_resnet(cin if j == 0 else cout, cout, temb) for j in range(n))
            total += n * transformer(cout, i) if self.attention[i] else 0
            total += _conv(cout, cout, 3) if i < levels - 1 else 0
        total += 2 * _resnet(ch[-1], ch[-1], temb) + transformer(ch[-1], levels - 1)
        for level in reversed(range(levels)):
            cprev, cout, cskip = ch[min(level + 1, levels - 1)], ch[level], ch[max(level - 1, 0)]
            n = self.layers_per_block[level] + 1
            total += sum(_resnet((cprev if j == 0 else cout) + (cskip if j == n - 1 else cout), cout, temb)
                         for j in range(n))
            total += n * transformer(cout, level) if self.attention[level] else 0
            total += _conv(cout, cout, 3) if level > 0 else 0
        return total + 2 * ch[0] + _conv(ch[0], self.out_channels, 3)


def _linear(cin: int, cout: int, bias: bool = True) -> int:
    return cin * cout + (cout if bias else 0)


def _conv(cin: int, cout: int, kernel: int) -> int:
    return cin * cout * kernel * kernel + cout


def _resnet(cin: int, cout: int, temb: int | None) -> int:
    """The weights of a ``ResnetBlock``: two GroupNorms, two 3x3 convs, the time projection, the 1x1 shortcut."""
    return (2 * cin + _conv(cin, cout, 3) + (_linear(temb, cout) if temb else 0) + 2 * cout + _conv(cout, cout, 3)
            + (_conv(cin, cout, 1) if cin != cout else 0))


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


class UNet(nn.Module):
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
        ups = []
        for i, level in enumerate(reversed(range(len(ch)))):
            cprev = ch[min(level + 1, len(ch) - 1)]  # channels coming up from the level below
            ups.append(UpBlock(cprev, ch[level], ch[max(level - 1, 0)], level, cfg, temb_dim, final=level == 0))
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = GroupNorm(cfg.norm_groups, ch[0], cfg.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) latents; t: () or (B,) timesteps; context: (B, N, context_dim) text embeddings.
        SDXL only (``config.added_time_dim`` set): text_embeds (B, P) pooled text, time_ids (B, n) micro-conditioning."""
        cfg = self.config
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        emb = timestep_embedding(t, cfg.block_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(emb.to(x.dtype))  # (B, 4*C0)
        if cfg.added_time_dim is not None:
            temb = temb + self._added_embedding(text_embeds, time_ids, x.dtype)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips else None
            x = block(x, block_skips, temb, context, size)
        return self.conv_out(self.conv_norm_out(x))

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
