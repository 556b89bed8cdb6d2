"""step_saliency(model, ...): Step-Saliency maps of a Hugging Face causal LM (design.md 2.2).

One forward and one backward of the model with its own attention kernel. At every layer the
attention function is wrapped: it keeps references to q, k, v (which autograd keeps anyway)
and hooks the gradient at the attention output; when that gradient arrives in the backward
pass, `step_saliency_pool` reduces it to the layer's S x S map at once. No attention matrix is
ever built, and no gradient is left on the weights.

`preset="paper"` is the paper's Step-Saliency (the authors' `extract_saliency` with rule "ag"
and mode "loss", then `compute_step_saliency`): the mean next-token loss over every token,
|A * dL/dA| averaged over the heads, and the `block` view (the mean over each step-by-step block,
the future counted as zeros). On the same token-to-step assignment it gives their step matrices
(scripts/paper_parity.py checks it against their code).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os

import torch
from torch.utils.checkpoint import checkpoint

from . import hf, ops
from .intervention_state import padding_of
from .segment import Segmentation

TARGETS = ("all", "summary", "thinking", "generated")
LOSS_REDUCTIONS = ("sum", "mean")
VIEWS = ("row", "mean", "block")
KIND_NAMES = ("question", "step", "summary")
DEFAULTS = {"target": "summary", "loss_reduction": "sum", "head_reduction": "sum_abs"}
# The paper's Step-Saliency (design.md 2.2): its loss (mode "loss": HF's mean cross-entropy with
# labels = input ids, i.e. every token after the first) and its head reduction (rule "ag", then the
# mean over heads). Its step matrices are normalized("block").
PRESETS = {"paper": {"target": "all", "loss_reduction": "mean", "head_reduction": "abs_mean"}}
# Where the layer attends through the fused kernel (_fused_attention: eager models such as GPT-OSS),
# its lse (the log-sum-exp over the valid real keys, no sink: what step_saliency_pool's lse means)
# is handed to the pooling, which then skips its own pass over q K^T for the row statistics.
# STEPFLOW_SALIENCY_LSE=0 (read once, at import) turns that off: the pooling recomputes them.
REUSE_FUSED_LSE = os.environ.get("STEPFLOW_SALIENCY_LSE", "1") != "0"


class StepSaliencyResult:
    """Step maps of one or more traces.

    maps: (B, L, S, S) fp32, the raw sums M^l[a, c] of design.md 2.2 (row a: the query segment,
        column c: the key segment). counts: (B, S, S) the number of causal pairs of each block.
    sizes: (B, S) the number of tokens of each segment (the denominators of the `block` view).
    kinds: per row, the kind of each segment. meta: how the maps were made (target, reductions,
        preset, ...).
    """

    def __init__(self, maps: torch.Tensor, counts: torch.Tensor, kinds: list[list[str]], meta: dict | None = None,
                 sizes: torch.Tensor | None = None):
        self.maps, self.counts, self.kinds = maps, counts, kinds
        self.meta = dict(meta or {})
        self.sizes = sizes if sizes is not None else sizes_from_counts(counts)

    @property
    def num_layers(self) -> int:
        return self.maps.shape[1]

    def normalized(self, how: str = "row") -> torch.Tensor:
        """A view of the maps, (B, L, S, S):

        'row': each row divided by its sum (R^l[a, c], the share of a's saliency that comes from c);
        'mean': each entry divided by its number of causal pairs;
        'block': each entry divided by |a| * |c|, the mean over the whole block with the pairs
            above the diagonal counted as zeros: the paper's step matrix (compute_step_saliency).
        Empty rows, blocks or segments give 0.
        """
        if how == "row":
            total = self.maps.sum(-1, keepdim=True)
            return torch.where(total > 0, self.maps / total.clamp_min(1e-30), torch.zeros_like(self.maps))
        if how == "mean":
            counts = self.counts[:, None].to(self.maps.dtype)
            return torch.where(counts > 0, self.maps / counts.clamp_min(1), torch.zeros_like(self.maps))
        if how == "block":
            sizes = self.sizes.to(self.maps.device, torch.float64)
            blocks = (sizes[:, :, None] * sizes[:, None, :])[:, None]
            out = torch.where(blocks > 0, self.maps.to(torch.float64) / blocks.clamp_min(1), torch.zeros_like(blocks))
            return out.to(self.maps.dtype)
        raise ValueError(f"how must be one of {VIEWS}, got {how!r}")

    def diagnose(self, recent_window: int = 2, lock_in_margin: float = 0.1, decay_drop: float = 0.25) -> list[dict]:
        """The diagnostics of design.md 2.2, one dict per trace (see stepflow_ext.diagnostics): the
        project's lock-in / decay numbers and flags, and the paper's per-layer final-block intensity,
        analysis-block intensity, their ratio, and the layer-averaged block map."""
        from .diagnostics import diagnose

        return diagnose(self, recent_window=recent_window, lock_in_margin=lock_in_margin, decay_drop=decay_drop)

    def plot(self, path, row: int = 0):
        from .plot import plot_result

        return plot_result(self, path, row=row)

    def to(self, *args, **kwargs) -> "StepSaliencyResult":
        return StepSaliencyResult(self.maps.to(*args, **kwargs), self.counts.to(*args, **kwargs), self.kinds,
                                  self.meta, self.sizes.to(*args, **kwargs))

    def save(self, path) -> None:
        """Write `path` (.safetensors with maps, counts and sizes) and `path`.json (kinds and metadata)."""
        from safetensors.torch import save_file

        path = str(path)
        save_file({"maps": self.maps.contiguous().cpu(), "counts": self.counts.contiguous().cpu(),
                   "sizes": self.sizes.contiguous().cpu()}, path)
        with open(path + ".json", "w") as f:
            json.dump({"kinds": self.kinds, "meta": self.meta}, f, indent=2, default=str)

    @classmethod
    def load(cls, path) -> "StepSaliencyResult":
        """Read what `save` wrote (files without sizes, from older versions, get them from the counts)."""
        from safetensors.torch import load_file

        path = str(path)
        tensors = load_file(path)
        with open(path + ".json") as f:
            info = json.load(f)
        return cls(tensors["maps"], tensors["counts"], info["kinds"], info.get("meta"), tensors.get("sizes"))


def segment_sizes(seg_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(B, S) float64: the number of tokens of each segment (padding, -1, counts nowhere)."""
    b = seg_ids.shape[0]
    sizes = torch.zeros(b, num_segments, dtype=torch.float64)
    valid = (seg_ids >= 0).cpu()
    rows = torch.arange(b)[:, None].expand_as(valid)
    sizes.index_put_((rows[valid], seg_ids.cpu()[valid]), torch.ones(int(valid.sum()), dtype=torch.float64),
                     accumulate=True)
    return sizes


def sizes_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """(B, S) segment sizes from the causal pair counts: N[a, a] = |a| (|a| + 1) / 2."""
    diag = torch.diagonal(counts.to(torch.float64), dim1=-2, dim2=-1)
    return torch.round((torch.sqrt(8 * diag + 1) - 1) / 2).to(counts.dtype)


def causal_pair_counts(seg_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """N[b, a, c] without a T x T matrix: |a|*|c| for c < a, |a|(|a|+1)/2 for c == a (contiguous segments)."""
    sizes = segment_sizes(seg_ids, num_segments)
    counts = sizes[:, :, None] * sizes[:, None, :]
    counts = torch.tril(counts, diagonal=-1)
    idx = torch.arange(num_segments)
    counts[:, idx, idx] = sizes * (sizes + 1) / 2
    return counts


def target_mask(segmentation: Segmentation, target) -> torch.Tensor:
    """(B, T) bool: the tokens whose negative log-likelihood forms the loss.

    'all': every token whose previous token is in the trace (the paper's mode "loss", labels =
    input ids: each row's first token has nothing to be predicted from); 'summary', 'thinking',
    'generated' (thinking and summary): the tokens of those segments; or a bool mask (B, T). A
    token right after padding (a row's first token) is never a target.
    """
    seg_ids = segmentation.seg_ids
    valid = seg_ids >= 0
    if isinstance(target, torch.Tensor):
        if target.dtype != torch.bool or tuple(target.shape) != tuple(seg_ids.shape):
            raise ValueError(f"target mask must be a bool tensor of shape {tuple(seg_ids.shape)}, "
                             f"got {target.dtype} {tuple(target.shape)}")
        mask = target.to(valid.device) & valid
    elif not isinstance(target, str) or target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS} or a bool mask, got {target!r}")
    elif target == "all":
        mask = valid.clone()
    else:
        kinds = segmentation.seg_kinds_tensor()
        tok_kind = torch.where(valid, kinds.gather(1, seg_ids.clamp_min(0)), torch.full_like(seg_ids, -1))
        wanted = {"summary": (2,), "thinking": (1,), "generated": (1, 2)}[target]
        mask = torch.zeros_like(seg_ids, dtype=torch.bool)
        for k in wanted:
            mask |= tok_kind == k
    predicted = torch.zeros_like(valid)
    predicted[:, 1:] = valid[:, :-1]          # x_{t-1} is a token of the trace, not padding
    return (mask & predicted).cpu()


def resolve_options(target=None, loss_reduction=None, head_reduction=None, preset=None) -> dict:
    """The loss and head settings: the preset's (if any), then the project's defaults; an
    explicit argument that contradicts the preset is a ValueError."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be None or one of {tuple(PRESETS)}, got {preset!r}")
    given = {"target": target, "loss_reduction": loss_reduction, "head_reduction": head_reduction}
    chosen = dict(DEFAULTS)
    if preset is not None:
        for name, value in PRESETS[preset].items():
            mine = given[name]
            if mine is not None and not (isinstance(mine, str) and mine == value):
                shown = "a bool mask" if isinstance(mine, torch.Tensor) else repr(mine)
                raise ValueError(f"{name}={shown} contradicts preset={preset!r}, which sets {name}={value!r}: "
                                 f"drop one of the two")
            chosen[name] = value
    chosen.update({k: v for k, v in given.items() if v is not None})
    if chosen["loss_reduction"] not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {chosen['loss_reduction']!r}")
    if chosen["head_reduction"] not in ops.HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction must be one of {ops.HEAD_REDUCTIONS}, got {chosen['head_reduction']!r}")
    return chosen


class _SaliencyCapture:
    """Attention controller: run `inner`, hook the output gradient, pool it into the layer's map."""

    def __init__(self, seg_ids, num_segments, head_reduction, maps, stepflow=None, fused_lse=None):
        self.seg_ids, self.num_segments, self.head_reduction, self.maps = seg_ids, num_segments, head_reduction, maps
        self.stepflow = stepflow  # the model's StepFlowHandle, if any: its OEB layers attend with A', not A
        # layer -> the lse its last _fused_attention call returned (filled by _fused; None: not reused)
        self.fused_lse = fused_lse

    def _oeb_args(self, layer) -> dict:
        """Keyword args of step_saliency_pool that describe the layer's OEB (empty without OEB)."""
        handle = self.stepflow
        if handle is None:
            return {}
        pool_args = getattr(handle, "pool_oeb_args", None)
        if pool_args is None:   # a handle that cannot describe its OEB to the pooling
            if layer in tuple(getattr(handle.config, "oeb_layers", ())):
                raise RuntimeError(f"layer {layer} runs the Odds-Equal Bridge but this StepFlowHandle has no "
                                   "pool_oeb_args(): its saliency cannot be measured on the rebalanced attention")
            return {}
        return dict(pool_args(layer) or {})

    def make(self, inner):
        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = module.layer_idx
            lse = None
            if self.fused_lse is not None:
                self.fused_lse.pop(layer, None)   # only what this call's fused attention leaves is read
                out, weights = inner(module, query, key, value, attention_mask, **kwargs)
                lse = self.fused_lse.pop(layer, None)
            else:
                out, weights = inner(module, query, key, value, attention_mask, **kwargs)
            if torch.is_grad_enabled() and out.requires_grad:
                scaling = kwargs.get("scaling") or module.scaling
                q, k, v = query.detach(), key.detach(), value.detach()
                extra = self._oeb_args(layer)
                if _reusable_lse(lse, q, extra):
                    extra["lse"] = lse
                window = kwargs.get("sliding_window")
                if window is not None and "window" not in extra:
                    extra["window"] = int(window)   # the layer attends to keys j > i - window only
                sink = getattr(module, "sinks", None)
                if sink is not None and "sink" not in extra:
                    extra["sink"] = sink.detach()    # GPT-OSS: per-head sink logits in the softmax denominator

                def on_grad(grad):  # grad at the attention output, (B, T, H, d) as HF returns it
                    grad_out = grad.transpose(1, 2).to(q.dtype)
                    m = ops.step_saliency_pool(q, k, v, grad_out, self.seg_ids, self.num_segments, scaling,
                                               self.head_reduction, **extra)
                    self.maps[layer] = m if layer not in self.maps else self.maps[layer] + m

                out.register_hook(on_grad)
            return out, weights
        return attention


def _reusable_lse(lse, q, extra) -> bool:
    """Whether the fused attention's lse may stand for the pooling's own row statistics: it is the
    lse of this very q (same shape) over the same keys (kv_start = the row's first real token, one
    run of real tokens per row: the valid keys; the same window; no sink in it, as the pooling's
    lse), fp32 as the schema wants. Not for float64 (an fp32 lse would cost the pooling its fp64
    precision) and not with OEB (the pooling then takes lse from its group masses anyway)."""
    return (lse is not None and lse.dtype == torch.float32 and q.dtype != torch.float64
            and tuple(lse.shape) == tuple(q.shape[:3]) and lse.device == q.device and "oeb_bounds" not in extra)


def _fused_attention(kv_start, lse_out=None):
    """The attention of an eager model under step_saliency, without a T x T matrix: the project's
    kernel with no row intervened (bounds (-1, -1)), the layer's sink logits (GPT-OSS) and sliding
    window; kv_start (B,) is each row's first real token (the segmentation's padding). lse_out
    (a dict, optional) receives the kernel's lse under the module's layer index."""
    def attention(module, query, key, value, **kwargs):
        batch, _, length, _ = query.shape
        bounds = torch.full((batch, length, 2), -1, dtype=torch.long, device=query.device)
        window = kwargs.get("sliding_window")
        out, lse, _ = ops.oeb_attention(query, key, value, kv_start, bounds, sink=getattr(module, "sinks", None),
                                        window=None if window is None else int(window),
                                        scale=kwargs.get("scaling") or module.scaling)
        if lse_out is not None:
            lse_out[module.layer_idx] = lse
        return out.transpose(1, 2).contiguous(), None
    return attention


@contextlib.contextmanager
def _fused(model, installed, seg_ids, lse_out=None):
    """Eager models (GPT-OSS has no SDPA path in transformers) attend through _fused_attention and
    get no 4D mask: nothing of size T x T is built. Rows must hold one run of real tokens. lse_out:
    see _fused_attention."""
    if not installed.fusable:
        yield
        return
    kv_start, _ = padding_of(seg_ids >= 0, *seg_ids.shape, allow_empty=True)
    kv_start = kv_start.to(seg_ids.device)
    modules = hf.attention_modules(model)
    token = hf.SKIP_MASK.set(True)
    try:
        for module in modules:
            module._stepflow_fused = _fused_attention(kv_start, lse_out)
        yield
    finally:
        for module in modules:
            module.__dict__.pop("_stepflow_fused", None)
        hf.SKIP_MASK.reset(token)


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


def _nll(model, hidden, input_ids, targets, weights, chunk_tokens):
    """L = -sum_t w_row(t) log p(x_t | x_<t) over the target positions t, the vocab projection in chunks."""
    head = model.get_output_embeddings()
    rows, cols = targets.nonzero(as_tuple=True)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.numel(), chunk_tokens):
        r, c = rows[start:start + chunk_tokens], cols[start:start + chunk_tokens]
        logits = head(hidden[r, c - 1]).float()
        if getattr(hf.text_config(model), "final_logit_softcapping", None):
            cap = hf.text_config(model).final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        nll = torch.logsumexp(logits, -1) - logits.gather(1, input_ids[r, c][:, None]).squeeze(1)
        total = total + (nll * weights[r]).sum()
    return total


def step_saliency(model, input_ids, segmentation: Segmentation, target=None, head_reduction=None,
                  loss_reduction=None, preset=None, attention_mask=None, gradient_checkpointing=False,
                  chunk_tokens=1024) -> StepSaliencyResult:
    """Step-Saliency maps (design.md 2.2) of `model` on `input_ids` (B, T) split by `segmentation`.

    target: the tokens whose negative log-likelihood forms the loss: 'summary' (the default),
        'thinking', 'generated' (thinking and summary), 'all' (every token after the first, the
        paper's) or a bool mask (B, T).
    loss_reduction: 'sum' (default) or 'mean': the mean over each trace's targets (the paper's;
        per row, so a trace's maps do not depend on the rest of the batch; for one trace it is
        Hugging Face's mean cross-entropy).
    head_reduction: 'sum_abs' (default) |sum_h A dL/dA|, 'abs_sum' sum_h |A dL/dA|, or 'abs_mean'
        (the paper's) the mean over heads of |A dL/dA|.
    preset: None or 'paper' = target 'all', loss 'mean', heads 'abs_mean'; read its step matrices
        with .normalized('block'). An explicit argument that contradicts the preset is a ValueError.
        The preset does not touch the segmentation: the paper splits the thinking into sentences
        and the summary at blank lines (see segment()).
    gradient_checkpointing recomputes each decoder layer in the backward pass (activation memory
    of one layer instead of all); chunk_tokens is the number of positions per chunk of the
    vocabulary projection. Under replace_attention the maps are those of the intervened model
    (in OEB layers the saliency of the rebalanced attention A'), with `segmentation` driving it.
    The model's weights, their requires_grad flags, its train/eval mode and attention
    implementation are restored on return, also on error.

    Returns a StepSaliencyResult; its meta records target, loss_reduction, head_reduction, preset,
    loss (the objective that was differentiated: the sum over the rows of each row's sum or mean),
    num_targets and num_targets_per_row, model_type and the StepFlow config (None without).
    """
    hf.check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor of shape (batch, length)")
    if not isinstance(segmentation, Segmentation):
        raise ValueError(f"segmentation must be a stepflow_ext.Segmentation, got {type(segmentation).__name__}")
    if tuple(segmentation.seg_ids.shape) != tuple(input_ids.shape):
        raise ValueError(f"segmentation covers {tuple(segmentation.seg_ids.shape)} tokens but input_ids has shape "
                         f"{tuple(input_ids.shape)}")
    options = resolve_options(target, loss_reduction, head_reduction, preset)
    target, loss_reduction, head_reduction = options["target"], options["loss_reduction"], options["head_reduction"]
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    device = next(model.parameters()).device
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if attention_mask is None:
        attention_mask = (segmentation.seg_ids >= 0).long().to(device)
    elif tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    elif bool(((attention_mask.cpu() > 0) != (segmentation.seg_ids.cpu() >= 0)).any()):
        raise ValueError("attention_mask and the segmentation's padding (-1 seg ids) disagree")
    targets = target_mask(segmentation, target)
    per_row = targets.sum(dim=1)
    if not bool(per_row.any()):
        what = "a bool mask" if isinstance(target, torch.Tensor) else repr(target)
        raise ValueError(f"no target tokens: the segmentation has no {what} tokens after the first position")
    if loss_reduction == "mean":
        weights = torch.where(per_row > 0, 1.0 / per_row.clamp_min(1).double(), torch.zeros(1, dtype=torch.float64))
    else:
        weights = torch.ones(len(per_row), dtype=torch.float64)

    num_segments = segmentation.num_segments
    seg_ids = segmentation.seg_ids.to(device)
    maps: dict[int, torch.Tensor] = {}
    handle = getattr(model, "_stepflow_handle", None)
    previous = getattr(handle, "_forced", None) if handle is not None else None
    installed = hf.Installed.on(model)
    fused_lse = {} if (REUSE_FUSED_LSE and installed.fusable) else None
    capture = _SaliencyCapture(seg_ids, num_segments, head_reduction, maps, stepflow=handle, fused_lse=fused_lse)
    token = installed.push(capture.make)
    try:
        if handle is not None:
            handle.set_segmentation(segmentation.to(device))
        with _frozen(model, gradient_checkpointing), _fused(model, installed, seg_ids, fused_lse), \
                torch.enable_grad():
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            out = model.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
            loss = _nll(model, out.last_hidden_state, input_ids, targets.to(device),
                        weights.to(device=device, dtype=torch.float32), chunk_tokens)
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
    meta = {"target": target if isinstance(target, str) else "mask", "loss_reduction": loss_reduction,
            "head_reduction": head_reduction, "preset": preset, "loss": float(loss.detach()),
            "num_targets": int(per_row.sum()), "num_targets_per_row": per_row.tolist(),
            "model_type": hf.text_config(model).model_type,
            "stepflow": None if handle is None else handle.config.to_dict()}
    sizes = segment_sizes(segmentation.seg_ids, num_segments)
    return StepSaliencyResult(stacked, causal_pair_counts(segmentation.seg_ids, num_segments).float(), kinds, meta,
                              sizes.float())
