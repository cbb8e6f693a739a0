"""Can the run reach this peer, directly or through its relay? A dial-back from another peer of the run.

A peer asks a *checker* (the coordinator runs one) to dial it back. The checker starts a throwaway p2pd with no
connections, so the answer says whether a stranger on the internet could connect, not whether an existing
connection happens to be open. It only ever dials the peer ID that asked, one dial at a time, and through no relay
but itself.

Peers behind NAT are served through the coordinator's circuit relay (libp2p circuit relay v2): the peer reserves a
slot with the coordinator (``start_dht(relays=[run address])``), declares itself ``relayed``, and trainers dial it
at ``<run address>/p2p-circuit`` (:func:`connect_via_relay`). :func:`choose_serving_mode` is what ``peer join``
decides with: direct, relayed, or (nobody can reach it) client mode; :func:`choose_trainer_mode` is what
``peer train`` decides with: a DHT server if it can be dialled, else a client.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import re
import time
from typing import Callable, List, Optional, Sequence, Tuple

from hivemind.p2p import P2P, P2PContext, P2PDaemonError, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)
DIAL_TIMEOUT = 10.0
DIRECT, RELAYED, CLIENT = "direct", "relayed", "client"  # how a peer can serve (see choose_serving_mode)
_P2P_CODE, _CIRCUIT_CODE = 421, 290  # multicodec numbers of /p2p and /p2p-circuit


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def circuit_maddr(relay: str) -> Multiaddr:
    """``<relay transport>/p2p/<relay id>/p2p-circuit`` as p2pd parses it: dial a peer through ``relay``.

    hivemind's multiaddr encodes ``/p2p/`` values as CIDs, which p2pd rejects ("length greater than remaining
    number of bytes"); libp2p's binary form carries the peer ID's raw multihash, built here.
    """
    if "/p2p/" not in relay:
        raise ValueError(f"relay address {relay!r} lacks /p2p/<peer id>")
    transport, relay_id = relay.split("/p2p/", 1)
    multihash = PeerID.from_base58(relay_id.split("/", 1)[0]).to_bytes()
    return Multiaddr(
        Multiaddr(transport).to_bytes() + _uvarint(_P2P_CODE) + _uvarint(len(multihash)) + multihash
        + _uvarint(_CIRCUIT_CODE)
    )


async def connect_via_relay(p2p: P2P, peer_id: PeerID, relay: str, timeout: float = DIAL_TIMEOUT) -> None:
    """Open (or keep) a connection to ``peer_id`` through ``relay``; a no-op while one is open."""
    await asyncio.wait_for(p2p._client.connect(peer_id, [circuit_maddr(relay)]), timeout)


# p2pd 0.3x (hivemind 1.1.12) runs *two* circuit relay v2 services when it relays: libp2p's relay manager starts one
# with the -relayDataLimit/-relayTimeLimit flags once the node is public, and the daemon itself starts another with
# go-libp2p's defaults (`relay.New(host)` in its EnableRelayV2). Both register the same hop protocol; whichever
# registers last serves every reservation and circuit. Which one that is depends on goroutine timing at startup: in
# namespaces ~60% of coordinator starts got the defaults, i.e. 128 KiB per relayed connection and direction (and 2
# minutes), so relayed expert requests (~0.5 MB) were reset after 128 KiB while small ones passed.
RELAY_PROBE_BYTES = 256 * 1024  # above the default relay's 128 KiB, far below the lifted limits
_PROBE_PROTOCOL = "athome.RelayProbe"


async def relay_carries(relay: str, nbytes: int = RELAY_PROBE_BYTES, timeout: float = 60.0) -> bool:
    """Whether a circuit through ``relay`` carries an ``nbytes`` request: two throwaway p2pd daemons on this
    machine, one holding a reservation at ``relay`` (as a NATed host does), the other calling it through the relay.

    Raises ``TimeoutError`` if the probe could not even set up its circuit within ``timeout`` seconds.
    """
    from athome.dht.node import BEHIND_RELAYS

    async def echo_size(request: runtime_pb2.ExpertRequest, _: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(len(request.metadata)))

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # the target listens nowhere, so the caller cannot reach it but through the relay (on one machine it would
    # otherwise find its loopback address and bypass the relay)
    while True:  # p2pd exits if it cannot reach its bootstrap peer (a relay that is starting, a loaded machine)
        try:
            target = await P2P.create(no_listen=True, initial_peers=[relay], trusted_relays=[relay],
                                      force_reachability=BEHIND_RELAYS, use_auto_relay=True, use_relay=True)
            break
        except P2PDaemonError as error:
            if loop.time() > deadline:
                raise TimeoutError(f"could not reach {relay} within {timeout:.0f}s: {_last_line(error)}") from error
            await asyncio.sleep(0.5)
    caller = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        await target.add_protobuf_handler(_PROBE_PROTOCOL, echo_size, runtime_pb2.ExpertRequest)
        while True:  # the target reserves its slot in the background
            try:
                await connect_via_relay(caller, target.peer_id, relay)
                await caller.call_protobuf_handler(target.peer_id, _PROBE_PROTOCOL, runtime_pb2.ExpertRequest(),
                                                   runtime_pb2.ExpertResponse)
                break
            except Exception as error:
                if loop.time() > deadline:
                    raise TimeoutError(f"no circuit through {relay} within {timeout:.0f}s: {_last_line(error)}")
                await asyncio.sleep(0.5)
        try:
            response = await asyncio.wait_for(caller.call_protobuf_handler(
                target.peer_id, _PROBE_PROTOCOL, runtime_pb2.ExpertRequest(metadata=bytes(nbytes)),
                runtime_pb2.ExpertResponse), max(deadline - loop.time(), 10.0))
        except Exception as error:
            logger.debug(f"relay probe: {nbytes} bytes did not pass {relay}: {_last_line(error)}")
            return False
        return MSGPackSerializer.loads(response.metadata) == nbytes
    finally:
        await caller.shutdown()
        await target.shutdown()


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1][:160] if text else type(error).__name__


class ReachabilityServicer(ServicerBase):
    """Answers ``rpc_dial_back``: tries to connect to the asking peer at the addresses it names.

    The request's metadata is msgpack ``{"maddrs": [str, ...], "via_relay": bool}``; the response's metadata is
    msgpack ``{"reachable": bool, "maddr": str | None, "error": str, "observed_ip": str | None}`` (direct dials;
    the IP the request came from) plus, when ``via_relay``,
    ``{"relayed_reachable": bool, "relay_error": str}`` (a dial through this checker's own relay).
    """

    def __init__(self, host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",), relay_maddrs: Sequence[str] = ()):
        # the stranger listens on the checker's interfaces but any free port (the checker holds its own)
        self.host_maddrs = [re.sub(r"/(tcp|udp)/\d+", r"/\1/0", maddr) for maddr in host_maddrs]
        self.relay_maddrs = list(relay_maddrs)  # this checker's own addresses, loopback first: it is the relay
        self._one_at_a_time = asyncio.Semaphore(1)

    async def rpc_dial_back(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            body = MSGPackSerializer.loads(request.metadata)
            maddrs = [str(m) for m in body["maddrs"]][:16]
            via_relay = bool(body.get("via_relay", False))
        except Exception:
            return _answer(dict(reachable=False, maddr=None, error="malformed request"))
        async with self._one_at_a_time:
            reachable, maddr, error = await dial(context.remote_id, maddrs, self.host_maddrs)
            answer = dict(reachable=reachable, maddr=maddr, error=error, observed_ip=await self._observed_ip(context))
            if via_relay:
                answer["relayed_reachable"], answer["relay_error"] = await self._dial_via_relay(context.remote_id)
        return _answer(answer)

    async def _observed_ip(self, context: P2PContext) -> Optional[str]:
        """The IP address the asking peer's connection comes from: its public IP, as the run sees it."""
        p2p = getattr(self, "p2p", None)
        if p2p is None:
            return None
        try:
            for info in await p2p.list_peers():
                if info.peer_id == context.remote_id:
                    for addr in map(str, info.addrs):
                        if addr.startswith(("/ip4/", "/ip6/")) and "/p2p-circuit" not in addr:
                            return addr.split("/")[2]
        except Exception as error:
            logger.debug(f"could not list connections: {error!r}")
        return None

    async def _dial_via_relay(self, peer_id: PeerID) -> Tuple[bool, str]:
        if not self.relay_maddrs:
            return False, "this checker does not relay (its coordinator runs with --no_relay)"
        stranger = await P2P.create(host_maddrs=list(self.host_maddrs))
        try:
            errors = []
            for relay in self.relay_maddrs:
                try:
                    await connect_via_relay(stranger, peer_id, relay)
                    return True, ""
                except Exception as error:
                    errors.append(f"via {relay}: {_last_line(error)}")
            return False, "; ".join(errors)
        finally:
            await stranger.shutdown()


def _answer(body: dict) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(body))


async def dial(peer_id: PeerID, maddrs: List[str], host_maddrs: Sequence[str]) -> tuple[bool, str | None, str]:
    """Dial ``peer_id`` at each of ``maddrs`` from a fresh libp2p host; the first that connects wins."""
    stranger = await P2P.create(host_maddrs=list(host_maddrs))
    try:
        errors = []
        for maddr in maddrs:
            if "/p2p-circuit" in maddr:
                continue  # a relayed address is not direct reachability
            transport = maddr.split("/p2p/", 1)[0]  # the control protocol wants the address without the peer ID
            try:
                await asyncio.wait_for(stranger._client.connect(peer_id, [Multiaddr(transport)]), DIAL_TIMEOUT)
                return True, maddr, ""
            except Exception as error:
                errors.append(f"{maddr}: {_last_line(error)}")
        return False, None, "; ".join(errors) or "no direct address to dial"
    finally:
        await stranger.shutdown()


async def ask_dial_back(
    p2p: P2P, checker: PeerID, maddrs: Sequence[str], timeout: float = 60, via_relay: bool = False
) -> dict:
    stub = ReachabilityServicer.get_stub(p2p, checker)
    request = runtime_pb2.ExpertRequest(
        metadata=MSGPackSerializer.dumps(dict(maddrs=list(maddrs), via_relay=via_relay))
    )
    response = await stub.rpc_dial_back(request, timeout=timeout)
    return MSGPackSerializer.loads(response.metadata)


def serve_reachability(dht, host_maddrs: Sequence[str], relay: bool = True) -> ReachabilityServicer:
    """Register a dial-back checker on this process's replica of ``dht``'s p2p daemon.

    ``relay``: this node relays for peers behind NAT, so the checker also answers "reachable through me?".
    """
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    own = [str(m) for m in dht.get_visible_maddrs()] if relay else []
    own.sort(key=lambda m: not m.startswith(("/ip4/127.", "/ip6/::1/")))  # the stranger runs on this machine
    servicer = ReachabilityServicer(host_maddrs, own)

    async def register():
        # keep the replica referenced: when it is garbage-collected, its handlers silently stop answering
        servicer.p2p = await dht.replicate_p2p()
        await servicer.add_p2p_handlers(servicer.p2p)

    RemoteExpertWorker.run_coroutine(register())
    return servicer


def check_reachable(dht, checker_id: str, timeout: float = 60, via_relay: bool = False) -> dict:
    """Ask ``checker_id`` to dial this peer back at its visible addresses (and through itself if ``via_relay``).

    Returns the checker's answer with this peer's ``maddrs`` added.
    """
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    maddrs = [str(m) for m in dht.get_visible_maddrs(latest=True)]

    async def ask():
        p2p = await dht.replicate_p2p()
        return await ask_dial_back(p2p, PeerID.from_base58(checker_id), maddrs, timeout, via_relay)

    return dict(RemoteExpertWorker.run_coroutine(ask()), maddrs=maddrs)


def wait_reachable_via_relay(dht, checker_id: str, timeout: float = 45) -> dict:
    """Poll the checker until it reaches this peer through the relay (the reservation takes a moment) or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = check_reachable(dht, checker_id, via_relay=True)
        except Exception as error:
            answer = dict(reachable=False, relayed_reachable=False, relay_error=f"checker unreachable: {error!r}",
                          error="", maddrs=[])
        if answer.get("relayed_reachable") or answer.get("reachable") or time.monotonic() > deadline:
            return answer
        time.sleep(2.0)


def shutdown_dht(dht) -> None:
    """Stop ``dht`` for a restart. Its cached p2p replica is closed first, on the loop it belongs to: left to the
    garbage collector, it would print "no current event loop" tracebacks in the middle of ``peer join``."""
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    replica = getattr(dht, "_p2p_replica", None)  # hivemind's cache behind DHT.replicate_p2p()
    if replica is not None:
        try:
            RemoteExpertWorker.run_coroutine(replica.shutdown())
        except Exception as error:
            logger.debug(f"closing the p2p replica failed: {error!r}")
    dht.shutdown()


def _restart(restart: Callable[..., object], attempts: int = 3, **changes) -> object:
    """``restart(**changes)``, tried again when p2pd cannot reach the run at once: the coordinator was reachable
    a moment ago, and on a loaded machine a fresh daemon's bootstrap dial can time out (seen in namespaces)."""
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

    for attempt in range(1, attempts + 1):
        try:
            return restart(**changes)
        except P2PDaemonError as error:
            if attempt == attempts or "bootstrap" not in str(error):
                raise
            logger.warning(f"Restarting the DHT failed ({_last_line(error)}); retrying ({attempt}/{attempts - 1})")
            time.sleep(2.0 * attempt)


def choose_serving_mode(
    dht, args: argparse.Namespace, coordinator_id: str, restart: Callable[..., object]
) -> Tuple[object, str, dict]:
    """How ``peer join`` can serve: :data:`DIRECT`, :data:`RELAYED` or :data:`CLIENT` (reachable by nobody).

    Asks the coordinator to dial back. A peer it cannot dial is restarted (``restart(**start_dht overrides)``)
    with a reservation at the run's relay and as a DHT client (others cannot reach its DHT node directly either),
    unless ``--no_relay``; if the relay cannot reach it either, it is restarted as a plain client. Returns the DHT
    to use (the same or a new one), the mode, and the checker's last answer. Each choice is logged with its flag.
    """
    if args.client_mode:
        return dht, CLIENT, {}
    if args.use_auto_relay and not args.no_relay:
        answer = wait_reachable_via_relay(dht, coordinator_id)
        mode = DIRECT if answer.get("reachable") else RELAYED if answer.get("relayed_reachable") else CLIENT
    else:
        try:
            answer = check_reachable(dht, coordinator_id)
        except Exception as error:
            # an old or busy coordinator: assume what was configured works rather than refuse to serve
            logger.warning(f"The coordinator could not check this peer's reachability ({error!r}); assuming direct")
            return dht, DIRECT, {}
        if answer.get("reachable"):
            return dht, DIRECT, answer
        if args.no_relay:
            mode = CLIENT
        else:
            logger.warning(
                f"The run cannot dial this peer directly ({answer.get('error')}); serving through the run's relay "
                f"instead (slower; open a port and pass --public_ip/--port to serve directly, or --no_relay)"
            )
            shutdown_dht(dht)
            dht = _restart(restart, relays=[args.run], client_mode=True, use_auto_relay=True)
            answer = wait_reachable_via_relay(dht, coordinator_id)
            mode = RELAYED if answer.get("relayed_reachable") else CLIENT
    if mode == CLIENT:
        logger.warning(
            f"Nobody in the run can reach this peer (direct: {answer.get('error') or 'no'}; relay: "
            f"{answer.get('relay_error') or 'disabled by --no_relay'}), so it cannot serve experts: training only, "
            f"in client mode. Run `peer check --run {args.run}` for the steps that fix it"
        )
        shutdown_dht(dht)
        dht = _restart(restart, client_mode=True, relays=[], use_auto_relay=False)
    elif mode == RELAYED:
        logger.info("Serving through the run's relay: trainers reach this peer via the coordinator (--no_relay "
                    "to refuse; --public_ip/--port with a forwarded port to serve directly)")
    return dht, mode, answer


def choose_trainer_mode(dht, args: argparse.Namespace, coordinator_id: str, restart: Callable[..., object]) -> object:
    """How ``peer train`` joins: as a DHT server if the run can dial it, else as a client. Returns the DHT to use.

    A trainer serves no experts, so a relay slot buys it nothing; but a DHT server the run cannot dial would
    announce addresses nobody can reach and stall everyone's lookups that try them. So a trainer the coordinator
    cannot dial back is restarted as a client (``restart(**start_dht overrides)``), and the log line names the
    flags: ``--client_mode`` skips the check, ``--public_ip``/``--port`` with a forwarded port make it reachable.
    """
    if args.client_mode or dht.client_mode:
        return dht
    try:
        answer = check_reachable(dht, coordinator_id)
    except Exception as error:
        logger.warning(f"The coordinator could not check this peer's reachability ({error!r}); assuming reachable")
        return dht
    if answer.get("reachable"):
        return dht
    logger.warning(
        f"The run cannot dial this trainer directly ({answer.get('error') or 'no address answered'}), so it trains "
        f"as a client: it dials the others and announces no address (--client_mode skips this check; to be "
        f"reachable, forward a TCP port and pass --public_ip/--port; `peer check --run {args.run}` prints the steps)"
    )
    shutdown_dht(dht)
    return _restart(restart, client_mode=True, relays=[], use_auto_relay=False)
