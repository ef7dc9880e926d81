"""Loading a ControlNet: a diffusers folder (``config.json`` + weights), or an original single file
(lllyasviel's ``control_*.safetensors`` / ``.pth``, keys under ``control_model.``; SDXL ones from sgm-style trainers
without that prefix), its config inferred from the shapes as for a checkpoint's U-Net (``infer_config``).

The original layout is the U-Net's input half under the checkpoint's names (``layouts``' table, reused) plus three
parts of its own: ``input_hint_block`` (the control image's embedding: convs at the even indices, SiLU between),
``zero_convs.N.0`` (one per skip) and ``middle_block_out.0``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import infer_config, layouts
from ..checkpoint import (CheckpointError, check_bounds, check_size, find_weights, materialize, read_json,
                          sources_from_rules, verify)
from ..weight_files import WeightFile
from ..models.controlnet import ControlNet, ControlNetConfig


def load_controlnet(path, device="cpu", dtype=torch.float32) -> ControlNet:
    """A ControlNet from a diffusers folder or an original single file (``.safetensors``; ``.pth`` / ``.ckpt``
    through ``weights_only=True`` only), weights cast once to ``dtype`` on ``device``. Raises ``CheckpointError``
    naming the problem."""
    plan = _plan(path)
    return materialize(lambda: ControlNet(plan.config), plan.sources, plan.weights, component="controlnet",
                       unexpected=plan.unexpected, device=device, dtype=dtype)


def check_controlnet(path) -> ControlNetConfig:
    """The config of the ControlNet at ``path``, after every check ``load_controlnet`` makes before it reads a
    tensor (the config, and every key and shape against the network built on the meta device): to refuse a broken
    ControlNet, or one made for another model, before anything large is loaded. A .safetensors file's weights are
    not read (a legacy .pth / .ckpt file is, whole)."""
    plan = _plan(path)
    verify(lambda: ControlNet(plan.config), plan.sources, plan.weights, component="controlnet",
           unexpected=plan.unexpected)
    return plan.config


class ControlNetFiles(Mapping):
    """{name: path} seen as {name: ControlNet}: each looked up is loaded then (on the CPU in ``dtype``) and not kept,
    so a caller that drops each before the next holds one ControlNet at a time (``sdfast export --controlnet A
    --controlnet B``: 1.4 GB each at SD 1.5's size in fp32)."""

    def __init__(self, paths: Mapping[str, Path], dtype: torch.dtype):
        self.paths, self.dtype = dict(paths), dtype

    def __getitem__(self, name: str) -> ControlNet:
        return load_controlnet(self.paths[name], "cpu", self.dtype)

    def __contains__(self, name) -> bool:  # without loading it (Mapping's own would)
        return name in self.paths

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What loading a ControlNet reads before its weights: the config, where each parameter comes from."""

    config: ControlNetConfig
    sources: dict
    weights: WeightFile
    unexpected: tuple = ()


def _plan(path) -> _Plan:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a ControlNet's diffusers folder (config.json and its "
                              "weights) or an original single file (control_*.safetensors)")
    if path.is_dir():
        return _diffusers_plan(path)
    weights = WeightFile([path])
    if "controlnet_cond_embedding.conv_in.weight" in weights:  # diffusers' names in a lone file
        if not (path.parent / "config.json").is_file():
            raise CheckpointError(f"{path} has diffusers' ControlNet names but no config.json beside it: put the "
                                  "model's config.json in the same folder and pass the folder")
        return _diffusers_plan(path.parent, weights)
    return _original_plan(path, weights)


def _diffusers_plan(folder: Path, weights: WeightFile | None = None) -> _Plan:
    raw = read_json(folder / "config.json")
    if raw.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise CheckpointError(f"{folder / 'config.json'} describes a {raw['_class_name']}, not a ControlNetModel")
    source = str(folder / "config.json")
    check_bounds("unet", raw, source, "correct it in that file (the model's released config has it right)")
    try:
        config = ControlNetConfig.from_diffusers(raw)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    weights = weights or find_weights(folder)
    check_size("controlnet", config, _count(weights), source)
    return _Plan(config, sources_from_rules(layouts.Rule(key, key) for key in weights.keys()), weights)


def _original_plan(path: Path, weights: WeightFile) -> _Plan:
    keys = weights.keys()
    prefix = "control_model." if any(k.startswith("control_model.") for k in keys) else ""
    shapes = {k[len(prefix):]: weights.shape(k) for k in keys if k.startswith(prefix)}
    if "input_hint_block.0.weight" not in shapes or "input_blocks.0.0.weight" not in shapes:
        raise CheckpointError(f"{path}: not a ControlNet (no {prefix}input_hint_block.0 / {prefix}input_blocks.0.0 "
                              f"keys; found e.g. {', '.join(sorted(keys)[:3])}): pass a ControlNet file, or a "
                              "diffusers ControlNet folder")
    try:
        raw = _original_config(shapes)
        config = ControlNetConfig.from_diffusers(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    check_size("controlnet", config, _count(weights), str(path))
    rules = original_rules(raw)
    used = {r.source for r in rules}
    unexpected = tuple(k for k in shapes if k not in used)
    sources = sources_from_rules(layouts.Rule(r.target, prefix + r.source, r.transform) for r in rules)
    return _Plan(config, sources, weights, unexpected)


def _original_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The diffusers config of an original-layout ControlNet (keys without their prefix), from its shapes."""
    # SDXL has the added embedding; SD 2.x linear transformer projections where SD 1.x has 1x1 convolutions
    attention = infer_config._first_unet_attention(shapes, "")
    linear = len(shapes[attention + "proj_in.weight"]) == 2
    family = "sdxl" if "label_emb.0.0.weight" in shapes else "sd2" if linear else "sd1"
    unet = infer_config.unet_config(shapes, family, 128 if family == "sdxl" else 64, prefix="")
    hint = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.") and k.endswith(".weight"))
    # convs at 0, 2, 4, ...: conv_in, then per width a 3x3 and a stride-2 conv, then conv_out
    widths = [shapes[f"input_hint_block.{i}.weight"][0] for i in hint[:-1] if i % 4 == 0]
    return {**unet, "_class_name": "ControlNetModel", "conditioning_channels": shapes["input_hint_block.0.weight"][1],
            "conditioning_embedding_out_channels": widths}


def original_rules(config: dict) -> list[layouts.Rule]:
    """Every ControlNet parameter with its original key (without the file's ``control_model.`` prefix)."""
    ours = ControlNetConfig.from_diffusers(config)
    unet_only = ("conv_norm_out.", "conv_out.")
    rules = [r for r in layouts.unet_rules({**config, "up_block_types": []}) if not r.target.startswith(unet_only)]
    rules += layouts.weight_bias("controlnet_cond_embedding.conv_in", "input_hint_block.0")
    n = 2 * (len(ours.embedding_channels) - 1)  # convs between conv_in and conv_out
    rules += [r for k in range(n) for r in layouts.weight_bias(f"controlnet_cond_embedding.blocks.{k}",
                                                               f"input_hint_block.{2 * (k + 1)}")]
    rules += layouts.weight_bias("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * (n + 1)}")
    rules += [r for i in range(len(ours.skip_channels()))
              for r in layouts.weight_bias(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0")]
    return rules + layouts.weight_bias("controlnet_mid_block", "middle_block_out.0")


def _count(weights: WeightFile) -> int:
    return sum(math.prod(shape) for shape in weights.shapes().values())
