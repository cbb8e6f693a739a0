"""Same-host parts through shared memory: group members of one user on one host map each other's tensor memory
read-only and copy parts straight from it, instead of both copying them through a socket.

Over TCP on one host every byte is copied twice by the kernel (into the socket, out of it) and crosses the TCP stack
on the way; here the reader copies it once, at memory speed. Peers on one host are common: a volunteer running one
peer per GPU, a trainer beside an expert server, ``peer demo``.

* **What can be offered**: memory backed by a file: the averaged tensors (hivemind moves them into ``/dev/shm``,
  torch's ``file_system`` strategy: :func:`file_segments` finds their files in ``/proc/self/maps``, without asking
  torch, whose ``_share_fd_cpu_`` would *move* such a storage) and the aggregates' output buffers
  (:class:`SharedRegion`, a memfd). The owner sends a read-only descriptor of such a segment once per connection
  (``SCM_RIGHTS`` over the Unix socket), then names parts by (segment, offset, size).
* **Who may map it**: only a process of the same user, as the kernel reports it (``SO_PEERCRED``): a segment's
  owner can shrink its file, and a reader of a shrunk mapping would die of SIGBUS; a process of the same user can
  harm us anyway. The descriptor sent is opened read-only, so the reader cannot write into the owner's tensors.
* **Staleness**: an owner keeps what it offered unchanged until the round ends on that connection; a reader checks
  after each copy that the owner has not hung up (:func:`owner_alive`): an owner that left the round hangs up before
  its memory changes, so a copy of memory that was given up is always discarded.
"""
from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

LOCATION = struct.Struct("!IQQ")  # a remote frame's payload: segment id, byte offset in it, byte count
SEGMENT = struct.Struct("!Q")  # a segment frame's payload: the segment's byte size (its descriptor rides along)


def available() -> bool:
    """True if this system can pass descriptors over Unix sockets, name their peers, and make memfds (Linux)."""
    return all(hasattr(socket, name) for name in ("AF_UNIX", "SO_PEERCRED", "SCM_RIGHTS")) and hasattr(
        os, "memfd_create"
    )


def same_user(sock: socket.socket) -> bool:
    """True if the process at the other end of a connected Unix socket runs as our user (from the kernel)."""
    try:
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid == os.getuid()


def owner_alive(sock: socket.socket) -> bool:
    """False if the other end of ``sock`` has hung up (its owner left the round, or its process ended), even with
    frames still queued before its hang-up (a peek would see those)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return not poller.poll(0)


class Segment(NamedTuple):
    """File-backed memory of this process that a same-host peer may map: ``fd`` (ours, not to be closed by the
    caller), its byte ``size``, the ``address`` it is mapped at here and ``key`` (device, inode): unique while any
    process maps it, so a reused address is never mistaken for a segment a peer mapped before."""

    fd: int
    size: int
    address: int
    key: Tuple[int, int]


class SharedRegion:
    """A buffer of this process in a memfd (not in /dev/shm, whose size containers often cap), for memory that
    same-host peers read: the aggregates' output buffers."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.fd = os.memfd_create("athome-shared", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, max(nbytes, 1))
            self._map = mmap.mmap(self.fd, max(nbytes, 1))
        except OSError:
            os.close(self.fd)
            raise
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]
        status = os.fstat(self.fd)
        self.segment = Segment(self.fd, max(nbytes, 1), self.bytes.data_ptr(), (status.st_dev, status.st_ino))

    def close(self) -> None:
        """Unmap and close; only once no tensor made from :attr:`bytes` is used any more."""
        self.bytes = None
        try:
            self._map.close()
        except BufferError:  # a view is still exported: the mapping goes with it
            pass
        os.close(self.fd)


def file_segments(tensors: Sequence[torch.Tensor]) -> List[Segment]:
    """Segments for the CPU tensors that lie in a named shared memory file (``/dev/shm/...``, mapped from its
    start), from this process's memory map; each holds a read-only descriptor of its own (close with
    :func:`close_segments`). Tensors elsewhere are skipped: their parts travel as bytes."""
    wanted = [t.data_ptr() for t in tensors if t.device.type == "cpu" and t.numel() > 0]
    segments: Dict[str, Segment] = {}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) != 6 or not fields[5].startswith("/dev/shm/") or int(fields[2], 16) != 0:
                    continue  # (a deleted file has a 7th field, "(deleted)": nobody can open it any more)
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                if fields[5] in segments or not any(low <= address < high for address in wanted):
                    continue
                fd = os.open(fields[5], os.O_RDONLY | os.O_CLOEXEC)
                status = os.fstat(fd)
                if status.st_ino != int(fields[4]):  # replaced since it was mapped: not our memory
                    os.close(fd)
                    continue
                size = min(high - low, status.st_size)
                segments[fields[5]] = Segment(fd, size, low, (status.st_dev, status.st_ino))
    except OSError:
        pass
    return list(segments.values())


def close_segments(segments: Sequence[Segment]) -> None:
    for segment in segments:
        os.close(segment.fd)


def segment_of(tensor: torch.Tensor, segments: Sequence[Segment]) -> Optional[Tuple[Segment, int]]:
    """(segment, byte offset) of a contiguous CPU tensor lying in one of ``segments``, else None."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    address = tensor.data_ptr()
    end = address + tensor.numel() * tensor.element_size()
    for segment in segments:
        if segment.address <= address and end <= segment.address + segment.size:
            return segment, address - segment.address
    return None


def readonly_descriptor(segment: Segment) -> int:
    """A new read-only descriptor of ``segment``'s file, to send (the caller closes it): the peer cannot write
    into our memory through it."""
    return os.open(f"/proc/self/fd/{segment.fd}", os.O_RDONLY | os.O_CLOEXEC)


class MappedSegment:
    """A peer's segment, mapped read-only here."""

    def __init__(self, fd: int, size: int):
        if os.fstat(fd).st_size < size:
            raise ValueError(f"segment of {os.fstat(fd).st_size} bytes announced as {size}")
        self.size = size
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        with warnings.catch_warnings():  # read-only memory: torch warns that it cannot write it (we never do)
            warnings.simplefilter("ignore", UserWarning)
            self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def copy_to(self, destination: torch.Tensor, offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` at ``offset`` into the (contiguous) ``destination``; raises ValueError out of bounds."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"range {offset}+{nbytes} is outside a segment of {self.size} bytes")
        destination.view(-1).view(torch.uint8).copy_(self.bytes[offset : offset + nbytes])

    def close(self) -> None:
        self.bytes = None
        try:
            self._map.close()
        except BufferError:
            pass


def take_descriptors(ancillary: List[Tuple[int, int, bytes]]) -> List[int]:
    """The descriptors an ``SCM_RIGHTS`` message carried (from ``recvmsg``'s ancillary data)."""
    descriptors: List[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            descriptors.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return descriptors
