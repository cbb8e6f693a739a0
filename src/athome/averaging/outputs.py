"""Where a round's averaged values land: per-tensor output buffers written part by part, reused across rounds.

hivemind's ``TensorPartContainer`` collects each part's result as a *delta* (aggregate - local part) in a fresh
tensor, concatenates them into fresh per-tensor tensors, and its caller adds those to the local tensors: three full
passes over freshly mapped memory per round (the 40 MB ``torch.cat`` alone was a third of a peer's CPU in a 10M-float
round: page faults). :class:`AveragedPartContainer` keeps hivemind's input side and protocol and changes the output
side:

* results are written straight into views of per-tensor *output buffers* (same shapes and dtypes as the averaged
  tensors): an aggregate received over the direct data plane is read from the socket into its place, one from the
  local reducer is copied there, a p2p or compressed *delta* is added to the local part into its place;
* :meth:`iterate_output_tensors` yields the output buffers, holding **aggregates** (not deltas); parts whose reducer
  failed hold the local values (the round is then partial: see :mod:`.consistency`);
* :class:`OutputBufferPool` hands the same two buffer sets out in turn, so memory is faulted in once;
  :class:`ReceiveBufferPool` does the same for the parts this peer's reducer receives.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Dict, List, Optional, Sequence, Tuple

import torch
from hivemind.averaging.partition import AllreduceException, TensorPartContainer

from athome.averaging.sharedmemory import Segment, SharedRegion

logger = logging.getLogger(__name__)


class AveragedPartContainer(TensorPartContainer):
    """hivemind's ``TensorPartContainer`` whose outputs are aggregates written into ``outputs`` (see module doc).

    :param tensors: the local tensors being averaged (split into parts exactly as hivemind does)
    :param peer_fractions: as in hivemind
    :param outputs: one tensor per local tensor, same shape and dtype, not aliasing them; overwritten by the round
    :param kwargs: the rest of ``TensorPartContainer``'s arguments (compression, part_size_bytes, ...)
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        peer_fractions: Sequence[float],
        *,
        outputs: Sequence[torch.Tensor],
        **kwargs,
    ):
        kwargs.pop("return_deltas", None)
        super().__init__(tensors, peer_fractions, return_deltas=False, **kwargs)
        if len(outputs) != len(tensors) or any(
            o.shape != t.shape or o.dtype != t.dtype for o, t in zip(outputs, tensors)
        ):
            raise ValueError("outputs must match the averaged tensors in number, shapes and dtypes")
        self.outputs = outputs
        # hivemind splits each tensor in order and hands the parts to peers in order, so walking the tensors' parts
        # in the same order pairs every input part with the matching slice of the output buffers
        flat_slices, tensor_of_slice = [], []
        for tensor_index, (output, info) in enumerate(zip(outputs, self.tensor_infos)):
            bytes_per_value = output.element_size() * self.compression.estimate_compression_ratio(info)
            pieces = output.view(-1).split(int(self.part_size_bytes / bytes_per_value))
            flat_slices.extend(pieces)
            tensor_of_slice.extend([tensor_index] * len(pieces))
        self._output_slices_by_peer: List[List[torch.Tensor]] = []
        self._tensor_of_part_by_peer: List[List[int]] = []
        start = 0
        for count in self.num_parts_by_peer:
            self._output_slices_by_peer.append(flat_slices[start : start + count])
            self._tensor_of_part_by_peer.append(tensor_of_slice[start : start + count])
            start += count
        for peer_inputs, peer_outputs in zip(self._input_parts_by_peer, self._output_slices_by_peer):
            assert [p.shape for p, _ in peer_inputs] == [o.shape for o in peer_outputs], "output split mismatch"
        self._tensor_ready = [asyncio.Event() for _ in outputs]
        self._parts_left_by_tensor = list(self.num_parts_by_tensor)

    def output_slice(self, peer_index: int, part_index: int) -> torch.Tensor:
        """The flat view of the output buffers where the aggregate of that part goes (to receive into directly)."""
        return self._output_slices_by_peer[peer_index][part_index]

    def local_part(self, peer_index: int, part_index: int) -> torch.Tensor:
        return self._input_parts_by_peer[peer_index][part_index][0]

    @torch.no_grad()
    def register_processed_part(self, peer_index: int, part_index: int, part: torch.Tensor, *, delta: bool = False):
        """Register the next result of ``peer_index``'s reducer: an aggregate (``delta=False``; if ``part`` is the
        output slice itself, it was received in place) or an aggregate minus the local part (``delta=True``)."""
        if part_index != self._outputs_registered_by_peer[peer_index]:
            raise ValueError(
                f"Could not register part #{part_index} from peer #{peer_index}, "
                f"expected part index: {self._outputs_registered_by_peer[peer_index]}"
            )
        target = self._output_slices_by_peer[peer_index][part_index]
        if delta:
            torch.add(self.local_part(peer_index, part_index), part.reshape(target.shape), out=target)
        elif part.data_ptr() != target.data_ptr():
            target.copy_(part.reshape(target.shape))
        self._outputs_registered_by_peer[peer_index] += 1
        tensor_index = self._tensor_of_part_by_peer[peer_index][part_index]
        self._parts_left_by_tensor[tensor_index] -= 1
        if self._parts_left_by_tensor[tensor_index] == 0:
            self._tensor_ready[tensor_index].set()

    def register_failed_reducer(self, peer_index: int):
        """That reducer failed: its remaining parts keep the local values (counted in ``failed_size``)."""
        for part_index in range(self._outputs_registered_by_peer[peer_index], self.num_parts_by_peer[peer_index]):
            local = self.local_part(peer_index, part_index)
            self.register_processed_part(peer_index, part_index, local)
            self.failed_size += local.numel()

    async def iterate_output_tensors(self) -> AsyncIterator[torch.Tensor]:
        """Yield each output buffer (aggregates) once all its parts are registered, in tensor order."""
        assert not self._outputs_consumed, "output tensors are already iterated and no longer available."
        self._outputs_consumed = True
        for tensor_index, output in enumerate(self.outputs):
            if not self._tensor_ready[tensor_index].is_set():
                waits = {
                    asyncio.ensure_future(self.finished.wait()),
                    asyncio.ensure_future(self._tensor_ready[tensor_index].wait()),
                }
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()
                if self._parts_left_by_tensor[tensor_index] != 0:  # finalized first
                    raise AllreduceException("All-reduce was terminated during iteration")
            yield output


class OutputBufferPool:
    """Two sets of output buffers for one averager's tensors, handed out in turn (so each is faulted in once).

    Contract: a set handed out by :meth:`take` is handed out again two calls later; whoever keeps views of it must
    drop them by then. athome's averager publishes a round's aggregate (views of its set) in
    :class:`~athome.averaging.consistency.RoundOutcomes`, which keeps the latest two rounds and registers a round
    before it takes its set: the round two calls back has been dropped by the time its set is reused.
    """

    def __init__(self, sets: int = 2, shared: bool = False):
        self._sets: List[Optional[List[torch.Tensor]]] = [None] * sets
        self._regions: List[Optional[SharedRegion]] = [None] * sets
        self._turn = 0
        self.shared = shared

    @property
    def segments(self) -> List[Segment]:
        """The shared memory holding the sets (``shared=True``, CPU tensors): same-host peers may map it."""
        return [region.segment for region in self._regions if region is not None]

    def take(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        index = self._turn % len(self._sets)
        self._turn += 1
        current = self._sets[index]
        if current is None or [(b.shape, b.dtype) for b in current] != [(t.shape, t.dtype) for t in tensors]:
            if self._regions[index] is not None:
                self._regions[index].close()  # its memory lives on while views of it (or a peer's mapping) do
                self._regions[index] = None
            on_cpu = all(t.device.type == "cpu" for t in tensors)
            current = None
            if self.shared and on_cpu:
                try:
                    current, self._regions[index] = _shared_buffers(tensors)
                except OSError as e:  # e.g. memfd_create refused by a sandbox: aggregates then go as bytes
                    logger.info(f"Output buffers stay private ({e!r}): same-host peers receive aggregates as bytes")
                    self.shared = False
            if current is None:
                current = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
            self._sets[index] = current
        return current


def _shared_buffers(tensors: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], SharedRegion]:
    """Buffers like ``tensors``, views of one shared region (each 64-byte aligned)."""
    offsets, end = [], 0
    for tensor in tensors:
        offsets.append(end)
        end += -(-tensor.numel() * tensor.element_size() // 64) * 64
    region = SharedRegion(end)
    buffers = [
        region.bytes[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        for offset, t in zip(offsets, tensors)
    ]
    return buffers, region


class ReceiveBufferPool:
    """Buffers that raw parts received by this peer's reducer land in (for CenteredClip, one matrix of all senders'
    rows per part: :meth:`~athome.averaging.reducer.RobustTensorPartReducer.receive_row`), reused from round to round.

    A fresh multi-megabyte tensor is faulted in page by page as the socket writes into it (measured, 4 peers
    averaging 10M floats: ~700 page faults per second of rounds in one averager, 83% of them in ``recv``; 15-26 with
    this pool). Contract: :meth:`take` hands
    out a buffer nobody else holds; whoever took it gives it back with :meth:`give` only once nothing reads it any
    more (for a reducer: once it is finalized). At most ``max_bytes`` are kept; the rest is left to the allocator.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: Dict[Tuple[int, torch.dtype], List[torch.Tensor]] = {}
        self._kept_bytes = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((numel, dtype))
        if free:
            buffer = free.pop()
            self._kept_bytes -= buffer.nbytes
            return buffer
        return torch.empty(numel, dtype=dtype)

    def give(self, buffers: Sequence[torch.Tensor]) -> None:
        for buffer in buffers:
            if self._kept_bytes + buffer.nbytes > self.max_bytes:
                self._drop_other_sizes(buffer)
                if self._kept_bytes + buffer.nbytes > self.max_bytes:
                    continue
            self._free.setdefault((buffer.numel(), buffer.dtype), []).append(buffer)
            self._kept_bytes += buffer.nbytes

    def _drop_other_sizes(self, keep: torch.Tensor) -> None:
        """Forget buffers of other sizes than ``keep`` (part sizes changed: a new group size or part size)."""
        key = (keep.numel(), keep.dtype)
        for other in [k for k in self._free if k != key]:
            self._kept_bytes -= sum(buffer.nbytes for buffer in self._free.pop(other))
