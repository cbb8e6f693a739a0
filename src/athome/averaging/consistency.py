"""Consistent round outcomes: members whose all-reduce was incomplete repair from a member that completed it.

Why: in a butterfly all-reduce every member receives each part's aggregate from that part's reducer. A reducer that
dies (or freezes) mid-stream can deliver its part to some senders and not to others, so some survivors hold the
complete aggregate and others a partial one. Applying or dropping the round independently on each peer would leave
survivors in different states.

Protocol (athome peers only; it runs in the averager process):

1. Before its all-reduce, a member registers the round in :class:`RoundOutcomes` (group ID, members, deadline).
2. After its all-reduce, a member whose every part arrived ("complete") applies the aggregate and publishes the
   tensors it now holds, without waiting for anybody: a round without failures costs nothing more than keeping one
   copy of the vector in memory until the round's deadline (at most ``max_rounds`` rounds are kept). An incomplete
   member keeps its tensors for now and publishes after step 3: the outcome it copied, or "incomplete". So a
   member that was repaired can repair the others in turn, e.g. when the complete member dies after answering it.
3. An incomplete member asks every other member (concurrently, over the averager's p2p namespace,
   ``rpc_round_result``) for its published outcome. A member answers once its own outcome is known (it waits at
   most until its round deadline). The first *complete* answer that agrees with the parts the asker did receive
   (within the codec's error, :func:`agreement_tolerance`) and has the right size and only finite values replaces
   the asker's tensors; if every member answered "incomplete", or ``repair_timeout`` expires, the asker keeps its
   tensors and the round does not count (when no member completed, every survivor thus waits ``repair_timeout``).

Guarantee, for members that stay alive and can exchange messages within ``repair_timeout`` ("survivors"): when
the round ends, either every survivor holds the aggregate published by some complete member (status "ok", or "ok"
with ``repaired_from`` set), or no survivor completed the round and every survivor holds exactly its tensors from
before the round. A member counts as complete only if it received every part, so the aggregate is the same on all
survivors: bit-identical for repaired members and those they repaired from, equal up to float rounding (codec
"none") or the codec's error (fp16/uint8) between complete members, which apply their own deltas. The time bound is
the round's all-reduce limit plus ``repair_timeout``.

Not covered: a survivor that cannot reach any complete member within ``repair_timeout`` keeps its tensors (it is
reported as partial and catches up in later rounds); Byzantine members that publish a forged aggregate are limited
to the parts the asker did not receive (the rest is cross-checked), the same parts whose reducer failed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from hivemind.compression import CompressionBase, CompressionInfo, Float16Compression, NoCompression
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2

from athome.averaging.compression import Quantile8BitCodec, Uniform8BitCodec, deserialize_tensor
from athome.numerics import all_finite

logger = logging.getLogger(__name__)

# elements per message of a repair stream (2 MiB of fp32; well under p2pd's message limit)
REPAIR_CHUNK_ELEMENTS = 1 << 19


@dataclass
class _Outcome:
    members: Tuple[PeerID, ...]
    deadline: float  # time.monotonic() after which nobody should still ask
    published: asyncio.Event = field(default_factory=asyncio.Event)
    averaged: Optional[List[torch.Tensor]] = None  # None: incomplete (or not yet published)


class RoundOutcomes:
    """Averager-process registry of this peer's outcome for its latest rounds, served to group members.

    :param max_rounds: keep at most this many rounds; each complete one holds a copy of the vector until its
      deadline (the round's time limit plus the repair window), then frees it. Two, so that a straggler of the
      previous round can still be repaired while the next round runs
    """

    def __init__(self, max_rounds: int = 2):
        self.max_rounds = max_rounds
        self._outcomes: "OrderedDict[bytes, _Outcome]" = OrderedDict()

    def expect(self, group_id: bytes, members: Sequence[PeerID], deadline: float) -> None:
        """Register a round before its all-reduce starts, so that early askers wait for its outcome."""
        self._prune()
        self._outcomes[group_id] = _Outcome(tuple(members), deadline)
        while len(self._outcomes) > self.max_rounds:
            self._outcomes.popitem(last=False)

    def publish(self, group_id: bytes, averaged: Optional[List[torch.Tensor]]) -> None:
        """This peer's outcome: the tensors it holds after a complete round, or None (incomplete)."""
        outcome = self._outcomes.get(group_id)
        if outcome is None or outcome.published.is_set():
            return
        outcome.averaged = averaged
        outcome.published.set()
        if averaged is not None:  # free the copy at the deadline even if no other round comes to prune it
            loop = asyncio.get_event_loop()
            loop.call_later(max(0.0, outcome.deadline - time.monotonic()), self._release, group_id)

    def _release(self, group_id: bytes) -> None:
        outcome = self._outcomes.get(group_id)
        if outcome is not None:
            outcome.averaged = None  # askers past the deadline are told "incomplete"

    def known(self, group_id: bytes) -> bool:
        return group_id in self._outcomes

    def _prune(self) -> None:
        now = time.monotonic()
        for group_id in [g for g, o in self._outcomes.items() if o.deadline < now and o.published.is_set()]:
            del self._outcomes[group_id]

    async def serve(self, group_id: bytes, asker: PeerID) -> AsyncIterator[averaging_pb2.AveragingData]:
        """Answer one member's ``rpc_round_result``: AVERAGED_PART chunks of the flat vector, or one message with
        CANCELLED (incomplete here), BAD_GROUP_ID (unknown round) or PROTOCOL_VIOLATION (asker not a member)."""
        outcome = self._outcomes.get(group_id)
        if outcome is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        if asker not in outcome.members:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        try:
            await asyncio.wait_for(outcome.published.wait(), max(0.0, outcome.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        averaged = outcome.averaged
        if averaged is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.CANCELLED)
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in averaged])
        codec = NoCompression()
        for start in range(0, flat.numel(), REPAIR_CHUNK_ELEMENTS):
            chunk = flat[start : start + REPAIR_CHUNK_ELEMENTS]
            yield averaging_pb2.AveragingData(
                code=averaging_pb2.AVERAGED_PART, tensor_part=codec.compress(chunk, CompressionInfo.from_tensor(chunk))
            )


def agreement_tolerance(codec: CompressionBase, reference: torch.Tensor) -> float:
    """Largest difference expected between two members' aggregates for the same elements (per element)."""
    if reference.numel() == 0:
        return 0.0
    scale = float(reference.abs().max())
    if isinstance(codec, Float16Compression):
        return 4 * 2.0**-11 * scale + 1e-6
    if isinstance(codec, (Uniform8BitCodec, Quantile8BitCodec)):
        return 4 * float(reference.max() - reference.min()) / 255 + 1e-6
    if isinstance(codec, NoCompression):
        return 1e-5 * scale + 1e-6
    return float("inf")  # an unknown codec: size and finiteness checks only


async def fetch_round_result(
    stub_for: Callable[[PeerID], Any],
    group_id: bytes,
    members: Sequence[PeerID],
    own: torch.Tensor,
    received: torch.Tensor,
    tolerance: float,
    timeout: float,
) -> Tuple[Optional[torch.Tensor], Optional[PeerID], Dict[str, str]]:
    """Ask ``members`` concurrently for their outcome of ``group_id``; return the first acceptable complete vector.

    :param stub_for: ``peer_id -> stub`` with an ``rpc_round_result`` method
    :param own: this peer's flat partial aggregate (local values where a reducer failed)
    :param received: bool mask over ``own``: True where the element's aggregate arrived (cross-checked)
    :returns: (flat vector or None, the member it came from, member -> why its answer was not used)
    """
    deadline = time.monotonic() + timeout
    reasons: Dict[str, str] = {}

    async def ask(peer: PeerID) -> Optional[torch.Tensor]:
        while True:  # BAD_GROUP_ID: the member has not registered the round yet; ask again until the deadline
            stream = await stub_for(peer).rpc_round_result(averaging_pb2.AveragingData(group_id=group_id))
            chunks, code = [], None
            async for message in stream:
                if message.code != averaging_pb2.AVERAGED_PART:
                    code = message.code
                    break
                chunks.append(deserialize_tensor(message.tensor_part))
            if code == averaging_pb2.BAD_GROUP_ID and time.monotonic() + 0.2 < deadline:
                await asyncio.sleep(0.2)
                continue
            if code is not None:
                reasons[str(peer)] = averaging_pb2.MessageCode.Name(code)
                return None
            flat = torch.cat(chunks) if chunks else torch.empty(0)
            if flat.numel() != own.numel():
                reasons[str(peer)] = f"sent {flat.numel()} elements, expected {own.numel()}"
                return None
            if not all_finite(flat):
                reasons[str(peer)] = "sent non-finite values"
                return None
            gap = float((flat[received] - own[received]).abs().max()) if bool(received.any()) else 0.0
            if not gap <= tolerance:  # NaN-safe
                reasons[str(peer)] = f"disagrees with the parts we received (max gap {gap:.3g} > {tolerance:.3g})"
                return None
            return flat

    tasks = {asyncio.create_task(ask(peer)): peer for peer in members}
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for task in done:
                peer = tasks[task]
                if task.exception() is not None:
                    reasons[str(peer)] = repr(task.exception())
                elif task.result() is not None:
                    return task.result(), peer, reasons
        for task in pending:
            reasons[str(tasks[task])] = f"no answer in {timeout:.1f}s"
        return None, None, reasons
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
