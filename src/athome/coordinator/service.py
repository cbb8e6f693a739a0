"""The coordinator's service: polls the run's DHT records into the ledger and serves the dashboard.

``CoordinatorService(dht, config, data_dir, http_host=..., http_port=...)``; ``start()``; ``url``; ``stop()``.

Robustness contract: a poll that raises (DHT hiccup, malformed data, a bug) is logged and counted, and the next
poll runs as usual; a quiet DHT simply yields empty polls. The web server runs in its own thread and event loop,
so a slow DHT never stalls the dashboard. If ``http_port`` is taken, the service logs it and takes a free port.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

import hivemind

from athome.config import RunConfig
from athome.coordinator.store import CreditPolicy, Observation, Store
from athome.coordinator.web import DashboardContext, WebServer, create_app
from athome.dht import get_records
from athome.dht.schemas import MetricsRecord, PeerRecord, ReceiptRecord, ServerRecord, run_key
from athome.lifecycle import PeriodicThread

logger = logging.getLogger(__name__)

DEFAULT_POLL_PERIOD = 5.0


def observations_from_records(
    servers: dict[str, tuple[ServerRecord, float]],
    metrics: dict[str, tuple[MetricsRecord, float]],
    peers: dict[str, tuple[PeerRecord, float]],
) -> list[Observation]:
    """Merge one poll's three record kinds into one :class:`Observation` per peer ID.

    The peer record gives role, name, team and relay status; a server record adds its experts (and role
    'expert_host' if no peer record); a metrics record adds the trainer's counters (and role 'trainer').
    Expert-work claims are read from a server record's ``expert_calls`` / ``reported_at`` fields; they count only
    as far as trainers' receipts (polled separately) back them.
    """
    observations = []
    for peer_id in sorted(set(servers) | set(metrics) | set(peers)):
        peer = peers.get(peer_id, (None, 0.0))[0]
        server = servers.get(peer_id, (None, 0.0))[0]
        metric = metrics.get(peer_id, (None, 0.0))[0]
        names = [record.public_name for record in (peer, server, metric) if record is not None and record.public_name]
        role = peer.role if peer is not None else "expert_host" if server is not None else "trainer"
        fields: dict[str, Any] = dict(
            peer_id=peer_id, role=role, public_name=names[0] if names else "",
            team=peer.team if peer is not None else "",
            relayed=bool((peer is not None and peer.relayed) or (server is not None and server.relayed)),
            started_at=peer.started_at if peer is not None else (server.since if server is not None else None),
        )
        if server is not None:
            fields.update(experts=tuple(server.experts), device=server.device, precision=server.precision)
            calls, reported_at = getattr(server, "expert_calls", None), getattr(server, "reported_at", None)
            if calls is not None and reported_at:
                fields.update(expert_calls=calls, work_report_time=reported_at)
        if metric is not None:
            fields.update(
                step=metric.step, loss=metric.loss, samples=metric.samples,
                samples_per_second=metric.samples_per_second, report_time=metric.time,
            )
        observations.append(Observation(**fields))
    return observations


def expert_map_from_servers(servers: dict[str, tuple[ServerRecord, float]], expert_uids: list[str]) -> dict[str, list[str]]:
    """uid -> sorted peer IDs serving it; every uid of the grid is present, with [] if nobody serves it."""
    experts: dict[str, list[str]] = {uid: [] for uid in expert_uids}
    for peer_id, (record, _) in sorted(servers.items()):
        for uid in record.experts:
            experts.setdefault(uid, []).append(peer_id)
    return experts


class CoordinatorService:
    """Ledger + poller + dashboard of one run.

    :param dht: the coordinator's running DHT (the service never shuts it down)
    :param config: the run config (its name selects the DHT keys; its model gives the expert grid)
    :param data_dir: where ``coordinator.sqlite3`` lives; reopening it resumes the ledger
    :param http_host: the dashboard's bind address
    :param http_port: the dashboard's port; 0 = any free port (``url`` shows the real one)
    :param poll_period: seconds between DHT polls
    :param live_window: seconds since last seen for a peer to count as live (default: the records' TTL + 2 polls)
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        config: RunConfig,
        data_dir: str | Path,
        *,
        http_host: str = "127.0.0.1",
        http_port: int = 8080,
        poll_period: float = DEFAULT_POLL_PERIOD,
        policy: CreditPolicy = CreditPolicy(),
        live_window: Optional[float] = None,
        run_address: str = "",
    ):
        self.dht, self.config, self.data_dir = dht, config, Path(data_dir)
        self.http_host, self.http_port = http_host, http_port
        if config.verification.check_rate == 0 and policy.pending_window is not None:
            # nothing will ever check these samples: let them stay pending instead of lapsing
            logger.info("verification.check_rate is 0: samples stay pending (unverified) and never lapse")
            policy = dataclasses.replace(policy, pending_window=None)
        self.poll_period, self.policy = poll_period, policy
        self.live_window = live_window if live_window is not None else config.expert_ttl + 2 * poll_period
        self.run_address = run_address
        self.started_at = time.time()
        self.store: Optional[Store] = None
        self._web: Optional[WebServer] = None
        self._poller: Optional[PeriodicThread] = None
        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = dict(polls=0, errors=0, last_poll_at=None, last_error=None, last_error_at=None,
                                           last_seen_records=0, period=poll_period)

    # --------------------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        """The dashboard URL with the real port, e.g. ``http://127.0.0.1:8080/``; valid after :meth:`start`."""
        if self._web is None:
            raise RuntimeError("CoordinatorService.start() was not called")
        return self._web.url

    def start(self) -> None:
        """Open the ledger, start serving the dashboard, then start polling. Raises if the ledger cannot open."""
        self.store = Store(self.data_dir, self.policy, run_name=self.config.name)
        try:
            coordinator_id = self.dht.peer_id.to_base58()
        except Exception:  # a stand-in DHT in tests, or one that died
            coordinator_id = ""
        context = DashboardContext(
            run_name=self.config.name, config=self.config.to_dict(), coordinator_id=coordinator_id,
            run_address=self.run_address, started_at=self.started_at, expert_uids=self.config.model.expert_uids(),
            live_window=self.live_window, poll_status=self.poll_status,
        )
        app = create_app(self.store, context)
        self._web = WebServer(app, self.http_host, self.http_port)
        try:
            self._web.start()
        except OSError as error:
            if self.http_port == 0:
                self.store.close()
                raise
            logger.warning(f"Dashboard port {self.http_port} is unavailable ({error.strerror}); taking a free port")
            self._web = WebServer(app, self.http_host, 0)
            self._web.start()
        logger.info(f"Dashboard at {self._web.url} (ledger: {self.store.path})")
        self._poller = PeriodicThread(self.poll_once, period=self.poll_period, name="coordinator poller")
        self._poller.start()

    def stop(self) -> None:
        """Stop polling and serving, then close the ledger; idempotent, never raises."""
        for name, action in (
            ("poller", lambda: self._poller and self._poller.stop()),
            ("web server", lambda: self._web and self._web.stop()),
            ("store", lambda: self.store and self.store.close()),
        ):
            try:
                action()
            except Exception as error:
                logger.warning(f"Stopping the coordinator's {name} failed: {error!r}")

    # --------------------------------------------------------------------------------------------- polling
    def poll_once(self) -> int:
        """Read the run's server, metrics and peer records and write them to the ledger.

        Returns the number of peers observed; never raises (failures are logged and counted in
        :meth:`poll_status`)."""
        try:
            name = self.config.name
            servers = get_records(self.dht, run_key(name, "servers"), ServerRecord)
            metrics = get_records(self.dht, run_key(name, "metrics"), MetricsRecord)
            peers = get_records(self.dht, run_key(name, "peers"), PeerRecord)
            receipts = get_records(self.dht, run_key(name, "receipts"), ReceiptRecord)
            observations = observations_from_records(servers, metrics, peers)
            now = time.time()
            if self.store is None:
                raise RuntimeError("the service is not started")
            self.store.ingest(observations, now)
            self.store.ingest_receipts(
                ((trainer_id, receipt.session, receipt.time,
                  {host: item.forward + item.backward for host, item in receipt.hosts.items()})
                 for trainer_id, (receipt, _) in receipts.items()),
                now,
            )
            self.store.save_expert_map(expert_map_from_servers(servers, self.config.model.expert_uids()), now)
        except Exception as error:
            with self._stats_lock:
                self._stats["errors"] += 1
                self._stats["last_error"] = f"{type(error).__name__}: {error}"[:500]
                self._stats["last_error_at"] = time.time()
                errors = self._stats["errors"]
            if errors <= 3 or errors % 100 == 0:  # do not flood the log while the DHT is down
                logger.warning(f"Coordinator poll failed ({errors} so far): {error!r}",
                               exc_info=logger.isEnabledFor(logging.DEBUG))
            return 0
        with self._stats_lock:
            self._stats["polls"] += 1
            self._stats["last_poll_at"] = time.time()
            self._stats["last_seen_records"] = len(observations)
        return len(observations)

    def poll_status(self) -> dict[str, Any]:
        """Poller health: polls, errors, last_poll_at, last_error, last_error_at, last_seen_records, period."""
        with self._stats_lock:
            return dict(self._stats)
