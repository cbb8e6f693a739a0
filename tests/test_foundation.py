"""Foundation: config, identity, signed records on real DHT nodes, the coordinator and `peer status` CLIs."""
from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import socket
import sys
import threading
import time
from functools import partial

import hivemind
import pytest
from hivemind.utils import get_dht_time

from athome.config import ConfigError, RunConfig, dump_toml, load_config
from athome.dht import (
    Identity,
    RunAddress,
    RunAddressError,
    RunConfigError,
    fetch_run_config,
    get_records,
    owner_subkey,
    publish_run_config,
    start_dht,
    store_record,
)
from athome.dht.identity import IdentityError, peer_id_from_public_key, public_key_from_peer_id
from athome.dht.node import config_signing_message
from athome.dht.process import RobustDHT
from athome.dht.schemas import CONFIG_KEY, MetricsRecord, RunConfigRecord
from conftest import session_alive

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_config_round_trips_through_toml(tmp_path):
    config = RunConfig(name="my-run", batch_size=8)
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(config))
    assert load_config(path) == config
    assert load_config(None) == RunConfig()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[model]\nd_model = 130\nn_heads = 4\n", "d_model=130 must be divisible by n_heads=4"),
        ("[model]\nd_modle = 128\n", "model.d_modle"),
        ("batch_size = -1\n", "batch_size = -1"),
        ("name = 'Bad Name!'\n", "name = 'Bad Name!'"),
        ("[data]\nsource = 'files'\n", "needs data.paths"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_field_and_value(tmp_path, text, expected):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert expected in str(error.value)


def test_identity_persists_and_embeds_public_key(tmp_path):
    identity = Identity.load_or_create(tmp_path / "id.key")
    again = Identity.load_or_create(tmp_path / "id.key")
    assert identity.peer_id == again.peer_id and identity.peer_id.startswith("12D3KooW")
    assert peer_id_from_public_key(identity.raw_public_key) == identity.peer_id
    message = b"hello"
    public_key_from_peer_id(identity.peer_id).verify(identity.sign(message), message)
    assert (tmp_path / "id.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(IdentityError):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # an RSA-style hashed ID
    (tmp_path / "bad.key").write_bytes(b"garbage")
    with pytest.raises(IdentityError):
        Identity.load_or_create(tmp_path / "bad.key")


def test_run_address_parsing():
    good = "/ip4/127.0.0.1/tcp/1234/p2p/12D3KooWCreKDoXjcmpJwair8G3ZrDYuAcrfwqe3pZkeq8phFiy8"
    assert RunAddress.parse(good).coordinator_id.endswith("Fiy8")
    for bad in ("/ip4/127.0.0.1/tcp/1234", "/ip4/1.2.3.4/tcp/1/p2p/notapeerid"):
        with pytest.raises(RunAddressError):
            RunAddress.parse(bad)


@pytest.fixture
def two_nodes(tmp_path):
    alice = Identity.load_or_create(tmp_path / "alice.key")
    bob = Identity.load_or_create(tmp_path / "bob.key")
    first = start_dht(alice, host_maddrs=LOOPBACK, run_name="demo")
    second = start_dht(bob, host_maddrs=LOOPBACK, run_name="demo", initial_peers=[str(m) for m in first.get_visible_maddrs()])
    yield alice, first, bob, second
    second.shutdown()
    first.shutdown()


def test_a_peer_retries_initial_peers_that_come_up_late(tmp_path):
    """p2pd exits when it reaches none of its initial peers; start_dht starts it again instead of giving up. The
    coordinator starts only once the first failure is logged."""
    coordinator = Identity.load_or_create(tmp_path / "coordinator.key")
    port = _free_port()
    started, failures = [], []
    late = threading.Thread(
        target=lambda: started.append(start_dht(coordinator, host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"]))
    )

    class StartCoordinatorOnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "reached none of the initial peers" in record.getMessage():
                failures.append(record.getMessage())
                if len(failures) == 1:
                    late.start()

    handler = StartCoordinatorOnRetry(level=logging.WARNING)
    logging.getLogger("athome.dht.node").addHandler(handler)
    peer = None
    try:
        peer = start_dht(Identity.load_or_create(tmp_path / "peer.key"), host_maddrs=LOOPBACK,
                         initial_peers=[f"/ip4/127.0.0.1/tcp/{port}/p2p/{coordinator.peer_id}"])
        assert failures and started
        assert peer.run_coroutine(partial(_knows, coordinator.peer_id))
    finally:
        logging.getLogger("athome.dht.node").removeHandler(handler)
        if late.is_alive():
            late.join()
        for node in [peer, *started]:
            if node is not None:
                node.shutdown()


async def _knows(peer_id: str, dht, node) -> bool:
    return any(info.peer_id.to_base58() == peer_id for info in await node.p2p.list_peers())


def _metrics(step: int) -> MetricsRecord:
    return MetricsRecord(step=step, loss=1.0, samples=step, samples_per_second=1.0, time=time.time())


def test_records_cannot_be_forged_clobbered_replayed_or_malformed(two_nodes):
    alice, first, bob, second = two_nodes
    key = "athome.demo.metrics"
    assert store_record(first, key, _metrics(5), ttl=30)
    assert store_record(second, key, _metrics(1), ttl=30)
    # bob writes in alice's name: refused by every node
    assert not second.store(key, _metrics(999).model_dump(), get_dht_time() + 60, subkey=owner_subkey(alice.peer_id))
    # a plain value would replace the whole dictionary: refused under a protected key
    assert not second.store(key, "wipe", get_dht_time() + 600)
    # schema violations, even correctly signed
    assert not second.store(key, {"step": -1}, get_dht_time() + 60, subkey=owner_subkey(bob.peer_id))
    assert not second.store(key, dict(_metrics(1).model_dump(), loss=float("nan")), get_dht_time() + 60,
                            subkey=owner_subkey(bob.peer_id))
    records = get_records(second, key, MetricsRecord)
    assert records[alice.peer_id][0].step == 5 and records[bob.peer_id][0].step == 1

    # replay: an older record of alice's (lower expiration) cannot replace a newer one
    old_expiration = get_dht_time() + 20
    newer = get_dht_time() + 40
    assert first.store(key, _metrics(6).model_dump(), newer, subkey=owner_subkey(alice.peer_id))
    assert not first.store(key, _metrics(2).model_dump(), old_expiration, subkey=owner_subkey(alice.peer_id))
    assert get_records(second, key, MetricsRecord)[alice.peer_id][0].step == 6


def test_expired_records_disappear(two_nodes):
    alice, first, bob, second = two_nodes
    assert store_record(first, "athome.demo.metrics", _metrics(3), ttl=1.5)
    assert alice.peer_id in get_records(second, "athome.demo.metrics", MetricsRecord)
    time.sleep(2.5)
    assert alice.peer_id not in get_records(second, "athome.demo.metrics", MetricsRecord)


def test_run_config_signature_is_checked_against_the_coordinator(two_nodes):
    alice, first, bob, second = two_nodes
    config = RunConfig(name="demo")
    assert publish_run_config(first, alice, config, ttl=30)
    assert fetch_run_config(second, alice.peer_id, timeout=5) == config

    # a config record validly signed at the DHT layer but whose body was changed after the coordinator signed it
    body = config.to_dict()
    published_at = time.time()
    signature = alice.sign(config_signing_message(body, published_at))
    tampered = RunConfigRecord(
        config=dict(body, batch_size=1), published_at=published_at, signature=signature
    )
    assert store_record(first, CONFIG_KEY, tampered, ttl=60)
    with pytest.raises(RunConfigError, match="signature does not match"):
        fetch_run_config(second, alice.peer_id, timeout=5)


def _peer(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "athome.cli", *argv], capture_output=True, text=True, timeout=timeout)


def test_status_shows_the_run_and_refuses_tampered_config(coordinator, tmp_path):
    child, address = coordinator
    result = _peer("status", "--run", address, "--json")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert {"run", "config", "peers", "experts"} <= snapshot.keys()
    assert snapshot["run"] == "demo" and snapshot["config"]["model"]["n_layers"] == 2
    coordinator_id = RunAddress.parse(address).coordinator_id
    assert snapshot["peers"][coordinator_id]["role"] == "coordinator"

    # a malicious node without athome's validator serves a forged config (newer expiration) for the coordinator
    attacker = hivemind.DHT(initial_peers=[address], start=True, host_maddrs=LOOPBACK)
    try:
        forged = dict(RunConfig(name="demo", batch_size=1).to_dict())
        value = {"config": forged, "published_at": time.time(), "signature": b"\0" * 64}
        attacker.run_coroutine(partial(_plant, key=CONFIG_KEY, subkey=owner_subkey(coordinator_id), value=value))
        via_attacker = [str(m) for m in attacker.get_visible_maddrs()]
        result = _peer("status", "--run", address, "--json", "--initial_peers", *via_attacker)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["config"]["batch_size"] == RunConfig().batch_size
    finally:
        attacker.shutdown()

    # a run address whose peer ID is not the coordinator's: the config is refused
    impostor = Identity.load_or_create(tmp_path / "impostor.key")
    wrong = address.rsplit("/p2p/", 1)[0] + "/p2p/" + impostor.peer_id
    result = _peer("status", "--run", wrong, "--json", "--timeout", "3")
    assert result.returncode != 0 and "error" in result.stderr


async def _plant(dht, node, key: str, subkey: str, value: dict) -> None:
    """For DHT.run_coroutine: store a record straight into the node's storage, unchecked."""
    from hivemind.dht.routing import DHTID
    from hivemind.utils import MSGPackSerializer

    blob = b"ATS1" + b"\0" * 64 + MSGPackSerializer.dumps(value)
    node.protocol.storage.store(DHTID.generate(source=key), blob, get_dht_time() + 3600, subkey=subkey)


def test_coordinator_stops_cleanly_on_sigint(coordinator):
    child, address = coordinator
    assert len(session_alive(child.process.pid)) >= 3  # python, its DHT fork, p2pd
    child.process.send_signal(signal.SIGINT)
    assert child.process.wait(30) == 0
    deadline = time.time() + 10
    while session_alive(child.process.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert session_alive(child.process.pid) == []


def test_hard_kill_of_a_peer_leaves_no_orphans(coordinator):
    """hivemind leaves its DHT fork and p2pd running when the parent is SIGKILLed; athome's must not."""
    child, address = coordinator
    assert len(session_alive(child.process.pid)) >= 3
    child.process.kill()
    child.process.wait(10)
    deadline = time.time() + 15
    while session_alive(child.process.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert session_alive(child.process.pid) == []


def test_check_asks_the_run_to_dial_back(coordinator):
    _, address = coordinator
    reachable = _peer("check", "--run", address, "--host_maddrs", "/ip4/127.0.0.1/tcp/0")
    assert reachable.returncode == 0, reachable.stdout + reachable.stderr[-2000:]
    assert "the run can dial this peer directly" in reachable.stdout
    # announcing an address nobody listens on is what a peer behind NAT looks like from outside
    unreachable = _peer("check", "--run", address, "--host_maddrs", "/ip4/127.0.0.1/tcp/0",
                        "--announce_maddrs", "/ip4/127.0.0.1/tcp/1")
    assert unreachable.returncode == 1
    assert "cannot dial this peer directly" in unreachable.stdout
    assert f"peer join --run {address} --port" in unreachable.stdout
    assert "reaches this peer through its relay" in unreachable.stdout  # the coordinator relays for it


class _SenderGone:
    """Unpickles the way a request does whose sender died before the DHT process fetched its reply pipe."""

    def __reduce__(self):
        return _raise_eof, ()


def _raise_eof():
    raise EOFError  # multiprocessing.resource_sharer, when the process sharing the descriptor is gone


@pytest.mark.timeout(60)
def test_dht_process_survives_requests_it_cannot_unpickle():
    dht = RobustDHT(start=True, host_maddrs=LOOPBACK)  # hivemind.DHT's process exits on either request
    try:
        dht._outer_pipe.send(("_get", [], dict(key="k", future=_SenderGone())))
        dht._outer_pipe.send_bytes(pickle.dumps(("_get", [], dict(key="k")))[:-4])  # a sender killed mid-write
        time.sleep(1.0)
        assert dht.is_alive()
        assert dht.store("key", "value", get_dht_time() + 60)
        assert dht.get("key", latest=True).value == "value"
    finally:
        dht.shutdown()


def test_stack_dumps_do_not_need_a_real_sys_stderr(monkeypatch):
    """Under pytest's capsys (sys.stderr in memory) faulthandler's default file raised, and a DHT process whose run()
    raised left its parent waiting forever."""
    import io

    from athome.dht.process import enable_stack_dumps

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    enable_stack_dumps()  # must not raise


@pytest.mark.timeout(60)
def test_dht_process_prints_its_stacks_on_sigusr1_and_keeps_serving(capfd):
    """How to see where a peer process that stopped answering waits: ``kill -USR1 <pid>``."""
    dht = RobustDHT(start=True, host_maddrs=LOOPBACK)
    try:
        os.kill(dht.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        printed = ""
        while "most recent call first" not in printed and time.monotonic() < deadline:
            time.sleep(0.1)
            printed += capfd.readouterr().err
        assert "most recent call first" in printed and "run" in printed
        assert dht.store("key", "value", get_dht_time() + 60)
    finally:
        dht.shutdown()
