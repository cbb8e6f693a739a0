"""Where verification records live: the run's DHT (signed records) or, for simulations, memory.

A :class:`Board` is bound to one writer (a peer). Writers replace their own record of each kind; readers get every
writer's latest record. Suspicions (trainers' hints from averaging) only steer which steps validators check first.
Bans are special: :meth:`Board.bans` returns only the entries of the record the *coordinator* wrote; anyone may write
a ban record under their own name, nobody but the coordinator's key can write under the coordinator's (the DHT's
:class:`~athome.dht.records.AthomeRecordValidator` checks the signature).
"""
from __future__ import annotations

import logging
import threading
from typing import Dict, Protocol

import hivemind

from athome.dht.node import get_records, store_record
from athome.dht.schemas import (
    AccusationRecord,
    BanEntry,
    BanRecord,
    CommitmentRecord,
    Record,
    SuspicionRecord,
    run_key,
)

logger = logging.getLogger(__name__)


class Board(Protocol):
    peer_id: str
    coordinator_id: str

    def publish_commitments(self, record: CommitmentRecord) -> bool: ...

    def commitments(self) -> Dict[str, CommitmentRecord]: ...

    def publish_accusations(self, record: AccusationRecord) -> bool: ...

    def accusations(self) -> Dict[str, AccusationRecord]: ...

    def publish_bans(self, record: BanRecord) -> bool: ...

    def bans(self) -> Dict[str, BanEntry]: ...

    def publish_suspicions(self, record: SuspicionRecord) -> bool: ...

    def suspicions(self) -> Dict[str, SuspicionRecord]: ...


def bans_from(records: Dict[str, BanRecord], coordinator_id: str) -> Dict[str, BanEntry]:
    """The ban entries signed by the coordinator (peer -> entry); everyone else's ban records are ignored."""
    record = records.get(coordinator_id)
    if record is None:
        return {}
    return {entry.peer: entry for entry in record.bans}


class DHTBoard:
    """Verification records in the run's DHT, signed with this peer's key (see :mod:`athome.dht.records`).

    :param ttl: seconds a record lives; writers refresh theirs on every publish
    """

    def __init__(self, dht: hivemind.DHT, run_name: str, coordinator_id: str, ttl: float = 120.0):
        self.dht, self.run_name, self.coordinator_id, self.ttl = dht, run_name, coordinator_id, ttl
        self.peer_id = dht.peer_id.to_base58()

    def _store(self, kind: str, record: Record) -> bool:
        return store_record(self.dht, run_key(self.run_name, kind), record, ttl=self.ttl)

    def _get(self, kind: str, schema) -> dict:
        return {peer: record for peer, (record, _) in get_records(self.dht, run_key(self.run_name, kind), schema).items()}

    def publish_commitments(self, record: CommitmentRecord) -> bool:
        return self._store("commitments", record)

    def commitments(self) -> Dict[str, CommitmentRecord]:
        return self._get("commitments", CommitmentRecord)

    def publish_accusations(self, record: AccusationRecord) -> bool:
        return self._store("accusations", record)

    def accusations(self) -> Dict[str, AccusationRecord]:
        return self._get("accusations", AccusationRecord)

    def publish_bans(self, record: BanRecord) -> bool:
        return self._store("bans", record)

    def bans(self) -> Dict[str, BanEntry]:
        return bans_from(self._get("bans", BanRecord), self.coordinator_id)

    def publish_suspicions(self, record: SuspicionRecord) -> bool:
        return self._store("suspicions", record)

    def suspicions(self) -> Dict[str, SuspicionRecord]:
        return self._get("suspicions", SuspicionRecord)


class MemoryHub:
    """Shared in-process storage for :class:`MemoryBoard` s (simulations and tests)."""

    def __init__(self, coordinator_id: str):
        self.coordinator_id = coordinator_id
        self.records: Dict[str, Dict[str, Record]] = {
            "commitments": {}, "accusations": {}, "bans": {}, "suspicions": {},
        }
        self.lock = threading.Lock()

    def board(self, peer_id: str) -> "MemoryBoard":
        return MemoryBoard(self, peer_id)


class MemoryBoard:
    """A :class:`Board` in memory; the writer is fixed at construction, as a DHT node's key is."""

    def __init__(self, hub: MemoryHub, peer_id: str):
        self.hub, self.peer_id, self.coordinator_id = hub, peer_id, hub.coordinator_id

    def _store(self, kind: str, record: Record) -> bool:
        with self.hub.lock:
            self.hub.records[kind][self.peer_id] = record
        return True

    def _get(self, kind: str) -> dict:
        with self.hub.lock:
            return dict(self.hub.records[kind])

    def publish_commitments(self, record: CommitmentRecord) -> bool:
        return self._store("commitments", record)

    def commitments(self) -> Dict[str, CommitmentRecord]:
        return self._get("commitments")

    def publish_accusations(self, record: AccusationRecord) -> bool:
        return self._store("accusations", record)

    def accusations(self) -> Dict[str, AccusationRecord]:
        return self._get("accusations")

    def publish_bans(self, record: BanRecord) -> bool:
        return self._store("bans", record)

    def bans(self) -> Dict[str, BanEntry]:
        return bans_from(self._get("bans"), self.coordinator_id)

    def publish_suspicions(self, record: SuspicionRecord) -> bool:
        return self._store("suspicions", record)

    def suspicions(self) -> Dict[str, SuspicionRecord]:
        return self._get("suspicions")
