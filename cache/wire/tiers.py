"""Memory tiers a worker can hold a KV block in, and the mapping from vLLM's ``medium`` strings."""

from __future__ import annotations

import enum


class Tier(enum.IntEnum):
    """Where a worker holds a block. Lower value = faster to reuse (no copy needed for DEVICE)."""

    DEVICE = 0  # accelerator memory (vLLM medium None or "GPU"); reusable as is
    HOST = 1  # CPU memory (vLLM medium "CPU"); must be copied back to the device before reuse


# Medium names on the wire. vLLM publishes None for the GPU prefix cache and "GPU"/"CPU" with KV offloading;
# SGLang's HiCache says "GPU", "CPU_PINNED" (host memory) and "DISK"; prefixgate's engine uses SGLang's names.
MEDIUM_DEVICE = "GPU"
MEDIUM_HOST = "CPU_PINNED"
MEDIUM_DISK = "DISK"

# DISK maps to HOST for now: the index keeps one bit per tier for device and one for the rest
# (cache/index/radix_index.py), so "held, but must be copied to the device first" covers both. A removal
# from one lower medium therefore clears the bit while the other may still hold the block: the index
# under-claims (a routing miss costs a recompute), it never over-claims. Other names, lower-case or
# descriptive, are treated as host too: held, but not on the device.
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
    "DISK": Tier.HOST,
}


def tier_from_medium(medium: str | None) -> Tier:
    """Map a KV event's ``medium`` to a Tier (None/"GPU" -> DEVICE; "CPU", "CPU_PINNED", "DISK" and
    unknown names -> HOST)."""
    if medium is None:
        return Tier.DEVICE
    return _MEDIUM_TO_TIER.get(medium.upper(), Tier.HOST)
