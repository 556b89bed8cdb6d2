"""The `stepflow` command line: generate traces, analyze them with Step-Saliency, compare StepFlow.

    stepflow generate --model M --prompt "What is 12 + 7?" --out traces.jsonl
    stepflow analyze  --model M --traces traces.jsonl --out runs/analyze
    stepflow compare  --model M --traces traces.jsonl --stepflow stepflow.json --out runs/compare
    stepflow make-tiny-model DIR      # a random tiny model to try the commands offline
    stepflow eval --model M --data gsm8k.jsonl --task math --stepflow default --out runs/sf
    stepflow compare-runs runs/base runs/sf     # paired accuracy table
    stepflow sweep --model M --dev dev.jsonl --test test.jsonl --task math --grid ... --out runs/sweep

`python -m stepflow_ext.cli ...` is the same without installing the console script.
Exit status: 0 when everything ran, 1 when some traces (or prompts) failed (they are listed at
the end; the others still ran), 2 for a usage error (bad option, model or config not loadable).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from .config import CONTROLS
from .console import UsageError, err as _err, escapes as _escapes, print_table as _print_table, span as _span
from .traces import (TraceError, TraceWriter, apply_template, encode_prompt, read_prompts, read_traces, write_json)
from .traces import eos_ids as _eos_ids


# --------------------------------------------------------------------------- model loading

DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def load_model(args):
    """(tokenizer, model) from a local directory or a hub id, in eval mode on args.device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import hf

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"trust_remote_code": bool(args.trust_remote_code)}
    try:
        tok = AutoTokenizer.from_pretrained(args.model, **kwargs)
        model_kwargs = dict(kwargs, dtype=DTYPES[args.dtype])
        if args.attn_implementation:
            model_kwargs["attn_implementation"] = args.attn_implementation
        # transformers prefers model.safetensors and falls back to pytorch_model.bin only when it is absent.
        model = AutoModelForCausalLM.from_pretrained(args.model, **model_kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {e}") from None
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"cannot move the model to {device!r}: {e}") from None
    try:
        hf.check_model(model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def load_config(path, model):
    from . import hf
    from .config import StepFlowConfig

    try:
        cfg = StepFlowConfig.from_json(path)
        cfg.check_layers(hf.num_layers(model))
    except OSError as e:
        raise UsageError(f"cannot read the StepFlow config {path!r}: {e}") from None
    except ValueError as e:
        raise UsageError(f"StepFlow config {path}: {e}") from None
    return cfg


def segmentation_options(args) -> dict:
    """The segmentation options of the command line (the `segmentation` group), as segment() takes them."""
    start = _escapes(args.think_start)
    # --preset paper is the paper's analysis: sentence steps (the default) and the summary split at "\n\n".
    summary_steps = args.summary_steps or getattr(args, "preset", None) == "paper"
    return {"think_start": None if start.lower() == "none" else start, "think_end": _escapes(args.think_end),
            "steps": args.steps, "summary_steps": summary_steps, "step_delimiter": _escapes(args.step_delimiter)}


def _rule(args) -> dict:
    return segmentation_options(args)


# --------------------------------------------------------------------------- generate


def _prompt_text(item, tok, use_template):
    """(prompt text, templated?, question) for one prompt item of `stepflow generate`."""
    if "prompt" in item:
        value = item["prompt"]
        if isinstance(value, list):
            text, templated = apply_template(tok, value, True)
            return text, templated, None
        return value, False, None
    value = item["question"]
    messages = value if isinstance(value, list) else [{"role": "user", "content": value}]
    text, templated = apply_template(tok, messages, use_template)
    return text, templated, value


def cmd_generate(args) -> int:
    import torch
    from tqdm import tqdm
    from transformers import TextStreamer

    import stepflow_ext as sf

    if args.prompt is not None:
        prompts, errors = [{"question": _escapes(args.prompt) if args.escapes else args.prompt, "_line": 0}], []
    else:
        try:
            prompts, errors = read_prompts(args.prompts)
        except OSError as e:
            raise UsageError(f"cannot read prompts: {e}") from None
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if args.temperature < 0:
        raise UsageError("--temperature must be >= 0 (0 is greedy decoding)")
    tok, model = load_model(args)
    if args.no_chat_template is False and not getattr(tok, "chat_template", None):
        _err(f"note: the tokenizer of {args.model} has no chat template; prompts are used as plain text")
    cfg = load_config(args.stepflow, model) if args.stepflow else None
    rule = _rule(args)
    eos = _eos_ids(model, tok)
    device = next(model.parameters()).device
    stream = args.prompt is not None and not args.no_stream
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=False) if stream else None
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                      pad_token_id=tok.pad_token_id)
    if args.temperature > 0:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    torch.manual_seed(args.seed)
    handle = sf.replace_attention(model, cfg, tokenizer=tok, **rule) if cfg is not None else None
    batch_size = 1 if stream else max(1, args.batch_size)
    written = 0
    try:
        with TraceWriter(args.out) as writer, tqdm(total=len(prompts), unit="prompt", disable=stream,
                                                     desc="generate", file=sys.stderr) as bar:
            for start in range(0, len(prompts), batch_size):
                items = prompts[start:start + batch_size]
                try:
                    built = [_prompt_text(item, tok, not args.no_chat_template) for item in items]
                    rows = [encode_prompt(tok, text, templated) for text, templated, _ in built]
                    width = max(map(len, rows))
                    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
                    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                    with torch.no_grad():
                        out = model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **gen_kwargs)
                except Exception as e:  # noqa: BLE001 - one failing batch must not stop the others
                    for item in items:
                        errors.append(TraceError(args.prompts or "--prompt", item["_line"], "",
                                                 f"generation failed: {type(e).__name__}: {e}"))
                    bar.update(len(items))
                    continue
                for row, (item, (text, _, question)) in enumerate(zip(items, built)):
                    gen = out[row, width:].tolist()
                    cut = next((i for i, t in enumerate(gen) if t in eos), None)
                    finish = "eos" if cut is not None else "length"
                    gen = gen[:cut + 1] if cut is not None else gen
                    full = rows[row] + gen
                    seg = sf.segment(torch.tensor([full]), [len(rows[row])], tokenizer=tok, **rule)
                    completion = tok.decode(gen, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    record = {k: v for k, v in item.items() if not k.startswith("_")}
                    if isinstance(record.get("prompt"), list):
                        record["messages"] = record.pop("prompt")
                    if question is not None:
                        record["question"] = question
                    record.update({
                        "prompt": text, "completion": completion, "text": text + completion,
                        "input_ids": full, "prompt_len": len(rows[row]),
                        "segments": {"kinds": seg.kinds[0], "lengths": seg.lengths()[0]},
                        "stepflow": cfg.to_dict() if cfg is not None else None, "model": args.model,
                        "generation": {k: v for k, v in gen_kwargs.items() if k != "pad_token_id"} | {
                            "seed": args.seed, "finish": finish},
                    })
                    writer.write(record)
                    written += 1
                    if stream:
                        print(flush=True)
                        kinds = seg.kinds[0]
                        _err(f"[{len(gen)} tokens, {kinds.count('step')} steps, "
                             f"{'a summary' if 'summary' in kinds else 'no summary'}, stopped at {finish}]")
                bar.update(len(items))
    finally:
        if handle is not None:
            handle.restore()
    _err(f"wrote {written} trace{'s' if written != 1 else ''} to {args.out}")
    return _finish(errors, "prompt")


def _finish(errors, what="trace") -> int:
    if not errors:
        return 0
    _err(f"\n{len(errors)} {what}{'s' if len(errors) != 1 else ''} failed:")
    for e in errors:
        _err(f"  {e}")
    return 1


# --------------------------------------------------------------------------- analysis of one trace


def _segment(trace, tok, rule):
    import torch

    import stepflow_ext as sf

    return sf.segment(torch.tensor([trace.input_ids]), [trace.prompt_len], tokenizer=tok, **rule)


def _check_target(trace, seg, target, rule):
    kinds = seg.kinds[0]
    if target == "summary" and "summary" not in kinds:
        return trace.error(f"no summary: the end-of-thinking marker (--think-end {rule['think_end']!r}) never completes in the "
                           "generated tokens (use --target thinking or generated, or --think-end)")
    if target == "thinking" and "step" not in kinds:
        return trace.error("no thinking step: the trace opens with the summary (use --target summary)")
    return None


def _saliency(model, tok, trace, args, rule, model_name, warn=True):
    """(result, diagnose report) of one trace, or a TraceError."""
    import torch

    import stepflow_ext as sf

    seg = _segment(trace, tok, rule)
    problem = _check_target(trace, seg, args.target, rule)
    if problem is not None:
        return problem
    stored = trace.record.get("segments")
    if warn and isinstance(stored, dict) and stored.get("kinds") not in (None, seg.kinds[0]):
        _err(f"warning: {trace.source}: segments: the stored segmentation differs from the one computed here "
             "(another --step-delimiter / --think-end?); using the computed one")
    device = next(model.parameters()).device
    ids = torch.tensor([trace.input_ids], device=device)
    try:
        res = sf.step_saliency(model, ids, seg, target=args.target, head_reduction=args.head_reduction,
                               loss_reduction=args.loss_reduction, preset=args.preset,
                               gradient_checkpointing=args.gradient_checkpointing, chunk_tokens=args.chunk_tokens)
    except Exception as e:  # noqa: BLE001 - report the trace, go on with the others
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return trace.error(f"step_saliency failed: {type(e).__name__}: {e}")
    res.meta.update({"name": trace.name, "source": trace.source, "model": model_name, "num_tokens": len(ids[0]),
                     "prompt_len": trace.prompt_len, "segment_lengths": seg.lengths()[0], "format": trace.format,
                     "id": trace.record.get("id")})
    report = res.diagnose(recent_window=args.recent_window, lock_in_margin=args.lock_in_margin,
                          decay_drop=args.decay_drop)[0]
    return res, report


def _composition_markers(args, tok, model) -> tuple[str, str]:
    """The markers that join {question, thinking, summary} records into one text: the segmentation's
    (resolved per model family for "auto"); the thinking opens with the marker and a newline."""
    from .segment import markers_for

    opts = segmentation_options(args)
    auto = markers_for(tok, model)
    start = auto[0] if opts["think_start"] in ("auto", None) else opts["think_start"]
    end = auto[1] if opts["think_end"] == "auto" else opts["think_end"]
    return start + "\n", end


def _load_traces(args, tok, model):
    start, end = _composition_markers(args, tok, model)
    try:
        return read_traces(args.traces, tok, chat_template=not args.no_chat_template, think_start=start,
                           think_end=end, vocab_size=model.get_input_embeddings().weight.shape[0])
    except OSError as e:
        raise UsageError(f"cannot read traces: {e}") from None


def _thresholds(args) -> dict:
    return {"lock_in_margin": args.lock_in_margin, "decay_drop": args.decay_drop, "recent_window": args.recent_window}


def _check_analysis_args(args):
    if args.bins < 1:
        raise UsageError("--bins must be >= 1")
    if args.recent_window < 1:
        raise UsageError("--recent-window must be >= 1")
    if args.chunk_tokens < 1:
        raise UsageError("--chunk-tokens must be >= 1")
    if not 0 <= args.decay_drop <= 1:
        raise UsageError("--decay-drop must be in [0, 1]")


# --------------------------------------------------------------------------- analyze


def cmd_analyze(args) -> int:
    from tqdm import tqdm

    import stepflow_ext as sf

    from . import plot
    from .diagnostics import verdict_text
    from .report import Report, aggregate, fmt, flag, fmt_sci, save_aggregate

    _check_analysis_args(args)
    _saliency_options(args)
    tok, model = load_model(args)
    traces, errors = _load_traces(args, tok, model)
    cfg = load_config(args.stepflow, model) if args.stepflow else None
    rule = _rule(args)
    out = args.out
    trace_dir = os.path.join(out, "traces")
    os.makedirs(trace_dir, exist_ok=True)
    for e in errors:
        _err(f"skipping {e}")
    handle = sf.replace_attention(model, cfg, tokenizer=tok, **rule) if cfg is not None else None
    done = []
    try:
        for trace in tqdm(traces, unit="trace", desc="analyze", file=sys.stderr, disable=len(traces) < 2):
            got = _saliency(model, tok, trace, args, rule, args.model)
            if isinstance(got, TraceError):
                errors.append(got)
                _err(f"failed {got}")
                continue
            res, report = got
            res.save(os.path.join(trace_dir, trace.name + ".safetensors"))
            done.append((trace, res, report))
    finally:
        if handle is not None:
            handle.restore()

    errors.sort(key=lambda e: e.line)
    rows = [_diag_row(trace.name, res, rep) for trace, res, rep in done]
    summary = {"command": "analyze", "model": args.model, "traces": args.traces, "target": args.target,
               "saliency": _saliency_settings(args),
               "stepflow": cfg.to_dict() if cfg else None, "thresholds": _thresholds(args),
               "analyzed": len(done), "failed": [str(e) for e in errors],
               "per_trace": [{"name": t.name, "source": t.source, "file": f"traces/{t.name}.safetensors",
                              # (the layer-averaged block map, S x S, stays out: res.diagnose() of the file has it)
                              **{k: v for k, v in rep.items() if k not in ("thresholds", "block_map_layer_mean")}}
                             for t, _, rep in done]}
    agg = None
    if done:
        agg = aggregate([(res.kinds[0], res.maps[0], rep) for _, res, rep in done], bins=args.bins,
                        lock_in_margin=args.lock_in_margin, decay_drop=args.decay_drop)
        save_aggregate(os.path.join(out, "aggregate.safetensors"), agg,
                       {"model": args.model, "traces": args.traces, "target": args.target,
                        "names": [t.name for t, _, _ in done]})
        summary["aggregate"] = {k: agg[k] for k in ("n", "labels", "curves", "flags", "verdict", "paper_curves",
                                                    "paper_means")}
        rows.append(_aggregate_row(agg))
    write_json(os.path.join(out, "diagnostics.json"), summary)

    header = ["trace", "tokens", "steps", "LI shallow", "LI middle", "Shallow Lock-in", "TS deep", "TS peak",
              "Deep Decay", "FB", "AB", "FB/AB"]
    if rows:
        _print_table(f"Step-Saliency diagnostics ({_saliency_words(args)}{', under StepFlow' if cfg else ''}; "
                     "FB, AB, FB/AB: the paper's block intensities, mean over layers)", header, rows)

    if done and not args.no_plots:
        _err("drawing pictures ...")
        report = Report("Step-Saliency report")
        report.text(f"model {args.model} · traces {args.traces} · {_saliency_words(args)} · "
                    f"{len(done)} analyzed, {len(errors)} failed"
                    + (f" · under StepFlow {json.dumps(cfg.to_dict())}" if cfg else ""))
        report.text("Rows of each heatmap are the segment whose saliency is shared out (Q question, S1..Sk "
                    "thinking steps, A summary), columns the segment it draws from; colours are the share of "
                    "the row's saliency on a log scale (grey: undefined or the empty future). See docs/method.md, "
                    "'Reading the pictures'.")
        report.text(PAPER_NOTE + ("" if args.preset == "paper" else " These maps were not made with --preset paper, "
                                  "so FB and AB are block intensities of this run's loss and head reduction, not "
                                  "the paper's numbers."))
        report.heading("Diagnostics")
        report.table(header, rows)
        if len(done) > 1:
            lock, decay = verdict_text(agg["verdict"])
            f = agg["flags"]
            report.heading(f"Aggregate over {len(done)} traces")
            report.pre(f"Shallow Lock-in flagged in {f['shallow_lock_in']['yes']}/{len(done)} traces; "
                       f"Deep Decay in {f['deep_decay']['yes']}/{len(done)}.\nOn the mean curves: {lock}\n"
                       f"On the mean curves: {decay}")
            path = plot.plot_heatmaps(os.path.join(out, "aggregate_heatmaps.png"), agg["shares"], agg["labels"],
                                      title=f"Mean row shares over {len(done)} traces, steps resampled to "
                                            f"{args.bins} bins of relative position in the thinking")
            report.image(path, "aggregate heatmaps: Q, thinking position bins (10% = first tenth of the steps), A")
            path = plot.plot_curves(os.path.join(out, "aggregate_curves.png"),
                                    [{"label": f"mean of {len(done)} traces", "curves": agg["curves"]}],
                                    title=f"Diagnostics over layers, mean and 95% band over {len(done)} traces",
                                    verdict_lines=[lock, decay], thresholds=_thresholds(args))
            report.image(path, "aggregate diagnostic curves")
            m = agg["paper_means"]
            path = plot.plot_paper(os.path.join(out, "aggregate_paper.png"),
                                   [{"label": f"mean of {len(done)} traces", "curves": agg["paper_curves"]}],
                                   title=f"The paper's block intensities over layers, mean and 95% band over "
                                         f"{len(done)} traces ({_saliency_words(args)})",
                                   text=f"means over layers and traces: FB {fmt_sci(m['final_block_intensity'])} · "
                                        f"AB {fmt_sci(m['analysis_block_intensity'])} · "
                                        f"FB/AB {fmt(m['final_heat_anomaly'])}")
            report.image(path, "aggregate FB, AB and FB/AB per layer (the paper's numbers)")
        limit = len(done) if args.plots < 0 else args.plots
        for trace, res, rep in tqdm(done[:limit], unit="trace", desc="pictures", file=sys.stderr,
                                    disable=min(limit, len(done)) < 2):
            report.heading(f"{trace.name} ({trace.source})", 3)
            labels = plot.segment_labels(res.kinds[0])
            path = plot.plot_heatmaps(os.path.join(trace_dir, trace.name + "_heatmaps.png"),
                                      plot.result_shares(res), labels,
                                      title="Step-Saliency row shares: " + plot.trace_title(res, 0, trace.name))
            report.image(path, f"{trace.name}: heatmaps, one panel per layer")
            path = plot.plot_curves(os.path.join(trace_dir, trace.name + "_curves.png"),
                                    [{"label": trace.name, "curves": rep}], title=trace.name,
                                    verdict_lines=verdict_text(rep), thresholds=rep["thresholds"])
            report.image(path, f"{trace.name}: diagnostic curves")
            path = plot.plot_paper(os.path.join(trace_dir, trace.name + "_paper.png"), [{"label": trace.name,
                                   "curves": rep}], [np.asarray(rep["block_map_layer_mean"])], labels,
                                   ["mean over layers"], title=f"{trace.name}: the paper's view ({_saliency_words(args)})",
                                   text=plot.paper_text(rep))
            report.image(path, f"{trace.name}: layer-averaged step matrix (block view) and FB, AB, FB/AB per layer")
        if len(done) > limit:
            report.text(f"Pictures of the other {len(done) - limit} traces were not drawn (--plots {args.plots}); "
                        "their maps are in traces/.")
        _write_report(report, out, errors)
    return _end_of_run(out, done, errors)


PAPER_KEYS = ("final_block_intensity", "analysis_block_intensity", "final_heat_anomaly",
              "final_block_intensity_mean", "analysis_block_intensity_mean", "final_heat_anomaly_mean")


PAPER_NOTE = ("FB and AB are the paper's final-block and analysis-block intensities: the mean of the summary x "
              "summary and of the thinking-steps x thinking-steps sub-blocks of the block view M[a,c] / (|a| |c|), "
              "per layer; FB/AB is their ratio (0 where AB <= 1e-10, as the authors' code does). The tables give "
              "their means over layers; the *_paper.png pictures show them per layer with the layer-averaged map.")


def _diag_row(name, res, rep):
    from .report import flag, fmt, fmt_sci

    kinds = res.kinds[0]
    return [name, res.meta.get("num_tokens", ""), kinds.count("step"), fmt(rep["lock_in_shallow"]),
            fmt(rep["lock_in_middle"]), flag(rep["shallow_lock_in"]), fmt(rep["thinking_share_deep"]),
            fmt(rep["thinking_share_peak"]), flag(rep["deep_decay"]), fmt_sci(rep["final_block_intensity_mean"]),
            fmt_sci(rep["analysis_block_intensity_mean"]), fmt(rep["final_heat_anomaly_mean"])]


def _aggregate_row(agg):
    from .report import fmt, fmt_sci

    v, f, n, m = agg["verdict"], agg["flags"], agg["n"], agg["paper_means"]
    return [f"mean of {n}", "", "", fmt(v["lock_in_shallow"]), fmt(v["lock_in_middle"]),
            f"{f['shallow_lock_in']['yes']}/{n} flagged", fmt(v["thinking_share_deep"]),
            fmt(v["thinking_share_peak"]), f"{f['deep_decay']['yes']}/{n} flagged",
            fmt_sci(m["final_block_intensity"]), fmt_sci(m["analysis_block_intensity"]),
            fmt(m["final_heat_anomaly"])]


# --------------------------------------------------------------------------- compare


def _window_mean(curve, layers):
    vals = [curve[i] for i in layers if not math.isnan(curve[i])]
    return sum(vals) / len(vals) if vals else float("nan")


def _effect(before, after, lower_is_better):
    """Summary of paired per-trace numbers: means, mean change with its 95% CI, how many improved."""
    from .report import mean_band

    b, a = np.asarray(before, float), np.asarray(after, float)
    ok = np.isfinite(b) & np.isfinite(a)
    delta = (a - b)[ok]
    if not ok.any():
        return {"n": 0, "before": None, "after": None, "change": None, "ci95": None, "improved": 0, "verdict": "undefined"}
    mean, low, high, n = mean_band(delta[:, None])
    improved = int((delta < 0).sum() if lower_is_better else (delta > 0).sum())
    better = mean[0] < 0 if lower_is_better else mean[0] > 0
    sure = n[0] > 1 and ((high[0] < 0) if lower_is_better else (low[0] > 0))
    word = "lowered" if lower_is_better else "raised"
    if not better:
        word = "not " + word
    elif n[0] == 1:
        word += " (one trace, no confidence interval)"
    elif sure:
        word += " (the 95% CI excludes 0)"
    else:
        word += " on average, but the 95% CI includes 0"
    return {"n": int(n[0]), "before": float(b[ok].mean()), "after": float(a[ok].mean()), "change": float(mean[0]),
            "ci95": [float(low[0]), float(high[0])] if n[0] > 1 else None, "improved": improved, "verdict": word}


def cmd_compare(args) -> int:
    from tqdm import tqdm

    import stepflow_ext as sf

    from . import hf, plot
    from .diagnostics import layer_windows, verdict_text
    from .report import Report, aggregate, flag, fmt, fmt_sci, save_aggregate

    _check_analysis_args(args)
    _saliency_options(args)
    tok, model = load_model(args)
    traces, errors = _load_traces(args, tok, model)
    cfg = load_config(args.stepflow, model)
    rule = _rule(args)
    out = args.out
    dirs = {k: os.path.join(out, k) for k in ("before", "after")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    for e in errors:
        _err(f"skipping {e}")
    results = {"before": {}, "after": {}}
    failed = set()
    for phase in ("before", "after"):
        handle = sf.replace_attention(model, cfg, tokenizer=tok, **rule) if phase == "after" else None
        try:
            todo = [t for t in traces if t.line not in failed]
            for trace in tqdm(todo, unit="trace", desc=f"saliency {phase}", file=sys.stderr, disable=len(todo) < 2):
                got = _saliency(model, tok, trace, args, rule, args.model, warn=phase == "before")
                if isinstance(got, TraceError):
                    got.message = f"{phase}: {got.message}"
                    errors.append(got)
                    failed.add(trace.line)
                    _err(f"failed {got}")
                    continue
                got[0].save(os.path.join(dirs[phase], trace.name + ".safetensors"))
                results[phase][trace.line] = got
        finally:
            if handle is not None:
                handle.restore()
    done = [t for t in traces if t.line in results["after"] and t.line in results["before"]]
    errors.sort(key=lambda e: e.line)

    n_layers = hf.num_layers(model)
    first, _, last = layer_windows(n_layers)
    shallow = list(cfg.oeb_layers) or list(first)
    deep = list(cfg.smi_layers) or list(last)
    per_trace, table = [], []
    for t in done:
        (rb, db), (ra, da) = results["before"][t.line], results["after"][t.line]
        row = {"name": t.name, "source": t.source,
               "lock_in_shallow_before": _window_mean(db["lock_in_index"], shallow),
               "lock_in_shallow_after": _window_mean(da["lock_in_index"], shallow),
               "thinking_share_deep_before": _window_mean(db["summary_thinking_share"], deep),
               "thinking_share_deep_after": _window_mean(da["summary_thinking_share"], deep),
               "shallow_lock_in": [db["shallow_lock_in"], da["shallow_lock_in"]],
               "deep_decay": [db["deep_decay"], da["deep_decay"]],
               "fb_ab_before": db["final_heat_anomaly_mean"], "fb_ab_after": da["final_heat_anomaly_mean"],
               "before": {k: db[k] for k in ("lock_in_index", "summary_thinking_share", "summary_recent_share")
                          + PAPER_KEYS},
               "after": {k: da[k] for k in ("lock_in_index", "summary_thinking_share", "summary_recent_share")
                         + PAPER_KEYS}}
        per_trace.append(row)
        table.append([t.name, fmt(row["lock_in_shallow_before"]), fmt(row["lock_in_shallow_after"]),
                      _signed(row["lock_in_shallow_after"] - row["lock_in_shallow_before"]),
                      fmt(row["thinking_share_deep_before"]), fmt(row["thinking_share_deep_after"]),
                      _signed(row["thinking_share_deep_after"] - row["thinking_share_deep_before"]),
                      f"{flag(db['shallow_lock_in'])} → {flag(da['shallow_lock_in'])}",
                      f"{flag(db['deep_decay'])} → {flag(da['deep_decay'])}", fmt(row["fb_ab_before"]),
                      fmt(row["fb_ab_after"])])
    oeb = _effect([r["lock_in_shallow_before"] for r in per_trace], [r["lock_in_shallow_after"] for r in per_trace],
                  lower_is_better=True)
    smi = _effect([r["thinking_share_deep_before"] for r in per_trace],
                  [r["thinking_share_deep_after"] for r in per_trace], lower_is_better=False)
    fbab = _effect([r["fb_ab_before"] for r in per_trace], [r["fb_ab_after"] for r in per_trace],
                   lower_is_better=True)
    where_shallow = f"OEB layers {_span(shallow)}" if cfg.oeb_layers else f"first third {_span(shallow)} (no OEB layers)"
    where_deep = f"SMI layers {_span(deep)}" if cfg.smi_layers else f"last third {_span(deep)} (no SMI layers)"
    lines = [
        f"OEB: lock-in index over the {where_shallow}: {fmt(oeb['before'])} -> {fmt(oeb['after'])} (change "
        f"{_signed(oeb['change'])}{_ci(oeb)}; lower in {oeb['improved']}/{oeb['n']} traces): "
        f"{oeb['verdict'] if cfg.oeb_layers else 'no OEB layers in the config'}",
        f"SMI: summary thinking share over the {where_deep}: {fmt(smi['before'])} -> {fmt(smi['after'])} (change "
        f"{_signed(smi['change'])}{_ci(smi)}; higher in {smi['improved']}/{smi['n']} traces): "
        f"{smi['verdict'] if cfg.smi_layers else 'no SMI layers in the config'}",
        f"paper: FB/AB (the paper's final/analysis block intensity ratio), mean over all layers: {fmt(fbab['before'])} "
        f"-> {fmt(fbab['after'])} (change {_signed(fbab['change'])}{_ci(fbab)}; lower in {fbab['improved']}/"
        f"{fbab['n']} traces)",
    ]
    if done:
        header = ["trace", "LI before", "LI after", "ΔLI", "TS before", "TS after", "ΔTS", "Shallow Lock-in",
                  "Deep Decay", "FB/AB before", "FB/AB after"]
        table.append([f"mean of {len(done)}", fmt(oeb["before"]), fmt(oeb["after"]), _signed(oeb["change"]),
                      fmt(smi["before"]), fmt(smi["after"]), _signed(smi["change"]), "", "", fmt(fbab["before"]),
                      fmt(fbab["after"])])
        _print_table(f"StepFlow before → after (LI over {_span(shallow)}, TS over {_span(deep)}, FB/AB mean over "
                     f"layers; {_saliency_words(args)})", header, table)
        for line in lines:
            print(line)
    summary = {"command": "compare", "model": args.model, "traces": args.traces, "target": args.target,
               "saliency": _saliency_settings(args),
               "stepflow": cfg.to_dict(), "thresholds": _thresholds(args), "shallow_layers": shallow,
               "deep_layers": deep, "oeb_lock_in": oeb, "smi_thinking_share": smi, "paper_fb_ab": fbab,
               "compared": len(done),
               "failed": [str(e) for e in errors], "per_trace": per_trace}

    if done:
        aggs = {}
        for phase in ("before", "after"):
            items = [(results[phase][t.line][0].kinds[0], results[phase][t.line][0].maps[0],
                      results[phase][t.line][1]) for t in done]
            aggs[phase] = aggregate(items, bins=args.bins, lock_in_margin=args.lock_in_margin,
                                    decay_drop=args.decay_drop)
            save_aggregate(os.path.join(out, f"aggregate_{phase}.safetensors"), aggs[phase],
                           {"model": args.model, "traces": args.traces, "phase": phase})
        summary["aggregate"] = {p: {k: a[k] for k in ("n", "curves", "flags", "verdict", "paper_curves", "paper_means")}
                                for p, a in aggs.items()}
    write_json(os.path.join(out, "comparison.json"), summary)

    if done and not args.no_plots:
        _err("drawing pictures ...")
        report = Report("StepFlow comparison: Step-Saliency before and after")
        report.text(f"model {args.model} · traces {args.traces} · {_saliency_words(args)} · {len(done)} compared, "
                    f"{len(errors)} failed · StepFlow {json.dumps(cfg.to_dict())}")
        report.text(PAPER_NOTE)
        report.heading("Did StepFlow repair the step flow?")
        report.pre("\n".join(lines))
        report.table(header, table)
        if len(done) == 1:
            t = done[0]
            before, after = results["before"][t.line][0], results["after"][t.line][0]
            maps_b, maps_a = plot.result_shares(before), plot.result_shares(after)
            labels = plot.segment_labels(before.kinds[0])
            what = f"{t.name}"
            curves_b, curves_a = results["before"][t.line][1], results["after"][t.line][1]
            paper_b, paper_a = curves_b, curves_a
            block_maps = [np.asarray(curves_b["block_map_layer_mean"]), np.asarray(curves_a["block_map_layer_mean"])]
        else:
            maps_b, maps_a = aggs["before"]["shares"], aggs["after"]["shares"]
            labels = aggs["before"]["labels"]
            what = f"mean of {len(done)} traces (steps resampled to {args.bins} relative-position bins)"
            curves_b, curves_a = aggs["before"]["curves"], aggs["after"]["curves"]
            paper_b, paper_a = aggs["before"]["paper_curves"], aggs["after"]["paper_curves"]
            block_maps = None
        report.heading(f"Maps and curves: {what}")
        notes = {layer: "OEB" for layer in cfg.oeb_layers}
        for layer in cfg.smi_layers:
            notes[layer] = (notes.get(layer, "") + "+SMI").lstrip("+")
        chosen = plot.pick_layers(n_layers, [cfg.oeb_layers, cfg.smi_layers])
        path = plot.plot_side_by_side(os.path.join(out, "side_by_side.png"), maps_b, maps_a, labels, chosen,
                                      title=f"Row shares before and after StepFlow: {what}", layer_notes=notes)
        report.image(path, "before | after | after − before, for a few layers (red: the share grew)")
        path = plot.plot_curves(os.path.join(out, "curves.png"),
                                [{"label": "before", "curves": curves_b, "style": "dashed", "colour": "#555555"},
                                 {"label": "after StepFlow", "curves": curves_a, "colour": "#c0392b"}],
                                title=f"Diagnostics before and after StepFlow: {what}", verdict_lines=lines,
                                thresholds=_thresholds(args),
                                highlight={"lock_in_index": (cfg.oeb_layers, "OEB layers"),
                                           "summary_thinking_share": (cfg.smi_layers, "SMI layers")})
        report.image(path, "diagnostic curves before (dashed) and after (solid); windows of the verdicts shaded")
        stepflow_layers = (sorted(set(cfg.oeb_layers) | set(cfg.smi_layers)), "StepFlow layers")
        path = plot.plot_paper(os.path.join(out, "paper.png"),
                               [{"label": "before", "curves": paper_b, "style": "dashed", "colour": "#555555"},
                                {"label": "after StepFlow", "curves": paper_a, "colour": "#c0392b"}],
                               block_maps, labels if block_maps else None, ["before", "after StepFlow"],
                               title="The paper's view before and after StepFlow: "
                                     + (what if block_maps else f"mean and 95% band over {len(done)} traces"),
                               text=lines[2],
                               highlight=stepflow_layers)
        report.image(path, "the paper's FB, AB and FB/AB per layer before (dashed) and after (solid)"
                     + ("; left: the layer-averaged step matrices (block view), one colour scale" if block_maps else ""))
        norm = plot.share_norm([maps_b, maps_a])
        for phase, maps in (("before", maps_b), ("after", maps_a)):
            path = plot.plot_heatmaps(os.path.join(out, f"heatmaps_{phase}.png"), maps, labels, norm=norm,
                                      title=f"Row shares {phase}{' StepFlow' if phase == 'after' else ''}: {what}")
            report.image(path, f"all layers, {phase}")
        path = plot.plot_heatmaps(os.path.join(out, "heatmaps_diff.png"), np.asarray(maps_a) - np.asarray(maps_b),
                                  labels, diff=True, title=f"after − before: {what}")
        report.image(path, "all layers, after − before (red: the share grew, blue: it shrank)")
        limit = len(done) if args.plots < 0 else args.plots
        if len(done) > 1:
            for t in done[:limit]:
                before, after = results["before"][t.line], results["after"][t.line]
                report.heading(f"{t.name} ({t.source})", 3)
                path = plot.plot_side_by_side(os.path.join(out, f"{t.name}_side_by_side.png"),
                                              plot.result_shares(before[0]), plot.result_shares(after[0]),
                                              plot.segment_labels(before[0].kinds[0]), chosen,
                                              title=f"{t.name}: before | after | difference", layer_notes=notes)
                report.image(path, f"{t.name}: before | after | difference")
                path = plot.plot_curves(os.path.join(out, f"{t.name}_curves.png"),
                                        [{"label": "before", "curves": before[1], "style": "dashed",
                                          "colour": "#555555"},
                                         {"label": "after StepFlow", "curves": after[1], "colour": "#c0392b"}],
                                        title=t.name, verdict_lines=[
                                            "before: " + " · ".join(verdict_text(before[1])),
                                            "after:  " + " · ".join(verdict_text(after[1]))],
                                        thresholds=_thresholds(args),
                                        highlight={"lock_in_index": (cfg.oeb_layers, "OEB layers"),
                                                   "summary_thinking_share": (cfg.smi_layers, "SMI layers")})
                report.image(path, f"{t.name}: curves before and after")
                path = plot.plot_paper(os.path.join(out, f"{t.name}_paper.png"),
                                       [{"label": "before", "curves": before[1], "style": "dashed",
                                         "colour": "#555555"},
                                        {"label": "after StepFlow", "curves": after[1], "colour": "#c0392b"}],
                                       [np.asarray(before[1]["block_map_layer_mean"]),
                                        np.asarray(after[1]["block_map_layer_mean"])],
                                       plot.segment_labels(before[0].kinds[0]), ["before", "after StepFlow"],
                                       title=f"{t.name}: the paper's view before and after StepFlow",
                                       text=f"FB/AB mean over layers: {fmt(before[1]['final_heat_anomaly_mean'])} "
                                            f"-> {fmt(after[1]['final_heat_anomaly_mean'])}",
                                       highlight=stepflow_layers)
                report.image(path, f"{t.name}: the paper's view before and after")
        _write_report(report, out, errors)
    return _end_of_run(out, done, errors, " compared")


def _write_report(report, out, errors) -> None:
    """analyze/compare: the traces that failed go into the report too, then it is written."""
    if errors:
        report.heading("Failed")
        report.pre("\n".join(str(e) for e in errors))
    html_path, _ = report.write(out)
    _err(f"report: {html_path}")


def _end_of_run(out, done, errors, what="") -> int:
    """analyze/compare: where the results are, and the exit status."""
    _err(f"results in {out}/ ({len(done)} trace{'s' if len(done) != 1 else ''}{what})")
    if not done and not errors:
        _err("no traces in the file")
        return 1
    return _finish(errors)


def _signed(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:+.1e}"


def _ci(effect) -> str:
    return f", 95% CI [{_signed(effect['ci95'][0])}, {_signed(effect['ci95'][1])}]" if effect.get("ci95") else ""


# --------------------------------------------------------------------------- make-tiny-model

TINY_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}")


def tiny_traces(count: int = 4, seed: int = 0) -> list[dict]:
    """Canned {question, thinking, summary} traces: sums of 2..10 numbers, one step per addition."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        terms = [int(x) for x in rng.integers(2, 20, size=2 + (i * 5) % 11)]
        steps, total = [f"We need the sum of {', '.join(map(str, terms))}.", f"Start with {terms[0]}."], terms[0]
        for t in terms[1:]:
            total += t
            steps.append(f"Add {t}: {total - t} + {t} = {total}.")
        steps.append(f"Check: the total is {total}.")
        out.append({"id": f"sum{i}", "question": f"What is {' + '.join(map(str, terms))}? Reason step by step.",
                    "thinking": "\n\n".join(steps), "summary": f"The answer is \\boxed{{{total}}}."})
    return out


def make_tiny_model(directory, layers: int = 4, hidden: int = 64, seed: int = 0) -> list[str]:
    """A random Qwen2 causal LM and a byte-level BPE tokenizer ("\\n\\n", "<think>", "</think>" tokens,
    a chat template that opens the thinking) saved in `directory`, plus canned traces. Noise, honestly:
    the weights are random (attention sharpened so the maps show some structure)."""
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    traces = tiny_traces()
    corpus = [t["question"] + "\n" + t["thinking"] + "\n</think>\n\n" + t["summary"] for t in traces]
    corpus += ["Question: what is 12 + 7? Answer step by step.", "First, add.\n\nThen check.\n\nDone.</think>"] * 3
    tok = Tokenizer(models.BPE())
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<think>", "</think>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = TINY_TEMPLATE
    eos = fast.eos_token_id
    config = transformers.Qwen2Config(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=eos,
                                      eos_token_id=eos, bos_token_id=eos)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    with TraceWriter(os.path.join(directory, "traces.jsonl")) as w:
        for t in traces:
            w.write(t)
    with open(os.path.join(directory, "prompts.txt"), "w") as f:
        f.write("What is 12 + 7? Reason step by step.\nWhat is 3 + 4 + 5?\n")
    return sorted(os.listdir(directory))


def cmd_make_tiny_model(args) -> int:
    files = make_tiny_model(args.dir, layers=args.layers)
    print(f"wrote {args.dir}/: {', '.join(files)}")
    return 0


# --------------------------------------------------------------------------- parser


def _common(p, model_required=True):
    g = p.add_argument_group("model")
    g.add_argument("--model", required=model_required, metavar="M",
                   help="a local directory (save_pretrained) or a Hugging Face hub id of a causal LM "
                        "(Llama, Qwen2, Qwen3, Mistral; e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=sorted(DTYPES), metavar="{auto,float32,bfloat16,float16}",
                   help="weights dtype (default: auto, the checkpoint's own; fp32/bf16/fp16 also work)")
    g.add_argument("--attn-implementation", default=None, metavar="IMPL",
                   help="the model's attention kernel: sdpa (transformers' default), eager, flash_attention_2, ...")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow code from the model repository to run (off by default)")
    s = p.add_argument_group("segmentation (docs/method.md section 1; the paper's rule by default)")
    s.add_argument("--think-start", default="auto", metavar="TEXT",
                   help="marker that opens the thinking: auto (default: <think> for R1-Distill / QwQ / Qwen3, "
                        "<|channel|>analysis<|message|> for GPT-OSS), a text, or none (the prompt is the question)")
    s.add_argument("--think-end", default="auto", metavar="TEXT",
                   help="marker that ends the thinking: auto (default: </think>, or <|channel|>final<|message|> "
                        "for GPT-OSS) or a text; backslash escapes allowed")
    s.add_argument("--steps", default="sentence", choices=("sentence", "paragraph"),
                   help="how the thinking splits into steps: sentence (default, the paper's: sentences of >= 15 "
                        "characters ending in '. ') or paragraph (a step ends at --step-delimiter)")
    s.add_argument("--summary-steps", action="store_true",
                   help="split the summary at --step-delimiter too (the paper's offline maps do)")
    s.add_argument("--step-delimiter", default="\\n\\n", metavar="TEXT",
                   help="the paragraph delimiter, backslash escapes allowed (default: '\\n\\n')")
    s.add_argument("--no-chat-template", action="store_true",
                   help="use questions as plain text instead of applying the tokenizer's chat template")


def _analysis_options(p):
    p.add_argument("--traces", required=True, metavar="FILE", help="JSONL traces (formats below)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    g = p.add_argument_group("saliency (docs/method.md section 2)")
    g.add_argument("--preset", default=None, choices=("paper",),
                   help="paper: the paper's Step-Saliency, i.e. --target all --loss-reduction mean --head-reduction "
                        "abs_mean (the authors' extract_saliency, rule 'ag', mode 'loss'); its step matrices are the "
                        "block view, which the report's FB / AB panels read. Options that contradict it are an "
                        "error. It does not change the segmentation: the paper splits the thinking into sentences "
                        "and the summary at blank lines (see the segmentation options)")
    g.add_argument("--target", default=None, choices=("summary", "thinking", "generated", "all"),
                   help="the tokens whose negative log-likelihood is the loss that the saliency explains: summary "
                        "(default), thinking, generated (thinking + summary) or all (every token after the first, "
                        "the paper's)")
    g.add_argument("--loss-reduction", default=None, choices=("sum", "mean"),
                   help="sum (default) or mean of that loss over the trace's target tokens (the paper's); the "
                        "mean divides every map of a trace by its number of targets, so row shares (LI, TS, RS) "
                        "do not change, the block values (FB, AB) do")
    g.add_argument("--head-reduction", default=None, choices=("sum_abs", "abs_sum", "abs_mean"),
                   help="how the heads of a layer combine: sum_abs |sum_h A dL/dA| (default, signed contributions "
                        "of the heads can cancel), abs_sum sum_h |A dL/dA|, or abs_mean the mean over heads of "
                        "|A dL/dA| (the paper's)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in the backward pass (long traces, less memory)")
    p.add_argument("--chunk-tokens", type=int, default=1024, metavar="N",
                   help="tokens per chunk of the vocabulary projection (default 1024)")
    p.add_argument("--bins", type=int, default=10, metavar="N",
                   help="relative-position bins of the thinking in the aggregate maps (default 10)")
    p.add_argument("--plots", type=int, default=8, metavar="N",
                   help="draw per-trace pictures for the first N traces (default 8, -1: all)")
    p.add_argument("--no-plots", action="store_true", help="write maps and JSON only, no pictures or report")
    d = p.add_argument_group("diagnostic thresholds (docs/method.md, Diagnostics)")
    d.add_argument("--lock-in-margin", type=float, default=0.1, metavar="X",
                   help="Shallow Lock-in: LI(first third) - LI(middle third) above this (default 0.1)")
    d.add_argument("--decay-drop", type=float, default=0.25, metavar="X",
                   help="Deep Decay: TS(last third) below (1 - this) x peak TS (default 0.25)")
    d.add_argument("--recent-window", type=int, default=2, metavar="W",
                   help="steps counted as recent in RS (default 2)")


def _saliency_options(args) -> None:
    """analyze/compare: resolve --preset, --target, --loss-reduction, --head-reduction in place."""
    from .saliency import PRESETS, resolve_options

    for name, value in PRESETS.get(args.preset, {}).items():
        mine = getattr(args, name)
        if mine is not None and mine != value:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {mine} contradicts --preset {args.preset}, which sets {flag} {value}")
    chosen = resolve_options(args.target, args.loss_reduction, args.head_reduction, args.preset)
    args.target, args.loss_reduction, args.head_reduction = (chosen["target"], chosen["loss_reduction"],
                                                             chosen["head_reduction"])


def _saliency_settings(args) -> dict:
    return {"preset": args.preset, "target": args.target, "loss_reduction": args.loss_reduction,
            "head_reduction": args.head_reduction}


def _saliency_words(args) -> str:
    """A short description of the saliency settings for titles and report lines."""
    what = f"target {args.target}, loss {args.loss_reduction}, heads {args.head_reduction}"
    return f"preset {args.preset} = {what}" if args.preset else what


TRACE_FORMATS = """\
trace formats (JSONL, one object per line; the first field set present wins):
  {"input_ids": [...], "prompt_len": P}               ids as the model saw them (what `generate` writes)
  {"prompt": TEXT or [messages], "completion": TEXT}  TEXT prompts are used verbatim (no chat template)
  {"question": ..., "thinking": ..., "summary": ...}  chat template(question) + "<think>\\n", then
                                                      thinking + "\\n</think>\\n\\n" + summary
Malformed lines are reported as FILE:LINE: FIELD: problem; the other lines still run and the
command exits with status 1, listing the failures.
"""


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="stepflow", formatter_class=raw, description=(
        "Step-Saliency diagnostics and StepFlow repair of reasoning traces on Hugging Face causal LMs."),
        epilog="examples:\n  stepflow make-tiny-model tiny\n"
               "  stepflow generate --model tiny --prompt 'What is 12 + 7?' --out gen.jsonl\n"
               "  stepflow analyze --model tiny --traces tiny/traces.jsonl --out runs/analyze\n"
               "  stepflow compare --model tiny --traces tiny/traces.jsonl --stepflow stepflow.json --out runs/compare\n"
               "  stepflow eval --model tiny --data gsm8k.jsonl --task math --max-new-tokens 16 --out runs/base\n"
               "  stepflow compare-runs runs/base runs/sf\n"
               "\nrun `stepflow COMMAND --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", formatter_class=raw, help="generate reasoning traces (optionally under StepFlow)",
                       description="Generate reasoning traces and write them, with their segmentation, as JSONL.\n"
                                   "The tokenizer's chat template is applied to each prompt. A single --prompt\n"
                                   "streams its tokens to the terminal; a --prompts file shows a progress bar.",
                       epilog="examples:\n"
                              "  stepflow generate --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \\\n"
                              "      --prompt 'What is 12 + 7? Reason step by step.' --max-new-tokens 1024 --out gen.jsonl\n"
                              "  stepflow generate --model tiny --prompts tiny/prompts.txt --stepflow stepflow.json "
                              "--out gen.jsonl\n\n"
                              "prompt files: .jsonl/.json with {\"question\": ...} (chat template applied) or\n"
                              "{\"prompt\": TEXT} (verbatim) per line, other fields kept; any other file: one\n"
                              "question per line (\\n for a newline).\n"
                              "output lines: question, prompt, completion, text, input_ids, prompt_len,\n"
                              "segments {kinds, lengths}, stepflow (config or null), model, generation;\n"
                              "`stepflow analyze` reads them back exactly (input_ids + prompt_len).")
    _common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one question (its tokens stream to the terminal)")
    src.add_argument("--prompts", metavar="FILE", help="a file of prompts (see below)")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL file")
    p.add_argument("--stepflow", metavar="CONFIG.json", help="generate under StepFlow with this StepFlowConfig")
    p.add_argument("--max-new-tokens", type=int, default=1024, metavar="N", help="default 1024")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature > 0 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="prompts per generate call (left padded)")
    p.add_argument("--no-stream", action="store_true", help="do not stream the tokens of a single --prompt")
    p.add_argument("--escapes", action="store_true", help="read backslash escapes (\\n) in --prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("analyze", formatter_class=raw, help="Step-Saliency maps, diagnostics, pictures, report",
                       description="Step-Saliency of each trace: maps + metadata (traces/NAME.safetensors + .json),\n"
                                   "heatmaps (one panel per layer), diagnostic curves with the Shallow Lock-in /\n"
                                   "Deep Decay verdicts, an aggregate over all traces (aggregate.safetensors,\n"
                                   "aggregate_*.png), diagnostics.json, a table in the terminal and a\n"
                                   "self-contained report.html (and report.md).",
                       epilog="examples:\n"
                              "  stepflow analyze --model tiny --traces tiny/traces.jsonl --out runs/analyze\n"
                              "  stepflow analyze --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --traces gen.jsonl \\\n"
                              "      --dtype bfloat16 --gradient-checkpointing --out runs/r1\n\n" + TRACE_FORMATS)
    _common(p)
    _analysis_options(p)
    p.add_argument("--stepflow", metavar="CONFIG.json",
                   help="measure the model under StepFlow (the maps of the intervened model)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compare", formatter_class=raw, help="the same traces before and after StepFlow",
                       description="Step-Saliency of the same traces with the stock model and under StepFlow:\n"
                                   "side-by-side and difference heatmaps, curves before/after, and whether OEB\n"
                                   "lowered the lock-in index in the shallow (OEB) layers and SMI raised the\n"
                                   "summary thinking share in the deep (SMI) layers (comparison.json, report.html).",
                       epilog="examples:\n"
                              "  echo '{\"oeb_layers\": [0, 1], \"smi_layers\": [2, 3]}' > stepflow.json\n"
                              "  stepflow compare --model tiny --traces tiny/traces.jsonl --stepflow stepflow.json "
                              "--out runs/compare\n\n"
                              "StepFlow config: JSON with oeb_layers, oeb_strength (0..1), num_sink, smi_layers,\n"
                              "smi_beta (0..1), smi_gamma (>= 0); missing fields take StepFlowConfig's defaults.\n\n"
                              + TRACE_FORMATS)
    _common(p)
    _analysis_options(p)
    p.add_argument("--stepflow", required=True, metavar="CONFIG.json", help="the StepFlowConfig to compare against")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("make-tiny-model", formatter_class=raw, help="a random tiny model to try the commands offline",
                       description="Write a random 4-layer Qwen2 causal LM and a byte-level BPE tokenizer (with a\n"
                                   "chat template that opens <think>) to DIR, plus DIR/traces.jsonl (canned\n"
                                   "{question, thinking, summary} traces) and DIR/prompts.txt. The weights are\n"
                                   "random: its generations are noise and rarely contain steps or a summary,\n"
                                   "which is why analyze/compare examples use the canned traces.",
                       epilog="example:\n  stepflow make-tiny-model tiny && stepflow analyze --model tiny "
                              "--traces tiny/traces.jsonl --out runs/analyze")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.set_defaults(func=cmd_make_tiny_model)
    _eval_parsers(sub, raw)
    from .demo import add_parser as demo_parser

    demo_parser(sub, raw)
    return parser


# --------------------------------------------------------------------------- eval, compare-runs, sweep
# (their logic is in eval/commands.py)


def _cmd_eval(args) -> int:
    from .eval.commands import cmd_eval

    return cmd_eval(args)


def _cmd_compare_runs(args) -> int:
    from .eval.commands import cmd_compare_runs

    return cmd_compare_runs(args)


def _cmd_sweep(args) -> int:
    from .eval.commands import cmd_sweep

    return cmd_sweep(args)


EVAL_OUTPUT = """\
output DIR: settings.json (what identifies the run), rows.jsonl (one row per item and sample, appended
as each is graded: item_id, sample, prompt, completion, extracted, correct, detail, tokens, time_s,
seed, sampling settings, stepflow, control, model), errors.jsonl, summary.json (counts, pass@1 /
avg@K / pass@K with a 95% bootstrap CI, per-item correctness) and a table in the terminal.
Rerunning with the same --out resumes: finished samples are skipped, a line cut off by a killed run
is redone, nothing is duplicated; a rerun with other settings is refused.
"""


def _generation_options(p):
    g = p.add_argument_group("generation")
    g.add_argument("--samples", type=int, default=1, metavar="K", help="samples per item (default 1; avg@K, pass@K)")
    g.add_argument("--max-new-tokens", type=int, default=4096, metavar="N", help="default 4096")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; > 0: sampling with one random stream per item and sample")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature > 0 (default 1)")
    g.add_argument("--seed", type=int, default=0,
                   help="sample k of item i is seeded from (seed, i, k) whatever batch or rank it is in (default 0)")
    g.add_argument("--instruction", default="default", metavar="TEXT",
                   help="what follows the question in the user message: default (the task's instruction, "
                        "e.g. 'Please reason step by step, and put your final answer within \\boxed{}.'), "
                        "none (the bare question, for models trained without one), or your own TEXT")
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per generate call, left "
                   "padded (default 8)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items of the data")
    g.add_argument("--device-map", default=None, metavar="MAP",
                   help="e.g. auto: spread a model too large for one GPU with accelerate (instead of --device)")
    g = p.add_argument_group("grading")
    g.add_argument("--code-time-limit", type=float, default=10.0, metavar="S",
                   help="seconds per code test run in the sandbox (default 10)")
    g.add_argument("--code-memory-mb", type=int, default=512, metavar="MB",
                   help="address-space limit of the sandboxed program (default 512)")
    g.add_argument("--grade-workers", type=int, default=4, metavar="N",
                   help="code gradings (sandbox processes) run at once (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _eval_parsers(sub, raw):
    p = sub.add_parser("eval", formatter_class=raw, help="accuracy of a model on a benchmark (optionally under "
                       "StepFlow or a control)",
                       description="Generate answers to every item of a data set (chat template + a task\n"
                                   "instruction), grade them (math: math-verify on the last \\boxed{}; mcq: the\n"
                                   "letter; code: the program against its tests in a sandboxed process) and\n"
                                   "write one row per item and sample. Under torchrun, items are sharded\n"
                                   "over the ranks and merged by rank 0.",
                       epilog="examples:\n"
                              "  stepflow eval --model tiny --data tests/fixtures/eval/gsm8k.jsonl --task math "
                              "--max-new-tokens 16 --out runs/base\n"
                              "  stepflow eval --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --data math500.jsonl "
                              "--task math \\\n"
                              "      --stepflow default --samples 4 --temperature 0.6 --top-p 0.95 --out runs/sf\n"
                              "  torchrun --nproc_per_node 8 -m stepflow_ext.cli eval --model M --data gpqa.jsonl "
                              "--task mcq --out runs/gpqa\n\n"
                              "data: a local .jsonl (GSM8K, MATH-500, AIME, GPQA-Diamond, LiveCodeBench shapes) or\n"
                              "hf:NAME[:split] (needs the datasets package and a network). Bad lines are reported\n"
                              "as FILE:LINE: FIELD: problem; the other items still run (exit status 1).\n"
                              + EVAL_OUTPUT)
    _common(p)
    p.add_argument("--data", required=True, metavar="SOURCE", help="a .jsonl file or hf:NAME[:split]")
    p.add_argument("--task", required=True, choices=("math", "mcq", "code"), help="how prompts are built and graded")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (created; resumed if it exists)")
    p.add_argument("--stepflow", default="none", metavar="CONFIG.json|default|none",
                   help="generate under StepFlow: a StepFlowConfig JSON, default (StepFlowConfig.default_for the "
                        "model) or none (default: none, the baseline)")
    p.add_argument("--control", default="none", choices=("none", *CONTROLS),
                   help="instead of StepFlow, a control in the same layers with the same sizes (docs/method.md, "
                        "Controls); needs --stepflow")
    p.add_argument("--control-seed", type=int, default=0, metavar="S", help="seed of the control's random "
                   "groups/directions (default 0)")
    p.add_argument("--completions-from", default=None, metavar="FILE",
                   help="grade these completions instead of generating: JSONL {item_id, sample, completion}")
    _generation_options(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare-runs", formatter_class=raw, help="paired table of eval runs against a baseline",
                       description="Pair eval runs by item id (items every run completed; the others are\n"
                                   "dropped and counted) and compare each with the first run, the baseline:\n"
                                   "pass@1 with its 95% bootstrap CI, the paired difference with a paired-\n"
                                   "bootstrap CI and p-value, and McNemar's exact test (first sample per item).",
                       epilog="example:\n"
                              "  stepflow compare-runs runs/base runs/sf runs/random-attn runs/random-residual "
                              "--out runs/paired.md\n")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="eval output directories; the first is the baseline")
    p.add_argument("--names", default=None, metavar="A,B,...", help="labels for the runs (default: directory names)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the comparison as .json or .md")
    p.add_argument("--n-boot", type=int, default=10000, metavar="N", help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=_cmd_compare_runs)

    p = sub.add_parser("sweep", formatter_class=raw, help="choose a StepFlow config on dev, report it on test",
                       description="Run every StepFlow config of a grid on the dev split (each an eval run in\n"
                                   "DIR/dev/NAME), choose the best dev pass@1 (ties: the smaller perturbation,\n"
                                   "smaller λ×|OEB layers| then γ×|SMI layers|), write DIR/chosen.json, then\n"
                                   "evaluate the baseline and the chosen config once on the test split\n"
                                   "(DIR/test/) and write the paired report (DIR/report.md, report.json).\n"
                                   "There is no way to choose on the test split: dev and test must be\n"
                                   "different files with no item id in common.",
                       epilog="example:\n"
                              "  stepflow sweep --model tiny --dev dev.jsonl --test test.jsonl --task math \\\n"
                              "      --grid 'oeb_strength=0.25,0.5,1.0;smi_gamma=0.02,0.05;oeb_layers=0-0,0-1' "
                              "--max-new-tokens 16 --out runs/sweep\n\n"
                              "grid: FIELD=V1,V2,... joined by ';'. Fields: oeb_strength, smi_gamma, smi_beta,\n"
                              "num_sink, oeb_layers, smi_layers. Layer sets: 0-3 (inclusive), 5, 0-1+6-7, none.\n"
                              "Fields not in the grid come from --stepflow (default: default_for the model).")
    _common(p)
    p.add_argument("--dev", required=True, metavar="FILE", help="the split the config is chosen on")
    p.add_argument("--test", required=True, metavar="FILE", help="the split it is reported on (once)")
    p.add_argument("--task", required=True, choices=("math", "mcq", "code"))
    p.add_argument("--grid", required=True, metavar="GRID", help="see below")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (resumable)")
    p.add_argument("--stepflow", default="default", metavar="CONFIG.json|default",
                   help="the config the grid varies (default: StepFlowConfig.default_for the model)")
    p.add_argument("--with-controls", action="store_true",
                   help="also run random-attn and random-residual with the chosen config on the test split")
    p.add_argument("--control-seed", type=int, default=0, metavar="S", help="seed of the controls (default 0)")
    p.add_argument("--n-boot", type=int, default=10000, metavar="N", help="bootstrap resamples (default 10000)")
    _generation_options(p)
    p.set_defaults(func=_cmd_sweep)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    start = time.time()
    try:
        status = args.func(args)
    except UsageError as e:
        _err(f"stepflow {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    if args.command in ("analyze", "compare", "generate", "eval", "sweep"):
        _err(f"done in {time.time() - start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
