"""The ``onnxruntime`` backend: the exported graphs on ONNX Runtime.

On a CUDA device it uses the CUDA execution provider (``pip install onnxruntime-gpu``) with IO binding: inputs and
outputs stay torch tensors on the GPU, bound by pointer, so nothing crosses to the host between steps. On the CPU it
uses the CPU provider through the same binding code. The pipeline and sampler do not change (see ``graphs``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdfast.export.onnx import HAS_ONNXRUNTIME, ExportError, ort_session

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
          "tensor(int32)": torch.int32}


def providers_for(device: torch.device) -> list:
    """ONNX Runtime providers for ``device``: CUDA (then CPU for the odd op) on a GPU, the CPU provider otherwise."""
    import onnxruntime

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ExportError(f"the onnxruntime backend runs on 'cpu' or 'cuda', not {device}")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ExportError("this onnxruntime has no CUDA provider: pip install onnxruntime-gpu (in place of "
                          "onnxruntime), or load with device='cpu'")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


class Session:
    """One graph on ONNX Runtime: ``session(inputs, outputs)`` binds torch tensors in and out by pointer."""

    def __init__(self, path: Path, device: torch.device, providers: list | None = None):
        self.session = ort_session(path, providers or providers_for(device))
        self.device = device
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 0
        self.input_dtypes = {i.name: _TORCH[i.type] for i in self.session.get_inputs()}
        self.output_dtypes = {o.name: _TORCH[o.type] for o in self.session.get_outputs()}

    def __call__(self, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        held = []  # the bound tensors must live until the run ends
        for name, t in inputs.items():
            t = t.to(self.device, self.input_dtypes[name]).contiguous()
            held.append(t)
            binding.bind_input(name, self.device.type, self.device_id, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        results = {}
        for name, shape in outputs.items():
            out = torch.empty(shape, dtype=self.output_dtypes[name], device=self.device)
            binding.bind_output(name, self.device.type, self.device_id, _NUMPY[out.dtype], tuple(shape),
                                out.data_ptr())
            results[name] = out
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream: inputs must be ready
        self.session.run_with_iobinding(binding)  # returns once the outputs are written
        return results


def runners(folder: Path, manifest: dict, device: torch.device, *, providers: list | None = None) -> dict:
    """One ``Session`` per exported network. ``providers`` overrides the choice of ``providers_for``."""
    if not HAS_ONNXRUNTIME:
        raise ExportError('the onnxruntime backend needs onnxruntime: pip install "sdfast[onnx]" '
                          "(onnxruntime-gpu for CUDA)")
    return {name: Session(folder / net["file"], device, providers) for name, net in manifest["networks"].items()}
