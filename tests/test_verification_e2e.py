"""Verification on real processes: a coordinator, an expert host and two trainers over a real DHT on 127.0.0.1.

One trainer runs the testing-only sign-flip attack (``peer train --attack sign_flip``). The coordinator recomputes
its committed steps from the bundles it fetches over p2p, bans it with a signed record, and its ledger revokes the
attacker's credit; the host refuses its requests; honest trainers follow the ban (its averaging parts get weight 0)
and keep training, their loss falling (slow variant).
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import LOOPBACK

from athome.dht.identity import Identity

ALL_EXPERTS = "ffn.[0:2].[0:4]"
BAN_TIMEOUT = 240.0  # seconds from the attacker's start; the first checked step fails, typically within ~30 s


def _rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
    return rows


def _leaderboard(dashboard: str) -> list[dict]:
    with urllib.request.urlopen(dashboard.rstrip("/") + "/api/leaderboard", timeout=10) as response:
        return json.loads(response.read())["rows"]


def _refusal(argv: list[str], capsys) -> str:
    """Run ``peer <argv>``'s handler in this process; it must exit with code 1 before starting anything."""
    from athome.cli import build_parser
    from athome.peer.join import run_join
    from athome.trainer.train import run_train

    args = build_parser().parse_args(argv)
    with pytest.raises(SystemExit) as exit_info:
        (run_join if argv[0] == "join" else run_train)(args)
    assert exit_info.value.code == 1
    return capsys.readouterr().err


def test_attack_flag_is_refused_without_the_testing_switch(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ATHOME_ALLOW_ATTACKS", raising=False)
    fake_run = "/ip4/127.0.0.1/tcp/9/p2p/" + Identity.load_or_create(tmp_path / "c.key").peer_id
    refused = _refusal(["train", "--run", fake_run, "--attack", "sign_flip"], capsys)
    assert "ATHOME_ALLOW_ATTACKS=1" in refused and "testing only" in refused
    monkeypatch.setenv("ATHOME_ALLOW_ATTACKS", "1")
    assert "peer join --attack" in _refusal(["train", "--run", fake_run, "--attack", "wrong_outputs"], capsys)
    assert "unknown attack 'bogus'" in _refusal(["join", "--run", fake_run, "--attack", "bogus"], capsys)


def _swarm_with_an_attacker(coordinator, spawn, tmp_path, monkeypatch, honest_names, steps):
    """Coordinator, one host serving every expert, honest trainers (``steps`` each) and a sign-flip attacker.
    Returns (dashboard, honest children, attacker id, attacker's leaderboard row once banned, honest logs)."""
    coordinator_child, address = coordinator
    dashboard = coordinator_child.wait_line("dashboard:")
    host = spawn("host", "join", "--run", address, "--experts", ALL_EXPERTS, *LOOPBACK,
                 "--identity_path", str(tmp_path / "host.key"), "--checkpoint_dir", str(tmp_path / "host"))
    host.wait_line("serving experts:")
    honest, logs = [], []
    for name in honest_names:
        logs.append(tmp_path / f"{name}.jsonl")
        honest.append(spawn(name, "train", "--run", address, *LOOPBACK, "--max_steps", str(steps), "--no_progress",
                            "--identity_path", str(tmp_path / f"{name}.key"), "--public_name", name,
                            "--log_file", str(logs[-1])))
    attacker_id = Identity.load_or_create(tmp_path / "attacker.key").peer_id
    monkeypatch.setenv("ATHOME_ALLOW_ATTACKS", "1")
    spawn("attacker", "train", "--run", address, *LOOPBACK, "--max_minutes", "10", "--no_progress",
          "--identity_path", str(tmp_path / "attacker.key"), "--public_name", "attacker",
          "--log_file", str(tmp_path / "attacker.jsonl"), "--attack", "sign_flip")
    started = time.time()
    banned_row = None
    while time.time() - started < BAN_TIMEOUT and banned_row is None:
        time.sleep(2)
        assert coordinator_child.alive and all(h.alive for h in honest), honest[0].log_path.read_text()[-3000:]
        try:
            banned_row = next((row for row in _leaderboard(dashboard)
                               if row["peer_id"] == attacker_id and row["status"] == "banned"), None)
        except OSError:
            continue
    assert banned_row is not None, coordinator_child.log_path.read_text()[-4000:]
    return dashboard, honest, attacker_id, banned_row, logs


@pytest.mark.timeout(400)
def test_sign_flip_trainer_is_banned_its_credit_revoked_and_its_requests_refused(coordinator, spawn, tmp_path,
                                                                                  monkeypatch):
    """The lean variant (no honest trainer): the attacker is a newcomer, so its first committed steps are checked."""
    dashboard, _, attacker_id, banned_row, _ = _swarm_with_an_attacker(coordinator, spawn, tmp_path, monkeypatch,
                                                                         [], steps=0)
    assert banned_row["samples"] == 0 and banned_row["checks_failed"] >= 1
    assert banned_row["banned_reason"].startswith("gradient"), banned_row  # x-1000: the contribution differs
    attacker_log = tmp_path / "attacker.log"
    deadline = time.time() + 60
    # the host's refusal and the attacker's own ban notice come from two pollers (5 s each): wait for both
    while time.time() < deadline and not all(phrase in attacker_log.read_text()
                                              for phrase in ("BannedCaller", "THIS TRAINER IS BANNED")):
        time.sleep(1)
    text = attacker_log.read_text()  # (rich wraps long log lines: look for short phrases)
    assert "THIS TRAINER IS BANNED" in text, text[-3000:]
    assert "BannedCaller" in text, text[-3000:]  # the host refuses its requests


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_with_a_sign_flip_attacker_the_honest_trainers_loss_falls(coordinator, spawn, tmp_path, monkeypatch):
    """Two honest trainers + the attacker: CenteredClip bounds its pull until the ban (with one honest trainer no
    robust aggregator can: a single x-1000 epoch inflates Adam's second moment and stalls learning for long)."""
    dashboard, honest, attacker_id, banned_row, logs = _swarm_with_an_attacker(
        coordinator, spawn, tmp_path, monkeypatch, ["honest-a", "honest-b"], steps=60)
    for child, log in zip(honest, logs):
        assert child.process.wait(400) == 0, child.log_path.read_text()[-3000:]
        rows = _rows(log)
        first = sum(r["loss"] for r in rows[:5]) / 5
        last = sum(r["loss"] for r in rows[-5:]) / 5
        assert last < 0.9 * first, (child.name, first, last)
    rows = {row["public_name"]: row for row in _leaderboard(dashboard)}
    assert rows["attacker"]["status"] == "banned" and rows["attacker"]["samples"] == 0
    assert banned_row["banned_reason"].startswith("gradient"), banned_row
    for name, child in zip(("honest-a", "honest-b"), honest):
        assert rows[name]["status"] != "banned" and rows[name]["checks_failed"] == 0, rows
        assert rows[name]["checks_passed"] >= 1, rows
        assert f"Peer {attacker_id} banned by the coordinator" in child.log_path.read_text()
