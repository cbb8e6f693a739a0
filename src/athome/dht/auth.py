"""Invite-only runs: Ed25519 invitation tokens, a DHT authorizer, and admission checks for expert and averaging RPCs.

An organizer issues tokens with ``peer invite`` (signed by the coordinator's identity key, the key behind the run
address); a volunteer passes one with ``--invite TOKEN``. A token names the coordinator, optionally the one peer ID
allowed to use it (``--peer_id``; otherwise whoever holds it may, like a password), and an expiry.

Three layers refuse outsiders, each telling them why and how to fix it (:data:`FIX`):

1. **DHT protocol** — :class:`InviteAuthorizer`, a hivemind ``AuthorizerBase`` (hivemind's ``TokenAuthorizerBase``
   is RSA-only). Every DHT request carries the sender's token and its Ed25519 public key, and is signed with that
   key over the whole request (time and a nonce included, so it cannot be replayed); the servicer checks the
   signature, the token (coordinator's signature, expiry, bound peer ID) and refuses with :class:`NotAdmitted`.
   Responses are signed the same way, so a member drops answers from DHT nodes that are not members.
2. **Membership records** — every member publishes its token in a signed :class:`~athome.dht.schemas.MemberRecord`
   under ``athome.<run>.members`` (only members can write to the DHT at all). The record's owner subkey proves the
   owner presented the token; the token proves the coordinator admitted that peer ID (or the holder of an open
   invitation).
3. **Expert and averaging RPCs** — hivemind wires authorizers into the DHT only. Handlers call
   :func:`admit` with their ``P2PContext``; libp2p's secure channel authenticates ``context.remote_id``, and
   :class:`Admission` admits it only if a valid membership record of that peer ID is in the DHT (cached, refreshed
   at most every few seconds on a miss). One admission policy per process (:func:`set_admission`), inherited by the
   forked handler and averager processes; without one (an open run) :func:`admit` admits everyone.

Limits: an invitation without ``--peer_id`` is a bearer secret (whoever holds it is admitted; members can read it
in the membership records); there is no revocation list before expiry (issue short-lived invitations, rotate the
coordinator's key to cut everyone off); the DHT request signature does not name the receiving node (hivemind's
DHT protocol does not tell the authorizer whom it calls), so a member could replay another member's signed
request to a third node within a minute. hivemind's ``TrainingStateAverager`` (state download inside
``hivemind.Optimizer``) and the trainers' proof servicer are not behind :func:`admit`; outsiders must still learn a
member's address, since the DHT refuses them.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import math
import secrets
import threading
import time
from typing import Dict, Optional, Sequence

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage

from athome.dht.identity import Identity, IdentityError, peer_id_from_public_key, verify

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "athome-invite1."
FIX = "ask the organizer for `peer invite`, pass --invite TOKEN"
MAX_CLOCK_SKEW = 60.0  # seconds a signed request's time may differ from ours (hivemind's TokenAuthorizerBase: 1 min)
DEFAULT_EXPIRES_IN_HOURS = 24.0 * 7


class InviteError(ValueError):
    """A token that cannot be parsed or does not admit its holder; the message says why."""


class NotAdmitted(PermissionError):
    """Raised by handlers to refuse a caller; hivemind sends its text back to the caller as the RPC's error."""


@dataclasses.dataclass(frozen=True)
class InviteToken:
    """An invitation signed by a run's coordinator. ``peer_id`` empty: anyone holding the token may use it."""

    coordinator_id: str
    peer_id: str
    expires_at: float
    nonce: bytes
    signature: bytes = b""

    def message(self) -> bytes:
        return MSGPackSerializer.dumps(["athome-invite", self.coordinator_id, self.peer_id, self.expires_at, self.nonce])

    def encode(self) -> str:
        body = [self.coordinator_id, self.peer_id, self.expires_at, self.nonce, self.signature]
        return TOKEN_PREFIX + base64.urlsafe_b64encode(MSGPackSerializer.dumps(body)).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "InviteToken":
        text = (text or "").strip()
        if not text.startswith(TOKEN_PREFIX):
            raise InviteError(f"an invitation starts with '{TOKEN_PREFIX}'; got {text[:24]!r}")
        try:
            payload = text[len(TOKEN_PREFIX) :]
            raw = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=b"-_", validate=True)
            body = MSGPackSerializer.loads(raw)
            coordinator_id, peer_id, expires_at, nonce, signature = body
            token = cls(str(coordinator_id), str(peer_id), float(expires_at), bytes(nonce), bytes(signature))
        except Exception as error:
            raise InviteError(f"the invitation is damaged ({type(error).__name__}); copy it again in full") from None
        return token

    def problem(self, coordinator_id: str, holder_id: str, now: Optional[float] = None) -> Optional[str]:
        """Why this token does not admit ``holder_id`` to ``coordinator_id``'s run, or None if it does."""
        now = time.time() if now is None else now
        if self.coordinator_id != coordinator_id:
            return f"the invitation is for the run of coordinator {self.coordinator_id[-8:]}, not {coordinator_id[-8:]}"
        if not verify(coordinator_id, self.signature, self.message()):
            return "the invitation's signature is not the coordinator's (forged or altered)"
        if not math.isfinite(self.expires_at) or self.expires_at <= now:
            return f"the invitation expired at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.expires_at))}"
        if self.peer_id and self.peer_id != holder_id:
            return f"the invitation is for peer {self.peer_id}, not {holder_id}"
        return None


def issue_invite(coordinator: Identity, *, peer_id: str = "", expires_in_hours: float = DEFAULT_EXPIRES_IN_HOURS) -> str:
    """A token signed by ``coordinator``'s key, valid for ``expires_in_hours``, for ``peer_id`` (or any holder)."""
    if not expires_in_hours > 0 or not math.isfinite(expires_in_hours):
        raise InviteError(f"--expires_in must be a positive number of hours, got {expires_in_hours}")
    if peer_id:
        from athome.dht.identity import public_key_from_peer_id

        try:
            public_key_from_peer_id(peer_id)
        except (IdentityError, ValueError) as error:
            raise InviteError(f"--peer_id {peer_id!r} is not an Ed25519 peer ID (12D3KooW...): {error}") from None
    token = InviteToken(coordinator.peer_id, peer_id, time.time() + expires_in_hours * 3600, secrets.token_bytes(8))
    return dataclasses.replace(token, signature=coordinator.sign(token.message())).encode()


def check_invite(token: str, coordinator_id: str, holder_id: str) -> InviteToken:
    """Parse ``token`` and raise :class:`InviteError` (with the fix) unless it admits ``holder_id``."""
    parsed = InviteToken.decode(token)
    problem = parsed.problem(coordinator_id, holder_id)
    if problem is not None:
        raise InviteError(f"{problem}; {FIX}")
    return parsed


class InviteAuthorizer(AuthorizerBase):
    """hivemind authorizer of the DHT protocol for invite-only runs (see the module docstring).

    :param private_key: this peer's raw 32-byte Ed25519 private key (bytes, so it pickles into the DHT process)
    :param coordinator_id: the run's coordinator; its own requests need no token
    :param token: this peer's invitation (None for the coordinator itself)
    """

    def __init__(self, private_key: bytes, coordinator_id: str, token: Optional[str]):
        self._private_key, self.coordinator_id, self.token = private_key, coordinator_id, token or ""
        self._identity: Optional[Identity] = None
        self._recent_nonces: Optional[TimedStorage] = None

    def __getstate__(self):
        return dict(self.__dict__, _identity=None, _recent_nonces=None)

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            self._identity = Identity(Ed25519PrivateKey.from_private_bytes(self._private_key))
        return self._identity

    def _credentials(self, access_token: AccessToken) -> None:
        access_token.username = self.token
        access_token.public_key = self.identity.raw_public_key

    def _admits(self, access_token: AccessToken) -> str:
        """The holder's peer ID if ``access_token`` admits it; raises NotAdmitted otherwise."""
        if len(access_token.public_key) != 32:
            raise NotAdmitted(f"this run is invite-only and the request carries no invitation: {FIX}")
        holder = peer_id_from_public_key(bytes(access_token.public_key))
        if holder == self.coordinator_id:
            return holder
        if not access_token.username:
            raise NotAdmitted(f"this run is invite-only and peer {holder} sent no invitation: {FIX}")
        try:
            problem = InviteToken.decode(access_token.username).problem(self.coordinator_id, holder)
        except InviteError as error:
            problem = str(error)
        if problem is not None:
            raise NotAdmitted(f"this run is invite-only: {problem}; {FIX}")
        return holder

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key) -> None:
        auth = request.auth
        self._credentials(auth.client_access_token)
        auth.time = get_dht_time()
        auth.nonce = secrets.token_bytes(8)
        auth.signature = b""
        auth.signature = self.identity.sign(request.SerializeToString())

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        auth = request.auth
        holder = self._admits(auth.client_access_token)
        signature, auth.signature = auth.signature, b""
        if not verify(holder, signature, request.SerializeToString()):
            raise NotAdmitted(f"the request's signature does not match peer {holder}")
        now = get_dht_time()
        if abs(auth.time - now) > MAX_CLOCK_SKEW:
            raise NotAdmitted(f"the request is {auth.time - now:+.0f}s off this node's clock (replayed, or set your clock)")
        if self._recent_nonces is None:
            self._recent_nonces = TimedStorage()
        with self._recent_nonces.freeze():
            if auth.nonce in self._recent_nonces:
                raise NotAdmitted("a replayed request")
        self._recent_nonces.store(auth.nonce, None, now + 3 * MAX_CLOCK_SKEW)
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        auth = response.auth
        self._credentials(auth.service_access_token)
        auth.nonce = request.auth.nonce
        auth.signature = b""
        auth.signature = self.identity.sign(response.SerializeToString())

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        auth = response.auth
        try:
            holder = self._admits(auth.service_access_token)
        except NotAdmitted as error:
            logger.debug(f"dropped a DHT response from a non-member: {error}")
            return False
        signature, auth.signature = auth.signature, b""
        return auth.nonce == request.auth.nonce and verify(holder, signature, response.SerializeToString())


class Admission:
    """Admits callers of expert and averaging RPCs that hold a valid membership record (see the module docstring).

    :param dht: this peer's DHT (usable from forked processes, as hivemind's own handlers use it)
    :param members_key: ``athome.<run>.members``
    :param coordinator_id: the run's coordinator (always admitted)
    :param local_id: this peer (always admitted: its own trainer calls its own experts)
    :param min_refresh: seconds between DHT lookups triggered by unknown callers (a flood of outsiders costs one
      lookup per period, not one per request)
    """

    def __init__(self, dht, members_key: str, coordinator_id: str, local_id: str, min_refresh: float = 2.0):
        self.dht, self.members_key = dht, members_key
        self.coordinator_id, self.local_id, self.min_refresh = coordinator_id, local_id, min_refresh
        self._members: Dict[str, float] = {}  # peer ID -> token expiry
        self._refreshed_at = float("-inf")
        self._lock = threading.Lock()

    def is_member(self, peer_id: str, *, refresh: bool = True) -> bool:
        if peer_id in (self.coordinator_id, self.local_id) or self._members.get(peer_id, 0.0) > time.time():
            return True
        if refresh and time.monotonic() - self._refreshed_at >= self.min_refresh:
            self.refresh()
            return self._members.get(peer_id, 0.0) > time.time()
        return False

    def refresh(self) -> None:
        """Re-read every membership record; keep the owners whose token admits them."""
        from athome.dht.node import get_records
        from athome.dht.schemas import MemberRecord

        with self._lock:
            self._refreshed_at = time.monotonic()
            members = {}
            for owner, (record, _) in get_records(self.dht, self.members_key, MemberRecord).items():
                try:
                    token = InviteToken.decode(record.token)
                except InviteError:
                    continue
                if token.problem(self.coordinator_id, owner) is None:
                    members[owner] = token.expires_at
            self._members = members

    def check(self, peer_id: PeerID | str) -> None:
        """Raise :class:`NotAdmitted` (with the fix) unless ``peer_id`` is a member."""
        peer_id = peer_id.to_base58() if isinstance(peer_id, PeerID) else str(peer_id)
        if not self.is_member(peer_id):
            raise NotAdmitted(f"peer {peer_id} is not a member of this invite-only run: {FIX}")

    async def check_async(self, peer_id: PeerID | str) -> None:
        """:meth:`check` without blocking the event loop on a DHT lookup."""
        key = peer_id.to_base58() if isinstance(peer_id, PeerID) else str(peer_id)
        if not self.is_member(key, refresh=False):
            await asyncio.get_running_loop().run_in_executor(None, self.check, key)


_admission: Optional[Admission] = None


def set_admission(admission: Optional[Admission]) -> None:
    """Install this process's admission policy (inherited by processes forked afterwards); None = open run."""
    global _admission
    _admission = admission


def get_admission() -> Optional[Admission]:
    return _admission


async def admit(context: P2PContext) -> None:
    """Raise :class:`NotAdmitted` unless the RPC's caller may use this peer's services; a no-op in open runs."""
    if _admission is not None and context is not None and context.remote_id is not None:
        await _admission.check_async(context.remote_id)


def publish_membership(dht, run_name: str, token: str, ttl: float) -> bool:
    """Store this peer's signed membership record (its invitation) under ``athome.<run>.members``."""
    from athome.dht.node import store_record
    from athome.dht.schemas import MemberRecord, run_key

    return store_record(dht, run_key(run_name, "members"), MemberRecord(token=token), ttl)


def diagnose_refusal(initial_peers: Sequence[str], authorizer: Optional[InviteAuthorizer], timeout: float = 20) -> Optional[str]:
    """After a failed DHT start: ask the first initial peer directly and return its refusal message, if it refused
    us (e.g. an invite-only run and no or a bad ``--invite``); None if it did not say."""
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.p2p import P2P, ServicerBase
    from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError
    from hivemind.proto import dht_pb2

    targets = [maddr for maddr in initial_peers if "/p2p/" in maddr]
    if not targets:
        return None

    async def ask() -> Optional[str]:
        p2p = await P2P.create(initial_peers=targets[:1], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            stub = ServicerBase.get_stub.__func__(DHTProtocol, p2p, PeerID.from_base58(targets[0].rsplit("/p2p/", 1)[1]))
            request = dht_pb2.PingRequest()
            if authorizer is not None:
                await authorizer.sign_request(request, None)
            await asyncio.wait_for(stub.rpc_ping(request), timeout)
            return None
        except P2PHandlerError as error:
            text = str(error)
            marker = "NotAdmitted("
            if marker in text:
                return text[text.index(marker) + len(marker) :].rstrip(")").strip("'\"")
            return None
        finally:
            await p2p.shutdown()

    try:
        return RemoteExpertWorker.run_coroutine(ask())
    except Exception as error:
        logger.debug(f"could not ask {targets[0]} why it refused us: {error!r}")
        return None


def start_membership(dht, identity: Identity, run_name: str, coordinator_id: str, invite: Optional[str], ttl: float):
    """For a peer that joined with ``--invite``: publish its membership record now and every ``ttl/3`` seconds, and
    admit only members to this process's expert and averaging RPCs (:func:`set_admission`). Call it before
    starting servers or averagers (their processes inherit the policy). Returns the publishing thread (stop it on
    exit), or None without an invitation (an open run)."""
    from athome.dht.schemas import run_key
    from athome.lifecycle import PeriodicThread

    if not invite:
        return None
    if not publish_membership(dht, run_name, invite, ttl):
        logger.warning("No DHT node accepted this peer's membership record yet; retrying in the background")
    set_admission(Admission(dht, run_key(run_name, "members"), coordinator_id, identity.peer_id))
    expires_at = InviteToken.decode(invite).expires_at
    logger.info(f"Invite-only run: expert and averaging requests are served to members only; your invitation "
                f"expires at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expires_at))}")

    def republish() -> None:
        if time.time() > expires_at:  # the swarm refuses us from now on: say why, once per period
            logger.error(f"Your invitation expired: other peers refuse this one now; {FIX} (a new one)")
        publish_membership(dht, run_name, invite, ttl)

    thread = PeriodicThread(republish, period=ttl / 3, name="membership", run_first=False)
    thread.start()
    return thread
