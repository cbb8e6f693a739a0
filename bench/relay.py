"""Relay cost: trainer throughput through an expert host behind NAT (via the coordinator's relay) vs a direct one.

The issue's home network, built in network namespaces (``athome.testing.netlab``, needs root and iptables):
a public namespace with the coordinator and a *direct* expert host, a *home* namespace behind a MASQUERADE NAT
router with the *relayed* host (``peer join --experts ...``: it finds it cannot be dialled and serves through the
coordinator's circuit relay), and a trainer behind another NAT. Both hosts serve the same experts.

In the trainer's namespace a worker (this file, ``--worker``) times forward + backward of one MoE layer's tokens
through athome's ``RemoteDispatcher`` (one request per host, mean-std fp16 on the wire, as ``peer train``),
routed either to the direct host or to the relayed one, in interleaved rounds (median per variant) so that
background load hits both alike. One sample = one token through one MoE layer.

    python bench/relay.py [--tokens 512 --steps 6 --rounds 5 --rate_mbit 0]

``--rate_mbit R`` shapes every uplink (the public namespace's and both NAT routers') with tbf, like home links:
a relayed request crosses the relay's link twice.

Last line: ``relayed/direct throughput: X.XX``.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

logger = logging.getLogger("bench.relay")


def worker(args: argparse.Namespace) -> None:
    """Runs in the trainer's namespace: time the dispatcher against each host, print one line per variant."""
    import torch
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    from athome.config import RunConfig
    from athome.dht import Identity, RunAddress, fetch_run_config, start_dht
    from athome.dht.schemas import run_key
    from athome.trainer.remote import ExpertRegistry, RemoteDispatcher

    torch.set_num_threads(1)
    address = RunAddress.parse(args.run)
    identity = Identity.load_or_create(Path(tempfile.mkdtemp(prefix="bench-relay-")) / "trainer.key")
    dht = start_dht(identity, initial_peers=[args.run], client_mode=True, host_maddrs=["/ip4/0.0.0.0/tcp/0"])
    config: RunConfig = fetch_run_config(dht, address.coordinator_id)
    p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
    uids = config.model.expert_uids()[: config.model.experts_per_layer]
    dispatchers = {}
    for name, host, other in (("direct", args.direct, args.relayed), ("relayed", args.relayed, args.direct)):
        registry = ExpertRegistry(dht, run_key(config.name, "servers"), relay=args.run, banned={other})
        registry.refresh(force=True)
        assert registry.num_hosts() == 1, f"{name}: expected the one host {host[-8:]}, saw {registry.num_hosts()}"
        assert (registry.relay_for(host) is not None) == (name == "relayed"), f"{host[-8:]} is not {name}"
        dispatchers[name] = RemoteDispatcher(uids, registry, p2p, timeout=60)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, config.model.d_model, generator=generator, requires_grad=True)
    expert_index = torch.stack([torch.randperm(len(uids), generator=generator)[:2] for _ in range(args.tokens)])

    def step(dispatcher) -> float:
        """One forward + backward; the fraction of (token, expert) slots the host answered."""
        outputs, answered = dispatcher(x, expert_index)
        outputs.sum().backward()
        return answered.float().mean().item()

    for name, dispatcher in dispatchers.items():  # warm-up: connections, the relay circuit, the hosts' first calls
        deadline = time.monotonic() + 300
        while step(dispatcher) < 1.0:
            if time.monotonic() > deadline:
                logger.warning(f"{name} host still fails requests after 300 s of warm-up; measuring anyway")
                break
            time.sleep(2)
    # a sample counts once answered: failed requests (skipped by the trainer) are lost throughput
    rates = {name: [] for name in dispatchers}
    for _ in range(args.rounds):
        for name, dispatcher in dispatchers.items():
            started, answered = time.perf_counter(), 0.0
            for _ in range(args.steps):
                answered += step(dispatcher)
            rates[name].append(args.tokens * answered / (time.perf_counter() - started))
    connections = {str(info.peer_id): [str(a) for a in info.addrs] for info in RemoteExpertWorker.run_coroutine(p2p.list_peers())}
    for name, values in rates.items():
        host = args.direct if name == "direct" else args.relayed
        # the connection actually used: hole punching could have replaced the relayed circuit by a direct one
        link = "via relay" if any("/p2p-circuit" in a for a in connections.get(host, ())) else "direct connection"
        print(f"{name}: {statistics.median(values):.0f} samples/s ({link}; rounds: "
              f"{', '.join(f'{v:.0f}' for v in values)})", flush=True)
    dht.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step (each goes to 2 experts)")
    parser.add_argument("--steps", type=int, default=6, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate_mbit", type=float, default=0, help="shape every uplink to this rate (0: unshaped)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--direct", help=argparse.SUPPRESS)
    parser.add_argument("--relayed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.worker:
        return worker(args)

    from athome.dht import Identity
    from athome.testing import netlab

    ok, reason = netlab.available()
    if not ok:
        sys.exit(f"bench/relay.py needs network namespaces: {reason}")
    never = threading.Event()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    with netlab.NetLab() as lab:
        public, home, trainer_home = lab.public_host("pub"), lab.nat_host("home"), lab.nat_host("trainer")
        if args.rate_mbit:  # home uplinks: the relayed path crosses two of them, the direct path one
            for host in (public, home.router, trainer_home.router):
                lab.shape(lab.uplink(host), rate_mbit=args.rate_mbit)
        coordinator = public.peer("coordinator", [
            "coordinator", "--port", "31337", "--public_ip", public.ip, "--data_dir", str(log_dir / "coord"),
            "--identity_path", str(log_dir / "coordinator.key"), "--http_port", "0"], log_dir)
        address = coordinator.wait_for("run address:", 180, never)
        experts = "ffn.0.[0:4]"  # one layer's experts on both hosts: the worker routes a layer
        hosts = {}
        for name, host in (("direct", public), ("relayed", home)):
            key = str(log_dir / f"{name}.key")
            hosts[name] = (host.peer(name, ["join", "--run", address, "--experts", experts, "--identity_path", key,
                                            "--checkpoint_dir", str(log_dir / f"ck-{name}")], log_dir), key)
        for name, (child, _) in hosts.items():
            child.wait_for("serving experts:", 300, never)
        relayed_log = (log_dir / "relayed.log").read_text()
        assert "Serving through the run's relay" in relayed_log, f"the home host did not use the relay; {log_dir}"
        ids = {name: Identity.load_or_create(key).peer_id for name, (_, key) in hosts.items()}
        logger.info(f"swarm up (logs in {log_dir}); timing the trainer's dispatcher against each host")
        worker_log = log_dir / "worker.log"
        with worker_log.open("w") as log:
            process = trainer_home.popen(
                [sys.executable, os.path.abspath(__file__), "--worker", "--run", address, "--direct", ids["direct"],
                 "--relayed", ids["relayed"], "--tokens", str(args.tokens), "--steps", str(args.steps),
                 "--rounds", str(args.rounds)], stdout=subprocess.PIPE, stderr=log, text=True,
            )
            stdout, _ = process.communicate(timeout=1800)
        if process.returncode != 0:
            errors = [line for line in worker_log.read_text().splitlines() if "Error" in line and "event loop" not in line]
            sys.exit(f"the worker failed ({worker_log}):\n" + "\n".join(errors[:10]))
    lines = dict(line.split(": ", 1) for line in stdout.splitlines() if line.startswith(("direct:", "relayed:")))
    print(f"tokens per step: {args.tokens} (top-2), one MoE layer, {args.rounds} rounds x {args.steps} steps")
    for name in ("direct", "relayed"):
        print(f"{name}: {lines[name]}")
    rate = {name: float(lines[name].split()[0]) for name in ("direct", "relayed")}
    print(f"relayed/direct throughput: {rate['relayed'] / rate['direct']:.2f}")


if __name__ == "__main__":
    main()
