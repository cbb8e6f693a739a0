"""Receipts of expert work: a trainer counts what each host answered for it and signs the totals in the DHT.

The trainer's :class:`~athome.trainer.remote.RemoteDispatcher` calls :meth:`ReceiptBook.count` for every expert that
answered a request; :meth:`ReceiptBook.publish` (run periodically by the trainer) stores one signed
:class:`~athome.dht.schemas.ReceiptRecord` per trainer under ``athome.<run>.receipts``. Counters are cumulative
since the trainer started (a random ``session`` tells the coordinator when they restart), so a record that is lost
or replayed changes nothing: the coordinator credits only the growth (:meth:`athome.coordinator.store.Store.record_receipts`).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Dict

import hivemind

from athome.dht.node import store_record
from athome.dht.schemas import MAX_RECEIPT_HOSTS, HostReceipt, ReceiptRecord, run_key

logger = logging.getLogger(__name__)


class ReceiptBook:
    """Thread-safe cumulative counters of the expert work each host did for this trainer."""

    def __init__(self):
        self.session = secrets.randbelow(2**63)
        self._lock = threading.Lock()
        self._hosts: Dict[str, list[int]] = {}  # host peer ID -> [forward calls, backward calls, token rows]

    def count(self, host_id: str, forward: bool, rows: int) -> None:
        """One expert call answered by ``host_id`` (forward or backward) carrying ``rows`` token rows."""
        with self._lock:
            counters = self._hosts.setdefault(host_id, [0, 0, 0])
            counters[0 if forward else 1] += 1
            counters[2] += int(rows)

    def totals(self) -> Dict[str, HostReceipt]:
        with self._lock:
            items = sorted(self._hosts.items(), key=lambda item: -(item[1][0] + item[1][1]))
        # the busiest hosts first: a record holds at most MAX_RECEIPT_HOSTS of them
        return {
            host: HostReceipt(forward=f, backward=b, samples=rows) for host, (f, b, rows) in items[:MAX_RECEIPT_HOSTS]
        }

    def record(self) -> ReceiptRecord:
        return ReceiptRecord(session=self.session, time=time.time(), hosts=self.totals())

    def publish(self, dht: hivemind.DHT, run_name: str, ttl: float) -> bool:
        """Store this trainer's signed receipts; False if nothing to publish or no DHT node accepted them."""
        record = self.record()
        if not record.hosts:
            return False
        stored = store_record(dht, run_key(run_name, "receipts"), record, ttl)
        if not stored:
            logger.warning("No DHT node accepted this trainer's receipts; retrying on the next publish")
        return stored
