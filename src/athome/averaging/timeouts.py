"""All-reduce time limits derived from measured throughput instead of hand-set guesses (hivemind #676).

Each peer measures its own all-reduce throughput (bytes it sent to other peers / wall time of the all-reduce) and
keeps an exponential moving average. Before a round in a group of ``n`` peers, with ``S`` bytes of (compressed)
vector, this peer must send about ``2 (n - 1) / n * S`` bytes, so

    allreduce_timeout = max(min_allreduce_timeout, margin * 2 (n-1)/n * S / throughput)
    sender_timeout    = max(min_chunk_timeout,     margin * n * part_bytes / throughput)
    reducer_timeout   = 2 * sender_timeout          (hivemind requires reducer_timeout > sender_timeout)

``sender_timeout`` is the longest gap allowed between two parts of one stream: a reducer cannot answer part k before
every sender delivered part k, so one gap can last as long as ``n`` parts take to arrive. A round that times out
halves the throughput estimate (the next limits double), so a slower network is learned instead of failing forever.
Before the first measurement, ``initial_throughput`` is used; it should be on the low side.

The same estimate sizes the parts a vector is streamed in (:meth:`AdaptiveTimeouts.part_bytes`): about
``PART_SECONDS`` of this peer's sending. A group's last parts are reduced only once every sender delivered them, so
the round ends about one part-time per flow after the links could have finished; smaller parts shorten that tail
and cost CPU per part. Measured with 4 peers of 10M fp32 behind 100 Mbit/s links (``bench/allreduce.py
--link_mbit 100 --part_size_bytes B``): 1 MiB parts 1.27-1.32x the link-bound time, 128-512 KiB parts 1.19-1.23x;
on loopback larger parts are cheaper (per-part overhead), so the configured size (2 MiB) stays the ceiling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PART_SECONDS = 0.04  # a part is about this long to send at the measured throughput (12.5 MB/s: 500 KB)
MIN_PART_BYTES = 128 << 10  # below this, per-part overhead dominates even on slow links
PART_ALIGNMENT = 4 << 10


@dataclass(frozen=True)
class RoundTimeouts:
    allreduce: float
    sender: float
    reducer: float


class AdaptiveTimeouts:
    """Throughput estimate (bytes/s) and the time limits it implies. Lives in the averager process."""

    def __init__(
        self,
        *,
        initial_throughput: float = 5e6,
        margin: float = 4.0,
        min_allreduce_timeout: float = 60.0,
        min_chunk_timeout: float = 10.0,
        smoothing: float = 0.3,
    ):
        assert initial_throughput > 0 and margin >= 1 and 0 < smoothing <= 1
        self.throughput = float(initial_throughput)
        self.measured = False
        self.margin, self.smoothing = float(margin), float(smoothing)
        self.min_allreduce_timeout, self.min_chunk_timeout = float(min_allreduce_timeout), float(min_chunk_timeout)

    def for_round(self, group_size: int, vector_bytes: float, part_bytes: float) -> RoundTimeouts:
        n = max(group_size, 2)
        to_send = 2 * (n - 1) / n * vector_bytes
        allreduce = max(self.min_allreduce_timeout, self.margin * to_send / self.throughput)
        sender = max(self.min_chunk_timeout, self.margin * n * part_bytes / self.throughput)
        return RoundTimeouts(allreduce=allreduce, sender=sender, reducer=2 * sender)

    def part_bytes(self, ceiling: float) -> int:
        """The part size this peer proposes for its next round (bytes after compression): ``PART_SECONDS`` worth of
        the measured throughput, within ``[MIN_PART_BYTES, ceiling]``; ``ceiling`` itself before any measurement."""
        if not self.measured:
            return int(ceiling)
        wanted = max(MIN_PART_BYTES, self.throughput * PART_SECONDS // PART_ALIGNMENT * PART_ALIGNMENT)
        return int(min(ceiling, wanted))

    def record_success(self, bytes_sent: int, seconds: float) -> Optional[float]:
        """Update the estimate with a completed round; tiny rounds (latency-bound) are ignored."""
        if bytes_sent < 1 << 20 or seconds <= 0:
            return None
        measured = bytes_sent / seconds
        if not self.measured:
            self.throughput, self.measured = measured, True
        else:
            self.throughput = (1 - self.smoothing) * self.throughput + self.smoothing * measured
        return measured

    def record_timeout(self) -> None:
        self.throughput /= 2
