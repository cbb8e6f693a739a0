"""ExpertBackend numerics (fp32 / bf16 / fp16 + loss scaling / offload), accumulation and checkpoints, on CPU.

The backend is driven the way hivemind's Runtime drives it: ``forward(*inputs)`` and
``backward(*inputs, *grad_outputs)`` with flat tensors.

Stated tolerances (relative L2 error against the fp32 backend, same data and init; measured values in brackets,
d=32, h=64, batch 32, CPU):

- one forward / input grads / parameter grads: fp16 <= 2e-3 [~5e-4], bf16 <= 2e-2 [~4e-3]
- after 20 AdamW steps, error of the total weight change (w - w0): fp16 <= 2e-2 [~5e-3], bf16 <= 1e-1 [~3e-2]
- offload vs no offload at the same precision: bitwise equal on CPU (autocast and the offload working copy round
  the fp32 master weights identically; the host AdamW runs the same ops)
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hivemind.utils.tensor_descr import BatchTensorDescriptor

from athome.config import OptimizerConfig
from athome.peer.backend import CheckpointMismatchError, ExpertBackend
from athome.peer.checkpoint import CheckpointSaver, checkpoint_paths, load_expert, save_expert

D, H, B = 32, 64, 32
CFG = OptimizerConfig(expert_lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01, grad_clip=1.0)


def make_module(seed: int = 0, d: int = D, h: int = H) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))


def make_backend(precision="fp32", offload=False, seed=0, d=D, h=H, **kwargs) -> ExpertBackend:
    kwargs.setdefault("optimizer_config", CFG)
    return ExpertBackend(
        "ffn.0.1",
        make_module(seed, d, h),
        precision=precision,
        offload=offload,
        args_schema=(BatchTensorDescriptor(d),),
        max_batch_size=1024,
        **kwargs,
    )


def batch(seed: int, d: int = D, grad_scale: float = 1e-2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=gen), torch.randn(B, d, generator=gen) * grad_scale


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp32_matches_hand_written_adamw():
    backend = make_backend("fp32")
    ref = make_module(0)
    opt = torch.optim.AdamW(ref.parameters(), lr=CFG.expert_lr, betas=CFG.betas, eps=1e-8,
                            weight_decay=CFG.weight_decay)
    before = [p.detach().clone() for p in backend.module.parameters()]
    for step in range(3):
        x, g = batch(step)
        (out,) = backend.forward(x)
        (grad_in,) = backend.backward(x, g)

        xr = x.clone().requires_grad_(True)
        out_ref = ref(xr)
        out_ref.backward(g)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CFG.grad_clip)
        opt.step()
        opt.zero_grad()

        torch.testing.assert_close(out, out_ref.detach(), rtol=0, atol=0)
        torch.testing.assert_close(grad_in, xr.grad, rtol=1e-6, atol=1e-9)
    for p, q in zip(backend.module.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    assert any(not torch.equal(p, b) for p, b in zip(backend.module.parameters(), before))
    assert backend.num_updates == 3 and backend.num_backward_calls == 3 and backend.num_forward_calls == 3
    assert backend.samples_processed == 3 * B and backend.skipped_steps == 0 and backend.loss_scale == 1.0


@pytest.mark.parametrize("precision,tol_once,tol_train", [("fp16", 2e-3, 2e-2), ("bf16", 2e-2, 1e-1)])
def test_mixed_precision_close_to_fp32(precision, tol_once, tol_train):
    # accumulation=1000: no step, so the master .grad holds this call's unscaled parameter gradients
    ref, mixed = make_backend("fp32", accumulation=1000), make_backend(precision, accumulation=1000)
    x, g = batch(0)
    assert rel(mixed.forward(x)[0], ref.forward(x)[0]) < tol_once
    assert mixed.forward(x)[0].dtype == torch.float32  # I/O stays fp32 whatever the internal precision
    gi_mixed, gi_ref = mixed.backward(x, g)[0], ref.backward(x, g)[0]
    assert gi_mixed.dtype == torch.float32 and rel(gi_mixed, gi_ref) < tol_once
    for p, q in zip(mixed.master_parameters, ref.master_parameters):
        assert p.grad.dtype == torch.float32 and rel(p.grad, q.grad) < tol_once

    ref, mixed = make_backend("fp32"), make_backend(precision)
    init = [p.detach().clone() for p in ref.master_parameters]
    for step in range(20):
        x, g = batch(100 + step)
        ref.backward(x, g)
        mixed.backward(x, g)
    assert mixed.num_updates == ref.num_updates == 20 and mixed.skipped_steps == 0
    for p, q, p0 in zip(mixed.master_parameters, ref.master_parameters, init):
        assert p.dtype == torch.float32
        assert rel(p - p0, q - p0) < tol_train


def test_fp16_overflow_skips_step_halves_scale_and_returns_finite_grads():
    backend = make_backend("fp16", loss_scale_init=2.0**16)
    ref = make_backend("fp32")
    before = [p.detach().clone() for p in backend.master_parameters]
    x, _ = batch(0)
    huge = torch.full((B, D), 1e3)  # 1e3 * 2^16 overflows fp16 (max 65504)
    (grad_in,) = backend.backward(x, huge)
    assert backend.skipped_steps == 1 and backend.num_updates == 0
    assert backend.loss_scale == 2.0**15
    assert all(torch.equal(p, b) for p, b in zip(backend.master_parameters, before))
    assert torch.isfinite(grad_in).all()
    (grad_ref,) = ref.backward(x, huge)
    assert rel(grad_in, grad_ref) < 1e-2  # recovered at a lower scale, not zeros

    # the next ordinary batch trains normally at the lowered scale
    x, g = batch(1)
    backend.backward(x, g)
    assert backend.num_updates == 1 and backend.loss_scale == 2.0**15 and backend.skipped_steps == 1


def test_non_finite_grad_outputs_are_rejected_without_lowering_scale():
    backend = make_backend("fp16")
    x, g = batch(0)
    g[0, 0] = float("nan")
    (grad_in,) = backend.backward(x, g)
    assert torch.equal(grad_in, torch.zeros_like(x))
    assert backend.skipped_steps == 1 and backend.num_updates == 0 and backend.loss_scale == 2.0**16


def test_fp16_scale_grows_after_growth_interval():
    backend = make_backend("fp16", loss_scale_init=2.0**10, loss_scale_growth_interval=3)
    for step in range(3):
        assert backend.loss_scale == 2.0**10
        backend.backward(*batch(step))
    assert backend.loss_scale == 2.0**11
    for step in range(3):
        backend.backward(*batch(10 + step))
    assert backend.loss_scale == 2.0**12 and backend.skipped_steps == 0


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_offload_equals_no_offload(precision):
    plain, off = make_backend(precision), make_backend(precision, offload=True, accumulation=1)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    assert all(p.dtype == dtype for p in off.module.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in off.master_parameters)
    assert all(m.data_ptr() != w.data_ptr() for m, w in zip(off.master_parameters, off.module.parameters()))
    for step in range(5):
        x, g = batch(step)
        torch.testing.assert_close(off.forward(x)[0], plain.forward(x)[0], rtol=0, atol=0)
        torch.testing.assert_close(off.backward(x, g)[0], plain.backward(x, g)[0], rtol=0, atol=0)
    for p, q in zip(off.master_parameters, plain.master_parameters):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # bitwise on CPU
    # the working copy is the master rounded to the compute dtype
    for w, m in zip(off.module.parameters(), off.master_parameters):
        assert torch.equal(w, m.to(dtype))
    for key in ("exp_avg", "exp_avg_sq"):
        for s_off, s_plain in zip(off.optimizer.state.values(), plain.optimizer.state.values()):
            assert torch.equal(s_off[key], s_plain[key])


def test_device_memory_offload_is_a_quarter_of_fp32():
    fp32, off = make_backend("fp32"), make_backend("fp16", offload=True)
    fp32.backward(*batch(0))
    off.backward(*batch(0))
    n = sum(p.numel() for p in fp32.module.parameters())
    assert off.device_memory_bytes() == 4 * n  # fp16 weights + fp16 grads
    assert 16 * n <= fp32.device_memory_bytes() < 16 * n + 64  # fp32 weights, grads, 2 Adam moments (+ steps)
    assert off.host_memory_bytes() >= 16 * n and fp32.host_memory_bytes() == 0


def test_accumulation_steps_every_k_calls_with_mean_gradient():
    k = 3
    backend = make_backend("fp32", accumulation=k)
    ref = make_module(0)
    opt = torch.optim.AdamW(ref.parameters(), lr=CFG.expert_lr, betas=CFG.betas, eps=1e-8,
                            weight_decay=CFG.weight_decay)
    for update in range(2):
        for call in range(k):
            before = [p.detach().clone() for p in backend.master_parameters]
            x, g = batch(10 * update + call)
            backend.backward(x, g)
            changed = any(not torch.equal(p, b) for p, b in zip(backend.master_parameters, before))
            assert changed == (call == k - 1)
            ref(x).backward(g / k)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CFG.grad_clip)
        opt.step()
        opt.zero_grad()
        assert backend.num_updates == update + 1
    for p, q in zip(backend.master_parameters, ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert backend.num_backward_calls == 2 * k and backend.samples_processed == 2 * k * B


def test_accumulation_default_comes_from_config():
    backend = make_backend("fp32", optimizer_config=CFG.model_copy(update={"expert_accumulation": 4}))
    assert backend.accumulation == 4


@pytest.mark.parametrize("precision,offload", [("fp16", True), ("fp32", False)])
def test_checkpoint_round_trip_is_bitwise(tmp_path, precision, offload):
    trained = make_backend(precision, offload=offload, loss_scale_growth_interval=2)
    for step in range(5):
        trained.backward(*batch(step))
    trained.backward(batch(99)[0], torch.full((B, D), 1e3))  # one overflow (fp16) so the scaler state is non-trivial
    save_expert(trained, tmp_path)
    saved = [p.detach().clone() for p in trained.master_parameters]
    weights_path, state_path = checkpoint_paths(trained.name, tmp_path)
    assert weights_path.exists() and state_path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    fresh = make_backend(precision, offload=offload, seed=123, loss_scale_growth_interval=2)
    assert load_expert(fresh, tmp_path)
    for p, q in zip(fresh.master_parameters, trained.master_parameters):
        assert torch.equal(p, q)
    for w, q in zip(fresh.module.parameters(), trained.module.parameters()):
        assert torch.equal(w, q)  # the device working copy is refreshed too
    for s_fresh, s_trained in zip(fresh.optimizer.state.values(), trained.optimizer.state.values()):
        for key in s_trained:
            assert torch.equal(s_fresh[key], s_trained[key]), key
    assert fresh.counters() == trained.counters()
    assert fresh.scaler.state_dict() == trained.scaler.state_dict()

    # and training continues identically
    x, g = batch(1234)
    assert torch.equal(fresh.backward(x, g)[0], trained.backward(x, g)[0])
    for p, q in zip(fresh.master_parameters, trained.master_parameters):
        assert torch.equal(p, q)

    # the weights file is a plain fp32 state_dict of the module
    module = make_module(7)
    module.load_state_dict(load_file(str(weights_path)))
    for p, q in zip(module.parameters(), saved):
        assert p.dtype == torch.float32 and torch.equal(p, q)


def test_load_missing_and_mismatched_checkpoint(tmp_path):
    backend = make_backend("fp32")
    assert load_expert(backend, tmp_path) is False
    save_expert(backend, tmp_path)
    wider = make_backend("fp32", h=2 * H)
    with pytest.raises(CheckpointMismatchError, match=r"0\.weight: checkpoint \[64, 32\] vs expert \[128, 32\]"):
        load_expert(wider, tmp_path)


def test_checkpoint_saver_periodic_and_on_stop(tmp_path):
    backend = make_backend("fp32")
    saver = CheckpointSaver([backend], tmp_path, every_updates=2, every_seconds=None, poll_interval=0.02)
    saver.start()
    for step in range(2):
        backend.backward(*batch(step))
    deadline = time.monotonic() + 5
    while saver.num_saves < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert saver.num_saves == 1
    backend.backward(*batch(2))  # 3 updates: not due yet, saved on stop
    saver.stop()
    assert not saver.is_alive() and saver.num_saves == 2
    fresh = make_backend("fp32", seed=5)
    assert load_expert(fresh, tmp_path) and fresh.num_updates == 3


def test_state_dict_from_another_thread_is_consistent():
    backend = make_backend("fp16", offload=True)
    errors, snapshots = [], []

    def snapshot():
        try:
            for _ in range(20):
                snapshots.append(backend.state_dict())
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=snapshot)
    thread.start()
    for step in range(20):
        backend.backward(*batch(step))
    thread.join()
    assert not errors and len(snapshots) == 20
    for state in snapshots:  # every snapshot's step count matches its update counter
        steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
        assert steps <= {float(state["counters"]["num_updates"])}


def test_works_from_another_thread_like_the_runtime():
    # autocast is thread-local: the backend must enter it itself inside forward/backward
    backend, ref = make_backend("bf16"), make_backend("bf16")
    x, g = batch(0)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=backend.forward(x)[0], gi=backend.backward(x, g)[0]))
    thread.start()
    thread.join()
    assert torch.equal(result["out"], ref.forward(x)[0]) and torch.equal(result["gi"], ref.backward(x, g)[0])
    assert backend.outputs_schema.dtype == torch.float32
