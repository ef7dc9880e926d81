"""The LoRAs loaded into a pipeline, merged into its weights in place.

A pipeline holds any number of loaded LoRAs, each with a default scale; a call to ``generate`` runs with the
defaults or with its own ``loras={name: scale}``. Merging writes ``W = W_base + sum_i scale_i * delta_i`` into the
weight tensors themselves (computed in fp32, rounded once to the weight's dtype), so every backend that runs the
torch modules sees it with nothing rebuilt: captured CUDA graphs read the same addresses, compiled graphs read the
parameters as inputs, the triton backend's fused QKV weights are views of the same storage.

Cost: the first LoRA touching a weight keeps a copy of its base value on the weight's device (restored bit-exactly
when no LoRA touches it any more); a swap recomputes only the weights the old and new sets touch, one
``up @ down`` product per module.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from ..request import lora_scale
from .formats import LoRA, LoRAError, patchable, read

NETWORKS = ("unet", "text_encoder", "text_encoder_2")


class TorchWeights:
    """A network's LoRA-patchable weights as the torch parameters themselves: read, and written in place."""

    def __init__(self, module: nn.Module):
        self._modules = patchable(module)
        self.shapes = {path: tuple(m.weight.shape) for path, m in self._modules.items()}

    def read(self, paths: list[str]) -> dict[str, torch.Tensor]:
        return {path: self._modules[path].weight.detach().clone() for path in paths}

    @torch.no_grad()
    def write(self, weights: dict[str, torch.Tensor], pristine: set[str] = frozenset()) -> None:
        """``weights``' new values; ``pristine`` names those that are their base values again."""
        for path, value in weights.items():
            self._modules[path].weight.copy_(value)


def weights_of(net) -> TorchWeights:
    """The weight store of one of a pipeline's networks: the torch module itself, the U-Net a backend's CUDA-graph
    or compiled wrapper runs (both keep it as ``.unet``), or what an exported network offers (``.weights()``:
    ``sdfast.backends.exported.GraphWeights``, with the same ``shapes`` / ``read`` / ``write``)."""
    if hasattr(net, "weights"):
        return net.weights()
    net = getattr(net, "unet", net)
    if not isinstance(net, nn.Module):
        raise LoRAError(f"a {type(net).__name__} network takes no LoRA")
    return TorchWeights(net)


class LoRAs:
    """``pipe.loras``: load, rescale, unload, list. Changes apply at once (under the pipeline's lock)."""

    def __init__(self, pipe, lock: threading.RLock):
        self._pipe, self._lock = pipe, lock
        self._loaded: dict[str, LoRA] = {}
        self._scales: dict[str, float] = {}  # the defaults, what calls without loras= use
        self._merged: dict[str, float] = {}  # what the weights hold now
        self._base: dict[tuple[str, str], torch.Tensor] = {}  # (network, module) -> its weight before any LoRA
        self._weights: dict[str, TorchWeights] | None = None  # per network, made on first use

    # -- the API --

    def load(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Read the LoRA at ``path`` and apply it at ``scale``; returns its name (``name``, else the file's stem).
        Refused whole (nothing changes) if any key does not fit the model."""
        path = Path(path)
        name = path.stem if name is None else name
        with self._lock:
            self._check_new(name, scale)
            shapes = {network: store.shapes for network, store in self._stores().items()}
            return self.add(read(path, shapes, self._pipe.unet.config if "unet" in shapes else None), scale, name)

    def add(self, lora: LoRA, scale: float = 1.0, name: str | None = None) -> str:
        """Apply an already parsed ``LoRA`` (``sdfast.lora.formats.read``) at ``scale`` under ``name``."""
        name = lora.path.stem if name is None else name
        with self._lock:
            scale = self._check_new(name, scale)
            stores = self._stores()
            new = [key for key in lora.patches if key not in self._base]  # the weights no loaded LoRA touches yet
            for network in {network for network, _ in new}:
                values = stores[network].read([module for n, module in new if n == network])
                self._base.update({(network, module): value for module, value in values.items()})
            self._loaded[name], self._scales[name] = lora, scale
            self.apply(self._scales)
        return name

    def _check_new(self, name, scale) -> float:
        if not isinstance(name, str) or not name:
            raise LoRAError(f"LoRA name {name!r} must be a non-empty string")
        if name in self._loaded:
            raise LoRAError(f"a LoRA named {name!r} is loaded already: unload it first or pass name=")
        return lora_scale("scale", name, scale)

    def set_scale(self, name: str, scale: float) -> None:
        with self._lock:
            self._require(name)
            self._scales[name] = lora_scale("scale", name, scale)
            self.apply(self._scales)

    def unload(self, name: str | None = None) -> None:
        """Remove one LoRA (or all, with no name); the weights no remaining LoRA touches are their base again,
        bit for bit."""
        with self._lock:
            names = list(self._loaded) if name is None else [self._require(name)]
            remaining = {n: s for n, s in self._scales.items() if n not in names}
            self.apply(remaining)
            for n in names:
                del self._loaded[n], self._scales[n]
            touched = {key for lora in self._loaded.values() for key in lora.patches}
            self._base = {key: base for key, base in self._base.items() if key in touched}

    @property
    def scales(self) -> dict[str, float]:
        """Loaded LoRAs and their default scales, in load order."""
        return dict(self._scales)

    def __contains__(self, name: str) -> bool:
        return name in self._loaded

    def __len__(self) -> int:
        return len(self._loaded)

    def __getitem__(self, name: str) -> LoRA:
        return self._loaded[self._require(name)]

    def __repr__(self) -> str:
        return f"LoRAs({self._scales})"

    # -- merging --

    def apply(self, scales: dict[str, float]) -> None:
        """Make the weights hold exactly the LoRAs ``scales`` names at those scales (loaded ones only); a no-op
        when they already do."""
        active = {n: s for n, s in scales.items() if s != 0.0}
        for n in active:
            self._require(n)
        with self._lock:
            if active == self._merged:
                return
            stores = self._stores()
            touched = {key for n in {*active, *self._merged} for key in self._loaded[n].patches}
            writes: dict[str, dict[str, torch.Tensor]] = {}
            pristine: dict[str, set[str]] = {}
            for network, module in sorted(touched):
                base = self._base[(network, module)]
                updates = [(s, self._loaded[n].patches.get((network, module))) for n, s in active.items()]
                updates = [(s, p) for s, p in updates if p is not None]
                merged = base
                if updates:  # W + sum_i s_i * up_i @ down_i in fp32 (one fused addmm each), rounded once
                    flat = base.reshape(len(base), -1).float()  # (out, in * k * k); aliases an fp32 base: addmm
                    for s, patch in updates:  # returns a new tensor, the base is never written
                        up, down = patch.factors(base.device)
                        flat = torch.addmm(flat, up, down, alpha=s * patch.scale)
                    merged = flat.view(base.shape)
                else:
                    pristine.setdefault(network, set()).add(module)
                writes.setdefault(network, {})[module] = merged
            for network, weights in writes.items():
                stores[network].write(weights, pristine.get(network, set()))
            self._merged = active

    def _require(self, name: str) -> str:
        if name not in self._loaded:
            loaded = ", ".join(map(repr, self._loaded)) or "none"
            raise LoRAError(f"no LoRA named {name!r} is loaded (loaded: {loaded}); load it with pipe.loras.load(path)")
        return name

    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """What a LoRA can update: {network: {module path: weight shape}}."""
        return {network: store.shapes for network, store in self._stores().items()}

    def _stores(self) -> dict[str, TorchWeights]:
        if self._weights is None:
            self._weights = {network: weights_of(getattr(self._pipe, network)) for network in NETWORKS
                             if getattr(self._pipe, network, None) is not None}
        return self._weights
