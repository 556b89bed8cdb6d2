"""GPU benchmarks in one table (design.md 7, issue "CUDA kernels"); run by scripts/gpu_check.sh.

Cases, each against what a user would otherwise run, side by side in one process:
- oeb_attention prefill (T = 2k, 8k, 32k) and decode (KV = 8k, 32k) with Qwen2-1.5B and 7B head
  shapes in bf16, vs SDPA (flash), vs FlexAttention computing OEB exactly as three masked passes
  (sinks, context, current step) merged by their log-sum-exps, vs dense-mask steering (a T x T
  additive bias through SDPA, as PASTA-style tools do);
- step_saliency_pool vs the materialized reference; full-model step_saliency (Qwen2-1.5B dims,
  random weights) vs a plain SDPA forward + backward of the same loss, up to the largest T that fits;
- generate tokens/s with StepFlow vs stock;
- a decode step's op calls (oeb_attention on an 8k / 32k cache, smi_value, step_momentum_decode_)
  replayed from a CUDA graph vs eager (the ops issue no host sync, so they capture; issue 15);
- the OEB backward under torch.use_deterministic_algorithms(True) (the scalar path, no dQ atomics)
  vs the default tensor-core backward;
- the kernel paths of issue 15 items 7 and 8 (step_saliency_pool's key split and cp.async pipeline,
  oeb_attention's ldmatrix.trans V loads, one-slot tiles and BN = 64 at d = 128) vs the old paths
  (first, as the part most likely to be cut by the script's time limit otherwise).
Every number is a median of CUDA-event timings after warm-up; memory is torch.cuda peak.
`--smoke` runs tiny sizes (also on the CPU) to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import stepflow_ext as sf

SHAPES = {"1.5B": (12, 2, 128), "7B": (28, 4, 128)}


def timed(fn, device, reps=10, warmup=2):
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_mib(fn, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(fn, device, reps=10):
    """(ms, peak MiB) or (nan, nan) with the reason when it fails (out of memory...)."""
    try:
        return timed(fn, device, reps), peak_mib(fn, device), ""
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("nan"), "OOM"
    except Exception as e:  # noqa: BLE001 - a failed baseline is reported, not fatal
        return float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:80]}"


def trace_segments(t, step=120):
    q = max(1, t // 10)
    n_steps = max(1, (t - q) // step)
    lengths = [q] + [step] * n_steps
    lengths[-1] += t - sum(lengths)
    return sf.Segmentation.from_lengths([lengths], kinds=[["question"] + ["step"] * n_steps])


# --------------------------------------------------------------------------- OEB baselines


def dense_bias_steering(q, k, v, bias):
    """PASTA-style: an additive (T x T) bias through SDPA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


def make_dense_bias(seg_start, tq, tk, device, dtype, strength):
    qpos = torch.arange(tk - tq, tk, device=device)[:, None]
    kpos = torch.arange(tk, device=device)[None, :]
    bias = torch.zeros(tq, tk, device=device, dtype=dtype)
    bias.masked_fill_(kpos > qpos, float("-inf"))
    current = (kpos >= seg_start[0][:, None]) & (seg_start[0][:, None] >= 0) & (kpos <= qpos)
    bias.masked_fill_(current, math.log(1 - strength / 2))
    return bias[None, None]


def flex_oeb(flex, q, k, v, seg_start, strength, num_sink):
    """OEB exactly, with FlexAttention: three masked passes (sinks, X, C) merged by their LSEs."""
    tq, tk = q.shape[2], k.shape[2]
    start = seg_start[0]
    off = tk - tq

    def sink(b, h, qi, kj):
        return (kj < num_sink) & (kj <= qi + off)

    def context(b, h, qi, kj):
        return (kj >= num_sink) & (kj < start[qi]) & (kj <= qi + off)

    def current(b, h, qi, kj):
        return (kj >= num_sink) & (kj >= start[qi]) & (kj <= qi + off)

    outs, lses = [], []
    for mask_mod in (sink, context, current):
        out, lse = flex(q, k, v, block_mask=None, score_mod=lambda s, b, h, qi, kj, m=mask_mod: torch.where(
            m(b, h, qi, kj), s, -float("inf")), enable_gqa=True, return_lse=True)
        outs.append(out.float())
        lses.append(torch.nan_to_num(lse.float(), neginf=-1e30))
    total = torch.logsumexp(torch.stack(lses), 0)
    p = [torch.exp(l - total) for l in lses]
    p_s, p_x, p_c = p
    locked = (p_x > 0) & (p_c > p_x)
    o = (p_c / p_x.clamp_min(1e-30)).clamp_min(1e-30) ** (1 - strength)
    mass = p_c + p_x
    new_c = torch.where(locked, mass * o / (1 + o), p_c)
    new_x = torch.where(locked, mass / (1 + o), p_x)
    out = p_s[..., None] * outs[0] + new_x[..., None] * outs[1] + new_c[..., None] * outs[2]
    return out.to(q.dtype)


def bench_oeb(device, dtype, smoke, rows):
    flex = None
    if device == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception:  # noqa: BLE001
            flex = None
    prefill = [256] if smoke else [2048, 8192, 32768]
    decode = [512] if smoke else [8192, 32768]
    for shape, (h, h_kv, d) in SHAPES.items():
        if smoke and shape != "1.5B":
            continue
        for t in prefill + [("decode", x) for x in decode]:
            is_decode = isinstance(t, tuple)
            tk = t[1] if is_decode else t
            tq = 1 if is_decode else tk
            q = torch.randn(1, h, tq, d, device=device, dtype=dtype)
            k = torch.randn(1, h_kv, tk, d, device=device, dtype=dtype)
            v = torch.randn(1, h_kv, tk, d, device=device, dtype=dtype)
            seg = trace_segments(tk)
            seg_start = seg.seg_start().to(device)[:, -tq:]
            kv_start = torch.zeros(1, dtype=torch.long, device=device)
            # ours: the paper's bridge rule (the baselines below compute the odds rule's three passes)
            bounds = sf.reference.oeb_bounds(seg.seg_ids, seg.seg_kinds_tensor(), "bridge")[:, -tq:].to(device)
            case = f"oeb {'decode KV' if is_decode else 'prefill T'}={tk} {shape}"
            ours = measure(lambda: sf.oeb_attention(q, k, v, kv_start, bounds, rule="bridge"), device)
            sdpa = measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=not is_decode,
                                                                 enable_gqa=True), device)
            bias = None
            try:
                bias = make_dense_bias(seg_start, tq, tk, device, dtype, 0.5)
                dense = measure(lambda: dense_bias_steering(q, k, v, bias), device)
            except torch.OutOfMemoryError:
                dense = (float("nan"), float("nan"), "OOM")
            del bias
            flexr = measure(lambda: flex_oeb(flex, q, k, v, seg_start, 0.5, 1), device) if flex else \
                (float("nan"), float("nan"), "no flex")
            rows.append({"case": case, "ours_ms": ours[0], "ours_mib": ours[1],
                         "baselines": {"sdpa": sdpa, "flex_oeb": flexr, "dense_bias": dense},
                         "note": ours[2]})


# --------------------------------------------------------------------------- saliency


def saliency_inputs(t, device, dtype):
    """q, k, v, grad_out of one Qwen2-1.5B layer on a T-token trace, its segmentation and seg ids."""
    h, h_kv, d = SHAPES["1.5B"]
    q = torch.randn(1, h, t, d, device=device, dtype=dtype)
    k = torch.randn(1, h_kv, t, d, device=device, dtype=dtype)
    v = torch.randn(1, h_kv, t, d, device=device, dtype=dtype)
    g = torch.randn(1, h, t, d, device=device, dtype=dtype)
    seg = trace_segments(t)
    return q, k, v, g, seg, seg.seg_ids.to(device)


def bench_saliency_op(device, dtype, smoke, rows):
    h, h_kv, d = SHAPES["1.5B"]
    for t in ([256] if smoke else [2048, 4096, 8192, 32768]):
        q, k, v, g, seg, ids = saliency_inputs(t, device, dtype)
        ours = measure(lambda: sf.step_saliency_pool(q, k, v, g, ids, seg.num_segments, d ** -0.5), device)
        ref = measure(lambda: sf.reference.step_saliency_pool(q, k, v, g, ids, seg.num_segments, d ** -0.5), device,
                      reps=3) if t <= 8192 else (float("nan"), float("nan"), "skipped")
        rows.append({"case": f"saliency op T={t}", "ours_ms": ours[0], "ours_mib": ours[1],
                     "baselines": {"materialized": ref}, "note": ours[2]})


def bench_model(device, dtype, smoke, rows):
    import transformers

    layers, hidden, inter = (2, 128, 256) if smoke else (28, 1536, 8960)
    cfg = transformers.Qwen2Config(vocab_size=1000 if smoke else 151936, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2,
                                   max_position_embeddings=40000, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    for t in ([256] if smoke else [4096, 16384, 32768]):
        ids = torch.randint(0, cfg.vocab_size, (1, t), device=device)
        lengths = [t // 10] + [120] * ((t - t // 10 - t // 10) // 120)
        lengths.append(t - sum(lengths))
        seg = sf.Segmentation.from_lengths([lengths], kinds=[["question"] + ["step"] * (len(lengths) - 2) + ["summary"]])

        def plain():
            targets = sf.saliency.target_mask(seg, "summary").to(device)
            for p in model.parameters():
                p.requires_grad_(False)
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            hid = model.base_model(inputs_embeds=emb, use_cache=False).last_hidden_state
            sf.saliency._summed_nll(model, hid, ids, targets, 1024).backward()

        ours = measure(lambda: sf.step_saliency(model, ids, seg, gradient_checkpointing=t > 8192), device, reps=3)
        base = measure(plain, device, reps=3)
        rows.append({"case": f"model step_saliency T={t}", "ours_ms": ours[0], "ours_mib": ours[1],
                     "baselines": {"sdpa_fwd_bwd": base}, "note": ours[2]})
    del model


def bench_generate(device, dtype, smoke, rows):
    import transformers

    layers, hidden, inter = (2, 128, 256) if smoke else (28, 1536, 8960)
    cfg = transformers.Qwen2Config(vocab_size=1000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    ids = torch.randint(0, 1000, (4, 512 if not smoke else 16), device=device)
    new = 16 if smoke else 128
    newline = 5  # treat one token id as the step delimiter, so steps close during generation

    def run():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)

    stock = measure(run, device, reps=3)
    with sf.replace_attention(model, sf.StepFlowConfig.default_for(model), boundary_token_ids={newline},
                              think_end_token_ids=set()):
        ours = measure(run, device, reps=3)
    tps = lambda ms: 4 * new / (ms / 1e3)  # noqa: E731
    rows.append({"case": "generate tokens/s (B=4)", "ours_ms": ours[0], "ours_mib": ours[1],
                 "baselines": {"stock": stock}, "note": f"{tps(ours[0]):.0f} vs {tps(stock[0]):.0f} tok/s"})


# --------------------------------------------------------------------------- issue 15: capture, determinism


def bench_capture(device, dtype, smoke, rows):
    """One decode step's op calls, eager vs replayed from a CUDA graph."""
    h, h_kv, d = SHAPES["7B"]
    hidden = 3584
    for tk in ([512] if smoke else [8192, 32768]):
        q = torch.randn(1, h, 1, d, device=device, dtype=dtype)
        k = torch.randn(1, h_kv, tk, d, device=device, dtype=dtype)
        v = torch.randn(1, h_kv, tk, d, device=device, dtype=dtype)
        x = torch.randn(1, 1, hidden, device=device, dtype=dtype)
        kv_start = torch.zeros(1, dtype=torch.long, device=device)
        bounds = torch.tensor([[[tk // 10, tk // 2]]], device=device)
        windows = torch.tensor([[[tk // 3, tk // 3 + 4]]], device=device)
        seg = torch.tensor([[1]], device=device)
        kinds = torch.tensor([[0, 1, 2]], device=device)

        def step(state):
            out, _, _ = sf.ops.oeb_attention(q, k, v, kv_start, bounds, "bridge")
            out = sf.ops.smi_value(out.transpose(1, 2), v, windows, 0.06, 4)
            return out, sf.ops.step_momentum_decode_(x, seg, kinds, state, 0.9, 0.05)

        state = sf.ops.new_momentum_state(1, hidden, device)
        eager = measure(lambda: step(state), device, reps=20)
        note = ""
        if device == "cuda":
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step(sf.ops.new_momentum_state(1, hidden, device))
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step(state)
                replay = measure(graph.replay, device, reps=20)
                note = "captured"
            except Exception as e:  # noqa: BLE001 - a failed capture is the result to report
                replay, note = (float("nan"), float("nan"), "capture failed"), f"{type(e).__name__}: {str(e)[:100]}"
        else:
            replay, note = (float("nan"), float("nan"), "no CUDA"), "no CUDA"
        rows.append({"case": f"decode step ops KV={tk} 7B", "ours_ms": replay[0], "ours_mib": replay[1],
                     "baselines": {"eager": eager}, "note": f"graph replay; {note}"})


def bench_determinism(device, dtype, smoke, rows):
    """The OEB backward: deterministic mode (scalar path) vs default (tensor cores, dQ atomics)."""
    h, h_kv, d = SHAPES["1.5B"]
    t = 256 if smoke else 4096
    q = torch.randn(1, h, t, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, h_kv, t, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, h_kv, t, d, device=device, dtype=dtype, requires_grad=True)
    seg = trace_segments(t)
    bounds = sf.reference.oeb_bounds(seg.seg_ids, seg.seg_kinds_tensor(), "bridge").to(device)
    kv_start = torch.zeros(1, dtype=torch.long, device=device)
    out, _, _ = sf.oeb_attention(q, k, v, kv_start, bounds, rule="bridge")
    grad = torch.randn_like(out)

    def backward():
        return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    default = measure(backward, device)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = measure(backward, device)
    finally:
        torch.use_deterministic_algorithms(before)
    rows.append({"case": f"oeb backward deterministic T={t}", "ours_ms": det[0], "ours_mib": det[1],
                 "baselines": {"default": default}, "note": det[2]})


# --------------------------------------------------------------------------- issue 15 items 7, 8: kernel paths


def bench_paths(device, dtype, smoke, rows):
    """The kernel paths of issue 15 items 7 and 8 against the ones they replace, in one process
    (docs/method_kernels.md, "Kernel paths and their switches"): step_saliency_pool at T = 8192,
    B = 1 (the split of the causal band over CTAs, the cp.async pipeline) and oeb_attention's prefill
    at T = 8192, d = 128 (ldmatrix.trans V fragments, the one-slot tile step, BN = 64 vs 32). "ours"
    is the default path; each baseline is a named set of switches (old = all of them off)."""
    h, h_kv, d = SHAPES["1.5B"]
    t = 256 if smoke else 8192
    q, k, v, g, seg, ids = saliency_inputs(t, device, dtype)

    def with_paths(fn, **paths):
        def run():
            with sf.ops.kernel_paths(**paths):
                return fn()
        return run

    pool = lambda: sf.step_saliency_pool(q, k, v, g, ids, seg.num_segments, d ** -0.5)  # noqa: E731
    ours = measure(pool, device)
    base = {"old": measure(with_paths(pool, pool_split=0, pool_pipeline=0), device),
            "split only": measure(with_paths(pool, pool_pipeline=0), device),
            "pipeline only": measure(with_paths(pool, pool_split=0), device)}
    rows.append({"case": f"saliency op paths T={t} 1.5B", "ours_ms": ours[0], "ours_mib": ours[1],
                 "baselines": base, "note": ours[2] or "ours = split + pipeline"})
    bounds = sf.reference.oeb_bounds(seg.seg_ids, seg.seg_kinds_tensor(), "bridge").to(device)
    kv_start = torch.zeros(1, dtype=torch.long, device=device)
    for name, b in (("bridge", bounds), ("plain", torch.full_like(bounds, -1))):
        attn = lambda b=b: sf.oeb_attention(q, k, v, kv_start, b, rule="bridge")  # noqa: E731
        ours = measure(attn, device)
        base = {"old": measure(with_paths(attn, oeb_ldmatrix=0, oeb_tile_fast=0), device),
                "ldmatrix only": measure(with_paths(attn, oeb_tile_fast=0), device),
                "tile-fast only": measure(with_paths(attn, oeb_ldmatrix=0), device),
                "BN=64": measure(with_paths(attn, oeb_bn=64), device)}
        rows.append({"case": f"oeb prefill paths T={t} {name}", "ours_ms": ours[0], "ours_mib": ours[1],
                     "baselines": base, "note": ours[2] or "ours = ldmatrix + tile-fast, BN=32"})


def table(rows):
    lines = [f"{'case':34} {'ours ms':>9} {'ours MiB':>9}  baselines (ms, ratio ours/baseline)"]
    for r in rows:
        parts = []
        for name, (ms, mib, why) in r["baselines"].items():
            parts.append(f"{name} {why}" if why else f"{name} {ms:.2f} ({r['ours_ms'] / ms:.2f}x, {mib:.0f} MiB)")
        lines.append(f"{r['case']:34} {r['ours_ms']:9.2f} {r['ours_mib']:9.0f}  " + "; ".join(parts)
                     + (f"  [{r['note']}]" if r["note"] else ""))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_out/gpu_bench.json", help="JSON results (a .table file is written beside)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    ap.add_argument("--only", default="paths,capture,determinism,oeb,saliency,model,generate",
                    help="comma-separated parts to run")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    parts = {"paths": bench_paths, "capture": bench_capture, "determinism": bench_determinism, "oeb": bench_oeb,
             "saliency": bench_saliency_op, "model": bench_model, "generate": bench_generate}
    import os

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write():  # after every part: a run cut by a timeout still leaves its table
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "dtype": str(dtype), "rows": rows}, f, indent=1, default=str)
        with open(os.path.splitext(args.out)[0] + ".table", "w") as f:
            f.write(table(rows) + "\n")

    for name in args.only.split(","):
        t0 = time.time()
        try:
            parts[name](args.device, dtype, args.smoke, rows)
        except Exception as e:  # noqa: BLE001 - keep the other parts
            rows.append({"case": f"{name} FAILED", "ours_ms": float("nan"), "ours_mib": float("nan"), "baselines": {},
                         "note": f"{type(e).__name__}: {str(e)[:160]}"})
        print(f"[{name}: {time.time() - t0:.0f} s]", flush=True)
        write()
    print(table(rows))


if __name__ == "__main__":
    main()
