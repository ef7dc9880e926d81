"""Random LoRAs for the tiny reference models, written in each layout people publish (the readers' inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# Modules a LoRA trainer targets: attention, projections, feed-forward; the LoCon set adds the resnet convolutions.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def targets(net: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """The Linear / Conv2d modules of a diffusers or transformers network whose path ends with one of ``names``."""
    return {path: m for path, m in net.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and path.endswith(tuple("." + n for n in names))}


def random_lora(modules: dict[str, nn.Module], rank: int, seed: int, locon: bool = False
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{path: (down, up)}: down (r, in[, k, k]) as the module's kernel (LoCon) or 1x1, up (out, r[, 1, 1]).
    Sized so that the update is a visible fraction of the weight."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for path, m in modules.items():
        w = m.weight
        if w.dim() == 4:
            kernel = w.shape[2:] if locon else (1, 1)
            if not locon and tuple(w.shape[2:]) != (1, 1):
                continue
            down = torch.randn(rank, w.shape[1], *kernel, generator=g) / (w.shape[1] * kernel[0] * kernel[1]) ** 0.5
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3 / rank ** 0.5
        else:
            down = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3 / rank ** 0.5
        lora[path] = (down, up)
    return lora


def write_kohya(path: Path, parts: dict[str, dict], alpha: float) -> Path:
    """``parts``: {kohya prefix ("lora_unet", "lora_te", "lora_te1", ...): {module path: (down, up)}}, text paths
    with transformers' ``text_model.`` prefix."""
    tensors = {}
    for prefix, lora in parts.items():
        for module, (down, up) in lora.items():
            name = f"{prefix}_{module.replace('.', '_')}"
            tensors[f"{name}.lora_down.weight"] = down.contiguous()
            tensors[f"{name}.lora_up.weight"] = up.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def write_peft(path: Path, parts: dict[str, dict], alpha: float | None) -> Path:
    """diffusers' ``save_lora_weights`` layout: ``unet.<path>.lora_A.weight``; the alpha in the metadata."""
    tensors, metadata = {}, {}
    for network, lora in parts.items():
        for module, (down, up) in lora.items():
            tensors[f"{network}.{module}.lora_A.weight"] = down.contiguous()
            tensors[f"{network}.{module}.lora_B.weight"] = up.contiguous()
        if alpha is not None:
            rank = next(iter(lora.values()))[0].shape[0]
            metadata.update({f"{network}.r": rank, f"{network}.lora_alpha": alpha,
                             f"{network}.target_modules": sorted(lora)})  # peft's LoraConfig needs them
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)} if metadata else None)
    return path


def write_legacy(path: Path, parts: dict[str, dict]) -> Path:
    """diffusers' older layout: U-Net attention processors (``attn1.processor.to_q_lora.down.weight``), other U-Net
    modules as ``<path>.lora.down.weight``, text modules as ``<path>.lora_linear_layer.down.weight``."""
    tensors = {}
    for network, lora in parts.items():
        for module, (down, up) in lora.items():
            head, _, last = module.rpartition(".")
            if network == "unet" and module.split(".")[-2:] in (["to_out", "0"],) :
                key = f"unet.{module[:-len('.to_out.0')]}.processor.to_out_lora"
            elif network == "unet" and last in ("to_q", "to_k", "to_v"):
                key = f"unet.{head}.processor.{last}_lora"
            elif network == "unet":
                key = f"unet.{module}.lora"
            else:
                key = f"{network}.{module}.lora_linear_layer"
            tensors[f"{key}.down.weight"] = down.contiguous()
            tensors[f"{key}.up.weight"] = up.contiguous()
    save_file(tensors, str(path))
    return path
