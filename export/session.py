"""ONNX Runtime sessions for exported graphs: the one-off run of the export's parity check (``lean``) and the
``onnxruntime`` backend's, with LoRA weights given as initializer overrides; a CUDA provider that did not load is an
error naming what is installed and the fix, never a silent run on the CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ExportError

try:
    import onnxruntime

    HAS_ONNXRUNTIME = True
except ImportError:  # the `onnx` extra: pip install "sdfast[onnx]"
    HAS_ONNXRUNTIME = False


def ort_session(path: Path, providers: list | None = None, *, lean: bool = False,
                initializers: dict | None = None) -> "onnxruntime.InferenceSession":
    """An ONNX Runtime session for ``path``; ``initializers`` ({name: OrtValue}, kept alive by the caller) replace
    those of the file (LoRAs: no new export). ``lean``: for a one-off run (the export's check), basic graph
    optimisations only, so ORT does not fold the fp32 casts of an fp16 graph's weights into a second set of weights
    (and prepack them); no memory arena keeping the run's peak; and nodes run in priority order, which on the CPU
    runs each of those casts just before the node that needs it: ORT's default order runs them all first (they
    depend on nothing), so every weight was held in fp32 at once. The SD 1.5 fp16 U-Net at the check's shapes: a
    peak of 1.9 GiB in 2.9 s, against 4.4 GiB in 6.8 s in the default order (both lean otherwise)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every fp16 node it runs through a cast on CPU
    # torch runs the scheduler between graph calls: ORT threads spinning after each run would steal its cores
    # (measured on 2 cores: a U-Net run + a torch matmul took 4.0 ms spinning, 2.7 ms not)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lean:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.enable_cpu_mem_arena = False
        options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
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
