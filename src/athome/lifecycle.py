"""Process life cycle shared by every command: logging, clean shutdown on Ctrl+C/SIGTERM, periodic work.

A volunteer who presses Ctrl+C must not be left with a p2pd or forked DHT process running (a common complaint with
hivemind-based tools), so every command waits on :func:`shutdown_requested` and tears its pieces down in order.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable, Dict, Optional

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

logger = logging.getLogger(__name__)
stderr_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=stderr_console, show_path=False, rich_tracebacks=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", handlers=[handler], force=True)
    # hivemind installs its own handler on its loggers; route them through ours at a quieter level
    for name in ("hivemind",):
        hm_logger = logging.getLogger(name)
        hm_logger.handlers.clear()
        hm_logger.propagate = True
        hm_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


def shutdown_requested() -> threading.Event:
    """An event set by the first SIGINT or SIGTERM; a second signal exits at once.

    Forked helpers (hivemind's DHT process, task pools, connection handlers) inherit the handler; in them a
    signal first passes on SIGTERM to their own children (the DHT process's p2pd), then kills them as by default.
    """
    event = threading.Event()
    owner_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner_pid:
            _die_with_children(signum)
        if event.is_set():
            logger.warning("Second interrupt: exiting now")
            os._exit(130)
        logger.info(f"Received {signal.Signals(signum).name}, shutting down (press Ctrl+C again to force)")
        event.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    global _interrupt_handler
    _interrupt_handler = handler
    return event


_interrupt_handler = None  # the handler shutdown_requested() installed, for restore_interrupt_handler()


def restore_interrupt_handler() -> None:
    """Make Ctrl+C work again after hivemind switched it off; call it after starting averagers.

    ``DecentralizedAverager.run_in_background`` (and so ``hivemind.Optimizer``) sets SIGINT to SIG_IGN in the
    *calling* process, so Ctrl+C did nothing in `peer join` and `peer train`. A no-op outside the main thread or
    before :func:`shutdown_requested`.
    """
    if _interrupt_handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt_handler)


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return children


def _terminate_children() -> None:
    for child in _children_of(os.getpid()):
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _die_with_children(signum: int) -> None:
    _terminate_children()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


PARENT_PID_ENV = "ATHOME_PARENT_PID"  # set by a launcher that wants its `peer` subprocesses to die with it


def guard_against_orphans() -> None:
    """Make every process this one forks die (taking its own children along) if its parent is killed hard.

    hivemind forks a DHT process (which starts p2pd), task pools and connection handlers; after a SIGKILL of the
    parent they would run on forever. Children ask the kernel for SIGTERM on parent death (PR_SET_PDEATHSIG),
    and SIGTERM in a forked child goes through :func:`_die_with_children`. Linux only; elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    launcher = os.environ.pop(PARENT_PID_ENV, None)
    if launcher is not None:
        # started by another athome process (`peer demo`, a test harness) that may itself be SIGKILLed: a
        # subprocess it spawned is not covered by the fork hook below, so ask for SIGTERM on its death too
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != int(launcher):  # it died before prctl
            os._exit(1)
    parent = [os.getpid()]

    def before_fork() -> None:
        parent[0] = os.getpid()

    def in_child() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent[0]:  # the parent died between fork and prctl
            os._exit(1)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, lambda signum, frame: _die_with_children(signum))

    os.register_at_fork(before=before_fork, after_in_child=in_child)


def emit(line: str) -> None:
    """Print one machine-readable line to stdout (what scripts and `peer demo` parse), flushed at once."""
    print(line, flush=True)


class PeriodicThread(threading.Thread):
    """Calls ``fn`` every ``period`` seconds until stopped; an exception is logged and the loop goes on."""

    def __init__(self, fn: Callable[[], None], period: float, name: str, run_first: bool = True):
        super().__init__(name=name, daemon=True)
        self.fn, self.period, self.run_first = fn, period, run_first
        self.stop_event = threading.Event()

    def run(self) -> None:
        if not self.run_first and self.stop_event.wait(self.period):
            return
        while True:
            try:
                self.fn()
            except Exception as error:  # a flaky DHT must not kill the peer
                logger.warning(f"{self.name} failed: {error!r}", exc_info=logger.isEnabledFor(logging.DEBUG))
            if self.stop_event.wait(self.period):
                return

    def stop(self, timeout: Optional[float] = 10) -> None:
        self.stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


class HelperWatchdog(PeriodicThread):
    """Ends this process, saying why and what to do, once a helper process it cannot work without has ended.

    hivemind waits on its helpers without timeouts (an averager's step, every DHT call): a trainer whose DHT and
    averager processes had ended (``pkill -f 'peer train'`` signals every process of a trainer, the helpers die at
    once and the main one starts a clean shutdown) waited for them forever, main thread and shutdown alike. Stop
    the watchdog before shutting the helpers down on purpose.

    :param helpers: name -> process (``multiprocessing.Process``: hivemind's DHT and averagers are), read at each check
    :param stopping: set once this peer was asked to stop (:func:`shutdown_requested`): helpers found dead then were
      stopped by the same signal, and the process exits with 0 and no error
    """

    def __init__(
        self,
        helpers: Callable[[], Dict[str, Optional[multiprocessing.Process]]],
        stopping: threading.Event,
        period: float = 2.0,
    ):
        super().__init__(self._check, period=period, name="helper watchdog", run_first=False)
        self.helpers, self.stopping = helpers, stopping

    def _check(self) -> None:
        for name, process in self.helpers().items():
            if process is None or process.exitcode is None:
                continue
            code = process.exitcode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if self.stopping.is_set():  # e.g. `pkill -f 'peer train'`, which signals the helpers too
                logger.info(f"This peer's {name} process ended ({how}) as it was stopping: exiting now")
            else:
                message = (
                    f"this peer's {name} process (pid {process.pid}) ended ({how}) and the peer cannot go on without "
                    f"it. Look for the OOM killer in `dmesg` or `journalctl -k`, then start the command again (the "
                    f"same --identity_path keeps this peer's identity)"
                )
                _print_error(message)
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
            _terminate_children()  # the helpers still alive, which would outlive us otherwise
            os._exit(0 if self.stopping.is_set() else 1)  # the main thread may be blocked on the dead helper


def _print_error(message: str) -> None:
    stderr_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)


def die(message: str, code: int = 1) -> None:
    """Print a failure with its fix and exit."""
    _print_error(message)
    # what is left is exit: hivemind objects collected at interpreter exit (P2P replicas, pending tasks) print
    # tracebacks that would bury the message above
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.exit(code)


def exit_without_finalizers(code: int = 0) -> None:
    """End the program after a clean shutdown without running the interpreter's teardown.

    hivemind's P2P clients in this process, and the event loop of its expert-worker thread, outlive every command;
    finalized during interpreter teardown they print tracebacks ("There is no current event loop", "Task was
    destroyed") on every clean exit, which reads like a crash. By the time a command returns it has shut down
    everything it started (and forked children get SIGTERM if anything is left: :func:`guard_against_orphans`), so
    logs and standard streams are flushed and the process ends here.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
