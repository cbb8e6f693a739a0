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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
