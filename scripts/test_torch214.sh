#!/usr/bin/env bash
# The second CI environment: torch 2.14.1 (a CUDA build, the newest pip allows here) with torchvision 0.29.1, installed
# with the README's plain command, the CUDA kernels built for sm_80 / sm_90 on this GPU-less machine (registers and
# spills printed by ptxas -v), then a test subset and the torchvision zoo against the float64 oracle.
#
#   bash scripts/test_torch214.sh [pytest args]
#
# Works in a copy of the repository (the editable install builds lerpfast/_C*.so in place, and the main environment's
# extension, built against torch 2.13, must not be overwritten) and a venv of its own ($LERPFAST_TORCH214_VENV,
# default .venv-torch214; torch is a 5.5 GB wheel on these machines' local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
V="${LERPFAST_TORCH214_VENV:-$ROOT/.venv-torch214}"
W="$(mktemp -d)/lerpfast"
PY3="$(command -v python3.11 || command -v python3)"
[[ -x "$V/bin/python" ]] || "$PY3" -m venv "$V"
t0=$(date +%s)
"$V/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$V/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "timm==1.0.31" "open_clip_torch==3.3.0" numpy
echo "torch214: torch and torchvision installed in $(( $(date +%s) - t0 )) s"
mkdir -p "$W"
git ls-files -z | grep -zv '^docs/images/' | xargs -0 cp --parents -t "$W"
cd "$W"
t1=$(date +%s)
# the README's plain command (install.sh's pip line), with ptxas' register / spill report in the build log
NVCC_APPEND_FLAGS="-Xptxas=-v" "$V/bin/python" -m pip install -v --no-build-isolation -e ".[test]" > build.log 2>&1 || {
  tail -40 build.log; echo "torch214: the install failed"; exit 1; }
echo "torch214: lerpfast installed and its extension built in $(( $(date +%s) - t1 )) s"
grep -E "lerpfast setup:|ptxas info *: (Compiling entry|Used)|spill" build.log | sed 's/^ *//' | sort -u || true
"$V/bin/python" - <<'PY'
import sys, torch, lerpfast._C as c
print(f"torch214: torch {torch.__version__}, lerpfast._C has CUDA kernels: {c.has_cuda_kernels()}")
sys.exit(0 if c.has_cuda_kernels() else "the CUDA kernels were not built")
PY
# no GPU here: Triton kernels run under the interpreter (set before any test module imports triton)
export LERPFAST_CI=1 LERPFAST_REQUIRE_EXT=1 TRITON_INTERPRET=1
"$V/bin/python" -m pytest -q -p no:cacheprovider -s -rs tests/zoo_torchvision.py tests/test_build.py tests/test_csrc.py \
  tests/test_bad_input.py tests/test_store_damage.py tests/test_sweep.py "$@" | tee pytest.log
grep -q " skipped" pytest.log && grep -E "^SKIPPED" pytest.log | grep -v "needs a CUDA device" && {
  echo "torch214: tests were skipped"; exit 1; }
echo "torch214: done in $(( $(date +%s) - t0 )) s"
