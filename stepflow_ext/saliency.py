"""step_saliency(model, ...): Step-Saliency maps of a Hugging Face causal LM (design.md 2.2).

One forward and one backward of the model with its own attention kernel. At every layer the
attention function is wrapped: it keeps references to q, k, v (which autograd keeps anyway)
and hooks the gradient at the attention output; when that gradient arrives in the backward
pass, `step_saliency_pool` reduces it to the layer's S x S map at once. No attention matrix is
ever built, and no gradient is left on the weights.
"""
from __future__ import annotations

import contextlib
import functools
import json
import torch
from torch.utils.checkpoint import checkpoint

from . import hf, ops
from .segment import Segmentation

TARGETS = ("summary", "thinking", "generated")
KIND_NAMES = ("question", "step", "summary")


class StepSaliencyResult:
    """Step maps of one or more traces: `maps` (B, L, S, S) fp32 raw sums M^l[a, c] of design.md 2.2."""

    def __init__(self, maps: torch.Tensor, counts: torch.Tensor, kinds: list[list[str]], meta: dict | None = None):
        self.maps, self.counts, self.kinds = maps, counts, kinds
        self.meta = dict(meta or {})

    @property
    def num_layers(self) -> int:
        return self.maps.shape[1]

    def normalized(self, how: str = "row") -> torch.Tensor:
        """'row': each row divided by its sum (R^l[a, c], the share of a's saliency from c);
        'mean': each entry divided by its causal pair count. Empty rows/pairs give 0."""
        if how == "row":
            total = self.maps.sum(-1, keepdim=True)
            return torch.where(total > 0, self.maps / total.clamp_min(1e-30), torch.zeros_like(self.maps))
        if how == "mean":
            counts = self.counts[:, None].to(self.maps.dtype)
            return torch.where(counts > 0, self.maps / counts.clamp_min(1), torch.zeros_like(self.maps))
        raise ValueError(f"how must be 'row' or 'mean', got {how!r}")

    def diagnose(self, recent_window: int = 2, lock_in_margin: float = 0.1, decay_drop: float = 0.25) -> list[dict]:
        """The diagnostics of design.md 2.2, one dict per trace (see stepflow_ext.diagnostics)."""
        from .diagnostics import diagnose

        return diagnose(self, recent_window=recent_window, lock_in_margin=lock_in_margin, decay_drop=decay_drop)

    def plot(self, path, row: int = 0):
        from .plot import plot_result

        return plot_result(self, path, row=row)

    def to(self, *args, **kwargs) -> "StepSaliencyResult":
        return StepSaliencyResult(self.maps.to(*args, **kwargs), self.counts.to(*args, **kwargs), self.kinds, self.meta)

    def save(self, path) -> None:
        """Write `path` (.safetensors with maps and counts) and `path`.json (kinds and metadata)."""
        from safetensors.torch import save_file

        path = str(path)
        save_file({"maps": self.maps.contiguous().cpu(), "counts": self.counts.contiguous().cpu()}, path)
        with open(path + ".json", "w") as f:
            json.dump({"kinds": self.kinds, "meta": self.meta}, f, indent=2, default=str)

    @classmethod
    def load(cls, path) -> "StepSaliencyResult":
        from safetensors.torch import load_file

        path = str(path)
        tensors = load_file(path)
        with open(path + ".json") as f:
            info = json.load(f)
        return cls(tensors["maps"], tensors["counts"], info["kinds"], info.get("meta"))


def causal_pair_counts(seg_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """N[b, a, c] without a T x T matrix: |a|*|c| for c < a, |a|(|a|+1)/2 for c == a (contiguous segments)."""
    b = seg_ids.shape[0]
    sizes = torch.zeros(b, num_segments, dtype=torch.float64)
    valid = seg_ids >= 0
    rows = torch.arange(b)[:, None].expand_as(seg_ids)
    sizes.index_put_((rows[valid], seg_ids[valid].cpu()), torch.ones(int(valid.sum()), dtype=torch.float64),
                     accumulate=True)
    counts = sizes[:, :, None] * sizes[:, None, :]
    counts = torch.tril(counts, diagonal=-1)
    idx = torch.arange(num_segments)
    counts[:, idx, idx] = sizes * (sizes + 1) / 2
    return counts


def target_mask(segmentation: Segmentation, target) -> torch.Tensor:
    """(B, T) bool: the tokens whose log-likelihood forms the loss."""
    seg_ids = segmentation.seg_ids
    if isinstance(target, torch.Tensor):
        if target.dtype != torch.bool or tuple(target.shape) != tuple(seg_ids.shape):
            raise ValueError(f"target mask must be a bool tensor of shape {tuple(seg_ids.shape)}, "
                             f"got {target.dtype} {tuple(target.shape)}")
        return target.cpu() & (seg_ids >= 0)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS} or a bool mask, got {target!r}")
    kinds = segmentation.seg_kinds_tensor()
    tok_kind = torch.where(seg_ids >= 0, kinds.gather(1, seg_ids.clamp_min(0)), torch.full_like(seg_ids, -1))
    wanted = {"summary": (2,), "thinking": (1,), "generated": (1, 2)}[target]
    mask = torch.zeros_like(seg_ids, dtype=torch.bool)
    for k in wanted:
        mask |= tok_kind == k
    return mask


class _SaliencyCapture:
    """Attention controller: run `inner`, hook the output gradient, pool it into the layer's map."""

    def __init__(self, seg_ids, num_segments, head_reduction, maps, stepflow=None):
        self.seg_ids, self.num_segments, self.head_reduction, self.maps = seg_ids, num_segments, head_reduction, maps
        self.stepflow = stepflow  # the model's StepFlowHandle, if any: its OEB layers attend with A', not A

    def _oeb_args(self, layer):
        handle = self.stepflow
        if handle is None or layer not in handle.config.oeb_layers or handle._call is None:
            return {}
        return dict(oeb_seg_start=handle._call.seg_start, oeb_strength=handle.config.oeb_strength,
                    oeb_num_sink=handle.config.num_sink)

    def make(self, inner):
        def attention(module, query, key, value, attention_mask, **kwargs):
            out, weights = inner(module, query, key, value, attention_mask, **kwargs)
            if torch.is_grad_enabled() and out.requires_grad:
                layer, scaling = module.layer_idx, kwargs.get("scaling") or module.scaling
                q, k, v = query.detach(), key.detach(), value.detach()
                oeb = self._oeb_args(layer)

                def on_grad(grad):  # grad at the attention output, (B, T, H, d) as HF returns it
                    grad_out = grad.transpose(1, 2).to(q.dtype)
                    m = ops.step_saliency_pool(q, k, v, grad_out, self.seg_ids, self.num_segments, scaling,
                                               self.head_reduction, **oeb)
                    self.maps[layer] = m if layer not in self.maps else self.maps[layer] + m

                out.register_hook(on_grad)
            return out, weights
        return attention


@contextlib.contextmanager
def _frozen(model, checkpoint_layers: bool):
    """Eval mode, no weight gradients, optional layer checkpointing; all restored on exit."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    layers = hf.decoder_layers(model)
    saved_forwards = []
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        if checkpoint_layers:
            for layer in layers:
                original = layer.forward
                saved_forwards.append((layer, original))
                layer.forward = functools.partial(checkpoint, original, use_reentrant=False)
        yield
    finally:
        for layer, _ in saved_forwards:
            del layer.forward  # the instance attribute shadowed the class's forward
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _summed_nll(model, hidden, input_ids, targets, chunk_tokens):
    """L = -sum_t log p(x_t | x_<t) over target positions t >= 1, the vocab projection in chunks."""
    head = model.get_output_embeddings()
    rows, cols = targets[:, 1:].nonzero(as_tuple=True)
    cols = cols + 1
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.numel(), chunk_tokens):
        r, c = rows[start:start + chunk_tokens], cols[start:start + chunk_tokens]
        logits = head(hidden[r, c - 1]).float()
        if getattr(hf.text_config(model), "final_logit_softcapping", None):
            cap = hf.text_config(model).final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        total = total + (torch.logsumexp(logits, -1) - logits.gather(1, input_ids[r, c][:, None]).squeeze(1)).sum()
    return total


def step_saliency(model, input_ids, segmentation: Segmentation, target="summary", head_reduction="sum_abs",
                  attention_mask=None, gradient_checkpointing=False, chunk_tokens=1024) -> StepSaliencyResult:
    """Step-Saliency maps (design.md 2.2) of `model` on `input_ids` (B, T) split by `segmentation`.

    target: 'summary' (default), 'thinking', 'generated' or a bool mask (B, T) of the tokens
    whose negative log-likelihood forms the loss. gradient_checkpointing recomputes each decoder
    layer in the backward pass (activation memory of one layer instead of all). Under
    replace_attention the maps are those of the intervened model, with `segmentation` driving it.
    """
    hf.check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor of shape (batch, length)")
    if not isinstance(segmentation, Segmentation):
        raise ValueError(f"segmentation must be a stepflow_ext.Segmentation, got {type(segmentation).__name__}")
    if tuple(segmentation.seg_ids.shape) != tuple(input_ids.shape):
        raise ValueError(f"segmentation covers {tuple(segmentation.seg_ids.shape)} tokens but input_ids has shape "
                         f"{tuple(input_ids.shape)}")
    if head_reduction not in ops.HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction must be one of {ops.HEAD_REDUCTIONS}, got {head_reduction!r}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    device = next(model.parameters()).device
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if attention_mask is None:
        attention_mask = (segmentation.seg_ids >= 0).long().to(device)
    elif tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    elif bool(((attention_mask.cpu() > 0) != (segmentation.seg_ids >= 0)).any()):
        raise ValueError("attention_mask and the segmentation's padding (-1 seg ids) disagree")
    targets = target_mask(segmentation, target)
    if not bool(targets[:, 1:].any()):
        raise ValueError(f"no target tokens: the segmentation has no {target!r} tokens after the first position")

    num_segments = segmentation.num_segments
    seg_ids = segmentation.seg_ids.to(device)
    maps: dict[int, torch.Tensor] = {}
    handle = getattr(model, "_stepflow_handle", None)
    capture = _SaliencyCapture(seg_ids, num_segments, head_reduction, maps, stepflow=handle)
    previous = handle._forced if handle is not None else None
    installed = hf.Installed.on(model)
    token = installed.push(capture.make)
    try:
        if handle is not None:
            handle.set_segmentation(segmentation.to(device))
        with _frozen(model, gradient_checkpointing), torch.enable_grad():
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            out = model.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
            loss = _summed_nll(model, out.last_hidden_state, input_ids, targets.to(device), chunk_tokens)
            loss.backward()
            del out, embeds
    finally:
        installed.pop(token)
        if handle is not None:
            handle.set_segmentation(previous)
    layers = hf.num_layers(model)
    missing = [i for i in range(layers) if i not in maps]
    if missing:
        raise RuntimeError(f"no attention gradient reached layers {missing}")
    stacked = torch.stack([maps[i].float().cpu() for i in range(layers)], dim=1)
    kinds = [list(k) for k in segmentation.kinds]
    meta = {"target": target if isinstance(target, str) else "mask", "head_reduction": head_reduction,
            "loss": float(loss.detach()), "num_targets": int(targets[:, 1:].sum()),
            "model_type": hf.text_config(model).model_type, "stepflow": None if handle is None else handle.config.to_dict()}
    return StepSaliencyResult(stacked, causal_pair_counts(segmentation.seg_ids, num_segments).float(), kinds, meta)
