"""Reliability scenarios (issue #8): real swarms on 127.0.0.1, hurt on purpose, measured.

Each scenario is a function ``scenario(workdir) -> Outcome``: it starts real ``peer`` processes (coordinator,
hosts, trainers) in ``workdir``, does something bad to them (kill -9, Ctrl+C, garbage RPCs, 8 clients against one
host, ...), checks that the swarm held, and returns one figure line. ``bench/reliability.py`` runs them all and
prints a table; ``tests/test_reliability.py`` runs them as tests (the short ones by default, the rest ``slow``).

Everything a scenario starts is stopped by its :class:`Swarm` on exit, whatever happened.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from athome.demo import Child, read_losses

logger = logging.getLogger(__name__)
LOOPBACK = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0"]
ALL_EXPERTS = "ffn.[0:2].[0:4]"  # the default run's whole grid
STARTUP = 180.0  # seconds a peer may take to start on a loaded 2-core machine


@dataclass
class Outcome:
    """What one scenario found: did the swarm hold, and the one line of figures it measured."""

    name: str
    held: bool
    figure: str
    problems: List[str] = field(default_factory=list)

    def line(self) -> str:
        verdict = "held" if self.held else "FAILED (" + "; ".join(self.problems) + ")"
        return f"{self.name}: {verdict}: {self.figure}"


class Checks:
    """Collects the conditions a scenario requires; each failed one becomes a problem in the Outcome."""

    def __init__(self) -> None:
        self.problems: List[str] = []

    def require(self, condition: bool, problem: str) -> bool:
        if not condition:
            logger.warning(f"check failed: {problem}")
            self.problems.append(problem)
        return bool(condition)

    def outcome(self, name: str, figure: str) -> Outcome:
        return Outcome(name, not self.problems, figure, list(self.problems))


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (a restarted peer keeps its address only with a fixed port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- process trees


def _stat(pid: int) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> Dict[int, int]:
    """pid -> start time of ``root``, its descendants (any session) and the members of its session.

    Taken while the tree runs; :func:`survivors` later tells which of exactly these processes still live (the
    start time guards against a reused pid).
    """
    table: Dict[int, tuple] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z":
                table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))  # ppid, session, start
    tree = {pid for pid, (_, session, _) in table.items() if session == root}
    if root in table:
        tree.add(root)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in table.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {pid: table[pid][2] for pid in tree}


def survivors(tree: Dict[int, int]) -> List[int]:
    alive = []
    for pid, started in tree.items():
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z" and int(fields[19]) == started:
            alive.append(pid)
    return alive


def describe(pids: Sequence[int]) -> str:
    names = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80].decode(errors="replace")
            names.append(f"{pid}:{command}")
        except OSError:
            names.append(str(pid))
    return ", ".join(names)


def wait_gone(tree: Dict[int, int], timeout: float) -> tuple[List[int], float]:
    """Wait until every process of ``tree`` has exited; returns (those still alive at the deadline, seconds)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not survivors(tree):
            return [], time.monotonic() - started
        time.sleep(0.2)
    return survivors(tree), time.monotonic() - started


def kill_tree(tree: Dict[int, int]) -> None:
    """SIGKILL what is left of a recorded tree (cleanup after a failed check; never a broad kill)."""
    for pid in survivors(tree):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rss_bytes(tree_root: int) -> int:
    """Resident memory of a process and all its descendants."""
    total = 0
    for pid in process_tree(tree_root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- the swarm


class Swarm:
    """Real ``peer`` processes in one work folder; :meth:`close` stops every one of them (whole trees)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.children: List[Child] = []
        self.trees: List[Dict[int, int]] = []
        self.never = threading.Event()
        self.address: Optional[str] = None
        self.dashboard: Optional[str] = None

    def spawn(self, name: str, *argv: str, prefix: Sequence[str] = ()) -> Child:
        """Start ``peer <argv>`` (after ``prefix``, e.g. ``ip netns exec NS``); stderr goes to ``<workdir>/<name>.log``."""
        child = Child(name, list(argv), self.workdir / f"{name}.log", prefix=list(prefix))
        child.start()
        child.wait_line = lambda prefix, timeout=STARTUP: child.wait_for(prefix, timeout, self.never)
        self.children.append(child)
        return child

    def key(self, name: str) -> str:
        return str(self.workdir / f"{name}.key")

    def coordinator(self, *extra: str, port: int = 0, config_text: Optional[str] = None, name: str = "coordinator") -> Child:
        argv = ["coordinator", "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--data_dir", str(self.workdir / "coord"),
                "--identity_path", self.key("coordinator"), "--http_port", "0", *extra]
        if config_text is not None:
            path = self.workdir / "run.toml"
            path.write_text(config_text)
            argv += ["--config", str(path)]
        child = self.spawn(name, *argv)
        self.address = child.wait_line("run address:")
        self.dashboard = child.wait_line("dashboard:")
        return child

    def host(self, name: str, experts: str = ALL_EXPERTS, *extra: str, port: int = 0, wait: bool = True,
             peer: Optional[str] = None) -> Child:
        """``peer join``; ``peer`` names the identity and checkpoint folder (default ``name``: a new volunteer)."""
        peer = peer or name
        child = self.spawn(
            name, "join", "--run", self.address, "--experts", experts, "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}",
            "--identity_path", self.key(peer), "--checkpoint_dir", str(self.checkpoints(peer)),
            "--public_name", peer, *extra,
        )
        if wait:
            child.wait_line("serving experts:")
        return child

    def trainer(self, name: str, *extra: str, steps: int = 10_000) -> Child:
        return self.spawn(
            name, "train", "--run", self.address, *LOOPBACK, "--max_steps", str(steps), "--no_progress",
            "--identity_path", self.key(name), "--public_name", name, "--log_file", str(self.log_of(name)), *extra,
        )

    def checkpoints(self, peer: str) -> Path:
        return self.workdir / f"ckpt-{peer}"

    def log_of(self, name: str) -> Path:
        return self.workdir / f"{name}.jsonl"

    def steps(self, name: str) -> List[dict]:
        return read_losses(self.log_of(name))

    def wait_steps(self, name: str, count: int, timeout: float) -> List[dict]:
        """Wait until trainer ``name`` logged ``count`` steps; raises if it dies or times out first."""
        child = next(c for c in self.children if c.name == name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.steps(name)
            if len(rows) >= count:
                return rows
            if not child.alive:
                raise RuntimeError(f"{name} exited with {child.process.returncode}; see {child.log_path}")
            time.sleep(0.5)
        raise RuntimeError(f"{name} logged {len(self.steps(name))}/{count} steps in {timeout:.0f}s; see {child.log_path}")

    def api(self, path: str, timeout: float = 10) -> object:
        with urllib.request.urlopen(self.dashboard.rstrip("/") + path, timeout=timeout) as response:
            return json.loads(response.read())

    def close(self) -> None:
        """SIGTERM everything still running, then SIGKILL whole trees (recorded at start) that linger."""
        for child in self.children:
            if child.alive:
                self.trees.append(process_tree(child.process.pid))
                child.terminate()
        for child in self.children:
            try:
                child.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
            child.kill_group()
        for tree in self.trees:
            kill_tree(tree)


@contextmanager
def swarm_in(workdir: Optional[Path]) -> Iterator[Swarm]:
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="athome-reliability-"))
    swarm = Swarm(workdir)
    try:
        yield swarm
    finally:
        swarm.close()


def dht_client(address: str, workdir: Path):
    """An athome DHT node in client mode plus its p2p replica, for scenarios that talk to the swarm directly."""
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    from athome.dht import Identity, protect_run_keys, start_dht

    identity = Identity.load_or_create(Path(workdir) / "client.key")
    dht = start_dht(identity, run_name="demo", client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    initial_peers=[address])
    protect_run_keys(dht, identity, "demo")
    return dht, RemoteExpertWorker.run_coroutine(dht.replicate_p2p())


def peer_id_of(swarm: Swarm, name: str) -> str:
    from athome.dht import Identity

    return Identity.load_or_create(swarm.key(name)).peer_id


def servers(dht) -> Dict[str, List[str]]:
    from athome.dht import get_records
    from athome.dht.schemas import ServerRecord

    return {peer: record.experts for peer, (record, _) in get_records(dht, "athome.demo.servers", ServerRecord).items()}


# ---------------------------------------------------------------- 6. shutdown


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read()


def _signal_case(
    child: Child, signum: signal.Signals, timeout: float = 90, whole_tree: bool = False
) -> tuple[bool, Optional[int], float, str]:
    """Signal ``child`` (the ``peer`` process alone, as a terminal or a supervisor would; with ``whole_tree``, every
    process with its command line, as ``pkill -f 'peer train'`` would) and wait for its tree.

    Returns (no process left, exit code, seconds until the tree was gone, what survived).
    """
    tree = process_tree(child.process.pid)
    if whole_tree:  # what `pkill -f` matches: every process with the command line of the peer (its forks)
        command_line = _cmdline(child.process.pid)
        for pid in sorted(tree):
            try:
                if _cmdline(pid) == command_line:
                    os.kill(pid, signum)
            except OSError:  # gone meanwhile
                pass
    else:
        child.process.send_signal(signum)
    left, seconds = wait_gone(tree, timeout)
    text = describe(left)
    kill_tree(tree)
    try:  # a tree gone may still hold the peer process as a zombie: poll() could read None
        code = child.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = None
    return not left, code, seconds, text


FULL_SHUTDOWN_PLAN = (
    ("train", signal.SIGINT), ("train", signal.SIGKILL), ("train", signal.SIGTERM, "tree"), ("join", signal.SIGINT),
    ("join", signal.SIGKILL), ("coordinator", signal.SIGTERM), ("demo", signal.SIGINT), ("demo", signal.SIGKILL),
)
QUICK_SHUTDOWN_PLAN = (("train", signal.SIGINT), ("train", signal.SIGTERM, "tree"), ("join", signal.SIGINT))


def shutdown_scenario(workdir: Optional[Path] = None, *, plan: Sequence[tuple] = FULL_SHUTDOWN_PLAN) -> Outcome:
    """Ctrl+C / SIGTERM / SIGKILL to each command: no process or p2pd may remain; graceful ones exit 0.

    ``plan`` lists (command, signal) or (command, signal, "tree"); trainers are signalled first, then hosts, the
    coordinator, and demos. A signal goes to the ``peer`` process alone (SIGKILL as the kernel's OOM killer would:
    its helpers must follow it); "tree" signals all its processes at once, as ``pkill -f 'peer train'`` does.
    """
    checks = Checks()
    done: List[str] = []
    slowest = 0.0

    def record(what: str, clean: bool, code: Optional[int], seconds: float, left: str, graceful: bool) -> None:
        nonlocal slowest
        slowest = max(slowest, seconds)
        if checks.require(clean, f"{what} left {left}") and graceful:
            checks.require(code == 0, f"{what} exited with {code}")
        done.append(what)

    def signals(command: str) -> List[tuple]:
        """(signal, whole tree) for each plan entry of ``command``."""
        return [(signum, "tree" in rest) for name, signum, *rest in plan if name == command]

    with swarm_in(workdir) as swarm:
        coordinator = swarm.coordinator()
        if signals("join") or signals("train"):
            hosts = [swarm.host(f"host-{i}") for i in range(max(1, len(signals("join"))))]
            trainers = [swarm.trainer(f"trainer-{i}") for i in range(len(signals("train")))]
            for trainer in trainers:
                swarm.wait_steps(trainer.name, 1, 2 * STARTUP)
            for child, (signum, tree) in [*zip(trainers, signals("train")), *zip(hosts, signals("join"))]:
                record(f"{child.argv[0]} {signum.name}{' (every process)' if tree else ''}",
                       *_signal_case(child, signum, whole_tree=tree), graceful=signum != signal.SIGKILL)
        for signum, _ in signals("coordinator"):
            record(f"coordinator {signum.name}", *_signal_case(coordinator, signum), graceful=signum != signal.SIGKILL)
        for signum, _ in signals("demo"):
            out = swarm.workdir / f"demo-{signum.name}"
            demo = swarm.spawn(f"demo-{signum.name}", "demo", "--expert_hosts", "1", "--trainers", "1",
                               "--minutes", "30", "--out", str(out))
            deadline = time.monotonic() + 3 * STARTUP
            while not read_losses(out / "trainer-0.jsonl") and demo.alive and time.monotonic() < deadline:
                time.sleep(1)
            if checks.require(bool(read_losses(out / "trainer-0.jsonl")), f"demo never trained; see {out}/logs"):
                record(f"demo {signum.name}", *_signal_case(demo, signum), graceful=False)
    return checks.outcome(
        "shutdown", f"{len(done) - len(checks.problems)}/{len(done)} signals ({', '.join(done)}) left no process "
                    f"behind (slowest clean-up {slowest:.1f}s)",
    )


# ---------------------------------------------------------------- 4. bad input


@dataclass
class FuzzCase:
    """One malformed request: ``send()`` must raise (or return) an error whose text matches ``expect`` (a regex)."""

    name: str
    send: Callable[[], Optional[str]]
    expect: str


def _error_text(send: Callable[[], Optional[str]]) -> str:
    try:
        returned = send()
    except BaseException as error:  # the RPC layer hands the host's error back as an exception
        return f"{type(error).__name__}: {error}"
    return returned or "no error"


def rpc_fuzz_cases(p2p, peer_id: str, d_model: int) -> List[FuzzCase]:
    """Malformed expert RPCs on both protocols: shapes, dtypes, NaN/Inf, empty, oversize, truncated, garbage."""
    import torch
    from hivemind.compression import serialize_torch_tensor
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.moe.server.connection_handler import ConnectionHandler
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2
    from hivemind.utils import MSGPackSerializer
    from hivemind.utils.streaming import split_for_streaming

    from athome.peer.server import DirectExpertServicer

    peer = PeerID.from_base58(peer_id)
    hm = ConnectionHandler.get_stub(p2p, peer)
    direct = DirectExpertServicer.get_stub(p2p, peer)
    run = RemoteExpertWorker.run_coroutine
    uid = "ffn.0.0"

    def wire(*tensors) -> list:
        return [serialize_torch_tensor(t) for t in tensors]

    def truncated(t) -> runtime_pb2.Tensor:
        proto = serialize_torch_tensor(t)
        proto.buffer = proto.buffer[: len(proto.buffer) // 2]
        return proto

    def huge_shape() -> runtime_pb2.Tensor:
        proto = serialize_torch_tensor(torch.randn(2, d_model))
        del proto.size[:]
        proto.size.extend([10**9, d_model])
        return proto

    def bad_codec() -> runtime_pb2.Tensor:
        proto = serialize_torch_tensor(torch.randn(2, d_model))
        proto.compression = 77
        return proto

    def hivemind_call(tensors, method="rpc_forward", expert=uid):
        def send():
            run(getattr(hm, method)(runtime_pb2.ExpertRequest(uid=expert, tensors=tensors)))
        return send

    def hivemind_stream(tensors, method="rpc_forward_stream"):
        async def requests():
            for tensor in tensors:
                for part in split_for_streaming(tensor, 2**20):
                    yield runtime_pb2.ExpertRequest(uid=uid, tensors=[part])

        async def consume():
            async for _ in await getattr(hm, method)(requests()):
                pass

        return lambda: run(consume())

    def direct_call(tensors, metadata, method="rpc_forward"):
        def send():
            response = run(getattr(direct, method)(runtime_pb2.ExpertRequest(tensors=tensors, metadata=metadata)))
            errors = [e for e in MSGPackSerializer.loads(response.metadata)["errors"] if e]
            return "; ".join(errors) if errors else None
        return send

    def meta(uids, counts, **extra) -> bytes:
        return MSGPackSerializer.dumps(dict(uids=uids, counts=counts, **extra))

    def raw_unary(handler: str, data: bytes):
        return lambda: run(p2p._client.call_unary_handler(peer, handler, data))

    x = torch.randn(4, d_model)
    nan, inf = x.clone(), x.clone()
    nan[1, 3], inf[2, 0] = float("nan"), float("inf")
    good = wire(x)
    return [
        FuzzCase("hivemind: wrong width", hivemind_call(wire(torch.randn(4, d_model + 1))), "shape"),
        FuzzCase("hivemind: 1-D tensor", hivemind_call(wire(torch.randn(d_model))), "shape"),
        FuzzCase("hivemind: 3-D tensor", hivemind_call(wire(torch.randn(2, 4, d_model))), "shape"),
        FuzzCase("hivemind: float64", hivemind_call(wire(x.double())), "dtype"),
        FuzzCase("hivemind: int64", hivemind_call(wire(x.long())), "dtype"),
        FuzzCase("hivemind: NaN", hivemind_call(wire(nan)), "NaN"),
        FuzzCase("hivemind: Inf", hivemind_call(wire(inf)), "Inf"),
        FuzzCase("hivemind: empty batch", hivemind_call(wire(torch.zeros(0, d_model))), "empty"),
        FuzzCase("hivemind: no tensors", hivemind_call([]), "expects 1 tensors"),
        FuzzCase("hivemind: two tensors", hivemind_call(good + good), "expects 1 tensors"),
        FuzzCase("hivemind: unknown expert", hivemind_call(good, expert="ffn.9.9"), "does not serve"),
        FuzzCase("hivemind: backward without grads", hivemind_call(good, "rpc_backward"), "expects 2 tensors"),
        FuzzCase("hivemind: backward NaN grads", hivemind_call(good + wire(nan), "rpc_backward"), "NaN"),
        FuzzCase("hivemind: truncated tensor", hivemind_call([truncated(x)]), "could not be decoded"),
        FuzzCase("hivemind: huge declared shape", hivemind_call([huge_shape()]), "could not be decoded"),
        FuzzCase("hivemind: unknown codec", hivemind_call([bad_codec()]), "could not be decoded"),
        FuzzCase("hivemind: oversize stream (16385 rows)", hivemind_stream(wire(torch.randn(16385, d_model))), "exceeds"),
        # the host stops reading past the limit: the sender sees the refusal, or a reset if it is still sending
        FuzzCase("hivemind: endless stream (40 MB)", hivemind_stream(wire(torch.randn(80_000, d_model))),
                 "exceeds|reset by peer|broken pipe"),
        FuzzCase("hivemind: garbage protobuf", raw_unary(ConnectionHandler._get_handle_name(None, "rpc_forward"),
                                                         b"\x0a\xff\xff\xff\xff\x0f garbage"), "pars"),
        FuzzCase("direct: wrong width", direct_call(wire(torch.randn(4, d_model + 1)), meta([uid], [1])), "shape"),
        FuzzCase("direct: NaN", direct_call(wire(nan), meta([uid], [1])), "NaN"),
        FuzzCase("direct: float16", direct_call(wire(x.half()), meta([uid], [1])), "dtype"),
        FuzzCase("direct: unknown expert", direct_call(good, meta(["ffn.9.9"], [1])), "does not serve"),
        FuzzCase("direct: counts disagree", direct_call(good, meta([uid], [2])), "carries 1"),
        FuzzCase("direct: negative count", direct_call(good + good, meta([uid, "ffn.0.1"], [-1, 3])), "count"),
        FuzzCase("direct: metadata not msgpack", direct_call(good, b"\xc1\xc1garbage"), "metadata"),
        FuzzCase("direct: metadata a list", direct_call(good, MSGPackSerializer.dumps([uid, 1])), "metadata"),
        FuzzCase("direct: bad response codec", direct_call(good, meta([uid], [1], compression=99)), "compression"),
        FuzzCase("direct: truncated tensor", direct_call([truncated(x)], meta([uid], [1])), "could not be decoded"),
        FuzzCase("direct: backward Inf grads", direct_call(good + wire(inf), meta([uid], [2]), "rpc_backward"), "Inf"),
        FuzzCase("direct: garbage protobuf", raw_unary(DirectExpertServicer._get_handle_name(None, "rpc_forward"),
                                                       b"\x12\xff\xff\xff\xff\x0f garbage"), "pars"),
    ]


def fuzz_dht_records(address: str, workdir: Path, count: int = 60, seed: int = 0) -> int:
    """A node *without* athome's validator stores random values under the run's keys through the swarm.

    Returns how many stores some node accepted (honest nodes should accept none of them).
    """
    import random

    import hivemind
    from hivemind.utils import get_dht_time

    rng = random.Random(seed)

    def junk(depth: int = 0):
        kind = rng.randrange(7 if depth < 2 else 5)
        return [
            lambda: rng.randbytes(rng.randrange(200)), lambda: rng.random() * 10 ** rng.randrange(-5, 30),
            lambda: "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(50))),
            lambda: rng.randrange(-2**63, 2**63), lambda: None,
            lambda: {str(rng.random()): junk(depth + 1) for _ in range(rng.randrange(4))},
            lambda: [junk(depth + 1) for _ in range(rng.randrange(4))],
        ][kind]()

    keys = ["athome.config", "athome.demo.servers", "athome.demo.metrics", "athome.demo.peers"]
    attacker = hivemind.DHT(initial_peers=[address], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    accepted = 0
    try:
        for index in range(count):
            key = rng.choice(keys)
            subkey = rng.choice([None, f"[athome:{rng.randbytes(8).hex()}]", junk(2)])
            try:
                if subkey is not None and not isinstance(subkey, (str, bytes, int, float)):
                    subkey = str(subkey)
                ok = attacker.store(key, junk(), get_dht_time() + 60, subkey=subkey)
            except Exception as error:
                logger.info(f"the attacker's own client refused record {index}: {error!r}")
                continue
            accepted += bool(ok)
    finally:
        attacker.shutdown()
    return accepted


BAD_CONFIGS = {
    "unknown field": ("[model]\nd_modle = 128\n", "model.d_modle"),
    "negative batch": ("batch_size = -1\n", "batch_size"),
    "not TOML": ("this is = = not toml\n", "TOML"),
}


def bad_input_scenario(workdir: Optional[Path] = None) -> Outcome:
    """Garbage RPCs, garbage DHT records, bad configs and bad flags: clear errors, nothing lost, nothing down."""
    import torch
    from hivemind.moe.client.expert import RemoteExpert
    from hivemind.moe.expert_uid import ExpertInfo
    from hivemind.p2p import PeerID

    from athome.config import RunConfig

    checks = Checks()
    d_model = RunConfig().model.d_model
    with swarm_in(workdir) as swarm:
        coordinator = swarm.coordinator()
        host = swarm.host("host", "ffn.0.[0:2]")
        host_id = peer_id_of(swarm, "host")
        dht, p2p = dht_client(swarm.address, swarm.workdir)
        try:
            expert = RemoteExpert(ExpertInfo("ffn.0.0", PeerID.from_base58(host_id)), p2p)
            probe = torch.randn(8, d_model)
            before = expert(probe)
            cases = rpc_fuzz_cases(p2p, host_id, d_model)
            unclear = []
            for case in cases:
                text = _error_text(case.send)
                logger.info(f"{case.name}: {text[:300]}")
                if not re.search(case.expect, text, re.IGNORECASE):
                    unclear.append(f"{case.name} -> {text[:160]!r}")
            checks.require(not unclear, f"{len(unclear)} RPCs without a clear error: {unclear}")
            checks.require(host.alive, "the host died under fuzzed RPCs")
            # not bitwise: the host's runtime may batch the probe with other requests, which moves the last bits
            after = expert(probe)
            checks.require(torch.allclose(after, before, rtol=1e-5, atol=1e-6),
                           f"a refused request changed the expert (max diff {(after - before).abs().max().item():.3g})")

            accepted = fuzz_dht_records(swarm.address, swarm.workdir)
            checks.require(accepted == 0, f"{accepted} garbage records were accepted by athome nodes")
            checks.require(coordinator.alive and host.alive, "a peer died under fuzzed DHT records")
            checks.require(servers(dht).get(host_id) == ["ffn.0.0", "ffn.0.1"], "the host's declaration was lost")
            grid, deadline = swarm.api("/api/experts"), time.monotonic() + 20
            while host_id not in json.dumps(grid) and time.monotonic() < deadline:  # it polls the DHT every 5 s
                time.sleep(1)
                grid = swarm.api("/api/experts")
            checks.require(host_id in json.dumps(grid), f"the dashboard lost the host: /api/experts = {json.dumps(grid)[:600]}")
        finally:
            dht.shutdown()

        # every bad config and flag at once: each CLI start is mostly imports, so they overlap well
        cli_cases = [(f"config '{name}'", ["coordinator", "--config", str(swarm.workdir / f"bad-{i}.toml"), *LOOPBACK], expect)
                     for i, (name, (text, expect)) in enumerate(BAD_CONFIGS.items())]
        for i, (text, _) in enumerate(BAD_CONFIGS.values()):
            (swarm.workdir / f"bad-{i}.toml").write_text(text)
        cli_cases += [
            ("a malformed run address", ["join", "--run", "/ip4/127.0.0.1/tcp/1/p2p/notapeer", *LOOPBACK], "run address"),
            ("an expert outside the grid", ["join", "--run", swarm.address, "--experts", "ffn.7.0", *LOOPBACK,
                                            "--identity_path", swarm.key("x")], "ffn.7.0"),
        ]
        running = [(what, expect, subprocess.Popen([sys.executable, "-m", "athome.cli", *argv], text=True,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                   for what, argv, expect in cli_cases]
        bad_cli = 0
        for what, expect, process in running:
            _, stderr = process.communicate(timeout=2 * STARTUP)
            clear = process.returncode == 1 and expect in stderr and "Traceback" not in stderr
            bad_cli += checks.require(clear, f"{what}: exit {process.returncode}, {stderr[-300:]!r}")
    return checks.outcome(
        "bad input", f"{len(cases) - len(unclear)}/{len(cases)} fuzzed RPCs refused with a clear error, host alive and "
                     f"unchanged; {accepted}/60 garbage DHT records accepted; {bad_cli}/{len(cli_cases)} bad configs/flags "
                     f"refused with a clear error",
    )


# ---------------------------------------------------------------- 1. churn


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


def loss_buckets(rows: Sequence[dict], mark_after_step: int, width: int = 5) -> str:
    """The loss curve in one line: mean loss of every ``width`` steps, ``|`` where the event happened."""
    parts = []
    for start in range(0, len(rows), width):
        bucket = rows[start : start + width]
        if start <= mark_after_step < start + width and start:
            parts.append("|")
        parts.append(f"{_mean([r['loss'] for r in bucket]):.2f}")
    return " ".join(parts)


def recovery_seconds(rows: Sequence[dict], event_time: float) -> float:
    """Seconds from the event until the trainer steps at its usual pace again.

    The usual pace is the median step interval before the event; recovered = the first step after the event that
    took at most twice that.
    """
    before = [b["time"] - a["time"] for a, b in zip(rows, rows[1:]) if b["time"] <= event_time]
    usual = sorted(before)[len(before) // 2] if before else 5.0
    previous = max((r["time"] for r in rows if r["time"] <= event_time), default=event_time)
    for row in (r for r in rows if r["time"] > event_time):
        if row["time"] - previous <= 2 * usual:
            return row["time"] - event_time
        previous = row["time"]
    return float("inf")


CHURN_LAYOUT = {  # every expert on exactly two of three hosts: replication 2
    "host-0": "ffn.0.[0:4],ffn.1.[0:2]",
    "host-1": "ffn.0.3,ffn.1.[0:4]",
    "host-2": "ffn.1.[2:4],ffn.0.[0:3]",
}


def churn_scenario(workdir: Optional[Path] = None, *, ttl: float = 10.0, steps_after: int = 15) -> Outcome:
    """kill -9 a third of the expert hosts mid-run (replication 2), then restart them from their checkpoints."""
    from athome.config import RunConfig

    checks = Checks()
    grid = RunConfig().model.expert_uids()
    with swarm_in(workdir) as swarm:
        swarm.coordinator(config_text=f"expert_ttl = {ttl}\n")
        hosts = {name: swarm.host(name, experts) for name, experts in CHURN_LAYOUT.items()}
        swarm.trainer("trainer")
        dht, _ = dht_client(swarm.address, swarm.workdir)
        try:
            swarm.wait_steps("trainer", 10, 2 * STARTUP)
            victim, victim_id = hosts["host-0"], peer_id_of(swarm, "host-0")
            serving = [line for line in victim.lines if line.startswith("serving experts:")]
            served = len(serving[0].split(",")) if serving else 6
            ckpt = swarm.checkpoints("host-0")
            deadline = time.monotonic() + 180  # the host saves every 60 s: wait for its first checkpoint
            while len(list(ckpt.glob("*.safetensors"))) < served and time.monotonic() < deadline:
                time.sleep(1)
            checks.require(len(list(ckpt.glob("*.safetensors"))) == served, "host-0 wrote no checkpoint in 180 s")

            tree = process_tree(victim.process.pid)
            at_kill = len(swarm.steps("trainer"))
            killed_at = time.time()
            os.killpg(victim.process.pid, signal.SIGKILL)
            kill_tree(tree)
            victim.process.wait()

            vanished = float("inf")
            while time.time() - killed_at < ttl + 30:
                if victim_id not in servers(dht):
                    vanished = time.time() - killed_at
                    break
                time.sleep(0.5)
            checks.require(vanished <= ttl + 3, f"the dead host stayed in the DHT {vanished:.1f}s (TTL {ttl:.0f}s)")
            live = servers(dht)
            lost = [uid for uid in grid if not any(uid in experts for experts in live.values())]
            checks.require(not lost, f"experts lost with host-0: {lost}")

            rows = swarm.wait_steps("trainer", at_kill + steps_after, 2 * STARTUP)
            recovered = recovery_seconds(rows, killed_at)
            before = _mean([r["loss"] for r in rows[max(0, at_kill - 5) : at_kill]])
            after = _mean([r["loss"] for r in rows[at_kill : at_kill + 5]])
            checks.require(after <= 1.1 * before, f"loss jumped from {before:.3f} to {after:.3f} after the kill")

            restarted = swarm.host("host-0-restarted", CHURN_LAYOUT["host-0"], peer="host-0")
            log = restarted.log_path.read_text()
            restored = log.count("starting from checkpoint")
            checks.require(restored == served, f"the restarted host restored {restored}/{served} experts from checkpoints")
            deadline = time.monotonic() + 60
            while len(servers(dht).get(victim_id, [])) != served and time.monotonic() < deadline:
                time.sleep(1)
            checks.require(len(servers(dht).get(victim_id, [])) == served, "the restarted host is not declared")
            rows = swarm.wait_steps("trainer", len(swarm.steps("trainer")) + 5, STARTUP)
            end = _mean([r["loss"] for r in rows[-5:]])
        finally:
            dht.shutdown()
    write_curve(swarm.workdir / "churn_loss.json", rows, killed_at)
    return checks.outcome(
        "churn", f"killed 1/3 hosts at step {at_kill}; {len(lost)}/{len(grid)} experts lost; gone from DHT in "
                 f"{vanished:.1f}s (TTL {ttl:.0f}s); recovered in {recovered:.1f}s; {restored}/{served} restored from "
                 f"checkpoint; loss {before:.2f} -> {after:.2f} -> {end:.2f} (per 5 steps: {loss_buckets(rows, at_kill)})",
    )


def write_curve(path: Path, rows: Sequence[dict], event_time: float) -> None:
    """The trainer's loss curve with the event's time, for plotting later."""
    path.write_text(json.dumps(dict(event_time=event_time, steps=list(rows))))


# ---------------------------------------------------------------- 3. coordinator death


def coordinator_death_scenario(workdir: Optional[Path] = None, *, steps_without: int = 10) -> Outcome:
    """kill -9 the coordinator mid-run: training goes on; restarted, it recovers its ledger and sees the swarm."""
    checks = Checks()
    port = free_port()
    with swarm_in(workdir) as swarm:
        coordinator = swarm.coordinator(port=port)
        address = swarm.address
        swarm.host("host")
        trainer = swarm.trainer("trainer")
        swarm.wait_steps("trainer", 5, 2 * STARTUP)
        deadline = time.monotonic() + 90
        board: list = []
        while time.monotonic() < deadline:  # the coordinator polls every 5 s
            board = [r for r in swarm.api("/api/leaderboard")["rows"] if r.get("public_name") == "trainer"]
            if board and board[0].get("samples", 0) > 0:
                break
            time.sleep(2)
        checks.require(bool(board), "the leaderboard never showed the trainer")
        samples_before = board[0]["samples"] if board else 0

        tree = process_tree(coordinator.process.pid)
        at_kill = len(swarm.steps("trainer"))
        os.killpg(coordinator.process.pid, signal.SIGKILL)
        kill_tree(tree)
        coordinator.process.wait()
        rows = swarm.wait_steps("trainer", at_kill + steps_without, 2 * STARTUP)
        without = len(rows) - at_kill
        checks.require(trainer.alive, "the trainer died with the coordinator")

        restarted_at = time.time()
        swarm.coordinator(port=port, name="coordinator-restarted")
        checks.require(swarm.address == address, f"the run address changed: {address} -> {swarm.address}")
        board = [r for r in swarm.api("/api/leaderboard")["rows"] if r.get("public_name") == "trainer"]
        recovered = bool(board) and board[0].get("samples", 0) >= samples_before
        checks.require(recovered, f"the restarted coordinator lost the leaderboard: {board}")
        fresh, seen_after = False, float("inf")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not fresh:  # new reports reach the restarted coordinator
            rows_now = [r for r in swarm.api("/api/leaderboard")["rows"] if r.get("public_name") == "trainer"]
            fresh = bool(rows_now) and rows_now[0].get("samples", 0) >= rows[-1]["samples"]
            if fresh:
                seen_after = time.time() - restarted_at
            else:
                time.sleep(2)
        checks.require(fresh, "the restarted coordinator never received new metrics from the swarm")
        status = subprocess.run([sys.executable, "-m", "athome.cli", "status", "--run", address, "--json", *LOOPBACK],
                                capture_output=True, text=True, timeout=STARTUP)
        joinable = status.returncode == 0 and peer_id_of(swarm, "host") in status.stdout
        checks.require(joinable, f"a newcomer through the restarted coordinator does not see the host: {status.stderr[-300:]}")
    return checks.outcome(
        "coordinator death", f"{without} steps trained while the coordinator was dead; restarted: leaderboard "
                             f"{'recovered' if recovered else 'LOST'} ({samples_before} samples), new reports after "
                             f"{seen_after:.0f}s, newcomers {'can' if joinable else 'CANNOT'} join",
    )


# ---------------------------------------------------------------- 5. load


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class _MessageCounter(logging.Handler):
    """Counts log records containing ``text`` (the dispatcher logs each refused host request)."""

    def __init__(self, text: str):
        super().__init__(logging.DEBUG)
        self.text, self.count = text, 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.count += 1


class LoadClient:
    """One trainer's expert traffic: its own DHT node and p2p, registry and RemoteDispatcher, as `peer train` has.

    ``run(calls)`` sends ``calls`` forward+backward passes of ``tokens`` tokens (top-2 of the layer's experts)
    and records each pass's latency; a pass refused or failed by the host counts as ``failed`` and the client
    backs off as a trainer does (the registry cools the host down).
    """

    def __init__(self, address: str, workdir: Path, index: int):
        import torch

        from athome.config import RunConfig
        from athome.dht import Identity, protect_run_keys, start_dht
        from athome.trainer.remote import ExpertRegistry, RemoteDispatcher
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        identity = Identity.load_or_create(Path(workdir) / f"load-client-{index}.key")
        self.dht = start_dht(identity, run_name="demo", client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                             initial_peers=[address])
        protect_run_keys(self.dht, identity, "demo")
        p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
        self.registry = ExpertRegistry(self.dht, "athome.demo.servers")
        self.registry.refresh(force=True)
        model = RunConfig().model
        self.dispatcher = RemoteDispatcher(model.expert_uids()[: model.experts_per_layer], self.registry, p2p)
        self.d_model, self.experts = model.d_model, model.experts_per_layer
        self.generator = torch.Generator().manual_seed(index)
        self.latencies: List[float] = []
        self.failed = 0
        self.error: Optional[BaseException] = None

    def run(self, calls: int, tokens: int, stop: threading.Event) -> None:
        import torch

        self.latencies, self.failed = [], 0
        try:
            while len(self.latencies) < calls and not stop.is_set():
                self.registry.refresh()
                x = torch.randn(tokens, self.d_model, generator=self.generator, requires_grad=True)
                expert_index = torch.rand(tokens, self.experts, generator=self.generator).argsort(dim=1)[:, :2]
                started = time.monotonic()
                outputs, answered = self.dispatcher(x, expert_index)
                outputs.sum().backward()
                if answered.all():
                    self.latencies.append(time.monotonic() - started)
                else:
                    self.failed += 1
                    stop.wait(0.5)  # the host is cooling down in the registry: wait as a trainer would
        except BaseException as error:
            self.error = error

    def close(self) -> None:
        self.dht.shutdown()


def _run_fleet(fleet: Sequence[LoadClient], calls: int, tokens: int) -> float:
    """Every client runs ``calls`` passes of ``tokens`` tokens at once; returns the wall time."""
    threads = [threading.Thread(target=c.run, args=(calls, tokens, threading.Event()), daemon=True) for c in fleet]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20 * STARTUP)
    return time.monotonic() - started


def _overload_tokens(tokens_per_second: float, clients: int, max_queue_seconds: float) -> int:
    """Tokens per pass that would make ``clients - 1`` queued passes hold about ``4 * max_queue_seconds`` of work,
    given the host's throughput under load in tokens per second of passes (forward and backward: two requests); a
    multiple of 1024, at least 4096. (Measured: the queue the host sees holds about half of that, as the clients'
    requests are not all queued at once.)"""
    per_request = 4 * max_queue_seconds / max(clients - 1, 1)
    wanted = per_request * 2 * tokens_per_second
    return max(4096, int(math.ceil(wanted / 1024)) * 1024)


def load_scenario(workdir: Optional[Path] = None, *, clients: int = 8, calls: int = 12, tokens: int = 1024,
                  overload_tokens: Optional[int] = None, overload_calls: int = 3,
                  max_queue_seconds: float = 0.25) -> Outcome:
    """``clients`` trainer clients against one expert host: latency percentiles, backpressure, bounded memory.

    The clients are real (own DHT node, p2pd, registry and RemoteDispatcher each) but share this process, to fit
    a small machine. One client runs alone first (the baseline of the latency ratio); then all of them with
    ``tokens`` per pass; then all of them with ``overload_tokens`` per pass, more queued work than the host
    accepts (``peer join --max_queue_seconds``, set low here): it must refuse some requests at once (backpressure)
    while every client still gets its passes through, and its memory must stay bounded throughout.

    :param overload_tokens: tokens per pass in the overload; default: sized from the throughput measured with
      ``tokens`` (:func:`_overload_tokens`). A fixed size overloaded a slow machine and not a faster one (4096
      tokens queued under 1 s of work here), and sizing it up instead of the queue limit down costs memory
      (10240 tokens: +1 GiB host RSS), hence the low ``max_queue_seconds``
    """
    checks = Checks()
    busy = _MessageCounter("host busy")
    logging.getLogger("athome.trainer.remote").addHandler(busy)
    with swarm_in(workdir) as swarm:
        swarm.coordinator()
        host = swarm.host("host", "ffn.0.[0:4]", "--max_queue_seconds", str(max_queue_seconds))
        fleet = [LoadClient(swarm.address, swarm.workdir, i) for i in range(clients)]
        stop = threading.Event()
        baseline_rss = rss_bytes(host.process.pid)
        peak = [baseline_rss]

        def sample_memory() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], rss_bytes(host.process.pid))

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        try:
            fleet[0].run(calls, tokens, threading.Event())
            alone = list(fleet[0].latencies)
            wall = _run_fleet(fleet, calls, tokens)
            latencies = [t for c in fleet for t in c.latencies]
            finished = all(len(c.latencies) == calls for c in fleet)
            refused_before = busy.count
            if overload_tokens is None:
                overload_tokens = _overload_tokens(len(latencies) * tokens / wall, clients, max_queue_seconds)
            overload_wall = _run_fleet(fleet, overload_calls, overload_tokens)
            overloaded = [t for c in fleet for t in c.latencies]
            finished &= all(len(c.latencies) == overload_calls for c in fleet)
            failed = sum(c.failed for c in fleet)
        finally:
            stop.set()
            logging.getLogger("athome.trainer.remote").removeHandler(busy)
            for client in fleet:
                client.close()
        errors = [repr(c.error) for c in fleet if c.error is not None]
        checks.require(not errors, f"clients crashed: {errors}")
        checks.require(host.alive, "the host died under load")
        checks.require(finished, "some clients did not get their passes through")
        refusals = busy.count - refused_before
        checks.require(refusals > 0, "overloaded, the host never refused a request: no backpressure")
        growth = (peak[0] - baseline_rss) / 2**20
        checks.require(growth < 1024, f"host memory grew {growth:.0f} MiB under load")
    p50, p95, p99 = (_percentile(latencies, q) for q in (0.5, 0.95, 0.99))
    return checks.outcome(
        "load", f"{clients} clients x {calls} fwd+bwd of {tokens} tokens on 1 host: p50 {p50:.2f}s p95 {p95:.2f}s "
                f"p99 {p99:.2f}s (alone p50 {_percentile(alone, 0.5):.2f}s, x{p50 / _percentile(alone, 0.5):.1f}), "
                f"{len(latencies) * tokens / wall:.0f} tokens/s, {refused_before} refused; overloaded ({overload_tokens} tokens/pass): "
                f"{refusals} requests refused busy (queue limit {max_queue_seconds:g}s), all passes through in {overload_wall:.0f}s "
                f"(p50 {_percentile(overloaded, 0.5):.1f}s, {failed} retried); host RSS +{growth:.0f} MiB",
    )


# ---------------------------------------------------------------- 2. network


_ECHO_SERVER = """
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("{ip}", {port}))
server.listen()
while True:
    connection, _ = server.accept()
    while data := connection.recv(65536):
        connection.sendall(data)
    connection.close()
"""
_RTT_PROBE = """
import socket, statistics, time
connection = socket.create_connection(("{ip}", {port}), timeout=20)
connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(7):
    started = time.monotonic()
    connection.sendall(b"x")
    connection.recv(1)
    rtts.append(time.monotonic() - started)
print(statistics.median(rtts) * 1000)
"""


def network_scenario(workdir: Optional[Path] = None, *, rtt_ms: float = 100, loss: float = 0.01,
                     rate_mbit: float = 20, steps: int = 15) -> Outcome:
    """Coordinator, host and two trainers, each in its own network namespace, every link 20 Mbit/s (tc tbf),
    lossy (iptables statistic) and delayed (a :mod:`~athome.testing.delay_relay` in front of every peer).

    Every peer listens on its own address and announces the relay's, so each connection crosses one relay (RTT +
    ``rtt_ms``) and two shaped uplinks (each dropping ``loss / 2`` per direction: ``loss`` end to end).
    Training must go on, the two trainers must average (their optimizer epoch advances together), and every
    namespace must be gone afterwards.
    """
    from athome.testing import netlab

    ok, why = netlab.available()
    if not ok:
        return Outcome("network", False, f"could not build namespaces: {why}", [why])
    checks = Checks()
    names = ["coord", "host", "trainer-a", "trainer-b"]
    port = 4100
    lab = netlab.NetLab()
    prefix = lab.prefix
    started = time.monotonic()
    try:
        with swarm_in(workdir) as swarm:
            nodes = {name: lab.public_host(name) for name in names}
            maps, announce = [], {}
            for name, node in nodes.items():
                link = lab.uplink(node)
                lab.shape(link, rate_mbit=rate_mbit, loss=loss / 2)
                maps.append(f"{link.ip_a}:{port + 1}={node.ip}:{port}")
                announce[name] = ["--host_maddrs", f"/ip4/{node.ip}/tcp/{port}",
                                  "--announce_maddrs", f"/ip4/{link.ip_a}/tcp/{port + 1}"]
            # an echo server behind the host's relay: the RTT a peer really sees, measured below
            nodes["host"].popen([sys.executable, "-c", _ECHO_SERVER.format(ip=nodes["host"].ip, port=port + 2)])
            echo_at = (lab.uplink(nodes["host"]).ip_a, port + 3)
            maps.append(f"{echo_at[0]}:{echo_at[1]}={nodes['host'].ip}:{port + 2}")
            relay = lab.internet.popen(
                [sys.executable, "-m", "athome.testing.delay_relay", "--delay_ms", str(rtt_ms / 2),
                 *[arg for m in maps for arg in ("--map", m)]],
                stdout=subprocess.PIPE, text=True,
            )
            checks.require(relay.stdout.readline().strip() == "relaying", "the delay relay did not start")
            probe = nodes["trainer-a"].run(sys.executable, "-c", _RTT_PROBE.format(ip=echo_at[0], port=echo_at[1]), check=False)
            rtt = float(probe.stdout.strip() or "nan")
            checks.require(rtt >= 0.9 * rtt_ms, f"the link's RTT is {rtt:.0f} ms, not {rtt_ms:.0f} ms: {probe.stderr[-200:]}")

            def run_in(name: str) -> List[str]:
                return nodes[name].exec_prefix

            coordinator = swarm.spawn(
                "coordinator", "coordinator", *announce["coord"], "--data_dir", str(swarm.workdir / "coord"),
                "--identity_path", swarm.key("coordinator"), "--http_port", "0", prefix=run_in("coord"))
            address = coordinator.wait_line("run address:")
            host = swarm.spawn(
                "host", "join", "--run", address, "--experts", ALL_EXPERTS, *announce["host"],
                "--identity_path", swarm.key("host"), "--checkpoint_dir", str(swarm.checkpoints("host")),
                prefix=run_in("host"))
            host.wait_line("serving experts:", 2 * STARTUP)
            swarm.address = address
            for name in ("trainer-a", "trainer-b"):
                swarm.spawn(name, "train", "--run", address, *announce[name], "--max_steps", "10000", "--no_progress",
                            "--identity_path", swarm.key(name), "--log_file", str(swarm.log_of(name)),
                            prefix=run_in(name))
            rows = {name: swarm.wait_steps(name, steps, 4 * STARTUP) for name in ("trainer-a", "trainer-b")}
            epochs = {name: max(r.get("epoch", 0) for r in rows[name]) for name in rows}
            together = {name: max(r.get("trainers", 0) for r in rows[name]) for name in rows}
            checks.require(min(epochs.values()) >= 1, f"the trainers' collaborative epoch never advanced: {epochs}")
            checks.require(min(together.values()) >= 2, f"the trainers never saw each other: {together}")
            timeouts = sum(swarm.workdir.joinpath(f"{name}.log").read_text().count("timed out") for name in rows)
            rate = _mean([(r[-1]["step"] - r[0]["step"]) / max(r[-1]["time"] - r[0]["time"], 1e-6) for r in rows.values()])
            first = _mean([r["loss"] for name in rows for r in rows[name][:5]])
            last = _mean([r["loss"] for name in rows for r in rows[name][-5:]])
            checks.require(last < first, f"the loss did not fall: {first:.3f} -> {last:.3f}")
    finally:
        lab.close()
    leftover = [n for n in netlab._sh("ip", "netns", "list", check=False).stdout.split() if n.startswith(prefix)]
    checks.require(not leftover, f"namespaces left behind: {leftover}")
    return checks.outcome(
        "network", f"{rtt_ms:.0f} ms RTT (measured {rtt:.0f} ms), {loss:.0%} loss, {rate_mbit:.0f} Mbit/s: 2 trainers x {steps} steps at "
                   f"{rate:.2f} steps/s, loss {first:.2f} -> {last:.2f}, epochs {sorted(epochs.values())} "
                   f"(averaged together), {timeouts} expert timeouts; namespaces cleaned "
                   f"{'yes' if not leftover else 'NO'} ({time.monotonic() - started:.0f}s)",
    )
