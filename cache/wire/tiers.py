"""Memory tiers a worker can hold a KV block in, and the mapping from vLLM's ``medium`` strings."""

from __future__ import annotations

import enum


class Tier(enum.IntEnum):
    """Where a worker holds a block. Lower value = faster to reuse (no copy needed for DEVICE)."""

    DEVICE = 0  # accelerator memory (vLLM medium None or "GPU"); reusable as is
    HOST = 1  # CPU memory (vLLM medium "CPU"); must be copied back to the device before reuse


# vLLM publishes medium=None for the GPU prefix cache and "GPU"/"CPU" with KV offloading; other engines use
# lower-case or descriptive names. Anything unknown is treated as host: it is held, but not on the device.
_MEDIUM_TO_TIER: dict[str | None, Tier] = {
    None: Tier.DEVICE,
    "GPU": Tier.DEVICE,
    "CUDA": Tier.DEVICE,
    "DEVICE": Tier.DEVICE,
    "HBM": Tier.DEVICE,
    "CPU": Tier.HOST,
    "HOST": Tier.HOST,
    "DRAM": Tier.HOST,
}


def tier_from_medium(medium: str | None) -> Tier:
    """Map a KV event's ``medium`` to a Tier (None/"GPU" -> DEVICE, "CPU" -> HOST, unknown -> HOST)."""
    if medium is None:
        return Tier.DEVICE
    return _MEDIUM_TO_TIER.get(medium.upper(), Tier.HOST)
