"""The ``tensorrt`` backend: engines built by ``sdfast build`` (``sdfast.export.tensorrt``), run on a CUDA GPU.

Inputs and outputs are torch tensors on the GPU, bound by pointer. Each engine runs on its own CUDA stream, ordered
after the caller's current stream and before whatever the caller does next. A shape outside the engine's
optimisation profiles is refused before it reaches TensorRT, with the allowed ranges in the message. With
TensorRT-RTX, kernels compiled at load time are kept in ``engines/NETWORK-KEY.runtime-cache`` for the next start.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdfast.export.errors import EngineError
from sdfast.export.flavour import check_target, device_name, flavour, tensorrt
from sdfast.export.profiles import Shapes, check_shapes, covering
from sdfast.export.tensorrt import Engine, build_engines, find_engines

from ..files import write_atomically
from ..models import image_side
from . import exported

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "int32": torch.int32, "bool": torch.bool}


class EngineRunner:
    """One deserialised engine and its execution context: ``runner(inputs, outputs)`` as the graph wrappers call."""

    def __init__(self, path: Path, meta: dict, device: torch.device):
        trt = tensorrt()
        self.meta, self.device = meta, device
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        data = path.read_bytes()
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(f"engine {path} does not load on {device_name(device)}{_validity(self.runtime, data)} "
                              "(built by another TensorRT or for another GPU, or out of GPU memory; see TensorRT's "
                              "errors above): rebuild it with `sdfast build` on this machine")
        self.runtime_cache = None
        if flavour()["flavour"] == "tensorrt_rtx":  # JIT-compiled kernels survive restarts in the runtime cache
            config = self.engine.create_runtime_config()
            self.cache = config.create_runtime_cache()
            self.runtime_cache = path.with_suffix(".runtime-cache")
            if self.runtime_cache.is_file():
                self.cache.deserialize(self.runtime_cache.read_bytes())  # False (ignored) for another GPU/driver
            config.set_runtime_cache(self.cache)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:  # TensorRT returns None, e.g. when the activation memory does not fit
            raise EngineError(f"engine {path}: TensorRT could not create an execution context on "
                              f"{device_name(device)} (out of GPU memory, most likely; see TensorRT's errors above): "
                              "free GPU memory (other engines, processes) or build for smaller sizes or batches "
                              "(sdfast build --sizes / --batch)")
        self.dtypes = {t["name"]: _TORCH[t["dtype"]] for t in meta["io"]}
        self.stream = torch.cuda.Stream(device)
        self.profile = None
        self.cached_profiles: set[int] = set()  # profiles whose compiled kernels are in the runtime cache file

    def __call__(self, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        index = check_shapes(self.meta, {name: tuple(t.shape) for name, t in inputs.items()})
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # the inputs are written on the caller's stream
        handle = self.stream.cuda_stream
        if index != self.profile:
            self.context.set_optimization_profile_async(index, handle)
            self.profile = index
        held = []
        for name, t in inputs.items():
            t = t.to(self.device, self.dtypes[name]).contiguous()
            held.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        results = {}
        for name, shape in outputs.items():
            actual = tuple(self.context.get_tensor_shape(name))
            if actual != tuple(shape):
                raise EngineError(f"{self.meta['network']}: output {name} has shape {actual}, expected {shape}")
            results[name] = torch.empty(actual, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, results[name].data_ptr())
        if not self.context.execute_async_v3(handle):
            raise EngineError(f"{self.meta['network']}: TensorRT execution failed (see its errors above)")
        current.wait_stream(self.stream)  # the caller's next kernels see the outputs; freed inputs stay ordered
        if self.runtime_cache is not None and index not in self.cached_profiles:  # a first run compiled kernels
            self.cached_profiles.add(index)
            self.stream.synchronize()
            write_atomically(self.runtime_cache, memoryview(self.cache.serialize()))  # replicas may share it
        return results


    def refit(self, values: dict[str, np.ndarray]) -> None:
        """New values for weights the engine was built to refit (``BuilderFlag.REFIT_INDIVIDUAL``), by ONNX
        initializer name, written into the engine in place: its execution context stays valid."""
        trt = tensorrt()
        refitter = trt.Refitter(self.engine, self.logger)
        held = [np.ascontiguousarray(value) for value in values.values()]  # alive until the refit is done
        for name, value in zip(values, held):
            if not refitter.set_named_weights(name, trt.Weights(value)):
                raise EngineError(f"{self.meta['network']}: the engine does not refit weights {name!r} (built "
                                  "before sdfast kept LoRA weights refittable): rebuild it with `sdfast build`")
        self.stream.synchronize()
        if not refitter.refit_cuda_engine():
            raise EngineError(f"{self.meta['network']}: TensorRT could not refit the engine (see its errors above)")


class EngineSet:
    """Every usable engine of one network (newest first): a call runs on the first whose profiles admit its shapes
    (``covering``), so builds for different sizes can sit side by side. Engines are deserialised on first use."""

    def __init__(self, engines: list[Engine], device: torch.device, onnx_file: Path):
        self.engines, self.device, self.onnx_file = engines, device, onnx_file
        self.runners: dict[Path, EngineRunner] = {}
        self.overrides: dict[str, np.ndarray] = {}  # initializer name -> refitted value (LoRAs)
        self.profiles = [p for e in engines for p in e.meta["profiles"]]  # {input: [min, opt, max shape]} each

    def max_batch(self, name: str) -> int:
        """The most rows of input ``name`` that every profile admits, whatever the other dimensions (the smallest
        of the profiles' largest batches)."""
        return min(profile[name][2][0] for profile in self.profiles)

    def set_initializers(self, values: dict[str, np.ndarray | None]) -> None:
        """Refit every engine of the network (None: the graph's own value, read back from the ONNX file); engines
        loaded later get the same values when they load."""
        from sdfast.export.weights import read_named

        fixed = [e.path.name for e in self.engines if not e.meta.get("refittable")]
        if fixed:
            raise EngineError(f"engine {fixed[0]} was built without refittable weights (TensorRT-RTX marks them only "
                              "when the build machine has a GPU): rebuild it on the GPU with `sdfast build` to apply "
                              "LoRAs")
        missing = [name for name, value in values.items() if value is None]
        originals = read_named(self.onnx_file, missing) if missing else {}
        self.overrides.update({name: originals.get(name, value) for name, value in values.items()})
        for runner in self.runners.values():
            runner.refit({name: self.overrides[name] for name in values})

    def __call__(self, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        engine, _ = covering(self.engines, {name: tuple(t.shape) for name, t in inputs.items()})
        if engine.path not in self.runners:
            runner = self.runners[engine.path] = EngineRunner(engine.path, engine.meta, self.device)
            if self.overrides:  # LoRAs merged before this engine was first needed
                runner.refit(self.overrides)
        return self.runners[engine.path](inputs, outputs)


def _validity(runtime, data: bytes) -> str:
    """TensorRT's own reason an engine does not load (version, GPU, driver), where it can tell."""
    if not hasattr(runtime, "get_engine_validity"):
        return ""
    try:
        validity, diagnostics = runtime.get_engine_validity(data[: runtime.engine_header_size])
    except (RuntimeError, TypeError, ValueError):
        return ""
    return f" ({validity.name}, diagnostics flags {diagnostics:#x})"


def runners(folder: Path, manifest: dict, device: torch.device, *, networks: tuple[str, ...] | None = None,
            build: bool = False, sizes: list[str] | None = None, batch: list[int] | None = None,
            prompt_chunks: int = 1, fp16: bool = False) -> dict:
    """One ``EngineRunner`` per network (``networks``, default every graph of the manifest), from the engines in
    ``folder/engines``. ``build=True`` builds the missing ones first (for ``sizes`` / ``batch``, default: the
    model's own size at batch 1); otherwise a missing or stale engine is an EngineError that says to run
    ``sdfast build``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise EngineError(f"the tensorrt backend runs on a CUDA GPU (asked for {device}, CUDA available: "
                          f"{torch.cuda.is_available()}); engines can still be built here with `sdfast build`")
    tensorrt()  # a clear error when no TensorRT module is installed
    check_target(device)
    networks = tuple(networks or manifest["networks"])
    if build:
        configs = manifest["configs"]
        side = image_side(configs["unet"]["sample_size"], len(configs["vae"]["block_channels"]))
        shapes = Shapes.parse(sizes or [f"{side}x{side}"], batch or [1], prompt_chunks)
        build_engines(folder, shapes, fp16=fp16, networks=networks, log=lambda _: None)
    return {name: EngineSet(find_engines(folder, name), device, folder / manifest["networks"][name]["file"])
            for name in networks}


# -- the backend interface (sdfast.backends.Backend) --

IN_PLACE = False  # runs graphs exported from a CPU copy of the torch modules


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32: an on-the-fly export runs in the checkpoint's precision unless told otherwise (an export folder runs
    in its own)."""
    return torch.float32


def prepare(pipe, device: torch.device, **options):
    """``pipe`` (torch, on the CPU) on exported graphs run as TensorRT engines on ``device``; ``options``: the
    export's ``cache`` / ``opset`` and ``runners``' own (engines for ``sizes``, ``batch``, ``prompt_chunks``,
    ``fp16``, built when missing)."""
    options.setdefault("build", True)
    return exported.prepare(runners, pipe, device, **options)


def from_folder(folder, device: torch.device, dtype: torch.dtype | None = None, **options) -> dict:
    """A pipeline's fields from a folder written by ``sdfast export``."""
    return exported.from_folder(runners, folder, device, dtype, **options)
