"""Random weights at the real SD shapes (``sdfast bench --arch sd15|sd21|sdxl``), so a benchmark needs no checkpoint.

Latency depends on shapes, not on weight values, so a random model times like the released one. Each preset is a
set of sdfast configs (``UNetConfig``, ``CLIPTextConfig``, ``VAEConfig``). ``write_random_model`` builds the three
networks with sdfast's own classes on the meta device, initialises them from a seed, and saves a diffusers folder
(configs in diffusers / transformers JSON, safetensors weights): the one path every contender then loads, sdfast's
backends through ``sdfast.load`` and the diffusers baseline through ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet, UNetConfig, VAEConfig, image_side
from ..models.layers import GroupNorm
from ..schedulers import SD_SCHEDULER_CONFIG
from ..tokenizer import write_clip_tokenizer


@dataclass(frozen=True)
class Arch:
    """One model family's shapes: the three networks' configs, the tokenizer's padding and the noise schedule."""

    unet: UNetConfig
    text_encoder: CLIPTextConfig
    vae: VAEConfig
    pad_token: str  # OpenAI CLIP (SD 1.x) pads with its end token, OpenCLIP (SD 2.x) with "!"
    prediction_type: str  # epsilon (SD 1.x, 2.x-base) or v_prediction (SD 2.x at 768 px)
    # SDXL: the second text encoder (OpenCLIP bigG, projected pooled output), whose tokenizer pads with "!" and
    # whose hidden states sit beside the first's in the context; None for SD 1.x / 2.x
    text_encoder_2: CLIPTextConfig | None = None

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def size(self) -> int:
        """The image side it was trained at, in pixels: the latent side times the VAE's factor (8 for SD)."""
        return image_side(self.unet.sample_size, len(self.vae.block_channels))


def _heads(channels: tuple[int, ...], head_dim: int) -> tuple[int, ...]:
    return tuple(c // head_dim for c in channels)


PRESETS: dict[str, Arch] = {
    # SD 1.5: U-Net 320/640/1280/1280 with 8 heads everywhere, cross-attending to CLIP ViT-L/14's 768-wide text
    # (12 layers); the KL VAE 128/256/512/512. 512 px.
    "sd15": Arch(UNetConfig(), CLIPTextConfig(), VAEConfig(), "<|endoftext|>", "epsilon"),
    # SD 2.1 (768-v): 64-wide heads, linear transformer projections, fp32 attention (its config's upcast_attention),
    # OpenCLIP ViT-H/14's text tower (1024 wide; 23 of its 24 layers, as SD 2.x uses the penultimate one). 768 px.
    "sd21": Arch(
        UNetConfig(num_heads=_heads((320, 640, 1280, 1280), 64), context_dim=1024, linear_projection=True,
                   upcast_attention=True, sample_size=96),
        CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, act="gelu"),
        VAEConfig(), "!", "v_prediction"),
    # SDXL base: U-Net 320/640/1280 with no attention at the first level, then 2 and 10 transformer blocks per
    # layer (diffusers' config says (1, 2, 10); a level without attention ignores its depth), 64-wide heads, linear
    # projections, a 2048-wide context and the "text_time" added embedding (pooled 1280 + 6 numbers x 256 = 2816);
    # CLIP ViT-L (12 layers) + OpenCLIP bigG (all 32 layers, 1280 wide, projection 1280); the SD VAE, with SDXL's
    # latent scaling. 1024 px.
    "sdxl": Arch(
        UNetConfig(block_channels=(320, 640, 1280), attention=(False, True, True), layers_per_block=(2, 2, 2),
                   transformer_depth=(1, 2, 10), num_heads=_heads((320, 640, 1280), 64), context_dim=2048,
                   linear_projection=True, sample_size=128, added_time_dim=256, added_cond_dim=2816),
        CLIPTextConfig(), VAEConfig(scaling_factor=0.13025), "<|endoftext|>", "epsilon",
        text_encoder_2=CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20,
                                      act="gelu", projection_dim=1280)),
    # A few-MB model for smoke runs on a CPU (CI, benchmarks/ with --benchmark-disable): SD's structure at toy
    # widths, still 8x latents and the real 49408-token vocabulary. 64 px.
    "tiny": Arch(
        UNetConfig(block_channels=(32, 64), attention=(True, False), layers_per_block=(1, 1),
                   transformer_depth=(1, 1), num_heads=(4, 4), context_dim=32, norm_groups=8, sample_size=8),
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
        VAEConfig(block_channels=(16, 16, 32, 32), layers_per_block=1, norm_groups=8), "<|endoftext|>", "epsilon"),
    # The same for SDXL's structure: a level without attention, a 2-deep stack, two encoders (32 + 32 wide context),
    # the added embedding (pooled 16 + 6 numbers x 8 = 64). 64 px.
    "tiny-sdxl": Arch(
        UNetConfig(block_channels=(32, 64), attention=(False, True), layers_per_block=(1, 1),
                   transformer_depth=(1, 2), num_heads=(2, 4), context_dim=64, norm_groups=8, linear_projection=True,
                   sample_size=8, added_time_dim=8, added_cond_dim=64),
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
        VAEConfig(block_channels=(16, 16, 32, 32), layers_per_block=1, norm_groups=8, scaling_factor=0.13025),
        "<|endoftext|>", "epsilon",
        text_encoder_2=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, act="gelu",
                                      projection_dim=16)),
}

# The releases' scheduler_config.json (their schedule; the method is chosen per run by name): SD 1.5 / 2.1 ship
# SD_SCHEDULER_CONFIG, SDXL the same schedule with the Euler scheduler.
SDXL_SCHEDULER = {**SD_SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                  "use_karras_sigmas": False}


def preset(name: str) -> Arch:
    if name not in PRESETS:
        raise ValueError(f"unknown --arch {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# -- sdfast configs -> the JSON that diffusers / transformers (and sdfast's loader) read: from_diffusers inverted --


def _per_level(values: tuple) -> int | list:
    """diffusers takes one value for every level or a list; write the single value when they are all equal."""
    return values[0] if len(set(values)) == 1 else list(values)


def unet_json(cfg: UNetConfig) -> dict:
    xl = {}
    if cfg.added_time_dim is not None:  # SDXL's added embedding of pooled text and micro-conditioning numbers
        xl = {"addition_embed_type": "text_time", "addition_time_embed_dim": cfg.added_time_dim,
              "projection_class_embeddings_input_dim": cfg.added_cond_dim}
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "sample_size": cfg.sample_size,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)],
        "block_out_channels": list(cfg.block_channels),
        "layers_per_block": _per_level(cfg.layers_per_block),
        "transformer_layers_per_block": _per_level(cfg.transformer_depth),
        "attention_head_dim": _per_level(cfg.num_heads),  # diffusers' legacy name: it holds the head count
        "cross_attention_dim": cfg.context_dim,
        "norm_num_groups": cfg.norm_groups, "norm_eps": cfg.norm_eps,
        "use_linear_projection": cfg.linear_projection, "upcast_attention": cfg.upcast_attention,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift, "act_fn": "silu", **xl,
    }


def vae_json(cfg: VAEConfig, sample_size: int) -> dict:
    levels = len(cfg.block_channels)
    return {
        "_class_name": "AutoencoderKL", "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(cfg.block_channels), "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_groups, "act_fn": "silu", "scaling_factor": cfg.scaling_factor,
        "force_upcast": cfg.force_upcast,
    }


def text_encoder_json(cfg: CLIPTextConfig) -> dict:
    """transformers' CLIPTextModel config, or CLIPTextModelWithProjection's for an encoder with a projection
    (SDXL's second)."""
    projected = cfg.projection_dim is not None
    return {
        "architectures": ["CLIPTextModelWithProjection" if projected else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_positions, "hidden_act": cfg.act, "layer_norm_eps": cfg.eps,
        "projection_dim": cfg.projection_dim or cfg.hidden_size,  # unused without a projection (SD 1.x / 2.x)
        "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": cfg.eos_token_id,  # as the SD releases' configs say
    }


# -- random weights --


@torch.no_grad()
def random_init(model: nn.Module, seed: int) -> nn.Module:
    """Materialise a meta-device ``model`` on the CPU with PyTorch's default initialisation (fan-in scaled, so
    activations stay in fp16's range through SD's depth), embeddings N(0, 0.02) as CLIP's, norms the identity.
    Deterministic for a seed; a parameter no rule covers is an error, never left as uninitialised memory."""
    model = model.to_empty(device="cpu")
    done: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.reset_parameters()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, (nn.LayerNorm, GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            else:
                continue
            done.update(id(p) for p in module.parameters(recurse=False))
    left = [name for name, p in model.named_parameters() if id(p) not in done]
    if left:
        raise TypeError(f"random_init has no rule for {len(left)} parameters ({', '.join(left[:5])}): add one")
    return model.eval().requires_grad_(False)


def write_random_model(folder: str | Path, arch: Arch, *, seed: int = 0, dtype=torch.float16) -> Path:
    """A diffusers folder with ``arch``'s shapes and random weights (stored in ``dtype``: fp16 halves the disk and
    the networks run in whatever dtype the benchmark loads them in). Returns the folder."""
    folder = Path(folder)
    # built and saved one at a time, so only one network is in memory at once
    specs = {
        "unet": (lambda: UNet(arch.unet), unet_json(arch.unet), "diffusion_pytorch_model.safetensors"),
        "vae": (lambda: AutoencoderKL(arch.vae), vae_json(arch.vae, arch.size), "diffusion_pytorch_model.safetensors"),
        "text_encoder": (lambda: CLIPTextModel(arch.text_encoder), text_encoder_json(arch.text_encoder),
                         "model.safetensors"),
    }
    if arch.is_xl:
        specs["text_encoder_2"] = (lambda: CLIPTextModel(arch.text_encoder_2), text_encoder_json(arch.text_encoder_2),
                                   "model.safetensors")
    for offset, (name, (build, config, weights)) in enumerate(specs.items()):
        with torch.device("meta"):
            model = build()
        model = random_init(model, seed + offset)
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        state = {_saved_key(name, k): v.to(dtype).contiguous() for k, v in model.state_dict().items()}
        save_file(state, folder / name / weights, metadata={"format": "pt"})
        del model, state
    write_clip_tokenizer(folder / "tokenizer", pad_token=arch.pad_token)
    if arch.is_xl:
        write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")  # OpenCLIP's padding
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = SDXL_SCHEDULER if arch.is_xl else SD_SCHEDULER_CONFIG
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**scheduler, "prediction_type": arch.prediction_type}, indent=2))
    (folder / "model_index.json").write_text(json.dumps(_model_index(arch), indent=2))  # last: the folder is complete
    return folder


def _saved_key(part: str, key: str) -> str:
    """transformers 5 reads CLIPTextModel's keys flat, as sdfast names them, but CLIPTextModelWithProjection's
    under ``text_model.`` beside ``text_projection``: save SDXL's second encoder the way transformers does."""
    if part == "text_encoder_2" and not key.startswith("text_projection."):
        return f"text_model.{key}"
    return key


def _model_index(arch: Arch) -> dict:
    """diffusers' model_index.json: StableDiffusionPipeline, or StableDiffusionXLPipeline with the second encoder
    and the base model's zero negative embeddings for an empty negative prompt."""
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "feature_extractor": [None, None]}
    if arch.is_xl:
        return {"_class_name": "StableDiffusionXLPipeline", **index,
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "image_encoder": [None, None], "force_zeros_for_empty_prompt": True}
    return {"_class_name": "StableDiffusionPipeline", **index, "scheduler": ["diffusers", "PNDMScheduler"],
            "safety_checker": [None, None], "requires_safety_checker": False}


def random_model(name: str, cache: str | Path, *, seed: int = 0) -> Path:
    """The folder of preset ``name``'s random model under ``cache``, written on first use (SD 1.5: ~2 GB in fp16,
    SDXL: ~7 GB, built in fp32 one network at a time: ~15 GB of host memory for its U-Net)
    and reused after, so repeated runs and the backends' export caches see the same weights."""
    arch = preset(name)
    folder = Path(cache) / f"{name}-seed{seed}"
    if (folder / "model_index.json").is_file():
        return folder
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    write_random_model(partial, arch, seed=seed)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder
