"""replace_attention: StepFlow on a Hugging Face causal LM, with online step tracking.

OEB layers run `stepflow::oeb_attention`; SMI layers with the `value` rule (the paper's) add the
step-start injection to the attention output; every other layer keeps the model's own attention
function. The `residual` SMI rule is a forward hook on its decoder layers. A forward pre-hook on
the model places each call's tokens into channels and steps (design.md 2.1, section 3): a call
that starts with an empty KV cache starts a new sequence whose tokens are the prompt; later calls
append tokens. `handle.set_segmentation(seg)` replaces tracking by a given segmentation (teacher
forcing).

Tracking follows the KV cache in every decoding mode of `generate` (docs/method_decoding.md):
- a cache that shrank (assisted / prompt-lookup decoding crop rejected candidates, `cache.crop`)
  rolls the tracker back to the cache's length (`StepTracker.truncate`) and the `residual` rule's
  decode state with it;
- `reorder_cache`, `batch_select_indices` and `batch_repeat_interleave` on the cache (beam search)
  reorder the tracker's rows (`StepTracker.select`) and the residual decode state: the cache is
  watched from the first call that hands it over;
- preallocated caches (static, `max_cache_len` keys) and their prepared 4D masks: the OEB and SMI
  layers read only the cache's valid length, the padding is read off the mask (which must be the
  causal mask of left-padded rows); a cache that dropped keys (sliding window) is refused there;
- a call without any cache re-feeds the whole sequence: a row whose ids extend a tracked row
  continues it (`StepTracker.follow`), any other row starts a new sequence; the first call of a
  `generate` always starts one, with generate's input as the prompt (assisted decoding's first call
  also holds candidate tokens, which are generated tokens).
Modes that cannot be followed raise ValueError naming the mode (self-drafting assistants, an
explicit torch.compile of the decode step, a second cache).

With control="random-attn" or "random-residual" the OEB layers (resp. the SMI layers) run the
evaluation control of stepflow_ext.controls instead (docs/method.md, "Controls"); the other
component runs as configured.
"""
from __future__ import annotations

import weakref

import torch

from . import controls, hf, ops
from .config import CONTROLS, StepFlowConfig
from .segment import Segmentation, StepTracker, TrackerUpdate, segment


def _cache_of(kwargs):
    """The KV cache object a forward call was given (None: no cache)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _cache_length(cache) -> int:
    """Tokens held by the cache (its get_seq_length, a tensor for static caches)."""
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if len(cache) else 0
    return int(cache.get_seq_length())


def padding_of(attention_mask, batch, length, allow_empty=False):
    """(kv_start (B,), left_padded: bool) from a 2D HF attention mask; ValueError on holes. With
    allow_empty, rows without any real token (the first chunks of a prompt prefilled in chunks) get
    kv_start = length."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long), False
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a 2D (batch, length) tensor of 0/1 under StepFlow")
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {length})")
    mask = attention_mask.to("cpu", torch.bool)
    # A valid mask is 0..0 1..1 0..0 per row: one contiguous run of real tokens.
    changes = (mask[:, 1:] != mask[:, :-1]).sum(dim=1) + mask[:, 0].logical_not().long()
    empty = mask.sum(1) == 0
    if bool((changes > 2).any()) or (bool(empty.any()) and not allow_empty):
        raise ValueError("attention_mask must mark one contiguous run of tokens per row (left or right padding)")
    kv_start = torch.where(empty, length, mask.long().argmax(dim=1))
    return kv_start, bool((kv_start > 0).any())


_MASK_CHUNK = 256  # query rows of a prepared 4D mask checked at a time


def padding_of_prepared(attention_mask, batch, past, length):
    """kv_start (B,) from a mask `generate` prepared for a preallocated (static) cache: a 4D tensor
    (B, 1 or H, n, Tk), bool (True: attend) or additive float (0: attend), or the dict of such
    masks per layer type. It must be the causal mask of left-padded rows over the cache's valid
    length past + n: query i sees keys kv_start <= j <= past + i; anything else (custom masks,
    packed sequences, a sliding window that cuts keys off) is refused, as the OEB kernel builds
    the causal mask itself."""
    if isinstance(attention_mask, dict):
        masks = {k: v for k, v in attention_mask.items() if v is not None}
        if not masks:
            return torch.zeros(batch, dtype=torch.long)
        attention_mask = masks.get("full_attention", next(iter(masks.values())))
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"StepFlow reads the padding off a 2D attention_mask or a prepared 4D mask tensor, got "
                         f"{type(attention_mask).__name__} (flex attention's BlockMask is not supported: use the "
                         "sdpa or eager attention implementation)")
    if attention_mask.dim() != 4 or attention_mask.shape[0] != batch or attention_mask.shape[2] != length \
            or attention_mask.shape[3] < past + length:
        raise ValueError(f"a prepared attention mask of shape {tuple(attention_mask.shape)} does not fit the call "
                         f"({batch} rows, {length} new tokens after {past} cached): StepFlow needs the causal mask "
                         "over every cached key (a sliding-window cache that drops keys is not supported)")
    m = attention_mask[:, 0]
    allowed = m > torch.finfo(m.dtype).min / 2 if m.dtype.is_floating_point else m.bool()
    kv_start = allowed[:, -1].to(torch.int8).argmax(dim=1)                       # first key the last query sees
    if not bool(allowed[:, -1].any(dim=1).all()):
        raise ValueError("a prepared attention mask hides every key from a row's last token")
    cols = torch.arange(allowed.shape[-1], device=allowed.device)
    for lo in range(0, length, _MASK_CHUNK):
        rows = torch.arange(lo, min(lo + _MASK_CHUNK, length), device=allowed.device)
        expected = (cols[None, None, :] >= kv_start[:, None, None]) & (cols[None, None, :] <= past + rows[None, :, None])
        if attention_mask.shape[1] > 1:
            part = attention_mask[:, :, lo:lo + _MASK_CHUNK]
            part = part > torch.finfo(part.dtype).min / 2 if part.dtype.is_floating_point else part.bool()
            same = bool((part == expected[:, None]).all())
        else:
            same = bool((allowed[:, lo:lo + _MASK_CHUNK] == expected).all())
        if not same:
            raise ValueError("the prepared attention mask is not the causal mask of left-padded rows over the "
                             "cache: StepFlow supports only that mask (custom 4D masks, packed sequences and "
                             "sliding windows that cut keys off are not supported)")
    return kv_start.to("cpu", torch.long)


def kinds_tensor(kinds: list[list[str]]) -> torch.Tensor:
    """(B, S) int64 kind codes (0 question, 1 step, 2 summary; unused slots 1) from per-row kind lists."""
    codes = {"question": 0, "step": 1, "summary": 2}
    out = torch.ones(len(kinds), max(len(k) for k in kinds), dtype=torch.long)
    for row, row_kinds in enumerate(kinds):
        out[row, :len(row_kinds)] = torch.tensor([codes[k] for k in row_kinds], dtype=torch.long)
    return out


# --------------------------------------------------------------------------- placement
#
# From channels and steps (segment.py) to the inputs of the ops, for the tokens of one forward call.


def oeb_bounds(rule, channel, seg_start, think_start, summary_start, kv_start, positions, num_sink=1):
    """bounds (B, n, 2) of oeb_attention for n query tokens.

    channel (B, n): -1 padding, 0 question, 1 thinking, 2 summary; seg_start (B, n): start of each
    token's segment; think_start, summary_start (B, n) or (B, 1): position of the first thinking /
    summary token (-1: none); kv_start (B,); positions (n,) or (B, n): the tokens' key positions.
    bridge: a thinking query gets (kv_start, think_start) (O empty, B = the question), a summary
    query (think_start, summary_start) (O = the question, B = the thinking; an empty thinking gives
    an empty bridge). odds: (kv_start + num_sink, start of its segment), clipped to the query.
    Question and padding queries: (-1, -1).
    """
    kv = kv_start[:, None]
    if rule == "bridge":
        ts = torch.where(think_start >= 0, think_start, summary_start).expand_as(channel)
        a = torch.where(channel == 1, kv.expand_as(channel), ts)
        b = torch.where(channel == 1, ts, summary_start.expand_as(channel))
    else:
        a = torch.minimum(kv + num_sink, positions + 1).expand_as(channel)
        b = torch.maximum(a, seg_start)
    on = channel >= 1
    off = torch.full_like(a, -1)
    return torch.stack([torch.where(on, a, off), torch.where(on, b, off)], dim=-1)


def smi_windows(prev_step, window):
    """(B, n, 2): the last `window` keys [max(start, end - window), end) of the previous step of each
    SMI target (prev_step (B, n, 2) as segment.py gives it), (-1, -1) elsewhere."""
    start, end = prev_step[..., 0], prev_step[..., 1]
    on = (start >= 0) & (end > start)
    w = torch.stack([torch.maximum(start, end - window), end], dim=-1)
    return torch.where(on[..., None], w, torch.full_like(w, -1))


ROLLBACK_TOKENS = 256   # residual rule: a crop may drop at most this many tokens of the last call


def _with(generation_config, **changes):
    """A copy of a GenerationConfig with some fields changed."""
    import copy
    new = copy.deepcopy(generation_config)
    for name, value in changes.items():
        setattr(new, name, value)
    return new


_WATCHED = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")
_LISTENERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # cache -> weakref(StepFlowHandle)


def _watch(cache, handle):
    _LISTENERS[cache] = weakref.ref(handle)


def _watch_caches():
    """Wrap transformers' Cache.reorder_cache / batch_select_indices / batch_repeat_interleave (once) so
    that the handle tracking a cache hears when its batch rows move (beam search reorders the cache
    after every step). Caches no handle watches are untouched; the wrapped methods behave as before."""
    from transformers.cache_utils import Cache
    if Cache.__dict__.get("_stepflow_watched"):
        return
    for name in _WATCHED:
        original = Cache.__dict__.get(name)
        if original is None:
            continue

        def wrapper(self, arg, *rest, _original=original, _name=name, **kw):
            result = _original(self, arg, *rest, **kw)
            ref = _LISTENERS.get(self)
            handle = ref() if ref is not None else None
            if handle is not None:
                handle._cache_event(self, _name, arg)
            return result

        wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = original.__name__, original.__qualname__, \
            original.__doc__
        setattr(Cache, name, wrapper)
    Cache._stepflow_watched = True


class _Call:
    """What the OEB layers and SMI need for one forward call (all on the model's device)."""

    def __init__(self, seg_ids, seg_kinds, kv_start, bounds, windows, functional, past=0):
        self.seg_ids, self.seg_kinds, self.kv_start = seg_ids, seg_kinds, kv_start
        self.bounds = bounds      # (B, n, 2) oeb_attention bounds of the call's tokens (config's rule)
        self.windows = windows    # (B, n, 2) SMI value windows ((-1, -1): no injection)
        self.functional = functional  # whole sequences at once (teacher forcing): differentiable ops
        self.residual_targets = None  # random-residual (residual rule): the tokens SMI would change
        self.past = past          # tokens in the KV cache before the call: its tokens sit at past..past+n-1
        self.valid_length = past + seg_ids.shape[1]   # keys the cache holds after the call


class StepFlowHandle:
    """Returned by replace_attention. Use `restore()` (or a `with` block) to put the model back."""

    def __init__(self, model, config: StepFlowConfig, tracker: StepTracker | None, control: str | None = None,
                 control_seed: int = 0, segmentation_options: dict | None = None):
        self.model, self.config, self.tracker = model, config, tracker
        self.control, self.control_seed = control, control_seed  # recorded for the evaluation's output
        self.segmentation_options = dict(segmentation_options or {})
        self._forced: Segmentation | None = None
        self._call: _Call | None = None
        self._smi_state: dict[int, tuple] = {}
        self._smi_undo: dict[int, tuple] = {}   # residual rule: what rolling the decode state back needs
        self._cache = None                       # weakref to the KV cache the tracked sequence lives in
        self._generate_prompt = None             # inside generate(): the prompt's columns
        self._generate_first = False             # the next forward call is generate's first
        self._hooks = []
        self._token = None
        self._oeb = set(config.oeb_layers)
        self._smi_value = set(config.smi_layers) if config.smi_rule == "value" else set()
        self._counts: dict[tuple[str, int], torch.Tensor] = {}

    # -- public ------------------------------------------------------------------------------
    def set_segmentation(self, segmentation: Segmentation | None) -> None:
        """Use `segmentation` for the following full (teacher-forced) passes; None resumes tracking."""
        if segmentation is not None and not isinstance(segmentation, Segmentation):
            raise ValueError(f"segmentation must be a stepflow_ext.Segmentation or None, got {type(segmentation).__name__}")
        self._forced = segmentation

    def segmentation(self, sequences: torch.Tensor | None = None) -> Segmentation:
        """The segmentation of the current sequence.

        Without arguments: the tokens the model has seen so far. `generate` never feeds its last
        token back, so pass its output (`sequences`, B x L) to get the segmentation of all of it:
        the same rule placed offline, which by construction agrees with the online placement.
        """
        if self.tracker is None or self.tracker.length == 0:
            raise ValueError("nothing tracked yet: replace_attention needs a tokenizer (or id sets) and a forward call")
        if sequences is None:
            return self.tracker.segmentation()
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype != torch.long \
                or sequences.shape[0] != self.tracker.batch_size or sequences.shape[1] < self.tracker.length:
            raise ValueError(f"sequences must be a LongTensor ({self.tracker.batch_size}, >= {self.tracker.length}) "
                             "holding the tracked tokens and any that follow (beam search returns its best beams, "
                             "not the tracked rows: segment them with stepflow_ext.segment(sequences, "
                             "prompt_lengths, **handle.segmentation_options))")
        valid = self.tracker.seg_ids >= 0
        if not torch.equal(sequences[:, :self.tracker.length].cpu()[valid], self.tracker.ids[valid]):
            raise ValueError("sequences do not start with the tracked tokens")
        kv_start = self.tracker.kv_start()
        mask = (torch.arange(sequences.shape[1])[None, :] >= kv_start[:, None]).long()
        return segment(sequences.cpu(), self.tracker.prompt_lengths, attention_mask=mask,
                       **self.segmentation_options)

    def reset(self) -> None:
        """Forget the tracked sequence: the next forward call starts a new one whatever its ids."""
        if self.tracker is not None:
            self.tracker._rows = None
        self._smi_state, self._smi_undo, self._cache = {}, {}, None

    def trigger_counts(self, reset: bool = False) -> dict:
        """How often StepFlow acted since the last reset, per layer: {"oeb": {layer: n}, "smi": {layer: n}}.

        oeb: (batch row, head, query) rows where the OEB rule changed the attention (the bridge rule
        fired; with the odds rule, a locked row). smi: tokens that got the value injection (counted
        once per layer, not per head). Teacher-forced and decoding passes both count."""
        out = {"oeb": {}, "smi": {}}
        for (kind, layer), n in sorted(self._counts.items()):
            out[kind][layer] = int(n)
        if reset:
            self._counts.clear()
        return out

    def pool_oeb_args(self, layer: int) -> dict:
        """Keyword arguments of ops.step_saliency_pool for `layer` in the current pass: the OEB
        bounds and rule when the layer runs OEB (step_saliency then measures A'), else {}."""
        call = self._call
        if call is None or layer not in self._oeb or self.control is not None:
            return {}
        c = self.config
        return dict(oeb_bounds=call.bounds, oeb_rule=c.oeb_rule, oeb_strength=c.oeb_strength,
                    oeb_tau_max=c.oeb_tau_max, oeb_eps=ops.OEB_EPS)

    def restore(self) -> None:
        """Put the model back to stock: its own attention everywhere, no hooks."""
        if self._token is None:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if getattr(self.model, "__dict__", {}).get("generate") is getattr(self, "_generate_wrapper", None):
            del self.model.generate
        hf.Installed.on(self.model).pop(self._token)
        self._token = None
        if getattr(self.model, "_stepflow_handle", None) is self:
            del self.model._stepflow_handle

    @property
    def active(self) -> bool:
        return self._token is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()

    # -- per call ------------------------------------------------------------------------------
    def _count(self, kind, layer, n):
        key = (kind, layer)
        n = n.detach().to("cpu" if n.device.type == "cpu" else n.device, torch.long)
        self._counts[key] = self._counts[key] + n if key in self._counts else n

    def _before_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            raise ValueError("StepFlow needs input_ids or inputs_embeds")
        batch, length = (input_ids.shape if input_ids is not None else embeds.shape[:2])
        cache = _cache_of(kwargs)
        past = _cache_length(cache)
        mask = kwargs.get("attention_mask")
        first_of_generate, self._generate_first = self._generate_first, False
        device = (input_ids if input_ids is not None else embeds).device
        # generate's prompt still going in (prefill_chunk_size): its chunks may hold padding only
        prefilling = self._generate_prompt is not None and past + length <= self._generate_prompt[0]
        if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            kv_start, left_padded = padding_of(mask, batch, past + length, allow_empty=prefilling)
            if mask is not None and past > 0 and not prefilling and not bool(mask[:, past:].all()):
                raise ValueError("attention_mask masks some of the new tokens of a cached call: StepFlow tracks every "
                                 "token it is fed (pad on the left, before the prompt)")
        else:
            kv_start = padding_of_prepared(mask, batch, past, length)
            left_padded = bool((kv_start > 0).any())
        if self._forced is not None:
            self._call = self._forced_call(self._forced, batch, past, length, kv_start, device)
            return
        if self.tracker is None:
            raise ValueError("StepFlow cannot place tokens into steps: pass tokenizer= (or boundary_token_ids= and "
                             "think_end_token_ids=) to replace_attention, or call handle.set_segmentation(seg)")
        if input_ids is None:
            raise ValueError("online step tracking needs input_ids; with inputs_embeds call "
                             "handle.set_segmentation(seg) first")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            valid = mask.to("cpu", torch.bool)                                   # (B, past + n)
        else:
            valid = torch.arange(past + length)[None, :] >= kv_start[:, None]
        if past == 0:
            if not left_padded and not bool(valid[:, -1].all()):
                raise ValueError("online tracking needs left padding (the prompt's last token must be real)")
            if cache is None and not first_of_generate:
                self._call = self._follow(input_ids, valid, kv_start, device)
                return
            update = self._start(input_ids, valid, first_of_generate)
        else:
            update = self._continue(cache, past, batch, kv_start, input_ids, valid[:, past:] if prefilling else None)
        self._bind(cache)
        seg_kinds = kinds_tensor(self.tracker.kinds)
        channel = torch.where(update.seg_ids >= 0, seg_kinds.gather(1, update.seg_ids.clamp(min=0)),
                              torch.full_like(update.seg_ids, -1))
        positions = torch.arange(past, past + length)
        c = self.config
        bounds = oeb_bounds(c.oeb_rule, channel, update.seg_start, update.think_start, update.summary_start,
                            kv_start, positions, c.num_sink)
        windows = smi_windows(update.prev_step, c.smi_window)
        self._call = _Call(update.seg_ids.to(device), seg_kinds.to(device), kv_start.to(device), bounds.to(device),
                           windows.to(device), functional=False, past=past)

    def _start(self, input_ids, valid, first_of_generate):
        """A new sequence: the call's tokens are the prompt, except in generate's first call, whose
        tokens after generate's input (assisted decoding's first candidates) are generated ones, and
        whose prompt may go on in the next calls (a prefill in chunks, prefill_chunk_size)."""
        self._smi_state, self._smi_undo = {}, {}
        prompt, prompt_mask = (self._generate_prompt if first_of_generate else None) or (None, None)
        ids = input_ids.cpu()
        if prompt is None or prompt == ids.shape[1]:
            update = self.tracker.start(ids, valid)
        elif prompt > ids.shape[1]:
            counts = [prompt] * ids.shape[0] if prompt_mask is None else prompt_mask.sum(dim=1).tolist()
            update = self.tracker.start(ids, valid, prompt_lengths=counts)
        else:
            head = self.tracker.start(ids[:, :prompt], valid[:, :prompt])
            tail = self.tracker.feed(ids[:, prompt:])
            update = TrackerUpdate(*(torch.cat([h, t], dim=1) for h, t in zip(head[:5], tail[:5])), tail.kinds,
                                   tail.closed)
        return update

    def _continue(self, cache, past, batch, kv_start, input_ids, new_valid=None):
        """A cached call: the cache holds `past` tokens of the tracked sequence; roll back if it shrank.
        new_valid: which new columns are real (a chunk of generate's prompt; else all of them)."""
        tracked = self.tracker.length
        bound = self._cache() if self._cache is not None else None
        if tracked == 0:
            raise ValueError(f"the KV cache holds {past} tokens but StepFlow tracked none: start each sequence with "
                             "an empty cache (StepFlow must see every token)")
        if cache is not bound and past != tracked:
            raise ValueError(f"the KV cache holds {past} tokens but StepFlow tracked {tracked} in another cache: "
                             "StepFlow follows the cache it saw the sequence grow in (crops and beam reorders of it "
                             "included); to go on from a copied or older cache, run its tokens again with an empty "
                             "cache")
        if past > tracked:
            raise ValueError(f"the KV cache holds {past} tokens but StepFlow tracked {tracked}: tokens reached the "
                             "cache without passing through the model's forward")
        if batch != self.tracker.batch_size:
            raise ValueError(f"the call has {batch} rows but StepFlow tracks {self.tracker.batch_size}: the cache's "
                             "batch changed without reorder_cache / batch_select_indices / batch_repeat_interleave")
        if past < tracked:      # the cache was cropped (rejected candidates of assisted / prompt-lookup decoding)
            self._rollback(past)
        update = self.tracker.feed(input_ids.cpu(), new_valid)
        if not torch.equal(kv_start, self.tracker.kv_start()):
            raise ValueError("the attention mask's left padding differs from the tracked sequence's")
        return update

    def _follow(self, input_ids, valid, kv_start, device):
        """A call without cache (use_cache=False): the whole sequence again (StepTracker.follow)."""
        self.tracker.follow(input_ids.cpu(), valid)
        self._smi_state, self._smi_undo, self._cache = {}, {}, None
        seg = self.tracker.segmentation()
        call = self._call_from(seg, kv_start, input_ids.shape[1], device, functional=False)
        return call

    def _rollback(self, length):
        """Tracker and residual decode state back to `length` tokens (the cache was cropped)."""
        for layer, (start, snap, hidden, seg_ids, kinds) in list(self._smi_undo.items()):
            if length < start:
                raise ValueError(f"the KV cache was cropped to {length} tokens, further back than the residual SMI "
                                 f"rule's decode state can be rolled back (to {start}: the last {ROLLBACK_TOKENS} "
                                 "tokens of the last call); use smi_rule='value' or crop less")
        self.tracker.truncate(length)
        c = self.config
        for layer, (start, snap, hidden, seg_ids, kinds) in list(self._smi_undo.items()):
            keep = length - start
            state = tuple(t.clone() for t in snap)
            if keep > 0:
                ops.step_momentum_decode_(hidden[:, :keep], seg_ids[:, :keep], kinds, state, c.smi_beta, c.smi_gamma)
            self._smi_state[layer] = state
            self._smi_undo[layer] = (start, snap, hidden[:, :keep], seg_ids[:, :keep], kinds)

    def _reorder(self, index):
        """Rows reordered / repeated / dropped (beam search's reorder_cache and the like)."""
        if self.tracker is None or self.tracker._rows is None:
            return
        index = index.to("cpu", torch.long).flatten()
        self.tracker.select(index.tolist())
        for layer, state in self._smi_state.items():
            self._smi_state[layer] = tuple(t.index_select(0, index.to(t.device)) for t in state)
        for layer, (start, snap, hidden, seg_ids, kinds) in self._smi_undo.items():
            sel = [t.index_select(0, index.to(t.device)) for t in (hidden, seg_ids, kinds)]
            self._smi_undo[layer] = (start, tuple(t.index_select(0, index.to(t.device)) for t in snap), *sel)

    def _bind(self, cache):
        """The tracked sequence lives in `cache`: watch its batch reorders."""
        from transformers.cache_utils import Cache
        if not isinstance(cache, Cache):
            self._cache = None
            return
        self._cache = weakref.ref(cache)
        _watch(cache, self)

    def _after_forward(self, module, args, kwargs, output):
        """Bind the cache the model created (a first call without cache but with use_cache)."""
        if self._forced is not None or self.tracker is None or self._call is None or self._call.functional:
            return None
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        bound = self._cache() if self._cache is not None else None
        if cache is not None and cache is not bound and self.tracker.length == _cache_length(cache):
            self._bind(cache)
        return None

    def _call_from(self, seg, kv_start, length, device, functional, past=0):
        seg = seg.to("cpu")
        starts = seg.channel_starts()                                 # (B, 2), T where absent
        starts = torch.where(starts >= length, torch.full_like(starts, -1), starts)
        c = self.config
        bounds = oeb_bounds(c.oeb_rule, seg.channels(), seg.seg_start(), starts[:, 0:1], starts[:, 1:2], kv_start,
                            torch.arange(length), c.num_sink)
        windows = smi_windows(seg.smi_prev_step(), c.smi_window)
        return _Call(seg.seg_ids.to(device), seg.seg_kinds_tensor().to(device), kv_start.to(device), bounds.to(device),
                     windows.to(device), functional=functional, past=past)

    def _forced_call(self, seg, batch, past, length, kv_start, device):
        if past != 0:
            raise ValueError("set_segmentation is for full teacher-forced passes with an empty cache; "
                             "call handle.set_segmentation(None) before generating")
        if tuple(seg.seg_ids.shape) != (batch, length):
            raise ValueError(f"the segmentation covers {tuple(seg.seg_ids.shape)} tokens but the input is "
                             f"({batch}, {length})")
        seg_kv = seg.kv_start()
        if bool((seg_kv != kv_start).any()) and bool((kv_start > 0).any()):
            raise ValueError("the segmentation's padding (-1 seg ids) does not match attention_mask")
        return self._call_from(seg, seg_kv, length, device, functional=True)

    def _after_layer(self, layer_idx):
        """SMI rule `residual`: on the hidden state leaving the decoder layer."""
        def hook(module, args, output):
            call = self._call
            if call is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            c = self.config
            if self.control == "random-residual":
                if call.residual_targets is None:
                    call.residual_targets = controls.residual_targets(call.seg_ids, call.seg_kinds,
                                                                      all_segments_nonempty=not call.functional)
                new = controls.random_residual(hidden, call.seg_ids, call.residual_targets, c.smi_gamma,
                                               self.control_seed, layer_idx)
            elif call.functional:
                new = ops.step_momentum(hidden, call.seg_ids, call.seg_kinds, c.smi_beta, c.smi_gamma)
            else:
                new = self._residual_decode(layer_idx, hidden, call)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _residual_decode(self, layer, hidden, call):
        """The residual rule's decode op on the call's tokens, keeping what a rollback needs: the state
        before the call's last ROLLBACK_TOKENS tokens and their hidden states (the op on them is
        replayed from that state up to the cropped length: the same arithmetic, bit for bit)."""
        c = self.config
        state = self._smi_state.get(layer)
        if state is None:
            state = ops.new_momentum_state(hidden.shape[0], hidden.shape[-1], hidden.device)
            self._smi_state[layer] = state
        n = hidden.shape[1]
        split = max(0, n - ROLLBACK_TOKENS)
        parts = []
        if split:
            parts.append(ops.step_momentum_decode_(hidden[:, :split], call.seg_ids[:, :split], call.seg_kinds, state,
                                                   c.smi_beta, c.smi_gamma))
        snap = tuple(t.clone() for t in state)
        tail, seg_tail = hidden[:, split:].detach(), call.seg_ids[:, split:]
        parts.append(ops.step_momentum_decode_(tail, seg_tail, call.seg_kinds, state, c.smi_beta, c.smi_gamma))
        self._smi_undo[layer] = (call.past + split, snap, tail.clone() if split else tail, seg_tail, call.seg_kinds)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # -- generate() and the cache
    def _cache_event(self, cache, name, arg):
        """Cache.reorder_cache / batch_select_indices / batch_repeat_interleave ran on `cache`."""
        if self._cache is None or self._cache() is not cache or not self.active:
            return
        if name == "batch_repeat_interleave":
            index = torch.arange(self.tracker.batch_size).repeat_interleave(int(arg))
        else:
            index = arg if isinstance(arg, torch.Tensor) else torch.as_tensor(arg)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
        self._reorder(index)

    def _generate(self, original, args, kwargs):
        if not self.active:
            return original(*args, **kwargs)
        args, kwargs = self._check_generate(args, kwargs)
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        mask = kwargs.get("attention_mask")
        mask = mask.to("cpu", torch.bool) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._generate_prompt = (int(prompt.shape[-1]), mask) if isinstance(prompt, torch.Tensor) else None
        self._generate_first = True
        try:
            return original(*args, **kwargs)
        finally:
            self._generate_prompt, self._generate_first = None, False

    def _check_generate(self, args, kwargs):
        """Refuse the generate modes StepFlow cannot follow; turn generate's automatic torch.compile off."""
        given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        config = given if given is not None else getattr(self.model, "generation_config", None)

        def option(name):
            return kwargs[name] if name in kwargs else getattr(config, name, None)

        assistant = kwargs.get("assistant_model", args[6] if len(args) > 6 else None)
        if option("assistant_early_exit") is not None:
            raise ValueError("assistant_early_exit drafts with the model's own first layers, which StepFlow does not "
                             "support (the draft calls would be tracked as the sequence): use a separate "
                             "assistant_model or prompt_lookup_num_tokens")
        if option("use_mtp"):
            raise ValueError("use_mtp drafts with the model's own multi-token-prediction layers, which StepFlow does "
                             "not support: use a separate assistant_model or prompt_lookup_num_tokens")
        if option("speculation_type") is not None:
            raise ValueError(f"speculation_type={option('speculation_type')!r} is not supported under StepFlow: use "
                             "assistant_model (a separate model) or prompt_lookup_num_tokens")
        if assistant is not None and (assistant is self.model or getattr(assistant, "base_model", None)
                                      is self.model.base_model):
            raise ValueError("assistant_model is the model StepFlow runs on: its draft calls would be tracked as the "
                             "sequence; use a separate assistant model or prompt_lookup_num_tokens")
        if option("compile_config") is not None:
            raise ValueError("generate(compile_config=...) compiles the decode step with torch.compile, which "
                             "StepFlow does not support (its step tracking runs in Python at every forward call): "
                             "leave compile_config out (StepFlow turns generate's automatic compilation off) or "
                             "call handle.restore() first")
        if not option("disable_compile"):   # else generate compiles the decode step when the cache is static
            if "disable_compile" in kwargs or given is None:
                kwargs = dict(kwargs, disable_compile=True)
            elif "generation_config" in kwargs:
                kwargs = dict(kwargs, generation_config=_with(given, disable_compile=True))
            else:
                args = (args[0], _with(given, disable_compile=True)) + tuple(args[2:])
        return args, kwargs

    def _attention(self, inner):
        handle = self

        def attention(module, query, key, value, attention_mask, **kwargs):
            call = handle._call
            layer = module.layer_idx
            oeb, smi = layer in handle._oeb, layer in handle._smi_value
            if call is None or not (oeb or smi):
                return inner(module, query, key, value, attention_mask, **kwargs)
            c = handle.config
            valid = call.valid_length
            if key.shape[2] < valid:
                raise ValueError(f"layer {layer}'s KV cache holds {key.shape[2]} of the sequence's {valid} keys (a "
                                 "sliding-window cache drops old keys): StepFlow's OEB and SMI layers need every key; "
                                 "use a full-attention cache or leave the layer out of the config")
            k_all, v_all = (key[:, :, :valid], value[:, :, :valid]) if key.shape[2] > valid else (key, value)
            if oeb:
                window = kwargs.get("sliding_window")
                if window is not None and k_all.shape[2] > window:
                    raise ValueError(f"layer {layer} uses a sliding window of {window} tokens, which StepFlow does "
                                     "not support on this architecture yet: leave it out of oeb_layers")
                if getattr(module, "sinks", None) is not None:
                    raise ValueError(f"layer {layer} has attention sinks, which StepFlow does not support on this "
                                     "architecture yet")
                scaling = kwargs.get("scaling") or module.scaling
                if handle.control == "random-attn":
                    if torch.is_grad_enabled() and query.requires_grad:
                        raise ValueError("the random-attn control computes no gradients (its chunked rows would all "
                                         "be kept for backward; step_saliency does not model it): run the model "
                                         "under torch.no_grad() — generate() already does")
                    out = controls.random_group_attention(query, k_all, v_all, call.kv_start, call.bounds, c.oeb_rule,
                                                          c.oeb_strength, c.oeb_tau_max, scaling,
                                                          handle.control_seed, layer)
                else:
                    out, _, stats = ops.oeb_attention(query, k_all, v_all, call.kv_start, call.bounds, c.oeb_rule,
                                                      c.oeb_strength, c.oeb_tau_max, ops.OEB_EPS, scale=scaling)
                    handle._count("oeb", layer, stats[..., 4].sum())
                out, weights = out.transpose(1, 2).contiguous(), None
            else:
                out, weights = inner(module, query, key, value, attention_mask, **kwargs)
            if smi:
                if handle.control == "random-residual":
                    out = controls.random_value_injection(out, v_all, call.windows, c.smi_alpha, c.smi_window,
                                                          handle.control_seed, layer)
                else:
                    out = ops.smi_value(out, v_all, call.windows, c.smi_alpha, c.smi_window)
                handle._count("smi", layer, (call.windows[..., 0] >= 0).sum())
            return out, weights
        return attention


SEGMENTATION_OPTIONS = ("think_start", "think_end", "steps", "summary_steps", "step_delimiter", "boundary_token_ids",
                        "think_end_token_ids")


def replace_attention(model, config: StepFlowConfig | None = None, tokenizer=None, *, control=None, control_seed=0,
                      **segmentation) -> StepFlowHandle:
    """Apply StepFlow to `model` in place and return a handle (see StepFlowHandle).

    config: default StepFlowConfig.default_for(model), the paper's configuration (design.md 2.5).
    tokenizer and the segmentation options of `segment()` (think_start="auto", think_end="auto",
    steps="sentence", summary_steps=False, step_delimiter="\\n\\n", or the id fast path
    boundary_token_ids= and think_end_token_ids=) place the tokens into question, thinking steps
    and summary as they are generated (design.md 2.1).

    control: None (or "none"): StepFlow. "random-attn": the OEB layers apply OEB's per-row logit
    shifts to random key sets of the sizes of OEB's groups (no gradients; slower than OEB, for
    evaluation). "random-residual": the SMI layers add, at the tokens SMI changes, a random vector of
    the norm of SMI's change. The other component runs as configured. control_seed (int in [0, 2^32))
    fixes the random draws; decode and prefill draw the same. docs/method.md, "Controls".

    A second call on a model that already has StepFlow raises ValueError: restore the first
    handle before installing another configuration.
    """
    hf.check_model(model)
    if config is None:
        config = StepFlowConfig.default_for(model)
    if not isinstance(config, StepFlowConfig):
        raise ValueError(f"config must be a StepFlowConfig, got {type(config).__name__}")
    config.check_layers(hf.num_layers(model))
    unknown = set(segmentation) - set(SEGMENTATION_OPTIONS)
    if unknown:
        raise ValueError(f"unknown replace_attention options {sorted(unknown)}; segmentation options are "
                         f"{', '.join(SEGMENTATION_OPTIONS)}")
    if control == "none":
        control = None
    if control is not None and control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}: use None, 'random-attn' or 'random-residual'")
    if control == "random-attn" and not config.oeb_layers:
        raise ValueError("control 'random-attn' replaces OEB in config.oeb_layers, which is empty: it would do nothing")
    if control == "random-residual" and not config.smi_layers:
        raise ValueError("control 'random-residual' replaces SMI in config.smi_layers, which is empty: "
                         "it would do nothing")
    control_seed = controls.check_seed(control_seed)
    if getattr(model, "_stepflow_handle", None) is not None:
        raise ValueError("StepFlow is already applied to this model: call handle.restore() before replacing it")
    tracker = None
    options = dict(segmentation)
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
        options["model"] = model  # "auto" markers per model family (segment.markers_for)
    if tokenizer is not None or "boundary_token_ids" in options or "think_end_token_ids" in options:
        tracker = StepTracker(**options)
    handle = StepFlowHandle(model, config, tracker, control, control_seed, options)
    handle._token = hf.Installed.on(model).push(handle._attention)
    # On the base model, so that generate(), model(...) and step_saliency's direct call all pass here.
    handle._hooks.append(model.base_model.register_forward_pre_hook(handle._before_forward, with_kwargs=True))
    handle._hooks.append(model.base_model.register_forward_hook(handle._after_forward, with_kwargs=True))
    _watch_caches()
    original_generate = model.generate

    def generate(*args, **kwargs):
        return handle._generate(original_generate, args, kwargs)

    generate.__doc__ = original_generate.__doc__
    handle._generate_wrapper = generate
    model.generate = generate
    if config.smi_rule == "residual":
        layers = hf.decoder_layers(model)
        for idx in config.smi_layers:
            handle._hooks.append(layers[idx].register_forward_hook(handle._after_layer(idx)))
    model._stepflow_handle = handle
    return handle
