"""Serving and fetching proof bundles over hivemind's p2p (the same transport as expert calls).

:class:`ProofServicer` runs in a trainer (its own bundles) or a validator (failing bundles it keeps as evidence for
the coordinator). One request ``(owner, step)``; the answer streams the bundle's MessagePack bytes in chunks.
:class:`RemoteProofSource` is the client, a :class:`~athome.verification.validator.ProofSource`. A bundle is
authenticated by its hashes against the owner's signed commitment, not by who serves it, so evidence can be relayed.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Optional

from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from athome.verification.proof import MAX_PROOF_BYTES, ProofFormatError, StepProof
from athome.verification.validator import ProofUnavailable

logger = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024


class ProofServicer(ServicerBase):
    """Answers ``rpc_proof`` with ``lookup(owner, step)`` (None: "not found")."""

    def __init__(self, lookup: Callable[[str, int], Optional[StepProof]]):
        self.lookup = lookup

    async def rpc_proof(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            query = MSGPackSerializer.loads(request.metadata)
            owner, step = str(query["owner"]), int(query["step"])
        except Exception:
            yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(dict(found=False, error="bad request")))
            return
        proof = self.lookup(owner, step)
        if proof is None:
            yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(dict(found=False)))
            return
        data = await asyncio.get_event_loop().run_in_executor(None, proof.to_bytes)  # MBs: off the event loop
        yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(dict(found=True, size=len(data))))
        for offset in range(0, len(data), CHUNK_BYTES):
            yield runtime_pb2.ExpertResponse(metadata=data[offset:offset + CHUNK_BYTES])


async def fetch_proof(p2p: P2P, holder: str, owner: str, step: int) -> Optional[StepProof]:
    stub = ProofServicer.get_stub(p2p, PeerID.from_base58(holder))
    request = runtime_pb2.ExpertRequest(uid="proof", metadata=MSGPackSerializer.dumps(dict(owner=owner, step=step)))
    stream = await stub.rpc_proof(request)
    header = MSGPackSerializer.loads((await stream.__anext__()).metadata)
    if not header.get("found"):
        return None
    size = int(header["size"])
    if not 0 < size <= MAX_PROOF_BYTES:
        raise ProofFormatError(f"{holder} announced a proof of {size} bytes")
    parts, received = [], 0
    async for message in stream:
        parts.append(message.metadata)
        received += len(message.metadata)
        if received > size:
            raise ProofFormatError(f"{holder} sent more than the {size} bytes it announced")
    if received != size:
        raise ProofFormatError(f"{holder} sent {received} of {size} bytes")
    return await asyncio.get_event_loop().run_in_executor(None, StepProof.from_bytes, b"".join(parts))


class RemoteProofSource:
    """Fetches bundles from peers. ``None`` means the holder answered that it has no such bundle; any other failure
    (unreachable, timeout, malformed answer) raises :class:`~athome.verification.validator.ProofUnavailable`."""

    def __init__(self, p2p: P2P, timeout: float = 60.0):
        self.p2p, self.timeout = p2p, timeout

    def fetch(self, holder: str, owner: str, step: int) -> Optional[StepProof]:
        try:
            return RemoteExpertWorker.run_coroutine(
                asyncio.wait_for(fetch_proof(self.p2p, holder, owner, step), self.timeout)
            )
        except Exception as error:
            logger.info(f"Could not fetch the bundle of {owner[-8:]} step {step} from {holder[-8:]}: {error!r}")
            raise ProofUnavailable(f"{holder}: {error!r}") from None
