"""athome's all-reduce runner: hivemind's butterfly all-reduce with a pluggable reducer, athome's codecs, result
checks and byte counting.

``hivemind.averaging.allreduce.AllReduceRunner`` builds its ``TensorPartReducer`` in ``__init__`` and decodes with
hivemind's global codec table, so :class:`RobustAllReduceRunner` subclasses it and overrides exactly:

* ``__init__``: swaps the reducer for one built by ``reducer_factory`` (e.g. CenteredClip);
* ``_communicate_with_peer`` (copied from hivemind 1.1.12, changed where marked): decodes results with athome's
  codecs, rejects non-finite results from a reducer (that reducer is treated as failed), counts bytes, and records
  which reducers failed (hivemind only logs at debug level and silently keeps the local values);
* ``_accumulate_parts_streaming`` (copied, changed where marked): decodes parts with athome's codecs, counts bytes;
* ``_generate_input_for_peer``: counts bytes.

hivemind itself is not modified.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Dict, Optional, Sequence

import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished

from athome.averaging.compression import deserialize_tensor, serialize_tensor
from athome.averaging.reducer import all_finite

logger = logging.getLogger(__name__)

ReducerFactory = Callable[[Sequence[torch.Size], int], TensorPartReducer]


class PartialRoundError(AllreduceException):
    """Some parts of the vector were not reduced (a reducer failed or timed out); the round did not count and the
    averaged tensors were left exactly as they were before the round."""


class RoundTimeoutError(AllreduceException):
    """The all-reduce did not finish within its (bandwidth-derived) time limit; tensors were left unchanged."""


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's AllReduceRunner with a custom reducer, athome codecs, result checks and traffic accounting.

    :param reducer_factory: ``(part_shapes, num_senders) -> TensorPartReducer`` used instead of hivemind's reducer
    :param kwargs: everything ``hivemind.averaging.allreduce.AllReduceRunner`` accepts

    After the run: ``bytes_sent`` / ``bytes_received`` (serialized protobuf bytes exchanged with *other* peers),
    ``failed_reducers`` (peer -> reason), ``tensor_part_container.failed_size`` (elements left unreduced).
    """

    def __init__(self, *, reducer_factory: ReducerFactory, **kwargs):
        super().__init__(**kwargs)
        # hivemind's __init__ has already built a plain TensorPartReducer; mark it finished so that its finalize()
        # (run from __del__) does not log a bogus "received 0% of input tensors", then replace it.
        self.tensor_part_reducer.finished.set()
        self.tensor_part_reducer = reducer_factory(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids)
        )
        self.bytes_sent = 0
        self.bytes_received = 0
        self.failed_reducers: Dict[PeerID, str] = {}
        self._reply_streams = 0  # senders whose results this peer's reducer is still streaming back
        # element counts of the parts each reducer handles, in vector order (a reducer's parts are contiguous), and
        # for failed reducers how many of their parts had arrived: received_mask() for consistency.py
        self._part_sizes_by_peer = [
            [part.numel() for part, _ in parts] for parts in self.tensor_part_container._input_parts_by_peer
        ]
        self._parts_received_before_failure: Dict[int, int] = {}
        self._replies_done = asyncio.Event()
        self._replies_done.set()

    async def wait_until_served(self, timeout: Optional[float]) -> bool:
        """Wait until this peer's reducer has aggregated every part and streamed every result back to its senders.

        Our own outputs can be complete before the last replies to others are serialized and sent; waiting for them
        makes byte counts exact and keeps the round's resources until other peers are served. False on timeout.
        """
        try:
            await asyncio.wait_for(self.tensor_part_reducer.finished.wait(), timeout)
            await asyncio.wait_for(self._replies_done.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _communicate_with_peer(self, peer_id: PeerID):
        """Send a part of local tensors and metadata to a single peer, receive the average for that part of tensors"""
        peer_index = self.ordered_peer_ids.index(peer_id)
        try:  # athome: failures of the local reducer are registered too (hivemind would hang on them)
            if peer_id == self.peer_id:
                sender_index = self.sender_peer_ids.index(peer_id)
                for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=self.weight
                    )
                    self.tensor_part_container.register_processed_part(
                        peer_index, part_index, averaged_part - tensor_part
                    )
            else:
                done_sending = asyncio.Event()
                inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
                stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)

                if self.should_delay_results(self.peer_id):
                    await done_sending.wait()

                part_index = 0

                def _try_deserialize(msg):
                    if msg.code != averaging_pb2.AVERAGED_PART:
                        raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                    delta = deserialize_tensor(msg.tensor_part)  # athome: numpy-2 safe codecs
                    if not all_finite(delta):  # athome: never let a reducer inject NaN/Inf
                        raise AllreduceException(f"{peer_id} returned a non-finite averaged part")
                    return delta, msg.ByteSize()

                async for delta, size in amap_in_executor(
                    _try_deserialize,
                    aiter_with_timeout(stream, self.reducer_timeout),
                    max_prefetch=self.tensor_part_container.prefetch,
                ):
                    self.bytes_received += size
                    self.tensor_part_container.register_processed_part(peer_index, part_index, delta)
                    part_index += 1

                if part_index != self.tensor_part_container.num_parts_by_peer[peer_index]:
                    raise AllreduceException(
                        f"peer {peer_id} sent {part_index} parts, but we expected "
                        f"{self.tensor_part_container.num_parts_by_peer[peer_index]}"
                    )
        except BaseException as e:
            self.failed_reducers[peer_id] = repr(e) if not isinstance(e, asyncio.CancelledError) else "cancelled"
            self._parts_received_before_failure.setdefault(
                peer_index, self.tensor_part_container._outputs_registered_by_peer[peer_index]
            )
            if isinstance(e, Exception):
                logger.debug(f"Caught {repr(e)} when communicating to {peer_id}", exc_info=True)
                if peer_id == self.peer_id:
                    # our own input was rejected by our own reducer. Registering the failure completes our outputs,
                    # and run() then finalizes the reducer, which other senders still need: keep serving them first
                    await self.tensor_part_reducer.finished.wait()
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    def received_mask(self) -> torch.Tensor:
        """Bool mask over the flattened vector: True where this peer received the element's aggregate."""
        mask = torch.ones(sum(map(sum, self._part_sizes_by_peer)), dtype=torch.bool)
        start = 0
        for peer_index, sizes in enumerate(self._part_sizes_by_peer):
            received = self._parts_received_before_failure.get(peer_index, len(sizes))
            mask[start + sum(sizes[:received]) : start + sum(sizes)] = False
            start += sum(sizes)
        return mask

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._generate_input_for_peer(peer_index):
            self.bytes_sent += message.ByteSize()
            yield message

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int):
        part_index = 0
        self._reply_streams += 1  # athome: lets wait_until_served() know results are still being sent
        self._replies_done.clear()
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression, size in amap_in_executor(
                lambda msg: (
                    deserialize_tensor(msg.tensor_part),  # athome: numpy-2 safe codecs
                    msg.weight,
                    msg.tensor_part.compression,
                    msg.ByteSize(),
                ),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                self.bytes_received += size
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                    part_index += 1
                except BannedException:
                    logger.debug(f"Sender {sender_index} is banned")
                    break  # sender was banned (timed out or sent rejected input), we no longer aggregate it

                serialized_delta = await loop.run_in_executor(
                    None, lambda: serialize_tensor(averaged_part - tensor_part, part_compression)
                )
                message = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized_delta)
                self.bytes_sent += message.ByteSize()
                yield message
        finally:
            self._reply_streams -= 1
            if self._reply_streams == 0:
                self._replies_done.set()
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])
