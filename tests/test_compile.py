"""torch.compile with the stepflow ops: fake kernels that match the kernels, equal to eager (issue 15).

The fake kernels (stepflow_ext/ops.py) must report the shapes, dtypes and strides the kernels
return (contiguous, whatever the strides of q, k, v or h: HF's q and k after RoPE are not
contiguous), or inductor's code reads the outputs wrongly. Here, on the CPU with the default
inductor backend: the op wrappers compile with fullgraph=True (they read no tensor values, so
there is no graph break) on non-contiguous inputs, forward and backward equal eager; and
torch.compile(model) of a Hugging Face model under replace_attention (the public API, a
teacher-forced pass with both OEB and SMI) equals the eager model under StepFlow.
Inductor compiles slowly on a busy CPU (minutes): the "earlier" model variant is marked slow.
"""
from __future__ import annotations

import pytest
import torch

import stepflow_ext as sf
from stepflow_ext import ops, reference
from hf_models import model as make_model, tokenizer as make_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5, msg=lambda m: f"{what}: {m}")


def oeb_inputs(seed=0):
    """Decode-chunk inputs, q and k as HF hands them over after RoPE: transposed views."""
    torch.manual_seed(seed)
    b, h, hkv, tq, tk, d = 2, 4, 2, 5, 11, 16
    q = torch.randn(b, tq, h, d).transpose(1, 2).requires_grad_()
    k = torch.randn(b, tk, hkv, d).transpose(1, 2).requires_grad_()
    v = torch.randn(b, hkv, tk, d, requires_grad=True)
    seg_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3], [-1, -1, 0, 0, 1, 1, 1, 2, 2, 2, 3]])
    kinds = torch.tensor([[0, 1, 1, 2], [0, 1, 1, 2]])
    bounds = reference.oeb_bounds(seg_ids, kinds, "bridge")[:, tk - tq:].contiguous()
    kv_start = (seg_ids < 0).sum(1)
    return q, k, v, kv_start, bounds


def test_ops_compile_fullgraph_and_equal_eager():
    """Every op wrapper in one function (one inductor compile): oeb_attention on transposed q, k (as
    after RoPE) with a sink and a window, smi_value, step_momentum on a transposed h,
    step_saliency_pool on transposed inputs, step_momentum_decode_ (a mutating op) on a strided
    chunk; forward and backward equal eager, and the decode state advances as in eager."""
    q, k, v, kv_start, bounds = oeb_inputs()
    sink = torch.randn(4, requires_grad=True)
    h = torch.randn(2, 7, 16).transpose(1, 2).requires_grad_()  # (2, 16, 7), not contiguous
    seg_ids = torch.tensor([[0] * 4 + [1] * 5 + [2] * 4 + [3] * 3, [-1] * 3 + [0] * 5 + [1] * 8])
    kinds = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 1]])
    windows = torch.tensor([[[2, 5], [-1, -1], [3, 4], [-1, -1], [6, 10]], [[-1, -1], [3, 7], [-1, -1], [1, 2],
                                                                          [-1, -1]]])
    t = 12
    sq, sdo = (torch.randn(1, t, 4, 16).transpose(1, 2) for _ in range(2))
    sk, sv = (torch.randn(1, t, 2, 16).transpose(1, 2) for _ in range(2))
    s_seg = torch.tensor([[0] * 4 + [1] * 5 + [2] * 3])
    i = torch.arange(t)
    ob = torch.stack([torch.zeros_like(i), torch.minimum(i + 1, torch.tensor(4))], -1)[None]
    chunk = torch.randn(2, 8, 4).transpose(1, 2)  # (2, 4, 8), not contiguous
    c_seg = torch.tensor([[0, 0, 1, 1], [-1, 0, 0, 1]])

    def f(q, k, v, sink, h, state):
        out, lse, stats = ops.oeb_attention(q, k, v, kv_start, bounds, "bridge", 0.7, sink=sink, window=9)
        out = ops.smi_value(out.transpose(1, 2), v, windows, 0.5, 4)  # (B, Tq, H, d)
        y = ops.step_momentum(h, seg_ids, kinds, 0.9, 0.3) * 1.5
        m = ops.step_saliency_pool(sq, sk, sv, sdo, s_seg, 3, 0.25, "abs_mean", oeb_bounds=ob, sink=sink.detach())
        z = ops.step_momentum_decode_(chunk, c_seg, kinds, state, 0.9, 0.4)
        return out * 2.0, lse, stats, y, m, z + 1.0

    compiled = torch.compile(f, fullgraph=True)
    s_got, s_want = ops.new_momentum_state(2, 8), ops.new_momentum_state(2, 8)
    got = compiled(q, k, v, sink, h, s_got)
    want = f(q, k, v, sink, h, s_want)
    for name, x, y in zip(("out", "lse", "stats", "step_momentum", "saliency", "decode"), got, want):
        assert_close(x, y, name)
    for x, y in zip(s_got, s_want):
        assert torch.equal(x, y)
    assert int(want[2][..., 4].sum()) > 0, "the rule changed no row"
    g_out, g_y = torch.randn_like(want[0]), torch.randn_like(want[3])
    leaves = (q, k, v, sink, h)
    g_got = torch.autograd.grad((got[0], got[3]), leaves, (g_out, g_y))
    g_want = torch.autograd.grad((want[0], want[3]), leaves, (g_out, g_y))
    for name, x, y in zip(("dq", "dk", "dv", "dsink", "dh"), g_got, g_want):
        assert_close(x, y, name)


TEXT = ("Question: what is 12 + 7? <think>First, 12 + 7 means adding seven to twelve. So 12 + 7 = 19 and "
        "that is it. Check: 19 - 7 = 12, which matches.</think> The answer is 19.")


@pytest.mark.parametrize("rules", ["paper", pytest.param("earlier", marks=pytest.mark.slow)])
def test_compiled_model_under_stepflow_equals_eager(rules):
    """torch.compile(model) (default inductor, CPU) under replace_attention, teacher-forced with a
    segmentation of the batch (left padded): the logits equal the eager model's under StepFlow.
    A 2-layer model (inductor compiles each piece between graph breaks: the intervention's
    pre-hook reads the mask and the segmentation on the host by design); paper: bridge OEB in
    layer 0, value SMI in layer 1; earlier: odds OEB, residual SMI (step_momentum)."""
    tok = make_tokenizer()
    model = make_model("llama", sharpen=6.0, layers=2)
    if rules == "paper":
        cfg = sf.StepFlowConfig(oeb_layers=(0,), smi_layers=(1,), smi_alpha=0.5)
    else:
        cfg = sf.StepFlowConfig(oeb_layers=(0,), oeb_rule="odds", oeb_strength=0.8, smi_layers=(1,),
                                smi_rule="residual", smi_gamma=0.3)
    rows = [tok(TEXT)["input_ids"], tok(TEXT[10:])["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    prompts = [len(tok(TEXT[:TEXT.index("<think>") + 7])["input_ids"]),
               len(tok(TEXT[10:TEXT.index("<think>") + 7])["input_ids"])]
    seg = sf.segment(ids, prompts, tokenizer=tok, attention_mask=mask)
    with torch.no_grad(), sf.replace_attention(model, cfg) as handle:
        handle.set_segmentation(seg)
        eager = model(ids, attention_mask=mask).logits
        counts = handle.trigger_counts(reset=True)
        compiled = torch.compile(model)
        got = compiled(ids, attention_mask=mask).logits
        compiled_counts = handle.trigger_counts()
    stock = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], eager[valid], atol=1e-4, rtol=1e-4)
    assert float((eager[valid] - stock[valid]).abs().max()) > 1e-3, "StepFlow changed nothing"
    assert counts == compiled_counts
    if rules == "paper":
        assert sum(counts["oeb"].values()) > 0 and sum(counts["smi"].values()) > 0
