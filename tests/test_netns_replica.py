"""Replica averaging across a home NAT: a host behind NAT (served through the run's relay) averages its expert
replica with a public host's. Real DHTs, p2pd daemons and averagers in network namespaces the test builds."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from athome.testing import netlab
from test_netns import needs_netns  # the same environment guard


def _node(host: netlab.Host, log_dir, name: str, *argv: str) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "w")
    return host.popen([sys.executable, "-u", "-m", "athome.testing.replica_node", *argv],
                      stdout=subprocess.PIPE, stderr=log, text=True)


class _Lines:
    """A child's stdout lines, read in the background."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines, self._changed = process, [], threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.strip())
            self._changed.set()

    def wait_for(self, prefix: str, timeout: float, count: int = 1) -> list:
        deadline = time.monotonic() + timeout
        while True:
            found = [line[len(prefix):].strip() for line in self.lines if line.startswith(prefix)]
            if len(found) >= count:
                return found
            assert self.process.poll() is None, f"the node exited ({self.process.returncode}); lines: {self.lines}"
            assert time.monotonic() < deadline, f"no {count} x {prefix!r} within {timeout:.0f}s; lines: {self.lines}"
            self._changed.wait(0.5)
            self._changed.clear()


@needs_netns
@pytest.mark.timeout(600)
def test_a_host_behind_nat_averages_its_replica_with_a_public_host(tmp_path):
    with netlab.NetLab() as lab:
        public, other, home = lab.public_host("pub"), lab.public_host("pubhost"), lab.nat_host("home")
        bootstrap = _Lines(_node(public, tmp_path, "bootstrap", "--role", "bootstrap", "--public_ip", public.ip))
        address = bootstrap.wait_for("run address:", 120)[0]
        direct = _Lines(_node(other, tmp_path, "direct", "--role", "direct", "--run", address, "--value", "1.0"))
        relayed = _Lines(_node(home, tmp_path, "relayed", "--role", "relayed", "--run", address, "--value", "1.5"))
        assert "client mode: True" in relayed.wait_for("peer id:", 120)[0]
        direct.wait_for("peer id:", 120)
        # rounds every 6 s; matchmaking needs both to be up, so allow a few failed rounds first
        relayed_round = relayed.wait_for("round: ok", 240)[0]
        direct_mean = float(direct.wait_for("round: ok", 60)[0].split()[0])
        relayed_mean = float(relayed_round.split()[0])
        # the NATed replica moved towards the public one and back: both now hold the same average
        assert 1.0 < relayed_mean < 1.5 and abs(relayed_mean - direct_mean) < 1e-3, (relayed_mean, direct_mean)
        # the NATed member is an averaging client: it reduces nothing and dials out to the public reducer, over
        # the direct TCP data plane (a dial out through NAT works; nobody has to dial in)
        assert relayed_round.endswith("direct TCP: 1)"), relayed_round
