"""``peer leaderboard``: the run's leaderboard in the terminal, as the coordinator's dashboard ranks it.

The ledger lives at the coordinator, so this command reads its HTTP API (``/api/leaderboard``). The dashboard URL
comes from ``--dashboard URL``, or else from the run itself: the client joins the run's DHT (like ``peer status``),
verifies the run config against the run address, and reads the coordinator's own signed peer record for a
``dashboard_url`` field (once the schema has it); a loopback or wildcard host in that URL is replaced by the run
address's IP. As a last resort it tries the run address's IP on the default dashboard port 8080.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

from athome.lifecycle import die, emit

logger = logging.getLogger(__name__)

DEFAULT_DASHBOARD_PORT = 8080


class LeaderboardError(RuntimeError):
    """The leaderboard could not be fetched; the message says what to try."""


def normalize_dashboard_url(url: str) -> str:
    """``host:port`` or ``http://host:port[/prefix]`` -> ``http://host:port/prefix/`` (always a trailing slash)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise LeaderboardError(f"dashboard URL {url!r} is not an http(s) URL like http://203.0.113.5:8080/")
    path = parsed.path if parsed.path.endswith("/") else parsed.path + "/"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def fetch_leaderboard(dashboard_url: str, limit: int = 100, offset: int = 0, timeout: float = 10) -> dict[str, Any]:
    """GET ``/api/leaderboard`` from a coordinator's dashboard; raises LeaderboardError with a readable message."""
    base = normalize_dashboard_url(dashboard_url)
    url = urllib.parse.urljoin(base, "api/leaderboard?" + urllib.parse.urlencode(dict(limit=limit, offset=offset)))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            page = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read().decode("utf-8")).get("error", "")
        except Exception:
            detail = ""
        raise LeaderboardError(f"the dashboard at {base} answered HTTP {error.code}{': ' + detail if detail else ''}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise LeaderboardError(f"cannot reach the dashboard at {base}: {reason}") from None
    except ValueError:
        raise LeaderboardError(f"the dashboard at {base} did not answer JSON; is it an athome coordinator?") from None
    if not isinstance(page, dict) or not isinstance(page.get("rows"), list):
        raise LeaderboardError(f"the dashboard at {base} answered an unexpected document")
    return page


def _host_of_maddr(maddr: str) -> Optional[str]:
    parts = maddr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6"):
        return parts[2]
    return None


def _is_local(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost"
    return address.is_loopback or address.is_unspecified


def localize_url(url: str, run_maddr: str) -> str:
    """If ``url`` names a loopback/wildcard host but the run address is elsewhere, use the run address's host."""
    run_host = _host_of_maddr(run_maddr)
    parsed = urllib.parse.urlsplit(url)
    if run_host is None or parsed.hostname is None or not _is_local(parsed.hostname) or _is_local(run_host):
        return url
    host = f"[{run_host}]" if ":" in run_host else run_host
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment))


def discover_dashboard(args: argparse.Namespace) -> list[str]:
    """Candidate dashboard URLs for ``args.run``, best first: the coordinator's published URL, then a guess."""
    from athome.dht import (
        Identity, RunAddress, RunAddressError, RunConfigError, fetch_run_config, get_records, protect_run_keys,
        start_dht,
    )
    from athome.dht.schemas import PeerRecord, run_key
    from athome.netflags import dht_kwargs

    try:
        address = RunAddress.parse(args.run)
    except RunAddressError as error:
        raise LeaderboardError(str(error)) from None
    candidates: list[str] = []
    identity = Identity.load_or_create(Path(tempfile.mkdtemp(prefix="athome-leaderboard-")) / "identity.key")
    args.client_mode = True
    args.initial_peers = [address.maddr, *args.initial_peers]
    try:
        dht = start_dht(identity, **dht_kwargs(args))
    except Exception as error:
        raise LeaderboardError(f"could not reach the run at {address}: {error}") from None
    try:
        config = fetch_run_config(dht, address.coordinator_id, timeout=args.timeout)
        protect_run_keys(dht, identity, config.name)
        peers = get_records(dht, run_key(config.name, "peers"), PeerRecord)
        record = peers.get(address.coordinator_id, (None, 0.0))[0]
        published = getattr(record, "dashboard_url", "") if record is not None else ""
        if published:
            candidates.append(localize_url(published, address.maddr))
    except RunConfigError as error:
        raise LeaderboardError(str(error)) from None
    finally:
        dht.shutdown()
    host = _host_of_maddr(address.maddr)
    if host is not None:
        guess = f"http://{'[' + host + ']' if ':' in host else host}:{DEFAULT_DASHBOARD_PORT}/"
        if guess not in candidates:
            candidates.append(guess)
    return candidates


def run_leaderboard(args: argparse.Namespace) -> None:
    """The ``peer leaderboard`` command: ``--run ADDR`` or ``--dashboard URL``, ``--json``, ``--limit``, ``--offset``."""
    limit, offset = getattr(args, "limit", 100), getattr(args, "offset", 0)
    if not 1 <= limit <= 1000:
        die(f"--limit must be between 1 and 1000, got {limit}")
    if offset < 0:
        die(f"--offset must be 0 or more, got {offset}")
    if getattr(args, "dashboard", None):
        candidates = [args.dashboard]
    elif getattr(args, "run", None):
        try:
            candidates = discover_dashboard(args)
        except LeaderboardError as error:
            die(str(error))
    else:
        die("pass --run ADDR (the run address printed by `peer coordinator`) or --dashboard URL")
    problems = []
    for url in candidates:
        try:
            page = fetch_leaderboard(url, limit=limit, offset=offset, timeout=getattr(args, "http_timeout", 10))
            break
        except LeaderboardError as error:
            problems.append(str(error))
    else:
        die("; ".join(problems) + "\npass the URL that `peer coordinator` printed after 'dashboard:' with --dashboard")
    if args.json:
        emit(json.dumps(page, sort_keys=True))
        return
    print_leaderboard(page, normalize_dashboard_url(url))


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, hours, minutes = seconds // 86400, seconds % 86400 // 3600, seconds % 3600 // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {seconds % 60}s"
    return f"{seconds}s"


def print_leaderboard(page: dict[str, Any], source: str = "") -> None:
    """Print one leaderboard page as a rich table, in the API's rank order."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    shown = len(page["rows"])
    first = page.get("offset", 0) + 1 if shown else 0
    title = f"leaderboard ({first}-{page.get('offset', 0) + shown} of {page.get('total', shown)})"
    table = Table(title=title, caption=f"from {source}; pending samples count until a spot-check settles them" if source else None)
    for column, justify in (
        ("#", "right"), ("name", "left"), ("team", "left"), ("samples", "right"), ("verified", "right"),
        ("pending", "right"), ("expert work", "right"), ("uptime", "right"), ("checks ✓/✗", "right"), ("status", "left"), ("peer", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column not in ("name", "team", "status"))
    colors = {"live": "green", "offline": "dim", "banned": "red"}
    for row in page["rows"]:
        status = row.get("status", "?")
        status_text = f"[{colors.get(status, 'white')}]{escape(status)}[/]"
        if row.get("banned_reason"):
            status_text += f" {escape(row['banned_reason'])}"
        table.add_row(
            str(row["rank"]), escape(row.get("public_name") or "(anonymous)"), escape(row.get("team", "")),
            f"{row.get('samples', 0):,}", f"{row.get('verified_samples', 0):,}",
            f"{row.get('pending_samples', 0):,}", f"{row.get('expert_work', 0):,}",
            _duration(row.get("uptime_seconds", 0)), f"{row.get('checks_passed', 0)}/{row.get('checks_failed', 0)}",
            status_text, escape(row.get("peer_id", "")[-8:]),
        )
    console.print(table)
