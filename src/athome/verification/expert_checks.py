"""Expert-side checks: sanity of each request at the host, and audits of hosts by validators.

- :class:`GradNormGuard` (runs in the host's request handlers): rejects a backward request whose gradient norms are
  outliers against the expert's running statistics, so one trainer cannot blow an expert up with huge
  ``grad_outputs`` (NaN/Inf is refused before it, by ``peer/server.py``).
- :class:`ReplicaCrossCheck`: the answers of several replicas of one expert to the same inputs; a replica far from
  the others' coordinate-wise median is an outlier (wrong outputs, poisoned parameters).
- :func:`training_probe`: forward, backward, forward again: an expert whose outputs did not move at all did not train.
- :class:`ExpertAuditor`: a validator's audits of hosts through an :class:`ExpertClient` (RPC in a run, in-process in
  simulations), producing accusations the coordinator can re-verify by running the same audit itself: the probe
  inputs travel in the accusation (a seed, or a few fp32 rows of real inputs).
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
                for index, name in ((0, "largest row norm"), (1, "RMS row norm")):
                    values = sorted(h[index] for h in history)
                    median = values[len(values) // 2]
                    mad = sorted(abs(v - median) for v in values)[len(values) // 2]
                    limit = median + max(self.z * 1.4826 * mad, self.log_ratio)
                    if stats[index] > limit:
                        return self._reject(
                            uid, f"{uid}: grad_outputs {name} {math.exp(stats[index]):.3g} is an outlier (usual "
                                 f"{math.exp(median):.3g}, limit {math.exp(limit):.3g}); request refused",
                        )
            history.append(stats)
        return None

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
        distances = {p: float((stacked[i] - median).norm()) / scale if torch.isfinite(stacked[i]).all() else math.inf
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
    def forward(self, peer: str, uid: str, inputs: torch.Tensor) -> torch.Tensor: ...

    def backward(self, peer: str, uid: str, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor: ...


def encode_probe(seed: Optional[int] = None, rows: int = 4, inputs: Optional[torch.Tensor] = None) -> bytes:
    """Probe inputs as accusation evidence: a seed of Gaussian rows (b"S"), or real rows as fp32 (b"R")."""
    if inputs is not None:
        return b"R" + inputs.detach().float().contiguous().numpy().tobytes()
    return b"S" + struct.pack(">QH", seed, rows)


def decode_probe(probe: bytes, d_model: int) -> torch.Tensor:
    if probe[:1] == b"S" and len(probe) == 11:
        seed, rows = struct.unpack(">QH", probe[1:])
        return torch.randn(rows, d_model, generator=torch.Generator().manual_seed(seed))
    if probe[:1] == b"R" and (len(probe) - 1) % (4 * d_model) == 0 and len(probe) > 1:
        return torch.frombuffer(bytearray(probe[1:]), dtype=torch.float32).reshape(-1, d_model).clone()
    raise ValueError("malformed probe")


@dataclass
class HostFinding:
    peer: str
    uid: str
    kind: str  # "expert_outputs" | "no_train"
    figures: Dict[str, float] = field(default_factory=dict)
    probe: bytes = b""
    detail: str = ""

    def accusation(self) -> Accusation:
        return Accusation(accused=self.peer, kind=self.kind, uid=self.uid, probe=self.probe, detail=self.detail[:256],
                          figures={k: min(v, 1e30) for k, v in list(self.figures.items())[:16]}, at=time.time())


class ExpertAuditor:
    """Audits expert hosts through ``client``: replica cross-checks and training probes.

    :param replicas: uid -> peer IDs of the hosts currently declaring it
    :param d_model: width of an expert's input rows
    :param probe_rows: Gaussian rows per audit (LayerNorm outputs, which experts receive, are ~N(0, 1) per coordinate)
    :param training_calls: backward calls per training probe (the run's ``optimizer.expert_accumulation``)
    """

    def __init__(
        self,
        client: ExpertClient,
        replicas: Callable[[str], Sequence[str]],
        d_model: int,
        *,
        cross_check: Optional[ReplicaCrossCheck] = None,
        probe_rows: int = 4,
        training_calls: int = 1,
        seed: Optional[int] = None,
    ):
        self.client, self.replicas, self.d_model = client, replicas, d_model
        self.cross_check = cross_check or ReplicaCrossCheck()
        self.probe_rows, self.training_calls = probe_rows, training_calls
        self._random = random.Random(seed) if seed is not None else random.SystemRandom()

    def _answers(self, uid: str, inputs: torch.Tensor, peers: Sequence[str]) -> Dict[str, torch.Tensor]:
        answers = {}
        for peer in peers:
            try:
                answers[peer] = self.client.forward(peer, uid, inputs)
            except Exception as error:  # an unreachable host is the registry's problem, not evidence
                logger.debug(f"audit of {uid} on {peer[-8:]} failed: {error!r}")
        return answers

    def cross_check_uid(self, uid: str, probe: Optional[bytes] = None) -> List[HostFinding]:
        """Ask every replica of ``uid`` for the same probe; outliers become findings."""
        peers = list(self.replicas(uid))
        if len(peers) < self.cross_check.min_replicas:
            return []
        probe = probe or encode_probe(self._random.getrandbits(63), self.probe_rows)
        verdict = self.cross_check.judge(self._answers(uid, decode_probe(probe, self.d_model), peers))
        return [
            HostFinding(peer, uid, "expert_outputs", {"distance": verdict.distances[peer]}, probe,
                        f"{uid}: answer {verdict.distances[peer]:.3g} away from the replicas' median "
                        f"(tolerance {self.cross_check.tolerance:g})")
            for peer in verdict.outliers
        ]

    def probe_training(self, peer: str, uid: str, probe: Optional[bytes] = None) -> Optional[HostFinding]:
        probe = probe or encode_probe(self._random.getrandbits(63), self.probe_rows)
        inputs = decode_probe(probe, self.d_model)
        grad = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(len(probe) + inputs.numel())) * 1e-3
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
        """Cross-check ``count`` random uids and probe one random replica of each for training."""
        findings: List[HostFinding] = []
        for uid in self._random.sample(list(uids), min(count, len(uids))):
            findings += self.cross_check_uid(uid)
            peers = list(self.replicas(uid))
            if peers:
                finding = self.probe_training(self._random.choice(peers), uid)
                if finding is not None:
                    findings.append(finding)
        return findings

    def reverify(self, accusation: Accusation, attempts: int = 2) -> Optional[bool]:
        """Run the accused audit again: True confirmed, False refuted, None cannot tell (host gone, too few replicas)."""
        try:
            decode_probe(accusation.probe, self.d_model)
        except ValueError:
            return False
        if accusation.accused not in self.replicas(accusation.uid):
            return None
        if accusation.kind == "expert_outputs":
            verdict = self.cross_check.judge(
                self._answers(accusation.uid, decode_probe(accusation.probe, self.d_model), list(self.replicas(accusation.uid)))
            )
            if not verdict.conclusive:
                return None
            return accusation.accused in verdict.outliers
        if accusation.kind == "no_train":
            # the accused must fail every attempt: one skipped fp16 step must not get an honest host banned
            return all(self.probe_training(accusation.accused, accusation.uid, accusation.probe) is not None
                       for _ in range(attempts))
        return None
