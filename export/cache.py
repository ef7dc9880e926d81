"""The on-the-fly export cache: ``sdfast.load(..., backend="onnxruntime" | "tensorrt")`` exports a checkpoint once
into ``CACHE/HASH-DTYPE-opsetN``, keyed by its weights, and reuses the entry after that. Entries are verified
against their manifest before use, written aside and renamed into place, under a file lock (``cached_export``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

from .errors import ExportError
from .files import LOCK_TIMEOUT_S, file_lock
from .graphs import dtype_name
from .manifest import module_hash, read_manifest, weights_hash
from .onnx import DEFAULT_OPSET, add_control_graphs, export_pipeline, require_onnx


def _private_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new empty folder with a unique name under ``parent``, with the permissions of a plain ``mkdir``."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    return folder


def replace_folder(new: Path, folder: Path) -> None:
    """Put folder ``new`` at ``folder``'s path by renames only (``folder``, if there, is moved aside under a unique
    name first and then deleted), so the path never shows a half-written folder."""
    old = None
    if folder.exists():
        old = folder.with_name(f"{folder.name}.{uuid.uuid4().hex[:8]}.old")
        folder.rename(old)
    new.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cache_folder(cache_dir, model_hash: str, dtype: str, opset: int) -> Path:
    """The cache entry of a model: ``CACHE/HASH-DTYPE-opsetN``; its lock is the ``.lock`` file beside it."""
    return Path(cache_dir).expanduser() / f"{model_hash[:20]}-{dtype}-opset{opset}"


def cached_export(pipe, cache_dir, *, opset: int = DEFAULT_OPSET, controlnet: bool = False, log=None,
                  lock_timeout: float = LOCK_TIMEOUT_S) -> Path:
    """The export folder of ``pipe`` under ``cache_dir``, keyed by its weights, dtype and opset: exported (and
    checked) the first time, reused after. ``controlnet``: the entry also holds the controlled U-Net
    (``unet_control``, a second copy of the U-Net's weights), added to an entry that lacks it; the ControlNets'
    own graphs are added as they are loaded (``cached_controlnet``).

    - A cached entry is verified before it is used: every graph's size and sha256 against its manifest.
    - An entry that fails (changed or truncated graph, unreadable manifest, no manifest) is exported again, once,
      with a warning naming what was wrong; if the new one fails too, that is an ExportError.
    - An export is written to a folder of its own (a unique temporary name beside the entry) and renamed into place
      when complete, so the entry's path never holds a partial export.
    - A file lock (``ENTRY.lock``) makes one process at a time check or write an entry: two processes loading one
      model into an empty cache export it once; the second waits (up to ``lock_timeout`` seconds), then finds the
      finished entry and uses it.
    """
    require_onnx()
    model_hash = weights_hash(pipe)
    dtype = dtype_name(pipe.dtype)
    folder = cache_folder(cache_dir, model_hash, dtype, opset)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(folder.name + ".lock")
    with file_lock(lock, timeout=lock_timeout, what=f"exporting {folder.name}", log=log):
        problem = _cache_problem(folder)
        if problem is None:
            if controlnet and "unet_control" not in read_manifest(folder, verify=False)["networks"]:
                add_control_graphs(pipe, folder, unet=True, log=log)
            return folder
        # leftovers of writers that died (the lock is ours, so no one else is writing them)
        for stale in (*folder.parent.glob(f"{folder.name}.*.partial"), *folder.parent.glob(f"{folder.name}.*.old"),
                      folder.with_name(folder.name + ".partial")):
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():
            warnings.warn(f"the cached ONNX export {folder} is unusable ({problem}); exporting it again",
                          RuntimeWarning, stacklevel=2)
        partial = _private_dir(folder.parent, f"{folder.name}.", ".partial")
        try:
            export_pipeline(pipe, partial, opset=opset, model_hash=model_hash, controlnets={} if controlnet else None,
                            log=log)
            replace_folder(partial, folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        problem = _cache_problem(folder)
        if problem is not None:
            raise ExportError(f"the cached ONNX export {folder} was exported again and is still unusable "
                              f"({problem}): is the disk full or failing? Delete {folder} and try again")
    return folder


def cached_controlnet(pipe, folder: Path, net, *, log=None, lock_timeout: float = LOCK_TIMEOUT_S) -> str:
    """The name of ``net``'s graph in the cache entry ``folder`` (``controlnet_NAME``, NAME its weights hash):
    exported (and checked) into the entry the first time, under the entry's lock, reused after. ``pipe``: the
    pipeline the entry runs (its configs give the example inputs)."""
    name = module_hash(net)[:20]
    with file_lock(folder.with_name(folder.name + ".lock"), timeout=lock_timeout, what=f"exporting a ControlNet "
                   f"into {folder.name}", log=log):
        if name not in read_manifest(folder, verify=False).get("controlnets", {}):
            add_control_graphs(pipe, folder, controlnets={name: net}, log=log)
    return name


def _cache_problem(folder: Path) -> str | None:
    """What makes a cache entry unusable ("no manifest", a graph that does not match it...), or None."""
    if not folder.exists():
        return "not exported yet"
    try:
        read_manifest(folder, verify=True)
    except (ExportError, OSError) as e:
        return str(e)
    return None
