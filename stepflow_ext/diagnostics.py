"""The Step-Saliency diagnostics of design.md 2.2: Shallow Lock-in and Deep Decay.

From the row-normalized maps R^l[a, c] (the share of segment a's saliency that comes from c):
- lock-in index LI^l: mean over steps a that have an earlier step of R^l[a, a];
- summary thinking share TS^l: sum over steps c of R^l[summary, c];
- summary recent share RS^l: R^l[summary, summary] plus the last `recent_window` steps.
Shallow Lock-in is flagged when mean LI over the first third of the layers exceeds the mean
over the middle third by more than `lock_in_margin`; Deep Decay when mean TS over the last
third is below (1 - decay_drop) times the peak TS over all layers.

A layer where a quantity is undefined (no step with an earlier step, no summary, or a row
without saliency, e.g. the steps' rows in the last layer when the target is the summary)
gets NaN and is left out of the means; a flag whose windows hold no number is None.
"""
from __future__ import annotations

import math

CURVES = ("lock_in_index", "summary_thinking_share", "summary_recent_share")


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


def diagnose(result, recent_window=2, lock_in_margin=0.1, decay_drop=0.25):
    shares = result.normalized("row")
    reports = []
    for row, kinds in enumerate(result.kinds):
        steps = [i for i, k in enumerate(kinds) if k == "step"]
        summary = next((i for i, k in enumerate(kinds) if k == "summary"), None)
        li, ts, rs = [], [], []
        for layer in range(result.num_layers):
            r = shares[row, layer]
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
        report["thresholds"] = {"lock_in_margin": lock_in_margin, "decay_drop": decay_drop,
                                "recent_window": recent_window}
        reports.append(report)
    return reports
