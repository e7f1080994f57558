#!/usr/bin/env bash
# The whole GPU session in one command, sized for one device call on a FRESH machine (empty caches, nothing built):
# environment record, CUDA extension build, `lerpfast warmup` (parallel Triton compiles into the persistent cache,
# when the command exists), a GPU smoke test set, then benchmarks/bench_sweep_gpu.py for all four models within
# what is left. At most TOTAL_S seconds (default 470: under 8 minutes) and at most 7 files under $OUT:
#
#   session.log      environment (nvidia-smi, versions), each step's start, limit, exit status and time
#   build.log  warmup.log  tests.log  bench.log          each step's own output, written as it runs
#   sweep_gpu.jsonl  every benchmark record the moment it is measured (+ one session_step record per step)
#   sweep_gpu.md     the summary table (also printed last)
#
# Every step has its own time limit (timeout), so a hung step costs its limit and a killed one loses nothing that
# finished. Exit status 0 when every step passed and the records check out, 1 otherwise.
#
#   OUT=/tmp/out DRY=1 bash benchmarks/gpu_session.sh     # here, on the CPU: same steps, tiny sizes (3-7 min;
#                                                         # TOTAL_S 720 and BUILD_S 400 by default there)
#
# The device call (docs/gpu_session.md; nothing to carry, no network needed there; python3 there has torch 2.11,
# triton 3.6, nvcc 13 and every pure-Python dependency of lerpfast):
#
#   run(command="LERPFAST_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_session.sh", timeout_s=540)
#
# then, here:  python benchmarks/bench_sweep_gpu.py --summarize <files_at>/sweep_gpu.jsonl
#   -> benchmarks/results/sweep_gpu_<device>.json and .md; copy the .jsonl beside them; commit the three.
#
# Knobs (environment): TOTAL_S (470), MODELS (all four), STEPS (env,build,warmup,tests,bench), BUILD_S (180),
# WARMUP_S (120), WARM_RUNS ("bf16,tf32:cl fp32": precisions per process, :cl = channels_last), WARM_K (32),
# WARM_WORKERS (8 compile threads per model), TESTS_S (90), BENCH_MIN_S (150: kept for the
# benchmark by the earlier steps), BENCH_ARGS (extra arguments), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that collects the results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY=${DRY:-0}
TOTAL=${TOTAL_S:-$([[ $DRY == 1 ]] && echo 720 || echo 470)}  # DRY: 2 shared cores build slowly
MODELS=${MODELS:-lenet_300_100,resnet20,vgg16,resnet50}
STEPS=",${STEPS:-env,build,warmup,tests,bench},"
BENCH_MIN=${BENCH_MIN_S:-150}
END_RESERVE=15
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lerpfast-session.XXXXXX")
if [[ $DRY != 1 ]]; then
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/lerpfast-triton-cache} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
else  # here: leave ~/.triton alone
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache}
fi
export LERPFAST_COMMIT=${LERPFAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LOG=$OUT/session.log
JSONL=$OUT/sweep_gpu.jsonl
: > "$LOG"
: > "$JSONL"
failed=()

say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $((TOTAL - SECONDS)); }
lim() { local want=$1 reserve=$2 l; l=$(( $(left) - reserve )); (( l < want )) && echo "$l" || echo "$want"; }
want() { [[ $STEPS == *",$1,"* ]]; }
note() {  # note STEP STATUS RC SECONDS LIMIT [SUMMARY]: a session_step record in the JSONL and a line in the log
  $PY - "$@" >> "$JSONL" <<'EOF'
import json, sys, time
a = sys.argv[1:] + [""]
print(json.dumps({"type": "session_step", "step": a[0], "status": a[1], "rc": int(a[2]), "seconds": int(a[3]),
                  "limit_s": int(a[4]), "summary": a[5][:300], "t": round(time.time(), 3)}))
EOF
  say "$1: $2 (rc=$3, $4 s of ${5} s)${6:+ — $6}"
  [[ $2 == ok || $2 == skipped || $2 == unavailable ]] || failed+=("$1")
}
status_of() { case $1 in 0) echo ok ;; 124|137) echo timeout ;; *) echo failed ;; esac; }
run_step() {  # run_step NAME WANT_S RESERVE_S CMD...: foreground, time-limited, output to $OUT/NAME.log
  local name=$1 want_s=$2 reserve=$3; shift 3
  want "$name" || return 0
  local limit t0 rc
  limit=$(lim "$want_s" "$reserve")
  if (( limit < 10 )); then note "$name" skipped 0 0 "$limit" "no time left"; return 0; fi
  say "$name: start, limit ${limit}s: $*"
  t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  note "$name" "$(status_of $rc)" "$rc" $((SECONDS - t0)) "$limit" "$(grep -E '[0-9]+ (passed|failed|error)' "$OUT/$name.log" | tail -n 1)"
}

# ------------------------------------------------------------------------------------------------ environment
if want env; then
  say "session: OUT=$OUT DRY=$DRY TOTAL_S=$TOTAL MODELS=$MODELS STEPS=$STEPS commit=$LERPFAST_COMMIT"
  { timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm,temperature.gpu,power.draw \
      --format=csv 2>&1 || echo "nvidia-smi: not available"
    timeout 60 $PY -c "import sys, torch, platform; print('python', sys.version.split()[0], platform.platform()); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
    timeout 30 $PY -m pip list 2>/dev/null | grep -iE '^(triton|numpy|h5py|tqdm|matplotlib|safetensors|scikit-learn|setuptools|pytest|pytest-benchmark|ffcv) ' || true
    (command -v nvcc >/dev/null && nvcc --version | tail -n 2) || echo "nvcc: not on PATH"
    echo "nproc $(nproc); TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-default}; cache files: $(find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -type f 2>/dev/null | wc -l)"
  } >> "$LOG" 2>&1
  note env ok 0 "$SECONDS" 60
fi

# ------------------------------------------------------------------------------------------------ build (background)
# Built outside the tree and moved in at the end (a rename: a process that has the old .so loaded keeps it), so the
# warm-up running meanwhile never imports a half-written extension. DRY builds the CPU kernels and installs nothing.
build_pid=""
build_ok=0
if want build; then
  blimit=$(lim "${BUILD_S:-$([[ $DRY == 1 ]] && echo 400 || echo 180)}" $((BENCH_MIN + 30)))
  if (( blimit < 10 )); then note build skipped 0 0 "$blimit" "no time left"; else
    say "build: start in the background, limit ${blimit}s"
    (
      t0=$SECONDS
      timeout --signal=INT --kill-after=15 "$blimit" env LERPFAST_BUILD_CUDA=$([[ $DRY == 1 ]] && echo 0 || echo 1) \
        $PY setup.py build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp" > "$OUT/build.log" 2>&1
      rc=$?
      so=$(ls "$WORK"/lib/lerpfast/_C*.so 2>/dev/null | head -n 1)
      if (( rc == 0 )) && [[ -z $so ]]; then rc=3; echo "build: no lerpfast/_C*.so produced" >> "$OUT/build.log"; fi
      if (( rc == 0 )) && [[ $DRY != 1 ]]; then
        cp "$so" "lerpfast/.$(basename "$so").new" && mv -f "lerpfast/.$(basename "$so").new" "lerpfast/$(basename "$so")" || rc=4
      fi
      echo "$rc $((SECONDS - t0)) $blimit" > "$WORK/build.rc"
    ) &
    build_pid=$!
  fi
fi
finish_build() {
  [[ -n $build_pid ]] || return 0
  wait "$build_pid"
  build_pid=""
  local rc=5 s=0 l=0
  [[ -f $WORK/build.rc ]] && read -r rc s l < "$WORK/build.rc"
  local check=""
  if (( rc == 0 )) && [[ $DRY != 1 ]]; then
    check=$(timeout 60 $PY -c "from lerpfast.kernels import ext; print('lerpfast._C', ext.available(), 'cuda kernels', ext.has_cuda_kernels())" 2>&1 | tail -n 1)
    echo "$check" >> "$OUT/build.log"
    [[ $check == *"cuda kernels True"* ]] || rc=6
  fi
  (( rc == 0 )) && build_ok=1
  note build "$(status_of "$rc")" "$rc" "$s" "$l" "$check"
}

# ------------------------------------------------------------------------------------------------ warm-up
# The kernels of the benchmark's first sweeps, compiled in parallel into TRITON_CACHE_DIR while the extension builds:
# per model one process, first bf16 and tf32 with channels_last (tier 1 of the benchmark), then fp32 without,
# at the benchmark's batch size and K.
declare -A WBATCH=([lenet_300_100]=10000 [resnet20]=1000 [vgg16]=1000 [resnet50]=128)
if want warmup; then
  if timeout 60 $PY -m lerpfast.cli warmup --help > "$WORK/warmup_help" 2>&1; then
    wlimit=$(lim "${WARMUP_S:-120}" $((BENCH_MIN + 60)))
    if [[ $DRY == 1 ]]; then wmodels=${MODELS%%,*}; wruns="bf16:cl"; wworkers=2; wlimit=$(lim 60 $((BENCH_MIN + 60)))
    else wmodels=$MODELS; wruns=${WARM_RUNS:-bf16,tf32:cl fp32}; wworkers=8; fi
    if (( wlimit < 10 )); then note warmup skipped 0 0 "$wlimit" "no time left"; else
      say "warmup: start, limit ${wlimit}s: models $wmodels, runs '$wruns' (precisions:cl = channels_last), K ${WARM_K:-32}, one process per model"
      wend=$((SECONDS + wlimit)); t0=$SECONDS; wpids=()
      for m in ${wmodels//,/ }; do
        (
          for run in $wruns; do
            p=${run%%:*}; args=(--model "$m" --precision "$p" --K "${WARM_K:-32}" --workers "${WARM_WORKERS:-$wworkers}")
            [[ $run == *:cl ]] && args+=(--channels-last)
            [[ -n ${WBATCH[$m]:-} && $DRY != 1 ]] && args+=(--batch "${WBATCH[$m]}")
            r=$((wend - SECONDS)); (( r < 5 )) && { echo "[$m $run] not started: no time left"; break; }
            s0=$SECONDS
            timeout --signal=INT --kill-after=10 "$r" $PY -m lerpfast.cli warmup "${args[@]}" 2>&1 | sed -u "s/^/[$m $run] /"
            echo "[$m $run] rc=$? $((SECONDS - s0))s"
          done >> "$OUT/warmup.log" 2>&1
        ) &
        wpids+=($!)
      done
      wait "${wpids[@]}"
      nbad=$(grep -cE '\] rc=[1-9]' "$OUT/warmup.log")
      nok=$(grep -cE '\] rc=0 ' "$OUT/warmup.log")
      ncache=$(find "$TRITON_CACHE_DIR" -type f 2>/dev/null | wc -l)
      st=ok; (( nbad > 0 )) && st=failed
      [[ $DRY == 1 && $st == failed ]] && st=ok  # on the CPU the warm-up may have nothing to compile for
      note warmup "$st" "$nbad" $((SECONDS - t0)) "$wlimit" "$nok ok, $nbad failed; $ncache files in the Triton cache"
    fi
  else
    note warmup unavailable 0 0 0 "'lerpfast warmup --help' failed: $(tail -n 1 "$WORK/warmup_help")"
  fi
fi

finish_build

# ------------------------------------------------------------------------------------------------ smoke tests
# GPU-marked tests plus a handful of compiled-kernel checks against float64 (the same files CI runs on the CPU).
SMOKE_FILES="tests/test_csrc.py tests/test_kernels_dispatch.py tests/test_fusion.py tests/test_kernels.py tests/test_data.py tests/test_point_params.py"
SMOKE_K="gpu or linear_epilogue or conv2d_channels_last_epilogue or point_metrics or combine_bit_exact or endpoints_exact"
# (LERPFAST_REQUIRE_EXT=1: a missing extension fails tests/test_csrc.py; set only when the build succeeded, so that a
# failed build, already reported, does not stop the -x run before the kernel tests)
test_env=(env)
[[ $build_ok == 1 && $DRY != 1 ]] && test_env+=(LERPFAST_REQUIRE_EXT=1)
[[ $DRY == 1 ]] && test_env+=(TRITON_INTERPRET=1 OMP_NUM_THREADS=1)
# shellcheck disable=SC2086
run_step tests "${TESTS_S:-90}" "$BENCH_MIN" "${test_env[@]}" $PY -m pytest -x -q -rfEs -p no:cacheprovider \
  $SMOKE_FILES -k "$SMOKE_K"

# ------------------------------------------------------------------------------------------------ benchmark
if want bench; then
  budget=$(( $(left) - END_RESERVE - 10 ))
  if (( budget < 20 )); then note bench skipped 0 0 "$budget" "no time left"; else
    dry_args=(); [[ $DRY == 1 ]] && dry_args=(--dry)
    say "bench: start, budget ${budget}s"
    t0=$SECONDS
    # shellcheck disable=SC2086
    timeout --signal=INT --kill-after=20 $((budget + 10)) $PY benchmarks/bench_sweep_gpu.py "${dry_args[@]}" \
      --models "$MODELS" --budget-s "$budget" --jsonl "$JSONL" --append --md "$OUT/sweep_gpu.md" ${BENCH_ARGS:-} \
      > "$OUT/bench.log" 2>&1
    rc=$?
    note bench "$(status_of $rc)" "$rc" $((SECONDS - t0)) "$budget" "$(grep -E '^Records:' "$OUT/bench.log" | tail -n 1)"
  fi
fi

# ------------------------------------------------------------------------------------------------ check and list
if want bench; then
  if ! $PY benchmarks/bench_sweep_gpu.py --check "$JSONL" >> "$LOG" 2>&1; then failed+=("records"); fi
  tail -n 1 "$LOG"
fi
rm -rf "$WORK"
nfiles=$(find "$OUT" -type f | wc -l)
say "files under \$OUT ($nfiles, limit 8): $(cd "$OUT" && find . -type f -printf '%P %s B; ' | sort)"
(( nfiles <= 8 )) || failed+=("files")
[[ -f $OUT/sweep_gpu.md ]] && cat "$OUT/sweep_gpu.md"
if (( ${#failed[@]} )); then say "done in ${SECONDS}s; FAILED: ${failed[*]}"; exit 1; fi
say "done in ${SECONDS}s; every step passed"
exit 0
