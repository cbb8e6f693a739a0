"""``peer demo``: a whole swarm on 127.0.0.1 — coordinator, expert hosts and trainers as separate processes.

Every process is a real ``peer`` command (the same a volunteer runs), in its own session so that its forked DHT
process and p2pd can be cleaned up with it. The demo stops when the trainers' budget runs out or on Ctrl+C,
then prints ``loss: FIRST -> LAST``, the leaderboard, and writes ``loss.png``. ``--config run.toml`` runs that run
config instead of the built-in one (the coordinator publishes it, as ``peer coordinator --config`` would): a run
organizer's dry run on one machine.

``--attack KIND`` (testing only, ``ATHOME_ALLOW_ATTACKS=1``) adds one malicious peer: a trainer (``peer train
--attack``) or, for host kinds or ``--attacker host``, an expert host serving every expert (``peer join --attack``).
The demo prints when the coordinator caught and banned it, and the honest trainers' loss.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from rich.live import Live
from rich.table import Table

from athome.config import ConfigError, load_config
from athome.lifecycle import PARENT_PID_ENV, die, emit, shutdown_requested, stderr_console

logger = logging.getLogger(__name__)
DEFAULT_TRAIN_MINUTES = 1.5
STARTUP_TIMEOUT = 120.0
ATTACK_CHECK_RATE = 0.5  # with --attack: trusted trainers' steps the coordinator checks (runs default to 5%)


@dataclass
class Child:
    """One ``peer`` subprocess of the demo, its log file, and the key lines it printed on stdout."""

    name: str
    argv: List[str]
    log_path: Path
    process: Optional[subprocess.Popen] = None
    lines: List[str] = field(default_factory=list)
    got_line: threading.Event = field(default_factory=threading.Event)
    prefix: List[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NS]: run inside a namespace

    def start(self) -> None:
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "athome.cli", *self.argv],
            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_PID_ENV: str(os.getpid())}),  # die with the demo
        )
        threading.Thread(target=self._read_stdout, daemon=True, name=f"{self.name} stdout").start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self.got_line.set()

    def wait_for(self, prefix: str, timeout: float, stop: threading.Event) -> str:
        """The first stdout line starting with ``prefix``; raises if the child dies or times out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            for line in self.lines:
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}; see {self.log_path}")
            self.got_line.wait(0.2)
            self.got_line.clear()
        raise RuntimeError(f"{self.name} did not print '{prefix}' within {timeout:.0f}s; see {self.log_path}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """SIGTERM the ``peer`` process alone: it shuts its own DHT fork and p2pd down in order."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)

    def kill_group(self) -> None:
        """SIGKILL the child's whole session: its DHT fork and p2pd too."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def read_losses(path: Path) -> List[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return rows


def summarize_loss(curves: Dict[str, List[dict]], window: int = 5) -> Optional[tuple[float, float]]:
    """Mean loss over the first and last ``window`` steps of every trainer."""
    firsts, lasts = [], []
    for rows in curves.values():
        if len(rows) >= 2:
            firsts += [r["loss"] for r in rows[:window]]
            lasts += [r["loss"] for r in rows[-window:]]
    if not firsts:
        return None
    return sum(firsts) / len(firsts), sum(lasts) / len(lasts)


def plot_losses(curves: Dict[str, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, rows in curves.items():
        if rows:
            axis.plot([r["samples"] for r in rows], [r["loss"] for r in rows], label=name, linewidth=1)
    axis.set_xlabel("samples (per trainer)")
    axis.set_ylabel("loss (nats/byte)")
    axis.set_title("athome demo: swarm training loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def fetch_leaderboard(dashboard: Optional[str]) -> Optional[list]:
    if not dashboard:
        return None
    try:
        with urllib.request.urlopen(dashboard.rstrip("/") + "/api/leaderboard", timeout=5) as response:
            data = json.loads(response.read())
    except Exception as error:
        logger.warning(f"Could not read the leaderboard from {dashboard}: {error}")
        return None
    return data.get("rows", []) if isinstance(data, dict) else data


def status_table(children: List[Child], curves: Dict[str, List[dict]], started: float) -> Table:
    table = Table(title=f"athome demo — {time.monotonic() - started:.0f}s", expand=False)
    for column in ("process", "state", "progress"):
        table.add_column(column)
    for child in children:
        state = "[green]running[/]" if child.alive else (
            "[dim]not started[/]" if child.process is None else f"exited {child.process.returncode}"
        )
        rows = curves.get(child.name, [])
        if rows:
            progress = f"step {rows[-1]['step']}, loss {rows[-1]['loss']:.3f}, trainers {rows[-1].get('trainers', '?')}"
        else:
            progress = next((line for line in reversed(child.lines) if line), "")
        table.add_row(child.name, state, progress[:90])
    return table


def attacker_role(spec: str, attacker: Optional[str]) -> str:
    """The role ``--attack`` adds ("trainer" or "host"); dies with the fix on a bad spec or a missing switch."""
    from athome.verification.attacks import AttackSpec, AttacksDisabled, check_attack_flag

    try:
        role = attacker or ("host" if AttackSpec.parse(spec).on_host else "trainer")
        check_attack_flag(spec, role)
    except (ValueError, AttacksDisabled) as error:
        die(f"--attack: {error}")
    return role


class BanWatch:
    """Follows the attacker's leaderboard row on the dashboard; reports the moment it shows 'banned'."""

    def __init__(self, peer_id: str, started: float):
        self.peer_id, self.started = peer_id, started
        self.row: Optional[dict] = None
        self.seconds: Optional[float] = None
        self._last_poll = 0.0

    def poll(self, dashboard: Optional[str], attacker_steps: int) -> Optional[str]:
        """A line to print when the ban is first seen, else None (polls at most every 2 s)."""
        if self.row is not None or not dashboard or time.monotonic() - self._last_poll < 2.0:
            return None
        self._last_poll = time.monotonic()
        rows = fetch_leaderboard(dashboard) or []
        row = next((r for r in rows if r.get("peer_id") == self.peer_id and r.get("status") == "banned"), None)
        if row is None:
            return None
        self.row, self.seconds = row, time.monotonic() - self.started
        return (f"attacker caught and banned {self.seconds:.0f}s after it started (it had reported {attacker_steps} steps; "
                f"{row.get('checks_failed', '?')} failed check(s)): {row.get('banned_reason', '')}")


def run_demo(args: argparse.Namespace) -> None:
    config_path = getattr(args, "config", None)
    try:
        config = load_config(config_path)
    except ConfigError as error:
        die(f"{error} (fix it, or leave --config out to run the built-in demo run)")
    model = config.model
    logger.info(f"Run config: {config_path or 'the built-in demo run'} ({config.name}: {model.n_layers} layers x "
                f"{model.experts_per_layer} experts, batch {config.batch_size}); override with --config")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "keys").mkdir(exist_ok=True)
    for stale in out.glob("trainer-*.jsonl"):
        stale.unlink()
    if args.expert_hosts < 1 or args.trainers < 1:
        die("the demo needs at least one expert host and one trainer (--expert_hosts, --trainers)")
    attack = getattr(args, "attack", None)
    role = attacker_role(attack, getattr(args, "attacker", None)) if attack else None
    check_rate = getattr(args, "check_rate", None)
    if attack and check_rate is None:
        check_rate = ATTACK_CHECK_RATE
        logger.info(f"With --attack the coordinator checks {check_rate:.0%} of trusted trainers' steps (newcomers: "
                    f"every step), so the catch happens within the demo; override with --check_rate")
    grid = len(config.model.expert_uids())
    per_host = min(grid, math.ceil(grid * min(2, args.expert_hosts) / args.expert_hosts))  # replication 2 when possible
    budget = ["--max_steps", str(args.steps)] if args.steps else ["--max_minutes", str(args.minutes or DEFAULT_TRAIN_MINUTES)]
    net = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0"]
    stop = shutdown_requested()

    coordinator = Child(
        "coordinator",
        ["coordinator", *net, "--data_dir", str(out / "coordinator"), "--identity_path", str(out / "keys" / "coordinator.key"),
         "--http_port", str(args.http_port), *(["--check_rate", str(check_rate)] if check_rate is not None else []),
         *(["--config", str(Path(config_path).resolve())] if config_path else [])],
        out / "logs" / "coordinator.log",
    )
    children: List[Child] = [coordinator]
    hosts = [
        Child(
            f"host-{i}",
            ["join", "--run", "RUN", "--experts", "auto", "--num_experts", str(per_host), *net,
             "--identity_path", str(out / "keys" / f"host-{i}.key"), "--public_name", f"host-{i}",
             "--checkpoint_dir", str(out / "checkpoints" / f"host-{i}")],
            out / "logs" / f"host-{i}.log",
        )
        for i in range(args.expert_hosts)
    ]
    trainers = [
        Child(
            f"trainer-{i}",
            ["train", "--run", "RUN", *net, *budget, "--no_progress", "--identity_path", str(out / "keys" / f"trainer-{i}.key"),
             "--public_name", f"trainer-{i}", "--log_file", str(out / f"trainer-{i}.jsonl")],
            out / "logs" / f"trainer-{i}.log",
        )
        for i in range(args.trainers)
    ]
    attacker: Optional[Child] = None
    if attack:
        from athome.dht import Identity

        key = out / "keys" / "attacker.key"
        attacker_id = Identity.load_or_create(key).peer_id
        if role == "host":  # every expert, so that every host audit includes it
            all_experts = f"{model.expert_prefix}.[0:{model.n_layers}].[0:{model.experts_per_layer}]"
            argv = ["join", "--run", "RUN", "--experts", all_experts, *net, "--checkpoint_dir",
                    str(out / "checkpoints" / "attacker")]
        else:
            argv = ["train", "--run", "RUN", *net, *budget, "--no_progress", "--log_file", str(out / "attacker.jsonl")]
        attacker = Child("attacker", [*argv, "--identity_path", str(key), "--public_name", "attacker",
                                      "--attack", attack], out / "logs" / "attacker.log")
        (out / "attacker.jsonl").unlink(missing_ok=True)
        emit(f"attacker: {role} {attacker_id} running --attack {attack} (testing only)")
    children += hosts + trainers + ([attacker] if attacker else [])
    started = time.monotonic()
    ban_watch = BanWatch(attacker_id, started) if attacker else None
    curves: Dict[str, List[dict]] = {}
    dashboard = None
    try:
        with Live(status_table(children, curves, started), console=stderr_console, refresh_per_second=2) as live:
            coordinator.start()
            address = coordinator.wait_for("run address:", STARTUP_TIMEOUT, stop)
            try:  # printed right after the run address, unless the dashboard failed to start
                dashboard = coordinator.wait_for("dashboard:", 15, stop)
            except RuntimeError:
                dashboard = None
            live.console.print(f"run address: {address}" + (f"\ndashboard: {dashboard}" if dashboard else ""))
            for host in hosts:  # one at a time, so each `--experts auto` sees the previous hosts' choices
                host.argv[host.argv.index("RUN")] = address
                host.start()
                live.update(status_table(children, curves, started))
                host.wait_for("serving experts:", STARTUP_TIMEOUT, stop)
            if attacker is not None and role == "host":
                attacker.argv[attacker.argv.index("RUN")] = address
                attacker.start()
                attacker.wait_for("serving experts:", STARTUP_TIMEOUT, stop)
            for trainer in trainers + ([attacker] if attacker is not None and role == "trainer" else []):
                trainer.argv[trainer.argv.index("RUN")] = address
                trainer.start()
            if ban_watch is not None:
                ban_watch.started = time.monotonic()  # latency counts from the attacker's start
            while not stop.is_set() and any(t.alive for t in trainers):
                curves = {t.name: read_losses(out / f"{t.name}.jsonl") for t in trainers}
                if ban_watch is not None:
                    line = ban_watch.poll(dashboard, len(read_losses(out / "attacker.jsonl")))
                    if line:
                        live.console.print(line)
                live.update(status_table(children, curves, started))
                stop.wait(0.5)
            curves = {t.name: read_losses(out / f"{t.name}.jsonl") for t in trainers}
            if ban_watch is not None and ban_watch.row is None:
                ban_watch._last_poll = 0.0  # noqa: SLF001 (one last look)
                line = ban_watch.poll(dashboard, len(read_losses(out / "attacker.jsonl")))
                if line:
                    live.console.print(line)
            leaderboard = fetch_leaderboard(dashboard)
            live.update(status_table(children, curves, started))
    except RuntimeError as error:
        logger.error(str(error))
        leaderboard = None
    finally:
        shutdown(children)
        if not stderr_console.is_terminal:  # off a terminal, Live's last render ends without a newline
            stderr_console.line()

    failed = [t for t in trainers if t.process is not None and t.process.returncode not in (0, None, -15)]
    summary = summarize_loss(curves)
    if summary is None:
        die(f"no trainer completed a step; see the logs in {out / 'logs'}")
    attacker_curve = read_losses(out / "attacker.jsonl") if attacker is not None else []
    plot_losses({**curves, **({"attacker": attacker_curve} if attacker_curve else {})}, out / "loss.png")
    emit(f"loss: {summary[0]:.3f} -> {summary[1]:.3f}" + (" (honest trainers)" if attacker is not None else ""))
    emit(f"loss curve: {out / 'loss.png'}")
    if leaderboard:
        print_leaderboard(leaderboard)
    if failed:
        die(f"{', '.join(t.name for t in failed)} failed; see {out / 'logs'}")
    if ban_watch is not None:
        if ban_watch.row is None:
            die(f"the attacker was not caught within the demo; run longer (--minutes 3) or raise --check_rate, and see "
                f"{out / 'logs' / 'coordinator.log'}")
        emit(f"attacker banned: yes, {ban_watch.seconds:.0f}s after it started")


def print_leaderboard(rows: list) -> None:
    from athome.coordinator.leaderboard import print_leaderboard as print_page

    # the very table `peer leaderboard` prints, so the demo and the CLI show the same ranks the same way
    print_page(dict(rows=rows[:20], total=len(rows), offset=0))


def shutdown(children: List[Child], grace: float = 15.0) -> None:
    """SIGTERM every child (trainers first, coordinator last), then SIGKILL whole sessions that linger."""
    for child in reversed(children):
        child.terminate()
    deadline = time.monotonic() + grace
    for child in reversed(children):
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning(f"{child.name} did not stop within {grace:.0f}s; killing it")
        child.kill_group()  # also reaps what a clean exit left in its session (a stray p2pd)
