"""Every op under torch.inference_mode(), with worker threads (vLLM runs the model in inference mode;
so may a user's generate). The CPU kernels call ATen on tiles inside at::parallel_for, whose workers
start without the caller's inference mode: without csrc/include/parallel.h they raise "Inplace update
to inference tensor outside InferenceMode". The results must equal those outside inference mode."""
import pytest
import torch

from stepflow_ext import ops, reference


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)   # the failure needs worker threads; CI machines may report one core
    yield
    torch.set_num_threads(before)


def _inputs(t=300, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([[0] * 50 + [1] * 100 + [2] * (t - 150)])
    kinds = torch.tensor([[0, 1, 2]])
    q = torch.randn(1, 4, t, 32, generator=g, dtype=dtype)
    k = torch.randn(1, 2, t, 32, generator=g, dtype=dtype)
    v = torch.randn(1, 2, t, 32, generator=g, dtype=dtype)
    return seg, kinds, q, k, v


@pytest.mark.parametrize("rule", ["bridge", "odds"])
@pytest.mark.parametrize("decode", [False, True])
def test_oeb_attention_in_inference_mode(rule, decode):
    seg, kinds, q, k, v = _inputs()
    bounds = reference.oeb_bounds(seg, kinds, rule)
    kv = torch.zeros(1, dtype=torch.long)
    if decode:
        q, bounds = q[:, :, -3:], bounds[:, -3:]
    expect = ops.oeb_attention(q, k, v, kv, bounds, rule, 0.5)
    with torch.inference_mode():
        got = ops.oeb_attention(q.clone(), k.clone(), v.clone(), kv, bounds, rule, 0.5)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pool_and_momentum_in_inference_mode():
    seg, kinds, q, k, v = _inputs()
    grad = torch.randn_like(q)
    h = torch.randn(1, q.shape[2], 64)
    expect = (ops.step_saliency_pool(q, k, v, grad, seg, 3, 32 ** -0.5, "abs_mean"),
              ops.step_momentum(h, seg, kinds), ops.smi_value(q.transpose(1, 2), v, torch.full((1, q.shape[2], 2), -1), 0.06, 4))
    with torch.inference_mode():
        got = (ops.step_saliency_pool(q.clone(), k.clone(), v.clone(), grad.clone(), seg, 3, 32 ** -0.5, "abs_mean"),
               ops.step_momentum(h.clone(), seg, kinds),
               ops.smi_value(q.transpose(1, 2).clone(), v.clone(), torch.full((1, q.shape[2], 2), -1), 0.06, 4))
        state = ops.new_momentum_state(1, 64)
        ops.step_momentum_decode_(h.clone(), seg, kinds, state)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
