"""Reliability suite (issue #8): every scenario of ``athome.testing.scenarios`` on real swarms on 127.0.0.1.

Scenarios: churn (kill -9 a third of the hosts, restart them from checkpoints), coordinator death, bad input
(fuzzed expert RPCs, garbage DHT records, bad configs and flags), load (8 trainer clients on one host),
shutdown (Ctrl+C / SIGTERM / SIGKILL to every command), network (a shaped, lossy, delayed link between network
namespaces; needs root). Each prints one figure line as it finishes; a table follows, whose last line is
``reliability: K/N scenarios held``. Exit status 1 if any did not hold.

    python bench/reliability.py [--only churn,load] [--out DIR]

Takes 15-25 minutes on a 2-core machine. Logs of every peer stay in ``--out`` (default: a temporary folder).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from athome.lifecycle import setup_logging
from athome.testing import scenarios

SCENARIOS = {
    "churn": scenarios.churn_scenario,
    "network": scenarios.network_scenario,
    "coordinator": scenarios.coordinator_death_scenario,
    "bad_input": scenarios.bad_input_scenario,
    "load": scenarios.load_scenario,
    "shutdown": scenarios.shutdown_scenario,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--out", default=None, help="where peers' logs go (default: a new temporary folder)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)
    # a SIGTERM must run the scenarios' clean-up (finally blocks), like Ctrl+C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="athome-reliability-"))
    logging.getLogger(__name__).info(f"Peers' logs go to {out} (override with --out)")

    outcomes = []
    for name in chosen:
        started = time.monotonic()
        try:
            outcome = SCENARIOS[name](out / name)
        except Exception as error:
            traceback.print_exc()
            outcome = scenarios.Outcome(name, False, "did not finish", [f"{type(error).__name__}: {error}"])
        print(outcome.line(), f"[{time.monotonic() - started:.0f}s]", flush=True)
        outcomes.append((outcome, time.monotonic() - started))

    table = Table(title="athome reliability")
    for column in ("scenario", "held", "figure", "seconds"):
        table.add_column(column, overflow="fold")
    for outcome, seconds in outcomes:
        held = "yes" if outcome.held else "[red]NO[/]: " + "; ".join(outcome.problems)
        table.add_row(outcome.name, held, outcome.figure, f"{seconds:.0f}")
    Console(width=200).print(table)
    held = sum(outcome.held for outcome, _ in outcomes)
    print(f"reliability: {held}/{len(outcomes)} scenarios held", flush=True)
    return 0 if held == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
