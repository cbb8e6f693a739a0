"""``peer coordinator``: the run's bootstrap node. It signs and publishes the run config and keeps it fresh.

The coordinator is a convenience, not a single point of failure: once peers have joined, the DHT, expert serving,
training and averaging go on without it; only the dashboard and the credit ledger pause while it is down.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from athome.config import ConfigError, RunConfig, load_config
from athome.coordinator.service import CoordinatorService
from athome.dht import Identity, publish_run_config, start_dht, store_record
from athome.dht.rejoin import rejoin, remember_peers
from athome.dht.schemas import PeerRecord, run_key
from athome.lifecycle import PeriodicThread, die, emit, shutdown_requested
from athome.netflags import dht_kwargs, pick_public_maddr
from athome.peer.reachability import serve_reachability
from athome.trainer.data import load_corpus

logger = logging.getLogger(__name__)


def pin_corpus(config: RunConfig) -> RunConfig:
    """Record the corpus fingerprint in the config, so every peer can check it reads the very same bytes.

    Batches are rebuilt from seeds by validators; that only works if everyone's corpus is identical (the
    default corpus is this Python's standard library, which differs between Python versions).
    """
    if config.data.corpus_fingerprint:
        return config
    fingerprint = load_corpus(config.data).fingerprint
    logger.info(f"Corpus fingerprint {fingerprint[:12]} pinned in the run config")
    return config.model_copy(update=dict(data=config.data.model_copy(update=dict(corpus_fingerprint=fingerprint))))


def run_coordinator(args: argparse.Namespace) -> None:
    try:
        config: RunConfig = load_config(args.config)
    except ConfigError as error:
        die(f"{error}\nfix the file, or run without --config to use the defaults")
    if args.config is None:
        logger.info(f"Using the built-in run config '{config.name}' (pass --config run.toml to change it)")
    config = pin_corpus(config)
    if getattr(args, "check_rate", None) is not None:
        if not 0 <= args.check_rate <= 1:
            die(f"--check_rate must be between 0 and 1, got {args.check_rate}")
        config = config.model_copy(update=dict(
            verification=config.verification.model_copy(update=dict(check_rate=args.check_rate))))
    identity = Identity.load_or_create(args.identity_path or Path(args.data_dir) / "coordinator.key")
    stop = shutdown_requested()

    try:
        network = dht_kwargs(args)
        dht = start_dht(identity, run_name=config.name, invite_only=getattr(args, "invite_only", False),
                        relay_service=not args.no_relay, **network)  # relays for the run's peers behind NAT
    except Exception as error:
        die(
            f"the DHT node failed to start: {error}\n"
            f"if the port is busy, pick another with --port, or run `peer check --port {args.port}`"
        )
    started_at = time.time()
    ttl = config.expert_ttl
    peer_book = Path(args.data_dir) / "peers.json"  # a restarted coordinator dials these to find the swarm again
    rejoined = rejoin(dht, peer_book)
    if rejoined:
        logger.info(f"Rejoined the swarm through {rejoined} peers remembered in {peer_book} (delete it to start afresh)")
    serve_reachability(dht, network["host_maddrs"], relay=not args.no_relay)  # answers `peer check --run`
    if not args.no_relay:
        logger.info("Relaying for the run's peers behind NAT (--no_relay to stop)")

    service = None
    try:
        service = CoordinatorService(dht, config, Path(args.data_dir), http_host=args.http_host, http_port=args.http_port)
        service.start()
    except Exception as error:
        logger.error(f"The dashboard failed to start ({error}); the run goes on without it")
        service = None
    dashboard_url = service.url if service is not None else ""

    verification = None
    try:  # the validator and ban desk (athome.verification); the run goes on without them, unverified
        from athome.verification.integration import CoordinatorVerification

        verification = CoordinatorVerification(dht, config, store=service.store if service is not None else None,
                                               audit_period=config.verification.audit_period)
        verification.start()
        logger.info(f"Verifying trainers: newcomers on every step, trusted ones at check_rate "
                    f"{config.verification.check_rate:g} (override with --check_rate)")
    except Exception as error:
        logger.error(f"Verification failed to start ({error!r}); trainers' steps are NOT checked in this run")
        verification = None

    def publish() -> None:
        if not publish_run_config(dht, identity, config, ttl=ttl * 2):
            logger.warning("Publishing the run config found no DHT node to store it; retrying")
        record = PeerRecord(role="coordinator", started_at=started_at, dashboard_url=dashboard_url)
        store_record(dht, run_key(config.name, "peers"), record, ttl)
        remember_peers(dht, peer_book)

    publisher = PeriodicThread(publish, period=ttl / 3, name="config publisher")
    publisher.start()

    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    address = pick_public_maddr(maddrs)
    emit(f"run address: {address}")
    if getattr(args, "invite_only", False):
        where = f"--identity_path {args.identity_path}" if args.identity_path else f"--data_dir {args.data_dir}"
        emit(f"invite-only: issue each volunteer a token with: peer invite {where} [--expires_in H] [--peer_id ID]")
        emit(f"volunteers join with: peer join --run {address} --experts auto --invite TOKEN")
    else:
        emit(f"volunteers join with: peer join --run {address} --experts auto")
    if service is not None:
        emit(f"dashboard: {service.url}")
    try:
        stop.wait()
    finally:
        publisher.stop()
        if verification is not None:
            verification.stop()
        if service is not None:
            service.stop()
        dht.shutdown()
        logger.info("Coordinator stopped")
