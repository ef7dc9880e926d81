"""The ``onnxruntime`` backend: the exported graphs on ONNX Runtime.

On a CUDA device it uses the CUDA execution provider (``pip install onnxruntime-gpu``) with IO binding: inputs and
outputs stay torch tensors on the GPU, bound by pointer, so nothing crosses to the host between steps. On the CPU it
uses the CPU provider through the same binding code. The pipeline and sampler do not change (see ``graphs``).

``cuda_graph=True`` (CUDA only) also lets the CUDA provider capture each graph as a CUDA graph and replay it, which
removes the per-kernel launch cost. A CUDA graph replays fixed addresses and shapes, so each distinct input shape
gets its own static input and output tensors, bound once, and its own graph id (ONNX Runtime's ``gpu_graph_id``
run option): a call copies its inputs into the static tensors, replays, and returns copies of the outputs. Each
captured shape keeps its buffers and the graph's working memory for the life of the session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdfast.export.errors import ExportError
from sdfast.export.session import HAS_ONNXRUNTIME, cuda_provider_help, ort_session

from . import exported

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
          "tensor(int32)": torch.int32}


def providers_for(device: torch.device, cuda_graph: bool = False) -> list:
    """ONNX Runtime providers for ``device``: CUDA (then CPU for the shape arithmetic) on a GPU, the CPU provider
    otherwise."""
    import onnxruntime

    if device.type == "cpu":
        if cuda_graph:
            raise ExportError("cuda_graph=True needs the CUDA provider: load with device='cuda' (and "
                              "onnxruntime-gpu), or leave cuda_graph off on the CPU")
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ExportError(f"the onnxruntime backend runs on 'cpu' or 'cuda', not {device}")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ExportError(f"this onnxruntime has no CUDA provider; {cuda_provider_help()}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    options = {"device_id": index, **({"enable_cuda_graph": "1"} if cuda_graph else {})}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


@dataclass
class _Captured:
    """The static tensors, binding and run options of one input shape's CUDA graph."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    binding: object  # onnxruntime.IOBinding, bound once to the tensors above
    run_options: object  # onnxruntime.RunOptions carrying this shape's gpu_graph_id


class Session:
    """One graph on ONNX Runtime: ``session(inputs, outputs)`` binds torch tensors in and out by pointer.

    ``cuda_graph``: replay one CUDA graph per input shape (see the module docstring). The bookkeeping (static
    tensors, one graph id per shape, outputs copied out) runs on any provider; only the CUDA provider captures."""

    def __init__(self, path: Path, device: torch.device, providers: list | None = None, cuda_graph: bool = False):
        self.path, self.providers = path, providers or providers_for(device, cuda_graph)
        self.overrides: dict[str, object] = {}  # initializer name -> OrtValue (LoRA-merged weights)
        try:
            self.session = ort_session(path, self.providers)
        except Exception as e:  # ORT refuses graph capture when a node (e.g. shape arithmetic) sits on the CPU
            if not cuda_graph or isinstance(e, ExportError):
                raise
            raise ExportError(f"ONNX Runtime cannot capture {path.name} in a CUDA graph ({type(e).__name__}: {e}); "
                              "load without cuda_graph=True") from e
        self.device = device
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 0
        self.input_dtypes = {i.name: _TORCH[i.type] for i in self.session.get_inputs()}
        self.output_dtypes = {o.name: _TORCH[o.type] for o in self.session.get_outputs()}
        self.cuda_graph = cuda_graph
        self.captured: dict[tuple, _Captured] = {}  # ((name, shape), ...) of the inputs -> its graph

    def _bind(self, binding, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for name, t in inputs.items():
            binding.bind_input(name, self.device.type, self.device_id, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        for name, t in outputs.items():
            binding.bind_output(name, self.device.type, self.device_id, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())

    def _empty(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        return {name: torch.empty(shape, dtype=dtypes[name], device=self.device) for name, shape in shapes.items()}

    def _run(self, binding, run_options=None) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream: inputs must be ready
        self.session.run_with_iobinding(binding, run_options)  # returns once the outputs are written

    def __call__(self, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        if self.cuda_graph:
            return self._replay(inputs, outputs)
        inputs = {name: t.to(self.device, self.input_dtypes[name]).contiguous() for name, t in inputs.items()}
        results = self._empty(outputs, self.output_dtypes)  # `inputs` keeps the bound tensors alive until the run ends
        binding = self.session.io_binding()
        self._bind(binding, inputs, results)
        self._run(binding)
        return results

    def _replay(self, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        import onnxruntime

        key = tuple((name, tuple(t.shape)) for name, t in inputs.items())
        graph = self.captured.get(key)
        if graph is None:  # a new shape: new static tensors, a new graph id (ORT warms up, then captures)
            static_in = self._empty(dict(key), self.input_dtypes)
            static_out = self._empty(outputs, self.output_dtypes)
            binding = self.session.io_binding()
            self._bind(binding, static_in, static_out)
            run_options = onnxruntime.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(len(self.captured)))
            graph = self.captured[key] = _Captured(static_in, static_out, binding, run_options)
        for name, t in inputs.items():
            graph.inputs[name].copy_(t)  # casts to the graph's dtype and device
        self._run(graph.binding, graph.run_options)
        return {name: t.clone() for name, t in graph.outputs.items()}  # the next replay overwrites the static ones

    def max_batch(self, name: str) -> None:
        """None: the exported graphs' batch axis is dynamic, so any number of rows runs."""
        return None

    def set_initializers(self, values: dict[str, np.ndarray | None]) -> None:
        """New values for some of the graph's weights (None: the file's own again): a new session over the same
        file with them (and earlier ones) as overriding initializers. No export; ORT optimises the graph again
        (seconds for a full U-Net) and captures its CUDA graphs anew."""
        import onnxruntime

        for name, value in values.items():
            if value is None:
                self.overrides.pop(name, None)
            else:
                self.overrides[name] = onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
        self.session = ort_session(self.path, self.providers, initializers=self.overrides)
        self.captured.clear()


def runners(folder: Path, manifest: dict, device: torch.device, *, networks: tuple[str, ...] | None = None,
            providers: list | None = None, cuda_graph: bool = False) -> dict:
    """One ``Session`` per exported network (``networks``, default every graph of the manifest). ``providers``
    overrides the choice of ``providers_for``; ``cuda_graph`` replays CUDA graphs (CUDA provider only)."""
    if not HAS_ONNXRUNTIME:
        raise ExportError('the onnxruntime backend needs onnxruntime: pip install "sdfast[onnx]" '
                          "(onnxruntime-gpu for CUDA)")
    if cuda_graph and providers is None:
        providers_for(device, cuda_graph)  # a clear error before any session is made
    return {name: Session(folder / manifest["networks"][name]["file"], device, providers, cuda_graph)
            for name in networks or manifest["networks"]}


# -- the backend interface (sdfast.backends.Backend) --

IN_PLACE = False  # runs graphs exported from a CPU copy of the torch modules


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32: an on-the-fly export runs in the checkpoint's precision unless told otherwise (an export folder runs
    in its own)."""
    return torch.float32


def prepare(pipe, device: torch.device, **options):
    """``pipe`` (torch, on the CPU) on exported graphs run by ONNX Runtime on ``device``; ``options``: the
    export's ``cache`` / ``opset`` and ``runners``' own."""
    return exported.prepare(runners, pipe, device, **options)


def from_folder(folder, device: torch.device, dtype: torch.dtype | None = None, **options) -> dict:
    """A pipeline's fields from a folder written by ``sdfast export``."""
    return exported.from_folder(runners, folder, device, dtype, **options)
