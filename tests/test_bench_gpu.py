"""The GPU benchmark and the GPU session script, run on the CPU in their dry modes (issue 9, section 3).

What is checked: the JSON-lines records (header, one record per plan item, end), the budget (a tiny one gives
"skipped" records, never a crash), the per-item time limit (a hung item is killed, recorded and the run goes on),
the summarizer and the session script's file count. The numbers of a dry run mean nothing.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
BENCH = os.path.join(ROOT, "benchmarks", "bench_sweep_gpu.py")
SESSION = os.path.join(ROOT, "benchmarks", "gpu_session.sh")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sweep_gpu_t", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _records(path):
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.fixture(scope="module")
def lenet_run(bench, tmp_path_factory):
    """One dry run of the whole plan for LeNet (about 10 s on one core)."""
    d = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--dry", "--models", "lenet_300_100", "--jsonl", str(d / "r.jsonl"), "--out",
                     str(d / "r.json"), "--md", str(d / "r.md"), "--budget-s", "300"])
    return rc, d


def test_dry_run_records(bench, lenet_run):
    rc, d = lenet_run
    assert rc == 0
    recs = _records(d / "r.jsonl")
    assert recs[0]["type"] == "header" and recs[-1]["type"] == "end"
    head = recs[0]
    assert head["dry"] and head["torch"] == torch.__version__ and head["source_sha256"]
    assert {"python", "triton", "commit", "settings"} <= set(head)
    assert len({r["run"] for r in recs}) == 1
    plan = next(r for r in recs if r["type"] == "plan")["items"]
    by_id = {r["id"]: r for r in recs if "status" in r}
    assert set(by_id) == set(plan)  # one record per plan item
    assert plan[0] == "env" and plan[1:4] == ["lenet_300_100/loop_bf16_cl/K4", "lenet_300_100/lerpfast_bf16/K4",
                                              "lenet_300_100/lerpfast_tf32/K4"]  # most important first
    env = by_id["env"]
    assert env["status"] == "ok" and set(env["matmul_peak_tflops"]) == {"fp32", "tf32", "bf16"}
    tp = [r for r in recs if r["type"] == "throughput" and r["status"] == "ok"]
    assert {r["method"] for r in tp} == set(bench.METHODS) - {"lerpfast_bf16_graphs"}
    for r in tp:
        assert r["first_call_s"] > 0 and r["steady_s"] > 0 and r["steady_s"] == min(r["steady_all_s"])
        assert r["img_points_per_s"] == pytest.approx(r["K"] * r["images"] / r["steady_s"])
    graphs = by_id["lenet_300_100/lerpfast_bf16_graphs/K4"]
    assert graphs["status"] == "skipped" and "GPU" in graphs["reason"]
    acc = {r["method"]: r for r in recs if r["type"] == "accuracy"}
    assert set(acc) == {"fp64_ref", "lerpfast_fp32", "lerpfast_tf32", "lerpfast_bf16", "loop_fp32"}
    assert acc["lerpfast_fp32"]["max_rel"] < 1e-5 and acc["lerpfast_bf16"]["max_rel"] < 5e-2
    mem = [r for r in recs if r["type"] == "memory"]
    assert [r["K"] for r in mem] == [1, 4] and all(r["status"] == "ok" for r in mem)
    assert bench.check_records(recs) == []


def test_summary_and_table(bench, lenet_run):
    _, d = lenet_run
    summ = json.loads((d / "r.json").read_text())
    m = summ["models"][0]
    assert m["model"] == "lenet_300_100" and m["flops_per_image"] > 0
    h = m["headline"]
    assert h["loop_bf16_cl"] > 0 and h["lerpfast_bf16_best"] > 0 and h["lerpfast_bf16_best_K"] in (1, 4)
    assert h["bf16_K4_over_loop_bf16"] == pytest.approx(h["lerpfast_bf16_K4"] / h["loop_bf16_cl"])
    assert h["fp32_within_1e-5"] is True and h["target_bf16"] == 1e9
    assert summ["environment"]["torch"] == torch.__version__ and summ["dry"] is True
    md = (d / "r.md").read_text()
    assert "| lenet_300_100 |" in md and "DRY RUN" in md and "loop bf16+CL" in md


def test_summarize_cli_writes_device_files(bench, lenet_run, tmp_path):
    _, d = lenet_run
    out = tmp_path / "s.json"
    assert bench.main(["--summarize", str(d / "r.jsonl"), "--out", str(out)]) == 0
    summ = json.loads(out.read_text())
    assert summ["device_tag"] == "cpu_dry_run" and summ["record_problems"] == []
    assert (tmp_path / "s.md").exists()
    assert bench._device_tag("NVIDIA H200", False) == "nvidia_h200"


def test_check_flags_a_cut_file(bench, lenet_run, tmp_path):
    _, d = lenet_run
    lines = (d / "r.jsonl").read_text().splitlines()
    assert bench.main(["--check", str(d / "r.jsonl")]) == 0
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # killed mid-write: no end record
    assert bench.main(["--check", str(cut)]) == 1
    assert any("end" in p for p in bench.check_records(bench.read_jsonl(str(cut))))


def test_tiny_budget_skips_everything(bench, tmp_path):
    path = tmp_path / "b.jsonl"
    rc = bench.main(["--dry", "--models", "lenet_300_100,resnet20", "--budget-s", "0.5", "--jsonl", str(path)])
    assert rc == 0
    recs = _records(path)
    items = [r for r in recs if "status" in r]
    assert items and all(r["status"] == "skipped" for r in items)
    assert all(r["reason"] == "budget" and r["estimate_s"] > r["remaining_s"] for r in items
               if "GPU" not in r["reason"])
    assert recs[-1]["type"] == "end" and bench.check_records(recs) == []
    assert not any(r["type"] == "worker_ready" for r in recs)  # nothing started


def test_estimates_follow_measurements(bench):
    s, _ = bench._parse(["--models", "resnet20"])
    est = bench.Estimator(s)
    it32 = bench.Item("a", "throughput", 1, "resnet20", "lerpfast_bf16", 32)
    it128 = bench.Item("b", "throughput", 2, "resnet20", "lerpfast_bf16", 128)
    prior = est.estimate(it32, 10_000, loaded=False)
    assert prior > 30  # compile prior + model load + loop-rate prior
    est.add({"type": "throughput", "status": "ok", "model": "resnet20", "method": "lerpfast_bf16", "K": 32,
             "images": 10_000, "first_call_s": 12.0, "steady_s": 0.5, "time_to_steady_s": 20.0})
    e32, e128 = est.estimate(it32, 10_000, True), est.estimate(it128, 10_000, True)
    assert e32 == pytest.approx(19.5 + 0.5 * 3)  # overhead seen + first call + 2 repeats to reach 1 s
    assert e128 == pytest.approx(19.5 + 2.0 * 2)  # 4x the points: 4x the time, one repeat
    # an engine precision not measured yet borrows the rate and compile overhead of the model's engine
    tf = est.estimate(bench.Item("c", "throughput", 1, "resnet20", "lerpfast_tf32", 32), 10_000, True)
    assert tf == pytest.approx(19.5 + 0.5 * 3)
    # another model: the compile prior (nothing of its own measured), its own loop-rate prior
    vgg = est.estimate(bench.Item("d", "throughput", 1, "vgg16", "lerpfast_tf32", 32), 10_000, True)
    assert vgg == pytest.approx(30.0 + 2 * 32 * 10_000 / bench.MODELS["vgg16"].prior_rate)


def test_plan_order_and_caps(bench):
    s, _ = bench._parse([])
    plan = bench.build_plan(s)
    ids = [it.id for it in plan]
    assert len(ids) == len(set(ids))
    tiers = [it.tier for it in plan]
    assert tiers == sorted(tiers)
    first = [it.id for it in plan if it.tier == 1]
    assert first[:3] == ["lenet_300_100/loop_bf16_cl/K32", "lenet_300_100/lerpfast_bf16/K32",
                         "lenet_300_100/lerpfast_tf32/K32"] and len(first) == 12
    assert "resnet50/lerpfast_bf16/K128" not in ids and "resnet50/lerpfast_bf16/K64" in ids  # K cap
    assert ids.index("vgg16/lerpfast_bf16/K128") < ids.index("lenet_300_100/accuracy/fp64_ref")


def test_settle_waits_for_background_compiles(bench, monkeypatch):
    """With the dispatcher's optional wait()/pending(), the worker waits, then makes one settling call."""
    from lerpfast.engine import dispatch

    s, _ = bench._parse(["--dry"])
    w = bench.Worker(s, io.StringIO())
    w.device = torch.device("cuda")  # settle() only looks at the type; nothing runs on it
    waited = []
    monkeypatch.setattr(dispatch, "pending", lambda: 3, raising=False)
    monkeypatch.setattr(dispatch, "wait", lambda timeout=None: waited.append(timeout) or True, raising=False)
    import time

    out = w.settle({"id": "x", "limit_s": 40.0, "_t0": time.perf_counter()}, lambda: 0.25)
    assert out["compile_pending"] == 3 and out["compile_wait_done"] is True and out["settle_s"] == 0.25
    assert 0 < waited[0] <= 20.0
    monkeypatch.setattr(dispatch, "pending", lambda: 0, raising=False)
    assert w.settle({"id": "x", "limit_s": 40.0, "_t0": time.perf_counter()}, lambda: 1 / 0) == {
        "compile_pending": 0}


@pytest.mark.slow
def test_hung_item_is_killed_and_the_run_goes_on(bench, tmp_path):
    path = tmp_path / "h.jsonl"
    env = dict(os.environ, LERPFAST_BENCH_HANG="lenet_300_100/lerpfast_bf16/K4", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, BENCH, "--dry", "--models", "lenet_300_100", "--tiers", "1,2",
                           "--item-timeout-s", "8", "--jsonl", str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    by_id = {r["id"]: r for r in _records(path) if "status" in r}
    hung = by_id["lenet_300_100/lerpfast_bf16/K4"]
    assert hung["status"] == "timeout" and hung["reason"] == "item time limit" and hung["limit_s"] == 8
    assert by_id["lenet_300_100/lerpfast_bf16/K1"]["status"] == "skipped"  # the rest of its group
    assert "after lenet_300_100/lerpfast_bf16/K4" in by_id["lenet_300_100/lerpfast_bf16/K1"]["reason"]
    assert by_id["lenet_300_100/lerpfast_tf32/K4"]["status"] == "ok"  # a fresh worker went on
    assert by_id["lenet_300_100/lerpfast_tf32/K1"]["status"] == "ok"
    assert bench.check_records(_records(path)) == []


@pytest.mark.slow
def test_gpu_session_dry(tmp_path):
    """DRY=1 gpu_session.sh, environment and benchmark steps only (`DRY=1 bash benchmarks/gpu_session.sh` runs all
    of them: build, warm-up and smoke tests take minutes on two cores)."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), DRY="1", STEPS="env,bench", MODELS="lenet_300_100",
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", SESSION], env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"session.log", "bench.log", "sweep_gpu.jsonl", "sweep_gpu.md"} <= set(files)
    recs = _records(out / "sweep_gpu.jsonl")
    steps = {r["step"]: r for r in recs if r["type"] == "session_step"}
    assert steps["env"]["status"] == "ok" and steps["bench"]["status"] == "ok" and set(steps) == {"env", "bench"}
    assert [r for r in recs if r["type"] == "header"][0]["commit"]  # LERPFAST_COMMIT or git
    assert "every step passed" in proc.stdout and "| lenet_300_100 |" in proc.stdout


def test_help(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    assert "--dry-run-cpu" in capsys.readouterr().out


def test_refuses_without_cuda(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--models", "resnet20"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
