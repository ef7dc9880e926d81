"""Config bounds: every config field sdfast reads, with its type and the range it may take.

Bounded by what any released SD 1.x / 2.x / XL model uses (``released``), with generous headroom. The loader
(sdfast/checkpoint.py) refuses a value outside while the configs are read (diffusers folders, configs inferred from a
single file, ``overrides``), before anything is built or allocated, in one line naming the file, the field, the
value and the allowed range. Fields are diffusers' / transformers' names, as in the config.json files. The
relations between fields (norm groups dividing the channels, heads dividing them into heads no wider than
HEAD_DIM) are checked next, by ``broken_relations``. This module says what is wrong; the loader says where.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from .models import CLIPTextConfig, UNetConfig, VAEConfig


@dataclass(frozen=True)
class Bound:
    """One config field. ``kind``: int, float, bool or str (bool is never taken for an int, NaN and infinities
    never for a float). ``shape``: "one" value, a "list" of them, or "level": one value or a list of one per U-Net
    level. ``lo`` / ``hi``: inclusive, or exclusive with ``open`` (floats in (0, 1)). ``length``: a list's length.
    ``null``: JSON null allowed (the default then applies)."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    released: str = ""
    shape: str = "one"
    length: tuple[int, int] = (1, 8)
    multiple_of: int = 1
    null: bool = False
    open: bool = False

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if value is None:
            return None if self.null else "must not be null"
        if self.shape == "one" or (self.shape == "level" and not isinstance(value, list)):
            return None if self._fits(value) else "out of bounds"
        if not isinstance(value, list):
            return "must be a list"
        if not self.length[0] <= len(value) <= self.length[1]:
            return f"has {len(value)} entries"
        return None if all(self._fits(v) for v in value) else "out of bounds"

    def _fits(self, v) -> bool:
        if self.kind is bool:
            return isinstance(v, bool)
        if self.kind is str:
            return isinstance(v, str)
        if isinstance(v, bool) or not isinstance(v, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(v):
            return False
        if self.open:
            return self.lo < v < self.hi
        return self.lo <= v <= self.hi and (self.multiple_of == 1 or v % self.multiple_of == 0)

    def allowed(self) -> str:
        if self.kind is bool:
            one = "true or false"
        elif self.kind is str:
            one = "a string"
        elif self.open:
            one = f"a finite number {self.lo:g} < x < {self.hi:g}"
        else:
            noun, lo, hi = ("an integer", f"{self.lo:,}", f"{self.hi:,}") if self.kind is int else \
                ("a finite number", f"{self.lo:g}", f"{self.hi:g}")
            one = f"{noun} {lo}..{hi}" + (f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else "")
        many = f"a list of {self.length[0]}..{self.length[1]:,} entries, each {one}"
        text = {"one": one, "list": many, "level": f"{one}, or {many} (one per level)"}[self.shape]
        return text + (", or null" if self.null else "")


HEAD_DIM = (1, 512)  # attention head width (SD 1.x: 40..160, 2.x / XL: 64), by _relations
_LEVELS = {"shape": "level", "length": (1, 8)}
BOUNDS: dict[str, dict[str, Bound]] = {
    "unet": {
        "in_channels": Bound(int, 1, 64, "4; 9 inpainting"),
        "out_channels": Bound(int, 1, 64, "4"),
        "block_out_channels": Bound(int, 4, 4096, "320..1280", shape="list", multiple_of=2),
        "down_block_types": Bound(str, shape="list"),
        "up_block_types": Bound(str, shape="list"),
        "layers_per_block": Bound(int, 1, 16, "2", **_LEVELS),
        "transformer_layers_per_block": Bound(int, 1, 64, "1..10", **_LEVELS),
        "attention_head_dim": Bound(int, 1, 4096, "8 heads, or 5..20 per level", **_LEVELS),  # a head COUNT
        "num_attention_heads": Bound(int, 1, 4096, "null", null=True, **_LEVELS),
        "cross_attention_dim": Bound(int, 1, 8192, "768, 1024, 2048"),
        "norm_num_groups": Bound(int, 1, 4096, "32"),
        "norm_eps": Bound(float, 0, 1, "1e-5", open=True),
        "sample_size": Bound(int, 1, 1024, "64, 96, 128 latent cells", null=True),
        "use_linear_projection": Bound(bool),
        "upcast_attention": Bound(bool),
        "flip_sin_to_cos": Bound(bool),
        "freq_shift": Bound(int, 0, 1, "0"),
        "addition_embed_type": Bound(str, null=True),
        "addition_time_embed_dim": Bound(int, 2, 4096, "256", null=True, multiple_of=2),
        "projection_class_embeddings_input_dim": Bound(int, 1, 65536, "2816, 2560", null=True),
    },
    "vae": {
        "in_channels": Bound(int, 1, 64, "3"),
        "out_channels": Bound(int, 1, 64, "3"),
        "latent_channels": Bound(int, 1, 64, "4"),
        "block_out_channels": Bound(int, 1, 4096, "128..512", shape="list"),
        "down_block_types": Bound(str, shape="list"),
        "up_block_types": Bound(str, shape="list"),
        "layers_per_block": Bound(int, 1, 16, "2"),
        "norm_num_groups": Bound(int, 1, 4096, "32"),
        "sample_size": Bound(int, 1, 8192, "512..1024 px", null=True),
        "scaling_factor": Bound(float, 0, 100, "0.18215, 0.13025", open=True),
        "force_upcast": Bound(bool),
    },
    "text_encoder": {
        "vocab_size": Bound(int, 1, 1_000_000, "49408"),
        "hidden_size": Bound(int, 1, 8192, "768, 1024, 1280"),
        "intermediate_size": Bound(int, 1, 65536, "3072..5120"),
        "num_hidden_layers": Bound(int, 1, 64, "12, 23, 32"),
        "num_attention_heads": Bound(int, 1, 8192, "12..20"),
        "max_position_embeddings": Bound(int, 1, 1024, "77"),
        "layer_norm_eps": Bound(float, 0, 1, "1e-5", open=True),
        "projection_dim": Bound(int, 1, 8192, "768..1280", null=True),
        "eos_token_id": Bound(int, 0, 1_000_000, "2, 49407"),
        "hidden_act": Bound(str),
    },
    "scheduler": {
        "num_train_timesteps": Bound(int, 1, 100_000, "1000"),
        "beta_start": Bound(float, 0, 1, "0.00085", open=True),
        "beta_end": Bound(float, 0, 1, "0.012", open=True),
        "trained_betas": Bound(float, 0, 1, "null", shape="list", length=(1, 100_000), null=True, open=True),
        "beta_schedule": Bound(str),
        "prediction_type": Bound(str),
        "timestep_spacing": Bound(str),
        "steps_offset": Bound(int, 0, 100_000, "0, 1"),
        "set_alpha_to_one": Bound(bool),
        "clip_sample": Bound(bool),
        "clip_sample_range": Bound(float, 0, 1e6, "1.0", open=True),
        "original_inference_steps": Bound(int, 1, 100_000, "50"),
        "timestep_scaling": Bound(float, 0, 1e6, "10.0", open=True),
    },
    "pipeline": {"force_zeros_for_empty_prompt": Bound(bool), "requires_aesthetics_score": Bound(bool)},
}
BOUNDS["text_encoder_2"] = BOUNDS["text_encoder"]


def out_of_bounds(component: str, config) -> str | None:
    """What in ``config`` (a diffusers / transformers config dict of ``component``) breaks BOUNDS: the first field
    out of bounds, with its value and the allowed range; or None. Fields it does not list are left to the config
    classes."""
    if not isinstance(config, Mapping):
        return f"the {component} config is a JSON {json_type(config)} ({short_repr(config)}), not an object of fields"
    for name, bound in BOUNDS[component].items():
        if name in config and (problem := bound.problem(config[name])):
            released = f" (released models: {bound.released})" if bound.released else ""
            return f"{name}={short_repr(config[name])} {problem}: allowed {bound.allowed()}{released}"
    return None


def broken_relations(unet: UNetConfig, vae: VAEConfig,
                     texts: Mapping[str, CLIPTextConfig]) -> Iterable[tuple[str, str]]:
    """(component, problem) for each relation between fields that the configs break: every level's channels split
    into the norm groups and into heads of 1..512 channels each; one channel count per U-Net block type."""
    lo, hi = HEAD_DIM
    if len(unet.block_channels) != len(unet.attention):
        yield "unet", (f"block_out_channels has {len(unet.block_channels)} entries but down_block_types "
                       f"{len(unet.attention)}: give one per level")
    for component, channels, groups in (("unet", unet.block_channels, unet.norm_groups),
                                        ("vae", vae.block_channels, vae.norm_groups)):
        bad = [c for c in channels if c % groups]
        if bad:
            yield component, (f"norm_num_groups={groups} does not divide block_out_channels entries {bad}: each "
                              f"level's channels must split into the norm groups (released models: 32 groups)")
    levels = [i for i, attn in enumerate(unet.attention) if attn] + [len(unet.block_channels) - 1]  # + the middle
    for i in sorted(set(levels) & set(range(min(len(unet.block_channels), len(unet.num_heads))))):
        c, heads = unet.block_channels[i], unet.num_heads[i]
        if c % heads or not lo <= c // heads <= hi:
            yield "unet", (f"level {i}'s {c} channels in {heads} heads (attention_head_dim / num_attention_heads, "
                           f"a head count) do not make whole heads {lo}..{hi} wide (released models: 40..160)")
    for component, cfg in texts.items():
        if cfg.hidden_size % cfg.num_heads or not lo <= cfg.hidden_size // cfg.num_heads <= hi:
            yield component, (f"hidden_size={cfg.hidden_size} in num_attention_heads={cfg.num_heads} does not "
                              f"make whole heads {lo}..{hi} wide (released models: 64)")


def short_repr(value, most: int = 60) -> str:
    """``repr(value)``, cut to ``most`` characters (a config list can hold a million entries)."""
    text = repr(value)
    return text if len(text) <= most else text[:most - 4] + " ..."


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages about a file that holds the wrong kind of value."""
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)
