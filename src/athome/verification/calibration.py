"""Tolerances for comparing a recomputed step with a trainer's claim, measured rather than guessed.

An honest recomputation differs from the original only by floating-point evaluation order, because the expert I/O
is replayed exactly and the batch is rebuilt from its seed. How much depends on whether the validator computes
with the same kernels as the trainer, so there are two profiles, chosen by comparing the two peers'
:func:`numerics_platform` strings (device kind, vector ISA of the kernels, torch version), which trainers publish
with their commitments:

- **same**: only the thread count differs. Results agree to ~1e-7, so tolerances are tiny and any deviation
  beyond them (0.01% is plenty) is caught.
- **cross**: other kernels. Measured here by forcing the scalar ATen kernels and oneDNN's SSE4.1 path on the same CPU,
  a stand-in for another CPU. bf16 is the hard case: intermediate roundings differ, so a gate's gradient can be off
  by tens of percent and ~0.4% of tokens route differently; the whole contribution stays within ~0.1%.

Procedure (:func:`calibrate`): honest steps are recorded by an in-process swarm (trainer: 2 threads, this CPU's
kernels) and replayed in fresh processes under each validator setting. Tolerance = ``max(MARGIN[profile] * worst
distance, FLOOR)``; the false-positive rate is measured by deriving tolerances from the first half of the steps and
applying them to the held-out second half. Run it::

    python -m athome.verification.calibration                       # CPU, fp32/bf16/fp16, the sim's small model
    python -m athome.verification.calibration --model default       # the run config's default model (slower)
    python -m athome.verification.calibration --device cuda         # on a GPU: CUDA trainer, CPU validators

The shipped tables (``SAME_PLATFORM``, ``CROSS_PLATFORM_CPU``) come from that command on an AVX2 x86-64 CPU with
torch 2.13 (CPU build); ``MEASURED`` keeps the observed maxima and false-positive counts. Pairs involving a GPU use
``CUDA_PLATFORM``, from ``--device cuda --model default`` on an H100 (``MEASURED_CUDA``; ``bench/gpu_checks.sh``
runs it): an H100 trainer replayed by CPU validators, with a wider margin since other GPUs pick other kernels.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

# measured maxima times this: "same" differs only by thread count, so even 100x is tiny; "cross" was measured on a
# stand-in for other hardware (other kernels on the same CPU), so it gets room for hardware we could not measure;
# "cuda" was measured on one GPU model, where 10x the first 12 steps' maxima let 4 of 48 fp32 replays of the next 12
# through as false positives, and 20x none
MARGIN = {"same": 100.0, "cross": 10.0, "cuda": 20.0}
METRICS = ("loss", "grad", "grad_global", "grad_outputs", "route_mismatch")


@dataclass(frozen=True)
class Tolerances:
    """Largest honest distances (see :class:`~athome.verification.replay.Distances`)."""

    loss: float  # absolute, nats/byte
    grad: float  # relative, per dense tensor (with a floor, see replay.relative_error)
    grad_global: float  # relative, the whole contribution
    grad_outputs: float  # relative, per layer
    route_mismatch: float  # fraction of tokens routed differently

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


FLOOR = Tolerances(loss=1e-5, grad=1e-5, grad_global=1e-5, grad_outputs=1e-5, route_mismatch=0.01)


def numerics_platform(device: str = "cpu") -> str:
    """What decides a step's floating-point results besides its inputs: device kind, kernels, torch version.

    Two peers with the same string recompute each other's steps to within thread-count noise ("same" profile);
    otherwise the "cross" profile applies, or "cuda" with a GPU on either side. E.g. ``cpu:AVX2:torch2.13.0+cpu``.
    """
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name().replace(" ", "")[:40]
        major, minor = torch.cuda.get_device_capability()
        return f"cuda:{name}:sm{major}{minor}:torch{torch.__version__}"[:96]
    return f"{kind}:{torch.backends.cpu.get_cpu_capability()}:torch{torch.__version__}"[:96]


# ---- measured: python -m athome.verification.calibration [--model default] (see the module docstring) ----------
# worst honest distances over both models (the sim's small one: 48 proofs; the default ModelConfig: 12 proofs),
# 2 validator settings per profile; false positives of tolerances derived from the first half, on the second half
MEASURED: Dict[str, Dict[str, dict]] = {
    "same": {
        "fp32": dict(loss=0.0, grad=4.3e-07, grad_global=4.2e-08, grad_outputs=0.0, route_mismatch=0.0, fp="0/60"),
        "bf16": dict(loss=0.0, grad=4.1e-07, grad_global=3.2e-08, grad_outputs=0.0, route_mismatch=0.0, fp="0/60"),
        "fp16": dict(loss=0.0, grad=4.3e-07, grad_global=3.2e-08, grad_outputs=0.0, route_mismatch=0.0, fp="0/60"),
    },
    "cross": {
        "fp32": dict(loss=4.8e-07, grad=4.3e-07, grad_global=2.1e-07, grad_outputs=3e-07, route_mismatch=0.0, fp="0/60"),
        "bf16": dict(loss=2.4e-04, grad=2.6e-3, grad_global=1.8e-3, grad_outputs=2.1e-3, route_mismatch=0.0, fp="0/60"),
        "fp16": dict(loss=2.7e-05, grad=3.1e-3, grad_global=3.4e-4, grad_outputs=1.0e-3, route_mismatch=0.0, fp="0/60"),
    },
}
MEASURED_ON = "cpu:AVX2:torch2.13.0+cpu (x86-64, 2 cores); cross = ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41"
SAME_PLATFORM: Dict[str, Tolerances] = {
    p: Tolerances(**{m: max(MARGIN["same"] * MEASURED["same"][p][m], getattr(FLOOR, m)) for m in METRICS})
    for p in ("fp32", "bf16", "fp16")
}
CROSS_PLATFORM_CPU: Dict[str, Tolerances] = {  # never tighter than "same"
    p: Tolerances(**{m: max(MARGIN["cross"] * MEASURED["cross"][p][m], getattr(SAME_PLATFORM[p], m)) for m in METRICS})
    for p in ("fp32", "bf16", "fp16")
}
# ---- measured: python -m athome.verification.calibration --device cuda --model default --steps 12 -------------
# worst honest distances of 24 steps on the GPU, each replayed by 4 CPU validator settings; false positives of
# MARGIN["cuda"] x the first 12 steps' maxima on the other 12
MEASURED_CUDA: Dict[str, dict] = {
    "fp32": dict(loss=9.5e-07, grad=1.3e-05, grad_global=1.3e-05, grad_outputs=1.5e-06, route_mismatch=0.0, fp="0/48"),
    "bf16": dict(loss=1.5e-04, grad=3.2e-3, grad_global=2.3e-3, grad_outputs=1.6e-3, route_mismatch=0.0, fp="0/48"),
    "fp16": dict(loss=2.8e-05, grad=3.0e-2, grad_global=2.9e-3, grad_outputs=5.9e-3, route_mismatch=0.0, fp="0/48"),
}
MEASURED_CUDA_ON = "cuda:NVIDIAH10080GBHBM3:sm90:torch2.11.0+cu130 trainer; CPU validators on its 16-core x86-64 host"
CUDA_PLATFORM: Dict[str, Tolerances] = {  # never tighter than between two CPUs
    p: Tolerances(**{m: max(MARGIN["cuda"] * MEASURED_CUDA[p][m], getattr(CROSS_PLATFORM_CPU[p], m)) for m in METRICS})
    for p in ("fp32", "bf16", "fp16")
}
CPU_TOLERANCES = SAME_PLATFORM  # the profile in-process simulations use


def tolerances_for(precision: str, trainer_platform: str, validator_platform: str) -> Tolerances:
    """The tolerances for a ``precision`` step computed on ``trainer_platform``, replayed on ``validator_platform``
    (strings from :func:`numerics_platform`)."""
    if precision not in SAME_PLATFORM:
        raise ValueError(f"unknown precision {precision!r}")
    if trainer_platform == validator_platform:
        return SAME_PLATFORM[precision]
    kinds = {trainer_platform.split(":")[0] or "cpu", validator_platform.split(":")[0]}
    return CROSS_PLATFORM_CPU[precision] if kinds == {"cpu"} else CUDA_PLATFORM[precision]


def tolerances_from(maxima: Dict[str, float], margin: float, floor: Tolerances = FLOOR) -> Tolerances:
    return Tolerances(**{m: max(margin * maxima.get(m, 0.0), getattr(floor, m)) for m in METRICS})


# ---------------------------------------------------------------------------------------------- measuring
# validators: "same" platform (only the thread count differs) and "cross" platform (other kernels: the scalar
# ATen kernels, oneDNN limited to SSE4.1 -- a stand-in for another CPU; real other hardware may differ more)
VALIDATOR_SETTINGS: List[Tuple[str, Dict[str, str]]] = [
    ("same", {"threads": "1"}),
    ("same", {"threads": "2"}),
    # oneDNN limited in both: with its native ISA and scalar ATen, torch 2.13 refuses bf16 matmuls of the run
    # config's default model ("pack_vnni2 is only supported when avx512 is supported")
    ("cross", {"threads": "1", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}),
    ("cross", {"threads": "2", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}),
]


def record_honest(precision: str, steps: int, *, threads: int = 2, seed: int = 0, device: str = "cpu",
                  trainers: int = 2, model: Optional[dict] = None) -> list:
    """Honest proofs from a small in-process swarm (experts train as they would on hosts)."""
    import torch

    from athome.verification.sim import SimConfig, SimSwarm

    torch.set_num_threads(threads)
    config = SimConfig(n_trainers=trainers, precision=precision, validate=False, seed=seed, device=device,
                       **({"model": model} if model else {}))
    swarm = SimSwarm(config)
    proofs = []
    for _ in range(steps):
        proofs += swarm.step().proofs
    return proofs


def replay_distances(proofs: Sequence, config, device: str = "cpu") -> List[Dict[str, float]]:
    """Distances of honest recomputations of ``proofs`` in this process."""
    from athome.verification.replay import compare
    from athome.verification.sim import sim_corpus
    from athome.verification.replay import Replayer

    replayer = Replayer(config.model, sim_corpus(config), grad_clip=config.optimizer.grad_clip, device=device)
    rows = []
    for proof in proofs:
        distances = compare(proof, replayer.recompute(proof))
        rows.append({m: getattr(distances, m) for m in METRICS})
    return rows


def _replay_in_subprocess(directory: Path, setting: Dict[str, str], device: str) -> List[Dict[str, float]]:
    env = dict(os.environ)
    env.update({k: v for k, v in setting.items() if k != "threads"})
    command = [sys.executable, "-m", "athome.verification.calibration", "--replay", str(directory),
               "--threads", setting.get("threads", "1"), "--device", device]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"replay with {setting} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def calibrate(precisions: Sequence[str] = ("fp32", "bf16", "fp16"), steps: int = 24, *, device: str = "cpu",
              settings: Sequence[Tuple[str, Dict[str, str]]] = VALIDATOR_SETTINGS, margin: Dict[str, float] = MARGIN,
              model: Optional[dict] = None) -> Dict[str, dict]:
    """Measure honest distances per precision and profile; returns precision -> report.

    A report has, per profile, the worst distances, the tolerances they give, and the false positives those
    tolerances produce: tolerances from the first half of the steps applied to the held-out second half.
    With ``device="cuda"`` the trainer runs on the GPU and every validator setting counts as "cuda" (other
    hardware: margin ``MARGIN["cuda"]``).
    """
    import torch

    from athome.verification.sim import SimConfig

    reports = {}
    for precision in precisions:
        started = time.perf_counter()
        proofs = record_honest(precision, steps, device=device, model=model)
        logger.info(f"{precision}: {len(proofs)} honest steps recorded on {device} "
                    f"in {time.perf_counter() - started:.0f}s")
        config = SimConfig(precision=precision, **({"model": model} if model else {})).run_config()
        rows: Dict[str, List[List[Dict[str, float]]]] = {"same": [], "cross": [], "cuda": []}
        per_setting = {}
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            (directory / "config.json").write_text(config.model.model_dump_json())
            for index, proof in enumerate(proofs):
                (directory / f"{index:05d}.proof").write_bytes(proof.to_bytes())
            for profile, setting in settings:
                profile = profile if device == "cpu" else "cuda"  # a GPU trainer: every CPU validator is other hardware
                started = time.perf_counter()
                result = _replay_in_subprocess(directory, setting, "cpu")
                logger.info(f"{precision}: replayed by a CPU validator with {setting} "
                            f"in {time.perf_counter() - started:.0f}s")
                rows[profile].append(result)
                per_setting[f"{profile} " + ",".join(f"{k}={v}" for k, v in setting.items())] = {
                    m: max(r[m] for r in result) for m in METRICS}
        report = dict(steps=len(proofs), torch=torch.__version__, platform=numerics_platform(device),
                      per_setting=per_setting)
        half = len(proofs) // 2
        for profile, runs in rows.items():
            if not runs:
                continue
            every = [row for run in runs for row in run]
            maxima = {m: max(row[m] for row in every) for m in METRICS}
            first = tolerances_from({m: max(row[m] for run in runs for row in run[:half]) for m in METRICS},
                                    margin[profile])
            held_out = [row for run in runs for row in run[half:]]
            report[profile] = dict(
                replays=len(every), maxima=maxima, tolerances=tolerances_from(maxima, margin[profile]).as_dict(),
                false_positives=sum(any(row[m] > getattr(first, m) for m in METRICS) for row in held_out),
                held_out_checks=len(held_out),
            )
        reports[precision] = report
    return reports


def _replay_main(directory: Path, threads: int, device: str) -> None:
    import torch

    from athome.config import RunConfig
    from athome.verification.proof import StepProof

    torch.set_num_threads(threads)
    config = RunConfig.model_validate({"model": json.loads((directory / "config.json").read_text())})
    proofs = [StepProof.from_bytes(path.read_bytes()) for path in sorted(directory.glob("*.proof"))]
    for row in replay_distances(proofs, _sim_run_config(config), device=device):
        print(json.dumps(row))


def _sim_run_config(config):
    from athome.verification.sim import SimConfig

    return SimConfig(model=config.model.model_dump()).run_config()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="measure honest recomputation error and derive tolerances")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--steps", type=int, default=24, help="sim steps (2 trainers each)")
    parser.add_argument("--device", default="cpu", help="the trainer's device (cpu or cuda)")
    parser.add_argument("--model", choices=["small", "default"], default="small",
                        help="the simulation's small model, or the run config's default model (slower)")
    parser.add_argument("--replay", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replay:
        _replay_main(Path(args.replay), args.threads, args.device)
        return
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)  # progress: a run takes minutes
    from athome.config import ModelConfig

    model = ModelConfig().model_dump() if args.model == "default" else None
    reports = calibrate(args.precisions.split(","), args.steps, device=args.device, model=model)
    print(json.dumps(reports, indent=1))
    for precision, report in reports.items():
        for profile in ("same", "cross", "cuda"):
            if profile in report:
                r = report[profile]
                print(f"{precision} {profile}: worst honest {_short(r['maxima'])} -> tolerances "
                      f"{_short(r['tolerances'])}; false positives {r['false_positives']}/{r['held_out_checks']}")


def _short(values: Dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:.2g}" for k, v in values.items()) + "}"


if __name__ == "__main__":
    main()
