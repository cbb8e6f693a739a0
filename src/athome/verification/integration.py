"""Verification inside the real peers: what ``peer train``, ``peer coordinator`` and ``peer join`` call.

Each role gets one object, so the hooks in the peers' own modules stay a few lines:

- :class:`TrainerVerification`: records each step (wrap the dispatchers, run the step inside
  :meth:`~TrainerVerification.step`), commits it in a signed DHT record, serves bundles to validators, follows
  the coordinator's bans, publishes hints from its averaging rounds (:meth:`~TrainerVerification.note_round`),
  and applies a testing-only ``--attack``.
- :class:`CoordinatorVerification`: the coordinator's validator and ban desk (recomputation, re-verification of
  accusations, host audits), feeding the ledger: ``store.record_check`` per check and ``store.revoke`` per ban.
- :func:`guard_for_host` / :func:`attack_host`: the host's gradient guard and testing-only host attacks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Callable, Dict, List, Optional

import hivemind
import torch

from athome.config import RunConfig
from athome.dht.node import get_records
from athome.dht.schemas import BanEntry, ServerRecord, run_key
from athome.lifecycle import PeriodicThread
from athome.verification.attacks import TrainerAttack
from athome.verification.bans import BanAuthority, BanWatcher
from athome.verification.board import DHTBoard
from athome.verification.commitments import CommitmentWindow, commit
from athome.verification.expert_checks import ExpertAuditor, GradNormGuard, ProbePool, RemoteExpertClient
from athome.verification.recording import RecordingDispatcher, StepRecorder
from athome.verification.suspicions import SuspicionBook

logger = logging.getLogger(__name__)
WINDOW = 16  # steps a trainer's commitment record covers
RETENTION_MARGIN = 4  # bundles are kept this many steps longer than advertised (validators fetch a bit later)


class _StepScope:
    """What :meth:`TrainerVerification.step` yields: the step's loss function and its end."""

    def __init__(self, owner: "TrainerVerification", model, step: int, seed: int, epoch: int, samples: int):
        self.owner, self.model, self.step, self.seed, self.epoch, self.samples = owner, model, step, seed, epoch, samples
        self.finished = False

    def losses(self, batch: torch.Tensor):
        """``model.losses(batch)``, or what an attack simulator computes instead."""
        attack = self.owner.attack
        return attack.losses(self.model, batch) if attack is not None else self.model.losses(batch)

    def finish(self, loss: float) -> float:
        """Call after backward and clipping, before ``optimizer.step()``: records and commits the contribution.
        Returns the loss to report (an attack simulator may report another)."""
        owner, params = self.owner, self.model.dense_parameters()
        if owner.attack is not None:
            owner.attack.corrupt_grads(params)
            loss = owner.attack.claimed_loss(loss)
        proof = owner.recorder.finish_step(self.model, step=self.step, seed=self.seed, epoch=self.epoch, loss=loss,
                                           samples=self.samples, params=params)
        owner.commit_soon(proof)
        self.finished = True
        return loss


class TrainerVerification:
    """A trainer's side of verification (see module docstring).

    :param coordinator_id: the run's coordinator peer ID (from the run address): only its bans count
    :param corpus: the corpus fingerprint (``Corpus.fingerprint``); validators need the same corpus
    :param attack: a testing-only attack spec (``ATHOME_ALLOW_ATTACKS=1`` required), or None
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        config: RunConfig,
        *,
        coordinator_id: str,
        corpus: str,
        precision: str,
        device: str,
        attack: Optional[str] = None,
        window: int = WINDOW,
    ):
        self.dht, self.config = dht, config
        self.peer_id = dht.peer_id.to_base58()
        self.recorder = StepRecorder(self.peer_id, precision=precision, device=str(device).split(":")[0],
                                     retention=window + RETENTION_MARGIN)
        self.window = CommitmentWindow(precision=precision, device=self.recorder.device, corpus=corpus, size=window,
                                       session=self.recorder.session)
        self.board = DHTBoard(dht, config.name, coordinator_id, ttl=max(60.0, 4 * config.expert_ttl))
        self.attack = TrainerAttack(attack, seed=hash(self.peer_id) & 0xFFFF) if attack else None
        self.recorder.tamper = self.attack
        self._ban_callbacks: List[Callable[[BanEntry], None]] = []
        self.bans = BanWatcher(self.board, self._on_ban)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending: "queue.Queue" = queue.Queue()
        self._published_version = -1
        self.suspicions = SuspicionBook(self.peer_id)
        self._published_suspicions = 0
        self._publisher = threading.Thread(target=self._publish_loop, name="commitment publisher", daemon=True)
        self._ban_thread = PeriodicThread(self.bans.poll, period=5.0, name="ban watcher")
        self._p2p = None

    def wrap(self, dispatcher, layer: int) -> RecordingDispatcher:
        """Wrap MoE layer ``layer``'s dispatcher so its expert I/O is recorded."""
        return self.recorder.wrap(dispatcher, layer)

    def on_ban(self, callback: Callable[[BanEntry], None]) -> None:
        """``callback(entry)`` once per peer the coordinator bans (e.g. ``registry.banned.add(entry.peer)``)."""
        self._ban_callbacks.append(callback)

    def start(self) -> None:
        """Serve bundles to validators and start publishing commitments and following bans."""
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        from athome.verification.proofs import ProofServicer

        servicer = ProofServicer(lambda owner, step: self.recorder.get(step) if owner == self.peer_id else None)

        async def add_handlers():
            self._p2p = await self.dht.replicate_p2p()
            await servicer.add_p2p_handlers(self._p2p)

        RemoteExpertWorker.run_coroutine(add_handlers())
        self._publisher.start()
        self._ban_thread.start()

    @contextlib.contextmanager
    def step(self, model, step: int, seed: int, *, epoch: int, samples: int):
        """Scope of one training step; nothing is recorded if it raises (e.g. too few experts answered)."""
        self.recorder.begin_step()
        if self.attack is not None:
            self.attack.begin_step(step)
        scope = _StepScope(self, model, step, seed, epoch, samples)
        params = model.dense_parameters()
        context = (self.attack.params_context(params, self.config.optimizer.dense_lr) if self.attack
                   else contextlib.nullcontext())
        with context:
            yield scope
        if not scope.finished:
            logger.debug(f"step {step} ended without finish(): not committed")

    def note_round(self, report) -> None:
        """An averager's ``on_round`` callback: peers whose parts this trainer's reducer clipped heavily become hints
        for validators (:mod:`.suspicions`), published with the next commitments."""
        named = self.suspicions.note_round(report)
        if named:
            logger.info(f"Averaging round {report.group_id[:8]}: parts of {', '.join(p[-8:] for p in named)} heavily "
                        f"clipped; asking validators to check them first")
            self._wake.set()

    def commit_soon(self, proof) -> None:
        """Hash and publish ``proof``'s commitment from the publisher thread (BLAKE3 releases the GIL: on a GPU
        trainer this overlaps the next step; it takes ~3 ms for the default model's 6.7 MB bundle)."""
        self._pending.put(proof)
        self._wake.set()

    def _publish_loop(self) -> None:
        # hashing and one DHT store per burst of steps, off the training thread; refreshed before the TTL runs out
        while not self._stop.is_set():
            self._wake.wait(timeout=self.board.ttl / 3)
            self._wake.clear()
            if self._stop.is_set():
                break
            while True:
                try:
                    self.window.add(commit(self._pending.get_nowait()))
                except queue.Empty:
                    break
            self._publish_suspicions()
            if self._published_version == self.window.version and self._published_version >= 0 and not self._due():
                continue
            try:
                version = self.window.version
                if self.board.publish_commitments(self.window.record()):
                    self._published_version, self._published_at = version, time.monotonic()
                else:
                    logger.warning("No DHT node accepted this trainer's commitments; retrying")
            except Exception as error:
                logger.warning(f"Publishing commitments failed: {error!r}")

    def _publish_suspicions(self) -> None:
        version = self.suspicions.version
        if version == self._published_suspicions:
            return
        record = self.suspicions.record()
        try:
            if record is None or self.board.publish_suspicions(record):
                self._published_suspicions = version
        except Exception as error:
            logger.warning(f"Publishing suspicions failed: {error!r}")

    def _due(self) -> bool:
        return time.monotonic() - getattr(self, "_published_at", 0.0) > self.board.ttl / 3

    def _on_ban(self, entry: BanEntry) -> None:
        if entry.peer == self.peer_id:
            logger.error(f"THIS TRAINER IS BANNED by the coordinator ({entry.kind}): {entry.reason}. Its contributions "
                         f"are ignored by the swarm; check your setup (precision, corpus, software version)")
        for callback in self._ban_callbacks:
            callback(entry)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._ban_thread.stop()
        if self._publisher.is_alive():
            self._publisher.join(timeout=5)


class CoordinatorVerification:
    """The coordinator's validator, ban desk and host auditor, polled every ``period`` seconds in one thread.

    :param store: the coordinator's ledger (``athome.coordinator.store.Store``), or None
    :param threads: torch threads for recomputation (leave cores to the dashboard and the DHT)
    :param audit_period: seconds between host audits (one random expert, all its replicas); 0 = no audits
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        config: RunConfig,
        *,
        store=None,
        period: float = 5.0,
        audit_period: float = 30.0,
        threads: int = 1,
        device: str = "cpu",
        max_checks_per_poll: int = 4,
    ):
        from athome.trainer.data import load_corpus
        from athome.verification.proofs import RemoteProofSource
        from athome.verification.trust import TrustSampler
        from athome.verification.validator import StepChecker, Validator

        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        self.dht, self.config, self.store = dht, config, store
        self.coordinator_id = dht.peer_id.to_base58()
        corpus = load_corpus(config.data)
        self.board = DHTBoard(dht, config.name, self.coordinator_id, ttl=max(120.0, 8 * config.expert_ttl))
        p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        checker = StepChecker(config, corpus, device=device, threads=threads)
        sampler = TrustSampler(base_rate=config.verification.check_rate)
        self.validator = Validator(self.board, RemoteProofSource(p2p), checker, sampler, accuse=False,
                                   on_result=self._on_result, max_checks_per_poll=max_checks_per_poll)
        self._servers: Dict[str, List[str]] = {}
        checker.probe_pool = ProbePool(config.model)  # host audits use real requests from verified steps
        self.auditor = ExpertAuditor(RemoteExpertClient(dht), self._replicas, config.model,
                                     training_calls=config.optimizer.expert_accumulation, probe_pool=checker.probe_pool)
        self.authority = BanAuthority(self.validator, auditor=self.auditor, on_ban=self._on_ban)
        self.audit_period = audit_period
        self._last_audit = self._last_publish = time.monotonic()
        self._thread = PeriodicThread(self.poll, period=period, name="verification")

    def _replicas(self, uid: str) -> List[str]:
        return self._servers.get(uid, [])

    def _on_result(self, result) -> None:
        if self.store is not None and result.verdict != "inconclusive":
            self.store.record_check(result.peer, result.passed)

    def _on_ban(self, entry: BanEntry) -> None:
        if self.store is not None:
            self.store.revoke(entry.peer, f"{entry.kind}: {entry.reason}")

    def poll(self) -> None:
        servers = get_records(self.dht, run_key(self.config.name, "servers"), ServerRecord)
        replicas: Dict[str, List[str]] = {}
        for peer, (record, _) in servers.items():
            if peer not in self.authority.bans:
                for uid in record.experts:
                    replicas.setdefault(uid, []).append(peer)
        self._servers = replicas
        self.authority.poll()
        if time.monotonic() - self._last_publish > self.board.ttl / 3:  # records expire: keep the bans alive
            self._last_publish = time.monotonic()
            self.authority.publish()
        if self.audit_period > 0 and replicas and time.monotonic() - self._last_audit > self.audit_period:
            self._last_audit = time.monotonic()
            self.authority.report_host_findings(self.auditor.audit(sorted(replicas), count=1))

    def start(self) -> None:
        self.authority.publish()  # an empty (or resumed) ban record, so peers can tell "no bans" from "no coordinator"
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()


class BannedCaller(PermissionError):
    """The caller was banned by the run's coordinator; its requests are refused."""


class HostBans:
    """The coordinator's bans as a host's request handlers see them: re-read from the DHT on demand, at most every
    ``period`` seconds (like ``athome.dht.auth.Admission``, it works in forked handler processes)."""

    def __init__(self, dht: hivemind.DHT, run_name: str, coordinator_id: str, period: float = 5.0):
        self.board = DHTBoard(dht, run_name, coordinator_id)
        self.period = period
        self._banned: frozenset = frozenset()
        self._refreshed_at = float("-inf")
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._refreshed_at < self.period:
                return
            self._refreshed_at = time.monotonic()
            try:
                banned = frozenset(self.board.bans())
            except Exception as error:  # keep the last known list; the next request retries
                logger.warning(f"Could not read the run's bans: {error!r}")
                return
            for peer in banned - self._banned:
                logger.warning(f"Refusing requests from {peer}: banned by the coordinator")
            self._banned = banned

    @property
    def banned(self) -> frozenset:
        """Peer IDs banned as of the last refresh."""
        return self._banned

    def check(self, peer_id: str) -> None:
        """Raise :class:`BannedCaller` if ``peer_id`` is banned (refreshes the list first when it is due)."""
        self.refresh()
        if peer_id in self._banned:
            raise BannedCaller(f"peer {peer_id} is banned by the run's coordinator; its requests are refused")

    async def check_async(self, peer_id: str) -> None:
        if time.monotonic() - self._refreshed_at >= self.period:  # the DHT lookup off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.refresh)
        if peer_id in self._banned:
            raise BannedCaller(f"peer {peer_id} is banned by the run's coordinator; its requests are refused")


_host_bans: Optional[HostBans] = None


def follow_bans_on_host(dht: hivemind.DHT, run_name: str, coordinator_id: str) -> HostBans:
    """Install this host's ban list (before its handlers fork, so they inherit it); see :func:`refuse_banned`."""
    global _host_bans
    _host_bans = HostBans(dht, run_name, coordinator_id)
    return _host_bans


async def refuse_banned(context) -> None:
    """Raise :class:`BannedCaller` if the RPC's caller is banned by the coordinator; a no-op before
    :func:`follow_bans_on_host` (tests, plain hivemind servers)."""
    if _host_bans is not None and context is not None and getattr(context, "remote_id", None) is not None:
        await _host_bans.check_async(context.remote_id.to_base58())


def guard_for_host() -> GradNormGuard:
    """The gradient guard a host's request handlers use (see ``ValidatingConnectionHandler``)."""
    return GradNormGuard()


def attack_host(backends: Dict[str, object], spec: Optional[str]) -> None:
    """Testing only: make this host's experts malicious (``peer join --attack``)."""
    if not spec:
        return
    from athome.verification.attacks import apply_host_attack

    for index, backend in enumerate(backends.values()):
        apply_host_attack(backend, spec, seed=index)
