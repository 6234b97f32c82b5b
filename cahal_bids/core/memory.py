"""How much system memory is free, read without importing torch.

Used by :mod:`cahal_bids.core.nifti` (refusing images too large to read) and
:mod:`cahal_bids.engine.tiling` (sizing CPU tiles), which add their own fallbacks where the
figure cannot be read.
"""

from __future__ import annotations

__all__ = ['available_system_memory_bytes']

MEMINFO = '/proc/meminfo'


def available_system_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo``, in bytes.

    Returns
    -------
    int or None
        The memory the kernel estimates can be allocated without swapping, or None
        where it cannot be read (no ``/proc/meminfo`` as on macOS and Windows, no
        ``MemAvailable`` line as on Linux before 3.14, or an unparsable value).
        cgroup limits are not applied here.
    """
    try:
        with open(MEMINFO) as handle:
            for line in handle:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
