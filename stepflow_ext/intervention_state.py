"""The per-call bookkeeping of replace_attention (intervention.py): from a forward call's ids, KV
cache and attention mask to what the OEB and SMI layers need for its tokens (`_Call`).

The padding read off a 2D mask or a prepared 4D mask (`padding_of`, `padding_of_prepared`), the
placement from channels and steps to the ops' inputs (`oeb_bounds`, `smi_windows`), the watch on
transformers' Cache methods that reorder batch rows (`_watch_caches`), and `_Tracking`, the base
class of StepFlowHandle that places each call's tokens with the step tracker, following the KV
cache (intervention.py's docstring: the decoding modes followed).
"""
from __future__ import annotations

import weakref

import torch

from . import ops
from .segment import TrackerUpdate


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
    # A valid mask is 0..0 1..1 0..0 per row: one contiguous run of real tokens (counted by its starts).
    runs = mask[:, 0].long() + (mask[:, 1:] & ~mask[:, :-1]).sum(dim=1)
    empty = runs == 0
    if bool((runs > 1).any()) or (bool(empty.any()) and not allow_empty):
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



class _Tracking:
    """The per-call half of StepFlowHandle (its base class): the forward pre-hook places each call's
    tokens into channels and steps (a new sequence, a cached continuation, a whole sequence again, or
    a given segmentation) and builds the call's `_Call`; crops and batch reorders of the KV cache roll
    back and reorder the tracker and the residual rule's decode state. It works on the attributes that
    StepFlowHandle.__init__ sets."""

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
