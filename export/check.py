"""The parity check of an exported graph: the graph on ONNX Runtime's CPU provider against the torch model, on inputs
unlike the export's example, within a tolerance per dtype (``check``); and whether this machine has the memory to run
it (``check_memory_problem``).

The torch reference runs on a CUDA GPU in the graph's dtype when there is one, else on the CPU in fp32 (an fp16 graph
is then held to the fp16 tolerance against the fp32 model): fp16 convolutions on a CPU are orders of magnitude slower
than fp32 ones (an SD 1.5 VAE decoder's check took over 40 minutes in fp16).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExportError
from .graphs import GraphSpec, dtype_name
from .memory import available_memory, file_backed_ranges, in_ranges, page_out, release_memory
from .session import ort_session

# Relative L2 error of each graph on ONNX Runtime (CPU) against the torch reference. fp32 graphs measure ~1e-6;
# fp16 ones up to ~2e-3 (against the fp32 reference, or an fp16 one on a GPU), as ORT upcasts the ops it has no
# fp16 kernel for.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# Memory the parity check needs beyond the loaded pipeline, per byte of graph, measured on SD 1.5 on a CPU: ONNX
# Runtime maps an fp16 graph's weights and casts each to fp32 as its node runs (the SD 1.5 U-Net: a 1.9 GiB peak for
# a 1.6 GiB graph; the fp32 reference converts one layer at a time); an fp32 graph is mapped about once.
# ``check_memory_problem`` skips a check that would not fit.
CHECK_MEMORY = {"fp16": 1.5, "fp32": 1.5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def reference_device() -> torch.device:
    """Where ``check`` runs the torch reference: a CUDA GPU when there is one (in the graph's dtype), else the CPU in
    fp32, as fp16 convolutions on a CPU are orders of magnitude slower than fp32 ones."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def _converted(module: nn.Module, device: torch.device, dtype: torch.dtype):
    """``module`` running with its floating-point weights on ``device`` in ``dtype`` for the ``with`` block, then with
    the very tensors it had (same storage: weights mapped from a safetensors file stay mapped, not copied). The
    module's own parameters are converted, so there is no second module. On the module's own device (the CPU's fp32
    reference of an fp16 network) each submodule converts its own weights as it runs and puts them back after, so
    besides the originals one layer's converted weights are held (an SD 1.5 U-Net in fp32 is 3.3 GiB); to another
    device (a GPU) they move all at once. A weight read by another module than its own (CLIP's position embedding,
    added to the token embeddings) stays as it was there: exact for an fp16 weight added to fp32, an error (not a
    silent change) for one fed to a matmul. Nothing else may use the module meanwhile."""
    stash = {}  # id(tensor) -> (tensor, the original data)

    def convert(tensors) -> list[int]:
        done = []
        for t in tensors:
            if t.is_floating_point() and id(t) not in stash and (t.device != device or t.dtype != dtype):
                stash[id(t)] = (t, t.data)
                t.data = t.data.to(device, dtype)
                done.append(id(t))
        return done

    def restore(keys) -> None:
        for key in keys:
            t, original = stash.pop(key)
            t.data = original

    def own(m: nn.Module):
        return itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False))

    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    layerwise = all(t.device == device for t in tensors)
    hooks, running = [], {}
    try:
        if layerwise:
            for m in module.modules():
                hooks.append(m.register_forward_pre_hook(lambda m, args: running.__setitem__(m, convert(own(m)))))
                hooks.append(m.register_forward_hook(lambda m, args, out: restore(running.pop(m, ()))))
        else:
            convert(tensors)
        yield module
    finally:
        for hook in hooks:
            hook.remove()
        restore(list(stash))
        release_memory()


@contextlib.contextmanager
def _parked(module: nn.Module, folder: Path):
    """``module``'s floating-point weights out of memory for the ``with`` block, so that they and the graph's copy,
    which ONNX Runtime maps meanwhile, are not in memory together (SD 2.1's fp32 U-Net: 3.3 GiB). Weights in the
    process's own memory go to an unnamed scratch file in ``folder`` and are read back after into the same tensors
    (bit for bit; new storage); should the disk refuse it, they stay. Weights mapped from a file (an fp16 model
    loaded in fp16) stay as they are, their pages handed back to the kernel (``page_out``: read again from the file
    when next used). The export's modules are the torch backend's, where no tensor is a view of a weight (a view
    would keep the old storage)."""
    own, mapped = _weights(module)
    for t in mapped:
        page_out(t.data_ptr(), t.numel() * t.element_size())
    parked = []  # (tensor, shape, bytes), in the file's order
    with tempfile.TemporaryFile(prefix=".parked.", dir=folder) as scratch:  # no name: gone with the process
        try:
            for t in own:
                t.data.contiguous().reshape(-1).view(torch.uint8).numpy().tofile(scratch)
                parked.append((t, t.shape, t.numel() * t.element_size()))
                t.data = torch.empty(0, dtype=t.dtype)
            scratch.flush()
        except OSError:  # a full or read-only disk: the check runs with the weights in memory
            pass
        release_memory()
        try:
            yield
        finally:
            scratch.seek(0)
            for t, shape, nbytes in parked:
                data = np.fromfile(scratch, np.uint8, nbytes)
                if data.size != nbytes:
                    raise ExportError(f"the scratch file holding {module.__class__.__name__}'s weights during the "
                                      f"check was cut short ({data.size} of {nbytes} bytes): is the disk failing?")
                t.data = torch.from_numpy(data).view(t.dtype).reshape(shape)


def _weights(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``module``'s floating-point weights: those in the process's own memory, and those mapped from a file."""
    ranges, own, mapped = file_backed_ranges(), [], []
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point() and t.numel():
            (mapped if in_ranges(t.data_ptr(), ranges) else own).append(t)
    return own, mapped


def _run_graph(path: Path, inputs: dict[str, torch.Tensor], outputs: list[str]) -> list:
    """``outputs`` of the graph at ``path`` on ONNX Runtime's CPU provider (a lean session, gone when this returns or
    raises)."""
    session = ort_session(path, lean=True)
    try:
        return session.run(outputs, {name: t.numpy() for name, t in inputs.items()})
    finally:
        del session


@torch.no_grad()  # not inference_mode: the weights converted and restored here must stay ordinary tensors
def check(spec: GraphSpec, path: Path, inputs: dict[str, torch.Tensor] | None = None, *,
          device: str | torch.device | None = None) -> dict:
    """Run the graph on ONNX Runtime's CPU provider and the torch module on the same inputs; raise ExportError
    when any output's relative error passes the tolerance of the graph's dtype.

    The torch reference runs on ``device`` (default ``reference_device()``): on a GPU in the graph's dtype, on the
    CPU in fp32 (the graph's fp16 inputs upcast exactly, the fp16 tolerance kept). It runs before ONNX Runtime loads
    the graph, and the network's weights wait on disk while ONNX Runtime runs it (``_parked``), so the torch network
    and the session are not in memory together. Default inputs: batch 3, a 16x24 latent and a two-chunk context,
    all unlike the export's example, so a wrongly frozen axis shows up here, and small, so the check takes seconds
    at any model size."""
    if inputs is None:
        inputs = spec.example(3, (16, 24), 154, seed=1)
    device = torch.device(device) if device is not None else reference_device()
    ref_dtype = spec.dtype if device.type == "cuda" else torch.float32
    upcast = ref_dtype != spec.dtype
    with _converted(spec.module, device, ref_dtype) as module:
        # fp32 inputs (the timestep, SDXL's time_ids) stay fp32; the graph's own dtype goes to the reference's
        args = [(t.float() if upcast and t.is_floating_point() else t).to(device) for t in inputs.values()]
        want = module(*args)
        want = [w.cpu() for w in (want if isinstance(want, tuple) else (want,))]
        del args
    with _parked(spec.module, path.parent):
        got = _run_graph(path, inputs, list(spec.outputs))
    release_memory()
    errors = {name: rel_err(torch.from_numpy(g), w) for name, g, w in zip(spec.outputs, got, want)}
    dtype = dtype_name(spec.dtype)
    tolerance = TOLERANCE[dtype]
    reference = f"torch {dtype_name(ref_dtype)} on {device.type}"
    report = {"rel_err": errors, "tolerance": tolerance, "provider": "CPUExecutionProvider", "reference": reference,
              "shapes": {name: list(t.shape) for name, t in inputs.items()}}
    bad = {name: err for name, err in errors.items() if not err < tolerance}  # NaN fails too
    if bad:
        raise ExportError(f"{path.name} does not match the torch model on ONNX Runtime (CPU): relative error "
                          f"{bad} over the {dtype} tolerance {tolerance} (reference: {reference})")
    return report


def check_memory_problem(spec: GraphSpec, graph_bytes: int, folder: Path) -> str | None:
    """Why checking a graph of ``graph_bytes`` (in ``folder``) would not fit in the memory this machine has available
    now, or None. The check needs about CHECK_MEMORY[dtype] bytes per graph byte beyond the loaded pipeline, plus
    1 GiB for the activations at its small shapes, less what parking the network frees (``_parked``: its weights in
    the process's own memory, when the disk has room for them); Linux's MemAvailable counts the pipeline's weights
    mapped from the checkpoint as reclaimable, as they are."""
    available = available_memory()
    dtype = dtype_name(spec.dtype)
    own = sum(t.numel() * t.element_size() for t in _weights(spec.module)[0])
    parked = own if shutil.disk_usage(folder).free > own + 2**30 else 0
    need = max(CHECK_MEMORY[dtype] * graph_bytes - parked, 0) + 2**30
    if available is None or need <= available:
        return None
    return (f"the check of this {graph_bytes / 2**30:.1f} GiB {dtype} graph needs about {need / 2**30:.1f} GiB "
            f"more and {available / 2**30:.1f} GiB is available; it was not run: free memory, or export on a machine "
            "with more (the graph is written, unchecked)")
