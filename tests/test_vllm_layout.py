"""stepflow_ext.vllm.layout without vLLM: reading one request's keys and values out of a paged cache.

The CPU layout is learned by probing the backend's own do_kv_cache_update; here fake backends store
keys transposed (as vLLM's "vec" ISA does) or in plain order, and one writes a lossy layout, which
must be refused. FlashAttention's layout is read directly. Each gather is checked against the keys and
values written, over random block tables, lengths that end inside a block, GQA and dtypes."""
import pytest
import torch

from stepflow_ext.vllm import layout


class FakeImpl:
    """do_kv_cache_update of a backend whose (block, head) slot holds keys as `order` says and values plain."""

    def __init__(self, order="transposed"):
        self.order, self.is_fp8_kv_cache = order, False

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        blocks, heads, bs, two_d = kv_cache.shape
        d = two_d // 2
        slots = kv_cache.view(blocks, heads, 2, bs * d)
        for i, s in enumerate(slot_mapping.tolist()):
            b, t = divmod(s, bs)
            for h in range(heads):
                if self.order == "transposed":      # d x bs
                    slots[b, h, 0].view(d, bs)[:, t] = key[i, h]
                elif self.order == "plain":
                    slots[b, h, 0].view(bs, d)[t] = key[i, h]
                else:                               # lossy: every other channel dropped
                    slots[b, h, 0].view(bs, d)[t, ::2] = key[i, h, ::2]
                slots[b, h, 1].view(bs, d)[t] = value[i, h]


class Layer:
    isa = "fake"


def _paged(impl, heads, d, bs, blocks, length, dtype, g):
    """A cache with one request's K/V written at random blocks; returns (cache, block row, K, V)."""
    cache = torch.zeros(blocks, heads, bs, 2 * d, dtype=dtype)
    row = torch.randperm(blocks, generator=g)[: (length + bs - 1) // bs].to(torch.int32)
    k = torch.randn(length, heads, d, generator=g).to(dtype)
    v = torch.randn(length, heads, d, generator=g).to(dtype)
    slots = torch.tensor([int(row[t // bs]) * bs + t % bs for t in range(length)])
    impl.do_kv_cache_update(Layer(), k, v, cache, slots)
    return cache, torch.cat([row, torch.full((3,), -1, dtype=torch.int32)]), k, v


@pytest.mark.parametrize("order", ["transposed", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 31, 32, 77, 300])
def test_cpu_gather_learns_the_layout(order, dtype, length, seed):
    layout._ORDERS.clear()
    g = torch.Generator().manual_seed(seed)
    impl = FakeImpl(order)
    bs = 32 if length < 300 else 288   # a block longer than bf16's exact integers
    cache, row, k, v = _paged(impl, 2, 32, bs, 6, length, dtype, g)
    gk, gv = layout.cpu_gather(impl, Layer(), cache, row, length)
    assert gk.shape == (1, 2, length, 32)
    assert torch.equal(gk[0], k.transpose(0, 1)) and torch.equal(gv[0], v.transpose(0, 1))


def test_cpu_gather_refuses_a_layout_that_is_not_a_permutation(seed):
    layout._ORDERS.clear()
    g = torch.Generator().manual_seed(seed)
    impl = FakeImpl("lossy")
    cache, row, _, _ = _paged(impl, 1, 32, 32, 2, 10, torch.float32, g)
    with pytest.raises(ValueError, match="not land as a permutation"):
        layout.cpu_gather(impl, Layer(), cache, row, 10)


@pytest.mark.parametrize("length", [1, 16, 50])
def test_flash_gather(length, seed):
    g = torch.Generator().manual_seed(seed)
    heads, bs, d, blocks = 2, 16, 8, 8
    cache = torch.zeros(blocks, heads, bs, 2 * d)
    row = torch.randperm(blocks, generator=g)[: (length + bs - 1) // bs]
    k, v = torch.randn(length, heads, d, generator=g), torch.randn(length, heads, d, generator=g)
    for t in range(length):
        cache[row[t // bs], :, t % bs, :d], cache[row[t // bs], :, t % bs, d:] = k[t], v[t]
    gk, gv = layout.flash_gather(cache, row.to(torch.int32), length)
    assert torch.equal(gk[0], k.transpose(0, 1)) and torch.equal(gv[0], v.transpose(0, 1))
    with pytest.raises(ValueError, match="FlashAttention"):
        layout.flash_gather(torch.zeros(2, blocks, bs, heads, d), row, length)
