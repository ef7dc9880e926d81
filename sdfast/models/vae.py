"""The KL autoencoder of Stable Diffusion: image (B, 3, H, W) in [-1, 1] <-> latent (B, 4, H/8, W/8).

Parameter names are diffusers' ``AutoencoderKL`` keys. Reference: diffusers/models/autoencoders/autoencoder_kl.py, vae.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, GroupNorm
from .unet import ResnetBlock, Upsample  # the same nearest-neighbour x2 + 3x3 conv in both networks
from .unet_config import _conv, _linear, _resnet  # weight counts of the same layers


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    # latents are scaled by this before the U-Net sees them (unit variance); 0.18215 for SD 1.x / 2.x, 0.13025 XL
    scaling_factor: float = 0.18215
    # decode in fp32 when the pipeline runs in fp16: SDXL's VAE overflows there (its fp16-fixed variant says False).
    # As in diffusers, only SDXL pipelines read it (diffusers writes its default, True, into every VAE config).
    force_upcast: bool = True

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        for key, default in {"shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
                             "mid_block_add_attention": True}.items():
            if cfg.get(key, default) != default:
                raise ValueError(f"vae config {key}={cfg[key]!r} is not supported (supported: {default!r})")
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            block_channels=tuple(cfg.get("block_out_channels", (128, 256, 512, 512))),
            layers_per_block=cfg.get("layers_per_block", 2),
            norm_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=cfg.get("scaling_factor", 0.18215),
            force_upcast=cfg.get("force_upcast", True),
        )

    def compute_dtype(self, dtype: torch.dtype, is_xl: bool) -> torch.dtype:
        """The dtype this VAE runs in within a ``dtype`` pipeline: fp32 for SDXL's (``force_upcast``) in fp16, where
        it overflows; else the pipeline's (bf16 has fp32's range). The torch pipeline and the ONNX export both ask
        here, so an exported VAE graph is in the dtype the torch pipeline decodes in."""
        if is_xl and dtype == torch.float16 and self.force_upcast:
            return torch.float32
        return dtype


    def num_parameters(self) -> int:
        """The number of weights ``AutoencoderKL(self)`` holds, by arithmetic alone (no module is built)."""
        ch, lat, n = self.block_channels, self.latent_channels, self.layers_per_block
        mid = 2 * _resnet(ch[-1], ch[-1], None) + 2 * ch[-1] + 4 * _linear(ch[-1], ch[-1])  # 2 resnets, attention
        encoder = _conv(self.in_channels, ch[0], 3) + mid + 2 * ch[-1] + _conv(ch[-1], 2 * lat, 3)
        for i in range(len(ch)):
            cin, cout = ch[max(i - 1, 0)], ch[i]
            encoder += sum(_resnet(cin if j == 0 else cout, cout, None) for j in range(n))
            encoder += _conv(cout, cout, 3) if i < len(ch) - 1 else 0
        up = tuple(reversed(ch))
        decoder = _conv(lat, up[0], 3) + mid + 2 * up[-1] + _conv(up[-1], self.out_channels, 3)
        for i in range(len(up)):
            cin, cout = up[max(i - 1, 0)], up[i]
            decoder += sum(_resnet(cin if j == 0 else cout, cout, None) for j in range(n + 1))
            decoder += _conv(cout, cout, 3) if i < len(up) - 1 else 0
        return encoder + decoder + _conv(2 * lat, 2 * lat, 1) + _conv(lat, lat, 1)

class SelfAttention2d(Attention):
    """Single-head self-attention over the H*W positions, with its GroupNorm and residual (the VAE mid-block)."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, head_dim=channels, bias=True)
        self.group_norm = GroupNorm(groups, channels, 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        return x + super().forward(tokens).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, None, groups, 1e-6) for _ in range(2))
        self.attentions = nn.ModuleList([SelfAttention2d(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # the original VAE pads only right and bottom


class EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, final: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if j == 0 else cout, cout, None, groups, 1e-6) for j in range(layers))
        if not final:
            self.downsamplers = nn.ModuleList([Downsample(cout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if hasattr(self, "downsamplers") else x


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, final: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if j == 0 else cout, cout, None, groups, 1e-6) for j in range(layers))
        if not final:
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, final=i == len(ch) - 1)
            for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = GroupNorm(g, ch[-1], 1e-6, silu=True)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_channels)), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, final=i == len(ch) - 1)
            for i in range(len(ch)))
        self.conv_norm_out = GroupNorm(g, ch[-1], 1e-6, silu=True)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def posterior(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> the latent posterior's (mean, logvar), each (B, 4, H/8, W/8), unscaled.
        The deterministic part of ``encode``: what an exported VAE-encoder graph computes."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean, logvar

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> scaled latent (B, 4, H/8, W/8), sampled from the posterior."""
        return sample_posterior(*self.posterior(image), generator, self.config.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w) in about [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latents / self.config.scaling_factor))


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None,
                     scaling_factor: float) -> torch.Tensor:
    """A scaled latent drawn from the posterior N(mean, exp(logvar)); shared by every backend's ``vae.encode``.

    The noise is drawn like diffusers' ``latent_dist.sample(generator)`` (one randn of the mean's shape, on the
    generator's device), so a seeded generator gives the reference's img2img latents."""
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                        device=generator.device if generator is not None else mean.device).to(mean.device)
    return (mean + std * noise) * scaling_factor
