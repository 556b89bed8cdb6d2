"""replace_attention on random Llama/Qwen2/Qwen3/Mistral models, held against the float64 oracle.

The oracle (tests/stepflow_oracle.py) is a float64 copy of the model whose attention is written
from stepflow_ext.reference with materialized attention and the reference's own placement loops.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import stepflow_ext as sf
from stepflow_ext import reference
from hf_models import ARCHITECTURES, left_padded_batch, model as make_model, tokenizer as make_tokenizer
from stepflow_oracle import reference_logits

PROMPTS = ["Question: what is 12 + 7? <think>", "Let x = 3. Then 2x + 1 = 7? Answer step by step. <think>"]
# Sentences of >= 15 characters ending in ". " close steps (the paper's rule); "3.5" and a short
# sentence do not; "</think>" ends the thinking.
TRACE = ("First, 12 + 7 means adding seven to twelve. So 12 + 7 = 19 and 3.5 is not needed. Yes. "
         "Check: 19 - 7 = 12, which matches.</think> The answer is \\boxed{19}.")
SHARP = 6.0  # peaky attention: the bridge rule fires on these random models (as on real ones)
PAPER = "paper"
EARLIER = "earlier"


def batch(tok, with_trace=True):
    """Two prompts of different lengths (+ the same trace), left padded, and their segmentation."""
    return left_padded_batch(tok, PROMPTS, TRACE if with_trace else "")


def config(model, rules, parts="both"):
    """The paper's configuration (default_for) or the earlier rules, on OEB, SMI or both."""
    if rules == PAPER:
        cfg = sf.StepFlowConfig.default_for(model, smi_alpha=0.5)  # alpha large enough to see in logits
    else:
        cfg = sf.StepFlowConfig(oeb_layers=(0, 1), oeb_rule="odds", oeb_strength=0.8, smi_layers=(2, 3),
                                smi_rule="residual", smi_gamma=0.3)
    keep = dict(oeb_layers=cfg.oeb_layers if parts != "smi" else (),
                smi_layers=cfg.smi_layers if parts != "oeb" else ())
    return sf.StepFlowConfig.from_dict(cfg.to_dict() | keep)


def forced_logits(model, ids, mask, seg, cfg, tok=None):
    with sf.replace_attention(model, cfg, tokenizer=tok) as handle:
        handle.set_segmentation(seg)
        logits = model(ids, attention_mask=mask).logits
        return logits, handle.trigger_counts()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("parts", ["oeb", "smi", "both"])
@pytest.mark.parametrize("rules", [PAPER, EARLIER])
def test_intervention_equals_reference(arch, parts, rules):
    tok = make_tokenizer()
    model = make_model(arch, sharpen=SHARP)
    ids, mask, seg = batch(tok)
    cfg = config(model, rules, parts)
    stock = model(ids, attention_mask=mask).logits
    got, counts = forced_logits(model, ids, mask, seg, cfg)
    expected = reference_logits(model, ids, mask, seg, cfg)
    valid = mask.bool()
    torch.testing.assert_close(got[valid].double(), expected[valid], atol=1e-4, rtol=1e-4)
    assert (got[valid] - stock[valid]).abs().max() > 1e-3, "the intervention changed nothing"
    if rules == PAPER and parts != "smi":
        assert sum(counts["oeb"].values()) > 0, "the bridge rule never fired"


def decode_and_prefill(model, tok, cfg, device="cpu", **install):
    """Decode TRACE token by token under online tracking (replace_attention(model, cfg, **install)),
    then one teacher-forced pass of the same tokens with the tracked segmentation. Returns the logits
    of each decode step, the prefill's logits at the same positions, the ids, the mask, the
    tracked segmentation and the trigger counts of the decode."""
    trace = tok(TRACE)["input_ids"]
    prompt_ids, prompt_mask, _ = batch(tok, with_trace=False)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    with torch.no_grad(), sf.replace_attention(model, cfg, tokenizer=tok, **install) as handle:
        out = model(prompt_ids, attention_mask=prompt_mask, use_cache=True)
        cache, m, step_logits = out.past_key_values, prompt_mask, [out.logits[:, -1]]
        for t in trace:
            nxt = torch.full((2, 1), t, device=device)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=m, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step_logits.append(out.logits[:, -1])
        counts = handle.trigger_counts(reset=True)
        seg = handle.segmentation()
        assert seg.kinds[0].count("step") >= 3 and seg.kinds[0][-1] == "summary", seg
        full_ids = torch.cat([prompt_ids, torch.tensor([trace] * 2, device=device)], 1)
        handle.set_segmentation(seg)
        full = model(full_ids, attention_mask=m).logits
    p = prompt_ids.shape[1]
    return torch.stack(step_logits, 1), full[:, p - 1:], full_ids, m, seg, counts


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("rules", [PAPER, EARLIER])
def test_decode_equals_prefill_and_reference(arch, rules, capsys):
    """Under default_for(model) (and the earlier rules): decoding token by token gives the logits of one
    teacher-forced pass, and both equal the float64 oracle; the bridge rule fires."""
    tok = make_tokenizer()
    model = make_model(arch, sharpen=SHARP)
    cfg = sf.StepFlowConfig.default_for(model) if rules == PAPER else config(model, EARLIER)
    decoded, prefilled, full_ids, mask, seg, counts = decode_and_prefill(model, tok, cfg)
    torch.testing.assert_close(decoded, prefilled, atol=1e-4, rtol=1e-4)
    expected = reference_logits(model, full_ids, mask, seg, cfg)[:, -decoded.shape[1]:]
    torch.testing.assert_close(decoded.double(), expected, atol=1e-4, rtol=1e-4)
    _, prompt_mask, _ = batch(tok, with_trace=False)
    offline = sf.segment(full_ids, prompt_mask.sum(1).tolist(), tokenizer=tok, attention_mask=mask)
    assert torch.equal(offline.seg_ids, seg.seg_ids) and offline.closed == seg.closed
    if rules == PAPER:
        oeb, smi = sum(counts["oeb"].values()), sum(counts["smi"].values())
        with capsys.disabled():
            print(f"\n  {arch} under {cfg.describe()}: decoding {decoded.shape[1] - 1} tokens x 2 rows, the bridge "
                  f"rule fired on {oeb} (layer, head, token) rows, SMI injected at {smi} step starts")
        assert oeb > 0 and smi > 0


def test_bridge_lifts_the_bridge_mass():
    """On a layer's real q, k, v: the rows the op marks active had bridge mass below tau_B, and after
    the rule their bridge mass is higher, near tau_B (design.md 2.3; with the paper's eps)."""
    tok = make_tokenizer()
    model = make_model("llama", sharpen=SHARP)
    ids, mask, seg = batch(tok)
    cfg = sf.StepFlowConfig.default_for(model)
    seen = {}

    def spy(inner):  # capture layer 0's q, k, v through the attention interface
        def attention(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx == 0:
                seen.update(q=query.detach(), k=key.detach(), v=value.detach(), scale=kwargs.get("scaling"))
            return inner(module, query, key, value, attention_mask, **kwargs)
        return attention

    installed = sf.hf.Installed.on(model)
    token = installed.push(spy)
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        installed.pop(token)
    bounds = reference.oeb_bounds(seg.seg_ids, seg.seg_kinds_tensor(), "bridge")
    q, k, v = (seen[x].double() for x in "qkv")
    scale = seen["scale"] or sf.hf.attention_modules(model)[0].scaling
    out, _, stats = sf.ops.oeb_attention(q, k, v, seg.kv_start(), bounds, "bridge", tau_max=cfg.oeb_tau_max,
                                         scale=scale)
    a2, _, _, ref_stats = reference.oeb_probs(q, k, seg.kv_start(), bounds, "bridge", tau_max=cfg.oeb_tau_max,
                                              scale=scale)
    torch.testing.assert_close(stats, ref_stats.float())
    _, _, g1, g2 = reference.oeb_groups(seg.kv_start(), bounds, q.shape[2], k.shape[2])
    active = stats[..., 4].bool()
    assert active.any()
    n_b, n_s = g1.sum(-1)[:, None].expand_as(active).double(), g2.sum(-1)[:, None].expand_as(active).double()
    tau_b = torch.clamp(torch.sqrt(n_b / (n_b + n_s + reference.OEB_EPS)), max=cfg.oeb_tau_max)
    tau_b = torch.minimum(tau_b, 1 - stats[..., 0].double() - reference.OEB_EPS)[active]  # room left by O
    before, after = stats[..., 1].double()[active], (a2 * g1[:, None]).sum(-1)[active]
    assert bool((before < tau_b).all()) and bool((after > before).all())
    # With eps = 1e-6 a bridge mass of p ends at (tau + eps) p / (p + eps) / Z, Z ~ 1: close to tau_B
    # unless p is not >> eps.
    lifted = before > 1e-4
    torch.testing.assert_close(after[lifted], tau_b[lifted], atol=2e-3, rtol=0.05)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_switched_off_is_identity_and_restore_is_exact(arch):
    tok = make_tokenizer()
    model = make_model(arch, sharpen=SHARP)
    ids, mask, seg = batch(tok)
    stock = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    for cfg in (sf.StepFlowConfig(), sf.StepFlowConfig(smi_layers=range(4), smi_alpha=0.0),
                sf.StepFlowConfig(oeb_layers=range(4), oeb_rule="odds", oeb_strength=0.0)):
        got, _ = forced_logits(model, ids, mask, seg, cfg)
        torch.testing.assert_close(got[valid], stock[valid], atol=1e-5, rtol=1e-5)
    handle = sf.replace_attention(model, sf.StepFlowConfig.default_for(model), tokenizer=tok)
    handle.set_segmentation(seg)
    assert not torch.allclose(model(ids, attention_mask=mask).logits[valid], stock[valid])
    handle.restore()
    assert torch.equal(model(ids, attention_mask=mask).logits, stock)
    assert model.config._attn_implementation == "sdpa"


def _greedy_with_logits(model, ids, mask, steps):
    """Hand-written incremental decoding with past_key_values; returns tokens and per-step logits."""
    out = model(ids, attention_mask=mask, use_cache=True)
    cache, logits, tokens = out.past_key_values, [out.logits[:, -1]], []
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        out = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits, 1), mask


def test_generate_with_stepflow_batch_of_two():
    tok = make_tokenizer()
    model = make_model("qwen2", sharpen=SHARP)
    ids, mask, _ = batch(tok, with_trace=False)
    stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    with sf.replace_attention(model, sf.StepFlowConfig.default_for(model, smi_alpha=0.5), tokenizer=tok) as handle:
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        seen = handle.segmentation()
        seg = handle.segmentation(greedy)  # generate never feeds its last token back to the model
        assert seg.seg_ids.shape == greedy.shape and seen.seg_ids.shape[1] == greedy.shape[1] - 1
        assert torch.equal(seg.seg_ids[:, :-1], seen.seg_ids)
        torch.manual_seed(0)
        sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                 temperature=0.8, pad_token_id=tok.pad_token_id)
        assert sampled.shape[0] == 2
        # Greedy generate equals greedy hand-written decoding under the same intervention.
        tokens, _, _ = _greedy_with_logits(model, ids, mask, 12)
        assert torch.equal(tokens, greedy[:, ids.shape[1]:])
    after = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    assert torch.equal(after, stock)


def test_one_handle_serves_batches_of_any_size():
    """generate with a batch of two, then of one, under one handle: each as under a fresh handle."""
    tok = make_tokenizer()
    model = make_model("qwen2", sharpen=SHARP)
    ids, mask, _ = batch(tok, with_trace=False)
    cfg = sf.StepFlowConfig.default_for(model, smi_alpha=0.5)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    one = ids[1:, mask[1].bool()]
    with sf.replace_attention(model, cfg, tokenizer=tok):
        two_rows = model.generate(input_ids=ids, attention_mask=mask, **kw)
        one_row = model.generate(input_ids=one, **kw)
    with sf.replace_attention(model, cfg, tokenizer=tok):
        fresh = model.generate(input_ids=one, **kw)
    assert two_rows.shape[0] == 2 and torch.equal(one_row, fresh)


def test_segmentation_options_reach_the_tracker():
    """replace_attention takes segment()'s options: paragraph steps, explicit markers, id sets."""
    tok = make_tokenizer()
    model = make_model("qwen2")
    ids, mask, _ = batch(tok)
    prompt_lens = [len(tok(p)["input_ids"]) for p in PROMPTS]
    for options in (dict(steps="paragraph"), dict(think_start=None), dict(think_start="<think>", think_end="</think>"),
                    dict(summary_steps=True)):
        with torch.no_grad(), sf.replace_attention(model, sf.StepFlowConfig.default_for(model), tokenizer=tok,
                                                   **options) as handle:
            model(ids, attention_mask=mask)  # one call: all of it is the "prompt" of the tracked sequence
            lens = mask.sum(1).tolist() if options.get("think_start", "auto") is None else prompt_lens
            expected = sf.segment(ids, lens, tokenizer=tok, attention_mask=mask, **options)
            assert torch.equal(handle.segmentation().seg_ids, expected.seg_ids), options
    with pytest.raises(ValueError, match="unknown replace_attention options"):
        sf.replace_attention(model, sf.StepFlowConfig(), tokenizer=tok, step_rule="sentence")


def test_saliency_under_oeb_equals_materialized():
    """Post-intervention maps: in OEB layers the saliency uses A' (the bridge rule's attention).

    Oracle: an eager model whose OEB layers run the float64 reference and expose A' as their
    attention weights, with output_attentions and retained gradients — the materialized way.
    """
    tok = make_tokenizer()
    model = make_model("qwen2", sharpen=SHARP)
    ids, mask, seg = batch(tok)
    cfg = sf.StepFlowConfig(oeb_layers=(0, 2))
    with sf.replace_attention(model, cfg, tokenizer=tok) as handle:
        if not hasattr(handle, "pool_oeb_args"):
            pytest.skip("no pool_oeb_args")
        got = sf.step_saliency(model, ids, seg, attention_mask=mask)
    bounds = reference.oeb_bounds(seg.seg_ids, seg.seg_kinds_tensor(), "bridge")
    kv_start = seg.kv_start()
    eager_module = __import__(type(model.model.layers[0].self_attn).__module__, fromlist=["eager_attention_forward"])
    plain_eager = eager_module.eager_attention_forward

    def oeb_eager(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if module.layer_idx not in cfg.oeb_layers:
            return plain_eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        a_new = reference.oeb_probs(query, key, kv_start, bounds, "bridge", tau_max=cfg.oeb_tau_max, scale=scaling)[0]
        out = torch.einsum("bhij,bhjd->bhid", a_new, reference._expand_kv(value, query.shape[1]))
        return out.transpose(1, 2).contiguous(), a_new

    eager_module.eager_attention_forward = oeb_eager
    try:
        model.set_attn_implementation("eager")
        for p in model.parameters():
            p.requires_grad_(False)
        targets = sf.saliency.target_mask(seg, "summary")
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        logp = torch.log_softmax(out.logits[:, :-1].double(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
        (-(logp * targets[:, 1:]).sum()).backward()
        valid = seg.seg_ids >= 0
        expected = []
        for a in out.attentions:
            sal = (a.double() * a.grad.double()).sum(1).abs()
            sal = sal * (valid[:, :, None] & valid[:, None, :]) * torch.tril(torch.ones_like(sal[0]))
            expected.append(reference.pool_to_segments(sal, seg.seg_ids, seg.num_segments))
        expected = torch.stack(expected, 1)
    finally:
        eager_module.eager_attention_forward = plain_eager
        model.set_attn_implementation("sdpa")
        for p in model.parameters():
            p.requires_grad_(True)
    scale = expected.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(got.maps.double() / scale, expected / scale, atol=2e-4, rtol=1e-3)
    plain = sf.step_saliency(model, ids, seg, attention_mask=mask)
    assert (plain.maps[:, 0] - got.maps[:, 0]).abs().max() > 1e-3 * float(plain.maps[:, 0].abs().max())


def test_replace_attention_errors():
    tok = make_tokenizer()
    model = make_model("mistral")
    ids, mask, seg = batch(tok)
    with pytest.raises(ValueError, match="out of range"):
        sf.replace_attention(model, sf.StepFlowConfig(oeb_layers=[7]))
    with pytest.raises(ValueError, match="StepFlowConfig"):
        sf.replace_attention(model, {"oeb_layers": [0]})
    handle = sf.replace_attention(model, sf.StepFlowConfig(oeb_layers=[0]))
    with pytest.raises(ValueError, match="already applied"):
        sf.replace_attention(model, sf.StepFlowConfig(oeb_layers=[0]))
    with pytest.raises(ValueError, match="tokenizer"):
        model(ids, attention_mask=mask)  # no tracker and no segmentation
    handle.set_segmentation(seg)
    with pytest.raises(ValueError, match="segmentation covers"):
        model(ids[:, 1:], attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="segmentation must be"):
        handle.set_segmentation([[0, 1]])
    holes = mask.clone()
    holes[0, -3] = 0
    with pytest.raises(ValueError, match="contiguous"):
        model(ids, attention_mask=holes)
    handle.restore()
    handle.restore()  # idempotent
    assert sf.replace_attention(model, sf.StepFlowConfig(oeb_layers=[0])).active


# --------------------------------------------------------------------------- StepFlowConfig


def test_default_for_is_the_papers_table_8():
    cfg = sf.StepFlowConfig.default_for(28)
    assert cfg.oeb_layers == tuple(range(7)) and cfg.smi_layers == (21,)
    assert (cfg.oeb_rule, cfg.oeb_tau_max, cfg.smi_rule, cfg.smi_alpha, cfg.smi_window) == ("bridge", 0.15, "value",
                                                                                          0.06, 4)
    assert sf.StepFlowConfig.default_for(24).oeb_layers == tuple(range(6))
    assert sf.StepFlowConfig.default_for(24).smi_layers == (18,)
    assert sf.StepFlowConfig.default_for(make_model("qwen3", layers=8)).smi_layers == (6,)
    assert sf.StepFlowConfig.default_for(30).oeb_layers == tuple(range(8))   # ceil(30 / 4) = 8
    assert sf.StepFlowConfig.default_for(30).smi_layers == (22,)
    assert "bridge" in cfg.describe() and "0-6" in cfg.describe() and "@21" in cfg.describe()


def test_config_json_round_trip_old_configs_and_errors(tmp_path):
    cfg = sf.StepFlowConfig.default_for(28, oeb_tau_max=0.2)
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert sf.StepFlowConfig.from_json(path) == cfg
    assert sf.StepFlowConfig.from_json(cfg.to_json()) == cfg
    old = '{"oeb_layers": [0, 1], "oeb_strength": 0.5, "num_sink": 1, "smi_layers": [2, 3], "smi_gamma": 0.05}'
    with pytest.warns(UserWarning, match='"oeb_rule": "odds"'):
        loaded = sf.StepFlowConfig.from_json(old)
    assert (loaded.oeb_rule, loaded.smi_rule, loaded.oeb_strength) == ("odds", "residual", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sf.StepFlowConfig.from_json('{"oeb_layers": [0], "smi_layers": [3]}').oeb_rule == "bridge"
    with pytest.raises(ValueError, match="unknown"):
        sf.StepFlowConfig.from_dict({"oeb_layer": [1]})
    bad = [dict(oeb_layers=[1, 1]), dict(oeb_rule="pasta"), dict(smi_rule="momentum"), dict(oeb_tau_max=0.0),
           dict(oeb_tau_max=1.5), dict(smi_alpha=-0.1), dict(smi_window=0), dict(oeb_strength=1.5),
           dict(smi_beta=1.0), dict(smi_gamma=-0.1)]
    for kw in bad:
        with pytest.raises(ValueError, match=next(iter(kw)).split("_")[0]):
            sf.StepFlowConfig(**kw)


def test_padding_of_accepts_one_run_per_row_and_refuses_holes():
    """padding_of: a row is 0..0 1..1 0..0 (left and/or right padding); a hole in the real tokens
    (which the kernels would attend) is a ValueError, as is an empty row unless allow_empty."""
    from stepflow_ext.intervention_state import padding_of

    ok = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]])
    kv_start, left = padding_of(ok, 4, 6)
    assert kv_start.tolist() == [0, 2, 0, 2] and left
    assert padding_of(ok[:1], 1, 6)[1] is False
    for hole in ([1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 1, 1], [1, 0, 1, 0, 1, 0]):
        with pytest.raises(ValueError, match="one contiguous run"):
            padding_of(torch.tensor([hole]), 1, 6)
    empty = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="one contiguous run"):
        padding_of(empty, 2, 3)
    assert padding_of(empty, 2, 3, allow_empty=True)[0].tolist() == [0, 3]


def test_step_saliency_on_an_eager_model_refuses_a_hole():
    """The fused attention of step_saliency (eager models) reads each row's padding with padding_of:
    a segmentation whose real tokens have a hole is a ValueError, not a silently different map."""
    import gpt_oss_fixture as fx

    model = fx.model(seed=1)
    seg = sf.Segmentation(torch.tensor([[0, 0, 0, 1, 1, -1, -1, 1, 2, 2, 2, 2]]),
                          kinds=[["question", "step", "summary"]])
    with pytest.raises(ValueError, match="one contiguous run"):
        sf.step_saliency(model, torch.randint(5, 100, (1, 12)), seg, preset="paper")
