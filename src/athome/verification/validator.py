"""Spot-check validators: sample committed steps, fetch their bundles, recompute them, accuse on mismatch.

:class:`StepChecker` judges one (commitment, bundle) pair and needs no network:

1. the bundle exists (a trainer that cannot produce the bundle of a step it committed fails);
2. it is the committed one: peer, step, seed, epoch, samples and the three hashes match the commitment the
   validator saw *first* (see :class:`~athome.verification.commitments.CommitmentBook`);
3. the batch seed is ``batch_seed(run, peer, step)`` (no cherry-picked data);
4. enough expert slots answered (a trainer cannot skip the experts and train the dense part alone);
5. the parameters are the swarm's: the params hash equals the quorum of other trainers' hashes at that epoch, or,
   where a reference copy of the quorum's parameters is at hand, lie within ``params_max_steps`` optimizer steps
   of it (RMS distance / learning rate), so honest stragglers pass and poisoned parameters do not;
6. the recomputation (:class:`~athome.verification.replay.Replayer`) matches: loss, every dense gradient tensor and
   the gradients sent to experts, within the tolerances calibrated for the precision
   (:mod:`athome.verification.calibration`). The comparison is per step: a deviation on one step is caught when
   that step is sampled, however clean the others are.

:class:`Validator` runs the loop: read commitments from a :class:`~athome.verification.board.Board`, sample them
with a :class:`~athome.verification.trust.TrustSampler`, fetch bundles from a :class:`ProofSource`, check, keep the
failing bundles as evidence (served to the coordinator, which re-verifies), and publish signed accusations.
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Protocol, Sequence, Tuple

import torch

from athome.config import RunConfig
from athome.dht.schemas import MAX_ACCUSATIONS, Accusation, AccusationRecord, CommitmentRecord, StepCommitment
from athome.numerics import all_finite
from athome.trainer.data import Corpus, batch_seed
from athome.verification.board import Board
from athome.verification.calibration import Tolerances, numerics_platform, tolerances_for
from athome.verification.commitments import CommitmentBook, SeenCommitment
from athome.verification.proof import StepProof
from athome.verification.replay import Replayer, ReplayError, compare
from athome.verification.suspicions import fresh_hints
from athome.verification.trust import TrustSampler

logger = logging.getLogger(__name__)

Verdict = Literal["pass", "fail", "inconclusive"]
MIN_ANSWERED_FRACTION = 0.5  # the trainer's own rule (trainer/train.py): fewer answered slots and it must retry
STEP_KINDS = frozenset({
    "missing_proof", "bad_proof", "seed", "free_ride_experts", "params", "gradient", "loss", "grad_outputs", "routing",
})


@dataclass
class CheckResult:
    """The outcome of checking one committed step. ``kind`` is "ok" for a pass, else what failed."""

    peer: str
    session: int
    step: int
    verdict: Verdict
    kind: str = "ok"
    figures: Dict[str, float] = field(default_factory=dict)
    detail: str = ""
    seconds: float = 0.0
    commitment: Optional[StepCommitment] = None
    proof: Optional[StepProof] = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        return self.verdict == "fail"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


class ProofUnavailable(RuntimeError):
    """The holder could not be asked (unreachable, timed out, garbled answer): no verdict either way."""


class ProofSource(Protocol):
    def fetch(self, holder: str, owner: str, step: int) -> Optional[StepProof]:
        """The bundle of ``owner``'s ``step``, asked of peer ``holder`` (the owner itself, or an accuser holding it
        as evidence); None if the holder answered that it does not have it. Raises :class:`ProofUnavailable` if the
        holder could not be asked."""


class LocalProofSource:
    """A :class:`ProofSource` over in-process lookups: holder -> ``lookup(owner, step)`` (simulations, tests)."""

    def __init__(self):
        self.holders: Dict[str, Callable[[str, int], Optional[StepProof]]] = {}

    def add(self, holder: str, lookup: Callable[[str, int], Optional[StepProof]]) -> None:
        self.holders[holder] = lookup

    def fetch(self, holder: str, owner: str, step: int) -> Optional[StepProof]:
        lookup = self.holders.get(holder)
        return lookup(owner, step) if lookup is not None else None


def _rms(tensors: Sequence[torch.Tensor]) -> float:
    total = sum(float(t.double().pow(2).sum()) for t in tensors)
    count = sum(t.numel() for t in tensors)
    return math.sqrt(total / max(count, 1))


class StepChecker:
    """Judges one committed step against its bundle (see module docstring). Not thread-safe (one model).

    :param tolerances: fixed tolerances, or None to use the calibrated ones for each bundle's precision and device
    :param params_max_steps: how many optimizer steps away from the quorum's parameters a trainer may be
    :param threads: torch threads to use while replaying (None: leave as is)
    """

    def __init__(
        self,
        config: RunConfig,
        corpus: Corpus,
        *,
        tolerances: Optional[Tolerances] = None,
        device: str = "cpu",
        params_max_steps: float = 4.0,
        aux_coef: float = 0.01,
        threads: Optional[int] = None,
    ):
        self.run_name, self.config, self.corpus = config.name, config, corpus
        self.fixed_tolerances = tolerances
        self.device = device
        self.platform = numerics_platform(device)
        self.params_max_steps = params_max_steps
        self.threads = threads
        self.replayer = Replayer(config.model, corpus, grad_clip=config.optimizer.grad_clip, aux_coef=aux_coef,
                                 device=device)
        self.replay_seconds = 0.0
        self.replays = 0
        self.probe_pool = None  # an expert_checks.ProbePool fed with the expert I/O of verified steps, if set

    def tolerances(self, precision: str, trainer_platform: str) -> Tolerances:
        if self.fixed_tolerances is not None:
            return self.fixed_tolerances
        return tolerances_for(precision, trainer_platform, self.platform)

    def check(
        self,
        seen: SeenCommitment,
        proof: Optional[StepProof],
        *,
        quorum_params_hash: Optional[str] = None,
        reference_params: Optional[Sequence[torch.Tensor]] = None,
    ) -> CheckResult:
        started = time.perf_counter()
        result = self._check(seen, proof, quorum_params_hash, reference_params)
        result.seconds = time.perf_counter() - started
        result.commitment, result.proof = seen.commitment, proof
        return result

    def _check(self, seen, proof, quorum_params_hash, reference_params) -> CheckResult:
        c = seen.commitment

        def verdict(v: Verdict, kind: str, detail: str = "", **figures: float) -> CheckResult:
            return CheckResult(seen.peer, seen.session, c.step, v, kind, dict(figures), detail)

        if proof is None:
            return verdict("fail", "missing_proof", f"no bundle for committed step {c.step}")
        if seen.corpus != self.corpus.fingerprint:
            return verdict("inconclusive", "corpus", f"peer trains on corpus {seen.corpus[:12]}, this validator has "
                                                     f"{self.corpus.fingerprint[:12]}: cannot rebuild its batches")
        mismatched = [
            name for name, claimed, actual in (
                ("peer", seen.peer, proof.peer_id), ("session", seen.session, proof.session),
                ("step", c.step, proof.step), ("seed", c.seed, proof.seed),
                ("epoch", c.epoch, proof.epoch), ("samples", c.samples, proof.samples),
                ("precision", seen.precision, proof.precision),
                ("params_hash", c.params_hash, proof.params_hash), ("grad_hash", c.grad_hash, proof.grad_hash),
                ("io_hash", c.io_hash, proof.io_hash),
            ) if claimed != actual
        ]
        if mismatched:
            return verdict("fail", "bad_proof", f"bundle differs from the commitment in {', '.join(mismatched)}")
        if c.seed != batch_seed(self.run_name, seen.peer, c.step):
            return verdict("fail", "seed", f"batch seed {c.seed} is not batch_seed(run, peer, {c.step})")
        answered = proof.answered_fraction
        if answered < MIN_ANSWERED_FRACTION:
            return verdict("fail", "free_ride_experts", f"only {answered:.0%} of expert slots answered",
                           answered=answered)
        figures: Dict[str, float] = {}
        if quorum_params_hash is not None and proof.params_hash != quorum_params_hash:
            figures["params_quorum"] = 0.0
            if reference_params is not None and len(reference_params) == len(proof.params):
                if any(tuple(a.shape) != tuple(b.shape) for a, b in zip(reference_params, proof.params)):
                    return verdict("fail", "params", "parameter shapes differ from the quorum's")
                distance = _rms([a.double() - b.double() for a, b in zip(proof.params, reference_params)])
                steps = distance / self.config.optimizer.dense_lr
                figures["params_steps"] = steps
                if not math.isfinite(steps) or steps > self.params_max_steps:
                    return verdict("fail", "params", f"parameters are {steps:.1f} optimizer steps away from the "
                                                     f"quorum's at epoch {c.epoch} (max {self.params_max_steps})",
                                   **figures)
        if not all(map(all_finite, proof.grads)):
            return verdict("fail", "gradient", "the contribution contains NaN/Inf", grad=math.inf, **figures)

        old_threads = torch.get_num_threads()
        try:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            recomputation = self.replayer.recompute(proof)
        except ReplayError as error:
            return verdict("fail", "bad_proof", f"cannot replay the bundle: {error}", **figures)
        finally:
            if self.threads is not None:
                torch.set_num_threads(old_threads)
        self.replays += 1
        self.replay_seconds += recomputation.seconds

        distances = compare(proof, recomputation)
        distances.loss = abs(c.loss - recomputation.loss)  # what was *committed* (and reported), not the bundle's
        figures.update(distances.as_dict())
        tolerance = self.tolerances(seen.precision, seen.platform)
        figures["tolerance_profile"] = 0.0 if seen.platform == self.platform else 1.0  # 0 same platform, 1 cross
        for kind, name in (("grad_outputs", "grad_outputs"), ("gradient", "grad_global"), ("gradient", "grad"),
                           ("loss", "loss"), ("routing", "route_mismatch")):
            value, limit = getattr(distances, name), getattr(tolerance, name)
            if not value <= limit:  # also catches NaN
                return verdict("fail", kind, f"{name} off by {value:.3g} (tolerance {limit:.3g})", **figures)
        if self.probe_pool is not None:  # verified expert requests: probes for host audits (expert_checks.ProbePool)
            try:
                self.probe_pool.add_step(proof.layers, [d.inputs for d in self.replayer.dispatchers])
            except Exception as error:  # probes are a bonus; the check's verdict stands
                logger.warning(f"Could not keep audit probes from a verified step: {error!r}")
        return verdict("pass", "ok", **figures)


class Validator:
    """The validator loop (see module docstring). Call :meth:`poll` periodically (one thread).

    :param board: where commitments are read and accusations written (as this validator)
    :param proofs: how bundles are fetched
    :param checker: the recomputation
    :param sampler: which commitments to check
    :param accuse: publish accusations for failures (a coordinator-validator bans directly instead: see
      :class:`~athome.verification.bans.BanAuthority`)
    :param on_result: called with every :class:`CheckResult` (e.g. the coordinator's ledger)
    :param max_checks_per_poll: cap on recomputations per poll (the rest of the sample waits in a queue)
    :param max_unreachable: consecutive checks a trainer may fail to answer (network) before it counts as unable
      to produce its bundles (it would otherwise contribute unverifiable gradients forever)
    :param suspect_checks: a trainer's fresh hint (:mod:`.suspicions`: the suspect's averaging parts were heavily
      clipped) makes the suspect's next this many commitments checked, ahead of other queued steps
    """

    def __init__(
        self,
        board: Board,
        proofs: ProofSource,
        checker: StepChecker,
        sampler: TrustSampler,
        *,
        book: Optional[CommitmentBook] = None,
        accuse: bool = True,
        on_result: Optional[Callable[[CheckResult], None]] = None,
        max_checks_per_poll: Optional[int] = None,
        evidence_size: int = 16,
        max_unreachable: int = 5,
        suspect_checks: int = 3,
    ):
        self.board, self.proofs, self.checker, self.sampler = board, proofs, checker, sampler
        self.peer_id = board.peer_id
        self.book = book if book is not None else CommitmentBook()
        self.accuse = accuse
        self.on_result = on_result
        self.max_checks_per_poll = max_checks_per_poll
        self.evidence: "OrderedDict[Tuple[str, int], StepProof]" = OrderedDict()
        self.evidence_size = evidence_size
        self.results: List[CheckResult] = []  # bounded history (last 10000)
        self._queue: List[SeenCommitment] = []
        self._accusations: List[Accusation] = []
        self._reference_cache: "OrderedDict[str, List[torch.Tensor]]" = OrderedDict()
        self.checks = self.failures = 0
        self.max_unreachable = max_unreachable
        self._unreachable: Dict[str, int] = {}
        self.latest_records: Dict[str, CommitmentRecord] = {}
        self.suspect_checks = suspect_checks
        self.suspects: Dict[str, int] = {}  # peer -> commitments still to check because of hints
        self._hints_seen: Dict[Tuple[str, str], float] = {}  # (reporter, suspect) -> observation time acted on
        self._hinted: set = set()  # ids of queued commitments queued because of a hint: taken first

    # ---------------------------------------------------------------------------------------------- main loop
    def poll_commitments(self):
        """Read every trainer's commitment record into the book; returns the book's update."""
        banned = set(self.board.bans())
        records = {peer: record for peer, record in self.board.commitments().items()
                   if peer not in banned and peer != self.peer_id}
        self.latest_records = records
        update = self.book.update(records)
        for peer in update.new_sessions:
            self.sampler.reset(peer)
        return update

    def poll_suspicions(self) -> List[str]:
        """Read trainers' hints (:mod:`.suspicions`); returns the peers newly suspected. A hint never accuses: it
        only makes the suspect's next ``suspect_checks`` commitments checked first."""
        suspicions = getattr(self.board, "suspicions", None)
        if suspicions is None or self.suspect_checks <= 0:
            return []
        try:
            records = suspicions()
        except Exception as error:  # hints are optional: checks go on as sampled
            logger.warning(f"Could not read trainers' suspicions: {error!r}")
            return []
        flagged = []
        for reporter, suspect in fresh_hints(records, self._hints_seen, banned=self.board.bans(),
                                             own_peer_id=self.peer_id):
            self.suspects[suspect] = max(self.suspects.get(suspect, 0), self.suspect_checks)
            flagged.append(suspect)
            logger.info(f"{reporter[-8:]} saw {suspect[-8:]}'s averaging parts heavily clipped: checking its next "
                        f"{self.suspect_checks} steps first")
        return flagged

    def poll(self) -> List[CheckResult]:
        """Read commitments and hints, check the sampled ones (and equivocations), accuse. Returns this poll's
        results."""
        self.poll_suspicions()
        update = self.poll_commitments()
        results: List[CheckResult] = []
        for first, rewritten in update.equivocations:
            results.append(CheckResult(
                first.peer, first.session, first.commitment.step, "fail", "equivocation",
                detail=f"step {first.commitment.step} was re-committed with other values (first seen: "
                       f"grad {first.commitment.grad_hash[:8]}, now {rewritten.grad_hash[:8]})",
                commitment=first.commitment,
            ))
        for seen in update.new:
            sampled = self.sampler.should_check(seen.peer, late=seen.late)
            if self.suspects.get(seen.peer, 0) > 0:
                self.suspects[seen.peer] -= 1
                self._hinted.add(id(seen))
                sampled = True
            if sampled:
                self._queue.append(seen)
        budget = self.max_checks_per_poll if self.max_checks_per_poll is not None else len(self._queue)
        todo = self._take(budget)
        banned = set(self.board.bans())
        for seen in todo:
            if seen.peer not in banned:
                results.append(self.check(seen))
        for result in results:
            self._account(result)
        return results

    def _take(self, budget: int) -> List[SeenCommitment]:
        """Up to ``budget`` queued commitments: those queued because of a hint (suspects) first; then newest first,
        one trainer at a time (round-robin). A validator that
        cannot keep up with every newcomer's every step thus spreads its checks over all trainers, instead of falling
        ever further behind on the first ones (measured in ``peer demo --attack``: a FIFO queue caught the attacker
        after 4 minutes). Queued steps whose bundles have already left their trainer's window are dropped: they
        could only be inconclusive."""
        live = [seen for seen in self._queue if not self._expired(seen)]
        newest_first = sorted(live, key=lambda seen: seen.commitment.step, reverse=True)
        todo = [seen for seen in newest_first if id(seen) in self._hinted][:budget]  # suspects' steps first
        by_peer: Dict[str, List[SeenCommitment]] = {}
        for seen in newest_first:
            if id(seen) not in self._hinted:
                by_peer.setdefault(seen.peer, []).append(seen)
        while len(todo) < budget and any(by_peer.values()):
            for queue in by_peer.values():
                if queue and len(todo) < budget:
                    todo.append(queue.pop(0))
        taken = {id(seen) for seen in todo}
        self._queue = [seen for seen in live if id(seen) not in taken]
        self._hinted &= {id(seen) for seen in self._queue}
        return todo

    def _expired(self, seen: SeenCommitment) -> bool:
        return seen.session == self.book.current_session(seen.peer) and seen.peer in self.latest_records \
            and not self.in_current_window(seen)

    def check(self, seen: SeenCommitment) -> CheckResult:
        """Fetch and check one committed step (no accounting)."""
        if self._expired(seen):
            # the trainer moved on and dropped the bundle, as it may: the check came too late (validator backlog)
            return CheckResult(seen.peer, seen.session, seen.commitment.step, "inconclusive", "expired",
                               commitment=seen.commitment)
        try:
            proof = self.proofs.fetch(seen.peer, seen.peer, seen.commitment.step)
        except ProofUnavailable as error:
            count = self._unreachable[seen.peer] = self._unreachable.get(seen.peer, 0) + 1
            if count < self.max_unreachable:
                return CheckResult(seen.peer, seen.session, seen.commitment.step, "inconclusive", "unreachable",
                                   detail=str(error)[:200], commitment=seen.commitment)
            self._unreachable[seen.peer] = 0
            return CheckResult(seen.peer, seen.session, seen.commitment.step, "fail", "missing_proof",
                               detail=f"could not serve its bundles {count} times in a row", commitment=seen.commitment)
        self._unreachable.pop(seen.peer, None)
        return self.check_with(seen, proof)

    def check_with(self, seen: SeenCommitment, proof: Optional[StepProof]) -> CheckResult:
        stale = proof is None or proof.session != seen.session
        if stale and self.book.current_session(seen.peer) != seen.session:
            # the trainer restarted since: its old bundles are gone. Not held against it (the new session is
            # checked as a newcomer's), but not counted as clean either
            return CheckResult(seen.peer, seen.session, seen.commitment.step, "inconclusive", "restarted",
                               commitment=seen.commitment)
        quorum = self.book.quorum_params_hash(seen.commitment.epoch, exclude=[seen.peer])
        reference = None
        if proof is not None and quorum is not None and proof.params_hash != quorum:
            reference = self.reference_params(seen.commitment.epoch, quorum, exclude=seen.peer)
        return self.checker.check(seen, proof, quorum_params_hash=quorum, reference_params=reference)

    def in_current_window(self, seen: SeenCommitment) -> bool:
        """Whether ``seen``'s step is still in its trainer's latest published window (so it must be servable)."""
        record = self.latest_records.get(seen.peer)
        return (record is not None and record.session == seen.session
                and any(entry.step == seen.commitment.step for entry in record.entries))

    def reference_params(self, epoch: int, params_hash: str, exclude: str = "") -> Optional[List[torch.Tensor]]:
        """The quorum's parameters at ``epoch``: from a bundle of another peer that committed ``params_hash``."""
        cached = self._reference_cache.get(params_hash)
        if cached is not None:
            return cached
        for seen in self.book_entries(epoch, params_hash):
            if seen.peer == exclude:
                continue
            try:
                proof = self.proofs.fetch(seen.peer, seen.peer, seen.commitment.step)
            except ProofUnavailable:
                continue
            if proof is not None and proof.params_hash == params_hash:
                self._reference_cache[params_hash] = proof.params
                while len(self._reference_cache) > 4:
                    self._reference_cache.popitem(last=False)
                return proof.params
        return None

    def book_entries(self, epoch: int, params_hash: str) -> List[SeenCommitment]:
        return self.book.at_epoch(epoch, params_hash)[:4]

    # ---------------------------------------------------------------------------------------------- outcomes
    def _account(self, result: CheckResult) -> None:
        if result.verdict != "inconclusive":
            self.sampler.record(result.peer, result.passed)
            self.checks += 1
        self.results.append(result)
        del self.results[:-10000]
        if result.failed:
            self.failures += 1
            logger.warning(f"Check failed: {result.peer[-8:]} step {result.step}: {result.kind} ({result.detail})")
            if result.proof is not None:
                self.evidence[(result.peer, result.step)] = result.proof
                while len(self.evidence) > self.evidence_size:
                    self.evidence.popitem(last=False)
            if self.accuse:
                self.publish_accusation(accusation_for(result))
        if self.on_result is not None:
            try:
                self.on_result(result)
            except Exception as error:
                logger.warning(f"on_result callback failed: {error!r}")

    def publish_accusation(self, accusation: Accusation) -> None:
        self._accusations = [*self._accusations, accusation][-MAX_ACCUSATIONS:]
        if not self.board.publish_accusations(AccusationRecord(accusations=self._accusations)):
            logger.warning("No DHT node accepted the accusation record; it is retried with the next one")

    def lookup(self, owner: str, step: int) -> Optional[StepProof]:
        """Evidence this validator holds (what its proof servicer serves to the coordinator)."""
        return self.evidence.get((owner, step))


def accusation_for(result: CheckResult) -> Accusation:
    figures = {k: (v if math.isfinite(v) else 1e30) for k, v in list(result.figures.items())[:16]}
    return Accusation(
        accused=result.peer, kind=result.kind, step=result.step, session=result.session,
        commitment=result.commitment, figures=figures, detail=result.detail[:256], at=time.time(),
    )
