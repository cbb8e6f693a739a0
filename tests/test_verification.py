"""Verification: recomputation catches every simulated attack, bans follow, honest peers are left alone.

Most tests run an in-process swarm (``athome.verification.sim``): real model, corpus, recording, commitments,
bundles, recomputation, CenteredClip aggregation, re-verification and bans; the network is simulated (trainers run
one after another on shared dense parameters). Records and bundle transfer are also tested on real DHT nodes on
127.0.0.1.
"""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from athome.dht import Identity, start_dht, store_record
from athome.dht.records import owner_subkey
from athome.dht.schemas import BanEntry, BanRecord, run_key
from athome.verification.attacks import HOST_KINDS, TRAINER_KINDS, AttacksDisabled, AttackSpec, TrainerAttack
from athome.verification.board import DHTBoard
from athome.verification.calibration import (CPU_TOLERANCES, CROSS_PLATFORM_CPU, CUDA_PLATFORM, METRICS,
                                              tolerances_for)
from athome.verification.commitments import CommitmentBook, CommitmentWindow, commit
from athome.verification.expert_checks import GradNormGuard
from athome.verification.proof import StepProof
from athome.verification.sim import SimConfig, SimSwarm
from athome.verification.validator import ProofUnavailable

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
TINY = dict(d_model=32, n_layers=2, n_heads=2, seq_len=16, experts_per_layer=4, expert_hidden=64, top_k=2)
MAX_LATENCY = 8  # steps from the first attacked step to the ban, for attacks present on every step


def tiny(**overrides) -> SimConfig:
    settings = dict(model=dict(TINY), n_trainers=3, batch_size=4, data_bytes=300_000)
    settings.update(overrides)
    return SimConfig(**settings)


@pytest.fixture
def attacks_allowed(monkeypatch):
    monkeypatch.setenv("ATHOME_ALLOW_ATTACKS", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and OpenMP threads spin badly when the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- bundles
def test_bundle_round_trip_and_honest_replay_is_within_tolerance():
    swarm = SimSwarm(tiny(validate=False))
    proofs = [proof for _ in range(3) for proof in swarm.step().proofs]
    proof = proofs[-1]
    again = StepProof.from_bytes(proof.to_bytes())
    assert (again.params_hash, again.grad_hash, again.io_hash) == (proof.params_hash, proof.grad_hash, proof.io_hash)
    assert again.nbytes() == proof.nbytes()
    # the recorder shares parameters between steps of one epoch and bounds memory
    assert swarm.trainers[0].recorder.memory_bytes() > 0

    from athome.verification.replay import Replayer, compare

    replayer = Replayer(swarm.run_config.model, swarm.corpus, grad_clip=swarm.run_config.optimizer.grad_clip)
    for item in proofs:
        distances = compare(item, replayer.recompute(item))
        tolerance = CPU_TOLERANCES[item.precision]
        assert distances.grad <= tolerance.grad and distances.loss <= tolerance.loss
        assert distances.grad_outputs <= tolerance.grad_outputs


def test_a_slight_deviation_on_a_single_step_is_caught():
    """0.1% on one step: the comparison is per step and per tensor, nothing is averaged away."""
    from athome.verification.commitments import SeenCommitment
    from athome.verification.validator import StepChecker

    swarm = SimSwarm(tiny(validate=False, n_trainers=1))
    proofs = [p for _ in range(4) for p in swarm.step().proofs]
    checker = StepChecker(swarm.run_config, swarm.corpus)

    def seen(proof: StepProof) -> SeenCommitment:
        return SeenCommitment(proof.peer_id, proof.session, commit(proof), proof.precision, proof.device,
                              swarm.corpus.fingerprint, first_seen=0.0, platform=checker.platform)

    assert all(checker.check(seen(p), p).passed for p in proofs)
    cheat = StepProof(**{**{f: getattr(proofs[2], f) for f in (
        "peer_id", "session", "step", "seed", "epoch", "loss", "samples", "precision", "device", "params", "layers")},
        "grads": [g.clone() for g in proofs[2].grads]})
    cheat.grads[3].mul_(1.001)  # one small tensor (a LayerNorm bias), 0.1%, committed consistently (hashes match)
    result = checker.check(seen(cheat), cheat)
    assert result.failed and result.kind == "gradient", result
    # from another platform (looser tolerances) the same step passes: what "cross" costs in sensitivity
    assert checker.check(dataclasses.replace(seen(cheat), platform="cpu:OTHER:torch0"), cheat).passed


# ---------------------------------------------------------------------------------------------- attacks
def test_attacks_need_the_testing_switch(monkeypatch):
    monkeypatch.delenv("ATHOME_ALLOW_ATTACKS", raising=False)
    with pytest.raises(AttacksDisabled, match="ATHOME_ALLOW_ATTACKS=1"):
        TrainerAttack("sign_flip")
    with pytest.raises(ValueError, match="unknown attack"):
        AttackSpec.parse("teleport")
    assert AttackSpec.parse("slight:0.05@0.2+30") == AttackSpec("slight", 0.05, 0.2, 30)


def _run_until_banned(config: SimConfig, target: str, max_steps: int):
    swarm = SimSwarm(config)
    peer_id = {p.name: p.peer_id for p in [*swarm.trainers, *swarm.hosts]}[target]
    for _ in range(max_steps):
        swarm.step()
        if peer_id in swarm.bans:
            break
    return swarm, peer_id


@pytest.mark.parametrize("kind", sorted(TRAINER_KINDS))
def test_each_trainer_attack_is_caught_and_the_attacker_banned(kind, attacks_allowed):
    swarm, attacker = _run_until_banned(tiny(trainer_attacks={0: kind}), "trainer-0", 16)
    assert attacker in swarm.bans, f"{kind} was not caught"
    attack = swarm.trainers[0].attack
    first_attacked = attack.attacked_steps[0] if attack.attacked_steps else 0
    assert swarm.bans[attacker] - first_attacked <= MAX_LATENCY
    assert set(swarm.bans) == {attacker}, f"honest peers banned: {swarm.banned_kinds}"


@pytest.mark.parametrize("kind", sorted(HOST_KINDS))
def test_each_host_attack_is_caught_and_the_host_banned(kind, attacks_allowed):
    swarm, host = _run_until_banned(tiny(host_attacks={0: kind}, audit_every=1), "host-0", 8)
    assert host in swarm.bans, f"{kind} was not caught"
    assert swarm.bans[host] <= MAX_LATENCY
    assert set(swarm.bans) == {host}, f"honest peers banned: {swarm.banned_kinds}"


def test_poisoned_grad_outputs_are_refused_by_the_host_guard():
    guard = GradNormGuard()
    generator = torch.Generator().manual_seed(0)
    honest = [torch.randn(16, 32, generator=generator) * 1e-3 * (1 + i % 5) for i in range(64)]
    assert all(guard.check("ffn.0.0", g) is None for g in honest)
    reason = guard.check("ffn.0.0", honest[0] * -1000)
    assert reason is not None and "outlier" in reason
    assert guard.check("ffn.0.0", torch.zeros(16, 32)) is None  # small is never refused


# ---------------------------------------------------------------------------------------------- honest peers
def test_no_honest_peer_is_banned_over_500_bf16_checks():
    """Every step of every trainer is checked (rate 1) for 100 steps, with host audits. (Numeric noise across thread
    counts and CPU kernels is measured by ``python -m athome.verification.calibration``, in fresh processes.)"""
    swarm = SimSwarm(tiny(precision="bf16", n_trainers=5, check_rate=1.0, audit_every=10, batch_size=2,
                          model=dict(TINY, d_model=16, expert_hidden=32, seq_len=8)))
    while swarm.validator.checks < 500:
        swarm.step()
    assert swarm.bans == {}
    assert swarm.validator.failures == 0
    results = [r for r in swarm.validator.results if r.verdict != "inconclusive"]
    assert len(results) >= 500
    worst = max(r.figures["grad"] for r in results)
    assert worst <= CPU_TOLERANCES["bf16"].grad
    assert swarm.evaluate() < 5.3  # it trained (from ~5.55)


def test_tolerances_follow_the_pair_of_platforms():
    cpu, other_cpu = "cpu:AVX2:torch2.13.0+cpu", "cpu:AVX512:torch2.13.0+cpu"
    gpu = "cuda:NVIDIAH10080GBHBM3:sm90:torch2.11.0+cu130"
    for precision in ("fp32", "bf16", "fp16"):
        same, cross = tolerances_for(precision, cpu, cpu), tolerances_for(precision, cpu, other_cpu)
        with_gpu = tolerances_for(precision, gpu, cpu)
        assert same == CPU_TOLERANCES[precision] and cross == CROSS_PLATFORM_CPU[precision]
        assert with_gpu == CUDA_PLATFORM[precision] == tolerances_for(precision, cpu, gpu)
        assert tolerances_for(precision, gpu, gpu) == same  # the same GPU, kernels and torch: thread noise only
        for metric in METRICS:  # each wider profile is never tighter
            assert getattr(same, metric) <= getattr(cross, metric) <= getattr(with_gpu, metric)
    with pytest.raises(ValueError, match="precision"):
        tolerances_for("int8", cpu, cpu)


def test_loss_with_an_attacker_stays_within_5_percent_of_a_clean_run(attacks_allowed):
    steps = 30
    clean = SimSwarm(tiny(n_trainers=4, seed=1))
    clean.run(steps)
    attacked = SimSwarm(tiny(n_trainers=4, seed=1, trainer_attacks={3: "sign_flip"}, host_attacks={2: "wrong_outputs"},
                             audit_every=2))
    attacked.run(steps)
    assert set(attacked.bans) == {attacked.trainers[3].peer_id, attacked.hosts[2].peer_id}
    clean_loss, attacked_loss = clean.evaluate(), attacked.evaluate()
    assert clean_loss < 4.5  # both trained from ~5.5 nats
    assert abs(attacked_loss - clean_loss) <= 0.05 * clean_loss, (clean_loss, attacked_loss)


def test_a_restart_is_not_an_equivocation_and_unreachable_peers_are_not_banned_at_once():
    from athome.verification.board import MemoryHub
    from athome.verification.sim import fake_peer_id

    swarm = SimSwarm(tiny(validate=False, n_trainers=1))
    proof = swarm.step().proofs[0]
    book = CommitmentBook()
    window = CommitmentWindow(precision="bf16", device="cpu", corpus=swarm.corpus.fingerprint, session=1)
    window.add(commit(proof))
    assert len(book.update({proof.peer_id: window.record()}).new) == 1
    restarted = CommitmentWindow(precision="bf16", device="cpu", corpus=swarm.corpus.fingerprint, session=2)
    other = commit(swarm.step().proofs[0]).model_copy(update=dict(step=proof.step))
    restarted.add(other)
    update = book.update({proof.peer_id: restarted.record()})
    assert update.equivocations == [] and update.new_sessions == [proof.peer_id]
    rewritten = CommitmentWindow(precision="bf16", device="cpu", corpus=swarm.corpus.fingerprint, session=2)
    rewritten.add(other.model_copy(update=dict(loss=other.loss + 1)))
    assert len(book.update({proof.peer_id: rewritten.record()}).equivocations) == 1

    # a trainer that cannot be reached is inconclusive, until it has been unreachable max_unreachable times
    from athome.verification.trust import TrustSampler
    from athome.verification.validator import StepChecker, Validator

    class Unreachable:
        def fetch(self, holder, owner, step):
            raise ProofUnavailable("timeout")

    hub = MemoryHub(fake_peer_id("coordinator"))
    validator = Validator(hub.board(hub.coordinator_id), Unreachable(), StepChecker(swarm.run_config, swarm.corpus),
                          TrustSampler(1.0, seed=0), accuse=False, max_unreachable=3)
    trainer_window = CommitmentWindow(precision="bf16", device="cpu", corpus=swarm.corpus.fingerprint, session=5)
    verdicts = []
    for step in range(3):
        trainer_window.add(commit(proof).model_copy(update=dict(step=step)))
        hub.board(proof.peer_id).publish_commitments(trainer_window.record())
        verdicts += [(r.verdict, r.kind) for r in validator.poll()]
    assert verdicts == [("inconclusive", "unreachable")] * 2 + [("fail", "missing_proof")]


# ---------------------------------------------------------------------------------------------- real DHT
@pytest.fixture
def three_nodes(tmp_path):
    names = ("coordinator", "trainer", "liar")
    identities = [Identity.load_or_create(tmp_path / f"{name}.key") for name in names]
    first = start_dht(identities[0], host_maddrs=LOOPBACK, run_name="demo")
    others = [start_dht(identity, host_maddrs=LOOPBACK, run_name="demo",
                        initial_peers=[str(m) for m in first.get_visible_maddrs()]) for identity in identities[1:]]
    nodes = [first, *others]
    yield identities, nodes
    for node in reversed(nodes):
        node.shutdown()


def test_commitments_and_bans_on_a_real_dht_and_bundles_over_p2p(three_nodes):
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.utils import get_dht_time

    from athome.verification.proofs import ProofServicer, RemoteProofSource

    (coordinator, trainer, liar), (coordinator_dht, trainer_dht, liar_dht) = three_nodes
    boards = {name: DHTBoard(dht, "demo", coordinator.peer_id) for name, dht in
              (("coordinator", coordinator_dht), ("trainer", trainer_dht), ("liar", liar_dht))}

    swarm = SimSwarm(tiny(validate=False, n_trainers=1))
    proof = swarm.step().proofs[0]
    proof.peer_id = trainer.peer_id
    window = CommitmentWindow(precision=proof.precision, device="cpu", corpus=swarm.corpus.fingerprint,
                              session=proof.session)
    window.add(commit(proof))
    assert boards["trainer"].publish_commitments(window.record())
    records = boards["coordinator"].commitments()
    assert records[trainer.peer_id].entries[0].grad_hash == proof.grad_hash

    # nobody can commit in the trainer's name, or wipe the key
    forged = window.record().model_copy(update=dict(entries=[]))
    key = run_key("demo", "commitments")
    assert not liar_dht.store(key, forged.model_dump(), get_dht_time() + 60, subkey=owner_subkey(trainer.peer_id))
    assert not liar_dht.store(key, "wipe", get_dht_time() + 60)
    assert len(boards["coordinator"].commitments()[trainer.peer_id].entries) == 1

    # only the coordinator's ban record counts; a ban "signed" by anyone else is ignored
    fake_ban = BanRecord(bans=[BanEntry(peer=trainer.peer_id, kind="gradient", reason="forged", at=time.time())])
    assert store_record(liar_dht, run_key("demo", "bans"), fake_ban, ttl=60)
    assert boards["trainer"].bans() == {}
    real_ban = BanRecord(bans=[BanEntry(peer=liar.peer_id, kind="false_accusations", reason="3 refuted", at=time.time())])
    assert boards["coordinator"].publish_bans(real_ban)
    assert set(boards["trainer"].bans()) == {liar.peer_id}

    # bundles travel over p2p; "not found" and "unreachable" are told apart
    servicer = ProofServicer(lambda owner, step: proof if (owner, step) == (trainer.peer_id, proof.step) else None)
    server_p2p = RemoteExpertWorker.run_coroutine(trainer_dht.replicate_p2p())
    client_p2p = RemoteExpertWorker.run_coroutine(coordinator_dht.replicate_p2p())
    try:
        RemoteExpertWorker.run_coroutine(servicer.add_p2p_handlers(server_p2p))
        source = RemoteProofSource(client_p2p, timeout=20)
        fetched = source.fetch(trainer.peer_id, trainer.peer_id, proof.step)
        assert fetched is not None and fetched.grad_hash == proof.grad_hash and fetched.io_hash == proof.io_hash
        assert source.fetch(trainer.peer_id, trainer.peer_id, proof.step + 1) is None
        with pytest.raises(ProofUnavailable):
            source.fetch(liar.peer_id, trainer.peer_id, proof.step)  # the liar serves no proofs at all
    finally:
        for p2p in (server_p2p, client_p2p):
            RemoteExpertWorker.run_coroutine(p2p.shutdown())


# ---------------------------------------------------------------------------------------------- hints
def test_round_reports_become_hints_and_a_suspect_is_checked_first_but_never_banned_for_it():
    """Trainers name the senders their reducer clipped heavily (RoundReport.suspects); the validator then checks the
    suspect's next steps ahead of everyone else's, even though its record is long and clean. The suspect is honest
    here: its checks pass and nothing else happens to it (clipping is not proof)."""
    from athome.averaging import RoundReport
    from athome.averaging.reducer import SenderEvidence
    from athome.dht.schemas import Suspicion, SuspicionRecord
    from athome.verification.suspicions import SuspicionBook

    swarm = SimSwarm(tiny(n_trainers=3, check_rate=0.0, hints=False))  # this test publishes the hints itself
    suspect, reporter, newcomer = (t.peer_id for t in swarm.trainers)
    validator = swarm.validator
    validator.max_checks_per_poll = 1
    for peer in (suspect, reporter):
        validator.sampler.trust(peer).clean_streak = 10**9  # trusted: sampled with probability ~1e-9
    swarm.run(2)  # the newcomer's steps are all queued and checked, one per poll
    assert {r.peer for r in validator.results} == {newcomer}

    book = SuspicionBook(reporter)
    report = RoundReport(group_id="g", peers=(suspect, reporter, newcomer), status="ok", evidence={
        suspect: SenderEvidence(elements=100, clipped_elements=90, min_scale=0.01),
        newcomer: SenderEvidence(elements=100, clipped_elements=0),
        reporter: SenderEvidence(elements=100, rejected="non-finite part"),  # itself: never reported
    })
    assert book.note_round(report) == [suspect]
    record = book.record()
    assert [s.peer for s in record.suspects] == [suspect] and record.suspects[0].clip_fraction == pytest.approx(0.9)
    swarm.hub.board(reporter).publish_suspicions(record)
    # noise that must not count: a self-report, and a banned reporter's hint
    swarm.hub.board(newcomer).publish_suspicions(SuspicionRecord(suspects=[
        Suspicion(peer=newcomer, rounds=1, clip_fraction=1.0, at=time.time())]))

    before = len(validator.results)
    swarm.run(3)
    checked = [r.peer for r in validator.results[before:]]
    assert checked == [suspect] * 3, checked  # ahead of the newcomer, whose steps are queued too
    swarm.run(2)  # the hint is spent (and the same record does not count twice): back to the newcomer
    assert [r.peer for r in validator.results[before + 3:]] == [newcomer] * 2
    assert all(r.passed for r in validator.results) and not swarm.bans  # a hint alone accuses nobody

    swarm.authority.ban(reporter, "gradient", "test")  # a banned reporter's fresh hints are ignored
    swarm.hub.board(reporter).publish_suspicions(SuspicionRecord(suspects=[
        Suspicion(peer=suspect, rounds=2, clip_fraction=1.0, at=time.time() + 1)]))
    assert validator.poll_suspicions() == []


def test_suspicion_records_are_signed_dht_records(three_nodes):
    from athome.dht.schemas import Suspicion, SuspicionRecord

    (coordinator, trainer, liar), (coordinator_dht, trainer_dht, liar_dht) = three_nodes
    record = SuspicionRecord(suspects=[Suspicion(peer=liar.peer_id, rounds=1, clip_fraction=0.9, at=time.time())])
    assert DHTBoard(trainer_dht, "demo", coordinator.peer_id).publish_suspicions(record)
    seen = DHTBoard(coordinator_dht, "demo", coordinator.peer_id).suspicions()
    assert seen[trainer.peer_id].suspects[0].peer == liar.peer_id


def test_hints_alone_get_a_trusted_poisoner_checked_and_banned(attacks_allowed):
    """Check rate 0 and a long clean record: sampling would never check the attacker. Its x-1000 contributions are
    clipped by CenteredClip, the other trainers publish that as hints, the hinted checks fail, and it is banned."""
    swarm = SimSwarm(tiny(n_trainers=4, check_rate=0.0, audit_every=0, trainer_attacks={0: "sign_flip"}))
    for trainer in swarm.trainers:
        swarm.validator.sampler.trust(trainer.peer_id).clean_streak = 10**9
    attacker = swarm.trainers[0].peer_id
    swarm.run(4)
    assert attacker in swarm.bans and len(swarm.bans) == 1, swarm.bans
    assert {r.peer for r in swarm.validator.results} == {attacker}  # nobody else was suspected

    quiet = SimSwarm(tiny(n_trainers=4, check_rate=0.0, audit_every=0, trainer_attacks={0: "sign_flip"}, hints=False))
    for trainer in quiet.trainers:
        quiet.validator.sampler.trust(trainer.peer_id).clean_streak = 10**9
    quiet.run(4)
    assert not quiet.bans  # without hints nothing checked it


def test_host_audits_use_real_requests_from_verified_steps(attacks_allowed):
    """After checks pass, audits probe experts with real rows and the gradients trainers sent for them (b"P"
    probes): a training probe applies a real gradient, not a random direction, and a non-training host is still
    caught, re-verified on the same probe and banned."""
    from athome.verification.expert_checks import ProbePool, decode_probe, decode_probe_grads, encode_probe

    swarm = SimSwarm(tiny(host_attacks={0: "no_train"}, audit_every=0, check_rate=1.0))
    pool = swarm.validator.checker.probe_pool
    swarm.run(2)
    uids = swarm.run_config.model.expert_uids()
    probes = {uid: pool.take(uid) for uid in uids}
    assert all(probe is not None and probe[:1] == b"P" for probe in probes.values()), probes
    d = swarm.run_config.model.d_model
    inputs, grads = decode_probe(probes[uids[0]], d), decode_probe_grads(probes[uids[0]], d)
    assert inputs.shape == grads.shape and inputs.shape[0] == pool.rows and float(grads.abs().max()) > 0
    assert decode_probe(encode_probe(inputs=inputs, grad_outputs=grads), d).equal(inputs)
    assert len(encode_probe(inputs=inputs, grad_outputs=grads)) <= 2048  # fits Accusation.probe
    assert ProbePool(swarm.run_config.model.model_copy(update=dict(d_model=1024))).rows == 0  # too wide: Gaussian

    findings = swarm.auditor.audit(uids, count=len(uids))
    no_train = [f for f in findings if f.kind == "no_train"]
    assert {f.peer for f in findings} == {swarm.hosts[0].peer_id} and len(no_train) == len(uids)
    assert all(f.probe[:1] == b"P" for f in no_train)
    issued = swarm.authority.report_host_findings(findings[:1])
    assert [entry.peer for entry in issued] == [swarm.hosts[0].peer_id]
