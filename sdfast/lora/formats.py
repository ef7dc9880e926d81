"""LoRA files: which key names which module of which network, in the three layouts people publish.

| layout | a U-Net key | a text-encoder key | scale |
|---|---|---|---|
| kohya / webui (sd-scripts, LoCon) | ``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`` | ``lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight`` (SDXL: ``lora_te1_`` / ``lora_te2_``) | ``.alpha`` / rank |
| diffusers / peft | ``unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`` | ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight`` | ``.alpha`` / rank if present, else 1 |
| diffusers, older | ``unet.<module>.lora.down.weight``, ``unet.<block>.processor.to_q_lora.up.weight`` | ``text_encoder.<module>.lora_linear_layer.down.weight`` | 1 |

kohya names a module by its path with ``.`` replaced by ``_``: diffusers' U-Net path for SD 1.x / 2.x, and for SDXL
also the original ("sgm") path (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), which
``sdfast.layouts``' key table translates. Text-encoder paths are transformers' (``text_model.`` first; sdfast's
CLIP has no such prefix). LoCon adds convolution LoRAs: a (rank, in, k, k) down and a (out, rank, 1, 1) up.

The update of a module's weight W (out, in[, k, k]) is ``W + user_scale * alpha / rank * up @ down`` (for a
convolution: ``delta[o, i, y, x] = sum_r up[o, r] * down[r, i, y, x]``), as peft's ``get_delta_weight``.
A file with any key this module cannot place is refused whole, naming the keys: never a partial apply.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from torch import nn

from ..weight_files import CheckpointError, WeightFile
from ..layouts import UNET_PREFIX, original_rules


class LoRAError(ValueError):
    """A LoRA file that cannot be applied to this model: unknown keys, an unsupported variant, another family."""


@dataclass(frozen=True)
class Patch:
    """One module's low-rank update: ``scale * up @ down``, ``scale`` the file's ``alpha / rank`` (1 without one)."""

    down: torch.Tensor  # (rank, in) or (rank, in, k, k)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight shape this patch updates: (out, in) or (out, in, k, k)."""
        return (self.up.shape[0], *self.down.shape[1:])

    def factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``up`` (out, rank) and ``down`` (rank, in * k * k) in fp32 on ``device``: the update is
        ``scale * up @ down``, reshaped to the weight."""
        return self.up.to(device, torch.float32).flatten(1), self.down.to(device, torch.float32).flatten(1)


@dataclass(frozen=True)
class LoRA:
    """A parsed LoRA file: one patch per (network, module path in sdfast's names)."""

    path: Path
    layout: str  # "kohya", "peft" or "diffusers-legacy"
    patches: dict[tuple[str, str], Patch]
    # the words of its training captions (kohya's ``ss_tag_frequency`` metadata), which a model's vocabulary
    # notice counts as known while the LoRA is in use
    words: frozenset[str] = frozenset()

    @property
    def networks(self) -> list[str]:
        return sorted({network for network, _ in self.patches})

    @property
    def rank(self) -> int:
        return max(p.rank for p in self.patches.values())

    def nbytes(self) -> int:
        return sum(p.down.nbytes + p.up.nbytes for p in self.patches.values())


# LyCORIS' other algorithms (and DoRA) change weights in ways a LoRA merge does not: refused, named.
_VARIANTS = {r"\.hada_(w[12]_[ab]|t[12])$": "LoHa", r"\.lokr_": "LoKr", r"\.oft_": "OFT",
             r"\.lora_mid\.weight$": "LoCon with a CP-decomposed mid (Tucker)", r"\.dora_scale$": "DoRA",
             r"\.diff(_b)?$": "full weight-difference (LyCORIS 'full')", r"\.a1\.weight$": "GLoRA",
             r"\.[wb]_norm$": "LyCORIS norm-weight"}
_KOHYA = re.compile(r"^lora_(unet|te|te1|te2)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)\.(lora_A(?:\.default)?\.weight|"
                   r"lora_B(?:\.default)?\.weight|lora\.down\.weight|lora\.up\.weight|"
                   r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
# diffusers' attention-processor LoRAs: <block>.processor.to_q_lora.down.weight is <block>.to_q.lora.down.weight
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")
_KOHYA_NETWORKS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
          "lora_A.default.weight": "down", "lora_B.default.weight": "up", "lora.down.weight": "down",
          "lora.up.weight": "up", "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
          "alpha": "alpha"}
_UNET_ROOTS = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block", "up_blocks", "conv_out")


Shapes = Mapping[str, Mapping[str, tuple[int, ...]]]  # {network: {module path: its weight's shape}}


def patchable(net: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``net`` a LoRA can update (Linear and Conv2d weights), by path."""
    return {name: m for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _sgm_names(unet_config) -> dict[str, str]:
    """kohya's flattened original ("sgm") U-Net module names -> sdfast paths, from the single-file key table."""
    from ..bench.arch import unet_json  # the diffusers config of an sdfast UNetConfig

    names = {}
    for rule in original_rules("unet", unet_json(unet_config)):
        if rule.target.endswith(".weight") and rule.transform in ("copy", "conv_to_linear"):
            flat = rule.source[len(UNET_PREFIX):-len(".weight")].replace(".", "_")
            names[flat] = rule.target[:-len(".weight")]
    return names


class _Names:
    """Resolves a file's module names to (network, sdfast path) for one pipeline's networks."""

    def __init__(self, modules: Shapes, unet_config):
        self.modules = modules
        self.flat = {network: {path.replace(".", "_"): path for path in paths} for network, paths in modules.items()}
        if "unet" in modules and unet_config is not None:
            self.flat["unet"].update({k: v for k, v in _sgm_names(unet_config).items() if v in modules["unet"]})

    def kohya(self, prefix: str, name: str) -> tuple[str, str] | None:
        network = _KOHYA_NETWORKS[prefix]
        if network != "unet" and name.startswith("text_model_"):
            name = name[len("text_model_"):]
        path = self.flat.get(network, {}).get(name)
        return None if path is None else (network, path)

    def dotted(self, network: str | None, name: str) -> tuple[str, str] | None:
        if network is None:  # the oldest diffusers files: U-Net attention processors, no prefix
            network = "unet" if name.startswith(_UNET_ROOTS) else None
        if network is None:
            return None
        if network != "unet" and name.startswith("text_model."):
            name = name[len("text_model."):]
        return (network, name) if name in self.modules.get(network, {}) else None


def read(path: str | Path, modules: Shapes, unet_config=None) -> LoRA:
    """Parse the LoRA file at ``path`` for networks whose patchable weights have the shapes ``modules`` ({network:
    {module path: shape}}); ``unet_config`` (a ``UNetConfig``) places original-layout U-Net names.
    Raises ``LoRAError`` naming the keys it cannot place and the model family the file seems made for."""
    path = Path(path)
    try:
        weights = WeightFile([path])
    except CheckpointError as e:
        raise LoRAError(f"LoRA {path}: {e}") from None
    keys = weights.keys()
    if not keys:
        raise LoRAError(f"LoRA {path} holds no tensors")
    for marker, variant in _VARIANTS.items():
        hits = [k for k in keys if re.search(marker, k)]
        if hits:
            raise LoRAError(f"LoRA {path} is a {variant} file ({_first(hits, 2)}): sdfast applies LoRA and LoCon "
                            "(lora_down / lora_up, lora_A / lora_B) only; convert or merge it with its training tool")
    names = _Names(modules, unet_config)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unplaced, layouts = [], set()
    for key in keys:
        named = _PROCESSOR.sub(lambda m: "." + ("to_out.0" if m[1] == "to_out" else m[1]) + ".lora.", key)
        kohya, peft = _KOHYA.match(named), _PEFT.match(named)
        if kohya:
            target, role, layout = names.kohya(kohya[1], kohya[2]), _ROLES[kohya[3]], "kohya"
        elif peft:
            legacy = ".lora." in named or "lora_linear_layer" in named
            target, role, layout = names.dotted(peft[1], peft[2]), _ROLES[peft[3]], \
                "diffusers-legacy" if legacy else "peft"
        else:
            unplaced.append(key)
            continue
        if target is None:
            unplaced.append(key)
            continue
        layouts.add(layout)
        parts.setdefault(target, {})[role] = weights.get(key)
    if unplaced:
        raise LoRAError(f"LoRA {path}: {len(unplaced)} of {len(keys)} keys name no module of this model: "
                        f"{_first(unplaced)}{_family_hint(keys, modules)}")
    alphas, rslora = _peft_alphas(path, parts)
    patches = {target: _patch(path, target, found, modules, alphas, rslora.get(target[0], False))
               for target, found in sorted(parts.items())}
    return LoRA(path, "+".join(sorted(layouts)), patches, _caption_words(path))


def _patch(path: Path, target: tuple[str, str], found: dict[str, torch.Tensor],
           modules: Shapes, alphas: Mapping[tuple[str, str], float],
           rslora: bool) -> Patch:
    where = f"LoRA {path}, {target[0]} module {target[1]}"
    if "down" not in found or "up" not in found:
        missing = "lora_down / lora_A" if "down" not in found else "lora_up / lora_B"
        raise LoRAError(f"{where}: has no {missing} weight (a truncated or mislabelled file)")
    down, up = found["down"], found["up"]
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or up[0].numel() != \
            up.shape[1]:
        raise LoRAError(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)} do not form a rank-r update "
                        "(down (r, in[, k, k]), up (out, r[, 1, 1]))")
    alpha = found.get("alpha", alphas.get(target))
    patch = Patch(down, up, 1.0 if alpha is None else float(alpha) / (down.shape[0] ** 0.5 if rslora else
                                                                       down.shape[0]))
    shape = tuple(modules[target[0]][target[1]])
    if patch.shape != shape and patch.up.shape[0] * patch.down[0].numel() != math.prod(shape):
        raise LoRAError(f"{where}: updates a {patch.shape} weight but the model's is {shape}: "
                        f"a LoRA for another model{_family_hint([], modules)}")
    return patch


def _caption_words(path: Path) -> frozenset[str]:
    """The words of kohya's ``ss_tag_frequency`` metadata ({dataset: {tag or caption: count}}), lower-cased; none
    where the file has no such metadata or it is not that JSON."""
    if path.suffix != ".safetensors":
        return frozenset()
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("ss_tag_frequency")
    try:
        datasets = json.loads(text) if text else {}
        return frozenset(word for tags in datasets.values() for tag in tags
                         for word in re.findall(r"[a-z]+", tag.lower()))
    except (ValueError, AttributeError, TypeError):  # written by another tool in another shape: no words
        return frozenset()


def _peft_alphas(path: Path, parts) -> tuple[dict[tuple[str, str], float], dict[str, bool]]:
    """Alphas diffusers keeps outside the tensors: the safetensors metadata ``lora_adapter_metadata``, peft's
    LoraConfig per network (``unet.lora_alpha``, ``unet.alpha_pattern`` by module-name suffix, ``unet.use_rslora``:
    alpha / sqrt(rank))."""
    if path.suffix != ".safetensors":
        return {}, {}
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("lora_adapter_metadata")
    if not text:
        return {}, {}
    try:
        config = json.loads(text)
    except ValueError as e:
        raise LoRAError(f"LoRA {path}: its lora_adapter_metadata is not JSON ({e})") from None
    alphas = {}
    for network, module in parts:
        alpha = config.get(f"{network}.lora_alpha")
        for pattern, value in (config.get(f"{network}.alpha_pattern") or {}).items():
            pattern = pattern.removeprefix("text_model.")  # transformers' prefix, which sdfast's CLIP lacks
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        if alpha is not None:
            alphas[(network, module)] = float(alpha)
    rslora = {network: bool(config.get(f"{network}.use_rslora")) for network, _ in parts}
    return alphas, rslora


def _family_hint(keys, modules: Shapes) -> str:
    """What family the file seems made for, against the model's: '; it looks made for SDXL (...)'."""
    xl_file = any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys)
    model = "SDXL" if "text_encoder_2" in modules else "SD 1.x / 2.x"
    if xl_file and model != "SDXL":
        return f"; it is made for SDXL (two text encoders) but the model is {model}"
    if keys and not xl_file and model == "SDXL" and any(k.startswith(("lora_te_", "text_encoder.")) for k in keys):
        return "; it looks made for SD 1.x / 2.x (one text encoder) but the model is SDXL"
    return f" (the model is {model})"
