"""The GPU benchmark script imports, documents itself and refuses cleanly without CUDA."""

import importlib.util
import json
import os
import sys

import pytest
import torch

PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_sweep_gpu.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_sweep_gpu", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_help(capsys):
    mod = _load()
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert "--dry-run-cpu" in capsys.readouterr().out


def test_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _load().main(["--models", "resnet20"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_cpu_writes_json(tmp_path):
    mod = _load()
    out = tmp_path / "r.json"
    assert mod.main(["--dry-run-cpu", "--models", "lenet_300_100", "--ks", "1,2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    runs = res["models"][0]["runs"]
    assert {r["method"] for r in runs} == set(mod.METHODS)
    ok = [r for r in runs if "img_points_per_s" in r]
    assert ok, runs
    assert all(r["img_points_per_s"] > 0 for r in ok)
    assert res["environment"]["torch"] == torch.__version__


@pytest.mark.slow
def test_kernel_micro_benchmarks_run_at_tiny_sizes():
    """Every case of benchmarks/bench_kernels.py runs once (tiny sizes, interpreter on CPU) and checks its shape."""
    import subprocess

    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_kernels.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", bench,
                           "--benchmark-disable"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
