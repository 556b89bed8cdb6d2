"""StepFlow inside vLLM on the CPU (stepflow_ext.vllm; docs/vllm.md), against stock vLLM and against
replace_attention + HF generate on the same prompts.

Runs in the vLLM environment (`make test-vllm`: .venv-vllm with vllm-cpu); skipped where vLLM is not
installed. vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), one engine at a time.
Models: the embedded tiny reasoner (its own prompts: the thinking is generated) and a random Qwen2
(make_tiny_model; its prompts carry prefilled thinking of several sentences, so that the bridge and
the step injection act in prefill and in decode).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

import stepflow_ext as sf  # noqa: E402
from stepflow_ext.tiny.model import PACKAGED_DIR  # noqa: E402
from stepflow_ext.vllm import cache_salt, plugin, steer  # noqa: E402

pytestmark = pytest.mark.vllm
NEW = 48             # tokens generated per prompt
LOGPROB_TOL = 1e-4   # the bound for vLLM vs HF logprobs under StepFlow


# --------------------------------------------------------------------------- models and prompts


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from stepflow_ext.cli.tiny_model import make_tiny_model

    path = str(tmp_path_factory.mktemp("qwen2"))
    make_tiny_model(path, layers=4, hidden=128, seed=3)   # 4 heads of 32 (vLLM's CPU head sizes), GQA 2
    return path


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tiny_prompts():
    tok = _tok(PACKAGED_DIR)
    path = os.path.join(os.path.dirname(PACKAGED_DIR), "tiny_tasks", "test.jsonl")
    rows = [json.loads(line) for line in open(path)]
    picked = [r for r in rows if r["steps"] >= 3][:3] + rows[:1]
    return [tok(tok.apply_chat_template([{"role": "user", "content": r["problem"]}], add_generation_prompt=True,
                                        tokenize=False), add_special_tokens=False)["input_ids"] for r in picked]


def qwen_prompts(path):
    """Question, the template's <think>, then the first sentences of a canned thinking (prefilled)."""
    tok = _tok(path)
    traces = [json.loads(line) for line in open(os.path.join(path, "traces.jsonl"))]
    out = []
    for i, t in enumerate(traces[:3]):
        text = tok.apply_chat_template([{"role": "user", "content": t["question"]}], add_generation_prompt=True,
                                       tokenize=False)
        thinking = " ".join(t["thinking"].split("\n\n")[:2 + i])
        out.append(tok(text + thinking + " ", add_special_tokens=False)["input_ids"])
    return out


# --------------------------------------------------------------------------- engines


class Engines:
    """One vLLM engine alive at a time (keyed by model and options); closing one frees its memory."""

    def __init__(self):
        self.key, self.llm = None, None

    def get(self, path, **options):
        key = (path, json.dumps(options, sort_keys=True))
        if key != self.key:
            self.close()
            from vllm import LLM

            settings = dict(dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, block_size=32,
                            enable_prefix_caching=False)
            settings.update(options)
            self.llm, self.key = LLM(model=path, **settings), key
        return self.llm

    def close(self):
        if self.llm is not None:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            self.llm, self.key = None, None
            gc.collect()
            cleanup_dist_env_and_memory()


@pytest.fixture(scope="module")
def engines():
    e = Engines()
    yield e
    e.close()


def run(llm, prompts, extra=None, new=NEW):
    """[(token ids, logprob of each chosen token)] with greedy decoding; extra: per prompt or for all."""
    from vllm import SamplingParams

    extras = extra if isinstance(extra, list) else [extra] * len(prompts)
    params = [SamplingParams(max_tokens=new, min_tokens=new, temperature=0, logprobs=0, extra_args=x) for x in extras]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append((list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]))
    return result


_HF = {}


def hf_run(path, prompts, config, new=NEW, **segmentation):
    """replace_attention + HF greedy generate, one prompt at a time: [(token ids, logprobs)]."""
    key = (path, json.dumps(config.to_dict() if config else None), tuple(map(tuple, prompts)), new,
           tuple(sorted(segmentation.items())))
    if key not in _HF:
        from transformers import AutoModelForCausalLM

        tok = _tok(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        handle = sf.replace_attention(model, config, tokenizer=tok, **segmentation) if config is not None else None
        out = []
        with torch.no_grad():
            for p in prompts:
                g = model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
                ids = g.sequences[0, len(p):].tolist()
                lps = [torch.log_softmax(l[0].double(), -1)[t].item() for l, t in zip(g.logits, ids)]
                out.append((ids, lps))
        counts = handle.trigger_counts() if handle is not None else None
        if handle is not None:
            handle.restore()
        _HF[key] = (out, counts)
    return _HF[key]


def assert_same_as_hf(got, want, what) -> float:
    """Same tokens, logprobs within LOGPROB_TOL; returns the largest logprob difference."""
    assert len(got) == len(want)
    worst = 0.0
    for i, ((ids, lps), (hids, hlps)) in enumerate(zip(got, want)):
        assert ids == hids, f"{what}: prompt {i}: vLLM tokens {ids} != HF {hids}"
        diff = max(abs(a - b) for a, b in zip(lps, hlps))
        assert diff <= LOGPROB_TOL, f"{what}: prompt {i}: logprobs differ by {diff:.2e} > {LOGPROB_TOL}"
        worst = max(worst, diff)
    return worst


def max_logprob_change(a, b):
    return max(abs(x - y) for (_, la), (_, lb) in zip(a, b) for x, y in zip(la, lb))


MODELS = ["tiny", "qwen2"]


def model_and_prompts(name, qwen_dir):
    """(model dir, prompts, segmentation options). The tiny reasoner writes one substitution per
    paragraph and no sentence ends, so it is segmented by paragraphs (as the demo does); the random
    Qwen2's prefilled thinking has sentences (the paper's rule)."""
    if name == "tiny":
        return PACKAGED_DIR, tiny_prompts(), {"steps": "paragraph"}
    return qwen_dir, qwen_prompts(qwen_dir), {}


def default_config(path):
    from transformers import AutoConfig

    return sf.StepFlowConfig.default_for(AutoConfig.from_pretrained(path).num_hidden_layers)


def acting_config(path):
    """The paper's config with tau_max 0.9: on the random Qwen2 the default's 0.15 never fires the bridge
    (its attention gives the question more), 0.9 does, so OEB edits keys and values after layer 0."""
    return dataclasses.replace(default_config(path), oeb_tau_max=0.9)


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name,variant", [("tiny", "default"), ("qwen2", "default"), ("qwen2", "tau_max=0.9")])
def test_stepflow_matches_hf_and_noop_matches_stock(engines, qwen_dir, name, variant):
    """Stock vLLM; a config that does nothing (no layers): bit-identical to stock. The paper's default
    config (and, on the random Qwen2, whose attention gives the question more than the default's
    tau_max of 0.15 so that the bridge never fires, the same with tau_max 0.9): the same greedy tokens
    as replace_attention + HF generate, logprobs within 1e-4, the same OEB / SMI trigger counts,
    and logprobs moved from stock by far more than the tolerance."""
    path, prompts, seg = model_and_prompts(name, qwen_dir)
    llm = engines.get(path)
    stock = run(llm, prompts)
    noop = run(llm, prompts, steer(sf.StepFlowConfig(oeb_layers=(), smi_layers=()), **seg))
    assert noop == stock
    assert_same_as_hf(stock, hf_run(path, prompts, None)[0], "stock")
    config = default_config(path)
    if variant != "default":
        config = acting_config(path)
    plugin.trigger_counts(reset=True)
    steered = run(llm, prompts, steer("default" if variant == "default" else config, **seg))
    counts = plugin.trigger_counts(reset=True)
    want, hf_counts = hf_run(path, prompts, config, **seg)
    worst = assert_same_as_hf(steered, want, f"StepFlow {variant}")
    # vLLM places every token HF does: the same OEB rows and SMI injections, layer by layer
    assert counts == hf_counts, (counts, hf_counts)
    assert sum(counts["smi"].values()) > 0, counts
    assert sum(counts["oeb"].values()) > 0 or (name, variant) == ("qwen2", "default"), counts
    assert max_logprob_change(steered, stock) > 100 * LOGPROB_TOL
    print(f"\n{name} {variant}: OEB rows {sum(counts['oeb'].values())}, SMI tokens {sum(counts['smi'].values())}, "
          f"max |logprob - HF| {worst:.1e}, max |logprob change| from stock {max_logprob_change(steered, stock):.3f}")


@pytest.mark.parametrize("name", MODELS)
def test_mixed_batch(engines, qwen_dir, name):
    """Steered and unsteered requests in one batch: the unsteered ones bit-identical to stock, the
    steered ones as when they run alone (and as HF)."""
    path, prompts, seg = model_and_prompts(name, qwen_dir)
    llm = engines.get(path)
    stock = run(llm, prompts)
    config = default_config(path)
    extras = [steer("default", **seg) if i % 2 == 0 else None for i in range(len(prompts))]
    mixed = run(llm, prompts, extras)
    want = hf_run(path, prompts, config, **seg)[0]
    for i, x in enumerate(extras):
        if x is None:
            assert mixed[i] == stock[i], f"unsteered prompt {i} changed in a batch with steered ones"
        else:
            assert_same_as_hf([mixed[i]], [want[i]], f"steered prompt {i} in a mixed batch")


@pytest.mark.parametrize("name", MODELS)
def test_chunked_prefill(engines, qwen_dir, name):
    """Prompts prefilled in chunks of 16 tokens (the tracker starts with the prompt's length and
    continues chunk by chunk), decode steps batched with other requests' chunks."""
    path, prompts, seg = model_and_prompts(name, qwen_dir)
    llm = engines.get(path, enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=4)
    assert_same_as_hf(run(llm, prompts, steer("default", **seg)),
                      hf_run(path, prompts, default_config(path), **seg)[0], "chunked prefill")


def test_prefix_caching_is_salted(engines, qwen_dir, monkeypatch):
    """With prefix caching, a steered request must not reuse blocks a stock request computed (nor the
    other way round): the plugin salts steered requests. Without the salt the steered results change.
    The config lets the bridge fire on this model (tau_max 0.9), so OEB edits the prompt's keys and
    values in the layers after layer 0."""
    path, prompts = qwen_dir, qwen_prompts(qwen_dir)
    assert max(map(len, prompts)) > 64   # whole blocks of 32 with thinking tokens in them
    config = acting_config(path)
    llm = engines.get(path, enable_prefix_caching=True)
    stock = run(llm, prompts)
    want = hf_run(path, prompts, config)[0]
    assert_same_as_hf(run(llm, prompts, steer(config)), want, "steered after stock, prefix caching on")
    assert run(llm, prompts) == stock   # stock after steered: untouched
    plugin.EVENTS.clear()
    assert_same_as_hf(run(llm, prompts, steer(config)), want, "steered again (its own cached blocks)")
    assert plugin.EVENTS.get("skipped", 0) > 0   # the tracker placed the cached prefix it did not compute
    assert cache_salt(steer("default")) != cache_salt(steer(config))
    assert cache_salt(steer("default"), "user") not in (None, "user")
    assert cache_salt(None, "user") == "user"
    # The test can fail: drop the salt, reset the cache, run stock, then steered reuses its blocks.
    monkeypatch.setattr(plugin, "cache_salt", lambda extra, salt=None: salt)
    llm.reset_prefix_cache()
    run(llm, prompts)
    unsalted = run(llm, prompts, steer(config))
    assert max_logprob_change(unsalted, want) > 10 * LOGPROB_TOL


def test_compiled_model(engines, qwen_dir):
    """enforce_eager=False: vLLM compiles the model with torch.compile; attention stays an eager op,
    where the plugin acts, and the runner hook is Python."""
    path, prompts = qwen_dir, qwen_prompts(qwen_dir)
    llm = engines.get(path, enforce_eager=False)
    config = acting_config(path)
    assert_same_as_hf(run(llm, prompts, steer(config)), hf_run(path, prompts, config)[0], "enforce_eager=False")


def test_preemption_recompute(engines, qwen_dir):
    """A KV cache too small for all requests at once: vLLM preempts requests and recomputes them later
    (prefill of prompt + generated tokens); the tracker rolls back and the results stay HF's."""
    path, prompts = qwen_dir, qwen_prompts(qwen_dir)
    llm = engines.get(path, num_gpu_blocks_override=12, max_model_len=256, max_num_seqs=3)
    config = acting_config(path)
    plugin.EVENTS.clear()
    got = run(llm, prompts * 2, steer(config), new=64)
    assert plugin.EVENTS.get("rollback", 0) > 0, plugin.EVENTS   # some request was preempted and recomputed
    want = hf_run(path, prompts, config, new=64)[0]
    assert_same_as_hf(got, want * 2, "preempted")


def run_script(tmp_path, source, *args, count, **env):
    """Run `source` as a script in a process of its own; return the `count` lines it printed after
    "RESULT " (the process's stderr in the failure message when it printed another number)."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(source)
    done = subprocess.run([sys.executable, str(script), *map(str, args)], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    results = [x[len("RESULT "):] for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(results) == count, done.stderr[-3000:]
    return results


SPECULATIVE = """
import json, sys
from vllm import LLM, SamplingParams
from stepflow_ext.vllm import steer

def main():
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0, block_size=32,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2,
                                  "prompt_lookup_min": 1})
    prompt = [{"prompt_token_ids": json.loads(sys.argv[2])}]
    try:
        llm.generate(prompt, SamplingParams(max_tokens=4, extra_args=steer("default")), use_tqdm=False)
        print("RESULT not refused")
    except ValueError as e:
        print("RESULT refused:", e)
    out = llm.generate(prompt, SamplingParams(max_tokens=4, min_tokens=4, temperature=0), use_tqdm=False)
    print("RESULT stock tokens", len(out[0].outputs[0].token_ids))

if __name__ == "__main__":
    main()
"""


def test_speculative_decoding_is_refused(tmp_path):
    """Draft tokens would be placed into steps before they are accepted: a steered request on an engine
    with speculative decoding (n-gram drafts) is refused in the caller; stock requests still run. (In a
    process of its own: vLLM 0.32 cannot start a speculative engine after another one in one process.)"""
    results = run_script(tmp_path, SPECULATIVE, PACKAGED_DIR, json.dumps(tiny_prompts()[0]), count=2)
    assert results[0].startswith("refused:") and "speculative decoding" in results[0], results
    assert results[1] == "stock tokens 4", results


def test_bad_requests_fail_in_the_caller(engines):
    from vllm import SamplingParams

    llm = engines.get(PACKAGED_DIR)
    prompt = [{"prompt_token_ids": tiny_prompts()[0]}]
    with pytest.raises(ValueError, match="out of range"):
        llm.generate(prompt, SamplingParams(max_tokens=2, extra_args={"stepflow": {"oeb_layers": [9]}}),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="smi_rule='value'"):
        llm.generate(prompt, SamplingParams(max_tokens=2, extra_args=steer(sf.StepFlowConfig(smi_layers=(3,),
                                                                                               smi_rule="residual"))),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="unknown segmentation"):
        steer("default", tokenizer="x")
    # the engine still serves after the refusals
    assert len(run(llm, [tiny_prompts()[0]], steer("default"), new=4)[0][0]) == 4


ENGINE_PROCESS = """
import json, os, sys
from vllm import LLM, SamplingParams
from stepflow_ext.vllm import steer

def main():
    prompts, new = json.loads(sys.argv[1]), int(sys.argv[2])
    llm = LLM(model=sys.argv[3], dtype="float32", enforce_eager=True, max_model_len=512, seed=0, block_size=32)
    params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0, logprobs=0,
                            extra_args=steer("default", steps="paragraph"))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    print("RESULT", json.dumps([[list(o.outputs[0].token_ids),
                                 [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]]
                                for o in outs]))

if __name__ == "__main__":
    main()
"""


def test_engine_core_in_its_own_process(tmp_path):
    """vLLM's default: the engine core (and its worker) in another process, which loads the plugin from
    the entry point by itself. The steered results are HF's there too."""
    prompts = tiny_prompts()
    [line] = run_script(tmp_path, ENGINE_PROCESS, json.dumps(prompts), NEW, PACKAGED_DIR, count=1,
                        VLLM_ENABLE_V1_MULTIPROCESSING="1")
    got = [tuple(r) for r in json.loads(line)]
    config = default_config(PACKAGED_DIR)
    assert_same_as_hf(got, hf_run(PACKAGED_DIR, prompts, config, steps="paragraph")[0], "engine core process")
    assert max_logprob_change(got, hf_run(PACKAGED_DIR, prompts, None)[0]) > 100 * LOGPROB_TOL
