"""Model-level tests of step_saliency on random Llama/Qwen2/Qwen3/Mistral models (replace_attention:
tests/test_intervention.py).

The oracle is the materialized way (eager attention with output_attentions and retained gradients).
"""
from __future__ import annotations

import pytest
import torch
import transformers

import stepflow_ext as sf
from stepflow_ext import ops, reference
from hf_models import ARCHITECTURES, left_padded_batch, model as make_model, tokenizer as make_tokenizer

PROMPTS = ["Question: what is 12 + 7? <think>", "Let x = 3. Then 2x + 1 = 7? Answer step by step. <think>"]
TRACE = ("First, 12 + 7 means adding seven.\n\nSo 12 + 7 = 19.\n\nCheck: 19 - 7 = 12.</think> The answer is "
         "\\boxed{19}.")


def batch(tok, with_trace=True):
    """Two prompts of different lengths (+ the same trace), left padded, and their segmentation."""
    return left_padded_batch(tok, PROMPTS, TRACE if with_trace else "")


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
