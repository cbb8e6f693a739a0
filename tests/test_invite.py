"""Invite-only runs: Ed25519 invitations, the DHT authorizer, and admission of expert and averaging RPCs.

Real machinery: real DHT nodes and p2p daemons on 127.0.0.1, real athome servicers and a real averager process.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer

from athome.dht import Identity, get_records, start_dht, store_record
from athome.dht.auth import (
    FIX,
    Admission,
    InviteError,
    InviteToken,
    NotAdmitted,
    check_invite,
    issue_invite,
    publish_membership,
    set_admission,
)
from athome.dht.schemas import PeerRecord, run_key

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_tokens_admit_only_their_holder_until_they_expire(tmp_path: Path):
    organizer, alice, eve = (Identity.load_or_create(tmp_path / f"{name}.key") for name in ("c", "a", "e"))
    bound = issue_invite(organizer, peer_id=alice.peer_id, expires_in_hours=1)
    open_invite = issue_invite(organizer, expires_in_hours=1)
    assert check_invite(bound, organizer.peer_id, alice.peer_id).peer_id == alice.peer_id
    assert check_invite(open_invite, organizer.peer_id, eve.peer_id).peer_id == ""  # whoever holds it
    with pytest.raises(InviteError, match=f"for peer {alice.peer_id}, not {eve.peer_id}.*peer invite"):
        check_invite(bound, organizer.peer_id, eve.peer_id)
    with pytest.raises(InviteError, match="for the run of coordinator"):
        check_invite(bound, eve.peer_id, alice.peer_id)
    token = InviteToken.decode(bound)
    for forged in (
        dataclasses.replace(token, peer_id=eve.peer_id),  # re-bound to another peer
        dataclasses.replace(token, expires_at=token.expires_at + 10**6),  # extended
        dataclasses.replace(token, signature=eve.sign(token.message())),  # signed by someone else
    ):
        with pytest.raises(InviteError, match="signature is not the coordinator's"):
            check_invite(forged.encode(), organizer.peer_id, forged.peer_id or alice.peer_id)
    expired = dataclasses.replace(token, expires_at=time.time() - 1)
    expired = dataclasses.replace(expired, signature=organizer.sign(expired.message())).encode()
    with pytest.raises(InviteError, match="expired"):
        check_invite(expired, organizer.peer_id, alice.peer_id)
    for damaged in ("", "hello", bound[:-20], bound.replace("athome-invite1.", "athome-invite1.!!")):
        with pytest.raises(InviteError):
            check_invite(damaged, organizer.peer_id, alice.peer_id)
    with pytest.raises(InviteError, match="positive number of hours"):
        issue_invite(organizer, expires_in_hours=0)
    with pytest.raises(InviteError, match="not an Ed25519 peer ID"):
        issue_invite(organizer, peer_id="QmNotEd25519")


def _call(coroutine, timeout: float = 60):
    return RemoteExpertWorker.run_coroutine(asyncio.wait_for(coroutine, timeout))


def _refusal(coroutine) -> str:
    with pytest.raises(P2PHandlerError) as caught:
        _call(coroutine)
    return str(caught.value)


def test_invite_only_run_admits_members_and_refuses_outsiders_everywhere(tmp_path: Path):
    from athome.averaging import RobustAverager
    from athome.peer.server import BadRequest, DirectExpertServicer, ExpertStateServicer, ValidatingConnectionHandler

    organizer, alice, bob, eve = (Identity.load_or_create(tmp_path / f"{n}.key") for n in ("c", "a", "b", "e"))
    invites = {who.peer_id: issue_invite(organizer, peer_id=who.peer_id, expires_in_hours=1) for who in (alice, bob)}
    nodes, averager, p2ps = [], None, []
    try:
        coordinator = start_dht(organizer, host_maddrs=LOOPBACK, run_name="demo", invite_only=True)
        nodes.append(coordinator)
        address = [str(m) for m in coordinator.get_visible_maddrs()]
        members = {}
        for who in (alice, bob):
            members[who.peer_id] = start_dht(who, host_maddrs=LOOPBACK, run_name="demo", initial_peers=address,
                                             invite=invites[who.peer_id], coordinator_id=organizer.peer_id)
            nodes.append(members[who.peer_id])
            assert publish_membership(members[who.peer_id], "demo", invites[who.peer_id], ttl=60)
        alice_dht, bob_dht = members[alice.peer_id], members[bob.peer_id]

        # DHT: members read and write; an outsider's node is refused at bootstrap, with the reason and the fix
        assert store_record(bob_dht, run_key("demo", "peers"), PeerRecord(role="trainer", started_at=time.time()), 60)
        assert bob.peer_id in get_records(alice_dht, run_key("demo", "peers"), PeerRecord)
        with pytest.raises(NotAdmitted, match="invite-only.*no invitation.*peer invite.*--invite TOKEN"):
            start_dht(eve, host_maddrs=LOOPBACK, run_name="demo", initial_peers=address)
        with pytest.raises(InviteError, match="not " + eve.peer_id):  # a stolen bound invitation is useless
            start_dht(eve, host_maddrs=LOOPBACK, run_name="demo", initial_peers=address,
                      invite=invites[alice.peer_id], coordinator_id=organizer.peer_id)

        # alice serves experts and averaging to members only (the policy is set before her averager forks)
        set_admission(Admission(alice_dht, run_key("demo", "members"), organizer.peer_id, alice.peer_id))
        state = ExpertStateServicer(lambda uid: {"weight": torch.ones(3)} if uid == "ffn.0.0" else None)
        direct = DirectExpertServicer({}, {}, max_batch_size=16)
        averager = RobustAverager([torch.arange(4.0)], alice_dht, prefix="invite_test", start=True,
                                  min_matchmaking_time=1.5, request_timeout=0.5)

        async def add_handlers():
            p2p = await alice_dht.replicate_p2p()
            await state.add_p2p_handlers(p2p)
            await direct.add_p2p_handlers(p2p)
            return p2p

        p2ps.append(_call(add_handlers()))
        alice_peer = PeerID.from_base58(alice.peer_id)
        alice_maddrs = [str(m) for m in alice_dht.get_visible_maddrs()]
        outsider = _call(P2P.create(initial_peers=alice_maddrs, host_maddrs=LOOPBACK))
        bob_p2p = _call(bob_dht.replicate_p2p())
        p2ps += [outsider, bob_p2p]

        async def download_state(p2p):
            stub = ExpertStateServicer.get_stub(p2p, alice_peer)
            return [message async for message in await stub.rpc_expert_state(runtime_pb2.ExpertUID(uid="ffn.0.0"))]

        async def expert_forward(p2p):
            return await DirectExpertServicer.get_stub(p2p, alice_peer).rpc_forward(
                runtime_pb2.ExpertRequest(uid="ffn.0.9"))

        async def averager_state(p2p):
            stub = RobustAverager.get_stub(p2p, alice_peer, namespace=averager.prefix)
            return [message async for message in await stub.rpc_download_state(averaging_pb2.DownloadRequest())]

        assert len(_call(download_state(bob_p2p))) >= 2  # a member is served
        answer = MSGPackSerializer.loads(_call(expert_forward(bob_p2p)).metadata)  # admitted, then checked
        assert "does not serve expert 'ffn.0.9'" in answer["errors"][0]
        assert _call(averager_state(bob_p2p))  # a member may download the averager's state

        for attempt in (download_state, expert_forward, averager_state):
            message = _refusal(attempt(outsider))
            assert "not a member of this invite-only run" in message and FIX in message, (attempt.__name__, message)

        # hivemind's expert protocol (the handler processes' servicer) checks the caller the same way
        handler = ValidatingConnectionHandler(alice_dht, {}, max_batch_size=16)
        for caller, admitted in ((bob.peer_id, True), (eve.peer_id, False)):
            context = P2PContext(handle_name="rpc_info", local_id=alice_peer, remote_id=PeerID.from_base58(caller))
            with pytest.raises(BadRequest if admitted else NotAdmitted):  # a member reaches the expert lookup
                _call(handler.rpc_info(runtime_pb2.ExpertUID(uid="ffn.0.0"), context))
    finally:
        set_admission(None)
        if averager is not None:
            averager.shutdown()
        for p2p in p2ps:  # in their event loop: a P2P garbage-collected outside it raises in __del__
            _call(p2p.shutdown())
        for node in reversed(nodes):
            node.shutdown()
