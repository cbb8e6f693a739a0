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
    # the banned peer tries once (its round cannot complete: nobody reduces its parts), honest peers complete
    results = _step_all(averagers, step_kwargs=[{}, {}, {"allow_retries": False}], timeout=60)
    expected = _flat([torch.stack(ts).mean(0) for ts in zip(*honest)])
    for averager, result in zip(averagers[:2], results[:2]):
        assert isinstance(result, dict), result
        assert torch.allclose(_flat(_tensors(averager)), expected, atol=1e-5)
        report = averager.last_round
        assert report.ok and banned_id in report.peers  # it was in the group, and ignored
