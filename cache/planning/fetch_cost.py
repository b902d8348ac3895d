"""What a worker measures of its KV fetches from peers: the fixed cost of one fetch and the throughput
of its bytes (docs/kv-transfer.md).

A fetch of ``b`` bytes costs about ``round_trip_s + b / bytes_per_s``:

* ``bytes_per_s``: bytes over the time spent moving and verifying them (the transport's read and the
  per-page checksums), the part of a fetch that grows with its size;
* ``round_trip_s``: everything else, paid once per fetch whatever its size: the control channel's
  export request and answer (the source stages the pages on its engine thread meanwhile), the import
  on this engine's thread, the task's own overhead.

The gateway sets that against recomputing the same tokens at the worker's measured prefill rate
(``gateway.fetch_plans``). The reader measures, not the source: what counts is what the worker that
would wait for the pages sees, over the links it actually uses.

Both figures are means whose first ``1/alpha`` samples are a plain running mean (a cold transport's
first handshake washes out as 1/n) and EWMAs after that, so they follow a link that gets slower or
faster. The throughput is kept as seconds per byte, the quantity a time estimate is linear in, so one
small fetch's rate does not count as much as a large one's time. Only fetches whose pages arrived are
measured: a failure says nothing of the link's speed (and is counted by the engine's metrics).

``FetchCostMeter`` belongs to the event loop that runs the fetches; ``FetchCost`` snapshots are
immutable, and ``to_json``/``from_json`` is their wire form (``GET /kv_transfer/info``'s
``fetch_cost``). The gateway reads it from workers it does not trust: ``from_json`` returns None for
anything but finite, non-negative figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FetchCost:
    bytes_per_s: float | None = None  # None until a fetch has moved pages
    round_trip_s: float | None = None
    fetches: int = 0  # fetches measured

    @property
    def measured(self) -> bool:
        return self.bytes_per_s is not None and self.round_trip_s is not None

    def seconds(self, num_bytes: int) -> float | None:
        """The estimated time of one fetch of ``num_bytes`` bytes; None until measured."""
        if self.bytes_per_s is None or self.round_trip_s is None:
            return None
        return self.round_trip_s + num_bytes / self.bytes_per_s

    def to_json(self) -> dict[str, float | int | None]:
        return {"bytes_per_s": self.bytes_per_s, "round_trip_s": self.round_trip_s, "fetches": self.fetches}

    @classmethod
    def from_json(cls, data: object) -> FetchCost | None:
        """The figures a worker reported, or None when they are not figures (a missing object, a wrong
        type, a negative or infinite value, a throughput of 0, one figure without the other)."""
        if not isinstance(data, dict):
            return None
        rate, round_trip, fetches = data.get("bytes_per_s"), data.get("round_trip_s"), data.get("fetches", 0)
        if not (isinstance(fetches, int) and not isinstance(fetches, bool) and fetches >= 0):
            return None
        if rate is None and round_trip is None:
            return cls(fetches=fetches)
        if not (_finite(rate) and rate > 0 and _finite(round_trip) and round_trip >= 0):
            return None
        return cls(float(rate), float(round_trip), fetches)


class FetchCostMeter:
    """Running means, then EWMAs, of a worker's fetches. Not thread-safe: one event loop observes and
    takes snapshots."""

    def __init__(self, alpha: float = 0.2) -> None:
        assert 0 < alpha <= 1
        self.alpha = alpha
        self._seconds_per_byte: float | None = None
        self._round_trip_s: float | None = None
        self._fetches = 0
        self._snapshot = FetchCost()

    def observe(self, num_bytes: int, transfer_s: float, total_s: float) -> None:
        """One fetch that moved ``num_bytes`` bytes, ``transfer_s`` seconds of its ``total_s`` spent moving
        and verifying them."""
        if num_bytes <= 0 or not (_finite(transfer_s) and _finite(total_s) and 0 < transfer_s <= total_s):
            return
        self._fetches += 1
        weight = max(self.alpha, 1 / self._fetches)
        self._seconds_per_byte = _mean(self._seconds_per_byte, transfer_s / num_bytes, weight)
        self._round_trip_s = _mean(self._round_trip_s, total_s - transfer_s, weight)
        self._snapshot = FetchCost(1 / self._seconds_per_byte, self._round_trip_s, self._fetches)

    def snapshot(self) -> FetchCost:
        return self._snapshot


def _mean(old: float | None, new: float, weight: float) -> float:
    return new if old is None else old + weight * (new - old)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
