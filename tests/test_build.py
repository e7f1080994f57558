"""The extension's build rules (build_support.py): C++ standard from torch, default CUDA archs without a GPU,
CUDA_HOME from the toolkit that owns nvcc, and fallbacks that never fail the install (issue 18 §1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_support as bs  # noqa: E402


def test_no_cxx_standard_of_our_own():
    """torch adds the -std its headers need (C++20 from torch 2.13 on); a hard-coded c++17 broke torch 2.14."""
    assert not [f for f in bs.cxx_flags() + bs.nvcc_flags() if f.startswith("-std")]
    assert "-ffp-contract=off" in bs.cxx_flags() and "--fmad=false" in bs.nvcc_flags()


def test_default_arch_list_without_a_gpu():
    assert bs.arch_list({}, device_count=0) == "8.0;9.0+PTX"
    assert bs.arch_list({}, device_count=2) is None  # torch asks the visible GPUs
    assert bs.arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}, device_count=0) is None  # the user's choice


def _fake_toolkit(root: Path) -> Path:
    home = root / "cuda-13.0"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / "targets" / "x86_64-linux" / "lib").mkdir(parents=True)
    (home / "targets" / "x86_64-linux" / "lib" / "libcudart.so.13").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={home}/bin'\necho '#$ TOP={home}/bin/..'\n")
    nvcc.chmod(0o755)
    return home


def test_cuda_home_from_the_toolkit_behind_a_wrapper(tmp_path):
    """An nvcc wrapper script on PATH (its parent has no libcudart): the toolkit it runs is found."""
    home = _fake_toolkit(tmp_path)
    wrapper_dir = tmp_path / "usr-local-bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    env = {"PATH": f"{wrapper_dir}:/usr/bin:/bin"}
    assert not bs.is_toolkit(str(tmp_path))  # what torch's guess (parent of the wrapper's folder) would give
    assert bs.find_cuda_home(env) == str(home)
    assert bs.find_cuda_home({**env, "CUDA_HOME": "/opt/mine"}) == "/opt/mine"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_cuda_home_of_this_machines_nvcc():
    home = bs.find_cuda_home({"PATH": os.environ["PATH"]})
    assert home is not None and bs.is_toolkit(home)


def test_failed_cuda_build_falls_back_to_cpu_ops(monkeypatch, capsys):
    """The Build command's fallback chain, with torch's build step failing on the CUDA extension."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("LERPFAST_BUILD_EXT", raising=False)
    monkeypatch.setenv("LERPFAST_BUILD_CUDA", "0")
    monkeypatch.chdir(ROOT)
    exts, cmd = bs.get_extensions(str(ROOT))
    build = cmd["build_ext"]
    built = []

    def fake(self, ext):
        if any(src.endswith(".cu") for src in ext.sources):
            raise RuntimeError("nvcc fatal: Unsupported gpu architecture 'compute_120'")
        if getattr(ext, "_broken", False):
            raise RuntimeError("g++: internal compiler error")
        built.append((ext.name, list(ext.sources)))

    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extension", fake)
    cpu_ext = exts[0]
    cuda_ext = object.__new__(type(cpu_ext))
    cuda_ext.__dict__.update(cpu_ext.__dict__)
    cuda_ext.sources = cpu_ext.sources + ["csrc/lerpfast_cuda.cu"]
    cuda_ext._lerpfast_cpu_fallback = cpu_ext
    cmd_obj = build.__new__(build)
    with pytest.warns(UserWarning, match="building the CUDA kernels failed .*compute_120.*TORCH_CUDA_ARCH_LIST"):
        cmd_obj.build_extension(cuda_ext)
    assert built == [("lerpfast._C", cpu_ext.sources)]  # the same Extension object, now with the CPU sources
    cpu_ext._broken = True  # and when the CPU ops fail too: no extension, no failure
    with pytest.warns(UserWarning, match="building lerpfast._C failed .*torch path"):
        assert cmd_obj.build_extension(cpu_ext) is None
    assert cmd_obj._lerpfast_failed == {"lerpfast._C"}


@pytest.mark.slow
def test_a_broken_csrc_never_fails_the_install(tmp_path):
    """A real compiler error: `setup.py build_ext` still succeeds, warns with the cause, and builds nothing."""
    proj = tmp_path / "proj"
    for rel in ("setup.py", "build_support.py", "README.md", "lerpfast/_version.py"):
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, proj / rel)
    (proj / "lerpfast" / "__init__.py").write_text("")
    (proj / "csrc").mkdir()
    (proj / "csrc" / "broken.cpp").write_text("#error deliberately broken for the test\n")
    env = {**os.environ, "LERPFAST_BUILD_CUDA": "0"}
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=proj, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "building lerpfast._C failed" in out and "deliberately broken" in out and "torch path" in out
    assert not list((proj / "lerpfast").glob("_C*.so"))
