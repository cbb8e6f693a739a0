"""athome.averaging.dataplane: the direct TCP data plane of the all-reduce (tickets, frames, fallback to p2p).

The unit test drives a real DataPlane over real TCP sockets on 127.0.0.1; the others run real hivemind DHTs and
averager processes (4 DHT nodes shared by the module), as tests/test_averaging.py does.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import time
import uuid

import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from athome.averaging import PartialRoundError, RobustAllReduceRunner, RobustAverager
from athome.averaging.dataplane import (
    ACK_OK,
    ACK_REFUSED,
    FRAME,
    FRAME_MAGIC,
    HELLO,
    KIND_PART,
    KIND_RESULT,
    MAGIC,
    RAW,
    VERSION,
    DataPlane,
    DataPlaneError,
    bind_host_from_maddrs,
    decode_payload,
    encode_part,
)
from athome.averaging.compression import get_codec

import test_averaging
from test_averaging import (  # noqa: F401 (dhts, victim_dht: fixtures)
    _flat, _form_group, _outcomes, _random_sets, _signal_self, _step_all, _tensors, dhts, victim_dht,
)

# small parts so that every member of a 4-peer group reduces a slice; the mean so that results are exact. Parts go
# over TCP, as between hosts, unless a test asks for same-host reads (test_averaging.py runs with them, the default)
AVERAGER_KWARGS = dict(test_averaging.AVERAGER_KWARGS, target_group_size=4, reducer="mean", same_host_reads=False)
SAME_HOST = dict(same_host_reads=True)


# ---- the protocol over real sockets, no averager -----------------------------------------------------------------


async def _hello_answer(host: str, port: int, token: bytes) -> bytes:
    """Connect, present ``token``, return what the server answers before closing (b"": refused)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(HELLO.pack(MAGIC, VERSION, token))
    try:
        return await asyncio.wait_for(reader.read(1), 5)
    finally:
        writer.close()


def test_tickets_hello_and_frames_over_tcp():
    async def main():
        plane = DataPlane("127.0.0.1", connect_timeout=2.0, same_host_reads=False)
        served, received = [], []

        async def handler(group_id, peer_id, connection):
            served.append((group_id, peer_id))
            await connection.send_all(ACK_OK)
            frame = await connection.recv_frame(KIND_PART, 0, 6)
            received.append(decode_payload(frame, torch.Size([2, 3])))
            await connection.send_frame(KIND_RESULT, 0, *encode_part(received[-1] * 2, get_codec("none")))

        async def members_only(group_id, caller):
            return group_id == b"group" and caller == "alice"

        await plane.start(handler)
        host, port = plane.endpoint
        request_for = lambda group, caller: lambda: plane.answer_ticket_request(  # noqa: E731
            DataPlane.ticket_request(group), caller, members_only
        )

        # a wrong ticket: closed before anything else is read, nothing reaches the handler
        assert await _hello_answer(host, port, secrets.token_bytes(32)) == b""
        # a ticket for a group the caller is not a sender of is not issued: no connection (the pair uses p2p)
        assert await plane.connect("mallory", request_for(b"group", "mallory")) is None
        assert await plane.connect("bob", request_for(b"other group", "alice")) is None
        assert not served and plane.refused_hellos == 1

        # a valid ticket: the connection is bound to (group, caller); raw frames go both ways
        reply = await request_for(b"group", "alice")()
        token = MSGPackSerializer.loads(reply.metadata)["token"]
        connection = await plane.connect("carol", lambda: asyncio.sleep(0, reply))
        assert connection is not None
        part = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        sent = await connection.send_frame(KIND_PART, 0, *encode_part(part, get_codec("none")), weight=1.0)
        assert sent == FRAME.size + 24
        result = decode_payload(await connection.recv_frame(KIND_RESULT, 0, 6), torch.Size([2, 3]))
        assert torch.equal(result, part * 2) and torch.equal(received[0], part)
        assert served == [(b"group", "alice")]
        connection.close()

        # the same ticket cannot be used twice
        assert await _hello_answer(host, port, token) == b""
        assert plane.refused_hellos == 2 and len(served) == 1

        # frames are checked before anything is allocated: an oversize raw part is a protocol violation
        left, right = socket.socketpair()
        from athome.averaging.dataplane import FrameConnection

        left.setblocking(False)
        reader = FrameConnection(left, "test")
        right.sendall(FRAME.pack(FRAME_MAGIC, KIND_PART, RAW, 1, 0, 1.0, 1 << 40))
        with pytest.raises(DataPlaneError, match="raw part"):
            await reader.recv_frame(KIND_PART, 0, 6)
        right.sendall(FRAME.pack(FRAME_MAGIC, KIND_PART, RAW, 1, 5, 1.0, 24))
        with pytest.raises(DataPlaneError, match="expected"):
            await reader.recv_frame(KIND_PART, 0, 6)
        reader.close()
        right.close()

        # an endpoint that does not answer: no connection, and p2p is used for that reducer from then on
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead_port = closed.getsockname()[1]
        dead = lambda: asyncio.sleep(0, runtime_pb2.ExpertResponse(  # noqa: E731
            metadata=MSGPackSerializer.dumps(dict(token=b"x" * 32, host="127.0.0.1", port=dead_port))
        ))
        assert await plane.connect("dave", dead) is None
        assert await plane.connect("dave", request_for(b"group", "alice")) is None  # not even asked again
        await plane.shutdown()

    asyncio.run(main())


def test_a_clean_connection_carries_the_next_round_without_a_ticket(monkeypatch):
    from athome.averaging.dataplane import FrameConnection

    restarts = []  # both ends restart congestion control when a kept connection starts a round
    monkeypatch.setattr(FrameConnection, "restart_congestion_control", lambda self: restarts.append(self.peer))

    async def main():
        plane = DataPlane("127.0.0.1", connect_timeout=2.0, same_host_reads=False)
        rounds, tickets = [], []

        async def handler(group_id, peer_id, connection):
            if group_id == b"refused":
                await connection.send_all(ACK_REFUSED)
                return False
            rounds.append(group_id)
            await connection.send_all(ACK_OK)
            frame = await connection.recv_frame(KIND_PART, 0, 2)
            await connection.send_frame(KIND_RESULT, 0, *encode_part(frame.payload + 1, get_codec("none")))
            return True  # clean: the sender may start its next round here

        async def members(group_id, caller):
            return True

        async def ticket(group_id):
            tickets.append(group_id)
            return await plane.answer_ticket_request(DataPlane.ticket_request(group_id), "alice", members)

        async def one_round(group_id):
            connection = await plane.connect("bob", lambda: ticket(group_id), group_id)
            assert connection is not None
            await connection.send_frame(KIND_PART, 0, *encode_part(torch.zeros(2), get_codec("none")), weight=1.0)
            result = await connection.recv_frame(KIND_RESULT, 0, 2)
            assert torch.equal(result.payload, torch.ones(2))
            plane.keep("bob", connection)
            return connection

        await plane.start(handler)
        first = await one_round(b"round 1")
        assert restarts == []  # a fresh connection starts fresh anyway
        second = await one_round(b"round 2")
        assert second is first and tickets == [b"round 1"]  # the kept connection, no new ticket
        assert rounds == [b"round 1", b"round 2"]
        assert len(set(restarts)) == 2  # the sender's end and the reducer's (each named by its remote address)

        # a round the reducer refuses on the kept connection: that connection is dropped and a fresh one is tried
        assert await plane.connect("bob", lambda: ticket(b"refused"), b"refused") is None
        assert first.closed and tickets == [b"round 1", b"refused"]

        # a connection kept for most of the server's idle time is closed, not resumed (the server may hang up)
        third = await one_round(b"round 3")
        plane.idle_ttl = 0.0
        plane.keep("carol", await plane.connect("carol", lambda: ticket(b"round 4"), b"round 4"))
        assert third.closed and "bob" not in plane._kept
        await plane.shutdown()

    asyncio.run(main())


def test_same_host_peers_copy_raw_parts_from_shared_memory(monkeypatch):
    """Over the Unix socket, a segment's read-only descriptor goes once, then frames carry locations in it and the
    other side copies from its mapping (here both planes live in this process); a copy is discarded once its owner
    hung up; a location outside what was shared is a protocol violation; another user's peer gets TCP."""
    from athome.averaging import dataplane, sharedmemory

    async def main():
        plane = DataPlane("127.0.0.1", connect_timeout=2.0)
        assert plane.same_host_reads, "this test needs Linux (Unix sockets, SO_PEERCRED, memfd)"
        reducer_region = sharedmemory.SharedRegion(64)
        first_frames = []

        async def handler(group_id, peer_id, connection):
            await connection.send_all(ACK_OK)
            frame = await connection.recv_frame(KIND_PART, 0, 6)
            first_frames.append(frame)
            aggregate = reducer_region.bytes[:24].view(torch.float32)
            torch.mul(frame.payload, 2, out=aggregate)
            located = sharedmemory.segment_of(aggregate, [reducer_region.segment])
            await connection.send_location(KIND_RESULT, 0, aggregate, located)
            await connection.recv_frame(dataplane.KIND_DONE, 1, 0)
            return True

        async def members(group_id, caller):
            return True

        ticket = lambda: plane.answer_ticket_request(DataPlane.ticket_request(b"g"), "alice", members)  # noqa: E731
        await plane.start(handler)
        connection = await plane.connect("bob", ticket, b"g")
        assert connection is not None and connection.sock.family == socket.AF_UNIX and connection.same_host
        region = sharedmemory.SharedRegion(48)
        part = region.bytes[:24].view(torch.float32)
        part.copy_(torch.arange(6, dtype=torch.float32))
        located = sharedmemory.segment_of(part, [region.segment])
        sent = await connection.send_location(KIND_PART, 0, part, located, weight=1.0)
        # the segment frame, then the location; the part's bytes count as handed over
        assert sent == 2 * FRAME.size + sharedmemory.SEGMENT.size + dataplane.LOCATION_SIZE + 24
        into = torch.zeros(6)
        result = await connection.recv_frame(KIND_RESULT, 0, 6, into=into)
        assert result.compression == RAW and result.payload.data_ptr() == into.data_ptr()  # copied in place
        assert torch.equal(into, part * 2) and torch.equal(first_frames[0].payload, part)
        await connection.send_frame(dataplane.KIND_DONE, 1, RAW, torch.float32, b"")
        # a second part of the same segment: no second segment frame
        second = region.bytes[24:48].view(torch.float32)
        assert await connection.send_location(KIND_PART, 1, second, sharedmemory.segment_of(second, [region.segment])) \
            == FRAME.size + dataplane.LOCATION_SIZE + 24
        connection.close()

        def pair():
            left, right = socket.socketpair(socket.AF_UNIX)
            left.setblocking(False)
            right.setblocking(False)
            return (dataplane.FrameConnection(left, "reader", same_host=True),
                    dataplane.FrameConnection(right, "owner", same_host=True))

        # the owner offers a location, then hangs up before the reader copies it: the copy is refused as stale
        reader, owner = pair()
        await owner.send_location(KIND_PART, 0, part, located)
        owner.close()
        with pytest.raises(DataPlaneError, match="hung up"):
            await reader.recv_frame(KIND_PART, 0, 6)
        reader.close()

        # locations outside what was shared, of the wrong size, or over a connection that allows none
        for segment_id, offset, nbytes, numel, error in (
            (0, 40, 24, 6, "outside"), (7, 0, 24, 6, "never shared"), (0, 0, 20, 6, "offered"),
        ):
            reader, owner = pair()
            await owner._send_segment(0, region.segment)
            await owner.send_all(
                FRAME.pack(FRAME_MAGIC, KIND_PART, dataplane.REMOTE, 1, 0, 1.0, dataplane.LOCATION_SIZE),
                sharedmemory.LOCATION.pack(segment_id, offset, nbytes),
            )
            with pytest.raises(DataPlaneError, match=error):
                await reader.recv_frame(KIND_PART, 0, numel)
            reader.close()
            owner.close()
        reader, owner = pair()
        reader.same_host = False
        await owner.send_all(
            FRAME.pack(FRAME_MAGIC, KIND_PART, dataplane.REMOTE, 1, 0, 1.0, dataplane.LOCATION_SIZE),
            sharedmemory.LOCATION.pack(0, 0, 24),
        )
        with pytest.raises(DataPlaneError, match="allows none"):
            await reader.recv_frame(KIND_PART, 0, 6)
        reader.close()
        owner.close()

        # descriptors before the connection may share memory are a protocol violation (they could fill our table)
        reader, owner = pair()
        reader.same_host = False
        await owner._send_segment(0, region.segment)
        with pytest.raises(DataPlaneError, match="may not send"):
            await reader.recv_frame(KIND_PART, 0, 6)
        reader.close()
        owner.close()

        # a peer of another user on this host gets TCP (a segment's owner could shrink it under a reader)
        monkeypatch.setattr(sharedmemory, "same_user", lambda sock: False)
        refused = plane.refused_hellos
        fallback = await plane.connect("carol", ticket, b"g")
        assert fallback is not None and fallback.sock.family == socket.AF_INET and not fallback.same_host
        fallback.close()
        assert plane.refused_hellos == refused  # both sides hung up before any hello: nothing to warn about
        assert "carol" in plane._no_reads  # not tried that way again for a while
        await plane.shutdown()
        region.close()
        reducer_region.close()

    asyncio.run(main())


def test_averaged_tensors_are_found_in_their_shared_memory_files():
    """hivemind puts averaged tensors in /dev/shm files (torch's file_system strategy): their segments come from
    this process's memory map, without asking torch (whose _share_fd_cpu_ would move the storage), and what a peer
    receives is read-only."""
    import fcntl

    from athome.averaging import sharedmemory

    assert torch.multiprocessing.get_sharing_strategy() == "file_system"  # set by importing hivemind
    tensor = torch.randn(100_000).share_memory_()
    address = tensor.data_ptr()
    segments = sharedmemory.file_segments([tensor, torch.randn(10)])  # a private tensor has none
    try:
        assert len(segments) == 1
        part = tensor[1000:2000]
        segment, offset = sharedmemory.segment_of(part, segments)
        assert offset == part.data_ptr() - segment.address and tensor.data_ptr() == address  # nothing moved
        descriptor = sharedmemory.readonly_descriptor(segment)
        assert fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        mapped = sharedmemory.MappedSegment(descriptor, segment.size)
        os.close(descriptor)
        copied = torch.empty(1000)
        mapped.copy_to(copied, offset, 4000)
        assert torch.equal(copied, part)
        mapped.close()
    finally:
        sharedmemory.close_segments(segments)


def test_listen_address_comes_from_own_direct_addresses():
    maddrs = ["/ip4/1.2.3.4/tcp/5/p2p/QmRelay/p2p-circuit", "/ip4/0.0.0.0/tcp/1", "/ip4/10.0.0.2/tcp/7"]
    assert bind_host_from_maddrs(maddrs) == "10.0.0.2"
    assert bind_host_from_maddrs(["/ip6/::1/tcp/1"]) is None  # then the plane stays off and p2p carries the parts


# ---- real averagers ----------------------------------------------------------------------------------------------


def _averagers(dhts, sets, classes=None, per_peer=None):
    prefix = f"test_{uuid.uuid4().hex[:12]}"
    classes = classes or [RobustAverager] * len(sets)
    per_peer = per_peer or [{} for _ in sets]
    return [
        cls([t.clone() for t in tensors], dht, prefix=prefix, start=True, **{**AVERAGER_KWARGS, **own})
        for cls, tensors, dht, own in zip(classes, sets, dhts, per_peer)
    ]


def _assert_exact_mean(averagers, sets):
    mean = _flat([torch.stack(ts).mean(0) for ts in zip(*sets)])
    for averager in averagers:
        assert float((_flat(_tensors(averager)) - mean).abs().max()) <= 1e-6
        report = averager.last_round
        assert report.ok and report.group_size == 4 and report.unreduced_fraction == 0, report


def _others(averagers, averager):
    return {str(a.peer_id) for a in averagers} - {str(averager.peer_id)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("same_host", [False, True], ids=["tcp", "same_host"])
def test_four_peers_reach_the_exact_mean_over_the_plane(dhts, same_host):
    sets = _random_sets(4, seed=30)
    averagers = _averagers(dhts, sets, per_peer=[SAME_HOST if same_host else {}] * 4)
    try:
        results = _step_all(averagers)
        assert all(isinstance(r, dict) and len(r) == 4 for r in results), results
        _assert_exact_mean(averagers, sets)
        for averager in averagers:  # every other member's slice came over the plane (TCP, or read from its memory)
            assert set(averager.last_round.tcp_reducers) == _others(averagers, averager)
            expected = _others(averagers, averager) if same_host else set()
            assert set(averager.last_round.same_host_reducers) == expected
            assert averager.last_round.kept_reducers == ()
            assert averager.last_round.bytes_sent > 0

        # the next round goes over the same connections (no ticket, no handshake) and is exact too
        sets = _random_sets(4, seed=31)
        for averager, tensors in zip(averagers, sets):
            with averager.get_tensors() as local:
                for target, source in zip(local, tensors):
                    target.copy_(source)
        results = _step_all(averagers)
        assert all(isinstance(r, dict) and len(r) == 4 for r in results), results
        _assert_exact_mean(averagers, sets)
        for averager in averagers:
            assert set(averager.last_round.kept_reducers) == _others(averagers, averager)
    finally:
        for averager in averagers:
            averager.shutdown()


@pytest.mark.timeout(120)
def test_same_host_pairs_skip_the_codec(dhts):
    """Codecs save network bytes; parts read from memory cross none: on one host the mean is exact even with
    uint8 (whose error is ~1% of the range), and the bytes handed over are the raw parts'."""
    sets = _random_sets(4, seed=34, shapes=((40000,),))
    averagers = _averagers(dhts, sets, per_peer=[dict(SAME_HOST, compression="uint8")] * 4)
    try:
        results = _step_all(averagers)
        assert all(isinstance(r, dict) and len(r) == 4 for r in results), results
        _assert_exact_mean(averagers, sets)
        for averager in averagers:
            report = averager.last_round
            assert report.same_host_reducers and set(report.same_host_reducers) == set(report.tcp_reducers)
            assert report.bytes_sent >= 0.9 * 2 * 3 / 4 * 40000 * 4, report.bytes_sent  # raw: 4 bytes per value
    finally:
        for averager in averagers:
            averager.shutdown()


class _ForgingRunner(RobustAllReduceRunner):
    """Gets real tickets over p2p, then presents random tokens on TCP instead."""

    async def _open_tcp(self, peer_id):
        stub = self._get_peer_stub(peer_id)

        async def forged_ticket():
            reply = MSGPackSerializer.loads(
                (await stub.rpc_dataplane_ticket(DataPlane.ticket_request(self.group_id))).metadata
            )
            reply["token"] = secrets.token_bytes(32)
            return runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(reply))

        return await self.dataplane.connect(peer_id, forged_ticket)


def _averager_with(runner_type):
    """RobustAverager running ``runner_type``; keeps the class name, which hivemind puts in its p2p handler names."""
    return type("RobustAverager", (RobustAverager,), dict(runner_type=runner_type))


_ForgingAverager = _averager_with(_ForgingRunner)


@pytest.mark.timeout(120)
def test_wrong_ticket_is_refused_and_that_pair_falls_back_to_p2p(dhts):
    sets = _random_sets(4, seed=31)
    averagers = _averagers(dhts, sets, classes=[RobustAverager] * 3 + [_ForgingAverager])
    forger = averagers[3]
    try:
        results = _step_all(averagers)
        assert all(isinstance(r, dict) and len(r) == 4 for r in results), results
        # refused connections carried nothing: the forger's parts arrived once, over p2p, and the mean is exact
        _assert_exact_mean(averagers, sets)
        assert forger.last_round.tcp_reducers == ()
        for averager in averagers[:3]:
            assert set(averager.last_round.tcp_reducers) == _others(averagers, averager)
    finally:
        for averager in averagers:
            averager.shutdown()


@pytest.mark.timeout(120)
def test_mixed_round_one_member_without_the_plane(dhts):
    sets = _random_sets(4, seed=32)
    # p2p streams through p2pd can stall for seconds on a loaded 2-core box: a longer floor than the module's 2 s
    patient = dict(min_chunk_timeout=5.0)
    averagers = _averagers(dhts, sets, per_peer=[patient, patient, patient, dict(patient, direct_tcp=False)])
    try:
        results = _step_all(averagers)
        assert all(isinstance(r, dict) and len(r) == 4 for r in results), results
        _assert_exact_mean(averagers, sets)
        assert averagers[3].last_round.tcp_reducers == ()
        for averager in averagers[:3]:  # TCP among the three, p2p to the fourth (it has no endpoint to offer)
            assert set(averager.last_round.tcp_reducers) == _others(averagers[:3], averager)
    finally:
        for averager in averagers:
            averager.shutdown()


class _DiesMidStream(RobustAllReduceRunner):
    """The victim's reducer answers one part to each sender over TCP, then its process is killed (or frozen)."""

    signal_number = signal.SIGKILL

    async def _reduce_stream(self, parts, sender_index):
        answered = 0
        async for item in super()._reduce_stream(parts, sender_index):
            yield item
            answered += 1
            if answered == 1:
                await asyncio.sleep(0.3)  # let the first results reach every sender
                _signal_self(self.signal_number)


_DyingAverager = _averager_with(_DiesMidStream)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("same_host", [False, True], ids=["tcp", "same_host"])
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_peer_killed_mid_stream_does_not_hang_the_others(dhts, victim_dht, monkeypatch, how, same_host):
    monkeypatch.setattr(_DiesMidStream, "signal_number", getattr(signal, how))  # inherited by the forked victim
    sets = _random_sets(4, seed=33, shapes=((2000,),))
    # min_group_size=4: the round always includes the victim (with 2, the survivors could form a group without it)
    averagers = _averagers(
        dhts[:3] + [victim_dht], sets, classes=[RobustAverager] * 3 + [_DyingAverager],
        per_peer=[dict(min_group_size=4, same_host_reads=same_host)] * 4,
    )
    survivors, victim = averagers[:3], averagers[3]
    try:
        controls = _form_group(averagers)
        started = time.monotonic()
        for control in controls:
            control.allow_allreduce()
        outcomes = _outcomes(controls[:3], timeout=60)
        elapsed = time.monotonic() - started
        # bounded: the victim's reducer timeout (4 s) plus the repair window (one more)
        assert elapsed < 30, f"survivors took {elapsed:.1f}s"
        # every survivor lost the victim's later parts: nobody completed, nothing was applied
        assert all(isinstance(o, PartialRoundError) for o in outcomes), outcomes
        for averager, original in zip(survivors, sets):
            assert torch.equal(_tensors(averager)[0], original[0]), "a partial round must not be applied"
        deadline = time.monotonic() + 5
        while not all(a.last_round is not None for a in survivors) and time.monotonic() < deadline:
            time.sleep(0.05)
        for averager in survivors:
            report = averager.last_round
            assert report.status == "partial" and 0 < report.unreduced_fraction < 1, report
            assert str(victim.peer_id) in report.failed_reducers and str(victim.peer_id) in report.tcp_reducers
            assert (str(victim.peer_id) in report.same_host_reducers) == same_host
    finally:
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        victim.join(5)
        for averager in survivors:
            averager.shutdown()


def test_congestion_control_restart_keeps_the_algorithm(monkeypatch):
    """The restart switches the algorithm away and back: the socket must end on the algorithm it had, and where
    this process may not set one of the two, the socket is left alone."""
    from athome.averaging import dataplane

    def algorithm(sock: socket.socket) -> bytes:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0", 1)[0]

    async def main():
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname()) as client:
                connection = dataplane.FrameConnection(client, "peer")
                before = algorithm(client)
                connection.restart_congestion_control()
                assert algorithm(client) == before
                for other in (b"reno", b"cubic"):  # set explicitly: the restart comes back to it, not the default
                    if other in dataplane._allowed_congestion_controls():
                        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, other)
                        connection.restart_congestion_control()
                        assert algorithm(client) == other

                class RecordingSocket:  # what the restart asks of the kernel, for algorithms this process may not set
                    def __init__(self, name: bytes):
                        self.name, self.set = name, []

                    def getsockopt(self, *args) -> bytes:
                        return self.name + bytes(16 - len(self.name))

                    def setsockopt(self, level, option, value) -> None:
                        self.set.append(value)

                for current, allowed, expected in (
                    (b"bbr", {b"bbr", b"reno", b"cubic"}, [b"reno", b"bbr"]),
                    (b"reno", {b"reno", b"cubic"}, [b"cubic", b"reno"]),
                    (b"bbr", {b"reno", b"cubic"}, []),  # could not switch back
                    (b"bbr", {b"bbr"}, []),  # could not switch away
                ):
                    monkeypatch.setattr(dataplane, "_allowed_congestion_controls", lambda: frozenset(allowed))
                    connection.sock = RecordingSocket(current)
                    connection.restart_congestion_control()
                    assert connection.sock.set == expected
                connection.sock = client

    asyncio.run(main())


def test_socket_buffers_are_fixed_only_where_the_kernel_grants_them(monkeypatch):
    """A buffer capped by net.core.rmem_max would also turn autotuning off: below the size, leave the kernel's."""
    from athome.averaging import dataplane

    granted = dataplane._kernel_limit("rmem_max")

    def buffer_after_tune(limit: int) -> int:
        monkeypatch.setattr(dataplane, "_kernel_limit", lambda name: limit)
        with socket.socket() as sock:
            dataplane._tune(sock)
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    with socket.socket() as fresh:
        default = fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert buffer_after_tune(212992) == default  # the usual default rmem_max: autotuning stays on
    if granted >= dataplane.SOCKET_BUFFER:
        assert buffer_after_tune(dataplane.SOCKET_BUFFER) >= dataplane.SOCKET_BUFFER
