"""Benchmark: the coordinator's leaderboard with 100k peers in SQLite.

Fills a fresh ledger through the real ingestion path (``Store.ingest``, the same call the poller makes), then
times ``Store.leaderboard`` pages (50 rows, what the dashboard and ``/api/leaderboard`` ask for) at random offsets
from the first to the last page, plus team-filtered pages. Goal: a page query in under 100 ms.

It also times one poll of signed receipts (``--trainers`` x ``--hosts``) and settling every pending batch.

Usage: ``python bench/leaderboard.py [--peers 100000] [--queries 200]``. The last line reads
``leaderboard page query at 100k peers: X ms`` (X = the median over random pages, the 95th percentile is printed
above it).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from athome.coordinator.store import CreditPolicy, Observation, Store  # noqa: E402

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def fake_peer_id(rng: random.Random) -> str:
    return "12D3KooW" + "".join(rng.choice(ALPHABET) for _ in range(44))


def fill(store: Store, peers: int, rng: random.Random, now: float, batch: int = 5000) -> float:
    """Two polls' worth of reports for ``peers`` trainers; returns seconds spent ingesting."""
    ids = [fake_peer_id(rng) for _ in range(peers)]
    teams = [f"team-{index}" for index in range(200)] + [""] * 50
    started = time.perf_counter()
    for poll, at in enumerate((now - 30, now)):
        for start in range(0, peers, batch):
            store.ingest(
                [
                    Observation(
                        peer_id, role="trainer", public_name=f"volunteer-{index}", team=teams[index % len(teams)],
                        step=poll + 1, loss=3.0, samples=rng.randrange(0, 2000) * (poll + 1), samples_per_second=10.0,
                        report_time=at,
                    )
                    for index, peer_id in enumerate(ids[start : start + batch], start)
                ],
                now=at,
            )
    return time.perf_counter() - started


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--page", type=int, default=50)
    parser.add_argument("--trainers", type=int, default=200, help="trainers in the receipts poll")
    parser.add_argument("--hosts", type=int, default=50, help="hosts each trainer signs receipts for")
    args = parser.parse_args()
    rng = random.Random(0)
    now = time.time()
    with tempfile.TemporaryDirectory(prefix="athome-bench-") as tmp:
        store = Store(Path(tmp), CreditPolicy(max_samples_per_second=1e6))
        seconds = fill(store, args.peers, rng, now)
        print(f"ingested {args.peers:,} peers x 2 polls in {seconds:.1f} s ({2 * args.peers / seconds:,.0f} reports/s)")
        total = store.leaderboard(limit=1, now=now)["total"]
        assert total == args.peers, total
        last_offset = max(0, total - args.page)
        for _ in range(5):  # warm the page cache
            store.leaderboard(args.page, 0, now=now)
        first = [timed(lambda: store.leaderboard(args.page, 0, now=now)) for _ in range(args.queries)]
        last = [timed(lambda: store.leaderboard(args.page, last_offset, now=now)) for _ in range(20)]
        offsets = [rng.randrange(0, last_offset + 1) for _ in range(args.queries)]
        random_pages = [timed(lambda: store.leaderboard(args.page, offset, now=now)) for offset in offsets]
        team = [timed(lambda: store.leaderboard(args.page, 0, team=f"team-{rng.randrange(200)}", now=now))
                for _ in range(args.queries)]
        # one poll of signed receipts (every trainer signs for every host it used) and the settling of every
        # pending batch once the window has passed: the per-poll costs the credit rules add
        hosts = [row["peer_id"] for row in store.leaderboard(args.hosts, 0, now=now)["rows"]]
        trainers = [row["peer_id"] for row in store.leaderboard(args.trainers, args.hosts, now=now)["rows"]]
        receipts_ms = timed(lambda: store.ingest_receipts(
            [(trainer, 1, now, {host: rng.randrange(1, 10_000) for host in hosts}) for trainer in trainers], now=now
        ))
        settle_ms = timed(lambda: store.settle(now + 2 * store.policy.pending_window))
        plan = store._read(
            "EXPLAIN QUERY PLAN SELECT peer_id FROM contributions ORDER BY banned, samples DESC, expert_work DESC, "
            "peer_id LIMIT 50"
        )
        store.close()
    print("query plan: " + "; ".join(row["detail"] for row in plan))
    for name, values in (("first page", first), ("last page", last), ("random pages", random_pages),
                         ("team page", team)):
        values = sorted(values)
        p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
        print(f"{name:>12}: median {statistics.median(values):7.2f} ms, p95 {p95:7.2f} ms, max {values[-1]:7.2f} ms")
    print(f"receipts poll ({len(trainers)} trainers x {len(hosts)} hosts): {receipts_ms:.0f} ms; "
          f"settling {args.peers:,} pending batches: {settle_ms:.0f} ms")
    label = f"{args.peers // 1000}k" if args.peers % 1000 == 0 else f"{args.peers:,}"
    print(f"leaderboard page query at {label} peers: {statistics.median(random_pages):.1f} ms")


if __name__ == "__main__":
    main()
