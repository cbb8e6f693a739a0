"""Accusations become bans only after the coordinator re-verified them; false accusations cost the accuser.

:class:`BanAuthority` runs in the coordinator. For every new accusation in the DHT it re-runs the check itself:

- step accusations: it takes the accused's commitment *as the coordinator itself saw it* in the DHT (signed by the
  accused; the copy inside the accusation is never trusted, or a liar could frame anyone with a made-up
  commitment), fetches the bundle from the accuser (which keeps failing bundles as evidence) or else from the
  accused, checks the hashes and recomputes the step;
- host accusations: it runs the same replica cross-check or training probe on the same probe inputs;
- equivocations: only its own :class:`~athome.verification.commitments.CommitmentBook` counts.

Confirmed: the accused is banned in the coordinator's signed :class:`~athome.dht.schemas.BanRecord`. Refuted: the
accuser gets a strike; ``max_false_accusations`` strikes ban the accuser. Undecidable (bundle gone, host gone):
nothing happens to either. The coordinator's own failed checks ban directly (its recomputation is the
re-verification).

:class:`BanWatcher` runs in every peer: it reads the coordinator's ban record and calls ``on_ban`` once per newly
banned peer (the trainer's registry skips it, the ledger revokes its credit, averaging drops it).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from athome.dht.schemas import MAX_BANS, Accusation, BanEntry, BanRecord
from athome.verification.board import Board
from athome.verification.commitments import CommitmentBook
from athome.verification.expert_checks import ExpertAuditor, HostFinding
from athome.verification.validator import STEP_KINDS, ProofSource, ProofUnavailable, StepChecker, Validator

logger = logging.getLogger(__name__)
HOST_KINDS = frozenset({"expert_outputs", "replica_params", "no_train"})


def matches_commitment(proof, seen) -> bool:
    """Whether ``proof`` is exactly the bundle ``seen`` commits to (identity and all three hashes)."""
    c = seen.commitment
    return (proof.peer_id == seen.peer and proof.session == seen.session and proof.step == c.step
            and proof.params_hash == c.params_hash and proof.grad_hash == c.grad_hash and proof.io_hash == c.io_hash)


class BanAuthority:
    """The coordinator's ban desk (see module docstring). Call :meth:`poll` periodically from one thread.

    :param validator: the coordinator's own :class:`~athome.verification.validator.Validator` (its book, proof
      source and checker are reused); its failures are banned directly
    :param auditor: host audits, for accusations against expert hosts (None: such accusations are undecidable)
    :param on_ban: called with each new :class:`BanEntry` (e.g. ``store.revoke``)
    """

    def __init__(
        self,
        validator: Validator,
        *,
        auditor: Optional[ExpertAuditor] = None,
        max_false_accusations: int = 3,
        on_ban: Optional[Callable[[BanEntry], None]] = None,
    ):
        self.validator = validator
        self.board: Board = validator.board
        self.book: CommitmentBook = validator.book
        self.proofs: ProofSource = validator.proofs
        self.checker: StepChecker = validator.checker
        self.auditor = auditor
        self.max_false_accusations = max_false_accusations
        self.on_ban = on_ban
        self.strikes: Counter = Counter()
        self.bans: Dict[str, BanEntry] = dict(self.board.bans())  # resume from what is already published
        self._handled: Set[Tuple] = set()
        self.confirmed = self.refuted = self.undecided = 0

    # ---------------------------------------------------------------------------------------------- main loop
    def poll(self) -> List[BanEntry]:
        """Run the coordinator's own checks, then re-verify new accusations. Returns the bans issued."""
        issued = []
        for result in self.validator.poll():
            if result.failed and result.peer not in self.bans:
                issued.append(self.ban(result.peer, result.kind, result.detail, step=result.step))
        for accuser, record in self.board.accusations().items():
            for accusation in record.accusations:
                key = (accuser, accusation.accused, accusation.kind, accusation.session, accusation.step,
                       accusation.uid, accusation.probe)
                if key in self._handled:
                    continue
                self._handled.add(key)
                if accuser in self.bans or accusation.accused in self.bans or accuser == accusation.accused:
                    continue
                entry = self.judge(accuser, accusation)
                if entry is not None:
                    issued.append(entry)
        return issued

    def judge(self, accuser: str, accusation: Accusation) -> Optional[BanEntry]:
        confirmed = self.reverify(accuser, accusation)
        if confirmed is None:
            self.undecided += 1
            logger.info(f"Could not re-verify {accuser[-8:]}'s accusation of {accusation.accused[-8:]} "
                        f"({accusation.kind}); no action")
            return None
        if confirmed:
            self.confirmed += 1
            return self.ban(accusation.accused, accusation.kind, accusation.detail, step=accusation.step, accuser=accuser)
        self.refuted += 1
        self.strikes[accuser] += 1
        logger.warning(f"{accuser[-8:]} falsely accused {accusation.accused[-8:]} ({accusation.kind}); "
                       f"strike {self.strikes[accuser]}/{self.max_false_accusations}")
        if self.strikes[accuser] >= self.max_false_accusations:
            return self.ban(accuser, "false_accusations", f"{self.strikes[accuser]} accusations refuted on re-verification")
        return None

    def reverify(self, accuser: str, accusation: Accusation) -> Optional[bool]:
        """True: the accused cheated. False: it did not (the accusation is false). None: cannot tell."""
        if accusation.kind in HOST_KINDS:
            return self.auditor.reverify(accusation) if self.auditor is not None else None
        if accusation.kind == "equivocation":
            return None  # the coordinator's own book would have caught it; a third party's word is not evidence
        if accusation.kind not in STEP_KINDS:
            return False
        self.validator.poll_commitments()
        seen = self.book.get(accusation.accused, accusation.session, accusation.step)
        if seen is None:
            return None
        # evidence from the accuser counts only if it *is* the accused's committed bundle (hashes match the signed
        # commitment); otherwise a liar could hand in a doctored bundle and have it fail on the accused's behalf
        proof = self._fetch(accuser, accusation.accused, accusation.step)
        if proof is None or not matches_commitment(proof, seen):
            try:
                proof = self.proofs.fetch(accusation.accused, accusation.accused, accusation.step)
            except ProofUnavailable:
                return None  # the coordinator cannot reach it either: no verdict (its own checks will count that)
            if proof is None:
                # the accused itself answered "not found": that is a failure while the step is in its window
                return True if self.validator.in_current_window(seen) else None
        result = self.validator.check_with(seen, proof)
        if result.verdict == "inconclusive":
            return None
        return result.failed

    def _fetch(self, holder: str, owner: str, step: int):
        try:
            return self.proofs.fetch(holder, owner, step)
        except ProofUnavailable:
            return None

    def report_host_findings(self, findings: Iterable[HostFinding]) -> List[BanEntry]:
        """The coordinator's own host audits: re-run once more (transient noise), then ban."""
        issued = []
        for finding in findings:
            if finding.peer in self.bans:
                continue
            confirmed = self.auditor.reverify(finding.accusation()) if self.auditor is not None else True
            if confirmed:
                issued.append(self.ban(finding.peer, finding.kind, finding.detail))
        return issued

    # ---------------------------------------------------------------------------------------------- bans
    def ban(self, peer: str, kind: str, reason: str, *, step: int = -1, accuser: str = "") -> BanEntry:
        entry = BanEntry(peer=peer, kind=kind, reason=reason[:160], step=max(step, -1), accuser=accuser, at=time.time())
        self.bans[peer] = entry
        self.book.forget(peer)
        self.publish()
        logger.warning(f"Banned {peer} ({kind}): {reason}")
        if self.on_ban is not None:
            try:
                self.on_ban(entry)
            except Exception as error:
                logger.warning(f"on_ban callback failed for {peer}: {error!r}")
        return entry

    def publish(self) -> bool:
        entries = sorted(self.bans.values(), key=lambda e: e.at)[-MAX_BANS:]
        if len(self.bans) > MAX_BANS:
            logger.warning(f"{len(self.bans)} bans exceed one record's {MAX_BANS}; the oldest are no longer published")
        return self.board.publish_bans(BanRecord(bans=entries))


class BanWatcher:
    """Follows the coordinator's ban record; ``on_ban(entry)`` runs once per newly banned peer. Call :meth:`poll`
    periodically (e.g. from a ``PeriodicThread``)."""

    def __init__(self, board: Board, on_ban: Callable[[BanEntry], None]):
        self.board, self.on_ban = board, on_ban
        self.banned: Dict[str, BanEntry] = {}

    def poll(self) -> List[BanEntry]:
        new = [entry for peer, entry in self.board.bans().items() if peer not in self.banned]
        for entry in new:
            self.banned[entry.peer] = entry
            logger.warning(f"{entry.peer} is banned by the coordinator ({entry.kind}): {entry.reason}")
            try:
                self.on_ban(entry)
            except Exception as error:
                logger.warning(f"on_ban callback failed for {entry.peer}: {error!r}")
        return new
