"""step_saliency on a random GPT-OSS with 20B-like head shapes, scaled down in depth (issue 13).

Model: GptOssConfig with 64 query heads, 8 kv heads, head_dim 64 (GPT-OSS 20B's attention), hidden 512,
2 layers (sliding_attention with window 128, then full_attention), 4 experts (top-2, intermediate 256,
eager experts), vocab 2000, random weights with sink logits drawn from N(1, 1), fp32, B = 1. GPT-OSS has
no SDPA path in transformers (its attention is eager, building the (H, T, T) probabilities and a 4D
mask); under step_saliency every layer attends through the project's kernel instead (oeb_attention with
no row intervened, sinks and windows; no 4D mask), and step_saliency_pool pools A * dL/dA per step pair,
so nothing of size T x T is built.

Cases, at T = 512, 1024, 2048 (STEPFLOW_BENCH_T overrides), one fresh subprocess per case:
- step_saliency: sf.step_saliency(model, ids, seg, preset="paper");
- fwd_bwd: exactly what step_saliency runs minus the saliency capture: frozen weights, embeddings as the
  leaf, model.base_model(...) through the same fused attention kernel (no 4D mask), the same loss (preset "paper": every
  token after the first, mean NLL, sf.saliency._nll) and backward;
- eager: the authors' way: attn_implementation="eager", output_attentions=True, retain_grad on every
  layer's attention probabilities, backward, then pool mean_h |A * dL/dA| to step pairs.

The child runs the case once (warm-up, timed) and once more under peak_memory_mib (timed): it reports the
extra peak RSS (MiB) of the second call and the min of the two call times. It runs under an address-space
cap (STEPFLOW_BENCH_AS_GIB, default 16 GiB); a case that would exceed it fails in the child and is reported
as not measured. The pytest-benchmark time of each row is the whole subprocess (import, model build and
both calls); the summary table printed at the end has the in-child numbers.
Run: python -m pytest benchmarks/bench_gpt_oss.py -q -s --benchmark-columns=min,median
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

LENGTHS = [int(t) for t in os.environ.get("STEPFLOW_BENCH_T", "512,1024,2048").split(",")]
METHODS = ["step_saliency", "fwd_bwd", "eager"]
AS_GIB = float(os.environ.get("STEPFLOW_BENCH_AS_GIB", "16"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 2000
_results: dict = {}


def gpt_oss_20b_heads(layers=2):
    import torch
    import transformers

    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        pad_token_id=0, eos_token_id=1, bos_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                          experts_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape) + 1.0)
    return model.eval()


def trace(t):
    """Question 10%, steps of ~80 tokens, summary 10%: bench_model.py's trace."""
    from benchmarks.bench_model import trace as model_trace

    return model_trace(t)


def step_saliency(model, ids, seg):
    import stepflow_ext as sf

    return sf.step_saliency(model, ids, seg, preset="paper").maps


def fwd_bwd(model, ids, seg):
    """step_saliency's forward + backward without the saliency capture (same attention, same loss)."""
    import torch

    import stepflow_ext as sf

    targets = sf.saliency.target_mask(seg, "all")
    weights = torch.full((ids.shape[0],), 1.0 / float(targets.sum()))
    mask = (seg.seg_ids >= 0).long()
    installed = sf.hf.Installed.on(model)
    token = installed.push(lambda inner: inner)      # the attention step_saliency runs, without its capture
    try:
        with sf.saliency._frozen(model, False), sf.saliency._fused(model, installed, seg.seg_ids), \
                torch.enable_grad():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
            loss = sf.saliency._nll(model, hidden, ids, targets, weights, 1024)
            loss.backward()
    finally:
        installed.pop(token)
    return float(loss.detach())


def eager(model, ids, seg):
    """The materialized way: eager attention, output_attentions, retained gradients of A (paper preset)."""
    import torch

    import stepflow_ext as sf

    model.set_attn_implementation("eager")
    with sf.saliency._frozen(model, False), torch.enable_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
        maps = [sf.reference.pool_to_segments((a * a.grad).abs().mean(1), seg.seg_ids, seg.num_segments)
                for a in out.attentions]
        return torch.stack(maps, 1)


def child(method, t):
    """Runs in the subprocess: build, warm-up call, measured call; prints one JSON line."""
    import resource

    import torch

    from benchmarks.peak_memory import _status_kib, peak_memory_mib

    cap = int(AS_GIB * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    model = gpt_oss_20b_heads()
    torch.manual_seed(1)
    ids = torch.randint(2, VOCAB, (1, t))
    seg = trace(t)
    fn = globals()[method]
    times = []

    def timed():
        start = time.perf_counter()
        out = fn(model, ids, seg)
        times.append(time.perf_counter() - start)
        return out

    timed()
    base = _status_kib("VmRSS") / 1024.0
    peak = peak_memory_mib(timed)
    print("RESULT " + json.dumps({"peak_mib": peak, "times_s": times, "base_rss_mib": base,
                                  "threads": torch.get_num_threads()}), flush=True)


def run_child(method, t):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), method, str(t)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout)[-600:]
    return {"error": f"rc {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}


@pytest.fixture(scope="module", autouse=True)
def summary_table(request):
    yield
    if not _results:
        return
    lines = ["", "GPT-OSS 20B-like heads (H=64, H_kv=8, d=64), hidden 512, 2 layers (sliding 128, full), 4 experts, "
             "vocab 2000, fp32, B=1, CPU; extra peak RSS of one call (MiB), min of 2 calls (s)",
             f"{'T':>5} {'case':>14} {'MiB':>9} {'s':>8} {'MiB/fwd_bwd':>11} {'s/fwd_bwd':>9} "
             f"{'MiB eager/ss':>12} {'s eager/ss':>10}"]
    for t in sorted({k[1] for k in _results}):
        fb, ss = _results.get(("fwd_bwd", t), {}), _results.get(("step_saliency", t), {})
        for m in METHODS:
            r = _results.get((m, t))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"{t:>5} {m:>14}   not measured: {r['error']}")
                continue
            ratio = lambda a, b, k: f"{a[k] / b[k]:.2f}" if a.get(k) and b.get(k) else "-"
            mem_fb = ratio(r, fb, "peak_mib") if m == "step_saliency" else "-"
            time_fb = ratio(r, fb, "min_s") if m == "step_saliency" else "-"
            mem_e = ratio(r, ss, "peak_mib") if m == "eager" else "-"
            time_e = ratio(r, ss, "min_s") if m == "eager" else "-"
            lines.append(f"{t:>5} {m:>14} {r['peak_mib']:>9.1f} {r['min_s']:>8.2f} {mem_fb:>11} {time_fb:>9} "
                         f"{mem_e:>12} {time_e:>10}")
    eager_pts = [(t, r["peak_mib"]) for (m, t), r in _results.items() if m == "eager" and "error" not in r]
    if len(eager_pts) >= 2:   # least-squares fit of peak = a + b * T^2 over the measured eager sizes
        xs, ys = [t * t for t, _ in eager_pts], [y for _, y in eager_pts]
        n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
        fit = ", ".join(f"T={t}: {a + b * t * t:.0f}" for t, _ in sorted(eager_pts))
        lines.append(f"eager peak fit a + b*T^2: a = {a:.1f} MiB, b = {b * 2**20:.3f} MiB per (1024 tokens)^2 "
                     f"[{fit}]")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines), flush=True)


@pytest.mark.parametrize("t", LENGTHS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("method", METHODS)
def test_gpt_oss_step_saliency(benchmark, method, t):
    result = {}

    def once():
        result.update(run_child(method, t))

    benchmark.pedantic(once, rounds=1, iterations=1)
    if "error" not in result:
        result["min_s"] = min(result["times_s"])
    _results[(method, t)] = result
    benchmark.extra_info.update({"T": t, "method": method, **result})
    if "error" in result:
        pytest.skip(f"{method} at T={t} not measured: {result['error']}")


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]))
