"""An in-process swarm with real tensors, for tests, benches and calibration.

What is real: the model (``MoETransformerLM``), batches from the run's corpus and ``batch_seed``, recording,
commitments, proof bundles (hashed; serialized where a test asks), the validator's recomputation, the coordinator's
re-verification and bans, CenteredClip aggregation (``athome.averaging.centered_clip``) and the hints trainers
derive from it (:mod:`athome.verification.suspicions`), host-side gradient guards,
replica cross-checks and training probes, and the attack simulators.

What is simulated: the network. Trainers run one after another in this process on one shared copy of the dense
parameters (honest trainers hold identical parameters at an epoch anyway); each step's contributions are aggregated
with CenteredClip and applied with AdamW, as one all-reduce round of ``hivemind.Optimizer`` would. Expert hosts are
objects holding one replica of every expert, trained on every backward call (Learning@Home), with periodic replica
averaging. The DHT is a :class:`~athome.verification.board.MemoryHub` (no signatures: a writer is fixed per board,
which is what signatures guarantee in the DHT).
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from athome.averaging.averager import RoundReport
from athome.averaging.reducer import SenderEvidence, centered_clip
from athome.config import DataConfig, ModelConfig, OptimizerConfig, RunConfig
from athome.dht.schemas import AccusationRecord, Accusation
from athome.model.expert import build_expert
from athome.model.lm import MoETransformerLM
from athome.trainer.data import Corpus, batch_seed, load_corpus
from athome.verification.attacks import HostAttack, TrainerAttack
from athome.verification.bans import BanAuthority
from athome.verification.board import MemoryHub
from athome.verification.calibration import Tolerances
from athome.verification.commitments import CommitmentWindow, commit
from athome.verification.expert_checks import ExpertAuditor, GradNormGuard, ProbePool
from athome.verification.proof import StepProof
from athome.verification.recording import RecordingDispatcher, StepRecorder
from athome.verification.replay import autocast_for
from athome.verification.suspicions import SuspicionBook
from athome.verification.trust import TrustSampler
from athome.verification.validator import LocalProofSource, StepChecker, Validator

logger = logging.getLogger(__name__)

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
SMALL_MODEL = dict(d_model=64, n_layers=2, n_heads=4, seq_len=32, experts_per_layer=4, expert_hidden=128, top_k=2)


def fake_peer_id(name: str) -> str:
    """A deterministic, well-formed (base58, 52 characters) peer ID for a simulated peer."""
    digest = hashlib.blake2b(name.encode(), digest_size=44).digest()
    return "12D3KooW" + "".join(_BASE58[b % 58] for b in digest)


@dataclass
class SimConfig:
    model: dict = field(default_factory=lambda: dict(SMALL_MODEL))
    n_trainers: int = 4
    n_hosts: int = 3
    batch_size: int = 8
    precision: str = "bf16"
    device: str = "cpu"
    dense_lr: float = 3e-3
    expert_lr: float = 3e-3
    grad_clip: float = 1.0
    aggregator: str = "centered_clip"  # or "mean"
    clip_tau: float = 1.0
    clip_iterations: int = 5
    replica_average_every: int = 10
    record: bool = True  # False: no recording or commitments at all (the baseline for overhead)
    validate: bool = True
    check_rate: float = 0.05
    audit_every: int = 5  # host audits every N steps (0: never)
    tolerances: Optional[Tolerances] = None
    validator_threads: Optional[int] = None
    trainer_attacks: Dict[int, str] = field(default_factory=dict)  # trainer index -> attack spec
    host_attacks: Dict[int, str] = field(default_factory=dict)  # host index -> attack spec
    max_false_accusations: int = 3
    hints: bool = True  # trainers publish heavily clipped senders as hints (verification.suspicions), as real ones do
    heavy_clip_scale: float = 0.5  # a sender counts as heavily clipped below this CenteredClip scale (the averager's)
    real_probes: bool = True  # host audits use real requests from verified steps (expert_checks.ProbePool)
    data_bytes: int = 1_000_000
    seed: int = 0

    def run_config(self) -> RunConfig:
        return RunConfig(
            name="sim", model=ModelConfig(**self.model), batch_size=self.batch_size,
            optimizer=OptimizerConfig(dense_lr=self.dense_lr, expert_lr=self.expert_lr, grad_clip=self.grad_clip),
            data=DataConfig(max_bytes=self.data_bytes, validation_fraction=0.05),
        )


def sim_corpus(config: RunConfig) -> Corpus:
    return load_corpus(config.data)


class RequestRefused(RuntimeError):
    pass


class SimHost:
    """One expert host with a replica of every expert; each backward call trains the expert (fp32 AdamW)."""

    def __init__(self, name: str, config: RunConfig, attack: Optional[HostAttack] = None):
        self.name, self.peer_id, self.attack = name, fake_peer_id(name), attack
        self.experts = {uid: build_expert(config.model, uid) for uid in config.model.expert_uids()}
        opt = config.optimizer
        self.optimizers = {uid: torch.optim.AdamW(e.parameters(), lr=opt.expert_lr, betas=tuple(opt.betas))
                           for uid, e in self.experts.items()}
        self.grad_clip = opt.grad_clip
        self.guard = GradNormGuard()
        self.banned = False
        if attack is not None:
            attack.poison([p for e in self.experts.values() for p in e.parameters()])

    def forward(self, uid: str, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            outputs = self.experts[uid](inputs.float())
        return self.attack.outputs(outputs) if self.attack is not None else outputs

    def backward(self, uid: str, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
        problem = self.guard.check(uid, grad_outputs)
        if problem:
            raise RequestRefused(problem)
        expert, optimizer = self.experts[uid], self.optimizers[uid]
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            x = inputs.float().detach().requires_grad_(True)
            expert(x).backward(grad_outputs.float())
        if self.attack is None or self.attack.trains:
            torch.nn.utils.clip_grad_norm_(expert.parameters(), self.grad_clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return x.grad


class SimExpertClient:
    """:class:`~athome.verification.expert_checks.ExpertClient` over the simulated hosts."""

    def __init__(self, hosts: Sequence[SimHost]):
        self.hosts = {host.peer_id: host for host in hosts}

    def forward(self, peer: str, uid: str, inputs: torch.Tensor) -> torch.Tensor:
        return self.hosts[peer].forward(uid, inputs)

    def backward(self, peer: str, uid: str, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
        return self.hosts[peer].backward(uid, inputs, grad_outputs)

    def state(self, peer: str, uid: str) -> Dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.hosts[peer].experts[uid].named_parameters()}


class SimExpertLayer:
    """A Dispatcher over the simulated hosts: one request per chosen expert, to a random live replica."""

    def __init__(self, uids: Sequence[str], hosts: Sequence[SimHost], rng: random.Random):
        self.uids, self.hosts, self.rng = list(uids), hosts, rng
        self.last_answered_fraction = 1.0

    def __call__(self, x: torch.Tensor, expert_index: torch.Tensor):
        return _SimCall.apply(x, expert_index, self)


class _SimCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_index, layer: SimExpertLayer):
        num_tokens, k = expert_index.shape
        wire = x.detach().to("cpu", torch.float32)  # the hosts compute on the CPU, as the trainer's may be a GPU
        flat = expert_index.reshape(-1).cpu()
        token_of_slot = torch.arange(num_tokens).repeat_interleave(k)
        slot_of_slot = torch.arange(k).repeat(num_tokens)
        outputs = torch.zeros(num_tokens, k, x.shape[-1])
        answered = torch.zeros(num_tokens, k, dtype=torch.bool)
        live = [host for host in layer.hosts if not host.banned]
        calls = []
        for expert in torch.unique(flat).tolist():
            if not live:
                break
            selected = (flat == expert).nonzero(as_tuple=True)[0]
            tokens, slots = token_of_slot[selected], slot_of_slot[selected]
            host, uid = layer.rng.choice(live), layer.uids[expert]
            inputs = wire.index_select(0, tokens)
            outputs[tokens, slots] = host.forward(uid, inputs)
            answered[tokens, slots] = True
            calls.append((uid, host, tokens, slots, inputs))
        layer.last_answered_fraction = float(answered.float().mean()) if answered.numel() else 1.0
        ctx.calls, ctx.x_meta = calls, (x.shape, x.dtype, x.device)
        answered = answered.to(x.device)
        ctx.mark_non_differentiable(answered)
        return outputs.to(device=x.device, dtype=x.dtype), answered

    @staticmethod
    def backward(ctx, grad_outputs, _):
        shape, dtype, device = ctx.x_meta
        grad_x = torch.zeros(shape, dtype=torch.float32)
        wire = grad_outputs.detach().to("cpu", torch.float32)
        for uid, host, tokens, slots, inputs in ctx.calls:
            try:
                grad_x.index_add_(0, tokens, host.backward(uid, inputs, wire[tokens, slots]))
            except RequestRefused:
                pass  # like a host answering with an error: that expert's part of the gradient is missing
        return grad_x.to(device=device, dtype=dtype), None, None


@dataclass
class SimTrainer:
    name: str
    peer_id: str
    recorder: StepRecorder
    window: CommitmentWindow
    attack: Optional[TrainerAttack] = None
    banned_at: Optional[int] = None
    steps: int = 0
    suspicions: Optional[SuspicionBook] = None


@dataclass
class StepReport:
    step: int
    proofs: List[StepProof] = field(default_factory=list)
    losses: Dict[str, float] = field(default_factory=dict)
    new_bans: List[str] = field(default_factory=list)
    train_seconds: float = 0.0
    verification_seconds: float = 0.0  # recording + commitments (trainer side)
    validation_seconds: float = 0.0  # validators and the coordinator


class SimSwarm:
    """See module docstring. ``step()`` runs one swarm step; ``evaluate()`` the validation loss."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.run_config = config.run_config()
        self.corpus = sim_corpus(self.run_config)
        self.device = torch.device(config.device)
        self.rng = random.Random(config.seed)
        mc = self.run_config.model
        self.hosts = [
            SimHost(f"host-{i}", self.run_config,
                    HostAttack(config.host_attacks[i], seed=config.seed + i) if i in config.host_attacks else None)
            for i in range(config.n_hosts)
        ]
        uids = mc.expert_uids()
        per_layer = mc.experts_per_layer
        self.layers = [SimExpertLayer(uids[l * per_layer:(l + 1) * per_layer], self.hosts, self.rng)
                       for l in range(mc.n_layers)]
        self.scratch = StepRecorder("scratch")
        if config.record:
            self.dispatchers = [RecordingDispatcher(layer, self.scratch, index) for index, layer in enumerate(self.layers)]
        else:
            self.dispatchers = list(self.layers)
        self.model = MoETransformerLM(mc, lambda l: self.dispatchers[l]).to(self.device)
        self.params = self.model.dense_parameters()
        opt = self.run_config.optimizer
        self.optimizer = torch.optim.AdamW(self.params, lr=opt.dense_lr, betas=tuple(opt.betas))
        self.epoch = 0
        self.step_index = 0

        self.coordinator_id = fake_peer_id("coordinator")
        self.hub = MemoryHub(self.coordinator_id)
        self.trainers: List[SimTrainer] = []
        for i in range(config.n_trainers):
            name = f"trainer-{i}"
            peer_id = fake_peer_id(name)
            spec = config.trainer_attacks.get(i)
            attack = TrainerAttack(spec, seed=config.seed + 100 + i) if spec else None
            recorder = StepRecorder(peer_id, precision=config.precision, device=config.device,
                                    session=config.seed * 1000 + i)
            recorder.tamper = attack
            window = CommitmentWindow(precision=config.precision, device=config.device,
                                      corpus=self.corpus.fingerprint, size=16, session=recorder.session)
            self.trainers.append(SimTrainer(name, peer_id, recorder, window, attack,
                                            suspicions=SuspicionBook(peer_id)))

        self.proofs = LocalProofSource()
        self.forged_evidence: Dict[tuple, StepProof] = {}  # what false accusers serve as "evidence"
        for trainer in self.trainers:
            self.proofs.add(trainer.peer_id, lambda owner, step, t=trainer: (
                t.recorder.get(step) if owner == t.peer_id else self.forged_evidence.get((t.peer_id, owner, step))))
        self.validator: Optional[Validator] = None
        self.authority: Optional[BanAuthority] = None
        self.auditor: Optional[ExpertAuditor] = None
        if config.validate:
            checker = StepChecker(self.run_config, self.corpus, tolerances=config.tolerances, device=config.device,
                                  threads=config.validator_threads)
            sampler = TrustSampler(base_rate=config.check_rate, seed=config.seed + 7)
            self.validator = Validator(self.hub.board(self.coordinator_id), self.proofs, checker, sampler, accuse=False)
            self.proofs.add(self.coordinator_id, self.validator.lookup)
            checker.probe_pool = ProbePool(mc, seed=config.seed + 13) if config.real_probes else None
            self.auditor = ExpertAuditor(SimExpertClient(self.hosts), self._replicas, mc, seed=config.seed + 11,
                                         probe_pool=checker.probe_pool)
            self.authority = BanAuthority(self.validator, auditor=self.auditor,
                                          max_false_accusations=config.max_false_accusations)
        self.bans: Dict[str, int] = {}  # peer -> step banned
        self.banned_kinds: Dict[str, str] = {}
        self.totals = dict(train=0.0, verification=0.0, validation=0.0, steps=0)

    # -------------------------------------------------------------------------------------------- helpers
    def _replicas(self, uid: str) -> List[str]:
        return [host.peer_id for host in self.hosts if not host.banned]

    def active_trainers(self) -> List[SimTrainer]:
        return [t for t in self.trainers if t.banned_at is None]

    def peer_name(self, peer_id: str) -> str:
        for peer in [*self.trainers, *self.hosts]:
            if peer.peer_id == peer_id:
                return peer.name
        return peer_id

    # -------------------------------------------------------------------------------------------- one step
    def _train_one(self, trainer: SimTrainer, step: int, report: StepReport) -> Optional[torch.Tensor]:
        cfg, attack = self.config, trainer.attack
        started = time.perf_counter()
        if attack is not None:
            attack.begin_step(step)
            if attack.kind == "false_accusation":
                self._accuse_falsely(trainer)
        for dispatcher in self.dispatchers:
            if isinstance(dispatcher, RecordingDispatcher):
                dispatcher.recorder = trainer.recorder
        trainer.recorder.begin_step()
        seed = batch_seed(self.run_config.name, trainer.peer_id, step)
        batch = self.corpus.batch(seed, cfg.batch_size, self.run_config.model.seq_len).to(self.device)
        params_context = attack.params_context(self.params, self.run_config.optimizer.dense_lr) if attack else _null()
        with params_context:
            with autocast_for(cfg.precision, self.device):
                cross_entropy, aux = attack.losses(self.model, batch) if attack else self.model.losses(batch)
                loss = cross_entropy + self.model.aux_coef * aux
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.run_config.optimizer.grad_clip)
            if attack is not None:
                attack.corrupt_grads(self.params)
            claimed = attack.claimed_loss(cross_entropy.item()) if attack else cross_entropy.item()
            verification_started = time.perf_counter()
            if cfg.record:
                proof = trainer.recorder.finish_step(self.model, step=step, seed=seed, epoch=self.epoch, loss=claimed,
                                                     samples=cfg.batch_size, params=self.params)
                trainer.window.add(commit(proof))
                if attack is not None and attack.kind == "equivocation" and attack.on:
                    self._equivocate(trainer)
                self.hub.board(trainer.peer_id).publish_commitments(trainer.window.record())
                report.proofs.append(proof)
            report.verification_seconds += time.perf_counter() - verification_started
        contribution = torch.cat([p.grad.detach().reshape(-1).float() for p in self.params])
        self.model.zero_grad(set_to_none=True)
        report.losses[trainer.name] = claimed
        report.train_seconds += time.perf_counter() - started
        trainer.steps += 1
        return contribution

    def step(self) -> StepReport:
        step = self.step_index
        report = StepReport(step)
        contributions = []
        senders = self.active_trainers()
        for trainer in senders:
            contributions.append(self._train_one(trainer, step, report))
        report.train_seconds -= report.verification_seconds
        started = time.perf_counter()
        scales = None
        if contributions:
            stacked = torch.stack([c.cpu() for c in contributions])  # aggregated on the CPU, as averagers do
            if self.config.aggregator == "centered_clip" and len(contributions) > 1:
                aggregate, scales = centered_clip(stacked, torch.ones(len(contributions)), self.config.clip_tau,
                                                  self.config.clip_iterations)
            else:
                aggregate = stacked.mean(dim=0)
            offset = 0
            for p in self.params:
                p.grad = aggregate[offset:offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype, copy=True)
                offset += p.numel()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for trainer in self.trainers:
                if trainer.attack is not None and trainer.attack.kind == "free_ride_copy":
                    trainer.attack.last_aggregate = [p.detach().clone() for p in _split(aggregate, self.params)]
        self.epoch += 1
        if self.config.replica_average_every and (step + 1) % self.config.replica_average_every == 0:
            self._average_replicas()
        report.train_seconds += time.perf_counter() - started

        if self.authority is not None:
            started = time.perf_counter()
            issued = self.authority.poll()
            if self.config.audit_every and step % self.config.audit_every == 0:
                findings = self.auditor.audit(self.run_config.model.expert_uids(), count=1)
                issued += self.authority.report_host_findings(findings)
            for entry in issued:
                self._apply_ban(entry.peer, entry.kind, step)
                report.new_bans.append(entry.peer)
            report.validation_seconds = time.perf_counter() - started
        if self.config.hints and scales is not None:
            # after the validator's poll: as in a real swarm, a hint reaches the validator after the round, so it
            # steers the checks of the suspect's *next* steps
            self._publish_hints(senders, scales, step)
        self.totals["train"] += report.train_seconds
        self.totals["verification"] += report.verification_seconds
        self.totals["validation"] += report.validation_seconds
        self.totals["steps"] += 1
        self.step_index += 1
        return report

    def _publish_hints(self, senders: Sequence[SimTrainer], scales: torch.Tensor, step: int) -> None:
        """Each sender's view of the round's CenteredClip (one part: all or nothing clipped), as a RoundReport."""
        evidence = {
            trainer.peer_id: SenderEvidence(
                elements=1, clipped_elements=int(float(scale) < self.config.heavy_clip_scale), min_scale=float(scale))
            for trainer, scale in zip(senders, scales)
        }
        round_report = RoundReport(group_id=f"sim-{step}", peers=tuple(evidence), status="ok", evidence=evidence)
        for trainer in senders:
            if trainer.suspicions.note_round(round_report):
                self.hub.board(trainer.peer_id).publish_suspicions(trainer.suspicions.record())

    def run(self, steps: int) -> List[StepReport]:
        return [self.step() for _ in range(steps)]

    def _apply_ban(self, peer_id: str, kind: str, step: int) -> None:
        if peer_id in self.bans:
            return
        self.bans[peer_id] = step
        self.banned_kinds[peer_id] = kind
        for trainer in self.trainers:
            if trainer.peer_id == peer_id:
                trainer.banned_at = step
        for host in self.hosts:
            if host.peer_id == peer_id:
                host.banned = True

    def _average_replicas(self) -> None:
        """Moshpit-style replica averaging, robust like ``athome.averaging``: CenteredClip over the live replicas."""
        live = [host for host in self.hosts if not host.banned]
        if len(live) < 2:
            return
        for uid in self.run_config.model.expert_uids():
            replicas = [list(host.experts[uid].parameters()) for host in live]
            stacked = torch.stack([torch.cat([p.detach().reshape(-1) for p in params]) for params in replicas])
            average, _ = centered_clip(stacked, torch.ones(len(live)), 1.0, 5)
            with torch.no_grad():
                for params in replicas:
                    for p, value in zip(params, _split(average, params)):
                        p.copy_(value)
        for host in live:  # a malicious host keeps (or re-applies) its poison instead of adopting the average
            if host.attack is not None:
                host.attack.poison([p for e in host.experts.values() for p in e.parameters()])

    # -------------------------------------------------------------------------------------------- attacks
    def _accuse_falsely(self, liar: SimTrainer) -> None:
        victims = [t for t in self.active_trainers() if t is not liar and t.window.record().entries]
        if not victims:
            return
        victim = self.rng.choice(victims)
        commitment = victim.window.record().entries[-1]
        honest = victim.recorder.get(commitment.step)
        if honest is not None:  # doctored "evidence": the victim's bundle with its contribution doubled
            self.forged_evidence[(liar.peer_id, victim.peer_id, commitment.step)] = StepProof(
                **{**{f: getattr(honest, f) for f in ("peer_id", "session", "step", "seed", "epoch", "loss", "samples",
                                                      "precision", "device", "params", "layers")},
                   "grads": [g * 2 for g in honest.grads]})
        accusation = Accusation(accused=victim.peer_id, kind="gradient", step=commitment.step,
                                session=victim.window.session, commitment=commitment,
                                figures={"grad": 3.0}, detail="forged", at=time.time())
        board = self.hub.board(liar.peer_id)
        previous = board.accusations().get(liar.peer_id)
        accusations = [*(previous.accusations if previous else []), accusation][-16:]
        board.publish_accusations(AccusationRecord(accusations=accusations))

    def _equivocate(self, trainer: SimTrainer) -> None:
        entries = list(trainer.window._entries)  # noqa: SLF001
        if len(entries) < 2:
            return
        target = entries[-2]
        rewritten = hashlib.blake2b(target.grad_hash.encode(), digest_size=32).hexdigest()
        entries[-2] = target.model_copy(update=dict(grad_hash=rewritten))
        trainer.window._entries.clear()  # noqa: SLF001
        trainer.window._entries.extend(entries)  # noqa: SLF001

    # -------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batches: int = 4, batch_size: int = 16) -> float:
        """Mean cross-entropy on fixed validation batches (no expert updates)."""
        for dispatcher in self.dispatchers:
            if isinstance(dispatcher, RecordingDispatcher):
                dispatcher.recorder = self.scratch
        losses = []
        for index in range(batches):
            batch = self.corpus.batch(10_000 + index, batch_size, self.run_config.model.seq_len, split="validation")
            with autocast_for(self.config.precision, self.device):
                cross_entropy, _ = self.model.losses(batch.to(self.device))
            losses.append(float(cross_entropy))
        self.scratch.begin_step()
        return sum(losses) / len(losses)


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    out, offset = [], 0
    for p in like:
        out.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
