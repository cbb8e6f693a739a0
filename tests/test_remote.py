"""The trainer's RemoteDispatcher and the host's direct expert path: grouping, chunking, fallback, numerics."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from athome.config import ModelConfig, OptimizerConfig, RunConfig
from athome.dht.schemas import run_key
from athome.model.expert import build_expert, expert_input_schema
from athome.model.moe import LocalDispatcher, MoELayer
from athome.peer.backend import ExpertBackend
from athome.peer.server import DirectExpertServicer, guard_backends
from athome.trainer.remote import HIVEMIND, ExpertRegistry, RemoteDispatcher, _Call, _chunks_under
from conftest import LOOPBACK

SMALL = ModelConfig(d_model=16, expert_hidden=32, n_heads=2, n_layers=1)


class FixedRegistry(ExpertRegistry):
    """Replica choice without a DHT: expert i -> ``peers[i]`` (None: no live replica)."""

    def __init__(self, uids, peers):
        super().__init__(dht=None, servers_key="unused")
        self.peer_of = dict(zip(uids, peers))

    def choose(self, uid):
        return self.peer_of[uid]


def test_plan_covers_every_answered_slot_once():
    uids = SMALL.expert_uids()
    dispatcher = RemoteDispatcher(uids, FixedRegistry(uids, ["a", "b", "a", None]), p2p=None)
    expert_index = torch.tensor([[0, 1], [2, 0], [3, 1], [1, 2], [0, 3]])
    calls = dispatcher.plan(expert_index)
    assert [c.uid for c in calls] == uids[:3] and [c.peer_id for c in calls] == ["a", "b", "a"]
    seen = set()
    for call in calls:
        assert torch.equal(call.tokens, call.tokens.sort().values)  # rows go out in token order
        for token, slot in zip(call.tokens.tolist(), call.slots.tolist()):
            assert uids[expert_index[token, slot]] == call.uid
            seen.add((token, slot))
    assert seen == {(t, s) for t in range(5) for s in range(2) if expert_index[t, s] != 3}


def test_chunks_respect_the_payload_limit():
    def tensors(nbytes):
        return [runtime_pb2.Tensor(buffer=b"x" * nbytes)]

    sizes = [40, 40, 30, 100, 10]
    assert _chunks_under([tensors(n) for n in sizes], 100) == [[0, 1], [2], [3], [4]]


def make_backends(uids):
    return {
        uid: ExpertBackend(uid, build_expert(SMALL, uid), optimizer_config=OptimizerConfig(),
                           args_schema=expert_input_schema(SMALL), max_batch_size=64)
        for uid in uids
    }


def direct_request(uids, tensors_per_uid, compression=runtime_pb2.CompressionType.NONE):
    return runtime_pb2.ExpertRequest(
        tensors=[serialize_torch_tensor(t, compression) for ts in tensors_per_uid for t in ts],
        metadata=MSGPackSerializer.dumps(dict(uids=uids, counts=[len(ts) for ts in tensors_per_uid],
                                              compression=compression)),
    )


def unpack(response):
    from hivemind.compression import deserialize_torch_tensor

    meta = MSGPackSerializer.loads(response.metadata)
    out, start = [], 0
    for count, error in zip(meta["counts"], meta["errors"]):
        out.append(error if error is not None else [deserialize_torch_tensor(t) for t in response.tensors[start:start + count]])
        start += count
    return out


def test_direct_servicer_matches_the_backend_and_isolates_bad_experts():
    uids = SMALL.expert_uids()[:2]
    served, reference = make_backends(uids), make_backends(uids)
    servicer = DirectExpertServicer(served, guard_backends(served), max_batch_size=64)
    x = torch.randn(5, SMALL.d_model)
    grad = torch.randn(5, SMALL.d_model)

    outputs = unpack(servicer._serve(direct_request(uids, [[x], [x * 2]]), forward=True))
    assert torch.allclose(outputs[0][0], reference[uids[0]].forward(x)[0], atol=1e-6)
    assert torch.allclose(outputs[1][0], reference[uids[1]].forward(x * 2)[0], atol=1e-6)

    grads = unpack(servicer._serve(direct_request(uids, [[x, grad], [x, grad]]), forward=False))
    for uid, result in zip(uids, grads):
        assert torch.allclose(result[0], reference[uid].backward(x, grad)[0], atol=1e-6)
        assert served[uid].num_updates == 1

    # a NaN for one expert and an unknown uid fail those entries alone; the hivemind path is guarded but works
    bad = torch.full((2, SMALL.d_model), float("nan"))
    results = unpack(servicer._serve(direct_request([uids[0], "ffn.9.9", uids[1]], [[bad], [x], [x]]), forward=True))
    assert "NaN" in results[0] and "does not serve" in results[1]
    assert torch.allclose(results[2][0], reference[uids[1]].forward(x)[0], atol=1e-6)
    assert torch.allclose(served[uids[1]].forward_pool.process_func(x)[0], results[2][0])


def test_a_host_without_the_direct_protocol_falls_back_to_hivemind(monkeypatch):
    uids = SMALL.expert_uids()
    registry = FixedRegistry(uids, ["old"] * 4)
    dispatcher = RemoteDispatcher(uids, registry, p2p=None)
    direct_calls = []

    async def no_direct(peer_id, calls, tensors, forward):
        direct_calls.append(peer_id)
        raise P2PDaemonError("failed to negotiate protocol: protocols not supported: [DirectExpertServicer.rpc_forward]")

    async def hivemind(peer_id, call, tensors, forward):
        return [tensors[0] * 2]

    monkeypatch.setattr(dispatcher, "_call_direct", no_direct)
    monkeypatch.setattr(dispatcher, "_call_hivemind", hivemind)
    calls = [_Call(uid, "old", torch.arange(2), torch.zeros(2, dtype=torch.long)) for uid in uids[:2]]
    x = torch.ones(2, SMALL.d_model)
    for _ in range(2):
        results = dispatcher.run_hosts(calls, [[x], [x]], forward=True)
        assert all(torch.equal(r[0], x * 2) for r in results)
    assert direct_calls == ["old"] and registry.stats("old").protocol == HIVEMIND


@contextmanager
def serving_host(coordinator, spawn, tmp_path, *flags: str):
    """A live ``peer join`` serving ffn.0.[0:4] (with ``flags``), and a client DHT on its run: yields
    (dht, p2p, refreshed registry); the client is closed after."""
    from athome.dht import Identity, start_dht

    _, address = coordinator
    host = spawn("host", "join", "--run", address, "--experts", "ffn.0.[0:4]", *flags, *LOOPBACK,
                 "--identity_path", str(tmp_path / "host.key"), "--checkpoint_dir", str(tmp_path / "ckpt"))
    host.wait_line("serving experts:")
    dht = start_dht(Identity.load_or_create(tempfile.mkdtemp() + "/t.key"), run_name="demo", client_mode=True,
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[address])
    p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
    try:
        registry = ExpertRegistry(dht, run_key("demo", "servers"))
        registry.refresh(force=True)
        yield dht, p2p, registry
    finally:
        RemoteExpertWorker.run_coroutine(_close(p2p))  # on its own loop: P2P.__del__ elsewhere raises
        dht.shutdown()


def test_remote_layer_matches_local_on_a_real_host(coordinator, spawn, tmp_path):
    """Outputs and input gradients through a live host equal the in-process MoE (first step, same weights)."""
    from athome.dht import Identity

    model = RunConfig().model
    with serving_host(coordinator, spawn, tmp_path) as (_, p2p, registry):
        uids = model.expert_uids()[: model.experts_per_layer]
        layers = {}
        for name, dispatcher in [
            ("local", LocalDispatcher([build_expert(model, uid) for uid in uids])),
            ("remote", RemoteDispatcher(uids, registry, p2p, wire_compression=runtime_pb2.CompressionType.NONE)),
            ("fp16", RemoteDispatcher(uids, registry, p2p)),  # the default: mean-std scaled fp16 on the wire
        ]:
            torch.manual_seed(0)
            layers[name] = MoELayer(model.d_model, model.experts_per_layer, model.top_k, dispatcher)
        x = torch.randn(32, model.d_model)
        outputs = {name: layer(x) for name, layer in layers.items() if name != "remote"}
        error = (outputs["fp16"] - outputs["local"]).norm() / outputs["local"].norm()
        assert 0 < error < 2e-3, error
        assert layers["fp16"].dispatcher.last_answered_fraction == 1.0

        grads = {}
        for name in ("local", "remote"):
            inputs = x.clone().requires_grad_(True)
            out = layers[name](inputs)
            outputs[name] = out.detach()
            out.pow(2).sum().backward()
            grads[name] = inputs.grad
        assert torch.allclose(outputs["remote"], outputs["local"], atol=1e-5)
        assert torch.allclose(grads["remote"], grads["local"], atol=1e-5)
        host_id = Identity.load_or_create(tmp_path / "host.key").peer_id
        assert registry.stats(host_id).protocol == "athome"
        with torch.no_grad():  # the backward trained the host's experts
            assert not torch.allclose(layers["remote"](x), outputs["remote"], atol=1e-5)


async def _close(p2p) -> None:
    import asyncio

    await p2p.shutdown()
    await asyncio.sleep(0.1)  # let the cancelled reader/writer tasks finish
