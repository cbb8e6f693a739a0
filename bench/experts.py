"""Expert backend bench: throughput and device memory per expert for fp32, bf16 and fp16+offload, side by side.

Throughput is samples/s through ``ExpertBackend.forward`` + ``backward`` (which includes the optimizer update), as
hivemind's Runtime would drive it. Device memory per expert is what it keeps between requests, which decides how
many experts fit (a host computes one request at a time, so activations are needed once, not per expert): on CUDA
``torch.cuda.memory_allocated`` after its calls, less what was allocated before it (the process's one-time cuBLAS
workspaces are taken by a throwaway expert first), with the peak while it trains (activations included) beside it;
on CPU the bytes of tensors the expert keeps on its compute device (``device_memory_bytes``: with offload, the
fp32 master and AdamW state are host-side).

CPU caveat: bf16/fp16 autocast on CPU is slower than fp32 (no fast half matmuls on most CPUs), so CPU throughput
ratios say nothing about GPU speed.

    PYTHONPATH=src python bench/experts.py [--d_model 128 --hidden 256 --batch 256 --steps 40 --device cpu]

The last line is ``experts per GB fp16+offload/fp32: X.XX, throughput ratio: Y.YY``.
"""
from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time

import torch
from torch import nn

from hivemind.utils.tensor_descr import BatchTensorDescriptor

from athome.config import ModelConfig, OptimizerConfig
from athome.peer.backend import ExpertBackend

MODES = (("fp32", "fp32", False), ("bf16", "bf16", False), ("fp16+offload", "fp16", True))


def make_expert(d_model: int, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))


def main() -> None:
    model = ModelConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d_model", type=int, default=model.d_model)
    parser.add_argument("--hidden", type=int, default=model.expert_hidden)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="timed forward+backward calls per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="modes are timed in interleaved rounds; median kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d_model, generator=gen)
    grad = torch.randn(args.batch, args.d_model, generator=gen) * 1e-3
    if cuda:
        x, grad = x.to(device), grad.to(device)

    def build(label: str, precision: str, offload: bool) -> ExpertBackend:
        backend = ExpertBackend(
            f"bench.{label}", make_expert(args.d_model, args.hidden), optimizer_config=OptimizerConfig(),
            precision=precision, offload=offload, device=device,
            args_schema=(BatchTensorDescriptor(args.d_model),), max_batch_size=args.batch,
        )
        for _ in range(3):  # warm-up: allocates grads and AdamW state, first-call kernels
            backend.forward(x)
            backend.backward(x, grad)
        sync()
        return backend

    if cuda:
        for label, precision, offload in MODES:  # cuBLAS workspaces: once per process, not per expert
            build(label, precision, offload)
    backends, memory, peak = {}, {}, {}
    for label, precision, offload in MODES:
        if cuda:
            # experts built earlier stay resident but idle: what this one adds is its own (a backend is freed by
            # the garbage collector, not when dropped: collect now, not while measuring)
            gc.collect()
            sync()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        backend = backends[label] = build(label, precision, offload)
        memory[label] = torch.cuda.memory_allocated(device) - base if cuda else backend.device_memory_bytes()
        peak[label] = torch.cuda.max_memory_allocated(device) - base if cuda else memory[label]

    rates = {label: [] for label, _, _ in MODES}
    for _ in range(args.rounds):
        for label, _, _ in MODES:
            backend = backends[label]
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                backend.forward(x)
                backend.backward(x, grad)
            sync()
            rates[label].append(args.batch * args.steps / (time.perf_counter() - start))
    throughput = {label: statistics.median(values) for label, values in rates.items()}

    params = sum(p.numel() for p in make_expert(args.d_model, args.hidden).parameters())
    print(f"device={device} d_model={args.d_model} hidden={args.hidden} params/expert={params} batch={args.batch} "
          f"steps={args.steps}x{args.rounds} threads={torch.get_num_threads()}")
    print(f"memory kept between requests: {'cuda memory_allocated' if cuda else 'device_memory_bytes'}; "
          f"peak: {'cuda max_memory_allocated (with activations)' if cuda else 'the same'}")
    print(f"{'mode':<14}{'samples/s':>12}{'x fp32':>8}{'MiB/expert':>12}{'peak MiB':>10}{'experts/GB':>12}"
          f"{'x fp32':>8}{'skipped':>9}{'updates':>9}")
    for label, _, _ in MODES:
        per_gb = 2**30 / memory[label]
        b = backends[label]
        print(f"{label:<14}{throughput[label]:>12.0f}{throughput[label] / throughput['fp32']:>8.2f}"
              f"{memory[label] / 2**20:>12.3f}{peak[label] / 2**20:>10.1f}{per_gb:>12.0f}"
              f"{memory['fp32'] / memory[label]:>8.2f}{b.skipped_steps:>9}{b.num_updates:>9}")
    if not cuda:
        print("note: CPU has no fast half-precision matmul; bf16/fp16 CPU throughput is not indicative of GPUs")
    print(f"experts per GB fp16+offload/fp32: {memory['fp32'] / memory['fp16+offload']:.2f}, "
          f"throughput ratio: {throughput['fp16+offload'] / throughput['fp32']:.2f}")


if __name__ == "__main__":
    main()
