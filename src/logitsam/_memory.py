"""Peak resident memory of this process (Linux), robust to fork/exec.

``getrusage().ru_maxrss`` keeps the parent's high-water mark across fork + exec, so a child started by
a large parent reports the parent's peak. ``VmHWM`` in /proc/self/status belongs to the process's own
address space, and writing 5 to /proc/self/clear_refs resets it to the current RSS.
"""

from __future__ import annotations

import resource


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def peak_rss_bytes() -> int:
    """This address space's peak RSS (VmHWM); ru_maxrss where /proc is unavailable."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
