"""Cold start (issue 9): the plan of a sweep's kernels, its agreement with what really launches, launch keys,
opt-in autotuning, and `lerpfast warmup`.

The plan is made on meta tensors; the real launches are recorded here under the Triton interpreter at the
triton level (InterpretedFunction.run), i.e. independently of lerpfast's own recorder.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (tests/test_kernels.py does the same)
triton = pytest.importorskip("triton")

import lerpfast  # noqa: E402
from lerpfast.kernels import launch, tiles, warmup  # noqa: E402
from lerpfast.train import models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _interpreted_launches(monkeypatch) -> list:
    """Launch records built from what the interpreter is really asked to run (not from lerpfast's recorder)."""
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "enable_fp_fusion",
                                                              "num_ctas", "maxnreg")}
        name = f"{self.fn.__module__}:{self.fn.__name__}"
        seen.append(launch.Launch(name, tuple(launch._arg_spec(a) for a in args), tuple(sorted(consts.items())),
                                  kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_matches_the_kernels_a_sweep_launches(monkeypatch, clean_dispatch, precision):
    """ResNet-20 (BN, residual adds, projection shortcuts, shared-input stem) on 8x8 images: the variants the plan
    lists (meta tensors, nothing run) are exactly those the engine launches in a real sweep (interpreter, triton
    forced, so every triton candidate runs as the first GPU sweep's measurement would run it)."""
    from lerpfast.kernels import _common

    if torch.cuda.is_available() or not _common.INTERPRET:
        pytest.skip("needs the interpreter on before the kernels were imported")
    torch.manual_seed(0)
    shape, batch, K = (3, 8, 8), 2, 3
    net = models.create("resnet20", in_shape=shape).eval()
    other = models.create("resnet20", in_shape=shape).state_dict()
    pl = warmup.plan(net, precision, K, batch=batch, input_shape=shape)
    assert {v.name for v in pl.variants} == {"_lerp_conv2d_fwd_kernel", "_lerp_mix_kernel", "_lerp_linear_fwd_kernel",
                                             "_point_metrics_kernel"}  # the batch's metrics: one fused kernel

    seen = _interpreted_launches(monkeypatch)
    monkeypatch.setenv("LERPFAST_BACKEND", "triton")
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    res = lerpfast.sweep(net, (net.state_dict(), other), [0.0, 0.5, 1.0], (x, y), batch_size=batch,
                         precision=precision, progress=False)
    assert res.meta["fusion"]["chains"] == 21
    assert len(seen) == len(pl.launches)  # one forward, same launches
    assert {ln.key() for ln in seen} == {ln.key() for ln in pl.launches}
    assert [ln.key() for ln in seen] == [ln.key() for ln in pl.launches]


def test_plan_counts_for_the_zoo():
    """The issue's budget: at most 12 kernel variants per model and precision (the compile time is measured by
    benchmarks/bench_compile.py)."""
    for model in ("lenet_300_100", "resnet20", "vgg16", "resnet50"):
        for prec in ("fp32", "tf32", "bf16"):
            pl = warmup.plan(model, prec, 32)
            assert 1 <= len(pl.variants) <= 12, (model, prec, [v.describe() for v in pl.variants])
            dots = {dict(v.constexprs).get("DOT") for v in pl.variants} - {None}
            assert dots == {{"fp32": 0, "tf32": 1, "bf16": 2}[prec]}


def test_plan_is_independent_of_layout_and_batch():
    """Inputs are normalized to channels-last inside the conv wrapper, and sizes that only bound loops are not
    specialized on: the compiled variants do not depend on channels_last, nor on the batch beyond its
    divisibility by 16 (which a per-point stride such as N * 10 of the logits carries)."""
    keys = lambda pl: {v.key() for v in pl.variants}  # noqa: E731
    base = warmup.plan("resnet20", "bf16", 8, batch=64)
    assert keys(base) == keys(warmup.plan("resnet20", "bf16", 8, batch=64, channels_last=True))
    assert keys(base) == keys(warmup.plan("resnet20", "bf16", 8, batch=1008))
    odd = keys(warmup.plan("resnet20", "bf16", 8, batch=100))
    assert len(odd - keys(base)) == 1  # the classifier (10 outputs) only


def test_launch_key_mirrors_triton_specialization():
    """Launch.key() treats arguments exactly as triton's JIT specializes them (its own native_specialize_impl)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    def triton_key(v, specialize):
        t, attr = native_specialize_impl(BaseBackend, v, False, specialize, True)
        return (t, attr)

    def ours(v, fixed):
        ln = launch.Launch("m:k", (launch._arg_spec(v),), (), 4, 1)
        launch._ARG_NAMES["m:k"] = ("a",)
        launch._NO_SPECIALIZE["m:k"] = ("a",) if fixed else ()
        return ln.key()[1][0]

    values = [0, 1, 2, 15, 16, 17, 48, 2 ** 31 - 16, 2 ** 31, 2 ** 40 + 3, -16, True, False,
              torch.zeros(8), torch.zeros(8)[1:], torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8)[4:]]
    groups_t, groups_o = {}, {}
    for i, v in enumerate(values):
        for fixed in (False, True):
            if fixed and not (isinstance(v, int) and not isinstance(v, bool)):
                continue
            groups_t.setdefault(triton_key(v, not fixed), set()).add((i, fixed))
            groups_o.setdefault(ours(v, fixed), set()).add((i, fixed))
    assert sorted(map(sorted, groups_t.values())) == sorted(map(sorted, groups_o.values()))


def test_launch_json_round_trip():
    pl = warmup.plan("lenet_300_100", "bf16", 4)
    for ln in pl.launches:
        back = launch.Launch.from_json(json.loads(json.dumps(ln.to_json())))
        assert back.key() == ln.key()


def test_tiles_are_few_and_sane():
    for dot in (0, 1, 2):
        seen = set()
        for co in (3, 16, 17, 32, 64, 100, 512, 2048):
            for c in (3, 16, 64, 512):
                t = tiles.conv2d(1000 * 64, c, co, 9, dot).default
                b = t.kwargs()
                assert b["BLOCK_O"] >= min(16, co) and b["BLOCK_C"] >= 16 and b["BLOCK_M"] % 32 == 0
                seen.add(t)
        assert len(seen) <= 8  # shape classes (4 output blocks x 2 channel blocks), not shapes
    assert tiles.conv2d(100, 64, 64, 9, 0).default.kwargs()["BLOCK_M"] == 32  # fp32 FMA tiles stay small


def test_autotune_is_opt_in_and_persisted(monkeypatch, tmp_path):
    monkeypatch.setenv("LERPFAST_CACHE", str(tmp_path))
    monkeypatch.delenv("LERPFAST_AUTOTUNE", raising=False)
    assert not tiles.autotune_enabled()
    monkeypatch.setenv("LERPFAST_AUTOTUNE", "1")
    assert tiles.autotune_enabled()
    tiles._TABLES.clear()
    choice = tiles.conv2d(64_000, 64, 64, 9, 2)
    cands = tiles.candidates(choice)
    assert cands[0] == choice.default and len(cands) > 3
    want = cands[2]
    timed = []

    def bench(fn):
        fn()
        return 1.0 if timed[-1] == want else 2.0

    best = tiles.tuned(choice, lambda t: timed.append(t), device="cpu", bench=bench)
    assert best == want and len(timed) == len(cands)
    data = json.loads((tmp_path / "autotune-cpu.json").read_text())
    assert f"conv2d|{choice.key}" in data["entries"]
    tiles._TABLES.clear()  # a new process: the winner is read back, nothing is timed
    assert tiles.tuned(choice, lambda t: pytest.fail("re-tuned"), device="cpu", bench=bench) == want
    assert tiles.persisted(choice, "cpu") == want


def test_cli_warmup_lists_the_plan(capsys):
    from lerpfast import cli

    assert cli.main(["warmup", "--model", "lenet_300_100", "--precision", "fp32,bf16", "--list"]) == 0
    out = capsys.readouterr().out
    assert "lenet_300_100 fp32:" in out and "lenet_300_100 bf16:" in out and "lerp_mix_kernel" in out


@pytest.mark.slow
def test_warmup_cross_compiles_without_gpu(tmp_path):
    """`lerpfast warmup` compiles the plan for sm_90 on a CPU machine (into an empty TRITON_CACHE_DIR)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "w.json"
    proc = subprocess.run([sys.executable, "-m", "lerpfast.kernels.warmup", "--model", "lenet_300_100",
                           "--precision", "fp32", "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("compiles=5 seconds=")  # 3 linear layers (2 share a variant), the mix, the metrics
    rec = json.loads(out.read_text())
    assert rec["compile"]["errors"] == 0 and "sm_90" in rec["compile"]["target"]
    cubins = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".cubin")]
    assert len(cubins) == 5
