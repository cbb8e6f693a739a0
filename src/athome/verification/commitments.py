"""Commitments: what a trainer publishes (signed) about each step before its contribution is aggregated.

- :func:`commit` turns a :class:`~athome.verification.proof.StepProof` into a
  :class:`~athome.dht.schemas.StepCommitment` (step, batch seed, loss, epoch, params/gradient/expert-I/O hashes).
- :class:`CommitmentWindow` is the trainer's rolling window: one signed ``CommitmentRecord`` per trainer under
  ``athome.<run>.commitments``, replaced as steps go by.
- :class:`CommitmentBook` is a validator's memory of every commitment it has seen. **First seen wins**: a trainer
  that later rewrites a step it already committed (to make a sampled step match an honest recomputation) is caught
  as an *equivocation*; a step that shows up after later steps were already seen is *late* and always checked.
  The book also gives the quorum parameter hash of an epoch (honest trainers share parameters at an epoch).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterable, List, Optional, Tuple

from athome.dht.schemas import MAX_COMMITMENTS, CommitmentRecord, StepCommitment
from athome.verification.proof import StepProof

logger = logging.getLogger(__name__)


def commit(proof: StepProof, now: Optional[float] = None) -> StepCommitment:
    """The commitment of one recorded step (hashing its tensors: ~1 ms per MB)."""
    return StepCommitment(
        step=proof.step, seed=proof.seed, epoch=proof.epoch, loss=max(0.0, proof.loss), samples=proof.samples,
        params_hash=proof.params_hash, grad_hash=proof.grad_hash, io_hash=proof.io_hash,
        committed_at=time.time() if now is None else now,
    )


class CommitmentWindow:
    """A trainer's last ``size`` commitments, as the record it publishes. Thread-safe.

    :param session: random per process start (step numbers restart when a trainer restarts)
    """

    def __init__(self, *, precision: str, device: str, corpus: str, size: int = 32, session: Optional[int] = None,
                 platform: Optional[str] = None):
        if not 1 <= size <= MAX_COMMITMENTS:
            raise ValueError(f"window size must be in [1, {MAX_COMMITMENTS}]")
        from athome.verification.calibration import numerics_platform

        self.precision, self.device, self.corpus = precision, device, corpus
        self.platform = platform if platform is not None else numerics_platform(device)
        self.session = session if session is not None else secrets.randbits(63)
        self._entries: Deque[StepCommitment] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.version = 0  # bumps on every add, so a publisher knows whether there is anything new

    def add(self, commitment: StepCommitment) -> None:
        with self._lock:
            self._entries.append(commitment)
            self.version += 1

    def record(self) -> CommitmentRecord:
        with self._lock:
            entries = list(self._entries)
        return CommitmentRecord(
            session=self.session, precision=self.precision, device=self.device, platform=self.platform,
            corpus=self.corpus, entries=entries,
        )


@dataclass
class SeenCommitment:
    peer: str
    session: int
    commitment: StepCommitment
    precision: str
    device: str
    corpus: str
    first_seen: float
    late: bool = False
    platform: str = ""  # appeared after a later step of the same session had been seen


@dataclass
class BookUpdate:
    """What one :meth:`CommitmentBook.update` found."""

    new: List[SeenCommitment] = field(default_factory=list)
    equivocations: List[Tuple[SeenCommitment, StepCommitment]] = field(default_factory=list)
    new_sessions: List[str] = field(default_factory=list)  # known peers that restarted with a new session


class CommitmentBook:
    """Every commitment a validator has seen, first version kept. Bounded: ``max_steps`` per peer and session.

    Thread-safe. Keys are ``(peer, session, step)``.
    """

    def __init__(self, max_steps: int = 4096):
        self.max_steps = max_steps
        self._seen: Dict[Tuple[str, int], "dict[int, SeenCommitment]"] = {}
        self._max_step: Dict[Tuple[str, int], int] = {}
        self._sessions: Dict[str, int] = {}  # peer -> latest session seen
        self._epochs: "OrderedDict[int, Dict[str, SeenCommitment]]" = OrderedDict()  # epoch -> peer -> latest entry
        self.max_epochs = 256
        self._lock = threading.Lock()

    def update(self, records: Dict[str, CommitmentRecord], now: Optional[float] = None) -> BookUpdate:
        now = time.time() if now is None else now
        result = BookUpdate()
        with self._lock:
            for peer, record in records.items():
                key = (peer, record.session)
                if self._sessions.get(peer) != record.session:
                    if peer in self._sessions and key not in self._seen:
                        result.new_sessions.append(peer)
                    self._sessions[peer] = record.session
                steps = self._seen.setdefault(key, {})
                for entry in sorted(record.entries, key=lambda e: e.step):
                    seen = steps.get(entry.step)
                    if seen is not None:
                        first, again = (c.model_dump(exclude={"committed_at"}) for c in (seen.commitment, entry))
                        if first != again:
                            result.equivocations.append((seen, entry))
                        continue
                    late = entry.step < self._max_step.get(key, -1)
                    seen = SeenCommitment(peer, record.session, entry, record.precision, record.device, record.corpus,
                                          first_seen=now, late=late, platform=record.platform)
                    steps[entry.step] = seen
                    self._max_step[key] = max(self._max_step.get(key, -1), entry.step)
                    self._epochs.setdefault(entry.epoch, {})[peer] = seen
                    result.new.append(seen)
                while len(steps) > self.max_steps:
                    del steps[min(steps)]
            while len(self._epochs) > self.max_epochs:
                del self._epochs[min(self._epochs)]
        return result

    def get(self, peer: str, session: int, step: int) -> Optional[SeenCommitment]:
        with self._lock:
            return self._seen.get((peer, session), {}).get(step)

    def current_session(self, peer: str) -> Optional[int]:
        with self._lock:
            return self._sessions.get(peer)

    def quorum_params_hash(self, epoch: int, exclude: Iterable[str] = (), min_peers: int = 2) -> Optional[str]:
        """The params hash that most *other* peers committed at ``epoch``, if at least ``min_peers`` peers and a
        strict majority of them agree; None when there is no such quorum (then the hash cannot be judged)."""
        excluded = set(exclude)
        with self._lock:
            votes = {peer: seen.commitment.params_hash for peer, seen in self._epochs.get(epoch, {}).items()
                     if peer not in excluded}
        if len(votes) < min_peers:
            return None
        (best, count), = Counter(votes.values()).most_common(1)
        return best if count * 2 > len(votes) else None

    def at_epoch(self, epoch: int, params_hash: Optional[str] = None) -> List[SeenCommitment]:
        """One commitment per peer at ``epoch`` (its latest), optionally only those with ``params_hash``."""
        with self._lock:
            entries = list(self._epochs.get(epoch, {}).values())
        return [seen for seen in entries if params_hash is None or seen.commitment.params_hash == params_hash]

    def forget(self, peer: str) -> None:
        """Drop a (banned) peer's commitments."""
        with self._lock:
            for by_peer in self._epochs.values():
                by_peer.pop(peer, None)
            for key in [key for key in self._seen if key[0] == peer]:
                del self._seen[key]
                self._max_step.pop(key, None)
            self._sessions.pop(peer, None)
