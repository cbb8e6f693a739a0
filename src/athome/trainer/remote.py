"""Routing tokens to remote experts: the replica-aware registry and the grouped network dispatcher.

hivemind's ``RemoteMixtureOfExperts`` sends one RPC per (sample, expert), so its throughput stays flat as the
batch grows. Here each layer's forward sends **one request per host** carrying all tokens of every chosen expert
on that host, all hosts concurrently; backward does the same. athome hosts answer it in their own process
(``DirectExpertServicer``); a plain hivemind host gets hivemind's per-expert ``rpc_forward`` / ``rpc_backward``.

A replica that fails or times out is skipped for the step (its slots come back unanswered and the gate
renormalises over the rest) and cooled down for a while; the registry re-reads declarations periodically.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.client.expert import expert_backward, expert_forward
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import MAX_UNARY_PAYLOAD_SIZE
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from torch.autograd.function import once_differentiable

from athome.dht import get_records
from athome.dht.receipts import ReceiptBook
from athome.dht.schemas import ServerRecord
from athome.peer.reachability import connect_via_relay
from athome.peer.server import DirectExpertServicer

logger = logging.getLogger(__name__)
ATHOME, HIVEMIND = "athome", "hivemind"  # expert protocols a host may speak


@dataclass
class ReplicaStats:
    """What this trainer has seen of one host: latency (EWMA, seconds per request) and recent failures."""

    latency: float = 0.05
    failures: int = 0
    cooldown_until: float = 0.0
    protocol: Optional[str] = None  # ATHOME or HIVEMIND once learned from a call

    def record_success(self, seconds: float) -> None:
        self.latency = 0.8 * self.latency + 0.2 * seconds
        self.failures = 0

    def record_failure(self) -> None:
        self.failures += 1
        self.cooldown_until = time.monotonic() + min(60.0, 2.0 ** self.failures)


@dataclass
class ExpertRegistry:
    """Live replicas of every expert, read from the run's signed declarations; chooses a replica per request.

    A replica is chosen by expected latency (measured EWMA, scaled by the host's declared load), skipping
    banned peers and hosts in cool-down after a failure. Direct replicas are preferred to relayed ones (hosts
    behind NAT, reached through ``relay``), as Petals does: a relayed replica is used only when no direct one is
    available, since every byte to it crosses the relay twice.

    :param relay: multiaddr of the relay that relayed hosts reserved a slot with; default: this DHT's first
      bootstrap peer, which for every athome peer is the run address (the coordinator relays).
    """

    dht: DHT
    servers_key: str
    refresh_period: float = 5.0
    banned: set = field(default_factory=set)
    receipts: Optional[ReceiptBook] = None  # set by a trainer: every dispatcher counts answered calls per host in it
    relay: Optional[str] = None
    _relayed: set = field(default_factory=set)
    _replicas: Dict[str, List[Tuple[str, ServerRecord]]] = field(default_factory=dict)
    _stats: Dict[str, ReplicaStats] = field(default_factory=dict)
    _refreshed_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._refreshed_at < self.refresh_period:
            return
        records = get_records(self.dht, self.servers_key, ServerRecord)
        replicas: Dict[str, List[Tuple[str, ServerRecord]]] = {}
        for peer_id, (record, _) in records.items():
            if peer_id in self.banned:
                continue
            for uid in record.experts:
                replicas.setdefault(uid, []).append((peer_id, record))
        with self._lock:
            self._replicas = replicas
            self._relayed = {peer for peer, (record, _) in records.items() if record.relayed}
            self._refreshed_at = time.monotonic()

    def relay_for(self, peer_id: str) -> Optional[str]:
        """The relay to dial ``peer_id`` through, or None for a direct host."""
        if peer_id not in self._relayed:
            return None
        if self.relay is None:
            self.relay = next((str(p) for p in self.dht.initial_peers or () if "/p2p/" in str(p)), None)
        return self.relay

    def available(self, uids: Sequence[str]) -> torch.Tensor:
        """Mask over ``uids``: True where at least one replica is declared and not cooling down."""
        now = time.monotonic()
        with self._lock:
            return torch.tensor(
                [any(self.stats(p).cooldown_until <= now for p, _ in self._replicas.get(uid, ())) for uid in uids],
                dtype=torch.bool,
            )

    def stats(self, peer_id: str) -> ReplicaStats:
        return self._stats.setdefault(peer_id, ReplicaStats())

    def choose(self, uid: str) -> Optional[str]:
        now = time.monotonic()
        with self._lock:
            candidates = [
                (self.stats(peer).latency * (1.0 + record.load), peer)
                for peer, record in self._replicas.get(uid, ())
                if self.stats(peer).cooldown_until <= now
            ]
            direct = [candidate for candidate in candidates if candidate[1] not in self._relayed]
            candidates = direct or candidates
        if not candidates:
            return None
        if len(candidates) > 1 and random.random() < 0.1:
            return random.choice(candidates)[1]  # explore, so a replica that got faster is noticed
        return min(candidates)[1]

    def num_hosts(self) -> int:
        with self._lock:
            return len({peer for replicas in self._replicas.values() for peer, _ in replicas})


@dataclass
class _Call:
    uid: str
    peer_id: str
    tokens: torch.Tensor  # token index of each row sent
    slots: torch.Tensor  # which of the token's k slots it fills


class RemoteDispatcher:
    """A :class:`~athome.model.moe.Dispatcher` whose experts are remote: one RPC per host per layer and pass.

    Each forward (and backward) sends **one request per host** carrying every chosen expert that host serves, with
    all of each expert's tokens, to every host concurrently, over athome's direct protocol
    (:class:`~athome.peer.server.DirectExpertServicer`). A host that lacks it (a plain hivemind server) is served
    with hivemind's protocol instead, one request per expert; which protocol a host speaks is remembered.

    :param uids: the layer's expert uids, in gate order
    :param timeout: seconds a host's request may take before the host is skipped for this step
    :param wire_compression: hivemind ``CompressionType`` of activations and gradients on the wire, both ways.
      The default, ``MEANSTD_16BIT``, sends each row as fp16 after subtracting its mean and dividing by its std:
      relative error 2e-4 (of the tensor's norm) for activations and gradients of any scale, where plain
      ``FLOAT16`` loses gradients of 1e-8 entirely. It halves the bytes, and bytes are what a realistic step
      waits for (MB-sized requests through two p2pd daemons). ``NONE`` is exact.
    """

    def __init__(
        self,
        uids: Sequence[str],
        registry: ExpertRegistry,
        p2p: P2P,
        timeout: float = 20.0,
        wire_compression: int = runtime_pb2.CompressionType.MEANSTD_16BIT,
    ):
        self.uids, self.registry, self.p2p, self.timeout = list(uids), registry, p2p, timeout
        self.wire_compression = wire_compression
        self.last_answered_fraction = 1.0
        self._forced_protocol: Optional[str] = None
        self._stubs: Dict[Tuple[str, str], object] = {}

    def __call__(self, x: torch.Tensor, expert_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, answered = _GroupedRemoteCall.apply(x, expert_index, self)
        return outputs, answered

    def force_protocol(self, protocol: Optional[str]) -> None:
        """Use ``"athome"`` or ``"hivemind"`` for every host (benchmarks, tests); ``None``: per host, as learned."""
        assert protocol in (None, ATHOME, HIVEMIND)
        self._forced_protocol = protocol

    def plan(self, expert_index: torch.Tensor) -> List[_Call]:
        num_tokens, k = expert_index.shape
        flat = expert_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, in token order
        counts = torch.bincount(flat, minlength=len(self.uids)).tolist()
        calls, start = [], 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            selected, start = order[start : start + count], start + count
            peer = self.registry.choose(self.uids[expert])
            if peer is not None:
                calls.append(_Call(self.uids[expert], peer, selected // k, selected % k))
        return calls

    def run_hosts(self, calls: Sequence[_Call], tensors: Sequence[List[torch.Tensor]], forward: bool) -> List:
        """Send every call, grouped into one request per host, all hosts concurrently.

        Returns, per call, its output tensors or the exception that made it fail.
        """
        by_host: Dict[str, List[int]] = {}
        for index, call in enumerate(calls):
            by_host.setdefault(call.peer_id, []).append(index)

        async def gather():
            return await asyncio.gather(
                *(
                    self._timed(peer, self._call_host(peer, [calls[i] for i in indices], [tensors[i] for i in indices], forward))
                    for peer, indices in by_host.items()
                ),
                return_exceptions=True,
            )

        results: List = [None] * len(calls)
        for (peer, indices), host_result in zip(by_host.items(), RemoteExpertWorker.run_coroutine(gather())):
            for position, index in enumerate(indices):
                results[index] = host_result if isinstance(host_result, BaseException) else host_result[position]
                if self.registry.receipts is not None and not isinstance(results[index], BaseException):
                    self.registry.receipts.count(peer, forward, len(calls[index].tokens))  # signed for the host's credit
        return results

    async def _timed(self, peer_id: str, coroutine) -> List:
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(coroutine, self.timeout)
        except BaseException:
            self.registry.stats(peer_id).record_failure()
            raise
        if any(isinstance(r, BaseException) for r in result):
            self.registry.stats(peer_id).record_failure()  # a host that fails an expert is cooled down all the same
        else:
            self.registry.stats(peer_id).record_success(time.monotonic() - started)
        return result

    async def _call_host(self, peer_id: str, calls: List[_Call], tensors: List[List[torch.Tensor]], forward: bool) -> List:
        stats = self.registry.stats(peer_id)
        relay = self.registry.relay_for(peer_id)
        if relay is not None:  # a host behind NAT: (re)open the circuit through the relay; no-op while it is open
            await connect_via_relay(self.p2p, PeerID.from_base58(peer_id), relay)
        protocol = self._forced_protocol or stats.protocol
        if protocol != HIVEMIND:
            try:
                results = await self._call_direct(peer_id, calls, tensors, forward)
                stats.protocol = ATHOME
                return results
            except P2PDaemonError as error:
                if self._forced_protocol is not None or "not supported" not in str(error):
                    raise
                logger.info(f"host {peer_id[-8:]} does not speak athome's direct protocol; using hivemind's")
                stats.protocol = HIVEMIND
        return list(
            await asyncio.gather(
                *(self._call_hivemind(peer_id, call, call_tensors, forward) for call, call_tensors in zip(calls, tensors)),
                return_exceptions=True,
            )
        )

    async def _call_direct(self, peer_id: str, calls: List[_Call], tensors: List[List[torch.Tensor]], forward: bool) -> List:
        serialized = [[serialize_torch_tensor(t, self.wire_compression) for t in call_tensors] for call_tensors in tensors]
        limit = MAX_UNARY_PAYLOAD_SIZE - 64 * 1024  # headroom for uids and framing
        chunks = _chunks_under(serialized, limit)

        async def send(chunk: List[int]) -> List:
            if len(chunk) == 1 and _nbytes(serialized[chunk[0]]) > limit:
                # one expert's tensors alone exceed a unary message: hivemind's protocol streams them
                call = calls[chunk[0]]
                return list(await asyncio.gather(
                    self._call_hivemind(peer_id, call, tensors[chunk[0]], forward), return_exceptions=True
                ))
            request = runtime_pb2.ExpertRequest(
                tensors=[t for i in chunk for t in serialized[i]],
                metadata=MSGPackSerializer.dumps(dict(
                    uids=[calls[i].uid for i in chunk], counts=[len(serialized[i]) for i in chunk],
                    compression=self.wire_compression,
                )),
            )
            stub = self._stub(peer_id, ATHOME)
            response = await (stub.rpc_forward(request) if forward else stub.rpc_backward(request))
            meta = MSGPackSerializer.loads(response.metadata)
            results, start = [], 0
            for count, error in zip(meta["counts"], meta["errors"]):
                if error is not None:
                    results.append(RemoteExpertError(error))
                else:
                    results.append([deserialize_torch_tensor(t) for t in response.tensors[start : start + count]])
                start += count
            if len(results) != len(chunk):
                raise RemoteExpertError(f"host answered {len(results)} experts of {len(chunk)}")
            return results

        # chunks go out concurrently; a failed chunk fails the whole host request (the host is then cooled down)
        return [result for chunk_results in await asyncio.gather(*map(send, chunks)) for result in chunk_results]

    async def _call_hivemind(self, peer_id: str, call: _Call, tensors: List[torch.Tensor], forward: bool):
        serialized = [serialize_torch_tensor(t, self.wire_compression) for t in tensors]
        stub = self._stub(peer_id, HIVEMIND)
        if forward:
            return await expert_forward(call.uid, tensors, serialized, stub)
        return await expert_backward(call.uid, tensors, serialized, stub)

    def _stub(self, peer_id: str, protocol: str):
        # stubs and PeerIDs are cached: parsing a base58 ID and building a stub per call shows up at ~10 calls/step
        key = (peer_id, protocol)
        stub = self._stubs.get(key)
        if stub is None:
            servicer = DirectExpertServicer if protocol == ATHOME else ConnectionHandler
            stub = self._stubs[key] = servicer.get_stub(self.p2p, PeerID.from_base58(peer_id))
        return stub


class RemoteExpertError(RuntimeError):
    """The host answered, but this expert's computation failed there (e.g. its input was refused)."""


def _nbytes(tensors: Sequence[runtime_pb2.Tensor]) -> int:
    return sum(len(t.buffer) for t in tensors)


def _chunks_under(serialized: Sequence[Sequence[runtime_pb2.Tensor]], limit: int) -> List[List[int]]:
    """Consecutive groups of call indices whose serialized tensors fit in ``limit`` bytes (an oversize call alone)."""
    chunks: List[List[int]] = []
    size = 0
    for index, tensors in enumerate(serialized):
        nbytes = _nbytes(tensors)
        if chunks and size + nbytes <= limit:
            chunks[-1].append(index)
            size += nbytes
        else:
            chunks.append([index])
            size = nbytes
    return chunks


class _GroupedRemoteCall(torch.autograd.Function):
    """Forward: one request per host, concurrently. Backward: the same for the experts that answered."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, expert_index: torch.Tensor, dispatcher: RemoteDispatcher):
        num_tokens, k = expert_index.shape
        x_wire = x.detach().to("cpu", torch.float32)
        calls = dispatcher.plan(expert_index.cpu())
        inputs = [x_wire.index_select(0, call.tokens) for call in calls]
        results = dispatcher.run_hosts(calls, [[i] for i in inputs], forward=True)

        outputs = torch.zeros(num_tokens, k, x.shape[-1])
        answered = torch.zeros(num_tokens, k, dtype=torch.bool)
        done = []
        for call, call_inputs, result in zip(calls, inputs, results):
            if isinstance(result, BaseException):
                logger.warning(f"{call.uid} on {call.peer_id[-8:]} failed in forward ({_describe(result)}); skipped")
                continue
            outputs[call.tokens, call.slots] = result[0].float()
            answered[call.tokens, call.slots] = True
            done.append((call, call_inputs))
        dispatcher.last_answered_fraction = answered.float().mean().item() if answered.numel() else 1.0
        ctx.dispatcher, ctx.done, ctx.x_meta = dispatcher, done, (x.shape, x.dtype, x.device)
        ctx.mark_non_differentiable(answered)
        return outputs.to(device=x.device, dtype=x.dtype), answered.to(x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_outputs: torch.Tensor, _grad_answered):
        shape, dtype, device = ctx.x_meta
        dispatcher: RemoteDispatcher = ctx.dispatcher
        grad_wire = grad_outputs.detach().to("cpu", torch.float32)
        calls = [call for call, _ in ctx.done]
        tensors = [[inputs, grad_wire[call.tokens, call.slots]] for call, inputs in ctx.done]
        results = dispatcher.run_hosts(calls, tensors, forward=False)
        grad_x = torch.zeros(shape, dtype=torch.float32)
        for call, result in zip(calls, results):
            if isinstance(result, BaseException):
                logger.warning(f"{call.uid} on {call.peer_id[-8:]} failed in backward ({_describe(result)}); skipped")
                continue
            grad_x.index_add_(0, call.tokens, result[0].float())
        return grad_x.to(device=device, dtype=dtype), None, None


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1][:200]}" if text else type(error).__name__
