"""Kernel quality on the CPU (issue 15): registers, spills, tensor cores and H100 occupancy of the sm_90 compile.

The reading of cubins and PTX (lerpfast.kernels.quality) is checked on small hand-made inputs; the planned variants
of LeNet-300-100 and ResNet-20 in fp32 and bf16 are cross-compiled for sm_90 in a subprocess (the kernels must be
compiled, not interpreted, and the other kernel tests turn the interpreter on at import) and must not spill.
The full four-model table is benchmarks/bench_compile.py's job.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from lerpfast.kernels import quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_occupancy_of_an_h100():
    # 255 registers x 32 threads = 8160 -> 8192 per warp (units of 256): 8 warps fit the 65,536 registers -> 2 CTAs
    # of 4 warps, limited by registers
    occ = quality.occupancy(255, 16 * 1024, 4)
    assert occ["by"]["registers"] == 2 and occ["ctas_per_sm"] == 2 and occ["limiter"] == "registers"
    # 96 registers (3072 per warp: 21 warps): 5 CTAs of 4 warps by registers; 64 KB + 1 KB reserved -> 3 by shared
    occ = quality.occupancy(96, 64 * 1024, 4)
    assert occ["by"] == {"registers": 5, "shared": 3, "warps": 16, "blocks": 32}
    assert occ["ctas_per_sm"] == 3 and occ["limiter"] == "shared" and occ["occupancy"] == round(3 * 4 / 64, 3)
    # 32 registers, no shared memory, 1 warp: 32 blocks per SM is the limit
    occ = quality.occupancy(32, 0, 1)
    assert occ["ctas_per_sm"] == 32 and occ["limiter"] == "blocks"
    # more shared memory than a block may have: nothing fits
    assert quality.occupancy(32, 228 * 1024, 4)["ctas_per_sm"] == 0
    assert quality.waves((237, 2), 1) == {"ctas": 474, "waves": round(474 / 132, 3)}


def test_spills_are_local_stores_and_loads_by_width():
    sass = """
        /*5ee0*/                   STL.64 [R1+0x18], R184 ;       /* 0x000018b801007387 */
        /*5f00*/                   STL [R1+0x4], R3 ;             /* 0x0000040301007387 */
        /*5f10*/                   LDS.128 R4, [R2] ;             /* shared memory: not a spill */
        /*7f10*/                   LDL.LU.64 R182, [R1+0x18] ;    /* 0x0000180001b67983 */
        /*7f20*/                   LDL.LU.128 R8, [R1+0x20] ;
        /*7f30*/                   STG.E [R4.64], R3 ;            /* global store: not a spill */
    """
    assert quality.spills(sass) == {"store_bytes": 12, "load_bytes": 24, "stores": 2, "loads": 2}
    assert quality.spills("        /*0010*/  FFMA R1, R2, R3, R4 ;")["store_bytes"] == 0


PTX_LOOP = """
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
	cp.async.wait_group 	2;
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, %p1, 1, 1, 0, 0;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned {wait};
	@%p38 bra 	$L__BB0_2;
$L__BB0_3:                              // %._crit_edge
	wgmma.wait_group.sync.aligned 0;
"""


def test_tensor_cores_and_the_wait_inside_the_loop():
    tc = quality.tensor_cores(PTX_LOOP.replace("{wait}", "0;"))
    assert tc == {"mma": "wgmma", "mma_in_loop": True, "wait0_in_loop": True, "loops": 1}
    tc = quality.tensor_cores(PTX_LOOP.replace("{wait}", "1;"))  # keeps one group in flight: overlap
    assert tc["mma"] == "wgmma" and tc["mma_in_loop"] and not tc["wait0_in_loop"]
    fma = quality.tensor_cores("$L__BB0_1: // =>This Inner Loop Header: Depth=1\n fma.rn.f32 %f1, %f2, %f3, %f4;\n"
                               " @%p1 bra $L__BB0_1;\n")
    assert fma == {"mma": None, "mma_in_loop": False, "wait0_in_loop": False, "loops": 1}
    assert quality.tensor_cores(" mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};")[
        "mma"] == "mma"


_PLANS = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
from lerpfast.kernels import warmup
out = {}
for spec in sys.argv[1:]:
    model, prec, batch = spec.split(":")
    pl = warmup.plan(model, prec, 32, batch=int(batch), channels_last=prec != "fp32")
    res = warmup.compile_plan(pl.launches, device="cpu", arch=90, workers=2, quality=True)
    out[f"{model} {prec}"] = res["variants"]
print("JSON" + json.dumps(out))
"""


def _subprocess(code: str, args: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1", **env)
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=e, timeout=600,
                          cwd=ROOT)


def test_planned_sm90_variants_do_not_spill(tmp_path):
    """LeNet-300-100 and ResNet-20 (the batches of bench_sweep_gpu.py), fp32 and bf16: every variant their first GPU
    sweep compiles fits in registers for sm_90, and the bf16 GEMMs stay on tensor cores (wgmma inside the loop)."""
    proc = _subprocess(_PLANS, ["lenet_300_100:fp32:10000", "lenet_300_100:bf16:10000", "resnet20:fp32:1000",
                                "resnet20:bf16:1000"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("JSON", 1)[1])
    bad, checked = [], 0
    for name, variants in res.items():
        for v in variants:
            assert v["error"] is None, (name, v["kernel"], v["error"])
            q = v["quality"]
            checked += 1
            if q["spill_store_bytes"] or q["spill_load_bytes"] or q["stack"]:
                bad.append(f"{name}: {v['kernel']}: {q['regs']} registers, {q['spill_store_bytes']} B spill stores, "
                           f"{q['spill_load_bytes']} B spill loads, {q['stack']} B stack")
            assert q["ctas_per_sm"] >= 1, (name, v["kernel"], q)
            if "bf16" in name and ("conv2d_fwd" in v["kernel"] or "linear_fwd" in v["kernel"]):
                assert q["mma"] == "wgmma" and q["mma_in_loop"], (name, v["kernel"], q)
    assert checked >= 20
    assert not bad, "spills in planned sm_90 variants (change the tile in lerpfast/kernels/tiles.py):\n" + \
        "\n".join(bad)


_PTXAS = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
from lerpfast.kernels import launch, quality, warmup
pl = warmup.plan("lenet_300_100", "bf16", 4, batch=256)
v = next(v for v in pl.variants if "linear_fwd" in v.kernel)
# the 128 x 128 tile with 8 warps, which spilled before the tiles changed (issue 15): a kernel with spills
c = dict(v.constexprs, BLOCK_N=128, BLOCK_O=128, BLOCK_I=32)
v = launch.Launch(v.kernel, v.args, tuple(sorted(c.items())), 8, 3)
with launch.cross_compile(90):
    k, _ = launch.compile_kernel(v)
print("JSON" + json.dumps(quality.analyze(k)))
"""


def test_spills_read_from_the_cubin_equal_ptxas_verbose(tmp_path):
    """What the cubin says (cuobjdump registers, SASS local stores / loads) equals what ptxas -v, run by Triton
    itself with its own flags (TRITON_DUMP_PTXAS_LOG), printed for the same compile, on a kernel that spills."""
    proc = _subprocess(_PTXAS, [], tmp_path, TRITON_DUMP_PTXAS_LOG="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log, data = proc.stdout.split("JSON", 1)
    q = json.loads(data)
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    assert m and regs, log[-2000:]
    assert (q["stack"], q["spill_store_bytes"], q["spill_load_bytes"]) == tuple(map(int, m.groups()))
    assert q["regs"] == int(regs.group(1))
    assert q["spill_store_bytes"] > 0  # the check compares a real spill, not two zeros


@pytest.mark.parametrize("dot", [0, 1, 2])
def test_tiles_stay_within_the_register_budget(dot):
    """The heuristic's choices that the compiles above showed spill-free: fp32 32-row FMA tiles; tensor-core tiles
    at most 64 wide, with 8 warps (two warp groups) at 64."""
    from lerpfast.kernels import tiles

    for co in (10, 16, 32, 64, 100, 300, 1000, 2048):
        for t in (tiles.conv2d(64_000, 64, co, 9, dot).default, tiles.linear(1000, 512, co, dot).default):
            b = t.kwargs()
            rows = b.get("BLOCK_M", b.get("BLOCK_N"))
            assert b["BLOCK_O"] <= 64
            if dot == 0:
                assert rows == 32 and t.num_warps == 4
            else:
                assert rows == 128 and t.num_warps == (8 if b["BLOCK_O"] == 64 else 4)
