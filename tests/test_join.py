"""`peer join`: real hosts serving experts to an unmodified hivemind client; auto choice, checkpoints, replicas."""
from __future__ import annotations

import re
import socket
import tempfile
import time

import pytest
import torch
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import PeerID

from athome.config import RunConfig
from athome.dht import Identity, get_records, start_dht
from athome.dht.schemas import ServerRecord
from athome.model.expert import build_expert
from athome.peer.experts import ExpertPatternError, choose_least_replicated, expand_pattern, experts_that_fit
from conftest import LOOPBACK

MODEL = RunConfig().model


def test_pattern_grammar():
    assert expand_pattern("ffn.0.[0:3]", MODEL) == ["ffn.0.0", "ffn.0.1", "ffn.0.2"]
    assert expand_pattern("ffn.1.3,ffn.0.[1:3]", MODEL) == ["ffn.0.1", "ffn.0.2", "ffn.1.3"]
    assert expand_pattern("ffn.[0:2].0", MODEL) == ["ffn.0.0", "ffn.1.0"]
    for bad in ("ffn.0.[0:9]", "ffn.7.0", "ffn.0.[3:1]", "", "moe.0.0"):
        with pytest.raises(ExpertPatternError):
            expand_pattern(bad, MODEL)


def test_auto_prefers_least_replicated():
    replicas = {uid: 2 for uid in MODEL.expert_uids()}
    replicas.update({"ffn.0.3": 0, "ffn.1.1": 1})
    assert choose_least_replicated(MODEL, replicas, 2, "peer") == ["ffn.0.3", "ffn.1.1"]
    # ties spread volunteers over the grid
    picks = {tuple(choose_least_replicated(MODEL, {}, 2, f"peer{i}")) for i in range(8)}
    assert len(picks) > 1


class Client:
    """An athome DHT client for discovery plus hivemind's own RemoteExpert for the calls."""

    def __init__(self, address: str):
        self.dht = start_dht(
            Identity.load_or_create(tempfile.mkdtemp() + "/client.key"), run_name="demo", client_mode=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[address],
        )
        self.p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())

    def servers(self) -> dict:
        return {peer: record.experts for peer, (record, _) in get_records(self.dht, "athome.demo.servers", ServerRecord).items()}

    def expert(self, uid: str, peer_id: str) -> RemoteExpert:
        return RemoteExpert(ExpertInfo(uid, PeerID.from_base58(peer_id)), self.p2p)

    def close(self):
        self.dht.shutdown()


@pytest.fixture
def client(coordinator):
    client = Client(coordinator[1])
    yield client
    client.close()


def host_id(child) -> str:
    return Identity.load_or_create(child.argv[child.argv.index("--identity_path") + 1]).peer_id


def test_auto_sizes_the_expert_count_to_memory_kept_between_requests():
    big = RunConfig().model.model_copy(update=dict(d_model=1024, expert_hidden=4096, experts_per_layer=512))
    params = 2 * 1024 * 4096 + 1024 + 4096
    budget = 8 * 2**30  # --max_memory 8
    fp32, per_fp32, working = experts_that_fit(big, "fp32", False, 1, budget, 16384, "cuda")
    offload, per_offload, _ = experts_that_fit(big, "fp16", True, 1, budget, 16384, "cuda")
    # the bytes measured on an H100 by tests/test_cuda.py: fp32 weights + 2 Adam moments; the fp16 working copy
    assert (per_fp32, per_offload) == (12 * params, 2 * params)
    assert 1.5 * 2**30 > working > 128 * 2**20  # one request's activations (16384 tokens), once, + cuBLAS workspace
    assert fp32 == (budget - working) // per_fp32 and 6 * fp32 <= offload <= 6 * fp32 + 6
    accumulating, per_accumulating, _ = experts_that_fit(big, "fp32", False, 4, budget, 16384, "cuda")
    assert per_accumulating == 16 * params and accumulating < fp32  # fp32 gradients kept between calls
    assert experts_that_fit(big, "fp32", False, 1, 2**20, 16384, "cuda")[0] == 1  # at least one, whatever the budget


def test_join_serves_a_plain_hivemind_client(coordinator, spawn, client, tmp_path):
    _, address = coordinator
    host = spawn(
        "host", "join", "--run", address, "--experts", "ffn.0.[0:2]", *LOOPBACK, "--status_every", "1",
        "--identity_path", str(tmp_path / "host.key"), "--checkpoint_dir", str(tmp_path / "ckpt"),
    )
    assert host.wait_line("serving experts:") == "ffn.0.0,ffn.0.1"
    peer_id = host_id(host)
    assert client.servers()[peer_id] == ["ffn.0.0", "ffn.0.1"]

    remote = client.expert("ffn.0.1", peer_id)
    assert remote.info["forward_schema"][0][0].size == (None, MODEL.d_model)
    x = torch.randn(16, MODEL.d_model)
    with torch.no_grad():
        expected = build_expert(MODEL, "ffn.0.1")(x)
    assert torch.allclose(remote(x), expected, atol=1e-5)

    # backward trains the expert: the same input gives a different output afterwards
    x.requires_grad_(True)
    remote(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.norm() > 0
    assert not torch.allclose(remote(x.detach()), expected, atol=1e-5)

    # bad input: a clear error, and the expert is untouched and alive
    before = remote(x.detach())
    for bad, message in [
        (torch.randn(4, MODEL.d_model + 1), "shape"),
        (torch.randn(4, MODEL.d_model, dtype=torch.float64), "dtype"),
        (torch.full((4, MODEL.d_model), float("nan")), "NaN"),
    ]:
        with pytest.raises(Exception, match=message):
            remote(bad)
    with pytest.raises(Exception, match="does not serve"):
        client.expert("ffn.1.0", peer_id).info
    assert torch.equal(remote(x.detach()), before)

    # the volunteer sees what its host did: a status line with the calls served (5 calls above, at least)
    deadline = time.time() + 20
    while not any(re.match(r"status: 2 experts served ([5-9]|\d\d+) calls", line) for line in host.lines):
        assert time.time() < deadline, host.lines
        time.sleep(0.5)

    # a second volunteer with --experts auto picks experts nobody serves yet
    second = spawn(
        "second", "join", "--run", address, "--experts", "auto", "--num_experts", "2", *LOOPBACK,
        "--identity_path", str(tmp_path / "second.key"), "--checkpoint_dir", str(tmp_path / "ckpt2"),
    )
    picked = second.wait_line("serving experts:").split(",")
    assert not set(picked) & {"ffn.0.0", "ffn.0.1"}

    # a clean leave withdraws the declaration at once (not after the TTL)
    host.process.terminate()
    assert host.process.wait(30) == 0
    deadline = time.time() + 10
    while client.servers().get(peer_id) and time.time() < deadline:
        time.sleep(0.5)
    assert not client.servers().get(peer_id)


def test_checkpoint_restore_and_replica_bootstrap(coordinator, spawn, client, tmp_path):
    _, address = coordinator
    # a fixed port, as a volunteer would use: a restarted host then keeps the address its clients know
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["join", "--run", address, "--experts", "ffn.1.2", "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}",
            "--identity_path", str(tmp_path / "host.key"), "--checkpoint_dir", str(tmp_path / "ckpt")]
    host = spawn("host", *argv)
    host.wait_line("serving experts:")
    peer_id = host_id(host)
    remote = client.expert("ffn.1.2", peer_id)
    x = torch.randn(8, MODEL.d_model, requires_grad=True)
    for _ in range(3):
        remote(x).sum().backward()
    trained = remote(x.detach())
    assert not torch.allclose(trained, build_expert(MODEL, "ffn.1.2")(x.detach()), atol=1e-5)

    # a new replica on another host starts from the live parameters, not from the uid's init
    replica = spawn("replica", "join", "--run", address, "--experts", "ffn.1.2", *LOOPBACK,
                    "--identity_path", str(tmp_path / "replica.key"), "--checkpoint_dir", str(tmp_path / "ckpt-r"))
    replica.wait_line("serving experts:")
    assert "from the live replica" in replica.log_path.read_text()
    assert torch.allclose(client.expert("ffn.1.2", host_id(replica))(x.detach()), trained, atol=1e-6)

    # restart with the same identity: the checkpoint written on exit is restored
    host.process.terminate()
    assert host.process.wait(30) == 0
    assert (tmp_path / "ckpt" / "ffn.1.2.safetensors").exists()
    restarted = spawn("restarted", *argv)
    restarted.wait_line("serving experts:")
    assert re.search(r"ffn\.1\.2: starting from checkpoint", restarted.log_path.read_text())
    assert torch.allclose(client.expert("ffn.1.2", peer_id)(x.detach()), trained, atol=1e-6)
