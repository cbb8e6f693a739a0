"""A step's proof bundle: everything a validator needs to recompute one trainer step, and its wire format.

A :class:`StepProof` holds the dense parameters the step ran on, the contribution (the dense gradient handed to
the optimizer, after clipping), and per MoE layer the expert I/O the trainer exchanged (:class:`LayerIO`). Its three
hashes are what the trainer's commitment publishes; a validator first checks that a fetched bundle hashes to the
committed values, so a trainer cannot change its story after committing.

Wire format: one MessagePack document (no pickle): scalars plus tensors as ``[dtype, shape, raw bytes]``, dtypes
from a whitelist, sizes checked against shapes. Deserialization never executes code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Optional, Sequence

import torch
from hivemind.utils import MSGPackSerializer

from athome.verification.hashing import hash_tensors

MAX_PROOF_BYTES = 512 * 1024 * 1024  # refuse absurd bundles before allocating them

_DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "bool": torch.bool,
}


class ProofFormatError(ValueError):
    """A serialized bundle that is malformed, oversize or inconsistent."""


@dataclass
class LayerIO:
    """What one MoE layer's dispatcher exchanged with the experts during one step (flattened tokens ``N``).

    - ``available``: BoolTensor[E], experts the layer could choose (routing depends on it)
    - ``expert_index``: LongTensor[N, k], the experts chosen
    - ``outputs``: [N, k, d], the expert outputs received (zeros where not answered), dtype as returned to the layer
    - ``answered``: BoolTensor[N, k]
    - ``grad_outputs``: [N, k, d], the gradients the trainer *sent* to the experts
    - ``grad_x``: [N, d], the gradient the experts' answers gave the dispatcher's input
    """

    available: torch.Tensor
    expert_index: torch.Tensor
    outputs: torch.Tensor
    answered: torch.Tensor
    grad_outputs: Optional[torch.Tensor] = None
    grad_x: Optional[torch.Tensor] = None

    def tensors(self) -> List[torch.Tensor]:
        missing = [name for name in ("grad_outputs", "grad_x") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"layer I/O is incomplete (no {', '.join(missing)}): was backward run?")
        return [self.available, self.expert_index, self.outputs, self.answered, self.grad_outputs, self.grad_x]

    @property
    def answered_fraction(self) -> float:
        return float(self.answered.float().mean()) if self.answered.numel() else 1.0


@dataclass
class StepProof:
    """One trainer step, recomputable by anyone holding the run's corpus and config.

    ``loss`` is the cross-entropy (nats/byte) the trainer computed; ``params`` and ``grads`` follow the order of
    ``model.dense_parameters()``.
    """

    peer_id: str
    session: int
    step: int
    seed: int
    epoch: int
    loss: float
    samples: int
    precision: str
    device: str
    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    layers: List[LayerIO] = field(default_factory=list)

    @cached_property
    def params_hash(self) -> str:
        return hash_tensors(self.params, person=b"athome-params")

    @cached_property
    def grad_hash(self) -> str:
        return hash_tensors(self.grads, person=b"athome-grads")

    @cached_property
    def io_hash(self) -> str:
        return hash_tensors((t for layer in self.layers for t in layer.tensors()), person=b"athome-expert-io")

    @property
    def answered_fraction(self) -> float:
        return min((layer.answered_fraction for layer in self.layers), default=1.0)

    def nbytes(self) -> int:
        tensors = [*self.params, *self.grads, *(t for layer in self.layers for t in layer.tensors())]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------------------------------------ wire format
    def to_bytes(self) -> bytes:
        def pack(tensor: torch.Tensor) -> list:
            tensor = tensor.detach().cpu().contiguous()
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise ProofFormatError(f"cannot serialize dtype {tensor.dtype}")
            raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            return [dtype, list(tensor.shape), raw]

        document = dict(
            v=1, peer_id=self.peer_id, session=self.session, step=self.step, seed=self.seed, epoch=self.epoch,
            loss=self.loss, samples=self.samples, precision=self.precision, device=self.device,
            params=[pack(t) for t in self.params], grads=[pack(t) for t in self.grads],
            layers=[[pack(t) for t in layer.tensors()] for layer in self.layers],
        )
        return MSGPackSerializer.dumps(document)

    @classmethod
    def from_bytes(cls, data: bytes) -> "StepProof":
        if len(data) > MAX_PROOF_BYTES:
            raise ProofFormatError(f"proof of {len(data)} bytes exceeds {MAX_PROOF_BYTES}")
        try:
            document = MSGPackSerializer.loads(data)
            if not isinstance(document, dict) or document.get("v") != 1:
                raise ProofFormatError("not an athome proof (version 1)")
            layers = []
            for packed in document["layers"]:
                if len(packed) != 6:
                    raise ProofFormatError("a layer must hold 6 tensors")
                layers.append(LayerIO(*(_unpack(item) for item in packed)))
            loss = float(document["loss"])
            if not math.isfinite(loss):
                raise ProofFormatError("loss is not finite")
            return cls(
                peer_id=str(document["peer_id"]), session=int(document["session"]), step=int(document["step"]),
                seed=int(document["seed"]),
                epoch=int(document["epoch"]), loss=loss, samples=int(document["samples"]),
                precision=str(document["precision"]), device=str(document["device"]),
                params=[_unpack(item) for item in document["params"]],
                grads=[_unpack(item) for item in document["grads"]], layers=layers,
            )
        except ProofFormatError:
            raise
        except Exception as error:
            raise ProofFormatError(f"malformed proof: {type(error).__name__}: {error}") from None


def _unpack(item: Sequence[Any]) -> torch.Tensor:
    dtype_name, shape, raw = item
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        raise ProofFormatError(f"dtype {dtype_name!r} is not allowed")
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape) or len(shape) > 8:
        raise ProofFormatError(f"bad shape {shape}")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise ProofFormatError(f"{len(raw)} bytes do not fit shape {shape} of {dtype_name}")
    if not numel:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
