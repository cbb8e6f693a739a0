"""Remote-expert overhead: trainer throughput through remote experts on loopback vs the same MoE in-process.

What is measured, per variant, as samples/s where one sample = one token through one MoE layer:
one training step of an ``MoELayer(d_model=128, 4 experts, k=2)`` whose experts are the run's ``Expert``
(``Linear(128, 256) -> GELU -> Linear(256, 128)``) on a batch of 128 tokens: gate + top-2 routing, experts
forward, MSE loss (+ 0.01 x load-balancing loss), backward through gate and experts, AdamW on the gate
(trainer side) and AdamW + grad clipping on every expert that got tokens (as ``ExpertBackend`` does on a host).

- ``local``: ``MoELayer`` + ``LocalDispatcher`` with the same experts, AdamW on them each step, one process.
- ``athome RemoteDispatcher``: a real swarm in subprocesses, started as a volunteer would (``peer coordinator
  --config`` and ``peer join --experts ffn.0.[0:4]``), and the trainer-side ``RemoteDispatcher`` in this
  process with its defaults: athome's direct path (one request per host, served in the host process) and
  mean-std fp16 on the wire.
- ``(fp32 wire)``: the same, uncompressed.
- ``(fp32, hivemind handlers)``: uncompressed and forced onto hivemind's ``rpc_forward`` / ``rpc_backward``
  (ConnectionHandler process -> TaskPool process -> Runtime thread), one request per expert: athome before the
  direct path.
- ``hivemind RemoteMixtureOfExperts``: stock hivemind's client MoE on the same host (declared hivemind-style,
  k_best=2), a few steps only because it is slow.

Host and trainer share this machine's cores, like the numbers in the hivemind notes. Every process runs torch
with ``--threads`` (default 1): on a shared 2-core box two OpenMP threads per process oversubscribe the cores and
make every number a measure of the background load. Variants are timed in interleaved rounds (median per
variant) so that background load hits all of them alike. ``--phases`` adds single-request latencies that split
a request into round trip, hivemind's process hops and compute.

    python bench/remote_overhead.py [--steps 25 --rounds 8 --hivemind_steps 3 --batch 128 --phases 64]

The last line is ``remote/local throughput: X.XX`` (athome's default path over local).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from athome.config import ModelConfig, OptimizerConfig  # noqa: E402
from athome.model.expert import build_expert  # noqa: E402
from athome.model.moe import LocalDispatcher, MoELayer  # noqa: E402
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker  # noqa: E402

logger = logging.getLogger("bench.remote_overhead")
RUN_NAME = "bench"


def write_config(path: Path, model: ModelConfig) -> None:
    path.write_text(
        f'name = "{RUN_NAME}"\nexpert_ttl = 60\n[model]\nn_layers = {model.n_layers}\nexperts_per_layer = {model.experts_per_layer}\n'
        f"d_model = {model.d_model}\nexpert_hidden = {model.expert_hidden}\ntop_k = {model.top_k}\n"
        f"n_heads = {model.n_heads}\n"
    )


class Swarm:
    """A coordinator and one expert host as ``peer`` subprocesses, each in its own session (killed as a group)."""

    def __init__(self, workdir: Path, model: ModelConfig, host_args: List[str] = ()):
        from athome.demo import Child

        self.workdir = workdir
        config = workdir / "run.toml"
        write_config(config, model)
        loopback = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0"]
        self.children = []
        coordinator = Child("coordinator", ["coordinator", "--config", str(config), *loopback, "--http_port", "0",
                                            "--data_dir", str(workdir / "coord"),
                                            "--identity_path", str(workdir / "coordinator.key")],
                            workdir / "coordinator.log")
        self._start(coordinator)
        never = threading.Event()
        self.address = coordinator.wait_for("run address:", 120, never)
        uids = f"{model.expert_prefix}.[0:{model.n_layers}].[0:{model.experts_per_layer}]"
        host = Child("host", ["join", "--run", self.address, "--experts", uids, *loopback, *host_args,
                              "--identity_path", str(workdir / "host.key"), "--checkpoint_dir", str(workdir / "ckpt")],
                     workdir / "host.log")
        self._start(host)
        host.wait_for("serving experts:", 120, never)
        from athome.dht import Identity

        self.host_peer_id = Identity.load_or_create(workdir / "host.key").peer_id

    def _start(self, child) -> None:
        child.start()
        self.children.append(child)

    def close(self) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            try:
                child.process.wait(10)
            except Exception:
                pass
            child.kill_group()


def expert_optimizer(params, opt: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=opt.expert_lr, betas=tuple(opt.betas), eps=1e-8, weight_decay=opt.weight_decay)


def make_batches(steps: int, batch: int, d_model: int) -> List[tuple]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, d_model, generator=gen), torch.randn(batch, d_model, generator=gen) * 0.1)
            for _ in range(steps)]


def moe_step(layer: MoELayer, optimizers: List[torch.optim.Optimizer], experts_to_clip, x, target, grad_clip) -> None:
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(layer(x), target) + 0.01 * layer.aux_loss
    loss.backward()
    for expert in experts_to_clip:  # per-expert clipping, as each ExpertBackend does on its host
        if any(p.grad is not None for p in expert.parameters()):
            torch.nn.utils.clip_grad_norm_(expert.parameters(), grad_clip)
    for optimizer in optimizers:
        optimizer.step()


def build_local(model: ModelConfig, opt: OptimizerConfig) -> Callable:
    experts = [build_expert(model, uid) for uid in model.expert_uids()]
    torch.manual_seed(1)
    layer = MoELayer(model.d_model, model.experts_per_layer, model.top_k, LocalDispatcher(experts))
    optimizers = [expert_optimizer(layer.gate.parameters(), opt)] + [expert_optimizer(e.parameters(), opt) for e in experts]
    return lambda x, target: moe_step(layer, optimizers, experts, x, target, opt.grad_clip)


def build_athome(model: ModelConfig, opt: OptimizerConfig, dht, p2p, variant: str) -> Callable:
    """``variant``: ``default`` (athome's default path), ``fp32`` (default path, uncompressed wire) or ``hivemind``
    (uncompressed, forced onto hivemind's handlers: athome before the direct path)."""
    from hivemind.proto import runtime_pb2

    from athome.dht.schemas import run_key
    from athome.trainer.remote import ExpertRegistry, RemoteDispatcher

    registry = ExpertRegistry(dht, run_key(RUN_NAME, "servers"))
    deadline = time.monotonic() + 60
    while registry.num_hosts() == 0 and time.monotonic() < deadline:
        registry.refresh(force=True)
        time.sleep(0.2)
    kwargs = {} if variant == "default" else dict(wire_compression=runtime_pb2.CompressionType.NONE)
    dispatcher = RemoteDispatcher(model.expert_uids(), registry, p2p, **kwargs)
    if variant == "hivemind":
        dispatcher.force_protocol("hivemind")
    torch.manual_seed(1)
    layer = MoELayer(model.d_model, model.experts_per_layer, model.top_k, dispatcher)
    optimizers = [expert_optimizer(layer.gate.parameters(), opt)]

    def step(x, target):
        moe_step(layer, optimizers, [], x, target, opt.grad_clip)
        if dispatcher.last_answered_fraction < 1.0:
            raise RuntimeError(f"only {dispatcher.last_answered_fraction:.0%} of slots answered")

    return step


async def _declare_as(dht, node, uids: List[str], peer_id: str, expiration_time: float):
    """hivemind's ``_declare_experts`` on behalf of another peer (the host declares athome records only)."""
    from hivemind.moe.expert_uid import UID_DELIMITER, split_uid

    data = {}
    for uid in uids:
        data[uid, None] = peer_id
        prefix = uid
        for _ in range(prefix.count(UID_DELIMITER) - 1):
            prefix, coordinate = split_uid(prefix)
            data[prefix, coordinate] = (uid, peer_id)
    keys, subkeys, values = zip(*((key, subkey, value) for (key, subkey), value in data.items()))
    return await node.store_many(keys, values, expiration_time, subkeys=subkeys)


def build_hivemind(model: ModelConfig, opt: OptimizerConfig, dht, host_peer_id: str) -> Callable:
    from hivemind.moe.client.moe import RemoteMixtureOfExperts
    from hivemind.utils import get_dht_time

    uids = model.expert_uids()
    dht.run_coroutine(partial(_declare_as, uids=uids, peer_id=host_peer_id, expiration_time=get_dht_time() + 600))
    moe = RemoteMixtureOfExperts(
        in_features=model.d_model, grid_size=(1, model.experts_per_layer), dht=dht, uid_prefix=f"{model.expert_prefix}.",
        k_best=model.top_k, forward_timeout=30, backward_timeout=30,
    )
    optimizer = expert_optimizer(moe.parameters(), opt)

    def step(x, target):
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(moe(x), target).backward()
        optimizer.step()

    return step


async def close_p2p(p2p) -> None:
    """Shut a P2P replica down on its own event loop (its ``__del__`` elsewhere raises) and let its tasks end."""
    await p2p.shutdown()
    await asyncio.sleep(0.1)


def measure_phases(model: ModelConfig, p2p, host_peer_id: str, rows: int, repeats: int = 60) -> Dict[str, float]:
    """Median latency (ms) of single requests to the host, to split a step's time into its parts.

    Interleaved, so that background load hits every probe alike: an empty round trip to the host process (direct
    path) and to a hivemind handler process (``rpc_info``); one expert's forward of ``rows`` tokens on each path;
    and the same forward in this process (``ExpertBackend.forward``, no network) for the compute alone.
    """
    from hivemind.compression import serialize_torch_tensor
    from hivemind.moe.client.expert import expert_forward
    from hivemind.moe.server.connection_handler import ConnectionHandler
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2
    from hivemind.utils import MSGPackSerializer

    from athome.model.expert import expert_input_schema
    from athome.peer.backend import ExpertBackend
    from athome.peer.server import DirectExpertServicer

    uid = model.expert_uids()[0]
    peer = PeerID.from_base58(host_peer_id)
    direct, hivemind = DirectExpertServicer.get_stub(p2p, peer), ConnectionHandler.get_stub(p2p, peer)
    x = torch.randn(rows, model.d_model)
    empty = runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps(dict(uids=[], counts=[])))
    one = runtime_pb2.ExpertRequest(tensors=[serialize_torch_tensor(x)],
                                    metadata=MSGPackSerializer.dumps(dict(uids=[uid], counts=[1])))
    backend = ExpertBackend(uid, build_expert(model, uid), optimizer_config=OptimizerConfig(),
                            args_schema=expert_input_schema(model), max_batch_size=16384)
    run = RemoteExpertWorker.run_coroutine
    probes = {
        "round trip, host process (direct, empty)": lambda: run(direct.rpc_forward(empty)),
        "round trip, hivemind handler process (rpc_info)": lambda: run(hivemind.rpc_info(runtime_pb2.ExpertUID(uid=uid))),
        f"forward {rows} tokens, direct path": lambda: run(direct.rpc_forward(one)),
        f"forward {rows} tokens, hivemind handler->TaskPool->Runtime": lambda: run(
            expert_forward(uid, [x], [serialize_torch_tensor(x)], hivemind)),
        f"forward {rows} tokens, compute only (in-process backend)": lambda: backend.forward(x),
    }
    times: Dict[str, List[float]] = {label: [] for label in probes}
    for _ in range(repeats):
        for label, probe in probes.items():
            started = time.perf_counter()
            probe()
            times[label].append(time.perf_counter() - started)
    return {label: 1000 * statistics.median(values[repeats // 10:]) for label, values in times.items()}


def time_steps(step: Callable, batches: List[tuple]) -> float:
    """Samples/s of ``step`` over ``batches`` (after one untimed warm-up step)."""
    step(*batches[0])
    started = time.perf_counter()
    for x, target in batches[1:]:
        step(x, target)
    elapsed = time.perf_counter() - started
    return (len(batches) - 1) * batches[0][0].shape[0] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--hivemind_steps", type=int, default=3, help="steps of stock RemoteMixtureOfExperts (0: skip)")
    parser.add_argument("--batch", type=int, default=128, help="tokens per step")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--phases", type=int, default=64, metavar="ROWS",
                        help="also time single requests of ROWS tokens on each path (0: skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of this process and of the host (0: torch's default); "
                             "1 keeps a shared 2-core box from oversubscribing")
    parser.add_argument("--variants", default="default,fp32,hivemind",
                        help="athome dispatcher variants to time: default, fp32 (uncompressed wire), hivemind "
                             "(uncompressed, through hivemind's handler -> TaskPool -> Runtime path)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the host and coordinator processes
    model = ModelConfig(n_layers=1, experts_per_layer=args.experts, top_k=args.k, d_model=args.d_model,
                        expert_hidden=args.hidden)
    opt = OptimizerConfig()
    batches = make_batches(args.steps + 1, args.batch, args.d_model)

    workdir = Path(tempfile.mkdtemp(prefix="athome-bench-"))
    swarm = None
    dht = p2p = None
    previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        started = time.monotonic()
        swarm = Swarm(workdir, model)
        from athome.dht import Identity, fetch_run_config, protect_run_keys, start_dht

        identity = Identity.load_or_create(workdir / "trainer.key")
        dht = start_dht(identity, initial_peers=[swarm.address], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                        client_mode=True)
        config = fetch_run_config(dht, swarm.address.rsplit("/p2p/", 1)[1])
        protect_run_keys(dht, identity, config.name)
        print(f"swarm up in {time.monotonic() - started:.1f}s (coordinator + 1 host with {args.experts} experts)",
              flush=True)

        variants: Dict[str, Callable] = {"local (in-process MoELayer)": build_local(model, opt)}
        p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        names = {"default": "", "fp32": " (fp32 wire)", "hivemind": " (fp32, hivemind handlers)"}
        for variant in [v for v in args.variants.split(",") if v]:
            variants["athome RemoteDispatcher" + names[variant]] = build_athome(model, opt, dht, p2p, variant)
        rates: Dict[str, List[float]] = {label: [] for label in variants}
        for round_index in range(args.rounds):
            for label, step in variants.items():
                rates[label].append(time_steps(step, batches))
        if args.hivemind_steps:
            hivemind_step = build_hivemind(model, opt, dht, swarm.host_peer_id)
            label = "hivemind RemoteMixtureOfExperts"
            rates[label] = [time_steps(hivemind_step, batches[: args.hivemind_steps + 1])]

        if args.phases:
            print(f"\nsingle requests, median ms ({args.phases} tokens = one expert's share of a {args.batch}-token step)")
            for label, ms in measure_phases(model, p2p, swarm.host_peer_id, args.phases).items():
                print(f"  {label:58s} {ms:6.2f}")

        local = statistics.median(rates["local (in-process MoELayer)"])
        print(f"\n{args.experts} experts, k={args.k}, batch {args.batch} tokens, d_model {args.d_model}, "
              f"hidden {args.hidden}; forward+backward+AdamW; median of {args.rounds} rounds x {args.steps} steps")
        print(f"{'variant':48s} {'samples/s':>10s} {'ms/step':>8s} {'/local':>7s}  {'range':s}")
        for label, values in rates.items():
            rate = statistics.median(values)
            spread = f"{min(values):.0f}-{max(values):.0f}" if len(values) > 1 else ""
            print(f"{label:48s} {rate:10.0f} {1000 * args.batch / rate:8.1f} {rate / local:7.3f}  {spread}")
        remote = statistics.median(rates["athome RemoteDispatcher"]) if "athome RemoteDispatcher" in rates else 0.0
        print(f"remote/local throughput: {remote / local:.2f}")
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if p2p is not None:
            RemoteExpertWorker.run_coroutine(close_p2p(p2p))
        if dht is not None:
            dht.shutdown()
        if swarm is not None:
            swarm.close()


if __name__ == "__main__":
    main()
