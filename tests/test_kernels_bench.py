"""The kernel micro benchmarks (benchmarks/bench_kernels.py) run at tiny sizes (the end-to-end GPU benchmark script is
tested in tests/test_bench_gpu.py)."""

import os
import sys

import pytest


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
