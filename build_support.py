"""Build logic of lerpfast's C++/CUDA extension (``lerpfast._C``), kept out of setup.py so tests can import it.

Rules (each one a way installs used to fail):

* The C++ standard is torch's: no ``-std`` flag of ours, so ``torch.utils.cpp_extension`` adds the one the
  installed torch's headers require (C++17 up to torch 2.12, C++20 from 2.13 on).
* A CUDA build of torch with no visible GPU (a login node, a CI box) and no ``TORCH_CUDA_ARCH_LIST``: torch's arch
  detection has no device to ask, so the kernels are built for :data:`DEFAULT_ARCHS` (A100, H100 and H200, plus PTX
  for newer GPUs).
* ``CUDA_HOME`` unset: found from the toolkit that really owns the ``nvcc`` on PATH (``nvcc --dryrun`` prints its
  ``TOP``), since torch's guess (the parent of the first ``nvcc`` on PATH) is wrong for a wrapper script and the
  link then fails with "cannot find -lcudart".
* Any failure of the CUDA build falls back to the CPU-only extension, and any failure of that to no extension
  (lerpfast runs its torch path), each with a warning that names the cause and the variable to set. The install
  never fails because of csrc/.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import warnings

DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100 (sm_80), H100 / H200 (sm_90), PTX for anything newer


def cxx_flags() -> list[str]:
    """Host compiler flags. -ffp-contract=off: no FMA merges c*d into a + c*d, so the C++ combine rounds each term
    like torch does (bit-identical weights, docs/architecture.md)."""
    return ["-O3", "-ffp-contract=off"]


def nvcc_flags() -> list[str]:
    """nvcc flags: no --use_fast_math (flush-to-zero would change denormal weights; the kernels are memory-bound)."""
    return ["-O3", "--fmad=false"]


def _has_cudart(home: str) -> bool:
    pats = ["lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*", "lib/x64/cudart.lib"]
    return any(glob.glob(os.path.join(home, p)) for p in pats)


def is_toolkit(home: str | None) -> bool:
    """Whether ``home`` looks like a CUDA toolkit: bin/nvcc, the runtime headers and libcudart."""
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and (
        os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
        or bool(glob.glob(os.path.join(home, "targets", "*", "include", "cuda_runtime.h")))) and _has_cudart(home)


def find_cuda_home(environ: dict | None = None, nvcc: str | None = None) -> str | None:
    """The CUDA toolkit to build against: ``CUDA_HOME`` / ``CUDA_PATH`` when set, else the toolkit that owns the
    ``nvcc`` on PATH (asked with ``nvcc --dryrun``, which follows wrappers and symlinks), else None."""
    env = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var]
    nvcc = nvcc or shutil.which("nvcc", path=env.get("PATH"))
    if not nvcc:
        return "/usr/local/cuda" if is_toolkit("/usr/local/cuda") else None
    candidates = []
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ TOP="):
                candidates.append(os.path.realpath(line.split("=", 1)[1].strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    real = os.path.realpath(nvcc)
    candidates.append(os.path.dirname(os.path.dirname(real)))
    for home in candidates:
        if is_toolkit(home):
            return home
    return None


def wheel_cuda_includes(torch_dir: str) -> list[str]:
    """Header folders of the CUDA libraries pip installed beside a CUDA build of torch (``nvidia/*/include``).

    torch's CUDA headers include cuBLAS / cuSPARSE / cuDNN headers, which a minimal toolkit (nvcc and the runtime
    only) lacks; the wheels torch depends on carry them, matching torch's CUDA version exactly.
    """
    site = os.path.dirname(torch_dir)
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))


def arch_list(environ: dict | None = None, device_count: int = 0) -> str | None:
    """The ``TORCH_CUDA_ARCH_LIST`` to build with: the user's when set, torch's detection when a GPU is visible,
    else :data:`DEFAULT_ARCHS`."""
    env = os.environ if environ is None else environ
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return None
    return None if device_count > 0 else DEFAULT_ARCHS


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=2)
    print(f"lerpfast setup: {msg}", flush=True)


def _cause(exc: BaseException) -> str:
    """One line for a build failure: a compiler's or linker's error is the command plus its own output above."""
    name = type(exc).__name__
    if name in ("CompileError", "LinkError") or "exit status" in str(exc) or str(exc).startswith("Command '"):
        return f"{name}: the compiler's error is printed above"
    return f"{name}: {' '.join(str(exc).split())[:300]}"


def get_extensions(root: str):
    """``(ext_modules, cmdclass)`` for setup(): the extension with CUDA kernels where they can be built."""
    if os.environ.get("LERPFAST_BUILD_EXT", "1") == "0":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    try:
        import torch
    except ImportError:
        _warn("torch is not importable at build time: lerpfast._C is not built (install with "
              "--no-build-isolation); the torch path is used instead.")
        return [], {}
    flag = os.environ.get("LERPFAST_BUILD_CUDA")
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = bool(cuda_sources) and flag != "0" and (flag == "1" or torch.version.cuda is not None)
    if want_cuda and torch.version.cuda is None:
        _warn(f"LERPFAST_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build: lerpfast._C is built "
              "without CUDA kernels (install a CUDA build of torch to get them)")
        want_cuda = False
    if want_cuda and not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        home = find_cuda_home()
        if home:
            os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it at import
    if want_cuda:
        try:
            count = torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - a broken driver counts as no GPU
            count = 0
        archs = arch_list(device_count=count)
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
            _warn(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the CUDA kernels for {archs} "
                  "(A100, H100, H200 + PTX); set TORCH_CUDA_ARCH_LIST to choose others")
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_ext = CppExtension("lerpfast._C", cpp, extra_compile_args={"cxx": cxx_flags()})
    if want_cuda and CUDA_HOME is None:
        _warn("no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset): building lerpfast._C without CUDA kernels; "
              "set CUDA_HOME to the toolkit to build them")
        want_cuda = False
    if want_cuda:
        ext = CUDAExtension("lerpfast._C", cpp + cuda_sources, define_macros=[("LERPFAST_WITH_CUDA", "1")],
                            include_dirs=wheel_cuda_includes(os.path.dirname(torch.__file__)),
                            extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()})
        ext._lerpfast_cpu_fallback = cpu_ext
    else:
        ext = cpu_ext

    class Build(BuildExtension):
        """torch's BuildExtension, where a failed build falls back instead of failing the install."""

        def _without_failed(self, fn):
            failed = getattr(self, "_lerpfast_failed", set())
            keep = self.extensions
            self.extensions = [e for e in keep if e.name not in failed]
            try:
                return fn()
            finally:
                self.extensions = keep

        def copy_extensions_to_source(self):  # --inplace / editable: nothing to copy for a failed build
            return self._without_failed(super().copy_extensions_to_source)

        def get_outputs(self):
            return self._without_failed(super().get_outputs)

        def get_output_mapping(self):
            return self._without_failed(super().get_output_mapping)

        def build_extension(self, ext):
            fallback = getattr(ext, "_lerpfast_cpu_fallback", None)
            try:
                return super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler / linker / arch failure
                cause = _cause(exc)
                if fallback is not None:
                    _warn(f"building the CUDA kernels failed ({cause}); building lerpfast._C with its CPU ops only. "
                          f"Set CUDA_HOME to the toolkit matching torch's CUDA {torch.version.cuda}, "
                          "TORCH_CUDA_ARCH_LIST to your GPU's arch, or LERPFAST_BUILD_CUDA=0 to skip them.")
                    # the same Extension object (setuptools keeps its own state on it), CPU sources and flags
                    for attr in ("sources", "define_macros", "include_dirs", "library_dirs", "libraries",
                                 "extra_compile_args", "extra_link_args", "runtime_library_dirs", "language"):
                        setattr(ext, attr, getattr(fallback, attr))
                    try:
                        return super().build_extension(ext)
                    except Exception as exc2:  # noqa: BLE001
                        cause = _cause(exc2)
                if not hasattr(self, "_lerpfast_failed"):
                    self._lerpfast_failed = set()
                self._lerpfast_failed.add(ext.name)
                _warn(f"building lerpfast._C failed ({cause}); lerpfast runs its torch path instead. Set "
                      "LERPFAST_BUILD_EXT=0 to skip the build, or install a C++ compiler and the Python headers.")
                return None

    return [ext], {"build_ext": Build.with_options(use_ninja=False)}
