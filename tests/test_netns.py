"""Home networks in real network namespaces: a NAT router namespace (iptables MASQUERADE) in front of volunteers.

Every test builds its own namespaces with :mod:`athome.testing.netlab` on private 10.77.x.x subnets that exist only
inside them, and removes them (with their veths and rules) even when it fails.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
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


class HomeNetwork:
    """The issue's topology: a public namespace (coordinator, one expert host), a volunteer behind its own NAT,
    and a trainer behind another NAT. Peers are real ``peer`` processes inside the namespaces."""

    def __init__(self, lab: netlab.NetLab, log_dir):
        self.lab, self.log_dir = lab, log_dir
        self.public = lab.public_host("pub")
        self.home = lab.nat_host("home")
        self.trainer_home = lab.nat_host("trainer")
        self.never = threading.Event()
        self.coordinator = self.peer(self.public, "coordinator", "coordinator", "--port", "31337",
                                     "--public_ip", self.public.ip, "--data_dir", str(log_dir / "coord"),
                                     "--identity_path", str(log_dir / "coordinator.key"), "--http_port", "0")
        self.address = self.coordinator.wait_for("run address:", 180, self.never)
        assert self.address.startswith(f"/ip4/{self.public.ip}/tcp/31337/p2p/"), self.address

    def peer(self, host: netlab.Host, name: str, *argv: str):
        return host.peer(name, list(argv), self.log_dir)

    def key(self, name: str) -> str:
        return str(self.log_dir / f"{name}.key")

    def status(self) -> dict:
        result = self.public.run(sys.executable, "-m", "athome.cli", "status", "--run", self.address, "--json",
                                 timeout=180)
        return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def home_network(tmp_path):
    with netlab.NetLab() as lab:
        yield HomeNetwork(lab, tmp_path)


def _peer_id(key_path: str) -> str:
    from athome.dht import Identity

    return Identity.load_or_create(key_path).peer_id


def _check(host: netlab.Host, address: str) -> subprocess.CompletedProcess:
    return host.run(sys.executable, "-m", "athome.cli", "check", "--run", address, check=False, timeout=240)


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_volunteer_behind_nat_serves_through_the_relay_and_its_experts_train(home_network):
    net = home_network
    public_host = net.peer(net.public, "public_host", "join", "--run", net.address, "--experts", "ffn.0.[0:2],ffn.1.[0:2]",
                           "--identity_path", net.key("public_host"), "--checkpoint_dir", str(net.log_dir / "ck1"))
    # exactly what a volunteer types; its 8 experts include 4 that only it serves
    volunteer = net.peer(net.home, "volunteer", "join", "--run", net.address, "--experts", "auto",
                         "--num_experts", "8", "--identity_path", net.key("volunteer"),
                         "--checkpoint_dir", str(net.log_dir / "ck2"))
    public_host.wait_for("serving experts:", 240, net.never)
    volunteer.wait_for("serving experts:", 300, net.never)
    trainer = net.peer(net.trainer_home, "trainer", "train", "--run", net.address, "--max_steps", "6",
                       "--batch_size", "4", "--no_progress", "--identity_path", net.key("trainer"))
    assert trainer.process.wait(600) == 0, (net.log_dir / "trainer.log").read_text()[-3000:]
    volunteer_log = (net.log_dir / "volunteer.log").read_text()
    assert "Serving through the run's relay" in volunteer_log

    peers = net.status()["peers"]
    volunteer_info, public_info = peers[_peer_id(net.key("volunteer"))], peers[_peer_id(net.key("public_host"))]
    assert volunteer_info["link"] == "relayed" and public_info["link"] == "direct"
    # the volunteer's experts were trained by the NATed trainer, through the relay
    deadline = time.monotonic() + 120
    while net.status()["peers"][_peer_id(net.key("volunteer"))]["expert_calls"] == 0:
        assert time.monotonic() < deadline, "the relayed volunteer never served a call"
        time.sleep(10)

    # a volunteer nobody can reach (behind NAT, relays refused) serves nothing, says so, and still trains
    cafe = net.lab.nat_host("cafe")
    stranded = net.peer(cafe, "stranded", "join", "--run", net.address, "--experts", "auto", "--no_relay",
                        "--identity_path", net.key("stranded"), "--checkpoint_dir", str(net.log_dir / "ck3"))
    assert "none (unreachable: client mode" in stranded.wait_for("serving experts:", 300, net.never)
    deadline = time.monotonic() + 400
    # past its first epochs (a client-mode hivemind.Optimizer used to fail there)
    while net.status()["peers"].get(_peer_id(net.key("stranded")), {}).get("metrics", {}).get("step", 0) < 6:
        assert stranded.alive and time.monotonic() < deadline, "the stranded volunteer did not train"
        time.sleep(10)
    assert stranded.alive


@needs_netns
@pytest.mark.timeout(600)
def test_check_reports_a_natted_peer_unreachable_directly_and_reachable_through_the_relay(home_network):
    net = home_network
    natted = _check(net.home, net.address)
    assert natted.returncode == 1, natted.stdout + natted.stderr[-2000:]
    assert "the run cannot dial this peer directly" in natted.stdout
    assert "reaches this peer through its relay" in natted.stdout
    # the fix names this machine's LAN address and the public address the run saw (the home router's)
    assert f"forward TCP port 31337 to {net.home.ip}:31337" in natted.stdout
    assert f"peer join --run {net.address} --port 31337 --public_ip {net.home.router.ip}" in natted.stdout
    # (a directly reachable peer's check: tests/test_foundation.py, on loopback)


def test_circuit_address_is_what_p2pd_parses():
    from hivemind.p2p import PeerID

    from athome.peer.reachability import circuit_maddr

    relay_id = "12D3KooWSCYDAYKd84veQqeajkS9zMdggrj2YYGeDGBsAD9ZLWxJ"
    encoded = circuit_maddr(f"/ip4/10.77.1.2/tcp/31337/p2p/{relay_id}").to_bytes()
    # libp2p's binary form: /ip4 (4), /tcp (6), /p2p (0xa503) + raw multihash, /p2p-circuit (0xa202)
    multihash = PeerID.from_base58(relay_id).to_bytes()
    assert encoded == bytes.fromhex("040a4d0102067a69") + b"\xa5\x03" + bytes([len(multihash)]) + multihash + b"\xa2\x02"
    with pytest.raises(ValueError):
        circuit_maddr("/ip4/10.77.1.2/tcp/31337")


def test_registry_prefers_direct_replicas():
    from athome.dht.schemas import ServerRecord
    from athome.trainer.remote import ExpertRegistry

    registry = ExpertRegistry(dht=None, servers_key="athome.demo.servers", relay="/ip4/10.77.1.2/tcp/1/p2p/RELAY")
    direct, relayed = ServerRecord(experts=["ffn.0.0"]), ServerRecord(experts=["ffn.0.0", "ffn.0.1"], relayed=True)
    registry._replicas = {"ffn.0.0": [("direct", direct), ("relayed", relayed)], "ffn.0.1": [("relayed", relayed)]}
    registry._relayed = {"relayed"}
    registry.stats("direct").latency = 10.0  # even a much slower direct replica wins
    assert {registry.choose("ffn.0.0") for _ in range(50)} == {"direct"}
    assert registry.choose("ffn.0.1") == "relayed"  # the only replica: used, through the relay
    assert registry.relay_for("relayed") == "/ip4/10.77.1.2/tcp/1/p2p/RELAY" and registry.relay_for("direct") is None
    registry.stats("direct").record_failure()  # a direct replica in cool-down: the relayed one steps in
    assert registry.choose("ffn.0.0") == "relayed"


def _log_text(path) -> str:
    """A peer's log with rich's line wrapping undone (wrapped lines continue after indentation)."""
    return " ".join(path.read_text().split()) if path.exists() else ""


@needs_netns
@pytest.mark.timeout(600)
def test_trainer_behind_nat_detects_it_and_trains_as_a_client(home_network):
    net = home_network
    trainer = net.peer(net.trainer_home, "trainer", "train", "--run", net.address, "--max_steps", "2",
                       "--batch_size", "2", "--no_progress", "--identity_path", net.key("trainer"))
    deadline = time.monotonic() + 300
    while "so it trains as a client" not in _log_text(net.log_dir / "trainer.log"):
        assert trainer.alive, _log_text(net.log_dir / "trainer.log")[-3000:]
        assert time.monotonic() < deadline, "the NATed trainer never said it trains as a client"
        time.sleep(1)
    text = _log_text(net.log_dir / "trainer.log")
    assert "--client_mode skips this check" in text and "--public_ip/--port" in text  # the flags that override it
    time.sleep(5)
    assert trainer.alive, "the trainer died after switching to client mode: " + _log_text(net.log_dir / "trainer.log")[-3000:]


@needs_netns
@pytest.mark.timeout(600)
def test_the_coordinators_relay_carries_expert_sized_requests():
    """p2pd starts two relays and often serves with go-libp2p's default one (128 KiB per connection): start_dht
    probes its own relay and restarts p2pd until the lifted limits serve (dht/node.py, relay_carries). In a
    namespace, because a node bound to loopback only skips the probe (nobody there needs a relay)."""
    script = (
        "import sys, tempfile; from pathlib import Path\n"
        "from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker\n"
        "from athome.dht import Identity, start_dht\n"
        "from athome.peer.reachability import relay_carries\n"
        "identity = Identity.load_or_create(Path(tempfile.mkdtemp()) / 'relay.key')\n"
        "dht = start_dht(identity, host_maddrs=['/ip4/0.0.0.0/tcp/31337'], relay_service=True)\n"
        "relay = f'/ip4/127.0.0.1/tcp/31337/p2p/{identity.peer_id}'\n"
        "print('carries:', RemoteExpertWorker.run_coroutine(relay_carries(relay, nbytes=1_000_000)))\n"
        "dht.shutdown()\n"
    )
    with netlab.NetLab() as lab:
        result = lab.public_host("pub").run(sys.executable, "-c", script, check=False, timeout=300)
    assert "carries: True" in result.stdout, result.stdout + result.stderr[-3000:]


def test_public_ip_and_port_are_the_simple_forms_of_announce_and_host_maddrs():
    import argparse

    from athome.netflags import NetworkFlagError, add_network_flags, dht_kwargs

    parser = argparse.ArgumentParser()
    add_network_flags(parser)
    kwargs = dht_kwargs(parser.parse_args(["--public_ip", "203.0.113.7", "--port", "31337"]))
    assert kwargs["host_maddrs"] == ["/ip4/0.0.0.0/tcp/31337"]
    assert kwargs["announce_maddrs"] == ["/ip4/203.0.113.7/tcp/31337"]
    with pytest.raises(NetworkFlagError, match="--public_ip needs --port"):  # port 0 cannot be forwarded
        dht_kwargs(parser.parse_args(["--public_ip", "203.0.113.7"]))
    with pytest.raises(NetworkFlagError, match="is not an IP address"):
        dht_kwargs(parser.parse_args(["--public_ip", "my-router"]))
