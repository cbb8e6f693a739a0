"""``peer invite``: the organizer of an invite-only run issues a signed invitation (see :mod:`athome.dht.auth`)."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from athome.dht import Identity
from athome.dht.auth import InviteError, issue_invite
from athome.lifecycle import die, emit

logger = logging.getLogger(__name__)


def run_invite(args: argparse.Namespace) -> None:
    """Print one token signed by the coordinator's key (the key ``peer coordinator`` uses for the same flags)."""
    key = Path(args.identity_path) if args.identity_path else Path(args.data_dir) / "coordinator.key"
    if not key.exists():
        die(f"no coordinator key at {key}: pass the --identity_path (or --data_dir) you start `peer coordinator` with")
    identity = Identity.load_or_create(key)
    try:
        token = issue_invite(identity, peer_id=args.peer_id, expires_in_hours=args.expires_in)
    except InviteError as error:
        die(str(error))
    holder = f"peer {args.peer_id}" if args.peer_id else "whoever holds it (pass --peer_id ID to bind it to one peer)"
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + args.expires_in * 3600))
    logger.info(f"Invitation for {holder}, valid until {expires} (change with --expires_in H)")
    emit(token)
