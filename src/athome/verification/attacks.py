"""Attack simulators, for tests, benches and ``peer demo --attack``. TESTING ONLY.

Nothing here runs unless the environment says ``ATHOME_ALLOW_ATTACKS=1``: :func:`require_attacks_allowed` raises
:class:`AttacksDisabled` otherwise, and every constructor calls it. A spec is ``KIND``, ``KIND:SCALE`` and/or
``KIND@PROBABILITY`` (attack on that fraction of steps, e.g. ``sign_flip@0.1``), optionally ``+START`` (honest
until step START, to build trust first), e.g. ``slight@0.2+50``.

Trainer attacks (:class:`TrainerAttack`, applied through the trainer's verification hooks):

========================  ==========================================================================
sign_flip                 contribution x -1000 (BTARD's attack)
scaled                    contribution x SCALE (default 10)
slight                    contribution x (1 + SCALE), default SCALE 0.02: a 2% deviation
random_direction          a fixed random direction with 1000x the honest norm
label_flip                trains on flipped targets (byte y -> 255 - y)
stale                     contributes the gradient it computed SCALE (default 5) steps earlier
free_ride_zeros           claims the samples, contributes zeros
free_ride_copy            computes nothing: contributes the last aggregate (or its previous gradient)
poisoned_grad_outputs     sends grad_outputs x -1000 to the experts
fake_expert_outputs       does not call the experts: zeros, claimed as answered (free-rides on hosts)
diverged_params           computes on its own parameters: the swarm's + noise of SCALE (20) optimizer steps
equivocation              re-commits an already committed step with other values
false_accusation          accuses honest trainers (forged evidence)
========================  ==========================================================================

Host attacks (:func:`apply_host_attack` on an ``ExpertBackend``, :class:`HostAttack` in simulations):
``wrong_outputs`` (garbage of the right norm), ``poisoned_replica`` (parameters + 10 sigma noise), ``no_train``
(never updates its experts, still reports calls).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Sequence

import torch
import torch.nn.functional as F

from athome.verification.recording import DispatchTamper

logger = logging.getLogger(__name__)

ENV_SWITCH = "ATHOME_ALLOW_ATTACKS"
TRAINER_KINDS = {
    "sign_flip": "contribution x -1000",
    "scaled": "contribution x SCALE (10)",
    "slight": "contribution x (1 + SCALE), SCALE 0.02",
    "random_direction": "fixed random direction, 1000x the norm",
    "label_flip": "flipped targets",
    "stale": "gradient from SCALE (5) steps before",
    "free_ride_zeros": "zeros, samples claimed",
    "free_ride_copy": "a copy of the last aggregate",
    "poisoned_grad_outputs": "grad_outputs x -1000 to experts",
    "fake_expert_outputs": "skips the experts, claims answers",
    "diverged_params": "own parameters (+SCALE=20 optimizer steps of noise)",
    "equivocation": "re-commits a step with other values",
    "false_accusation": "accuses honest peers",
}
HOST_KINDS = {
    "wrong_outputs": "garbage outputs of the right norm",
    "poisoned_replica": "replica parameters + 10 sigma noise",
    "no_train": "never updates its experts",
}
ALL_KINDS = {**TRAINER_KINDS, **HOST_KINDS}
_DEFAULT_SCALE = {"scaled": 10.0, "slight": 0.02, "stale": 5.0, "diverged_params": 20.0}


class AttacksDisabled(RuntimeError):
    """Attack simulators were requested without the testing-only switch."""


def require_attacks_allowed(kind: str = "") -> None:
    if os.environ.get(ENV_SWITCH) != "1":
        raise AttacksDisabled(
            f"attack simulator {kind!r} refused: attacks are for testing only; set {ENV_SWITCH}=1 in the environment "
            f"of a test swarm to enable them"
        )


@dataclass(frozen=True)
class AttackSpec:
    kind: str
    scale: Optional[float] = None
    probability: float = 1.0
    start: int = 0

    @classmethod
    def parse(cls, text: str) -> "AttackSpec":
        match = re.fullmatch(r"([a-z_]+)(?::([0-9.eE+-]+))?(?:@([0-9.]+))?(?:\+([0-9]+))?", text.strip())
        if not match or match.group(1) not in ALL_KINDS:
            raise ValueError(f"unknown attack {text!r}; kinds: {', '.join(ALL_KINDS)} "
                             f"(KIND[:SCALE][@PROBABILITY][+START])")
        kind, scale, probability, start = match.groups()
        spec = cls(kind, float(scale) if scale else _DEFAULT_SCALE.get(kind), float(probability or 1.0), int(start or 0))
        if not 0 < spec.probability <= 1:
            raise ValueError(f"attack probability must be in (0, 1], got {spec.probability}")
        return spec

    @property
    def on_host(self) -> bool:
        return self.kind in HOST_KINDS


def check_attack_flag(spec: str, role: str) -> AttackSpec:
    """Validate a ``--attack`` flag of ``peer train`` (role "trainer") or ``peer join`` (role "host") before
    anything starts. Raises ValueError (unknown kind, wrong role) or :class:`AttacksDisabled` with the fix."""
    parsed = AttackSpec.parse(spec)
    if parsed.on_host != (role == "host"):
        command, kinds = ("peer join", HOST_KINDS) if parsed.on_host else ("peer train", TRAINER_KINDS)
        raise ValueError(f"{parsed.kind} is an attack of {command} --attack; a {role} takes one of: "
                         f"{', '.join(HOST_KINDS if role == 'host' else TRAINER_KINDS)}")
    require_attacks_allowed(parsed.kind)
    return parsed


class TrainerAttack(DispatchTamper):
    """A malicious trainer's behaviour, driven by the trainer's verification hooks each step:
    :meth:`begin_step`, :meth:`losses`, :meth:`params_context`, :meth:`corrupt_grads`, :meth:`claimed_loss`,
    plus the :class:`~athome.verification.recording.DispatchTamper` hooks on expert I/O."""

    def __init__(self, spec: AttackSpec | str, seed: int = 0):
        spec = AttackSpec.parse(spec) if isinstance(spec, str) else spec
        require_attacks_allowed(spec.kind)
        if spec.on_host:
            raise ValueError(f"{spec.kind} is an expert-host attack (peer join --attack)")
        self.spec, self.kind = spec, spec.kind
        self._random = random.Random(seed)
        self.on = False
        self.step = -1
        self.attacked_steps: List[int] = []
        self._history: Deque[List[torch.Tensor]] = deque(maxlen=int(spec.scale or 5) + 1)
        self._direction: Optional[List[torch.Tensor]] = None
        self.last_aggregate: Optional[List[torch.Tensor]] = None  # set by a simulation, if it has one
        self._last_loss: Optional[float] = None
        logger.warning(f"ATTACK SIMULATOR ACTIVE: {spec} (testing only)")

    def begin_step(self, step: int) -> None:
        self.step = step
        self.on = step >= self.spec.start and self._random.random() < self.spec.probability
        if self.on and self.kind in ("label_flip", "poisoned_grad_outputs", "fake_expert_outputs", "diverged_params"):
            self.attacked_steps.append(step)  # the others count when they actually change something

    # ---- forward ----------------------------------------------------------------------------------------------
    def losses(self, model, batch: torch.Tensor):
        if not (self.on and self.kind == "label_flip"):
            return model.losses(batch)
        logits = model(batch[:, :-1])
        targets = (model.config.vocab_size - 1) - batch[:, 1:]
        cross_entropy = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        aux = sum((layer.aux_loss for layer in model.moe_layers()), logits.new_zeros((), dtype=torch.float32))
        return cross_entropy, aux

    @contextlib.contextmanager
    def params_context(self, params: Sequence[torch.Tensor], lr: float):
        if not (self.on and self.kind == "diverged_params"):
            yield
            return
        generator = torch.Generator().manual_seed(self._random.getrandbits(63))
        noises = [torch.randn(p.shape, generator=generator) * (self.spec.scale * lr) for p in params]
        with torch.no_grad():
            for p, noise in zip(params, noises):
                p.add_(noise.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, noise in zip(params, noises):
                    p.sub_(noise.to(p.device, p.dtype))

    def call_experts(self, layer: int, inner: Callable, x: torch.Tensor, expert_index: torch.Tensor):
        if self.on and self.kind == "fake_expert_outputs":
            n, k = expert_index.shape
            return x.new_zeros(n, k, x.shape[-1]), torch.ones(n, k, dtype=torch.bool, device=x.device)
        return inner(x, expert_index)

    def grad_outputs(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        if self.on and self.kind == "poisoned_grad_outputs":
            return grad * -1000.0
        return grad

    # ---- after backward ---------------------------------------------------------------------------------------
    def corrupt_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Replace the (clipped) contribution in ``p.grad`` in place, if attacking this step."""
        honest = [(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for p in params]
        if self.on:
            fake = self._fake(params, honest)
            if fake is not None:
                self.attacked_steps.append(self.step)
                with torch.no_grad():
                    for p, value in zip(params, fake):
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        p.grad.copy_(value)
        self._history.append(honest)

    def _fake(self, params, honest: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        kind, scale = self.kind, self.spec.scale
        if kind == "sign_flip":
            return [g * -1000.0 for g in honest]
        if kind == "scaled":
            return [g * scale for g in honest]
        if kind == "slight":
            return [g * (1.0 + scale) for g in honest]
        if kind == "random_direction":
            if self._direction is None:
                generator = torch.Generator().manual_seed(1234)
                self._direction = [torch.randn(g.shape, generator=generator) for g in honest]
            norm = torch.sqrt(sum(g.double().pow(2).sum() for g in honest))
            unit = torch.sqrt(sum(d.double().pow(2).sum() for d in self._direction))
            return [d * float(1000.0 * norm / unit) for d in self._direction]
        if kind == "stale":
            return self._history[0] if len(self._history) == self._history.maxlen else None
        if kind == "free_ride_zeros":
            return [torch.zeros_like(g) for g in honest]
        if kind == "free_ride_copy":
            if self.last_aggregate is not None:
                return [a.clone() for a in self.last_aggregate]
            return self._history[-1] if self._history else [torch.zeros_like(g) for g in honest]
        return None  # attacks that act elsewhere

    def claimed_loss(self, loss: float) -> float:
        claimed = loss
        if self.on and self.kind in ("free_ride_zeros", "free_ride_copy") and self._last_loss is not None:
            claimed = self._last_loss  # a free rider did not compute a loss: it reports a plausible one
        self._last_loss = loss
        return claimed


class HostAttack:
    """A malicious expert host's behaviour on one expert module (simulations); see :func:`apply_host_attack`."""

    def __init__(self, spec: AttackSpec | str, seed: int = 0):
        spec = AttackSpec.parse(spec) if isinstance(spec, str) else spec
        require_attacks_allowed(spec.kind)
        if not spec.on_host:
            raise ValueError(f"{spec.kind} is a trainer attack (peer train --attack)")
        self.spec, self.kind = spec, spec.kind
        self._generator = torch.Generator().manual_seed(seed)
        logger.warning(f"ATTACK SIMULATOR ACTIVE: host {spec} (testing only)")

    def outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        if self.kind != "wrong_outputs":
            return outputs
        garbage = torch.randn(outputs.shape, generator=self._generator).to(outputs.dtype)
        return garbage * (outputs.norm() / (garbage.norm() + 1e-12))

    def poison(self, parameters: Sequence[torch.Tensor]) -> None:
        if self.kind != "poisoned_replica":
            return
        with torch.no_grad():
            for p in parameters:
                sigma = float(p.float().std()) if p.numel() > 1 else 0.0
                p.add_(torch.randn(p.shape, generator=self._generator).to(p.dtype) * 10.0 * max(sigma, 0.02))

    @property
    def trains(self) -> bool:
        return self.kind != "no_train"


def apply_host_attack(backend, spec: AttackSpec | str, seed: int = 0) -> HostAttack:
    """Make a live ``athome.peer.backend.ExpertBackend`` malicious (``peer join --attack``). Testing only."""
    attack = HostAttack(spec, seed)
    if attack.kind == "wrong_outputs":
        honest = backend.forward

        def forward(*inputs):
            return tuple(attack.outputs(out) for out in honest(*inputs))

        backend.forward = forward
        backend.forward_pool.process_func = forward  # the pool captured the bound method at construction
    elif attack.kind == "poisoned_replica":
        attack.poison(backend._master)  # noqa: SLF001 (testing only)
        backend._push_master_to_device(all_params=True)  # noqa: SLF001
    elif attack.kind == "no_train":

        def skip_step() -> None:  # drop the accumulated gradient, report an update anyway
            for p in backend._master:  # noqa: SLF001
                p.grad = None
            backend._accumulated = 0  # noqa: SLF001
            backend.num_updates += 1

        backend._step = skip_step  # noqa: SLF001
    return attack
