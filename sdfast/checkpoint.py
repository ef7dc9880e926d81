"""Reading checkpoints: weight files read lazily, networks built on the meta device and filled in the target dtype.

Two layouts load: the diffusers folder (``model_index.json`` + one folder per network) and the original single file
(CompVis / webui ``.safetensors`` or ``.ckpt``). Key names and transforms of each layout live in ``layouts.py``, a
single file's configs are inferred in ``infer_config.py``, and the bounds every config value must keep are in
``config_bounds.py``; this module only reads files, checks configs, keys and shapes, and materialises the networks.
Every failure is a ``CheckpointError`` that names the file and the fix; nothing is half loaded. The files themselves
are read by ``weight_files.WeightFile``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn


from . import infer_config, layouts
from .config_bounds import broken_relations, json_type, out_of_bounds, short_repr
from .schedulers import ScheduleConfig
from .tokenizer import Tokenizer
from .weight_files import CheckpointError, WeightFile
from .models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet, UNetConfig, VAEConfig


@dataclass(frozen=True)
class Source:
    """Where one parameter of our network comes from: a key in the weight file and a transform of the tensor."""

    key: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _first(items: Iterable[str], n: int = 5) -> str:
    items = sorted(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def materialize(build: Callable[[], nn.Module], sources: Mapping[str, Source], weights: WeightFile,
                *, component: str, unexpected: Iterable[str] = (), device="cpu", dtype=torch.float32) -> nn.Module:
    """Build a network on the meta device and fill it from ``weights``, each tensor cast once to ``dtype`` on
    ``device`` (no second full copy in memory). Every key, and the shape of every tensor stored as is, is checked
    before any tensor is read (``verify``); transformed tensors (split or reshaped) are checked as they are made."""
    model, expected = verify(build, sources, weights, component=component, unexpected=unexpected)
    state = {}
    for name in expected:
        src = sources[name]
        tensor = weights.get(src.key)
        if src.transform is not None:
            tensor = src.transform(tensor)
            _check_shape(component, name, src.key, tuple(tensor.shape), expected)
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def verify(build: Callable[[], nn.Module], sources: Mapping[str, Source], weights: WeightFile, *, component: str,
           unexpected: Iterable[str] = ()) -> tuple[nn.Module, dict[str, tuple[int, ...]]]:
    """What ``materialize`` checks before it reads a tensor: every key of the network built on the meta device has a
    source in ``weights`` and none is left over, and every tensor stored as is has the network's shape (from the
    file's header). Returns the meta network and its {name: shape}; raises a CheckpointError naming the problem."""
    with torch.device("meta"):
        model = build()
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    absent = {name for name, src in sources.items() if src.key not in weights}
    missing = (expected.keys() - sources.keys()) | (absent & expected.keys())
    extra = (sources.keys() - expected.keys()) | set(unexpected)
    if missing or extra:
        parts = [f"{component}: the checkpoint does not match the network ({', '.join(str(p) for p in weights.paths)})"]
        if missing:
            parts.append(f"missing {len(missing)} keys: {_first(missing)}")
        if extra:
            parts.append(f"unexpected {len(extra)} keys: {_first(extra)}")
        parts.append("is this file of a different model family, or a config that does not belong to these weights?")
        raise CheckpointError("; ".join(parts))
    for name, src in sources.items():
        if src.transform is None:
            _check_shape(component, name, src.key, weights.shape(src.key), expected)
    return model, expected


def _check_shape(component: str, name: str, key: str, shape: tuple[int, ...], expected: dict) -> None:
    if shape != expected[name]:
        raise CheckpointError(f"{component}: tensor {name!r} (from {key!r}) has shape {shape} in the checkpoint "
                              f"but the network expects {expected[name]}: the config does not match these weights")


def read_json(path: Path) -> dict:
    """A JSON file holding one object (a config, an index): anything else is a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a diffusers folder needs it")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {json_type(value)}, not an object of fields "
                              f"({short_repr(value)}): replace it with the model's own {path.name}")
    return value


def check_bounds(component: str, config, source: str, fix: str) -> None:
    """``config`` (a diffusers / transformers config dict of ``component``, from ``source``) against
    ``config_bounds.BOUNDS``: a CheckpointError naming the source, the field, the value, the allowed range and
    ``fix`` for the first field out of bounds."""
    problem = out_of_bounds(component, config)
    if problem is not None:
        raise CheckpointError(f"{source}: {problem}; {fix}")


# Weight file names in a diffusers component folder, in order of preference: safetensors (diffusers' and
# transformers' names), their fp16 variants, then pickles. Each may be sharded (NAME.index.json lists the shards).
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")


def find_weights(folder: Path) -> WeightFile:
    """The weight file(s) of one diffusers component folder."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing: a diffusers folder has one sub-folder per network")
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map each key to a shard file name, not "
                                      f"{short_repr(weight_map)}: write the index again")
            shards = sorted(set(weight_map.values()))
            return WeightFile(folder / shard for shard in shards)
        if (folder / name).is_file():
            return WeightFile([folder / name])
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_NAMES)} (or sharded)")


@dataclass
class Components:
    """The networks and configs of one Stable Diffusion checkpoint, loaded. SDXL adds the OpenCLIP bigG encoder
    (``text_encoder_2``, ``tokenizer_2``) and diffusers' SDXL pipeline options; the SDXL refiner has only that encoder
    (``text_encoder`` and ``tokenizer`` None)."""

    text_encoder: nn.Module | None
    unet: nn.Module
    vae: nn.Module
    scheduler_config: dict
    tokenizer: Tokenizer | None
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Tokenizer | None = None
    # model_index.json's force_zeros_for_empty_prompt / requires_aesthetics_score (SDXL pipelines only)
    xl_options: dict = field(default_factory=dict)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SD 1.x / 2.x: the first; SDXL: both; the refiner: the second
XL_OPTIONS = {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": False}  # diffusers' defaults


def sources_from_rules(rules: Iterable[layouts.Rule]) -> dict[str, Source]:
    return {r.target: Source(r.source, None if r.transform == "copy" else layouts.transform(r.transform))
            for r in rules}


def _listed(index: dict, part: str) -> bool:
    """Whether model_index.json names a network for ``part`` (the SDXL refiner lists text_encoder as [null, null])."""
    entry = index.get(part)
    return bool(entry) and not (isinstance(entry, list) and entry[0] is None)


def load_diffusers(folder: Path, device, dtype) -> Components:
    """A diffusers folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL also has
    text_encoder_2/ and tokenizer_2/ (the refiner only those two)."""
    index = read_json(folder / "model_index.json")
    for part in ("unet", "vae"):
        if part not in index:
            raise CheckpointError(f"{folder / 'model_index.json'} lists no {part!r}: not a Stable Diffusion pipeline")
    encoders = [part for part in TEXT_ENCODERS if _listed(index, part)]
    if not encoders:
        raise CheckpointError(f"{folder / 'model_index.json'} lists no 'text_encoder': not a Stable Diffusion "
                              "pipeline")
    fix = "correct it in that file (the model's released config has it right)"
    files = {part: folder / part / "config.json" for part in (*encoders, "unet", "vae")}
    files["scheduler"] = folder / "scheduler" / "scheduler_config.json"
    raw = {part: read_json(path) for part, path in files.items()}
    weights = {part: find_weights(folder / part) for part in (*encoders, "unet", "vae")}
    sources = {part: sources_from_rules(layouts.diffusers_rules(part, weights[part].keys())) for part in weights}
    text_cfgs = {part: (raw[part], "text_projection.weight" in sources[part]) for part in encoders}
    xl_options = {key: bool(index.get(key, default)) for key, default in XL_OPTIONS.items()}
    names = {part: str(path) for part, path in files.items()}
    unet_cfg, vae_cfg, te_cfgs = _network_configs(raw["unet"], raw["vae"], text_cfgs, xl_options, where=folder,
                                                  names=names, fix=fix)
    scheduler_config = check_scheduler_config(raw["scheduler"], names["scheduler"], fix)
    configs = {"unet": unet_cfg, "vae": vae_cfg, **te_cfgs}
    for part, cfg in configs.items():  # before anything is built: the configs describe no more than the weights
        check_size(part, cfg, sum(math.prod(shape) for shape in weights[part].shapes().values()), names[part])
    tokenizers = {}
    for part in encoders:
        tok = part.replace("text_encoder", "tokenizer")
        try:
            tokenizers[part] = Tokenizer.from_folder(folder / tok)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder / tok}: {e}") from e
        if tokenizers[part].max_length > te_cfgs[part].max_positions:
            raise CheckpointError(f"{folder / tok / 'tokenizer_config.json'}: model_max_length="
                                  f"{tokenizers[part].max_length} is more tokens than {names[part]} has positions "
                                  f"(max_position_embeddings={te_cfgs[part].max_positions}; released models: both "
                                  "77); correct the one that is wrong")
    nets = {part: materialize(lambda cfg=cfg, part=part: _NETWORKS[part](cfg), sources[part], weights[part],
                              component=part, device=device, dtype=dtype)
            for part, cfg in configs.items()}
    return Components(
        text_encoder=nets.get("text_encoder"),
        unet=nets["unet"],
        vae=nets["vae"],
        scheduler_config=scheduler_config,
        tokenizer=tokenizers.get("text_encoder"),
        text_encoder_2=nets.get("text_encoder_2"),
        tokenizer_2=tokenizers.get("text_encoder_2"),
        xl_options=xl_options if unet_cfg.added_time_dim is not None else {},
    )


_NETWORKS = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModel}


def _network_configs(unet: dict, vae: dict, texts: dict[str, tuple[dict, bool]], xl_options: dict, *,
                     where: Path, names: Mapping[str, str], fix: str):
    """The networks' configs from diffusers / transformers config dicts, checked against BOUNDS and to fit
    together. ``texts`` maps each text encoder present to (its config, whether its weights hold a text_projection);
    ``names`` says where each config comes from, ``fix`` what to do about a bad value (for the messages)."""
    for part, cfg in (("unet", unet), ("vae", vae), *((part, cfg) for part, (cfg, _) in texts.items())):
        check_bounds(part, cfg, names[part], fix)
    try:
        unet_cfg = UNetConfig.from_diffusers(unet)
        vae_cfg = VAEConfig.from_diffusers(vae)
        te_cfgs = {part: CLIPTextConfig.from_transformers(cfg, projected) for part, (cfg, projected) in texts.items()}
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from e
    broken = next(iter(broken_relations(unet_cfg, vae_cfg, te_cfgs)), None)
    if broken is not None:
        part, problem = broken
        raise CheckpointError(f"{names[part]}: {problem}; {fix}")
    if not unet_cfg.in_channels == unet_cfg.out_channels == vae_cfg.latent_channels:
        raise CheckpointError(f"{where}: the U-Net takes {unet_cfg.in_channels} channels and predicts "
                              f"{unet_cfg.out_channels} for a {vae_cfg.latent_channels}-channel VAE: inpainting and "
                              "instruct-pix2pix U-Nets are not supported")
    width = sum(cfg.hidden_size for cfg in te_cfgs.values())  # SDXL concatenates its two encoders' states
    if width != unet_cfg.context_dim:
        widths = " + ".join(str(cfg.hidden_size) for cfg in te_cfgs.values())
        raise CheckpointError(f"{where}: the text encoders are {widths} wide but the U-Net cross-attends "
                              f"to {unet_cfg.context_dim}: these networks do not belong together")
    xl, has_second = unet_cfg.added_time_dim is not None, "text_encoder_2" in te_cfgs
    if xl != has_second:
        raise CheckpointError(f"{where}: an SDXL U-Net needs the second (OpenCLIP) text encoder, and only an SDXL "
                              f"U-Net takes one (U-Net SDXL: {xl}, text_encoder_2: {has_second})")
    if xl:
        pooled = te_cfgs["text_encoder_2"].projection_dim
        numbers = 5 if xl_options.get("requires_aesthetics_score") else 6
        if pooled is None or pooled + numbers * unet_cfg.added_time_dim != unet_cfg.added_cond_dim:
            raise CheckpointError(
                f"{where}: the U-Net's added embedding takes {unet_cfg.added_cond_dim} inputs, not the pooled text "
                f"({pooled}) + {numbers} micro-conditioning numbers x {unet_cfg.added_time_dim}: "
                "requires_aesthetics_score (True for the refiner) or text_encoder_2's projection do not match")
    return unet_cfg, vae_cfg, te_cfgs


def check_scheduler_config(config: dict, source: str, fix: str) -> dict:
    """The scheduler config, checked against BOUNDS and read the way the schedulers will read it (so an unknown
    prediction type or beta schedule fails here, at load, not at the first generate)."""
    check_bounds("scheduler", config, source, fix)
    trained = config.get("trained_betas")
    steps = config.get("num_train_timesteps", 1000)
    if trained is not None and len(trained) != steps:
        raise CheckpointError(f"{source}: trained_betas has {len(trained)} entries but num_train_timesteps="
                              f"{steps}: give one beta per training step; {fix}")
    try:
        ScheduleConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}; {fix}") from e
    return config


def check_size(component: str, config, available: int, source: str) -> None:
    """The weights ``config`` implies, counted without building anything, against those ``available`` for it in
    the weight file. Building on the meta device costs time and memory by the module (a U-Net at the bounds: a
    minute), so a config describing a network much larger than the file is refused before that. Up to twice the
    file goes on to ``materialize``, whose key and shape checks name exactly what is missing, still before any
    tensor is allocated: nothing larger than the file ever is."""
    needed = config.num_parameters()
    if needed > 2 * available:
        raise CheckpointError(f"{source}: this {component} config describes a network of {needed:,} weights, but "
                              f"the weight file holds {available:,} for it: the config does not belong to these "
                              "weights")


def load_single_file(path: Path, device, dtype, overrides: dict | None = None) -> Components:
    """An original-layout (CompVis / webui) single file: family and configs inferred from keys and shapes.
    ``overrides`` ({"unet": {...}, "scheduler": {...}, ...}) sets what weights cannot reveal (see infer_config)."""
    weights = WeightFile([path])
    shapes = weights.shapes()
    try:
        configs = infer_config.infer_configs(shapes, global_step=_global_step(weights), overrides=overrides)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    family = configs["family"]
    texts = {part: (configs[part], part == "text_encoder_2") for part in TEXT_ENCODERS if part in configs}
    names = {part: f"{path} ({part} config inferred from the weights, with overrides)"
             for part in (*texts, "unet", "vae", "scheduler", "pipeline")}
    fix = "if the weights cannot tell it, pass the right value in overrides"
    check_bounds("pipeline", configs.get("pipeline", {}), names["pipeline"], fix)
    xl_options = configs.get("pipeline", {})
    unet_cfg, vae_cfg, te_cfgs = _network_configs(configs["unet"], configs["vae"], texts, xl_options, where=path,
                                                  names=names, fix=fix)
    scheduler_config = check_scheduler_config(configs["scheduler"], names["scheduler"], fix)
    cfgs = {"unet": unet_cfg, "vae": vae_cfg, **te_cfgs}
    for component, cfg in cfgs.items():  # before any rule is listed or network built
        available = sum(math.prod(shape) for key, shape in shapes.items() if layouts.component_of(key) == component)
        check_size(component, cfg, available, names[component])
    nets = {}
    for component, cfg in cfgs.items():
        rules = layouts.original_rules(component, configs[component], family)
        sources = sources_from_rules(rules)
        used = {r.source for r in rules}
        unexpected = [k for k in shapes if layouts.component_of(k) == component and k not in used
                      and not layouts.is_ignored(k, configs)]
        nets[component] = materialize(lambda cfg=cfg, component=component: _NETWORKS[component](cfg), sources,
                                      weights, component=component, unexpected=unexpected, device=device,
                                      dtype=dtype)
    unused = sorted({layouts.component_of(k) for k in shapes} - set(cfgs) - {None})
    if unused:  # e.g. a text encoder under a prefix this family does not read
        raise CheckpointError(f"{path}: weights for {unused} that a {family} file does not use")
    return Components(
        text_encoder=nets.get("text_encoder"), unet=nets["unet"], vae=nets["vae"],
        scheduler_config=scheduler_config,
        tokenizer=Tokenizer.clip(pad_token=configs["pad_token"]) if "text_encoder" in nets else None,
        text_encoder_2=nets.get("text_encoder_2"),
        tokenizer_2=Tokenizer.clip(pad_token=configs["pad_token_2"]) if "text_encoder_2" in nets else None,
        xl_options=xl_options,
    )


def _global_step(weights: WeightFile) -> int | None:
    """CompVis checkpoints record the training step; SD 2.x's epsilon-prediction base model is the one at 875000."""
    if "global_step" not in weights:
        return None
    return int(weights.get("global_step").reshape(-1)[0])
