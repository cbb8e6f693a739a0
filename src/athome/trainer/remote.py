"""Routing tokens to remote experts: the replica-aware registry and the grouped network dispatcher.

hivemind's ``RemoteMixtureOfExperts`` sends one RPC per (sample, expert), so its throughput stays flat as the
batch grows. Here each layer's forward sends **one request per chosen expert** carrying all of that expert's
tokens, all experts of the layer concurrently; backward does the same. Requests use hivemind's expert protocol
(``expert_forward`` / ``expert_backward``), so any hivemind-compatible host can serve.

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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.client.expert import expert_backward, expert_forward, get_server_stub
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P, PeerID
from torch.autograd.function import once_differentiable

from athome.dht import get_records
from athome.dht.schemas import ServerRecord

logger = logging.getLogger(__name__)


@dataclass
class ReplicaStats:
    """What this trainer has seen of one host: latency (EWMA, seconds per request) and recent failures."""

    latency: float = 0.05
    failures: int = 0
    cooldown_until: float = 0.0

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
    banned peers and hosts in cool-down after a failure.
    """

    dht: DHT
    servers_key: str
    refresh_period: float = 5.0
    banned: set = field(default_factory=set)
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
            self._refreshed_at = time.monotonic()

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
    """A :class:`~athome.model.moe.Dispatcher` whose experts are remote: one grouped RPC per chosen expert.

    :param uids: the layer's expert uids, in gate order
    :param timeout: seconds a request may take before its replica is skipped for this step
    """

    def __init__(self, uids: Sequence[str], registry: ExpertRegistry, p2p: P2P, timeout: float = 20.0):
        self.uids, self.registry, self.p2p, self.timeout = list(uids), registry, p2p, timeout
        self.last_answered_fraction = 1.0

    def __call__(self, x: torch.Tensor, expert_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, answered = _GroupedRemoteCall.apply(x, expert_index, self)
        return outputs, answered

    def plan(self, expert_index: torch.Tensor) -> List[_Call]:
        num_tokens, k = expert_index.shape
        flat = expert_index.reshape(-1)
        token_of_slot = torch.arange(num_tokens).repeat_interleave(k)
        slot_of_slot = torch.arange(k).repeat(num_tokens)
        calls = []
        for expert in torch.unique(flat).tolist():
            selected = (flat == expert).nonzero(as_tuple=True)[0]
            peer = self.registry.choose(self.uids[expert])
            if peer is not None:
                calls.append(_Call(self.uids[expert], peer, token_of_slot[selected], slot_of_slot[selected]))
        return calls

    def run_all(self, coroutines: Iterable) -> List:
        async def gather():
            return await asyncio.gather(*coroutines, return_exceptions=True)

        return RemoteExpertWorker.run_coroutine(gather())

    async def timed(self, call: _Call, coroutine) -> List[torch.Tensor]:
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(coroutine, self.timeout)
        except BaseException:
            self.registry.stats(call.peer_id).record_failure()
            raise
        self.registry.stats(call.peer_id).record_success(time.monotonic() - started)
        return result

    def forward_one(self, call: _Call, inputs: torch.Tensor):
        stub = get_server_stub(self.p2p, PeerID.from_base58(call.peer_id))
        serialized = [serialize_torch_tensor(inputs)]
        return self.timed(call, expert_forward(call.uid, [inputs], serialized, stub))

    def backward_one(self, call: _Call, inputs: torch.Tensor, grad_outputs: torch.Tensor):
        stub = get_server_stub(self.p2p, PeerID.from_base58(call.peer_id))
        serialized = [serialize_torch_tensor(inputs), serialize_torch_tensor(grad_outputs)]
        return self.timed(call, expert_backward(call.uid, [inputs, grad_outputs], serialized, stub))


class _GroupedRemoteCall(torch.autograd.Function):
    """Forward: one request per chosen expert, concurrently. Backward: the same for the replicas that answered."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, expert_index: torch.Tensor, dispatcher: RemoteDispatcher):
        num_tokens, k = expert_index.shape
        x_wire = x.detach().to("cpu", torch.float32)
        calls = dispatcher.plan(expert_index.cpu())
        inputs = [x_wire.index_select(0, call.tokens) for call in calls]
        results = dispatcher.run_all(dispatcher.forward_one(c, i) for c, i in zip(calls, inputs))

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
        sends = [(call, inputs, grad_wire[call.tokens, call.slots]) for call, inputs in ctx.done]
        results = dispatcher.run_all(dispatcher.backward_one(c, i, g) for c, i, g in sends)
        grad_x = torch.zeros(shape, dtype=torch.float32)
        for (call, _, _), result in zip(sends, results):
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
