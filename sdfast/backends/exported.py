"""What the two export backends (``onnxruntime``, ``tensorrt``) share: the three networks over exported graphs,
with the torch modules' call signatures and ``.config``, and the way from a checkpoint or an export folder to them.

A backend supplies one ``Runner`` per graph (``run(inputs, outputs) -> {name: tensor}``; ``inputs``: {name: tensor};
``outputs``: {name: shape}, so a runner can allocate them on the device up front; ``run.max_batch(input)``: the
most rows it takes) through its ``runners(folder, manifest, device, networks=NAMES, **options)``; the classes here
turn those into what the pipeline calls:
``text_encoder(ids, clip_skip)``, ``unet(x, t, context)`` (SDXL: ``text_embeds`` and ``time_ids`` too),
``vae.encode(image, generator)`` and ``vae.decode(latents)``. Graph signatures: ``sdfast.export.graphs``.

ControlNets: the U-Net runs the controlled graph (``unet_control``) when a call passes residuals, the plain one
otherwise; ``ControlNet`` runs a ControlNet's graph with the torch ``ControlNet``'s signature, so the pipeline sums
and scales residuals as on every backend; ``ControlGraphs`` finds (export folder) or exports (export cache) the graph
of a ControlNet file for ``pipe.controlnets.load``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from sdfast.export.graphs import residual_names, skip_shapes

from ..checkpoint import read_json
from ..control.controls import check_fits
from ..models import CLIPTextConfig, UNetConfig, VAEConfig, image_side
from ..models.controlnet import ControlNetConfig
from ..models.vae import sample_posterior
from ..tokenizer import Tokenizer
from .eager import as_loaded


class Runner(Protocol):
    """One exported graph, run by a backend."""

    def __call__(self, inputs: dict[str, torch.Tensor],
                 outputs: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]: ...

    def max_batch(self, name: str) -> int | None:
        """The most rows (batch entries) input ``name`` may have in one call, or None when any number runs."""

    def set_initializers(self, values: dict[str, np.ndarray | None]) -> None:
        """Replace some of the graph's weights (by initializer name; None: the graph's own value again) from the
        next call on: ONNX Runtime makes a new session with them, TensorRT refits its engines. No new export, no
        engine build."""


class GraphWeights:
    """A network's LoRA-patchable weights inside its exported graph (``pipe.loras`` reads and writes them as it
    does a torch module's): base values read from the graph file, new ones handed to the runner. ``places``: the
    manifest's ``weights`` for the graph ({module path: [initializer, transposed, shape]},
    ``sdfast.export.weights``)."""

    def __init__(self, run: Runner, graph: Path, places: dict[str, list], dtype: torch.dtype,
                 also: GraphWeights | None = None):
        # ``also``: the same network's other graph (the controlled U-Net), whose weights every write changes alike
        self.run, self.graph, self.dtype, self.also = run, graph, dtype, also
        self.places = {path: (name, transposed) for path, (name, transposed, _) in places.items()}
        self.shapes = {path: tuple(shape) for path, (_, _, shape) in places.items()}

    def read(self, paths: list[str]) -> dict[str, torch.Tensor]:
        from sdfast.export.weights import read_initializers

        return read_initializers(self.graph, {path: self.places[path] for path in paths})

    def write(self, weights: dict[str, torch.Tensor], pristine: set[str] = frozenset()) -> None:
        """``weights``' new values; those in ``pristine`` are the graph's own again, so their overrides go (None)."""
        from sdfast.export.weights import as_initializer

        self.run.set_initializers({self.places[path][0]: None if path in pristine else
                                   as_initializer(value, self.places[path][1], self.dtype)
                                   for path, value in weights.items()})
        if self.also is not None:
            self.also.write(weights, pristine)


class TextEncoder:
    """``text_encoder(ids (B, 77), clip_skip=1) -> (hidden (B, 77, C), pooled (B, P))``, as ``CLIPTextModel``.
    ``final_norm``: whether the graph's hidden states went through the final LayerNorm (SD 1.x / 2.x) or are raw
    (SDXL, called with ``final_norm=False``); a call asking for the other kind is refused."""

    def __init__(self, run: Runner, config: CLIPTextConfig, final_norm: bool = True,
                 weights: GraphWeights | None = None):
        self.run, self.config, self.final_norm, self._weights = run, config, final_norm, weights

    def weights(self) -> GraphWeights:
        return _patchable(self._weights, "text encoder")

    def __call__(self, input_ids: torch.Tensor, clip_skip: int = 1, final_norm: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.config.num_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip={clip_skip} is out of range: this text encoder has {layers} layers, "
                             f"so use 1..{layers}")
        if final_norm != self.final_norm:
            kind = "normalised (SD 1.x / 2.x)" if self.final_norm else "raw (SDXL)"
            raise ValueError(f"this text-encoder graph holds {kind} hidden states, so it cannot give "
                             f"final_norm={final_norm}: call it as the model's pipeline does")
        b, n = input_ids.shape
        pooled = self.config.projection_dim or self.config.hidden_size
        out = self.run({"input_ids": input_ids},
                       {"hidden_states": (b, layers, n, self.config.hidden_size), "pooled": (b, pooled)})
        return out["hidden_states"][:, layers - clip_skip], out["pooled"]  # (B, 77, C), (B, P)


class UNet:
    """``unet(x (B, 4, h, w), t () or (B,), context (B, 77*K, C)) -> noise (B, 4, h, w)``, as ``UNet``; SDXL also
    takes ``text_embeds`` (B, P) and ``time_ids`` (B, n), and a ControlNet's ``down_residuals`` / ``mid_residual``
    run the controlled graph (``controlled``; None: the export has none, and ``no_control`` says how to get it)."""

    def __init__(self, run: Runner, config: UNetConfig, weights: GraphWeights | None = None,
                 controlled: Runner | None = None, no_control: str = ""):
        self.run, self.config, self._weights = run, config, weights
        self.controlled, self.no_control = controlled, no_control
        self.residuals = residual_names(dataclasses.asdict(config))  # the controlled graph's extra inputs

    def weights(self) -> GraphWeights:
        return _patchable(self._weights, "U-Net")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                 down_residuals: list[torch.Tensor] | None = None, mid_residual: torch.Tensor | None = None
                 ) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).float()  # (B,) fp32, as the graph
        b, _, h, w = x.shape
        inputs = {"sample": x, "timestep": t, "context": context}
        if self.config.added_time_dim is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this is an SDXL U-Net: pass text_embeds (B, pooled width) and time_ids (B, n), "
                                 "as Pipeline.generate does")
            inputs.update(text_embeds=text_embeds, time_ids=time_ids.float())  # (B, P), (B, n) fp32, as the graph
        run = self.run
        if down_residuals is not None:
            if self.controlled is None:
                raise ValueError(self.no_control)
            inputs.update(zip(self.residuals, [*down_residuals, mid_residual], strict=True))
            run = self.controlled
        return run(inputs, {"noise": (b, self.config.out_channels, h, w)})["noise"]

    def max_batch(self) -> int | None:
        """The most latents one call takes (twice the images under guidance), or None when any number runs."""
        return self.run.max_batch("sample")


class ControlNet:
    """``controlnet(x, t, context, image, scale, text_embeds, time_ids) -> (down residuals, mid residual)``, as
    the torch ``ControlNet``: the graph gives the residuals unscaled, ``scale`` multiplies them here."""

    def __init__(self, run: Runner, config: ControlNetConfig):
        self.run, self.config = run, config
        unet = dataclasses.asdict(config)
        self.levels = [*skip_shapes(unet), (config.block_channels[-1], len(config.block_channels) - 1)]
        self.names = residual_names(unet)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, image: torch.Tensor,
                 scale: float = 1.0, text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).float()  # (B,) fp32, as the graph
        b, _, h, w = x.shape
        inputs = {"sample": x, "timestep": t, "context": context, "image": image}
        if self.config.added_time_dim is not None:
            inputs.update(text_embeds=text_embeds, time_ids=time_ids.float())
        pooled = self.config.global_pool  # residuals averaged over space: (B, C, 1, 1)
        shapes = {name: (b, c, 1, 1) if pooled else (b, c, -(-h // 2**level), -(-w // 2**level))
                  for name, (c, level) in zip(self.names, self.levels)}
        out = self.run(inputs, shapes)
        return [out[name] * scale for name in self.names[:-1]], out["mid"] * scale


class ControlGraphs:
    """``Pipeline.control_loader`` of the export backends: ``graphs(pipe, path)`` is the exported ``ControlNet`` of
    the ControlNet file ``path``. From an export folder: the graph ``sdfast export --controlnet PATH`` wrote under
    the file's name (``controlnet_NAME``; the file itself is not read). From the export cache (``cached``): the
    ControlNet is read on the CPU and its graph, named by its weights hash, exported into the entry the first time.
    ``no_control``: the refusal when the export has no controlled U-Net."""

    def __init__(self, runners: Callable, folder: Path, device: torch.device, options: dict, cached: bool,
                 no_control: str):
        self.runners, self.folder, self.device, self.options = runners, folder, device, options
        self.cached, self.no_control = cached, no_control

    def __call__(self, pipe, path) -> ControlNet:
        from sdfast.export.manifest import read_manifest

        manifest = read_manifest(self.folder, verify=False)
        if "unet_control" not in manifest["networks"]:
            raise ValueError(self.no_control)
        if self.cached:
            from sdfast.export.cache import cached_controlnet

            from ..control.loading import load_controlnet

            net = load_controlnet(path, "cpu", pipe.dtype)
            check_fits(pipe.unet.config, net.config)
            name = cached_controlnet(pipe, self.folder, net)
            del net
        else:
            name = Path(path).stem
        manifest = read_manifest(self.folder)  # the new graph verified, the others' hashes known already
        entry = manifest.get("controlnets", {}).get(name)
        if entry is None:
            raise ValueError(f"{self.folder} has no graph of the ControlNet {name!r} (it holds: "
                             f"{', '.join(manifest.get('controlnets', {})) or 'none'}): export it with `sdfast "
                             f"export MODEL -o {self.folder} --controlnet {path}`")
        network = entry["network"]
        run = self.runners(self.folder, manifest, self.device, networks=(network,), **self.options)[network]
        return ControlNet(run, config(ControlNetConfig, entry["config"]))


class VAE:
    """``vae.encode(image, generator) -> scaled latent`` and ``vae.decode(latents) -> image``, as ``AutoencoderKL``:
    the encoder graph gives the posterior and ``sample_posterior`` draws from it exactly as the torch model does."""

    def __init__(self, encode: Runner, decode: Runner, config: VAEConfig):
        self.run_encode, self.run_decode, self.config = encode, decode, config
        self.factor = image_side(1, len(config.block_channels))  # pixels per latent cell

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = image.shape
        shape = (b, self.config.latent_channels, h // self.factor, w // self.factor)
        out = self.run_encode({"image": image}, {"mean": shape, "logvar": shape})
        return sample_posterior(out["mean"], out["logvar"], generator, self.config.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, h, w = latents.shape
        shape = (b, self.config.out_channels, h * self.factor, w * self.factor)
        return self.run_decode({"latent": latents}, {"image": shape})["image"]

    def max_decode_batch(self) -> int | None:
        """The most latents one ``decode`` call takes, or None when any number runs."""
        return self.run_decode.max_batch("latent")


def _patchable(weights: GraphWeights | None, what: str) -> GraphWeights:
    if weights is None:
        from ..lora import LoRAError

        raise LoRAError(f"this export's {what} graph has no weight map (exported by an older sdfast): export it "
                        "again to apply LoRAs")
    return weights


def base_networks(manifest: dict) -> tuple[str, ...]:
    """The graphs a pipeline runs from the start: all but the ControlNets' (``pipe.controlnets.load`` adds those)."""
    return tuple(name for name in manifest["networks"] if not name.startswith("controlnet_"))


def config(cls, fields: dict):
    """A config dataclass from its manifest entry (JSON turned its tuples into lists)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def prepare(runners: Callable, pipe, device: torch.device, *, cache: str | Path | None = None,
            opset: int | None = None, controlnet: bool = False, **options):
    """``pipe`` (torch, on the CPU) with its networks replaced by graphs run through ``runners`` on ``device``. The
    graphs are exported once into ``cache`` (default ``$SDFAST_CACHE/onnx``) under the weights' hash and reused.
    ``controlnet``: the cache entry holds the controlled U-Net too (a second copy of the U-Net's weights on disk),
    so that ``pipe.controlnets.load`` works; each ControlNet's graph is exported into the entry as it is loaded."""
    from sdfast.export.cache import cached_export
    from sdfast.export.onnx import DEFAULT_OPSET

    from . import cache_dir

    folder = cached_export(pipe, cache or cache_dir() / "onnx", opset=opset or DEFAULT_OPSET, controlnet=controlnet)
    return dataclasses.replace(pipe, **from_folder(runners, folder, device, cached=True, **options))


def from_folder(runners: Callable, folder: str | Path, device: torch.device, dtype: torch.dtype | None = None, *,
                cached: bool = False, controlnet: bool = False, **options) -> dict:
    """A pipeline's fields from a folder written by ``sdfast export`` (``manifest.json``, the graphs, the tokenizer
    and the scheduler config), its graphs run through ``runners``. ``dtype``, when given, must be the export's.
    ``cached``: the folder is an export-cache entry (ControlNets are exported into it as they load);
    ``controlnet``: refuse a folder without the controlled U-Net now rather than at the first ControlNet."""
    from sdfast.export.manifest import read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    exported = {"fp32": torch.float32, "fp16": torch.float16}[manifest["dtype"]]
    if dtype is not None and dtype != exported:
        raise ValueError(f"{folder} was exported in {manifest['dtype']}, so it runs in {exported}, not {dtype}: "
                         "export again with `sdfast export --dtype` for another precision")
    no_control = (f"{folder} has no controlled U-Net graph (unet_control.onnx), so its U-Net takes no ControlNet "
                  "residuals: " + ("load the checkpoint with controlnet=True (`sdfast serve --controlnet-dir` and "
                                   "`sdfast generate --control` do), which exports it into the cache" if cached else
                                   f"export again with `sdfast export MODEL -o {folder} --controlnet PATH`"))
    if controlnet and "unet_control" not in manifest["networks"]:
        raise ValueError(no_control)
    run = runners(folder, manifest, device, networks=base_networks(manifest), **options)
    configs = manifest["configs"]
    # the text encoders the model has (SD: one; SDXL: two; the SDXL refiner: the second), each with its tokenizer
    encoders = [name for name in ("text_encoder", "text_encoder_2") if name in configs]
    missing = [n for n in (*encoders, "unet", "vae_decoder", "vae_encoder") if n not in run]
    if missing:
        raise ValueError(f"{folder} lacks the {', '.join(missing)} graph(s): export all of the model's networks")
    final_norm = manifest.get("text_final_norm", True)  # SDXL's graphs hold raw hidden states
    def weights(name: str, also: GraphWeights | None = None) -> GraphWeights | None:
        """Where LoRAs write in graph ``name`` (``sdfast.export.weights``), if the export has it and its map."""
        entry = manifest["networks"].get(name, {})
        return GraphWeights(run[name], folder / entry["file"], entry["weights"], exported, also) \
            if "weights" in entry else None

    text = {name: TextEncoder(run[name], config(CLIPTextConfig, configs[name]), final_norm, weights(name))
            for name in encoders}
    tokenizers = {name: Tokenizer.from_folder(folder / manifest[tok])
                  for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
                  if name in encoders}
    return dict(tokenizer=tokenizers.get("text_encoder"), text_encoder=text.get("text_encoder"),
                unet=UNet(run["unet"], config(UNetConfig, configs["unet"]), weights("unet", weights("unet_control")),
                          run.get("unet_control"), no_control),
                vae=VAE(run["vae_encoder"], run["vae_decoder"], config(VAEConfig, configs["vae"])),
                scheduler_config=read_json(folder / manifest["scheduler_config"]), device=device, dtype=exported,
                text_encoder_2=text.get("text_encoder_2"), tokenizer_2=tokenizers.get("text_encoder_2"),
                xl_options=manifest.get("options", {}),  # manifest.json calls them "options"
                # a ControlNet handed over as a torch module runs as one; a file loads as its graph
                control_step=as_loaded, control_loader=ControlGraphs(runners, folder, device, options, cached,
                                                                     no_control))
