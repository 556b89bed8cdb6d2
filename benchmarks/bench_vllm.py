"""vLLM with the StepFlow plugin against stock vLLM and against the HF engine, in one run.

The embedded tiny reasoner, fp32, greedy, 24 prompts of the tiny task's test split, 96 new tokens each
(EOS ignored, so every run generates the same number of tokens), all prompts in one call. Four cases:
vLLM stock, vLLM with the paper's default config (paragraph steps), HF generate stock, HF generate
with replace_attention (batches of 8, left padded). extra_info holds tokens/s; the ratios are in
benchmarks/RESULTS.md. Runs in .venv-vllm (vLLM must be installed; skipped elsewhere):

    .venv-vllm/bin/pytest -p no:cacheprovider benchmarks/bench_vllm.py --benchmark-columns=min,median
"""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm")
pytest.importorskip("pytest_benchmark")

import stepflow_ext as sf  # noqa: E402
from stepflow_ext.tiny.model import PACKAGED_DIR, load_default  # noqa: E402
from stepflow_ext.vllm import steer  # noqa: E402

N_PROMPTS, NEW, HF_BATCH = 24, 96, 8


@pytest.fixture(scope="module")
def prompts():
    _, tok = load_default()
    path = os.path.join(os.path.dirname(PACKAGED_DIR), "tiny_tasks", "test.jsonl")
    rows = [json.loads(line) for line in open(path)][:N_PROMPTS]
    return [tok(tok.apply_chat_template([{"role": "user", "content": r["problem"]}], add_generation_prompt=True,
                                        tokenize=False), add_special_tokens=False)["input_ids"] for r in rows]


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    return LLM(model=PACKAGED_DIR, dtype="float32", enforce_eager=True, max_model_len=512, seed=0, block_size=32)


@pytest.mark.parametrize("case", ["stock", "stepflow"])
def test_vllm(benchmark, llm, prompts, case):
    from vllm import SamplingParams

    extra = steer("default", steps="paragraph") if case == "stepflow" else None
    params = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0, extra_args=extra)
    batch = [{"prompt_token_ids": p} for p in prompts]
    benchmark.pedantic(lambda: llm.generate(batch, params, use_tqdm=False), rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = round(N_PROMPTS * NEW / benchmark.stats.stats.median, 1)


@pytest.mark.parametrize("case", ["stock", "stepflow"])
def test_hf(benchmark, prompts, case):
    model, tok = load_default()
    handle = sf.replace_attention(model, sf.StepFlowConfig.default_for(model), tokenizer=tok, steps="paragraph") \
        if case == "stepflow" else None

    def generate():
        for i in range(0, len(prompts), HF_BATCH):
            rows = prompts[i:i + HF_BATCH]
            width = max(map(len, rows))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, pad_token_id=tok.pad_token_id)

    try:
        benchmark.pedantic(generate, rounds=3, warmup_rounds=1)
    finally:
        if handle is not None:
            handle.restore()
    benchmark.extra_info["tokens_per_s"] = round(N_PROMPTS * NEW / benchmark.stats.stats.median, 1)
