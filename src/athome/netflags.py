"""The network flags every athome command shares, named as in hivemind and Petals, and how they map to a DHT."""
from __future__ import annotations

import argparse
import ipaddress
import logging
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)


class NetworkFlagError(ValueError):
    """Network flags that cannot work together; the message names the flag and the fix."""


def add_network_flags(parser: argparse.ArgumentParser, *, default_port: Optional[int] = None) -> None:
    group = parser.add_argument_group("network")
    group.add_argument(
        "--host_maddrs", nargs="+", default=None, metavar="MADDR",
        help="multiaddrs to listen on (default: /ip4/0.0.0.0/tcp/PORT)",
    )
    group.add_argument(
        "--announce_maddrs", nargs="+", default=None, metavar="MADDR",
        help="multiaddrs other peers should dial (default: what libp2p detects)",
    )
    group.add_argument("--port", type=int, default=default_port, help="TCP port to listen on (0 = any free port)")
    group.add_argument("--public_ip", default=None, help="public IP to announce; the simple form of --announce_maddrs")
    group.add_argument("--initial_peers", nargs="+", default=(), metavar="MADDR", help="extra DHT peers to bootstrap from")
    group.add_argument("--identity_path", default=None, help="Ed25519 key file (default ~/.athome/identity.key)")
    group.add_argument(
        "--use_auto_relay", action="store_true",
        help="be reachable through the run's relay (its coordinator) from behind NAT; `peer join` picks this itself "
             "when the run cannot dial it",
    )
    group.add_argument("--no_relay", action="store_true", help="disable libp2p circuit relays (no relaying, either way)")
    group.add_argument("--client_mode", action="store_true", help="do not accept incoming connections")
    group.add_argument("--invite", default=None, metavar="TOKEN", help="your invitation to an invite-only run (`peer invite`)")


def dht_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Turn the network flags into ``start_dht`` keyword arguments, logging each automatic choice."""
    port = args.port if args.port is not None else 0
    if args.host_maddrs:
        host_maddrs = list(args.host_maddrs)
    else:
        host = "0.0.0.0"
        if args.public_ip is None and _only_loopback(args):
            host = "127.0.0.1"
        host_maddrs = [f"/ip4/{host}/tcp/{port}"]
        logger.info(f"Listening on {host_maddrs[0]} (override with --host_maddrs or --port)")
    announce = list(args.announce_maddrs or ())
    if args.public_ip and not announce:
        try:
            version = ipaddress.ip_address(args.public_ip).version
        except ValueError:
            raise NetworkFlagError(f"--public_ip {args.public_ip!r} is not an IP address (e.g. --public_ip 203.0.113.7)")
        announce_port = port or _port_of(host_maddrs)
        if not announce_port:
            raise NetworkFlagError(
                "--public_ip needs --port: the TCP port your router forwards to this machine (e.g. --public_ip "
                f"{args.public_ip} --port 31337); `peer check --run ADDR` prints the exact commands"
            )
        announce = [f"/ip{version}/{args.public_ip}/tcp/{announce_port}"]
        logger.info(f"Announcing {announce[0]} (override with --announce_maddrs)")
    run = getattr(args, "run", None)
    relays = [run] if args.use_auto_relay and run and not args.no_relay else []  # the coordinator relays
    if relays and not args.client_mode:
        logger.info("Behind a relay, this peer's DHT node runs as a client: others cannot dial it directly")
    return dict(
        initial_peers=list(args.initial_peers),
        host_maddrs=host_maddrs,
        announce_maddrs=announce,
        client_mode=args.client_mode or bool(relays),
        use_auto_relay=args.use_auto_relay and not args.no_relay,
        use_relay=not args.no_relay,
        relays=relays,
        invite=getattr(args, "invite", None),
        coordinator_id=_coordinator_id(args),
    )


def _coordinator_id(args: argparse.Namespace) -> Optional[str]:
    run = getattr(args, "run", None)
    return run.rsplit("/p2p/", 1)[1] if run and "/p2p/" in run else None


def _only_loopback(args: argparse.Namespace) -> bool:
    run = getattr(args, "run", None)
    peers: Sequence[str] = list(args.initial_peers) + ([run] if run else [])
    return bool(peers) and all(p.startswith(("/ip4/127.", "/ip6/::1/")) for p in peers)


def _port_of(maddrs: Sequence[str]) -> int:
    parts = maddrs[0].split("/")
    return int(parts[parts.index("tcp") + 1]) if "tcp" in parts else 0


def pick_public_maddr(maddrs: Sequence[str]) -> str:
    """The multiaddr to print for others: prefer a routable IPv4 TCP address, then any IPv4, then anything."""

    def rank(maddr: str) -> tuple[int, int]:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and "tcp" in parts:
            ip = ipaddress.ip_address(parts[2])
            return (0 if ip.is_global else 1 if ip.is_private and not ip.is_loopback else 2, 0)
        return (3, 0) if "p2p-circuit" not in maddr else (4, 0)

    return sorted(maddrs, key=rank)[0]
