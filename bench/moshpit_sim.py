"""Simulated Moshpit averaging (numpy) with thousands of peers and churn, versus a plain all-reduce.

Model (the one of the Moshpit SGD paper's averaging experiment, yandex-research/moshpit-sgd
``averaging_experiments.ipynb``): N peers sit in distinct random cells of a d-dimensional grid of side M
(N <= M^d). Round t averages every line of the grid along axis ``t mod d``; each peer holds a scalar drawn from
N(0, 1). A peer fails (is unavailable) in a round with probability p; as in athome's averager (a partial round is
not applied), a failure voids the round for its whole group: every member keeps its value. The error is the variance
of the peers' values (the mean is preserved exactly, so this is the mean squared distance to the global average).

A *plain all-reduce* is one group of all N peers: it is exact in one round, but any failure among N voids it.

hivemind's key manager differs in one respect: peers do not keep fixed grid cells; after each round a peer's new
key bits come from a random distinct index inside its group. ``hivemind-keys`` rows simulate that variant.

    python bench/moshpit_sim.py                 # prints the tables; last line: 512 peers on 32x32
    python bench/moshpit_sim.py --trials 50
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import numpy as np

TARGET = 1e-9


def grid_rounds(
    d: int, side: int, peers: int, rounds: int, p_fail: float, rng: np.random.Generator
) -> np.ndarray:
    """Variance after each round (index 0 = before averaging), fixed grid cells, groups = lines along t mod d."""
    cells = side**d
    assert peers <= cells
    shape = (side,) * d
    occupied = np.zeros(cells, dtype=bool)
    occupied[rng.choice(cells, size=peers, replace=False)] = True
    occupied = occupied.reshape(shape)
    values = np.zeros(shape)
    values[occupied] = rng.normal(0.0, 1.0, size=peers)
    history = [values[occupied].var()]
    for t in range(rounds):
        axis = t % d
        failed = np.zeros(shape, dtype=bool)
        failed[occupied] = rng.random(peers) < p_fail
        group_ok = ~failed.any(axis=axis, keepdims=True)  # one failure voids the group's round
        active = occupied & group_ok
        sums = np.where(active, values, 0.0).sum(axis=axis, keepdims=True)
        counts = np.maximum(active.sum(axis=axis, keepdims=True), 1)
        values = np.where(active, np.broadcast_to(sums / counts, shape), values)
        history.append(values[occupied].var())
    return np.asarray(history)


def hivemind_key_rounds(
    peers: int, bits: int, group_size: int, rounds: int, p_fail: float, rng: np.random.Generator
) -> np.ndarray:
    """hivemind's GroupKeyManager: peers with equal ``bits``-bit keys form groups (a bucket is split into chunks of at
    most ``group_size`` in random order); after a round each member shifts in log2(group_size) bits of a random
    distinct index in [0, group_size)."""
    shift, mask = int(np.log2(group_size)), 2**bits - 1
    keys = rng.integers(0, 2**bits, size=peers)
    values = rng.normal(0.0, 1.0, size=peers)
    history = [values.var()]
    positions = np.arange(peers)
    for _ in range(rounds):
        order = np.lexsort((rng.random(peers), keys))  # by key; who meets whom within a bucket is random
        sorted_keys = keys[order]
        new_bucket = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        bucket_start = np.maximum.accumulate(np.where(new_bucket, positions, 0))
        rank_in_bucket = positions - bucket_start
        _, groups = np.unique(np.cumsum(new_bucket) * peers + rank_in_bucket // group_size, return_inverse=True)
        sizes = np.bincount(groups)
        failed = np.bincount(groups, weights=rng.random(peers) < p_fail) > 0
        ok = (sizes[groups] >= 2) & ~failed[groups]  # any failure voids the group's round
        means = np.bincount(groups, weights=values[order]) / sizes
        index = np.argsort(rng.random((len(sizes), group_size)), axis=1)[groups, rank_in_bucket % group_size]
        values[order] = np.where(ok, means[groups], values[order])
        keys[order] = np.where(ok, ((sorted_keys << shift) | index) & mask, sorted_keys)
        history.append(values.var())
    return np.asarray(history)


def allreduce_rounds(peers: int, rounds: int, p_fail: float, rng: np.random.Generator) -> np.ndarray:
    values = rng.normal(0.0, 1.0, size=peers)
    history = [values.var()]
    for _ in range(rounds):
        if not (rng.random(peers) < p_fail).any():
            values[:] = values.mean()
        history.append(values.var())
    return np.asarray(history)


def rounds_to(history: np.ndarray, target: float = TARGET) -> Optional[int]:
    below = np.flatnonzero(history <= target)
    return int(below[0]) if below.size else None


def summarize(label: str, histories: list[np.ndarray], max_rounds: int) -> Optional[float]:
    hits = [rounds_to(h) for h in histories]
    reached = [h for h in hits if h is not None]
    mean_curve = np.mean(histories, axis=0)
    median = float(np.median(reached)) if len(reached) == len(hits) else None
    shown = " ".join(f"{v:.0e}" for v in mean_curve[: min(len(mean_curve), 13)])
    verdict = (
        f"median {median:.0f} rounds to {TARGET:g}"
        if median is not None
        else f"{len(reached)}/{len(hits)} trials reached {TARGET:g} within {max_rounds} rounds"
    )
    print(f"{label:<42} {verdict:<44} variance by round: {shown}")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    T = args.rounds

    def trials(fn):
        return [fn() for _ in range(args.trials)]

    print(f"# {args.trials} trials each, values ~ N(0,1), error = variance across peers, target {TARGET:g}")
    print("\n## Moshpit grid (fixed cells, lines along alternating axes)")
    results = {}
    for p in (0.0, 0.01):
        for peers, d, side in ((512, 2, 32), (1000, 3, 10), (4096, 3, 16), (10000, 2, 100), (10000, 4, 10)):
            label = f"{peers} peers {side}^{d} grid, churn {p:.0%}"
            results[(peers, d, side, p)] = summarize(
                label, trials(lambda: grid_rounds(d, side, peers, T, p, rng)), T
            )

    print("\n## hivemind key manager (random index within group; groups of <= target_group_size)")
    for p in (0.0, 0.01):
        for peers, bits, g in ((512, 5, 32), (1024, 8, 4), (4096, 8, 16)):
            summarize(
                f"{peers} peers {bits}-bit keys, groups {g}, churn {p:.0%}",
                trials(lambda: hivemind_key_rounds(peers, bits, g, T, p, rng)),
                T,
            )

    print("\n## plain all-reduce (one group of everyone; any failure voids the round)")
    for peers in (512, 1024, 10000):
        for p in (0.0, 0.001, 0.01):
            summarize(f"{peers} peers all-reduce, churn {p:.1%}", trials(lambda: allreduce_rounds(peers, T, p, rng)), T)
    success = 0.99**512
    print(f"# all-reduce of 512 peers at 1% churn succeeds with probability 0.99^512 = {success:.4f} per round "
          f"(expected {1 / success:.0f} rounds); Moshpit groups of ~16 fail with 1 - 0.99^16 = {1 - 0.99**16:.2f}")

    print(f"\n# {time.perf_counter() - started:.1f}s")
    moshpit_512 = results[(512, 2, 32, 0.0)]
    shown = f"{moshpit_512:.0f}" if moshpit_512 is not None else f"more than {T}"
    print(f"moshpit 512 peers 32x32: {shown} rounds to 1e-9")


if __name__ == "__main__":
    main()
