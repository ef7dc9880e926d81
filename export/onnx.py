"""ONNX export of the three networks: one graph per network, cleaned with onnxslim, checked on ONNX Runtime's CPU
provider against the torch model, and described by a ``manifest.json`` that lets the folder load on its own.

The four graphs and their signatures (what the ``onnxruntime`` and ``tensorrt`` backends call):

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
``force_upcast`` (SDXL's VAE overflows in fp16), as the torch pipeline decodes it.

Batch, sizes and the context length are dynamic axes. The exporter is torch's default, ``torch.onnx.export(...,
dynamo=True)`` (torch.export + onnxscript): at opset >= 21 it writes GroupNorm as one ``GroupNormalization`` node
(with per-channel scale and bias) and shape arithmetic as a handful of ops; older opsets get the decomposed form
(Reshape + InstanceNormalization + Mul + Add). The legacy TorchScript exporter (``dynamo=False``) is about 25x faster on
the tiny test models but decomposes GroupNorm at every opset and needs twice the nodes; see the README.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

try:
    import fcntl  # the cache's file locks (POSIX); elsewhere the cache is not guarded against concurrent writers
except ImportError:
    fcntl = None

try:
    import onnx
    import onnxslim

    HAS_ONNX = True
except ImportError:  # the `onnx` extra: pip install "sdfast[onnx]"
    HAS_ONNX = False

try:
    import onnxruntime

    HAS_ONNXRUNTIME = True
except ImportError:
    HAS_ONNXRUNTIME = False

MANIFEST = "manifest.json"
FORMAT = "sdfast-onnx/1"  # bump when the graphs' signatures change: older folders are then refused
# every network an export may hold: SD 1.x / 2.x have all but text_encoder_2, SDXL all five, its refiner all but
# text_encoder (``pipeline_networks``)
NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
DEFAULT_OPSET = 21  # the first opset with GroupNormalization-21 (per-channel scale and bias)
MIN_OPSET = 18  # torch's dynamo exporter writes opset 18 and up
# Relative L2 error of each graph on ONNX Runtime (CPU) against the torch model in the same dtype. fp32 graphs
# measure ~1e-6; fp16 ones up to ~2e-3, as ORT upcasts the ops it has no fp16 kernel for and torch does not.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# Protobuf cannot serialise a message over 2 GiB: graphs whose weights pass this keep them in ``NAME.onnx.data``.
# 64 MiB under the limit leaves room for what is not weights (nodes, names, shapes).
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# How long a process waits for another that is exporting the same model into the same cache (a full-size SDXL
# export on a CPU takes tens of minutes) before it gives up with an error naming the lock.
LOCK_TIMEOUT_S = 3 * 3600.0


class ExportError(ValueError):
    """An export that cannot be done, or a graph that does not compute what the torch model computes (a
    ValueError, like CheckpointError, so the CLI reports it in one line)."""


def require_onnx(what: str = "ONNX export") -> None:
    """Raises a clear error when the optional ONNX packages are missing (``import sdfast`` never needs them)."""
    missing = [name for name, ok in (("onnx + onnxslim", HAS_ONNX), ("onnxruntime", HAS_ONNXRUNTIME)) if not ok]
    if missing:
        raise ExportError(f"{what} needs {' and '.join(missing)}: pip install \"sdfast[onnx]\"")


# -- the graphs: thin modules around the torch networks, with the signatures in the table above --


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
    """One network's graph: its module, named example inputs with their dynamic axes, and its output names."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, str]]  # input name -> {axis: name}
    outputs: tuple[str, ...]

    def example(self, batch: int, latent: tuple[int, int], tokens: int, seed: int) -> dict[str, torch.Tensor]:
        """Inputs like the export example at another batch, latent size (h, w) and context length."""
        g = torch.Generator().manual_seed(seed)
        sizes = {"batch": batch, "height": latent[0], "width": latent[1], "tokens": tokens,
                 "image_height": 8 * latent[0], "image_width": 8 * latent[1]}
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


def upcast_vae(pipe) -> bool:
    """Whether the VAE graphs are exported in fp32 from an fp16 pipeline: SDXL's VAE (config ``force_upcast``)
    overflows in fp16, so the torch pipeline decodes it in fp32 and the graphs must too."""
    return pipe.is_xl and pipe.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False)


def graph_specs(pipe, latent: int = 16) -> list[GraphSpec]:
    """The graphs of a loaded torch ``Pipeline`` (``pipeline_networks``), with example inputs at batch 2 and a
    ``latent`` x ``latent`` latent. The default 16 keeps the U-Net's deepest level above 1x1 for SD's three
    halvings, so torch.export sees no size-1 axis it would specialise on."""
    dtype = pipe.dtype
    g = torch.Generator().manual_seed(0)
    unet, vae = pipe.unet.config, pipe.vae.config
    image = 8 * latent
    specs = []
    for name, tokenizer, encoder in (("text_encoder", pipe.tokenizer, pipe.text_encoder),
                                     ("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2)):
        if encoder is None:
            continue
        ids = tokenizer.encode(["a photograph of an astronaut riding a horse", "a red circle"])[:, 0]  # (2, 77)
        specs.append(GraphSpec(name, TextEncoderGraph(encoder, text_final_norm(pipe)), {"input_ids": ids},
                               {"input_ids": {0: "batch"}}, ("hidden_states", "pooled")))
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
    specs.append(GraphSpec("unet", UNetGraph(pipe.unet), unet_inputs, unet_axes, ("noise",)))
    vae_net, vae_dtype = pipe.vae, dtype
    if upcast_vae(pipe):  # an fp32 copy for the export only (~0.3 GB for SD's VAE); the pipeline keeps its own
        vae_net, vae_dtype = copy.deepcopy(pipe.vae).float(), torch.float32
    specs += [
        GraphSpec("vae_decoder", VAEDecoderGraph(vae_net),
                  {"latent": torch.randn(2, vae.latent_channels, latent, latent, generator=g).to(vae_dtype)},
                  {"latent": {0: "batch", 2: "height", 3: "width"}}, ("image",)),
        GraphSpec("vae_encoder", VAEEncoderGraph(vae_net),
                  {"image": (torch.rand(2, vae.in_channels, image, image, generator=g) * 2 - 1).to(vae_dtype)},
                  {"image": {0: "batch", 2: "image_height", 3: "image_width"}}, ("mean", "logvar")),
    ]
    return specs


# -- export, cleanup, check --


@dataclass
class NetworkReport:
    """What exporting one network did and measured (it goes into the manifest)."""

    file: str
    sha256: str  # of the .onnx file and its external data, if any
    bytes: int
    external_data: str | None
    inputs: list[dict]  # [{"name", "shape" (ints and axis names), "dtype"}]
    outputs: list[dict]
    slim: dict  # {"nodes_before", "nodes_after", "removed": {op: n}, "added": {op: n}}
    check: dict  # {"rel_err": {output: err}, "tolerance", "provider", "shapes"}
    export_s: float


def _quiet_export():
    """torch.onnx prints progress lines and a warning per missing torchvision op; the caller reports instead."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core",
                 "onnxscript", "torch.export"):
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
    return stack


def to_onnx(spec: GraphSpec, opset: int) -> "onnx.ModelProto":
    """Export one graph with torch's dynamo-based exporter; dynamic axes named as in ``spec.dynamic``."""
    with _quiet_export(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            spec.module.eval(), tuple(spec.inputs.values()), dynamo=True, opset_version=opset, verbose=False,
            input_names=list(spec.inputs), output_names=list(spec.outputs), optimize=True,
            dynamic_shapes=tuple(spec.dynamic[name] for name in spec.inputs))
    return program.model_proto


def op_counts(model: "onnx.ModelProto") -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def slim(model: "onnx.ModelProto") -> tuple["onnx.ModelProto", dict]:
    """Clean a graph with onnxslim (constant folding, dead-node removal, shape-op simplification, pattern fusion)
    and report what it changed, op by op."""
    before = op_counts(model)
    # no_shape_infer: torch's exporter has annotated the shapes already, the result is the same on our graphs,
    # and onnxslim's fallback inference serialises the graph, which fails past 2 GiB (the SD 1.5 U-Net in fp32)
    slimmed = onnxslim.slim(model, no_shape_infer=True)
    after = op_counts(slimmed)
    return slimmed, {"nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
                     "removed": dict(sorted((before - after).items())), "added": dict(sorted((after - before).items()))}


def slim_summary(report: dict, most: int = 4) -> str:
    """One line of what onnxslim changed: the ops it removed (and added), most frequent first."""
    def ops(counts: dict) -> str:
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{op} {n}" for op, n in top[:most]) + (", ..." if len(top) > most else "")
    parts = [f"removed {ops(report['removed'])}" if report["removed"] else "removed nothing"]
    if report["added"]:
        parts.append(f"added {ops(report['added'])}")
    return "; ".join(parts)


def save(model: "onnx.ModelProto", path: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> str | None:
    """Write ``path``; weights go to ``path.name + '.data'`` beside it when they pass ``external_data_bytes``.
    Returns the external data file's name, or None."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    weights = sum(t.ByteSize() for t in model.graph.initializer)  # model.ByteSize() itself fails past 2 GiB
    if weights <= external_data_bytes:
        onnx.save(model, str(path))
        return None
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    return data.name


def sha256_files(*paths: Path) -> str:
    """sha256 over the bytes of ``paths``, in order, read in 16 MiB blocks (engines and graphs pass 2 GB)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


# sha256 of graph files already hashed by this process, keyed by the files' identity and state (device, inode, size,
# modification and change times): a load verifies the graphs (``read_manifest``) and the tensorrt backend keys its
# engines by the same hash (``file_hash``), so a 1.6 GB U-Net is read once per load, not once per use. Any write,
# rename onto the path or truncation changes the key.
_HASHED: dict[tuple, str] = {}


def _identity(paths: tuple[Path, ...]) -> tuple:
    stats = [p.stat() for p in paths]
    return tuple((str(p.resolve()), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                 for p, s in zip(paths, stats))


def _hash_once(*paths: Path) -> str:
    key = _identity(paths)
    if key not in _HASHED:
        _HASHED[key] = sha256_files(*paths)
    return _HASHED[key]


def file_hash(path: Path) -> str:
    """sha256 of an ONNX file and its external data file, if any: what the manifest records and an engine is
    keyed by."""
    data = path.with_name(path.name + ".data")
    return _hash_once(path, *([data] if data.is_file() else []))


def io_description(model: "onnx.ModelProto") -> tuple[list[dict], list[dict]]:
    def describe(values):
        return [{"name": v.name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values]
    return describe(model.graph.input), describe(model.graph.output)


def ort_session(path: Path, providers: list | None = None) -> "onnxruntime.InferenceSession":
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every fp16 node it runs through a cast on CPU
    # torch runs the scheduler between graph calls: ORT threads spinning after each run would steal its cores
    # (measured on 2 cores: a U-Net run + a torch matmul took 4.0 ms spinning, 2.7 ms not)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers or ["CPUExecutionProvider"]
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    asked = [p if isinstance(p, str) else p[0] for p in providers]
    # ORT only warns when the CUDA provider fails to load (a CPU build, missing CUDA / cuDNN libraries) and runs
    # the whole graph on the CPU instead
    if "CUDAExecutionProvider" in asked and "CUDAExecutionProvider" not in session.get_providers():
        raise ExportError(f"ONNX Runtime did not load its CUDAExecutionProvider for {path.name} and would run it on "
                          f"the CPU; {cuda_provider_help()}")
    return session


def cuda_provider_help() -> str:
    """What a missing or unloadable CUDA provider needs: the providers and ORT distributions installed, the fix."""
    import importlib.metadata

    installed = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "this machine's CUDA"
    # both wheels write the same onnxruntime/ folder: uninstall both, or the GPU one is left broken
    return (f"available providers: {', '.join(onnxruntime.get_available_providers())}; installed: "
            f"{' and '.join(installed) or 'neither onnxruntime nor onnxruntime-gpu'}. Fix: pip uninstall -y "
            f"onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (the build for {cuda}, with its cuDNN), "
            "or load with device='cpu'")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@torch.inference_mode()
def check(spec: GraphSpec, path: Path, dtype: str, inputs: dict[str, torch.Tensor] | None = None) -> dict:
    """Run the graph on ONNX Runtime's CPU provider and the torch module on the same inputs; raise ExportError
    when any output's relative error passes the dtype's tolerance. Default inputs: batch 3, a 16x24 latent and a
    two-chunk context, all unlike the export's example, so a wrongly frozen axis shows up here."""
    if inputs is None:
        inputs = spec.example(3, (16, 24), 154, seed=1)
    session = ort_session(path)
    got = session.run(list(spec.outputs), {name: t.numpy() for name, t in inputs.items()})
    want = spec.module(*inputs.values())
    want = want if isinstance(want, tuple) else (want,)
    errors = {name: rel_err(torch.from_numpy(g), w) for name, g, w in zip(spec.outputs, got, want)}
    tolerance = TOLERANCE[dtype]
    report = {"rel_err": errors, "tolerance": tolerance, "provider": "CPUExecutionProvider",
              "shapes": {name: list(t.shape) for name, t in inputs.items()}}
    bad = {name: err for name, err in errors.items() if not err < tolerance}  # NaN fails too
    if bad:
        raise ExportError(f"{path.name} does not match the torch model on ONNX Runtime (CPU): relative error "
                          f"{bad} over the {dtype} tolerance {tolerance}")
    return report


def export_network(spec: GraphSpec, folder: Path, opset: int, dtype: str, *, check_graph: bool = True,
                   external_data_bytes: int = EXTERNAL_DATA_BYTES) -> NetworkReport:
    start = time.perf_counter()
    model, slim_report = slim(to_onnx(spec, opset))
    path = folder / f"{spec.name}.onnx"
    external = save(model, path, external_data_bytes)
    export_s = time.perf_counter() - start
    inputs, outputs = io_description(model)
    report = check(spec, path, dtype) if check_graph else {}
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())
    return NetworkReport(path.name, file_hash(path), size, external, inputs, outputs, slim_report, report,
                         round(export_s, 2))


# -- the whole pipeline, the manifest, and reading it back --


def weights_hash(pipe) -> str:
    """sha256 over the three networks' configs and parameters (names, dtypes, shapes, bytes): the model hash of
    the manifest and the key of the on-the-fly export cache. Independent of where or how the weights were stored."""
    h = hashlib.sha256()
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        net = getattr(pipe, name)
        if net is None:  # SD 1.x / 2.x: no second encoder; the SDXL refiner: no first
            continue
        h.update(json.dumps([name, dataclasses.asdict(net.config)], sort_keys=True).encode())
        for key, t in sorted(net.state_dict().items()):
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    import importlib.metadata

    import onnxscript

    return {"sdfast": importlib.metadata.version("sdfast"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxslim": onnxslim.__version__,
            "onnxruntime": onnxruntime.__version__}


def _dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.float16: "fp16"}
    if dtype not in names:
        raise ExportError(f"ONNX export supports fp32 and fp16, not {dtype}: load the model with dtype='fp16' "
                          "or 'fp32'")
    return names[dtype]


def export_pipeline(pipe, folder, *, opset: int = DEFAULT_OPSET, check_graphs: bool = True,
                    external_data_bytes: int = EXTERNAL_DATA_BYTES, networks=None, model_hash: str | None = None,
                    log=None) -> dict:
    """Export a loaded torch ``Pipeline`` (on the CPU, in fp32 or fp16) to ``folder``: one ONNX file per network
    (``networks``, default all of the pipeline's), the tokenizer(s), the scheduler config and ``manifest.json``.
    Each graph is slimmed, then checked on ONNX Runtime against the torch model (``check_graphs``). Returns the
    manifest. ``log(line)`` hears about each network; ``model_hash`` saves hashing the weights again when the
    caller has done it."""
    require_onnx()
    dtype = _dtype_name(pipe.dtype)
    if pipe.device.type != "cpu":
        raise ExportError(f"export runs on the CPU; load the model with device='cpu' (it is on {pipe.device})")
    if not MIN_OPSET <= opset:
        raise ExportError(f"opset {opset} is not supported: torch's exporter writes opset {MIN_OPSET} and up "
                          f"(GroupNormalization needs {DEFAULT_OPSET})")
    present = pipeline_networks(pipe)
    networks = present if networks is None else networks
    unknown = set(networks) - set(present)
    if unknown:
        raise ExportError(f"unknown network(s) {sorted(unknown)}; this pipeline has {', '.join(present)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # a half-written folder never looks complete
    reports = {}
    for spec in graph_specs(pipe):
        if spec.name not in networks:
            continue
        reports[spec.name] = export_network(spec, folder, opset, dtype, check_graph=check_graphs,
                                            external_data_bytes=external_data_bytes)
        if log:
            r = reports[spec.name]
            err = max(r.check["rel_err"].values()) if r.check else float("nan")
            log(f"{r.file}: {r.bytes / 2**20:.1f} MiB, {r.slim['nodes_before']} -> {r.slim['nodes_after']} nodes "
                f"after onnxslim ({slim_summary(r.slim)}), rel. error {err:.1e} on ONNX Runtime, {r.export_s:.1f} s")
    tokenizers = {name: tok for name, tok in (("tokenizer", pipe.tokenizer), ("tokenizer_2", pipe.tokenizer_2))
                  if tok is not None}
    for name, tokenizer in tokenizers.items():
        tokenizer.save(folder / name)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(pipe.scheduler_config, indent=1))
    manifest = {
        "format": FORMAT,
        "model_hash": model_hash or weights_hash(pipe),
        "dtype": dtype,
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True) + onnxslim",
        "configs": {name: dataclasses.asdict(getattr(pipe, name).config)
                    for name in ("text_encoder", "text_encoder_2", "unet", "vae") if getattr(pipe, name) is not None},
        **{name: name for name in tokenizers},  # folders beside the graphs, so the export loads with no checkpoint
        "text_final_norm": text_final_norm(pipe),  # False: the hidden states are raw (SDXL)
        "options": pipe.options,  # SDXL's force_zeros_for_empty_prompt / requires_aesthetics_score
        "scheduler_config": "scheduler/scheduler_config.json",
        "networks": {name: dataclasses.asdict(r) for name, r in reports.items()},
        "tools": tool_versions(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder, *, verify: bool = True) -> dict:
    """The manifest of an export folder, checked for the format and the files it names, and (``verify``) each
    graph's files against the size and sha256 the manifest recorded when they were written: an ExportError names a
    graph that was changed, truncated or overwritten since (``verify_graphs``)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder} has no {MANIFEST}: not a folder written by `sdfast export` (or the export "
                          "did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): export the model again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise ExportError(f"{path} has format {found!r:.60}, this sdfast reads {FORMAT!r}: export the model again")
    try:
        files = [net["file"] for net in manifest["networks"].values()] + [manifest["scheduler_config"]]
        for net in manifest["networks"].values():
            if not (isinstance(net["sha256"], str) and isinstance(net["bytes"], int)):
                raise TypeError("sha256 / bytes")
    except (KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{path} is malformed ({type(e).__name__}: {e}): export the model again") from e
    for file in files:
        if not (folder / file).exists():
            raise ExportError(f"{folder / file} is missing (named in {path}): export the model again")
    try:  # the scheduler config within sdfast.checkpoint.BOUNDS, as when a checkpoint loads
        from sdfast.checkpoint import check_scheduler_config, read_json

        check_scheduler_config(read_json(folder / manifest["scheduler_config"]), str(folder / manifest[
            "scheduler_config"]), "correct it in that file, or export the model again")
    except ValueError as e:
        raise ExportError(str(e)) from e
    if verify:
        verify_graphs(folder, manifest)
    return manifest


def graph_files(folder: Path, net: dict) -> list[Path]:
    """A graph's files as its manifest entry names them: NAME.onnx, and NAME.onnx.data when weights went there."""
    path = Path(folder) / net["file"]
    return [path] + ([path.with_name(net["external_data"])] if net.get("external_data") else [])


def verify_graphs(folder, manifest: dict) -> None:
    """Each graph's files against the manifest: their total size (a cheap first look that catches truncation),
    then their sha256, read once per process (``file_hash``). An ExportError names the file and the fix."""
    folder = Path(folder)
    for name, net in manifest["networks"].items():
        files = graph_files(folder, net)
        named = " + ".join(f.name for f in files)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{missing[0]} is missing (named in {folder / MANIFEST}): export the model again "
                              f"(sdfast export MODEL -o {folder})")
        size = sum(f.stat().st_size for f in files)
        if size != net["bytes"]:
            raise ExportError(f"{folder / net['file']}: {named} {'hold' if len(files) > 1 else 'holds'} "
                              f"{size:,} bytes, not the {net['bytes']:,} that "
                              f"{MANIFEST} recorded (truncated or overwritten since the export): export the model "
                              f"again (sdfast export MODEL -o {folder})")
        if file_hash(files[0]) != net["sha256"]:
            raise ExportError(f"{folder / net['file']}: the sha256 of {named} is not the one {MANIFEST} recorded "
                              f"(changed since the export): export the model again (sdfast export MODEL -o "
                              f"{folder})")


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float = LOCK_TIMEOUT_S, what: str = "writing here", log=None):
    """An exclusive ``fcntl.flock`` on ``path`` (created if need be), held for the ``with`` block: one process at a
    time writes a cache entry, and the others wait, then find it written. The lock dies with its process, so a
    crashed writer never leaves it held. A wait past ``timeout`` seconds is an ExportError naming the holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if fcntl is None:  # no flock here (Windows): unguarded
            yield
            return
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    raise ExportError(f"waited {timeout:g} s for {path}: {holder} is still {what}; wait for it "
                                      "to finish and try again (the lock goes when that process ends)") from None
                if log and not told:
                    log(f"waiting for {holder}, which is {what} ({path})")
                    told = True
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {os.uname().nodename}")
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def _private_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new empty folder with a unique name under ``parent``, with the permissions of a plain ``mkdir``."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    return folder


def replace_folder(new: Path, folder: Path) -> None:
    """Put folder ``new`` at ``folder``'s path by renames only (``folder``, if there, is moved aside under a unique
    name first and then deleted), so the path never shows a half-written folder."""
    old = None
    if folder.exists():
        old = folder.with_name(f"{folder.name}.{uuid.uuid4().hex[:8]}.old")
        folder.rename(old)
    new.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cache_folder(cache_dir, model_hash: str, dtype: str, opset: int) -> Path:
    """The cache entry of a model: ``CACHE/HASH-DTYPE-opsetN``; its lock is the ``.lock`` file beside it."""
    return Path(cache_dir).expanduser() / f"{model_hash[:20]}-{dtype}-opset{opset}"


def cached_export(pipe, cache_dir, *, opset: int = DEFAULT_OPSET, log=None,
                  lock_timeout: float = LOCK_TIMEOUT_S) -> Path:
    """The export folder of ``pipe`` under ``cache_dir``, keyed by its weights, dtype and opset: exported (and
    checked) the first time, reused after.

    - A cached entry is verified before it is used: every graph's size and sha256 against its manifest.
    - An entry that fails (changed or truncated graph, unreadable manifest, no manifest) is exported again, once,
      with a warning naming what was wrong; if the new one fails too, that is an ExportError.
    - An export is written to a folder of its own (a unique temporary name beside the entry) and renamed into place
      when complete, so the entry's path never holds a partial export.
    - A file lock (``ENTRY.lock``) makes one process at a time check or write an entry: two processes loading one
      model into an empty cache export it once; the second waits (up to ``lock_timeout`` seconds), then finds the
      finished entry and uses it.
    """
    require_onnx()
    model_hash = weights_hash(pipe)
    dtype = _dtype_name(pipe.dtype)
    folder = cache_folder(cache_dir, model_hash, dtype, opset)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(folder.name + ".lock")
    with file_lock(lock, timeout=lock_timeout, what=f"exporting {folder.name}", log=log):
        problem = _cache_problem(folder)
        if problem is None:
            return folder
        # leftovers of writers that died (the lock is ours, so no one else is writing them)
        for stale in (*folder.parent.glob(f"{folder.name}.*.partial"), *folder.parent.glob(f"{folder.name}.*.old"),
                      folder.with_name(folder.name + ".partial")):
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():
            warnings.warn(f"the cached ONNX export {folder} is unusable ({problem}); exporting it again",
                          RuntimeWarning, stacklevel=2)
        partial = _private_dir(folder.parent, f"{folder.name}.", ".partial")
        try:
            export_pipeline(pipe, partial, opset=opset, model_hash=model_hash, log=log)
            replace_folder(partial, folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        problem = _cache_problem(folder)
        if problem is not None:
            raise ExportError(f"the cached ONNX export {folder} was exported again and is still unusable "
                              f"({problem}): is the disk full or failing? Delete {folder} and try again")
    return folder


def _cache_problem(folder: Path) -> str | None:
    """What makes a cache entry unusable ("no manifest", a graph that does not match it...), or None."""
    if not folder.exists():
        return "not exported yet"
    try:
        read_manifest(folder, verify=True)
    except (ExportError, OSError) as e:
        return str(e)
    return None
