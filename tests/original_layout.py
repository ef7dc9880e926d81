"""Writing the original (CompVis / webui) single-file layout back from sdfast / diffusers state dicts: the inverse
of ``sdfast.layouts``' key table, for tests that make original-layout files from tiny random models."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from sdfast.layouts import original_rules, text_family


def to_original(
    component: str, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], family: str | None = None
) -> dict[str, torch.Tensor]:
    """Original-layout tensors (prefixed file keys) from a sdfast/diffusers `state_dict`: the inverse of the rules.

    For 2.x's text encoder the file also gets the resblock after the last used one: real
    files carry it (OpenCLIP's 24 layers, SD reads the 23rd), and `infer_configs` counts
    layers from it. It is taken from `state_dict` when that holds it (encoder.layers.{n},
    e.g. a whole OpenCLIP tower), else written as zeros; it is never run. SDXL runs every
    layer of its OpenCLIP tower, so its files hold no such extra layer.
    """
    if component == "text_encoder" and text_family(component, config, family) == "sd2":
        n = config["num_hidden_layers"]
        config = {**config, "num_hidden_layers": n + 1}
        zeros = {
            key.replace("encoder.layers.0.", f"encoder.layers.{n}.", 1): torch.zeros_like(value)
            for key, value in state_dict.items()
            if key.startswith("encoder.layers.0.")
        }
        state_dict = {**zeros, **state_dict}
    rules = original_rules(component, config, family)
    targets = {r.target for r in rules}
    missing, extra = sorted(targets - state_dict.keys()), sorted(state_dict.keys() - targets)
    if missing or extra:
        raise ValueError(
            f"{component} state dict does not match its config: missing={missing[:5]} unexpected={extra[:5]}"
        )
    fused: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for r in rules:
        tensor = state_dict[r.target]
        if r.transform in ("q", "k", "v"):
            fused.setdefault(r.source, {})[r.transform] = tensor
        elif r.transform == "conv_to_linear":
            out[r.source] = tensor.reshape(*tensor.shape, 1, 1)  # [O, I] -> [O, I, 1, 1]
        elif r.transform == "text_projection":
            out[r.source] = tensor.t().contiguous()  # [projection, width] -> OpenCLIP's [width, projection]
        else:
            out[r.source] = tensor
    for source, parts in fused.items():
        out[source] = torch.cat([parts["q"], parts["k"], parts["v"]])  # [3W, ...]
    return out
