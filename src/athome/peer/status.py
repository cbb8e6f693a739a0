"""``peer status``: join a run as a client, verify its config against the run address, and show the swarm."""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import hivemind

from athome.config import RunConfig
from athome.dht import (
    Identity,
    RunAddress,
    RunAddressError,
    RunConfigError,
    fetch_run_config,
    get_records,
    protect_run_keys,
    start_dht,
)
from athome.dht.schemas import MetricsRecord, PeerRecord, ServerRecord, run_key
from athome.lifecycle import die, emit
from athome.netflags import dht_kwargs

logger = logging.getLogger(__name__)


def swarm_snapshot(dht: hivemind.DHT, config: RunConfig) -> dict[str, Any]:
    """The run as its records show it: peers, expert uid -> serving peer IDs, and trainers' latest metrics."""
    servers = get_records(dht, run_key(config.name, "servers"), ServerRecord)
    peers = get_records(dht, run_key(config.name, "peers"), PeerRecord)
    metrics = get_records(dht, run_key(config.name, "metrics"), MetricsRecord)
    experts: dict[str, list[str]] = {uid: [] for uid in config.model.expert_uids()}
    for peer_id, (record, _) in sorted(servers.items()):
        for uid in record.experts:
            experts.setdefault(uid, []).append(peer_id)
    peer_table = {
        peer_id: dict(record.model_dump(mode="json"), expires_at=expiration)
        for peer_id, (record, expiration) in peers.items()
    }
    for peer_id, (record, expiration) in servers.items():
        peer_table.setdefault(peer_id, dict(role="expert_host", public_name=record.public_name, expires_at=expiration))
        peer_table[peer_id]["experts"] = list(record.experts)
        # trainers prefer direct hosts; a relayed one (behind NAT) is reached through the coordinator's relay
        peer_table[peer_id]["link"] = "relayed" if record.relayed else "direct"
        peer_table[peer_id]["expert_calls"] = record.expert_calls
    for peer_id, (record, expiration) in metrics.items():
        peer_table.setdefault(peer_id, dict(role="trainer", public_name=record.public_name, expires_at=expiration))
        peer_table[peer_id]["metrics"] = record.model_dump(mode="json")
    return dict(run=config.name, config=config.to_dict(), peers=peer_table, experts=experts)


def run_status(args: argparse.Namespace) -> None:
    try:
        address = RunAddress.parse(args.run)
    except RunAddressError as error:
        die(str(error))
    # a throwaway identity: `peer status` only reads, and must not take over the volunteer's own peer ID
    identity = Identity.load_or_create(Path(tempfile.mkdtemp(prefix="athome-status-")) / "identity.key")
    args.client_mode = True
    args.initial_peers = [address.maddr, *args.initial_peers]
    try:
        dht = start_dht(identity, **dht_kwargs(args))
    except Exception as error:
        die(f"could not reach the run at {address}: {error}\ncheck the address, and that the coordinator is up")
    try:
        config = fetch_run_config(dht, address.coordinator_id, timeout=args.timeout)
        protect_run_keys(dht, identity, config.name)
        snapshot = swarm_snapshot(dht, config)
    except RunConfigError as error:
        dht.shutdown()
        die(str(error))
    dht.shutdown()
    if args.json:
        emit(json.dumps(snapshot, sort_keys=True))
        return
    print_snapshot(snapshot)


def print_snapshot(snapshot: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    model = snapshot["config"]["model"]
    console.print(
        f"[bold]run[/] {snapshot['run']}: {model['n_layers']} layers x {model['experts_per_layer']} experts, "
        f"d_model {model['d_model']}, top-{model['top_k']}"
    )
    peers = Table("peer", "role", "name", "link", "experts / metrics", title="live peers")
    for peer_id, info in sorted(snapshot["peers"].items()):
        detail = ", ".join(info.get("experts", [])) or (
            f"step {info['metrics']['step']}, loss {info['metrics']['loss']:.3f}" if "metrics" in info else ""
        )
        link = {"relayed": "[yellow]relayed[/]", "direct": "direct"}.get(info.get("link", ""), "")
        peers.add_row(peer_id[-12:], info.get("role", "?"), info.get("public_name", ""), link, detail)
    console.print(peers)
    experts = Table("expert", "replicas", "served by", title="experts")
    for uid, servers in snapshot["experts"].items():
        experts.add_row(uid, str(len(servers)), ", ".join(p[-8:] for p in servers) or "[red]none[/]")
    console.print(experts)
