"""ONNX export of the networks ``sdfast.export.graphs`` describes: each graph exported with torch's exporter,
cleaned with onnxslim, checked on ONNX Runtime against the torch model (``sdfast.export.check``), and described by a
``manifest.json`` (``sdfast.export.manifest``) that lets the folder load on its own (``export_pipeline``). The
on-the-fly export cache is ``sdfast.export.cache``.

Memory: a graph's weights are never held twice. The exporter streams them from the torch tensors into a scratch
external-data file; onnxslim works on the graph with them left there (it reads only the constants under 1 MiB, the
ones it folds or inspects); the saved graph gets them streamed from that file, one tensor at a time, into
``NAME.onnx.data`` (or inline, under 2 GB; ``sdfast.export.external_data``). Exporting a network thus costs the
loaded pipeline plus little more; so does its parity check (``sdfast.export.check``: the reference converts one layer
at a time, and the network waits on disk while ONNX Runtime maps the graph; README: measured peaks).

The exporter is torch's default, ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript): at opset >= 21
it writes GroupNorm as one ``GroupNormalization`` node (with per-channel scale and bias) and shape arithmetic as a
handful of ops; older opsets get the decomposed form (Reshape + InstanceNormalization + Mul + Add). The legacy
TorchScript exporter (``dynamo=False``) is about 25x faster on the tiny test models but decomposes GroupNorm at every
opset and needs twice the nodes; see the README.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdfast.files import write_atomically

from .check import check, check_memory_problem
from .errors import ExportError
from .external_data import EXTERNAL_DATA_BYTES, inline_below, save
from .files import file_hash
from .graphs import (
    GraphSpec,
    controlled_unet_spec,
    controlnet_spec,
    dtype_name,
    graph_specs,
    pipeline_networks,
    text_final_norm,
)
from .manifest import FORMAT, MANIFEST, module_hash, read_manifest, weights_hash
from .memory import peak_rss, release_memory, reset_peak_rss
from .session import HAS_ONNXRUNTIME
from .weights import locate

try:
    import onnx
    import onnxslim

    HAS_ONNX = True
except ImportError:  # the `onnx` extra: pip install "sdfast[onnx]"
    HAS_ONNX = False

DEFAULT_OPSET = 21  # the first opset with GroupNormalization-21 (per-channel scale and bias)
MIN_OPSET = 18  # torch's dynamo exporter writes opset 18 and up
# Constants under this size are read into the graph before onnxslim runs (it inspects biases, shapes, scalars);
# larger ones (the weights) stay on disk while it works.
SLIM_INLINE_BYTES = 2**20


def require_onnx(what: str = "ONNX export") -> None:
    """Raises a clear error when the optional ONNX packages are missing (``import sdfast`` never needs them)."""
    missing = [name for name, ok in (("onnx + onnxslim", HAS_ONNX), ("onnxruntime", HAS_ONNXRUNTIME)) if not ok]
    if missing:
        raise ExportError(f"{what} needs {' and '.join(missing)}: pip install \"sdfast[onnx]\"")


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
            dynamic_shapes=_dynamic_shapes(spec))
        program.save(str(path), external_data=True)
        _release_weights(program.model)
    del program
    model = onnx.load(str(path), load_external_data=False)
    inline_below(model, path.parent, SLIM_INLINE_BYTES)
    return model


def _release_weights(model) -> None:
    """Drop the exporter's graph's hold on the torch weights. Its initializers share the weights' memory (the Linear
    weights through NumPy views of detached aliases), and onnxscript 0.7's rewriter keeps the last graph it matched
    referenced from its module-level rules until the next export: the parity check's parking could then not free
    those weights (measured on the SDXL fp32 U-Net: 1.3 of its 9.6 GiB freed, and 21.8 GiB resident once they were
    read back, against 13.5 GiB before the check)."""
    for value in model.graph.initializers.values():
        value.const_value = None


def _dynamic_shapes(spec: GraphSpec) -> tuple:
    """``spec.dynamic`` in the order of the module's arguments, those a ``*rest`` argument takes as one tuple (the
    controlled U-Net's residuals: their number follows the model's config)."""
    shapes = [spec.dynamic[name] for name in spec.inputs]
    params = inspect.signature(spec.module.forward).parameters.values()
    named = sum(p.kind != p.VAR_POSITIONAL for p in params)
    return tuple(shapes) if named == len(params) else (*shapes[:named], tuple(shapes[named:]))


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


def io_description(model: "onnx.ModelProto") -> tuple[list[dict], list[dict]]:
    def describe(values):
        return [{"name": v.name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values]
    return describe(model.graph.input), describe(model.graph.output)


def export_network(spec: GraphSpec, folder: Path, opset: int, *, check_graph: bool = True,
                   external_data_bytes: int = EXTERNAL_DATA_BYTES) -> NetworkReport:
    """Export, slim, save and (``check_graph``) check one graph as ``folder/NAME.onnx``; the torch exporter writes
    into a scratch folder beside it, removed after."""
    release_memory()  # what loading the model or the network before freed, so the peak below is this network's
    reset_peak_rss()
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
    release_memory()
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())
    report, check_s = None, None
    if check_graph:
        too_big = check_memory_problem(spec, size, folder)
        report = {"skipped": too_big} if too_big else check(spec, path)
        check_s = time.perf_counter() - start
    return NetworkReport(path.name, file_hash(path), size, external, inputs, outputs, slim_report, report,
                         round(export_s, 2), check_s and round(check_s, 2), peak_rss())


def tool_versions() -> dict[str, str]:
    import importlib.metadata

    import onnxruntime
    import onnxscript

    return {"sdfast": importlib.metadata.version("sdfast"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxslim": onnxslim.__version__,
            "onnxruntime": onnxruntime.__version__}


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


# what LoRAs patch, by graph: their weights are located for them (the controlled U-Net is the U-Net's second graph)
LORA_NETWORKS = {"unet": "unet", "unet_control": "unet", "text_encoder": "text_encoder",
                 "text_encoder_2": "text_encoder_2"}


def _export_specs(pipe, specs: list[GraphSpec], folder: Path, opset: int, check_graphs: bool,
                  external_data_bytes: int, log) -> dict[str, NetworkReport]:
    reports = {}
    for spec in specs:
        reports[spec.name] = export_network(spec, folder, opset, check_graph=check_graphs,
                                            external_data_bytes=external_data_bytes)
        if spec.name in LORA_NETWORKS:
            reports[spec.name].weights = locate(folder / reports[spec.name].file,
                                                getattr(pipe, LORA_NETWORKS[spec.name]))
        if log:
            log(network_summary(reports[spec.name]))
    return reports


def _export_controlnets(pipe, controlnets, folder: Path, opset: int, check_graphs: bool, external_data_bytes: int,
                        reports: dict, log) -> dict[str, dict]:
    """Export each of ``controlnets`` ({name: ControlNet}, or a mapping that loads each when looked up:
    ``ControlNetFiles``) as ``controlnet_NAME``, one in memory at a time, its report added to ``reports``. Returns
    the manifest's record of each: its network, weights hash and config."""
    entries = {}
    for name in controlnets:
        net = controlnets[name]
        reports.update(_export_specs(pipe, [controlnet_spec(pipe, net, name)], folder, opset, check_graphs,
                                     external_data_bytes, log))
        entries[name] = {"network": f"controlnet_{name}", "hash": module_hash(net),
                         "config": dataclasses.asdict(net.config)}
        del net  # before the next one is loaded
    return entries


def export_pipeline(pipe, folder, *, opset: int = DEFAULT_OPSET, check_graphs: bool = True,
                    external_data_bytes: int = EXTERNAL_DATA_BYTES, networks=None, model_hash: str | None = None,
                    controlnets: Mapping | None = None, log=None) -> dict:
    """Export a loaded torch ``Pipeline`` (on the CPU, in fp32 or fp16) to ``folder``: one ONNX file per network
    (``networks``, default all of the pipeline's), the tokenizer(s), the scheduler config and ``manifest.json``.
    Each graph is slimmed, then checked on ONNX Runtime against the torch model (``check_graphs``; off, the graphs
    are written unchecked and the manifest's ``check`` entries are null). Returns the manifest. ``log(line)`` hears
    about each network; ``model_hash`` saves hashing the weights again when the caller has done it.

    ``controlnets`` ({name: ``ControlNet``} on the CPU in the pipeline's dtype, or ``ControlNetFiles`` to load one
    at a time; ``{}`` for none yet) adds the controlled U-Net ``unet_control`` and one ``controlnet_NAME`` graph
    each; the manifest's ``controlnets`` maps each name to its network, weights hash and config."""
    require_onnx()
    dtype = dtype_name(pipe.dtype)
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
    for name in controlnets or {}:
        _check_controlnet_name(name)
    specs = [spec for spec in graph_specs(pipe) if spec.name in networks]
    if controlnets is not None:
        specs.append(controlled_unet_spec(pipe))
    reports = _export_specs(pipe, specs, folder, opset, check_graphs, external_data_bytes, log)
    del specs
    entries = _export_controlnets(pipe, controlnets or {}, folder, opset, check_graphs, external_data_bytes, reports,
                                  log)
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
        "controlnets": entries,
        "tools": tool_versions(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _check_controlnet_name(name: str) -> None:
    if not (isinstance(name, str) and name and all(c.isalnum() or c in "-_." for c in name)):
        raise ExportError(f"ControlNet name {name!r}: use letters, digits, '-', '_' and '.' only (it names the "
                          "graph file controlnet_NAME.onnx)")


def add_control_graphs(pipe, folder, *, unet: bool = False, controlnets: Mapping | None = None, log=None) -> dict:
    """Add to the complete export ``folder`` the controlled U-Net (``unet``: needs ``pipe``'s torch U-Net) and
    ``controlnets`` ({name: ``ControlNet``}, or ``ControlNetFiles``; ``pipe`` may then be the exported pipeline, only
    its configs are read),
    in the export's opset, each checked against torch; ``manifest.json`` is rewritten whole once they are written.
    The caller holds the folder (the export cache's lock). Returns the new manifest."""
    require_onnx()
    folder = Path(folder)
    manifest = read_manifest(folder, verify=False)
    for name in controlnets or {}:
        _check_controlnet_name(name)
    specs = [controlled_unet_spec(pipe)] if unet else []
    reports = _export_specs(pipe, specs, folder, manifest["opset"], True, EXTERNAL_DATA_BYTES, log)
    del specs
    entries = _export_controlnets(pipe, controlnets or {}, folder, manifest["opset"], True, EXTERNAL_DATA_BYTES,
                                  reports, log)
    manifest["networks"].update({name: dataclasses.asdict(r) for name, r in reports.items()})
    manifest.setdefault("controlnets", {}).update(entries)
    write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest
