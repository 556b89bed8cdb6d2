"""Bad index values on CUDA are device-side asserts (csrc/cuda/device_checks.cuh), not host syncs.

The CUDA kernels check what only the tensors' contents tell (kv_start and bounds ranges, seg ids,
sink logits, the decode state) on the device, so no call copies anything to the host. A failed
check traps: the CUDA context of the process is lost. So each case runs in its own subprocess: a
good call first (it must pass), then the bad one, then a synchronization, which must fail with
"device-side assert triggered" and name the check. Every test needs a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PREAMBLE = """
import torch
from stepflow_ext import ops
D = "cuda"
def oeb_args(bounds=None, kv=None, sink=None, dtype=torch.bfloat16):
    q = torch.randn(2, 4, 6, 64, device=D, dtype=dtype)
    k = torch.randn(2, 2, 6, 64, device=D, dtype=dtype)
    v = torch.randn(2, 2, 6, 64, device=D, dtype=dtype)
    kv = torch.zeros(2, dtype=torch.long, device=D) if kv is None else kv
    bounds = torch.full((2, 6, 2), -1, dtype=torch.long, device=D) if bounds is None else bounds
    return (q, k, v, kv, bounds, "bridge", 0.5, 0.15, 1e-6, sink, -1, 0.125)
def sal_args(seg=None, ob=None):
    q, k, v, dout = (torch.randn(1, 4, 10, 64, device=D, dtype=torch.float16) for _ in range(4))
    k, v = k[:, :2], v[:, :2]
    seg = torch.tensor([[0] * 4 + [1] * 6], device=D) if seg is None else seg
    return (q, k, v, dout, seg, 2, 0.125, "sum_abs", None, None, -1, ob, "bridge", 0.5, 0.15, 1e-6)
"""

# (id, the good call, the bad call, a text the output must contain besides the assert)
CASES = [
    ("oeb-kv_start<0", "torch.ops.stepflow.oeb_attention(*oeb_args())",
     "torch.ops.stepflow.oeb_attention(*oeb_args(kv=torch.tensor([-1, 0], device=D)))", "kv_start"),
    ("oeb-bounds-a>b", "ops.oeb_attention(*oeb_args()[:5])",
     "ops.oeb_attention(*oeb_args(bounds=torch.tensor([[[3, 2]] * 6, [[-1, -1]] * 6], device=D))[:5])", "bounds"),
    ("oeb-sink-inf", "torch.ops.stepflow.oeb_attention(*oeb_args(sink=torch.zeros(4, device=D)))",
     "torch.ops.stepflow.oeb_attention(*oeb_args(sink=torch.tensor([0., float('inf'), 0., 0.], device=D)))",
     "sink"),
    ("oeb-backward-bounds", "a = oeb_args(); o, l, s = torch.ops.stepflow.oeb_attention(*a)",
     "a = oeb_args(bounds=torch.tensor([[[0, 7]] * 6, [[-1, -1]] * 6], device=D)); "
     "torch.ops.stepflow.oeb_attention_backward(torch.ones_like(o), *a[:3], l, s, *a[3:])", "bounds"),
    ("saliency-seg>=S", "torch.ops.stepflow.step_saliency_pool(*sal_args())",
     "torch.ops.stepflow.step_saliency_pool(*sal_args(seg=torch.tensor([[0] * 4 + [2] * 6], device=D)))",
     "seg_ids"),
    ("saliency-padding-inside", "i = torch.arange(10, device=D); ob = torch.stack([i, i + 1], -1)[None]; "
     "torch.ops.stepflow.step_saliency_pool(*sal_args(ob=ob))",
     "torch.ops.stepflow.step_saliency_pool(*sal_args(seg=torch.tensor([[0] * 4 + [-1] + [1] * 5], device=D), ob=ob))",
     "padding"),
    ("momentum-decreasing", "h = torch.randn(1, 100, 8, device=D); k = torch.tensor([[0, 1, 2]], device=D); "
     "s = torch.tensor([[0] * 50 + [1] * 50], device=D); ops.step_momentum(h, s, k)",
     "ops.step_momentum(h, s.flip(1), k)", "step_momentum"),
    ("decode-goes-back", "h = torch.randn(1, 5, 8, device=D); k = torch.tensor([[0, 1, 2]], device=D); "
     "s = torch.tensor([[0, 0, 1, 1, 2]], device=D); st = ops.new_momentum_state(1, 8, D); "
     "ops.step_momentum_decode_(h[:, :3], s[:, :3], k, st)",
     "ops.step_momentum_decode_(h[:, :1], s[:, :1], k, st)", "step_momentum_decode_"),
    ("smi_value-window", "a = torch.randn(1, 1, 4, 8, device=D); v = torch.randn(1, 2, 10, 8, device=D); "
     "ops.smi_value(a, v, torch.tensor([[[2, 5]]], device=D), 0.5, 4)",
     "ops.smi_value(a, v, torch.tensor([[[2, 9]]], device=D), 0.5, 4)", "smi_value"),
]


def script(good, bad):
    return PREAMBLE + textwrap.dedent(f"""
    {good}
    torch.cuda.synchronize()
    print("GOOD-PASSED", flush=True)
    {bad}
    torch.cuda.synchronize()
    print("BAD-PASSED", flush=True)
    """)


@pytest.fixture(scope="module")
def outcomes():
    """All cases at once, one process each (each pays the CUDA start-up; together they overlap)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {name: subprocess.Popen([sys.executable, "-c", script(good, bad)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for name, good, bad, _ in CASES}
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_values_are_device_asserts(case, outcomes):
    name, _, _, text = case
    returncode, stdout, stderr = outcomes[name]
    out = stdout + stderr
    assert "GOOD-PASSED" in stdout, out[-3000:]
    assert returncode != 0 and "BAD-PASSED" not in stdout, out[-3000:]
    assert "device-side assert" in out, out[-3000:]
    assert text in out or "device_checks" in out or "_assert_async" in out, out[-3000:]
