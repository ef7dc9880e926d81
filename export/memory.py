"""The process's memory as an export measures and bounds it (Linux's /proc; elsewhere None or a no-op): the memory
available for a parity check, freed memory handed back between networks, and each network's peak resident memory
(README: measured peaks)."""

from __future__ import annotations

import bisect
import ctypes
import gc
import mmap


def available_memory() -> int | None:
    """Linux's MemAvailable in bytes (free memory plus what the kernel can reclaim), or None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def release_memory() -> None:
    """Hand freed memory back to the system: glibc keeps freed blocks under 32 MiB (most weights and activations)
    in its heap, so without this each network's peak would sit under the next one's (measured: 5.9 GB resident
    after the SD 1.5 fp16 U-Net's check, for a 2.2 GB pipeline)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def reset_peak_rss() -> None:
    """Start a new peak of ``peak_rss`` (Linux: writing 5 to clear_refs resets VmHWM; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux; None elsewhere): since it started, or since the
    current network's export began (``export_network`` resets it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def file_backed_ranges() -> list[tuple[int, int]]:
    """The address ranges this process maps from files (Linux's /proc/self/maps: weights mapped from a safetensors
    file, libraries), sorted; empty elsewhere. Such pages are page cache the kernel can reclaim, unlike the heap."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return sorted(ranges)


def in_ranges(address: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``address`` lies in one of the sorted, disjoint ``ranges``."""
    i = bisect.bisect_right(ranges, (address, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= address < ranges[i][1]


MADV_PAGEOUT = 21  # Linux 5.4+


def page_out(address: int, nbytes: int) -> None:
    """Ask the kernel to reclaim the whole pages of ``nbytes`` at ``address`` now (Linux's MADV_PAGEOUT): pages
    mapped from a file are dropped and read again from it when next touched, so the data never changes (changed
    pages would go to swap, or stay). Best effort: a no-op where the call is missing or refused."""
    lo = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(MADV_PAGEOUT))
    except (OSError, AttributeError):
        pass
