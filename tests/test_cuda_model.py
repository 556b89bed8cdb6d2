"""Model-level checks on the GPU: a random Qwen2 under StepFlow and Step-Saliency, CUDA kernels end to end.

The CPU path is tested against the float64 reference in test_intervention.py; here the same model on the GPU must
agree with it, and decoding token by token on the GPU (split-KV decode kernels, on-device momentum state)
must equal one teacher-forced prefill.
"""
from __future__ import annotations

import copy

import pytest
import torch

import stepflow_ext as sf
from hf_models import model as make_model, tokenizer as make_tokenizer
from test_intervention import SHARP, batch, decode_and_prefill

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# head_dim 64: the tensor-core path of the kernels (hidden 256 / 4 heads), GQA 4/2.
SHAPE = dict(hidden=256, heads=4, kv_heads=2)
# The paper's rules (bridge OEB, value SMI) and the earlier ones (odds OEB, residual SMI).
CFG = sf.StepFlowConfig(oeb_layers=(0, 1), smi_layers=(2, 3), smi_alpha=0.5)
EARLIER = sf.StepFlowConfig(oeb_layers=(0, 1), oeb_rule="odds", oeb_strength=0.8, smi_layers=(2, 3),
                            smi_rule="residual", smi_gamma=0.3)


def _pair(dtype):
    cpu = make_model("qwen2", sharpen=SHARP, **SHAPE)
    gpu = copy.deepcopy(cpu).to("cuda", dtype)
    return cpu, gpu


def _forced_logits(model, ids, mask, seg, cfg=CFG):
    with sf.replace_attention(model, cfg) as handle:
        handle.set_segmentation(seg)
        return model(ids, attention_mask=mask).logits.float().cpu()


@pytest.mark.parametrize("cfg", [CFG, EARLIER], ids=["paper", "earlier"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_pass_on_gpu_equals_cpu(dtype, cfg):
    tok = make_tokenizer()
    cpu, gpu = _pair(dtype)
    ids, mask, seg = batch(tok)
    expected = _forced_logits(cpu, ids, mask, seg, cfg)
    got = _forced_logits(gpu, ids.cuda(), mask.cuda(), seg.to("cuda"), cfg)
    valid = mask.bool()
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    torch.testing.assert_close(got[valid], expected[valid], **tol)
    stock = cpu(ids, attention_mask=mask).logits
    assert (expected[valid] - stock[valid]).abs().max() > 1e-3, "the intervention changed nothing"


# head_dim 128 (hidden 512 / 4 heads: the kernels' 128-wide tensor-core tiles, BN = 32) and fp16 models.
SHAPE128 = dict(hidden=512, heads=4, kv_heads=2)


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, SHAPE128), (torch.float16, SHAPE128),
                                         (torch.float16, SHAPE)], ids=["bf16-d128", "fp16-d128", "fp16-d64"])
def test_forced_pass_d128_and_fp16_on_gpu_equals_cpu(dtype, shape):
    tok = make_tokenizer()
    cpu = make_model("qwen2", sharpen=SHARP, **shape)
    gpu = copy.deepcopy(cpu).to("cuda", dtype)
    ids, mask, seg = batch(tok)
    expected = _forced_logits(cpu, ids, mask, seg, CFG)
    got = _forced_logits(gpu, ids.cuda(), mask.cuda(), seg.to("cuda"), CFG)
    valid = mask.bool()
    tol = dict(atol=0.15, rtol=0.05) if dtype == torch.bfloat16 else dict(atol=0.05, rtol=0.03)
    torch.testing.assert_close(got[valid], expected[valid], **tol)
    assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("dtype", [torch.float16])
def test_decode_equals_prefill_on_gpu_d128(dtype):
    """Token-by-token decoding of a d = 128 fp16 model (split-KV decode, tensor cores) equals one
    teacher-forced pass."""
    tok = make_tokenizer()
    cpu = make_model("qwen2", sharpen=SHARP, **SHAPE128)
    model = copy.deepcopy(cpu).to("cuda", dtype)
    decoded, prefilled, _, _, _, counts = decode_and_prefill(model, tok, CFG, device="cuda")
    assert sum(counts["oeb"].values()) > 0
    torch.testing.assert_close(decoded.float(), prefilled.float(), atol=0.05, rtol=0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_prefill_on_gpu(dtype):
    tok = make_tokenizer()
    _, model = _pair(dtype)
    decoded, prefilled, _, _, _, counts = decode_and_prefill(model, tok, CFG, device="cuda")
    assert sum(counts["oeb"].values()) > 0
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(decoded.float(), prefilled.float(), **tol)


def test_generate_on_gpu_equals_hand_decoding():
    tok = make_tokenizer()
    _, model = _pair(torch.float32)
    ids, mask, _ = batch(tok, with_trace=False)
    ids, mask = ids.cuda(), mask.cuda()
    with sf.replace_attention(model, CFG, tokenizer=tok):
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    with sf.replace_attention(model, CFG, tokenizer=tok):
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, m, tokens = out.past_key_values, mask, []
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(12):
            tokens.append(nxt)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=m, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(gen[:, ids.shape[1]:], torch.cat(tokens, 1))


@pytest.mark.parametrize("under_stepflow", [False, True])
def test_step_saliency_on_gpu_equals_cpu(under_stepflow):
    tok = make_tokenizer()
    cpu, gpu = _pair(torch.float32)
    ids, mask, seg = batch(tok)

    def maps(model, device):
        args = (model, ids.to(device), seg.to(device))
        if not under_stepflow:
            return sf.step_saliency(*args, target="summary", attention_mask=mask.to(device)).maps.cpu()
        with sf.replace_attention(model, CFG) as handle:
            handle.set_segmentation(seg.to(device))
            return sf.step_saliency(*args, target="summary", attention_mask=mask.to(device)).maps.cpu()

    expected = maps(cpu, "cpu")
    got = maps(gpu, "cuda")
    scale = expected.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(got / scale, expected / scale, atol=2e-3, rtol=2e-3)
    assert float(expected.sum()) > 0
