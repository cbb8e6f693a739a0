"""A DHT process that outlives the processes calling it.

Every process forked from a peer (averagers, expert servers) calls the DHT by pickling ``(method, args, kwargs)``
into the DHT's pipe, with an ``MPFuture`` whose reply pipe and shared-memory state travel as file descriptors that
the DHT process fetches from the *caller's* ``multiprocessing.resource_sharer`` while unpickling. If the caller dies
between sending and that fetch (killed, crashed, OOM), unpickling fails. hivemind 1.1.12's ``DHT.run`` catches only
``OSError``/``ConnectionError``/``RuntimeError`` there: an ``EOFError`` (seen when the caller's resource sharer was
gone) or a truncated pickle ends the DHT process, and every other process of the peer that uses the DHT then waits
on it until its own timeout (an averager blocks in ``DHT.replicate_p2p``).

:func:`enable_stack_dumps` makes a peer's long-lived processes (this one, averagers) print every thread's stack on
``SIGUSR1``: ``kill -USR1 <pid>`` shows where a process that stopped answering waits.
"""
from __future__ import annotations

import faulthandler
import logging
import pickle
import signal
from multiprocessing.connection import Connection
from typing import Any

import hivemind

logger = logging.getLogger(__name__)


def enable_stack_dumps() -> None:
    """In this process, ``SIGUSR1`` prints every thread's Python stack to file descriptor 2 (``faulthandler``). Call
    it in a process's own code (after a fork, in the child). Never raises: a diagnostic must not stop a process."""
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        # the descriptor, not sys.stderr: that may be an in-memory stream without one (pytest's capsys), and then
        # faulthandler raises, which in a DHT process's run() left its parent waiting for it forever
        faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
    except (OSError, ValueError, RuntimeError) as error:
        logger.debug(f"No stack dumps on SIGUSR1 in this process: {error!r}")


class _CallerGone(ConnectionError):
    """A request whose sender died before the DHT process could unpickle it."""


class _TolerantPipe:
    """The DHT process's end of its request pipe: a request that cannot be unpickled raises ``ConnectionError``,
    which hivemind's ``DHT.run`` logs and skips (the caller is dead: nobody waits for that reply)."""

    def __init__(self, connection: Connection):
        self._connection = connection

    def recv(self) -> Any:
        try:
            return self._connection.recv()
        except (EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError, TypeError) as error:
            raise _CallerGone(f"dropped a DHT request whose sender died before it was read ({error!r})") from error

    def __getattr__(self, name: str) -> Any:  # fileno, poll, close, ...: the connection's own
        return getattr(self._connection, name)


class RobustDHT(hivemind.DHT):
    """``hivemind.DHT`` whose process survives a caller that dies mid-request (see the module docstring).

    Same arguments and behaviour as ``hivemind.DHT`` otherwise. The pipe is wrapped before the process starts, so
    the DHT process (forked) inherits the wrapper.
    """

    def __init__(self, *args, start: bool, await_ready: bool = True, **kwargs):
        super().__init__(*args, start=False, await_ready=await_ready, **kwargs)
        self._inner_pipe = _TolerantPipe(self._inner_pipe)
        if start:
            self.run_in_background(await_ready=await_ready)

    def run(self) -> None:
        """The DHT process's body (hivemind's), with stack dumps on ``SIGUSR1``."""
        enable_stack_dumps()
        super().run()
