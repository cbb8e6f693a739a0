"""Same-host reads for the data plane: a peer reads tensor parts straight from another process's memory with Linux's
cross memory attach (``process_vm_readv``), instead of both copying them through a socket.

Over TCP on one host every byte is copied twice by the kernel (into the socket, out of it) and crosses the TCP stack
on the way; a cross memory read copies it once, from the owner's pages into the reader's buffer. Peers on one host
are common: a volunteer running one peer per GPU, a trainer beside an expert server, ``peer demo``.

What makes it safe to offer:

* The process to read from is named by the kernel, never by the peer: the control channel is a Unix socket and its
  ``SO_PEERCRED`` gives the connected process's pid. A peer can only point us at addresses in its own memory.
* The kernel lets us read another process only where we could already ptrace it (same user, no Yama restriction, no
  seccomp filter): nothing is granted that the host did not already allow. Where it refuses, :func:`can_read` says
  so before the first tensor byte, and the data plane uses TCP for that pair.
* Memory read after its owner gave it up would be stale: a reader checks after each read that the owner's end of the
  socket is still open (:func:`owner_alive`); an owner that hangs up first has left the round, and the read fails.
"""
from __future__ import annotations

import ctypes
import functools
import os
import secrets
import select
import socket
import struct
from typing import Optional

LOCATION = struct.Struct("!QQ")  # a remote frame's payload: address in the owner's memory, byte count


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@functools.lru_cache(maxsize=None)
def _process_vm_readv():
    """libc's ``process_vm_readv`` (Linux), or None where this system has none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong,
    ]
    function.restype = ctypes.c_ssize_t
    return function


def available() -> bool:
    """True if this system has cross memory attach and Unix sockets with peer credentials."""
    return _process_vm_readv() is not None and hasattr(socket, "SO_PEERCRED") and hasattr(socket, "AF_UNIX")


def read_into(pid: int, address: int, destination: int, nbytes: int) -> None:
    """Copy ``nbytes`` at ``address`` in process ``pid`` to ``destination`` in ours (ctypes releases the GIL).

    :raises OSError: the kernel refused (EPERM), the process is gone (ESRCH), the range is not mapped there (EFAULT),
      or fewer bytes could be read
    """
    if nbytes == 0:
        return
    function = _process_vm_readv()
    if function is None:
        raise OSError("cross memory attach is not available on this system")
    local, remote = _IoVec(destination, nbytes), _IoVec(address, nbytes)
    count = function(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if count < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"reading {nbytes} bytes of process {pid}: {os.strerror(errno)}")
    if count != nbytes:
        raise OSError(f"read {count} of {nbytes} bytes of process {pid}")


class Probe:
    """Eight random bytes in this process's memory: a peer that reads them back (:func:`can_read`) can read ours."""

    def __init__(self):
        self.value = secrets.token_bytes(8)
        self._buffer = ctypes.create_string_buffer(self.value, len(self.value))
        self.address = ctypes.addressof(self._buffer)


def can_read(pid: int, address: int, value: bytes) -> bool:
    """True if process ``pid``'s memory at ``address`` reads as ``value`` (its :class:`Probe`)."""
    buffer = ctypes.create_string_buffer(len(value))
    try:
        read_into(pid, address, ctypes.addressof(buffer), len(value))
    except OSError:
        return False
    return buffer.raw == value


def peer_pid(sock: socket.socket) -> Optional[int]:
    """The pid of the process at the other end of a connected Unix socket, from the kernel (None if unknown, e.g. a
    process in another pid namespace)."""
    try:
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", credentials)
    return pid if pid > 0 else None


def owner_alive(sock: socket.socket) -> bool:
    """False if the other end of ``sock`` has hung up (its owner left the round, or its process ended), even with
    frames still queued before its hang-up (a peek would see those)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return not poller.poll(0)
