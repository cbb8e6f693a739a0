"""The coordinator's ledger: peers, metrics curves, expert-map snapshots, contributions (credit) and bans, in SQLite.

One file, ``<data_dir>/coordinator.sqlite3``, in WAL mode, so a coordinator that is killed and restarted keeps
everything it had committed. Every public method is one transaction and is safe to call from several threads
(one connection, guarded by a lock).

Credit arithmetic. Peers report *cumulative* counters (samples trained, expert calls served) that they sign but
nobody has checked, so the ledger treats them as claims and bounds what they can earn:

- a report is applied only if its report time is newer than the last one applied for that peer (the same record
  polled again, or an older record replayed, changes nothing); report times are clamped to ``now + max_clock_skew``;
- a counter that grows is credited by the growth; a counter that falls (with a newer report time) is a restart of
  the peer: its new value is what it did since the restart, and becomes the new baseline. Nothing is ever counted
  twice and credit never goes down except by :meth:`Store.revoke`;
- growth is capped by a plausible rate (``CreditPolicy``) times the coordinator-clock time since the previous
  applied report (the peer's own clock is not trusted for this); growth above the cap is refused for good and
  tallied in ``rejected_samples`` / ``rejected_work``;
- negative, non-integer or absurdly large values are clamped to ``[0, MAX_COUNTER]`` before any arithmetic, so
  SQLite's 64-bit integers never overflow.

Samples count only while verification vouches for them (``samples`` = ``verified_samples`` + ``pending_samples``):

- credited samples start *pending*, in a batch stamped with the coordinator time they were credited (batches
  credited within the same 1/20 of the window are merged, so some samples settle up to that much early);
- a passed spot-check (:meth:`Store.record_check`) verifies every sample of the peer pending at that moment. Checks
  sample steps at random with OS randomness, so a trainer cannot tell which of its pending steps will be replayed;
  each passed check vouches for what was reported since the previous one;
- a failed check revokes every pending sample of the peer (``revoked_samples``); a ban (:meth:`Store.revoke`)
  revokes everything, verified included;
- a batch still pending after ``CreditPolicy.pending_window`` seconds is settled by :meth:`Store.settle` (called on
  every ingest): verified if the peer's trust covers it (``trusted_after_checks`` consecutive passed checks and
  no failed one since, BOINC's adaptive-replication rule), otherwise it *lapses* (``lapsed_samples``) and stops
  counting. With ``pending_window=None`` (no verification runs for this ledger) pending samples never lapse.

Expert work counts only where the trainers that called the host sign for it (``expert_work`` =
min(``work_claimed``, ``work_receipted``)):

- ``work_claimed`` is the host's own cumulative forward+backward call counter with the rules above (rate cap,
  replays, restarts);
- ``work_receipted`` sums, over trainers that are not banned and are not the host itself, the growth of each
  trainer's signed receipt counter for that host (:meth:`Store.record_receipts`: same replay/restart/rate rules
  per (trainer, host) pair, a new trainer session counts as a restart). A host cannot inflate its credit (its
  claim is capped by what others signed), and a trainer can only sign in its own name (records are signed per
  writer). What this does not stop: a trainer and a host run by the same person (two identities) can inflate the
  host's work up to the rate cap, until the trainer is banned, which withdraws its receipts.
"""
from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

logger = logging.getLogger(__name__)

DB_FILENAME = "coordinator.sqlite3"
SCHEMA_VERSION = 2
MAX_COUNTER = 2**53  # integers beyond this are clamped: no float precision loss in JSON, no int64 overflow
MAX_TEXT = 64
MAX_PAGE = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    role TEXT NOT NULL DEFAULT '',
    public_name TEXT NOT NULL DEFAULT '',
    team TEXT NOT NULL DEFAULT '',
    relayed INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    experts TEXT NOT NULL DEFAULT '[]',
    device TEXT NOT NULL DEFAULT '',
    precision TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS peers_last_seen ON peers (last_seen);
CREATE TABLE IF NOT EXISTS contributions (
    peer_id TEXT PRIMARY KEY,
    public_name TEXT NOT NULL DEFAULT '',
    team TEXT NOT NULL DEFAULT '',
    samples INTEGER NOT NULL DEFAULT 0,
    verified_samples INTEGER NOT NULL DEFAULT 0,
    expert_work INTEGER NOT NULL DEFAULT 0,
    uptime REAL NOT NULL DEFAULT 0,
    checks_passed INTEGER NOT NULL DEFAULT 0,
    checks_failed INTEGER NOT NULL DEFAULT 0,
    samples_reported INTEGER NOT NULL DEFAULT 0,
    samples_report_time REAL,
    samples_credited_at REAL,
    rejected_samples INTEGER NOT NULL DEFAULT 0,
    work_reported INTEGER NOT NULL DEFAULT 0,
    work_report_time REAL,
    work_credited_at REAL,
    rejected_work INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    banned INTEGER NOT NULL DEFAULT 0,
    banned_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS contributions_rank ON contributions (banned, samples DESC, expert_work DESC, peer_id);
CREATE INDEX IF NOT EXISTS contributions_team_rank ON contributions (team, banned, samples DESC, expert_work DESC, peer_id);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY,
    peer_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    loss REAL NOT NULL,
    samples INTEGER NOT NULL,
    samples_per_second REAL NOT NULL,
    time REAL NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_received ON metrics (received_at);
CREATE INDEX IF NOT EXISTS metrics_peer ON metrics (peer_id, received_at);
CREATE TABLE IF NOT EXISTS expert_snapshots (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    experts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bans (
    peer_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    banned_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY,
    peer_id TEXT NOT NULL,
    amount INTEGER NOT NULL,
    credited_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_peer ON pending (peer_id);
CREATE INDEX IF NOT EXISTS pending_age ON pending (credited_at);
CREATE TABLE IF NOT EXISTS receipts (
    trainer_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    session INTEGER NOT NULL DEFAULT 0,
    reported INTEGER NOT NULL DEFAULT 0,
    report_time REAL,
    credited INTEGER NOT NULL DEFAULT 0,
    credited_at REAL,
    refused INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (trainer_id, host_id)
);
CREATE INDEX IF NOT EXISTS receipts_host ON receipts (host_id);
"""

# columns added in schema 2 (ALTER TABLE on ledgers written by schema 1)
_V2_COLUMNS = (
    ("pending_samples", "INTEGER NOT NULL DEFAULT 0"),
    ("lapsed_samples", "INTEGER NOT NULL DEFAULT 0"),
    ("revoked_samples", "INTEGER NOT NULL DEFAULT 0"),
    ("clean_streak", "INTEGER NOT NULL DEFAULT 0"),
    ("work_claimed", "INTEGER NOT NULL DEFAULT 0"),
    ("work_receipted", "INTEGER NOT NULL DEFAULT 0"),
)

LEADERBOARD_COLUMNS = (
    "rank", "peer_id", "public_name", "team", "samples", "verified_samples", "pending_samples", "verified",
    "expert_work", "work_claimed", "uptime_seconds", "checks_passed", "checks_failed", "status", "banned_reason",
)


@dataclass(frozen=True)
class CreditPolicy:
    """How much self-reported work one peer can plausibly earn.

    :param max_samples_per_second: the fastest a single trainer may add samples (generous: a fast multi-GPU box)
    :param max_expert_calls_per_second: the same for expert forward/backward calls served by one host
    :param first_report_seconds: a peer's first report may carry at most this many seconds' worth of growth
    :param slack_seconds: added to the time between reports (polling makes it jitter by a poll period)
    :param max_gap_seconds: growth allowance stops accruing after this long without a report
    :param max_clock_skew: report times further than this in the future are clamped
    :param max_uptime_gap: a peer seen again within this many seconds was up all along; a longer gap is downtime
    :param pending_window: seconds credited samples may stay pending (unverified but counted); None = forever
      (a ledger that no verification feeds)
    :param trusted_after_checks: consecutive passed checks after which a peer's pending samples verify at the end
      of the window without a check of their own (BOINC trusts a host after 10 consecutive valid results)
    """

    max_samples_per_second: float = 20_000.0
    max_expert_calls_per_second: float = 50_000.0
    first_report_seconds: float = 60.0
    slack_seconds: float = 10.0
    max_gap_seconds: float = 3600.0
    max_clock_skew: float = 300.0
    max_uptime_gap: float = 60.0
    pending_window: Optional[float] = 600.0
    trusted_after_checks: int = 10


@dataclass(frozen=True)
class Observation:
    """What one poll of the DHT saw of one peer; ``None`` fields were not in any of its records.

    ``samples`` and ``expert_calls`` are the peer's cumulative counters; ``report_time`` / ``work_report_time``
    are the (peer-clock) times of the records that carried them.
    """

    peer_id: str
    role: str = ""
    public_name: str = ""
    team: str = ""
    relayed: bool = False
    started_at: Optional[float] = None
    experts: tuple[str, ...] = ()
    device: str = ""
    precision: str = ""
    step: Optional[int] = None
    loss: Optional[float] = None
    samples: Optional[int] = None
    samples_per_second: Optional[float] = None
    report_time: Optional[float] = None
    expert_calls: Optional[int] = None
    work_report_time: Optional[float] = None


@dataclass
class CreditResult:
    """What one counter report did: ``credited`` added, ``refused`` over the rate cap, and why it was skipped."""

    credited: int = 0
    refused: int = 0
    restarted: bool = False
    skipped: str = ""


def clamp_counter(value: Any) -> int:
    """Any reported counter as an int in ``[0, MAX_COUNTER]``; junk (None, NaN, strings) becomes 0."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return 0 if math.isnan(value) or value < 0 else MAX_COUNTER
        value = int(value)
    if not isinstance(value, int):
        return 0
    return max(0, min(value, MAX_COUNTER))


def _finite(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _text(value: Any, limit: int = MAX_TEXT) -> str:
    return str(value or "")[:limit]


class StoreClosedError(RuntimeError):
    """The store was used after :meth:`Store.close`."""


class Store:
    """The coordinator's SQLite ledger. Open with ``Store(data_dir)``; close with :meth:`close` (or ``with``).

    :param data_dir: a directory; created if missing; the database is ``data_dir/coordinator.sqlite3``
    :param policy: the credit caps
    :param run_name: if given, recorded on first open; reopening the same directory for another run logs a warning
    """

    def __init__(self, data_dir: str | Path, policy: CreditPolicy = CreditPolicy(), run_name: Optional[str] = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_FILENAME
        self.policy = policy
        self._lock = threading.RLock()
        self._db: Optional[sqlite3.Connection] = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = int(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} was written by a newer athome (schema {version}); upgrade athome")
            self._migrate(db, version)
            if run_name is not None:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('run_name', ?)", (run_name,))
                stored = db.execute("SELECT value FROM meta WHERE key='run_name'").fetchone()[0]
                if stored != run_name:
                    logger.warning(
                        f"{self.path} holds the ledger of run '{stored}', not '{run_name}'; "
                        f"use another --data_dir to keep the runs apart"
                    )
        self._last_expert_map: Optional[str] = None

    # ---------------------------------------------------------------------------------------------- plumbing
    @staticmethod
    def _migrate(db: sqlite3.Connection, version: int) -> None:
        columns = {row[1] for row in db.execute("PRAGMA table_info(contributions)")}
        for name, declaration in _V2_COLUMNS:
            if name not in columns:
                db.execute(f"ALTER TABLE contributions ADD COLUMN {name} {declaration}")
        if version < 2:
            # schema 1 credited expert work from the host's claim alone, and samples without a pending state:
            # keep the claims as claims (no receipts back them); unverified samples start a pending window now
            db.execute("UPDATE contributions SET work_claimed = expert_work, expert_work = 0")
            db.execute(
                "INSERT INTO pending (peer_id, amount, credited_at) SELECT peer_id, samples - verified_samples, ? "
                "FROM contributions WHERE samples > verified_samples", (time.time(),)
            )
            db.execute("UPDATE contributions SET pending_samples = samples - verified_samples")
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        """Checkpoint the WAL and close; idempotent."""
        with self._lock:
            if self._db is not None:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as error:
                    logger.debug(f"WAL checkpoint failed on close: {error}")
                self._db.close()
                self._db = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    class _Tx:
        def __init__(self, store: "Store"):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            if self.store._db is None:
                self.store._lock.release()
                raise StoreClosedError("the coordinator store is closed")
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def _transaction(self) -> "Store._Tx":
        return Store._Tx(self)

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._db is None:
                raise StoreClosedError("the coordinator store is closed")
            return self._db.execute(sql, tuple(params)).fetchall()

    # ---------------------------------------------------------------------------------------------- ingestion
    def ingest(self, observations: Iterable[Observation], now: Optional[float] = None) -> dict[str, CreditResult]:
        """Apply one poll: upsert every observed peer, accrue uptime, append metrics, credit counters.

        Observations of banned peers update presence but earn nothing. Returns peer ID -> samples credit result.
        """
        now = time.time() if now is None else now
        results: dict[str, CreditResult] = {}
        with self._transaction() as db:
            for obs in observations:
                results[obs.peer_id] = self._ingest_one(db, obs, now)
            self._settle(db, now)
        return results

    def _ingest_one(self, db: sqlite3.Connection, obs: Observation, now: float) -> CreditResult:
        peer_id = _text(obs.peer_id, 128)
        db.execute(
            """INSERT INTO peers (peer_id, role, public_name, team, relayed, started_at, experts, device, precision,
                                  first_seen, last_seen)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (peer_id) DO UPDATE SET
                   role = CASE WHEN excluded.role != '' THEN excluded.role ELSE role END,
                   public_name = excluded.public_name, team = excluded.team, relayed = excluded.relayed,
                   started_at = COALESCE(excluded.started_at, started_at), experts = excluded.experts,
                   device = CASE WHEN excluded.device != '' THEN excluded.device ELSE device END,
                   precision = CASE WHEN excluded.precision != '' THEN excluded.precision ELSE precision END,
                   last_seen = MAX(last_seen, excluded.last_seen)""",
            (
                peer_id, _text(obs.role, 32), _text(obs.public_name), _text(obs.team), int(bool(obs.relayed)),
                _finite(obs.started_at), json.dumps(sorted({_text(uid) for uid in obs.experts})[:1024]),
                _text(obs.device, 32), _text(obs.precision, 8), now, now,
            ),
        )
        if obs.role in ("coordinator", "client"):
            return CreditResult(skipped="not a contributor")
        self._touch_contribution(db, peer_id, obs, now)
        result = CreditResult()
        if obs.samples is not None:
            result = self._credit(db, peer_id, "samples", obs.samples, obs.report_time, now)
            if not result.skipped:
                self._append_metrics(db, peer_id, obs, now)
        if obs.expert_calls is not None:
            self._credit(db, peer_id, "work", obs.expert_calls, obs.work_report_time, now)
        return result

    def _touch_contribution(
        self, db: sqlite3.Connection, peer_id: str, obs: Observation, now: float, seen: bool = True
    ) -> None:
        """Create the peer's contribution row if missing; if ``seen``, accrue uptime and refresh name and team."""
        row = db.execute("SELECT last_seen FROM contributions WHERE peer_id = ?", (peer_id,)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO contributions (peer_id, public_name, team, first_seen, last_seen) VALUES (?, ?, ?, ?, ?)",
                (peer_id, _text(obs.public_name), _text(obs.team), now, now if seen else 0.0),
            )
            return
        if not seen:
            return
        gap = now - row["last_seen"]
        uptime_add = gap if 0 < gap <= self.policy.max_uptime_gap else 0.0
        db.execute(
            """UPDATE contributions SET uptime = uptime + ?, last_seen = MAX(last_seen, ?),
                   public_name = CASE WHEN ? != '' THEN ? ELSE public_name END,
                   team = CASE WHEN ? != '' THEN ? ELSE team END
               WHERE peer_id = ?""",
            (uptime_add, now, _text(obs.public_name), _text(obs.public_name), _text(obs.team), _text(obs.team), peer_id),
        )

    def _credit(
        self, db: sqlite3.Connection, peer_id: str, kind: str, reported: Any, report_time: Any, now: float
    ) -> CreditResult:
        """The credit arithmetic of one cumulative counter (``kind`` is 'samples' or 'work'); see the module doc."""
        total_column = "samples" if kind == "samples" else "work_claimed"
        rate = self.policy.max_samples_per_second if kind == "samples" else self.policy.max_expert_calls_per_second
        row = db.execute(
            f"SELECT banned, {kind}_reported AS reported, {kind}_report_time AS report_time, "
            f"{kind}_credited_at AS credited_at FROM contributions WHERE peer_id = ?",
            (peer_id,),
        ).fetchone()
        if row["banned"]:
            return CreditResult(skipped="banned")
        report_time = _finite(report_time)
        if report_time is None:
            return CreditResult(skipped="no report time")
        report_time = min(report_time, now + self.policy.max_clock_skew)
        if row["report_time"] is not None and report_time <= row["report_time"]:
            return CreditResult(skipped="stale or replayed report")
        value = clamp_counter(reported)
        previous = row["reported"]
        restarted = value < previous
        growth = value if restarted else value - previous
        if row["credited_at"] is None:
            allowed_seconds = self.policy.first_report_seconds
        else:
            elapsed = max(0.0, now - row["credited_at"])
            allowed_seconds = min(elapsed + self.policy.slack_seconds, self.policy.max_gap_seconds)
        credited = min(growth, int(rate * allowed_seconds))
        refused = growth - credited
        if refused:
            logger.info(f"Refused {refused} of {growth} {kind} reported by {peer_id} (over the rate cap)")
        db.execute(
            f"""UPDATE contributions SET {total_column} = MIN({total_column} + ?, ?), {kind}_reported = ?,
                    {kind}_report_time = ?, {kind}_credited_at = ?, rejected_{kind} = MIN(rejected_{kind} + ?, ?),
                    restarts = restarts + ?
                WHERE peer_id = ?""",
            (credited, MAX_COUNTER, value, report_time, now, refused, MAX_COUNTER, int(restarted), peer_id),
        )
        if kind == "samples" and credited:
            db.execute("UPDATE contributions SET pending_samples = MIN(pending_samples + ?, ?) WHERE peer_id = ?",
                       (credited, MAX_COUNTER, peer_id))
            # batches are merged per 1/20 of the window, so a trainer holds ~20 pending rows, not one per poll
            granularity = (self.policy.pending_window or 600.0) / 20
            batch = db.execute("SELECT id FROM pending WHERE peer_id = ? AND credited_at >= ? ORDER BY id DESC LIMIT 1",
                               (peer_id, now - now % granularity)).fetchone()
            if batch is not None:
                db.execute("UPDATE pending SET amount = amount + ? WHERE id = ?", (credited, batch["id"]))
            else:
                db.execute("INSERT INTO pending (peer_id, amount, credited_at) VALUES (?, ?, ?)",
                           (peer_id, credited, now))
        if kind == "work":
            db.execute("UPDATE contributions SET expert_work = MIN(work_claimed, work_receipted) "
                       "WHERE peer_id = ? AND banned = 0", (peer_id,))
        return CreditResult(credited=credited, refused=refused, restarted=restarted)

    @staticmethod
    def _update_expert_work(db: sqlite3.Connection, host_id: str) -> None:
        """expert_work = min(the host's claim, receipts of non-banned trainers other than itself)."""
        receipted = db.execute(
            """SELECT COALESCE(SUM(r.credited), 0) FROM receipts r JOIN contributions t ON t.peer_id = r.trainer_id
               WHERE r.host_id = ? AND r.trainer_id != r.host_id AND t.banned = 0""",
            (host_id,),
        ).fetchone()[0]
        db.execute(
            "UPDATE contributions SET work_receipted = MIN(?, ?), expert_work = MIN(work_claimed, ?, ?) "
            "WHERE peer_id = ? AND banned = 0",
            (receipted, MAX_COUNTER, receipted, MAX_COUNTER, host_id),
        )

    def _settle(self, db: sqlite3.Connection, now: float) -> None:
        """Settle pending batches older than the window: verified if the peer is trusted, else lapsed."""
        window = self.policy.pending_window
        if window is None:
            return
        cutoff = now - window
        if db.execute("SELECT 1 FROM pending WHERE credited_at < ? LIMIT 1", (cutoff,)).fetchone() is None:
            return
        # set-based: one statement per outcome, whatever the number of peers (100k lapse together after an outage)
        due = "(SELECT peer_id, SUM(amount) AS amount FROM pending WHERE credited_at < ? GROUP BY peer_id) AS due"
        trusted = db.execute(
            f"""UPDATE contributions SET pending_samples = MAX(pending_samples - due.amount, 0),
                    verified_samples = MIN(verified_samples + due.amount, samples)
                FROM {due} WHERE contributions.peer_id = due.peer_id AND contributions.clean_streak >= ?""",
            (cutoff, self.policy.trusted_after_checks),
        ).rowcount
        lapsed = db.execute(
            f"""UPDATE contributions SET pending_samples = MAX(pending_samples - due.amount, 0),
                    samples = MAX(samples - due.amount, 0), lapsed_samples = MIN(lapsed_samples + due.amount, ?)
                FROM {due} WHERE contributions.peer_id = due.peer_id AND contributions.clean_streak < ?""",
            (MAX_COUNTER, cutoff, self.policy.trusted_after_checks),
        ).rowcount
        db.execute("DELETE FROM pending WHERE credited_at < ?", (cutoff,))
        if lapsed:
            logger.info(f"Samples of {lapsed} peers lapsed: no spot-check passed within {window:.0f}s and they are "
                        f"not trusted yet (CreditPolicy.pending_window); {trusted} trusted peers' samples verified")

    def settle(self, now: Optional[float] = None) -> None:
        """Settle pending samples older than ``CreditPolicy.pending_window`` (see the module doc); ingest calls it."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            self._settle(db, now)

    def _append_metrics(self, db: sqlite3.Connection, peer_id: str, obs: Observation, now: float) -> None:
        loss, sps = _finite(obs.loss), _finite(obs.samples_per_second)
        if loss is None or loss < 0 or obs.step is None:
            return
        db.execute(
            "INSERT INTO metrics (peer_id, step, loss, samples, samples_per_second, time, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                peer_id, clamp_counter(obs.step), loss, clamp_counter(obs.samples),
                max(0.0, min(sps or 0.0, float(MAX_COUNTER))), _finite(obs.report_time) or now, now,
            ),
        )

    def record_samples(self, peer_id: str, cumulative: Any, report_time: Any, now: Optional[float] = None) -> CreditResult:
        """Credit a trainer's cumulative ``samples`` counter reported at ``report_time`` (see the module doc).

        Unlike :meth:`ingest` this neither marks the peer as seen nor appends a metrics sample."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            self._touch_contribution(db, peer_id, Observation(peer_id), now, seen=False)
            return self._credit(db, peer_id, "samples", cumulative, report_time, now)

    def record_expert_work(
        self, peer_id: str, cumulative_calls: Any, report_time: Any, now: Optional[float] = None
    ) -> CreditResult:
        """Credit an expert host's claim (cumulative forward+backward calls served), with the same rules as samples;
        it counts as ``expert_work`` only as far as trainers' receipts back it (:meth:`record_receipts`)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            self._touch_contribution(db, peer_id, Observation(peer_id), now, seen=False)
            return self._credit(db, peer_id, "work", cumulative_calls, report_time, now)

    # ---------------------------------------------------------------------------------------------- verification hooks
    def record_receipts(
        self, trainer_id: str, session: Any, report_time: Any, receipts: dict[str, Any], now: Optional[float] = None
    ) -> dict[str, CreditResult]:
        """Apply one trainer's signed receipt record: ``receipts`` maps host peer ID -> that host's cumulative
        forward+backward calls made by this trainer in ``session``. Each (trainer, host) counter follows the module's
        credit rules (replays ignored, a fall or a new session is a restart, growth rate-capped); then each host's
        ``expert_work`` is recomputed. A banned trainer's receipts, and a host's receipts for itself, count nothing.
        Returns host -> result."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return self._record_receipts(db, trainer_id, session, report_time, receipts, now)

    def ingest_receipts(self, records: Iterable[tuple[str, Any, Any, dict[str, Any]]], now: Optional[float] = None) -> None:
        """:meth:`record_receipts` for one poll's ``(trainer_id, session, report_time, receipts)`` records, in one
        transaction."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            for trainer_id, session, report_time, receipts in records:
                self._record_receipts(db, trainer_id, session, report_time, receipts, now)

    def _record_receipts(
        self, db: sqlite3.Connection, trainer_id: str, session: Any, report_time: Any, receipts: dict[str, Any],
        now: float,
    ) -> dict[str, CreditResult]:
        trainer_id = _text(trainer_id, 128)
        session = clamp_counter(session)
        report_time = _finite(report_time)
        results: dict[str, CreditResult] = {}
        rate = self.policy.max_expert_calls_per_second
        self._touch_contribution(db, trainer_id, Observation(trainer_id), now, seen=False)
        banned = db.execute("SELECT banned FROM contributions WHERE peer_id = ?", (trainer_id,)).fetchone()[0]
        for host_id, calls in list(receipts.items())[:1024]:
            host_id = _text(host_id, 128)
            if banned or report_time is None or host_id == trainer_id:
                results[host_id] = CreditResult(skipped="banned" if banned else "no report time"
                                                if report_time is None else "self-receipt")
                continue
            clamped_time = min(report_time, now + self.policy.max_clock_skew)
            row = db.execute("SELECT * FROM receipts WHERE trainer_id = ? AND host_id = ?",
                             (trainer_id, host_id)).fetchone()
            if row is not None and row["report_time"] is not None and clamped_time <= row["report_time"]:
                results[host_id] = CreditResult(skipped="stale or replayed report")
                continue
            value = clamp_counter(calls)
            restarted = row is not None and (session != row["session"] or value < row["reported"])
            growth = value if row is None or restarted else value - row["reported"]
            if row is None or row["credited_at"] is None:
                allowed_seconds = self.policy.first_report_seconds
            else:
                allowed_seconds = min(max(0.0, now - row["credited_at"]) + self.policy.slack_seconds,
                                      self.policy.max_gap_seconds)
            credited = min(growth, int(rate * allowed_seconds))
            db.execute(
                """INSERT INTO receipts (trainer_id, host_id, session, reported, report_time, credited, credited_at,
                                         refused) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (trainer_id, host_id) DO UPDATE SET session = excluded.session,
                       reported = excluded.reported, report_time = excluded.report_time,
                       credited = MIN(credited + excluded.credited, ?), credited_at = excluded.credited_at,
                       refused = MIN(refused + excluded.refused, ?)""",
                (trainer_id, host_id, session, value, clamped_time, credited, now, growth - credited,
                 MAX_COUNTER, MAX_COUNTER),
            )
            self._touch_contribution(db, host_id, Observation(host_id), now, seen=False)
            # incremental: work_receipted is the sum over non-banned trainers (recomputed on revoke/unban)
            db.execute(
                "UPDATE contributions SET work_receipted = MIN(work_receipted + ?, ?), "
                "expert_work = MIN(work_claimed, work_receipted + ?, ?) WHERE peer_id = ? AND banned = 0",
                (credited, MAX_COUNTER, credited, MAX_COUNTER, host_id),
            )
            results[host_id] = CreditResult(credited=credited, refused=growth - credited, restarted=restarted)
        return results

    # ---------------------------------------------------------------------------------------------- verification hooks
    def record_check(self, peer_id: str, passed: bool, now: Optional[float] = None) -> int:
        """Count one spot-check of ``peer_id``'s work (called by the verification subsystem).

        Passed: every sample of the peer pending now becomes verified. Failed: every pending sample is revoked and
        the clean streak restarts (a ban, :meth:`revoke`, is the verification subsystem's separate decision).
        Returns the number of samples verified (passed) or revoked (failed)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            self._touch_contribution(db, peer_id, Observation(peer_id), now, seen=False)
            row = db.execute("SELECT banned, pending_samples FROM contributions WHERE peer_id = ?", (peer_id,)).fetchone()
            pending = 0 if row["banned"] else int(row["pending_samples"])
            if passed:
                db.execute(
                    "UPDATE contributions SET checks_passed = checks_passed + 1, clean_streak = clean_streak + 1, "
                    "verified_samples = MIN(verified_samples + ?, samples), pending_samples = 0 WHERE peer_id = ?",
                    (pending, peer_id),
                )
            else:
                db.execute(
                    "UPDATE contributions SET checks_failed = checks_failed + 1, clean_streak = 0, "
                    "samples = MAX(samples - ?, 0), revoked_samples = MIN(revoked_samples + ?, ?), pending_samples = 0 "
                    "WHERE peer_id = ?",
                    (pending, pending, MAX_COUNTER, peer_id),
                )
            db.execute("DELETE FROM pending WHERE peer_id = ?", (peer_id,))
        if not passed and pending:
            logger.warning(f"Revoked {pending} pending samples of {peer_id}: a spot-check failed")
        return pending

    def mark_verified(self, peer_id: str, up_to_samples: int) -> int:
        """Mark ``peer_id``'s counted samples as verified up to ``up_to_samples`` (never above what it was credited,
        never backwards), taking them out of the pending batches oldest first. Returns the verified total; 0 for
        unknown or banned peers."""
        up_to = clamp_counter(up_to_samples)
        with self._transaction() as db:
            row = db.execute("SELECT verified_samples, samples FROM contributions WHERE peer_id = ? AND banned = 0",
                             (peer_id,)).fetchone()
            if row is None:
                return 0
            move = max(0, min(up_to, row["samples"]) - row["verified_samples"])
            if move:
                db.execute("UPDATE contributions SET verified_samples = verified_samples + ?, "
                           "pending_samples = MAX(pending_samples - ?, 0) WHERE peer_id = ?", (move, move, peer_id))
                left = move
                for batch in db.execute("SELECT id, amount FROM pending WHERE peer_id = ? ORDER BY credited_at, id",
                                        (peer_id,)).fetchall():
                    if left <= 0:
                        break
                    taken = min(left, batch["amount"])
                    left -= taken
                    if taken == batch["amount"]:
                        db.execute("DELETE FROM pending WHERE id = ?", (batch["id"],))
                    else:
                        db.execute("UPDATE pending SET amount = amount - ? WHERE id = ?", (taken, batch["id"]))
            return int(row["verified_samples"]) + move

    def revoke(self, peer_id: str, reason: str, now: Optional[float] = None) -> None:
        """Take all of ``peer_id``'s credit away and ban it with ``reason``; later reports earn nothing, and the
        receipts it signed for hosts stop counting for them."""
        now = time.time() if now is None else now
        reason = _text(reason, 256) or "revoked"
        with self._transaction() as db:
            self._touch_contribution(db, peer_id, Observation(peer_id), now, seen=False)
            db.execute(
                "UPDATE contributions SET revoked_samples = MIN(revoked_samples + samples, ?), samples = 0, "
                "verified_samples = 0, pending_samples = 0, expert_work = 0, work_receipted = 0, clean_streak = 0, "
                "banned = 1, banned_reason = ? WHERE peer_id = ?",
                (MAX_COUNTER, reason, peer_id),
            )
            db.execute("DELETE FROM pending WHERE peer_id = ?", (peer_id,))
            db.execute(
                "INSERT INTO bans (peer_id, reason, banned_at) VALUES (?, ?, ?) "
                "ON CONFLICT (peer_id) DO UPDATE SET reason = excluded.reason, banned_at = excluded.banned_at",
                (peer_id, reason, now),
            )
            for (host_id,) in db.execute("SELECT DISTINCT host_id FROM receipts WHERE trainer_id = ?", (peer_id,)).fetchall():
                self._update_expert_work(db, host_id)
        logger.warning(f"Revoked the credit of {peer_id} and banned it: {reason}")

    ban = revoke

    def unban(self, peer_id: str) -> None:
        """Lift a ban; revoked credit stays revoked, new reports earn again (its receipts count again for hosts)."""
        with self._transaction() as db:
            db.execute("DELETE FROM bans WHERE peer_id = ?", (peer_id,))
            db.execute("UPDATE contributions SET banned = 0, banned_reason = '' WHERE peer_id = ?", (peer_id,))
            for (host_id,) in db.execute("SELECT DISTINCT host_id FROM receipts WHERE trainer_id = ?", (peer_id,)).fetchall():
                self._update_expert_work(db, host_id)

    # ---------------------------------------------------------------------------------------------- expert map
    def save_expert_map(self, experts: dict[str, list[str]], now: Optional[float] = None) -> bool:
        """Record the expert uid -> serving peer IDs map; a snapshot row is added only when it changed.

        Returns True if a new snapshot was written."""
        now = time.time() if now is None else now
        encoded = json.dumps({uid: sorted(peers) for uid, peers in sorted(experts.items())}, separators=(",", ":"))
        with self._transaction() as db:
            if self._last_expert_map is None:
                row = db.execute("SELECT experts FROM expert_snapshots ORDER BY id DESC LIMIT 1").fetchone()
                self._last_expert_map = row[0] if row else ""
            if encoded == self._last_expert_map:
                return False
            db.execute("INSERT INTO expert_snapshots (time, experts) VALUES (?, ?)", (now, encoded))
            self._last_expert_map = encoded
        return True

    def expert_map(self) -> tuple[Optional[float], dict[str, list[str]]]:
        """The latest expert map snapshot: (time, uid -> peer IDs); (None, {}) if none yet."""
        rows = self._read("SELECT time, experts FROM expert_snapshots ORDER BY id DESC LIMIT 1")
        if not rows:
            return None, {}
        return rows[0]["time"], json.loads(rows[0]["experts"])

    def expert_map_history(self, since: float = 0.0, limit: int = 100) -> list[dict[str, Any]]:
        """Snapshots at or after ``since``, oldest first, at most ``limit``: each {time, experts}."""
        rows = self._read(
            "SELECT time, experts FROM (SELECT * FROM expert_snapshots WHERE time >= ? ORDER BY id DESC LIMIT ?) "
            "ORDER BY id",
            (since, limit),
        )
        return [dict(time=row["time"], experts=json.loads(row["experts"])) for row in rows]

    # ---------------------------------------------------------------------------------------------- queries
    @staticmethod
    def _status_sql(live_since: float) -> tuple[str, tuple[float]]:
        return (
            "CASE WHEN banned THEN 'banned' WHEN last_seen >= ? THEN 'live' ELSE 'offline' END",
            (live_since,),
        )

    _LEADERBOARD_SELECT = """SELECT peer_id, public_name, team, samples, verified_samples, pending_samples,
               expert_work, work_claimed, uptime, checks_passed, checks_failed, banned_reason, {status} AS status
        FROM contributions {where} ORDER BY banned, samples DESC, expert_work DESC, peer_id"""

    def leaderboard(
        self,
        limit: int = 50,
        offset: int = 0,
        team: Optional[str] = None,
        now: Optional[float] = None,
        live_window: float = 60.0,
    ) -> dict[str, Any]:
        """One page of the leaderboard: ``{total, limit, offset, rows}``, ranked by credited samples, then expert
        work, then peer ID; banned peers last. ``rank`` is 1-based within the (team-filtered) ranking. ``status``
        is live / offline / banned (live = seen within ``live_window`` seconds of ``now``)."""
        now = time.time() if now is None else now
        limit = max(1, min(int(limit), MAX_PAGE))
        offset = max(0, int(offset))
        status_sql, status_params = self._status_sql(now - live_window)
        where, params = ("WHERE team = ?", (team,)) if team is not None else ("", ())
        with self._lock:
            total = self._read(f"SELECT COUNT(*) FROM contributions {where}", params)[0][0]
            rows = self._read(
                self._LEADERBOARD_SELECT.format(status=status_sql, where=where) + " LIMIT ? OFFSET ?",
                (*status_params, *params, limit, offset),
            )
        return dict(
            total=total, limit=limit, offset=offset,
            rows=[self._leaderboard_row(offset + index + 1, row) for index, row in enumerate(rows)],
        )

    def iter_leaderboard(
        self, team: Optional[str] = None, now: Optional[float] = None, live_window: float = 60.0
    ) -> Iterator[dict[str, Any]]:
        """Every leaderboard row in rank order (for the CSV export), from one consistent read."""
        now = time.time() if now is None else now
        status_sql, status_params = self._status_sql(now - live_window)
        where, params = ("WHERE team = ?", (team,)) if team is not None else ("", ())
        rows = self._read(self._LEADERBOARD_SELECT.format(status=status_sql, where=where), (*status_params, *params))
        for index, row in enumerate(rows):
            yield self._leaderboard_row(index + 1, row)

    @staticmethod
    def _leaderboard_row(rank: int, row: sqlite3.Row) -> dict[str, Any]:
        samples, verified = int(row["samples"]), int(row["verified_samples"])
        return dict(
            rank=rank, peer_id=row["peer_id"], public_name=row["public_name"], team=row["team"], samples=samples,
            verified_samples=verified, pending_samples=int(row["pending_samples"]),
            verified=samples > 0 and verified >= samples, expert_work=int(row["expert_work"]),
            work_claimed=int(row["work_claimed"]),
            uptime_seconds=round(float(row["uptime"]), 1), checks_passed=int(row["checks_passed"]),
            checks_failed=int(row["checks_failed"]), status=row["status"], banned_reason=row["banned_reason"],
        )

    def contribution(self, peer_id: str) -> Optional[dict[str, Any]]:
        """Everything the ledger holds on one peer's credit (including the counters' baselines), or None."""
        rows = self._read("SELECT * FROM contributions WHERE peer_id = ?", (peer_id,))
        return dict(rows[0]) if rows else None

    def peers(
        self, now: Optional[float] = None, live_window: float = 60.0, include_offline: bool = False,
        limit: int = MAX_PAGE, offset: int = 0,
    ) -> dict[str, Any]:
        """Peers seen within ``live_window`` (or all, with ``include_offline``), most recently seen first:
        ``{total, rows}``; each row has connectivity 'direct' or 'relayed' and status live / offline / banned."""
        now = time.time() if now is None else now
        live_since = now - live_window
        where, params = ("", ()) if include_offline else ("WHERE p.last_seen >= ?", (live_since,))
        with self._lock:
            total = self._read(f"SELECT COUNT(*) FROM peers p {where}", params)[0][0]
            rows = self._read(
                f"""SELECT p.*, b.reason AS ban_reason FROM peers p LEFT JOIN bans b ON b.peer_id = p.peer_id
                    {where} ORDER BY p.last_seen DESC, p.peer_id LIMIT ? OFFSET ?""",
                (*params, max(1, min(limit, MAX_PAGE)), max(0, offset)),
            )
        return dict(
            total=total,
            rows=[
                dict(
                    peer_id=row["peer_id"], role=row["role"], public_name=row["public_name"], team=row["team"],
                    connectivity="relayed" if row["relayed"] else "direct", experts=json.loads(row["experts"]),
                    device=row["device"], precision=row["precision"], started_at=row["started_at"],
                    first_seen=row["first_seen"], last_seen=row["last_seen"],
                    status="banned" if row["ban_reason"] is not None
                    else "live" if row["last_seen"] >= live_since else "offline",
                )
                for row in rows
            ],
        )

    def bans(self) -> list[dict[str, Any]]:
        """Every ban, newest first: {peer_id, public_name, reason, banned_at}."""
        rows = self._read(
            "SELECT b.peer_id, b.reason, b.banned_at, COALESCE(c.public_name, '') AS public_name FROM bans b "
            "LEFT JOIN contributions c ON c.peer_id = b.peer_id ORDER BY b.banned_at DESC"
        )
        return [dict(row) for row in rows]

    def metrics_curve(self, since: float = 0.0, bucket: Optional[float] = None, max_points: int = 500) -> dict[str, Any]:
        """The run's loss and throughput curves from ``since`` (coordinator time), in time buckets.

        Per bucket: mean loss over trainers, throughput = sum over trainers of each one's mean samples/s, and the
        number of trainers that reported. ``bucket`` defaults to the span / ``max_points`` (at least 1 s)."""
        with self._lock:
            first, last = self._read("SELECT MIN(received_at), MAX(received_at) FROM metrics WHERE received_at >= ?", (since,))[0]
            if first is None:
                return dict(bucket=bucket or 1.0, points=[])
            if bucket is None:
                bucket = max(1.0, math.ceil((last - first) / max_points))
            rows = self._read(
                """SELECT t, AVG(loss) AS loss, SUM(sps) AS sps, COUNT(*) AS trainers, MAX(step) AS step FROM (
                       SELECT CAST(received_at / ? AS INTEGER) * ? AS t, peer_id, AVG(loss) AS loss,
                              AVG(samples_per_second) AS sps, MAX(step) AS step
                       FROM metrics WHERE received_at >= ? GROUP BY t, peer_id
                   ) GROUP BY t ORDER BY t""",
                (bucket, bucket, since),
            )
        return dict(
            bucket=bucket,
            points=[
                dict(time=row["t"], loss=row["loss"], samples_per_second=row["sps"], trainers=row["trainers"],
                     step=row["step"])
                for row in rows[-max_points * 2 :]
            ],
        )

    def metrics_samples(self, peer_id: str, since: float = 0.0, limit: int = MAX_PAGE) -> list[dict[str, Any]]:
        """One trainer's raw reports from ``since``, oldest first, the newest ``limit`` of them."""
        rows = self._read(
            """SELECT * FROM (SELECT step, loss, samples, samples_per_second, time, received_at FROM metrics
                              WHERE peer_id = ? AND received_at >= ? ORDER BY received_at DESC LIMIT ?)
               ORDER BY received_at""",
            (peer_id, since, max(1, min(limit, MAX_PAGE * 10))),
        )
        return [dict(row) for row in rows]

    def totals(self, now: Optional[float] = None, live_window: float = 60.0) -> dict[str, Any]:
        """Aggregates for /api/run and /metrics: live peers by role, credit sums, bans, latest loss/throughput."""
        now = time.time() if now is None else now
        live_since = now - live_window
        with self._lock:
            roles = {
                row["role"] or "unknown": row["n"]
                for row in self._read("SELECT role, COUNT(*) AS n FROM peers WHERE last_seen >= ? GROUP BY role", (live_since,))
            }
            credit = self._read(
                "SELECT COUNT(*) AS contributors, COALESCE(SUM(samples), 0) AS samples, "
                "COALESCE(SUM(verified_samples), 0) AS verified, COALESCE(SUM(expert_work), 0) AS work, "
                "COALESCE(SUM(pending_samples), 0) AS pending, COALESCE(SUM(work_claimed), 0) AS claimed, "
                "COALESCE(SUM(lapsed_samples), 0) AS lapsed, COALESCE(SUM(revoked_samples), 0) AS revoked, "
                "COALESCE(SUM(rejected_samples), 0) AS rejected FROM contributions"
            )[0]
            bans = self._read("SELECT COUNT(*) FROM bans")[0][0]
            latest = self._read(
                """SELECT AVG(m.loss) AS loss, SUM(m.samples_per_second) AS sps, COUNT(*) AS trainers, MAX(m.step) AS step
                   FROM metrics m JOIN (SELECT peer_id, MAX(id) AS id FROM metrics WHERE received_at >= ?
                                        GROUP BY peer_id) last ON m.id = last.id""",
                (live_since,),
            )[0]
        return dict(
            live_peers=sum(roles.values()), live_by_role=roles, contributors=credit["contributors"],
            samples=int(credit["samples"]), verified_samples=int(credit["verified"]), expert_work=int(credit["work"]),
            pending_samples=int(credit["pending"]), work_claimed=int(credit["claimed"]),
            lapsed_samples=int(credit["lapsed"]), revoked_samples=int(credit["revoked"]),
            rejected_samples=int(credit["rejected"]), bans=bans, loss=latest["loss"],
            samples_per_second=latest["sps"] or 0.0, live_trainers=latest["trainers"], step=latest["step"],
        )
