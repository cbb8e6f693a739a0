"""Recomputing a recorded step: the dense model replayed against the expert I/O the trainer recorded.

:class:`ReplayDispatcher` stands in for the experts: its forward returns the recorded expert outputs, its backward
returns the recorded ``grad_x`` and keeps the ``grad_outputs`` the *replayed* model produces, so the validator can
compare them with those the trainer sent (poisoned gradients sent to experts show up there).
:class:`Replayer` rebuilds the batch from the step's seed, loads the step's dense parameters, runs forward and
backward under the step's precision and clips like the trainer; :class:`Recomputation` holds the results and
:func:`compare` the distances that the validator holds against calibrated tolerances.
"""
from __future__ import annotations

import logging
import math
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from athome.config import ModelConfig
from athome.model.lm import MoETransformerLM
from athome.trainer.data import Corpus
from athome.verification.proof import LayerIO, StepProof

logger = logging.getLogger(__name__)


class ReplayError(ValueError):
    """The bundle cannot be replayed with this model (shapes, layer count): the bundle itself is bad."""


ROUTE_MARGIN = 2e-3  # logit units (times 1 + |logit|): how close to the k-th logit a recorded choice may lie
_routing = threading.local()  # the recorded expert_index of the layer being replayed (set by the gate's hook)


class _RoutedLogits(torch.Tensor):
    """Gate logits whose top-k follows the *recorded* routing wherever the replayed logits agree with it up to
    :data:`ROUTE_MARGIN`: a near-tie that rounding on another CPU decides the other way must not send a token to
    other experts (whose recorded outputs do not exist), or one flipped token changes the gate's gradient by tens
    of percent. Choices the logits do not support are not followed (and are counted as route mismatches).

    Works on ``MoELayer`` without copying its forward: the gate's output is tagged, and only ``topk`` on it is
    intercepted; everything else runs unchanged.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        recorded = getattr(_routing, "expert_index", None)
        if func in (torch.Tensor.topk, torch.topk) and recorded is not None:
            _routing.expert_index = None  # one top-k per gate call
            logits = args[0].as_subclass(torch.Tensor)
            k = args[1] if len(args) > 1 else kwargs["k"]
            top, index = logits.topk(k, dim=-1)
            if tuple(recorded.shape) != tuple(index.shape):
                return top, index  # the dispatcher reports the shape mismatch
            recorded = recorded.to(index.device)
            recorded_logits = logits.detach().gather(-1, recorded)
            threshold = top.detach()[:, -1:]
            agree = (recorded_logits >= threshold - ROUTE_MARGIN * (1 + threshold.abs())).all(-1)
            agree &= torch.isfinite(recorded_logits).all(-1)
            chosen = torch.where(agree.unsqueeze(-1), recorded, index)
            return logits.gather(-1, chosen), chosen
        result = super().__torch_function__(func, types, args, kwargs)
        return result


def _tag_gate_output(dispatcher: "ReplayDispatcher"):
    def hook(module, inputs, output):
        _routing.expert_index = dispatcher.io.expert_index if dispatcher.io is not None else None
        return output.as_subclass(_RoutedLogits)

    return hook


class ReplayDispatcher:
    """A Dispatcher serving recorded expert I/O (see module docstring). Set ``io`` before each replay."""

    def __init__(self):
        self.io: Optional[LayerIO] = None
        self.route_mismatch = 0.0  # fraction of tokens whose replayed top-k differs from the recorded one
        self.grad_outputs: Optional[torch.Tensor] = None  # recomputed gradient w.r.t. the expert outputs
        self.inputs: Optional[torch.Tensor] = None  # the experts' inputs in the last replay (fp32, CPU): audit probes

    def __call__(self, x: torch.Tensor, expert_index: torch.Tensor):
        io = self.io
        if io is None:
            raise RuntimeError("ReplayDispatcher.io is not set")
        shape = tuple(expert_index.shape)
        if shape != tuple(io.expert_index.shape) or tuple(io.outputs.shape[:2]) != shape:
            raise ReplayError(
                f"routing shape {tuple(expert_index.shape)} differs from the recorded {tuple(io.expert_index.shape)}"
            )
        if tuple(io.outputs.shape[2:]) != (x.shape[-1],) or tuple(io.grad_x.shape) != tuple(x.shape):
            raise ReplayError("recorded expert I/O does not fit the model's shapes")
        # compare as sets per token: the order of the k slots follows logits that may tie
        replayed = expert_index.detach().cpu().sort(dim=-1).values
        recorded = io.expert_index.sort(dim=-1).values
        self.route_mismatch = float((replayed != recorded).any(dim=-1).float().mean()) if len(replayed) else 0.0
        self.grad_outputs = None
        self.inputs = x.detach().float().cpu()
        outputs = _ReplayExperts.apply(x.as_subclass(torch.Tensor), self)
        return outputs, io.answered.to(x.device)


class _ReplayExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dispatcher: ReplayDispatcher):
        ctx.dispatcher, ctx.x_dtype = dispatcher, x.dtype
        return dispatcher.io.outputs.to(device=x.device, dtype=dispatcher.io.outputs.dtype).clone()

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor):
        dispatcher: ReplayDispatcher = ctx.dispatcher
        dispatcher.grad_outputs = grad_outputs.detach().cpu().clone()
        return dispatcher.io.grad_x.to(device=grad_outputs.device, dtype=ctx.x_dtype), None


@dataclass
class Recomputation:
    """What the validator recomputed for one step."""

    loss: float
    grads: List[torch.Tensor]
    grad_outputs: List[torch.Tensor]
    route_mismatch: float
    seconds: float = 0.0


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class Replayer:
    """Replays bundles of one run. Keeps one model (dense part only) and reuses it for every replay.

    :param model_config: the run's model
    :param corpus: the run's corpus (must have the trainers' fingerprint)
    :param grad_clip: the run's ``optimizer.grad_clip`` (trainers clip the dense gradient before contributing it)
    :param aux_coef: the load-balancing coefficient trainers use (``MoETransformerLM.aux_coef``)
    """

    def __init__(
        self,
        model_config: ModelConfig,
        corpus: Corpus,
        *,
        grad_clip: Optional[float],
        aux_coef: float = 0.01,
        device: str | torch.device = "cpu",
    ):
        self.model_config, self.corpus, self.grad_clip = model_config, corpus, grad_clip
        self.device = torch.device(device)
        self.dispatchers = [ReplayDispatcher() for _ in range(model_config.n_layers)]
        self.model = MoETransformerLM(model_config, lambda layer: self.dispatchers[layer], aux_coef=aux_coef).to(self.device)
        self.model.train()
        self.params = self.model.dense_parameters()
        for layer, dispatcher in zip(self.model.moe_layers(), self.dispatchers):
            layer.gate.register_forward_hook(_tag_gate_output(dispatcher))

    def batch(self, proof: StepProof) -> torch.Tensor:
        return self.corpus.batch(proof.seed, proof.samples, self.model_config.seq_len)

    def recompute(self, proof: StepProof, precision: Optional[str] = None) -> Recomputation:
        """Recompute ``proof``'s loss, contribution and grad_outputs. Raises :class:`ReplayError` on a bad bundle."""
        import time

        started = time.perf_counter()
        if len(proof.layers) != len(self.dispatchers):
            raise ReplayError(f"bundle has {len(proof.layers)} MoE layers, the model has {len(self.dispatchers)}")
        if len(proof.params) != len(self.params) or len(proof.grads) != len(self.params):
            raise ReplayError(f"bundle has {len(proof.params)} dense tensors, the model has {len(self.params)}")
        with torch.no_grad():
            for param, value, grad in zip(self.params, proof.params, proof.grads):
                if tuple(value.shape) != tuple(param.shape) or tuple(grad.shape) != tuple(param.shape):
                    raise ReplayError(f"a dense tensor has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                param.copy_(value)
        for dispatcher, io, layer in zip(self.dispatchers, proof.layers, self.model.moe_layers()):
            if tuple(io.available.shape) != (layer.num_experts,):
                raise ReplayError("availability mask does not fit the layer")
            dispatcher.io = io
            layer.set_available(io.available.to(self.device))
        if not 1 <= proof.samples <= 65536:
            raise ReplayError(f"bundle claims {proof.samples} samples")
        batch = self.batch(proof).to(self.device)
        self.model.zero_grad(set_to_none=True)
        with autocast_for(precision or proof.precision, self.device):
            cross_entropy, aux = self.model.losses(batch)
            loss = cross_entropy + self.model.aux_coef * aux
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        grads = [
            (p.grad.detach().cpu().clone() if p.grad is not None else torch.zeros(p.shape)) for p in self.params
        ]
        grad_outputs = [
            d.grad_outputs if d.grad_outputs is not None else torch.zeros_like(d.io.outputs) for d in self.dispatchers
        ]
        route_mismatch = max((d.route_mismatch for d in self.dispatchers), default=0.0)
        for dispatcher in self.dispatchers:
            dispatcher.io = None
        return Recomputation(
            loss=cross_entropy.item(), grads=grads, grad_outputs=grad_outputs, route_mismatch=route_mismatch,
            seconds=time.perf_counter() - started,
        )


@dataclass
class Distances:
    """How far a bundle is from its recomputation. All are >= 0; NaN/Inf in a bundle gives ``inf``."""

    loss: float  # |loss_claimed - loss_recomputed| (nats/byte)
    grad: float  # max over dense tensors of the relative error (see :func:`relative_error`)
    grad_global: float  # relative error of the whole gradient vector
    grad_outputs: float  # max over layers of the relative error of the gradients sent to experts
    route_mismatch: float  # fraction of tokens routed differently on replay
    extra: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, float]:
        return dict(loss=self.loss, grad=self.grad, grad_global=self.grad_global, grad_outputs=self.grad_outputs,
                    route_mismatch=self.route_mismatch, **self.extra)


def relative_error(claimed: Sequence[torch.Tensor], recomputed: Sequence[torch.Tensor], floor: float = 0.05) -> float:
    """max over tensors of ``||c - r|| / (||r|| + floor * ||R|| / sqrt(n))``, ``R`` the whole recomputed vector.

    Per tensor, so that poisoning one small tensor (a gate, a bias) is not diluted by the big ones; the floor keeps
    tensors whose gradient is almost zero from turning rounding noise into huge relative errors.
    """
    norms = [r.double().norm() for r in recomputed]
    total = math.sqrt(sum(float(n) ** 2 for n in norms))
    slack = floor * total / math.sqrt(max(len(norms), 1)) + 1e-30
    worst = 0.0
    for c, r, n in zip(claimed, recomputed, norms):
        c = c.double()
        if not torch.isfinite(c).all():
            return math.inf
        worst = max(worst, float((c - r.double()).norm()) / (float(n) + slack))
    return worst


def global_relative_error(claimed: Sequence[torch.Tensor], recomputed: Sequence[torch.Tensor]) -> float:
    diff = sum(float((c.double() - r.double()).pow(2).sum()) for c, r in zip(claimed, recomputed))
    norm = sum(float(r.double().pow(2).sum()) for r in recomputed)
    if not math.isfinite(diff):
        return math.inf
    return math.sqrt(diff) / (math.sqrt(norm) + 1e-30)


def compare(proof: StepProof, recomputation: Recomputation) -> Distances:
    """Distances between what ``proof`` claims and what was recomputed."""
    loss = abs(proof.loss - recomputation.loss) if math.isfinite(proof.loss) else math.inf
    grad_outputs = 0.0
    for io, recomputed in zip(proof.layers, recomputation.grad_outputs):
        if tuple(io.grad_outputs.shape) != tuple(recomputed.shape):
            grad_outputs = math.inf
            break
        grad_outputs = max(grad_outputs, global_relative_error([io.grad_outputs], [recomputed]))
    return Distances(
        loss=loss,
        grad=relative_error(proof.grads, recomputation.grads),
        grad_global=global_relative_error(proof.grads, recomputation.grads),
        grad_outputs=grad_outputs,
        route_mismatch=recomputation.route_mismatch,
    )
