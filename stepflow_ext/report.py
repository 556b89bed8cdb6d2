"""Aggregates over many traces and the self-contained reports (HTML with embedded PNGs, Markdown).

Aggregating step maps of traces with different numbers of steps needs a common axis. Each
trace's row-share map R[a, c] (design.md 2.2) is resampled onto a fixed grid of G = bins + 2
cells: the question, `bins` bins of relative position in the thinking (step k of K covers
[(k-1)/K, k/K]), and the summary. With overlap(k, b) the length of step k's interval inside
bin b:

    rows    (the segment whose saliency is shared out) are averaged:
            R'[b, :] = sum_k w[k, b] R~[k, :] / sum_k w[k, b],   w[k, b] = overlap(k, b) * bins
    columns (the segment it draws from) are split:
            R~[k, y] = sum_{c != k} R[k, c] v[c, y] + R[k, k] [y = b],   v[c, y] = overlap(c, y) * K

A step's share on itself stays on the diagonal cell of the row bin (so the grid keeps the
lock-in diagonal and nothing lands above it), shares on other segments are split over the bins
those cover. Every resampled row is still a distribution (it sums to 1). Rows without saliency (e.g. every step's row in the
last layer when the target is the summary, or the summary of a trace without one) are NaN and
are left out of the averages. The aggregate map is the NaN-aware mean over traces of the
resampled maps; the aggregate curves are the per-layer means of the traces' diagnostic curves
with a 95% confidence band (mean +- t * standard error, Student's t with n - 1 degrees of freedom).
The paper's per-layer numbers (FB, AB, FB/AB) are aggregated the same way, layer by layer over
the traces (as the authors average them over samples); their block maps are not, since traces
have different numbers of steps.
"""
from __future__ import annotations

import base64
import datetime
import html
import math
import os

import numpy as np

from .diagnostics import CURVES, PAPER_CURVES, verdicts

# 97.5% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def row_shares(maps) -> np.ndarray:
    """(L, S, S) raw maps of one trace -> row shares R (float64), NaN rows where a row has no saliency."""
    m = np.asarray(maps, dtype=np.float64)
    total = m.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, m / np.where(total > 0, total, 1.0), np.nan)


def grid_labels(bins: int = 10) -> list[str]:
    """Q, the thinking bins by the relative position where they end (10%, 20%, ...), A."""
    return ["Q"] + [f"{round(100 * (b + 1) / bins)}%" for b in range(bins)] + ["A"]


def relative_weights(kinds: list[str], bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(w, v), both (S, bins + 2): w averages rows into cells, v splits columns (see module doc)."""
    s, g = len(kinds), bins + 2
    w, v = np.zeros((s, g)), np.zeros((s, g))
    steps = [i for i, k in enumerate(kinds) if k == "step"]
    n = len(steps)
    for i, kind in enumerate(kinds):
        if kind == "question":
            w[i, 0] = v[i, 0] = 1.0
        elif kind == "summary":
            w[i, g - 1] = v[i, g - 1] = 1.0
    for k, i in enumerate(steps):
        lo, hi = k / n, (k + 1) / n
        for b in range(bins):
            overlap = min(hi, (b + 1) / bins) - max(lo, b / bins)
            if overlap > 1e-12:
                w[i, 1 + b] = overlap * bins
                v[i, 1 + b] = overlap * n
    return w, v


def resample(shares: np.ndarray, kinds: list[str], bins: int = 10) -> np.ndarray:
    """(L, S, S) row shares of one trace (NaN rows allowed) -> (L, G, G) on the relative grid."""
    s = len(kinds)
    shares = np.asarray(shares, dtype=np.float64)[:, :s, :s]
    w, v = relative_weights(kinds, bins)
    defined = ~np.isnan(shares).any(-1)                       # (L, S)
    clean = np.where(defined[..., None], shares, 0.0)
    diag = np.einsum("lss->ls", clean)
    off = clean - np.einsum("ls,st->lst", diag, np.eye(s))
    num = np.einsum("sb,lsc,cy->lby", w, off, v)
    g = w.shape[1]
    num[:, np.arange(g), np.arange(g)] += np.einsum("sb,ls->lb", w, diag)   # self share -> the row bin's diagonal
    den = np.einsum("sb,ls->lb", w, defined.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den[..., None] > 1e-12, num / np.where(den > 1e-12, den, 1.0)[..., None], np.nan)


def mean_band(values) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, L) values with NaN -> per layer (mean, low, high, n): the 95% band of the mean.
    With one value the band is the value itself; with none, NaN."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    n = (~np.isnan(x)).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(x, 0) / np.maximum(n, 1), np.nan)
        dev = np.where(np.isnan(x), 0.0, x - mean) ** 2
        sd = np.sqrt(dev.sum(0) / np.maximum(n - 1, 1))
    half = np.array([t975(int(k) - 1) if k > 1 else 0.0 for k in n]) * sd / np.sqrt(np.maximum(n, 1))
    return mean, mean - half, mean + half, n


def aggregate(items, bins: int = 10, lock_in_margin: float = 0.1, decay_drop: float = 0.25) -> dict:
    """Aggregate over traces. items: (kinds, maps (L, S, S) raw, diagnose report) per trace.

    Returns {"shares": (L, G, G) NaN-aware mean of the resampled row shares, "rows": (L, G) how
    many traces define each row, "labels", "n", "curves": {name: {"mean", "low", "high", "n"}},
    "flags": counts of traces flagged, "verdict": the flags of the mean curves, "paper_curves":
    FB, AB, FB/AB per layer as curves, "paper_means": their means over layers and traces}."""
    if not items:
        raise ValueError("aggregate needs at least one trace")
    stacked = np.stack([resample(row_shares(maps), kinds, bins) for kinds, maps, _ in items])  # (N, L, G, G)
    defined = ~np.isnan(stacked)
    count = defined.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(count > 0, np.nansum(stacked, 0) / np.maximum(count, 1), np.nan)
    curves = {}
    for name in CURVES:
        mean, low, high, n = mean_band([rep[name] for _, _, rep in items])
        curves[name] = {"mean": mean, "low": low, "high": high, "n": n}
    flags = {}
    for key in ("shallow_lock_in", "deep_decay"):
        vals = [rep[key] for _, _, rep in items]
        flags[key] = {"yes": sum(v is True for v in vals), "no": sum(v is False for v in vals),
                      "undefined": sum(v is None for v in vals)}
    verdict = verdicts(curves["lock_in_index"]["mean"], curves["summary_thinking_share"]["mean"],
                       lock_in_margin, decay_drop)
    verdict["thresholds"] = {"lock_in_margin": lock_in_margin, "decay_drop": decay_drop}
    paper_curves, paper_means = {}, {}
    if all(name in rep for _, _, rep in items for name in PAPER_CURVES):
        for name in PAPER_CURVES:
            mean, low, high, n = mean_band([rep[name] for _, _, rep in items])
            paper_curves[name] = {"mean": mean, "low": low, "high": high, "n": n}
            paper_means[name] = float(np.mean([rep[name + "_mean"] for _, _, rep in items]))
    return {"shares": shares, "rows": count[..., 0], "labels": grid_labels(bins), "n": len(items), "bins": bins,
            "curves": curves, "flags": flags, "verdict": verdict, "paper_curves": paper_curves,
            "paper_means": paper_means}


def save_aggregate(path, agg: dict, extra: dict | None = None) -> None:
    """`path` (.safetensors: shares (L, G, G) with NaN where undefined, rows (L, G)) + `path`.json."""
    import torch
    from safetensors.torch import save_file

    from .traces import write_json

    save_file({"shares": torch.from_numpy(np.ascontiguousarray(agg["shares"], dtype=np.float32)),
               "rows": torch.from_numpy(np.ascontiguousarray(agg["rows"], dtype=np.int64))}, str(path))
    info = {k: agg[k] for k in ("labels", "n", "bins", "curves", "flags", "verdict", "paper_curves",
                                "paper_means") if k in agg}
    info.update(extra or {})
    write_json(str(path) + ".json", info)


# --------------------------------------------------------------------------- reports


class Report:
    """A report built from blocks, written as one self-contained HTML file and/or Markdown."""

    def __init__(self, title: str):
        self.title, self.blocks = title, []

    def heading(self, text, level=2):
        self.blocks.append(("h", level, text))

    def text(self, text):
        self.blocks.append(("p", text))

    def pre(self, text):
        self.blocks.append(("pre", text))

    def table(self, header, rows):
        self.blocks.append(("table", list(header), [list(r) for r in rows]))

    def image(self, path, caption=""):
        self.blocks.append(("img", str(path), caption))

    def to_html(self) -> str:
        css = ("body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1700px;"
               "margin:1.5em auto;padding:0 1em;color:#222}table{border-collapse:collapse;font-size:13px;"
               "margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}"
               "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;"
               "border:1px solid #eee}figure{margin:1em 0}figcaption{color:#555;font-size:13px}"
               "pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:12px}.yes{color:#b00;font-weight:600}")
        out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
               f"<title>{html.escape(self.title)}</title><style>{css}</style></head><body>",
               f"<h1>{html.escape(self.title)}</h1>",
               f"<p><small>written {datetime.datetime.now().isoformat(timespec='seconds')}</small></p>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                out.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "pre":
                out.append(f"<pre>{html.escape(block[1])}</pre>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in block[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "img":
                with open(block[1], "rb") as f:
                    data = base64.b64encode(f.read()).decode("ascii")
                out.append(f"<figure><img alt='{html.escape(os.path.basename(block[1]))}' "
                           f"src='data:image/png;base64,{data}'><figcaption>{html.escape(block[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def to_markdown(self, relative_to: str) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out += ["#" * block[1] + " " + block[2], ""]
            elif kind == "p":
                out += [block[1], ""]
            elif kind == "pre":
                out += ["```", block[1], "```", ""]
            elif kind == "table":
                out.append("| " + " | ".join(str(h) for h in block[1]) + " |")
                out.append("|" + "|".join("---" for _ in block[1]) + "|")
                out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in block[2]]
                out.append("")
            elif kind == "img":
                rel = os.path.relpath(block[1], relative_to)
                out += [f"![{block[2]}]({rel})", "", f"*{block[2]}*", ""]
        return "\n".join(out)

    def write(self, directory, name="report") -> tuple[str, str]:
        html_path, md_path = os.path.join(directory, name + ".html"), os.path.join(directory, name + ".md")
        with open(html_path, "w", encoding="utf-8") as f:
            f.write(self.to_html())
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(self.to_markdown(directory))
        return html_path, md_path


def _cell(c) -> str:
    text = str(c)
    cls = " class='yes'" if text.startswith("YES") else ""
    return f"<td{cls}>{html.escape(text)}</td>"


def fmt(x, digits=3) -> str:
    """A number for tables: n/a for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, bool):
        return "YES" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.{digits}f}"


def fmt_sci(x, digits=3) -> str:
    """A small positive number for tables (saliency intensities): 3.21e-06; n/a for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{float(x):.{digits - 1}e}" if x != 0 else "0"


def flag(x) -> str:
    return "undefined" if x is None else ("YES" if x else "no")
