"""Shared fixtures: real ``peer`` processes on 127.0.0.1, each in its own session so teardown leaves nothing."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable, List

import pytest

from athome.demo import Child

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
    """Start ``peer <argv>`` as a subprocess; every one started is killed (whole session) at teardown."""
    children: List[Child] = []
    never = threading.Event()

    def start(name: str, *argv: str) -> Child:
        child = Child(name, list(argv), tmp_path / f"{name}.log")
        child.start()
        child.wait_line = lambda prefix, timeout=120: child.wait_for(prefix, timeout, never)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.alive:
            child.process.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.process.wait(15)
        except Exception:
            pass
        child.kill_group()


@pytest.fixture
def coordinator(spawn, tmp_path: Path):
    """A running ``peer coordinator`` on loopback; yields (child, run address)."""
    child = spawn(
        "coordinator", "coordinator", *LOOPBACK, "--data_dir", str(tmp_path / "coord"),
        "--identity_path", str(tmp_path / "coordinator.key"), "--http_port", "0",
    )
    address = child.wait_line("run address:")
    return child, address
