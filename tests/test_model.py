"""The model: experts, the MoE layer's routing/combine contract, and the LM (fp32 and bf16 autocast)."""
import pytest
import torch

from athome.config import ModelConfig
from athome.model import (
    LocalDispatcher,
    MoELayer,
    build_expert,
    build_local_model,
    expert_input_schema,
)

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, experts_per_layer=4, expert_hidden=64, top_k=2)


def _experts(count: int, model: ModelConfig = TINY) -> list:
    return [build_expert(model, f"ffn.0.{index}") for index in range(count)]


class _DroppingDispatcher(LocalDispatcher):
    """A LocalDispatcher whose answers are masked by a fixed ``answered`` pattern, as if remote experts failed."""

    def __init__(self, experts, answered: torch.Tensor):
        super().__init__(experts)
        self.answered = answered

    def forward(self, x, expert_index):
        outputs, _ = super().forward(x, expert_index)
        return outputs * self.answered.unsqueeze(-1), self.answered


def test_build_expert_is_deterministic_per_uid_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    first, again, other = build_expert(TINY, "ffn.0.1"), build_expert(TINY, "ffn.0.1"), build_expert(TINY, "ffn.0.2")
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(first.fc_in.weight, other.fc_in.weight)
    x = torch.randn(5, TINY.d_model)
    assert first(x).shape == (5, TINY.d_model)
    assert torch.equal(first(x), first(x))  # no dropout: hivemind recomputes forward in backward


def test_expert_input_schema():
    (descriptor,) = expert_input_schema(TINY, dtype=torch.bfloat16)
    assert tuple(descriptor.size) == (None, TINY.d_model) and descriptor.dtype == torch.bfloat16


def test_local_dispatcher_matches_naive_per_token_loop():
    torch.manual_seed(0)
    experts = _experts(4)
    dispatcher = LocalDispatcher(experts)
    x = torch.randn(11, TINY.d_model, requires_grad=True)
    expert_index = torch.randint(0, 4, (11, 3))
    outputs, answered = dispatcher(x, expert_index)
    assert outputs.shape == (11, 3, TINY.d_model) and answered.all()
    naive = torch.stack(
        [torch.stack([experts[e](x[n : n + 1])[0] for e in expert_index[n].tolist()]) for n in range(11)]
    )
    torch.testing.assert_close(outputs, naive)
    outputs.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_moe_layer_renormalises_over_answered_slots_and_zeros_unanswered_tokens():
    torch.manual_seed(0)
    experts = _experts(4)
    answered = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
    layer = MoELayer(TINY.d_model, 4, 2, _DroppingDispatcher(experts, answered))
    x = torch.randn(4, TINY.d_model, requires_grad=True)
    out = layer(x)

    logits = layer.gate(x)
    top, index = logits.topk(2, dim=-1)
    assert torch.equal(layer.last_expert_index, index)
    weights = top.softmax(-1)
    expect = [
        weights[0, 0] * experts[index[0, 0]](x[0]) + weights[0, 1] * experts[index[0, 1]](x[0]),
        experts[index[1, 0]](x[1]),  # the only answered slot gets all the weight
        experts[index[2, 1]](x[2]),
        torch.zeros(TINY.d_model),
    ]
    torch.testing.assert_close(out, torch.stack(expect))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.gate.weight.grad).all()
    assert layer.aux_loss.ndim == 0 and layer.aux_loss > 0


def test_moe_layer_restores_shape_and_excludes_unavailable_experts():
    torch.manual_seed(0)
    layer = MoELayer(TINY.d_model, 4, 2, LocalDispatcher(_experts(4)))
    x = torch.randn(3, 5, TINY.d_model)
    assert layer(x).shape == x.shape

    layer.set_available(torch.tensor([False, True, False, True]))
    layer(x)
    assert set(layer.last_expert_index.unique().tolist()) <= {1, 3}

    layer.set_available(torch.tensor([False, False, True, False]))  # fewer than k: use what there is
    out = layer(x)
    assert layer.last_expert_index.shape == (15, 1) and (layer.last_expert_index == 2).all()
    torch.testing.assert_close(out, layer.dispatcher.experts[2](x))  # one slot, weight 1

    layer.set_available(torch.zeros(4, dtype=torch.bool))
    assert torch.equal(layer(x), torch.zeros_like(x))

    layer.set_available(None)
    layer(x)
    assert layer.last_expert_index.shape == (15, 2)
    with pytest.raises(ValueError):
        layer.set_available(torch.ones(3, dtype=torch.bool))


def test_lm_forward_shapes_and_dense_parameters():
    model = build_local_model(TINY)
    tokens = torch.randint(0, 256, (3, TINY.seq_len))
    assert model(tokens).shape == (3, TINY.seq_len, TINY.vocab_size)
    assert len(model.moe_layers()) == TINY.n_layers

    expert_params = {id(p) for layer in model.moe_layers() for p in layer.dispatcher.parameters()}
    dense = model.dense_parameters()
    assert expert_params and not expert_params & {id(p) for p in dense}
    assert len(dense) + len(expert_params) == len(list(model.parameters()))
    # dense init is a function of the seed, so trainers start equal
    again = build_local_model(TINY)
    assert all(torch.equal(a, b) for a, b in zip(dense, again.dense_parameters()))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, TINY.seq_len + 1, dtype=torch.long))


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_local_model(TINY)
    batch = torch.randint(0, 256, (4, TINY.seq_len + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.loss(batch).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
    cross_entropy, aux = model.losses(batch)
    assert first > 5.0  # ~ln(256) at init
    assert cross_entropy.item() < first - 1.0
    assert aux.item() > 0


def test_gate_stays_fp32_and_lm_trains_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_local_model(TINY)
    gate_dtypes = []
    for layer in model.moe_layers():
        layer.gate.register_forward_hook(lambda module, args, output: gate_dtypes.append((args[0].dtype, output.dtype)))
    batch = torch.randint(0, 256, (2, TINY.seq_len + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch[:, :-1])
        loss = model.loss(batch)
    assert logits.dtype == torch.bfloat16  # the autocast actually took effect
    assert gate_dtypes and all(dtypes == (torch.float32, torch.float32) for dtypes in gate_dtypes)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
