"""The CUDA kernel path switches (docs/method_kernels.md, "Kernel paths and their switches"):
their environment variables, ops.kernel_paths, and that the CPU ops do not depend on them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from stepflow_ext import _C, ops

DEFAULTS = {"pool_split": -1, "pool_pipeline": 1, "oeb_ldmatrix": 1, "oeb_tile_fast": 1, "oeb_bn": 0}
ENV = {"pool_split": "STEPFLOW_POOL_SPLIT", "pool_pipeline": "STEPFLOW_POOL_PIPELINE",
       "oeb_ldmatrix": "STEPFLOW_OEB_LDMATRIX", "oeb_tile_fast": "STEPFLOW_OEB_TILE_FAST", "oeb_bn": "STEPFLOW_OEB_BN"}


def _paths_in_subprocess(env):
    code = "import stepflow_ext, json; from stepflow_ext import _C; print(json.dumps(dict(_C._kernel_paths())))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEPFLOW_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)


def test_defaults_and_context_manager():
    if any(v in os.environ for v in ENV.values()):
        pytest.skip("a STEPFLOW_* kernel path variable is set in this environment")
    assert dict(_C._kernel_paths()) == DEFAULTS
    with ops.kernel_paths(pool_split=0, oeb_ldmatrix=0, oeb_bn=64) as now:
        assert now == {**DEFAULTS, "pool_split": 0, "oeb_ldmatrix": 0, "oeb_bn": 64}
        with ops.kernel_paths(pool_split=3):
            assert _C._kernel_paths()["pool_split"] == 3
        assert _C._kernel_paths()["pool_split"] == 0
    assert dict(_C._kernel_paths()) == DEFAULTS
    with pytest.raises(ValueError, match="unknown kernel path"):
        with ops.kernel_paths(no_such_path=1):
            pass
    for bad in ({"oeb_bn": 48}, {"oeb_ldmatrix": 2}, {"pool_split": -2}):
        with pytest.raises(ValueError, match="out of range"):
            with ops.kernel_paths(**bad):
                pass
        assert dict(_C._kernel_paths()) == DEFAULTS     # a refused value changes nothing


def test_environment_is_read_at_import():
    got = _paths_in_subprocess({"STEPFLOW_POOL_SPLIT": "0", "STEPFLOW_OEB_LDMATRIX": "0", "STEPFLOW_OEB_BN": "64",
                                "STEPFLOW_OEB_TILE_FAST": "0", "STEPFLOW_POOL_PIPELINE": "0"})
    assert got.returncode == 0, got.stderr
    import json
    assert json.loads(got.stdout) == {"pool_split": 0, "pool_pipeline": 0, "oeb_ldmatrix": 0, "oeb_tile_fast": 0,
                                      "oeb_bn": 64}
    assert json.loads(_paths_in_subprocess({"STEPFLOW_POOL_SPLIT": "auto"}).stdout)["pool_split"] == -1
    bad = _paths_in_subprocess({"STEPFLOW_OEB_BN": "48"})
    assert bad.returncode != 0 and "STEPFLOW_OEB_BN=48" in bad.stderr


def test_cpu_ops_ignore_the_switches():
    torch.manual_seed(0)
    q, k, v, o = (torch.randn(1, 4, 70, 16) for _ in range(4))
    k, v = k[:, :2], v[:, :2]
    seg = torch.arange(70).div(10, rounding_mode="floor")[None]
    want = ops.step_saliency_pool(q, k, v, o, seg, 7, 0.25)
    kv, bounds = torch.zeros(1, dtype=torch.long), torch.full((1, 70, 2), -1, dtype=torch.long)
    out = ops.oeb_attention(q, k, v, kv, bounds)[0]
    with ops.kernel_paths(pool_split=1, oeb_ldmatrix=0, oeb_tile_fast=0, oeb_bn=64, pool_pipeline=0):
        assert torch.equal(ops.step_saliency_pool(q, k, v, o, seg, 7, 0.25), want)
        assert torch.equal(ops.oeb_attention(q, k, v, kv, bounds)[0], out)
