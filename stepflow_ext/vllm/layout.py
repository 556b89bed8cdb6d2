"""One request's keys and values, read from vLLM's paged KV cache as (1, H_kv, T, d).

CPU (CPU_ATTN): each (block, KV head) holds block_size keys then block_size values, each in an
ISA-dependent order inside its block_size x d slot (keys may be stored transposed or packed for
AMX). Rather than hard-coding each order, the order is read once per (ISA, dtype, block size, head
size) by writing probe keys and values with the backend's own `do_kv_cache_update` into a one-block
scratch cache: the probes carry their token and dimension index as values, so the scratch tells
where every (token, dim) element lands. A gather index then reads any block in logical order. An
order that is not a permutation (a quantized cache) is refused.

CUDA (FlashAttention): logically (num_blocks, H_kv, block_size, 2 d), keys then values in the last dim
(as vLLM 0.32's FlashAttentionImpl splits it; untested: no GPU run).
"""
from __future__ import annotations

import torch

_ORDERS: dict = {}


def _where(impl, layer, block_size, d, dtype, fill):
    """Write a probe whose element (t, j) is fill(t, j) (exact small integers) into a scratch block;
    return the key and value slots as flat tensors of block_size * d values."""
    t = torch.arange(block_size, dtype=torch.float32)[:, None].expand(block_size, d)
    j = torch.arange(d, dtype=torch.float32)[None, :].expand(block_size, d)
    probe = fill(t, j).to(dtype).reshape(block_size, 1, d).contiguous()
    scratch = torch.zeros(1, 1, block_size, 2 * d, dtype=dtype)
    slots = torch.arange(block_size, dtype=torch.long)
    impl.do_kv_cache_update(layer, probe, probe.clone(), scratch, slots)
    flat = scratch.reshape(2, block_size * d).float()
    return flat[0], flat[1]


def _cpu_order(impl, layer, block_size, d, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(key index, value index): logical element t * d + j of a block is slot element index[t * d + j]."""
    key = (getattr(layer, "isa", None), dtype, block_size, d)
    if key not in _ORDERS:
        if getattr(impl, "is_fp8_kv_cache", False):
            raise ValueError("StepFlow under vLLM reads keys and values from the KV cache: a quantized (fp8) cache "
                             "is not supported; start the engine with kv_cache_dtype='auto'")
        # token and dimension index (+1, so that 0 means "not written"), each in two probes (i mod 128 and
        # i div 128): bf16 holds integers exactly only up to 256.
        probes = [_where(impl, layer, block_size, d, dtype, f) for f in (
            lambda t, j: t % 128 + 1, lambda t, j: t // 128 + 1, lambda t, j: j % 128 + 1, lambda t, j: j // 128 + 1)]
        orders = []
        for part in (0, 1):     # keys, values
            t_lo, t_hi, j_lo, j_hi = (p[part] for p in probes)
            ok = bool(((t_lo >= 1) & (t_hi >= 1) & (j_lo >= 1) & (j_hi >= 1)).all())
            logical = (((t_hi - 1) * 128 + t_lo - 1) * d + (j_hi - 1) * 128 + j_lo - 1).long()
            index = torch.full((block_size * d,), -1, dtype=torch.long)
            if ok:
                index[logical.clamp(0, block_size * d - 1)] = torch.arange(block_size * d)
            if not ok or bool((index < 0).any()):
                raise ValueError(f"StepFlow cannot read this KV cache layout (ISA {key[0]!r}, {dtype}, block size "
                                 f"{block_size}, head size {d}): the probe did not land as a permutation")
            orders.append(index)
        _ORDERS[key] = tuple(orders)
    return _ORDERS[key]


def cpu_gather(impl, layer, kv_cache, block_ids, length):
    """Keys and values (1, H_kv, length, d) of the request whose block table row is block_ids."""
    num_blocks, heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    kidx, vidx = _cpu_order(impl, layer, block_size, d, kv_cache.dtype)
    used = (length + block_size - 1) // block_size
    blocks = block_ids[:used].to(torch.long)
    slots = kv_cache.view(num_blocks, heads, 2, block_size * d).index_select(0, blocks)   # (nb, H_kv, 2, bs*d)

    def logical(part, index):
        x = part.index_select(-1, index).view(used, heads, block_size, d)
        return x.permute(1, 0, 2, 3).reshape(heads, used * block_size, d)[:, :length].unsqueeze(0).contiguous()

    return logical(slots[:, :, 0], kidx), logical(slots[:, :, 1], vidx)


def flash_gather(kv_cache, block_ids, length):
    """FlashAttention's cache, logically (num_blocks, H_kv, block_size, 2 d): keys in the first d channels,
    values in the last d (its forward splits it so; the physical stride order may differ, indexing
    follows the strides)."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
        raise ValueError(f"StepFlow expects FlashAttention's (blocks, H_kv, block_size, 2 d) KV cache, got "
                         f"{tuple(kv_cache.shape)}")
    _, heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    used = (length + block_size - 1) // block_size
    slots = kv_cache.index_select(0, block_ids[:used].to(torch.long))     # (nb, H_kv, bs, 2 d)

    def logical(part):
        return part.permute(1, 0, 2, 3).reshape(heads, used * block_size, d)[:, :length].unsqueeze(0).contiguous()

    return logical(slots[..., :d]), logical(slots[..., d:])
