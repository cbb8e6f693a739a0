"""The coordinator's dashboard and JSON API (aiohttp), served from its own thread and event loop.

Routes (all GET):

- ``/``: the dashboard, one self-contained HTML page (inline CSS/JS, charts in inline SVG, no CDN: works offline);
- ``/api/run``, ``/api/leaderboard``, ``/api/leaderboard.csv``, ``/api/peers``, ``/api/experts``, ``/api/metrics``,
  ``/api/bans``: JSON (CSV) described by the OpenAPI 3 schema at ``/openapi.json``;
- ``/metrics``: Prometheus text exposition format 0.0.4;
- ``/healthz``: ``{"ok": true}``.

Contract: unknown or malformed query parameters get ``400 {"error": ..., "parameter": ...}``; unknown ``/api``
paths get a JSON 404; a failure inside a handler is logged and answered with a JSON 500, never a dead server.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import math
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from athome.coordinator.store import LEADERBOARD_COLUMNS, MAX_PAGE, Store, StoreClosedError

logger = logging.getLogger(__name__)

_PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{10,128}$")
_UID_RE = re.compile(r"^(?P<prefix>[a-z][a-z0-9_]*)\.(?P<layer>[0-9]+)\.(?P<index>[0-9]+)$")
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass
class DashboardContext:
    """What the web app knows of the run besides the store.

    :param poll_status: returns the poller's health (last poll time, errors...); called per request
    :param live_window: seconds since last seen for a peer to count as live
    """

    run_name: str
    config: dict[str, Any]
    coordinator_id: str = ""
    run_address: str = ""
    started_at: float = field(default_factory=time.time)
    expert_uids: list[str] = field(default_factory=list)
    live_window: float = 60.0
    poll_status: Callable[[], dict[str, Any]] = dict


class BadParameter(ValueError):
    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


# ------------------------------------------------------------------------------------------------ parameters
def _int_param(low: int, high: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise BadParameter(name, f"{name} must be an integer, got {raw[:40]!r}") from None
        if not low <= value <= high:
            raise BadParameter(name, f"{name} must be between {low} and {high}, got {value}")
        return value

    return parse


def _float_param(low: float, high: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise BadParameter(name, f"{name} must be a number, got {raw[:40]!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise BadParameter(name, f"{name} must be a finite number between {low:g} and {high:g}, got {raw[:40]!r}")
        return value

    return parse


def _bool_param(name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no", ""):
        return False
    raise BadParameter(name, f"{name} must be true or false, got {raw[:40]!r}")


def _text_param(max_length: int) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if len(raw) > max_length:
            raise BadParameter(name, f"{name} must be at most {max_length} characters")
        return raw

    return parse


def _peer_param(name: str, raw: str) -> str:
    if not _PEER_ID_RE.match(raw):
        raise BadParameter(name, f"{name} must be a base58 peer ID, got {raw[:60]!r}")
    return raw


_LIMIT = _int_param(1, MAX_PAGE)
_OFFSET = _int_param(0, 10**9)
_SINCE = _float_param(0, 1e11)
_BUCKET = _float_param(1, 86400 * 7)
PARAMETERS: dict[str, dict[str, Callable[[str, str], Any]]] = {
    "/api/run": {},
    "/api/leaderboard": {"limit": _LIMIT, "offset": _OFFSET, "team": _text_param(64)},
    "/api/leaderboard.csv": {"team": _text_param(64)},
    "/api/peers": {"all": _bool_param, "limit": _LIMIT, "offset": _OFFSET},
    "/api/experts": {},
    "/api/metrics": {"since": _SINCE, "bucket": _BUCKET, "peer": _peer_param, "limit": _int_param(1, MAX_PAGE * 10)},
    "/api/bans": {},
    "/metrics": {},
}


def parse_query(request: web.Request, path: str) -> dict[str, Any]:
    """The request's query parameters parsed by ``PARAMETERS[path]``; raises BadParameter on any problem."""
    spec = PARAMETERS[path]
    parsed: dict[str, Any] = {}
    for name in request.query.keys():
        if name not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            raise BadParameter(name, f"unknown parameter {name!r} for {path} (allowed: {allowed})")
        values = request.query.getall(name)
        if len(values) > 1:
            raise BadParameter(name, f"parameter {name!r} given {len(values)} times")
        parsed[name] = spec[name](name, values[0])
    return parsed


# ------------------------------------------------------------------------------------------------ helpers
def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(_clean(data), allow_nan=False, separators=(",", ":")),
        status=status, content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _error(status: int, message: str, parameter: Optional[str] = None) -> web.Response:
    body: dict[str, Any] = {"error": message, "status": status}
    if parameter is not None:
        body["parameter"] = parameter
    return _json(body, status)


def expert_grid(expert_map: dict[str, list[str]], expert_uids: list[str]) -> dict[str, Any]:
    """The expert map as a grid: ``layers`` is a list of rows (one per layer), each a list of
    ``{uid, index, replicas, peers}``; uids outside ``prefix.layer.index`` form are listed under ``other``."""
    everything = {uid: [] for uid in expert_uids}
    for uid, peers in expert_map.items():
        everything[uid] = sorted(peers)
    layers: dict[int, list[dict[str, Any]]] = {}
    other = []
    for uid, peers in everything.items():
        cell = dict(uid=uid, replicas=len(peers), peers=peers)
        match = _UID_RE.match(uid)
        if match is None:
            other.append(cell)
            continue
        cell["index"] = int(match["index"])
        layers.setdefault(int(match["layer"]), []).append(cell)
    rows = [
        dict(layer=layer, experts=sorted(cells, key=lambda cell: cell["index"]))
        for layer, cells in sorted(layers.items())
    ]
    return dict(
        total=len(everything), served=sum(1 for peers in everything.values() if peers),
        replicas=sum(len(peers) for peers in everything.values()), layers=rows, other=other,
    )


_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _csv_safe(value: Any) -> Any:
    """Public names are attacker-chosen: stop spreadsheets from running them as formulas. Booleans as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(_CSV_FORMULA):
        return "'" + value
    return value


def _prom_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _prom_number(value: Any) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def prometheus_text(totals: dict[str, Any], grid: dict[str, Any], context: DashboardContext, poll: dict[str, Any]) -> str:
    """Render the coordinator's gauges and counters in the Prometheus text format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], Any]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{key}="{_prom_label(str(val))}"' for key, val in labels.items())
            lines.append(f"{name}{{{label_text}}} {_prom_number(value)}" if labels else f"{name} {_prom_number(value)}")

    metric("athome_info", "gauge", "The run this coordinator serves.",
           [({"run": context.run_name, "coordinator": context.coordinator_id}, 1)])
    metric("athome_peers_live", "gauge", "Peers seen in the DHT recently, by role.",
           [({"role": role}, count) for role, count in sorted(totals["live_by_role"].items())] or [({"role": "any"}, 0)])
    metric("athome_trainers_reporting", "gauge", "Trainers whose metrics arrived recently.", [({}, totals["live_trainers"])])
    metric("athome_contributors", "gauge", "Peers on the leaderboard.", [({}, totals["contributors"])])
    metric("athome_samples_credited_total", "counter", "Samples credited to trainers (self-reported, rate-capped).",
           [({}, totals["samples"])])
    metric("athome_samples_verified_total", "counter", "Samples whose credit was verified.", [({}, totals["verified_samples"])])
    metric("athome_samples_pending", "gauge", "Counted samples waiting for a spot-check.", [({}, totals["pending_samples"])])
    metric("athome_samples_lapsed_total", "counter", "Samples that lapsed: no check passed within the window.",
           [({}, totals["lapsed_samples"])])
    metric("athome_samples_revoked_total", "counter", "Samples revoked by failed checks and bans.",
           [({}, totals["revoked_samples"])])
    metric("athome_samples_rejected_total", "counter", "Reported samples refused by the rate cap.",
           [({}, totals["rejected_samples"])])
    metric("athome_expert_work_total", "gauge", "Expert calls credited to hosts (claims backed by receipts).",
           [({}, totals["expert_work"])])
    metric("athome_expert_work_claimed_total", "counter", "Expert calls hosts claim.", [({}, totals["work_claimed"])])
    metric("athome_bans", "gauge", "Banned peers.", [({}, totals["bans"])])
    if totals["loss"] is not None:
        metric("athome_loss", "gauge", "Mean of the reporting trainers' latest loss.", [({}, totals["loss"])])
    metric("athome_samples_per_second", "gauge", "Sum of the reporting trainers' latest throughput.",
           [({}, totals["samples_per_second"])])
    metric("athome_experts", "gauge", "Experts in the model's grid.", [({}, grid["total"])])
    metric("athome_experts_served", "gauge", "Experts with at least one live replica.", [({}, grid["served"])])
    cells = [cell for row in grid["layers"] for cell in row["experts"]] + grid["other"]
    metric("athome_expert_replicas", "gauge", "Live replicas of each expert.", [({"uid": c["uid"]}, c["replicas"]) for c in cells])
    metric("athome_polls_total", "counter", "DHT polls by the coordinator.", [({}, poll.get("polls", 0))])
    metric("athome_poll_errors_total", "counter", "DHT polls that failed.", [({}, poll.get("errors", 0))])
    if poll.get("last_poll_at") is not None:
        metric("athome_last_poll_timestamp_seconds", "gauge", "When the last successful poll ended.",
               [({}, poll["last_poll_at"])])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ app
def _dashboard_html() -> str:
    return resources.files("athome.coordinator").joinpath("static", "dashboard.html").read_text(encoding="utf-8")


def create_app(store: Store, context: DashboardContext) -> web.Application:
    """The aiohttp application serving ``store`` for the run described by ``context``."""
    html = _dashboard_html()

    async def run_db(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    @web.middleware
    async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        try:
            response = await handler(request)
        except BadParameter as error:
            return _error(400, str(error), error.parameter)
        except web.HTTPException as error:
            if request.path.startswith("/api/") or request.path in ("/openapi.json", "/metrics"):
                return _error(error.status, error.reason)
            raise
        except StoreClosedError:
            return _error(503, "the coordinator is shutting down")
        except Exception as error:  # a handler bug must not take the dashboard down
            logger.exception(f"{request.method} {request.path_qs} failed")
            return _error(500, f"internal error: {type(error).__name__}")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    async def index(request: web.Request) -> web.Response:
        return web.Response(
            text=html, content_type="text/html", charset="utf-8",
            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store", "X-Frame-Options": "DENY"},
        )

    async def api_run(request: web.Request) -> web.Response:
        parse_query(request, "/api/run")
        now = time.time()
        totals = await run_db(store.totals, now, context.live_window)
        expert_time, expert_map = await run_db(store.expert_map)
        grid = expert_grid(expert_map, context.expert_uids)
        return _json(dict(
            run=context.run_name, coordinator_id=context.coordinator_id, run_address=context.run_address,
            started_at=context.started_at, now=now, live_window=context.live_window, config=context.config,
            totals=totals, experts=dict(total=grid["total"], served=grid["served"], replicas=grid["replicas"],
                                        updated_at=expert_time),
            poll=context.poll_status(),
        ))

    async def api_leaderboard(request: web.Request) -> web.Response:
        query = parse_query(request, "/api/leaderboard")
        page = await run_db(
            store.leaderboard, query.get("limit", 50), query.get("offset", 0), query.get("team"), time.time(),
            context.live_window,
        )
        page["columns"] = list(LEADERBOARD_COLUMNS)
        return _json(page)

    async def api_leaderboard_csv(request: web.Request) -> web.Response:
        query = parse_query(request, "/api/leaderboard.csv")

        def render() -> str:
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\r\n")
            writer.writerow(LEADERBOARD_COLUMNS)
            for row in store.iter_leaderboard(query.get("team"), time.time(), context.live_window):
                writer.writerow([_csv_safe(row[column]) for column in LEADERBOARD_COLUMNS])
            return out.getvalue()

        text = await run_db(render)
        return web.Response(
            text=text, content_type="text/csv", charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{context.run_name}-leaderboard.csv"',
                     "Cache-Control": "no-store"},
        )

    async def api_peers(request: web.Request) -> web.Response:
        query = parse_query(request, "/api/peers")
        result = await run_db(
            store.peers, time.time(), context.live_window, query.get("all", False), query.get("limit", MAX_PAGE),
            query.get("offset", 0),
        )
        return _json(result)

    async def api_experts(request: web.Request) -> web.Response:
        parse_query(request, "/api/experts")
        updated_at, expert_map = await run_db(store.expert_map)
        return _json(dict(updated_at=updated_at, **expert_grid(expert_map, context.expert_uids)))

    async def api_metrics(request: web.Request) -> web.Response:
        query = parse_query(request, "/api/metrics")
        since = query.get("since", 0.0)
        curve = await run_db(store.metrics_curve, since, query.get("bucket"))
        result = dict(since=since, bucket=curve["bucket"], curve=curve["points"])
        if "peer" in query:
            result["peer"] = query["peer"]
            result["samples"] = await run_db(store.metrics_samples, query["peer"], since, query.get("limit", MAX_PAGE))
        return _json(result)

    async def api_bans(request: web.Request) -> web.Response:
        parse_query(request, "/api/bans")
        return _json(dict(bans=await run_db(store.bans)))

    async def prometheus(request: web.Request) -> web.Response:
        parse_query(request, "/metrics")
        totals = await run_db(store.totals, time.time(), context.live_window)
        _, expert_map = await run_db(store.expert_map)
        text = prometheus_text(totals, expert_grid(expert_map, context.expert_uids), context, context.poll_status())
        return web.Response(text=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def openapi(request: web.Request) -> web.Response:
        return _json(openapi_schema(context.run_name))

    async def healthz(request: web.Request) -> web.Response:
        return _json({"ok": True})

    async def api_not_found(request: web.Request) -> web.Response:
        return _error(404, f"no such endpoint {request.path}; see /openapi.json")

    app = web.Application(middlewares=[errors])
    app.add_routes([
        web.get("/", index),
        web.get("/api/run", api_run),
        web.get("/api/leaderboard", api_leaderboard),
        web.get("/api/leaderboard.csv", api_leaderboard_csv),
        web.get("/api/peers", api_peers),
        web.get("/api/experts", api_experts),
        web.get("/api/metrics", api_metrics),
        web.get("/api/bans", api_bans),
        web.get("/metrics", prometheus),
        web.get("/openapi.json", openapi),
        web.get("/healthz", healthz),
        web.get("/api/{tail:.*}", api_not_found),
    ])
    return app


# ------------------------------------------------------------------------------------------------ OpenAPI
def _param(name: str, kind: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": {"type": kind, **schema}}


def openapi_schema(run_name: str = "") -> dict[str, Any]:
    """The OpenAPI 3.0 description of the JSON API (hand-written; tests check it lists every route)."""
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    bad = {"description": "a bad query parameter", "content": {"application/json": {"schema": ref("Error")}}}

    def ok(schema: dict[str, Any], description: str, media: str = "application/json") -> dict[str, Any]:
        return {"200": {"description": description, "content": {media: {"schema": schema}}}, "400": bad}

    limit = _param("limit", "integer", "page size", minimum=1, maximum=MAX_PAGE, default=50)
    offset = _param("offset", "integer", "rows to skip", minimum=0, default=0)
    team = _param("team", "string", "only this team (ranks are within the team)", maxLength=64)
    number = {"type": "number", "nullable": True}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": f"athome coordinator{' for run ' + run_name if run_name else ''}",
            "version": "1",
            "description": "Read-only API of a run's coordinator. Samples are self-reported and rate-capped; they "
                           "count while pending a spot-check (`pending_samples`) or once verified "
                           "(`verified_samples`). Expert work is the host's claim (`work_claimed`) as far as "
                           "trainers' signed receipts back it (`expert_work`).",
        },
        "paths": {
            "/api/run": {"get": {"summary": "the run: config, totals, expert coverage, poller health",
                                 "responses": ok(ref("Run"), "the run")}},
            "/api/leaderboard": {"get": {"summary": "one page of the leaderboard", "parameters": [limit, offset, team],
                                         "responses": ok(ref("LeaderboardPage"), "a page, best first")}},
            "/api/leaderboard.csv": {"get": {"summary": "the whole leaderboard as CSV", "parameters": [team],
                                             "responses": ok({"type": "string"}, "CSV with a header row", "text/csv")}},
            "/api/peers": {"get": {"summary": "live peers (all with all=true)",
                                   "parameters": [_param("all", "boolean", "include offline peers", default=False),
                                                  {**limit, "schema": {**limit["schema"], "default": MAX_PAGE}}, offset],
                                   "responses": ok(ref("Peers"), "peers, most recently seen first")}},
            "/api/experts": {"get": {"summary": "the expert grid with replica counts",
                                     "responses": ok(ref("Experts"), "the latest expert map")}},
            "/api/metrics": {"get": {"summary": "loss and throughput curves (and one trainer's raw reports)",
                                     "parameters": [
                                         _param("since", "number", "unix time to start from", minimum=0),
                                         _param("bucket", "number", "seconds per curve point", minimum=1),
                                         _param("peer", "string", "also return this trainer's raw reports"),
                                         _param("limit", "integer", "at most this many raw reports", minimum=1),
                                     ],
                                     "responses": ok(ref("Metrics"), "the curves")}},
            "/api/bans": {"get": {"summary": "banned peers and why", "responses": ok(ref("Bans"), "bans, newest first")}},
            "/metrics": {"get": {"summary": "Prometheus text format 0.0.4",
                                 "responses": ok({"type": "string"}, "metrics", "text/plain")}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error", "status"], "properties": {
                "error": {"type": "string"}, "status": {"type": "integer"}, "parameter": {"type": "string"}}},
            "LeaderboardRow": {"type": "object", "properties": {
                "rank": {"type": "integer"}, "peer_id": {"type": "string"}, "public_name": {"type": "string"},
                "team": {"type": "string"}, "samples": {"type": "integer"}, "verified_samples": {"type": "integer"},
                "pending_samples": {"type": "integer"}, "verified": {"type": "boolean"},
                "expert_work": {"type": "integer"}, "work_claimed": {"type": "integer"},
                "uptime_seconds": {"type": "number"}, "checks_passed": {"type": "integer"},
                "checks_failed": {"type": "integer"}, "status": {"type": "string", "enum": ["live", "offline", "banned"]},
                "banned_reason": {"type": "string"}}},
            "LeaderboardPage": {"type": "object", "properties": {
                "total": {"type": "integer"}, "limit": {"type": "integer"}, "offset": {"type": "integer"},
                "columns": {"type": "array", "items": {"type": "string"}},
                "rows": {"type": "array", "items": ref("LeaderboardRow")}}},
            "Peer": {"type": "object", "properties": {
                "peer_id": {"type": "string"}, "role": {"type": "string"}, "public_name": {"type": "string"},
                "team": {"type": "string"}, "connectivity": {"type": "string", "enum": ["direct", "relayed"]},
                "experts": {"type": "array", "items": {"type": "string"}}, "device": {"type": "string"},
                "precision": {"type": "string"}, "started_at": number, "first_seen": {"type": "number"},
                "last_seen": {"type": "number"}, "status": {"type": "string"}}},
            "Peers": {"type": "object", "properties": {"total": {"type": "integer"},
                                                        "rows": {"type": "array", "items": ref("Peer")}}},
            "Experts": {"type": "object", "properties": {
                "updated_at": number, "total": {"type": "integer"}, "served": {"type": "integer"},
                "replicas": {"type": "integer"},
                "layers": {"type": "array", "items": {"type": "object", "properties": {
                    "layer": {"type": "integer"}, "experts": {"type": "array", "items": {"type": "object", "properties": {
                        "uid": {"type": "string"}, "index": {"type": "integer"}, "replicas": {"type": "integer"},
                        "peers": {"type": "array", "items": {"type": "string"}}}}}}}},
                "other": {"type": "array", "items": {"type": "object"}}}},
            "Metrics": {"type": "object", "properties": {
                "since": {"type": "number"}, "bucket": {"type": "number"}, "peer": {"type": "string"},
                "curve": {"type": "array", "items": {"type": "object", "properties": {
                    "time": {"type": "number"}, "loss": number, "samples_per_second": number,
                    "trainers": {"type": "integer"}, "step": {"type": "integer"}}}},
                "samples": {"type": "array", "items": {"type": "object"}}}},
            "Bans": {"type": "object", "properties": {"bans": {"type": "array", "items": {"type": "object", "properties": {
                "peer_id": {"type": "string"}, "public_name": {"type": "string"}, "reason": {"type": "string"},
                "banned_at": {"type": "number"}}}}}},
            "Run": {"type": "object", "properties": {
                "run": {"type": "string"}, "coordinator_id": {"type": "string"}, "run_address": {"type": "string"},
                "started_at": {"type": "number"}, "now": {"type": "number"}, "live_window": {"type": "number"},
                "config": {"type": "object"}, "totals": {"type": "object"}, "experts": {"type": "object"},
                "poll": {"type": "object"}}},
        }},
    }


# ------------------------------------------------------------------------------------------------ server thread
class WebServer:
    """Serves an aiohttp app from a daemon thread with its own event loop.

    ``port=0`` picks a free port; :attr:`port` and :attr:`url` show the real one once :meth:`start` returns.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.requested_port = app, host, port
        self.port: Optional[int] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """The dashboard URL to print: wildcard hosts are shown as loopback, IPv6 hosts in brackets."""
        if self.port is None:
            raise RuntimeError("the web server is not started")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def start(self, timeout: float = 10) -> None:
        """Bind (raising OSError if the port is taken) and serve in the background."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
                loop.run_until_complete(runner.setup())
                loop.run_until_complete(web.SockSite(runner, sock).start())
                self._runner = runner
            except BaseException as error:  # reported to start()
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                try:
                    loop.run_until_complete(runner.cleanup())
                except Exception as error:
                    logger.debug(f"web server cleanup failed: {error!r}")
                loop.close()

        self._thread = threading.Thread(target=serve, name="dashboard http", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("the dashboard's web server did not start in time")
        if failure:
            raise failure[0]

    def stop(self, timeout: float = 10) -> None:
        """Stop serving and join the thread; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._thread = None
