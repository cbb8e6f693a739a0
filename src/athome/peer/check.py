"""``peer check``: is this machine ready to volunteer? Each problem is printed with the command that fixes it."""
from __future__ import annotations

import argparse
import asyncio
import socket
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_torch() -> CheckResult:
    try:
        import torch
    except ImportError:
        return CheckResult("torch", False, "not installed", "pip install torch")
    return CheckResult("torch", True, f"torch {torch.__version__}")


def check_gpu() -> CheckResult:
    import torch

    if not torch.cuda.is_available():
        return CheckResult(
            "gpu", True, "no CUDA GPU: experts will run on the CPU in bf16/fp32 (slower, still useful)",
        )
    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    if free < 1 << 30:
        return CheckResult(
            "gpu", False, f"{name}: only {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB",
            "close other GPU programs (nvidia-smi lists them), or join with --offload --max_memory 0.5",
        )
    return CheckResult("gpu", True, f"{name}: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")


def check_p2pd() -> CheckResult:
    from hivemind.p2p import P2P

    async def start_and_stop() -> str:
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            return str(p2p.peer_id)
        finally:
            await p2p.shutdown()

    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    try:
        # on hivemind's persistent loop: P2P's finalizers need a live event loop in their thread
        peer_id = RemoteExpertWorker.run_coroutine(asyncio.wait_for(start_and_stop(), timeout=30))
    except Exception as error:
        return CheckResult(
            "p2pd", False, f"the libp2p daemon failed to start: {error}",
            "pip install --force-reinstall hivemind==1.1.12  (its wheel ships the p2pd binary)",
        )
    return CheckResult("p2pd", True, f"libp2p daemon starts (test peer {peer_id[-8:]})")


def check_port(port: int) -> CheckResult:
    if not port:
        return CheckResult("port", True, "no fixed --port: any free port will do")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as error:
            return CheckResult(
                "port", False, f"TCP port {port} cannot be bound: {error.strerror}",
                f"find who holds it with `ss -ltnp 'sport = :{port}'`, or pick another: --port {port + 1}",
            )
    return CheckResult("port", True, f"TCP port {port} is free")


def check_reachability(args: argparse.Namespace) -> list[CheckResult]:
    """Join the run as a server would and ask the coordinator to dial this peer back from a fresh host, directly
    and through the coordinator's relay (a peer behind NAT can still serve that way)."""
    import tempfile
    from pathlib import Path

    from athome.dht import Identity, RunAddress, RunAddressError, start_dht
    from athome.netflags import dht_kwargs
    from athome.peer.reachability import shutdown_dht, wait_reachable_via_relay

    try:
        address = RunAddress.parse(args.run)
    except RunAddressError as error:
        return [CheckResult("reach", False, str(error), "copy the run address exactly as `peer coordinator` printed it")]
    identity = Identity.load_or_create(Path(tempfile.mkdtemp(prefix="athome-check-")) / "identity.key")
    args.initial_peers = [address.maddr, *args.initial_peers]
    network = dict(dht_kwargs(args), client_mode=True)  # the dial-back needs no DHT server
    if not args.no_relay:
        network.update(relays=[address.maddr], use_auto_relay=True)  # also reserve a slot, as `peer join` would
    try:
        dht = start_dht(identity, **network)
    except Exception as error:
        return [CheckResult(
            "reach", False, f"could not join the run at {address}: {str(error).splitlines()[-1]}",
            "check the address; is the coordinator up? can this machine open outgoing TCP connections?",
        )]
    try:
        answer = wait_reachable_via_relay(dht, address.coordinator_id, timeout=0 if args.no_relay else 30)
    finally:
        shutdown_dht(dht)
    if answer.get("reachable"):
        return [CheckResult("reach", True, f"the run can dial this peer directly at {answer['maddr']}")]
    direct = CheckResult("reach", False, f"the run cannot dial this peer directly ({answer.get('error')})",
                         reachability_fixes(args, answer))
    if args.no_relay:
        return [direct]
    if answer.get("relayed_reachable"):
        relay = CheckResult("relay", True, "the run reaches this peer through its relay (the coordinator): "
                                           "`peer join` serves through it by itself (slower than direct)")
    else:
        relay = CheckResult("relay", False, f"the run cannot reach this peer through its relay either "
                                            f"({answer.get('relay_error')})",
                            "until the steps above work, only train: peer train --run " f"{args.run} --client_mode")
    return [direct, relay]


def reachability_fixes(args: argparse.Namespace, answer: dict) -> str:
    """Numbered steps, with this machine's LAN address, the public address the run saw, and a port filled in."""
    import ipaddress

    port = args.port or 31337
    local_ip = next(
        (m.split("/")[2] for m in answer.get("maddrs", ())
         if m.startswith("/ip4/") and not ipaddress.ip_address(m.split("/")[2]).is_loopback),
        "<this machine's LAN IP>",
    )
    public_ip = args.public_ip or answer.get("observed_ip") or "<your public IP>"
    run = args.run
    return (
        f"\n     1) on your router, forward TCP port {port} to {local_ip}:{port} (this machine)"
        f"\n     2) join with that port and the public address the run sees you at:"
        f"\n        peer join --run {run} --port {port} --public_ip {public_ip} --experts auto"
        f"\n     3) check it: peer check --run {run} --port {port} --public_ip {public_ip}"
        f"\n     (cannot open a port? `peer join --run {run} --experts auto` serves through the run's relay when the "
        f"relay check passes; or only train: peer train --run {run} --client_mode)"
    )


def run_check(args: argparse.Namespace) -> None:
    console = Console(soft_wrap=True)
    results = [check_torch(), check_gpu(), check_p2pd(), check_port(args.port or 0)]
    if args.run:
        results.extend(check_reachability(args))
    problems = 0
    for result in results:
        mark = "[green]ok[/]" if result.ok else "[red]problem[/]"
        console.print(f"{mark:>18}  {result.name:5} {escape(result.detail)}", highlight=False)
    for result in results:
        if not result.ok:
            problems += 1
            console.print(f"  {problems}. fix {result.name}: {escape(result.fix)}", highlight=False)
    if problems:
        raise SystemExit(1)
    console.print("all checks passed")
