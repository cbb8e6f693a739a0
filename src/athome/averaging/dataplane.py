"""Direct TCP data plane for athome's all-reduce: tensor parts travel as raw frames over plain TCP sockets between
group members, instead of protobuf messages through p2pd (two unix sockets and a daemon per byte).

Matchmaking, the group and its membership stay on libp2p. What this module adds, per (sender, reducer) pair:

1. **Ticket** (over the authenticated p2p channel): the sender calls the reducer's ``rpc_dataplane_ticket`` with the
   group ID. The reducer answers only a caller that libp2p authenticated as a sender of that group
   (``context.remote_id``), with a fresh random 32-byte token bound to ``(group_id, caller)``, single-use, valid for
   ``ticket_ttl`` seconds, plus the reducer's TCP endpoint ``host:port``. (The endpoint travels in the ticket reply
   rather than in hivemind's matchmaking gather data, which stays unchanged: peers without a data plane, stock
   hivemind peers included, simply answer the ticket request with "no endpoint" or an unknown-handler error.)
2. **Hello**: the sender connects and sends ``MAGIC | version | token`` (:data:`HELLO`). The reducer redeems the
   token; a wrong, reused, expired or absent token closes the connection (logged) before a single tensor byte is
   read, so nothing of it reaches the reducer. Otherwise the reducer answers one byte :data:`ACK_OK` and the
   connection is bound to that sender for that group.
3. **Frames** (both directions, full duplex): a fixed :data:`FRAME` header (kind, codec, dtype, part index, weight,
   payload length) and the payload. Payload lengths are checked against the part's size before anything is
   allocated (exact for raw parts, ``8 * numel + 64 KiB`` for coded ones); anything else is a protocol violation.
   Parts of codec ``none`` are sent straight from the tensor's memory and received into a preallocated tensor
   (no protobuf, no copies in Python); other codecs carry the codec's own buffer (:mod:`.compression`).

**Kept connections**: a connection whose round ended cleanly (every frame of both directions consumed) stays open,
and the sender's next round with that reducer starts with a :data:`ROUND` header naming the new group instead of a
ticket: the reducer checks again that the (already authenticated) sender belongs to that group and answers
:data:`ACK_OK`, or refuses. This saves the ticket RPC and the TCP handshake (fresh connections spent the first ~0.5 s
of a 5 s round on a 100 Mbit/s link at ~60%). Congestion control itself restarts at each round on both ends
(:meth:`FrameConnection.restart_congestion_control`): what a round leaves, such as BBR's bandwidth estimate of a flow
that shared its link with five others, would pace the next one. A kept connection that fails to start a round is
closed and a fresh one is tried within the same ``connect_timeout``. Idle connections are closed after ``idle_ttl``
seconds.

**Same host** (:mod:`.sharedmemory`): the reducer also names an abstract Unix socket in its ticket reply. A sender
that reaches it (same host and network namespace) and runs as the same user says its hello there; raw parts and
aggregates then travel as locations in shared memory segments whose read-only descriptors go once per connection
(KIND_SEGMENT frames), and the other side copies them from its mapping. The sender ends each round with a KIND_DONE
frame: until then the reducer keeps its aggregates unchanged.

**Fallback**: if the reducer has no endpoint, refuses the ticket, or the TCP connect / hello does not succeed within
``connect_timeout``, that pair uses hivemind's p2p ``rpc_aggregate_part`` in the same round. A reducer that failed
to connect is not tried again over TCP for ``unreachable_ttl`` seconds (e.g. behind NAT).

**Security**: the hello proves *which group member* connects (tokens come over the encrypted, authenticated libp2p
channel). The TCP stream itself is not encrypted nor integrity-protected: an on-path attacker could read or alter
tensor parts. Those parts go through the same robust reducer and result checks as p2p ones, so such an attacker has
the power of one Byzantine group member at most; runs that need confidentiality disable the plane
(``direct_tcp=False``).
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Deque, Dict, List, Optional, Tuple

import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from athome.averaging import sharedmemory
from athome.averaging.compression import codec_for_type, deserialize_tensor

logger = logging.getLogger(__name__)

# 2: raw results are aggregates (KIND_AVERAGE); 3: connections carry many rounds; 4: one answer to a same-host hello
MAGIC, VERSION = b"ATDP", 4
HELLO = struct.Struct("!4sB32s")  # magic, version, ticket token
ROUND = struct.Struct("!4sB")  # magic, group ID length; then the group ID: the next round on a kept connection
ROUND_MAGIC = b"ATRN"
ACK_OK, ACK_REFUSED = b"\x01", b"\x00"
# magic, kind, compression (runtime_pb2.CompressionType), dtype code, part index, weight, payload bytes
FRAME = struct.Struct("!2sBBBxxxIdQ")
FRAME_MAGIC = b"DF"
# a sender's part, a coded delta, a raw aggregate; same host: "I have read every result of this round", and a
# shared memory segment (its descriptor rides along as SCM_RIGHTS)
KIND_PART, KIND_RESULT, KIND_AVERAGE, KIND_DONE, KIND_SEGMENT = 1, 2, 3, 4, 5
RAW = runtime_pb2.CompressionType.NONE  # codec whose parts travel as the tensor's own bytes
# not a codec: the payload is a sharedmemory.LOCATION in a segment the sender shared, where the raw part lies
REMOTE = 255
LOCATION_SIZE = sharedmemory.LOCATION.size
MAX_DESCRIPTORS = 4  # per recvmsg: segments are announced one frame at a time
DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.float64, torch.bfloat16)
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(DTYPES, start=1)}
_NUMPY_NAMES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "bfloat16": torch.bfloat16}
CODED_OVERHEAD = 64 << 10  # the most a codec may add to a part beyond 8 bytes per value (codebooks, scales)
SOCKET_BUFFER = 4 << 20  # bytes; large buffers let one recv/send move most of a part
RECV_LOW_WATER = 256 << 10  # bytes queued before a reader wakes up (less when a frame needs less)
SENDMSG_MAX_BUFFERS = 64  # buffers per sendmsg call (the kernel's limit, IOV_MAX, is 1024)
TICKET_UID = "athome.dataplane.ticket"


class DataPlaneError(ConnectionError):
    """A peer broke the data plane protocol (bad hello, bad frame header, oversize payload) or closed early."""


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise DataPlaneError(f"the data plane does not carry {dtype} tensors") from None


def supports(tensors) -> bool:
    """True if every tensor's dtype can travel on the data plane (else the whole round uses p2p)."""
    return all(t.dtype in _DTYPE_CODES for t in tensors)


@dataclass(frozen=True)
class Frame:
    kind: int
    compression: int
    dtype: torch.dtype
    part_index: int
    weight: float
    payload: bytearray | torch.Tensor  # a tensor for raw (codec NONE) payloads, received in place
    nbytes: int  # header + payload, for byte accounting


class FrameConnection:
    """One non-blocking TCP socket carrying frames, driven by the running event loop: the kernel copies straight
    from/to tensor memory (scatter-gather ``sendmsg``, ``recv_into``).

    Each read or write first goes straight to the socket; only what the socket cannot take or give at once waits,
    with one reader (writer) callback registered for the rest of that buffer, which moves as much as the socket
    allows each time it fires. (The loop's ``sock_recv_into`` / ``sock_sendall`` register and unregister their
    callback around every chunk: 3 ``epoll_ctl`` calls and a task wake-up each, ~270 waits per peer per round of
    10M floats among 4 peers.)

    Not safe for two concurrent readers or two concurrent writers; one of each is fine (full duplex).
    """

    def __init__(self, sock: socket.socket, peer: str, same_host: bool = False):
        self.sock, self.peer = sock, peer
        # same host, same user: raw parts travel as locations in shared memory segments (REMOTE frames)
        self.same_host = same_host
        self._unix = sock.family == getattr(socket, "AF_UNIX", None)
        self._descriptors: Deque[int] = collections.deque()  # received with the bytes, for KIND_SEGMENT frames
        self._mapped: Dict[int, sharedmemory.MappedSegment] = {}  # segments the peer shared, by its ID
        self._shared: Dict[Tuple[int, int], int] = {}  # our segments shared on this connection (key -> ID)
        self.loop = asyncio.get_event_loop()
        self.closed = False
        self.rounds = 1  # rounds this connection has started (more than 1: kept between rounds)
        self._low_water = 1  # the socket's SO_RCVLOWAT
        # the pending read / write that registered a callback; close() unregisters it and fails it (before the
        # socket's file descriptor can be reused by another connection)
        self._waiting: Dict[str, Optional[asyncio.Future]] = {"read": None, "write": None}

    async def recv_exactly_into(self, view: memoryview) -> None:
        received = self._recv_available(view, 0)
        if received == len(view):
            return

        def _read_more() -> bool:
            nonlocal received
            received = self._recv_available(view, received)
            if received < len(view):
                self._set_low_water(min(len(view) - received, RECV_LOW_WATER))
            return received == len(view)

        # wake up only once min(what is still expected, RECV_LOW_WATER) bytes are queued: on a slow link segments
        # trickle in and each wake-up would move a few KiB (measured ~10 KiB per recv at 100 Mbit/s, 0.16 CPU-s
        # per peer per round in the loop alone)
        self._set_low_water(min(len(view) - received, RECV_LOW_WATER))
        await self._wait("read", _read_more)

    def _recv_available(self, view: memoryview, received: int) -> int:
        """Read into ``view[received:]`` what the socket has; returns the new count of bytes received."""
        while received < len(view):
            try:
                if self._unix:  # descriptors may ride along (KIND_SEGMENT): keep them for the frame that names them
                    count, ancillary, flags, _ = self.sock.recvmsg_into(
                        [view[received:]], socket.CMSG_SPACE(MAX_DESCRIPTORS * 4)
                    )
                    descriptors = sharedmemory.take_descriptors(ancillary)
                    self._descriptors.extend(descriptors)
                    # only a same-user peer may share segments, one frame at a time: anything else could fill our
                    # descriptor table (the connection is closed, and with it what it sent)
                    if descriptors and (not self.same_host or len(self._descriptors) > MAX_DESCRIPTORS):
                        raise DataPlaneError(f"{self.peer} sent descriptors it may not send")
                    if flags & socket.MSG_CTRUNC:
                        raise DataPlaneError(f"{self.peer} sent more descriptors at once than a segment frame has")
                else:
                    count = self.sock.recv_into(view[received:])
            except (BlockingIOError, InterruptedError):
                return received
            if count == 0:
                raise DataPlaneError(f"{self.peer} closed the connection")
            received += count
        return received

    def _set_low_water(self, nbytes: int) -> None:
        if nbytes != self._low_water:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
                self._low_water = nbytes
            except OSError:  # not supported here: plain wake-ups
                pass

    async def send_all(self, *buffers) -> int:
        """Send ``buffers`` (bytes-like, in order) as one stream of bytes; returns the byte count."""
        views = [memoryview(buffer).cast("B") for buffer in buffers]
        total = sum(view.nbytes for view in views)
        views = self._send_possible([view for view in views if view.nbytes])
        if not views:
            return total

        def _write_more() -> bool:
            nonlocal views
            views = self._send_possible(views)
            return not views

        await self._wait("write", _write_more)
        return total

    def _registration(self, direction: str) -> Tuple[Callable, Callable]:
        if direction == "read":
            return self.loop.add_reader, self.loop.remove_reader
        return self.loop.add_writer, self.loop.remove_writer

    async def _wait(self, direction: str, progress: Callable[[], bool]) -> None:
        """Call ``progress`` whenever the socket is ready for ``direction`` ("read" or "write") until it returns
        True; what it raises is raised here."""
        done = self.loop.create_future()

        def _on_ready() -> None:
            if done.done():
                return
            try:
                if progress():
                    done.set_result(None)
            except Exception as e:
                done.set_exception(e)

        register, unregister = self._registration(direction)
        register(self.sock.fileno(), _on_ready)
        self._waiting[direction] = done
        try:
            await done
        finally:
            if self._waiting[direction] is done:  # else close() has unregistered it already
                self._waiting[direction] = None
                unregister(self.sock.fileno())

    def _send_possible(self, views: List[memoryview]) -> List[memoryview]:
        """Send as much of ``views`` as the socket takes now (one ``sendmsg`` per try); returns what is left."""
        while views:
            try:
                sent = self.sock.sendmsg(views[:SENDMSG_MAX_BUFFERS])
            except (BlockingIOError, InterruptedError):
                return views
            while sent and views:
                if sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views = views[1:]
                else:
                    views = [views[0][sent:], *views[1:]]
                    sent = 0
        return views

    async def send_round(self, group_id: bytes) -> None:
        """Start the next round on this kept connection (sender side), with fresh congestion control."""
        if len(group_id) > 255:
            raise DataPlaneError("group ID too long for a round header")
        self.restart_congestion_control()
        await self.send_all(ROUND.pack(ROUND_MAGIC, len(group_id)), group_id)

    async def recv_round(self) -> bytes:
        """The group ID of the next round on this connection (:meth:`send_round`); restarts congestion control."""
        magic, length = ROUND.unpack(await self.recv_bytes(ROUND.size))
        if magic != ROUND_MAGIC:
            raise DataPlaneError(f"{self.peer} sent a bad round header")
        self.restart_congestion_control()
        return await self.recv_bytes(length)

    def restart_congestion_control(self) -> None:
        """Re-initialize this socket's congestion control (Linux), as on a fresh connection, keeping the connection.

        A kept connection would otherwise start a round with the state the previous one left: BBR's bandwidth
        estimate of a flow that ended a round sharing its link with five others, say, paces the new round's first
        seconds by it. Switching the algorithm away and back re-initializes it. Measured with 4 peers behind
        100 Mbit/s links (``bench/allreduce.py --link_mbit 100`` variants side by side, 5 pairs in one run): rounds
        took 1.16-1.19x the link-bound time with this restart, 1.20-1.32x without. Skipped where an algorithm is not
        open to this process."""
        allowed = _allowed_congestion_controls()
        try:
            current = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0", 1)[0]
        except (AttributeError, OSError):  # not Linux
            return
        other = b"cubic" if current == b"reno" else b"reno"
        if current not in allowed or other not in allowed:
            return
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, other)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, current)
        except OSError as e:
            logger.debug(f"Data plane: could not restart congestion control on the connection to {self.peer}: {e!r}")

    async def recv_bytes(self, count: int) -> bytes:
        buffer = bytearray(count)
        await self.recv_exactly_into(memoryview(buffer))
        return bytes(buffer)

    async def send_frame(
        self, kind: int, part_index: int, compression: int, dtype: torch.dtype, payload, weight: float = 0.0
    ) -> int:
        """Send one frame; ``payload`` is a tensor (sent from its memory) or a bytes-like buffer. Returns bytes sent."""
        if isinstance(payload, torch.Tensor):
            data = memoryview(payload.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            data = memoryview(payload)
        header = FRAME.pack(FRAME_MAGIC, kind, compression, dtype_code(dtype), part_index, weight, data.nbytes)
        return await self.send_all(header, data)

    async def send_location(
        self,
        kind: int,
        part_index: int,
        tensor: torch.Tensor,
        located: Tuple[sharedmemory.Segment, int],
        weight: float = 0.0,
    ) -> int:
        """Same host: send where ``tensor`` lies in one of our shared segments (``located``: segment and byte offset,
        from :func:`~.sharedmemory.segment_of`), sharing that segment first if this connection has not yet; the peer
        copies the part from there. It must stay unchanged until the peer has read it or this connection is closed.
        Returns the bytes handed over (headers, location and the tensor's bytes, as if sent)."""
        assert self.same_host
        segment, offset = located
        segment_id = self._shared.get(segment.key)
        sent = 0
        if segment_id is None:
            segment_id = self._shared[segment.key] = len(self._shared)
            sent += await self._send_segment(segment_id, segment)
        nbytes = tensor.numel() * tensor.element_size()
        header = FRAME.pack(FRAME_MAGIC, kind, REMOTE, dtype_code(tensor.dtype), part_index, weight, LOCATION_SIZE)
        await self.send_all(header, sharedmemory.LOCATION.pack(segment_id, offset, nbytes))
        return sent + FRAME.size + LOCATION_SIZE + nbytes

    async def _send_segment(self, segment_id: int, segment: sharedmemory.Segment) -> int:
        """A KIND_SEGMENT frame whose first byte carries a read-only descriptor of ``segment``."""
        data = FRAME.pack(FRAME_MAGIC, KIND_SEGMENT, RAW, 1, segment_id, 0.0, sharedmemory.SEGMENT.size)
        data += sharedmemory.SEGMENT.pack(segment.size)
        descriptor = sharedmemory.readonly_descriptor(segment)
        try:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", descriptor))]
            while True:
                try:
                    sent = self.sock.sendmsg([data], rights)
                    break
                except (BlockingIOError, InterruptedError):  # full: wait until writable (rare: frames are small)
                    await self._wait("write", lambda: True)
        finally:
            os.close(descriptor)  # the kernel holds its own reference while in flight
        await self.send_all(data[sent:])
        return len(data)

    async def _map_segment(self, segment_id: int, length: int) -> None:
        """Receive side of :meth:`_send_segment` (its header read): map the segment the peer shared."""
        if not self.same_host or length != sharedmemory.SEGMENT.size or segment_id in self._mapped:
            raise DataPlaneError(f"{self.peer} sent a segment this connection does not allow")
        (size,) = sharedmemory.SEGMENT.unpack(await self.recv_bytes(length))
        if not self._descriptors:
            raise DataPlaneError(f"{self.peer} announced a segment without its descriptor")
        descriptor = self._descriptors.popleft()
        try:
            self._mapped[segment_id] = sharedmemory.MappedSegment(descriptor, size)
        except (OSError, ValueError) as e:
            raise DataPlaneError(f"could not map the segment {self.peer} shared: {e}") from e
        finally:
            os.close(descriptor)

    async def recv_frame(
        self, kind: int, part_index: int, numel: int, into: Optional[torch.Tensor] = None
    ) -> Frame:
        """Receive the next frame, which must be of ``kind`` for part ``part_index`` of ``numel`` values.

        A same-host peer's raw part (a REMOTE frame) is copied from its shared memory here and returned as a raw
        frame; the segments it shares first (KIND_SEGMENT frames) are mapped on the way.

        :param into: a contiguous tensor of ``numel`` values: a raw payload of its dtype is received into it (the
          frame's payload is then ``into`` itself); otherwise a new tensor or buffer is allocated

        :raises DataPlaneError: on any mismatch or an oversize payload (the connection must then be closed)
        """
        while True:
            magic, got_kind, compression, code, got_index, weight, length = FRAME.unpack(
                await self.recv_bytes(FRAME.size)
            )
            if magic != FRAME_MAGIC or got_kind != KIND_SEGMENT:
                break
            await self._map_segment(got_index, length)
        if magic != FRAME_MAGIC or got_kind != kind or got_index != part_index:
            raise DataPlaneError(
                f"{self.peer} sent frame (kind {got_kind}, part {got_index}), expected (kind {kind}, part {part_index})"
            )
        if not 1 <= code <= len(DTYPES):
            raise DataPlaneError(f"{self.peer} sent unknown dtype code {code}")
        dtype = DTYPES[code - 1]
        if compression in (RAW, REMOTE):
            expected = numel * torch.empty((), dtype=dtype).element_size()
            use_into = into is not None and into.dtype == dtype and into.numel() == numel and into.is_contiguous()
            payload = into.view(-1) if use_into else torch.empty(numel, dtype=dtype)
            if compression == REMOTE:
                await self._read_remote(length, expected, payload)
                return Frame(got_kind, RAW, dtype, got_index, weight, payload, FRAME.size + LOCATION_SIZE + expected)
            if length != expected:
                raise DataPlaneError(f"{self.peer} sent a raw part of {length} bytes, expected {expected}")
            if length:
                await self.recv_exactly_into(memoryview(payload.view(torch.uint8).numpy()))
        else:
            if compression not in runtime_pb2.CompressionType.values():
                raise DataPlaneError(f"{self.peer} sent unknown compression {compression}")
            if length > 8 * numel + CODED_OVERHEAD:
                raise DataPlaneError(f"{self.peer} sent {length} bytes for a part of {numel} values (too large)")
            payload = bytearray(length)
            await self.recv_exactly_into(memoryview(payload))
        return Frame(got_kind, compression, dtype, got_index, weight, payload, FRAME.size + length)

    async def _read_remote(self, length: int, expected: int, payload: torch.Tensor) -> None:
        """Read a REMOTE frame's location, then copy the part from the peer's shared segment into ``payload``."""
        if not self.same_host:
            raise DataPlaneError(f"{self.peer} sent a same-host frame over a connection that allows none")
        if length != LOCATION_SIZE:
            raise DataPlaneError(f"{self.peer} sent a location of {length} bytes")
        segment_id, offset, nbytes = sharedmemory.LOCATION.unpack(await self.recv_bytes(LOCATION_SIZE))
        if nbytes != expected:
            raise DataPlaneError(f"{self.peer} offered a raw part of {nbytes} bytes, expected {expected}")
        segment = self._mapped.get(segment_id)
        if segment is None:
            raise DataPlaneError(f"{self.peer} named segment {segment_id}, which it never shared")
        try:
            segment.copy_to(payload, offset, nbytes)
        except ValueError as e:
            raise DataPlaneError(f"{self.peer} offered a part outside its segment: {e}") from e
        if not sharedmemory.owner_alive(self.sock):  # it may have left the round (and changed that memory) meanwhile
            raise DataPlaneError(f"{self.peer} hung up: the part copied from its memory may be stale")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for direction, waiting in self._waiting.items():
                if waiting is not None:
                    self._waiting[direction] = None
                    try:
                        self._registration(direction)[1](self.sock.fileno())
                    except (OSError, RuntimeError):  # the loop is closed already
                        pass
                    if not waiting.done():
                        waiting.set_exception(DataPlaneError(f"connection to {self.peer} was closed"))
            try:
                self.sock.close()
            except OSError:
                pass
            for segment in self._mapped.values():
                segment.close()
            self._mapped.clear()
            while self._descriptors:
                os.close(self._descriptors.popleft())


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family != socket.AF_UNIX:  # (same host: parts outside shared memory still travel as bytes)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option, limit in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
        # A fixed buffer turns Linux's autotuning off for this socket, and the kernel caps it at net.core.*mem_max:
        # at the usual default (208 KiB) that would pin the window far below a long fat link's needs (100 Mbit/s
        # over 80 ms takes 1 MB in flight), so set it only where the kernel grants the whole size
        if _kernel_limit(limit) >= SOCKET_BUFFER:
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass


@functools.lru_cache(maxsize=None)
def _allowed_congestion_controls() -> frozenset:
    """TCP congestion control algorithms any process may set on its sockets (Linux; empty elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control", "rb") as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


@functools.lru_cache(maxsize=None)
def _kernel_limit(name: str) -> int:
    """``/proc/sys/net/core/<name>`` in bytes (0 where it cannot be read: not Linux, or hidden)."""
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class TicketBook:
    """Single-use tokens bound to (group ID, peer ID), issued over p2p and redeemed by a TCP hello."""

    def __init__(self, ttl: float = 120.0):
        self.ttl = ttl
        self._tickets: Dict[bytes, Tuple[bytes, PeerID, float]] = {}

    def issue(self, group_id: bytes, peer_id: PeerID) -> bytes:
        now = time.monotonic()
        self._tickets = {t: v for t, v in self._tickets.items() if v[2] > now}
        token = secrets.token_bytes(32)
        self._tickets[token] = (group_id, peer_id, now + self.ttl)
        return token

    def redeem(self, token: bytes) -> Optional[Tuple[bytes, PeerID]]:
        """``(group ID, peer ID)`` of a valid token, else None; a token is used up by its first redemption."""
        entry = self._tickets.pop(token, None)
        if entry is None or entry[2] < time.monotonic():
            return None
        return entry[0], entry[1]


# what the server does with an authenticated connection: (group_id, peer_id, connection) -> serve that round; it
# answers ACK_OK / ACK_REFUSED itself and returns True if the connection ended the round clean (may carry the next)
ConnectionHandler = Callable[[bytes, PeerID, FrameConnection], Awaitable[bool]]
# an authenticated caller asks for a ticket: (group_id, caller) -> may it have one?
TicketPolicy = Callable[[bytes, PeerID], Awaitable[bool]]


class DataPlane:
    """One per averager process: a TCP listener, its tickets, and the client side of ticket + connect.

    :param host: IP address to listen on and announce (an address of this host, e.g. from its host_maddrs)
    :param port: TCP port, 0 for an ephemeral one
    :param announce_host: address to announce instead of ``host`` (e.g. when listening on 0.0.0.0)
    :param connect_timeout: seconds for the ticket rpc, the TCP connect and the hello together, before falling back
    :param unreachable_ttl: seconds during which a reducer whose endpoint failed is reached over p2p only
    :param idle_ttl: seconds a connection is kept open between rounds (the sender reuses it a bit less long)
    :param same_host_reads: also listen on a Unix socket, where a peer of the same user on this host connects, and
      raw parts of both sides are copied from each other's shared memory (:mod:`.sharedmemory`); other pairs use TCP
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        announce_host: Optional[str] = None,
        connect_timeout: float = 5.0,
        hello_timeout: float = 10.0,
        unreachable_ttl: float = 600.0,
        ticket_ttl: float = 120.0,
        idle_ttl: float = 300.0,
        same_host_reads: bool = True,
    ):
        self.host, self.port, self.announce_host = host, port, announce_host or host
        self.same_host_reads = same_host_reads and sharedmemory.available()
        self._local_name: Optional[bytes] = None  # abstract Unix socket of the same-host listener
        self._local_listener: Optional[socket.socket] = None
        self._no_reads: Dict[PeerID, float] = {}  # same-host reducers we cannot share memory with, until then
        self.connect_timeout, self.hello_timeout, self.unreachable_ttl = connect_timeout, hello_timeout, unreachable_ttl
        self.tickets = TicketBook(ticket_ttl)
        self._listener: Optional[socket.socket] = None
        self._accept_tasks: List[asyncio.Task] = []
        self._handler: Optional[ConnectionHandler] = None
        self._unreachable: Dict[PeerID, float] = {}
        self._serving: set = set()
        self.refused_hellos = 0  # connections closed for a bad hello (for tests and diagnostics)
        self.idle_ttl = idle_ttl
        self._kept: Dict[PeerID, Tuple[FrameConnection, float]] = {}  # sender side: reducer -> (connection, since)

    @property
    def endpoint(self) -> Tuple[str, int]:
        return self.announce_host, self.port

    async def start(self, handler: ConnectionHandler) -> None:
        self._handler = handler
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.setblocking(False)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._accept_tasks.append(asyncio.create_task(self._accept_forever(listener, local=False)))
        logger.debug(f"Data plane listening on {self.host}:{self.port} (announced as {self.announce_host})")
        if self.same_host_reads:
            # abstract namespace (Linux): no file to clean up, and reachable only from this network namespace
            name = b"\0athome-dataplane-" + secrets.token_hex(16).encode()
            local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                local.bind(name)
                local.listen(128)
                local.setblocking(False)
            except OSError as e:
                local.close()
                logger.debug(f"Data plane: no same-host listener ({e!r}); same-host peers use TCP")
            else:
                self._local_listener, self._local_name = local, name
                self._accept_tasks.append(asyncio.create_task(self._accept_forever(local, local=True)))

    async def shutdown(self) -> None:
        for task in self._accept_tasks:
            task.cancel()
        for task in list(self._serving):
            task.cancel()
        for connection, _ in self._kept.values():
            connection.close()
        self._kept.clear()
        for listener in (self._listener, self._local_listener):
            if listener is not None:
                listener.close()

    async def _accept_forever(self, listener: socket.socket, local: bool) -> None:
        loop = asyncio.get_event_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # e.g. out of file descriptors: keep serving
                logger.warning(f"Data plane accept failed: {e!r}")
                await asyncio.sleep(0.1)
                continue
            _tune(sock)
            peer = "a process on this host" if local else f"{address[0]}:{address[1]}"
            task = asyncio.create_task(self._serve(FrameConnection(sock, peer), local))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, connection: FrameConnection, local: bool = False) -> None:
        try:
            if local and not sharedmemory.same_user(connection.sock):
                # such a sender hangs up without a hello and uses TCP (_connect_local): nothing to warn about
                logger.debug("Data plane: a process of another user reached our same-host socket; connection closed")
                return
            try:
                hello = await asyncio.wait_for(connection.recv_bytes(HELLO.size), self.hello_timeout)
            except (asyncio.TimeoutError, OSError) as e:
                self.refused_hellos += 1
                logger.warning(f"Data plane: no valid hello from {connection.peer} ({e!r}); connection closed")
                return
            magic, version, token = HELLO.unpack(hello)
            bound = self.tickets.redeem(token) if magic == MAGIC and version == VERSION else None
            if bound is None:
                self.refused_hellos += 1
                logger.warning(f"Data plane: wrong or expired ticket from {connection.peer}; connection closed")
                return
            connection.same_host = local  # the same user, checked above: we may share memory
            group_id, peer_id = bound
            while await self._handler(group_id, peer_id, connection):
                try:  # the round ended clean: the sender may start its next round with us on this connection
                    async with asyncio.timeout(self.idle_ttl):
                        group_id = await connection.recv_round()
                except (asyncio.TimeoutError, OSError):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.debug(f"Data plane connection from {connection.peer} failed: {e!r}", exc_info=True)
        finally:
            connection.close()

    # ---- ticket rpc (both sides) ---------------------------------------------------------------------------------

    @staticmethod
    def ticket_request(group_id: bytes) -> runtime_pb2.ExpertRequest:
        return runtime_pb2.ExpertRequest(uid=TICKET_UID, metadata=MSGPackSerializer.dumps(dict(group_id=group_id)))

    async def answer_ticket_request(
        self, request: runtime_pb2.ExpertRequest, caller: PeerID, policy: TicketPolicy
    ) -> runtime_pb2.ExpertResponse:
        """Reducer side of ``rpc_dataplane_ticket``: ``caller`` is the libp2p-authenticated peer."""
        try:
            group_id = MSGPackSerializer.loads(request.metadata)["group_id"]
            assert request.uid == TICKET_UID and isinstance(group_id, bytes)
        except Exception:
            return _ticket_reply(error="bad request")
        if not await policy(group_id, caller):
            return _ticket_reply(error="not a sender of this group")
        host, port = self.endpoint
        local = {} if self._local_name is None else dict(local=self._local_name)
        return _ticket_reply(token=self.tickets.issue(group_id, caller), host=host, port=port, **local)

    def keep(self, peer_id: PeerID, connection: FrameConnection) -> None:
        """Sender side: ``connection`` to ``peer_id``'s reducer ended its round clean; keep it for the next round."""
        previous = self._kept.pop(peer_id, None)
        if previous is not None:
            previous[0].close()
        self._drop_stale_kept()  # reducers we stopped meeting (Moshpit groups change): their server has hung up
        if not connection.closed:
            self._kept[peer_id] = (connection, time.monotonic())

    def _drop_stale_kept(self) -> None:
        now = time.monotonic()
        for peer_id in [p for p, (_, since) in self._kept.items() if now - since >= 0.8 * self.idle_ttl]:
            self._kept.pop(peer_id)[0].close()

    async def connect(
        self,
        peer_id: PeerID,
        request_ticket: Callable[[], Awaitable[runtime_pb2.ExpertResponse]],
        group_id: Optional[bytes] = None,
    ) -> Optional[FrameConnection]:
        """Sender side: a kept connection resumed for ``group_id``, else ticket over p2p, TCP connect, hello, ack;
        all within ``connect_timeout``.

        :returns: an authenticated connection to ``peer_id``'s reducer, or None: use p2p for this pair
        """
        deadline = time.monotonic() + self.connect_timeout
        self._drop_stale_kept()
        kept, _ = self._kept.pop(peer_id, (None, 0.0))
        if kept is not None:
            if group_id is not None:
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        await kept.send_round(group_id)
                        if await kept.recv_bytes(1) == ACK_OK:
                            kept.rounds += 1
                            return kept
                except (asyncio.TimeoutError, OSError) as e:
                    logger.debug(f"Kept data plane connection to {peer_id} did not resume ({e!r})")
            kept.close()
        if self._unreachable.get(peer_id, 0.0) > time.monotonic():
            return None
        reachable = True
        sock = None
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                reply = MSGPackSerializer.loads((await request_ticket()).metadata)
                if "token" not in reply:
                    logger.debug(f"{peer_id} gave no data plane ticket: {reply.get('error')}")
                    return None
                host, port, token = str(reply["host"]), int(reply["port"]), bytes(reply["token"])
                if "local" in reply and self.same_host_reads and self._no_reads.get(peer_id, 0.0) < time.monotonic():
                    connection = await self._connect_local(peer_id, bytes(reply["local"]), token)
                    if connection is not None:
                        return connection
                reachable = False  # from here on, a failure means the endpoint is unreachable from here
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                _tune(sock)
                connection = FrameConnection(sock, f"{host}:{port}")
                await connection.loop.sock_connect(sock, (host, port))
                reachable = True  # a refused hello is about this round's ticket, not about the endpoint
                await connection.send_all(HELLO.pack(MAGIC, VERSION, token))
                if await connection.recv_bytes(1) != ACK_OK:
                    raise DataPlaneError("hello refused")
                return connection
        except asyncio.CancelledError:
            if sock is not None:
                sock.close()
            raise
        except Exception as e:
            if sock is not None:
                sock.close()
            if not reachable:
                self._unreachable[peer_id] = time.monotonic() + self.unreachable_ttl
            logger.info(f"Data plane to {peer_id} unavailable ({e!r}); using p2p for it")
            return None

    async def _connect_local(self, peer_id: PeerID, name: bytes, token: bytes) -> Optional[FrameConnection]:
        """Sender side of a same-host connection: the ticket's hello over the reducer's Unix socket, said only once
        the kernel says that the reducer runs as our user (the reducer checks the same before it reads a hello).
        None (then TCP, with the ticket still unused) if the socket is not reachable from here (another host,
        another network namespace) or the users differ; that reducer is then not tried this way for
        ``unreachable_ttl`` seconds.

        :raises DataPlaneError: the reducer refused this round (as a refused TCP hello: no TCP either)
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _tune(sock)
        connection = FrameConnection(sock, f"{peer_id} on this host")
        answer = None
        try:
            await connection.loop.sock_connect(sock, name)
            if sharedmemory.same_user(sock):
                await connection.send_all(HELLO.pack(MAGIC, VERSION, token))
                answer = await connection.recv_bytes(1)
                if answer == ACK_OK:
                    connection.same_host = True
                    return connection
            else:
                logger.info(
                    f"Data plane: {peer_id} is on this host but runs as another user: no shared memory between you, "
                    f"its parts go over TCP (averaging.same_host_reads = false skips trying)"
                )
        except OSError as e:  # e.g. ECONNREFUSED: the reducer's socket is in another network namespace
            logger.debug(f"Data plane: no same-host connection to {peer_id} ({e!r}); using TCP")
        connection.close()
        if answer is not None:
            raise DataPlaneError("hello refused")
        self._no_reads[peer_id] = time.monotonic() + self.unreachable_ttl
        return None


def _ticket_reply(**fields) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(fields))


def bind_host_from_maddrs(maddrs) -> Optional[str]:
    """The first IPv4 address of this peer's multiaddrs that it can listen on (not 0.0.0.0, not a relay's
    address: a relayed peer is not reachable there); None if none."""
    for maddr in maddrs:
        if "p2p-circuit" in str(maddr):
            continue
        parts = str(maddr).split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] != "0.0.0.0":
            return parts[2]
    return None


def decode_payload(frame: Frame, shape: torch.Size) -> torch.Tensor:
    """The tensor a frame carries (codec NONE: the received tensor itself; other codecs: decoded via athome's
    codec table)."""
    if frame.compression == runtime_pb2.CompressionType.NONE:
        return frame.payload.view(shape)
    dtype_name = str(frame.dtype).replace("torch.", "")
    serialized = runtime_pb2.Tensor(
        compression=frame.compression, buffer=bytes(frame.payload), size=list(shape), dtype=dtype_name
    )
    tensor = deserialize_tensor(serialized)
    if tensor.shape != shape:
        raise DataPlaneError(f"decoded part has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def encode_part(
    tensor: torch.Tensor, codec: CompressionBase, info: Optional[CompressionInfo] = None
) -> Tuple[int, torch.dtype, object]:
    """(compression type, dtype, payload) for :meth:`FrameConnection.send_frame`: codec ``none`` sends the tensor's
    own memory; other codecs send their serialized buffer (same format as in hivemind's protobuf messages)."""
    if getattr(codec, "compression_type", None) == runtime_pb2.CompressionType.NONE:
        return runtime_pb2.CompressionType.NONE, tensor.dtype, tensor.detach().contiguous()
    serialized = codec.compress(tensor, info or CompressionInfo.from_tensor(tensor))
    if serialized.dtype not in _NUMPY_NAMES:
        raise DataPlaneError(f"the data plane does not carry {serialized.dtype} tensors")
    return serialized.compression, _NUMPY_NAMES[serialized.dtype], serialized.buffer


def encode_result(delta: torch.Tensor, compression_type: int) -> Tuple[int, torch.dtype, object]:
    """Encode an averaged part (a delta) with the codec its sender used, like hivemind's reducer does."""
    return encode_part(delta, codec_for_type(compression_type))
