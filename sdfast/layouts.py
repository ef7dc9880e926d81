"""The original (CompVis / webui / Stability "sgm") single-file layout of SD 1.x, 2.x and XL checkpoints.

Scope: key names and shapes of such a file, never its bytes. This module
  * tells SD 1.x, 2.x, XL and the XL refiner apart (`detect_family`) and infers diffusers/transformers-format
    configs from tensor shapes (`infer_configs`);
  * holds the one key table from that layout to sdfast's parameter names
    (`original_rules`) and the reshapes it needs (`transform`);
  * says which component a file key belongs to (`component_of`) and which keys are
    known to be unused (`is_ignored`);
  * writes the layout back from sdfast/diffusers state dicts (`to_original`).
sdfast's parameter names are the state-dict keys of diffusers' UNet2DConditionModel
and AutoencoderKL and of transformers 5's CLIPTextModel (no `text_model.` prefix).
Reading tensors, casting, and reporting missing/unexpected keys is the loader's job
(sdfast/checkpoint.py).

The file's layout comes from CompVis/stable-diffusion (ldm/modules/diffusionmodules/
openaimodel.py: U-Net, .../model.py: VAE, ldm/modules/encoders/modules.py: text) and
Stability-AI/stablediffusion (FrozenOpenCLIPEmbedder with layer="penultimate") and, for SDXL,
Stability-AI/generative-models (sgm/modules/encoders/modules.py: GeneralConditioner, whose embedders.0 is
FrozenCLIPEmbedder and embedders.1 FrozenOpenCLIPEmbedder2, the refiner's embedders.0 the latter alone; the U-Net's
label_emb is diffusers' add_embedding).
tests/test_layouts.py checks the table against diffusers' single_file_utils converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x: HF CLIP names already
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP names
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL: CLIP ViT-L, HF names
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP ViT-bigG
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."  # the SDXL refiner: OpenCLIP ViT-bigG alone

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Where each family keeps its text encoders (diffusers' names: text_encoder_2 is the projected OpenCLIP tower).
TEXT_PREFIXES = {
    "sd1": {"text_encoder": CLIP_PREFIX},
    "sd2": {"text_encoder": OPENCLIP_PREFIX},
    "sdxl": {"text_encoder": SDXL_CLIP_PREFIX, "text_encoder_2": SDXL_OPENCLIP_PREFIX},
    "sdxl_refiner": {"text_encoder_2": REFINER_OPENCLIP_PREFIX},
}

# diffusers takes a 2.x file for v-prediction unless its global_step is this one,
# the step count of the epsilon-prediction 512-px SD 2.0-base release.
SD2_BASE_GLOBAL_STEP = 875000

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Rule:
    """sdfast parameter `target` is `transform(self.transform)(file[source])`."""

    target: str
    source: str
    transform: str = "copy"


# ---- The key table: sdfast (diffusers/transformers) name <- original name. ----

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
}
_UNET_SHORTCUT = {"conv_shortcut": "skip_connection"}
# SDXL's "text_time" added embedding (an MLP like time_embed) is the original's label_emb.
_UNET_ADDED = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# diffusers kept LDM's names inside a spatial transformer, so these map to themselves.
# proj_in/proj_out are 1x1 convs in 1.x and Linear in 2.x, in both layouts alike.
_UNET_TRANSFORMER = ("norm", "proj_in", "proj_out")
_UNET_TRANSFORMER_BLOCK = (
    "norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
)
_UNET_TRANSFORMER_BLOCK_NO_BIAS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v",
)

_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_VAE_SHORTCUT = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_NORM = {"group_norm": "norm"}
# The original's mid-block attention projections are 1x1 convs; diffusers' are Linear.
_VAE_ATTENTION_PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_CLIP_LAYER = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2",
)
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",  # a bare Parameter
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# q/k/v come from the fused attn.in_proj_weight / in_proj_bias instead.
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm2": "ln_2",
}

# ---- Keys a file carries that no sdfast parameter reads. ----

# The LDM wrapper's training-time noise schedule (ddpm.py register_schedule); `logvar`
# is saved only by runs with learn_logvar=True.
_SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
})
_IGNORED_KEYS = frozenset({
    CLIP_PREFIX + "embeddings.position_ids",  # a buffer older transformers saved
    SDXL_CLIP_PREFIX + "embeddings.position_ids",
    # OpenCLIP's contrastive head: SD 2.x conditions on per-token features, not the pooled one (SDXL uses the
    # text_projection, not the logit scale).
    OPENCLIP_PREFIX + "logit_scale",
    OPENCLIP_PREFIX + "text_projection",
    SDXL_OPENCLIP_PREFIX + "logit_scale",
    REFINER_OPENCLIP_PREFIX + "logit_scale",
})
# The EMA copy of the U-Net (names with dots removed, plus decay/num_updates). Like
# diffusers' default (extract_ema=False), the non-EMA weights are the ones loaded.
_IGNORED_PREFIXES = ("model_ema.",)


def component_of(key: str) -> str | None:
    """ "unet", "vae", "text_encoder" or "text_encoder_2" for a file key under that network's prefix, else None.
    SDXL's conditioner.embedders.N.transformer.* is CLIP ViT-L (text_encoder), .model.* OpenCLIP (text_encoder_2)."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    if key.startswith("cond_stage_model."):
        return "text_encoder"
    if key.startswith("conditioner.embedders."):
        kind = key.split(".")[3:4]
        return {"transformer": "text_encoder", "model": "text_encoder_2"}.get(kind[0] if kind else "")
    return None


def is_ignored(key: str, configs: Mapping[str, Any]) -> bool:
    """True for a file key known to be unused; any other key that no rule reads is unexpected.

    `configs` is `infer_configs`' result: SD 2.x conditions on the penultimate OpenCLIP
    layer, so resblock `num_hidden_layers` of the text encoder is never run.
    """
    if key in _SCHEDULE_KEYS or key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
        return True
    if "text_encoder" not in configs:  # the SDXL refiner: OpenCLIP only, every layer used
        return False
    unused_layer = configs["text_encoder"]["num_hidden_layers"]
    return key.startswith(f"{OPENCLIP_PREFIX}transformer.resblocks.{unused_layer}.")


# ---- Detection and configs. ----


def _unsupported(shapes: Shapes, problem: str) -> ValueError:
    groups = sorted({".".join(key.split(".")[:2]) for key in shapes})
    found = ", ".join(groups[:8]) + (", ..." if len(groups) > 8 else "") if groups else "no keys"
    return ValueError(
        f"unsupported checkpoint: {problem}; found key groups: {found}. Supported: original-layout "
        f"(CompVis/webui) SD 1.x files ({UNET_PREFIX}*, {VAE_PREFIX}*, {CLIP_PREFIX}*), SD 2.x "
        f"files (text encoder under {OPENCLIP_PREFIX}*) and SDXL files (text encoders under "
        f"{SDXL_CLIP_PREFIX}* and {SDXL_OPENCLIP_PREFIX}*, the refiner's under {REFINER_OPENCLIP_PREFIX}*)"
    )


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct N over keys `prefix` + "N.…"."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _first_unet_attention(shapes: Shapes) -> str:
    """Prefix (without UNET_PREFIX) of some spatial transformer of the U-Net, e.g. "middle_block.1."."""
    for key in shapes:
        if key.startswith(UNET_PREFIX) and key.endswith(".proj_in.weight"):
            return key[len(UNET_PREFIX):-len("proj_in.weight")]
    raise _unsupported(shapes, "U-Net has no cross-attention transformer (…proj_in.weight)")


def _sdxl_family(shapes: Shapes) -> tuple[str, int]:
    """ "sdxl" (CLIP ViT-L + OpenCLIP bigG) or "sdxl_refiner" (bigG alone), and the context width they make."""
    clip = SDXL_CLIP_PREFIX + "embeddings.token_embedding.weight"
    openclip, refiner = SDXL_OPENCLIP_PREFIX + "token_embedding.weight", REFINER_OPENCLIP_PREFIX + "token_embedding.weight"
    if clip in shapes and openclip in shapes:
        family, width = "sdxl", shapes[clip][1] + shapes[openclip][1]
    elif refiner in shapes and not any(k.startswith("conditioner.embedders.1.") for k in shapes):
        family, width = "sdxl_refiner", shapes[refiner][1]
    else:
        raise _unsupported(shapes, "SDXL-style text encoders (conditioner.embedders.*) but not SDXL's pair "
                                   f"({SDXL_CLIP_PREFIX}* and {SDXL_OPENCLIP_PREFIX}*) nor the refiner's "
                                   f"({REFINER_OPENCLIP_PREFIX}* alone)")
    if UNET_PREFIX + "label_emb.0.0.weight" not in shapes:
        raise _unsupported(shapes, f"SDXL text encoders but no SDXL U-Net ({UNET_PREFIX}label_emb.*)")
    return family, width


def detect_family(shapes: Shapes) -> str:
    """ "sd1", "sd2", "sdxl" or "sdxl_refiner": which text encoders the file carries, checked against the U-Net's
    context width."""
    if UNET_PREFIX + "input_blocks.0.0.weight" not in shapes:
        raise _unsupported(shapes, f"no original-layout U-Net ({UNET_PREFIX}input_blocks.*)")
    if VAE_PREFIX + "encoder.conv_in.weight" not in shapes:
        raise _unsupported(shapes, f"no original-layout VAE ({VAE_PREFIX}encoder.*)")
    if any(key.startswith("conditioner.embedders.") for key in shapes):
        family, width = _sdxl_family(shapes)
    elif CLIP_PREFIX + "embeddings.token_embedding.weight" in shapes:
        family, width = "sd1", shapes[CLIP_PREFIX + "embeddings.token_embedding.weight"][1]
    elif OPENCLIP_PREFIX + "token_embedding.weight" in shapes:
        family, width = "sd2", shapes[OPENCLIP_PREFIX + "token_embedding.weight"][1]
    else:
        raise _unsupported(shapes, f"no text encoder ({CLIP_PREFIX}* or {OPENCLIP_PREFIX}*)")
    attention = UNET_PREFIX + _first_unet_attention(shapes)
    context = shapes[attention + "transformer_blocks.0.attn2.to_k.weight"][1]
    if context != width:  # 768 for 1.x, 1024 for 2.x, 768 + 1280 for XL, 1280 for the refiner in real files
        raise _unsupported(shapes, f"U-Net cross-attention width {context} != text encoder width {width}")
    return family


def _unet_config(shapes: Shapes, family: str, sample_size: int) -> dict[str, Any]:
    p = UNET_PREFIX
    blocks = _indices(shapes, p + "input_blocks.")
    # input_blocks: conv_in, then per level `layers` resnets (each + attention where the
    # level has it) and a downsampler except after the last level.
    downsamplers = [n for n in blocks if f"{p}input_blocks.{n}.0.op.weight" in shapes]
    per_level = downsamplers[0] if downsamplers else len(blocks)  # = layers + 1
    if len(blocks) % per_level:
        raise _unsupported(shapes, f"U-Net input_blocks 0..{blocks[-1]} do not split into levels")
    levels = len(blocks) // per_level
    firsts = [1 + i * per_level for i in range(levels)]  # first resnet of each level
    channels = [shapes[f"{p}input_blocks.{n}.0.out_layers.3.weight"][0] for n in firsts]
    down_types = [
        "CrossAttnDownBlock2D" if f"{p}input_blocks.{n}.1.proj_in.weight" in shapes else "DownBlock2D"
        for n in firsts
    ]
    up_types = [
        "CrossAttnUpBlock2D" if f"{p}output_blocks.{i * per_level}.1.proj_in.weight" in shapes else "UpBlock2D"
        for i in range(levels)
    ]
    attention = p + _first_unet_attention(shapes)
    # Transformer depth per level: one number when every transformer has the same (1.x, 2.x, the XL refiner's 4),
    # else a list as SDXL's (1, 2, 10): 1 for a level without attention, and the last entry is the middle block's
    # (diffusers builds the middle block from the last entry).
    mid_depth = len(_indices(shapes, f"{p}middle_block.1.transformer_blocks."))
    depths = [len(_indices(shapes, f"{p}input_blocks.{n}.1.transformer_blocks.")) for n in firsts]
    if len(set(depths[:-1] + [mid_depth]) - {0}) > 1:
        depth: int | list[int] = [d or 1 for d in depths[:-1]] + [mid_depth]
    else:
        depth = mid_depth
    # Heads are not in the weights. diffusers' attention_head_dim holds a head COUNT here:
    # 1.x runs 8 heads per block; 2.x and XL run 64-wide heads, i.e. channels/64 heads.
    heads = 8 if family == "sd1" else [c // 64 for c in channels]
    added = {}
    if family.startswith("sdxl"):
        # SDXL: pooled text + 256-wide embeddings of the micro-conditioning numbers (6 base, 5 refiner).
        added = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": shapes[p + "label_emb.0.0.weight"][1]}
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": shapes[p + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[p + "out.2.weight"][0],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": channels,
        "layers_per_block": per_level - 1,
        "transformer_layers_per_block": depth,
        "cross_attention_dim": shapes[attention + "transformer_blocks.0.attn2.to_k.weight"][1],
        "attention_head_dim": heads,
        "use_linear_projection": len(shapes[attention + "proj_in.weight"]) == 2,
        # Not in the weights: diffusers' SD 2.1 (768-v) config says True, against fp16 overflow
        # in attention; 1.x and 2.0 say False.
        "upcast_attention": False,
        "norm_num_groups": 32,  # not in the weights; every SD release uses 32
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        **added,
    }


def _vae_config(shapes: Shapes, sample_size: int, family: str) -> dict[str, Any]:
    p = VAE_PREFIX
    levels = _indices(shapes, p + "encoder.down.")
    # SDXL's VAE has its own latent scale and overflows in fp16 (diffusers' SDXL config: force_upcast); the
    # fp16-fixed VAE does not, but the weights cannot tell: override {"vae": {"force_upcast": False}} for it.
    xl = {"scaling_factor": 0.13025, "force_upcast": True} if family.startswith("sdxl") else {}
    return {
        "_class_name": "AutoencoderKL",
        "sample_size": sample_size,
        "in_channels": shapes[p + "encoder.conv_in.weight"][1],
        "out_channels": shapes[p + "decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [shapes[f"{p}encoder.down.{i}.block.0.conv1.weight"][0] for i in levels],
        "layers_per_block": len(_indices(shapes, p + "encoder.down.0.block.")),
        "latent_channels": shapes[p + "post_quant_conv.weight"][0],
        "norm_num_groups": 32,  # not in the weights; every SD release uses 32
        "act_fn": "silu",
        "scaling_factor": 0.18215,  # LDM's scale_factor for the SD 1.x/2.x VAE
        **xl,
    }


def _text_config(shapes: Shapes, family: str, component: str = "text_encoder") -> dict[str, Any]:
    p = TEXT_PREFIXES[family][component]
    if component == "text_encoder_2":  # SDXL's OpenCLIP bigG: every layer runs, the pooled output is projected
        vocab, width = shapes[p + "token_embedding.weight"]
        return {
            "architectures": ["CLIPTextModelWithProjection"],
            "model_type": "clip_text_model",
            "vocab_size": vocab,
            "hidden_size": width,
            "intermediate_size": shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0],
            "projection_dim": shapes[p + "text_projection"][1],  # OpenCLIP's [width, projection] matrix
            "num_hidden_layers": len(_indices(shapes, p + "transformer.resblocks.")),
            "num_attention_heads": width // 64,  # not in the weights; bigG uses 64-wide heads
            "max_position_embeddings": shapes[p + "positional_embedding"][0],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        }
    if family in ("sd1", "sdxl"):
        vocab, width = shapes[p + "embeddings.token_embedding.weight"]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        inner = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
        layers = len(_indices(shapes, p + "encoder.layers."))
        act, projection = "quick_gelu", width  # 1.x files carry no projection; ViT-L's is square
    else:
        vocab, width = shapes[p + "token_embedding.weight"]
        positions = shapes[p + "positional_embedding"][0]
        inner = shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        # SD 2.x conditions on the penultimate layer's output: the last resblock is unused.
        layers = len(_indices(shapes, p + "transformer.resblocks.")) - 1
        # text_projection is OpenCLIP's [width, projection] matrix; unused by SD (see ignore list).
        act, projection = "gelu", shapes.get(p + "text_projection", (width, width))[1]
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inner,
        "projection_dim": projection,
        "num_hidden_layers": layers,
        "num_attention_heads": width // 64,  # not in the weights; ViT-L and ViT-H text towers use 64-wide heads
        "max_position_embeddings": positions,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }


def _scheduler_config(family: str, prediction_type: str) -> dict[str, Any]:
    # The LDM configs' schedule (linear_start/linear_end, "linear" there is diffusers' scaled_linear);
    # class names as in the stable-diffusion-v1-5 and stable-diffusion-2-1 repos.
    names = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler",
             "sdxl_refiner": "EulerDiscreteScheduler"}
    return {
        "_class_name": names[family],
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }


def infer_configs(
    shapes: Shapes,
    *,
    global_step: int | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Configs "unet", "vae", "text_encoder", "scheduler" in diffusers/transformers JSON format,
    "pad_token", the tokenizer's padding token, and "family" (`detect_family`). SDXL files also
    give "text_encoder_2" and "pad_token_2" (the refiner: those and no "text_encoder"), and
    "pipeline": diffusers' model_index options force_zeros_for_empty_prompt (base: True) and
    requires_aesthetics_score (refiner: True).

    Whatever the weights reveal comes from `shapes`; the rest follows the detected family.
    Not in the weights, so taken on trust: heads, norm groups, `upcast_attention`,
    sample sizes, the prediction type and the padding token. SDXL runs at 1024 px. A 2.x file is taken as
    v-prediction at 768 px, as diffusers does, unless `global_step` (a .ckpt's top-level
    entry) is the 2.0-base one. `overrides` replaces fields per config, e.g.
    {"unet": {"upcast_attention": True}} for SD 2.1-v.
    """
    family = detect_family(shapes)
    v_prediction = family == "sd2" and global_step != SD2_BASE_GLOBAL_STEP
    latent_size = 128 if family.startswith("sdxl") else 96 if v_prediction else 64  # 1024, 768 or 512 px
    configs = {
        "unet": _unet_config(shapes, family, latent_size),
        "vae": _vae_config(shapes, latent_size * 8, family),
        **{component: _text_config(shapes, family, component) for component in TEXT_PREFIXES[family]},
        "scheduler": _scheduler_config(family, "v_prediction" if v_prediction else "epsilon"),
    }
    if family.startswith("sdxl"):
        configs["pipeline"] = {"force_zeros_for_empty_prompt": family == "sdxl",
                               "requires_aesthetics_score": family == "sdxl_refiner"}
    if not isinstance(overrides or {}, Mapping):
        raise ValueError(f"overrides must be a dict of configs, e.g. {{'unet': {{'upcast_attention': True}}}}, "
                         f"not {type(overrides).__name__}")
    for component, fields in (overrides or {}).items():
        if not isinstance(fields, Mapping):
            raise ValueError(f"overrides[{component!r}] must be a dict of config fields, not "
                             f"{type(fields).__name__} {fields!r:.60}")
        if component not in configs:
            raise ValueError(f"override for unknown config {component!r}; known: {sorted(configs)}")
        unknown = sorted(set(fields) - set(configs[component]))
        if unknown:
            raise ValueError(f"unknown {component} config fields {unknown}; known: {sorted(configs[component])}")
        configs[component].update(fields)
    # The tokenizers the releases ship: OpenAI CLIP's pads with its end token, OpenCLIP's with id 0, "!".
    configs["pad_token"] = "<|endoftext|>" if family in ("sd1", "sdxl") else "!"
    if family.startswith("sdxl"):
        configs["pad_token_2"] = "!"
    configs["family"] = family
    return configs


# ---- Rules. Sources are built without the component prefix, which original_rules adds. ----


def _weight_bias(target: str, source: str) -> list[Rule]:
    return [Rule(f"{target}.weight", f"{source}.weight"), Rule(f"{target}.bias", f"{source}.bias")]


def _renamed(target: str, source: str, table: Mapping[str, str]) -> list[Rule]:
    return [r for ours, theirs in table.items() for r in _weight_bias(f"{target}.{ours}", f"{source}.{theirs}")]


def _unet_resnet(target: str, source: str, shortcut: bool) -> list[Rule]:
    return _renamed(target, source, {**_UNET_RESNET, **(_UNET_SHORTCUT if shortcut else {})})


def _unet_transformer(target: str, source: str, depth: int) -> list[Rule]:
    rules = [r for name in _UNET_TRANSFORMER for r in _weight_bias(f"{target}.{name}", f"{source}.{name}")]
    for k in range(depth):
        block = f"transformer_blocks.{k}"
        for name in _UNET_TRANSFORMER_BLOCK:
            rules += _weight_bias(f"{target}.{block}.{name}", f"{source}.{block}.{name}")
        rules += [
            Rule(f"{target}.{block}.{name}.weight", f"{source}.{block}.{name}.weight")
            for name in _UNET_TRANSFORMER_BLOCK_NO_BIAS
        ]
    return rules


def _unet_rules(config: Mapping[str, Any]) -> list[Rule]:
    channels = config["block_out_channels"]
    layers = config["layers_per_block"]
    depth = config["transformer_layers_per_block"]
    last = len(channels) - 1
    depths = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(channels)  # per level, top down
    rules = [r for ours, theirs in _UNET_TOP.items() for r in _weight_bias(ours, theirs)]
    if config.get("addition_embed_type") == "text_time":
        rules += [r for ours, theirs in _UNET_ADDED.items() for r in _weight_bias(ours, theirs)]
    n = 1  # input_blocks.0 is conv_in
    for i, block_type in enumerate(config["down_block_types"]):
        for j in range(layers):
            c_in = channels[max(i - 1, 0)] if j == 0 else channels[i]
            rules += _unet_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", c_in != channels[i])
            if block_type == "CrossAttnDownBlock2D":
                rules += _unet_transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", depths[i])
            n += 1
        if i < last:
            rules += _weight_bias(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
            n += 1
    rules += _unet_resnet("mid_block.resnets.0", "middle_block.0", False)
    rules += _unet_transformer("mid_block.attentions.0", "middle_block.1", depths[-1])
    rules += _unet_resnet("mid_block.resnets.1", "middle_block.2", False)
    n = 0
    for i, block_type in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            # Inputs are concatenated with a skip connection, so channels always change.
            rules += _unet_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", True)
            upsampler = f"output_blocks.{n}.1.conv"
            if block_type == "CrossAttnUpBlock2D":
                rules += _unet_transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1",
                                           depths[last - i])
                upsampler = f"output_blocks.{n}.2.conv"
            if j == layers and i < last:
                rules += _weight_bias(f"up_blocks.{i}.upsamplers.0.conv", upsampler)
            n += 1
    return rules


def _vae_resnet(target: str, source: str, shortcut: bool) -> list[Rule]:
    return _renamed(target, source, {**_VAE_RESNET, **(_VAE_SHORTCUT if shortcut else {})})


def _vae_mid(part: str) -> list[Rule]:
    rules = _vae_resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", False)
    target, source = f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1"
    rules += _renamed(target, source, _VAE_ATTENTION_NORM)
    for ours, theirs in _VAE_ATTENTION_PROJ.items():
        rules.append(Rule(f"{target}.{ours}.weight", f"{source}.{theirs}.weight", "conv_to_linear"))
        rules.append(Rule(f"{target}.{ours}.bias", f"{source}.{theirs}.bias"))
    return rules + _vae_resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", False)


def _vae_rules(config: Mapping[str, Any]) -> list[Rule]:
    channels = config["block_out_channels"]
    layers = config["layers_per_block"]
    last = len(channels) - 1
    rules = [r for ours, theirs in _VAE_TOP.items() for r in _weight_bias(ours, theirs)]
    for i in range(last + 1):
        for j in range(layers):
            c_in = channels[max(i - 1, 0)] if j == 0 else channels[i]
            rules += _vae_resnet(
                f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", c_in != channels[i]
            )
        if i < last:
            rules += _weight_bias(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
    rules += _vae_mid("encoder")
    # diffusers counts decoder up_blocks from the bottleneck; the original's up.N from the image.
    reversed_channels = channels[::-1]
    for i in range(last + 1):
        source = f"decoder.up.{last - i}"
        for j in range(layers + 1):
            c_in = reversed_channels[max(i - 1, 0)] if j == 0 else reversed_channels[i]
            rules += _vae_resnet(
                f"decoder.up_blocks.{i}.resnets.{j}", f"{source}.block.{j}", c_in != reversed_channels[i]
            )
        if i < last:
            rules += _weight_bias(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"{source}.upsample.conv")
    return rules + _vae_mid("decoder")


def _is_openclip(config: Mapping[str, Any]) -> bool:
    """Whether a text encoder's weights are stored in OpenCLIP's layout (SD 2.x) or HF CLIP's (SD 1.x).

    A CLIPTextConfig does not name its layout, but its activation tells the two towers SD
    uses apart: OpenAI's ViT-L (1.x) runs quick_gelu, OpenCLIP's ViT-H (2.x) gelu.
    """
    act = config["hidden_act"]
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"text encoder hidden_act={act!r}: neither SD 1.x (quick_gelu) nor SD 2.x (gelu)")
    return act == "gelu"


def _text_rules(config: Mapping[str, Any]) -> list[Rule]:
    layers = config["num_hidden_layers"]
    if not _is_openclip(config):  # same names, only the prefix differs
        names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
        names += [f"encoder.layers.{n}.{m}.{wb}" for n in range(layers) for m in _CLIP_LAYER
                  for wb in ("weight", "bias")]
        names += ["final_layer_norm.weight", "final_layer_norm.bias"]
        return [Rule(name, name) for name in names]
    rules = [Rule(ours, theirs) for ours, theirs in _OPENCLIP_TOP.items()]
    for n in range(layers):
        target, source = f"encoder.layers.{n}", f"transformer.resblocks.{n}"
        for wb in ("weight", "bias"):
            rules += [Rule(f"{target}.self_attn.{x}_proj.{wb}", f"{source}.attn.in_proj_{wb}", x) for x in "qkv"]
        rules += _renamed(target, source, _OPENCLIP_LAYER)
    return rules


def _text_family(component: str, config: Mapping[str, Any], family: str | None) -> str:
    """The family whose key prefix a text encoder uses: given, or (1.x / 2.x) told by the activation, and SDXL's
    for text_encoder_2."""
    if family is None:
        family = "sdxl" if component == "text_encoder_2" else "sd2" if _is_openclip(config) else "sd1"
    if component not in TEXT_PREFIXES[family]:
        raise ValueError(f"a {family} file has no {component}; it has {sorted(TEXT_PREFIXES[family])}")
    return family


def original_rules(component: str, config: Mapping[str, Any], family: str | None = None) -> list[Rule]:
    """Every parameter of `component` built from `config`, exactly once, with its file key.

    `config` is the component's diffusers/transformers config (as from `infer_configs`); `family` (as from
    `detect_family`) places the text encoders, which SDXL keeps under other prefixes than 1.x / 2.x.
    """
    if component == "unet":
        prefix, rules = UNET_PREFIX, _unet_rules(config)
    elif component == "vae":
        prefix, rules = VAE_PREFIX, _vae_rules(config)
    elif component in ("text_encoder", "text_encoder_2"):
        prefix = TEXT_PREFIXES[_text_family(component, config, family)][component]
        rules = _text_rules(config)
        if component == "text_encoder_2":  # SDXL's pooled output goes through OpenCLIP's projection
            rules.append(Rule("text_projection.weight", "text_projection", "text_projection"))
    else:
        raise ValueError(f"unknown component {component!r}; supported: {COMPONENTS}")
    return [Rule(r.target, prefix + r.source, r.transform) for r in rules]


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _qkv(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def third(tensor: torch.Tensor) -> torch.Tensor:
        # nn.MultiheadAttention stacks [q; k; v]: in_proj_weight [3W, W], in_proj_bias [3W].
        # clone: each projection owns its storage rather than viewing the fused tensor.
        return tensor.chunk(3, dim=0)[index].clone()

    return third


def _conv_to_linear(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], tensor.shape[1])  # [O, I, 1, 1] -> [O, I]; fails on k > 1


def _text_projection(tensor: torch.Tensor) -> torch.Tensor:
    # OpenCLIP applies x @ text_projection with a [width, projection] matrix; nn.Linear holds [projection, width].
    return tensor.t().contiguous()


_TRANSFORMS = {"copy": _copy, "q": _qkv(0), "k": _qkv(1), "v": _qkv(2), "conv_to_linear": _conv_to_linear,
               "text_projection": _text_projection}


def transform(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function taking a file tensor to the sdfast parameter, for a Rule's `transform`."""
    if name not in _TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; known: {sorted(_TRANSFORMS)}")
    return _TRANSFORMS[name]


def to_original(
    component: str, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], family: str | None = None
) -> dict[str, torch.Tensor]:
    """Original-layout tensors (prefixed file keys) from a sdfast/diffusers `state_dict`: the inverse of the rules.

    For 2.x's text encoder the file also gets the resblock after the last used one: real
    files carry it (OpenCLIP's 24 layers, SD reads the 23rd), and `infer_configs` counts
    layers from it. It is taken from `state_dict` when that holds it (encoder.layers.{n},
    e.g. a whole OpenCLIP tower), else written as zeros; it is never run. SDXL runs every
    layer of its OpenCLIP tower, so its files hold no such extra layer.
    """
    if component == "text_encoder" and _text_family(component, config, family) == "sd2":
        n = config["num_hidden_layers"]
        config = {**config, "num_hidden_layers": n + 1}
        zeros = {
            key.replace("encoder.layers.0.", f"encoder.layers.{n}.", 1): torch.zeros_like(value)
            for key, value in state_dict.items()
            if key.startswith("encoder.layers.0.")
        }
        state_dict = {**zeros, **state_dict}
    rules = original_rules(component, config, family)
    targets = {r.target for r in rules}
    missing, extra = sorted(targets - state_dict.keys()), sorted(state_dict.keys() - targets)
    if missing or extra:
        raise ValueError(
            f"{component} state dict does not match its config: missing={missing[:5]} unexpected={extra[:5]}"
        )
    fused: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for r in rules:
        tensor = state_dict[r.target]
        if r.transform in ("q", "k", "v"):
            fused.setdefault(r.source, {})[r.transform] = tensor
        elif r.transform == "conv_to_linear":
            out[r.source] = tensor.reshape(*tensor.shape, 1, 1)  # [O, I] -> [O, I, 1, 1]
        elif r.transform == "text_projection":
            out[r.source] = tensor.t().contiguous()  # [projection, width] -> OpenCLIP's [width, projection]
        else:
            out[r.source] = tensor
    for source, parts in fused.items():
        out[source] = torch.cat([parts["q"], parts["k"], parts["v"]])  # [3W, ...]
    return out


# -- The diffusers folder layout ---------------------------------------------------------------------------------
# sdfast's parameter names are diffusers' / transformers' own keys, so this layout needs only three exceptions.

# diffusers < 0.14 named the VAE mid-block attention query/key/value/proj_attn (as 1x1 convs in even older
# files); such folders are still common (e.g. the SD 1.5 release).
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_rules(component: str, keys: Iterable[str]) -> list[Rule]:
    """Rules for a diffusers component folder's keys; keys we do not know map to themselves (and so are reported
    as unexpected by the loader)."""
    rules = []
    for key in keys:
        name, how = key, "copy"
        if component in ("text_encoder", "text_encoder_2"):
            name = key.removeprefix("text_model.")  # transformers < 5 nests the model; transformers 5 does not
            if name == "embeddings.position_ids":  # a constant arange buffer saved by older transformers
                continue
        if component == "vae" and ".attentions." in name:
            for old, new in LEGACY_VAE_ATTENTION.items():
                if f".{old}." in name:
                    name = name.replace(f".{old}.", f".{new}.")
                    how = "conv_to_linear" if name.endswith(".weight") else "copy"
        rules.append(Rule(name, key, how))
    return rules
