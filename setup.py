"""lerpfast build.

The C++ extension ``lerpfast._C`` (csrc/) is built with torch.utils.cpp_extension when torch is
importable at build time (install with ``--no-build-isolation`` so the build sees the torch you run
with). CPU kernels always build; CUDA kernels only when a CUDA toolkit and a CUDA build of torch are
present, or when forced with LERPFAST_BUILD_CUDA=1 (LERPFAST_BUILD_CUDA=0 skips them). Nothing about
CUDA can make the install fail: a missing toolkit only prints a warning.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    ns: dict = {}
    with open(os.path.join(HERE, "lerpfast", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def get_extensions():
    if os.environ.get("LERPFAST_BUILD_EXT", "1") == "0":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: lerpfast._C is not built "
                      "(install with --no-build-isolation); the torch path is used instead.", stacklevel=1)
        return [], {}
    flag = os.environ.get("LERPFAST_BUILD_CUDA")
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    build_cuda = bool(cuda_sources) and (flag == "1" or (flag != "0" and have_cuda))
    if flag == "1" and not have_cuda:
        warnings.warn("LERPFAST_BUILD_CUDA=1 but no CUDA toolkit / CUDA torch was found", stacklevel=1)
    # -ffp-contract=off: no FMA merges c*d into a + c*d, so the C++ combine rounds each term like torch does
    # (bit-identical weights, docs/architecture.md). No --use_fast_math for nvcc: its flush-to-zero would
    # change denormal weights, and the kernels here are memory-bound, so it would buy nothing.
    extra = {"cxx": ["-O3", "-std=c++17", "-ffp-contract=off"]}
    if build_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17", "--fmad=false"]
        ext = CUDAExtension("lerpfast._C", cpp + cuda_sources, extra_compile_args=extra,
                            define_macros=[("LERPFAST_WITH_CUDA", "1")])
    else:
        if cuda_sources and flag != "0":
            warnings.warn("no CUDA toolkit or CPU-only torch: building lerpfast._C without CUDA kernels", stacklevel=1)
        ext = CppExtension("lerpfast._C", cpp, extra_compile_args=extra)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = get_extensions()


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
