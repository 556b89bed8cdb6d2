"""Peak resident memory of one call, measured in-process on Linux.

Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the
current RSS, so VmHWM after the call minus VmRSS before it is the extra memory the call
touched at its peak. Large tensors are mmap'ed and given back on free, so earlier work does
not hide later peaks. Returns MiB.
"""
from __future__ import annotations

import gc


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(fn, *args, **kwargs) -> float:
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn(*args, **kwargs)
    peak = _status_kib("VmHWM")
    del result
    gc.collect()
    return max(0, peak - before) / 1024.0
