"""The coordinator's ledger, dashboard/API and leaderboard command: real SQLite, real HTTP on 127.0.0.1, real DHT."""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from athome.config import RunConfig
from athome.coordinator.leaderboard import fetch_leaderboard, localize_url, normalize_dashboard_url, run_leaderboard
from athome.coordinator.service import CoordinatorService, expert_map_from_servers, observations_from_records
from athome.coordinator.store import MAX_COUNTER, CreditPolicy, Observation, Store, clamp_counter
from athome.coordinator.web import PARAMETERS, DashboardContext, WebServer, create_app, openapi_schema
from athome.dht.schemas import MetricsRecord, PeerRecord, ServerRecord

CONFIG = RunConfig()
T0 = 1_700_000_000.0
POLICY = CreditPolicy(max_samples_per_second=100.0, first_report_seconds=60.0, slack_seconds=0.0, max_gap_seconds=600.0)
PEER = "12D3KooWAnna" + "a" * 31
BOB = "12D3KooWBob" + "b" * 32
EVE = "12D3KooWEve" + "e" * 32


def trainer(peer_id: str, samples: int, at: float, name: str = "", team: str = "", step: int = 1, loss: float = 3.0):
    return Observation(peer_id, role="trainer", public_name=name, team=team, step=step, loss=loss, samples=samples,
                       samples_per_second=10.0, report_time=at)


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "ledger", POLICY, run_name="demo") as opened:
        yield opened


# ------------------------------------------------------------------------------------------------ credit arithmetic
def test_growth_is_credited_and_the_same_record_polled_again_counts_once(store: Store):
    assert store.record_samples(PEER, 500, T0, now=T0).credited == 500
    for _ in range(5):  # the poller sees the same record every few seconds
        assert store.record_samples(PEER, 500, T0, now=T0 + 5).skipped
    assert store.record_samples(PEER, 900, T0 + 10, now=T0 + 10).credited == 400
    assert store.contribution(PEER)["samples"] == 900


def test_replayed_older_report_is_ignored(store: Store):
    store.record_samples(PEER, 100, T0, now=T0)
    store.record_samples(PEER, 300, T0 + 10, now=T0 + 10)
    result = store.record_samples(PEER, 100, T0, now=T0 + 20)  # an old signed record replayed
    assert result.skipped and result.credited == 0
    store.record_samples(PEER, 400, T0 + 30, now=T0 + 30)
    assert store.contribution(PEER)["samples"] == 400


def test_restart_counts_the_new_run_without_double_counting_or_going_negative(store: Store):
    store.record_samples(PEER, 1000, T0, now=T0)
    result = store.record_samples(PEER, 50, T0 + 10, now=T0 + 10)  # the trainer restarted from 0
    assert result.restarted and result.credited == 50
    store.record_samples(PEER, 80, T0 + 20, now=T0 + 20)
    row = store.contribution(PEER)
    assert row["samples"] == 1080 and row["restarts"] == 1


def test_negative_and_junk_counters_never_reduce_credit(store: Store):
    store.record_samples(PEER, 700, T0, now=T0)
    for index, junk in enumerate([-5, -(10**40), float("nan"), float("-inf"), "12", None]):
        store.record_samples(PEER, junk, T0 + 10 * (index + 1), now=T0 + 10 * (index + 1))
        assert store.contribution(PEER)["samples"] == 700
    assert store.record_samples(PEER, 5, T0 + 100, now=T0 + 100, ).credited == 5  # restart baseline was 0
    assert clamp_counter(-3) == 0 and clamp_counter(10**40) == MAX_COUNTER and clamp_counter(float("inf")) == MAX_COUNTER


def test_huge_reports_are_capped_by_the_rate_and_never_overflow(store: Store):
    first = store.record_samples(PEER, 10**30, T0, now=T0)
    assert first.credited == 6000 and first.refused == MAX_COUNTER - 6000  # 100/s x 60 s first-report window
    second = store.record_samples(PEER, 10**30, T0 + 10, now=T0 + 10)  # same clamped value: no growth
    assert second.credited == 0
    row = store.contribution(PEER)
    assert row["samples"] == 6000 and 0 < row["rejected_samples"] <= MAX_COUNTER
    # later growth is judged against the coordinator's clock, whatever time the peer claims
    store.record_samples(BOB, 0, T0, now=T0)
    assert store.record_samples(BOB, 10**6, T0 + 10**6, now=T0 + 30).credited == 3000


def test_future_report_times_are_clamped(store: Store):
    store.record_samples(PEER, 100, T0 + 10**9, now=T0)
    row = store.contribution(PEER)
    assert row["samples_report_time"] == T0 + POLICY.max_clock_skew


def test_banned_peers_lose_credit_and_earn_nothing_more(store: Store):
    store.record_samples(EVE, 1000, T0, now=T0)
    store.revoke(EVE, "failed 3 of 4 spot-checks", now=T0 + 1)
    assert store.record_samples(EVE, 2000, T0 + 10, now=T0 + 10).skipped == "banned"
    row = store.leaderboard(now=T0 + 10)["rows"][0]
    assert (row["samples"], row["status"], row["banned_reason"]) == (0, "banned", "failed 3 of 4 spot-checks")
    assert store.bans()[0]["reason"] == "failed 3 of 4 spot-checks"
    assert store.mark_verified(EVE, 500) == 0
    store.unban(EVE)
    assert store.bans() == [] and store.contribution(EVE)["samples"] == 0


def test_mark_verified_is_bounded_and_monotonic(store: Store):
    store.record_samples(PEER, 1000, T0, now=T0)
    assert store.leaderboard(now=T0)["rows"][0]["verified"] is False
    assert store.mark_verified(PEER, 400) == 400
    assert store.mark_verified(PEER, 100) == 400  # never backwards
    assert store.mark_verified(PEER, 10**30) == 1000  # never above what was credited
    assert store.leaderboard(now=T0)["rows"][0]["verified"] is True
    assert store.mark_verified("12D3KooWNobody" + "n" * 30, 5) == 0


def test_checks_and_uptime(store: Store):
    store.record_check(PEER, True)
    store.record_check(PEER, True)
    store.record_check(PEER, False)
    for offset in (0, 5, 10, 15, 500, 505):  # a 485 s gap is downtime, not uptime
        store.ingest([trainer(PEER, 0, T0 + offset)], now=T0 + offset)
    row = store.leaderboard(now=T0 + 505)["rows"][0]
    assert (row["checks_passed"], row["checks_failed"]) == (2, 1)
    assert row["uptime_seconds"] == 20.0


def test_expert_work_uses_the_same_rules(store: Store):
    assert store.record_expert_work(BOB, 100, T0, now=T0).credited == 100
    assert store.record_expert_work(BOB, 100, T0, now=T0 + 5).skipped
    assert store.record_expert_work(BOB, 40, T0 + 10, now=T0 + 10).restarted
    assert (store.contribution(BOB)["work_claimed"], store.contribution(BOB)["expert_work"]) == (140, 0)  # no receipts


# ------------------------------------------------------------------------------------------------ receipts, pending credit
def test_expert_work_is_the_lesser_of_claim_and_receipts_of_non_banned_trainers(store: Store):
    store.record_expert_work(BOB, 10**6, T0, now=T0)  # the host claims a million calls (rate cap: 50k/s x 60 s)
    assert store.contribution(BOB)["expert_work"] == 0
    store.record_receipts(PEER, 7, T0, {BOB: 300}, now=T0)
    store.record_receipts(EVE, 9, T0, {BOB: 200, PEER: 5}, now=T0)
    assert store.contribution(BOB)["expert_work"] == 500 and store.contribution(PEER)["expert_work"] == 0  # no claim
    assert store.record_receipts(PEER, 7, T0, {BOB: 10**9}, now=T0 + 1)[BOB].skipped  # replay of an old report time
    store.record_receipts(PEER, 7, T0 + 2, {BOB: 250}, now=T0 + 2)  # a counter that falls = restart: +250
    assert store.contribution(BOB)["expert_work"] == 750
    store.record_receipts(PEER, 8, T0 + 3, {BOB: 100}, now=T0 + 3)  # new session: +100
    assert store.contribution(BOB)["expert_work"] == 850
    assert store.record_receipts(BOB, 1, T0 + 3, {BOB: 10**6}, now=T0 + 3)[BOB].skipped == "self-receipt"
    store.record_receipts(EVE, 9, T0 + 4, {BOB: 10**15}, now=T0 + 4)  # a forged-huge receipt is rate-capped
    capped = store.contribution(BOB)["expert_work"]
    assert capped <= store.contribution(BOB)["work_claimed"] and capped < 10**7
    store.revoke(EVE, "failed spot-checks", now=T0 + 5)  # a banned trainer's receipts stop counting
    assert store.contribution(BOB)["expert_work"] == 650
    store.unban(EVE)
    assert store.contribution(BOB)["expert_work"] == capped
    store.record_receipts(PEER, 8, T0 + 6, {BOB: "junk", EVE: -5}, now=T0 + 6)  # junk counters never reduce credit
    assert store.contribution(BOB)["expert_work"] >= capped - 100
    row = next(r for r in store.leaderboard(now=T0)["rows"] if r["peer_id"] == BOB)
    assert row["work_claimed"] == 10**6 and row["expert_work"] == store.contribution(BOB)["expert_work"]


def test_samples_count_while_pending_verify_on_a_passed_check_and_lapse_otherwise(tmp_path: Path):
    policy = CreditPolicy(max_samples_per_second=100.0, slack_seconds=0.0, pending_window=100.0, trusted_after_checks=2)
    with Store(tmp_path / "ledger", policy) as store:
        store.ingest([trainer(PEER, 1000, T0), trainer(BOB, 1000, T0), trainer(EVE, 1000, T0)], now=T0)
        row = store.contribution(PEER)
        assert (row["samples"], row["pending_samples"], row["verified_samples"]) == (1000, 1000, 0)
        assert store.record_check(PEER, True, now=T0 + 10) == 1000  # a passed check verifies what was pending
        assert store.record_check(EVE, False, now=T0 + 10) == 1000  # a failed one revokes it
        store.ingest([trainer(PEER, 1500, T0 + 50), trainer(BOB, 1000, T0 + 50)], now=T0 + 50)
        rows = {r["peer_id"]: r for r in store.leaderboard(now=T0 + 50)["rows"]}
        assert (rows[PEER]["samples"], rows[PEER]["verified_samples"], rows[PEER]["pending_samples"]) == (1500, 1000, 500)
        assert (rows[BOB]["samples"], rows[BOB]["pending_samples"]) == (1000, 1000)  # within the window: counts
        assert (rows[EVE]["samples"], rows[EVE]["checks_failed"]) == (0, 1)
        store.ingest([], now=T0 + 120)  # BOB's batch is past the window, no check passed: it lapses
        assert (store.contribution(BOB)["samples"], store.contribution(BOB)["lapsed_samples"]) == (0, 1000)
        assert store.contribution(PEER)["samples"] == 1500  # PEER's batch of T0+50 is still in its window
        store.ingest([], now=T0 + 160)  # ...and lapses too: one passed check is not trust yet
        assert (store.contribution(PEER)["samples"], store.contribution(PEER)["verified_samples"]) == (1000, 1000)
        store.record_check(PEER, True, now=T0 + 170)  # streak 2 = trusted: later batches verify at the window's end
        store.ingest([trainer(PEER, 2000, T0 + 180)], now=T0 + 180)
        store.ingest([], now=T0 + 300)
        row = store.contribution(PEER)
        assert (row["samples"], row["verified_samples"], row["pending_samples"]) == (1500, 1500, 0)
        store.record_check(PEER, False, now=T0 + 301)  # trust is lost on a failure
        store.ingest([trainer(PEER, 2100, T0 + 310)], now=T0 + 310)
        store.ingest([], now=T0 + 420)
        assert store.contribution(PEER)["samples"] == 1500
        totals = store.totals(now=T0 + 420)
        assert totals["lapsed_samples"] == 1600 and totals["revoked_samples"] == 1000 and totals["pending_samples"] == 0


def test_adversarial_reports_never_push_pending_or_verified_above_what_was_credited(tmp_path: Path):
    import random

    rng = random.Random(7)
    policy = CreditPolicy(max_samples_per_second=100.0, slack_seconds=0.0, pending_window=30.0, trusted_after_checks=3)
    with Store(tmp_path / "ledger", policy) as store:
        now = T0
        for _ in range(300):
            now += rng.choice([0.0, 1.0, 5.0, 40.0])
            value = rng.choice([0, -1, 10, 10**6, 2**80, float("nan"), "x", rng.randrange(5000)])
            action = rng.random()
            if action < 0.6:
                store.ingest([trainer(PEER, value, now - rng.choice([0, 0, 100]))], now=now)
            elif action < 0.8:
                store.record_check(PEER, rng.random() < 0.7, now=now)
            elif action < 0.9:
                store.mark_verified(PEER, value if isinstance(value, int) else 0)
            else:
                store.settle(now)
            row = store.contribution(PEER)
            assert 0 <= row["verified_samples"] <= row["samples"] <= MAX_COUNTER
            assert row["samples"] == row["verified_samples"] + row["pending_samples"]
            pending_rows = store._read("SELECT COALESCE(SUM(amount), 0) FROM pending WHERE peer_id = ?", (PEER,))
            assert pending_rows[0][0] == row["pending_samples"]


def test_a_schema_1_ledger_is_migrated(tmp_path: Path):
    import sqlite3

    with Store(tmp_path / "ledger", POLICY) as store:
        store.record_samples(PEER, 100, T0, now=T0)
    db = sqlite3.connect(tmp_path / "ledger" / "coordinator.sqlite3")
    for column in ("pending_samples", "lapsed_samples", "revoked_samples", "clean_streak", "work_claimed", "work_receipted"):
        db.execute(f"ALTER TABLE contributions DROP COLUMN {column}")
    db.execute("UPDATE contributions SET expert_work = 77")
    db.execute("DELETE FROM pending")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with Store(tmp_path / "ledger", POLICY) as store:
        row = store.contribution(PEER)
        assert (row["samples"], row["pending_samples"], row["work_claimed"], row["expert_work"]) == (100, 100, 77, 0)


# ------------------------------------------------------------------------------------------------ store queries
def test_leaderboard_ranks_pages_and_filters_by_team(store: Store):
    for index in range(7):
        peer = f"12D3KooWPeer{index}" + "x" * 30
        store.ingest([trainer(peer, 100 * index, T0, name=f"p{index}", team="red" if index % 2 else "blue")], now=T0)
    page = store.leaderboard(limit=3, offset=2, now=T0)
    assert page["total"] == 7 and [row["rank"] for row in page["rows"]] == [3, 4, 5]
    assert [row["public_name"] for row in page["rows"]] == ["p4", "p3", "p2"]
    red = store.leaderboard(team="red", now=T0)
    assert [row["public_name"] for row in red["rows"]] == ["p5", "p3", "p1"] and red["rows"][0]["rank"] == 1
    assert store.leaderboard(now=T0 + 3600)["rows"][0]["status"] == "offline"
    assert [row["public_name"] for row in store.iter_leaderboard(now=T0)] == [f"p{i}" for i in range(6, -1, -1)]


def test_coordinators_and_clients_are_not_contributors(store: Store):
    store.ingest([Observation(PEER, role="coordinator"), Observation(BOB, role="client")], now=T0)
    assert store.leaderboard(now=T0)["total"] == 0
    assert store.peers(now=T0)["total"] == 2


def test_metrics_curve_averages_loss_and_sums_throughput(store: Store):
    for second in range(0, 20, 5):
        store.ingest([trainer(PEER, second * 10, T0 + second, loss=4.0),
                      trainer(BOB, second * 10, T0 + second, loss=2.0)], now=T0 + second)
    curve = store.metrics_curve(bucket=10)
    assert [point["time"] for point in curve["points"]] == [T0, T0 + 10]
    assert all(point["loss"] == 3.0 and point["samples_per_second"] == 20.0 and point["trainers"] == 2
               for point in curve["points"])
    assert len(store.metrics_samples(PEER)) == 4


def test_restart_of_the_coordinator_keeps_everything(tmp_path: Path):
    ledger = tmp_path / "ledger"
    with Store(ledger, POLICY) as store:
        store.ingest([trainer(PEER, 500, T0, name="alice", team="red"), trainer(BOB, 900, T0, name="bob")], now=T0)
        store.record_check(PEER, True, now=T0)
        store.revoke(EVE, "forged receipts", now=T0)
        store.save_expert_map({"ffn.0.0": [PEER]}, now=T0)
        before = store.leaderboard(now=T0)
    with Store(ledger, POLICY) as store:
        assert store.leaderboard(now=T0) == before
        assert store.bans()[0]["reason"] == "forged receipts"
        assert store.expert_map() == (T0, {"ffn.0.0": [PEER]})
        assert store.save_expert_map({"ffn.0.0": [PEER]}, now=T0 + 1) is False  # unchanged: no new snapshot
        # the counters' baselines survived: the same record seen again after the restart is not credited twice
        store.ingest([trainer(PEER, 500, T0, name="alice")], now=T0 + 5)
        assert store.contribution(PEER)["samples"] == 500
        assert len(store.metrics_samples(PEER)) == 1


def test_reopening_a_ledger_of_another_run_warns(tmp_path: Path, caplog):
    Store(tmp_path, run_name="demo").close()
    with caplog.at_level("WARNING"):
        Store(tmp_path, run_name="other").close()
    assert "holds the ledger of run 'demo'" in caplog.text


# ------------------------------------------------------------------------------------------------ HTTP API
@pytest.fixture
def server(store: Store):
    now = time.time()
    store.ingest([
        trainer(PEER, 5000, now, name="alice", team="red", loss=2.5),
        trainer(BOB, 3000, now, name="=HYPERLINK(\"x\")", team="blue", loss=3.5),
        Observation("12D3KooWHost" + "h" * 31, role="expert_host", public_name="<script>alert(1)</script>",
                    relayed=True, experts=("ffn.0.0", "ffn.0.1")),
    ], now=now)
    store.revoke(EVE, "failed spot-checks", now=now)
    store.save_expert_map({"ffn.0.0": ["h1", "h2"], "ffn.0.1": ["h1"]}, now=now)
    context = DashboardContext(
        run_name="demo", config=CONFIG.to_dict(), coordinator_id="12D3KooWCoord", expert_uids=CONFIG.model.expert_uids(),
        poll_status=lambda: dict(polls=3, errors=1, last_poll_at=time.time(), period=5.0, last_error=None),
    )
    web_server = WebServer(create_app(store, context), "127.0.0.1", 0)
    web_server.start()
    yield web_server
    web_server.stop()


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_url_shows_the_real_port(server: WebServer):
    assert server.port and server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"


def test_json_endpoints(server: WebServer):
    status, _, body = get(server.url + "api/run")
    run = json.loads(body)
    assert status == 200 and run["run"] == "demo" and run["totals"]["contributors"] == 4 and run["experts"]["served"] == 2
    assert run["totals"]["loss"] == 3.0 and run["poll"]["errors"] == 1

    board = json.loads(get(server.url + "api/leaderboard?limit=2")[2])
    assert board["total"] == 4 and [row["public_name"] for row in board["rows"]] == ["alice", '=HYPERLINK("x")']
    assert board["rows"][0]["verified"] is False and board["rows"][0]["status"] == "live"
    assert [row["rank"] for row in json.loads(get(server.url + "api/leaderboard?offset=1&limit=1")[2])["rows"]] == [2]
    assert json.loads(get(server.url + "api/leaderboard?team=blue")[2])["total"] == 1

    peers = json.loads(get(server.url + "api/peers")[2])
    assert peers["total"] == 3 and {p["connectivity"] for p in peers["rows"]} == {"direct", "relayed"}
    assert json.loads(get(server.url + "api/peers?all=true")[2])["total"] == 3

    experts = json.loads(get(server.url + "api/experts")[2])
    assert experts["total"] == 8 and experts["served"] == 2 and experts["replicas"] == 3
    assert [cell["replicas"] for cell in experts["layers"][0]["experts"]] == [2, 1, 0, 0]

    metrics = json.loads(get(server.url + f"api/metrics?peer={PEER}&bucket=60")[2])
    assert metrics["curve"][0]["trainers"] == 2 and metrics["samples"][0]["samples"] == 5000

    bans = json.loads(get(server.url + "api/bans")[2])["bans"]
    assert bans[0]["peer_id"] == EVE and bans[0]["reason"] == "failed spot-checks"


@pytest.mark.parametrize("query", [
    "api/leaderboard?limit=0", "api/leaderboard?limit=abc", "api/leaderboard?limit=100000", "api/leaderboard?offset=-1",
    "api/leaderboard?sort=name", "api/leaderboard?limit=1&limit=2", "api/leaderboard?team=" + "x" * 65,
    "api/metrics?since=nan", "api/metrics?since=-1", "api/metrics?bucket=0", "api/metrics?peer=not%20a%20peer",
    "api/peers?all=maybe", "api/run?x=1", "metrics?x=1",
])
def test_bad_parameters_get_400_with_a_clear_json_error(server: WebServer, query: str):
    status, headers, body = get(server.url + query)
    error = json.loads(body)
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert error["status"] == 400 and error["parameter"] and error["parameter"] in error["error"]


def test_unknown_api_path_is_a_json_404(server: WebServer):
    status, _, body = get(server.url + "api/nope")
    assert status == 404 and "openapi" in json.loads(body)["error"]


def test_csv_export_matches_the_leaderboard_and_defuses_formulas(server: WebServer):
    status, headers, body = get(server.url + "api/leaderboard.csv")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    board = json.loads(get(server.url + "api/leaderboard?limit=1000")[2])["rows"]
    assert [row["peer_id"] for row in rows] == [row["peer_id"] for row in board]
    assert rows[1]["public_name"] == "'=HYPERLINK(\"x\")" and rows[0]["verified"] == "false"
    assert rows[-1]["banned_reason"] == "failed spot-checks"


def test_prometheus_text_format(server: WebServer):
    status, headers, body = get(server.url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    typed = set()
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? (\S+)$')
    values = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter")
            typed.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            match = sample.match(line)
            assert match, line
            assert match.group(1) in typed, f"{match.group(1)} has no TYPE line"
            value = float(match.group(5))
            assert not math.isnan(value)
            values[line.rsplit(" ", 1)[0]] = value
    assert values["athome_samples_credited_total"] == 8000
    assert values['athome_expert_replicas{uid="ffn.0.0"}'] == 2
    assert values['athome_peers_live{role="trainer"}'] == 2 and values["athome_bans"] == 1
    assert text.endswith("\n")


def test_openapi_describes_every_route(server: WebServer):
    schema = json.loads(get(server.url + "openapi.json")[2])
    assert schema["openapi"].startswith("3.")
    for path, params in PARAMETERS.items():
        operation = schema["paths"][path]["get"]
        assert {param["name"] for param in operation.get("parameters", [])} == set(params), path
        assert "200" in operation["responses"] and "400" in operation["responses"]
    refs = re.findall(r'"#/components/schemas/(\w+)"', json.dumps(schema))
    assert refs and all(ref in schema["components"]["schemas"] for ref in refs)
    assert openapi_schema()["info"]["title"] == "athome coordinator"


def test_dashboard_page_is_self_contained(server: WebServer):
    status, headers, body = get(server.url)
    html = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html), "the dashboard must not load remote assets"
    assert "<script" in html and "api/leaderboard" in html and "textContent" in html and "innerHTML" not in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_chromium(url: str, tmp_path: Path) -> tuple[str, str, Path]:
    """Load ``url`` in headless Chromium: (whole DOM after the scripts ran, the leaderboard table, a screenshot)."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1100",
             "--virtual-time-budget=4000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    assert 'data-loaded="true"' in dom
    table = dom[dom.index('<table id="leaderboard">'):]
    screenshot = tmp_path / "dashboard.png"
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=60)
    assert screenshot.stat().st_size > 10_000
    return dom, table[: table.index("</table>")], screenshot


@pytest.mark.skipif(CHROMIUM is None, reason="headless chromium is not installed (apt-get install chromium)")
def test_headless_chromium_renders_the_leaderboard(server: WebServer, tmp_path: Path):
    dom, body, _ = render_in_chromium(server.url, tmp_path)
    names = re.findall(r'<td class="name">([^<]*)</td>', body)
    assert names[:2] == ["alice", '=HYPERLINK("x")'] and "failed spot-checks" in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script>alert(1)" not in dom  # names are text, not HTML


# ------------------------------------------------------------------------------------------------ service & CLI
class _BrokenDHT:
    """A DHT whose every read fails, as during a network outage."""

    @property
    def peer_id(self):
        raise RuntimeError("no daemon")

    def get(self, *args, **kwargs):
        raise ConnectionError("p2pd is gone")


def test_poll_failures_do_not_kill_the_service(tmp_path: Path):
    service = CoordinatorService(_BrokenDHT(), CONFIG, tmp_path, http_port=0, poll_period=0.05)
    service.start()
    try:
        deadline = time.monotonic() + 10
        while service.poll_status()["errors"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.poll_status()["errors"] >= 3 and "p2pd is gone" in service.poll_status()["last_error"]
        assert service._poller.is_alive()
        run = json.loads(get(service.url + "api/run")[2])
        assert run["poll"]["errors"] >= 3 and run["poll"]["last_poll_at"] is None
    finally:
        service.stop()
    service.stop()  # idempotent


def test_busy_port_falls_back_to_a_free_one(tmp_path: Path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    service = CoordinatorService(_BrokenDHT(), CONFIG, tmp_path, http_port=busy, poll_period=60)
    try:
        service.start()
        assert f":{busy}/" not in service.url and get(service.url + "healthz")[0] == 200
    finally:
        service.stop()
        blocker.close()


def test_observations_merge_the_three_record_kinds():
    now = time.time()
    servers = {BOB: (ServerRecord(experts=["ffn.0.1", "ffn.0.0"], public_name="bobhost", relayed=True), now)}
    metrics = {PEER: (MetricsRecord(step=3, loss=2.0, samples=48, samples_per_second=9.0, time=now, public_name="al"), now)}
    peers = {PEER: (PeerRecord(role="trainer", public_name="alice", team="red", started_at=now), now)}
    by_id = {obs.peer_id: obs for obs in observations_from_records(servers, metrics, peers)}
    assert (by_id[PEER].public_name, by_id[PEER].team, by_id[PEER].samples, by_id[PEER].report_time) == ("alice", "red", 48, now)
    assert (by_id[BOB].role, by_id[BOB].relayed, by_id[BOB].experts) == ("expert_host", True, ("ffn.0.1", "ffn.0.0"))
    experts = expert_map_from_servers(servers, CONFIG.model.expert_uids())
    assert experts["ffn.0.0"] == [BOB] and experts["ffn.1.3"] == [] and len(experts) == 8


def test_live_swarm_records_reach_the_dashboard_in_chromium_and_the_leaderboard_cli(tmp_path: Path, capsys):
    """Real DHT peers publish signed records (a trainer: presence, metrics, receipts; a host: its declaration with
    its work claim); the service polls them; headless Chromium renders the dashboard; ``peer leaderboard`` prints
    the same ranks."""
    from athome.dht import Identity, start_dht, store_record
    from athome.dht.receipts import ReceiptBook
    from athome.dht.schemas import run_key

    coordinator = start_dht(Identity.load_or_create(tmp_path / "coordinator.key"),
                            host_maddrs=["/ip4/127.0.0.1/tcp/0"], run_name="demo")
    volunteer = None
    service = CoordinatorService(coordinator, CONFIG, tmp_path / "data", http_port=0, poll_period=0.3)
    try:
        volunteer = start_dht(Identity.load_or_create(tmp_path / "volunteer.key"), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                              run_name="demo", initial_peers=[str(m) for m in coordinator.get_visible_maddrs()])
        service.start()
        now = time.time()
        assert store_record(volunteer, run_key("demo", "peers"),
                            PeerRecord(role="trainer", public_name="vol", team="blue", started_at=now), 30)
        assert store_record(volunteer, run_key("demo", "metrics"),
                            MetricsRecord(step=2, loss=4.0, samples=32, samples_per_second=8.0, time=now), 30)
        host_record = ServerRecord(experts=["ffn.0.0"], public_name="host", expert_calls=500, reported_at=now)
        assert store_record(coordinator, run_key("demo", "servers"), host_record, 30)  # the host claims 500 calls
        host_id = coordinator.peer_id.to_base58()
        receipts = ReceiptBook()
        for _ in range(150):  # the trainer signs for 300 of them
            receipts.count(host_id, True, rows=8)
            receipts.count(host_id, False, rows=8)
        assert receipts.publish(volunteer, "demo", ttl=30)
        volunteer_id = volunteer.peer_id.to_base58()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            board = json.loads(get(service.url + "api/leaderboard")[2])
            experts = json.loads(get(service.url + "api/experts")[2])
            rows = {row["peer_id"]: row for row in board["rows"]}
            if (rows.get(volunteer_id, {}).get("samples") == 32 and rows.get(host_id, {}).get("expert_work") == 300
                    and experts["served"]):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the service did not pick up the records: {board} {experts}")
        assert board["rows"][0]["public_name"] == "vol" and board["rows"][0]["team"] == "blue"
        assert (rows[volunteer_id]["pending_samples"], rows[volunteer_id]["verified_samples"]) == (32, 0)
        assert (rows[host_id]["public_name"], rows[host_id]["work_claimed"]) == ("host", 500)
        assert experts["layers"][0]["experts"][0]["peers"] == [host_id]

        if CHROMIUM is not None:
            dom, table, screenshot = render_in_chromium(service.url, tmp_path)
            cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)]
            by_name = {re.sub(r"<[^>]+>", "", row[1]): [re.sub(r"<[^>]+>", "", c) for c in row] for row in cells if len(row) > 5}
            assert by_name["vol"][:6] == ["1", "vol", "blue", "32", "0", "32"]  # rank, name, team, samples, verified, pending
            assert by_name["host"][6].startswith("300") and "of 500 claimed" in by_name["host"][6]
            logging.getLogger(__name__).info(f"dashboard screenshot of the live swarm: {screenshot}")

        args = argparse.Namespace(run=None, dashboard=service.url, json=True, limit=10, offset=0)
        run_leaderboard(args)
        printed = json.loads(capsys.readouterr().out)
        assert [row["peer_id"] for row in printed["rows"]] == [row["peer_id"] for row in board["rows"]]
        args.json = False
        run_leaderboard(args)
        table = capsys.readouterr().out
        assert "vol" in table and "32" in table and "blue" in table
    finally:
        service.stop()
        if volunteer is not None:
            volunteer.shutdown()
        coordinator.shutdown()
    with Store(tmp_path / "data") as reopened:  # what the service wrote survives it
        assert reopened.contribution(volunteer_id)["samples"] == 32


def test_leaderboard_cli_reports_unreachable_dashboards(capsys):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(SystemExit):
        run_leaderboard(argparse.Namespace(run=None, dashboard=f"127.0.0.1:{port}", json=False, limit=10, offset=0))
    assert "cannot reach the dashboard" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_leaderboard(argparse.Namespace(run=None, dashboard=None, json=False, limit=10, offset=0))


def test_dashboard_url_helpers():
    assert normalize_dashboard_url("10.0.0.5:8080") == "http://10.0.0.5:8080/"
    assert normalize_dashboard_url("http://h:1/run") == "http://h:1/run/"
    assert localize_url("http://127.0.0.1:8080/", "/ip4/203.0.113.5/tcp/31337/p2p/X") == "http://203.0.113.5:8080/"
    assert localize_url("http://0.0.0.0:8080/", "/ip4/127.0.0.1/tcp/1/p2p/X") == "http://0.0.0.0:8080/"
    assert localize_url("http://dash.example:80/", "/ip4/203.0.113.5/tcp/1/p2p/X") == "http://dash.example:80/"
    with pytest.raises(Exception):
        fetch_leaderboard("ftp://x/")
