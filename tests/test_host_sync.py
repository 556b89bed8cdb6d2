"""The ops' per-token path issues no host synchronization (issue 15, docs/method_kernels.md).

On CUDA a read of a tensor's value on the host (.item(), .tolist(), .cpu(), bool(t), int(t),
float(t), .numpy(), nonzero(), .to("cpu")) waits for the GPU: once per OEB / SMI layer and token
it stalls decoding and makes CUDA-graph capture impossible. These tests run on the CPU, where
the same Python code runs, and count such reads made while a stepflow op wrapper
(stepflow_ext.ops) is on the stack: a decode step of a model under StepFlow must make none. The
kernels check tensor values themselves (the CPU kernels on the host, free there; the CUDA kernels
on the device). The reads the intervention makes outside the ops (its step tracker reads token
ids on the host by design, to detokenize) are counted and printed, not asserted.

A static guard covers the CUDA host code, which cannot run here: every device-to-host copy or
synchronization in csrc/cuda/*.cu must be on a line marked "sync-ok" (the float64 and
deterministic fallbacks that run the CPU kernel on host copies).
"""
from __future__ import annotations

import contextlib
import pathlib
import re

import pytest
import torch

import stepflow_ext as sf
from stepflow_ext import ops
from hf_models import model as make_model, tokenizer as make_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Tensor methods that read values on the host (a device sync for a CUDA tensor).
READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
# The op wrappers of the per-token path (and the other public ops, which must not read either).
WRAPPERS = ("oeb_attention", "step_momentum_decode_", "step_momentum", "smi_value", "step_saliency_pool",
            "new_momentum_state")


class HostReads:
    """Counts host reads of tensor values, split by whether an op wrapper is on the stack."""

    def __init__(self):
        self.inside, self.outside, self.calls, self.depth = [], [], {}, 0

    def record(self, what):
        (self.inside if self.depth else self.outside).append(what)


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    reads = HostReads()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.record(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            reads.record("to(cpu)")
        return original_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to)
    for name in WRAPPERS:
        original = getattr(ops, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            reads.calls[_name] = reads.calls.get(_name, 0) + 1
            reads.depth += 1
            try:
                return _original(*args, **kwargs)
            finally:
                reads.depth -= 1
        monkeypatch.setattr(ops, name, wrapped)
    try:
        yield reads
    finally:
        monkeypatch.undo()


def test_the_counter_sees_reads(monkeypatch):
    stats = torch.zeros(1, 2, 3, 5)
    with count_host_reads(monkeypatch) as reads:
        ops.active_count(stats)  # int(stats[..., 4].sum()): a read, outside the wrappers listed
        with contextlib.suppress(ValueError):
            ops.oeb_attention(torch.zeros(1, 1, 1, 300), torch.zeros(1, 1, 1, 300), torch.zeros(1, 1, 1, 300),
                              torch.zeros(1, dtype=torch.long), torch.full((1, 1, 2), -1))
    assert reads.outside == ["__int__"] and reads.inside == [] and reads.calls == {"oeb_attention": 1}


def decode_case():
    torch.manual_seed(0)
    b, h, hkv, tk, d = 2, 4, 2, 40, 16
    q = torch.randn(b, hkv, 2, 1, d).transpose(1, 2).reshape(b, h, 1, d)
    k, v = torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)
    kv_start = torch.tensor([0, 7])
    bounds = torch.tensor([[[3, 30]], [[7, 20]]])
    return q, k, v, kv_start, bounds


@pytest.mark.parametrize("rule", ["bridge", "odds"])
def test_op_wrappers_make_no_host_reads(monkeypatch, rule):
    """Each op wrapper of a decode step, called as the intervention calls it (and the prefill ops)."""
    q, k, v, kv_start, bounds = decode_case()
    seg_ids, seg_kinds = torch.tensor([[3], [1]]), torch.tensor([[0, 1, 1, 1], [0, 1, 2, 1]])
    hidden = torch.randn(2, 1, 8)
    with count_host_reads(monkeypatch) as reads:
        ops.oeb_attention(q, k, v, kv_start, bounds, rule, 0.5, sink=torch.zeros(4), window=30)
        state = ops.new_momentum_state(2, 8)
        ops.step_momentum_decode_(hidden, seg_ids, seg_kinds, state, 0.9, 0.05)
        ops.smi_value(q.transpose(1, 2), v, torch.tensor([[[2, 5]], [[-1, -1]]]), 0.5, 4)
        ops.step_momentum(torch.randn(2, 5, 8), torch.tensor([[0, 0, 1, 1, 2]] * 2), seg_kinds, 0.9, 0.05)
        t = 12
        ops.step_saliency_pool(torch.randn(1, 4, t, 16), torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16),
                               torch.randn(1, 4, t, 16), torch.tensor([[0] * 4 + [1] * 8]), 2, 0.25, "abs_mean",
                               oeb_bounds=torch.full((1, t, 2), -1), sink=torch.zeros(4), window=8)
    assert reads.inside == [], f"host reads inside the op wrappers: {reads.inside}"
    assert set(reads.calls) == set(WRAPPERS)


@pytest.mark.parametrize("rules", ["paper", "earlier"])
def test_decode_step_under_stepflow_makes_no_host_reads_in_the_ops(monkeypatch, rules, capsys):
    """Decode steps of a model under StepFlow: the op wrappers read nothing on the host. Paper: bridge
    OEB and value SMI (smi_value); earlier: the odds rule and residual SMI (step_momentum_decode_)."""
    tok = make_tokenizer()
    model = make_model("qwen2", sharpen=6.0)
    if rules == "paper":
        cfg = sf.StepFlowConfig.default_for(model)
    else:
        cfg = sf.StepFlowConfig(oeb_layers=(0, 1), oeb_rule="odds", oeb_strength=0.8, smi_layers=(2, 3),
                                smi_rule="residual", smi_gamma=0.3)
    prompt = tok(["Question: what is 12 + 7? <think>"], return_tensors="pt")
    steps = tok("First, 12 + 7 means adding seven to twelve. So it is 19.</think> 19")["input_ids"]
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok) as handle:
        out = model(**prompt, use_cache=True)
        cache, mask = out.past_key_values, prompt["attention_mask"]
        per_step = []
        with count_host_reads(monkeypatch) as reads:
            for t in steps:
                before = len(reads.outside)
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
                out = model(torch.tensor([[t]]), attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                per_step.append(len(reads.outside) - before)
        counts = handle.trigger_counts()
    assert reads.inside == [], f"host reads inside the op wrappers during decode: {reads.inside}"
    used = {"oeb_attention", "smi_value"} if rules == "paper" else {"oeb_attention", "step_momentum_decode_"}
    assert used <= set(reads.calls), reads.calls
    assert sum(counts["oeb"].values()) >= 0
    kinds = sorted(set(reads.outside))
    with capsys.disabled():
        print(f"\n  {rules}: {len(steps)} decode steps, op calls {reads.calls}; host reads outside the ops "
              f"(the intervention's tracking): {min(per_step)}-{max(per_step)} per step, kinds {kinds}")


# Device-to-host copies and synchronizations in CUDA host code.
SYNC = re.compile(r"(\.|->)(cpu\(\)|item<|item\(|tolist\(|nonzero\()|at::kCPU|cudaMemcpy\(|cudaDeviceSynchronize"
                  r"|cudaStreamSynchronize|device_synchronize")


def test_cuda_host_code_has_no_unmarked_syncs():
    """A "sync-ok" comment allows the statement it is on, or the statement that follows it."""
    lines = []
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + sorted((ROOT / "csrc" / "cuda").glob("*.cuh")):
        allowed = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0].rstrip()
            allowed = allowed or "sync-ok" in line
            if SYNC.search(code) and not allowed:
                lines.append(f"{path.name}:{n}: {line.strip()}")
            if code.endswith((";", "{", "}")):
                allowed = False
    assert not lines, "device-to-host copies in CUDA host code (mark the fallbacks 'sync-ok'):\n" + "\n".join(lines)
