"""Joining a run's DHT, and reading and writing athome's signed records on it.

One :class:`~athome.dht.process.RobustDHT` (a ``hivemind.DHT``) per peer, started with the peer's Ed25519 identity
and athome's record validator.
Records are read back as parsed pydantic models, keyed by the writer's peer ID.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

import hivemind
from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.utils import get_dht_time
from pydantic import ValidationError

from athome.config import RunConfig
from athome.dht.identity import Identity, IdentityError, public_key_from_peer_id, verify
from athome.dht.process import RobustDHT
from athome.dht.records import AthomeRecordValidator, owner_subkey, subkey_owner
from athome.dht.schemas import CONFIG_KEY, Record, RunConfigRecord, run_record_keys

logger = logging.getLogger(__name__)
RecordT = TypeVar("RecordT", bound=Record)

# A peer behind NAT reserves a slot with its trusted relays at once: private reachability, and p2pd's
# -relayDiscovery=0 (static relays only). Without the latter, autorelay waits for 4 relay candidates or 3 minutes.
# hivemind 1.1.12's P2P.create has no argument for it; its reachability table is where extra daemon flags go.
BEHIND_RELAYS = "athome-behind-relays"
P2P.FORCE_REACHABILITY_MAPPING.setdefault(BEHIND_RELAYS, {"forceReachabilityPrivate": 1, "relayDiscovery": 0})
# A relay (the coordinator) is public and sets circuit relay v2's per-connection limits high: a relayed connection
# past its limit is reset, and MB-sized expert requests cross it. The coordinator relays for its own run only; its
# bandwidth is the run's to use. p2pd also starts a second relay with go-libp2p's defaults (128 KiB, 2 min) that
# may serve instead; start_dht checks which one serves (_relay_limits_lifted) and restarts p2pd until it is this one.
RELAY_SERVICE = "athome-relay-service"
# p2pd came up with the lifted limits in 14 of 75 starts (19%, measured in a namespace): 40 starts all fail 0.02% of
# the time; each start and probe takes about a second
RELAY_START_ATTEMPTS = 40
P2P.FORCE_REACHABILITY_MAPPING.setdefault(
    RELAY_SERVICE, {"forceReachabilityPublic": 1, "relayDataLimit": 1 << 40, "relayTimeLimit": "24h"}
)
# p2pd exits at once when it reaches none of its initial peers. Seen once in a full test run, for a host behind NAT
# whose bootstrap node was up (the same test passes alone): a busy or briefly unreachable coordinator should cost a
# volunteer a few seconds, not the start-up. A dead one is reported after ~6 s more.
BOOTSTRAP_ATTEMPTS = 3
BOOTSTRAP_RETRY_DELAY = 2.0  # seconds before the second start; doubled for each later one


class RunAddressError(ValueError):
    """A ``--run`` address that cannot be used; the message shows the expected form."""


@dataclass(frozen=True)
class RunAddress:
    """A run's address: the coordinator's multiaddr ending in ``/p2p/<peer id>``; the peer ID authenticates the run."""

    maddr: str
    coordinator_id: str

    @classmethod
    def parse(cls, text: str) -> "RunAddress":
        text = text.strip()
        example = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
        if "/p2p/" not in text:
            raise RunAddressError(f"run address {text!r} lacks '/p2p/<peer id>'; expected e.g. {example}")
        coordinator_id = text.rsplit("/p2p/", 1)[1]
        try:
            public_key_from_peer_id(coordinator_id)
            PeerID.from_base58(coordinator_id)
        except (IdentityError, ValueError) as error:
            raise RunAddressError(f"run address {text!r}: {error}") from None
        return cls(text, coordinator_id)

    def __str__(self) -> str:
        return self.maddr


def config_signing_message(config: dict, published_at: float) -> bytes:
    # canonical JSON, so the bytes signed do not depend on how a dict's key order survived the DHT
    return json.dumps(["athome-run-config", config, published_at], sort_keys=True, separators=(",", ":")).encode()


def start_dht(
    identity: Identity,
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    client_mode: bool = False,
    use_auto_relay: bool = False,
    use_relay: bool = True,
    relays: Sequence[str] = (),
    relay_service: bool = False,
    run_name: Optional[str] = None,
    wait_timeout: float = 60,
    invite: Optional[str] = None,
    coordinator_id: Optional[str] = None,
    invite_only: bool = False,
) -> hivemind.DHT:
    """Start this peer's DHT node with its identity and athome's record validator.

    The identity-collision check of hivemind 1.1.12 (``check_if_identity_free``) assumes RSA keys and fails on
    Ed25519 ones, so it is off: a collision is impossible unless the same key file is copied to two machines.

    Invite-only runs (:mod:`athome.dht.auth`): ``invite_only=True`` makes this node the coordinator of one (it
    refuses DHT requests without a valid invitation); ``invite`` (with the run's ``coordinator_id``) joins one.
    An invitation that cannot admit this peer raises :class:`~athome.dht.auth.InviteError` before anything starts;
    a node that refuses us raises :class:`~athome.dht.auth.NotAdmitted` with its reason and the fix.

    ``relays``: multiaddrs of relays to reserve a circuit-relay slot with (a peer behind NAT; implies auto relay).
    ``relay_service``: this node is publicly reachable and relays for peers behind NAT (the coordinator).
    """
    from athome.dht.auth import InviteAuthorizer, InviteError, NotAdmitted, check_invite, diagnose_refusal

    protected = {CONFIG_KEY: RunConfigRecord}
    if run_name is not None:
        protected.update(run_record_keys(run_name))
    validator = AthomeRecordValidator(_raw_private_key(identity), protected)
    authorizer = None
    if invite_only:
        authorizer = InviteAuthorizer(_raw_private_key(identity), identity.peer_id, None)
    elif invite:
        if coordinator_id is None:
            raise InviteError("--invite needs the run's address (--run) to check the invitation against")
        check_invite(invite, coordinator_id, identity.peer_id)
        authorizer = InviteAuthorizer(_raw_private_key(identity), coordinator_id, invite)
    node_kwargs = dict(
        initial_peers=list(initial_peers),
        start=True,
        record_validators=[validator],
        client_mode=client_mode,
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        identity_path=str(identity.path),
        check_if_identity_free=False,
        use_auto_relay=use_auto_relay or bool(relays),
        use_relay=use_relay or bool(relays),
        **_relay_kwargs(relays, relay_service and use_relay),
        await_ready=True,
        startup_timeout=wait_timeout,
        authorizer=authorizer,
    )
    for attempt in range(1, RELAY_START_ATTEMPTS + 1):
        try:
            dht = _start_reaching_initial_peers(node_kwargs)
        except Exception as error:
            reason = diagnose_refusal(list(initial_peers), authorizer) if initial_peers else None
            if reason:
                raise NotAdmitted(reason) from error
            raise
        if dht.peer_id.to_base58() != identity.peer_id:
            dht.shutdown()
            raise IdentityError(f"p2pd started as {dht.peer_id} instead of {identity.peer_id}; is {identity.path} valid?")
        if not (relay_service and use_relay) or _relay_limits_lifted(dht, host_maddrs):
            return dht
        if attempt < RELAY_START_ATTEMPTS:  # see athome.peer.reachability.relay_carries: a startup race in p2pd
            logger.info(f"p2pd came up relaying with go-libp2p's default limits (128 KiB per connection); "
                        f"restarting it ({attempt}/{RELAY_START_ATTEMPTS - 1})")
            _shutdown(dht)
    logger.warning(f"After {RELAY_START_ATTEMPTS} starts p2pd still relays with go-libp2p's default limits: peers behind "
                   f"NAT can serve requests of up to 128 KiB only (serve from a public address, or restart)")
    return dht


def _start_reaching_initial_peers(node_kwargs: dict) -> RobustDHT:
    """A started DHT node; a p2pd that reached none of the initial peers is started again, up to
    ``BOOTSTRAP_ATTEMPTS`` times in all (each failure logged), then its error is raised."""
    for attempt in range(1, BOOTSTRAP_ATTEMPTS + 1):
        try:
            return RobustDHT(**node_kwargs)
        except P2PDaemonError as error:
            if "failed to connect to bootstrap peers" not in str(error) or attempt == BOOTSTRAP_ATTEMPTS:
                raise
            delay = BOOTSTRAP_RETRY_DELAY * 2 ** (attempt - 1)
            logger.warning(f"p2pd reached none of the initial peers {node_kwargs['initial_peers']}; starting it again "
                           f"in {delay:.0f}s ({attempt}/{BOOTSTRAP_ATTEMPTS - 1})")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _relay_limits_lifted(dht: hivemind.DHT, host_maddrs: Sequence[str]) -> bool:
    """Whether this relaying node's circuits carry more than go-libp2p's default 128 KiB (a probe on loopback)."""
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    from athome.peer.reachability import relay_carries

    ports = [str(m).split("/tcp/")[1].split("/")[0] for m in dht.get_visible_maddrs() if "/tcp/" in str(m)]
    bound = str(host_maddrs[0]).split("/")[2] if host_maddrs and str(host_maddrs[0]).startswith("/ip4/") else "0.0.0.0"
    if not ports or bound.startswith("127."):
        return True  # nothing to probe; or loopback only, where nobody needs a relay (test and demo swarms)
    ip = "127.0.0.1" if bound == "0.0.0.0" else bound
    relay = f"/ip4/{ip}/tcp/{ports[0]}/p2p/{dht.peer_id}"
    try:
        return RemoteExpertWorker.run_coroutine(relay_carries(relay))
    except Exception as error:
        logger.warning(f"Could not probe this node's relay limits ({error!r}); assuming the configured ones")
        return True


def _shutdown(dht: hivemind.DHT) -> None:
    from athome.peer.reachability import shutdown_dht

    shutdown_dht(dht)


def _relay_kwargs(relays: Sequence[str], relay_service: bool) -> dict:
    if relays:
        return dict(trusted_relays=list(relays), force_reachability=BEHIND_RELAYS)
    # go-libp2p runs its relay service only once AutoNAT says "public", which a handful of peers rarely confirm
    return dict(force_reachability=RELAY_SERVICE) if relay_service else {}


def protect_run_keys(dht: hivemind.DHT, identity: Identity, run_name: str) -> None:
    """Once a peer knows its run, check the run's records (signatures and schemas) in its DHT node too."""
    dht.add_validators([AthomeRecordValidator(_raw_private_key(identity), run_record_keys(run_name))])


def _raw_private_key(identity: Identity) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return identity.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def store_record(dht: hivemind.DHT, key: str, record: Record, ttl: float, *, expiration: Optional[float] = None) -> bool:
    """Write this peer's record under ``key`` for ``ttl`` seconds (or until ``expiration``, DHT time).

    True if at least one node accepted it.
    """
    peer_id = dht.peer_id.to_base58()
    expiration = expiration if expiration is not None else get_dht_time() + ttl
    return bool(dht.store(key, record.model_dump(mode="python"), expiration, subkey=owner_subkey(peer_id)))


def withdraw_record(dht: hivemind.DHT, key: str, empty: Record, last_expiration: float) -> bool:
    """Replace this peer's record with ``empty`` (e.g. a declaration of no experts) that expires almost at once.

    hivemind has no delete, and refuses a record that expires before the one it holds (that is what stops
    replays), so the replacement expires just after the last record stored: ``last_expiration``.
    """
    return store_record(dht, key, empty, ttl=0, expiration=max(last_expiration, get_dht_time()) + 0.01)


def get_records(
    dht: hivemind.DHT, key: str, schema: type[RecordT], *, latest: bool = True
) -> dict[str, tuple[RecordT, float]]:
    """Every live record under ``key``: writer peer ID -> (record, expiration). Malformed entries are skipped."""
    found = dht.get(key, latest=latest)
    if found is None or not isinstance(found.value, dict):
        return {}
    now = get_dht_time()
    records: dict[str, tuple[RecordT, float]] = {}
    for subkey, item in found.value.items():
        owner = subkey_owner(subkey)
        if owner is None or item.expiration_time <= now:
            continue
        try:
            records[owner] = (schema.model_validate(item.value), item.expiration_time)
        except (ValidationError, TypeError) as error:
            logger.warning(f"ignored a malformed {schema.__name__} from {owner}: {error}")
    return records


def publish_run_config(dht: hivemind.DHT, identity: Identity, config: RunConfig, ttl: float) -> bool:
    body = config.to_dict()
    published_at = time.time()
    record = RunConfigRecord(
        config=body, published_at=published_at, signature=identity.sign(config_signing_message(body, published_at))
    )
    return store_record(dht, CONFIG_KEY, record, ttl)


class RunConfigError(RuntimeError):
    """The run config could not be fetched or failed its signature check."""


def fetch_run_config(dht: hivemind.DHT, coordinator_id: str, timeout: float = 30) -> RunConfig:
    """Fetch the run config published by ``coordinator_id`` and verify its signature against that peer ID.

    Retries until ``timeout``: a freshly started coordinator may not have published yet.
    """
    deadline = time.monotonic() + timeout
    last_problem = "no config record under that coordinator's ID"
    while True:
        found = dht.get(CONFIG_KEY, latest=True)
        entry = None
        if found is not None and isinstance(found.value, dict):
            entry = found.value.get(owner_subkey(coordinator_id))
        if entry is not None:
            try:
                record = RunConfigRecord.model_validate(entry.value)
            except (ValidationError, TypeError) as error:
                raise RunConfigError(f"the run config record is malformed: {error}") from None
            if not verify(coordinator_id, record.signature, config_signing_message(record.config, record.published_at)):
                raise RunConfigError(
                    f"the run config's signature does not match coordinator {coordinator_id}: refusing it "
                    f"(someone tampered with it, or the address is wrong)"
                )
            return record.parsed()
        if time.monotonic() > deadline:
            raise RunConfigError(
                f"{last_problem} after {timeout:.0f}s; check that `peer coordinator` is running and that the "
                f"--run address is the one it printed"
            )
        time.sleep(1.0)
