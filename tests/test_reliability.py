"""Reliability scenarios (issue #8) as tests: real swarms hurt on purpose; see athome.testing.scenarios.

The short ones run by default; the long ones are ``slow`` (``python -m pytest -m slow tests/test_reliability.py``)
and all of them run in ``bench/reliability.py``, which prints their figures.
"""
from __future__ import annotations

import pytest

from athome.testing import scenarios


def _held(outcome: scenarios.Outcome) -> None:
    print(outcome.line())
    assert outcome.held, outcome.line()


def test_bad_input_gets_clear_errors_and_loses_nothing(tmp_path):
    _held(scenarios.bad_input_scenario(tmp_path))


def test_ctrl_c_to_join_and_train_leaves_no_process(tmp_path):
    _held(scenarios.shutdown_scenario(tmp_path, plan=scenarios.QUICK_SHUTDOWN_PLAN))


@pytest.mark.slow
def test_every_signal_to_every_command_leaves_no_process(tmp_path):
    """SIGKILL of join and train, SIGTERM of the coordinator, Ctrl+C and SIGKILL of the demo."""
    _held(scenarios.shutdown_scenario(tmp_path, plan=[p for p in scenarios.FULL_SHUTDOWN_PLAN
                                                      if p not in scenarios.QUICK_SHUTDOWN_PLAN]))


@pytest.mark.slow
def test_churn_a_third_of_the_hosts_killed_and_restarted(tmp_path):
    _held(scenarios.churn_scenario(tmp_path))


@pytest.mark.slow
def test_training_survives_coordinator_death_and_restart(tmp_path):
    _held(scenarios.coordinator_death_scenario(tmp_path))


def test_eight_clients_on_one_host(tmp_path):  # ~30 s; not `slow`: there it went stale unnoticed
    _held(scenarios.load_scenario(tmp_path))


@pytest.mark.slow
def test_training_goes_on_over_a_slow_lossy_link(tmp_path):
    from athome.testing import netlab

    ok, why = netlab.available()
    if not ok:
        pytest.skip(why)
    _held(scenarios.network_scenario(tmp_path))


def test_process_tree_sees_descendants_in_other_sessions():
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "start_new_session=True); time.sleep(60)")])
    try:
        deadline = time.time() + 30
        while len(scenarios.process_tree(parent.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        tree = scenarios.process_tree(parent.pid)
        assert len(tree) == 2 and parent.pid in tree
    finally:
        scenarios.kill_tree(tree)
        parent.wait()
    assert scenarios.wait_gone(tree, 10)[0] == []


def test_delay_relay_adds_latency_and_keeps_bytes():
    import asyncio
    import os
    import time

    from athome.testing.delay_relay import serve

    async def scenario():
        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[:2]
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        listen = probe.sockets[0].getsockname()[:2]
        probe.close()
        await probe.wait_closed()
        ready = asyncio.Event()
        relay = asyncio.create_task(serve([(listen, target)], 0.05, ready))
        await ready.wait()
        reader, writer = await asyncio.open_connection(*listen)
        started = time.monotonic()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        rtt = time.monotonic() - started
        payload = os.urandom(2**20)
        writer.write(payload)
        echoed = await reader.readexactly(len(payload))
        writer.close()
        relay.cancel()
        server.close()
        return rtt, echoed == payload

    rtt, intact = asyncio.run(scenario())
    assert rtt >= 0.1  # 50 ms each way
    assert intact


def test_direct_servicer_refuses_past_its_queue_limit():
    """Backpressure: with more than max_queue_seconds of work queued, a request is refused at once (HostBusy)."""
    import asyncio
    import time

    from athome.peer.server import DirectExpertServicer, HostBusy

    servicer = DirectExpertServicer({}, {}, max_batch_size=16, max_queue_seconds=0.5)
    servicer._serve = lambda request, forward: time.sleep(0.3) or "answer"  # 0.3 s of work per request

    async def burst():
        return await asyncio.gather(*(servicer._queue(None, True) for _ in range(6)), return_exceptions=True)

    servicer._service_seconds = 0.3
    results = asyncio.run(burst())
    answered = [r for r in results if r == "answer"]
    refused = [r for r in results if isinstance(r, HostBusy)]
    assert len(answered) + len(refused) == 6 and refused and len(answered) >= 2
    assert "host busy" in str(refused[0]) and "another replica" in str(refused[0])
    assert servicer._queued == 0
    servicer.shutdown()
