"""`stepflow analyze`: Step-Saliency maps, diagnostics, pictures and a report of each trace."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from ..traces import TraceError, write_json
from .common import RAW, err, load_config, load_model, model_options, print_table, segmentation_options
from .common_analysis import (PAPER_NOTE, TRACE_FORMATS, analysis_options, check_analysis_args, diagnostic_thresholds,
                              end_of_run, load_traces, resolve_saliency_options, saliency_settings, saliency_words,
                              trace_saliency, write_report)


def cmd_analyze(args) -> int:
    from tqdm import tqdm

    import stepflow_ext as sf

    from .. import plot
    from ..diagnostics import verdict_text
    from ..report import Report, aggregate, fmt, flag, fmt_sci, save_aggregate

    check_analysis_args(args)
    resolve_saliency_options(args)
    tok, model = load_model(args)
    traces, errors = load_traces(args, tok, model)
    cfg = load_config(args.stepflow, model) if args.stepflow else None
    rule = segmentation_options(args)
    out = args.out
    trace_dir = os.path.join(out, "traces")
    os.makedirs(trace_dir, exist_ok=True)
    for e in errors:
        err(f"skipping {e}")
    handle = sf.replace_attention(model, cfg, tokenizer=tok, **rule) if cfg is not None else None
    done = []
    try:
        for trace in tqdm(traces, unit="trace", desc="analyze", file=sys.stderr, disable=len(traces) < 2):
            got = trace_saliency(model, tok, trace, args, rule, args.model)
            if isinstance(got, TraceError):
                errors.append(got)
                err(f"failed {got}")
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
               "saliency": saliency_settings(args),
               "stepflow": cfg.to_dict() if cfg else None, "thresholds": diagnostic_thresholds(args),
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
        print_table(f"Step-Saliency diagnostics ({saliency_words(args)}{', under StepFlow' if cfg else ''}; "
                    "FB, AB, FB/AB: the paper's block intensities, mean over layers)", header, rows)

    if done and not args.no_plots:
        err("drawing pictures ...")
        report = Report("Step-Saliency report")
        report.text(f"model {args.model} · traces {args.traces} · {saliency_words(args)} · "
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
                                    verdict_lines=[lock, decay], thresholds=diagnostic_thresholds(args))
            report.image(path, "aggregate diagnostic curves")
            m = agg["paper_means"]
            path = plot.plot_paper(os.path.join(out, "aggregate_paper.png"),
                                   [{"label": f"mean of {len(done)} traces", "curves": agg["paper_curves"]}],
                                   title=f"The paper's block intensities over layers, mean and 95% band over "
                                         f"{len(done)} traces ({saliency_words(args)})",
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
                                   ["mean over layers"], title=f"{trace.name}: the paper's view ({saliency_words(args)})",
                                   text=plot.paper_text(rep))
            report.image(path, f"{trace.name}: layer-averaged step matrix (block view) and FB, AB, FB/AB per layer")
        if len(done) > limit:
            report.text(f"Pictures of the other {len(done) - limit} traces were not drawn (--plots {args.plots}); "
                        "their maps are in traces/.")
        write_report(report, out, errors)
    return end_of_run(out, done, errors)


def _diag_row(name, res, rep):
    from ..report import flag, fmt, fmt_sci

    kinds = res.kinds[0]
    return [name, res.meta.get("num_tokens", ""), kinds.count("step"), fmt(rep["lock_in_shallow"]),
            fmt(rep["lock_in_middle"]), flag(rep["shallow_lock_in"]), fmt(rep["thinking_share_deep"]),
            fmt(rep["thinking_share_peak"]), flag(rep["deep_decay"]), fmt_sci(rep["final_block_intensity_mean"]),
            fmt_sci(rep["analysis_block_intensity_mean"]), fmt(rep["final_heat_anomaly_mean"])]


def _aggregate_row(agg):
    from ..report import fmt, fmt_sci

    v, f, n, m = agg["verdict"], agg["flags"], agg["n"], agg["paper_means"]
    return [f"mean of {n}", "", "", fmt(v["lock_in_shallow"]), fmt(v["lock_in_middle"]),
            f"{f['shallow_lock_in']['yes']}/{n} flagged", fmt(v["thinking_share_deep"]),
            fmt(v["thinking_share_peak"]), f"{f['deep_decay']['yes']}/{n} flagged",
            fmt_sci(m["final_block_intensity"]), fmt_sci(m["analysis_block_intensity"]),
            fmt(m["final_heat_anomaly"])]


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", formatter_class=RAW, help="Step-Saliency maps, diagnostics, pictures, report",
                       description="Step-Saliency of each trace: maps + metadata (traces/NAME.safetensors + .json),\n"
                                   "heatmaps (one panel per layer), diagnostic curves with the Shallow Lock-in /\n"
                                   "Deep Decay verdicts, an aggregate over all traces (aggregate.safetensors,\n"
                                   "aggregate_*.png), diagnostics.json, a table in the terminal and a\n"
                                   "self-contained report.html (and report.md).",
                       epilog="examples:\n"
                              "  stepflow analyze --model tiny --traces tiny/traces.jsonl --out runs/analyze\n"
                              "  stepflow analyze --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --traces gen.jsonl \\\n"
                              "      --dtype bfloat16 --gradient-checkpointing --out runs/r1\n\n" + TRACE_FORMATS)
    model_options(p)
    analysis_options(p)
    p.add_argument("--stepflow", metavar="CONFIG.json",
                   help="measure the model under StepFlow (the maps of the intervened model)")
    p.set_defaults(func=cmd_analyze)
