"""`stepflow compare`: Step-Saliency of the same traces with the stock model and under StepFlow."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from ..console import span
from ..traces import TraceError, write_json
from .common import RAW, err, load_config, load_model, model_options, print_table, segmentation_options
from .common_analysis import (PAPER_NOTE, TRACE_FORMATS, analysis_options, check_analysis_args, diagnostic_thresholds,
                              end_of_run, load_traces, resolve_saliency_options, saliency_settings, saliency_words,
                              trace_saliency, write_report)


PAPER_KEYS = ("final_block_intensity", "analysis_block_intensity", "final_heat_anomaly",
              "final_block_intensity_mean", "analysis_block_intensity_mean", "final_heat_anomaly_mean")


def _window_mean(curve, layers):
    vals = [curve[i] for i in layers if not math.isnan(curve[i])]
    return sum(vals) / len(vals) if vals else float("nan")


def _effect(before, after, lower_is_better):
    """Summary of paired per-trace numbers: means, mean change with its 95% CI, how many improved."""
    from ..report import mean_band

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

    from .. import hf, plot
    from ..diagnostics import layer_windows, verdict_text
    from ..report import Report, aggregate, flag, fmt, fmt_sci, save_aggregate

    check_analysis_args(args)
    resolve_saliency_options(args)
    tok, model = load_model(args)
    traces, errors = load_traces(args, tok, model)
    cfg = load_config(args.stepflow, model)
    rule = segmentation_options(args)
    out = args.out
    dirs = {k: os.path.join(out, k) for k in ("before", "after")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    for e in errors:
        err(f"skipping {e}")
    results = {"before": {}, "after": {}}
    failed = set()
    for phase in ("before", "after"):
        handle = sf.replace_attention(model, cfg, tokenizer=tok, **rule) if phase == "after" else None
        try:
            todo = [t for t in traces if t.line not in failed]
            for trace in tqdm(todo, unit="trace", desc=f"saliency {phase}", file=sys.stderr, disable=len(todo) < 2):
                got = trace_saliency(model, tok, trace, args, rule, args.model, warn=phase == "before")
                if isinstance(got, TraceError):
                    got.message = f"{phase}: {got.message}"
                    errors.append(got)
                    failed.add(trace.line)
                    err(f"failed {got}")
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
    where_shallow = f"OEB layers {span(shallow)}" if cfg.oeb_layers else f"first third {span(shallow)} (no OEB layers)"
    where_deep = f"SMI layers {span(deep)}" if cfg.smi_layers else f"last third {span(deep)} (no SMI layers)"
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
        print_table(f"StepFlow before → after (LI over {span(shallow)}, TS over {span(deep)}, FB/AB mean over "
                    f"layers; {saliency_words(args)})", header, table)
        for line in lines:
            print(line)
    summary = {"command": "compare", "model": args.model, "traces": args.traces, "target": args.target,
               "saliency": saliency_settings(args),
               "stepflow": cfg.to_dict(), "thresholds": diagnostic_thresholds(args), "shallow_layers": shallow,
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
        err("drawing pictures ...")
        report = Report("StepFlow comparison: Step-Saliency before and after")
        report.text(f"model {args.model} · traces {args.traces} · {saliency_words(args)} · {len(done)} compared, "
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
                                thresholds=diagnostic_thresholds(args),
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
                                        thresholds=diagnostic_thresholds(args),
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
        write_report(report, out, errors)
    return end_of_run(out, done, errors, " compared")


def _signed(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:+.1e}"


def _ci(effect) -> str:
    return f", 95% CI [{_signed(effect['ci95'][0])}, {_signed(effect['ci95'][1])}]" if effect.get("ci95") else ""


def add_parser(sub) -> None:
    p = sub.add_parser("compare", formatter_class=RAW, help="the same traces before and after StepFlow",
                       description="Step-Saliency of the same traces with the stock model and under StepFlow:\n"
                                   "side-by-side and difference heatmaps, curves before/after, and whether OEB\n"
                                   "lowered the lock-in index in the shallow (OEB) layers and SMI raised the\n"
                                   "summary thinking share in the deep (SMI) layers (comparison.json, report.html).",
                       epilog="examples:\n"
                              "  echo '{\"oeb_layers\": [0, 1], \"smi_layers\": [2, 3]}' > stepflow.json\n"
                              "  stepflow compare --model tiny --traces tiny/traces.jsonl --stepflow stepflow.json "
                              "--out runs/compare\n\n"
                              "StepFlow config: JSON with oeb_layers, oeb_rule (bridge: the paper's; odds),\n"
                              "oeb_tau_max (bridge), oeb_strength and num_sink (odds), smi_layers, smi_rule (value:\n"
                              "the paper's; residual), smi_alpha and smi_window (value), smi_beta and smi_gamma\n"
                              "(residual); missing fields take StepFlowConfig's defaults (the paper's rules; a file\n"
                              "with odds/residual fields and no rule fields loads as those rules, with a warning).\n\n"
                              + TRACE_FORMATS)
    model_options(p)
    analysis_options(p)
    p.add_argument("--stepflow", required=True, metavar="CONFIG.json", help="the StepFlowConfig to compare against")
    p.set_defaults(func=cmd_compare)
