"""Robust Moshpit averaging: hivemind's DecentralizedAverager with CenteredClip, fixed codecs and consistent rounds.

:class:`RobustAverager` (parameters, any tensors) and :class:`RobustGradientAverager` (drop-in
``hivemind.Optimizer(grad_averager_factory=...)``) share :class:`RobustAveragingMixin`, which overrides two
methods of ``hivemind.DecentralizedAverager`` that run in the averager's background process (and wraps ``step`` in
the host process so that a round's report is available when ``step`` returns):

* ``_aggregate_with_group``: sets this round's time limits from measured throughput (:mod:`.timeouts`), keeps the
  type of athome's errors (hivemind rewraps everything as MatchmakingException), and emits a :class:`RoundReport`;
* ``_run_allreduce_inplace_``: runs :class:`~athome.averaging.allreduce.RobustAllReduceRunner` with a
  :class:`~athome.averaging.reducer.RobustTensorPartReducer`, and applies the result *atomically*.

What a round guarantees (a "round" = one all-reduce in one group):

1. Either every element of the averaged tensors is replaced by the group's aggregate (``status="ok"``), or the
   tensors are left bit-for-bit as they were before the round (``status`` in partial / timeout / failed / cancelled).
   hivemind applies results tensor by tensor as they arrive and keeps local values for parts whose reducer failed,
   logging only a warning; here results are buffered and applied only after the runner finished with every part
   reduced. Cost: one extra copy of the vector in the averager process during a round.
2. A round never outlives its time limit (derived from the bytes to move and the measured throughput, with floors);
   a silent (frozen) peer is excluded as a sender after ``sender_timeout`` and as a reducer after
   ``reducer_timeout``, so survivors finish or give up within ``allreduce_timeout``.
3. ``step(...)`` raises :class:`~athome.averaging.allreduce.PartialRoundError` /
   :class:`~athome.averaging.allreduce.RoundTimeoutError` (subclasses of hivemind's AllreduceException) when the
   last attempt was incomplete; with ``allow_retries=True`` (hivemind's default) hivemind first retries with a new
   group until the step's ``timeout`` (with ``timeout=None``: until a round succeeds). Every attempt that found a
   group, successful or not, produces a :class:`RoundReport` (``last_round``, ``round_history()``, ``on_round``).
4. No NaN/Inf is ever averaged or applied: reducers reject non-finite parts (the sender is treated as failed) and
   receivers reject non-finite results (the reducer is treated as failed, hence a partial round).
5. Survivors end a round the same way (:mod:`.consistency`): a member whose all-reduce was incomplete (a reducer
   died mid-stream, its own input was rejected, its limit expired) copies the outcome of a member that completed
   the round (``RoundReport.repaired_from``; cross-checked against the parts it did receive) within
   ``repair_timeout`` = the round's reducer timeout; if no member completed, every survivor keeps its tensors and
   raises as in 1. Precisely: among members that stay alive and can exchange messages within that timeout, either
   all hold the group's aggregate or all hold their tensors from before the round.
6. Tensor parts travel over the direct TCP data plane (:mod:`.dataplane`: raw frames, tickets issued over p2p by
   ``rpc_dataplane_ticket``) where both members of a pair have it, else over hivemind's p2p streams; 1-5 hold for
   either transport (they share the runner's bookkeeping). ``direct_tcp=False`` turns the plane off.

Not guaranteed: bit-identical values between members that each completed the round when a codec is used: each adds
its own decoded delta to its own copy (up to twice the codec's error). Without a codec, members receive the same
aggregate bits over the data plane (over p2p, hivemind's deltas: float rounding). A sender that failed mid-round is
dropped by the reducers (each part then averages the senders that delivered it).
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing as mp
import random
import threading
import time
import weakref
from collections import deque
from concurrent.futures import InvalidStateError
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Deque, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging import averager as hivemind_averager_module
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import hagenbach_bishoff, load_balance_peers
from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.compression import deserialize_torch_tensor
from hivemind.compression import serialization as hivemind_serialization
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import achain, aiter_with_timeout, as_aiter, enter_asynchronously, switch_to_uvloop
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from athome.averaging import sharedmemory
from athome.averaging.allreduce import PartialRoundError, RobustAllReduceRunner, RoundTimeoutError
from athome.averaging.compression import Quantile8BitCodec, Uniform8BitCodec, get_codec
from athome.averaging.consistency import RoundOutcomes, agreement_tolerance, fetch_round_result
from athome.averaging.outputs import OutputBufferPool, ReceiveBufferPool
from athome.averaging.dataplane import ACK_OK, ACK_REFUSED, DataPlane, FrameConnection, bind_host_from_maddrs
from athome.averaging.reducer import ReducerMethod, ReducerSettings, SenderEvidence
from athome.averaging.timeouts import AdaptiveTimeouts, RoundTimeouts
from athome.dht.auth import admit, get_admission
from athome.dht.process import enable_stack_dumps
from athome.verification.downloads import (
    DEFAULT_BOUND,
    DEFAULT_MAX_SOURCES,
    DownloadedState,
    StateRejected,
    combine_states,
    state_problem,
)

logger = logging.getLogger(__name__)

DEFAULT_PART_VALUES = 2**19  # values per streamed part by default (2 MiB of fp32); half as many for coded parts
PART_PROPOSAL = "athome.part_bytes"  # marks gathered data that carries a member's part size proposal
MAX_PARTS = 4096  # parts per vector a group may agree on (10M fp32 in 128 KiB parts: 306)
ROBUST_GROUP_SIZE = 3  # the smallest group in which CenteredClip can out-vote one attacker
LEFT_MATCHMAKING = "this peer left matchmaking (it is shutting down)"  # how its steps end (leave_matchmaking)
# how steps end while the owner expects no other peer (expect_group_size(1))
NO_OTHER_PEER = "no other peer to average with (its owner counts none in the swarm)"
NO_OTHER_PEER_CHECK_PERIOD = 0.5  # seconds between a search's looks at its owner's expected group size
JOINED_GROUPS_KEPT = 16  # group IDs a matchmaking remembers joining (rounds of steps in flight at once: a few)

RoundStatus = Literal["ok", "partial", "timeout", "failed", "cancelled"]


@dataclass
class RoundReport:
    """The outcome of one all-reduce attempt, as seen by this peer.

    ``evidence`` covers only the slice of the vector this peer reduced: sender peer ID -> :class:`SenderEvidence`.
    """

    group_id: str
    peers: Tuple[str, ...]
    status: RoundStatus = "failed"
    started_at: float = 0.0  # DHT time
    duration: float = 0.0  # seconds spent in the all-reduce proper
    bytes_sent: int = 0  # serialized bytes this peer sent to other peers
    bytes_received: int = 0
    vector_bytes: float = 0.0  # size of the whole vector after compression (estimate)
    unreduced_fraction: float = 0.0  # elements whose reducer failed (they were *not* applied)
    failed_reducers: Dict[str, str] = field(default_factory=dict)
    excluded_senders: Tuple[str, ...] = ()  # senders this peer's reducer dropped (silent or rejected input)
    evidence: Dict[str, SenderEvidence] = field(default_factory=dict)
    timeouts: Optional[RoundTimeouts] = None
    repaired_from: Optional[str] = None  # status "ok" after an incomplete all-reduce: the member we copied from
    repair_failures: Dict[str, str] = field(default_factory=dict)  # member -> why it could not repair us
    throughput: float = 0.0  # this peer's throughput estimate after the round, bytes/s
    tcp_reducers: Tuple[str, ...] = ()  # reducers this peer reached over the direct TCP data plane (others: p2p)
    same_host_reducers: Tuple[str, ...] = ()  # of those, reached on this host (parts read from memory)
    kept_reducers: Tuple[str, ...] = ()  # of those, reached over a connection kept from an earlier round
    part_bytes: int = 0  # the part size the group agreed on (see RobustAveragingMixin._agree_on_parts)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def group_size(self) -> int:
        return len(self.peers)

    def suspects(self, min_clip_fraction: float = 0.5) -> List[str]:
        """Senders that were rejected or whose contribution was mostly heavily clipped."""
        return [peer for peer, record in self.evidence.items() if record.clip_fraction >= min_clip_fraction]


class RoundLog:
    """Reports received from the averager process (host-process side): a bounded history plus an optional callback.

    The callback runs in a background thread of the host process; exceptions are logged, never raised.
    """

    def __init__(self, maxlen: int = 64, callback: Optional[Callable[[RoundReport], Any]] = None):
        self._reports: deque = deque(maxlen=maxlen)
        self._count = 0
        self._condition = threading.Condition()
        self.callback = callback

    def add(self, report: RoundReport) -> None:
        with self._condition:
            self._reports.append(report)
            self._count += 1
            self._condition.notify_all()
        if self.callback is not None:
            try:
                self.callback(report)
            except Exception:
                logger.exception("on_round callback failed")

    @property
    def count(self) -> int:
        return self._count

    def wait_for_count(self, count: int, timeout: float) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: self._count >= count, timeout=timeout)

    def latest(self) -> Optional[RoundReport]:
        with self._condition:
            return self._reports[-1] if self._reports else None

    def history(self) -> List[RoundReport]:
        with self._condition:
            return list(self._reports)


def _forward_reports(connection, log_ref: "weakref.ref[RoundLog]") -> None:
    """Host-process thread: move reports from the averager process into the RoundLog until the pipe closes."""
    while True:
        try:
            report = connection.recv()
        except (EOFError, OSError):
            return
        log = log_ref()
        if log is None:
            return
        log.add(report)
        del log


def keep_freed_memory_mapped() -> None:
    """Make this process's malloc (glibc) reuse freed multi-megabyte blocks instead of returning them to the OS.

    A round allocates megabyte-sized temporaries afresh (coded parts, p2p messages, fallback aggregates; the raw parts
    a reducer receives and CenteredClip's buffers are pooled, see ReceiveBufferPool); by default glibc
    serves such blocks with mmap, or trims them off the heap when freed, so every round faulted the same memory in
    again: 4000-7000 page faults per peer per round of 10M floats, and element-wise ops on fresh 1 MB tensors ran
    5x slower than on reused ones (measured: a 4-row coordinate-wise median, 1.40 vs 0.29 ms). Fixed thresholds keep
    blocks up to 32 MB on the heap and the heap's free top mapped up to 256 MB. Only the averager process, which
    hivemind runs on its own, is changed; elsewhere (no glibc) this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("malloc thresholds left alone: no glibc")
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    if not (mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 256 << 20)):
        logger.debug("malloc thresholds left alone: mallopt refused them")


@torch.no_grad()
def apply_worker_momentum_(momenta: Sequence[torch.Tensor], values: Sequence[torch.Tensor], beta: float,
                           updates: int) -> None:
    """The worker-momentum rule, in place: ``m <- beta m + (1 - beta) x``, then ``x <- m / (1 - beta^updates)``
    (bias-corrected; ``updates`` counts this one). What :class:`RobustGradientAverager` averages instead of ``x``."""
    correction = 1.0 - beta**updates
    for momentum, value in zip(momenta, values):
        momentum.mul_(beta).add_(value, alpha=1.0 - beta)
        torch.div(momentum, correction, out=value)


def _keep_tasks_until_done(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` hold a strong reference to every task it creates until the task is done.

    hivemind's averager process starts every request from its pipe (``_step``, ``_load_state_from_peers``, ...) with
    ``create_task`` and drops the task. A task that awaits an ``MPFuture`` (resolved by a thread that keeps only
    weak references) is then referenced by nothing but its own cycle, and the cyclic garbage collector may destroy it
    mid-await ("Task was destroyed but it is pending!"): the caller's future never resolves (seen: a trainer stuck
    in ``load_state_from_peers`` until its 10-minute timeout)."""
    tasks: set = set()
    make_task = loop.get_task_factory() or (lambda loop, coro, **kwargs: asyncio.Task(coro, loop=loop, **kwargs))

    def factory(loop, coro, **kwargs):
        task = make_task(loop, coro, **kwargs)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    loop.set_task_factory(factory)


def _switch_to_uvloop_keeping_tasks() -> asyncio.AbstractEventLoop:
    loop = switch_to_uvloop()
    _keep_tasks_until_done(loop)
    return loop


def _step_failures_to_debug(record: logging.LogRecord) -> bool:
    """Logging filter for hivemind's averager logger in the averager process: hivemind logs every failed step at
    ERROR with its traceback ("could not find a group" included) and then hands the same exception to the caller,
    who reports it (replica averaging, hivemind's Optimizer, the round report). That duplicate, a traceback in a
    volunteer's console for a round nobody could join, goes to DEBUG."""
    if record.funcName == "_step" and record.levelno >= logging.ERROR and record.exc_info:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


class EndedQuietlyStepControl(StepControl):
    """hivemind's ``StepControl``, minus one false alarm: hivemind warns, when any step never triggered is deleted,
    that "this may cause other peers to fail an averaging round", also for a step whose round had already ended
    before its trigger (no group, or its peer left matchmaking to shut down), which hivemind's Optimizer then drops
    for the next one it schedules. No peer can wait for such a step. Seen at the end of ``peer demo`` runs, in the
    log of the trainer that stopped last. A step deleted while still pending is warned about as before."""

    __slots__ = ()

    def __del__(self):
        if not self.triggered and self.done():
            MPFuture.__del__(self)  # StepControl's own __del__ adds only the warning
        else:
            super().__del__()


class QuietStepControls(DecentralizedAverager):
    """``DecentralizedAverager`` whose steps hand out :class:`EndedQuietlyStepControl`. It sits right above
    ``DecentralizedAverager`` in each robust averager's bases: hivemind's ``GradientAverager`` and
    ``TrainingStateAverager`` schedule the steps that hivemind's Optimizer drops with ``super().step``, past any
    override in a class above them."""

    def step(self, *args, **kwargs):
        result = super().step(*args, **kwargs)
        if type(result) is StepControl:
            result.__class__ = EndedQuietlyStepControl
        return result


class RobustMatchmaking(Matchmaking):
    """hivemind's ``Matchmaking`` that never asks a banned peer to lead its group, nor follows a leader's redirect to
    one: as the only honest member of a banned leader's group, this peer would have nobody to average with. (As a
    leader, the averager refuses banned followers in ``rpc_join_group``.) ``banned_peers``: base58 peer IDs.

    It also remembers the groups it was assembled into (``joined_groups``, the latest ``JOINED_GROUPS_KEPT``), so that
    the averager can tell a round it may still run from one it never will (:meth:`RobustAveragingMixin._never_runs`),
    and, once ``leaving`` (see :meth:`RobustAveragingMixin.leave_matchmaking`), ends every step that looks for a
    group (``searching``: the steps in :meth:`look_for_group` now); so does a change of the expected group size to 1
    (:meth:`RobustAveragingMixin.expect_group_size`). A step assembled into a pair while
    ``ROBUST_GROUP_SIZE`` or more peers are seen fails at once (see
    :meth:`RobustAveragingMixin.refuse_pairs_while_seeing`)."""

    banned_peers: set
    joined_groups: Deque[bytes]
    searching: Dict[StepControl, asyncio.Task]
    leaving: bool = False
    peers_seen: Any  # a shared ctypes int (see RobustAveragingMixin.refuse_pairs_while_seeing)
    expected_group_size: Any  # a shared ctypes int (see RobustAveragingMixin.expect_group_size); 0: unknown, 1: alone

    @property
    def target_group_size(self) -> Optional[int]:
        """hivemind's group size limit: a leader assembles its group the moment it holds this many peers, and refuses
        more. Without a configured limit, the peers its owner expects in a round (at least 2) stand in for one, so
        that a round starts once every expected peer has joined instead of after ``min_matchmaking_time``."""
        configured, expected = self.__dict__["target_group_size"], self.expected_group_size.value
        return expected if configured is None and expected >= 2 else configured

    @target_group_size.setter
    def target_group_size(self, value: Optional[int]) -> None:
        self.__dict__["target_group_size"] = value

    async def _request_join_group(self, leader: PeerID) -> Optional[GroupInfo]:
        if str(leader) in self.banned_peers:
            logger.debug(f"Not joining the group of banned peer {leader}")
            return None
        return await super()._request_join_group(leader)

    async def look_for_group(self, step: StepControl) -> Optional[GroupInfo]:
        if self.leaving:
            self._end(step, LEFT_MATCHMAKING)
            raise MatchmakingException(LEFT_MATCHMAKING)
        search = self.searching[step] = asyncio.current_task()
        watcher = asyncio.create_task(self._end_once_nobody_is_expected(step, search))
        try:
            group_info = await super().look_for_group(step)
        finally:
            watcher.cancel()
            self.searching.pop(step, None)
        if group_info is not None and len(group_info.peer_ids) < ROBUST_GROUP_SIZE <= self.peers_seen.value:
            message = (f"not averaging in a group of {len(group_info.peer_ids)} while {self.peers_seen.value} peers "
                       f"are seen: CenteredClip cannot out-vote an attacker in it")
            self._end(step, message)  # at once: retried, the pair would meet again until the step's deadline
            raise MatchmakingException(message)
        if group_info is not None:
            self.joined_groups.append(group_info.group_id)
        return group_info

    def leave(self) -> None:
        self.leaving = True
        for step, task in list(self.searching.items()):
            self._end(step, LEFT_MATCHMAKING)
            task.cancel()

    def _expects_nobody(self) -> bool:
        return self.expected_group_size.value == 1

    async def _end_once_nobody_is_expected(self, step: StepControl, search: asyncio.Task) -> None:
        """End ``step``'s search once its owner comes to expect no other peer: the peers it waited for have left (the
        survivor of a pair kept looking until its step's timeout, 30 s in a trainer, with its next optimizer step
        queued behind that background round). A search that starts while nobody is expected is left to its owner,
        which decides whether to run it (hivemind's Optimizer schedules rounds ahead and cancels them when alone:
        ending them at once, every step would schedule another)."""
        expected_nobody = self._expects_nobody()
        while True:
            await asyncio.sleep(NO_OTHER_PEER_CHECK_PERIOD)
            expects_nobody = self._expects_nobody()
            if expects_nobody and not expected_nobody:
                break
            expected_nobody = expects_nobody
        self._end(step, NO_OTHER_PEER)
        search.cancel()

    @staticmethod
    def _end(step: StepControl, reason: str) -> None:
        """Fail ``step`` for its owner. hivemind's step loop ends a finished step; one that failed to find a group is
        retried until its deadline. (Not ``step.cancel()``: from this process, hivemind 1.1.12's StepControl.cancel
        leaves the owner's copy pending, see RobustAveragingMixin.leave_matchmaking.)"""
        if not step.done():
            step.set_exception(MatchmakingException(reason))


class RobustAveragingMixin:
    """Shared by :class:`RobustAverager` and :class:`RobustGradientAverager`; see the module docstring.

    :param reducer: "centered_clip" (default) or "mean"
    :param clip_tau: CenteredClip radius, as a multiple of the median distance to the estimate (see reducer.py)
    :param clip_iterations: CenteredClip iterations per part
    :param max_weight_ratio: CenteredClip caps claimed weights at this multiple of the median weight
    :param heavy_clip_scale: a sender's part counts as "clipped" in the evidence if its final clip scale is lower
    :param compression: "none" | "fp16" | "uint8" or a hivemind CompressionBase
    :param on_round: called with every :class:`RoundReport`, in a background thread of this process
    :param initial_throughput: bytes/s assumed before the first measured round (keep it low)
    :param timeout_margin: limits are this many times the expected duration
    :param min_allreduce_timeout: floor of the all-reduce time limit, seconds
    :param min_chunk_timeout: floor of the per-part (sender) timeout, seconds; default: ``next_chunk_timeout`` or 10
      (5 s gave false failures with 8 peers of 10M floats on a loaded 2-core box: one part can stall that long)
    :param torch_threads: torch intra-op threads inside the averager process (None: leave torch's default)
    :param part_size_bytes: (hivemind's) size of the parts a vector is streamed in, after compression; athome's
      default is 512K values per part with "none" (2 MiB), 256K with a codec (512 KiB "fp16", 256 KiB "uint8").
      It is the ceiling: once a round has measured this peer's throughput, it proposes ~40 ms worth of sending (at least
      128 KiB), and each group streams in the smallest part size its members proposed
    :param direct_tcp: move tensor parts over the direct TCP data plane (:mod:`.dataplane`) where possible
    :param same_host_reads: on the data plane, peers of one user on one host (e.g. one per GPU) copy each other's
      parts, raw, from shared memory instead of sending them over TCP (:mod:`.sharedmemory`; Linux)
    :param dataplane_host: IP to listen on and announce for it (default: the first IPv4 of this peer's p2p
      addresses, preferring non-loopback ones); ``dataplane_port``: its TCP port (0: ephemeral)
    :param kwargs: everything hivemind's averager accepts (``dht``, ``prefix``, ``target_group_size``,
      ``initial_group_bits``, ``min_matchmaking_time``, ``request_timeout``, ...). A given ``allreduce_timeout`` is
      kept as hivemind's outer limit; sender/reducer timeouts are always derived per round.
    """

    runner_type: Optional[type] = None  # a subclass may swap the runner (default: RobustAllReduceRunner)

    # hivemind caches rpc handlers per class and a subclass inherits its parent's cache: collect ours separately
    _rpc_handlers = None
    _stub_type = None

    def __init__(
        self,
        *args,
        start: bool,
        reducer: ReducerMethod = "centered_clip",
        clip_tau: float = 1.0,
        clip_iterations: int = 5,
        max_weight_ratio: float = 1.0,
        heavy_clip_scale: float = 0.5,
        compression: Union[str, CompressionBase] = "none",
        on_round: Optional[Callable[[RoundReport], Any]] = None,
        initial_throughput: float = 5e6,
        timeout_margin: float = 4.0,
        min_allreduce_timeout: float = 60.0,
        min_chunk_timeout: Optional[float] = None,
        report_history: int = 64,
        torch_threads: Optional[int] = 1,
        direct_tcp: bool = True,
        same_host_reads: bool = True,
        dataplane_host: Optional[str] = None,
        dataplane_port: int = 0,
        **kwargs,
    ):
        self._direct_tcp, self._dataplane_host, self._dataplane_port = direct_tcp, dataplane_host, dataplane_port
        self._same_host_reads = same_host_reads
        self._dataplane_task: Optional[asyncio.Task] = None  # averager process: starts the data plane once
        self.reducer_settings = ReducerSettings(reducer, clip_tau, clip_iterations, max_weight_ratio, heavy_clip_scale)
        codec = get_codec(compression)
        _check_state_compression(kwargs.get("state_compression"))
        # 2 MiB fp32 parts instead of hivemind's 512 KiB: each part costs every member Python work on both sides of
        # each connection (measured, 4 peers x 10M fp32 on 2 cores: averager user CPU 22-28 ms per round with 2 MiB
        # parts, 27-36 with 1 MiB; hivemind's 512 KiB cost 17% more than 1 MiB). Slower links get smaller parts once
        # measured (timeouts.py). Coded parts hold half as many values, so that encoding a part overlaps sending
        # the previous ones (uint8 parts of 4x the values took 1.8x the wall time of codec "none" at N=4)
        ratio = codec.estimate_compression_ratio(CompressionInfo.from_tensor(torch.zeros(1)))
        values = DEFAULT_PART_VALUES if ratio >= 1 else DEFAULT_PART_VALUES // 2
        kwargs.setdefault("part_size_bytes", int(values * 4 * ratio))
        if min_chunk_timeout is None:
            min_chunk_timeout = kwargs.get("next_chunk_timeout") or 10.0
        self._adaptive_timeouts = AdaptiveTimeouts(
            initial_throughput=initial_throughput,
            margin=timeout_margin,
            min_allreduce_timeout=min_allreduce_timeout,
            min_chunk_timeout=min_chunk_timeout,
        )
        self._round_log = RoundLog(report_history, on_round)
        self._report_reader, self._report_writer = mp.Pipe(duplex=False)
        self._torch_threads = torch_threads
        self._current_report: Optional[RoundReport] = None
        self._current_timeouts: Optional[RoundTimeouts] = None
        self._round_outcomes = RoundOutcomes()
        # a round's buffers are reused two rounds later, when RoundOutcomes has dropped that round's outcome
        # same-host peers copy our parts and aggregates from shared memory (sharedmemory.py)
        self._tensor_segments: Optional[Tuple[Tuple[int, ...], List[sharedmemory.Segment]]] = None
        self._output_buffers = OutputBufferPool(
            sets=self._round_outcomes.max_rounds, shared=direct_tcp and same_host_reads and sharedmemory.available()
        )
        self._reducer_workspace: dict = {}  # CenteredClip's scratch buffers, kept from round to round
        self._banned_peers: set = set()  # peer IDs (base58) banned by the run's coordinator: see ban_peers()
        # shared with the averager process: see expect_group_size and refuse_pairs_while_seeing
        self._expected_group_size = mp.Value(ctypes.c_int32, 0, lock=False)
        self._peers_seen = mp.Value(ctypes.c_int32, 0, lock=False)

        super().__init__(*args, compression=codec, start=False, **kwargs)

        self._part_size_bytes = float(self.allreduce_kwargs["part_size_bytes"])
        with self.get_tensors() as tensors:
            infos = self.tensor_infos or [CompressionInfo.from_tensor(t, key=i) for i, t in enumerate(tensors)]
            self._vector_bytes = float(
                sum(t.numel() * t.element_size() * codec.estimate_compression_ratio(i) for t, i in zip(tensors, infos))
            )
            # what our reducer receives in a round (CenteredClip: its rows, our own part included) is the slice it
            # owns, once per sender: the whole vector for an equal split, give or take an element per sender (a
            # larger, bandwidth-weighted slice is allocated afresh instead: memory stays bounded by the vector)
            vector_bytes = sum(t.numel() * t.element_size() for t in tensors)
            self._receive_pool = ReceiveBufferPool(max_bytes=vector_bytes + (1 << 20))
        threading.Thread(
            target=_forward_reports,
            args=(self._report_reader, weakref.ref(self._round_log)),
            name=f"{type(self).__name__}.reports",
            daemon=True,
        ).start()
        if start:
            self.run_in_background(await_ready=True)

    # ---- host-process API -------------------------------------------------------------------------------------

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        super().run_in_background(await_ready=await_ready, timeout=timeout)
        # the averager process has its own copy of the write end; closing ours lets the report thread see EOF
        # (and exit) when that process ends
        self._report_writer.close()

    def step(self, *args, **kwargs):
        """hivemind's ``step``; additionally, with ``wait=True`` the round's report is in ``last_round`` on return.

        :raises PartialRoundError: the last attempt left some parts unreduced (tensors unchanged)
        :raises RoundTimeoutError: the last attempt ran out of time (tensors unchanged)
        """
        wait = kwargs.get("wait", True)
        reports_before = self._round_log.count
        try:
            result = super().step(*args, **kwargs)
        except AllreduceException:
            if wait:  # athome's round errors are raised after their report was sent
                self._round_log.wait_for_count(reports_before + 1, timeout=2.0)
            raise
        if wait:
            self._round_log.wait_for_count(reports_before + 1, timeout=2.0)
        return result

    def ban_peers(self, peer_ids: Sequence[str]) -> None:
        """Ignore these peers (banned by the run's coordinator, ``athome.verification``) in every later round: their
        parts get weight 0 (their streams are refused) and they are given no part of the vector to reduce. Call from
        one thread (the pipe to the averager process is not thread-safe), e.g. the training loop."""
        new = {str(peer) for peer in peer_ids} - self._banned_peers
        if not new:
            return
        self._banned_peers |= new
        if self.is_alive():  # before start, the averager process inherits the set
            self._outer_pipe.send(("_ban_peers", [], dict(peer_ids=sorted(new))))

    def expect_group_size(self, size: Optional[int]) -> None:
        """Tell matchmaking how many peers a round should hold (e.g. the trainers a progress tracker has counted for a
        while): as a leader, this peer starts the all-reduce as soon as that many have joined its group, instead of
        waiting out ``min_matchmaking_time``, and refuses further peers (who then form a group of their own); ``None``:
        wait the full time again. Applies only where ``target_group_size`` was not set, from the next join on; a stale
        count costs time (too high: the full wait, as without it) or a split round (too low).
        ``1`` (or less): this peer is alone; steps looking for a group end now (within
        ``NO_OTHER_PEER_CHECK_PERIOD``) with a MatchmakingException. Steps started while it lasts look as usual,
        and end if the count goes up and then back to 1. Thread-safe (a shared value): e.g. from a progress
        tracker's thread."""
        self._expected_group_size.value = 0 if size is None else max(size, 1)

    def refuse_pairs_while_seeing(self, peers: int) -> None:
        """With ``peers`` >= ``ROBUST_GROUP_SIZE`` (3) peers around (e.g. the trainers a progress tracker sees), a step
        assembled into a group of two fails at once instead of averaging: there CenteredClip is the plain mean, and
        one of the two may be an attacker. For rounds that may be skipped (parameter averaging), not for those every
        step waits on: a seen peer that keeps out of the rounds would leave pairs with no round at all."""
        self._peers_seen.value = peers

    def leave_matchmaking(self) -> None:
        """Join no more groups, for a peer about to shut down: rounds still looking for a group end now, and so does
        any later one, or a retry after a failed round; rounds whose group has formed run on, so that its
        members get this peer's parts. (hivemind waits such searches out, up to their timeout, when shutting down:
        30 s for the trainer that finishes last in ``peer demo``, its background round looking for peers that left.)
        The steps end with a MatchmakingException for their owner: hivemind's StepControl.cancel, called in the
        averager process, leaves the owner's copy pending and then raises in the owner's shutdown.
        Call from the thread that calls ``step``."""
        if self.is_alive():
            self._outer_pipe.send(("_leave_matchmaking", [], {}))

    async def _ban_peers(self, peer_ids: Sequence[str]) -> None:
        self._banned_peers.update(peer_ids)

    @property
    def banned_peers(self) -> frozenset:
        """Base58 IDs of the peers :meth:`ban_peers` banned."""
        return frozenset(self._banned_peers)

    @property
    def last_round(self) -> Optional[RoundReport]:
        """The latest :class:`RoundReport` received from the averager process (None before the first round)."""
        return self._round_log.latest()

    @property
    def last_round_evidence(self) -> Dict[str, SenderEvidence]:
        """Evidence about senders from the latest round: peer ID -> :class:`SenderEvidence` (empty if none)."""
        report = self._round_log.latest()
        return dict(report.evidence) if report is not None else {}

    def round_history(self) -> List[RoundReport]:
        return self._round_log.history()

    @property
    def on_round(self) -> Optional[Callable[[RoundReport], Any]]:
        return self._round_log.callback

    @on_round.setter
    def on_round(self, callback: Optional[Callable[[RoundReport], Any]]) -> None:
        self._round_log.callback = callback

    def __del__(self):
        if hasattr(self, "_parent_pid"):  # not when __init__ refused its arguments before hivemind's ran
            super().__del__()

    # ---- averager-process side --------------------------------------------------------------------------------

    def _run_internal(self):
        if self._torch_threads is not None:
            # the averager's tensor ops are on 128K-element parts; multi-threaded kernels on them cost more than they
            # save when the cores are busy serving/training (measured 5x slower sums on a loaded 2-core box), and
            # the averager already runs (de)serialization in parallel executor threads
            torch.set_num_threads(self._torch_threads)
        keep_freed_memory_mapped()
        enable_stack_dumps()
        logging.getLogger("hivemind.averaging.averager").addFilter(_step_failures_to_debug)
        # hivemind's _run_internal builds its event loop with this module-level function: this (forked) process's
        # loop then keeps the tasks it starts alive (_keep_tasks_until_done)
        hivemind_averager_module.switch_to_uvloop = _switch_to_uvloop_keeping_tasks
        super()._run_internal()

    async def _step(self, *, step: StepControl, future_for_init: MPFuture):
        """hivemind's ``_step`` (averager process), with this peer's part size proposal added to the data it sends
        its group (:meth:`~athome.averaging.timeouts.AdaptiveTimeouts.part_bytes`: the configured ``part_size_bytes``
        until a round has measured this peer's throughput, then less on slow links), and matchmaking that never
        follows a banned leader (:class:`RobustMatchmaking`). A step its owner cancelled while it finished ends
        quietly (hivemind's ``set_result`` on it raised InvalidStateError, logged at ERROR as a task exception never
        retrieved: in 4 of 50 demo trainer logs)."""
        self._robust_matchmaking()
        bandwidth, mode, user_bytes = self.serializer.loads(step.data_for_gather)
        proposal = self._adaptive_timeouts.part_bytes(self._part_size_bytes)
        wrapped = self.serializer.dumps([PART_PROPOSAL, proposal, user_bytes])
        step._data_for_gather = self.serializer.dumps([bandwidth, mode, wrapped])  # noqa: SLF001 (built by step())
        try:
            return await super()._step(step=step, future_for_init=future_for_init)
        except InvalidStateError:
            if not step.cancelled():
                raise
            logger.debug(f"{step} was cancelled by its owner as it finished")
        finally:
            # hivemind clears this event when matchmaking starts and sets it only when a group registers: a step that
            # ends without a group (its matchmaking timed out just as a leader assembled a group with it) left
            # that leader's requests for its parts (here and in rpc_aggregate_part) waiting for a group that will
            # never come, until the leader's own timeouts (~20 s in a demo). With no step looking, they are told now
            if not self._matchmaking.is_looking_for_group:
                self._pending_groups_registered.set()

    def _robust_matchmaking(self) -> RobustMatchmaking:
        """This process's matchmaking as a :class:`RobustMatchmaking` (hivemind's ``_run_internal`` builds a plain one
        and offers no factory: it is converted on first use)."""
        if type(self._matchmaking) is Matchmaking:
            self._matchmaking.__class__ = RobustMatchmaking
            self._matchmaking.banned_peers = self._banned_peers  # the same set: later bans apply at once
            self._matchmaking.joined_groups = deque(maxlen=JOINED_GROUPS_KEPT)
            self._matchmaking.searching = {}
            self._matchmaking.expected_group_size = self._expected_group_size
            self._matchmaking.peers_seen = self._peers_seen
        return self._matchmaking

    async def _leave_matchmaking(self) -> None:
        self._robust_matchmaking().leave()

    def _split_gathered(self, raw: bytes) -> Tuple[Optional[int], Any]:
        """A member's gathered user data: (its part size proposal or None, the data its user passed to ``step``)."""
        data = self.serializer.loads(raw)
        if isinstance(data, list) and len(data) == 3 and data[0] == PART_PROPOSAL and isinstance(data[2], bytes):
            proposal = data[1] if isinstance(data[1], int) and not isinstance(data[1], bool) else None
            return proposal, self.serializer.loads(data[2])
        return None, data  # a member without proposals (stock hivemind)

    def _agree_on_parts(self, group_info: GroupInfo, proposals: Sequence[Optional[int]]) -> int:
        """The group's part size: the smallest member proposal. Every member computes it from the same gathered data
        (and vector size), so senders and reducers split the vector alike. A proposal that would cut the vector into
        more than ``MAX_PARTS`` parts (each costs every member CPU) fails the round here instead."""
        valid = [proposal for proposal in proposals if proposal is not None]
        agreed = min(valid) if valid else int(self._part_size_bytes)
        floor = self._vector_bytes / MAX_PARTS
        if agreed < floor:
            proposer = group_info.peer_ids[proposals.index(agreed)] if agreed in proposals else "part_size_bytes"
            raise MatchmakingException(
                f"{proposer} proposed parts of {agreed} bytes: over {MAX_PARTS} parts for this vector; round refused"
            )
        return agreed

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        """hivemind's ``_aggregate_with_group`` (1.1.12) with per-round time limits, typed errors and a report."""
        report = RoundReport(
            group_id=group_info.group_id.hex(),
            peers=tuple(str(peer_id) for peer_id in group_info.peer_ids),
            started_at=get_dht_time(),
            vector_bytes=self._vector_bytes,
        )
        self._current_report = report
        try:
            others = [peer for peer in group_info.peer_ids if peer != self.peer_id]
            if others and all(str(peer) in self._banned_peers for peer in others):
                # their parts would get weight 0 and they would reduce nothing: "averaging" would return our own
                # tensors as a success
                raise AllreduceException(f"every other member of group {report.group_id} is banned")
            bandwidths, mode_ids, user_gathered_bytes = zip(*map(self.serializer.loads, group_info.gathered))
            proposals, user_data = zip(*(self._split_gathered(raw) for raw in user_gathered_bytes))
            user_gathered = dict(zip(group_info.peer_ids, user_data))
            report.part_bytes = self._agree_on_parts(group_info, proposals)
            timeouts = self._adaptive_timeouts.for_round(group_info.group_size, self._vector_bytes, report.part_bytes)
            kwargs.update(
                part_size_bytes=report.part_bytes, sender_timeout=timeouts.sender, reducer_timeout=timeouts.reducer
            )
            report.timeouts = self._current_timeouts = timeouts
            modes = tuple(map(AveragingMode, mode_ids))
            download_bandwidths = [
                thr if mode != AveragingMode.CLIENT and str(peer) not in self._banned_peers else 0.0
                for thr, mode, peer in zip(bandwidths, modes, group_info.peer_ids)
            ]  # athome: a banned peer reduces nothing (it could return anything)
            bandwidth = download_bandwidths[0]
            if len(set(download_bandwidths)) == 1 and (bandwidth is None or bandwidth > 0):
                # equal (or all unspecified) bandwidths: load_balance_peers would return the equal split (checked
                # for 1-16 peers and odd sizes); skipping scipy's linear program saves ~1.5 ms of CPU in an
                # executor thread, inside the timed round
                peer_fractions = tuple(hagenbach_bishoff(self.total_size, [1.0] * len(download_bandwidths)))
            else:
                peer_fractions = await asyncio.get_event_loop().run_in_executor(
                    None, load_balance_peers, self.total_size, download_bandwidths, min_vector_size
                )
            async with enter_asynchronously(self.get_tensors()) as local_tensors:
                await self._run_allreduce_inplace_(local_tensors, group_info, peer_fractions=peer_fractions, **kwargs)
            report.status = "ok"
            # a repaired round's duration includes a failed reducer's timeout: it says nothing about the link
            measured = (
                self._adaptive_timeouts.record_success(report.bytes_sent, report.duration)
                if report.repaired_from is None
                else None
            )
            logger.debug(f"Averaged with {group_info.group_size} peers in {report.duration:.2f}s ({measured} B/s)")
            return user_gathered
        except PartialRoundError as e:
            report.status, report.error = "partial", str(e)
            logger.warning(str(e))
            raise
        except RoundTimeoutError as e:
            report.status, report.error = "timeout", str(e)
            self._adaptive_timeouts.record_timeout()
            logger.warning(str(e))
            raise
        except AllreduceException as e:
            report.status, report.error = "failed", repr(e)
            raise
        except BaseException as e:
            report.status = "cancelled" if isinstance(e, asyncio.CancelledError) else "failed"
            report.error = repr(e)
            if isinstance(e, Exception):
                logger.warning(f"All-reduce failed: {e!r}", exc_info=logger.isEnabledFor(logging.DEBUG))
            raise MatchmakingException(f"Unable to run All-Reduce: {e}")
        finally:
            report.throughput = self._adaptive_timeouts.throughput
            self._current_report = self._current_timeouts = None
            self._send_report(report)

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes] = None, **kwargs
    ):
        """Run one all-reduce with athome's runner; apply the result only if every part was reduced, else copy the
        outcome of a member that completed the round (:mod:`.consistency`) or raise with the tensors unchanged."""
        group_id = group_info.group_id if group_id is None else group_id
        report = self._current_report or RoundReport(group_id=group_id.hex(), peers=())
        limit = self._current_timeouts.allreduce if self._current_timeouts is not None else None
        # registered before the all-reduce so that members who finish first can wait for our outcome
        self._round_outcomes.expect(
            group_id, group_info.peer_ids, time.monotonic() + (limit or 300.0) + self._repair_timeout()
        )

        runner = (self.runner_type or RobustAllReduceRunner)(
            reducer_factory=functools.partial(
                self.reducer_settings.build, workspace=self._reducer_workspace, row_pool=self._receive_pool
            ),
            dataplane=await self._get_dataplane(),
            outputs=self._output_buffers.take(tensors),
            receive_pool=self._receive_pool,
            shared_segments=self._output_buffers.segments + self._segments_of(tensors),
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        for peer_id in runner.sender_peer_ids:  # athome: a banned peer's parts get weight 0
            if str(peer_id) in self._banned_peers and peer_id != self.peer_id:
                await runner._ban_sender(peer_id)  # noqa: SLF001 (hivemind's way of excluding a sender)
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        is_aux = runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX

        async def _collect_aggregates() -> List[torch.Tensor]:
            aggregates = []
            try:
                async for aggregate in runner:
                    if is_aux:
                        raise ValueError("aux peers should not receive averaged tensors")
                    aggregates.append(aggregate)
            except asyncio.TimeoutError as e:  # keep TimeoutError meaning "our limit expired" below
                raise AllreduceException(f"all-reduce step timed out: {e!r}") from e
            # our results are in; finish serving the other senders (bounded) so that the report counts every byte
            sender_timeout = kwargs.get("sender_timeout")
            await runner.wait_until_served(timeout=sender_timeout)
            return aggregates

        started = time.perf_counter()
        failure: Optional[AllreduceException] = None
        try:
            aggregates = await asyncio.wait_for(_collect_aggregates(), timeout=limit)
            container = runner.tensor_part_container
            if container.failed_size > 0:
                failed = ", ".join(f"{peer}: {reason}" for peer, reason in runner.failed_reducers.items())
                failure = PartialRoundError(
                    f"All-reduce with {len(group_info.peer_ids)} peers reduced only "
                    f"{100 * (1 - container.failed_size / container.total_size):.1f}% of the vector "
                    f"(failed reducers: {failed or 'unknown'})"
                )
        except asyncio.TimeoutError:
            aggregates, failure = None, RoundTimeoutError(
                f"All-reduce with {len(group_info.peer_ids)} peers did not finish in {limit:.1f}s"
            )
        except AllreduceException as e:
            aggregates, failure = None, e
        except BaseException:
            self._round_outcomes.publish(group_id, None)  # cancelled: nothing to repair, don't keep askers waiting
            raise
        finally:
            runner.close_local()  # before anything changes the memory same-host peers may still read
            self._fill_report(report, runner, time.perf_counter() - started)
            runner.release_reducer_rows()

        if is_aux:
            self._round_outcomes.publish(group_id, None)
            if failure is not None:
                raise failure
            return
        if failure is None:
            # atomic: no await between the first and the last update. The output buffers become the published
            # outcome (what we now hold), so that members whose round was incomplete can copy it
            for tensor, averaged in zip(tensors, aggregates):
                if self._averaging_alpha != 1:  # tensor + alpha * (aggregate - tensor)
                    averaged.lerp_(tensor, 1 - self._averaging_alpha)
                tensor.copy_(averaged)
            self._round_outcomes.publish(group_id, aggregates)
            self._mark_updated()
            return

        # publish only once the repair concluded: a member we repair from may die after answering us, and then the
        # members that have not asked it yet can still copy the same outcome from us
        repaired = None
        try:
            repaired = await self._repair_from_members(
                tensors, group_info, group_id, runner, aggregates, failure, report
            )
        finally:
            self._round_outcomes.publish(group_id, repaired)

    async def _repair_from_members(
        self,
        tensors: Sequence[torch.Tensor],
        group_info: GroupInfo,
        group_id: bytes,
        runner: RobustAllReduceRunner,
        aggregates: Optional[List[torch.Tensor]],
        failure: AllreduceException,
        report: RoundReport,
    ) -> List[torch.Tensor]:
        """Our all-reduce was incomplete: copy the outcome of a member that completed it, or raise ``failure``
        with the tensors unchanged if none did (see :mod:`.consistency` for the guarantee).

        :returns: the copied outcome (views of a private buffer, not of ``tensors``), for :class:`RoundOutcomes`
        """
        own = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        if aggregates is not None:  # the aggregate we did receive, to cross-check the member's answer against
            # (local values where a reducer failed, which received_mask excludes)
            own.lerp_(torch.cat([a.reshape(-1).float() for a in aggregates]), self._averaging_alpha)
            received = runner.received_mask()
        else:
            received = torch.zeros(own.numel(), dtype=torch.bool)
        banned = getattr(self, "_banned_peers", set())
        members = [p for p in group_info.peer_ids if p != self.peer_id and str(p) not in banned]
        timeout = self._repair_timeout()
        flat, source, reasons = await fetch_round_result(
            lambda peer: self.get_stub(self._p2p, peer, namespace=self.prefix),
            group_id,
            members,
            own,
            received,
            agreement_tolerance(self.allreduce_kwargs["compression"], own[received]),
            timeout,
        )
        report.repair_failures = reasons
        if flat is None:
            why = "; ".join(f"{peer}: {reason}" for peer, reason in reasons.items()) or "no other member"
            raise type(failure)(
                f"{failure}; no member completed the round either ({why}); tensors left unchanged"
            ) from failure
        outcome, offset = [], 0
        for tensor in tensors:  # atomic, as above
            outcome.append(flat[offset : offset + tensor.numel()].view_as(tensor))
            tensor.copy_(outcome[-1])
            offset += tensor.numel()
        report.repaired_from = str(source)
        logger.info(f"{failure}; repaired from {source}, which completed the round")
        self._mark_updated()
        return outcome

    def _segments_of(self, tensors: Sequence[torch.Tensor]) -> List[sharedmemory.Segment]:
        """The shared memory files of the averaged tensors, for same-host peers (found once: they never move)."""
        if not self._output_buffers.shared:
            return []
        addresses = tuple(t.data_ptr() for t in tensors)
        if self._tensor_segments is None or self._tensor_segments[0] != addresses:
            if self._tensor_segments is not None:
                sharedmemory.close_segments(self._tensor_segments[1])
            self._tensor_segments = addresses, sharedmemory.file_segments(tensors)
        return self._tensor_segments[1]

    def _repair_timeout(self) -> float:
        """How long an incomplete member waits for the others' outcomes: the round's reducer timeout (derived from
        the measured throughput), i.e. as long as it would wait for one more part."""
        if self._current_timeouts is not None:
            return self._current_timeouts.reducer
        return 2 * self._adaptive_timeouts.min_chunk_timeout

    def _mark_updated(self) -> None:
        # hivemind also sets ``_state_updated`` here, which makes ``_declare_for_download_periodically`` store this
        # peer's state-sharing record in the DHT again after every round: a DHT store (RPCs to the nearest nodes,
        # through p2pd, in every member's DHT) inside each round, although the record (priority, expiration) does not
        # depend on the tensors (4 peers, 1000 floats: 11 ms of CPU per peer per round with it, 5 without). It is
        # refreshed every ``declare_state_period`` and whenever ``allow_state_sharing`` or ``state_sharing_priority``
        # change (hivemind's setters set the event)
        self.last_updated = get_dht_time()

    async def rpc_round_result(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A group member whose all-reduce was incomplete asks for our outcome of that round (:mod:`.consistency`)."""
        if not self._round_outcomes.known(request.group_id) and self._never_runs(request.group_id):
            # "incomplete here", for good: BAD_GROUP_ID would make the asker wait for us until its repair deadline
            yield averaging_pb2.AveragingData(code=averaging_pb2.CANCELLED)
            return
        async for message in self._round_outcomes.serve(request.group_id, context.remote_id):
            yield message

    # ---- direct TCP data plane (athome.averaging.dataplane) -----------------------------------------------------

    async def _get_dataplane(self) -> Optional[DataPlane]:
        """This averager process's data plane, started on first use; None if disabled or it could not start."""
        if not self._direct_tcp:
            return None
        if self._dataplane_task is None:
            self._dataplane_task = asyncio.create_task(self._start_dataplane())
        return await asyncio.shield(self._dataplane_task)

    async def _start_dataplane(self) -> Optional[DataPlane]:
        host = self._dataplane_host
        if host is None:
            maddrs = await self._p2p.get_visible_maddrs()
            non_loopback = [m for m in maddrs if "/ip4/127." not in str(m)]
            host = bind_host_from_maddrs(non_loopback) or bind_host_from_maddrs(maddrs)
        if host is None:
            logger.info("Data plane off: this peer has no IPv4 address to listen on; parts go over p2p")
            return None
        dataplane = DataPlane(host, self._dataplane_port, same_host_reads=self._same_host_reads)
        if self.client_mode:  # a client reduces nothing: it only connects out
            return dataplane
        try:
            await dataplane.start(self._serve_dataplane_connection)
        except OSError:  # e.g. an announced (public) address that is not on this host: listen everywhere
            try:
                dataplane = DataPlane(
                    "0.0.0.0", self._dataplane_port, announce_host=host, same_host_reads=self._same_host_reads
                )
                await dataplane.start(self._serve_dataplane_connection)
            except OSError as e:
                logger.warning(f"Data plane off: cannot listen on {host}:{self._dataplane_port} ({e!r})")
                return None
        return dataplane

    def _never_runs(self, group_id: bytes) -> bool:
        """True if this averager will never run round ``group_id``: it is not running it, not looking for a group (it
        may be the group being assembled now) and was never assembled into it (a step awaiting its trigger holds a
        group it has not registered yet). A leader can assemble a group just as a follower's matchmaking gives up;
        that follower then answers the others' requests for the round at once instead of letting them wait."""
        matchmaking = self._matchmaking
        return (
            group_id not in self._running_groups
            and not matchmaking.is_looking_for_group
            and group_id not in getattr(matchmaking, "joined_groups", ())
        )

    async def _running_runner(self, group_id: bytes, timeout: float) -> Optional[RobustAllReduceRunner]:
        """The runner of a round this averager takes part in (waiting up to ``timeout`` for it to start)."""
        if self._never_runs(group_id):
            return None
        if group_id not in self._running_groups:
            # as in hivemind's rpc_aggregate_part: the leader's reply may reach us after other members' requests
            try:
                await asyncio.wait_for(self._pending_groups_registered.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        future = self._running_groups.get(group_id)
        if future is None:
            return None
        try:
            runner = await asyncio.wait_for(asyncio.shield(future), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
            return None
        return runner if isinstance(runner, RobustAllReduceRunner) else None

    async def rpc_dataplane_ticket(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """A group member asks to send us its parts over TCP: a ticket bound to (group, caller) and our endpoint."""
        await admit(context)
        dataplane = await self._get_dataplane()
        if dataplane is None:
            return runtime_pb2.ExpertResponse(metadata=self.serializer.dumps(dict(error="no data plane")))

        async def _policy(group_id: bytes, caller) -> bool:
            runner = await self._running_runner(group_id, dataplane.connect_timeout)
            return runner is not None and caller in runner.sender_peer_ids and str(caller) not in self._banned_peers

        return await dataplane.answer_ticket_request(request, context.remote_id, _policy)

    async def _serve_dataplane_connection(self, group_id: bytes, peer_id, connection: FrameConnection) -> bool:
        """An authenticated TCP connection from ``peer_id`` for round ``group_id`` (its ticket's, or the next round on
        a kept connection, which may arrive before our runner starts): hand it to that round's runner if ``peer_id``
        is one of its senders. True if the round ended clean on this connection."""
        dataplane = await self._get_dataplane()
        deadline = time.monotonic() + (dataplane.connect_timeout if dataplane else 0.0)
        runner = await self._running_runner(group_id, max(0.0, deadline - time.monotonic()))
        while runner is None and time.monotonic() < deadline and not self._never_runs(group_id):
            # a kept connection's next round can arrive while our matchmaking for it still runs, with hivemind's
            # "groups registered" event set by the previous round (then _running_runner returns at once): give the
            # round until the sender's connect timeout to appear
            await asyncio.sleep(0.05)
            runner = await self._running_runner(group_id, max(0.0, deadline - time.monotonic()))
        if (
            runner is None
            or runner._future.done()
            or peer_id not in runner.sender_peer_ids
            or str(peer_id) in self._banned_peers
        ):
            await connection.send_all(ACK_REFUSED)
            return False
        await connection.send_all(ACK_OK)
        return await runner.serve_tcp_sender(peer_id, connection)

    # invite-only runs: only members may join our groups, send us parts or download our state (athome.dht.auth)
    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        await admit(context)
        if str(context.remote_id) in self._banned_peers:
            # a banned peer would only take a slot in the group (its parts get weight 0 anyway): refuse it at the door
            logger.debug(f"Refused a join request from banned peer {context.remote_id}")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        await admit(context)
        request = await anext(stream)
        if self._never_runs(request.group_id):
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        async for message in super().rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        await admit(context)
        async for message in super().rpc_download_state(request, context):
            yield message

    def _fill_report(self, report: RoundReport, runner: RobustAllReduceRunner, duration: float) -> None:
        container = runner.tensor_part_container
        report.duration = duration
        report.bytes_sent, report.bytes_received = runner.bytes_sent, runner.bytes_received
        report.unreduced_fraction = container.failed_size / container.total_size if container.total_size else 0.0
        report.failed_reducers = {str(peer): reason for peer, reason in runner.failed_reducers.items()}
        report.excluded_senders = tuple(str(peer) for peer in runner.banned_senders)
        report.tcp_reducers = tuple(str(peer) for peer in runner.tcp_peers)
        report.kept_reducers = tuple(str(peer) for peer in runner.kept_peers)
        report.same_host_reducers = tuple(str(peer) for peer in runner.same_host_peers)
        reducer = runner.tensor_part_reducer
        if hasattr(reducer, "evidence_by_sender"):
            report.evidence = reducer.evidence_by_sender([str(peer) for peer in runner.sender_peer_ids])

    def _send_report(self, report: RoundReport) -> None:
        try:
            self._report_writer.send(report)
        except (OSError, ValueError) as e:  # host process gone or pipe closed: reports are best-effort
            logger.debug(f"Could not deliver round report: {e!r}")


def _check_state_compression(state_compression: Optional[CompressionBase]) -> None:
    """``load_state_from_peers`` decodes through hivemind's table, whose 8-bit decoders fail on numpy 2."""
    if state_compression is None or state_compression.compression_type not in (
        Uniform8BitCodec.compression_type,
        Quantile8BitCodec.compression_type,
    ):
        return
    name = type(state_compression).__name__
    table = hivemind_serialization._BASE_COMPRESSION_TYPES
    if not isinstance(table["UNIFORM_8BIT"], Uniform8BitCodec) or not isinstance(
        table["QUANTILE_8BIT"], Quantile8BitCodec
    ):
        raise ValueError(
            f"state_compression={name} cannot be decoded by hivemind 1.1.12 on numpy 2; use none/fp16 or call "
            "athome.averaging.compression.install_fixed_8bit_codecs_in_hivemind() at start-up"
        )


class RobustAverager(RobustAveragingMixin, QuietStepControls):
    """``hivemind.DecentralizedAverager`` with CenteredClip, athome codecs and all-or-nothing rounds.

    Example::

        averager = RobustAverager([torch.zeros(10)], dht, prefix="athome_demo_avg", target_group_size=4,
                                  reducer="centered_clip", clip_tau=1.0, compression="fp16", start=True)
        averager.step(timeout=60)             # raises PartialRoundError / RoundTimeoutError if incomplete
        averager.last_round.suspects()         # peers whose parts were heavily clipped or rejected

    See :class:`RobustAveragingMixin` for the athome-specific arguments.
    """


class RobustGradientAverager(RobustAveragingMixin, GradientAverager, QuietStepControls):
    """``hivemind.optim.GradientAverager`` that aggregates gradients with CenteredClip by default.

    Use with ``hivemind.Optimizer(..., grad_averager_factory=functools.partial(RobustGradientAverager,
    reducer="centered_clip", clip_tau=..., worker_momentum=0.9, on_round=...))``; hivemind passes
    ``compression=grad_compression``, which may be an athome codec from :func:`~athome.averaging.compression.get_codec`.

    **Worker momentum** (Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust Optimization"):
    with ``worker_momentum`` = beta > 0, each peer keeps ``m <- beta m + (1 - beta) g`` of its own accumulated
    gradients ``g`` and averages ``m / (1 - beta^t)`` (bias-corrected, so the first rounds are not damped) in their
    place; the optimizer steps with the robust aggregate of the peers' momenta. Momenta vary far less between honest
    peers than single gradients (by about ``(1 - beta) / (1 + beta)`` in variance), so CenteredClip's radius, set by
    the honest spread, shrinks with it and an attacker's pull per round with the radius; and an attacker who shifts
    its gradients a little every round no longer hides in the honest noise. Each peer's momentum stays its own:
    the aggregate is not fed back.

    **Failed rounds**: hivemind's ``Optimizer`` resets the accumulators when it starts a round and, after a failed
    one, "proceeds with local gradients" by loading the (now empty) accumulators again, which gave the optimizer
    zeros. A failed round leaves the averaged tensors exactly as loaded (:mod:`.consistency`), so that reload keeps
    them: the optimizer steps with this peer's own gradient (or momentum).

    :param worker_momentum: beta in [0, 1); 0 averages the gradients themselves
    """

    def __init__(self, parameters, *, worker_momentum: float = 0.0, **kwargs):
        if not 0.0 <= worker_momentum < 1.0:
            raise ValueError(f"worker_momentum must be in [0, 1), got {worker_momentum}")
        self.worker_momentum = float(worker_momentum)
        self._momentum: Optional[List[torch.Tensor]] = None  # this peer's own, like the averaged tensors
        self._momentum_updates = 0
        super().__init__(parameters, **kwargs)

    @torch.no_grad()
    def load_accumulators_into_averager_(self):
        """Load this peer's gradients (or their momentum) into the averaged tensors; keep what is there when the
        accumulators were already loaded and reset for a round whose result was not used (see the class doc)."""
        if self.local_times_accumulated == 0 and self._new_averaged_grads:
            return
        super().load_accumulators_into_averager_()
        if not self.worker_momentum:
            return
        with self.get_tensors() as averaged:
            if self._momentum is None:
                self._momentum = [torch.zeros_like(tensor) for tensor in averaged]
            self._momentum_updates += 1
            apply_worker_momentum_(self._momentum, averaged, self.worker_momentum, self._momentum_updates)


class RobustTrainingStateAverager(RobustAveragingMixin, TrainingStateAverager, QuietStepControls):
    """``hivemind.optim.TrainingStateAverager`` with CenteredClip, bans and admission.

    ``hivemind.Optimizer`` averages trainers' *parameters* with it every epoch (``average_state_every=1``): with
    hivemind's plain mean, one trainer's parameters would enter every trainer's model around all the gradient
    defences. Build it through :class:`athome.trainer.train.SwarmOptimizer`.

    State downloads (``load_state_from_peers``, what a trainer that fell behind calls) are robust too: hivemind copies
    one peer's whole state; here the state comes from up to ``download_sources`` peers (the newest epochs first,
    never this peer, banned peers or non-members), each is checked (tensor count, shapes, dtypes, finite values)
    and they are combined by :func:`athome.verification.downloads.combine_states` (median of three; with fewer, a
    bound of ``download_bound`` against this peer's own parameters). A refused download keeps the current state
    (hivemind's ``Optimizer`` retries on its next step).

    :param download_sources: how many peers to download the state from (3: a coordinate-wise median)
    :param download_bound: relative distance between parameter vectors beyond which sources disagree
    """

    def __init__(self, *args, download_sources: int = DEFAULT_MAX_SOURCES, download_bound: float = DEFAULT_BOUND,
                 **kwargs):
        if download_sources < 1 or not download_bound > 0:
            raise ValueError(f"download_sources must be >= 1 and download_bound > 0, got {download_sources}, "
                             f"{download_bound}")
        self.download_sources, self.download_bound = download_sources, download_bound
        super().__init__(*args, **kwargs)

    def step(self, *args, **kwargs):
        """hivemind's ``TrainingStateAverager.step``, which has no ``wait``: its rounds report (``last_round``,
        ``on_round``) whenever they end. (The averager step's wait for a report would hold every optimizer step,
        most of which run no round, for up to 2 s.)"""
        return TrainingStateAverager.step(self, *args, **kwargs)

    async def _load_state_from_peers(self, future: MPFuture, timeout: Optional[float] = None) -> None:
        """Averager-process side of ``load_state_from_peers``: resolves ``future`` with the combined (metadata,
        tensors), which hivemind's host side then applies, or with None (nothing applied)."""
        try:
            if timeout is not None:  # as hivemind: the caller's timeout becomes a per-message one
                timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
            own_metadata, own_tensors, _ = await self._get_current_state_from_host_process()
            own_metadata = self.serializer.loads(own_metadata)  # the host process sends it serialized
            own_tensors = [t.detach().cpu() for t in own_tensors]
            candidates = await self._download_candidates()
            states: List[DownloadedState] = []
            while candidates and len(states) < self.download_sources:
                batch = candidates[: self.download_sources - len(states)]
                candidates = candidates[len(batch):]
                downloaded = await asyncio.gather(*(self._download_state_from(peer, timeout) for peer in batch))
                for state in downloaded:
                    if state is None:
                        continue
                    problem = state_problem(own_tensors, state)
                    if problem is not None:
                        logger.error(f"Refused the state served by {state.source}: {problem}")
                        continue
                    states.append(state)
            num_parameters = len(self.main_parameters) + len(self.extra_tensors)
            fresh = own_metadata.get("epoch", 0) == 0
            metadata, tensors, how = combine_states(
                own_tensors, states, num_parameters=num_parameters, fresh=fresh, bound=self.download_bound,
                max_sources=self.download_sources,
            )
            logger.info(f"Loaded the swarm's state (epoch {metadata['epoch']}) from {how}")
            future.set_result((metadata, tensors))
        except StateRejected as error:
            logger.error(f"State download refused, keeping this peer's state: {error}")
        except Exception as error:  # noqa: B902 - hivemind's contract: a failed download resolves to None
            logger.exception(f"State download failed, keeping this peer's state: {error!r}")
        finally:
            if not future.done():
                future.set_result(None)

    async def _download_candidates(self) -> List[PeerID]:
        """Peers that declared their state for download, highest priority (epoch) first; never this peer, banned
        peers, or (in invite-only runs) non-members."""
        key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        found = await self.dht.get(key, latest=True, return_future=True)
        declared = found.value if found is not None and isinstance(found.value, dict) else {}
        priority = {}
        for raw_peer, info in declared.items():
            if not isinstance(info, ValueWithExpiration) or not isinstance(info.value, (float, int)):
                continue
            try:
                peer = PeerID(raw_peer)
            except Exception:  # noqa: B902 - a malformed subkey is someone else's garbage
                continue
            if peer == self.peer_id or str(peer) in self._banned_peers:
                continue
            priority[peer] = (float(info.value), random.random())  # random: hivemind's tie breaker
        admission = get_admission()
        if admission is not None:
            loop = asyncio.get_running_loop()
            members = await asyncio.gather(*(loop.run_in_executor(None, admission.is_member, str(peer))
                                             for peer in priority))
            priority = {peer: rank for peer, rank, member in zip(list(priority), priority.values(), members) if member}
        return sorted(priority, key=priority.get, reverse=True)

    async def _download_state_from(self, peer: PeerID, timeout: Optional[float]) -> Optional[DownloadedState]:
        """One peer's state as hivemind streams it (metadata with the first part); None if it failed or declined."""
        try:
            stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            metadata, parts, tensors = None, [], []
            async for message in aiter_with_timeout(stream, timeout=timeout):
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                if message.tensor_part.dtype and parts:  # a dtype starts the next tensor
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts = []
                parts.append(message.tensor_part)
            if parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            if not metadata:
                logger.debug(f"Peer {peer} did not send its state")
                return None
            return DownloadedState(str(peer), metadata, tensors)
        except Exception as error:  # noqa: B902 - any failure of one source only removes that source
            logger.warning(f"Failed to download the state from {peer}: {error!r}")
            return None

