"""Periodic averaging of the replicas of one expert hosted by different peers.

:class:`ExpertReplicaAverager` owns a :class:`~athome.averaging.averager.RobustAverager` whose buffers are *copies*
of the expert's tensors. A background thread, every ``period`` seconds (aligned to DHT time so that replicas start
together), does:

1. under the caller's lock: copy parameters (and optional extra tensors) into the averager's buffers — a memcpy;
2. without any caller lock: one averaging round in the averager process (serving continues meanwhile);
3. under the caller's lock: apply the result. Parameters use the *delta rule*
   ``param += averaged - snapshot`` so that updates the expert made while the round ran are kept; extra tensors
   (optimizer statistics) are overwritten with the average (a convex combination, so e.g. Adam's ``exp_avg_sq``
   stays non-negative with reducer "mean"/"centered_clip" and codecs "none"/"fp16").

An incomplete round changes nothing (see averager.py). The Moshpit grid comes from hivemind's group keys: with
``expected_replicas`` R and ``target_group_size`` g, the key has ``ceil(log2(R / g))`` random initial bits, so
replicas split into about R/g groups; after every round hivemind's ``GroupKeyManager`` rewrites the bits from the
peers' random indices within their group, so the next round mixes different groups and R replicas agree after about
``log_g R`` rounds.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import torch
from hivemind import DHT
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.utils.timed_storage import get_dht_time

from athome.averaging.averager import RobustAverager, RoundReport

logger = logging.getLogger(__name__)


def averaging_prefix(name: str) -> str:
    """A hivemind-safe averaging prefix for a dotted name such as ``"athome.demo.avg.ffn.0.3"``.

    hivemind forbids '.' in prefixes (group keys are ``{prefix}.0b{bits}``); dots become '_' and a short hash of the
    original name keeps distinct names distinct (``a_b.c`` and ``a.b_c`` would otherwise collide).
    """
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name.replace('.', '_')}_{digest}"


def next_round_time(now: float, period: float, round_timeout: float) -> float:
    """When the next replica-averaging round starts: the next slot of a grid of DHT time that every replica of an
    expert shares. The grid's step is ``period``, stretched to a multiple of it that one attempt (up to
    ``round_timeout``) fits in: with a step shorter than an attempt, a replica that started one slot after another
    (a slower start) would keep looking for groups one slot out of phase, and two such replicas never met (seen with
    period 6 s, attempts of 10 s: every round of both failed for 4 minutes)."""
    step = period * max(1, math.ceil(round_timeout / period))
    return (math.floor(now / step) + 1) * step


def moshpit_initial_bits(expected_peers: int, target_group_size: int, rng: Optional[random.Random] = None) -> str:
    """Random initial group bits for a Moshpit grid of about ``expected_peers / target_group_size`` groups."""
    if expected_peers <= target_group_size:
        return ""
    nbits = math.ceil(math.log2(expected_peers / target_group_size))
    rng = rng or random.Random()
    return "".join(rng.choice("01") for _ in range(nbits))


class ExpertReplicaAverager:
    """Average one expert's replicas across hosts in the background; never holds the caller's lock during I/O.

    :param dht: a running hivemind DHT
    :param uid: expert uid, e.g. ``"ffn.0.3"``
    :param parameters: the expert's parameters (modified in place, under ``lock``)
    :param run_prefix: the run's key prefix, e.g. ``"athome.demo"``; the averaging prefix is
      ``averaging_prefix(f"{run_prefix}.avg.{uid}")``
    :param lock: the lock that guards the expert's tensors while serving (held only for memcpy); None = no lock
    :param extra_tensors: optional tensors overwritten with the average (e.g. optimizer statistics)
    :param target_group_size: Moshpit group size
    :param period: seconds between rounds
    :param expected_replicas: number of replicas expected; sizes the Moshpit grid (None: one bucket)
    :param round_timeout: how long a round may spend looking for a group (default: ``max(period / 2, 2 *
      min_matchmaking_time)``); rounds are then at least this far apart (:func:`next_round_time`)
    :param on_round: called with each :class:`~athome.averaging.averager.RoundReport` (host-process thread)
    :param has_partners: called before each scheduled round; when it returns False (no other live replica), the
      round is skipped instead of spending ``round_timeout`` in matchmaking that cannot succeed (None: always try)
    :param start: start the background thread now
    :param averager_kwargs: passed to :class:`RobustAverager` (reducer, clip_tau, compression, timeouts, ...)
    """

    def __init__(
        self,
        dht: DHT,
        uid: str,
        parameters: Iterable[torch.Tensor],
        *,
        run_prefix: str,
        lock: Optional[ContextManager] = None,
        extra_tensors: Sequence[torch.Tensor] = (),
        target_group_size: int = 4,
        period: float = 30.0,
        expected_replicas: Optional[int] = None,
        round_timeout: Optional[float] = None,
        min_matchmaking_time: float = 5.0,
        request_timeout: float = 3.0,
        on_round: Optional[Callable[[RoundReport], Any]] = None,
        has_partners: Optional[Callable[[], bool]] = None,
        start: bool = True,
        **averager_kwargs,
    ):
        assert period > 0 and request_timeout < min_matchmaking_time, "keep request_timeout < min_matchmaking_time"
        self.uid, self.period = uid, float(period)
        self.parameters = tuple(parameters)
        self.extra_tensors = tuple(extra_tensors)
        self.lock = lock if lock is not None else nullcontext()
        self.round_timeout = round_timeout if round_timeout is not None else max(period / 2, 2 * min_matchmaking_time)
        self.prefix = averaging_prefix(f"{run_prefix}.avg.{uid}")
        self.has_partners = has_partners
        self.rounds_ok = self.rounds_failed = self.rounds_skipped = 0
        self.max_lock_hold = 0.0  # longest time the caller's lock was held by this helper, seconds

        with torch.no_grad():
            buffers = [t.detach().cpu().clone() for t in (*self.parameters, *self.extra_tensors)]
        self.averager = RobustAverager(
            buffers,
            dht,
            prefix=self.prefix,
            target_group_size=target_group_size,
            initial_group_bits=moshpit_initial_bits(expected_replicas or 0, target_group_size),
            min_matchmaking_time=min_matchmaking_time,
            request_timeout=request_timeout,
            on_round=on_round,
            start=True,
            **averager_kwargs,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"replica-averager-{uid}", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            # rounds on a grid of DHT time, so that replicas on different hosts look for groups at the same moment
            now = get_dht_time()
            next_round = next_round_time(now, self.period, self.round_timeout)
            if self._stop.wait(max(0.0, next_round - now)):
                break
            try:
                if self.has_partners is not None and not self.has_partners():
                    self.rounds_skipped += 1
                    logger.debug(f"Replica averaging of {self.uid} skipped: no other live replica")
                    continue
                self.average_once()
            except Exception:
                logger.exception(f"Replica averaging of {self.uid} failed unexpectedly")

    @torch.no_grad()
    def average_once(self, timeout: Optional[float] = None) -> bool:
        """Run one round now (blocking the calling thread, not the caller's lock). True if it was applied."""
        # take the averager's lock first: the caller's lock is then held for the memcpy only
        with self.averager.get_tensors() as buffers:
            with self._holding_lock():
                for buffer, tensor in zip(buffers, (*self.parameters, *self.extra_tensors)):
                    buffer.copy_(tensor)
            snapshot = [buffer.clone() for buffer in buffers[: len(self.parameters)]]
        try:
            self.averager.step(timeout=timeout if timeout is not None else self.round_timeout)
        except (AllreduceException, MatchmakingException, TimeoutError) as e:
            self.rounds_failed += 1
            logger.info(f"Replica averaging of {self.uid} did not complete ({type(e).__name__}): {e}")
            return False
        with self.averager.get_tensors() as buffers:
            deltas = [buffer - old for buffer, old in zip(buffers, snapshot)]
            extras = [buffer.clone() for buffer in buffers[len(self.parameters) :]]
        with self._holding_lock():
            for param, delta in zip(self.parameters, deltas):
                param.add_(delta.to(device=param.device, dtype=param.dtype))
            for tensor, value in zip(self.extra_tensors, extras):
                tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
        self.rounds_ok += 1
        return True

    @contextmanager
    def _holding_lock(self) -> Iterator[None]:
        with self.lock:
            started = time.perf_counter()
            try:
                yield
            finally:
                self.max_lock_hold = max(self.max_lock_hold, time.perf_counter() - started)

    def shutdown(self) -> None:
        """Stop the thread (after the current round) and the averager process."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.round_timeout + 60)
        if self.averager.is_alive():
            self.averager.shutdown()

    def __enter__(self) -> "ExpertReplicaAverager":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
