#!/usr/bin/env python
"""Parity of `step_saliency(..., preset="paper")` with the paper authors' own code.

    python scripts/paper_parity.py PATH [--arch qwen2|llama|gpt_oss|both] [--tokens N] [--seed S]

PATH is a local checkout of the authors' repository (github.com/XiaoyuXu-Vincent/step-saliency).
Nothing of it is part of this project: this script loads, at run time and from PATH only,

- `extract_saliency` from PATH/src/saliency_extractor.py (rule "ag", mode "loss": eager
  attention, output_attentions, gradients retained on the attention probabilities, |A * dL/dA|
  per head, the loss being Hugging Face's mean cross-entropy with labels = input ids), and
- `compute_step_saliency` and `compute_step_metrics` from PATH/scripts/analyze_step_saliency.py
  (the block mean over |a| x |c| of the head-mean token map, and the final / analysis block
  intensities and their ratio).

On a random tiny model (fp32) it runs their extractor on an eager copy of the model and our
`step_saliency(model, ids, seg, preset="paper")` on the model as it is (SDPA by default; a
`--arch gpt_oss` model is eager, with attention sinks and --window sliding layers), with
one token-to-step assignment shared by both: a random contiguous one (the question, --steps
thinking steps, --summary-steps summary segments). Their per-layer step matrix is
compute_step_saliency of their token map averaged over batch and heads (what their
aggregate_step_saliency does, minus its approximate tokenization of step texts); ours is
`result.normalized("block")`. It prints, per layer, the largest relative error of the step
matrix (elementwise over the nonzero entries, and relative to the layer's largest entry), of
FB, AB and FB/AB, then the layer-averaged map's, and whether all stay below --tolerance (1e-4).
Exit status 0 when they do, 1 when not, 2 when the authors' code cannot be loaded.

Their analyze_step_saliency.py imports matplotlib and seaborn at the top (for its plots).
Without seaborn the script stops and says how to install it (`pip install seaborn`; nothing
of it is needed by stepflow_ext), unless --functions-only: then only the three functions are
compiled from the file's text, without executing the rest of the module. The same is done,
with a note, when the file does not compile as a whole (the upstream file at the time of
writing has an indentation error in its plotting function, plot_step_heatmap).
Never run in CI; the authors' code is never vendored.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import sys
import textwrap
import types
import typing

import numpy as np
import torch

NEEDED = ("compute_step_saliency", "compute_step_metrics")


def _fail(message: str, status: int = 2):
    print(textwrap.fill(message, 100, subsequent_indent="  "), file=sys.stderr)
    raise SystemExit(status)


def _load_file(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # (their dataclasses look their module up there)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _functions_from_source(path: str, names) -> types.SimpleNamespace:
    """Compile only the top-level functions `names` of the file at `path` (numpy and typing in scope)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    found = {}
    for name in names:
        start = next((i for i, line in enumerate(lines) if re.match(rf"def {name}\s*\(", line)), None)
        if start is None:
            _fail(f"error: {path} has no top-level function {name}()")
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#" or lines[end].startswith(")")):
            end += 1
        scope = {"np": np, "List": typing.List, "Dict": typing.Dict, "Tuple": typing.Tuple,
                 "__name__": "authors_analyze_step_saliency"}
        try:
            exec(compile("\n".join(lines[start:end]) + "\n", f"{path} ({name})", "exec"), scope)
        except SyntaxError as e:
            _fail(f"error: cannot compile {name}() from {path}: {e}")
        found[name] = scope[name]
    return types.SimpleNamespace(**found)


def load_authors(path: str, functions_only: bool):
    """(extract_saliency, namespace with compute_step_saliency and compute_step_metrics) from PATH."""
    extractor = os.path.join(path, "src", "saliency_extractor.py")
    analysis = os.path.join(path, "scripts", "analyze_step_saliency.py")
    for f in (extractor, analysis):
        if not os.path.isfile(f):
            _fail(f"error: {f} not found: PATH must be a checkout of the authors' repository "
                  "(github.com/XiaoyuXu-Vincent/step-saliency), holding src/ and scripts/")
    try:
        extract_saliency = _load_file("authors_saliency_extractor", extractor).extract_saliency
    except ModuleNotFoundError as e:
        _fail(f"error: {extractor} imports {e.name!r}, which is not installed here: pip install {e.name}")
    if functions_only:
        print(f"note: --functions-only: compiling {', '.join(NEEDED)} from {analysis} without the rest of it")
        return extract_saliency, _functions_from_source(analysis, NEEDED)
    try:
        module = _load_file("authors_analyze_step_saliency", analysis)
    except ModuleNotFoundError as e:
        _fail(f"error: the authors' {analysis} imports {e.name!r} at its top (for its plots), which is not "
              f"installed here. Install it in this environment with `pip install {e.name}` (seaborn also "
              f"pulls pandas; stepflow_ext itself does not need it), or rerun with --functions-only to compile "
              f"only {', '.join(NEEDED)} from the file's text.")
    except SyntaxError as e:
        print(textwrap.fill(f"note: {analysis} does not compile as a module ({type(e).__name__} at line "
                            f"{e.lineno}: {e.msg}); compiling only {', '.join(NEEDED)} from its text, without "
                            "the rest of the module", 100, subsequent_indent="  "))
        return extract_saliency, _functions_from_source(analysis, NEEDED)
    return extract_saliency, module


# --------------------------------------------------------------------------- model and inputs


def tiny_model(arch: str, seed: int, layers: int, vocab: int, window: int = 16):
    """A random tiny model. gpt_oss: GPT-OSS (eager attention, sliding_attention / full_attention layers
    in turn with a `window`-token window, attention-sink logits far from zero; stepflow_ext.cli.tiny_harmony)."""
    import transformers

    if arch == "gpt_oss":
        from stepflow_ext.cli.tiny_harmony import gpt_oss_model

        return gpt_oss_model(vocab, seed=seed, layers=layers, sliding_window=window)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    cfg = transformers.Qwen2Config(**common) if arch == "qwen2" else transformers.LlamaConfig(**common)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():   # random init gives near-uniform attention; sharpen it so the maps have structure
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model.eval()


def random_assignment(tokens: int, steps: int, summaries: int, gen: torch.Generator) -> list[int]:
    """Segment lengths: a question of ~15% of the tokens, then `steps` and `summaries` random
    positive lengths that fill the rest."""
    parts = 1 + steps + summaries
    if tokens < 2 * parts:
        _fail(f"error: --tokens {tokens} is too few for {parts} segments (need >= {2 * parts})")
    question = max(2, tokens * 15 // 100)
    rest = tokens - question
    cuts = torch.randperm(rest - 1, generator=gen)[:parts - 2] + 1
    bounds = [0] + sorted(cuts.tolist()) + [rest]
    return [question] + [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def ours(model, ids, lengths, steps, summaries):
    """Our block maps (L, S, S), our per-layer FB, AB, FB/AB and layer-averaged map."""
    import stepflow_ext as sf

    kinds = ["question"] + ["step"] * steps + ["summary"] * summaries
    try:
        seg = sf.Segmentation.from_lengths([lengths], kinds=[kinds])
        result = sf.step_saliency(model, ids, seg, preset="paper")
    except ValueError as e:
        if "summary" not in str(e):
            raise
        # A Segmentation of this version holds one summary segment. The maps do not depend on the
        # kinds (target "all", no StepFlow), so compute them with the extra summary segments as
        # steps, then read the diagnostics with the real kinds.
        print("note: this Segmentation holds one summary segment; the maps are computed with the first summary "
              "segments as steps (they do not depend on the kinds here) and read with the real kinds")
        flat = ["question"] + ["step"] * (steps + summaries - 1) + ["summary"]
        seg = sf.Segmentation.from_lengths([lengths], kinds=[flat])
        result = sf.step_saliency(model, ids, seg, preset="paper")
        result = sf.StepSaliencyResult(result.maps, result.counts, [kinds], result.meta, result.sizes)
    diag = result.diagnose()[0]
    return (result.normalized("block")[0].double().numpy(), diag, seg.seg_ids[0].tolist())


def theirs(authors, model, ids, token_to_step, steps, summaries):
    """Their step matrices (L, S, S), per-layer metrics and the layer-averaged matrix."""
    extract_saliency, analysis = authors
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    for p in eager.parameters():
        p.requires_grad_(True)
    model_type = "gpt-oss" if model.config.model_type == "gpt_oss" else "qwen3"   # their registry's names
    res = extract_saliency(eager, {"input_ids": ids}, model_type=model_type, rule="ag", mode="loss",
                           return_attn_probs=False, compute_saliency_metrics=False)
    if len(res.saliency_per_layer) != model.config.num_hidden_layers:
        _fail(f"error: their extractor returned {len(res.saliency_per_layer)} layers for a "
              f"{model.config.num_hidden_layers}-layer model")
    num = 1 + steps + summaries
    boundaries = {"question": 1, "thinking": steps, "summary": summaries}
    names = [f"segment {i}" for i in range(num)]
    matrices, metrics = [], []
    for layer in res.saliency_per_layer:   # as their aggregate_step_saliency: fp32 numpy, mean over batch and heads
        token_map = np.mean(layer.float().cpu().numpy(), axis=(0, 1))
        matrix = analysis.compute_step_saliency(token_map, token_to_step, num)
        matrices.append(matrix)
        metrics.append(analysis.compute_step_metrics(matrix, names, boundaries))
    return np.stack(matrices), metrics


def rel_errors(mine: np.ndarray, ref: np.ndarray) -> tuple[float, float, bool]:
    """(largest elementwise relative error over ref's nonzero entries, largest error relative to
    max |ref|, whether ref's zeros are ours too)."""
    mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
    nz = ref != 0
    elementwise = float((np.abs(mine - ref)[nz] / np.abs(ref[nz])).max()) if nz.any() else 0.0
    scale = float(np.abs(ref).max())
    normwise = float(np.abs(mine - ref).max() / scale) if scale > 0 else float(np.abs(mine).max())
    zeros_match = bool((np.abs(mine[~nz]) <= 1e-12 * max(scale, 1e-30)).all())
    return elementwise, normwise, zeros_match


def _scalar_rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a)


def run(arch, args, authors) -> float:
    gen = torch.Generator().manual_seed(args.seed)
    model = tiny_model(arch, args.seed, args.layers, args.vocab, args.window)
    ids = torch.randint(1, args.vocab, (1, args.tokens), generator=gen)
    lengths = random_assignment(args.tokens, args.steps, args.summary_steps, gen)
    block, diag, token_to_step = ours(model, ids, lengths, args.steps, args.summary_steps)
    matrices, metrics = theirs(authors, model, ids, token_to_step, args.steps, args.summary_steps)
    extra = f", sinks, sliding window {args.window} on even layers" if arch == "gpt_oss" else ""
    print(f"\n== {arch}: {args.layers} layers, 4 heads / 2 kv heads{extra}, {args.tokens} tokens, seed {args.seed}; "
          f"segment lengths {lengths} (question, {args.steps} steps, {args.summary_steps} summary segments)")
    print(f"   ours: step_saliency(preset='paper') on {model.config._attn_implementation}; theirs: extract_saliency "
          "(rule 'ag', mode 'loss') on an eager copy + compute_step_saliency / compute_step_metrics")
    print(f"{'layer':>5}  {'step matrix rel.err':>19}  {'(vs max entry)':>14}  {'zeros':>5}  "
          f"{'FB ours':>10}  {'FB theirs':>10}  {'AB rel.err':>10}  {'FB rel.err':>10}  {'FB/AB rel.err':>13}")
    worst = 0.0
    for layer in range(len(matrices)):
        el, nw, zeros = rel_errors(block[layer], matrices[layer])
        m = metrics[layer]
        fb = _scalar_rel(diag["final_block_intensity"][layer], m["final_block_intensity"])
        ab = _scalar_rel(diag["analysis_block_intensity"][layer], m["analysis_block_intensity"])
        ratio = _scalar_rel(diag["final_heat_anomaly"][layer], m["final_heat_anomaly"])
        worst = max(worst, el, nw, fb, ab, ratio, 0.0 if zeros else float("inf"))
        print(f"{layer:>5}  {el:>19.2e}  {nw:>14.2e}  {'same' if zeros else 'DIFF':>5}  "
              f"{diag['final_block_intensity'][layer]:>10.3e}  {m['final_block_intensity']:>10.3e}  "
              f"{ab:>10.2e}  {fb:>10.2e}  {ratio:>13.2e}")
    el, nw, zeros = rel_errors(np.asarray(diag["block_map_layer_mean"]), matrices.mean(axis=0))
    worst = max(worst, el, nw, 0.0 if zeros else float("inf"))
    print(f"{'mean':>5}  {el:>19.2e}  {nw:>14.2e}  {'same' if zeros else 'DIFF':>5}  (layer-averaged step matrix)")
    verdict = "PASS" if worst < args.tolerance else "FAIL"
    print(f"{arch}: max relative error {worst:.2e} ({verdict}: {'<' if worst < args.tolerance else '>='} "
          f"{args.tolerance:g})")
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python scripts/paper_parity.py ~/src/step-saliency --arch both")
    p.add_argument("path", metavar="PATH", help="local checkout of the authors' repository (src/, scripts/)")
    p.add_argument("--arch", choices=("qwen2", "llama", "gpt_oss", "both"), default="both",
                   help="random model (default both = qwen2 and llama; gpt_oss: attention sinks and sliding windows)")
    p.add_argument("--window", type=int, default=16, metavar="W",
                   help="gpt_oss: sliding window of its sliding_attention layers (default 16, so that it binds)")
    p.add_argument("--tokens", type=int, default=128, metavar="N", help="sequence length (default 128)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of weights, ids and segments (default 0)")
    p.add_argument("--layers", type=int, default=4, metavar="L", help="decoder layers (default 4)")
    p.add_argument("--vocab", type=int, default=512, metavar="V", help="vocabulary size (default 512)")
    p.add_argument("--steps", type=int, default=6, metavar="K", help="thinking steps (default 6)")
    p.add_argument("--summary-steps", type=int, default=2, metavar="M", help="summary segments (default 2)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative error accepted (default 1e-4)")
    p.add_argument("--functions-only", action="store_true",
                   help="compile only compute_step_saliency / compute_step_metrics from the authors' "
                        "analyze_step_saliency.py instead of importing it (no matplotlib / seaborn needed)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.summary_steps < 1 or args.layers < 1 or args.vocab < 2:
        p.error("--steps, --summary-steps and --layers must be >= 1, --vocab >= 2")
    torch.set_num_threads(min(4, torch.get_num_threads()))
    authors = load_authors(os.path.abspath(os.path.expanduser(args.path)), args.functions_only)
    archs = ("qwen2", "llama") if args.arch == "both" else (args.arch,)
    worst = {arch: run(arch, args, authors) for arch in archs}
    print("\nsummary: " + "; ".join(f"{a} max relative error {w:.2e}" for a, w in worst.items())
          + f" -> {'PASS' if max(worst.values()) < args.tolerance else 'FAIL'} (tolerance {args.tolerance:g})")
    return 0 if max(worst.values()) < args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
