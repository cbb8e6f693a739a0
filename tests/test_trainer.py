"""The trainer on a real swarm: the loss falls, a host killed mid-run does not stop it; `peer demo` end to end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import LOOPBACK

ALL_EXPERTS = "ffn.[0:2].[0:4]"


def _losses(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_loss_falls_and_a_killed_host_does_not_stop_training(coordinator, spawn, tmp_path):
    _, address = coordinator
    hosts = []
    for name in ("host-a", "host-b"):  # both serve every expert: replication 2
        host = spawn(name, "join", "--run", address, "--experts", ALL_EXPERTS, *LOOPBACK,
                     "--identity_path", str(tmp_path / f"{name}.key"), "--checkpoint_dir", str(tmp_path / name))
        host.wait_line("serving experts:")
        hosts.append(host)
    log = tmp_path / "trainer.jsonl"
    trainer = spawn("trainer", "train", "--run", address, *LOOPBACK, "--max_steps", "40", "--no_progress",
                    "--identity_path", str(tmp_path / "trainer.key"), "--log_file", str(log))

    deadline = time.time() + 180
    while len(_losses(log)) < 10 and time.time() < deadline and trainer.alive:
        time.sleep(0.5)
    assert len(_losses(log)) >= 10, trainer.log_path.read_text()[-3000:]
    victim = hosts[0].process
    os.killpg(victim.pid, signal.SIGKILL)  # the host, its DHT fork and its p2pd, all at once
    victim.wait()

    assert trainer.process.wait(240) == 0, trainer.log_path.read_text()[-3000:]
    rows = _losses(log)
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.85 * first, (first, last)


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    config = tmp_path / "run.toml"
    config.write_text('name = "demo-test"\nbatch_size = 8\n')  # published by the coordinator, used by the trainer
    result = subprocess.run(
        [sys.executable, "-m", "athome.cli", "demo", "--steps", "12", "--expert_hosts", "2", "--trainers", "1",
         "--out", str(out), "--config", str(config)],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _losses(out / "trainer-0.jsonl")[0]["samples"] == 8
    line = next(l for l in result.stdout.splitlines() if l.startswith("loss:"))
    first, last = (float(v) for v in line.split(":")[1].split("->"))
    assert last < first
    assert (out / "loss.png").stat().st_size > 1000
    # nothing the demo started is left: no process mentions the demo's folder
    leftovers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(out).encode() in (entry / "cmdline").read_bytes():
                    leftovers.append(entry.name)
            except OSError:
                pass
    assert leftovers == []


def test_demo_refuses_a_bad_config_before_starting_anything(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[averaging]\ncompression = "int4"\n')
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "athome.cli", "demo", "--out", str(out), "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "averaging.compression = 'int4'" in result.stderr and "--config" in result.stderr
    assert not out.exists()
