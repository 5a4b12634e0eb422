"""The Triton kernels, checked on the CPU: by the Triton interpreter, and by
compiling them for a GPU.

``TRITON_INTERPRET=1`` must be set before triton is imported, and this
process may have imported triton already (torch.compile does), so the op
suite runs on the Triton kernels in child processes, ``pytest --backend
triton`` (conftest.py: the same test files as this run, plus
test_triton_kernels.py), two shards at once. A failing child's report is
shown in full. The interpreter cannot show what only the GPU compiler sees, so
every kernel is also compiled to an sm_90 cubin (no GPU needed) in a child
process without the interpreter. Without triton the tests are skipped, with
the reason printed.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import TRITON_SUITE

HERE = pathlib.Path(__file__).resolve().parent
#: Test files of the shards, run side by side (about equal run times).
_FIRST = ("test_softmax.py", "test_kl.py", "test_triton_kernels.py")
SHARDS = {
    "softmax+kl+kernels": _FIRST,
    "the rest of the suite": tuple(f for f in TRITON_SUITE if f not in _FIRST),
}
TIMEOUT_S = 900


def test_triton_kernels_under_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip(
            "triton is not installed: the Triton kernel tests (pytest --backend triton) were NOT run"
        )
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KDCORE_BACKEND")}
    children = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "--backend",
                "triton",
                *(str(HERE / f) for f in files),
                "-q",
                "-p",
                "no:cacheprovider",
                "--tb=short",
                "-rfEs",
            ],
            cwd=HERE.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, files in SHARDS.items()
    }
    failed = []
    for name, child in children.items():
        try:
            out, _ = child.communicate(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
            failed.append(f"== shard {name}: timed out after {TIMEOUT_S} s\n{out[-6000:]}")
            continue
        summary = out.strip().splitlines()[-1] if out.strip() else "(no output)"
        print(f"triton interpreter shard {name}: {summary}")
        if child.returncode != 0 or " passed" not in summary:
            failed.append(f"== shard {name}: exit code {child.returncode}\n{out[-12000:]}")
    if failed:
        pytest.fail("\n\n".join(failed), pytrace=False)


#: Kernel variants compiled for sm_90 (every code path of each kernel at least once).
COMPILE_SCRIPT = r"""
import os, sys, time
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kdcore.kernels import distill, scale, softmax, sparse

def run(fn, sig, const, warps):
    consts = {**const, "PROGRAMS_PER_SM": 0} if "PROGRAMS_PER_SM" in fn.arg_names else const
    # As the JIT specialises torch tensors and V, strides divisible by 16 (16-byte loads).
    aligned = [n for n, t in sig.items() if t.startswith("*") or n == "V" or "stride" in n]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    sig = {**sig, **{k: "constexpr" for k in consts}}
    t0 = time.monotonic()
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert k.asm.get("cubin"), "no cubin"
    vector = ".v4" in k.asm["ptx"] or ".v2" in k.asm["ptx"]
    print(f"ok {fn.__name__} {const} vector loads {vector} ({time.monotonic() - t0:.1f}s)")
    return vector

d = {"S": "*bf16", "T": "*fp32", "W": "*fp32", "LOSS": "*fp32", "LABELS": "*i64", "CEW": "*fp32",
     "CELOSS": "*fp32", "GS": "*bf16", "GT": "*fp32", "rows": "i32", "V": "i32", "stride_s": "i64",
     "stride_t": "i32", "stride_gs": "i32", "stride_gt": "i32", "inv_t": "fp32", "k": "fp32",
     "beta": "fp32", "rest": "fp32", "log_beta": "fp32", "log_rest": "fp32"}
for div in range(4):
    run(distill.distill_kernel, d, dict(DIV=div, HAS_CE=True, CE_T1=True, GRAD_S=True,
        GRAD_T=True, BLOCK=4096), 16)
assert run(distill.distill_kernel, d, dict(DIV=0, HAS_CE=False, CE_T1=False, GRAD_S=True,
    GRAD_T=False, BLOCK=2048), 8), "the KL kernel lost its 16-byte loads"
run(distill.distill_kernel, d, dict(DIV=3, HAS_CE=False, CE_T1=False, GRAD_S=False,
    GRAD_T=False, BLOCK=1024), 4)
x = {"X": "*fp16", "Y": "*fp16", "rows": "i32", "V": "i32", "stride_x": "i64", "stride_y": "i64",
     "k": "fp32"}
y = {"Y": "*bf16", "G": "*bf16", "DX": "*bf16", "rows": "i32", "V": "i32", "stride_y": "i64",
     "stride_g": "i64", "stride_dx": "i64", "inv_t": "fp32"}
for log in (False, True):
    run(softmax.softmax_fwd_kernel, x, dict(LOG=log, BLOCK=4096), 16)
    run(softmax.softmax_bwd_kernel, y, dict(LOG=log, BLOCK=4096), 16)
p = {"S": "*bf16", "IDS": "*i64", "P": "*fp64", "PLOGP": "*fp64", "PTAIL": "*fp64",
     "LOG_PTAIL": "*fp64", "PSUM": "*fp64", "W": "*fp32", "LOSS": "*fp32", "G": "*bf16",
     "rows": "i32", "V": "i32", "K": "i32", "stride_s": "i64", "stride_g": "i64", "inv_t": "fp32",
     "k": "fp32"}
for tail, grad in ((0, True), (1, True), (2, False)):
    run(sparse.sparse_kl_kernel, p, dict(TAIL=tail, GRAD=grad, BLOCK=4096, KBLOCK=128), 16)
c = {"SRC": "*bf16", "DST": "*bf16", "F": "*fp32", "DEN": "*fp32", "rows": "i32", "V": "i32",
     "stride_src": "i64", "stride_dst": "i64", "stride_f": "i64", "stride_den": "i64"}
for den in (False, True):
    run(scale.scale_kernel, c, dict(HAS_DEN=den, SKIP_ONE=not den, BLOCK=4096), 8)
print("compiled all")
"""


def test_triton_kernels_compile_for_the_gpu():
    """Every kernel variant compiles to an sm_90 cubin: catches what only the GPU
    compiler sees (types, constexpr rules), without a GPU."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the Triton kernels were NOT compiled")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton cannot compile ahead of time ({exc}): NOT compiled")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    report = out.stdout + out.stderr
    if "ptxas" in report and "not found" in report.lower():
        pytest.skip(f"no ptxas for sm_90 in this triton: NOT compiled\n{report[-2000:]}")
    assert out.returncode == 0 and "compiled all" in out.stdout, report[-8000:]


def _like(device: str, dtype=torch.float32):
    """What select() looks at of a tensor: its device type and dtype (no CUDA needed)."""
    return types.SimpleNamespace(device=torch.device(device), dtype=dtype)


@pytest.mark.parametrize("installed", [True, False])
def test_dispatch_of_cuda_tensors(monkeypatch, installed):
    from kdcore import _dispatch

    monkeypatch.setattr(_dispatch, "triton_available", lambda: installed)
    cuda, cpu = _like("cuda"), _like("cpu", torch.bfloat16)
    with _dispatch.backend("auto"):
        assert _dispatch.select(cuda, cuda) == ("triton" if installed else "torch")
        assert _dispatch.select(cpu) == "rust"
        assert _dispatch.select(_like("cuda", torch.float64)) == "torch"
    with _dispatch.backend("rust"):
        assert _dispatch.select(cuda) == "torch"
    with _dispatch.backend("torch"):
        assert _dispatch.select(cuda) == "torch"
    if installed:
        with _dispatch.backend("triton"):
            assert _dispatch.select(cpu) == "triton"
            assert _dispatch.select(_like("cpu", torch.float64)) == "torch"
            assert _dispatch.kernel_backend("kdcore::distill", cpu) == "triton"
        assert _dispatch.kernel_backend("kdcore::distill", cuda) == "triton"
        return
    with _dispatch.backend("triton"), pytest.raises(RuntimeError, match="triton is not installed"):
        _dispatch.select(cpu)
    with pytest.raises(RuntimeError, match="kdcore::distill on CUDA tensors needs the Triton"):
        _dispatch.kernel_backend("kdcore::distill", cuda)
