"""lerpfast build.

The C++ extension ``lerpfast._C`` (csrc/) is built with torch.utils.cpp_extension when torch is
importable at build time (install with ``--no-build-isolation`` so the build sees the torch you run
with). CPU kernels always build; CUDA kernels only when a CUDA toolkit and a CUDA build of torch are
present, or when forced with LERPFAST_BUILD_CUDA=1 (LERPFAST_BUILD_CUDA=0 skips them). Nothing about
csrc/ can make the install fail: build_support.py has the rules (C++ standard from torch, default arch list
8.0;9.0+PTX without a visible GPU, CUDA_HOME from the toolkit that owns nvcc, fallback to CPU ops or to no
extension with a warning naming the cause).
"""

import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build_support  # noqa: E402 - the extension's build rules (the repo root is not on sys.path by itself)


def _version() -> str:
    ns: dict = {}
    with open(os.path.join(HERE, "lerpfast", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


ext_modules, cmdclass = build_support.get_extensions(HERE)


def _readme() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="lerpfast",
    version=_version(),
    description="Loss-landscape sweeps: K weight-space points per forward pass",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lerpfast", "lerpfast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "h5py>=3.8",
        "matplotlib>=3.7",
        "tqdm",
        "safetensors",
        "scikit-learn",
        "scipy",  # lerpfast.align: scipy.optimize.linear_sum_assignment
        "pillow",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.6", "transformers>=4.40", "ruff"],
        "ffcv": ["ffcv==1.0.2", "assertpy", "fastargs", "terminaltables", "pillow", "opencv-python-headless", "numba"],
    },
    entry_points={"console_scripts": ["lerpfast=lerpfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
