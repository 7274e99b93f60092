#!/usr/bin/env bash
# The GPU run: build the extension with its CUDA kernels, run the GPU benchmarks, then the
# whole test suite (default and slow) with the CUDA tests enabled: the benchmarks come first
# so that a crashing or hanging test cannot cost their results. The logs go to $OUT (default
# ./gpu_out), the benchmarks' outputs to $OUT/results.tgz (one folder or file per benchmark,
# committed under benchmarks/results/ as gpu_*), packed again after each benchmark.
#
#   bash benchmarks/gpu_run.sh            # all steps
#   bash benchmarks/gpu_run.sh bench      # no build (the extension already built in place)
#
# It needs python3 with torch (CUDA), timm, scikit-learn, scipy, pytest, pytest-timeout and
# pytest-benchmark, and nvcc; TorchJD (optional) is taken from ./.whl when present.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu_out}
results=$(mktemp -d)/results
mkdir -p "$out" "$results"
steps=${1:-all}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { echo "== $(date -u +%T) $*"; }
pack() { tar czf "$out/results.tgz" -C "$(dirname "$results")" results; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
nproc
c++ --version | head -1
nvcc --version | tail -2 | head -1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

if [ "$steps" = all ]; then
  step "build (sm_90)"
  CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")} \
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) python3 setup.py -q build_ext --inplace >"$out/build.log" 2>&1 ||
    { tail -40 "$out/build.log"; exit 1; }
  python3 -c "import selgroup_fast.ops as o; assert o.cuda_available(), 'no CUDA kernels'; print('CUDA kernels: yes')" || exit 1
  # An op's input error must reach Python as one exception (the first GPU run, 2026-11-27,
  # segfaulted here on that machine's image: see benchmarks/results/README.md).
  python3 -c "
import torch, selgroup_fast.ops as o
try:
    o.affinity_propagation(torch.zeros(3, 3), damping=0.4)
except ValueError as error:
    print('input errors reach Python:', error)" || echo "an op's input error crashed the process (exit $?)"
fi

step "selgroup-bench on the GPU defaults (every method, parameter space)"
timeout 120 python3 -m selgroup_fast.bench --device cuda --out "$results/gpu_default" 2>&1 | tail -22; pack
step "selgroup-bench, representation space"
timeout 60 python3 -m selgroup_fast.bench --device cuda --space representation \
  --methods gd,pcgrad,cagrad,mgda,graddrop,imtl,aligned_mtl,nash_mtl --out "$results/gpu_space" 2>&1 | tail -12; pack
step "the reference code's loop against SelectiveGroupUpdate"
timeout 60 python3 benchmarks/reference_loop.py --device cuda --tasks taskonomy \
  --output "$results/reference_loop_gpu.md" 2>&1 | tail -8; pack
step "the task Jacobian by jacobian= mode, with TorchJD's engines (one MGDA step, K = 4, 11, 32)"
timeout 120 python3 benchmarks/bench_jacobian.py --torchjd --device cuda --load-note "a lent GPU machine running this script alone" --output "$results/jacobian_cuda.md" 2>&1 | tail -12; pack
step "fused-op micro-benchmarks (CUDA)"
timeout 90 python3 -m pytest -q -p no:cacheprovider benchmarks/test_fused_ops.py -k cuda \
  --benchmark-json "$results/micro_cuda.json" >"$results/micro_cuda.log" 2>&1
python3 benchmarks/summarize_micro.py "$results/micro_cuda.json" --output "$results/ops_micro_cuda.md" \
  --command "bash benchmarks/gpu_run.sh\` (its step: \`python -m pytest benchmarks/test_fused_ops.py -k cuda --benchmark-json ...\`), then \`python benchmarks/summarize_micro.py <the json> --output benchmarks/results/ops_micro_cuda.md" \
  2>&1 | tail -30
pack

step "tests: the default suite and the slow one, side by side"
# With pytest-xdist (the GPU image has it) a crashing test takes down its worker only.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6")
timeout -k 10 240 python3 -m pytest -q -p no:cacheprovider -rfE $workers >"$out/tests_default.log" 2>&1 &
default_pid=$!
timeout -k 10 240 python3 -m pytest -q -p no:cacheprovider -rfE $workers -m slow >"$out/tests_slow.log" 2>&1 &
slow_pid=$!
wait $default_pid; echo "default suite: exit $?"
wait $slow_pid; echo "slow suite: exit $?"
for log in tests_default tests_slow; do
  echo "-- $log"; grep -E "^(FAILED|ERROR)|passed|failed" "$out/$log.log" | tail -25
done
