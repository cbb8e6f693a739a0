"""``peer train``: train the run's language model; dense parts here, experts on volunteers' hosts.

Each step: draw the batch deterministically from (run, peer, step), run the model (its MoE layers call remote
experts, whose hosts update them on backward), and hand the dense gradients to hivemind's collaborative
optimizer, which averages them with other trainers once the swarm has accumulated ``target_batch_size`` samples.
A step on which too few experts answer is not applied: the trainer says so, waits, and retries.

Verification (``athome.verification``, see SECURITY.md): each step runs inside ``TrainerVerification.step``; its
expert I/O is recorded by wrapping the dispatchers, and its contribution is committed (signed DHT record) right
after backward and clipping, *before* ``optimizer.step()`` hands it to averaging. The coordinator's bans reach the
expert registry (no more requests to a banned host) and the gradient averager (a banned trainer's parts get weight
0), and senders that this trainer's reducer clipped heavily become hints that validators check first.
``--attack KIND`` (testing only, ``ATHOME_ALLOW_ATTACKS=1``) makes this trainer malicious.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import queue
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import hivemind
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.timed_storage import ValueWithExpiration

from athome.averaging import RobustGradientAverager, RobustTrainingStateAverager, get_codec
from athome.config import RunConfig
from athome.devices import resolve_device, resolve_precision
from athome.dht import (
    Identity,
    RunAddress,
    RunAddressError,
    RunConfigError,
    fetch_run_config,
    protect_run_keys,
    start_dht,
    store_record,
)
from athome.dht.auth import InviteError, NotAdmitted, start_membership
from athome.dht.receipts import ReceiptBook
from athome.dht.schemas import MetricsRecord, PeerRecord, run_key
from athome.lifecycle import HelperWatchdog, PeriodicThread, die, restore_interrupt_handler, shutdown_requested
from athome.model.lm import MoETransformerLM
from athome.netflags import dht_kwargs
from athome.peer.reachability import choose_trainer_mode
from athome.trainer.data import batch_seed, load_corpus
from athome.trainer.remote import ExpertRegistry, RemoteDispatcher
from athome.verification.attacks import AttacksDisabled, check_attack_flag
from athome.verification.integration import TrainerVerification

logger = logging.getLogger(__name__)
WIRE_COMPRESSION = dict(none=runtime_pb2.CompressionType.NONE, fp16=runtime_pb2.CompressionType.MEANSTD_16BIT)
MIN_ANSWERED_FRACTION = 0.5  # below this share of (token, expert) slots answered, a step is retried, not applied
ALONE_CONFIRMATIONS = 2  # progress fetches in a row that must count no trainer but this one to call it alone
ALONE_RECHECK_PERIOD = 1.0  # seconds to the fetch that confirms a first "alone" (hivemind's may be up to 10 s away)
# How long a trainer's progress report lives in the DHT. A live trainer's tracker thread stores it again every half
# of this, even while its training thread is blocked; a trainer that crashed (SIGKILL, OOM, power cut) says no
# goodbye, and the others count it, and look for it in every round, until its report expires. hivemind's 60 s
# stalled the survivor of a pair in ``peer demo`` for 65 s after its partner was killed (two 30 s searches).
PROGRESS_TTL = 15.0


class RobustProgressTracker(ProgressTracker):
    """hivemind's ``ProgressTracker`` that leaves out the progress reports of banned peers: they no longer count as
    trainers (so rounds do not wait for them), toward the epoch's samples, or for the swarm's epoch. (A banned
    trainer that keeps running goes on reporting: in ``peer demo --attack sign_flip`` every later epoch waited the
    full matchmaking time for it.) The reports name their peer themselves (hivemind does not tie them to the
    writer's libp2p identity), so this holds against honest-but-banned peers, not forgers.

    It also tells when this trainer is :attr:`alone` (the other trainers' reports are gone, or are hivemind's goodbye
    that a tracker stores at shutdown), and calls ``on_fetch`` (from its own thread) after every fetch. hivemind's
    fetcher stops while the training thread changes epochs (:meth:`pause_updates`), which includes the epoch's
    gradient round: meanwhile a watcher thread reads the reports instead, so that a round looking for a partner that
    crashed ends once its report expires (``PROGRESS_TTL``), not after ``averaging_timeout``."""

    banned_peers: frozenset = frozenset()  # base58 peer IDs; replaced whole by the training thread (no locking)
    on_fetch: Optional[Callable[[int], None]] = None  # called with the trainers counted, after every fetch
    _counted: Optional[int] = None  # num_peers of the latest fetch, and since when fetches have agreed on it
    _counted_since: float = 0.0
    _alone_fetches = 0  # fetches in a row whose only report was this trainer's

    def _parse_swarm_progress_data(self, metadata):
        metadata = self._unbanned(metadata)
        progress = super()._parse_swarm_progress_data(metadata)
        self._count_reporters(metadata)
        if 0 < self._alone_fetches < ALONE_CONFIRMATIONS:  # a partner just left (or one fetch missed it): confirm soon
            progress.next_fetch_time = min(progress.next_fetch_time, get_dht_time() + ALONE_RECHECK_PERIOD)
        return progress

    def _unbanned(self, metadata):
        banned = self.banned_peers
        if banned and isinstance(metadata, dict):
            metadata = {subkey: entry for subkey, entry in metadata.items() if _reporter(entry) not in banned}
        return metadata

    def _count_reporters(self, metadata) -> None:
        """Note the trainers that ``metadata`` (fetched reports, banned ones left out) counts, and tell ``on_fetch``."""
        entries = metadata.values() if isinstance(metadata, dict) else ()
        reporters = [_reporter(entry) for entry in entries if getattr(entry, "value", None) is not None]
        if len(reporters) != self._counted:  # as hivemind's num_peers: every report with a value
            self._counted, self._counted_since = len(reporters), time.monotonic()
        self._alone_fetches = self._alone_fetches + 1 if reporters == [self.dht.peer_id.to_base58()] else 0
        if self.on_fetch is not None:
            self.on_fetch(len(reporters))

    @contextlib.contextmanager
    def pause_updates(self):
        """hivemind's, while a watcher thread reads the reports every ``ALONE_RECHECK_PERIOD`` seconds in the fetcher's
        stead: for counting trainers only. hivemind's global progress stays as it was, as it expects, except its
        ``num_peers`` once this trainer is :attr:`alone`."""
        with super().pause_updates():
            stop = threading.Event()
            watcher = threading.Thread(target=self._watch_reports, args=(stop,), name="progress watcher", daemon=True)
            watcher.start()
            try:
                yield
            finally:
                stop.set()  # not joined: a read still under way would hold up training; its count is dropped

    def _watch_reports(self, stop: threading.Event) -> None:
        while not stop.wait(ALONE_RECHECK_PERIOD):
            future = self.dht.get(self.training_progress_key, latest=True, return_future=True)
            try:
                found = future.result(timeout=PROGRESS_TTL)
            except Exception as e:  # noqa: B902 - a slow or failed read: the next one may do
                logger.debug(f"Progress watcher could not read the reports: {e!r}")
                future.cancel()
                continue
            if stop.is_set():  # the fetcher may be back: its count is the newer
                continue
            self._count_reporters(self._unbanned(found.value if isinstance(found, ValueWithExpiration) else None))
            if self.alone:  # hivemind's Optimizer averages the state only with num_peers > 1: not with the dead
                self.global_progress.num_peers = 1

    @property
    def alone(self) -> bool:
        """True once ``ALONE_CONFIRMATIONS`` fetches in a row found no report but this trainer's (one fetch could miss a
        record that has not reached the DHT nodes it asked)."""
        return self._alone_fetches >= ALONE_CONFIRMATIONS

    def steady_num_peers(self, for_seconds: float) -> Optional[int]:
        """The number of reporting peers, if every fetch in the last ``for_seconds`` counted the same (else None)."""
        counted, since = self._counted, self._counted_since
        return counted if counted is not None and time.monotonic() - since >= for_seconds else None


def _reporter(entry) -> Optional[str]:
    """The peer a progress report names, as base58 (None if it names none)."""
    value = getattr(entry, "value", None)
    peer_id = value.get("peer_id") if isinstance(value, dict) else None
    try:
        return PeerID(peer_id).to_base58() if isinstance(peer_id, bytes) else None
    except Exception:  # noqa: B902 - not a peer ID: hivemind's own schema check deals with it
        return None


class SwarmOptimizer(hivemind.Optimizer):
    """``hivemind.Optimizer`` whose every-epoch parameter averaging is robust too (:class:`RobustTrainingStateAverager`:
    CenteredClip, bans, admission). ``robust_opts`` are its reducer settings (as for the gradient averager).
    ``averager_opts`` reach both averagers, as hivemind documents (1.1.12 gives them to the state averager only: the
    gradient averager kept ``request_timeout`` 3 s with 3 s of matchmaking, the setting hivemind warns can deadlock)."""

    def __init__(self, *args, robust_opts: dict, **kwargs):
        self._robust_opts = robust_opts
        self._averager_opts = dict(kwargs.get("averager_opts") or {})
        super().__init__(*args, **kwargs)
        self.tracker.on_fetch = self._expect_trainers

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> RobustProgressTracker:
        return RobustProgressTracker(  # hivemind's own arguments (hivemind/optim/optimizer.py)
            dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size, client_mode=self.client_mode,
            status_loglevel=self.status_loglevel, start=True, **kwargs,
        )

    def ban_peers(self, peer_ids) -> None:
        """Leave these peers (base58 IDs) out of every later round (both averagers) and out of the progress count."""
        for averager in (self.grad_averager, self.state_averager):
            if averager is not None:
                averager.ban_peers(peer_ids)
        self.tracker.banned_peers = self.tracker.banned_peers | {str(peer) for peer in peer_ids}

    def step(self, *args, **kwargs):
        """hivemind's step, after :meth:`_expect_trainers` (also called after every progress fetch)."""
        self._expect_trainers(self.tracker.global_progress.num_peers)
        return super().step(*args, **kwargs)

    def _expect_trainers(self, num_peers: int) -> None:
        """Tell both averagers what the progress tracker sees (thread-safe: shared values only).

        Every trainer it counts is expected in the next rounds, so that they start once all have joined rather than
        after ``matchmaking_time`` (hivemind waits it out in full when no group size is set: in ``peer demo``, 3-4 s
        of every 5-6 s epoch). Only a count that held for ``matchmaking_time``: one that missed a peer just seen (at
        start, say) split rounds into smaller groups, and a group of two cannot out-vote an attacker. While the count
        changes, hivemind's full wait gathers everyone. Alone, rounds stop looking for a group at once: the
        survivor of a pair kept looking for the trainer that left until ``averaging_timeout`` (30 s), its next
        optimizer step queued behind that background parameter round (``peer demo``: 33 s for 10 steps)."""
        counted = self.tracker.steady_num_peers(for_seconds=self.matchmaking_time)
        expected = 1 if self.tracker.alone else counted if counted is not None and counted >= 2 else None
        for averager in (self.grad_averager, self.state_averager):
            if averager is not None:
                averager.expect_group_size(expected)
        # parameter rounds run in the background and may be skipped; a pair with a x1000 trainer was not robust
        self.state_averager.refuse_pairs_while_seeing(num_peers)

    def shutdown(self) -> None:
        """hivemind's shutdown, which no longer waits for rounds that have no group yet (see ``leave_matchmaking``)."""
        for averager in (self.grad_averager, self.state_averager):
            if averager is not None:
                averager.leave_matchmaking()
        super().shutdown()

    def _make_gradient_averager(self, factory, **kwargs) -> RobustGradientAverager:
        return super()._make_gradient_averager(factory, **{**self._averager_opts, **kwargs})

    def _make_state_averager(self, **kwargs) -> RobustTrainingStateAverager:
        # hivemind's own arguments (hivemind/optim/optimizer.py), with the robust class and its settings
        return RobustTrainingStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **self._robust_opts,
            **kwargs,
        )


class CorpusMismatch(RuntimeError):
    """This peer's training data is not the run's."""


class TooFewExperts(RuntimeError):
    """Not enough experts answered for a step to be worth applying."""


class AggregateClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the gradient it applies to ``max_norm`` (the run's ``grad_clip``).

    Why: hivemind.Optimizer applies the swarm's averaged gradient, a mean of contributions that honest trainers each
    clipped to ``grad_clip``: an honest aggregate never exceeds it (up to codec error). A larger one carries a
    poisoned contribution that CenteredClip could not bound, e.g. in a group of two (no honest majority). Measured
    with ``peer demo --attack sign_flip``: two or three such epochs before the ban inflated AdamW's second moment
    and the honest loss stalled (4.4 -> 4.8 over 20 epochs, against 4.8 -> 3.0 in a clean run). Clipping bounds a
    poisoned epoch to one step of the honest size; honest aggregates pass unchanged.
    """

    def __init__(self, params, *, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.clipped = 0  # epochs whose aggregate exceeded max_norm by more than the codec's error

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if params:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
            if norm > 1.01 * self.max_norm:
                self.clipped += 1
                logger.warning(f"The averaged gradient's norm {norm:.3g} exceeds grad_clip {self.max_norm:g}, which "
                               f"no honest aggregate can: a poisoned contribution got in; clipped to {self.max_norm:g}")
        return super().step(closure)


class Trainer:
    """One trainer peer. ``run(stop)`` trains until ``stop`` is set or the step/time budget runs out."""

    def __init__(
        self, dht: hivemind.DHT, identity: Identity, config: RunConfig, args: argparse.Namespace,
        coordinator_id: Optional[str] = None,
    ):
        """:param coordinator_id: the run's coordinator (only its bans count); default: from ``args.run``
        :raises AttacksDisabled: ``args.attack`` without ``ATHOME_ALLOW_ATTACKS=1``"""
        self.dht, self.identity, self.config = dht, identity, config
        self.peer_id = identity.peer_id
        self.device = resolve_device(getattr(args, "device", "auto"))
        self.precision = resolve_precision(getattr(args, "precision", "auto"), self.device)
        self.batch_size = getattr(args, "batch_size", None) or config.batch_size
        self.max_steps: Optional[int] = getattr(args, "max_steps", None)
        self.max_minutes: Optional[float] = getattr(args, "max_minutes", None)
        self.public_name = getattr(args, "public_name", "")
        self.team = getattr(args, "team", "")
        self.log_file = Path(args.log_file) if getattr(args, "log_file", None) else None
        self.show_progress = not getattr(args, "no_progress", False)

        self.registry = ExpertRegistry(dht, run_key(config.name, "servers"))
        self.registry.receipts = ReceiptBook()  # signed receipts of each host's work: its credit needs them
        self.registry.refresh(force=True)
        p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        model_config = config.model
        uids = model_config.expert_uids()
        per_layer = model_config.experts_per_layer
        self.corpus = load_corpus(config.data)
        pinned = config.data.corpus_fingerprint
        if pinned and self.corpus.fingerprint != pinned:
            raise CorpusMismatch(
                f"this machine's corpus (fingerprint {self.corpus.fingerprint[:12]}) differs from the run's "
                f"({pinned[:12]}): batches would not be reproducible by validators. With the default 'stdlib' "
                f"corpus, use the same Python version as the coordinator (this is {platform.python_version()})"
            )
        logger.info(f"Corpus: {len(self.corpus)} bytes from '{config.data.source}' (fingerprint {self.corpus.fingerprint[:12]})")

        if coordinator_id is None:
            coordinator_id = RunAddress.parse(args.run).coordinator_id
        self.verification = TrainerVerification(
            dht, config, coordinator_id=coordinator_id, corpus=self.corpus.fingerprint, precision=self.precision,
            device=self.device.type, attack=getattr(args, "attack", None),
        )
        self._averager_bans: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        self.verification.on_ban(self._on_ban)
        self.dispatchers = [
            self.verification.wrap(
                RemoteDispatcher(uids[layer * per_layer : (layer + 1) * per_layer], self.registry, p2p,
                                 wire_compression=WIRE_COMPRESSION[config.wire_compression]),
                layer,
            )
            for layer in range(model_config.n_layers)
        ]
        self.model = MoETransformerLM(model_config, lambda layer: self.dispatchers[layer]).to(self.device)
        self.dense_params = self.model.dense_parameters()

        opt = config.optimizer
        robust_opts = dict(reducer=config.averaging.reducer, clip_tau=config.averaging.clip_tau,
                           clip_iterations=config.averaging.clip_iterations, direct_tcp=config.averaging.direct_tcp,
                           same_host_reads=config.averaging.same_host_reads,
                           on_round=self.verification.note_round)  # heavily clipped senders: hints for validators
        worker_beta, adamw_betas = config.dense_momentum()
        if worker_beta:
            logger.info(f"Worker momentum: this trainer averages the momentum (beta {worker_beta:g}) of its own dense "
                        f"gradients; AdamW runs with betas {adamw_betas} (run config averaging.worker_momentum)")
        self.optimizer = SwarmOptimizer(
            robust_opts=robust_opts,
            dht=dht,
            run_id=f"athome_{config.name}_dense",  # hivemind group prefixes may not contain dots
            params=self.model.parameters(),
            optimizer=partial(AggregateClippedAdamW, max_norm=opt.grad_clip, lr=opt.dense_lr, betas=adamw_betas,
                              weight_decay=opt.weight_decay),
            target_batch_size=config.averaging.target_batch_size,
            batch_size_per_step=self.batch_size,
            matchmaking_time=3.0,
            averaging_timeout=30.0,
            averager_opts=dict(request_timeout=1.0),  # below matchmaking_time, see hivemind #443
            tracker_opts=dict(metadata_expiration=PROGRESS_TTL),
            grad_compression=get_codec(config.averaging.compression),
            grad_averager_factory=partial(RobustGradientAverager, worker_momentum=worker_beta, **robust_opts),
            verbose=False,
            # explicit: with None, hivemind 1.1.12's Optimizer thinks it is no client, while its averagers (from the
            # DHT) are, and its first epoch fails ("averager in client mode cannot share its state")
            client_mode=dht.client_mode,
        )
        restore_interrupt_handler()  # hivemind's averagers switch Ctrl+C off in this process
        self.step = 0
        self.samples = 0
        self.loss_ewma: Optional[float] = None
        self.samples_per_second = 0.0
        self.started_at = time.time()
        self._metrics_thread = PeriodicThread(self.publish_metrics, period=5.0, name="metrics publisher")

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self) -> float:
        """One step; raises TooFewExperts (with nothing applied) if the experts did not answer."""
        self._apply_bans()
        self.registry.refresh()
        available = [self.registry.available(d.uids) for d in self.dispatchers]
        for layer, mask in zip(self.model.moe_layers(), available):
            if not mask.any():
                raise TooFewExperts(f"no live host serves any expert of layer {self.model.moe_layers().index(layer)}")
            layer.set_available(mask.to(self.device))
        seed = batch_seed(self.config.name, self.peer_id, self.step)
        batch = self.corpus.batch(seed, self.batch_size, self.config.model.seq_len).to(self.device)
        with self.verification.step(self.model, self.step, seed, epoch=self.optimizer.local_epoch,
                                    samples=self.batch_size) as scope:
            with self.autocast():
                cross_entropy, aux = scope.losses(batch)
                loss = cross_entropy + self.model.aux_coef * aux
            answered = min(d.last_answered_fraction for d in self.dispatchers)
            if answered < MIN_ANSWERED_FRACTION:
                raise TooFewExperts(f"only {answered:.0%} of token-expert slots were answered")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.config.optimizer.grad_clip)
            # committed before averaging sees it: validators replay exactly this contribution
            reported = scope.finish(cross_entropy.item())
        self.optimizer.step()
        self.optimizer.zero_grad()
        return reported

    def _on_ban(self, entry) -> None:
        """The coordinator banned ``entry.peer``: stop calling its experts and ignore its averaging parts."""
        if entry.peer == self.peer_id:
            return  # this trainer's own ban is logged by TrainerVerification; it cannot ignore itself
        logger.warning(f"Peer {entry.peer} banned by the coordinator ({entry.kind}: {entry.reason}); ignoring its "
                       f"experts and gradients from now on")
        self.registry.banned.add(entry.peer)
        self._averager_bans.put(entry.peer)  # handed over by the training thread: see _apply_bans

    def _apply_bans(self) -> None:
        # the averager's control pipe is used by hivemind from the training thread; the ban watcher must not share it
        banned = []
        while not self._averager_bans.empty():
            banned.append(self._averager_bans.get())
        if banned:
            self.optimizer.ban_peers(banned)

    def publish_metrics(self) -> None:
        if self.loss_ewma is None:
            return
        record = MetricsRecord(
            step=self.step, loss=self.loss_ewma, samples=self.samples, samples_per_second=self.samples_per_second,
            public_name=self.public_name, time=time.time(),
        )
        store_record(self.dht, run_key(self.config.name, "metrics"), record, ttl=self.config.expert_ttl)
        self.registry.receipts.publish(self.dht, self.config.name, ttl=self.config.expert_ttl)
        store_record(
            self.dht, run_key(self.config.name, "peers"),
            PeerRecord(role="trainer", public_name=self.public_name, team=self.team, started_at=self.started_at),
            ttl=self.config.expert_ttl,
        )

    def _budget_left(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            return False
        if self.max_minutes is not None and time.time() - self.started_at > self.max_minutes * 60:
            return False
        return True

    def run(self, stop: threading.Event) -> None:
        self.verification.start()
        self._metrics_thread.start()
        watchdog = HelperWatchdog(lambda: {
            "DHT": self.dht, "gradient averager": self.optimizer.grad_averager,
            "parameter averager": self.optimizer.state_averager,
        }, stopping=stop)
        watchdog.start()
        log = self.log_file.open("a") if self.log_file else None
        progress = _Progress(self.show_progress, self.max_steps)
        waiting_since: Optional[float] = None
        try:
            with progress:
                while not stop.is_set() and self._budget_left():
                    started = time.monotonic()
                    try:
                        loss = self.train_step()
                    except TooFewExperts as error:
                        self.model.zero_grad(set_to_none=True)
                        waiting_since = waiting_since or time.monotonic()
                        logger.warning(
                            f"Step {self.step} not applied: {error}; {self.registry.num_hosts()} hosts known. "
                            f"Waiting for experts ({time.monotonic() - waiting_since:.0f}s so far), retrying in 5s"
                        )
                        self.registry.refresh(force=True)
                        stop.wait(5.0)
                        continue
                    waiting_since = None
                    elapsed = time.monotonic() - started
                    self.step += 1
                    self.samples += self.batch_size
                    self.loss_ewma = loss if self.loss_ewma is None else 0.9 * self.loss_ewma + 0.1 * loss
                    rate = self.batch_size / max(elapsed, 1e-6)
                    self.samples_per_second = rate if self.step == 1 else 0.9 * self.samples_per_second + 0.1 * rate
                    peers = self.optimizer.tracker.global_progress.num_peers
                    progress.update(self.step, loss, self.loss_ewma, self.samples_per_second, peers, self.registry.num_hosts())
                    if log is not None:
                        log.write(json.dumps(dict(
                            step=self.step, loss=loss, samples=self.samples, time=time.time(),
                            epoch=self.optimizer.local_epoch, trainers=peers,
                        )) + "\n")
                        log.flush()
        finally:
            if log is not None:
                log.close()
            self._metrics_thread.stop()
            self.verification.stop()
            self.publish_metrics()
            watchdog.stop()  # the averagers now end on purpose (the DHT right after this returns)
            self.optimizer.shutdown()
            logger.info(f"Trainer stopped after {self.step} steps, {self.samples} samples, loss {self.loss_ewma}")


class _Progress:
    """A rich progress bar on a terminal; a log line every 10 steps otherwise."""

    def __init__(self, live: bool, total: Optional[int]):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from athome.lifecycle import stderr_console

        self.live = live and stderr_console.is_terminal
        self.progress = Progress(
            TextColumn("step {task.completed}"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=stderr_console, disable=not self.live,
        )
        self.task = self.progress.add_task("starting", total=total)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, loss_ewma: float, rate: float, trainers: int, hosts: int) -> None:
        text = f"loss {loss_ewma:.3f}  {rate:.1f} samples/s  trainers {trainers}  expert hosts {hosts}"
        self.progress.update(self.task, completed=step, description=text)
        if not self.live and step % 10 == 0:
            logger.info(f"step {step}: loss {loss:.3f} (avg {loss_ewma:.3f}), {rate:.1f} samples/s, "
                        f"{trainers} trainers, {hosts} expert hosts")


def run_train(args: argparse.Namespace) -> None:
    try:
        address = RunAddress.parse(args.run)
    except RunAddressError as error:
        die(str(error))
    if getattr(args, "attack", None):
        try:
            check_attack_flag(args.attack, "trainer")
        except (ValueError, AttacksDisabled) as error:
            die(f"--attack: {error}")
    identity = Identity.load_or_create(args.identity_path)
    stop = shutdown_requested()
    args.initial_peers = [address.maddr, *args.initial_peers]
    try:
        dht = start_dht(identity, **dht_kwargs(args))
    except (InviteError, NotAdmitted) as error:  # the message already says what to do
        die(f"could not join the run at {address}: {error}")
    except Exception as error:
        die(f"could not join the run at {address}: {error}\nis the coordinator up? does `peer check` pass?")
    try:
        config = fetch_run_config(dht, address.coordinator_id)
        dht = choose_trainer_mode(  # a DHT server if the run can dial it back, else (behind NAT) a client
            dht, args, address.coordinator_id, lambda **changes: start_dht(identity, **{**dht_kwargs(args), **changes})
        )
        protect_run_keys(dht, identity, config.name)
        start_membership(dht, identity, config.name, address.coordinator_id, args.invite, config.expert_ttl)
        trainer = Trainer(dht, identity, config, args)
        trainer.run(stop)
    except (RunConfigError, CorpusMismatch) as error:
        die(str(error))
    finally:
        dht.shutdown()
