"""StepFlow under every decoding mode of `generate` (issue #14), held against the float64 oracle.

Each mode generates under replace_attention on a random model, and the returned sequences are
scored teacher-forced by tests/stepflow_oracle.py (the method written from stepflow_ext.reference
with materialized attention, float64, none of the tracking code): the raw logits generate returns
(or beam search's sequences_scores) must be the oracle's on the same tokens.

The traces have structure: a logits processor (`Steer`) lets the model pick only the next token
of a reasoning trace at most positions and, every few tokens, one of a small free set (" x",
" is", ".", ...). It is a function of the ids alone, so greedy, assisted, prompt-lookup and beam
search obey the same constraint; the allowed tokens keep their raw scores. The trace's sentences
close steps (the paper's sentence rule) and "</think>" opens the summary; the free slots make
beams and the assistant's drafts differ, so steps close inside rejected candidates and inside
reordered beams (the tests check that this happened: they fail on tracking that ignores crops
and reorders).
"""
from __future__ import annotations

import pytest
import torch
import transformers

import stepflow_ext as sf
from stepflow_ext.segment import StepTracker
from hf_models import model as make_model, tokenizer as make_tokenizer
from stepflow_oracle import reference_logits

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Question: what is 12 + 7? <think>", "Let x = 3. Then 2x + 1 = 7? Answer step by step. <think>"]
TRACE = "First, 12 + 7 means adding seven to twelve. So 12 + 7 = 19 in the end. Check: 19 - 7 = 12.</think> It is 19."
# prompt lookup proposes what followed the last tokens earlier in the text: a repeated sentence
LOOKUP_TRACE = "First, 12 + 7 means adding seven to twelve. " * 3 + "Check: 19 - 7 = 12, which matches.</think> It is 19."
FREE = (" x", " is", " the", ".", " twelve")
BEAM_FREE = FREE + ("</think>",)   # beams that end the thinking early and beams that do not
EVERY = 4          # a free slot after every EVERY-th trace token
SHARP = 6.0        # peaky attention: the bridge rule fires on these random models
ARCHS = ("qwen2", "llama")
PAPER, EARLIER = "paper", "earlier"
ATOL = 1e-4


class Steer(transformers.LogitsProcessor):
    """Masks all tokens but the plan's at each generated position (the allowed ones keep their scores)."""

    def __init__(self, prompt_columns: int, plan: list):
        self.prompt_columns, self.plan = prompt_columns, plan

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_columns
        allowed = self.plan[min(t, len(self.plan) - 1)]
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        keep[allowed] = True
        return scores.masked_fill(~keep, float("-inf"))


def plan_for(tok, trace=TRACE, free_words=FREE):
    free = [tok(w)["input_ids"][-1] for w in free_words]
    plan = []
    for i, t in enumerate(tok(trace)["input_ids"]):
        plan.append([t])
        if i % EVERY == EVERY - 1 and tok.decode([t]) != "</think>":
            plan.append(free)
    return plan


def prompts(tok, rows=2, texts=PROMPTS):
    """Left-padded prompts (rows 1 or 2)."""
    ids = [tok(p)["input_ids"] for p in texts[:rows]]
    width = max(map(len, ids))
    return (torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids]),
            torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids]))


def config(model, rules):
    """default_for(model) (the paper's: bridge OEB, value SMI) or the earlier rules (odds, residual)."""
    if rules == PAPER:
        return sf.StepFlowConfig.default_for(model)
    return sf.StepFlowConfig(oeb_layers=(0, 1), oeb_rule="odds", oeb_strength=0.8, smi_layers=(2, 3),
                             smi_rule="residual", smi_gamma=0.3)


def generate(model, cfg, tok, ids, mask, plan, seg_opts=None, spy=None, **kw):
    """generate under StepFlow, steered by the plan; returns the output and the handle's trigger counts."""
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok, **(seg_opts or {})) as handle:
        if spy is not None:
            spy(handle)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=len(plan), pad_token_id=0,
                             logits_processor=transformers.LogitsProcessorList([Steer(ids.shape[1], plan)]),
                             return_dict_in_generate=True, **kw)
        return out, handle.trigger_counts()


def oracle(model, cfg, tok, seqs, prompt_mask, seg_opts=None):
    """The float64 oracle teacher-forced on returned sequences: (logits (B, T, V), segmentation)."""
    rows = seqs.shape[0]
    prompt_mask = prompt_mask.repeat_interleave(rows // prompt_mask.shape[0], dim=0)
    mask = torch.cat([prompt_mask, torch.ones(rows, seqs.shape[1] - prompt_mask.shape[1], dtype=torch.long)], 1)
    seg = sf.segment(seqs, prompt_mask.sum(1).tolist(), tokenizer=tok, attention_mask=mask, **(seg_opts or {}))
    return reference_logits(model, seqs, mask, seg, cfg), seg


def assert_logits_are_the_oracles(out, model, cfg, tok, prompt_mask, seg_opts=None):
    """generate's raw logits (output_logits) == the oracle's at every generated position."""
    expected, seg = oracle(model, cfg, tok, out.sequences, prompt_mask, seg_opts)
    p = prompt_mask.shape[1]
    got = torch.stack(out.logits, 1).double()
    torch.testing.assert_close(got, expected[:, p - 1:p - 1 + got.shape[1]], atol=ATOL, rtol=ATOL)
    return seg


def assert_it_acted(counts, cfg, seg, every_row=True):
    structured = [k.count("step") >= 3 and k[-1] == "summary" for k in seg.kinds]
    assert all(structured) if every_row else any(structured), seg.kinds
    if cfg.oeb_rule == "bridge":
        assert sum(counts["oeb"].values()) > 0, "the bridge rule never fired"
    if cfg.smi_rule == "value":
        assert sum(counts["smi"].values()) > 0, "SMI never injected"


def spy_rollbacks(events):
    """Record, for every rollback of the tracker, whether it dropped a step closure."""
    def install(handle):
        tracker = handle.tracker
        truncate = tracker.truncate

        def spy(length):
            dropped = any(any(p >= length for p in row.closing) for row in tracker._rows)
            events.append((tracker.length, length, dropped))
            truncate(length)
        tracker.truncate = spy
    return install


def spy_reorders(events):
    """Record, for every row reorder, whether it moved a row onto one with a different segmentation."""
    def install(handle):
        tracker = handle.tracker
        select = tracker.select

        def spy(index):
            index = list(index)
            state = [(tuple(r.kinds), tuple(r.closing)) for r in tracker._rows]
            events.append(any(state[i] != state[b] for b, i in enumerate(index)))
            select(index)
        tracker.select = spy
    return install


# --------------------------------------------------------------------------- the table's rows


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rules", [PAPER, EARLIER])
def test_greedy_sampling_num_return_sequences(arch, rules):
    """Row 1: greedy on a left-padded batch and sampling with num_return_sequences equal the oracle."""
    tok, model = make_tokenizer(), make_model(arch, sharpen=SHARP)
    cfg, plan = config(model, rules), plan_for(tok)
    ids, mask = prompts(tok)
    out, counts = generate(model, cfg, tok, ids, mask, plan, do_sample=False, output_logits=True)
    assert_it_acted(counts, cfg, assert_logits_are_the_oracles(out, model, cfg, tok, mask))
    greedy = out.sequences
    torch.manual_seed(0)
    out, _ = generate(model, cfg, tok, ids, mask, plan, do_sample=True, num_return_sequences=2, output_logits=True)
    assert out.sequences.shape[0] == 4
    assert_logits_are_the_oracles(out, model, cfg, tok, mask)
    if rules == PAPER:   # the text-generation pipeline runs the same generate
        with sf.replace_attention(model, cfg, tokenizer=tok):
            pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
            text = pipe(PROMPTS[0], max_new_tokens=len(plan), do_sample=False, return_full_text=False,
                        logits_processor=transformers.LogitsProcessorList([Steer(len(tok(PROMPTS[0])["input_ids"]),
                                                                                 plan)]))[0]["generated_text"]
        assert text == tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rules", [PAPER, EARLIER])
def test_beam_search_scores_are_the_oracles_log_probs(arch, rules):
    """num_beams=3 on a left-padded batch: each returned sequence's score is the oracle's mean
    log-probability of its generated tokens (length_penalty 1); beams were reordered onto beams with
    other steps (the free slots may end the thinking early)."""
    tok, model = make_tokenizer(), make_model(arch, sharpen=SHARP)
    cfg, plan = config(model, rules), plan_for(tok, free_words=BEAM_FREE)
    ids, mask = prompts(tok)
    moves = []
    out, counts = generate(model, cfg, tok, ids, mask, plan, spy=spy_reorders(moves), num_beams=3,
                           num_return_sequences=3, do_sample=False, output_scores=True)
    assert any(moves), "no beam was reordered onto a beam with a different segmentation"
    expected, seg = oracle(model, cfg, tok, out.sequences, mask)
    assert_it_acted(counts, cfg, seg, every_row=False)
    p = ids.shape[1]
    logp = torch.log_softmax(expected[:, p - 1:-1], -1).gather(2, out.sequences[:, p:, None]).squeeze(2)
    torch.testing.assert_close(out.sequences_scores.double(), logp.mean(1), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rules", [PAPER, EARLIER])
@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup"])
def test_assisted_and_prompt_lookup_equal_greedy_and_the_oracle(arch, rules, mode):
    """Assisted decoding (a second random model drafts) and prompt-lookup decoding return plain greedy's
    tokens and the oracle's logits; candidates holding a step closure were rejected and rolled back."""
    tok, model = make_tokenizer(), make_model(arch, sharpen=SHARP)
    cfg, plan = config(model, rules), plan_for(tok, LOOKUP_TRACE if mode == "prompt_lookup" else TRACE)
    ids, mask = prompts(tok, 1)
    greedy, _ = generate(model, cfg, tok, ids, mask, plan, do_sample=False, output_logits=True)
    extra = (dict(assistant_model=make_model(arch, seed=1, sharpen=SHARP)) if mode == "assistant"
             else dict(prompt_lookup_num_tokens=6))
    rollbacks = []
    out, counts = generate(model, cfg, tok, ids, mask, plan, spy=spy_rollbacks(rollbacks), do_sample=False,
                           output_logits=True, **extra)
    assert torch.equal(out.sequences, greedy.sequences)
    assert any(dropped for _, _, dropped in rollbacks), f"no rejected candidate closed a step: {rollbacks}"
    seg = assert_logits_are_the_oracles(out, model, cfg, tok, mask)
    assert_it_acted(counts, cfg, seg)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rules", [PAPER, EARLIER])
def test_static_cache_equals_dynamic_and_the_oracle(arch, rules):
    """cache_implementation="static" (preallocated keys, a prepared 4D mask with left padding) gives
    the dynamic cache's tokens and logits, and the oracle's; beam search on a static cache too."""
    tok, model = make_tokenizer(), make_model(arch, sharpen=SHARP)
    cfg, plan = config(model, rules), plan_for(tok)
    ids, mask = prompts(tok)
    dynamic, _ = generate(model, cfg, tok, ids, mask, plan, do_sample=False, output_logits=True)
    static, counts = generate(model, cfg, tok, ids, mask, plan, do_sample=False, output_logits=True,
                              cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1), atol=1e-5, rtol=1e-5)
    assert_it_acted(counts, cfg, assert_logits_are_the_oracles(static, model, cfg, tok, mask))
    beams = dict(num_beams=2, num_return_sequences=2, do_sample=False, output_scores=True)
    short = plan[:24]
    a, _ = generate(model, cfg, tok, ids, mask, short, **beams)
    b, _ = generate(model, cfg, tok, ids, mask, short, cache_implementation="static", **beams)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rules", [PAPER, EARLIER])
def test_no_cache_equals_cached_and_the_oracle(arch, rules):
    """use_cache=False re-feeds the whole sequence at every step: each call continues the tracked rows
    (beam search's reordered rows too), so it equals the cached run and the oracle. With
    think_start=None (the prompt is the question) restarting would lose the steps altogether."""
    tok, model = make_tokenizer(), make_model(arch, sharpen=SHARP)
    cfg, plan = config(model, rules), plan_for(tok)
    opts = dict(think_start=None)
    ids, mask = prompts(tok, texts=[p.replace(" <think>", "") for p in PROMPTS])
    cached, _ = generate(model, cfg, tok, ids, mask, plan, opts, do_sample=False, output_logits=True)
    plain, counts = generate(model, cfg, tok, ids, mask, plan, opts, do_sample=False, output_logits=True,
                             use_cache=False)
    assert torch.equal(plain.sequences, cached.sequences)
    torch.testing.assert_close(torch.stack(plain.logits, 1), torch.stack(cached.logits, 1), atol=1e-5, rtol=1e-5)
    assert_it_acted(counts, cfg, assert_logits_are_the_oracles(plain, model, cfg, tok, mask, opts))
    short = plan[:20]
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True)
    a, _ = generate(model, cfg, tok, ids, mask, short, opts, **beams)
    b, _ = generate(model, cfg, tok, ids, mask, short, opts, use_cache=False, **beams)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- hand-written decoding


def decode_by_hand(model, cfg, tok, steps, seg_opts=None):
    """Incremental decoding written by hand, where the caller crops and reorders the cache itself.
    `steps` is a list of ("feed", ids (B, n)) / ("crop", n) / ("reorder", index) / ("repeat", r);
    returns the rows' final ids, their prompt lengths and the logits of every fed token (B, T, V)."""
    cache = transformers.DynamicCache(config=model.config)
    ids, logits, prompt = None, None, None
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok, **(seg_opts or {})):
        for kind, arg in steps:
            if kind == "feed":
                out = model(arg, cache=cache, use_cache=True)
                ids = arg if ids is None else torch.cat([ids, arg], 1)
                logits = out.logits if logits is None else torch.cat([logits, out.logits], 1)
                prompt = prompt if prompt is not None else arg.shape[1]
            elif kind == "crop":
                cache.crop(-arg)
                ids, logits = ids[:, :-arg], logits[:, :-arg]
            else:
                index = arg if kind == "reorder" else torch.arange(ids.shape[0]).repeat_interleave(arg)
                (cache.reorder_cache if kind == "reorder" else cache.batch_repeat_interleave)(
                    index if kind == "reorder" else arg)
                ids, logits = ids[index], logits[index]
    return ids, prompt, logits


@pytest.mark.parametrize("rules", [PAPER, EARLIER])
def test_hand_written_crop_reorder_and_repeat(rules):
    """cache.crop (into a call, into the prefill), cache.reorder_cache and cache.batch_repeat_interleave
    by hand: every fed token's logits are the oracle's on the rows' final tokens."""
    tok, model = make_tokenizer(), make_model("qwen2", sharpen=SHARP)
    cfg = config(model, rules)
    trace = tok(TRACE)["input_ids"]
    other = tok(TRACE.replace("seven", "7").replace("Check", "So"))["input_ids"]
    prompt = tok(PROMPTS[0])["input_ids"]
    rows = lambda a, b: torch.tensor([a, b])                                    # noqa: E731
    p = len(prompt)
    steps = [("feed", rows(prompt + trace[:12], prompt + other[:12])), ("crop", 5)]   # back into the prefill
    at = 7
    for t in range(at, 40, 6):            # chunks of 6 candidates, the last 3 rejected
        steps += [("feed", rows(trace[t:t + 6], other[t:t + 6])), ("crop", 3)]
        at = t + 3
        steps += [("feed", rows(trace[at:at + 3], other[at:at + 3]))]
    steps += [("reorder", torch.tensor([1, 0]))]
    steps += [("feed", rows(trace[at + 3:at + 9], other[at + 3:at + 9])), ("repeat", 2)]
    steps += [("feed", torch.tensor([[t] for t in (trace[at + 9], other[at + 12], trace[at + 12], other[at + 9])]))]
    ids, prompt_len, logits = decode_by_hand(model, cfg, tok, steps)
    assert ids.shape == (4, p + at + 10) and prompt_len == p + 12    # a first call's tokens are the prompt
    seg = sf.segment(ids, prompt_len, tokenizer=tok)
    assert all(k.count("step") >= 2 for k in seg.kinds), seg.kinds
    expected = reference_logits(model, ids, torch.ones_like(ids), seg, cfg)
    torch.testing.assert_close(logits.double(), expected, atol=ATOL, rtol=ATOL)


def test_no_cache_rows_that_do_not_extend_start_new_sequences():
    """Without cache, a row whose ids extend a tracked row continues it (its prompt stays the first
    call's), a row that does not starts a new sequence whose prompt is all of its tokens (the rule of
    docs/method_decoding.md); handle.reset() forgets the tracked rows."""
    tok, model = make_tokenizer(), make_model("qwen2", sharpen=SHARP)
    cfg, opts = config(model, PAPER), dict(think_start=None)
    trace = tok(TRACE)["input_ids"]
    prompt = tok("Question: what is 12 + 7?")["input_ids"]
    p = len(prompt)
    first = torch.tensor([prompt + trace[:20]] * 2)
    second = torch.tensor([prompt + trace[:30], prompt[:3] + trace[:p + 27]])     # row 1 does not extend
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok, **opts) as handle:
        model(first[:, :p])                       # the prompt: a new sequence
        model(first)
        got = model(second).logits
        assert handle.tracker.prompt_lengths == [p, second.shape[1]]
        handle.reset()
        fresh = model(second).logits
        assert handle.tracker.prompt_lengths == [second.shape[1]] * 2
    seg = sf.segment(second, [p, second.shape[1]], tokenizer=tok, **opts)
    assert seg.kinds[0].count("step") >= 2 and seg.kinds[1] == ["question"]
    torch.testing.assert_close(got.double(), reference_logits(model, second, torch.ones_like(second), seg, cfg),
                               atol=ATOL, rtol=ATOL)
    assert (fresh[0] - got[0]).abs().max() > 1e-3    # a restart would have lost row 0's steps


# --------------------------------------------------------------------------- refused modes


def test_modes_that_cannot_be_followed_raise():
    tok, model = make_tokenizer(), make_model("qwen2", sharpen=SHARP)
    ids, mask = prompts(tok, 1)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, do_sample=False)
    with torch.no_grad(), sf.replace_attention(model, config(model, PAPER), tokenizer=tok):
        with pytest.raises(ValueError, match="assistant_early_exit"):
            model.generate(assistant_early_exit=1, **kw)
        with pytest.raises(ValueError, match="assistant_model is the model"):
            model.generate(assistant_model=model, **kw)
        with pytest.raises(ValueError, match="compile_config"):
            model.generate(compile_config=transformers.CompileConfig(), **kw)
        # a copied cache that does not continue the tracked tokens
        cache = transformers.DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)
        import copy
        old = copy.deepcopy(cache)
        model(ids[:, :2], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="another cache"):
            model(ids[:, :1], cache=old, use_cache=True)
        # a 4D mask that is not the causal mask of left-padded rows
        n = ids.shape[1]
        bad = torch.ones(1, 1, n, n, dtype=torch.bool)
        with pytest.raises(ValueError, match="causal mask"):
            model(ids, attention_mask=bad, cache=transformers.DynamicCache(config=model.config), use_cache=True)
        # the left padding changed between calls
        cache = transformers.DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)
        pad = torch.ones(1, n + 1, dtype=torch.long)
        pad[0, 0] = 0
        with pytest.raises(ValueError, match="left padding differs"):
            model(ids[:, :1], attention_mask=pad, cache=cache, use_cache=True)


def test_residual_rollback_past_its_window_raises():
    tok, model = make_tokenizer(), make_model("qwen2")
    long = torch.tensor([tok(PROMPTS[0] + " " + TRACE * 8)["input_ids"][:300]])
    assert long.shape[1] == 300
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad(), sf.replace_attention(model, config(model, EARLIER), tokenizer=tok):
        model(long, cache=cache, use_cache=True)
        cache.crop(-200)                    # inside the last 256 tokens of the call: fine
        model(long[:, 100:101], cache=cache, use_cache=True)
        cache.crop(-80)                     # 21 tokens: before the last call's kept window
        with pytest.raises(ValueError, match="residual SMI rule"):
            model(long[:, 21:22], cache=cache, use_cache=True)


def test_sliding_window_cache_follows_the_window():
    """Mistral with a window of 8: its sliding-window cache drops old keys, and the OEB and SMI layers read
    the keys it keeps (every key inside the window): generate gives the logits of a teacher-forced pass,
    which equal the float64 oracle (keys j > i - 8 only)."""
    tok = make_tokenizer()
    model = make_model("mistral", sharpen=SHARP)
    model.config.sliding_window = 8
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 8
    ids, mask = prompts(tok, 2)
    cfg = config(model, PAPER)
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok) as handle:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        assert out.past_key_values.layers[0].keys.shape[2] < 8 < out.sequences.shape[1]   # keys were dropped
        seg = handle.segmentation(out.sequences)
        full_mask = torch.cat([mask, torch.ones(2, 12, dtype=mask.dtype)], 1)
        handle.set_segmentation(seg)
        full = model(out.sequences, attention_mask=full_mask).logits
    decoded = torch.stack(out.logits, 1)
    p = ids.shape[1]
    torch.testing.assert_close(decoded, full[:, p - 1:-1], atol=1e-4, rtol=1e-4)
    expected = reference_logits(model, out.sequences, full_mask, seg, cfg)[:, p - 1:-1]
    torch.testing.assert_close(decoded.double(), expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the tracker alone


@pytest.mark.parametrize("opts", [{}, dict(steps="paragraph", summary_steps=True), dict(think_start=None)])
def test_tracker_truncate_select_follow_equal_offline(opts):
    """StepTracker fed in random chunks, rolled back to random lengths (within and beyond its
    snapshots), rows reordered and repeated, whole sequences followed: after every operation its
    segmentation equals segment() of the rows' current tokens."""
    import random
    rng = random.Random(0)
    tok = make_tokenizer()
    texts = [TRACE + "\n\nDone. It is 19.\n\nYes.", TRACE.replace("seven", "7") + "\n\nSo it is.\n\nOk."]
    ids, mask = prompts(tok)
    w = ids.shape[1]
    gen = [tok(t)["input_ids"] for t in texts]
    g = min(map(len, gen))
    seqs = [ids[b].tolist() + gen[b][:g] for b in range(2)]
    masks = [mask[b].tolist() + [1] * g for b in range(2)]
    prompt = mask.sum(1).tolist()
    tracker = StepTracker(tokenizer=tok, **opts)
    tracker.start(ids, mask)
    ops = 0
    while tracker.length < w + g and ops < 400:
        ops += 1
        n0 = tracker.length
        k = rng.randint(1, 6)
        tracker.feed(torch.tensor([s[n0:n0 + k] for s in seqs]), torch.tensor([m[n0:n0 + k] for m in masks]))
        r = rng.random()
        if r < 0.4:
            tracker.truncate(rng.randint(max(w, tracker.length - 10), tracker.length))
        elif r < 0.45:
            tracker.truncate(rng.randint(w, tracker.length))      # further back than the snapshots
        elif r < 0.65:
            index = [rng.randint(0, 1) for _ in range(2)]
            tracker.select(index)
            seqs, masks, prompt = [seqs[i] for i in index], [masks[i] for i in index], [prompt[i] for i in index]
        elif r < 0.75 and tracker.length < w + g:
            k = rng.randint(tracker.length, w + g)
            parents = tracker.follow(torch.tensor([s[:k] for s in seqs]), torch.tensor([m[:k] for m in masks]))
            assert None not in parents
        n = tracker.length
        expected = sf.segment(torch.tensor([s[:n] for s in seqs]), prompt, tokenizer=tok,
                              attention_mask=torch.tensor([m[:n] for m in masks]), **opts)
        got = tracker.segmentation()
        assert torch.equal(got.seg_ids, expected.seg_ids), (ops, n)
        assert (got.kinds, got.closed, got.closing) == (expected.kinds, expected.closed, expected.closing)
        assert tracker.ids.tolist() == [s[:n] for s in seqs]


def test_chunked_prefill_equals_one_prefill():
    """prefill_chunk_size: the prompt reaches the model in several calls; all of it is the prompt
    (with think_start=None the prompt is the question)."""
    tok, model = make_tokenizer(), make_model("qwen2", sharpen=SHARP)
    cfg, plan, opts = config(model, PAPER), plan_for(tok)[:30], dict(think_start=None)
    ids, mask = prompts(tok, texts=[p.replace(" <think>", "") for p in PROMPTS])
    whole, _ = generate(model, cfg, tok, ids, mask, plan, opts, do_sample=False, output_logits=True)
    chunked, _ = generate(model, cfg, tok, ids, mask, plan, opts, do_sample=False, output_logits=True,
                          prefill_chunk_size=5)
    assert torch.equal(whole.sequences, chunked.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits, 1), torch.stack(whole.logits, 1), atol=1e-5, rtol=1e-5)
    assert_logits_are_the_oracles(chunked, model, cfg, tok, mask, opts)
