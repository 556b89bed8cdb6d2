"""The Step-Saliency diagnostics of design.md 2.2: Shallow Lock-in and Deep Decay.

From the row-normalized maps R^l[a, c] (the share of segment a's saliency that comes from c):
- lock-in index LI^l: mean over steps a that have an earlier step of R^l[a, a];
- summary thinking share TS^l: sum over steps c of R^l[summary, c];
- summary recent share RS^l: R^l[summary, summary] plus the last `recent_window` steps.
Shallow Lock-in is flagged when mean LI over the first third of the layers exceeds the mean
over the middle third by more than `lock_in_margin`; Deep Decay when mean TS over the last
third is below (1 - decay_drop) times the peak TS over all layers.
"""
from __future__ import annotations

import math


def _thirds(n):
    a, b = max(1, round(n / 3)), max(1, round(2 * n / 3))
    return range(0, a), range(a, max(a + 1, b)) if n > 1 else range(0, 1), range(min(b, n - 1), n)


def _mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


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
                rs.append(float(r[summary, summary] + sum(r[summary, c] for c in steps[-recent_window:])))
            else:
                ts.append(float("nan"))
                rs.append(float("nan"))
        first, middle, last = _thirds(result.num_layers)
        li_shallow, li_middle = _mean([li[i] for i in first]), _mean([li[i] for i in middle])
        ts_deep = _mean([ts[i] for i in last])
        ts_peak = max([x for x in ts if not math.isnan(x)], default=float("nan"))
        reports.append({
            "lock_in_index": li, "summary_thinking_share": ts, "summary_recent_share": rs,
            "lock_in_shallow": li_shallow, "lock_in_middle": li_middle,
            "thinking_share_deep": ts_deep, "thinking_share_peak": ts_peak,
            "shallow_lock_in": bool(li_shallow - li_middle > lock_in_margin) if not math.isnan(li_shallow - li_middle) else None,
            "deep_decay": bool(ts_deep < (1 - decay_drop) * ts_peak) if not math.isnan(ts_deep) else None,
            "thresholds": {"lock_in_margin": lock_in_margin, "decay_drop": decay_drop, "recent_window": recent_window},
        })
    return reports
