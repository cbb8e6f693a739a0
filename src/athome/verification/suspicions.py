"""Trainers' hints for validators: peers whose averaging parts were heavily clipped are checked first.

A trainer's robust reducer (CenteredClip) sees each sender's parts; a sender whose parts were mostly clipped far
down, or rejected (non-finite, bad weight), is named by ``RoundReport.suspects()``. That is a hint, not proof: an
honest peer with an unusual batch, or one that a malicious reducer frames, can be clipped too. So a hint only changes
*which* committed steps a validator recomputes first, and how many: the suspect's next ``checks`` commitments are
checked whatever its trust, ahead of other trainers' queued steps. Only a failed recomputation accuses and bans.

- :class:`SuspicionBook` (trainer side): fed with every :class:`~athome.averaging.RoundReport`; builds the signed
  :class:`~athome.dht.schemas.SuspicionRecord` the trainer publishes (``athome.<run>.suspicions``).
- :func:`fresh_hints` (validator side): the (reporter, suspect) observations not acted on yet, ignoring banned
  reporters, banned suspects and self-reports. :class:`~athome.verification.validator.Validator` calls it.

Cost of abuse: a malicious trainer that names honest peers makes the validator check some of their steps sooner
(at most ``checks`` per new observation); they pass, and nothing else happens to them.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, Iterable, List, Optional, Tuple

from athome.dht.schemas import MAX_SUSPECTS, Suspicion, SuspicionRecord

DEFAULT_MIN_CLIP_FRACTION = 0.5  # RoundReport.suspects()'s default: most of the sender's parts heavily clipped
DEFAULT_MAX_AGE = 600.0  # seconds an observation stays in the trainer's record


class SuspicionBook:
    """Collects suspects from round reports (call :meth:`note_round` from any thread, e.g. an averager's
    ``on_round``); :meth:`record` is the newest ``MAX_SUSPECTS`` of them, observed within ``max_age`` seconds."""

    def __init__(self, own_peer_id: str, min_clip_fraction: float = DEFAULT_MIN_CLIP_FRACTION,
                 max_age: float = DEFAULT_MAX_AGE):
        self.own_peer_id, self.min_clip_fraction, self.max_age = own_peer_id, min_clip_fraction, max_age
        self._suspects: Dict[str, Suspicion] = {}
        self._lock = threading.Lock()
        self.version = 0  # bumped on every change: publish when it moved

    def note_round(self, report) -> List[str]:
        """Take the suspects of one ``RoundReport``; returns the peers named (never this peer itself)."""
        named = [peer for peer in report.suspects(self.min_clip_fraction) if peer != self.own_peer_id]
        if not named:
            return []
        now = time.time()
        with self._lock:
            for peer in named:
                before = self._suspects.get(peer)
                self._suspects[peer] = Suspicion(
                    peer=peer, rounds=(before.rounds + 1) if before is not None else 1,
                    clip_fraction=min(1.0, max(0.0, float(report.evidence[peer].clip_fraction))), at=now,
                )
            self.version += 1
        return named

    def record(self) -> Optional[SuspicionRecord]:
        """The record to publish; None if there is nothing recent to report."""
        horizon = time.time() - self.max_age
        with self._lock:
            recent = sorted((s for s in self._suspects.values() if s.at >= horizon), key=lambda s: s.at)
        return SuspicionRecord(suspects=recent[-MAX_SUSPECTS:]) if recent else None


def fresh_hints(
    records: Dict[str, SuspicionRecord],
    seen: Dict[Tuple[str, str], float],
    *,
    banned: Iterable[str] = (),
    own_peer_id: str = "",
) -> List[Tuple[str, str]]:
    """(reporter, suspect) pairs whose observation is newer than the one already acted on (``seen``, updated in
    place). Reporters that are banned or are this validator, suspects that are banned or the reporter itself, are
    skipped."""
    banned = set(banned)
    fresh = []
    for reporter, record in records.items():
        if reporter in banned or reporter == own_peer_id:
            continue
        for suspicion in record.suspects:
            if suspicion.peer in banned or suspicion.peer == reporter:
                continue
            key = (reporter, suspicion.peer)
            if seen.get(key, float("-inf")) >= suspicion.at:
                continue
            seen[key] = suspicion.at
            fresh.append(key)
    return fresh
