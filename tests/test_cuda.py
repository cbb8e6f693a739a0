"""CUDA paths: the expert backend's fp16/bf16 compute, its pinned-memory offload and copy stream, a real host
serving experts from the GPU, and a whole demo swarm (hosts and trainer) on the GPU.

Skipped without a CUDA device. On a GPU machine: ``ATHOME_TEST_CUDA=1 python -m pytest -q tests -k cuda`` (the
rest of the suite hides GPUs from itself, see conftest.py). Tolerances are those of tests/test_backend.py (relative
L2 error against a CPU fp32 backend fed the same data): one call fp16 <= 2e-3, bf16 <= 2e-2; the weight change
after 20 AdamW steps fp16 <= 2e-2, bf16 <= 1e-1.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from test_backend import B, D, batch, make_backend, rel
from test_remote import serving_host

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (ATHOME_TEST_CUDA=1)")

TOLERANCES = {"fp16": (2e-3, 2e-2), "bf16": (2e-2, 1e-1)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_offload_on_cuda_trains_like_cpu_fp32(precision):
    tol_once, tol_train = TOLERANCES[precision]
    ref, gpu = make_backend("fp32"), make_backend(precision, offload=True, device="cuda")
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_pinned() for p in gpu.master_parameters)
    assert all(p.is_cuda and p.dtype == DTYPES[precision] for p in gpu.module.parameters())
    x, g = batch(0)
    out = gpu.forward(x)[0]
    assert out.dtype == torch.float32 and rel(out.cpu(), ref.forward(x)[0]) < tol_once

    init = [p.detach().clone() for p in ref.master_parameters]
    for step in range(20):
        x, g = batch(100 + step)
        grad_ref = ref.backward(x, g)[0]
        grad_gpu = gpu.backward(x, g)[0]
        assert grad_gpu.dtype == torch.float32 and rel(grad_gpu.cpu(), grad_ref) < 10 * tol_once
    assert gpu.num_updates == ref.num_updates == 20 and gpu.skipped_steps == 0
    for p, q, p0 in zip(gpu.master_parameters, ref.master_parameters, init):
        assert rel(p - p0, q - p0) < tol_train
    torch.cuda.synchronize()
    for w, m in zip(gpu.module.parameters(), gpu.master_parameters):  # the working copy is the rounded master
        assert torch.equal(w.cpu(), m.to(w.dtype))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_offload_on_cuda_matches_training_on_the_gpu(precision):
    """Offload (host AdamW, pinned copies, side stream) and plain GPU training compute the same update."""
    plain, off = make_backend(precision, device="cuda"), make_backend(precision, offload=True, device="cuda")
    for step in range(5):
        x, g = batch(step)
        torch.testing.assert_close(off.forward(x)[0], plain.forward(x)[0], rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(off.backward(x, g)[0], plain.backward(x, g)[0], rtol=1e-2, atol=1e-4)
    for p, q in zip(off.master_parameters, plain.master_parameters):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)


def test_next_call_waits_for_the_weight_upload():
    """Calls right after an update see the new weights: the compute stream waits for the copy stream's event."""
    d, h = 1024, 4096  # 8 MB of fp16 weights per upload: long enough to race if the wait were missing
    backend = make_backend("fp16", offload=True, device="cuda", d=d, h=h, accumulation=1)
    probe = torch.randn(B, d)
    previous = backend.forward(probe)[0]
    for step in range(10):
        x, g = batch(step, d=d)
        backend.backward(x, g)  # steps, then starts uploading the new weights
        immediate = backend.forward(probe)[0]
        torch.cuda.synchronize()
        settled = backend.forward(probe)[0]
        assert torch.equal(immediate, settled), f"step {step}: a call read weights still being uploaded"
        assert not torch.equal(settled, previous)  # every update changes the outputs
        previous = settled
    assert backend.num_updates == 10 and backend.skipped_steps == 0


def test_fp16_overflow_on_cuda_skips_the_step_and_recovers_input_grads():
    backend = make_backend("fp16", offload=True, device="cuda", loss_scale_init=2.0**16)
    ref = make_backend("fp32")
    before = [p.detach().clone() for p in backend.master_parameters]
    x, _ = batch(0)
    huge = torch.full((B, D), 1e3)  # 1e3 * 2^16 overflows fp16
    (grad_in,) = backend.backward(x, huge)
    assert backend.skipped_steps == 1 and backend.num_updates == 0 and backend.loss_scale == 2.0**15
    assert all(torch.equal(p, b) for p, b in zip(backend.master_parameters, before))
    assert torch.isfinite(grad_in).all() and rel(grad_in.cpu(), ref.backward(x, huge)[0]) < 1e-2
    backend.backward(*batch(1))
    assert backend.num_updates == 1 and backend.skipped_steps == 1


def test_gpu_memory_of_an_offloaded_expert():
    """Between requests an fp16+offload expert holds its fp16 weights on the GPU; fp32 holds weights and Adam."""
    d, h = 512, 2048
    held, backends = {}, []  # kept alive: a backend's GPU memory is freed by the garbage collector, not at `del`
    for label, precision, offload in (("fp32", "fp32", False), ("offload", "fp16", True)):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        backend = make_backend(precision, offload=offload, device="cuda", d=d, h=h)
        backend.backward(*batch(0, d=d))
        torch.cuda.synchronize()
        held[label] = torch.cuda.memory_allocated() - base
        backends.append(backend)
    n = sum(p.numel() for p in backends[0].module.parameters())
    assert held["offload"] <= 2 * n + 4096, held  # fp16 weights (the allocator rounds up to 512 B blocks)
    assert held["fp32"] >= 12 * n - 4096, held  # fp32 weights + two Adam moments
    assert held["fp32"] / held["offload"] > 5.5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cpu_validator_passes_honest_gpu_steps_and_catches_scaled_gradients(precision):
    """The shipped GPU->CPU tolerances (calibration.CUDA_PLATFORM) hold for steps computed on this GPU."""
    from athome.verification.calibration import (METRICS, numerics_platform, record_honest, replay_distances,
                                                  tolerances_for)
    from athome.verification.sim import SimConfig

    proofs = record_honest(precision, 4, device="cuda")
    assert proofs and all(proof.device == "cuda" for proof in proofs)
    config = SimConfig(precision=precision).run_config()
    tolerance = tolerances_for(precision, numerics_platform("cuda"), numerics_platform("cpu"))
    for row in replay_distances(proofs, config, device="cpu"):
        assert all(row[m] <= getattr(tolerance, m) for m in METRICS), (row, tolerance)
    scaled = [dataclasses.replace(proof, grads=[g * 1.25 for g in proof.grads]) for proof in proofs]
    for row in replay_distances(scaled, config, device="cpu"):
        assert row["grad_global"] > tolerance.grad_global, (row, tolerance)


def test_host_serves_experts_from_the_gpu(coordinator, spawn, tmp_path):
    """A real ``peer join --device cuda --precision fp16 --offload`` answers a CPU trainer like the local model."""
    from hivemind.proto import runtime_pb2

    from athome.config import RunConfig
    from athome.dht.node import get_records
    from athome.dht.schemas import ServerRecord, run_key
    from athome.model.expert import build_expert
    from athome.model.moe import LocalDispatcher, MoELayer
    from athome.trainer.remote import RemoteDispatcher

    model = RunConfig().model
    flags = ("--device", "cuda", "--precision", "fp16", "--offload")
    with serving_host(coordinator, spawn, tmp_path, *flags) as (dht, p2p, registry):
        records = get_records(dht, run_key("demo", "servers"), ServerRecord)
        assert [(r.device, r.precision) for r, _ in records.values()] == [("cuda", "fp16")]
        uids = model.expert_uids()[: model.experts_per_layer]
        layers = []
        for dispatcher in (LocalDispatcher([build_expert(model, uid) for uid in uids]),
                           RemoteDispatcher(uids, registry, p2p, wire_compression=runtime_pb2.CompressionType.NONE)):
            torch.manual_seed(0)  # the same gate in both
            layers.append(MoELayer(model.d_model, model.experts_per_layer, model.top_k, dispatcher))
        local, remote = layers
        x = torch.randn(32, model.d_model)
        grads = {}
        for name, layer in (("local", local), ("remote", remote)):
            inputs = x.clone().requires_grad_(True)
            out = layer(inputs)
            out.pow(2).sum().backward()
            grads[name] = (out.detach(), inputs.grad)
        assert remote.dispatcher.last_answered_fraction == 1.0
        assert rel(grads["remote"][0], grads["local"][0]) < 2e-3  # fp16 on the host's GPU
        assert rel(grads["remote"][1], grads["local"][1]) < 2e-2
        with torch.no_grad():  # the backward trained the host's experts
            assert not torch.allclose(remote(x), grads["remote"][0], atol=1e-5)


def test_demo_swarm_trains_on_the_gpu(tmp_path):
    """``peer demo`` on a GPU machine: hosts and the trainer pick CUDA themselves; loss falls, nobody is banned."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "athome.cli", "demo", "--steps", "12", "--expert_hosts", "2", "--trainers", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("loss:"))
    first, last = (float(v) for v in line.split(":")[1].split("->"))
    assert last < first
    logs = {path.name: path.read_text() for path in (out / "logs").glob("*.log")}
    assert "Using device cuda" in logs["trainer-0.log"] and "Using device cuda" in logs["host-0.log"]
    banned = [name for name, text in logs.items() if "banned" in text.lower()]
    assert not banned, {name: logs[name][-2000:] for name in banned}
