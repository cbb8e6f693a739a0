"""One expert: the feed-forward block that volunteers host, named by a uid such as ``ffn.1.3``.

Contract:
- ``Expert.forward(x: [B, d_model]) -> [B, d_model]`` is a pure function of its input and parameters (no dropout,
  no state), because hivemind's server recomputes the forward pass inside backward.
- ``build_expert(model, uid)`` is a pure function of ``(model, uid)``: two hosts that build the same uid from
  scratch get bitwise-equal parameters, so fresh replicas agree before any averaging.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from athome.config import ModelConfig


class Expert(nn.Module):
    """``Linear(d_model, hidden) -> GELU -> Linear(hidden, d_model)``.

    No LayerNorm inside: the MoE layer hands experts pre-normalised input (pre-LN transformer).
    Parameters are created uninitialised; call :meth:`reset_parameters` (``build_expert`` does).
    """

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        # skip_init: the default Linear init would draw from the global RNG, which we must not touch
        self.fc_in = nn.utils.skip_init(nn.Linear, d_model, hidden)
        self.fc_out = nn.utils.skip_init(nn.Linear, hidden, d_model)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, std: float = 0.02, out_std: float = 0.02) -> None:
        """GPT-2 style init from ``generator`` only: N(0, std) in, N(0, out_std) out, zero biases."""
        self.fc_in.weight.copy_(torch.randn(self.fc_in.weight.shape, generator=generator) * std)
        self.fc_out.weight.copy_(torch.randn(self.fc_out.weight.shape, generator=generator) * out_std)
        self.fc_in.bias.zero_()
        self.fc_out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


def uid_seed(uid: str) -> int:
    """A stable 63-bit seed for ``uid`` (blake2b; Python's ``hash()`` is salted per process)."""
    digest = hashlib.blake2b(uid.encode(), digest_size=8, person=b"athome-expert").digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def expert_parameter_count(model: ModelConfig) -> int:
    """Parameters of one :class:`Expert` of ``model``: two weight matrices and their biases."""
    return 2 * model.d_model * model.expert_hidden + model.d_model + model.expert_hidden


def build_expert(model: ModelConfig, uid: str) -> Expert:
    """Build the expert ``uid`` with an init seeded by the uid alone (bitwise reproducible on any host)."""
    expert = Expert(model.d_model, model.expert_hidden)
    generator = torch.Generator().manual_seed(uid_seed(uid))
    # the output projection feeds the residual stream: scale it down with depth, as GPT-2 does
    expert.reset_parameters(generator, std=0.02, out_std=0.02 / math.sqrt(2 * model.n_layers))
    return expert


def expert_input_schema(model: ModelConfig, dtype: torch.dtype = torch.float32) -> tuple:
    """The hivemind ``args_schema`` of an expert: one batch of ``d_model`` vectors."""
    # imported here so that the model stays importable (and fast to import) without the networking stack
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    return (BatchTensorDescriptor(model.d_model, dtype=dtype),)
