"""Memory estimates: check that a tensor fits before allocating it."""

from __future__ import annotations

import os

import torch

from .errors import MemoryBudgetError

# Leave head-room for the model itself, autograd and the allocator.
_USABLE_FRACTION = 0.6
# Per-channel blocks are computed in chunks of at most this many bytes (per temporary).
DEFAULT_BLOCK_BYTES = 256 * 2**20


def default_block_bytes(device: torch.device | str) -> int:
    """Bytes per block-sized temporary: 5% of the free memory, between 64 MiB and 2 GiB."""
    return int(min(2 * 2**30, max(64 * 2**20, 0.05 * available_bytes(device))))


def available_bytes(device: torch.device | str) -> int:
    """Bytes that can still be allocated on ``device`` (free GPU memory, or available host RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def ensure_fits(what: str, needed_bytes: int, device: torch.device | str, advice: str) -> None:
    """Raise :class:`MemoryBudgetError` if ``needed_bytes`` exceeds the usable memory of ``device``."""
    budget = int(available_bytes(device) * _USABLE_FRACTION)
    if needed_bytes > budget:
        raise MemoryBudgetError(what, needed_bytes, budget, advice)


def channels_per_block(batch: int, length: int, channels: int, itemsize: int,
                       temporaries: int = 4, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """How many channels of ``[batch, c, L, L]`` blocks to compute at once within ``block_bytes``.

    ``temporaries`` is how many block-sized tensors the computation holds at its peak.
    """
    per_channel = batch * length * length * itemsize * temporaries
    return max(1, min(channels, block_bytes // max(per_channel, 1)))
