"""Can the run reach this peer? A dial-back from another peer of the run, through a fresh libp2p host.

A peer asks a *checker* (the coordinator runs one) to dial it back. The checker starts a throwaway p2pd with no
connections, so the answer says whether a stranger on the internet could connect, not whether an existing
connection happens to be open. It only ever dials the peer ID that asked, one dial at a time.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import List, Sequence

from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)
DIAL_TIMEOUT = 10.0


class ReachabilityServicer(ServicerBase):
    """Answers ``rpc_dial_back``: tries to connect to the asking peer at the addresses it names.

    The request's metadata is msgpack ``{"maddrs": [str, ...]}``; the response's metadata is msgpack
    ``{"reachable": bool, "maddr": str | None, "error": str}``.
    """

    def __init__(self, host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)):
        # the stranger listens on the checker's interfaces but any free port (the checker holds its own)
        self.host_maddrs = [re.sub(r"/(tcp|udp)/\d+", r"/\1/0", maddr) for maddr in host_maddrs]
        self._one_at_a_time = asyncio.Semaphore(1)

    async def rpc_dial_back(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            maddrs = [str(m) for m in MSGPackSerializer.loads(request.metadata)["maddrs"]][:16]
        except Exception:
            return _answer(False, None, "malformed request")
        async with self._one_at_a_time:
            result = await dial(context.remote_id, maddrs, self.host_maddrs)
        return _answer(*result)


def _answer(reachable: bool, maddr, error: str) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(dict(reachable=reachable, maddr=maddr, error=error)))


async def dial(peer_id: PeerID, maddrs: List[str], host_maddrs: Sequence[str]) -> tuple[bool, str | None, str]:
    """Dial ``peer_id`` at each of ``maddrs`` from a fresh libp2p host; the first that connects wins."""
    stranger = await P2P.create(host_maddrs=list(host_maddrs))
    try:
        errors = []
        for maddr in maddrs:
            if "/p2p-circuit" in maddr:
                continue  # a relayed address is not direct reachability
            transport = maddr.split("/p2p/", 1)[0]  # the control protocol wants the address without the peer ID
            try:
                await asyncio.wait_for(stranger._client.connect(peer_id, [Multiaddr(transport)]), DIAL_TIMEOUT)
                return True, maddr, ""
            except Exception as error:
                errors.append(f"{maddr}: {str(error).splitlines()[-1][:160] if str(error) else type(error).__name__}")
        return False, None, "; ".join(errors) or "no direct address to dial"
    finally:
        await stranger.shutdown()


async def ask_dial_back(p2p: P2P, checker: PeerID, maddrs: Sequence[str], timeout: float = 60) -> dict:
    stub = ReachabilityServicer.get_stub(p2p, checker)
    request = runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps(dict(maddrs=list(maddrs))))
    response = await stub.rpc_dial_back(request, timeout=timeout)
    return MSGPackSerializer.loads(response.metadata)


def serve_reachability(dht, host_maddrs: Sequence[str]) -> ReachabilityServicer:
    """Register a dial-back checker on this process's replica of ``dht``'s p2p daemon."""
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    servicer = ReachabilityServicer(host_maddrs)

    async def register():
        # keep the replica referenced: when it is garbage-collected, its handlers silently stop answering
        servicer.p2p = await dht.replicate_p2p()
        await servicer.add_p2p_handlers(servicer.p2p)

    RemoteExpertWorker.run_coroutine(register())
    return servicer


def check_reachable(dht, checker_id: str, timeout: float = 60) -> dict:
    """Ask ``checker_id`` to dial this peer back at its visible addresses; returns the checker's answer."""
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    maddrs = [str(m) for m in dht.get_visible_maddrs(latest=True)]

    async def ask():
        return await ask_dial_back(await dht.replicate_p2p(), PeerID.from_base58(checker_id), maddrs, timeout)

    return dict(RemoteExpertWorker.run_coroutine(ask()), maddrs=maddrs)
