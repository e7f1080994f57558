#!/usr/bin/env bash
# One GPU session in one command: build the CUDA extension, run the GPU tests, the kernel micro benchmarks and
# the end-to-end sweep benchmark, and leave every log and JSON under $OUT (the device tool brings $OUT back).
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh                 # on the GPU machine, from the repository root
#   OUT=/tmp/out DRY=1 bash benchmarks/gpu_session.sh           # on a CPU: tiny sizes, checks the script itself
#
# The GPU machine has no network and no package index: lerpfast's pure-Python dependencies that it lacks are
# installed from wheels carried in .wheels/ (make them here, for its Python):
#   pip download --python-version 3.12 --only-binary=:all: --no-deps -d .wheels tqdm safetensors matplotlib \
#       scikit-learn contourpy cycler fonttools kiwisolver pyparsing python-dateutil six threadpoolctl joblib scipy
#   echo /.wheels/ >> .git/info/exclude        # then run with carry=[".wheels"]
# The device tool allows 10 minutes a command: split with STEPS, e.g. STEPS=build,tests then STEPS=micro,sweeps
# (a warm machine keeps the built extension between calls; a fresh one needs "build" again).
# Results to commit: $OUT/sweep_gpu.json and $OUT/bench_kernels.json -> benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that collects the results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
summary="$OUT/summary.txt"
: > "$summary"
STEPS=",${STEPS:-build,tests,micro,sweeps},"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the exit status
  local name=$1 limit=$2; shift 2
  [[ $name == wheels || $STEPS == *",$name,"* ]] || return 0
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$summary"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$summary"
  return 0
}

if [[ -d .wheels ]]; then
  step wheels 120 $PY -m pip install --no-index --find-links .wheels --no-deps .wheels/*.whl
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" | tee -a "$summary"

if [[ "${DRY:-0}" == "1" ]]; then
  export TRITON_INTERPRET=1
  step build 600 env LERPFAST_BUILD_CUDA=0 $PY setup.py -q build_ext --inplace
  step tests 600 $PY -m pytest -q -x -p no:cacheprovider tests/test_csrc.py tests/test_conv_cpu.py
  step micro 600 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_kernels.py --benchmark-disable
  step sweeps 600 $PY benchmarks/bench_sweep_gpu.py --dry-run-cpu --models lenet_300_100 --ks 1,2 \
    --out "$OUT/sweep_gpu.json"
else
  # CUDA kernels of csrc/ (nvcc); the build falls back to CPU-only kernels with a warning if it cannot
  step build 300 env LERPFAST_BUILD_CUDA=1 $PY setup.py -q build_ext --inplace
  # compiled Triton kernels and the CUDA paths against float64 references (the same files CI runs on the CPU)
  step tests 400 env LERPFAST_REQUIRE_EXT=1 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_kernels_dispatch.py tests/test_csrc.py tests/test_fusion.py tests/test_conv_cpu.py tests/test_sweep.py
  step micro 300 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_kernels.py \
    --benchmark-json "$OUT/bench_kernels.json" --benchmark-min-rounds 5
  step sweeps "${SWEEP_SECONDS:-420}" $PY benchmarks/bench_sweep_gpu.py --models "${MODELS:-lenet_300_100,resnet20,vgg16,resnet50}" \
    --ks "${KS:-1,8,32,128}" --out "$OUT/sweep_gpu.json"
fi
echo "done; results in $OUT" | tee -a "$summary"
