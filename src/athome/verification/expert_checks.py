"""Expert-side checks: sanity of each request at the host, and audits of hosts by validators.

- :class:`GradNormGuard` (runs in the host's request handlers): rejects a backward request whose gradient norms are
  outliers against the expert's running statistics, so one trainer cannot blow an expert up with huge
  ``grad_outputs`` (NaN/Inf is refused before it, by ``peer/server.py``).
- :class:`ReplicaCrossCheck`: several replicas' answers (or parameters) side by side; one far from the
  coordinate-wise median while most are close is an outlier.
- :func:`training_probe`: forward, backward, forward again: an expert whose outputs did not move at all did not train.
- :class:`ExpertAuditor`: a validator's audits of hosts through an :class:`ExpertClient` (RPC in a run, in-process in
  simulations): attestation (answers must match the host's own served parameters), parameter cross-checks of
  replicas, training probes. Findings become accusations the coordinator re-verifies by running the same audit on
  the same probe inputs, which travel in the accusation (a seed, or a few fp32 rows of real inputs).
- :class:`ProbePool`: real requests (inputs and the gradients trainers sent) from steps the validator verified, so
  that audits look like traffic and training probes apply real gradients instead of random directions.
"""
from __future__ import annotations

import logging
import math
import random
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Protocol, Sequence

import torch

from athome.dht.schemas import Accusation
from athome.numerics import all_finite

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- host side
class GradNormGuard:
    """Running statistics of the gradients each expert receives; outliers are rejected.

    Two statistics per request, in log space: the largest row norm and the RMS row norm of ``grad_outputs``. A
    request is rejected when either exceeds the median of the last ``window`` accepted requests by more than
    ``max(z * 1.4826 * MAD, log(min_ratio))``, i.e. it is both a statistical outlier and ``min_ratio`` times larger
    than usual. Rejected requests do not enter the statistics (an attacker cannot drag them up by persisting); the
    first ``warmup`` requests of an expert are only checked against ``absolute_max``.
    Small gradients are never rejected: they cannot hurt an expert beyond not training it.

    Thread-safe; one instance per process (each hivemind connection handler process keeps its own statistics).
    """

    def __init__(self, z: float = 6.0, min_ratio: float = 100.0, window: int = 256, warmup: int = 32,
                 absolute_max: float = 1e4):
        self.z, self.log_ratio, self.window, self.warmup = z, math.log(min_ratio), window, warmup
        self.absolute_max = absolute_max
        self._history: Dict[str, Deque[tuple]] = {}
        self._limits: Dict[str, list] = {}
        self._since_refresh: Dict[str, int] = {}
        self._lock = threading.Lock()
        self.rejected = 0

    @staticmethod
    def statistics(grad_outputs: torch.Tensor) -> tuple:
        rows = grad_outputs.detach().float().reshape(grad_outputs.shape[0], -1).norm(dim=1)
        tiny = 1e-30
        return (math.log(float(rows.max()) + tiny), math.log(float(rows.pow(2).mean().sqrt()) + tiny))

    def check(self, uid: str, grad_outputs: torch.Tensor) -> Optional[str]:
        """None if the request is acceptable (and then it is counted), else the reason to reject it."""
        if grad_outputs.numel() == 0:
            return None
        stats = self.statistics(grad_outputs)
        if stats[0] > math.log(self.absolute_max):
            return self._reject(uid, f"{uid}: grad_outputs row norm {math.exp(stats[0]):.3g} exceeds {self.absolute_max:g}")
        with self._lock:
            history = self._history.setdefault(uid, deque(maxlen=self.window))
            if len(history) >= self.warmup:
                limits = self._limits.get(uid)
                if limits is None or self._since_refresh.get(uid, 0) >= 8:  # medians move slowly: refresh every 8
                    limits = self._limits[uid] = self._compute_limits(history)
                    self._since_refresh[uid] = 0
                for index, name in ((0, "largest row norm"), (1, "RMS row norm")):
                    median, limit = limits[index]
                    if stats[index] > limit:
                        return self._reject(
                            uid, f"{uid}: grad_outputs {name} {math.exp(stats[index]):.3g} is an outlier (usual "
                                 f"{math.exp(median):.3g}, limit {math.exp(limit):.3g}); request refused",
                        )
            history.append(stats)
            self._since_refresh[uid] = self._since_refresh.get(uid, 0) + 1
        return None

    def _compute_limits(self, history) -> list:
        values = torch.tensor(list(history), dtype=torch.float64)
        median = values.median(dim=0).values
        mad = (values - median).abs().median(dim=0).values
        limit = median + torch.clamp(self.z * 1.4826 * mad, min=self.log_ratio)
        return [(float(median[i]), float(limit[i])) for i in range(2)]

    def _reject(self, uid: str, reason: str) -> str:
        self.rejected += 1
        logger.warning(reason)
        return reason


# ------------------------------------------------------------------------------------------------- audits
@dataclass
class CrossCheckVerdict:
    distances: Dict[str, float]  # peer -> ||answer - median|| / ||median||
    outliers: List[str]
    conclusive: bool  # False with fewer than min_replicas answers: a disagreement cannot be attributed


class ReplicaCrossCheck:
    """Judges replicas of one expert by their answers to the same inputs.

    Replicas are not identical (each trains on its own requests between replica-averaging rounds), so the
    ``tolerance`` is loose (relative distance to the median answer); it catches wrong outputs and poisoned
    parameters, not a replica that is off by a few percent. An outlier is named only when a strict majority of the
    replicas lies within tolerance of the median.
    """

    def __init__(self, tolerance: float = 0.5, min_replicas: int = 3):
        self.tolerance, self.min_replicas = tolerance, min_replicas

    def judge(self, answers: Dict[str, torch.Tensor]) -> CrossCheckVerdict:
        peers = list(answers)
        if len(peers) < 2:
            return CrossCheckVerdict({}, [], False)
        stacked = torch.stack([answers[p].detach().double().reshape(-1) for p in peers])
        median = stacked.median(dim=0).values if len(peers) > 2 else stacked.mean(dim=0)
        scale = float(median.norm()) + 1e-12
        distances = {p: float((stacked[i] - median).norm()) / scale if all_finite(stacked[i]) else math.inf
                     for i, p in enumerate(peers)}
        if len(peers) < self.min_replicas:
            return CrossCheckVerdict(distances, [], False)
        close = [p for p in peers if distances[p] <= self.tolerance]
        if 2 * len(close) <= len(peers):
            return CrossCheckVerdict(distances, [], False)
        return CrossCheckVerdict(distances, [p for p in peers if distances[p] > self.tolerance], True)


@dataclass
class ProbeResult:
    moved: float  # ||y1 - y0|| / ||y0|| after the backward calls
    trained: bool


def training_probe(
    forward: Callable[[torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    calls: int = 1,
) -> ProbeResult:
    """Did the expert train? ``calls`` backward calls (the host's ``expert_accumulation``) between two forwards.

    A host's forward is deterministic, so an expert that skipped its update answers bit-for-bit the same. (A host
    that fakes training by adding noise is not caught by this probe; replica cross-checks see it drift away.)
    """
    before = forward(inputs).detach().double()
    for _ in range(calls):
        backward(inputs, grad_outputs)
    after = forward(inputs).detach().double()
    moved = float((after - before).norm()) / (float(before.norm()) + 1e-12)
    return ProbeResult(moved=moved, trained=moved > 0.0)


class ExpertClient(Protocol):
    """How a validator reaches expert hosts (RPC in a run: :class:`RemoteExpertClient`; in-process in simulations)."""

    def forward(self, peer: str, uid: str, inputs: torch.Tensor) -> torch.Tensor: ...

    def backward(self, peer: str, uid: str, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor: ...

    def state(self, peer: str, uid: str) -> Dict[str, torch.Tensor]:
        """The expert's current fp32 parameters as the host serves them to new replicas."""


MAX_PROBE_BYTES = 2048  # Accusation.probe's limit


def encode_probe(seed: Optional[int] = None, rows: int = 4, inputs: Optional[torch.Tensor] = None,
                 grad_outputs: Optional[torch.Tensor] = None) -> bytes:
    """Probe inputs as accusation evidence: a seed of Gaussian rows (b"S"), real rows as fp32 (b"R"), or real rows
    with the gradients a trainer sent for them (b"P": inputs then grad_outputs, fp32)."""
    if inputs is not None and grad_outputs is not None:
        rows_bytes = inputs.detach().float().contiguous().numpy().tobytes()
        return b"P" + rows_bytes + grad_outputs.detach().float().contiguous().numpy().tobytes()
    if inputs is not None:
        return b"R" + inputs.detach().float().contiguous().numpy().tobytes()
    return b"S" + struct.pack(">QH", seed, rows)


def decode_probe(probe: bytes, d_model: int) -> torch.Tensor:
    """The probe's input rows ``[rows, d_model]``; raises ValueError if malformed."""
    if probe[:1] == b"S" and len(probe) == 11:
        seed, rows = struct.unpack(">QH", probe[1:])
        return torch.randn(rows, d_model, generator=torch.Generator().manual_seed(seed))
    if probe[:1] == b"R" and (len(probe) - 1) % (4 * d_model) == 0 and len(probe) > 1:
        return torch.frombuffer(bytearray(probe[1:]), dtype=torch.float32).reshape(-1, d_model).clone()
    if probe[:1] == b"P" and (len(probe) - 1) % (8 * d_model) == 0 and len(probe) > 1:
        rows = torch.frombuffer(bytearray(probe[1:]), dtype=torch.float32).reshape(2, -1, d_model)
        return rows[0].clone()
    raise ValueError("malformed probe")


def decode_probe_grads(probe: bytes, d_model: int) -> Optional[torch.Tensor]:
    """The gradients of a b"P" probe (None for the other kinds, whose training probe uses small random ones)."""
    if probe[:1] != b"P":
        return None
    decode_probe(probe, d_model)  # validates
    return torch.frombuffer(bytearray(probe[1:]), dtype=torch.float32).reshape(2, -1, d_model)[1].clone()


class ProbePool:
    """Real expert requests to audit hosts with, taken from steps this validator verified.

    A replay (:class:`~athome.verification.replay.ReplayDispatcher`) sees each MoE layer's expert inputs and the
    ``grad_outputs`` the trainer sent, which the check just found honest. Auditing with them instead of Gaussian rows
    means (1) a host cannot tell audit requests from traffic, and (2) a training probe's backward call is a real
    gradient for real data (one sample seen twice), not a step in a random direction. Thread-safe.

    :param model_config: the run's model (expert uids per layer, d_model)
    :param rows: rows per probe (capped so that inputs and gradients fit an accusation's probe field)
    :param per_uid: probes kept per expert (the newest)
    """

    def __init__(self, model_config, rows: int = 4, per_uid: int = 8, seed: Optional[int] = None):
        self.uids, self.per_layer = model_config.expert_uids(), model_config.experts_per_layer
        self.d_model = model_config.d_model
        self.rows = min(rows, (MAX_PROBE_BYTES - 1) // (8 * self.d_model))
        self.per_uid = per_uid
        self._probes: Dict[str, Deque[bytes]] = {}
        self._random = random.Random(seed) if seed is not None else random.SystemRandom()
        self._lock = threading.Lock()

    def add_step(self, layers: Sequence, inputs: Sequence[Optional[torch.Tensor]]) -> int:
        """Keep probes from a verified step: its bundle's ``LayerIO`` per MoE layer and the experts' inputs the replay
        computed for each (``ReplayDispatcher.inputs``); returns how many probes were kept."""
        if self.rows < 1:
            return 0
        added = 0
        for layer, (io, inputs) in enumerate(zip(layers, inputs)):
            if inputs is None or io.grad_outputs is None or tuple(inputs.shape[:1]) != tuple(io.expert_index.shape[:1]):
                continue
            grads = io.grad_outputs.detach().float()
            usable = io.answered & (grads.reshape(*grads.shape[:2], -1).abs().amax(dim=-1) > 0)  # zero: no update
            for expert in range(self.per_layer):
                tokens, slots = ((io.expert_index == expert) & usable).nonzero(as_tuple=True)
                if len(tokens) == 0:
                    continue
                chosen = self._random.sample(range(len(tokens)), min(self.rows, len(tokens)))
                probe = encode_probe(inputs=inputs[tokens[chosen]], grad_outputs=grads[tokens[chosen], slots[chosen]])
                uid = self.uids[layer * self.per_layer + expert]
                with self._lock:
                    self._probes.setdefault(uid, deque(maxlen=self.per_uid)).append(probe)
                added += 1
        return added

    def take(self, uid: str) -> Optional[bytes]:
        """A kept probe for expert ``uid`` (a b"P" probe), or None if none was kept yet."""
        with self._lock:
            kept = self._probes.get(uid)
            return self._random.choice(kept) if kept else None


@dataclass
class HostFinding:
    peer: str
    uid: str
    kind: str  # "expert_outputs" | "replica_params" | "no_train"
    figures: Dict[str, float] = field(default_factory=dict)
    probe: bytes = b""
    detail: str = ""

    def accusation(self) -> Accusation:
        return Accusation(accused=self.peer, kind=self.kind, uid=self.uid, probe=self.probe, detail=self.detail[:256],
                          figures={k: min(v, 1e30) for k, v in list(self.figures.items())[:16]}, at=time.time())


def _flat(state: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[name].detach().double().reshape(-1) for name in sorted(state)])


class ExpertAuditor:
    """Audits expert hosts through ``client`` (see module docstring).

    Three audits, each robust to the honest divergence of replicas (every replica trains on its own requests
    between averaging rounds, so two honest replicas' *outputs* may differ by 100% early in training):

    - **attestation** (wrong outputs): the host's answer to a probe must be what its own served parameters compute
      (forward, download the state, forward again; if the two answers differ the host trained meanwhile and the
      audit is retried later). Tolerance ``attest_tolerance`` covers bf16/fp16 hosts.
    - **parameter cross-check** (poisoned replicas): a replica whose parameters lie farther than
      ``params_tolerance`` (relative) from the coordinate-wise median of the replicas, while most replicas are close.
    - **training probe** (experts that do not train), see :func:`training_probe`.

    :param model_config: the run's model (to rebuild an expert from a downloaded state)
    :param replicas: uid -> peer IDs of the hosts currently declaring it
    :param probe_rows: Gaussian rows per probe (LayerNorm outputs, which experts receive, are ~N(0, 1) per coordinate)
    :param training_calls: backward calls per training probe (the run's ``optimizer.expert_accumulation``)
    :param probe_pool: real requests from verified steps (:class:`ProbePool`); audits use them when the pool has one
      for the expert, Gaussian rows (and, for training probes, small random gradients) otherwise
    """

    def __init__(
        self,
        client: ExpertClient,
        replicas: Callable[[str], Sequence[str]],
        model_config,
        *,
        attest_tolerance: float = 0.05,
        params_tolerance: float = 3.0,
        probe_rows: int = 4,
        training_calls: int = 1,
        seed: Optional[int] = None,
        probe_pool: Optional[ProbePool] = None,
    ):
        self.client, self.replicas, self.model_config = client, replicas, model_config
        self.probe_pool = probe_pool
        self.d_model = model_config.d_model
        self.attest_tolerance = attest_tolerance
        self.params_check = ReplicaCrossCheck(tolerance=params_tolerance)
        self.probe_rows, self.training_calls = probe_rows, training_calls
        self._random = random.Random(seed) if seed is not None else random.SystemRandom()

    def _probe(self, uid: Optional[str] = None) -> bytes:
        real = self.probe_pool.take(uid) if self.probe_pool is not None and uid is not None else None
        return real if real is not None else encode_probe(self._random.getrandbits(63), self.probe_rows)

    def _compute(self, uid: str, state: Dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        from athome.model.expert import build_expert

        expert = build_expert(self.model_config, uid)
        expert.load_state_dict({name: tensor.float() for name, tensor in state.items()})
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return expert(inputs.float())

    # ---------------------------------------------------------------------------------------------- audits
    def attest(self, peer: str, uid: str, probe: Optional[bytes] = None) -> Optional[HostFinding]:
        """None if the host's answers match its parameters (or the audit could not be done).

        Forward, download the state, forward again: an honest host's state computes at least one of the two
        answers unless it trained in *both* gaps (then :meth:`reverify` tries again before anyone is banned).
        """
        probe = probe or self._probe(uid)
        inputs = decode_probe(probe, self.d_model)
        try:
            before = self.client.forward(peer, uid, inputs).detach().double()
            state = self.client.state(peer, uid)
            after = self.client.forward(peer, uid, inputs).detach().double()
        except Exception as error:  # an unreachable host is the registry's problem, not evidence
            logger.debug(f"attestation of {uid} on {peer[-8:]} failed: {error!r}")
            return None
        try:
            local = self._compute(uid, state, inputs).double()
        except Exception as error:
            return HostFinding(peer, uid, "expert_outputs", {}, probe, f"{uid}: served state is unusable: {error}"[:256])
        scale = float(local.norm()) + 1e-12
        distance = min(float((before - local).norm()), float((after - local).norm())) / scale
        if distance <= self.attest_tolerance:  # NaN answers fail here too
            return None
        return HostFinding(peer, uid, "expert_outputs", {"distance": min(distance, 1e30)}, probe,
                           f"{uid}: answers {distance:.3g} away from what its own parameters compute "
                           f"(tolerance {self.attest_tolerance:g})")

    def cross_check_params(self, uid: str) -> List[HostFinding]:
        peers = list(self.replicas(uid))
        if len(peers) < self.params_check.min_replicas:
            return []
        states = {}
        for peer in peers:
            try:
                states[peer] = _flat(self.client.state(peer, uid))
            except Exception as error:
                logger.debug(f"state of {uid} on {peer[-8:]} unavailable: {error!r}")
        shapes = {tuple(v.shape) for v in states.values()}
        if len(shapes) != 1:
            return []
        verdict = self.params_check.judge(states)
        return [
            HostFinding(peer, uid, "replica_params", {"distance": verdict.distances[peer]}, b"",
                        f"{uid}: parameters {verdict.distances[peer]:.3g} away from the replicas' median "
                        f"(tolerance {self.params_check.tolerance:g})")
            for peer in verdict.outliers
        ]

    def probe_training(self, peer: str, uid: str, probe: Optional[bytes] = None) -> Optional[HostFinding]:
        probe = probe or self._probe(uid)
        inputs = decode_probe(probe, self.d_model)
        grad = decode_probe_grads(probe, self.d_model)  # real: a verified trainer's gradient for these rows
        if grad is None:
            grad = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(inputs.numel())) * 1e-3
        try:
            result = training_probe(
                lambda x: self.client.forward(peer, uid, x),
                lambda x, g: self.client.backward(peer, uid, x, g),
                inputs, grad, calls=self.training_calls,
            )
        except Exception as error:
            logger.debug(f"training probe of {uid} on {peer[-8:]} failed: {error!r}")
            return None
        if result.trained:
            return None
        return HostFinding(peer, uid, "no_train", {"moved": result.moved}, probe,
                           f"{uid}: outputs unchanged after {self.training_calls} backward call(s)")

    def audit(self, uids: Sequence[str], count: int = 1) -> List[HostFinding]:
        """For ``count`` random uids: attest and probe every replica, cross-check the replicas' parameters."""
        findings: List[HostFinding] = []
        for uid in self._random.sample(list(uids), min(count, len(uids))):
            for peer in list(self.replicas(uid)):
                for finding in (self.attest(peer, uid), self.probe_training(peer, uid)):
                    if finding is not None:
                        findings.append(finding)
            findings += self.cross_check_params(uid)
        return findings

    def reverify(self, accusation: Accusation, attempts: int = 2) -> Optional[bool]:
        """Run the audit again on the same probe: True confirmed, False refuted, None cannot tell."""
        peer, uid = accusation.accused, accusation.uid
        if peer not in self.replicas(uid):
            return None
        if accusation.kind == "replica_params":
            return any(f.peer == peer for f in self.cross_check_params(uid))
        try:
            decode_probe(accusation.probe, self.d_model)
        except ValueError:
            return False
        audit = {"expert_outputs": self.attest, "no_train": self.probe_training}.get(accusation.kind)
        if audit is None:
            return None
        # every attempt must fail: one skipped fp16 step or one unlucky race must not get an honest host banned
        return all(audit(peer, uid, accusation.probe) is not None for _ in range(attempts))


class RemoteExpertClient:
    """:class:`ExpertClient` over hivemind's expert protocol and athome's state servicer (``peer/server.py``)."""

    def __init__(self, dht, timeout: float = 30.0):
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        self.dht, self.timeout = dht, timeout
        self.p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())

    def _call(self, peer: str, uid: str, tensors: List[torch.Tensor], backward: bool) -> torch.Tensor:
        import asyncio

        from hivemind.compression import serialize_torch_tensor
        from hivemind.moe.client.expert import expert_backward, expert_forward, get_server_stub
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from hivemind.p2p import PeerID

        stub = get_server_stub(self.p2p, PeerID.from_base58(peer))
        tensors = [t.detach().float().cpu() for t in tensors]
        serialized = [serialize_torch_tensor(t) for t in tensors]
        call = (expert_backward if backward else expert_forward)(uid, tensors, serialized, stub)
        return RemoteExpertWorker.run_coroutine(asyncio.wait_for(call, self.timeout))[0]

    def forward(self, peer: str, uid: str, inputs: torch.Tensor) -> torch.Tensor:
        return self._call(peer, uid, [inputs], backward=False)

    def backward(self, peer: str, uid: str, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
        return self._call(peer, uid, [inputs, grad_outputs], backward=True)

    def state(self, peer: str, uid: str) -> Dict[str, torch.Tensor]:
        from athome.peer.server import download_expert_state

        return download_expert_state(self.dht, peer, uid, timeout=self.timeout)
