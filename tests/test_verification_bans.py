"""Bans reach the averagers: a peer banned by the coordinator gets weight 0 in honest peers' rounds (real hivemind
DHTs and averager processes on 127.0.0.1; fixtures from test_averaging)."""
from __future__ import annotations

import pytest
import torch
from test_averaging import _flat, _random_sets, _step_all, _tensors, dhts, make_averagers  # noqa: F401 (fixtures)


@pytest.mark.timeout(150)
def test_banned_peer_gets_weight_zero_and_reduces_nothing(make_averagers, dhts):  # noqa: F811
    honest = _random_sets(2, seed=21)
    poison = [[-1000 * t for t in honest[0]]]
    banned_id = str(dhts[2].peer_id)
    # plain mean: without the ban, the poison would dominate every element
    averagers = make_averagers(honest + poison, reducer="mean")
    for averager in averagers[:2]:
        averager.ban_peers([banned_id])  # after start: sent to the averager process
    # the banned peer tries once (its round cannot complete: nobody reduces its parts), honest peers complete;
    # refused at every door, it would wait out its whole step timeout, hence a shorter one
    results = _step_all(averagers, step_kwargs=[{}, {}, {"allow_retries": False, "timeout": 10}], timeout=60)
    expected = _flat([torch.stack(ts).mean(0) for ts in zip(*honest)])
    for averager, result in zip(averagers[:2], results[:2]):
        assert isinstance(result, dict), result
        assert torch.allclose(_flat(_tensors(averager)), expected, atol=1e-5)
        report = averager.last_round
        # refused at the door (rpc_join_group) or, if it led the group, in it with its parts ignored
        assert report.ok and (banned_id not in report.peers or banned_id in report.excluded_senders), report


@pytest.mark.timeout(120)
def test_peer_never_follows_a_banned_leader(make_averagers, dhts):  # noqa: F811
    """hivemind's matchmaking makes the peer whose search began first the leader (a follower asks only peers that
    declared earlier), so the banned peer, started first, would lead the honest one. The honest peer keeps out of its
    group: its step fails with its tensors unchanged, instead of "succeeding" as the group's only contributor."""
    import threading
    import time

    honest, poison = _random_sets(1, seed=8)[0], [-1000 * t for t in _random_sets(1, seed=8)[0]]
    averager, banned = make_averagers([honest, poison], reducer="mean")
    averager.ban_peers([str(dhts[1].peer_id)])
    results = {}

    def step(name, target):
        try:
            results[name] = target.step(timeout=8, allow_retries=False)
        except BaseException as e:  # noqa: B902 - asserted below
            results[name] = e

    leader = threading.Thread(target=step, args=("banned", banned))
    leader.start()
    time.sleep(1.0)  # the banned peer declares first: it is the leader the honest peer's matchmaking offers
    step("honest", averager)
    leader.join()
    assert isinstance(results["honest"], Exception), results["honest"]
    assert torch.equal(_flat(_tensors(averager)), _flat(honest))
    assert not any(str(dhts[1].peer_id) in report.peers for report in averager.round_history())


@pytest.mark.timeout(120)
def test_banned_peer_is_refused_when_it_asks_to_join_a_group(make_averagers, dhts):  # noqa: F811
    """A leader answers a banned peer's join request with PROTOCOL_VIOLATION; another peer's request reaches
    hivemind's own checks (this leader is not looking for a group: NOT_LOOKING_FOR_GROUP)."""
    import asyncio
    import time

    from hivemind.averaging.averager import compute_schema_hash
    from hivemind.proto import averaging_pb2
    from hivemind.utils.timed_storage import get_dht_time

    from athome.averaging import RobustAverager

    (leader,) = make_averagers(_random_sets(1, seed=3))
    banned, other = dhts[2], dhts[3]

    async def ask(dht) -> int:
        p2p = await dht.replicate_p2p()
        stub = RobustAverager.get_stub(p2p, leader.peer_id, namespace=leader.prefix)
        with leader.get_tensors() as tensors:
            schema_hash = compute_schema_hash(tensors)
        request = averaging_pb2.JoinRequest(schema_hash=schema_hash, expiration=get_dht_time() + 5, gather=b"")
        stream = await stub.rpc_join_group(request)
        async for message in stream:
            return message.code

    def code(dht) -> int:
        return asyncio.run(ask(dht))

    assert code(banned) == averaging_pb2.NOT_LOOKING_FOR_GROUP  # not banned yet: hivemind's usual answer
    leader.ban_peers([str(banned.peer_id)])
    deadline = time.monotonic() + 10
    while code(banned) != averaging_pb2.PROTOCOL_VIOLATION:  # the ban reaches the averager process over its pipe
        assert time.monotonic() < deadline, "the banned peer was never refused"
        time.sleep(0.2)
    assert code(other) == averaging_pb2.NOT_LOOKING_FOR_GROUP


def test_trainer_clips_only_aggregates_that_no_honest_group_can_produce():
    """Honest contributions are clipped to grad_clip, so their mean is too: it passes unchanged; a poisoned one
    (x-1000 through a group without honest majority) is cut to grad_clip before it reaches AdamW's statistics."""
    from athome.trainer.train import AggregateClippedAdamW

    generator = torch.Generator().manual_seed(5)
    contributions = [torch.randn(100, generator=generator) for _ in range(3)]
    contributions = [c / c.norm() * 0.9 for c in contributions]  # each clipped to grad_clip 1.0 by its trainer
    param = torch.nn.Parameter(torch.zeros(100))
    optimizer = AggregateClippedAdamW([param], max_norm=1.0, lr=1e-3)
    honest_mean = torch.stack(contributions).mean(0)
    param.grad = honest_mean.clone()
    optimizer.step()
    assert torch.equal(param.grad, honest_mean) and optimizer.clipped == 0
    param.grad = (contributions[0] - 1000 * contributions[1]) / 2  # a group of two: the mean is the attacker's
    optimizer.step()
    assert abs(float(param.grad.norm()) - 1.0) < 1e-5 and optimizer.clipped == 1
    assert float(optimizer.state[param]["exp_avg_sq"].max()) < 1e-2  # second moment of honest size, not x1e5
