"""athome's all-reduce runner: hivemind's butterfly all-reduce with a pluggable reducer, athome's codecs, result
checks and byte counting.

``hivemind.averaging.allreduce.AllReduceRunner`` builds its ``TensorPartReducer`` in ``__init__`` and decodes with
hivemind's global codec table, so :class:`RobustAllReduceRunner` subclasses it and overrides exactly:

* ``__init__``: swaps the reducer for one built by ``reducer_factory`` (e.g. CenteredClip), and hivemind's part
  container for :class:`~athome.averaging.outputs.AveragedPartContainer` (results land in reusable output buffers
  and the runner yields aggregates, not deltas);
* ``_communicate_with_peer`` (copied from hivemind 1.1.12, changed where marked): decodes results with athome's
  codecs, rejects non-finite results from a reducer (that reducer is treated as failed), counts bytes, and records
  which reducers failed (hivemind only logs at debug level and silently keeps the local values);
* ``_accumulate_parts_streaming`` (copied, changed where marked): decodes parts with athome's codecs, counts bytes;
* ``_generate_input_for_peer``: counts bytes.

With a :class:`~athome.averaging.dataplane.DataPlane`, each (sender, reducer) pair first tries the direct TCP data
plane (raw frames, :mod:`.dataplane`) and falls back to hivemind's p2p ``rpc_aggregate_part`` for that pair if it
cannot be used. Both transports share the bookkeeping below: :meth:`RobustAllReduceRunner._reduce_stream` (reducer
side: accumulate, ban on failure) and :meth:`RobustAllReduceRunner._register_result` (sender side: result
checks, byte counts), and ``_communicate_with_peer``'s failure accounting.

hivemind itself is not modified.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import AsyncIterator, Callable, Dict, Optional, Sequence, Set, Tuple

import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, attach_event_on_finished

from athome.averaging.compression import deserialize_tensor, serialize_tensor
from athome.averaging.dataplane import (
    KIND_AVERAGE,
    KIND_DONE,
    KIND_PART,
    KIND_RESULT,
    RAW,
    DataPlane,
    DataPlaneError,
    FrameConnection,
    decode_payload,
    encode_part,
    encode_result,
    supports,
)
from athome.averaging.outputs import AveragedPartContainer, ReceiveBufferPool
from athome.averaging.sharedmemory import Segment, segment_of
from athome.numerics import all_finite

logger = logging.getLogger(__name__)

ACCUMULATE_AHEAD = 4  # parts of one sender handed to the reducer before the oldest one's aggregate is taken
# Codecs on the data plane: parts and results are encoded and decoded in the event loop's thread, not handed to
# executor threads (hivemind's way, kept on the p2p path): the handoffs cost more CPU than they overlapped. Measured,
# 4 peers averaging 10M floats with "uint8" on 2 cores, 5 alternating pairs of runs: 0.237-0.270 CPU-s per peer per
# round against 0.289-0.309, rounds 0.47-0.54 s against 0.56-0.61. A part blocks the loop for ~2 ms (262144 values),
# a small share of its time on the links such codecs are for.
# (part_shapes, num_senders, outputs) -> reducer; outputs: where each part's aggregate may be written, or None
ReducerFactory = Callable[[Sequence[torch.Size], int, Optional[Sequence[torch.Tensor]]], TensorPartReducer]


def _retrieve_exception(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: an abandoned part's BannedException is expected, not "never retrieved"


class PartialRoundError(AllreduceException):
    """Some parts of the vector were not reduced (a reducer failed or timed out); the round did not count and the
    averaged tensors were left exactly as they were before the round."""


class RoundTimeoutError(AllreduceException):
    """The all-reduce did not finish within its (bandwidth-derived) time limit; tensors were left unchanged."""


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's AllReduceRunner with a custom reducer, athome codecs, result checks and traffic accounting.

    :param reducer_factory: ``(part_shapes, num_senders, outputs) -> TensorPartReducer`` used instead of hivemind's
      reducer; ``outputs`` are this peer's output slices for its own slice (float32 tensors only, else None): a
      reducer that writes each aggregate there saves copying it
    :param dataplane: this process's direct TCP data plane (None: p2p only); its server hands authenticated
      connections to :meth:`serve_tcp_sender`
    :param outputs: where the aggregates go (:class:`~athome.averaging.outputs.AveragedPartContainer`): one tensor
      per averaged tensor, same shape and dtype; None allocates them. Iterating the runner yields these tensors
      holding the **aggregates** (hivemind's runner yields deltas), with local values where a reducer failed
    :param receive_pool: where the raw parts this peer's reducer receives over the data plane are read into (buffers
      reused across rounds); None allocates them
    :param shared_segments: shared memory holding ``tensors`` and ``outputs``
      (:class:`~athome.averaging.sharedmemory.Segment`): same-host peers copy our parts and aggregates from there
      instead of receiving them over a socket
    :param kwargs: everything ``hivemind.averaging.allreduce.AllReduceRunner`` accepts

    After the run: ``bytes_sent`` / ``bytes_received`` (bytes exchanged with *other* peers: serialized protobuf
    messages on p2p, frame headers and payloads on TCP), ``failed_reducers`` (peer -> reason),
    ``tensor_part_container.failed_size`` (elements left unreduced), ``tcp_peers`` (reducers reached over TCP),
    ``kept_peers`` (of those, over a connection kept from an earlier round), ``same_host_peers`` (of those, on this
    host: raw parts copied from their shared memory).
    """

    def __init__(
        self,
        *,
        reducer_factory: ReducerFactory,
        dataplane: Optional[DataPlane] = None,
        outputs: Optional[Sequence[torch.Tensor]] = None,
        receive_pool: Optional[ReceiveBufferPool] = None,
        shared_segments: Sequence[Segment] = (),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.shared_segments = shared_segments
        hivemind_container = self.tensor_part_container  # same split, but results as deltas in fresh tensors
        tensors = hivemind_container.local_tensors
        self.tensor_part_container = AveragedPartContainer(
            tensors,
            hivemind_container.peer_fractions,
            outputs=outputs if outputs is not None else [torch.empty_like(t) for t in tensors],
            compression=hivemind_container.compression,
            part_size_bytes=hivemind_container.part_size_bytes,
            tensor_infos=hivemind_container.tensor_infos,
            prefetch=hivemind_container.prefetch,
        )
        hivemind_container.finalize()
        self.parts_for_local_averaging = self.tensor_part_container.get_raw_input_parts(
            self.ordered_peer_ids.index(self.peer_id)
        )
        if dataplane is not None and not supports(self.tensor_part_container.local_tensors):
            logger.debug("Data plane not used: some averaged tensors have a dtype it does not carry")
            dataplane = None
        self.dataplane = dataplane
        self.receive_pool = receive_pool
        self.tcp_peers: Set[PeerID] = set()
        self.kept_peers: Set[PeerID] = set()  # of tcp_peers, those reached over a connection kept from a past round
        self.same_host_peers: Set[PeerID] = set()  # of tcp_peers, those whose memory we read (same host)
        # hivemind's __init__ has already built a plain TensorPartReducer; mark it finished so that its finalize()
        # (run from __del__) does not log a bogus "received 0% of input tensors", then replace it.
        self.tensor_part_reducer.finished.set()
        own_index = self.ordered_peer_ids.index(self.peer_id)
        own_outputs = [
            self.tensor_part_container.output_slice(own_index, part_index)
            for part_index in range(len(self.parts_for_local_averaging))
        ]
        if not all(out.dtype == torch.float32 for out in own_outputs):
            own_outputs = None
        self.tensor_part_reducer = reducer_factory(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids), own_outputs
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
        self._live_readers = 0  # data plane tasks that may still receive into the reducer's rows
        # same-host connections (either side) whose exchange has not ended clean: the other process may still read
        # our memory through them, so they are closed before this round's memory changes (close_local)
        self._open_local: Set[FrameConnection] = set()
        self._serving_connections: Set[FrameConnection] = set()  # same-host senders still reading our aggregates
        self._local_served = asyncio.Event()
        self._local_served.set()

    async def wait_until_served(self, timeout: Optional[float]) -> bool:
        """Wait until this peer's reducer has aggregated every part and streamed every result back to its senders.

        Our own outputs can be complete before the last replies to others are serialized and sent; waiting for them
        makes byte counts exact and keeps the round's resources until other peers are served. False on timeout.
        """
        try:
            await asyncio.wait_for(self.tensor_part_reducer.finished.wait(), timeout)
            await asyncio.wait_for(self._replies_done.wait(), timeout)
            await asyncio.wait_for(self._local_served.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _close_serving(self) -> None:
        for connection in list(self._serving_connections):
            connection.close()

    def close_local(self) -> None:
        """Hang up every same-host connection of this round that has not ended clean. Called once the round is over
        and before its memory changes (the averaged tensors, whose parts we offered; the aggregates): a peer still
        reading through such a connection then finds it closed after its read and discards what it read."""
        for connection in list(self._open_local):
            connection.close()
        self._open_local.clear()

    async def _communicate_with_peer(self, peer_id: PeerID):
        """Send a part of local tensors and metadata to a single peer, receive the average for that part of tensors"""
        peer_index = self.ordered_peer_ids.index(peer_id)
        try:  # athome: failures of the local reducer are registered too (hivemind would hang on them)
            if peer_id == self.peer_id:
                sender_index = self.sender_peer_ids.index(peer_id)
                local_parts = as_aiter(*((part, self.weight, None, 0) for part in self.parts_for_local_averaging))
                async with aclosing(self._accumulate_ahead(local_parts, sender_index)) as results:
                    part_index = 0
                    async for averaged_part, _, _ in results:
                        self.tensor_part_container.register_processed_part(peer_index, part_index, averaged_part)
                        part_index += 1
            else:
                connection = await self._open_tcp(peer_id)
                if connection is not None:
                    self.tcp_peers.add(peer_id)
                    if connection.rounds > 1:
                        self.kept_peers.add(peer_id)
                    if connection.same_host:
                        self.same_host_peers.add(peer_id)
                    await self._exchange_over_tcp(peer_id, peer_index, connection)
                else:
                    await self._exchange_over_p2p(peer_id, peer_index)
        except BaseException as e:
            self.failed_reducers[peer_id] = repr(e) if not isinstance(e, asyncio.CancelledError) else "cancelled"
            self._parts_received_before_failure.setdefault(
                peer_index, self.tensor_part_container._outputs_registered_by_peer[peer_index]
            )
            if isinstance(e, Exception):
                logger.debug(f"Caught {repr(e)} when communicating to {peer_id}", exc_info=True)
                # registering the failure may complete our outputs, and run() then finalizes our reducer (and
                # refuses senders still to come), which other senders still need: keep serving them first. (Once
                # only for our own reducer's failure; a remote reducer that rejects our part fails us just as early,
                # and on one host its answer can come before the others' parts reach our reducer.) Bounded: a
                # silent sender is banned.
                await self.tensor_part_reducer.finished.wait()
                if peer_id == self.peer_id and not await self.wait_until_served(self.sender_timeout):
                    # the failure writes our local values into our own slice's outputs, where same-host senders
                    # copy the aggregates from (seen: honest members copying a NaN sender's own part as its
                    # reducer's "aggregate"): those still reading are hung up on first
                    self._close_serving()
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    def _register_result(
        self, peer_id: PeerID, peer_index: int, part_index: int, result: torch.Tensor, size: int, *, delta: bool
    ):
        """Sender side, both transports: check one result from ``peer_id``'s reducer (an aggregate, or a delta from
        it) and register it. A rejected result was at most written into its own output slice, which the failure
        path then resets to the local values."""
        if not all_finite(result):  # athome: never let a reducer inject NaN/Inf
            raise AllreduceException(f"{peer_id} returned a non-finite averaged part")
        self.bytes_received += size
        self.tensor_part_container.register_processed_part(peer_index, part_index, result, delta=delta)

    def _check_parts_count(self, peer_id: PeerID, peer_index: int, received: int):
        if received != self.tensor_part_container.num_parts_by_peer[peer_index]:
            raise AllreduceException(
                f"peer {peer_id} sent {received} parts, but we expected "
                f"{self.tensor_part_container.num_parts_by_peer[peer_index]}"
            )

    async def _exchange_over_p2p(self, peer_id: PeerID, peer_index: int):
        """hivemind's transport: one rpc_aggregate_part stream of protobuf messages through p2pd."""
        done_sending = asyncio.Event()
        inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
        stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)

        if self.should_delay_results(self.peer_id):
            await done_sending.wait()

        def _try_deserialize(msg):
            if msg.code != averaging_pb2.AVERAGED_PART:
                raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
            return deserialize_tensor(msg.tensor_part), msg.ByteSize()  # athome: numpy-2 safe codecs

        part_index = 0
        async for delta, size in amap_in_executor(
            _try_deserialize,
            aiter_with_timeout(stream, self.reducer_timeout),
            max_prefetch=self.tensor_part_container.prefetch,
        ):
            self._register_result(peer_id, peer_index, part_index, delta, size, delta=True)
            part_index += 1
        self._check_parts_count(peer_id, peer_index, part_index)

    async def _open_tcp(self, peer_id: PeerID) -> Optional[FrameConnection]:
        """An authenticated data plane connection to ``peer_id``'s reducer, or None (then p2p is used)."""
        if self.dataplane is None:
            return None
        stub = self._get_peer_stub(peer_id)
        if not hasattr(stub, "rpc_dataplane_ticket"):
            return None
        return await self.dataplane.connect(
            peer_id, lambda: stub.rpc_dataplane_ticket(DataPlane.ticket_request(self.group_id)), self.group_id
        )

    async def _exchange_over_tcp(self, peer_id: PeerID, peer_index: int, connection: FrameConnection):
        """Send our parts for ``peer_id``'s slice as raw frames and receive the averaged parts, concurrently."""
        container = self.tensor_part_container
        assert not container._inputs_consumed_by_peer[peer_index], "input parts of a given peer are already used"
        container._inputs_consumed_by_peer[peer_index] = True
        parts = list(container._input_parts_by_peer[peer_index])
        compression = container.compression

        local = connection.same_host
        if local:
            self._open_local.add(connection)
        # same host: the reducer copies our parts from our shared memory, whatever the codec (codecs save network
        # bytes, and these cross none), and we copy its raw aggregates from its shared memory
        located = [segment_of(part, self.shared_segments) for part, _ in parts] if local else []
        by_location = local and all(where is not None for where in located)
        raw = by_location or getattr(compression, "compression_type", None) == RAW

        async def _send_all():
            # each part is encoded when the previous one is handed to the socket (codec "none": the tensor's own
            # memory); codec work runs here, in the loop's thread (see "Codecs on the data plane" above)
            for part_index, (part, info) in enumerate(parts):
                if by_location:  # unchanged until this round ends on this connection: see close_local()
                    sent = await connection.send_location(
                        KIND_PART, part_index, part, located[part_index], weight=self.weight
                    )
                else:
                    codec, dtype, payload = encode_part(part, compression, info)
                    sent = await connection.send_frame(
                        KIND_PART, part_index, codec, dtype, payload, weight=self.weight
                    )
                self.bytes_sent += sent  # not `+= await`: that would drop other streams' increments made meanwhile

        sender = asyncio.create_task(_send_all())
        clean = False
        try:
            if self.should_delay_results(self.peer_id):
                await sender
            # raw aggregates are read from the socket (or the reducer's memory) straight into their output slice;
            # coded results are deltas
            for part_index, (part, _) in enumerate(parts):
                into = container.output_slice(peer_index, part_index) if raw else None
                async with asyncio.timeout(self.reducer_timeout):  # unlike wait_for, no task per part
                    frame = await connection.recv_frame(
                        KIND_AVERAGE if raw else KIND_RESULT, part_index, part.numel(), into=into
                    )
                result = decode_payload(frame, part.shape)  # in the loop's thread, as encoding
                self._register_result(peer_id, peer_index, part_index, result, frame.nbytes, delta=not raw)
            await sender  # surfaces a send failure (all results arrived, so it has finished)
            if local:  # the reducer keeps its aggregates unchanged until it hears this
                await connection.send_frame(KIND_DONE, len(parts), RAW, torch.float32, b"")
            clean = True  # every frame of both directions is consumed: the connection can carry the next round
        except BaseException:
            if sender.done() and not sender.cancelled() and sender.exception() is not None:
                raise sender.exception()  # the cause (e.g. a codec error), not its symptom (a closed connection)
            raise
        finally:
            if not sender.done():
                sender.cancel()
            self._open_local.discard(connection)
            if clean:
                self.dataplane.keep(peer_id, connection)
            else:
                connection.close()

    async def serve_tcp_sender(self, peer_id: PeerID, connection: FrameConnection) -> bool:
        """Reducer side of the data plane: ``peer_id`` (authenticated by its ticket) streams its parts of our slice.

        Mirrors hivemind's ``rpc_aggregate_part``: the sender becomes active, its parts go through the reducer
        (:meth:`_reduce_stream`, which bans it if it stops early or sends rejected input), results go back: the
        aggregate itself for raw parts, the delta from the sender's part for coded ones.

        :returns: True if every part was read and every result sent (the connection may carry the sender's next
          round); otherwise the connection is closed
        """
        if peer_id not in self.sender_peer_ids or self._future.done():
            connection.close()
            return False
        sender_index = self.sender_peer_ids.index(peer_id)
        self.active_senders.add(peer_id)
        if len(self.active_senders) == len(self.sender_peer_ids):
            self.all_senders_started.set()
        shapes = self.tensor_part_reducer.part_shapes
        dtypes = [part.dtype for part in self.parts_for_local_averaging]  # raw parts come in the tensors' dtypes
        # the reader runs ahead of the reducer by up to `prefetch` parts; the queue itself is unbounded so that the
        # end-of-stream marker can always be put, even by a cancelled reader
        queue: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(max(1, self.tensor_part_container.prefetch))

        taken = []  # receive buffers from the pool, given back once the reducer no longer holds any part
        # a reducer that keeps its senders' rows (athome's, for CenteredClip) takes raw float32 parts straight there
        receive_row = getattr(self.tensor_part_reducer, "receive_row", None)

        async def _read_parts():
            try:
                for part_index, shape in enumerate(shapes):
                    await slots.acquire()
                    into = None
                    if receive_row is not None and dtypes[part_index] == torch.float32:
                        into = receive_row(sender_index, part_index)
                    if into is None and self.receive_pool is not None:
                        into = self.receive_pool.take(shape.numel(), dtypes[part_index])
                        taken.append(into)
                    async with asyncio.timeout(self.sender_timeout):
                        frame = await connection.recv_frame(KIND_PART, part_index, shape.numel(), into=into)
                    part = decode_payload(frame, shape)  # in the loop's thread: see "Codecs on the data plane"
                    queue.put_nowait((part, frame.weight, frame.compression, frame.nbytes))
            except (asyncio.TimeoutError, OSError) as e:
                if isinstance(e, DataPlaneError):
                    logger.warning(f"Data plane: {peer_id} broke the protocol ({e}); its stream is dropped")
                else:
                    logger.debug(f"Data plane: stream from {peer_id} ended early: {e!r}")
            except Exception as e:  # e.g. a codec that cannot decode what it was sent
                logger.warning(f"Data plane: undecodable part from {peer_id} ({e!r}); its stream is dropped")
            finally:
                queue.put_nowait(None)

        async def _parts():
            while True:
                item = await queue.get()
                if item is None:
                    return
                slots.release()
                yield item

        reader = asyncio.create_task(_read_parts())
        self._live_readers += 1
        reader.add_done_callback(self._reader_ended)
        delayed = [] if self.should_delay_results(peer_id) else None
        local = connection.same_host
        if local:
            self._open_local.add(connection)
            self._serving_connections.add(connection)
            self._local_served.clear()
        offered = []  # what the sender reads from our memory: kept alive (a converted aggregate is a new tensor)

        async def _send_result(kind: int, index: int, encoded) -> None:
            located = segment_of(encoded[2], self.shared_segments) if local and encoded[0] == RAW else None
            if located is not None:  # the aggregate, unchanged until the sender says DONE or we hang up (close_local)
                offered.append(encoded[2])
                sent = await connection.send_location(kind, index, encoded[2], located)
            else:
                sent = await connection.send_frame(kind, index, *encoded)
            self.bytes_sent += sent  # not `+= await` (see _exchange_over_tcp)

        part_index = 0
        clean = False
        try:
            async with aclosing(self._reduce_stream(_parts(), sender_index)) as results:
                async for averaged_part, tensor_part, compression in results:
                    if compression == RAW:  # the aggregate itself, the same tensor for every sender: no copy
                        kind = KIND_AVERAGE
                        encoded = (RAW, tensor_part.dtype, averaged_part.to(tensor_part.dtype))
                    else:  # coded: the delta, whose codec error is relative to the (small) change
                        kind = KIND_RESULT
                        encoded = encode_result(averaged_part - tensor_part, compression)  # in the loop's thread
                    if delayed is not None:
                        delayed.append((kind, part_index, encoded))
                    else:
                        await _send_result(kind, part_index, encoded)
                    part_index += 1
            for kind, index, encoded in delayed or ():
                await _send_result(kind, index, encoded)
            clean = part_index == len(shapes)  # a result for every part: every part of the sender was read
            if clean and local:  # hold the aggregates until the sender has read them
                async with asyncio.timeout(self.sender_timeout):
                    await connection.recv_frame(KIND_DONE, len(shapes), 0)
        except (OSError, asyncio.TimeoutError) as e:
            clean = False
            logger.debug(f"Data plane: could not return results to {peer_id}: {e!r}")
        finally:
            reader.cancel()
            if local:
                self._open_local.discard(connection)
                self._serving_connections.discard(connection)
                if not self._serving_connections:
                    self._local_served.set()
            if not clean:
                connection.close()
            # only buffers nothing can still write into (the reader ended) or read (the reducer is finalized)
            if self.receive_pool is not None and reader.done() and self.tensor_part_reducer.finished.is_set():
                self.receive_pool.give(taken)
        return clean

    def _reader_ended(self, _reader: asyncio.Task) -> None:
        self._live_readers -= 1
        self.release_reducer_rows()

    def release_reducer_rows(self) -> None:
        """Give the reducer's row matrices back to their pool once that is safe: the reducer is finished and no
        reader of received parts is alive (one that is could still write into a row). Called as readers end and by
        the averager after the round; whichever call finds both true releases them."""
        if self._live_readers == 0 and self.tensor_part_reducer.finished.is_set():
            release = getattr(self.tensor_part_reducer, "release_rows", None)
            if release is not None:
                release()

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
        """hivemind's p2p reducer stream: decode protobuf parts, reduce them, yield protobuf deltas."""
        loop = asyncio.get_event_loop()
        parts = amap_in_executor(
            lambda msg: (
                deserialize_tensor(msg.tensor_part),  # athome: numpy-2 safe codecs
                msg.weight,
                msg.tensor_part.compression,
                msg.ByteSize(),
            ),
            stream,
            max_prefetch=self.tensor_part_container.prefetch,
        )
        async with aclosing(self._reduce_stream(parts, sender_index)) as results:
            async for averaged_part, tensor_part, part_compression in results:
                delta = averaged_part - tensor_part  # hivemind's protocol returns deltas
                serialized_delta = await loop.run_in_executor(None, serialize_tensor, delta, part_compression)
                message = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized_delta)
                self.bytes_sent += message.ByteSize()
                yield message

    async def _accumulate_ahead(
        self, parts: AsyncIterator[Tuple[torch.Tensor, float, Optional[int], int]], sender_index: int
    ) -> AsyncIterator[Tuple[torch.Tensor, torch.Tensor, Optional[int]]]:
        """Give one sender's parts to the reducer as they arrive, up to ``ACCUMULATE_AHEAD`` parts before their
        results are taken, and yield ``(aggregate, part, compression)`` in order, each as soon as it is ready.

        hivemind awaits each part's aggregate before handing over the next part, so a reducer could not start on
        part k+1 until part k was reduced and its result sent: every part paid a full round trip. Parts are taken
        from ``parts`` by a task of their own, so that an aggregate completed by *another* sender's part is yielded
        at once, not when this sender's next part happens to arrive (which held results back by up to a part's
        transfer time, mid-round). Counts ``bytes_received``; raises BannedException like the reducer, and what
        ``parts`` raises once the aggregates of the parts before it are yielded."""
        submitted: asyncio.Queue = asyncio.Queue()  # (task, part, compression) in part order, then an end marker
        room = asyncio.Semaphore(ACCUMULATE_AHEAD)

        async def _submit_parts():
            part_index, error = 0, None
            try:
                async for tensor_part, weight, part_compression, size in parts:
                    self.bytes_received += size
                    task = asyncio.ensure_future(
                        self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part, weight=weight)
                    )
                    task.add_done_callback(_retrieve_exception)
                    submitted.put_nowait((task, tensor_part, part_compression))
                    part_index += 1
                    await room.acquire()
            except Exception as e:  # noqa: B902 - re-raised by the generator, in order
                error = e
            finally:
                submitted.put_nowait(error)

        submitter = asyncio.create_task(_submit_parts())
        try:
            while isinstance(item := await submitted.get(), tuple):
                task, tensor_part, part_compression = item
                yield await asyncio.shield(task), tensor_part, part_compression
                room.release()
            if item is not None:
                raise item
        finally:
            # never cancel the accumulation tasks: a task awaiting a part's future that other senders share would
            # cancel that future for everyone. Left alone, they end with the part or with BannedException once the
            # caller bans us
            submitter.cancel()

    async def _reduce_stream(
        self, parts: AsyncIterator[Tuple[torch.Tensor, float, int, int]], sender_index: int
    ) -> AsyncIterator[Tuple[torch.Tensor, torch.Tensor, int]]:
        """Reducer side, both transports: ``parts`` yields decoded ``(part, weight, compression, wire bytes)`` of one
        sender in order; yields ``(aggregate, part, compression)`` (the aggregate is shared by all senders: read
        only). A sender that stops early or is rejected is
        banned (hivemind's rule), so the other senders' parts do not wait for it."""
        part_index = 0
        self._reply_streams += 1  # athome: lets wait_until_served() know results are still being sent
        self._replies_done.clear()
        try:
            async with aclosing(self._accumulate_ahead(parts, sender_index)) as results:
                try:
                    async for averaged_part, tensor_part, part_compression in results:
                        part_index += 1
                        yield averaged_part, tensor_part, part_compression
                except BannedException:
                    logger.debug(f"Sender {sender_index} is banned")
                    # sender was banned (timed out or sent rejected input), we no longer aggregate it
        finally:
            self._reply_streams -= 1
            if self._reply_streams == 0:
                self._replies_done.set()
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])
