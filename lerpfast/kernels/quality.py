"""Kernel quality read from an sm_90 compile on a CPU: registers, spills, shared memory, tensor cores, occupancy.

Without a GPU, Triton's ``CompiledKernel.n_regs`` / ``n_spills`` stay empty (they are filled when the cubin is
loaded on a device). :func:`analyze` reads them from the cubin Triton itself produced instead:

* **Registers, stack, static shared memory**: ``cuobjdump --dump-resource-usage`` on the cubin bytes (the tool
  Triton ships in ``triton/backends/nvidia/bin``).
* **Spills**: the local-memory stores and loads (``STL`` / ``LDL``) of the cubin's SASS (``cuobjdump -sass``),
  in bytes by access width. Triton's kernels declare no local arrays, so every local access is a register spill;
  on the kernels measured this equals ptxas's ``-v`` "bytes spill stores / loads" (checked in
  tests/test_kernel_quality.py). Reading the cubin rather than re-running ``ptxas -v`` on the PTX measures the
  binary that runs: Triton's ptxas flags differ between versions (3.9 runs ``ptxas-blackwell`` with
  ``--regAllocOptLevel=2`` for sm_90, 3.6 the CUDA 12.8 ``ptxas`` without it), and a copy of them that drifts would
  measure a different binary without saying so.
* **Tensor cores**: the PTX's ``wgmma.mma_async`` (Hopper) or ``mma.sync`` (Ampere-style) instructions, whether
  they sit inside a loop (the PTX marks loop headers; a loop is its header to the last branch back to it), and
  whether ``wgmma.wait_group 0`` waits inside that loop (no overlap of consecutive MMAs).
* **Occupancy on an H100** (:data:`H100`): CTAs per SM from registers (allocated per warp in units of 256),
  shared memory (Triton's dynamic ``metadata.shared`` plus 1 KB reserved per block, in 128-byte units), warps
  (64 per SM) and blocks (32 per SM); the smallest of the four and which resource it is.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile

__all__ = ["H100", "tool", "resource_usage", "spills", "tensor_cores", "occupancy", "waves", "analyze"]

#: sm_90 limits (H100 SXM; an H200 has the same SM)
H100 = {"sms": 132, "regs": 65536, "reg_unit": 256, "max_regs_per_thread": 255, "smem": 228 * 1024,
        "smem_per_block": 227 * 1024, "smem_reserved": 1024, "smem_unit": 128, "warps": 64, "blocks": 32}


def tool(name: str) -> str:
    """Path of a CUDA tool Triton ships (``cuobjdump``, ``nvdisasm``, ``ptxas``), else ``name`` on ``PATH``."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        proc = subprocess.run([tool("cuobjdump"), *flags, f.name], capture_output=True, text=True, timeout=120)
    finally:
        os.remove(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(flags)} failed on a cubin of {len(cubin)} bytes "
                           f"(exit {proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc.stdout


def resource_usage(cubin: bytes) -> dict:
    """``{"regs", "stack", "static_shared", "local"}`` of the cubin's (single) kernel, from cuobjdump."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump --dump-resource-usage printed no REG/STACK/SHARED/LOCAL line: {out[:300]!r}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_LOCAL_OP = re.compile(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)\b")


def spills(sass: str) -> dict:
    """Spill traffic of SASS text: ``{"store_bytes", "load_bytes", "stores", "loads"}`` (STL / LDL by width)."""
    out = {"store_bytes": 0, "load_bytes": 0, "stores": 0, "loads": 0}
    for line in sass.splitlines():
        code = line.split(";", 1)[0]
        m = _LOCAL_OP.search(code)
        if m is None:
            continue
        width = next((_WIDTH[s] for s in m.group(2).split(".") if s in _WIDTH), 4)
        kind = "store" if m.group(1) == "STL" else "load"
        out[f"{kind}_bytes"] += width
        out[f"{kind}s"] += 1
    return out


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of each loop: a label the PTX marks as a loop header, to the last branch back to it."""
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__\w+):.*Loop Header", line)
        if m is None:
            continue
        label = m.group(1)
        last = max((j for j in range(i + 1, len(lines)) if re.search(rf"\bbra(\.uni)?\s+{re.escape(label)};",
                                                                       lines[j])), default=None)
        if last is not None:
            out.append((i, last))
    return out


def tensor_cores(ptx: str) -> dict:
    """``{"mma": "wgmma" | "mma" | None, "mma_in_loop", "wait0_in_loop", "loops"}`` of PTX text.

    ``wait0_in_loop``: a loop with wgmma also waits for all of them (``wgmma.wait_group.sync.aligned 0``) before
    its next iteration, so one iteration's MMAs never overlap the next one's loads and MMAs.
    """
    lines = ptx.splitlines()
    is_wgmma = [("wgmma.mma_async" in ln) for ln in lines]
    is_mma = [bool(re.search(r"\bmma\.sync\.", ln)) for ln in lines]
    kind = "wgmma" if any(is_wgmma) else "mma" if any(is_mma) else None
    loops = _loops(lines)
    in_loop = wait0 = False
    for a, b in loops:
        if any(is_wgmma[a:b + 1]) or any(is_mma[a:b + 1]):
            in_loop = True
            if any(re.search(r"wgmma\.wait_group\.sync\.aligned\s+0;", ln) for ln in lines[a:b + 1]):
                wait0 = True
    return {"mma": kind, "mma_in_loop": in_loop, "wait0_in_loop": wait0, "loops": len(loops)}


def occupancy(regs: int, shared: int, num_warps: int, limits: dict = H100) -> dict:
    """CTAs per SM of a kernel (``regs`` per thread, ``shared`` dynamic bytes, ``num_warps``) and the limiter.

    Returns ``{"ctas_per_sm", "limiter", "by": {"registers", "shared", "warps", "blocks"}, "warps_per_sm",
    "occupancy"}`` (occupancy: resident warps / 64).
    """
    per_warp = math.ceil(max(regs, 1) * 32 / limits["reg_unit"]) * limits["reg_unit"]
    by_regs = (limits["regs"] // per_warp) // num_warps
    block_smem = math.ceil((shared + limits["smem_reserved"]) / limits["smem_unit"]) * limits["smem_unit"]
    by_smem = limits["smem"] // block_smem if shared <= limits["smem_per_block"] else 0
    by = {"registers": by_regs, "shared": by_smem, "warps": limits["warps"] // num_warps, "blocks": limits["blocks"]}
    ctas = min(by.values())
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    return {"ctas_per_sm": ctas, "limiter": limiter, "by": by, "warps_per_sm": ctas * num_warps,
            "occupancy": round(ctas * num_warps / limits["warps"], 3)}


def waves(grid, ctas_per_sm: int, limits: dict = H100) -> dict:
    """``{"ctas", "waves"}`` of a launch grid: its CTAs over what the GPU holds at once (132 SMs x CTAs per SM)."""
    ctas = math.prod(int(g) for g in grid) if grid else 1
    slots = limits["sms"] * max(ctas_per_sm, 1)
    return {"ctas": ctas, "waves": round(ctas / slots, 3)}


def analyze(compiled) -> dict:
    """Quality of a Triton ``CompiledKernel`` (what ``JITFunction.warmup`` returns), target sm_90 or any CUDA one.

    Returns ``{"regs", "spill_store_bytes", "spill_load_bytes", "stack", "shared", "num_warps", "num_stages",
    "mma", "mma_in_loop", "wait0_in_loop", "ctas_per_sm", "limiter", "occupancy"}``.
    """
    asm, md = compiled.asm, compiled.metadata
    if "cubin" not in asm or "ptx" not in asm:
        raise ValueError(f"kernel {getattr(md, 'name', '?')}: no cubin / ptx in its asm ({sorted(asm)}); "
                         "compile it for a CUDA target (lerpfast.kernels.launch.cross_compile without a GPU)")
    res = resource_usage(asm["cubin"])
    sp = spills(_cuobjdump(asm["cubin"], "-sass"))
    tc = tensor_cores(asm["ptx"])
    shared, warps = int(md.shared), int(md.num_warps)
    occ = occupancy(res["regs"], shared, warps)
    return {"regs": res["regs"], "spill_store_bytes": sp["store_bytes"], "spill_load_bytes": sp["load_bytes"],
            "stack": res["stack"], "shared": shared, "num_warps": warps, "num_stages": int(md.num_stages),
            "mma": tc["mma"], "mma_in_loop": tc["mma_in_loop"], "wait0_in_loop": tc["wait0_in_loop"],
            "ctas_per_sm": occ["ctas_per_sm"], "limiter": occ["limiter"], "occupancy": occ["occupancy"]}
