"""The U-Net's numbers (``UNetConfig``): diffusers' ``unet/config.json`` translated once, and the parameter count
those numbers imply, which a loader compares with a weight file before building anything."""

from __future__ import annotations

from dataclasses import dataclass


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
    def from_diffusers(cls, cfg: dict) -> UNetConfig:
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
        ch, levels, temb = self.block_channels, len(self.block_channels), 4 * self.block_channels[0]
        total = self.encoder_parameters()
        for level in reversed(range(levels)):
            cprev, cout, cskip = ch[min(level + 1, levels - 1)], ch[level], ch[max(level - 1, 0)]
            n = self.layers_per_block[level] + 1
            total += sum(_resnet((cprev if j == 0 else cout) + (cskip if j == n - 1 else cout), cout, temb)
                         for j in range(n))
            total += n * self._transformer_parameters(cout, level) if self.attention[level] else 0
            total += _conv(cout, cout, 3) if level > 0 else 0
        return total + 2 * ch[0] + _conv(ch[0], self.out_channels, 3)

    def encoder_parameters(self) -> int:
        """The weights of the half a U-Net shares with a ControlNet (``unet.UNetEncoder``): the input convolution,
        the time embeddings, the down blocks and the middle block."""
        ch, levels, temb = self.block_channels, len(self.block_channels), 4 * self.block_channels[0]
        total = _conv(self.in_channels, ch[0], 3) + _linear(ch[0], temb) + _linear(temb, temb)
        if self.added_time_dim is not None:
            total += _linear(self.added_cond_dim, temb) + _linear(temb, temb)
        for i in range(levels):
            cin, cout, n = ch[max(i - 1, 0)], ch[i], self.layers_per_block[i]
            total += sum(_resnet(cin if j == 0 else cout, cout, temb) for j in range(n))
            total += n * self._transformer_parameters(cout, i) if self.attention[i] else 0
            total += _conv(cout, cout, 3) if i < levels - 1 else 0
        return total + 2 * _resnet(ch[-1], ch[-1], temb) + self._transformer_parameters(ch[-1], levels - 1)

    def _transformer_parameters(self, c: int, level: int) -> int:
        inner = self.num_heads[level] * (c // self.num_heads[level])
        block = (3 * 2 * c + 3 * c * inner + _linear(inner, c)  # norms, self-attention
                 + c * inner + 2 * self.context_dim * inner + _linear(inner, c)  # cross-attention
                 + _linear(c, 8 * c) + _linear(4 * c, c))  # GEGLU feed-forward
        return 2 * c + 2 * _linear(c, c) + self.transformer_depth[level] * block  # norm, proj_in / proj_out


def _linear(cin: int, cout: int, bias: bool = True) -> int:
    return cin * cout + (cout if bias else 0)


def _conv(cin: int, cout: int, kernel: int) -> int:
    return cin * cout * kernel * kernel + cout


def _resnet(cin: int, cout: int, temb: int | None) -> int:
    """The weights of a ``ResnetBlock``: two GroupNorms, two 3x3 convs, the time projection, the 1x1 shortcut."""
    return (2 * cin + _conv(cin, cout, 3) + (_linear(temb, cout) if temb else 0) + 2 * cout + _conv(cout, cout, 3)
            + (_conv(cin, cout, 1) if cin != cout else 0))
