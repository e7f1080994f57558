#!/usr/bin/env bash
# Install lerpfast and everything it needs on a fresh Debian machine (CPU), offline data included.
#
#   bash scripts/install.sh            # the package, FFCV, Fashion-MNIST
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
PIP="python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q "${LERPFAST_TORCH:-torch==2.13.0}"
# FFCV 1.0.2 builds against numpy/opencv/turbojpeg at install time and needs these at import time
$PIP install -q numpy "opencv-python-headless" numba pillow assertpy fastargs terminaltables pkgconfig
$PIP install -q --no-build-isolation -e ".[${extras}]"
python -c "import lerpfast, torch; print('lerpfast', lerpfast.__version__, '| torch', torch.__version__)"
