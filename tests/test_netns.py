"""Home networks in real network namespaces: a NAT router namespace (iptables MASQUERADE) in front of volunteers.

Every test builds its own namespaces with :mod:`athome.testing.netlab` on private 10.77.x.x subnets that exist only
inside them, and removes them (with their veths and rules) even when it fails.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from athome.testing import netlab

AVAILABLE, WHY_NOT = netlab.available()
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {WHY_NOT}")


def _listen(host: netlab.Host, port: int) -> subprocess.Popen:
    server = host.popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not host.can_connect("127.0.0.1", port, timeout=1):
        assert server.poll() is None and time.monotonic() < deadline, "the test HTTP server did not start"
        time.sleep(0.3)
    return server


@needs_netns
def test_netlab_nat_blocks_inbound_and_cleans_up():
    with netlab.NetLab() as lab:
        public = lab.public_host("pub")
        home = lab.nat_host("home")
        other = lab.nat_host("other")
        _listen(public, 8000)
        _listen(home, 8000)
        assert home.can_connect(public.ip, 8000), "a NATed host must reach a public one"
        assert other.can_connect(public.ip, 8000)
        assert not public.can_connect(home.ip, 8000), "the internet must not reach a private subnet"
        assert not public.can_connect(home.router.ip, 8000), "the router must not forward unsolicited connections"
        assert not other.can_connect(home.ip, 8000)
        lab.shape(lab.uplink(home.router), rate_mbit=20, loss=0.01)
        assert "tbf" in home.router.run("tc", "qdisc", "show").stdout
        names = [host.netns for host in lab.hosts.values()]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names), "namespaces left behind"
