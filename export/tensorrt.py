"""TensorRT engines from an export folder: optimisation profiles, the timing cache, and the engine cache.

Works with either TensorRT flavour, found in this order (same Python API):
- ``tensorrt``: full TensorRT; building needs a CUDA GPU, and engines are specific to it.
- ``tensorrt_rtx`` / ``tensorrt_rtx_bindings`` (TensorRT-RTX; the PyPI wheels ``tensorrt-rtx-cu13-libs`` and
  ``-bindings`` install the latter): builds ahead of time on any machine, GPU or not, and compiles kernels for the
  GPU when the engine is loaded. It cannot target every GPU (1.7: not sm_90, the H100 / H200): on one of those,
  builds and loads are refused up front (``check_target``).

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

import functools
import hashlib
import importlib
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdfast.files import write_atomically

from .onnx import file_hash, file_lock, read_manifest, sha256_files

FLAVOURS = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")  # preference order
HAS_TENSORRT = any(importlib.util.find_spec(name) is not None for name in FLAVOURS)
ENGINES = "engines"
# TensorRT-RTX's compute capabilities (75: sm_75) for a module without a ComputeCapability enum to read them from
RTX_TARGETS = (75, 80, 86, 89, 120)
# How long a build waits for another process building the same engine (a full-size U-Net: many minutes).
LOCK_TIMEOUT_S = 3 * 3600.0


class EngineError(ValueError):
    """A TensorRT engine that cannot be built or used: no TensorRT, a parse or build failure, a stale or corrupt
    engine, or a shape outside the engine's profiles (a ValueError, so the CLI reports it in one line)."""


@functools.cache
def tensorrt():
    """The TensorRT Python module (the first flavour of FLAVOURS that imports), or a clear EngineError."""
    for name in FLAVOURS:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise EngineError("no TensorRT Python module is installed: pip install tensorrt-rtx-cu13-libs "
                      "tensorrt-rtx-cu13-bindings (TensorRT-RTX, builds without a GPU), or NVIDIA's tensorrt")


def flavour() -> dict[str, str]:
    """{"flavour": "tensorrt" | "tensorrt_rtx", "version": ...} of the module ``tensorrt()`` found."""
    trt = tensorrt()
    return {"flavour": "tensorrt" if trt.__name__ == "tensorrt" else "tensorrt_rtx", "version": trt.__version__}


def gpu() -> str:
    """The GPU(s) an engine is built for; engines are keyed by it. Full TensorRT tunes an engine for the GPU that
    builds it, and the engine runs only there. TensorRT-RTX builds a portable engine for its default targets (sm_80,
    sm_86, sm_89, sm_120 and later), GPU or not, and compiles it for the actual GPU when it loads, so an engine
    built on a CPU-only machine serves any of those GPUs and this machine's GPU is not part of its key."""
    if flavour()["flavour"] == "tensorrt_rtx":
        return "portable (TensorRT-RTX default targets)"
    if not torch.cuda.is_available():
        return "none"
    return device_name()


def device_name(device=None) -> str:
    """A CUDA GPU as keys and messages name it, e.g. ``NVIDIA H200 (sm_90)``."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def rtx_targets(trt) -> tuple[int, ...]:
    """The compute capabilities TensorRT-RTX module ``trt`` can compile for (89: sm_89): the SM members of its
    ComputeCapability enum, or RTX_TARGETS where it has none."""
    members = getattr(getattr(trt, "ComputeCapability", None), "__members__", {})
    return tuple(sorted(int(v) for name, v in members.items() if name[:2] == "SM" and name[2:].isdigit())) \
        or RTX_TARGETS


def check_target(device=None) -> None:
    """TensorRT-RTX compiles only for the GPUs of its ComputeCapability enum (1.7: no sm_90, so no H100 / H200), so
    its engines cannot run on any other: say so in one line, before an engine is built or loaded."""
    info = flavour()
    if info["flavour"] != "tensorrt_rtx" or not torch.cuda.is_available():
        return
    major, minor = torch.cuda.get_device_capability(device)
    targets = rtx_targets(tensorrt())
    if major * 10 + minor not in targets:
        raise EngineError(f"TensorRT-RTX {info['version']} cannot run engines on {device_name(device)}: its targets "
                          f"are {', '.join(f'sm_{t}' for t in targets)}; on this GPU use backend='triton', 'compile' "
                          "or 'onnxruntime' (onnxruntime-gpu), or NVIDIA's full `tensorrt` package (pip install "
                          "tensorrt; sdfast prefers it to TensorRT-RTX)")


# -- optimisation profiles --


@dataclass(frozen=True)
class Shapes:
    """The requests engines must serve. ``sizes``: one optimisation profile each, an image size range in pixels
    ((min width, min height), (max width, max height)); ``batch``: (min, max) images per call; ``prompt_chunks``:
    the most 77-token chunks a long prompt may take."""

    sizes: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    batch: tuple[int, int] = (1, 1)
    prompt_chunks: int = 1

    @classmethod
    def parse(cls, sizes: list[str], batch: list[int], prompt_chunks: int = 1) -> "Shapes":
        """``sizes`` like ["512x512", "512x512-768x1024"] (WxH or a WxH-WxH range); ``batch`` like [1, 4] (the
        smallest and largest given are the range)."""
        ranges = []
        for text in sizes:
            try:
                ends = [tuple(int(v) for v in end.lower().split("x")) for end in text.split("-")]
            except ValueError:
                ends = []
            if len(ends) not in (1, 2) or any(len(e) != 2 for e in ends):
                raise ValueError(f"size {text!r}: use WIDTHxHEIGHT (e.g. 512x512) or a range 512x512-768x1024")
            lo, hi = ends[0], ends[-1]
            if any(v <= 0 or v % 8 for v in (*lo, *hi)):
                raise ValueError(f"size {text!r}: widths and heights must be positive multiples of 8")
            if lo[0] > hi[0] or lo[1] > hi[1]:
                raise ValueError(f"size range {text!r} runs backwards: put the smaller size first")
            ranges.append((lo, hi))
        if not ranges:
            raise ValueError("no sizes: give at least one WIDTHxHEIGHT")
        if not batch or min(batch) < 1:
            raise ValueError(f"batch {batch}: need sizes >= 1")
        if prompt_chunks < 1:
            raise ValueError(f"prompt_chunks={prompt_chunks}: need at least 1")
        return cls(tuple(ranges), (min(batch), max(batch)), prompt_chunks)


def profiles(network: str, manifest: dict, shapes: Shapes) -> list[dict[str, list[list[int]]]]:
    """The optimisation profiles of one network: [{input: [min, opt, max]}], one per size range (one in all for
    the text encoder, which does not see the image). The U-Net's batch doubles under classifier-free guidance;
    the optimum is the smallest size at the smallest batch, guided. SDXL's U-Net also takes ``text_embeds`` and
    ``time_ids``, one row per sample."""
    configs = manifest["configs"]
    unet, vae = configs["unet"], configs["vae"]
    te = configs.get("text_encoder") or configs["text_encoder_2"]  # the SDXL refiner has only the second
    f = 2 ** (len(vae["block_channels"]) - 1)  # pixels per latent cell
    b0, b1 = shapes.batch
    tokens = te["max_positions"]
    if network in ("text_encoder", "text_encoder_2"):  # prompts and negatives, each in up to prompt_chunks chunks
        return [{"input_ids": [[1, tokens], [2 * b0, tokens], [2 * b1 * shapes.prompt_chunks, tokens]]}]
    out = []
    for (w0, h0), (w1, h1) in shapes.sizes:
        if network == "unet":
            c, ctx = unet["in_channels"], unet["context_dim"]
            out.append({
                "sample": [[b0, c, h0 // f, w0 // f], [2 * b0, c, h0 // f, w0 // f], [2 * b1, c, h1 // f, w1 // f]],
                "timestep": [[b0], [2 * b0], [2 * b1]],
                "context": [[b0, tokens, ctx], [2 * b0, tokens, ctx], [2 * b1, tokens * shapes.prompt_chunks, ctx]],
            })
            if unet.get("added_time_dim") is not None:  # SDXL: pooled text (B, P), micro-conditioning (B, n)
                pooled = configs["text_encoder_2"]["projection_dim"]
                numbers = (unet["added_cond_dim"] - pooled) // unet["added_time_dim"]
                out[-1].update({name: [[b0, width], [2 * b0, width], [2 * b1, width]]
                                for name, width in (("text_embeds", pooled), ("time_ids", numbers))})
        elif network == "vae_decoder":
            c = vae["latent_channels"]
            out.append({"latent": [[b0, c, h0 // f, w0 // f], [b0, c, h0 // f, w0 // f], [b1, c, h1 // f, w1 // f]]})
        elif network == "vae_encoder":  # img2img encodes one picture, then repeats its latent
            c = vae["in_channels"]
            out.append({"image": [[1, c, h0, w0], [1, c, h0, w0], [b1, c, h1, w1]]})
        else:
            raise ValueError(f"unknown network {network!r}")
    return out


def check_shapes(meta: dict, shapes: dict[str, tuple[int, ...]]) -> int:
    """The index of the first profile of an engine (its sidecar ``meta``) that admits these input shapes, or an
    EngineError naming every profile's allowed range."""
    for index, profile in enumerate(meta["profiles"]):
        if all(len(shapes[name]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[name], hi))
               for name, (lo, _, hi) in profile.items()):
            return index
    raise EngineError(f"{meta['network']}: {_asked(shapes)} is outside the engine's profiles; allowed: "
                      f"{_allowed(meta)}. Build one that covers it: sdfast build DIR --sizes WxH --batch N")


def covering(engines: list["Engine"], shapes: dict[str, tuple[int, ...]]) -> tuple["Engine", int]:
    """The first of ``engines`` (``find_engines``' order: newest first) with a profile that admits these input
    shapes, and that profile's index: which engine serves a request. Otherwise an EngineError naming every engine's
    allowed ranges."""
    for engine in engines:
        try:
            return engine, check_shapes(engine.meta, shapes)
        except EngineError:
            continue
    if len(engines) == 1:
        check_shapes(engines[0].meta, shapes)  # raises, with the one engine's ranges
    allowed = "; ".join(f"{e.path.name}: {_allowed(e.meta)}" for e in engines)
    raise EngineError(f"{engines[0].meta['network']}: {_asked(shapes)} is outside the profiles of all "
                      f"{len(engines)} engines; allowed: {allowed}. Build one that covers it: "
                      "sdfast build DIR --sizes WxH --batch N")


def _asked(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {tuple(s)}" for name, s in shapes.items())


def _allowed(meta: dict) -> str:
    return " | ".join(", ".join(f"{name} {_range(lo, hi)}" for name, (lo, _, hi) in profile.items())
                      for profile in meta["profiles"])


def _range(lo, hi) -> str:
    return "(" + ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi)) + ")"


# -- the engine cache --


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
