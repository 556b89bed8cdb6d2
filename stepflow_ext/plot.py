"""Pictures of Step-Saliency results (PNG); the drawing machinery is stepflow_ext.plot_core.

- `plot_heatmaps` (plot_core): one panel per layer of a step-to-step map (rows: the segment whose
  saliency is shared out, columns: the segment it draws from; Q, S1..Sk, A), log colour scale of the
  row shares, one shared colour bar, a fixed panel size whatever the number of layers and steps.
- `plot_curves` (plot_core): the diagnostic curves over layers with the windows and thresholds behind
  the verdicts, optional 95% bands, several series (e.g. before / after StepFlow).
- `plot_side_by_side`: before | after | difference for a few chosen layers.
- `plot_paper`: the paper's numbers: final-block intensity FB, analysis-block intensity AB and
  FB/AB over layers (several series, e.g. before / after), and the layer-averaged block map(s)
  (the paper's step matrix, mean over layers) as heatmaps with an absolute log colour scale.
- `plot_result`: heatmaps, curves and the paper's panel of one trace in one figure
  (StepSaliencyResult.plot).
"""
from __future__ import annotations

import numpy as np
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .plot_core import (  # noqa: F401  (re-exported: the pictures' public helpers)
    CURVES_HEIGHT, CURVE_NAMES, DPI, MASK_COLOUR, PANEL, _Canvas, _colorbar, _curves_height, _draw_curves,
    _draw_grid, _grid_size, _panel, _sci, block_norm, cell_edges, diff_norm, pick_ticks, plot_curves,
    plot_heatmaps, segment_labels, share_norm,
)


def pick_layers(num_layers: int, groups=(), most: int = 6) -> list[int]:
    """Up to `most` layers spread over the depth: the first and last layer of each group (e.g. the
    OEB and the SMI layers), then evenly spaced others."""
    chosen = []
    for group in groups:
        group = sorted(group)
        for layer in (group[:1] + group[-1:]) if group else []:
            if layer not in chosen and len(chosen) < most:
                chosen.append(layer)
    for edge in (0, num_layers - 1):
        if not chosen:
            chosen.append(edge)
    while len(chosen) < min(most, num_layers):   # then the layer farthest from those chosen
        chosen.append(max((x for x in range(num_layers) if x not in chosen),
                          key=lambda x: min(abs(x - c) for c in chosen)))
    return sorted(chosen)


def plot_side_by_side(path, before, after, labels, layers, title=None, layer_notes=None):
    """Rows: the chosen layers; columns: before | after | after − before (row shares)."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    n, p, gap_x, gap_y = len(layers), 2.2, 0.15, 0.32
    left, top0, bottom = 0.75, 0.75, 1.35
    width = left + 3 * p + 2 * gap_x + 0.35 + 0.3
    canvas = _Canvas(width + 0.0, top0 + n * p + (n - 1) * gap_y + bottom)
    norm = share_norm([before[layers], after[layers]])
    diff = after[layers] - before[layers]
    dnorm = diff_norm([diff])
    ticks = pick_ticks(labels)
    im = dim = None
    for r, layer in enumerate(layers):
        note = f" ({layer_notes[layer]})" if layer_notes and layer_notes.get(layer) else ""
        for c, (data, is_diff, head) in enumerate(((before[layer], False, "before"),
                                                   (after[layer], False, "after StepFlow"),
                                                   (diff[r], True, "after − before"))):
            x = left + c * (p + gap_x) + (0.35 if c == 2 else 0)
            handle = _panel(canvas, x, top0 + r * (p + gap_y), p, data, labels, ticks, dnorm if is_diff else norm,
                            is_diff,
                            f"layer {layer}{note}: {head}", show_x=r == n - 1, show_y=c in (0, 2))
            if is_diff:
                dim = handle
            else:
                im = handle
    bar_top = top0 + n * p + (n - 1) * gap_y + 0.62
    _colorbar(canvas.fig, im, canvas.rect(left + 0.2, bar_top, 2 * p + gap_x - 0.4, 0.13), False, horizontal=True,
              values=np.concatenate([before[layers].ravel(), after[layers].ravel()]))
    _colorbar(canvas.fig, dim, canvas.rect(left + 2 * (p + gap_x) + 0.35 + 0.1, bar_top, p - 0.2, 0.13), True,
              "after − before, percentage points", horizontal=True, values=diff)
    if title:
        canvas.text(0.15, 0.12, title, fontsize=10, ha="left")
    canvas.text(0.15, 0.38, "rows: query segment · columns: key segment · red: the share grew, blue: it shrank",
                fontsize=7.5, color="#444", ha="left")
    return canvas.save(path)


PAPER_NAMES = {
    "final_block_intensity": "final-block intensity FB\n(summary × summary, block mean)",
    "analysis_block_intensity": "analysis-block intensity AB\n(steps × steps, block mean)",
    "final_heat_anomaly": "FB / AB\n(0 where AB ≤ 1e-10)",
}
PAPER_CURVE_KEYS = tuple(PAPER_NAMES)


def _band(value):
    """(mean, low, high) of a curve given as a list or as {"mean", "low", "high"} (no clipping)."""
    if isinstance(value, dict):
        return tuple(np.asarray(value[k], dtype=float) for k in ("mean", "low", "high"))
    return np.asarray(value, dtype=float), None, None


def _scale_axis(ax, arrays, ratio=False):
    """Log y when the positive values span more than a decade (zeros are then not drawn), else
    linear from 0 with scientific tick labels."""
    values = np.concatenate([np.asarray(a, float).ravel() for a in arrays if a is not None])
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if not ratio and positive.size and positive.max() / positive.min() > 10:
        ax.set_yscale("log")
        return True
    top = float(finite.max()) if finite.size else 1.0
    ax.set_ylim(0, max(top * 1.15, 1.2 if ratio else 1e-30))
    if not ratio:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.yaxis.set_major_formatter(FuncFormatter(_sci))
    return False


def _draw_paper_curves(canvas, left, top, width, height, series, highlight=None):
    """FB, AB and FB/AB over layers in three panels side by side inside the box (left, top, width,
    height), legends below."""
    n = len(_band(series[0]["curves"]["final_block_intensity"])[0])
    xs = np.arange(n)
    gap = 0.6
    ax_w, ax_h = (width - 0.85 - 2 * gap) / 3, height - 1.35
    for k, name in enumerate(PAPER_CURVE_KEYS):
        x0 = left + 0.7 + k * (ax_w + gap)
        y0 = top + 0.45
        ax = canvas.axes(x0, y0, ax_w, ax_h)
        if highlight and len(highlight[0]):
            for i, layer in enumerate(sorted(highlight[0])):
                ax.axvspan(layer - 0.5, layer + 0.5, color="#ffe2b8", lw=0, label=highlight[1] if i == 0 else None)
        arrays = []
        for j, s in enumerate(series):
            mean, low, high = _band(s["curves"][name])
            colour = s.get("colour", f"C{j}")
            style = "--" if s.get("style") == "dashed" else "-"
            ax.plot(xs, mean, style, color=colour, marker="o", ms=2.5, lw=1.4, label=s["label"])
            arrays.append(mean)
            if low is not None and np.isfinite(low).any() and not np.allclose(low, high, equal_nan=True):
                low = np.clip(low, 0, None)   # intensities and their ratio are >= 0
                ax.fill_between(xs, low, high, color=colour, alpha=0.2, lw=0, label=f"{s['label']}: 95% band")
                arrays += [low, high]
        ratio = name == "final_heat_anomaly"
        log = _scale_axis(ax, arrays, ratio=ratio)
        if ratio:
            one = ax.axhline(1.0, color="#888", ls=":", lw=1.1, label="FB = AB")
        if not any(np.nanmax(np.abs(a)) > 0 for a in arrays if np.isfinite(a).any()):
            what = {"final_block_intensity": "no summary segment: FB = 0",
                    "analysis_block_intensity": "no thinking step: AB = 0",
                    "final_heat_anomaly": "AB ≤ 1e-10: FB/AB = 0"}[name]
            ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="#777")
        ax.set_title(PAPER_NAMES[name] + (" · log scale" if log else ""), fontsize=8.5, pad=3)
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_xlabel("layer", fontsize=8, labelpad=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25, which="both" if log else "major")
        handles, labels = ax.get_legend_handles_labels()
        if len(series) == 1 and not highlight:   # one series needs no legend but the FB = AB line
            if ratio:
                ax.legend([one], ["FB = AB"], fontsize=6.5, loc="upper right", frameon=False)
        elif handles:
            ax.legend(handles, labels, fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                      ncol=min(3, len(handles)), frameon=False, columnspacing=1.0, handlelength=1.8)


def _draw_block_maps(canvas, left, top, maps, labels, titles, size=3.6, norm=None):
    """Layer-averaged block maps side by side (shared absolute log scale, colour bar at the right)."""
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    norm = norm or block_norm(maps)
    ticks = pick_ticks(labels, max_ticks=14)
    image = None
    gap = 0.45
    for i, (m, title) in enumerate(zip(maps, titles)):
        image = _panel(canvas, left + i * (size + gap), top, size, m, labels, ticks, norm, False, title,
                       show_x=True, show_y=i == 0)
    right = left + len(maps) * size + (len(maps) - 1) * gap
    _colorbar(canvas.fig, image, canvas.rect(right + 0.2, top + 0.1 * size, 0.16, 0.8 * size), False,
              "block mean of the saliency (log)", values=np.concatenate([m.ravel() for m in maps]), absolute=True)
    return right + 1.3


def _paper_layout(n_maps: int, width: float | None = None) -> tuple[float, float, float, float, bool]:
    """(width, height, map size, width of the maps' block, curves below the maps?) of the paper
    section: the maps on the left and the three curves right of them when `width` leaves 9 inches
    for them, else the curves in a row below the maps."""
    curves_h = 3.5
    if not n_maps:
        return (width or 13.0), curves_h, 0.0, 0.0, True
    size = 3.6 if n_maps <= 1 else 3.2
    maps_w = 0.6 + n_maps * size + (n_maps - 1) * 0.45 + 1.3
    if width is not None and width - maps_w >= 9.0:
        return width, max(size + 1.5, curves_h + 0.5), size, maps_w, False
    return max(width or 0.0, maps_w, 12.0), 0.75 + size + 0.75 + curves_h, size, maps_w, True


def _draw_paper(canvas, top, series, maps=None, labels=None, map_titles=None, highlight=None, width=None):
    """The paper section with its top edge at `top` inches; returns the height used."""
    width, height, size, maps_w, below = _paper_layout(len(maps) if maps else 0, width)
    if maps:
        canvas.text(0.15, top + 0.12, "the paper's numbers, from the block view M[a,c] / (|a| |c|): the "
                    "layer-averaged step matrix (rows: query segment, columns: key segment; grey: the empty future), "
                    "and FB, AB and FB/AB per layer", fontsize=7.5, color="#444", ha="left")
        _draw_block_maps(canvas, 0.6, top + 0.75, maps, labels, map_titles or [""] * len(maps), size=size)
        if below:
            _draw_paper_curves(canvas, 0.0, top + 0.75 + size + 0.75, width, height - size - 1.5, series, highlight)
        else:
            _draw_paper_curves(canvas, maps_w, top + 0.45, width - maps_w, height - 0.45, series, highlight)
    else:
        _draw_paper_curves(canvas, 0.0, top, width, height, series, highlight)
    return height


def plot_paper(path, series, maps=None, labels=None, map_titles=None, title=None, text=None, highlight=None):
    """The paper's per-layer numbers and maps (design.md 2.2) as one PNG.

    series: list of {"label", "curves": {final_block_intensity, analysis_block_intensity,
        final_heat_anomaly: list | {"mean", "low", "high"}}, optional "style", "colour"}.
    maps: optional list of layer-averaged block maps (S, S) (e.g. [before, after]) with the segment
        `labels` and `map_titles`; drawn left of the curves, one shared colour scale.
    highlight: (layers, label) to shade on the curves (e.g. the StepFlow layers)."""
    lines = ([title] if title else []) + ([text] if text else [])
    head = 0.2 + 0.17 * sum(x.count("\n") + 1 for x in lines) if lines else 0.0
    n_maps = len(maps) if maps else 0
    width = max(13.0, _paper_layout(n_maps)[3] + 9.0) if n_maps == 1 else None
    width, height, _, _, _ = _paper_layout(n_maps, width)
    canvas = _Canvas(width, head + height)
    _draw_paper(canvas, head, series, maps, labels, map_titles, highlight, width=width)
    if lines:
        canvas.text(0.15, 0.1, "\n".join(lines), fontsize=8.5, family="monospace", ha="left")
    return canvas.save(path)


def paper_text(report: dict) -> str:
    """One line with the paper's numbers of a diagnose() report (means over layers)."""
    from .report import fmt_sci

    return (f"paper (block view), mean over layers: FB {fmt_sci(report['final_block_intensity_mean'])} · "
            f"AB {fmt_sci(report['analysis_block_intensity_mean'])} · FB/AB {report['final_heat_anomaly_mean']:.3f}")


def result_shares(result, row: int = 0) -> np.ndarray:
    """Row shares (L, S, S) of one trace with NaN rows where a row has no saliency."""
    s = len(result.kinds[row])
    maps = result.maps[row, :, :s, :s].double().numpy()
    total = maps.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, maps / np.where(total > 0, total, 1.0), np.nan)


def trace_title(result, row: int = 0, name: str | None = None) -> str:
    kinds, meta = result.kinds[row], result.meta
    parts = [name or meta.get("name") or f"trace {row}"]
    if meta.get("model"):
        parts.append(str(meta["model"]))
    if meta.get("preset"):
        parts.append(f"preset {meta['preset']}")
    else:
        parts.append(f"target {meta.get('target', '?')}")
    if meta.get("num_tokens"):
        parts.append(f"{meta['num_tokens']} tokens")
    summaries = kinds.count("summary")
    parts.append(f"{kinds.count('step')} steps" + (", no summary" if not summaries else ", summary" if summaries == 1
                                                   else f", {summaries} summary segments"))
    if meta.get("stepflow"):
        parts.append("under StepFlow")
    return " · ".join(parts)


def plot_result(result, path, row: int = 0):
    """One heatmap panel per layer (row shares, log colour scale), the diagnostic curves below, and
    the paper's section: the layer-averaged block map and FB, AB, FB/AB over layers."""
    from .diagnostics import verdict_text

    kinds = result.kinds[row]
    shares = result_shares(result, row)
    diag = result.diagnose()[row]
    grid_w, grid_h = _grid_size(shares.shape[0])
    width = max(grid_w, 11.0)
    width, paper_h = _paper_layout(1, width)[:2]
    text = "\n".join(verdict_text(diag) + (paper_text(diag),))
    canvas = _Canvas(width, grid_h + _curves_height(text) + paper_h)
    labels = segment_labels(kinds)
    used = _draw_grid(canvas, 0.0, shares, labels, title="Step-Saliency: " + trace_title(result, row))
    used += _draw_curves(canvas, used, width, [{"label": "this trace", "curves": diag}], diag.get("thresholds"),
                         text=text)
    _draw_paper(canvas, used, [{"label": "this trace", "curves": diag}], [np.asarray(diag["block_map_layer_mean"])],
                labels, ["mean over layers"], width=width)
    return canvas.save(path)
