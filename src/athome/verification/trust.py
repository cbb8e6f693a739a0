"""Adaptive sampling of (peer, step) pairs to check, as BOINC's adaptive replication does.

A peer with ``n`` consecutive clean checks is checked with probability ``max(base_rate, 1 / (1 + n))``: a new peer's
first steps are all checked, a peer with a long clean record only at ``base_rate``. Any failure, a new session
(restart) or a late commitment resets the streak. The expected number of checks to earn the base rate is
``1 / base_rate`` (BOINC: "trusted with probability 1 - 1/count"), so the extra cost of a newcomer is bounded and
Sybils that keep changing identity pay it every time.

Randomness comes from the OS (``secrets``) unless a seed is given (simulations): a trainer must not be able to
predict which of its steps will be checked.
"""
from __future__ import annotations

import random
import secrets
import threading
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass
class PeerTrust:
    clean_streak: int = 0
    checks: int = 0
    failures: int = 0
    commitments_seen: int = 0


class TrustSampler:
    """Decides which commitments to check.

    :param base_rate: the long-run probability of checking one step of a trusted peer (the run's ``check_rate``)
    :param max_rate: the probability for a brand-new peer (1.0 = its first steps are always checked)
    """

    def __init__(self, base_rate: float = 0.05, max_rate: float = 1.0, seed: Optional[int] = None):
        if not 0.0 <= base_rate <= max_rate <= 1.0:
            raise ValueError("need 0 <= base_rate <= max_rate <= 1")
        self.base_rate, self.max_rate = base_rate, max_rate
        self._random = random.Random(seed) if seed is not None else secrets.SystemRandom()
        self._peers: Dict[str, PeerTrust] = {}
        self._lock = threading.Lock()

    def trust(self, peer: str) -> PeerTrust:
        with self._lock:
            return self._peers.setdefault(peer, PeerTrust())

    def probability(self, peer: str) -> float:
        streak = self.trust(peer).clean_streak
        return min(self.max_rate, max(self.base_rate, 1.0 / (1.0 + streak)))

    def should_check(self, peer: str, late: bool = False) -> bool:
        """Call once per new commitment of ``peer``; late commitments are always checked."""
        self.trust(peer).commitments_seen += 1
        if late:
            return True
        return self._random.random() < self.probability(peer)

    def record(self, peer: str, passed: bool) -> None:
        trust = self.trust(peer)
        with self._lock:
            trust.checks += 1
            if passed:
                trust.clean_streak += 1
            else:
                trust.failures += 1
                trust.clean_streak = 0

    def reset(self, peer: str) -> None:
        """Back to newcomer (e.g. the peer restarted with a new session)."""
        with self._lock:
            self._peers.setdefault(peer, PeerTrust()).clean_streak = 0
