"""Serving experts: hivemind's expert server with athome's signed declarations, input checks and state download.

Experts speak hivemind's expert RPC protocol unchanged, so a plain ``hivemind.moe.client.RemoteExpert`` can call
them. What differs from ``hivemind.moe.Server``:

- declarations are athome's signed :class:`~athome.dht.schemas.ServerRecord` (one per host, replicas allowed),
  refreshed periodically and withdrawn on a clean leave, instead of hivemind's unsigned one-peer-per-uid keys;
- every request is checked (uid, tensor count, shape, dtype, batch size, NaN/Inf) before it reaches the Runtime,
  so bad input gets a clear error back and never touches the expert's state;
- a small servicer in the host process lets a new replica download an expert's current parameters;
- athome trainers use a direct path (:class:`DirectExpertServicer`): one request per host carrying every expert
  of the layer that the host serves, computed in the host process. hivemind's path goes handler process ->
  TaskPool process (mp.Queue, tensors moved to shared memory) -> Runtime thread and back, four process hops per
  request; the direct path has none. hivemind's handlers stay registered, so both kinds of client work.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer, nested_flatten
from hivemind.utils.streaming import split_for_streaming
from hivemind.p2p.p2p_daemon import DEFAULT_MAX_MSG_SIZE

from hivemind.utils import get_dht_time

from athome.dht import store_record, withdraw_record
from athome.dht.auth import admit
from athome.verification.integration import refuse_banned
from athome.dht.schemas import ServerRecord
from athome.numerics import all_finite

logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request that does not fit the expert; its message is sent back to the caller."""


class HostBusy(RuntimeError):
    """The host's queue is full; the caller should back off or use another replica."""


def decode_tensors(uid: str, serialized: Sequence[runtime_pb2.Tensor], what: str) -> List[torch.Tensor]:
    """Deserialize a request's tensors; a truncated or corrupt one is a BadRequest naming it, not a crash."""
    tensors = []
    for index, proto in enumerate(serialized):
        try:
            tensors.append(deserialize_torch_tensor(proto))
        except Exception as error:
            raise BadRequest(
                f"{uid}: {what} tensor {index} could not be decoded ({type(error).__name__}: {error}); "
                f"the message is truncated or corrupt"
            ) from None
    return tensors


def check_tensors(
    uid: str, tensors: Sequence[torch.Tensor], schema: Sequence, max_batch_size: int, what: str
) -> None:
    """Raise BadRequest unless ``tensors`` match ``schema`` (flat BatchTensorDescriptors) and are finite."""
    if len(tensors) != len(schema):
        raise BadRequest(f"{uid}: {what} expects {len(schema)} tensors, got {len(tensors)}")
    batch_size = None
    for index, (tensor, descriptor) in enumerate(zip(tensors, schema)):
        expected_shape = tuple(descriptor.shape[1:])
        if tensor.dim() != len(descriptor.shape) or tuple(tensor.shape[1:]) != expected_shape:
            raise BadRequest(
                f"{uid}: {what} tensor {index} has shape {tuple(tensor.shape)}, expected (batch, {', '.join(map(str, expected_shape))})"
            )
        if tensor.dtype != descriptor.dtype:
            raise BadRequest(f"{uid}: {what} tensor {index} has dtype {tensor.dtype}, expected {descriptor.dtype}")
        if batch_size is None:
            batch_size = tensor.shape[0]
        elif tensor.shape[0] != batch_size:
            raise BadRequest(f"{uid}: {what} tensors disagree on batch size ({batch_size} vs {tensor.shape[0]})")
        if not all_finite(tensor):
            raise BadRequest(f"{uid}: {what} tensor {index} contains NaN or Inf")
    if not batch_size:
        raise BadRequest(f"{uid}: {what} batch is empty")
    if batch_size > max_batch_size:
        raise BadRequest(f"{uid}: batch of {batch_size} exceeds this host's max_batch_size {max_batch_size}; split it")


def check_grad_outputs(guard, uid: str, backend: ModuleBackend, inputs_and_grads: Sequence[torch.Tensor]) -> None:
    """Raise BadRequest if ``guard`` (``athome.verification.expert_checks.GradNormGuard``) refuses the backward
    request's ``grad_outputs`` (an outlier norm: poisoned gradients); None as ``guard`` checks nothing."""
    if guard is None:
        return
    num_inputs = len(list(nested_flatten(backend.forward_schema)))
    for grad_outputs in inputs_and_grads[num_inputs:]:
        problem = guard.check(uid, grad_outputs)
        if problem:
            raise BadRequest(f"{problem}; request refused (gradient guard)")


class ValidatingConnectionHandler(ConnectionHandler):
    """hivemind's ConnectionHandler, with every request checked before it is queued for the Runtime.

    :param grad_guard: checks backward requests' ``grad_outputs`` (each handler process keeps its own statistics)
    """

    def __init__(self, dht: DHT, module_backends: Dict[str, ModuleBackend], *, max_batch_size: int, grad_guard=None,
                 **kwargs):
        super().__init__(dht, module_backends, **kwargs)
        self.max_batch_size = max_batch_size
        self.grad_guard = grad_guard

    @classmethod
    def _get_handle_name(cls, namespace: Optional[str], method_name: str) -> str:
        # register under hivemind's protocol names, so unmodified hivemind clients reach these handlers
        return ConnectionHandler._get_handle_name(namespace, method_name)

    def _backend(self, uid: str) -> ModuleBackend:
        return _backend_of(self.module_backends, uid)

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        await admit(context)  # invite-only runs: members only (athome.dht.auth)
        self._backend(request.uid)
        return await super().rpc_info(request, context)

    def _check_forward(self, uid: str, inputs: Sequence[torch.Tensor]) -> ModuleBackend:
        backend = self._backend(uid)
        check_tensors(uid, inputs, list(nested_flatten(backend.forward_schema)), self.max_batch_size, "forward")
        return backend

    def _check_backward(self, uid: str, inputs_and_grads: Sequence[torch.Tensor]) -> ModuleBackend:
        backend = self._backend(uid)
        schema = list(nested_flatten(backend.backward_schema))
        check_tensors(uid, inputs_and_grads, schema, self.max_batch_size, "backward")
        check_grad_outputs(self.grad_guard, uid, backend, inputs_and_grads)
        return backend

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        await admit(context)  # invite-only runs: members only (athome.dht.auth)
        await refuse_banned(context)  # callers the coordinator banned (athome.verification)
        inputs = decode_tensors(request.uid, request.tensors, "forward")
        backend = self._check_forward(request.uid, inputs)
        return runtime_pb2.ExpertResponse(
            tensors=await self._process_inputs(inputs, backend.forward_pool, backend.outputs_schema)
        )

    async def _gather_inputs(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> Tuple[str, List[torch.Tensor]]:
        """hivemind's, but a stream may not outgrow the largest valid request (it is held in memory whole) and a
        corrupt tensor is a BadRequest."""
        from hivemind.utils.streaming import combine_from_streaming

        uid, limit, received, tensors, parts = None, None, 0, [], []
        async for request in requests:
            if uid is None:
                uid = request.uid
                backend = self._backend(uid)
                row_bytes = sum(
                    torch.Size(d.shape[1:]).numel() * torch.empty((), dtype=d.dtype).element_size()
                    for d in nested_flatten(backend.backward_schema)
                )
                limit = self.max_batch_size * row_bytes + 2**20
            elif request.uid != uid:
                raise BadRequest(f"one stream names two experts ({uid!r}, {request.uid!r})")
            for part in request.tensors:
                received += len(part.buffer)
                if received > limit:
                    raise BadRequest(
                        f"{uid}: streamed request exceeds {limit} bytes, more than max_batch_size "
                        f"{self.max_batch_size} rows; split it"
                    )
                if part.dtype and parts:
                    tensors.append(combine_from_streaming(parts))
                    parts = []
                parts.append(part)
        if parts:
            tensors.append(combine_from_streaming(parts))
        if uid is None:
            raise BadRequest("empty request stream")
        return uid, decode_tensors(uid, tensors, "streamed")

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        await admit(context)  # invite-only runs: members only (athome.dht.auth)
        await refuse_banned(context)  # callers the coordinator banned (athome.verification)
        uid, inputs = await self._gather_inputs(requests, context)
        backend = self._check_forward(uid, inputs)
        outputs = await self._process_inputs(inputs, backend.forward_pool, backend.outputs_schema)
        for tensor in outputs:
            for part in split_for_streaming(tensor, DEFAULT_MAX_MSG_SIZE):
                yield runtime_pb2.ExpertResponse(tensors=[part])

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        await admit(context)  # invite-only runs: members only (athome.dht.auth)
        await refuse_banned(context)  # callers the coordinator banned (athome.verification)
        inputs_and_grads = decode_tensors(request.uid, request.tensors, "backward")
        backend = self._check_backward(request.uid, inputs_and_grads)
        return runtime_pb2.ExpertResponse(
            tensors=await self._process_inputs(inputs_and_grads, backend.backward_pool, backend.grad_inputs_schema)
        )

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        await admit(context)  # invite-only runs: members only (athome.dht.auth)
        await refuse_banned(context)  # callers the coordinator banned (athome.verification)
        uid, inputs_and_grads = await self._gather_inputs(requests, context)
        backend = self._check_backward(uid, inputs_and_grads)
        outputs = await self._process_inputs(inputs_and_grads, backend.backward_pool, backend.grad_inputs_schema)
        for tensor in outputs:
            for part in split_for_streaming(tensor, DEFAULT_MAX_MSG_SIZE):
                yield runtime_pb2.ExpertResponse(tensors=[part])


WIRE_COMPRESSIONS = frozenset(
    (runtime_pb2.CompressionType.NONE, runtime_pb2.CompressionType.FLOAT16, runtime_pb2.CompressionType.MEANSTD_16BIT)
)  # what a direct request may ask the host to answer in (8-bit codecs of hivemind 1.1.12 break on numpy 2)


def locked(fn: Callable, lock: threading.Lock) -> Callable:
    """``fn`` called with ``lock`` held."""

    @functools.wraps(fn)
    def call(*args):
        with lock:
            return fn(*args)

    return call


def guard_backends(backends: Dict[str, ModuleBackend]) -> Dict[str, threading.Lock]:
    """One lock per expert, held by every forward/backward whichever path (Runtime or direct) runs it.

    ``ExpertBackend.backward`` updates weights in place; without the lock a forward on the other path could read
    half-updated weights. The Runtime calls ``pool.process_func``, so that is wrapped (in this process, before the
    pools are started; the forked pool processes never call it).
    """
    locks = {}
    for uid, backend in backends.items():
        lock = locks[uid] = threading.Lock()
        for pool in backend.get_pools():
            pool.process_func = locked(pool.process_func, lock)
    return locks


class DirectExpertServicer(ServicerBase):
    """athome's expert protocol: several experts per request, computed in the host process.

    ``rpc_forward`` / ``rpc_backward`` take an ``ExpertRequest`` whose ``metadata`` is msgpack
    ``{"uids": [uid, ...], "counts": [tensors of each uid, ...], "compression": CompressionType or absent}`` and whose
    ``tensors`` are each uid's tensors in turn (hivemind's flat forward / backward schema per expert). The
    ``ExpertResponse`` has ``metadata`` msgpack ``{"counts": [...], "errors": [None or message, ...]}`` and the
    tensors of the experts that succeeded, in order, serialized with the requested compression (one of
    ``WIRE_COMPRESSIONS``; default none). One expert's bad input fails that expert alone. Requests are computed one at a time, on one thread, so the
    event loop stays free to read the next request meanwhile; past ``max_queue_seconds`` of queued work a request
    is refused with :class:`HostBusy` (backpressure).
    """

    def __init__(self, backends: Dict[str, ModuleBackend], locks: Dict[str, threading.Lock], max_batch_size: int,
                 grad_guard=None, max_queue_seconds: float = 5.0):
        self.backends, self.locks, self.max_batch_size = backends, locks, max_batch_size
        self.grad_guard = grad_guard
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="athome-direct")
        self.max_queue_seconds = max_queue_seconds
        self._queued = 0  # requests admitted and not answered yet (changed on the event loop only)
        self._service_seconds = 0.01  # EWMA of one request's compute time

    async def _queue(self, request: runtime_pb2.ExpertRequest, forward: bool) -> runtime_pb2.ExpertResponse:
        """Backpressure: refuse at once when the queue already holds more than ``max_queue_seconds`` of work.

        Without it, requests wait behind each other until their callers time out, and the host then computes
        answers nobody reads; a fast refusal makes the trainer cool this host down and use another replica.
        """
        backlog = self._queued * self._service_seconds
        if self._queued and backlog > self.max_queue_seconds:
            raise HostBusy(
                f"host busy: {self._queued} requests queued (~{backlog:.1f}s of work, limit {self.max_queue_seconds:.0f}s); "
                f"retry later or use another replica"
            )
        self._queued += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed_serve, request, forward)
        finally:
            self._queued -= 1

    def _timed_serve(self, request: runtime_pb2.ExpertRequest, forward: bool) -> runtime_pb2.ExpertResponse:
        started = time.perf_counter()
        try:
            return self._serve(request, forward)
        finally:
            self._service_seconds = 0.8 * self._service_seconds + 0.2 * (time.perf_counter() - started)

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        await admit(context)  # invite-only runs: members only (athome.dht.auth)
        await refuse_banned(context)  # callers the coordinator banned (athome.verification)
        return await self._queue(request, True)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        await admit(context)  # invite-only runs: members only (athome.dht.auth)
        await refuse_banned(context)  # callers the coordinator banned (athome.verification)
        return await self._queue(request, False)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _serve(self, request: runtime_pb2.ExpertRequest, forward: bool) -> runtime_pb2.ExpertResponse:
        uids, counts, compression = _parse_direct_metadata(request)
        if len(uids) != len(counts) or sum(counts) != len(request.tensors):
            raise BadRequest(f"request lists {sum(counts)} tensors for {len(uids)} experts, carries {len(request.tensors)}")
        if compression not in WIRE_COMPRESSIONS:
            raise BadRequest(f"unsupported response compression {compression!r}; use NONE, FLOAT16 or MEANSTD_16BIT")
        out_tensors, out_counts, errors = [], [], []
        start = 0
        for uid, count in zip(uids, counts):
            serialized, start = request.tensors[start : start + count], start + count
            try:
                what = "forward" if forward else "backward"
                outputs = self._compute(uid, decode_tensors(uid, serialized, what), forward)
                out_tensors += [serialize_torch_tensor(t, compression, allow_inplace=True) for t in outputs]
                out_counts.append(len(outputs))
                errors.append(None)
            except Exception as error:
                if not isinstance(error, BadRequest):
                    logger.warning(f"{uid}: {'forward' if forward else 'backward'} failed: {error!r}")
                out_counts.append(0)
                errors.append(f"{type(error).__name__}: {error}")
        return runtime_pb2.ExpertResponse(
            tensors=out_tensors, metadata=MSGPackSerializer.dumps(dict(counts=out_counts, errors=errors))
        )

    def _compute(self, uid: str, tensors: List[torch.Tensor], forward: bool) -> Sequence[torch.Tensor]:
        backend = _backend_of(self.backends, uid)
        schema = backend.forward_schema if forward else backend.backward_schema
        check_tensors(uid, tensors, list(nested_flatten(schema)), self.max_batch_size, "forward" if forward else "backward")
        if not forward:
            check_grad_outputs(self.grad_guard, uid, backend, tensors)
        with self.locks[uid]:
            outputs = backend.forward(*tensors) if forward else backend.backward(*tensors)
        return [t.detach().cpu() for t in outputs]


def _parse_direct_metadata(request: runtime_pb2.ExpertRequest) -> Tuple[List[str], List[int], int]:
    """(uids, counts, compression) of a direct request; BadRequest with the expected form if malformed."""
    form = "msgpack {'uids': [str, ...], 'counts': [int >= 0, ...], 'compression': int}"
    try:
        meta = MSGPackSerializer.loads(request.metadata) if request.metadata else {}
    except Exception:
        raise BadRequest(f"request metadata is not valid msgpack; expected {form}") from None
    if not isinstance(meta, dict):
        raise BadRequest(f"request metadata is a {type(meta).__name__}; expected {form}")
    uids, counts = meta.get("uids", [request.uid]), meta.get("counts", [len(request.tensors)])
    compression = meta.get("compression", runtime_pb2.CompressionType.NONE)
    if not (isinstance(uids, list) and all(isinstance(u, str) for u in uids)):
        raise BadRequest(f"request metadata 'uids' must be a list of strings; expected {form}")
    if not (isinstance(counts, list) and all(type(c) is int and c >= 0 for c in counts)):
        raise BadRequest(f"request metadata 'counts' must be a list of non-negative ints; expected {form}")
    return uids, counts, compression


def _backend_of(backends: Dict[str, ModuleBackend], uid: str) -> ModuleBackend:
    backend = backends.get(uid)
    if backend is None:
        raise BadRequest(f"this host does not serve expert {uid!r}; it serves {sorted(backends)}")
    return backend


class ExpertStateServicer(ServicerBase):
    """Runs in the host process (where the live parameters are) and streams an expert's current weights.

    ``get_state(uid)`` must return a name -> tensor dict of fp32 CPU tensors, taken consistently (under the
    backend's lock).
    """

    def __init__(self, get_state: Callable[[str], Optional[Dict[str, torch.Tensor]]]):
        self.get_state = get_state

    async def rpc_expert_state(
        self, request: runtime_pb2.ExpertUID, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        await admit(context)  # invite-only runs: members only (athome.dht.auth)
        state = self.get_state(request.uid)
        if state is None:
            raise BadRequest(f"this host does not serve expert {request.uid!r}")
        names = list(state)
        yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(names))
        for name in names:
            serialized = serialize_torch_tensor(state[name].detach().cpu().float())
            for part in split_for_streaming(serialized, DEFAULT_MAX_MSG_SIZE):
                yield runtime_pb2.ExpertResponse(tensors=[part])


async def _download_state(p2p: P2P, peer_id: PeerID, uid: str) -> Dict[str, torch.Tensor]:
    from hivemind.compression import deserialize_tensor_stream

    stub = ExpertStateServicer.get_stub(p2p, peer_id)
    stream = await stub.rpc_expert_state(runtime_pb2.ExpertUID(uid=uid))
    first = await stream.__anext__()
    names = MSGPackSerializer.loads(first.metadata)

    async def tensor_parts():
        async for message in stream:
            yield message.tensors

    tensors = await deserialize_tensor_stream(tensor_parts())
    if len(tensors) != len(names):
        raise RuntimeError(f"expert state of {uid} from {peer_id} was cut short")
    return dict(zip(names, tensors))


def download_expert_state(dht: DHT, peer_id: str, uid: str, timeout: float = 60) -> Dict[str, torch.Tensor]:
    """Fetch the current fp32 weights of ``uid`` from the host ``peer_id`` (to start a replica from them)."""

    async def fetch():
        import asyncio

        p2p = await dht.replicate_p2p()
        return await asyncio.wait_for(_download_state(p2p, PeerID.from_base58(peer_id), uid), timeout)

    return RemoteExpertWorker.run_coroutine(fetch())


class Declarer(threading.Thread):
    """Keeps this host's signed ServerRecord alive in the DHT; withdraws it when stopped.

    ``make_record()`` is called before each refresh so throughput and load stay current.
    """

    def __init__(self, dht: DHT, key: str, make_record: Callable[[], ServerRecord], ttl: float):
        super().__init__(name="expert declarer", daemon=True)
        self.dht, self.key, self.make_record, self.ttl = dht, key, make_record, ttl
        self.stop = threading.Event()  # the attribute hivemind's Server.shutdown() sets
        self.declared = threading.Event()

    def run(self) -> None:
        last_expiration = get_dht_time()
        while True:
            try:
                expiration = get_dht_time() + self.ttl
                if store_record(self.dht, self.key, self.make_record(), self.ttl, expiration=expiration):
                    last_expiration = expiration
                    self.declared.set()
                else:
                    logger.warning("No DHT node accepted this host's declaration; retrying")
            except Exception as error:
                logger.warning(f"Declaring experts failed: {error!r}")
            if self.stop.wait(self.ttl / 3 if self.declared.is_set() else 1.0):
                break
        try:
            empty = self.make_record().model_copy(update=dict(experts=[]))
            if withdraw_record(self.dht, self.key, empty, last_expiration):
                logger.info("Withdrew this host's expert declarations")
        except Exception as error:
            logger.warning(f"Could not withdraw declarations (they expire in {self.ttl:.0f}s anyway): {error!r}")


class ExpertServer(Server):
    """hivemind's Server with athome's declarer, validating handlers, state servicer and direct expert path."""

    def __init__(
        self,
        dht: DHT,
        backends: Dict[str, ModuleBackend],
        *,
        declarer: Declarer,
        get_state: Callable[[str], Optional[Dict[str, torch.Tensor]]],
        num_handlers: int,
        max_batch_size: int,
        max_queue_seconds: float = 5.0,
        **kwargs,
    ):
        super().__init__(dht, backends, num_connection_handlers=0, update_period=declarer.ttl / 3, **kwargs)
        from athome.verification.integration import guard_for_host

        grad_guard = guard_for_host()
        self.conn_handlers = [
            ValidatingConnectionHandler(dht, backends, max_batch_size=max_batch_size, grad_guard=grad_guard)
            for _ in range(num_handlers)
        ]
        self.dht_handler_thread = declarer
        self.state_servicer = ExpertStateServicer(get_state)
        self.direct_servicer = DirectExpertServicer(backends, guard_backends(backends), max_batch_size, grad_guard,
                                                    max_queue_seconds=max_queue_seconds)

    def run(self) -> None:
        async def add_host_handlers():
            # keep the replica referenced: when it is garbage-collected, its handlers silently stop answering
            self.host_p2p = p2p = await self.dht.replicate_p2p()
            await self.state_servicer.add_p2p_handlers(p2p)
            await self.direct_servicer.add_p2p_handlers(p2p)

        RemoteExpertWorker.run_coroutine(add_host_handlers())
        super().run()

    def shutdown(self) -> None:
        self.direct_servicer.shutdown()
        super().shutdown()
