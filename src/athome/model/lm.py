"""A byte-level GPT whose feed-forward blocks are mixtures of experts.

The dense part (embeddings, attention, layer norms, gates) lives on every trainer and is averaged between them;
the experts ``{prefix}.{layer}.{index}`` live wherever each layer's ``Dispatcher`` sends tokens: in-process for
``build_local_model`` (the baseline), on volunteer hosts for the trainer.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from athome.config import ModelConfig
from athome.model.expert import build_expert
from athome.model.moe import Dispatcher, LocalDispatcher, MoELayer


class CausalSelfAttention(nn.Module):
    def __init__(self, model: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = model.n_heads, model.dropout
        self.qkv = nn.Linear(model.d_model, 3 * model.d_model)
        self.proj = nn.Linear(model.d_model, model.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        # [B, T, 3C] -> three [B, H, T, C/H]
        q, k, v = self.qkv(x).view(batch, time, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, time, channels))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + moe(ln2(x))``."""

    def __init__(self, model: ModelConfig, dispatcher: Dispatcher):
        super().__init__()
        self.ln1 = nn.LayerNorm(model.d_model)
        self.attn = CausalSelfAttention(model)
        self.ln2 = nn.LayerNorm(model.d_model)
        self.moe = MoELayer(model.d_model, model.experts_per_layer, model.top_k, dispatcher)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.moe(self.ln2(x))


class MoETransformerLM(nn.Module):
    """``forward(tokens: LongTensor[B, T]) -> logits[B, T, vocab_size]`` with ``T <= model.seq_len``.

    ``make_dispatcher(layer)`` gives the dispatcher for experts ``{prefix}.{layer}.0 .. E-1``.
    Dense parameters are initialised from ``seed`` alone (the global RNG is left as it was), so every trainer
    that builds the same config starts from the same dense weights.
    """

    def __init__(
        self,
        model: ModelConfig,
        make_dispatcher: Callable[[int], Dispatcher],
        aux_coef: float = 0.01,
        seed: int = 0,
    ):
        super().__init__()
        self.config, self.aux_coef = model, aux_coef
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tok_emb = nn.Embedding(model.vocab_size, model.d_model)
            self.pos_emb = nn.Embedding(model.seq_len, model.d_model)
            self.drop = nn.Dropout(model.dropout)  # dense part only: experts must stay deterministic
            self.blocks = nn.ModuleList(Block(model, make_dispatcher(layer)) for layer in range(model.n_layers))
            self.ln_f = nn.LayerNorm(model.d_model)
            self.head = nn.Linear(model.d_model, model.vocab_size, bias=False)
            self.head.weight = self.tok_emb.weight  # tied
            self._init_dense()

    @torch.no_grad()
    def _init_dense(self) -> None:
        """GPT-2 init for the dense part; experts are initialised by whoever built them (``build_expert``)."""
        for embedding in (self.tok_emb, self.pos_emb):
            nn.init.normal_(embedding.weight, std=0.02)
        for block in self.blocks:
            for linear in (block.attn.qkv, block.attn.proj, block.moe.gate):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
            # residual projections are scaled down with depth
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * self.config.n_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        time = tokens.shape[1]
        if time > self.config.seq_len:
            raise ValueError(f"sequence of {time} tokens is longer than model.seq_len={self.config.seq_len}")
        positions = torch.arange(time, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def losses(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cross_entropy, aux)`` for ``batch: LongTensor[B, T+1]``: predict ``batch[:, 1:]`` from ``batch[:, :-1]``.

        ``aux`` is the sum of the MoE layers' load-balancing losses. Cross-entropy is in nats per byte.
        """
        logits = self(batch[:, :-1])
        cross_entropy = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        aux = sum((layer.aux_loss for layer in self.moe_layers()), logits.new_zeros((), dtype=torch.float32))
        return cross_entropy, aux

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """The training objective: ``cross_entropy + aux_coef * aux`` (see ``losses``)."""
        cross_entropy, aux = self.losses(batch)
        return cross_entropy + self.aux_coef * aux

    def moe_layers(self) -> list[MoELayer]:
        return [block.moe for block in self.blocks]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the dispatchers (i.e. not an expert's): what trainers average."""
        expert_ids = {
            id(param)
            for layer in self.moe_layers()
            if isinstance(layer.dispatcher, nn.Module)
            for param in layer.dispatcher.parameters()
        }
        return [param for param in self.parameters() if id(param) not in expert_ids]


def build_local_model(model: ModelConfig, aux_coef: float = 0.01, seed: int = 0) -> MoETransformerLM:
    """The baseline: every expert of ``model.expert_uids()`` in this process, built by ``build_expert``."""
    uids = model.expert_uids()
    per_layer = model.experts_per_layer

    def make_dispatcher(layer: int) -> LocalDispatcher:
        layer_uids = uids[layer * per_layer : (layer + 1) * per_layer]
        return LocalDispatcher([build_expert(model, uid) for uid in layer_uids])

    return MoETransformerLM(model, make_dispatcher, aux_coef=aux_coef, seed=seed)
