"""The files an export folder and its engines are checked and written by: sha256 of graphs and engines, read once
per process and file state (``file_hash``), and the inter-process lock each cache entry and engine build takes
(``file_lock``). Atomic writes of single files are ``sdfast.files.write_atomically``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

from .errors import ExportError

try:
    import fcntl  # the file locks (POSIX); elsewhere the caches are not guarded against concurrent writers
except ImportError:
    fcntl = None

# How long a process waits for another that is exporting the same model into the same cache (a full-size SDXL
# export on a CPU takes tens of minutes) before it gives up with an error naming the lock.
LOCK_TIMEOUT_S = 3 * 3600.0


def sha256_files(*paths: Path) -> str:
    """sha256 over the bytes of ``paths``, in order, read in 16 MiB blocks (engines and graphs pass 2 GB)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


# sha256 of graph files already hashed by this process, keyed by the files' identity and state (device, inode, size,
# modification and change times): a load verifies the graphs (``read_manifest``) and the tensorrt backend keys its
# engines by the same hash (``file_hash``), so a 1.6 GB U-Net is read once per load, not once per use. Any write,
# rename onto the path or truncation changes the key.
_HASHED: dict[tuple, str] = {}


def _identity(paths: tuple[Path, ...]) -> tuple:
    stats = [p.stat() for p in paths]
    return tuple((str(p.resolve()), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                 for p, s in zip(paths, stats))


def _hash_once(*paths: Path) -> str:
    key = _identity(paths)
    if key not in _HASHED:
        _HASHED[key] = sha256_files(*paths)
    return _HASHED[key]


def file_hash(path: Path) -> str:
    """sha256 of an ONNX file and its external data file, if any: what the manifest records and an engine is
    keyed by."""
    data = path.with_name(path.name + ".data")
    return _hash_once(path, *([data] if data.is_file() else []))


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float = LOCK_TIMEOUT_S, what: str = "writing here", log=None):
    """An exclusive ``fcntl.flock`` on ``path`` (created if need be), held for the ``with`` block: one process at a
    time writes a cache entry, and the others wait, then find it written. The lock dies with its process, so a
    crashed writer never leaves it held. A wait past ``timeout`` seconds is an ExportError naming the holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if fcntl is None:  # no flock here (Windows): unguarded
            yield
            return
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    raise ExportError(f"waited {timeout:g} s for {path}: {holder} is still {what}; wait for it "
                                      "to finish and try again (the lock goes when that process ends)") from None
                if log and not told:
                    log(f"waiting for {holder}, which is {what} ({path})")
                    told = True
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {os.uname().nodename}")
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
