"""Model-level tests: step_saliency and replace_attention on random Llama/Qwen2/Qwen3/Mistral models.

The oracles are the materialized way (eager attention with output_attentions and retained
gradients) for saliency, and stepflow_ext.reference (float64) substituted for the ops for the
intervention.
"""
from __future__ import annotations

import pytest
import torch
import transformers

import stepflow_ext as sf
from stepflow_ext import ops, reference
from hf_models import ARCHITECTURES, model as make_model, tokenizer as make_tokenizer

PROMPTS = ["Question: what is 12 + 7? <think>", "Let x = 3. Then 2x + 1 = 7? Answer step by step. <think>"]
TRACE = ("First, 12 + 7 means adding seven.\n\nSo 12 + 7 = 19.\n\nCheck: 19 - 7 = 12.</think> The answer is "
         "\\boxed{19}.")


def batch(tok, with_trace=True):
    """Two prompts of different lengths (+ the same trace), left padded, and their segmentation."""
    rows = [tok(p + (TRACE if with_trace else ""))["input_ids"] for p in PROMPTS]
    prompt_lens = [len(tok(p)["input_ids"]) for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    seg = sf.segment(ids, prompt_lens, tokenizer=tok, attention_mask=mask)
    return ids, mask, seg


def materialized_saliency(model, ids, mask, seg, target="summary"):
    """The way without kernels: eager attention, output_attentions, retained gradients on A."""
    model.set_attn_implementation("eager")
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        targets = sf.saliency.target_mask(seg, target)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        logp = torch.log_softmax(out.logits[:, :-1].double(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
        (-(logp * targets[:, 1:]).sum()).backward()
        maps = []
        for a in out.attentions:
            sal = (a.double() * a.grad.double()).sum(1).abs()
            valid = seg.seg_ids >= 0
            sal = sal * (valid[:, :, None] & valid[:, None, :]) * torch.tril(torch.ones_like(sal[0]))
            maps.append(reference.pool_to_segments(sal, seg.seg_ids, seg.num_segments))
        return torch.stack(maps, 1).detach()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_step_saliency_equals_materialized(arch):
    tok = make_tokenizer()
    model = make_model(arch)
    ids, mask, seg = batch(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sf.step_saliency(model, ids, seg, target="summary", attention_mask=mask)
    expected = materialized_saliency(model, ids, mask, seg)
    assert res.maps.shape == (2, model.config.num_hidden_layers, seg.num_segments, seg.num_segments)
    scale = expected.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(res.maps.double() / scale, expected / scale, atol=2e-4, rtol=1e-3)
    assert float(expected.sum()) > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa" and not model.training


def test_step_saliency_targets_checkpointing_and_views():
    tok = make_tokenizer()
    model = make_model("qwen2")
    ids, mask, seg = batch(tok)
    full = sf.step_saliency(model, ids, seg, target="generated", attention_mask=mask)
    ckpt = sf.step_saliency(model, ids, seg, target="generated", attention_mask=mask, gradient_checkpointing=True,
                            chunk_tokens=7)
    torch.testing.assert_close(ckpt.maps, full.maps, atol=1e-6, rtol=1e-4)
    expected = materialized_saliency(model, ids, mask, seg, target="generated")
    torch.testing.assert_close(full.maps.double(), expected, atol=1e-5 * float(expected.max()), rtol=1e-3)
    thinking = sf.step_saliency(model, ids, seg, target="thinking", attention_mask=mask)
    assert not torch.allclose(thinking.maps, full.maps)
    rows = full.normalized("row")
    nonempty = full.maps.sum(-1) > 0
    torch.testing.assert_close(rows.sum(-1)[nonempty], torch.ones(int(nonempty.sum())))
    counts = reference.causal_pair_counts(seg.seg_ids, seg.num_segments)
    torch.testing.assert_close(full.counts.double(), counts)
    report = full.diagnose()
    assert len(report) == 2 and len(report[0]["lock_in_index"]) == model.config.num_hidden_layers


def test_step_saliency_restores_model_on_error():
    tok = make_tokenizer()
    model = make_model("llama")
    model.train()
    ids, mask, seg = batch(tok)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    original = ops.step_saliency_pool
    ops.step_saliency_pool = boom
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sf.step_saliency(model, ids, seg, attention_mask=mask)
    finally:
        ops.step_saliency_pool = original
    assert model.training and model.config._attn_implementation == "sdpa"
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(hasattr(m, "_stepflow_controller") for m in model.modules())


def test_step_saliency_rejects_bad_input():
    tok = make_tokenizer()
    model = make_model("qwen3")
    ids, mask, seg = batch(tok)
    with pytest.raises(ValueError, match="segmentation"):
        sf.step_saliency(model, ids[:, :-1], seg)
    with pytest.raises(ValueError, match="target"):
        sf.step_saliency(model, ids, seg, target="answer")
    with pytest.raises(ValueError, match="head_reduction"):
        sf.step_saliency(model, ids, seg, head_reduction="max")
    with pytest.raises(ValueError, match="input_ids"):
        sf.step_saliency(model, ids.float(), seg)
    no_summary = sf.segment(ids[:, :10], [10, 10], tokenizer=tok)
    with pytest.raises(ValueError, match="no target tokens"):
        sf.step_saliency(model, ids[:, :10], no_summary)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture"):
        sf.step_saliency(gpt2, ids, seg)


# --------------------------------------------------------------------------- replace_attention


def _reference_oeb(q, k, v, seg_start, kv_start, strength, num_sink=1, scale=None):
    out, lse, stats = reference.oeb_attention(q.double(), k.double(), v.double(), seg_start, kv_start, strength,
                                              num_sink, scale)
    return out.to(q.dtype), lse.float(), stats.float()


def _reference_smi(h, seg_ids, seg_kinds, beta=0.9, gamma=0.05):
    return reference.step_momentum(h.double(), seg_ids, seg_kinds, beta, gamma).to(h.dtype)


def _forced_logits(model, ids, mask, seg, cfg):
    with sf.replace_attention(model, cfg) as handle:
        handle.set_segmentation(seg)
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("parts", ["oeb", "smi", "both"])
def test_intervention_equals_reference(arch, parts, monkeypatch):
    tok = make_tokenizer()
    model = make_model(arch)
    ids, mask, seg = batch(tok)
    cfg = sf.StepFlowConfig(oeb_layers=(0, 1) if parts != "smi" else (), oeb_strength=0.7,
                            smi_layers=(2, 3) if parts != "oeb" else (), smi_gamma=0.3)
    stock = model(ids, attention_mask=mask).logits
    got = _forced_logits(model, ids, mask, seg, cfg)
    monkeypatch.setattr(ops, "oeb_attention", _reference_oeb)
    monkeypatch.setattr(ops, "step_momentum", _reference_smi)
    expected = _forced_logits(model, ids, mask, seg, cfg)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=2e-4, rtol=2e-4)
    assert (got[valid] - stock[valid]).abs().max() > 1e-3, "the intervention changed nothing"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_zero_strength_is_identity_and_restore_is_exact(arch):
    tok = make_tokenizer()
    model = make_model(arch)
    ids, mask, seg = batch(tok)
    stock = model(ids, attention_mask=mask).logits
    cfg = sf.StepFlowConfig(oeb_layers=range(4), oeb_strength=0.0, smi_layers=range(4), smi_gamma=0.0)
    got = _forced_logits(model, ids, mask, seg, cfg)
    valid = mask.bool()
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


def decode_and_prefill(model, tok, cfg, device="cpu", **install):
    """Decode TRACE token by token under online tracking (replace_attention(model, cfg, **install)),
    then one teacher-forced pass of the same tokens with the tracked segmentation. Returns the logits
    of each decode step, the prefill's logits at the same positions, the ids, the mask and the
    tracked segmentation."""
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
        seg = handle.segmentation()
        assert seg.kinds[0].count("step") == 3 and seg.kinds[0][-1] == "summary"
        full_ids = torch.cat([prompt_ids, torch.tensor([trace] * 2, device=device)], 1)
        handle.set_segmentation(seg)
        full = model(full_ids, attention_mask=m).logits
    p = prompt_ids.shape[1]
    return torch.stack(step_logits, 1), full[:, p - 1:], full_ids, m, seg


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decode_equals_prefill(arch):
    """Decoding token by token under online tracking gives the logits of one teacher-forced pass."""
    tok = make_tokenizer()
    model = make_model(arch)
    cfg = sf.StepFlowConfig(oeb_layers=(0, 1), oeb_strength=0.8, smi_layers=(2, 3), smi_gamma=0.3)
    decoded, prefilled, full_ids, mask, seg = decode_and_prefill(model, tok, cfg)
    torch.testing.assert_close(decoded, prefilled, atol=1e-4, rtol=1e-4)
    _, prompt_mask, _ = batch(tok, with_trace=False)
    offline = sf.segment(full_ids, prompt_mask.sum(1).tolist(), tokenizer=tok, attention_mask=mask)
    assert torch.equal(offline.seg_ids, seg.seg_ids)


def test_generate_with_stepflow_batch_of_two():
    tok = make_tokenizer()
    model = make_model("qwen2")
    ids, mask, _ = batch(tok, with_trace=False)
    stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    with sf.replace_attention(model, sf.StepFlowConfig.default_for(model, oeb_strength=1.0, smi_gamma=0.5),
                              tokenizer=tok) as handle:
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
    model = make_model("qwen2")
    ids, mask, _ = batch(tok, with_trace=False)
    cfg = sf.StepFlowConfig.default_for(model, oeb_strength=1.0, smi_gamma=0.5)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    one = ids[1:, mask[1].bool()]
    with sf.replace_attention(model, cfg, tokenizer=tok):
        two_rows = model.generate(input_ids=ids, attention_mask=mask, **kw)
        one_row = model.generate(input_ids=one, **kw)
    with sf.replace_attention(model, cfg, tokenizer=tok):
        fresh = model.generate(input_ids=one, **kw)
    assert two_rows.shape[0] == 2 and torch.equal(one_row, fresh)


def test_saliency_under_stepflow_uses_the_intervention():
    tok = make_tokenizer()
    model = make_model("llama")
    ids, mask, seg = batch(tok)
    plain = sf.step_saliency(model, ids, seg, attention_mask=mask)
    cfg = sf.StepFlowConfig(smi_layers=(1, 2, 3), smi_gamma=0.5)
    with sf.replace_attention(model, cfg, tokenizer=tok):
        steered = sf.step_saliency(model, ids, seg, attention_mask=mask)
    assert steered.meta["stepflow"]["smi_gamma"] == 0.5
    # SMI acts after layer 1, so layer 0's map can only change through the gradient.
    assert not torch.allclose(plain.maps[:, 2:], steered.maps[:, 2:])


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_saliency_under_oeb_equals_materialized(arch):
    """Post-intervention maps: in OEB layers the saliency uses A' (the rebalanced attention).

    Oracle: an eager model whose OEB layers run the float64 reference and expose A' as their
    attention weights, with output_attentions and retained gradients — the materialized way.
    """
    tok = make_tokenizer()
    model = make_model(arch)
    ids, mask, seg = batch(tok)
    cfg = sf.StepFlowConfig(oeb_layers=(0, 2), oeb_strength=0.8, num_sink=1)
    with sf.replace_attention(model, cfg, tokenizer=tok):
        got = sf.step_saliency(model, ids, seg, attention_mask=mask)
    seg_start = seg.seg_start()
    kv_start = seg.kv_start()
    eager_module = __import__(type(model.model.layers[0].self_attn).__module__, fromlist=["eager_attention_forward"])
    plain_eager = eager_module.eager_attention_forward

    def oeb_eager(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if module.layer_idx not in cfg.oeb_layers:
            return plain_eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        allowed, _, current, context = reference.oeb_groups(seg_start, kv_start, query.shape[2], key.shape[2],
                                                            cfg.num_sink)
        a = reference.attention_probs(query, key, scaling, allowed)
        a_new, _, _ = reference.oeb_rebalance(a, current, context, cfg.oeb_strength)
        out = torch.einsum("bhij,bhjd->bhid", a_new, reference._expand_kv(value, query.shape[1]))
        return out.transpose(1, 2).contiguous(), a_new

    original = eager_module.eager_attention_forward
    eager_module.eager_attention_forward = oeb_eager
    try:
        expected = materialized_saliency(model, ids, mask, seg)
    finally:
        eager_module.eager_attention_forward = original
    scale = expected.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(got.maps.double() / scale, expected / scale, atol=2e-4, rtol=1e-3)
    plain = sf.step_saliency(model, ids, seg, attention_mask=mask)
    assert (plain.maps[:, 0] - got.maps[:, 0]).abs().max() > 1e-3 * float(plain.maps[:, 0].abs().max())


def test_replace_attention_errors():
    tok = make_tokenizer()
    model = make_model("mistral")
    ids, mask, seg = batch(tok)
    with pytest.raises(ValueError, match="oeb_strength"):
        sf.StepFlowConfig(oeb_strength=1.5)
    with pytest.raises(ValueError, match="smi_beta"):
        sf.StepFlowConfig(smi_beta=1.0)
    with pytest.raises(ValueError, match="smi_gamma"):
        sf.StepFlowConfig(smi_gamma=-0.1)
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


def test_config_json_round_trip_and_defaults(tmp_path):
    model = make_model("qwen3", layers=8)
    cfg = sf.StepFlowConfig.default_for(model)
    assert cfg.oeb_layers == (0, 1) and cfg.smi_layers == (6, 7)
    assert cfg.oeb_strength == 0.5 and cfg.smi_gamma == 0.05
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert sf.StepFlowConfig.from_json(path) == cfg
    assert sf.StepFlowConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        sf.StepFlowConfig.from_dict({"oeb_layer": [1]})
    with pytest.raises(ValueError, match="oeb_layers"):
        sf.StepFlowConfig(oeb_layers=[1, 1])


def test_result_save_load_round_trip(tmp_path):
    tok = make_tokenizer()
    model = make_model("qwen2")
    ids, mask, seg = batch(tok)
    res = sf.step_saliency(model, ids, seg, attention_mask=mask)
    res.save(tmp_path / "maps.safetensors")
    back = sf.StepSaliencyResult.load(tmp_path / "maps.safetensors")
    assert torch.equal(back.maps, res.maps) and torch.equal(back.counts, res.counts)
    assert back.kinds == res.kinds and back.meta["target"] == "summary"
    png = res.plot(tmp_path / "maps.png")
    assert (tmp_path / "maps.png").stat().st_size > 10_000 and png
