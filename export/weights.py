"""Where each LoRA-patchable weight of a network sits in its exported ONNX graph, so that LoRAs reach the exported
backends without a new export (ONNX Runtime takes overriding initializers when it makes a session; TensorRT refits
an engine's weights by initializer name).

torch.onnx keeps a convolution's weight as an initializer named after the parameter, but a Linear's weight becomes
a transposed copy that constant folding names ``val_126``. Names do not say where a weight went; values do: each
weight in the export dtype, as is or transposed, is found among the graph's initializers by its bytes, once, at
export. The manifest keeps the map per graph (``weights``: {module path: [initializer, transposed]}). A weight
whose bytes two initializers share, or none, is left out: a LoRA that touches it is refused on that backend.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdfast.lora.formats import patchable


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _external(init) -> dict[str, str] | None:
    """An initializer's external-data fields (location, offset, length), or None when its bytes are inline."""
    if init.data_location != 1:  # onnx.TensorProto.EXTERNAL
        return None
    return {entry.key: entry.value for entry in init.external_data}


def initializer_bytes(init, folder: Path) -> bytes:
    """The raw little-endian bytes of an initializer, inline or from its external-data file (one read)."""
    external = _external(init)
    if external is None:
        import onnx

        return onnx.numpy_helper.to_array(init).tobytes()
    with open(folder / external["location"], "rb") as f:
        f.seek(int(external.get("offset", 0)))
        return f.read(int(external["length"])) if "length" in external else f.read()


def locate(graph: Path, network: nn.Module) -> dict[str, list]:
    """{module path: [initializer name, transposed, weight shape]} for ``network``'s patchable weights in the graph
    file ``graph`` (exported from ``network`` in the dtype its weights have now): the manifest's ``weights``."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    wanted: dict[bytes, list[tuple[str, bool]]] = {}
    shapes = set()
    for path, module in patchable(network).items():
        weight = module.weight.detach().cpu()
        variants = [(weight, False)] + ([(weight.t(), True)] if weight.dim() == 2 else [])
        for tensor, transposed in variants:
            wanted.setdefault(_digest(tensor.contiguous().numpy().tobytes()), []).append((path, transposed))
            shapes.add(tuple(tensor.shape))
    found: dict[str, list[tuple[str, bool]]] = {}
    for init in model.graph.initializer:
        if tuple(init.dims) not in shapes:
            continue
        for path, transposed in wanted.get(_digest(initializer_bytes(init, graph.parent)), []):
            found.setdefault(path, []).append((init.name, transposed))
    shape = {path: list(module.weight.shape) for path, module in patchable(network).items()}
    return {path: [*places[0], shape[path]] for path, places in found.items()
            if len({name for name, _ in places}) == 1}


def read_initializers(graph: Path, places: dict[str, tuple[str, bool]]) -> dict[str, torch.Tensor]:
    """Weights' values from the graph file ({module path: (initializer, transposed)}), in the modules' layout."""
    arrays = read_named(graph, sorted({name for name, _ in places.values()}))
    out = {}
    for path, (name, transposed) in places.items():
        tensor = torch.from_numpy(arrays[name].copy())
        out[path] = tensor.t() if transposed else tensor
    return out


def read_named(graph: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Initializers' values by name, as the graph holds them (layout and dtype)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    by_name = {init.name: init for init in model.graph.initializer}
    return {name: np.frombuffer(initializer_bytes(by_name[name], graph.parent),
                                dtype=onnx.helper.tensor_dtype_to_np_dtype(by_name[name].data_type))
            .reshape(tuple(by_name[name].dims)) for name in names}


def as_initializer(value: torch.Tensor, transposed: bool, dtype: torch.dtype) -> np.ndarray:
    """A weight in the module's layout as the graph holds it: the export dtype, transposed back where it was."""
    value = value.to(dtype)
    return (value.t() if transposed else value).contiguous().cpu().numpy()
