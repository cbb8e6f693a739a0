"""Throwaway networks of Linux network namespaces for tests and benches: hosts, links, home NATs, shaped links.

A :class:`NetLab` builds everything inside namespaces it creates itself (never touching the root namespace's
interfaces, routes or firewall) and removes all of it on ``close()`` / leaving the ``with`` block, even when the
body failed. Names carry a per-process prefix (``nl<pid hex>``), so parallel runs never collide; namespaces left
by a process that died hard are removed by :func:`remove_stale`.

Topology: an *internet* namespace routes between directly attached /24 subnets (``BASE.N.0/24``, internet side
``.1``). A *public* host sits on its own subnet with a default route to the internet. A *NAT* host sits behind a
router namespace that masquerades its private subnet (iptables MASQUERADE), like a home router: the internet has
no route to the private subnet, so nobody outside can open a connection to the host, while the host can dial out.

    with NetLab() as lab:
        coordinator = lab.public_host("coord")          # 10.77.1.2
        home = lab.nat_host("home")                     # 10.77.3.2 behind router 10.77.2.2
        home.run("ping", "-c1", coordinator.ip)         # works; coordinator -> home does not
        lab.shape(lab.uplink(home.router), rate_mbit=20, loss=0.01)
        proc = home.popen([sys.executable, "-m", "athome.cli", ...])

Needs root, ``ip`` (iproute2), ``tc`` and ``iptables``; :func:`available` says why not where they are missing.
Addresses are private test subnets that exist only inside the lab's namespaces: traffic never leaves them.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from athome.demo import Child

logger = logging.getLogger(__name__)
NAME_PREFIX = "nl"  # every namespace a NetLab creates is named nl<pid hex><tag>-<name>


class NetLabError(RuntimeError):
    """A namespace, link or rule could not be set up; the message carries the failing command and its stderr."""


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise NetLabError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def available() -> tuple[bool, str]:
    """Whether this machine lets us build a lab; when not, the reason and how to fix it."""
    if os.geteuid() != 0:
        return False, "network namespaces need root (run the tests as root, or in a container with CAP_NET_ADMIN)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return False, f"`{tool}` is not installed (apt-get install {package})"
    probe = f"{NAME_PREFIX}{os.getpid():x}probe{uuid.uuid4().hex[:4]}"
    try:
        created = _sh("ip", "netns", "add", probe, check=False)
        if created.returncode != 0:
            return False, f"the kernel refuses network namespaces: {created.stderr.strip()}"
        nat = _sh("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n", check=False)
        if nat.returncode != 0:
            return False, f"iptables NAT does not work in a namespace: {nat.stderr.strip()}"
    finally:
        _sh("ip", "netns", "del", probe, check=False)
    return True, ""


def remove_stale() -> List[str]:
    """Delete namespaces left by NetLabs whose process no longer exists (a run killed with SIGKILL)."""
    removed = []
    listing = _sh("ip", "netns", "list", check=False).stdout.split()
    for name in listing:
        if not name.startswith(NAME_PREFIX) or "-" not in name:
            continue
        owner = name[len(NAME_PREFIX):].split("-", 1)[0][:-4]  # strip the 4-character per-lab tag
        try:
            pid = int(owner, 16)
        except ValueError:
            continue
        if not os.path.exists(f"/proc/{pid}"):
            _kill_namespace_processes(name)
            _sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def _kill_namespace_processes(netns: str) -> None:
    # processes inside a namespace this lab created were started by this lab (or its tests)
    for pid in _sh("ip", "netns", "pids", netns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Host:
    """One network namespace; ``ip`` is its main address (None for a bare namespace not yet linked)."""

    lab: "NetLab"
    name: str
    netns: str
    ip: Optional[str] = None
    router: Optional["Host"] = None  # the NAT router in front of this host, if any
    addresses: List[str] = field(default_factory=list)

    @property
    def exec_prefix(self) -> List[str]:
        return ["ip", "netns", "exec", self.netns]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside this namespace and wait; raises :class:`NetLabError` on failure if ``check``."""
        result = subprocess.run(
            [*self.exec_prefix, *cmd], capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise NetLabError(f"[{self.name}] `{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def popen(self, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` inside this namespace in its own session; the lab kills it (whole group) on close."""
        kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen([*self.exec_prefix, *cmd], **kwargs)
        self.lab.adopt(process)
        return process

    def peer(self, name: str, argv: Sequence[str], log_dir: Path) -> "Child":
        """Start ``peer <argv>`` inside this namespace (stdout lines read as :class:`athome.demo.Child` does);
        the lab stops it on close. ``child.wait_for(prefix, timeout, stop_event)`` waits for a key line."""
        from athome.demo import Child

        child = Child(name, list(argv), Path(log_dir) / f"{name}.log", prefix=self.exec_prefix)
        child.start()
        self.lab.adopt(child.process)
        return child

    def can_connect(self, ip: str, port: int, timeout: float = 3) -> bool:
        """Whether a TCP connection from this namespace to ``ip:port`` is accepted."""
        script = (
            "import socket,sys\n"
            f"s=socket.socket(); s.settimeout({timeout})\n"
            f"sys.exit(0 if s.connect_ex(({ip!r},{port}))==0 else 1)"
        )
        import sys

        return self.run(sys.executable, "-c", script, check=False, timeout=timeout + 10).returncode == 0


@dataclass
class Link:
    """A veth pair between ``a`` and ``b`` on subnet ``BASE.N.0/24``: ``a`` has ``.1``, ``b`` has ``.2``."""

    a: Host
    b: Host
    dev_a: str
    dev_b: str
    ip_a: str
    ip_b: str
    subnet: str


class NetLab:
    """Builds namespaces, veth links, NAT routers and shaped links, and removes them all on :meth:`close`."""

    def __init__(self, base: str = "10.77"):
        ok, reason = available()
        if not ok:
            raise NetLabError(reason)
        remove_stale()
        self.base = base
        self.prefix = f"{NAME_PREFIX}{os.getpid():x}{uuid.uuid4().hex[:4]}"
        self.hosts: Dict[str, Host] = {}
        self.links: List[Link] = []
        self._next_subnet = 1
        self._processes: List[subprocess.Popen] = []
        self._internet: Optional[Host] = None
        self._uplinks: Dict[str, Link] = {}

    def __enter__(self) -> "NetLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- building blocks ----
    def namespace(self, name: str) -> Host:
        """A bare namespace with loopback up; ``name`` must be unique in this lab."""
        if name in self.hosts:
            raise NetLabError(f"this lab already has a host named {name!r}")
        netns = f"{self.prefix}-{name}"
        _sh("ip", "netns", "add", netns)
        host = Host(self, name, netns)
        self.hosts[name] = host  # registered before anything else can fail, so close() removes it
        host.run("ip", "link", "set", "lo", "up")
        return host

    def connect(self, a: Host, b: Host) -> Link:
        """A veth pair between two namespaces on a fresh /24 (``a`` = .1, ``b`` = .2), both ends up."""
        index = self._next_subnet
        if index > 254:
            raise NetLabError("this lab ran out of /24 subnets (254 links)")
        self._next_subnet += 1
        subnet = f"{self.base}.{index}.0/24"
        ip_a, ip_b = f"{self.base}.{index}.1", f"{self.base}.{index}.2"
        # interface names are at most 15 characters; they live only inside the two namespaces
        dev_a, dev_b = f"v{index}a{a.name[:10]}", f"v{index}b{b.name[:10]}"
        _sh("ip", "link", "add", dev_a, "netns", a.netns, "type", "veth", "peer", "name", dev_b, "netns", b.netns)
        for host, dev, ip in ((a, dev_a, ip_a), (b, dev_b, ip_b)):
            host.run("ip", "addr", "add", f"{ip}/24", "dev", dev)
            host.run("ip", "link", "set", dev, "up")
            host.addresses.append(ip)
        link = Link(a, b, dev_a, dev_b, ip_a, ip_b, subnet)
        self.links.append(link)
        return link

    @property
    def internet(self) -> Host:
        """The namespace that routes between every public host and NAT router (created on first use)."""
        if self._internet is None:
            self._internet = self.namespace("inet")
            self._internet.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        return self._internet

    def public_host(self, name: str) -> Host:
        """A host with a public (to the lab) address: anyone in the lab can connect to it."""
        host = self.namespace(name)
        link = self.connect(self.internet, host)
        host.run("ip", "route", "add", "default", "via", link.ip_a)
        host.ip = link.ip_b
        self._uplinks[name] = link
        return host

    def nat_router(self, name: str) -> Host:
        """A home router: a public address on the internet side; it masquerades whatever sits behind it."""
        router = self.public_host(name)
        router.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        router.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", self._uplinks[name].dev_b, "-j", "MASQUERADE")
        # a home NAT forwards replies to connections its hosts opened, and nothing else
        router.run("iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        router.run("iptables", "-A", "FORWARD", "-i", self._uplinks[name].dev_b, "-j", "DROP")
        return router

    def nat_host(self, name: str, router: Optional[Host] = None) -> Host:
        """A host on a private subnet behind ``router`` (a new NAT router ``<name>-gw`` if None).

        It can open connections to public hosts (they see the router's address); no one outside can open one to it.
        """
        if router is None:
            router = self.nat_router(f"{name}-gw")
        host = self.namespace(name)
        link = self.connect(router, host)
        host.run("ip", "route", "add", "default", "via", link.ip_a)
        host.ip = link.ip_b
        host.router = router
        self._uplinks[name] = link
        return host

    def uplink(self, host: Host) -> Link:
        """The link from ``host`` towards the internet (its router's side first for NAT hosts)."""
        return self._uplinks[host.name]

    def shape(self, link: Link, *, rate_mbit: Optional[float] = None, loss: Optional[float] = None) -> None:
        """Limit ``link`` in both directions: a tbf rate (Mbit/s) and/or random loss (iptables statistic, 0..1).

        tbf's burst is 4 ms worth of the rate (at least 16 KiB), so short bursts do not exceed the rate by much.
        """
        for host, dev in ((link.a, link.dev_a), (link.b, link.dev_b)):
            if rate_mbit is not None:
                burst = max(int(rate_mbit * 1e6 / 8 * 0.004), 16384)
                host.run("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                         "burst", str(burst), "latency", "200ms")
            if loss is not None:
                if not 0 <= loss < 1:
                    raise NetLabError(f"loss must be in [0, 1), got {loss}")
                for chain in ("OUTPUT", "FORWARD"):
                    host.run("iptables", "-A", chain, "-o", dev, "-m", "statistic", "--mode", "random",
                             "--probability", str(loss), "-j", "DROP")

    def adopt(self, process: subprocess.Popen) -> None:
        """Stop ``process`` (its whole session: start it with ``start_new_session=True``) when the lab closes."""
        self._processes.append(process)

    # ---- teardown ----
    def close(self) -> None:
        """Stop every process started in the lab, then delete its namespaces (with their veths and rules)."""
        for process in self._processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for process in self._processes:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for host in list(self.hosts.values()):
            _kill_namespace_processes(host.netns)
            # deleting a namespace deletes its veth ends (and so their peers) and its iptables rules
            result = _sh("ip", "netns", "del", host.netns, check=False)
            if result.returncode != 0:
                logger.warning(f"could not delete namespace {host.netns}: {result.stderr.strip()}")
        self.hosts.clear()
        self.links.clear()
        self._uplinks.clear()
        self._internet = None
        self._processes.clear()

