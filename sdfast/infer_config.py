"""Configs of an original-layout (CompVis / webui / Stability "sgm") single file, inferred from its tensor shapes.

Scope: the names and shapes of a file's tensors, never its bytes. This module tells SD 1.x, 2.x, XL and the XL
refiner apart (`detect_family`) and infers diffusers/transformers-format configs from the shapes (`infer_configs`);
what the weights cannot reveal (heads, norm groups, sample sizes, the prediction type, the padding token) follows
the detected family. The key prefixes it reads are the layout's, in sdfast/layouts.py.
tests/test_layouts.py checks the configs against diffusers' single_file_utils.
"""

from __future__ import annotations

from typing import Any, Mapping

from .layouts import (CLIP_PREFIX, OPENCLIP_PREFIX, REFINER_OPENCLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX,
                      TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX)
from .schedulers import SD_SCHEDULER_CONFIG

# diffusers takes a 2.x file for v-prediction unless its global_step is this one,
# the step count of the epsilon-prediction 512-px SD 2.0-base release.
SD2_BASE_GLOBAL_STEP = 875000

Shapes = Mapping[str, tuple[int, ...]]


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


def _first_unet_attention(shapes: Shapes, prefix: str = UNET_PREFIX) -> str:
    """Prefix (without ``prefix``) of some spatial transformer of the U-Net, e.g. "middle_block.1."."""
    for key in shapes:
        if key.startswith(prefix) and key.endswith(".proj_in.weight"):
            return key[len(prefix):-len("proj_in.weight")]
    raise _unsupported(shapes, "U-Net has no cross-attention transformer (…proj_in.weight)")


def _sdxl_family(shapes: Shapes) -> tuple[str, int]:
    """ "sdxl" (CLIP ViT-L + OpenCLIP bigG) or "sdxl_refiner" (bigG alone), and the context width they make."""
    clip = SDXL_CLIP_PREFIX + "embeddings.token_embedding.weight"
    openclip = SDXL_OPENCLIP_PREFIX + "token_embedding.weight"
    refiner = REFINER_OPENCLIP_PREFIX + "token_embedding.weight"
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


def unet_config(shapes: Shapes, family: str, sample_size: int, prefix: str = UNET_PREFIX) -> dict[str, Any]:
    """The U-Net's diffusers config from the shapes of its ``prefix``* keys (a ControlNet's encoder half reads the
    same way: its file has no up blocks nor output layers, so those entries are then the mirror's / None)."""
    p = prefix
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
    attention = p + _first_unet_attention(shapes, p)
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
        "out_channels": shapes.get(p + "out.2.weight", (None,))[0],
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
    # The releases' schedule; class names as in the stable-diffusion-v1-5, stable-diffusion-2-1 and SDXL repos.
    names = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler",
             "sdxl_refiner": "EulerDiscreteScheduler"}
    return {**SD_SCHEDULER_CONFIG, "_class_name": names[family], "prediction_type": prediction_type,
            "trained_betas": None}


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
        "unet": unet_config(shapes, family, latent_size),
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
