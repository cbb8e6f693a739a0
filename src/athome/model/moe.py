"""The mixture-of-experts layer, identical whether its experts live in this process or across the network.

``MoELayer`` owns the gate and the combine; *where* experts run is a ``Dispatcher``:
``LocalDispatcher`` runs them in-process (the baseline), the trainer's network dispatcher calls remote hosts.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import nn


class Dispatcher(Protocol):
    """Runs each token through each of its chosen experts.

    ``__call__(x: [N, d], expert_index: LongTensor[N, k]) -> (outputs: [N, k, d], answered: BoolTensor[N, k])``.
    ``outputs[n, j]`` is expert ``expert_index[n, j]`` applied to ``x[n]``; slots that got no answer (a remote
    expert failed or timed out) have ``answered`` False and zeros in ``outputs``. Autograd must flow from
    ``outputs`` back to ``x``.
    """

    def __call__(self, x: torch.Tensor, expert_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class LocalDispatcher(nn.Module):
    """All experts of one layer in this process. Each expert runs once per call, on all of its tokens."""

    def __init__(self, experts: Sequence[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, k = expert_index.shape
        answered = torch.ones(num_tokens, k, dtype=torch.bool, device=x.device)
        if num_tokens == 0:
            return x.new_zeros(0, k, x.shape[-1]), answered

        # sort the (token, slot) pairs by expert so every expert sees one contiguous run of its tokens
        flat_expert = expert_index.reshape(-1)
        token_of_slot = torch.arange(num_tokens, device=x.device).repeat_interleave(k)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=len(self.experts)).tolist()

        chunks, start = [], 0
        for expert, count in zip(self.experts, counts):
            if count:
                chunks.append(expert(x.index_select(0, token_of_slot[order[start : start + count]])))
                start += count
        # chunks are in sorted order; the inverse permutation puts them back in (token, slot) order
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        outputs = torch.cat(chunks).index_select(0, inverse)
        return outputs.view(num_tokens, k, -1), answered


class MoELayer(nn.Module):
    """Top-k gated mixture of experts over the last dimension of ``x`` (``[..., d_model]``, e.g. ``[B, T, d]``).

    - The gate is computed in fp32 even under autocast (hivemind's stock MoE breaks under bf16 autocast);
      keep the gate's parameters fp32 (use autocast for mixed precision, not ``model.bfloat16()``).
    - Experts marked unavailable (``set_available``) are never chosen; with fewer than k available the layer
      uses what there is, with none it outputs zeros.
    - Combine weights are a softmax over the chosen experts' logits, renormalised over the slots that were
      answered; a token with no answered slot outputs zeros.
    - After each forward: ``aux_loss`` (Switch-style load balancing, 1.0 when routing is uniform) and
      ``last_expert_index`` ([N, k'] expert choices of the flattened tokens).
    """

    def __init__(self, d_model: int, num_experts: int, k: int, dispatcher: Dispatcher):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.gate = nn.Linear(d_model, num_experts)
        self.dispatcher = dispatcher  # registered as a submodule when it is an nn.Module (LocalDispatcher)
        self.register_buffer("available", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_expert_index: torch.Tensor | None = None

    def set_available(self, mask: torch.Tensor | None) -> None:
        """Which experts may be chosen (``BoolTensor[num_experts]``); ``None`` makes all available."""
        if mask is None:
            self.available.fill_(True)
            return
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (self.num_experts,):
            raise ValueError(f"availability mask must have shape ({self.num_experts},), got {tuple(mask.shape)}")
        self.available.copy_(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, self.d_model)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.gate(tokens.float())
        logits = logits.masked_fill(~self.available, float("-inf"))

        k = min(self.k, int(self.available.sum()))
        if k == 0 or tokens.shape[0] == 0:
            self.aux_loss = logits.new_zeros(())
            self.last_expert_index = torch.zeros(tokens.shape[0], 0, dtype=torch.long, device=x.device)
            return torch.zeros_like(x)

        top_logits, expert_index = logits.topk(k, dim=-1)
        outputs, answered = self.dispatcher(tokens, expert_index)

        # softmax over the k chosen, then renormalise over answered slots (== softmax over answered slots alone);
        # dividing by 1 where nothing answered keeps those tokens at exactly zero with finite gradients
        weights = top_logits.softmax(dim=-1) * answered
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
        # elementwise ops are outside autocast, so a bf16 ``outputs`` is promoted to fp32 here
        combined = (weights.unsqueeze(-1) * outputs).sum(dim=1)

        self.aux_loss = self._load_balancing_loss(logits, expert_index)
        self.last_expert_index = expert_index.detach()
        return combined.to(x.dtype).view_as(x)

    def _load_balancing_loss(self, logits: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """Switch Transformer's ``E * sum_e f_e * P_e`` over the available experts (f: routed fraction, P: mean prob)."""
        probs = logits.softmax(dim=-1)  # unavailable experts have probability 0
        routed = torch.bincount(expert_index.reshape(-1), minlength=self.num_experts).to(probs.dtype)
        fraction = routed / expert_index.numel()
        return self.available.sum() * (fraction * probs.mean(dim=0)).sum()
