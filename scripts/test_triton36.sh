#!/usr/bin/env bash
# The kernel tests against triton 3.6 (what the GPU machines run; `install.sh` installs the newest triton).
#
#   bash scripts/test_triton36.sh [pytest args]     # from an activated environment where install.sh ran
#
# A second venv holds only triton 3.6 (and numpy < 2.4: triton 3.6's interpreter converts 1-element arrays with
# int(), which numpy 2.4 rejects); a .pth file adds the active environment's site-packages (torch, lerpfast and its
# built extension) behind it on sys.path, so nothing else is installed twice. Runs the kernels under the
# interpreter against float64, the dispatch, the plan-vs-launch check and the sm_90 cross-compile.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
V="${LERPFAST_TRITON36_VENV:-.venv-triton36}"
[[ -x "$V/bin/python" ]] || "$PY" -m venv "$V"
base=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
own=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# an "import" line, so the base's own .pth files (lerpfast's editable install) are processed too
echo "import site; site.addsitedir('$base')" > "$own/_lerpfast_base_env.pth"
"$V/bin/python" -m pip install -q "triton==3.6.0" "numpy<2.4"
"$V/bin/python" -c "import triton, torch, numpy, lerpfast; print('triton', triton.__version__, '| torch', torch.__version__, '| numpy', numpy.__version__, '| lerpfast from', lerpfast.__file__)"
"$V/bin/python" -c "import triton, sys; sys.exit(0 if triton.__version__.startswith('3.6') else 'triton 3.6 is not first on sys.path')"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$(mktemp -d)}"
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_dispatch.py \
  tests/test_compile.py tests/test_fusion.py tests/test_kernels_bench.py tests/test_conv_cpu.py "$@"
