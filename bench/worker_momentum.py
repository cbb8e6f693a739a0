"""Why trainers average worker momentum: CenteredClip against an attacker hiding in the honest noise.

One of ``--peers`` senders runs "A Little Is Enough" (Baruch et al., 2019): every round it sends the honest senders'
mean plus ``--z`` times their per-coordinate standard deviation, a vector inside the honest spread that no clipping
radius can tell apart. Honest gradients are ``mu + sigma * noise``. Each round the senders' vectors go through
athome's CenteredClip (``athome.averaging.reducer.centered_clip``, clip_tau 1, 5 iterations), either as they are
(beta 0) or as each sender's bias-corrected momentum (beta 0.9, what a trainer averages with
``averaging.worker_momentum``; the attacker keeps the momentum of what it sends). Reported: the aggregate's distance
from the true gradient ``mu``, relative to ``|mu|``, averaged over rounds after a warm-up, next to the plain mean's
and to what the honest senders alone would average. In-process tensors only; a few seconds.

    python bench/worker_momentum.py [--peers 5 --rounds 200 --dim 20000 --z 1.0]

The last line is ``worker_momentum ALIE 1 of N: excess error with momentum X.XX, without Y.YY`` where excess is the
aggregate's error minus the honest senders' own.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from athome.averaging.averager import apply_worker_momentum_  # noqa: E402
from athome.averaging.reducer import centered_clip  # noqa: E402


def run(beta: float, peers: int, rounds: int, dim: int, z: float, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    honest = peers - 1
    mu = torch.randn(dim, generator=generator) * 0.1
    momentum = torch.zeros(peers, dim)
    errors = {"centered_clip": [], "mean": [], "honest alone": []}
    for t in range(1, rounds + 1):
        gradients = mu + torch.randn(honest, dim, generator=generator)
        attack = gradients.mean(0) + z * gradients.std(0)
        sent = torch.cat([gradients, attack[None]])
        averaged = sent.clone()
        if beta:  # what a trainer averages; the attacker keeps the momentum of what it sends too
            apply_worker_momentum_([momentum], [averaged], beta, t)
        aggregate, _ = centered_clip(averaged, torch.ones(peers), 1.0, 5)
        if t > rounds // 4:  # after the momentum's warm-up
            for name, value in (("centered_clip", aggregate), ("mean", averaged.mean(0)),
                                ("honest alone", averaged[:honest].mean(0))):
                errors[name].append(float((value - mu).norm() / mu.norm()))
    return {name: sum(values) / len(values) for name, values in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=5, help="senders, one of them the attacker")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--dim", type=int, default=20000)
    parser.add_argument("--z", type=float, default=1.0, help="the attacker's shift, in honest standard deviations")
    args = parser.parse_args()
    excess = {}
    for beta in (0.0, 0.9):
        errors = run(beta, args.peers, args.rounds, args.dim, args.z)
        excess[beta] = errors["centered_clip"] - errors["honest alone"]
        print(f"beta {beta}: relative error from the true gradient: CenteredClip {errors['centered_clip']:.2f}, "
              f"plain mean {errors['mean']:.2f}, honest senders alone {errors['honest alone']:.2f}")
    print(f"worker_momentum ALIE 1 of {args.peers}: excess error with momentum {excess[0.9]:.2f}, "
          f"without {excess[0.0]:.2f}")


if __name__ == "__main__":
    main()
