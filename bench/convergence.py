"""Convergence: the swarm's loss after S samples divided by centralized training of the same model on the same samples.

Swarm: a real ``peer coordinator`` (run config from a TOML written here), ``--hosts`` expert hosts
(``peer join``, each serving every expert) and ``--trainers`` trainers (``peer train --max_steps S --log_file``),
all subprocesses on 127.0.0.1, with athome's default dispatch path.

Centralized: ``build_local_model`` (same config, same seed, so the same dense init; experts from the same
uid-seeded init) trained in this process on exactly the swarm's batches: at step t it takes the concatenation of
every trainer's batch ``corpus.batch(batch_seed(run, trainer_peer_id, t), ...)``. Same update rule as the swarm:
AdamW(dense_lr) on the dense parameters after clipping them to ``grad_clip`` and, with ``averaging.worker_momentum``,
taking their bias-corrected momentum first (what a trainer averages; AdamW then has no first moment of its own:
``RunConfig.dense_momentum``), and AdamW(expert_lr) on each
expert after clipping that expert's gradient to ``grad_clip`` (what ``ExpertBackend`` does on a host). The run
config sets ``averaging.target_batch_size = batch_size x trainers``, so the swarm's collaborative optimizer
also steps once per round of trainer steps; with one trainer the two runs are the same computation, and any gap
is what the swarm path adds (wire, staleness, failures).

What is compared: the training loss of step t is measured on a batch the model has not been trained on yet
(progressive validation: random windows of a 16 MB corpus practically never repeat), so it estimates held-out
loss without needing the trainer's final dense weights, which ``peer train`` does not save. Both runs log it per
step; the ratio is (mean swarm loss over the last ``--window`` steps) / (mean centralized loss over the same
steps, i.e. the same samples). The centralized model is also scored on held-out validation batches, for scale.

    python bench/convergence.py [--steps 150 --trainers 1 --hosts 1 --batch_size 16 --window 30]

The last line is ``swarm/centralized loss: X.XX``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from athome.averaging.averager import apply_worker_momentum_  # noqa: E402
from athome.config import RunConfig, load_config  # noqa: E402
from athome.demo import Child  # noqa: E402
from athome.dht import Identity  # noqa: E402
from athome.model.lm import build_local_model  # noqa: E402
from athome.trainer.data import batch_seed, load_corpus  # noqa: E402

RUN_NAME = "convergence"
LOOPBACK = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0"]


def write_config(path: Path, batch_size: int, trainers: int, worker_momentum: bool) -> RunConfig:
    path.write_text(
        f'name = "{RUN_NAME}"\nbatch_size = {batch_size}\nexpert_ttl = 60\n'
        f"[averaging]\ntarget_batch_size = {batch_size * trainers}\nworker_momentum = {str(worker_momentum).lower()}\n"
    )
    return load_config(str(path))


def run_swarm(workdir: Path, config_path: Path, args) -> Dict[str, List[dict]]:
    """Start the swarm, train, return each trainer's log rows keyed by its peer ID."""
    children: List[Child] = []
    never = threading.Event()

    def start(name: str, *argv: str) -> Child:
        child = Child(name, list(argv), workdir / f"{name}.log")
        child.start()
        children.append(child)
        return child

    try:
        coordinator = start("coordinator", "coordinator", "--config", str(config_path), *LOOPBACK, "--http_port", "0",
                            "--data_dir", str(workdir / "coord"), "--identity_path", str(workdir / "coordinator.key"))
        address = coordinator.wait_for("run address:", 120, never)
        model = load_config(str(config_path)).model
        all_experts = f"{model.expert_prefix}.[0:{model.n_layers}].[0:{model.experts_per_layer}]"
        hosts = [
            start(f"host{i}", "join", "--run", address, "--experts", all_experts, *LOOPBACK,
                  "--identity_path", str(workdir / f"host{i}.key"), "--checkpoint_dir", str(workdir / f"ckpt{i}"))
            for i in range(args.hosts)
        ]
        for host in hosts:
            host.wait_for("serving experts:", 120, never)
        trainers = {}
        for i in range(args.trainers):
            key = workdir / f"trainer{i}.key"
            peer_id = Identity.load_or_create(key).peer_id
            log = workdir / f"trainer{i}.jsonl"
            start(f"trainer{i}", "train", "--run", address, *LOOPBACK, "--max_steps", str(args.steps), "--no_progress",
                  "--identity_path", str(key), "--log_file", str(log))
            trainers[peer_id] = log
        started = time.monotonic()
        for child in children[-args.trainers:]:
            code = child.process.wait(args.timeout)
            if code != 0:
                raise RuntimeError(f"{child.name} exited with {code}; see {child.log_path}")
        print(f"swarm trained {args.trainers} x {args.steps} steps in {time.monotonic() - started:.0f}s", flush=True)
        logs = {peer: [json.loads(line) for line in log.read_text().splitlines()] for peer, log in trainers.items()}
        for rows in logs.values():
            if len(rows) > 10:  # the first steps include connecting and warm-up
                print(f"swarm trainer: {(rows[-1]['time'] - rows[9]['time']) / (len(rows) - 10):.3f} s/step "
                      f"after step 10", flush=True)
        return logs
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.process.wait(15)
            except Exception:
                pass
            child.kill_group()


def train_centralized(config: RunConfig, peers: List[str], steps: int, eval_batches: int) -> tuple[List[float], float]:
    """Per-step training loss of the in-process model on the swarm's batches, and its final validation loss."""
    model = build_local_model(config.model)
    opt = config.optimizer
    dense = model.dense_parameters()
    experts = [expert for layer in model.moe_layers() for expert in layer.dispatcher.experts]

    def adamw(params, lr, betas):
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=opt.weight_decay)

    beta, dense_betas = config.dense_momentum()
    optimizers = [adamw(dense, opt.dense_lr, dense_betas)]
    optimizers += [adamw(expert.parameters(), opt.expert_lr, tuple(opt.betas)) for expert in experts]
    momentum = [torch.zeros_like(param) for param in dense]
    corpus = load_corpus(config.data)
    losses = []
    for step in range(steps):
        batch = torch.cat([
            corpus.batch(batch_seed(config.name, peer, step), config.batch_size, config.model.seq_len) for peer in peers
        ])
        cross_entropy, aux = model.losses(batch)
        (cross_entropy + model.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(dense, opt.grad_clip)
        if beta:  # what each trainer averages
            apply_worker_momentum_(momentum, [param.grad for param in dense], beta, step + 1)
        for expert in experts:
            torch.nn.utils.clip_grad_norm_(expert.parameters(), opt.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(cross_entropy.item())
    with torch.no_grad():
        validation = statistics.mean(
            model.losses(corpus.batch(seed, config.batch_size, config.model.seq_len, split="validation"))[0].item()
            for seed in range(eval_batches)
        )
    return losses, validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per trainer")
    parser.add_argument("--trainers", type=int, default=1)
    parser.add_argument("--no_worker_momentum", action="store_true",
                        help="averaging.worker_momentum = false: trainers average plain gradients")
    parser.add_argument("--hosts", type=int, default=1, help="expert hosts, each serving every expert")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per trainer step")
    parser.add_argument("--window", type=int, default=30, help="last steps averaged")
    parser.add_argument("--eval_batches", type=int, default=8, help="validation batches for the centralized model")
    parser.add_argument("--timeout", type=float, default=1500,
                        help="seconds the trainers may take (150 steps took 645 s on a 2-core box)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads here and in every peer (0: torch's default); 1 keeps a shared "
                             "2-core box from oversubscribing, which made 2-thread training ~10x slower")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the peer subprocesses

    workdir = Path(tempfile.mkdtemp(prefix="athome-convergence-"))
    config = write_config(workdir / "run.toml", args.batch_size, args.trainers, not args.no_worker_momentum)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        logs = run_swarm(workdir, workdir / "run.toml", args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    peers = sorted(logs)
    for peer, rows in logs.items():
        if [r["step"] for r in rows] != list(range(1, args.steps + 1)):
            raise RuntimeError(f"trainer {peer[-8:]} logged steps {[r['step'] for r in rows][:5]}..., not 1..{args.steps}")
    # a row with step k was computed on the batch of seed step k - 1; trainers' losses are averaged per step
    swarm = [statistics.mean(logs[peer][t]["loss"] for peer in peers) for t in range(args.steps)]

    started = time.monotonic()
    central, validation = train_centralized(config, peers, args.steps, args.eval_batches)
    print(f"centralized trained {args.steps} steps in {time.monotonic() - started:.0f}s "
          f"({(time.monotonic() - started) / args.steps:.3f} s/step incl. data and evaluation)", flush=True)

    samples_per_step = args.batch_size * args.trainers * config.model.seq_len
    window = min(args.window, args.steps)
    print(f"\n{args.trainers} trainer(s) x batch {args.batch_size} x seq {config.model.seq_len}, {args.hosts} host(s), "
          f"{args.steps} steps = {args.steps * samples_per_step} tokens; loss in nats/byte")
    print(f"{'step':>6s} {'tokens':>9s} {'swarm':>7s} {'central':>8s}")
    for t in sorted({0, 1, 2, *range(9, args.steps, max(args.steps // 8, 1)), args.steps - 1}):
        print(f"{t + 1:6d} {(t + 1) * samples_per_step:9d} {swarm[t]:7.3f} {central[t]:8.3f}")
    swarm_last = statistics.mean(swarm[-window:])
    central_last = statistics.mean(central[-window:])
    print(f"last {window} steps: swarm {swarm_last:.4f}, centralized {central_last:.4f}; "
          f"centralized validation loss after training {validation:.4f}")
    print(f"swarm/centralized loss: {swarm_last / central_last:.2f}")


if __name__ == "__main__":
    main()
