"""Process memory settings for services that handle model-sized buffers."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("fedjewel.memory")

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def use_mmap_for_large_blocks(threshold_bytes: int = 128 * 1024) -> bool:
    """Serve allocations above `threshold_bytes` with mmap, so freeing them returns memory.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB),
    after which model-sized buffers come from the heap and stay resident when freed:
    aggregating 50 updates would keep several models' worth of dead memory. A fixed
    threshold stops that. No-op (False) where glibc is not the allocator.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; keeping the allocator's defaults")
        return False
