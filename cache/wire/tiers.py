"""Memory tiers a worker can hold a KV block in, and the mapping from KV events' ``medium`` strings."""

from __future__ import annotations

import enum


class Tier(enum.IntEnum):
    """Where a worker holds a block. Lower value = faster to reuse (no copy needed for DEVICE).

    The values are on the wire (the index log, ``cache.index.ops``): never renumber them."""

    DEVICE = 0  # accelerator memory (medium None or "GPU"); reusable as is
    HOST = 1  # CPU memory ("CPU", "CPU_PINNED"); copied back to the device before reuse
    DISK = 2  # a disk tier ("DISK"); read, then copied to the device before reuse (survives a restart)


# Medium names on the wire. vLLM publishes None for the GPU prefix cache and "GPU"/"CPU" with KV offloading;
# SGLang's HiCache says "GPU", "CPU_PINNED" (host memory) and "DISK"; prefixgate's engine uses SGLang's names.
MEDIUM_DEVICE = "GPU"
MEDIUM_HOST = "CPU_PINNED"
MEDIUM_DISK = "DISK"

# Each tier has its own holder bit in the index (cache/index/radix_index.py), so a removal from one
# medium never drops a block another still holds. Other names, lower-case or descriptive, are treated as
# host: held, but not on the device.
_MEDIUM_TO_TIER: dict[str | None, Tier] = {
    None: Tier.DEVICE,
    "GPU": Tier.DEVICE,
    "CUDA": Tier.DEVICE,
    "DEVICE": Tier.DEVICE,
    "HBM": Tier.DEVICE,
    "CPU": Tier.HOST,
    "CPU_PINNED": Tier.HOST,
    "HOST": Tier.HOST,
    "DRAM": Tier.HOST,
    "DISK": Tier.DISK,
}


def tier_from_medium(medium: str | None) -> Tier:
    """Map a KV event's ``medium`` to a Tier (None/"GPU" -> DEVICE; "CPU", "CPU_PINNED" -> HOST;
    "DISK" -> DISK; unknown names -> HOST)."""
    if medium is None:
        return Tier.DEVICE
    return _MEDIUM_TO_TIER.get(medium.upper(), Tier.HOST)
