"""TensorRT engines from an export folder: the engine cache and the builds (``build_engines``); which TensorRT and
GPU they are for is ``sdfast.export.flavour``, the shapes they serve ``sdfast.export.profiles``.

Engines are built strongly typed, so their precision is the ONNX graphs' (``sdfast export --dtype``); with full
TensorRT, ``fp16=True`` on fp32 graphs also allows the classic mixed-precision build (``BuilderFlag.FP16``).

Each engine sits in ``DIR/engines/NETWORK-KEY.engine`` beside a sidecar ``NETWORK-KEY.json``. KEY hashes what the
engine depends on: the ONNX file's sha256, the optimisation profiles, the precision, the TensorRT flavour and
version, and the GPU (for TensorRT-RTX: its portable target set, see ``gpu``). A build whose key has an engine loads
it instead of building; the sidecar also records the engine's own sha256, so a truncated or altered engine is
refused, and an engine built from another ONNX file, TensorRT or GPU is reported as stale with what differs.
Full TensorRT builds share a timing cache, ``engines/timing-KEY.cache`` (KEY: TensorRT version and GPU).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdfast.files import write_atomically

from .errors import EngineError
from .files import file_hash, file_lock, sha256_files
from .flavour import check_target, device_name, flavour, gpu, tensorrt
from .manifest import read_manifest
from .profiles import Shapes, profiles

ENGINES = "engines"
# How long a build waits for another process building the same engine (a full-size U-Net: many minutes).
LOCK_TIMEOUT_S = 3 * 3600.0


def engine_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass
class Engine:
    """One engine on disk and its sidecar. ``cached``: loaded from the cache rather than built now."""

    path: Path
    meta: dict
    cached: bool


def verified(path: Path) -> dict:
    """The sidecar of engine ``path``, after checking the engine file is the one the sidecar describes."""
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"engine {path} has no readable sidecar {sidecar.name} ({e}): rebuild it with "
                          "`sdfast build`") from e
    if not path.is_file():
        raise EngineError(f"engine {path} is missing (its sidecar {sidecar.name} is there): rebuild it with "
                          "`sdfast build`")
    if path.stat().st_size != meta.get("engine_bytes") or sha256_files(path) != meta.get("engine_sha256"):
        raise EngineError(f"engine {path} is corrupt: its content does not match the sha256 its sidecar recorded "
                          "when it was built (truncated or overwritten?). Delete it and run `sdfast build` again")
    return meta


def _key_fields(folder: Path, network: str, manifest: dict, network_profiles: list, precision: str) -> dict:
    onnx_file = folder / manifest["networks"][network]["file"]
    # The weights LoRAs write (the manifest's map) are built refittable where a GPU is: TensorRT-RTX's JIT needs
    # CUDA to build a refittable engine (REFIT, REFIT_INDIVIDUAL, REFIT_IDENTICAL all fail without one, measured
    # with 1.7), so engines built on a CPU-only machine take no LoRA (the backend says so).
    located = (manifest["networks"][network].get("weights") or {}).values()
    refit = sorted({name for name, _, _ in located}) if torch.cuda.is_available() else []
    return {"network": network, "onnx_sha256": file_hash(onnx_file), "profiles": network_profiles,
            "precision": precision, **flavour(), "gpu": gpu(), "refit": refit}


def find_engines(folder, network: str) -> list[Engine]:
    """Every engine of ``network`` under ``folder/engines`` that fits this ONNX file, TensorRT and GPU, newest
    first, for the backends to load (``covering`` picks one per request). An EngineError says why none fits: none
    built, or each one stale (naming what differs)."""
    folder = Path(folder)
    manifest = read_manifest(folder, verify=False)  # a changed graph shows as stale engines, naming the hashes
    current = {"onnx_sha256": file_hash(folder / manifest["networks"][network]["file"]), **flavour(), "gpu": gpu()}
    stale = []
    candidates = []
    for sidecar in sorted((folder / ENGINES).glob(f"{network}-*.json")):
        try:
            meta = json.loads(sidecar.read_text())
            built, built_at = meta["key_fields"], meta["built_at"]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            stale.append(f"{sidecar.name}: unreadable sidecar ({type(e).__name__})")
            continue
        differs = [f"{k} {built.get(k)!r} (now {v!r})" for k, v in current.items() if built.get(k) != v]
        if differs:
            stale.append(f"{sidecar.with_suffix('.engine').name}: {'; '.join(differs)}")
        else:
            candidates.append((built_at, sidecar.with_suffix(".engine")))
    if candidates:
        return [Engine(path, verified(path), cached=True) for _, path in sorted(candidates, reverse=True)]
    if stale:
        raise EngineError(f"no usable {network} engine in {folder / ENGINES}: every one is stale — "
                          + " | ".join(stale) + f". Rebuild: sdfast build {folder}")
    raise EngineError(f"no {network} engine in {folder / ENGINES}: build them first with `sdfast build {folder}`")


def build_engines(folder, shapes: Shapes, *, fp16: bool = False, networks=None, log=print,
                  lock_timeout: float = LOCK_TIMEOUT_S) -> dict[str, Engine]:
    """Build (or load from the cache) one engine per network of the export folder ``folder`` (``networks``,
    default all it holds) for ``shapes``. The graphs are verified against the manifest first. A cached engine whose
    file does not match its sidecar is reported and rebuilt. Each engine is built under a file lock
    (``NETWORK-KEY.lock``): a second process building the same one waits, then loads it; its files are written
    under unique temporary names and renamed into place, the engine before its sidecar."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    networks = tuple(manifest["networks"]) if networks is None else networks
    unknown = [network for network in networks if network not in manifest["networks"]]
    if unknown:  # before any build: a full-size U-Net takes minutes
        raise EngineError(f"{folder} has no {unknown[0]} graph (exported: {', '.join(manifest['networks'])}): "
                          "name those")
    trt = tensorrt()
    check_target()
    precision = _precision(manifest["dtype"], fp16)
    (folder / ENGINES).mkdir(exist_ok=True)
    results = {}
    for network in networks:
        network_profiles = profiles(network, manifest, shapes)
        fields = _key_fields(folder, network, manifest, network_profiles, precision)
        key = engine_key(fields)
        path = folder / ENGINES / f"{network}-{key[:16]}.engine"
        with file_lock(path.with_suffix(".lock"), timeout=lock_timeout, what=f"building {path.name}", log=log):
            if path.is_file():
                try:
                    results[network] = Engine(path, verified(path), cached=True)
                    log(f"{path.name}: cached ({network}, {precision}, {fields['flavour']} {fields['version']})")
                    continue
                except EngineError as e:
                    log(f"{e}; rebuilding")
            results[network] = _build(trt, folder, network, manifest, fields, key, path, log)
    return results


def _precision(dtype: str, fp16: bool) -> str:
    if not fp16 or dtype == "fp16":
        return dtype
    if flavour()["flavour"] != "tensorrt":
        raise EngineError("TensorRT-RTX builds only strongly typed networks, so an engine's precision is its ONNX "
                          "graphs': export with `sdfast export MODEL -o DIR --dtype fp16` for fp16 engines")
    return "fp16-mixed"  # fp32 graphs, fp16 kernels where TensorRT finds them faster (BuilderFlag.FP16)


def timing_cache_path(folder: Path, fields: dict) -> Path:
    """``engines/timing-KEY.cache``: one timing cache per TensorRT version and GPU, shared by all networks."""
    key = engine_key({k: fields[k] for k in ("flavour", "version", "gpu")})
    return folder / ENGINES / f"timing-{key[:12]}.cache"


def _build(trt, folder: Path, network: str, manifest: dict, fields: dict, key: str, path: Path, log) -> Engine:
    onnx_path = folder / manifest["networks"][network]["file"]
    logger = trt.Logger(trt.Logger.ERROR)
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as e:  # e.g. full TensorRT without a usable GPU
        raise _build_error(fields, f"could not create a builder ({type(e).__name__}: {e})") from e
    strongly_typed = fields["precision"] != "fp16-mixed"
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    graph = builder.create_network(flags)
    parser = trt.OnnxParser(graph, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineError(f"{fields['flavour']} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if fields["refit"]:  # the weights LoRAs write (the manifest's map), refitted in place: no rebuild per LoRA
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        unknown = [name for name in fields["refit"] if not graph.mark_weights_refittable(name)]
        if unknown:
            raise EngineError(f"{fields['flavour']} finds no weights named {unknown[:3]} in {onnx_path.name}: "
                              "export the model again")
    for network_profile in fields["profiles"]:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in network_profile.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    # Full TensorRT reuses the tactic timings of every earlier build in this folder with the same TensorRT and GPU
    # (a timing cache holds only those). TensorRT-RTX does not time tactics: its timing-cache calls are no-ops since
    # 1.2 and would demand a GPU at build time; its runtime cache (sdfast.backends.tensorrt) plays that part.
    timing_cache = timing_cache_path(folder, fields) if fields["flavour"] == "tensorrt" else None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(graph, config)
    build_s = time.perf_counter() - start
    if plan is None:
        raise _build_error(fields, f"could not build {onnx_path.name}")
    if timing_cache is not None:  # builds of other networks may write it too: whole files only, the last one wins
        write_atomically(timing_cache, memoryview(config.get_timing_cache().serialize()))
    sidecar = path.with_suffix(".json")
    sidecar.unlink(missing_ok=True)  # a rebuild: the old sidecar must not vouch for the new engine, even briefly
    write_atomically(path, memoryview(plan))
    io = [{"name": t.name, "mode": mode, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
          for mode, tensors in (("input", [graph.get_input(i) for i in range(graph.num_inputs)]),
                                ("output", [graph.get_output(i) for i in range(graph.num_outputs)]))
          for t in tensors]
    meta = {"network": network, "key": key, "key_fields": fields, "profiles": fields["profiles"], "io": io,
            "onnx_file": onnx_path.name, "engine_bytes": path.stat().st_size, "engine_sha256": sha256_files(path),
            "build_s": round(build_s, 2), "timing_cache": timing_cache is not None, "built_at": time.time(),
            "refittable": sum(graph.are_weights_marked_refittable(name) for name in fields["refit"])}
    write_atomically(sidecar, json.dumps(meta, indent=1).encode())
    log(f"{path.name}: built in {build_s:.1f} s ({network}, {fields['precision']}, {fields['flavour']} "
        f"{fields['version']}, {len(fields['profiles'])} profile(s), {meta['engine_bytes'] / 2**20:.1f} MiB)")
    return Engine(path, meta, cached=False)


def _build_error(fields: dict, what: str) -> EngineError:
    """A failed build told by the facts: on a GPU, which one, and that TensorRT logged why; "no GPU" only where
    torch sees none."""
    tool = f"{fields['flavour']} {fields['version']}"
    if torch.cuda.is_available():
        return EngineError(f"{tool} {what} on {device_name()}: see TensorRT's errors logged above (out of GPU "
                           "memory, a layer or precision this GPU lacks, a driver too old for this TensorRT)")
    if fields["flavour"] == "tensorrt":
        return EngineError(f"{tool} {what}: torch sees no CUDA GPU here, and full TensorRT builds only on one; "
                           "build on the GPU the engines will run on, or install TensorRT-RTX (pip install "
                           "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings), which builds without one")
    return EngineError(f"{tool} {what} (no CUDA GPU here; TensorRT-RTX needs none to build): see TensorRT's "
                       "errors logged above")


def _dtype_name(dtype) -> str:
    return {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
            "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}.get(dtype.name, dtype.name.lower())
