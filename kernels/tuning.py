"""Autotune lists for sdfast's kernels: the full sweep, and a quick list taken from what a GPU run measured.

Triton benchmarks every config of a kernel's list on the first call per autotune key. The full lists
(``attention``: 36 configs, ``group_norm``: 6, over every distinct shape of a U-Net) take minutes on a first call:
too long for a short GPU session or a server's cold start. ``autotune="quick"`` runs a short list instead:
- the configs that won any key of a full sweep in the results a GPU run saved under ``kernels/tuned/`` for this
  GPU's compute capability (``sm_90.json``; ``benchmarks/gpu/run.sh`` writes them, most frequent winner first, at
  most ``QUICK_LIMIT``);
- else a hand-picked fallback per kernel (a guess, until a run measures one).
Both lists draw only from the full list, so a quick winner is always a config the full sweep would also try.
A kernel module names its autotuners in an ``Autotuners`` mapping, which builds each on first use: a quick list
asks the GPU for its compute capability, and importing a kernel module should not initialise CUDA.

``snapshot(...)`` reads the winners out of the autotuners after a run, in the format this module reads back.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

TUNED = Path(__file__).with_name("tuned")  # one JSON file per compute capability, e.g. tuned/sm_90.json
QUICK_LIMIT = 4  # configs per kernel in a quick list: a few benchmarks per key instead of dozens
MODES = ("quick", "full")


def capability() -> str | None:
    """This machine's GPU as "sm_XY", or None without a CUDA device (the interpreter needs no tuning)."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def describe(config) -> dict:
    """A ``triton.Config`` as plain JSON: its meta-parameters, warps and pipeline stages."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _measured(kernel: str, arch: str | None) -> list[dict]:
    """The configs that won ``kernel``'s keys in a full sweep saved for ``arch``, most frequent first (a quick
    list's winners only rank the quick list itself, so they are not evidence)."""
    path = TUNED / f"{arch}.json"
    if arch is None or not path.is_file():
        return []
    entries = [e for e in json.loads(path.read_text()).get("kernels", {}).get(kernel, []) if e.get("list") == "full"]
    counts = Counter(json.dumps(entry["config"], sort_keys=True) for entry in entries)
    return [json.loads(text) for text, _ in counts.most_common()]


def quick(kernel: str, full: list, fallback: list[dict], *, arch: str | None = None) -> list:
    """The quick list for ``kernel``: the measured winners for ``arch`` (default: this GPU), else ``fallback``,
    each looked up in ``full`` (entries that are not in it are dropped), at most ``QUICK_LIMIT``."""
    by_text = {json.dumps(describe(c), sort_keys=True): c for c in full}
    wanted = _measured(kernel, arch or capability()) or fallback
    picked = [by_text[text] for text in dict.fromkeys(json.dumps(w, sort_keys=True) for w in wanted)
              if text in by_text]
    return picked[:QUICK_LIMIT] or full[:1]


class Autotuners(Mapping):
    """Named autotuners (``"attention:quick"``, ...), each built by its ``builders`` entry on first lookup and kept:
    one autotuner, and so one cache of winners, per name for the life of the process."""

    def __init__(self, builders: dict[str, Callable[[], object]]):
        self._builders = builders
        self._built: dict[str, object] = {}
        self._lock = threading.Lock()  # two threads' first calls must not build two autotuners for one name

    def __getitem__(self, name: str):
        if name not in self._built:
            with self._lock:
                if name not in self._built:
                    self._built[name] = self._builders[name]()
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"autotune={mode!r}: choose 'quick' (a short list, measured winners first) or 'full' "
                         "(every config: minutes on the first call per shape)")
    return mode


def snapshot(autotuners: dict[str, object]) -> dict:
    """The winning config per autotune key of each named autotuner (``{"attention:full": ..., ...}``: the kernel
    before the colon, the list after), as ``kernels/tuned/sm_XY.json`` holds them, with the GPU and versions."""
    kernels: dict[str, list] = {}
    for name, tuner in autotuners.items():
        kernel = name.split(":")[0]  # "attention:quick" and "attention:full" feed one list
        for key, config in tuner.cache.items():
            kernels.setdefault(kernel, []).append({"key": [str(k) for k in key], "config": describe(config),
                                                   "list": name.split(":")[-1]})
    import triton

    return {"capability": capability(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "triton": triton.__version__, "kernels": kernels}
