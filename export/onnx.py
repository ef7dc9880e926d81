"""ONNX export of the networks ``sdfast.export.graphs`` describes: each graph exported with torch's exporter,
cleaned with onnxslim, checked on ONNX Runtime's CPU provider against the torch model, and described by a
``manifest.json`` that lets the folder load on its own; and the on-the-fly export cache, keyed by the weights.

Memory: a graph's weights are never held twice. The exporter streams them from the torch tensors into a scratch
external-data file; onnxslim works on the graph with them left there (it reads only the constants under 1 MiB, the
ones it folds or inspects); the saved graph gets them streamed from that file, one tensor at a time, into
``NAME.onnx.data`` (or inline, under 2 GB). Exporting a network thus costs the loaded pipeline plus little more;
the parity check adds the torch reference's activations and ONNX Runtime's session (README: measured peaks).

Parity check (``check``): each graph on ONNX Runtime's CPU provider against the torch model on inputs unlike the
export's example. The torch reference runs on a CUDA GPU in the graph's dtype when there is one, else on the CPU in
fp32 (an fp16 graph is then held to the fp16 tolerance against the fp32 model): fp16 convolutions on a CPU are orders
of magnitude slower than fp32 ones (an SD 1.5 VAE decoder's check took over 40 minutes in fp16).

The exporter is torch's default, ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript): at opset >= 21
it writes GroupNorm as one ``GroupNormalization`` node (with per-channel scale and bias) and shape arithmetic as a
handful of ops; older opsets get the decomposed form (Reshape + InstanceNormalization + Mul + Add). The legacy
TorchScript exporter (``dynamo=False``) is about 25x faster on the tiny test models but decomposes GroupNorm at every
opset and needs twice the nodes; see the README.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import itertools
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

from .graphs import GraphSpec, graph_specs, pipeline_networks, text_final_norm
from .weights import locate

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
DEFAULT_OPSET = 21  # the first opset with GroupNormalization-21 (per-channel scale and bias)
MIN_OPSET = 18  # torch's dynamo exporter writes opset 18 and up
# Relative L2 error of each graph on ONNX Runtime (CPU) against the torch reference. fp32 graphs measure ~1e-6;
# fp16 ones up to ~2e-3 (against the fp32 reference, or an fp16 one on a GPU), as ORT upcasts the ops it has no
# fp16 kernel for.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# Graphs whose weights pass this keep them in ``NAME.onnx.data``, streamed there one tensor at a time. A one-file
# graph is built and serialised whole in memory, twice its weights (measured: the SD 1.5 fp16 U-Net, 1.6 GiB in one
# file, peaked at 7.5 GiB; the 4.8 GiB SDXL U-Net with external data at 6.1 GiB), and protobuf cannot serialise one
# past 2 GiB at all; under 512 MiB (the SD 1.5 text encoder, the VAE halves) one file is simpler and costs little.
EXTERNAL_DATA_BYTES = 2**29
# Constants under this size are read into the graph before onnxslim runs (it inspects biases, shapes, scalars);
# larger ones (the weights) stay on disk while it works.
SLIM_INLINE_BYTES = 2**20
# Memory the parity check needs beyond the loaded pipeline, per byte of graph, measured on SD 1.5 on a CPU: ONNX
# Runtime holds an fp16 graph and the fp32 casts of its weights (and the fp32 reference of an fp16 network is twice
# its weights, at another time); an fp32 graph about once. ``check_memory_problem`` skips a check that would not fit.
CHECK_MEMORY = {"fp16": 3.0, "fp32": 1.5}
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
    slim: dict  # {"nodes_before", "nodes_after", "removed": {op: n}, "added": {op: n}[, "skipped": why]}
    check: dict | None  # {"rel_err": {output: err}, "tolerance", "provider", "reference", "shapes"}; None: unchecked
    export_s: float  # torch's exporter, onnxslim and the save
    check_s: float | None
    peak_rss_bytes: int | None  # the process's peak resident memory while this network was exported and checked
    # where LoRAs write: {module path: [initializer, transposed, shape]} (sdfast.export.weights); text encoders and
    # U-Net only
    weights: dict | None = None


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


def to_onnx(spec: GraphSpec, opset: int, path: Path) -> "onnx.ModelProto":
    """Export one graph with torch's dynamo-based exporter (dynamic axes named as in ``spec.dynamic``) to ``path``,
    every weight streamed from the torch tensors into ``path.name + '.data'``. Returns the graph with its weights
    left in that file, the constants under SLIM_INLINE_BYTES read in (``save`` streams the rest)."""
    with _quiet_export(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            spec.module.eval(), tuple(spec.inputs.values()), dynamo=True, opset_version=opset, verbose=False,
            input_names=list(spec.inputs), output_names=list(spec.outputs), optimize=True,
            dynamic_shapes=tuple(spec.dynamic[name] for name in spec.inputs))
        program.save(str(path), external_data=True)
    del program  # (its ONNX model shares the torch tensors: nothing large is freed, but nothing is kept either)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in _tensors(model):
        if _external(tensor) and _nbytes(tensor) < SLIM_INLINE_BYTES:
            _set_inline(tensor, _read_external(tensor, path.parent))
    return model


def op_counts(model: "onnx.ModelProto") -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def slim(model: "onnx.ModelProto") -> tuple["onnx.ModelProto", dict]:
    """Clean a graph with onnxslim (constant folding, dead-node removal, shape-op simplification, pattern fusion)
    and report what it changed, op by op. A graph from ``to_onnx`` keeps its weights on disk meanwhile; should
    onnxslim need the values of one of them, the graph is left as it was and the report says why."""
    before = op_counts(model)
    try:
        # no_shape_infer: torch's exporter has annotated the shapes already, the result is the same on our graphs,
        # and onnxslim's fallback inference serialises the graph, which fails past 2 GiB (the SD 1.5 U-Net in fp32)
        slimmed = onnxslim.slim(model, no_shape_infer=True)
    except (onnx.checker.ValidationError, OSError) as e:  # it tried to read a weight left in the external data
        return model, {"nodes_before": sum(before.values()), "nodes_after": sum(before.values()), "removed": {},
                       "added": {}, "skipped": f"onnxslim needed a weight over {SLIM_INLINE_BYTES >> 20} MiB, which "
                       f"stays on disk to bound memory ({str(e)[:200]})"}
    after = op_counts(slimmed)
    return slimmed, {"nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
                     "removed": dict(sorted((before - after).items())), "added": dict(sorted((after - before).items()))}


def slim_summary(report: dict, most: int = 4) -> str:
    """One line of what onnxslim changed: the ops it removed (and added), most frequent first."""
    def ops(counts: dict) -> str:
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{op} {n}" for op, n in top[:most]) + (", ..." if len(top) > most else "")
    if report.get("skipped"):
        return f"onnxslim skipped: {report['skipped']}"
    parts = [f"removed {ops(report['removed'])}" if report["removed"] else "removed nothing"]
    if report["added"]:
        parts.append(f"added {ops(report['added'])}")
    return "; ".join(parts)


def save(model: "onnx.ModelProto", path: Path, base_dir: Path | None = None,
         external_data_bytes: int = EXTERNAL_DATA_BYTES) -> str | None:
    """Write ``path``: one file when the weights total at most ``external_data_bytes``, else every tensor of 1 KiB or
    more in ``path.name + '.data'`` beside it. Weights that ``model`` keeps in external data under ``base_dir`` (as
    ``to_onnx`` leaves them) are copied from there one tensor at a time, never all in memory. Returns the external
    data file's name, or None."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    tensors = list(_tensors(model))
    if sum(_nbytes(t) for t in tensors) <= external_data_bytes:  # model.ByteSize() itself fails past 2 GiB
        for tensor in tensors:
            if _external(tensor):
                _set_inline(tensor, _read_external(tensor, base_dir))
        onnx.save(model, str(path))
        return None
    with open(data, "wb") as f:
        for tensor in tensors:
            if _external(tensor):
                raw = _read_external(tensor, base_dir)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                raw = tensor.raw_data
            else:
                continue
            offset = f.tell()
            f.write(raw)
            # ONNX Runtime maps unaligned offsets too (onnx_ir packs densely for the same reason)
            _set_external(tensor, data.name, offset, len(raw))
            del raw
    onnx.save(model, str(path))
    return data.name


def _tensors(model: "onnx.ModelProto"):
    """Every tensor of a graph: initializers and those in node attributes (``Constant``), subgraphs included."""
    return onnx.external_data_helper._get_all_tensors(model)


def _external(tensor) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _nbytes(tensor) -> int:
    if _external(tensor):
        return int(onnx.external_data_helper.ExternalDataInfo(tensor).length)
    return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()


def _read_external(tensor, base_dir: Path) -> bytes:
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    with open(Path(base_dir) / info.location, "rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length)


def _set_inline(tensor, raw: bytes) -> None:
    del tensor.external_data[:]
    tensor.ClearField("data_location")  # unset, as a tensor the exporter wrote inline (not DEFAULT: 2 more bytes)
    tensor.raw_data = raw


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


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


def ort_session(path: Path, providers: list | None = None, *, lean: bool = False,
                initializers: dict | None = None) -> "onnxruntime.InferenceSession":
    """An ONNX Runtime session for ``path``; ``initializers`` ({name: OrtValue}, kept alive by the caller) replace
    those of the file (LoRAs: no new export). ``lean``: for a one-off run (the export's check), basic graph
    optimisations only, so ORT does not fold the fp32 casts of an fp16 graph's weights into a second set of weights
    (and prepack them), and no memory arena keeping the run's peak: on the SD 1.5 fp16 U-Net, a peak of 4.6 GB
    instead of 5.7 GB (6.5 GB without the arena)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every fp16 node it runs through a cast on CPU
    # torch runs the scheduler between graph calls: ORT threads spinning after each run would steal its cores
    # (measured on 2 cores: a U-Net run + a torch matmul took 4.0 ms spinning, 2.7 ms not)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lean:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.enable_cpu_mem_arena = False
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    # ORT 1.32's NCHWc layout transformer (CPU, ENABLE_ALL) reorders a convolution's weights from the file's
    # initializer, not the override: outputs as if nothing were overridden (measured on the tiny U-Net's 1x1 convs)
    disabled = ["NchwcTransformer"] if initializers else None
    providers = providers or ["CPUExecutionProvider"]
    session = onnxruntime.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)
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


def reference_device() -> torch.device:
    """Where ``check`` runs the torch reference: a CUDA GPU when there is one (in the graph's dtype), else the CPU in
    fp32, as fp16 convolutions on a CPU are orders of magnitude slower than fp32 ones."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def _moved(module: nn.Module, device: torch.device, dtype: torch.dtype):
    """``module`` with its floating-point weights on ``device`` in ``dtype`` for the ``with`` block, then with the very
    tensors it had (same storage: weights mapped from a safetensors file stay mapped, not copied). The module's own
    parameters are converted, so there is no second module: besides the converted weights, only the originals are
    held (free when they are mapped from the checkpoint, as an fp16 model loaded in fp16 is). Nothing else may use
    the module meanwhile."""
    moved = []
    try:
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.is_floating_point() and (t.device != device or t.dtype != dtype):
                moved.append((t, t.data))
                t.data = t.data.to(device, dtype)
        yield module
    finally:
        for t, original in moved:
            t.data = original
        del moved
        _release_memory()


@torch.no_grad()  # not inference_mode: the weights converted and restored here must stay ordinary tensors
def check(spec: GraphSpec, path: Path, inputs: dict[str, torch.Tensor] | None = None, *,
          device: str | torch.device | None = None) -> dict:
    """Run the graph on ONNX Runtime's CPU provider and the torch module on the same inputs; raise ExportError
    when any output's relative error passes the tolerance of the graph's dtype.

    The torch reference runs on ``device`` (default ``reference_device()``): on a GPU in the graph's dtype, on the
    CPU in fp32 (the graph's fp16 inputs upcast exactly, the fp16 tolerance kept). It runs before ONNX Runtime loads
    the graph, so an fp16 network's fp32 weights and the session are not in memory together. Default inputs: batch
    3, a 16x24 latent and a two-chunk context, all unlike the export's example, so a wrongly frozen axis shows up
    here, and small, so the check takes seconds at any model size."""
    if inputs is None:
        inputs = spec.example(3, (16, 24), 154, seed=1)
    device = torch.device(device) if device is not None else reference_device()
    ref_dtype = spec.dtype if device.type == "cuda" else torch.float32
    upcast = ref_dtype != spec.dtype
    with _moved(spec.module, device, ref_dtype) as module:
        # fp32 inputs (the timestep, SDXL's time_ids) stay fp32; the graph's own dtype goes to the reference's
        args = [(t.float() if upcast and t.is_floating_point() else t).to(device) for t in inputs.values()]
        want = module(*args)
        want = [w.cpu() for w in (want if isinstance(want, tuple) else (want,))]
        del args
    session = ort_session(path, lean=True)
    got = session.run(list(spec.outputs), {name: t.numpy() for name, t in inputs.items()})
    del session
    _release_memory()
    errors = {name: rel_err(torch.from_numpy(g), w) for name, g, w in zip(spec.outputs, got, want)}
    dtype = _dtype_name(spec.dtype)
    tolerance = TOLERANCE[dtype]
    reference = f"torch {_dtype_name(ref_dtype)} on {device.type}"
    report = {"rel_err": errors, "tolerance": tolerance, "provider": "CPUExecutionProvider", "reference": reference,
              "shapes": {name: list(t.shape) for name, t in inputs.items()}}
    bad = {name: err for name, err in errors.items() if not err < tolerance}  # NaN fails too
    if bad:
        raise ExportError(f"{path.name} does not match the torch model on ONNX Runtime (CPU): relative error "
                          f"{bad} over the {dtype} tolerance {tolerance} (reference: {reference})")
    return report


def export_network(spec: GraphSpec, folder: Path, opset: int, *, check_graph: bool = True,
                   external_data_bytes: int = EXTERNAL_DATA_BYTES) -> NetworkReport:
    """Export, slim, save and (``check_graph``) check one graph as ``folder/NAME.onnx``; the torch exporter writes
    into a scratch folder beside it, removed after."""
    _release_memory()  # what loading the model or the network before freed, so the peak below is this network's
    _reset_peak_rss()
    start = time.perf_counter()
    path = folder / f"{spec.name}.onnx"
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".export", dir=folder))
    try:
        model = to_onnx(spec, opset, scratch / path.name)
        model, slim_report = slim(model)
        external = save(model, path, scratch, external_data_bytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    inputs, outputs = io_description(model)
    del model
    _release_memory()
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())
    report, check_s = None, None
    if check_graph:
        too_big = check_memory_problem(spec, size)
        report = {"skipped": too_big} if too_big else check(spec, path)
        check_s = time.perf_counter() - start
    return NetworkReport(path.name, file_hash(path), size, external, inputs, outputs, slim_report, report,
                         round(export_s, 2), check_s and round(check_s, 2), peak_rss())


def check_memory_problem(spec: GraphSpec, graph_bytes: int) -> str | None:
    """Why checking a graph of ``graph_bytes`` would not fit in the memory this machine has available now, or
    None. The check needs about CHECK_MEMORY[dtype] bytes per graph byte beyond the loaded pipeline, plus 1 GiB
    for the activations at its small shapes; Linux's MemAvailable counts the pipeline's weights mapped from the
    checkpoint as reclaimable, as they are."""
    available = _available_memory()
    dtype = _dtype_name(spec.dtype)
    need = CHECK_MEMORY[dtype] * graph_bytes + 2**30
    if available is None or need <= available:
        return None
    return (f"the check of this {graph_bytes / 2**30:.1f} GiB {dtype} graph needs about {need / 2**30:.1f} GiB "
            f"more and {available / 2**30:.1f} GiB is available; it was not run: free memory, or export on a machine "
            "with more (the graph is written, unchecked)")


def _available_memory() -> int | None:
    """Linux's MemAvailable in bytes (free memory plus what the kernel can reclaim), or None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _release_memory() -> None:
    """Hand freed memory back to the system: glibc keeps freed blocks under 32 MiB (most weights and activations)
    in its heap, so without this each network's peak would sit under the next one's (measured: 5.9 GB resident
    after the SD 1.5 fp16 U-Net's check, for a 2.2 GB pipeline)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _reset_peak_rss() -> None:
    """Start a new peak of ``peak_rss`` (Linux: writing 5 to clear_refs resets VmHWM; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux; None elsewhere): since it started, or since the
    current network's export began (``export_network`` resets it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


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


def network_summary(r: NetworkReport) -> str:
    """One line of what exporting a network did: size, onnxslim, parity, time and peak memory."""
    if r.check and r.check.get("skipped"):
        checked = f"check skipped: {r.check['skipped']}"
    elif r.check:
        err = max(r.check["rel_err"].values())
        checked = f"rel. error {err:.1e} on ONNX Runtime against {r.check['reference']}, check {r.check_s:.1f} s"
    else:
        checked = "not checked against torch"
    peak = f", peak RSS {r.peak_rss_bytes / 2**30:.1f} GiB" if r.peak_rss_bytes else ""
    return (f"{r.file}: {r.bytes / 2**20:.1f} MiB, {r.slim['nodes_before']} -> {r.slim['nodes_after']} nodes after "
            f"onnxslim ({slim_summary(r.slim)}), export {r.export_s:.1f} s, {checked}{peak}")


LORA_NETWORKS = ("unet", "text_encoder", "text_encoder_2")  # what LoRAs patch: their weights are located for them


def export_pipeline(pipe, folder, *, opset: int = DEFAULT_OPSET, check_graphs: bool = True,
                    external_data_bytes: int = EXTERNAL_DATA_BYTES, networks=None, model_hash: str | None = None,
                    log=None) -> dict:
    """Export a loaded torch ``Pipeline`` (on the CPU, in fp32 or fp16) to ``folder``: one ONNX file per network
    (``networks``, default all of the pipeline's), the tokenizer(s), the scheduler config and ``manifest.json``.
    Each graph is slimmed, then checked on ONNX Runtime against the torch model (``check_graphs``; off, the graphs
    are written unchecked and the manifest's ``check`` entries are null). Returns the manifest. ``log(line)`` hears
    about each network; ``model_hash`` saves hashing the weights again when the caller has done it."""
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
        reports[spec.name] = export_network(spec, folder, opset, check_graph=check_graphs,
                                            external_data_bytes=external_data_bytes)
        if spec.name in LORA_NETWORKS:
            reports[spec.name].weights = locate(folder / reports[spec.name].file, getattr(pipe, spec.name))
        if log:
            log(network_summary(reports[spec.name]))
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
        "options": pipe.xl_options,  # SDXL's force_zeros_for_empty_prompt / requires_aesthetics_score
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
