"""One expert replica that averages with its peers, as a process to run inside a network namespace (tests only).

    python -m athome.testing.replica_node --role bootstrap --public_ip 10.77.1.2 --port 31337
    python -m athome.testing.replica_node --role direct --run ADDR --value 1.0
    python -m athome.testing.replica_node --role relayed --run ADDR --value 3.0

``bootstrap`` is a run's coordinator as far as networking goes: the first DHT node, public, relaying for peers behind
NAT (``start_dht(relay_service=True)``); it prints ``run address: ADDR``. ``direct`` joins as a DHT server, as a
reachable ``peer join`` does; ``relayed`` joins as ``peer join`` does behind NAT once it chose the relay: a DHT
client with a slot at the run's relay (``start_dht(relays=[ADDR], client_mode=True)``). Both hold one tensor filled
with ``--value`` and average it with :class:`~athome.averaging.replica.ExpertReplicaAverager` (the class ``peer
join`` uses, with the run config's averaging defaults, the direct TCP data plane included); after each round they
print ``round: ok MEAN (reducers reached over direct TCP: N)`` or ``round: failed``. They run until killed.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=("bootstrap", "direct", "relayed"), required=True)
    parser.add_argument("--run", help="the bootstrap's address (direct, relayed)")
    parser.add_argument("--public_ip", help="the bootstrap's announced address")
    parser.add_argument("--port", type=int, default=31337)
    parser.add_argument("--value", type=float, default=0.0, help="initial value of every element of the tensor")
    parser.add_argument("--period", type=float, default=6.0, help="seconds between averaging rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    from athome.averaging.replica import ExpertReplicaAverager
    from athome.config import AveragingConfig
    from athome.dht import Identity, start_dht

    identity = Identity.load_or_create(Path(tempfile.mkdtemp(prefix="replica-node-")) / "identity.key")
    if args.role == "bootstrap":
        dht = start_dht(identity, host_maddrs=[f"/ip4/0.0.0.0/tcp/{args.port}"],
                        announce_maddrs=[f"/ip4/{args.public_ip}/tcp/{args.port}"], relay_service=True)
        print(f"run address: /ip4/{args.public_ip}/tcp/{args.port}/p2p/{identity.peer_id}", flush=True)
        while True:
            time.sleep(3600)
    relays = [args.run] if args.role == "relayed" else []
    dht = start_dht(identity, initial_peers=[args.run], relays=relays, client_mode=bool(relays),
                    use_auto_relay=bool(relays))
    print(f"peer id: {identity.peer_id} (client mode: {dht.client_mode})", flush=True)
    tensor = torch.full((256, 64), args.value)
    averaging = AveragingConfig()

    reports = []

    def report(round_report) -> None:
        reports.append(round_report)
        logger.info(f"round report: {round_report}")

    averager = ExpertReplicaAverager(
        dht, "ffn.0.0", [tensor], run_prefix="athome.replicanode", target_group_size=averaging.target_group_size,
        period=args.period, expected_replicas=2, reducer=averaging.reducer, clip_tau=averaging.clip_tau,
        clip_iterations=averaging.clip_iterations, compression=averaging.compression,
        direct_tcp=averaging.direct_tcp, same_host_reads=averaging.same_host_reads,
        on_round=report,
    )
    rounds_ok = rounds_failed = 0
    while True:  # the averager's own schedule, observed: one line per finished round
        time.sleep(0.5)
        if averager.rounds_ok > rounds_ok:
            tcp = len(reports[-1].tcp_reducers) if reports else 0
            print(f"round: ok {tensor.mean().item():.4f} (reducers reached over direct TCP: {tcp})", flush=True)
        elif averager.rounds_failed > rounds_failed:
            print("round: failed", flush=True)
        rounds_ok, rounds_failed = averager.rounds_ok, averager.rounds_failed


if __name__ == "__main__":
    main()
