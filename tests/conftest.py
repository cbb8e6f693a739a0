"""Shared fixtures: real ``peer`` processes on 127.0.0.1, each in its own session so teardown leaves nothing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List

# The suite's exact-match assertions are CPU fp32 numerics, and its peers pick CUDA when they see it: on a GPU machine
# it hides the GPU from itself and every peer it starts (torch reads this at its first CUDA call). The CUDA tests
# (tests/test_cuda.py, the [cuda] cases elsewhere) need it visible: ATHOME_TEST_CUDA=1 python -m pytest -q tests -k cuda
if os.environ.get("ATHOME_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import hypothesis  # noqa: F401  (see below)
import pytest

from athome.demo import Child
from athome.testing.scenarios import Swarm

# hypothesis is imported above, at start-up, on purpose: otherwise its pytest plugin imports it at the end of a
# session that used none of it, pytest's assertion rewriter parses it then, and CPython 3.11.7's ast.parse raises
# "SystemError: AST constructor recursion depth mismatch" there, turning a green run's exit code into 1.
LOOPBACK = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0"]


def session_alive(sid: int) -> List[int]:
    """PIDs of live processes whose session id is ``sid`` (a child's whole tree: DHT fork, p2pd, handlers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def spawn(tmp_path: Path) -> Callable[..., Child]:
    """Start ``peer <argv>`` as a subprocess; every one started is stopped (whole process tree) at teardown."""
    swarm = Swarm(tmp_path)
    yield swarm.spawn
    swarm.close()


@pytest.fixture
def coordinator(spawn, tmp_path: Path):
    """A running ``peer coordinator`` on loopback (the built-in run, without host audits: their training probes
    move experts' weights, which tests comparing weights exactly must not see; audits are tested in-process in
    test_verification.py); yields (child, run address)."""
    config = tmp_path / "run.toml"
    config.write_text("[verification]\naudit_period = 0\n")
    child = spawn(
        "coordinator", "coordinator", *LOOPBACK, "--data_dir", str(tmp_path / "coord"), "--config", str(config),
        "--identity_path", str(tmp_path / "coordinator.key"), "--http_port", "0",
    )
    address = child.wait_line("run address:")
    return child, address
