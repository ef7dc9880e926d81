"""Reading checkpoints: weight files read lazily, networks built on the meta device and filled in the target dtype.

Two layouts load: the diffusers folder (``model_index.json`` + one folder per network) and the original single file
(CompVis / webui ``.safetensors`` or ``.ckpt``). Key names and transforms of each layout live in ``layouts.py``;
this module only reads files, checks keys and shapes, and materialises the networks. Every failure is a
``CheckpointError`` that names the file and the fix; nothing is half loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn


from . import layouts
from .schedulers import ScheduleConfig
from .tokenizer import Tokenizer
from .models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet, UNetConfig, VAEConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unknown layout, corrupt, or not matching the network."""


class WeightFile:
    """Tensors of one or more files, read one tensor at a time (safetensors: memory-mapped, never read whole)."""

    def __init__(self, paths: Iterable[Path]):
        self._where: dict[str, object] = {}  # key -> open safe_open handle or a loaded dict
        self.paths = list(paths)
        for path in self.paths:
            if not path.is_file():
                raise CheckpointError(f"weight file {path} does not exist")
            if path.suffix == ".safetensors":
                try:
                    handle = safe_open(str(path), framework="pt", device="cpu")
                except (SafetensorError, OSError, ValueError) as e:
                    raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
                for key in handle.keys():
                    self._where[key] = handle
            elif path.suffix in (".bin", ".ckpt", ".pt", ".pth"):
                state = _torch_load(path)
                for key in state:
                    self._where[key] = state
            else:
                raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; "
                                      "expected .safetensors, .bin, .ckpt, .pt or .pth")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        where = self._where[key]
        if isinstance(where, dict):
            return tuple(where[key].shape)
        return tuple(where.get_slice(key).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.shape(key) for key in self._where}

    def get(self, key: str) -> torch.Tensor:
        where = self._where[key]
        if isinstance(where, dict):
            return where[key]
        try:
            return where.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.paths[0]} (truncated or corrupt?): {e}") from e


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint, through ``weights_only=True`` only: it can hold no code. Memory-mapped when possible."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"{path} cannot be read as a weights-only torch checkpoint "
                              f"(corrupt, truncated, or it contains code objects): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    step = state.get("global_step")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # CompVis .ckpt files wrap the weights, with the training step beside them
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if isinstance(step, int) and "global_step" not in tensors:
        tensors["global_step"] = torch.tensor(step)  # read back by _global_step (SD 2.x epsilon vs v)
    return tensors


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
    before any tensor is read; transformed tensors (split or reshaped) are checked as they are made."""
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

    def check(name: str, key: str, shape: tuple[int, ...]) -> None:
        if shape != expected[name]:
            raise CheckpointError(f"{component}: tensor {name!r} (from {key!r}) has shape {shape} in the checkpoint "
                                  f"but the network expects {expected[name]}: the config does not match these weights")

    for name, src in sources.items():
        if src.transform is None:
            check(name, src.key, weights.shape(src.key))
    state = {}
    for name in expected:
        src = sources[name]
        tensor = weights.get(src.key)
        if src.transform is not None:
            tensor = src.transform(tensor)
            check(name, src.key, tuple(tensor.shape))
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def read_json(path: Path) -> dict:
    """A JSON file holding one object (a config, an index): anything else is a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a diffusers folder needs it")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {_json_type(value)}, not an object of fields "
                              f"({_short(value)}): replace it with the model's own {path.name}")
    return value


# -- Config bounds --------------------------------------------------------------------------------------------------
# Every config field sdfast reads, with its type and the range it may take: bounded by what any released SD 1.x /
# 2.x / XL model uses (``released``), with generous headroom. A value outside is refused while the configs are read
# (diffusers folders, configs inferred from a single file, ``overrides``), before anything is built or allocated,
# in one line naming the file, the field, the value and the allowed range. Fields are diffusers' / transformers'
# names, as in the config.json files. The relations between fields (norm groups dividing the channels, heads
# dividing them into heads no wider than HEAD_DIM) are checked next, by ``_relations``.


@dataclass(frozen=True)
class Bound:
    """One config field. ``kind``: int, float, bool or str (bool is never taken for an int, NaN and infinities
    never for a float). ``shape``: "one" value, a "list" of them, or "level": one value or a list of one per U-Net
    level. ``lo`` / ``hi``: inclusive, or exclusive with ``open`` (floats in (0, 1)). ``length``: a list's length.
    ``null``: JSON null allowed (the default then applies)."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    released: str = ""
    shape: str = "one"
    length: tuple[int, int] = (1, 8)
    multiple_of: int = 1
    null: bool = False
    open: bool = False

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if value is None:
            return None if self.null else "must not be null"
        if self.shape == "one" or (self.shape == "level" and not isinstance(value, list)):
            return None if self._fits(value) else "out of bounds"
        if not isinstance(value, list):
            return "must be a list"
        if not self.length[0] <= len(value) <= self.length[1]:
            return f"has {len(value)} entries"
        return None if all(self._fits(v) for v in value) else "out of bounds"

    def _fits(self, v) -> bool:
        if self.kind is bool:
            return isinstance(v, bool)
        if self.kind is str:
            return isinstance(v, str)
        if isinstance(v, bool) or not isinstance(v, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(v):
            return False
        if self.open:
            return self.lo < v < self.hi
        return self.lo <= v <= self.hi and (self.multiple_of == 1 or v % self.multiple_of == 0)

    def allowed(self) -> str:
        if self.kind is bool:
            one = "true or false"
        elif self.kind is str:
            one = "a string"
        elif self.open:
            one = f"a finite number {self.lo:g} < x < {self.hi:g}"
        else:
            noun, lo, hi = ("an integer", f"{self.lo:,}", f"{self.hi:,}") if self.kind is int else \
                ("a finite number", f"{self.lo:g}", f"{self.hi:g}")
            one = f"{noun} {lo}..{hi}" + (f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else "")
        many = f"a list of {self.length[0]}..{self.length[1]:,} entries, each {one}"
        text = {"one": one, "list": many, "level": f"{one}, or {many} (one per level)"}[self.shape]
        return text + (", or null" if self.null else "")


HEAD_DIM = (1, 512)  # attention head width (SD 1.x: 40..160, 2.x / XL: 64), by _relations
_LEVELS = {"shape": "level", "length": (1, 8)}
BOUNDS: dict[str, dict[str, Bound]] = {
    "unet": {
        "in_channels": Bound(int, 1, 64, "4; 9 inpainting"),
        "out_channels": Bound(int, 1, 64, "4"),
        "block_out_channels": Bound(int, 4, 4096, "320..1280", shape="list", multiple_of=2),
        "down_block_types": Bound(str, shape="list"),
        "up_block_types": Bound(str, shape="list"),
        "layers_per_block": Bound(int, 1, 16, "2", **_LEVELS),
        "transformer_layers_per_block": Bound(int, 1, 64, "1..10", **_LEVELS),
        "attention_head_dim": Bound(int, 1, 4096, "8 heads, or 5..20 per level", **_LEVELS),  # a head COUNT
        "num_attention_heads": Bound(int, 1, 4096, "null", null=True, **_LEVELS),
        "cross_attention_dim": Bound(int, 1, 8192, "768, 1024, 2048"),
        "norm_num_groups": Bound(int, 1, 4096, "32"),
        "norm_eps": Bound(float, 0, 1, "1e-5", open=True),
        "sample_size": Bound(int, 1, 1024, "64, 96, 128 latent cells", null=True),
        "use_linear_projection": Bound(bool),
        "upcast_attention": Bound(bool),
        "flip_sin_to_cos": Bound(bool),
        "freq_shift": Bound(int, 0, 1, "0"),
        "addition_embed_type": Bound(str, null=True),
        "addition_time_embed_dim": Bound(int, 2, 4096, "256", null=True, multiple_of=2),
        "projection_class_embeddings_input_dim": Bound(int, 1, 65536, "2816, 2560", null=True),
    },
    "vae": {
        "in_channels": Bound(int, 1, 64, "3"),
        "out_channels": Bound(int, 1, 64, "3"),
        "latent_channels": Bound(int, 1, 64, "4"),
        "block_out_channels": Bound(int, 1, 4096, "128..512", shape="list"),
        "down_block_types": Bound(str, shape="list"),
        "up_block_types": Bound(str, shape="list"),
        "layers_per_block": Bound(int, 1, 16, "2"),
        "norm_num_groups": Bound(int, 1, 4096, "32"),
        "sample_size": Bound(int, 1, 8192, "512..1024 px", null=True),
        "scaling_factor": Bound(float, 0, 100, "0.18215, 0.13025", open=True),
        "force_upcast": Bound(bool),
    },
    "text_encoder": {
        "vocab_size": Bound(int, 1, 1_000_000, "49408"),
        "hidden_size": Bound(int, 1, 8192, "768, 1024, 1280"),
        "intermediate_size": Bound(int, 1, 65536, "3072..5120"),
        "num_hidden_layers": Bound(int, 1, 64, "12, 23, 32"),
        "num_attention_heads": Bound(int, 1, 8192, "12..20"),
        "max_position_embeddings": Bound(int, 1, 1024, "77"),
        "layer_norm_eps": Bound(float, 0, 1, "1e-5", open=True),
        "projection_dim": Bound(int, 1, 8192, "768..1280", null=True),
        "eos_token_id": Bound(int, 0, 1_000_000, "2, 49407"),
        "hidden_act": Bound(str),
    },
    "scheduler": {
        "num_train_timesteps": Bound(int, 1, 100_000, "1000"),
        "beta_start": Bound(float, 0, 1, "0.00085", open=True),
        "beta_end": Bound(float, 0, 1, "0.012", open=True),
        "trained_betas": Bound(float, 0, 1, "null", shape="list", length=(1, 100_000), null=True, open=True),
        "beta_schedule": Bound(str),
        "prediction_type": Bound(str),
        "timestep_spacing": Bound(str),
        "steps_offset": Bound(int, 0, 100_000, "0, 1"),
        "set_alpha_to_one": Bound(bool),
        "clip_sample": Bound(bool),
        "clip_sample_range": Bound(float, 0, 1e6, "1.0", open=True),
        "original_inference_steps": Bound(int, 1, 100_000, "50"),
        "timestep_scaling": Bound(float, 0, 1e6, "10.0", open=True),
    },
    "pipeline": {"force_zeros_for_empty_prompt": Bound(bool), "requires_aesthetics_score": Bound(bool)},
}
BOUNDS["text_encoder_2"] = BOUNDS["text_encoder"]


def check_bounds(component: str, config, source: str, fix: str) -> None:
    """``config`` (a diffusers / transformers config dict of ``component``, from ``source``) against BOUNDS: a
    CheckpointError naming the source, the field, the value, the allowed range and ``fix`` for the first field out
    of bounds. Fields it does not list are left to the config classes."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: the {component} config is a JSON {_json_type(config)} "
                              f"({_short(config)}), not an object of fields; {fix}")
    for name, bound in BOUNDS[component].items():
        if name in config and (problem := bound.problem(config[name])):
            raise CheckpointError(f"{source}: {name}={_short(config[name])} {problem}: allowed "
                                  f"{bound.allowed()}" + (f" (released models: {bound.released})"
                                                          if bound.released else "") + f"; {fix}")


def _relations(unet: UNetConfig, vae: VAEConfig, texts: Mapping[str, CLIPTextConfig]) -> Iterable[tuple[str, str]]:
    """(component, problem) for each relation between fields that the configs break: every level's channels split
    into the norm groups and into heads of 1..512 channels each; one channel count per U-Net block type."""
    lo, hi = HEAD_DIM
    if len(unet.block_channels) != len(unet.attention):
        yield "unet", (f"block_out_channels has {len(unet.block_channels)} entries but down_block_types "
                       f"{len(unet.attention)}: give one per level")
    for component, channels, groups in (("unet", unet.block_channels, unet.norm_groups),
                                        ("vae", vae.block_channels, vae.norm_groups)):
        bad = [c for c in channels if c % groups]
        if bad:
            yield component, (f"norm_num_groups={groups} does not divide block_out_channels entries {bad}: each "
                              f"level's channels must split into the norm groups (released models: 32 groups)")
    levels = [i for i, attn in enumerate(unet.attention) if attn] + [len(unet.block_channels) - 1]  # + the middle
    for i in sorted(set(levels) & set(range(min(len(unet.block_channels), len(unet.num_heads))))):
        c, heads = unet.block_channels[i], unet.num_heads[i]
        if c % heads or not lo <= c // heads <= hi:
            yield "unet", (f"level {i}'s {c} channels in {heads} heads (attention_head_dim / num_attention_heads, "
                           f"a head count) do not make whole heads {lo}..{hi} wide (released models: 40..160)")
    for component, cfg in texts.items():
        if cfg.hidden_size % cfg.num_heads or not lo <= cfg.hidden_size // cfg.num_heads <= hi:
            yield component, (f"hidden_size={cfg.hidden_size} in num_attention_heads={cfg.num_heads} does not "
                              f"make whole heads {lo}..{hi} wide (released models: 64)")


def _short(value, most: int = 60) -> str:
    """``repr(value)``, cut to ``most`` characters (a config list can hold a million entries)."""
    text = repr(value)
    return text if len(text) <= most else text[:most - 4] + " ..."


def _json_type(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


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
                                      f"{_short(weight_map)}: write the index again")
            shards = sorted(set(weight_map.values()))
            return WeightFile(folder / shard for shard in shards)
        if (folder / name).is_file():
            return WeightFile([folder / name])
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_NAMES)} (or sharded)")


@dataclass
class Components:
    """The networks and configs of one Stable Diffusion checkpoint, loaded. SDXL adds the OpenCLIP bigG encoder
    (``text_encoder_2``, ``tokenizer_2``) and diffusers' pipeline options; the SDXL refiner has only that encoder
    (``text_encoder`` and ``tokenizer`` None)."""

    text_encoder: nn.Module | None
    unet: nn.Module
    vae: nn.Module
    scheduler_config: dict
    tokenizer: Tokenizer | None
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Tokenizer | None = None
    # model_index.json's force_zeros_for_empty_prompt / requires_aesthetics_score (SDXL pipelines only)
    options: dict = field(default_factory=dict)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SD 1.x / 2.x: the first; SDXL: both; the refiner: the second
PIPELINE_OPTIONS = {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": False}


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
    options = {key: bool(index.get(key, default)) for key, default in PIPELINE_OPTIONS.items()}
    names = {part: str(path) for part, path in files.items()}
    unet_cfg, vae_cfg, te_cfgs = _network_configs(raw["unet"], raw["vae"], text_cfgs, options, where=folder,
                                                  names=names, fix=fix)
    scheduler_config = check_scheduler_config(raw["scheduler"], names["scheduler"], fix)
    configs = {"unet": unet_cfg, "vae": vae_cfg, **te_cfgs}
    for part, cfg in configs.items():  # before anything is built: the configs describe no more than the weights
        _check_size(part, cfg, sum(math.prod(shape) for shape in weights[part].shapes().values()), names[part])
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
        options=options if unet_cfg.added_time_dim is not None else {},
    )


_NETWORKS = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModel}


def _network_configs(unet: dict, vae: dict, texts: dict[str, tuple[dict, bool]], options: dict, *, where: Path,
                     names: Mapping[str, str], fix: str):
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
    broken = next(iter(_relations(unet_cfg, vae_cfg, te_cfgs)), None)
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
        numbers = 5 if options.get("requires_aesthetics_score") else 6
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


def _check_size(component: str, config, available: int, source: str) -> None:
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
    ``overrides`` ({"unet": {...}, "scheduler": {...}, ...}) sets what weights cannot reveal (see layouts)."""
    weights = WeightFile([path])
    shapes = weights.shapes()
    try:
        configs = layouts.infer_configs(shapes, global_step=_global_step(weights), overrides=overrides)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    family = configs["family"]
    texts = {part: (configs[part], part == "text_encoder_2") for part in TEXT_ENCODERS if part in configs}
    names = {part: f"{path} ({part} config inferred from the weights, with overrides)"
             for part in (*texts, "unet", "vae", "scheduler", "pipeline")}
    fix = "if the weights cannot tell it, pass the right value in overrides"
    check_bounds("pipeline", configs.get("pipeline", {}), names["pipeline"], fix)
    options = configs.get("pipeline", {})
    unet_cfg, vae_cfg, te_cfgs = _network_configs(configs["unet"], configs["vae"], texts, options, where=path,
                                                  names=names, fix=fix)
    scheduler_config = check_scheduler_config(configs["scheduler"], names["scheduler"], fix)
    cfgs = {"unet": unet_cfg, "vae": vae_cfg, **te_cfgs}
    for component, cfg in cfgs.items():  # before any rule is listed or network built
        available = sum(math.prod(shape) for key, shape in shapes.items() if layouts.component_of(key) == component)
        _check_size(component, cfg, available, names[component])
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
        options=options,
    )


def _global_step(weights: WeightFile) -> int | None:
    """CompVis checkpoints record the training step; SD 2.x's epsilon-prediction base model is the one at 875000."""
    if "global_step" not in weights:
        return None
    return int(weights.get("global_step").reshape(-1)[0])
