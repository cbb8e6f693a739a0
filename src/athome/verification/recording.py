"""Recording a trainer's steps so that validators can recompute them later.

Expert outputs cannot be recomputed later: experts train on every backward call. So a step is recorded
*conditioned on the expert I/O it saw*: :class:`RecordingDispatcher` wraps any
:class:`~athome.model.moe.Dispatcher` and, through two identity taps in the autograd graph, records per layer the
expert choices, the outputs received, which slots answered, the gradients sent to the experts (``grad_outputs``) and
the gradient the experts' answers gave back (``grad_x``). :class:`StepRecorder` adds the dense parameters and the
contribution (dense gradients after clipping) and keeps the last ``retention`` steps' :class:`StepProof` in memory.

Cost: one copy of the dense parameters and gradients per step, plus references to the expert I/O tensors (the
outputs are already alive for autograd); memory is bounded by ``retention`` bundles (see ``StepProof.nbytes``).
"""
from __future__ import annotations

import logging
import secrets
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from athome.verification.proof import LayerIO, StepProof

logger = logging.getLogger(__name__)


class DispatchTamper:
    """Test-only hooks an attack simulator uses to tamper with expert I/O (see :mod:`athome.verification.attacks`).

    Installed as ``StepRecorder.tamper``. The defaults are honest. What the recorder stores is what was *actually*
    sent and received after tampering: an attacker that records something else fails the hash check against its
    own commitment.
    """

    def call_experts(self, layer: int, inner: Callable, x: torch.Tensor, expert_index: torch.Tensor):
        return inner(x, expert_index)

    def grad_outputs(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _Slot:
    __slots__ = ("expert_index", "outputs", "answered", "grad_outputs", "grad_x")

    def __init__(self):
        self.expert_index = self.outputs = self.answered = self.grad_outputs = self.grad_x = None


class RecordingDispatcher:
    """A Dispatcher that records the expert I/O of ``inner`` into ``recorder`` (layer ``layer``).

    Attributes it does not have (``uids``, ``last_answered_fraction``...) are read from ``inner``, so it drops in
    wherever the inner dispatcher was used. It is deliberately not an ``nn.Module``: wrapping a
    ``LocalDispatcher`` keeps the experts' parameters out of the model's (dense) parameters.
    """

    def __init__(self, inner: Callable, recorder: "StepRecorder", layer: int):
        self.inner, self.recorder, self.layer = inner, recorder, layer

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "recorder", "layer"):  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, x: torch.Tensor, expert_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        slot = self.recorder.slot(self.layer)
        track = torch.is_grad_enabled() and x.requires_grad
        # a view gives the dispatcher's path its own autograd node, so the hook sees only the gradient that the
        # experts' answers contributed to x (x also feeds the gate)
        x_in = x.view_as(x)
        if track:
            x_in.register_hook(lambda grad: _store(slot, "grad_x", grad))
        tamper = self.recorder.tamper  # None unless an attack simulator is installed (testing only)
        if tamper is not None:
            outputs, answered = tamper.call_experts(self.layer, self.inner, x_in, expert_index)
        else:
            outputs, answered = self.inner(x_in, expert_index)
        # references, not copies: dispatchers return fresh tensors and MoELayer never writes into them
        slot.expert_index = expert_index.detach()
        slot.outputs = outputs.detach()
        slot.answered = answered.detach()
        if track and outputs.requires_grad:
            outputs = outputs.view_as(outputs)

            def on_grad(grad: torch.Tensor) -> torch.Tensor:
                if tamper is not None:
                    grad = tamper.grad_outputs(self.layer, grad)
                _store(slot, "grad_outputs", grad)
                return grad

            outputs.register_hook(on_grad)
        return outputs, answered


def _store(slot: _Slot, name: str, grad: torch.Tensor) -> None:
    setattr(slot, name, grad.detach().clone())


class StepRecorder:
    """Records this trainer's steps and keeps the last ``retention`` proof bundles.

    Use: ``begin_step()`` before the forward pass; run forward and backward through dispatchers made by
    :meth:`wrap`; clip gradients; then ``finish_step(model, ...)`` *before* ``optimizer.step()`` (it copies the
    parameters the step ran on and the gradients about to be contributed). Thread-safe for readers (:meth:`get`).
    """

    def __init__(
        self, peer_id: str, *, precision: str = "fp32", device: str = "cpu", retention: int = 16,
        session: Optional[int] = None,
    ):
        if retention < 1:
            raise ValueError("retention must be >= 1")
        self.peer_id, self.precision, self.device, self.retention = peer_id, precision, device, retention
        self.session = session if session is not None else secrets.randbits(63)  # step numbers restart with it
        self._slots: Dict[int, _Slot] = {}
        self._proofs: "OrderedDict[int, StepProof]" = OrderedDict()
        self._lock = threading.Lock()
        self.tamper: Optional[DispatchTamper] = None

    def wrap(self, inner: Callable, layer: int) -> RecordingDispatcher:
        """A recording dispatcher for MoE layer ``layer`` (0-based, in ``model.moe_layers()`` order)."""
        return RecordingDispatcher(inner, self, layer)

    def slot(self, layer: int) -> _Slot:
        slot = self._slots.get(layer)
        if slot is None:
            slot = self._slots[layer] = _Slot()
        return slot

    def begin_step(self) -> None:
        self._slots = {}

    def finish_step(
        self,
        model: nn.Module,
        *,
        step: int,
        seed: int,
        epoch: int,
        loss: float,
        samples: int,
        params: Optional[Sequence[torch.Tensor]] = None,
    ) -> StepProof:
        """Snapshot the step into a :class:`StepProof` (kept for :meth:`get`) and return it.

        ``params`` defaults to ``model.dense_parameters()``; their ``.grad`` is the contribution.
        """
        params = list(params if params is not None else model.dense_parameters())
        moe_layers = list(model.moe_layers())
        layers: List[LayerIO] = []
        for index, moe in enumerate(moe_layers):
            slot = self._slots.get(index)
            if slot is None or slot.outputs is None:
                raise RuntimeError(f"MoE layer {index} was not called through a recording dispatcher this step")
            layers.append(LayerIO(
                available=moe.available.detach().cpu().clone(),
                expert_index=slot.expert_index.cpu(),
                outputs=slot.outputs.cpu(),
                answered=slot.answered.cpu(),
                # no hook call means no gradient flowed back through this path: it was zero
                grad_outputs=(slot.grad_outputs if slot.grad_outputs is not None else torch.zeros_like(slot.outputs)).cpu(),
                grad_x=(slot.grad_x if slot.grad_x is not None
                        else torch.zeros(slot.outputs.shape[0], slot.outputs.shape[-1], dtype=slot.outputs.dtype)).cpu(),
            ))
        with self._lock:
            previous = next(reversed(self._proofs.values()), None)
        proof = StepProof(
            peer_id=self.peer_id, session=self.session, step=step, seed=seed, epoch=epoch, loss=float(loss),
            samples=samples,
            precision=self.precision, device=self.device,
            params=_snapshot(params, previous),
            grads=[(p.grad.detach().cpu().clone() if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype))
                   for p in params],
            layers=layers,
        )
        if previous is not None and proof.params is previous.params and "params_hash" in previous.__dict__:
            proof.__dict__["params_hash"] = previous.__dict__["params_hash"]  # same tensors, same hash
        with self._lock:
            self._proofs[step] = proof
            self._proofs.move_to_end(step)
            while len(self._proofs) > self.retention:
                self._proofs.popitem(last=False)
        self._slots = {}
        return proof

    def get(self, step: int) -> Optional[StepProof]:
        with self._lock:
            return self._proofs.get(step)

    def steps(self) -> List[int]:
        with self._lock:
            return list(self._proofs)

    def memory_bytes(self) -> int:
        with self._lock:
            proofs = list(self._proofs.values())
        seen, total = set(), 0
        for proof in proofs:
            for tensor in [*proof.params, *proof.grads, *(t for layer in proof.layers for t in layer.tensors())]:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += tensor.numel() * tensor.element_size()
        return total


def _snapshot(params: Sequence[torch.Tensor], previous: Optional[StepProof]) -> List[torch.Tensor]:
    """A CPU copy of ``params``, or the previous step's copy if they did not change (steps of one optimizer epoch
    run on the same parameters: one copy and one hash serve them all). Comparing reads; copying would also write."""
    if previous is not None and len(previous.params) == len(params) and all(
        a.shape == b.shape and torch.equal(a.detach().cpu() if a.device.type != "cpu" else a.detach(), b)
        for a, b in zip(params, previous.params)
    ):
        return previous.params
    return [p.detach().cpu().clone() for p in params]
