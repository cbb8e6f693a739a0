"""State downloads (``load_state_from_peers``) are robust: a trainer that falls behind takes the median of several
peers' states, skips banned peers and refuses states that do not fit (athome.verification.downloads)."""
from __future__ import annotations

import logging
import math
import os
import signal
import time
import uuid
from functools import partial

import pytest
import torch
from hivemind.averaging import DecentralizedAverager

from athome.averaging import RobustTrainingStateAverager
from athome.dht import RobustDHT
from athome.verification.downloads import (
    DownloadedState,
    StateRejected,
    combine_states,
    relative_distance,
    state_problem,
)

SIZE = 64
HONEST = (1.0, 1.02)  # two honest trainers' parameters (close: they average every epoch)
ATTACKER = 1000.0  # x1000 the honest values
EPOCH = 5

# ---- the combination rule ---------------------------------------------------------------------------------------


def _state(source: str, value: float, epoch: int = EPOCH, extra: float = 0.0) -> DownloadedState:
    tensors = [torch.full((SIZE,), value), torch.full((3,), extra)]  # a parameter, then an optimizer statistic
    return DownloadedState(source, dict(epoch=epoch, optimizer_metadata=[]), tensors)


def _own(value: float):
    return [torch.full((SIZE,), value), torch.zeros(3)]


def test_median_of_three_ignores_one_attacker_whatever_its_epoch():
    states = [_state("attacker", ATTACKER, epoch=10**9, extra=1e9), _state("a", HONEST[0]), _state("b", HONEST[1])]
    metadata, tensors, how = combine_states(_own(0.5), states, num_parameters=1, fresh=True)
    assert torch.equal(tensors[0], torch.full((SIZE,), HONEST[1])) and float(tensors[1].max()) == 0.0
    assert metadata["epoch"] == EPOCH and "median" in how


def test_two_sources_agreeing_take_the_one_nearest_to_own_and_disagreeing_ones_need_own_state():
    _, tensors, _ = combine_states(_own(1.03), [_state("a", 1.0), _state("b", 1.02)], num_parameters=1, fresh=False)
    assert float(tensors[0][0]) == pytest.approx(1.02)
    pair = [_state("attacker", ATTACKER), _state("a", 1.0)]
    _, tensors, how = combine_states(_own(0.99), pair, num_parameters=1, fresh=False)
    assert float(tensors[0][0]) == 1.0 and how.startswith("a ")
    with pytest.raises(StateRejected, match="disagree"):  # nothing to tell them apart
        combine_states(_own(0.99), pair, num_parameters=1, fresh=True)


def test_single_source_must_be_near_own_state_unless_fresh(caplog):
    with pytest.raises(StateRejected, match="only source attacker"):
        combine_states(_own(1.0), [_state("attacker", ATTACKER)], num_parameters=1, fresh=False)
    _, tensors, _ = combine_states(_own(0.9), [_state("a", 1.0)], num_parameters=1, fresh=False)
    assert float(tensors[0][0]) == 1.0
    with caplog.at_level(logging.WARNING, logger="athome.verification.downloads"):
        _, tensors, _ = combine_states(_own(0.0), [_state("a", 1.0)], num_parameters=1, fresh=True)
    assert float(tensors[0][0]) == 1.0 and "ONE peer" in caplog.text
    with pytest.raises(StateRejected, match="no peer"):
        combine_states(_own(1.0), [], num_parameters=1, fresh=True)


@pytest.mark.parametrize("damage, expected", [
    (lambda s: s.tensors.pop(), "1 tensors, expected 2"),
    (lambda s: s.tensors.__setitem__(0, torch.zeros(SIZE + 1)), "tensor 0 is torch.float32 (65,)"),
    (lambda s: s.tensors.__setitem__(0, torch.zeros(SIZE, dtype=torch.float64)), "tensor 0 is torch.float64"),
    (lambda s: s.tensors[1].__setitem__(0, math.nan), "tensor 1 has non-finite"),
    (lambda s: s.tensors[0].__setitem__(5, math.inf), "tensor 0 has non-finite"),
    (lambda s: s.metadata.__setitem__("epoch", "5"), "epoch '5'"),
    (lambda s: s.metadata.pop("optimizer_metadata"), "no optimizer_metadata"),
])
def test_states_that_do_not_fit_are_named(damage, expected):
    state = _state("a", 1.0)
    assert state_problem(_own(1.0), state) is None
    damage(state)
    assert expected in state_problem(_own(1.0), state)


def test_relative_distance():
    assert relative_distance(_own(2.0), _own(1.0), _own(1.0)) == pytest.approx(1.0)
    assert relative_distance(_own(0.0), _own(0.0), _own(0.0)) == 0.0


# ---- real averagers on 127.0.0.1 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm():
    """Three trainers serving their state at epoch 5 (two honest, one x1000 attacker advertising the highest
    priority, as an attacker would), each with its own DHT node; yields (prefix, dhts, servers by name)."""
    first = RobustDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first] + [RobustDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                   initial_peers=first.get_visible_maddrs()) for _ in range(4)]
    prefix = f"download_{uuid.uuid4().hex[:8]}"
    servers = {}
    try:
        for name, value, dht in [("a", HONEST[0], dhts[0]), ("b", HONEST[1], dhts[1]), ("attacker", ATTACKER, dhts[2])]:
            server = _averager(RobustTrainingStateAverager, dht, prefix, value)
            server.local_epoch = EPOCH
            server.state_sharing_priority = EPOCH + (100 if name == "attacker" else 0)
            servers[name] = server
        yield prefix, dhts, servers
    finally:
        for server in servers.values():
            server.shutdown()
        for dht in dhts:
            dht.shutdown()


def _averager(kind, dht, prefix, value, **kwargs):
    parameter = torch.nn.Parameter(torch.full((SIZE,), value))
    return kind(dht=dht, prefix=prefix, params=[parameter], optimizer=partial(torch.optim.Adam, lr=0.1),
                request_timeout=1.0, start=True, **kwargs)


# hivemind's own download code on the same class (RPC names include the class name, so it keeps it)
_StockDownloads = type("RobustTrainingStateAverager", (RobustTrainingStateAverager,), dict(
    _load_state_from_peers=DecentralizedAverager._load_state_from_peers, _rpc_handlers=None, _stub_type=None))


def _load_state(averager, swarm, *others) -> None:
    """``averager.load_state_from_peers(timeout=30)``. Downloads in this file have waited their whole 30 s a few
    times in full-suite runs, never when the file ran alone: if it happens, every averager and DHT process of the
    swarm prints its threads' stacks (``SIGUSR1``, athome.dht.process.enable_stack_dumps) into the test's output."""
    _, dhts, servers = swarm
    started = time.monotonic()
    try:
        averager.load_state_from_peers(timeout=30)
    finally:
        if time.monotonic() - started > 25:
            for process in [averager, *others, *servers.values(), *dhts]:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGUSR1)
            time.sleep(2.0)  # let them print before the test fails
            logging.getLogger(__name__).error(f"load_state_from_peers took {time.monotonic() - started:.0f}s")


def _params(averager) -> torch.Tensor:
    return averager.main_parameters[0].detach().clone()


def _wait_declared(dht, prefix, count, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = dht.get(f"{prefix}.all_averagers", latest=True)
        declared = found.value if found is not None else {}
        if sum(isinstance(info.value, (int, float)) for info in declared.values()) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} peers declared their state")


@pytest.mark.timeout(120)
def test_lagging_trainer_downloads_the_honest_state_where_stock_hivemind_copies_the_attacker(swarm):
    prefix, dhts, servers = swarm
    _wait_declared(dhts[3], prefix, 3)
    stock = _averager(_StockDownloads, dhts[4], prefix, 1.01, allow_state_sharing=False)
    try:
        stock.local_epoch = 2
        _load_state(stock, swarm)
        assert float(_params(stock).max()) == ATTACKER  # hivemind: one peer, the highest priority, copied whole
    finally:
        stock.shutdown()

    lagging = _averager(RobustTrainingStateAverager, dhts[3], prefix, 1.01, allow_state_sharing=False)
    try:
        lagging.local_epoch = 2  # fell behind: it has its own (older) state
        _load_state(lagging, swarm)
        assert torch.equal(_params(lagging), torch.full((SIZE,), HONEST[1])), _params(lagging)  # median of 3
        assert lagging.local_epoch == EPOCH
        assert all(torch.isfinite(t).all() for t in lagging.optimizer.state[lagging.main_parameters[0]].values())

        lagging.ban_peers([str(servers["attacker"].peer_id)])  # banned: never a source again
        with torch.no_grad():
            lagging.main_parameters[0].fill_(1.03)
        lagging.local_epoch = 2
        _load_state(lagging, swarm)
        assert torch.equal(_params(lagging), torch.full((SIZE,), HONEST[1]))  # of the 2 honest, the nearer to 1.03
    finally:
        lagging.shutdown()


@pytest.mark.timeout(120)
def test_single_or_non_finite_sources_are_refused_and_own_state_kept(swarm):
    prefix, dhts, servers = swarm
    # DHT nodes of their own, not the spare ones the previous test's averagers used (see _load_state)
    own = [RobustDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dhts[0].get_visible_maddrs())
           for _ in range(2)]
    lagging = _averager(RobustTrainingStateAverager, own[0], prefix, 1.01, allow_state_sharing=False)
    fresh = _averager(RobustTrainingStateAverager, own[1], prefix, 0.0, allow_state_sharing=False)
    try:
        for name in ("a", "b"):
            servers[name].allow_state_sharing = False
        time.sleep(1.0)  # the declarations above are re-stored (as None) asynchronously
        lagging.local_epoch = 2
        _load_state(lagging, swarm, fresh, *own)  # the attacker alone: too far from the own state
        assert torch.equal(_params(lagging), torch.full((SIZE,), 1.01)) and lagging.local_epoch == 2

        servers["a"].allow_state_sharing = True
        with torch.no_grad():
            servers["attacker"].main_parameters[0][7] = math.nan  # a non-finite state is refused outright
        _wait_declared(own[0], prefix, 2)
        _load_state(lagging, swarm, fresh, *own)
        assert torch.equal(_params(lagging), torch.full((SIZE,), HONEST[0])) and lagging.local_epoch == EPOCH

        _load_state(fresh, swarm, lagging, *own)  # no state of its own: it trusts the one usable source (warned)
        assert torch.equal(_params(fresh), torch.full((SIZE,), HONEST[0])) and fresh.local_epoch == EPOCH
    finally:
        with torch.no_grad():
            servers["attacker"].main_parameters[0].fill_(ATTACKER)
        for name in ("a", "b"):
            servers[name].allow_state_sharing = True
        lagging.shutdown()
        fresh.shutdown()
        for node in own:
            node.shutdown()
