"""What an ONNX export holds: one graph per network, each a thin module around the torch network with named,
dynamically sized inputs (``GraphSpec``), in fp32 or fp16 (``dtype_name``). ``sdfast.export.onnx`` exports and
saves them, ``sdfast.export.check`` checks them against the torch model.

The graphs and their signatures (what the ``onnxruntime`` and ``tensorrt`` backends call):

| file | inputs | outputs |
|---|---|---|
| ``text_encoder.onnx`` | ``input_ids`` (B, 77) int64 | ``hidden_states`` (B, L, 77, C): every layer through the final LayerNorm, ``pooled`` (B, P) |
| ``unet.onnx`` | ``sample`` (B, 4, h, w), ``timestep`` (B,) fp32, ``context`` (B, 77*K, C) | ``noise`` (B, 4, h, w) |
| ``vae_decoder.onnx`` | ``latent`` (B, 4, h, w), scaled | ``image`` (B, 3, 8h, 8w) |
| ``vae_encoder.onnx`` | ``image`` (B, 3, H, W) | ``mean``, ``logvar`` (B, 4, H/8, W/8): the posterior, unscaled |

SDXL adds ``text_encoder_2.onnx`` (OpenCLIP bigG: the same signature, ``pooled`` its projection) and two U-Net
inputs, ``text_embeds`` (B, 1280) and ``time_ids`` (B, 6) fp32 (the refiner: 5); both text encoders' hidden states
are then raw (SDXL reads them without the final LayerNorm; the manifest's ``text_final_norm`` says which), and the
refiner has no ``text_encoder.onnx``. An fp16 SDXL export keeps its VAE graphs in fp32 where the VAE's config says
``force_upcast`` (SDXL's VAE overflows in fp16), as the torch pipeline decodes it (``VAEConfig.compute_dtype``).
Batch, sizes and the context length are dynamic axes.

ControlNets (``sdfast export --controlnet PATH``, or loaded into a pipeline exported on the fly) add two kinds:

| file | inputs | outputs |
|---|---|---|
| ``controlnet_NAME.onnx`` | the U-Net's inputs (``sample``, ``timestep``, ``context``; SDXL: ``text_embeds``, ``time_ids``), ``image`` (B, 3, 8h, 8w) in [0, 1] | ``down_0`` .. ``down_N`` (one per U-Net skip, top to bottom), ``mid``: the residuals, unscaled |
| ``unet_control.onnx`` | the U-Net's inputs, then ``down_0`` .. ``down_N`` and ``mid`` | ``noise`` |

The conditioning scale multiplies the residuals outside the graph (a new scale needs no export), where several
ControlNets' residuals are summed too (``sdfast.sampler.Conditioning``). A residual ``down_i`` has the channels of
the U-Net's skip ``i`` at its level's size, ``ceil(h / 2**level)`` (``skip_shapes``); ``mid`` the deepest level's.
``unet_control.onnx`` is a second copy of the U-Net's weights, so it is written only when ControlNets are asked for.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ExportError

# every network an export may hold: SD 1.x / 2.x have all but text_encoder_2, SDXL all five, its refiner all but
# text_encoder (``pipeline_networks``)
NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder: nn.Module, final_norm: bool = True):
        super().__init__()
        self.text_encoder, self.final_norm = text_encoder, final_norm

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder.all_layers(input_ids, self.final_norm)  # (B, L, 77, C), (B, P)


class UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        # SDXL's two extra inputs; an SD 1.x / 2.x graph is exported with the first three only
        return self.unet(sample, timestep, context, text_embeds=text_embeds, time_ids=time_ids)


class ControlledUNetGraph(nn.Module):
    """The U-Net with a ControlNet's residuals added to its skips and middle block: inputs as ``UNetGraph``'s, then
    ``down_0`` .. ``down_N`` and ``mid``."""

    def __init__(self, unet: nn.Module, xl: bool):
        super().__init__()
        self.unet, self.xl = unet, xl

    def forward(self, sample, timestep, context, *rest) -> torch.Tensor:
        added, rest = (rest[:2], rest[2:]) if self.xl else ((None, None), rest)
        return self.unet(sample, timestep, context, *added, down_residuals=rest[:-1], mid_residual=rest[-1])


class ControlNetGraph(nn.Module):
    """A ControlNet's residuals, unscaled: inputs as ``UNetGraph``'s plus ``image`` (before SDXL's two)."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, context, image, text_embeds=None, time_ids=None) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(sample, timestep, context, image, 1.0, text_embeds, time_ids)
        return (*down, mid)


class VAEDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent)


class VAEEncoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.posterior(image)


@dataclass
class GraphSpec:
    """One network's graph: its module, named example inputs with their dynamic axes, its output names, and the
    dtype it computes in (the export's, or fp32 for an upcast VAE)."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, str]]  # input name -> {axis: name}
    outputs: tuple[str, ...]
    dtype: torch.dtype = torch.float32

    def example(self, batch: int, latent: tuple[int, int], tokens: int, seed: int) -> dict[str, torch.Tensor]:
        """Inputs like the export example at another batch, latent size (h, w) and context length."""
        g = torch.Generator().manual_seed(seed)
        sizes = {"batch": batch, "height": latent[0], "width": latent[1], "tokens": tokens,
                 "image_height": 8 * latent[0], "image_width": 8 * latent[1]}
        for level in range(1, 8):  # the residuals' sizes, level by level (``skip_shapes``)
            sizes[f"height_{level}"], sizes[f"width_{level}"] = (-(-side // 2**level) for side in latent)
        out = {}
        for name, t in self.inputs.items():
            shape = list(t.shape)
            for axis, axis_name in self.dynamic[name].items():
                shape[axis] = sizes[axis_name]
            if t.dtype == torch.int64:  # token ids: reuse the example's real prompts, which hold an eos each
                out[name] = t[torch.arange(batch) % t.shape[0]]
            elif name == "timestep":
                out[name] = torch.rand(shape, generator=g) * 999
            elif name == "time_ids":  # SDXL's sizes and crop offsets (or aesthetic score), in pixels
                out[name] = torch.randint(0, 1025, shape, generator=g).float()
            else:
                out[name] = torch.randn(shape, generator=g).to(t.dtype)
        return out


def pipeline_networks(pipe) -> tuple[str, ...]:
    """The networks a loaded pipeline exports: SD's four, SDXL's five, the SDXL refiner's four (no first encoder)."""
    return tuple(n for n in NETWORKS if not n.startswith("text_encoder") or getattr(pipe, n) is not None)


def text_final_norm(pipe) -> bool:
    """Whether the text-encoder graphs hold hidden states through the final LayerNorm (SD 1.x / 2.x's CLIP skip)
    or raw (SDXL, which conditions on a raw penultimate state)."""
    return not pipe.is_xl


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32" or "fp16": a graph's dtype as the manifest, the check's tolerances and the export cache name it."""
    names = {torch.float32: "fp32", torch.float16: "fp16"}
    if dtype not in names:
        raise ExportError(f"ONNX export supports fp32 and fp16, not {dtype}: load the model with dtype='fp16' "
                          "or 'fp32'")
    return names[dtype]


def skip_shapes(unet: dict) -> list[tuple[int, int]]:
    """(channels, level) of each U-Net skip, top to bottom, from its config (``dataclasses.asdict(UNetConfig)``):
    the shapes of a ControlNet's ``down_i`` residuals, (B, channels, ceil(h / 2**level), ceil(w / 2**level)); the
    input convolution's, then per level its blocks' and its downsampler's (at the next level)."""
    ch, levels = unet["block_channels"], len(unet["block_channels"])
    shapes = [(ch[0], 0)]
    for i, c in enumerate(ch):
        shapes += [(c, i)] * unet["layers_per_block"][i] + ([(c, i + 1)] if i < levels - 1 else [])
    return shapes


def residual_names(unet: dict) -> list[str]:
    """The residual inputs and outputs: ``down_0`` .. ``down_N``, ``mid``."""
    return [f"down_{i}" for i in range(len(skip_shapes(unet)))] + ["mid"]


def _unet_inputs(pipe, latent: int, g: torch.Generator) -> tuple[dict, dict]:
    """The U-Net's example inputs at batch 2 and their dynamic axes (SDXL: with ``text_embeds`` and ``time_ids``)."""
    dtype, unet = pipe.dtype, pipe.unet.config
    tokens = (pipe.text_encoder or pipe.text_encoder_2).config.max_positions
    unet_inputs = {"sample": torch.randn(2, unet.in_channels, latent, latent, generator=g).to(dtype),
                   "timestep": torch.tensor([999.0, 500.0]),  # fp32 in every dtype: the embedding is fp32 maths
                   "context": torch.randn(2, tokens, unet.context_dim, generator=g).to(dtype)}
    unet_axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                 "context": {0: "batch", 1: "tokens"}}
    if pipe.is_xl:  # pooled text (B, P) in the model's dtype; micro-conditioning numbers (B, 6 or 5) in fp32
        pooled = pipe.text_encoder_2.config.projection_dim
        numbers = (unet.added_cond_dim - pooled) // unet.added_time_dim
        unet_inputs["text_embeds"] = torch.randn(2, pooled, generator=g).to(dtype)
        unet_inputs["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024][:numbers]] * 2)
        unet_axes.update(text_embeds={0: "batch"}, time_ids={0: "batch"})
    return unet_inputs, unet_axes


def _residuals(pipe, latent: int, g: torch.Generator) -> tuple[dict, dict]:
    """Example residuals for the controlled U-Net at batch 2 and their dynamic axes (``skip_shapes``)."""
    config = dataclasses.asdict(pipe.unet.config)
    levels = [*skip_shapes(config), (config["block_channels"][-1], len(config["block_channels"]) - 1)]
    inputs, axes = {}, {}
    for name, (channels, level) in zip(residual_names(config), levels):
        side = -(-latent // 2**level)
        inputs[name] = torch.randn(2, channels, side, side, generator=g).to(pipe.dtype)
        axes[name] = {0: "batch", 2: f"height_{level}" if level else "height", 3: f"width_{level}" if level else "width"}
    return inputs, axes


def controlled_unet_spec(pipe, latent: int = 16) -> GraphSpec:
    """``unet_control``: the U-Net taking a ControlNet's residuals (``ControlledUNetGraph``)."""
    g = torch.Generator().manual_seed(0)
    inputs, axes = _unet_inputs(pipe, latent, g)
    residuals, residual_axes = _residuals(pipe, latent, g)
    return GraphSpec("unet_control", ControlledUNetGraph(pipe.unet, pipe.is_xl), {**inputs, **residuals},
                     {**axes, **residual_axes}, ("noise",), pipe.dtype)


def controlnet_spec(pipe, controlnet: nn.Module, name: str, latent: int = 16) -> GraphSpec:
    """``controlnet_NAME``: ``controlnet`` (on the CPU, in the pipeline's dtype) as a graph of its residuals."""
    g = torch.Generator().manual_seed(0)
    inputs, axes = _unet_inputs(pipe, latent, g)
    image = (torch.rand(2, controlnet.config.conditioning_channels, 8 * latent, 8 * latent, generator=g)
             .to(pipe.dtype))
    inputs = {"sample": inputs.pop("sample"), "timestep": inputs.pop("timestep"), "context": inputs.pop("context"),
              "image": image, **inputs}
    axes["image"] = {0: "batch", 2: "image_height", 3: "image_width"}
    outputs = tuple(residual_names(dataclasses.asdict(pipe.unet.config)))
    return GraphSpec(f"controlnet_{name}", ControlNetGraph(controlnet), inputs, axes, outputs, pipe.dtype)


def graph_specs(pipe, latent: int = 16) -> list[GraphSpec]:
    """The graphs of a loaded torch ``Pipeline`` (``pipeline_networks``), with example inputs at batch 2 and a
    ``latent`` x ``latent`` latent. The default 16 keeps the U-Net's deepest level above 1x1 for SD's three
    halvings, so torch.export sees no size-1 axis it would specialise on."""
    dtype = pipe.dtype
    g = torch.Generator().manual_seed(0)
    vae = pipe.vae.config
    image = 8 * latent
    specs = []
    for name, tokenizer, encoder in (("text_encoder", pipe.tokenizer, pipe.text_encoder),
                                     ("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2)):
        if encoder is None:
            continue
        ids = tokenizer.encode(["a photograph of an astronaut riding a horse", "a red circle"])[:, 0]  # (2, 77)
        specs.append(GraphSpec(name, TextEncoderGraph(encoder, text_final_norm(pipe)), {"input_ids": ids},
                               {"input_ids": {0: "batch"}}, ("hidden_states", "pooled"), dtype))
    unet_inputs, unet_axes = _unet_inputs(pipe, latent, g)
    specs.append(GraphSpec("unet", UNetGraph(pipe.unet), unet_inputs, unet_axes, ("noise",), dtype))
    vae_net, vae_dtype = pipe.vae, vae.compute_dtype(dtype, pipe.is_xl)
    if vae_dtype != dtype:  # an fp32 copy for the export only (~0.3 GB for SD's VAE); the pipeline keeps its own
        vae_net = copy.deepcopy(pipe.vae).to(vae_dtype)
    specs += [
        GraphSpec("vae_decoder", VAEDecoderGraph(vae_net),
                  {"latent": torch.randn(2, vae.latent_channels, latent, latent, generator=g).to(vae_dtype)},
                  {"latent": {0: "batch", 2: "height", 3: "width"}}, ("image",), vae_dtype),
        GraphSpec("vae_encoder", VAEEncoderGraph(vae_net),
                  {"image": (torch.rand(2, vae.in_channels, image, image, generator=g) * 2 - 1).to(vae_dtype)},
                  {"image": {0: "batch", 2: "image_height", 3: "image_width"}}, ("mean", "logvar"), vae_dtype),
    ]
    return specs
