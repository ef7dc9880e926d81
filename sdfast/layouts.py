"""The key tables: how a checkpoint's tensor names map to sdfast's parameter names, per layout.

Scope: key names and the reshapes between layouts, never a file's bytes nor its configs. This module
  * holds the one key table from the original (CompVis / webui / Stability "sgm") single-file layout of SD 1.x,
    2.x and XL to sdfast's parameter names (`original_rules`) and the reshapes it needs (`transform`);
  * says which component a file key belongs to (`component_of`) and which keys are
    known to be unused (`is_ignored`);
  * maps a diffusers folder's keys, which are sdfast's own but for a few legacy names (`diffusers_rules`).
sdfast's parameter names are the state-dict keys of diffusers' UNet2DConditionModel
and AutoencoderKL and of transformers 5's CLIPTextModel (no `text_model.` prefix).
The configs of an original file (the family, the networks' sizes) are inferred from its tensor shapes in
sdfast/infer_config.py. Reading tensors, casting, and reporting missing/unexpected keys is the loader's job
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

    `configs` is `infer_config.infer_configs`' result: SD 2.x conditions on the penultimate OpenCLIP
    layer, so resblock `num_hidden_layers` of the text encoder is never run.
    """
    if key in _SCHEDULE_KEYS or key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
        return True
    if "text_encoder" not in configs:  # the SDXL refiner: OpenCLIP only, every layer used
        return False
    unused_layer = configs["text_encoder"]["num_hidden_layers"]
    return key.startswith(f"{OPENCLIP_PREFIX}transformer.resblocks.{unused_layer}.")


# ---- Rules. Sources are built without the component prefix, which original_rules adds. ----


def weight_bias(target: str, source: str) -> list[Rule]:
    return [Rule(f"{target}.weight", f"{source}.weight"), Rule(f"{target}.bias", f"{source}.bias")]


def _renamed(target: str, source: str, table: Mapping[str, str]) -> list[Rule]:
    return [r for ours, theirs in table.items() for r in weight_bias(f"{target}.{ours}", f"{source}.{theirs}")]


def _unet_resnet(target: str, source: str, shortcut: bool) -> list[Rule]:
    return _renamed(target, source, {**_UNET_RESNET, **(_UNET_SHORTCUT if shortcut else {})})


def _unet_transformer(target: str, source: str, depth: int) -> list[Rule]:
    rules = [r for name in _UNET_TRANSFORMER for r in weight_bias(f"{target}.{name}", f"{source}.{name}")]
    for k in range(depth):
        block = f"transformer_blocks.{k}"
        for name in _UNET_TRANSFORMER_BLOCK:
            rules += weight_bias(f"{target}.{block}.{name}", f"{source}.{block}.{name}")
        rules += [
            Rule(f"{target}.{block}.{name}.weight", f"{source}.{block}.{name}.weight")
            for name in _UNET_TRANSFORMER_BLOCK_NO_BIAS
        ]
    return rules


def unet_rules(config: Mapping[str, Any]) -> list[Rule]:
    channels = config["block_out_channels"]
    layers = config["layers_per_block"]
    depth = config["transformer_layers_per_block"]
    last = len(channels) - 1
    depths = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(channels)  # per level, top down
    rules = [r for ours, theirs in _UNET_TOP.items() for r in weight_bias(ours, theirs)]
    if config.get("addition_embed_type") == "text_time":
        rules += [r for ours, theirs in _UNET_ADDED.items() for r in weight_bias(ours, theirs)]
    n = 1  # input_blocks.0 is conv_in
    for i, block_type in enumerate(config["down_block_types"]):
        for j in range(layers):
            c_in = channels[max(i - 1, 0)] if j == 0 else channels[i]
            rules += _unet_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", c_in != channels[i])
            if block_type == "CrossAttnDownBlock2D":
                rules += _unet_transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", depths[i])
            n += 1
        if i < last:
            rules += weight_bias(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
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
                rules += weight_bias(f"up_blocks.{i}.upsamplers.0.conv", upsampler)
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
    rules = [r for ours, theirs in _VAE_TOP.items() for r in weight_bias(ours, theirs)]
    for i in range(last + 1):
        for j in range(layers):
            c_in = channels[max(i - 1, 0)] if j == 0 else channels[i]
            rules += _vae_resnet(
                f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", c_in != channels[i]
            )
        if i < last:
            rules += weight_bias(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
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
            rules += weight_bias(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"{source}.upsample.conv")
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


def text_family(component: str, config: Mapping[str, Any], family: str | None) -> str:
    """The family whose key prefix a text encoder uses: given, or (1.x / 2.x) told by the activation, and SDXL's
    for text_encoder_2."""
    if family is None:
        family = "sdxl" if component == "text_encoder_2" else "sd2" if _is_openclip(config) else "sd1"
    if component not in TEXT_PREFIXES[family]:
        raise ValueError(f"a {family} file has no {component}; it has {sorted(TEXT_PREFIXES[family])}")
    return family


def original_rules(component: str, config: Mapping[str, Any], family: str | None = None) -> list[Rule]:
    """Every parameter of `component` built from `config`, exactly once, with its file key.

    `config` is the component's diffusers/transformers config (as from `infer_config.infer_configs`); `family`
    (as from `infer_config.detect_family`) places the text encoders, which SDXL keeps under other prefixes than
    1.x / 2.x.
    """
    if component == "unet":
        prefix, rules = UNET_PREFIX, unet_rules(config)
    elif component == "vae":
        prefix, rules = VAE_PREFIX, _vae_rules(config)
    elif component in ("text_encoder", "text_encoder_2"):
        prefix = TEXT_PREFIXES[text_family(component, config, family)][component]
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
