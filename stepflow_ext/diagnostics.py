"""The Step-Saliency diagnostics of design.md 2.2: the paper's block intensities, and this
project's Shallow Lock-in and Deep Decay numbers.

The paper's numbers (`paper_numbers`), per layer l, from the block view B^l[a, c] = M^l[a, c] /
(|a| |c|) (StepSaliencyResult.normalized("block"), the paper's step matrix), exactly as the
authors' compute_step_metrics computes them from their step matrices:
- final-block intensity FB^l: the mean of the summary x summary sub-block of B^l (all summary
  segments against all summary segments, the empty future above the diagonal included as zeros);
  0 when the trace has no summary;
- analysis-block intensity AB^l: the mean of the thinking-steps x thinking-steps sub-block; 0
  when the trace has no thinking step;
- the anomaly FB^l / AB^l ("final heat anomaly"), set to 0 where AB^l <= 1e-10 (an absolute
  floor, as the authors do; with loss_reduction "sum" the maps are larger by the number of
  targets, so the floor bites less);
- the layer-averaged block map: the mean of B^l over the layers (the maps of the paper's figures).
These read the block view of whatever loss and head reduction made the maps; they are the
paper's numbers when the maps are (preset="paper").

The project's own diagnostics, from the row-normalized maps R^l[a, c] (the share of segment a's saliency that comes from c):
- lock-in index LI^l: mean over steps a that have an earlier step of R^l[a, a];
- summary thinking share TS^l: sum over steps c of R^l[summary, c];
- summary recent share RS^l: R^l[summary, summary] plus the last `recent_window` steps.
Shallow Lock-in is flagged when mean LI over the first third of the layers exceeds the mean
over the middle third by more than `lock_in_margin`; Deep Decay when mean TS over the last
third is below (1 - decay_drop) times the peak TS over all layers.

Several summary segments (summary steps) count as one summary here: their rows are pooled
(saliency summed) before the shares are taken, and their columns count as the summary.

A layer where a quantity is undefined (no step with an earlier step, no summary, or a row
without saliency, e.g. the steps' rows in the last layer when the target is the summary)
gets NaN and is left out of the means; a flag whose windows hold no number is None.
"""
from __future__ import annotations

import math

import numpy as np

CURVES = ("lock_in_index", "summary_thinking_share", "summary_recent_share")
PAPER_CURVES = ("final_block_intensity", "analysis_block_intensity", "final_heat_anomaly")
ANOMALY_FLOOR = 1e-10   # the authors' compute_step_metrics: FB/AB is 0 where AB <= this


def _thirds(n):
    a, b = max(1, round(n / 3)), max(1, round(2 * n / 3))
    return range(0, a), range(a, max(a + 1, b)) if n > 1 else range(0, 1), range(min(b, n - 1), n)


def layer_windows(num_layers: int) -> tuple[range, range, range]:
    """The first, middle and last third of the layers: the windows the verdicts compare."""
    return _thirds(num_layers)


def _mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def verdicts(lock_in_index, summary_thinking_share, lock_in_margin=0.1, decay_drop=0.25) -> dict:
    """The window means and the two flags from per-layer LI and TS curves (NaN = undefined)."""
    li, ts = [float(x) for x in lock_in_index], [float(x) for x in summary_thinking_share]
    first, middle, last = _thirds(len(li))
    li_shallow, li_middle = _mean([li[i] for i in first]), _mean([li[i] for i in middle])
    ts_deep = _mean([ts[i] for i in last])
    ts_peak = max([x for x in ts if not math.isnan(x)], default=float("nan"))
    return {
        "lock_in_shallow": li_shallow, "lock_in_middle": li_middle,
        "thinking_share_deep": ts_deep, "thinking_share_peak": ts_peak,
        "shallow_lock_in": bool(li_shallow - li_middle > lock_in_margin) if not math.isnan(li_shallow - li_middle) else None,
        "deep_decay": bool(ts_deep < (1 - decay_drop) * ts_peak) if not math.isnan(ts_deep) else None,
    }


def verdict_text(report: dict) -> tuple[str, str]:
    """Two short lines that state the flags with the numbers behind them."""
    def num(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    def flag(x):
        return "undefined" if x is None else ("YES" if x else "no")

    th = report.get("thresholds", {})
    lock = (f"Shallow Lock-in: {flag(report['shallow_lock_in'])}  (LI shallow {num(report['lock_in_shallow'])} vs "
            f"middle {num(report['lock_in_middle'])}, flagged above +{th.get('lock_in_margin', 0.1):g})")
    peak = report["thinking_share_peak"]
    bar = None if peak is None or math.isnan(peak) else (1 - th.get("decay_drop", 0.25)) * peak
    decay = (f"Deep Decay: {flag(report['deep_decay'])}  (TS deep {num(report['thinking_share_deep'])} vs "
             f"{1 - th.get('decay_drop', 0.25):g} x peak {num(peak)} = {num(bar)})")
    return lock, decay


def block_intensities(block, kinds) -> tuple[float, float, float]:
    """(FB, AB, FB/AB) of one layer's block map `block` (S, S) of one trace with segment `kinds`:
    the mean of the summary x summary and of the steps x steps sub-blocks, and their ratio (0 where
    AB <= 1e-10), as the authors' compute_step_metrics; FB (AB) is 0 without summary (steps)."""
    b = np.asarray(block, dtype=np.float64)
    summary = [i for i, k in enumerate(kinds) if k == "summary"]
    steps = [i for i, k in enumerate(kinds) if k == "step"]
    fb = float(b[np.ix_(summary, summary)].mean()) if summary else 0.0
    ab = float(b[np.ix_(steps, steps)].mean()) if steps else 0.0
    return fb, ab, (fb / ab if ab > ANOMALY_FLOOR else 0.0)


def paper_numbers(blocks, kinds) -> dict:
    """The paper's per-layer numbers of one trace from its block maps (L, S, S) (see the module doc)."""
    s = len(kinds)
    b = np.asarray(blocks, dtype=np.float64)[:, :s, :s]
    fb, ab, ratio = zip(*(block_intensities(layer, kinds) for layer in b)) if len(b) else ((), (), ())
    return {"final_block_intensity": list(fb), "analysis_block_intensity": list(ab), "final_heat_anomaly": list(ratio),
            "final_block_intensity_mean": _mean(list(fb)), "analysis_block_intensity_mean": _mean(list(ab)),
            "final_heat_anomaly_mean": _mean(list(ratio)), "block_map_layer_mean": b.mean(axis=0).tolist()}


def _pooled_summary(maps, kinds):
    """(L, S', S') raw maps and kinds with the summary segments merged into one (rows and columns summed)."""
    summary = [i for i, k in enumerate(kinds) if k == "summary"]
    if len(summary) <= 1:
        return maps, kinds
    keep = [i for i, k in enumerate(kinds) if k != "summary"]
    groups = [[i] for i in keep] + [summary]
    m = np.asarray(maps, dtype=np.float64)
    rows = np.stack([m[:, g].sum(1) for g in groups], axis=1)
    pooled = np.stack([rows[:, :, g].sum(2) for g in groups], axis=2)
    return pooled, [kinds[i] for i in keep] + ["summary"]


def diagnose(result, recent_window=2, lock_in_margin=0.1, decay_drop=0.25):
    """One report per trace: LI, TS, RS per layer and the flags (see the module doc), and the
    paper's FB, AB, FB/AB per layer, their means over layers and the layer-averaged block map."""
    blocks = result.normalized("block")
    reports = []
    for row, all_kinds in enumerate(result.kinds):
        s = len(all_kinds)
        maps, kinds = _pooled_summary(result.maps[row, :, :s, :s].double().numpy(), all_kinds)
        total = maps.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = np.where(total > 0, maps / np.where(total > 0, total, 1.0), 0.0)
        steps = [i for i, k in enumerate(kinds) if k == "step"]
        summary = next((i for i, k in enumerate(kinds) if k == "summary"), None)
        li, ts, rs = [], [], []
        for layer in range(result.num_layers):
            r = shares[layer]
            locked = [float(r[a, a]) for a in steps[1:] if float(r[a].sum()) > 0]
            li.append(_mean(locked))
            if summary is not None and float(r[summary].sum()) > 0:
                ts.append(float(sum(r[summary, c] for c in steps)))
                recent = steps[max(0, len(steps) - recent_window):]   # (steps[-0:] would be all of them)
                rs.append(float(r[summary, summary] + sum(r[summary, c] for c in recent)))
            else:
                ts.append(float("nan"))
                rs.append(float("nan"))
        report = {"lock_in_index": li, "summary_thinking_share": ts, "summary_recent_share": rs}
        report.update(verdicts(li, ts, lock_in_margin, decay_drop))
        report.update(paper_numbers(blocks[row].double().numpy(), all_kinds))
        report["thresholds"] = {"lock_in_margin": lock_in_margin, "decay_drop": decay_drop,
                                "recent_window": recent_window}
        reports.append(report)
    return reports
