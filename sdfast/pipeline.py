"""Prompt to pixels: ``load`` a checkpoint, then ``Pipeline.generate``. The only place the stages meet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_diffusers, load_single_file
from .tokenizer import Tokenizer

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class Pipeline:
    """A loaded Stable Diffusion model: tokenizer, the three networks and the scheduler's config."""

    tokenizer: Tokenizer
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side: 8 for SD (one halving per VAE level but the last)."""
        return 2 ** (len(self.vae.config.block_channels) - 1)


def load(path, device="cpu", dtype=torch.float32) -> Pipeline:
    """Load a Stable Diffusion 1.x / 2.x checkpoint: a diffusers folder, or an original-layout single file
    (``.safetensors``; ``.ckpt`` only through ``weights_only=True``). Weights land directly in ``dtype`` on
    ``device``. Raises ``CheckpointError`` naming the problem for anything that cannot load."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    device = torch.device(device)
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a diffusers folder or a .safetensors / .ckpt file")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is a folder without model_index.json: not a diffusers pipeline folder "
                                  "(pass the folder that holds model_index.json, unet/, vae/, text_encoder/)")
        parts = load_diffusers(path, device, dtype)
    else:
        parts = load_single_file(path, device, dtype)
    return Pipeline(parts.tokenizer, parts.text_encoder, parts.unet, parts.vae, parts.scheduler_config,
                    device, dtype)
