#!/usr/bin/env bash
# The GPU checks in one run, for a CUDA machine with athome installed (or importable through PYTHONPATH):
#
#   bash bench/gpu_checks.sh [OUT_DIR]          # default OUT_DIR: gpu_checks_out
#
# 1. the CUDA tests (tests/test_cuda.py, and the cuda cases of tests/test_averaging.py): fp16/bf16 expert compute,
#    pinned-memory offload and its copy stream, averaging GPU tensors, a host serving experts from the GPU, a demo
#    swarm training on the GPU;
# 2. bench/experts.py on CUDA: experts per GB and throughput, fp32 vs bf16 vs fp16+offload, two expert sizes;
# 3. verification tolerances for steps computed on this GPU and replayed by CPU validators (the run config's model);
# 4. bench/allreduce.py at N=4 (CPU and loopback: this machine's cores, not its GPU).
# Each step has its own time limit and its whole output in OUT_DIR/<step>.log; a summary line per step is printed.
set -u
out=${1:-gpu_checks_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started)) s (limit $limit s)"
    tail -n "${TAIL:-12}" "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, hivemind, athome; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'hivemind', hivemind.__version__)" || exit 1

step cuda_tests 240 env ATHOME_TEST_CUDA=1 python3 -m pytest -q -rA -p no:cacheprovider tests -k cuda
TAIL=8 step experts 45 python3 bench/experts.py --device cuda
TAIL=8 step experts_large 60 python3 bench/experts.py --device cuda --d_model 1024 --hidden 4096 --batch 1024 --steps 20
TAIL=8 step calibration 240 python3 -m athome.verification.calibration --device cuda --model default --steps 12
TAIL=6 step allreduce 90 python3 bench/allreduce.py --peers 4 --reps 4
