"""``peer check``: is this machine ready to volunteer? Each problem is printed with the command that fixes it."""
from __future__ import annotations

import argparse
import asyncio
import socket
from dataclasses import dataclass

from rich.console import Console


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

    try:
        peer_id = asyncio.run(asyncio.wait_for(start_and_stop(), timeout=30))
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


def run_check(args: argparse.Namespace) -> None:
    console = Console()
    results = [check_torch(), check_gpu(), check_p2pd(), check_port(args.port or 0)]
    problems = 0
    for result in results:
        mark = "[green]ok[/]" if result.ok else "[red]problem[/]"
        console.print(f"{mark:>18}  {result.name:5} {result.detail}", highlight=False)
    for result in results:
        if not result.ok:
            problems += 1
            console.print(f"  {problems}. fix {result.name}: {result.fix}", highlight=False)
    if problems:
        raise SystemExit(1)
    console.print("all checks passed")
