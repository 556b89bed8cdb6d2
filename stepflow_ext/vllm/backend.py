"""The attention backends of the plugin: the platform's own, with StepFlow on the steered requests.

Each layer first runs the platform's attention on the whole batch (so unsteered requests are
bit-identical to stock vLLM). Then, for every steered request whose config names this layer:
- OEB (oeb_layers): the request's keys and values are gathered from the paged KV cache (layout.py)
  and `ops.oeb_attention` recomputes the rows of its thinking and summary tokens (question tokens
  keep the platform's output: OEB leaves them as they are); the rows are written back in place.
- SMI value (smi_layers): `ops.smi_value` adds the previous step's mean value vector to the rows of
  step starts (after OEB when the layer runs both, as in replace_attention).
This recomputation is for correctness first: a paged three-state kernel is the later GPU step.
"""
from __future__ import annotations

import functools

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .. import ops
from . import layout, plugin


def _layer_index(layer) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer.layer_name)


def apply_stepflow(impl, layer, query, kv_cache, attn_metadata, output, gather) -> None:
    """Edit `output` (num_tokens, H * d or H, d) rows of the steered requests of this step."""
    step = plugin.STEP
    if not step or attn_metadata is None or impl.attn_type != AttentionType.DECODER:
        return
    with torch.inference_mode():    # vLLM's tensors (the KV cache, the batch's buffers) are inference tensors
        _apply(impl, layer, query, kv_cache, attn_metadata, output, gather, step)


def _apply(impl, layer, query, kv_cache, attn_metadata, output, gather, step):
    index = getattr(layer, "_stepflow_layer", None)
    if index is None:
        index = layer._stepflow_layer = _layer_index(layer)
    heads, d = impl.num_heads, impl.head_size
    for p in step:
        c = p.config
        n = p.stop - p.start
        oeb = index in c.oeb_layers and p.first_oeb < n
        smi = index in c.smi_layers and p.any_smi
        if not (oeb or smi):
            continue
        if impl.sliding_window not in (None, -1):
            raise ValueError(f"StepFlow under vLLM does not support sliding-window layers yet (layer {index} has a "
                             f"window of {impl.sliding_window}, whose paged cache may have dropped keys): leave it out "
                             "of oeb_layers / smi_layers")
        k_all, v_all = gather(kv_cache, attn_metadata.block_table[p.row], p.past + n)
        rows = output[p.start:p.stop].view(n, heads, d)
        if oeb:
            j = p.first_oeb
            q = query[p.start + j:p.stop].view(n - j, heads, d).transpose(0, 1).unsqueeze(0)
            sink = impl.sinks.float() if getattr(impl, "sinks", None) is not None else None
            kv_start = torch.zeros(1, dtype=torch.long, device=q.device)
            out, _, stats = ops.oeb_attention(q, k_all, v_all, kv_start, p.bounds[:, j:].to(q.device), c.oeb_rule,
                                              c.oeb_strength, c.oeb_tau_max, ops.OEB_EPS, sink=sink, scale=impl.scale)
            rows[j:] = out[0].transpose(0, 1).to(rows.dtype)
            _count("oeb", index, stats[..., 4].sum())
        if smi:
            windows = p.windows.to(rows.device)
            rows.copy_(ops.smi_value(rows.unsqueeze(0), v_all, windows, c.smi_alpha, c.smi_window)[0])
            _count("smi", index, (p.windows[..., 0] >= 0).sum())


def _count(kind, layer, n):
    key = (kind, layer)
    plugin.COUNTS[key] = plugin.COUNTS.get(key, 0) + int(n)


class _StepFlowForward:
    """Mixed in before a platform's attention impl: its forward on the whole batch, then StepFlow's
    edits on the steered requests' rows. `_gather(layer)` says how to read the platform's KV cache."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        if plugin.STEP:
            apply_stepflow(self, layer, query, kv_cache, attn_metadata, output, self._gather(layer))
        return result


# --------------------------------------------------------------------------- CPU


class StepFlowCPUImpl(_StepFlowForward, CPUAttentionBackendImpl):
    def _gather(self, layer):
        return lambda cache, blocks, length: layout.cpu_gather(self, layer, cache, blocks, length)


class StepFlowCPUBackend(CPUAttentionBackend):
    """vLLM's CPU_ATTN with StepFlow on steered requests (registered in its slot by the plugin)."""

    @staticmethod
    def get_impl_cls():
        return StepFlowCPUImpl


# --------------------------------------------------------------------------- CUDA (untested: no GPU run yet)


@functools.lru_cache(maxsize=1)
def _flash_classes():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

    class StepFlowFlashImpl(_StepFlowForward, FlashAttentionImpl):
        def _gather(self, layer):
            return layout.flash_gather

    class StepFlowFlashBackend(FlashAttentionBackend):
        """FlashAttention with StepFlow on steered requests (vLLM's CUSTOM slot). CUDA graphs capture
        attention in FlashAttention's metadata builder; this backend's builder declares NEVER, so that
        vLLM falls back to piecewise graphs with attention run eagerly (the plugin's edits are Python)."""

        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return StepFlowFlashImpl

        @staticmethod
        def get_builder_cls():
            from vllm.v1.attention.backend import AttentionCGSupport
            from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

            class Builder(FlashAttentionMetadataBuilder):
                _cudagraph_support = AttentionCGSupport.NEVER

            return Builder

    return StepFlowFlashBackend


def __getattr__(name):
    if name == "StepFlowFlashBackend":   # imported only where vLLM's FlashAttention backend exists
        return _flash_classes()
    raise AttributeError(name)
