"""The drawing machinery of the Step-Saliency pictures (PNG); stepflow_ext.plot builds the pictures.

- `plot_heatmaps`: one panel per layer of a step-to-step map (rows: the segment whose saliency
  is shared out, columns: the segment it draws from; Q, S1..Sk, A), log colour scale of the row
  shares, one shared colour bar, a fixed panel size whatever the number of layers and steps,
  tick labels thinned to a readable few, segment boundaries marked.
- `plot_curves`: the diagnostic curves over layers (lock-in index, summary thinking share,
  summary recent share) with the windows and thresholds behind the verdicts, optional 95%
  bands, and several series (e.g. before / after StepFlow).

Layouts are computed in inches (fixed panel size, labels only on the outer panels): a grid of
28 panels draws in about a second, where matplotlib's constrained layout takes tens of seconds.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

PANEL = 1.9          # inches per heatmap panel, whatever the number of steps
DPI = 120
MASK_COLOUR = "#d4d4d4"   # undefined cells and the (empty) future above the diagonal
CURVE_NAMES = {
    "lock_in_index": "lock-in index LI\n(a step's share on itself)",
    "summary_thinking_share": "summary thinking share TS\n(summary → all steps)",
    "summary_recent_share": "summary recent share RS\n(summary → itself + last {w} steps)",
}
CURVES_HEIGHT = 4.1   # inches of a row of curves (axes, titles, legends below)


def segment_labels(kinds: list[str]) -> list[str]:
    """Q, S1..Sk, A: short labels for the question, the thinking steps and the summary (A1..Am
    when the summary is split into several segments)."""
    labels, step = [], 0
    summaries = kinds.count("summary")
    for kind in kinds:
        if kind == "question":
            labels.append("Q")
        elif kind == "step":
            step += 1
            labels.append(f"S{step}")
        else:
            labels.append("A" if summaries == 1 else f"A{sum(1 for x in labels if x.startswith('A')) + 1}")
    return labels


def _is_end(label: str) -> bool:
    """The question or a summary segment (labels Q, A, A1, A2, ...), as opposed to a step or a bin."""
    return label == "Q" or label == "A" or (label[:1] == "A" and label[1:].isdigit())


def _is_summary(label: str) -> bool:
    return label != "Q" and _is_end(label)


def pick_ticks(labels: list[str], max_ticks: int = 12) -> list[int]:
    """Indices to label: the ends (Q, A) always, the middle at a round stride (1, 2, 5, 10, ...)
    so that at most `max_ticks` labels show; middle labels too close to an end are dropped."""
    s = len(labels)
    ends = sorted({i for i in (0, s - 1) if _is_end(labels[i])})
    middle = [i for i in range(s) if i not in ends]
    if not middle:
        return ends
    budget = max(1, max_ticks - len(ends))
    stride = next(m * 10 ** e for e in range(7) for m in (1, 2, 5) if math.ceil(len(middle) / (m * 10 ** e)) <= budget)
    gap = max(1, s / 16)
    picked = [i for i in middle if (stride == 1 or i % stride == 0) and all(abs(i - j) >= gap for j in ends)]
    return sorted(set(ends + picked))


def _grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols): up to 8 columns, few empty slots (28 layers -> 4 x 7, 32 -> 4 x 8, 36 -> 6 x 6)."""
    if n <= 8:
        return 1, n
    best = min(range(5, 9), key=lambda c: (math.ceil(n / c) * c - n, -c))
    return math.ceil(n / best), best


def _nice(x: float, up: bool) -> float:
    """The next value of the 1-2-5 sequence above (up) or below x."""
    steps = [m * 10.0 ** e for e in range(-7, 1) for m in (1, 2, 5)]
    return min((v for v in steps if v >= x), default=1.0) if up else max((v for v in steps if v <= x), default=1e-7)


def _nice_any(x: float, up: bool) -> float:
    """The next value of the 1-2-5 sequence above (up) or below x, any magnitude (x > 0)."""
    e = math.floor(math.log10(x))
    steps = [m * 10.0 ** k for k in (e - 1, e, e + 1) for m in (1, 2, 5)]
    return min(v for v in steps if v >= x * (1 - 1e-12)) if up else max(v for v in steps if v <= x * (1 + 1e-12))


def block_norm(arrays) -> LogNorm:
    """Log scale for block maps (absolute saliency, any magnitude): from the 2nd percentile of the
    positive values to their maximum, widened to the 1-2-5 sequence and to at least one decade."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    positive = values[np.isfinite(values) & (values > 0)]
    if not positive.size:
        return LogNorm(vmin=1e-9, vmax=1e-8)
    low, high = float(np.percentile(positive, 2)), float(positive.max())
    vmax = _nice_any(high, up=True)
    vmin = min(_nice_any(low, up=False), vmax / 10)
    return LogNorm(vmin=vmin, vmax=vmax)


def share_norm(arrays) -> LogNorm:
    """Log scale over the bulk of the shares: from the 1st to the 99.5th percentile of the shares in
    (0, 1), widened to the 1-2-5 sequence and to at least one decade. Shares of exactly 100% (the
    question on itself) are left out of the percentiles; values outside the range saturate."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    inner = values[np.isfinite(values) & (values > 0) & (values < 1 - 1e-9)]
    if not inner.size:
        return LogNorm(vmin=1e-3, vmax=1.0)
    low, high = np.percentile(inner, [1, 99.5])
    vmax = min(1.0, _nice(max(high, 1e-6), up=True))
    vmin = min(_nice(max(low, 1e-6), up=False), vmax / 10)
    return LogNorm(vmin=vmin, vmax=vmax)


def diff_norm(arrays) -> Normalize:
    """Linear, symmetric scale for differences of shares, up to the 99th percentile of |change|
    (rounded up on the 1-2-5 sequence); larger changes saturate (arrows on the colour bar)."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    finite = np.abs(values[np.isfinite(values)])
    top = _nice(float(np.percentile(finite, 99)), up=True) if finite.size and finite.max() > 0 else 1e-3
    return Normalize(vmin=-top, vmax=top)


def _percent(x, _pos=None) -> str:
    p = 100 * x
    if p == 0:
        return "0"
    return f"{p:g}%" if abs(p) >= 1 else f"{p:.2g}%"


def _sci(x, _pos=None) -> str:
    """Small absolute values: 2e-05, 1.5e-06."""
    if x == 0:
        return "0"
    return f"{x:.1g}" if f"{x:.1g}" == f"{x:.2g}" else f"{x:.2g}"


def _points(x, _pos=None) -> str:
    """Differences of shares in percentage points."""
    p = 100 * x
    if p == 0:
        return "0"
    text = f"{abs(p):g}" if abs(p) >= 1 else f"{abs(p):.2g}"
    return ("+" if p > 0 else "−") + text


def _prepare(data: np.ndarray, norm, diff: bool) -> np.ndarray:
    """Mask undefined (NaN) cells and the structural zeros above the diagonal; zeros elsewhere
    show as the scale's lowest colour."""
    s = data.shape[-1]
    upper = np.triu(np.ones((s, s), dtype=bool), 1)
    mask = ~np.isfinite(data) | (upper & (data == 0))
    if not diff:
        data = np.where(np.isfinite(data) & (data <= 0), norm.vmin * 0.5, data)
    return np.ma.masked_where(mask, data)


def _cmap(diff: bool):
    if diff:
        return plt.get_cmap("RdBu_r").with_extremes(bad=MASK_COLOUR)
    cmap = plt.get_cmap("magma")
    return cmap.with_extremes(bad=MASK_COLOUR, under=cmap(0.0), over=cmap(1.0))


def _colorbar(fig, image, rect, diff: bool, label=None, horizontal=False, values=None, absolute=False):
    cax = fig.add_axes(rect)
    # arrows where values run past the ends of the scale
    values = np.ma.compressed(image.get_array()) if values is None else np.asarray(values, float).ravel()
    values = values[np.isfinite(values) & ((values > 0) | diff)]
    below = bool((values < image.norm.vmin * (1 + 1e-9 if diff else 1)).any())
    above = bool((values > image.norm.vmax * (1 + 1e-9)).any())
    extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")
    cbar = fig.colorbar(image, cax=cax, orientation="horizontal" if horizontal else "vertical", extend=extend)
    norm = image.norm
    if diff:
        top = norm.vmax
        cbar.set_ticks([-top, -top / 2, 0.0, top / 2, top])
        cbar.formatter = FuncFormatter(_points)
    elif absolute:
        decades = math.log10(norm.vmax / norm.vmin)
        cbar.locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,))
        cbar.formatter = FuncFormatter(_sci)
        cbar.ax.yaxis.set_minor_formatter(NullFormatter())
        cbar.ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        decades = math.log10(norm.vmax / norm.vmin)
        cbar.locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,))
        cbar.formatter = FuncFormatter(_percent)
    cbar.update_ticks()
    cbar.ax.tick_params(labelsize=7)
    cbar.set_label(label or ("after − before, percentage points" if diff
                             else "share of the row's saliency (log)"), fontsize=8)
    return cbar


def _boundaries(labels):
    """Positions between Q and the steps and between the steps and A."""
    return [i + 0.5 for i in range(len(labels) - 1)
            if (labels[i] == "Q") != (labels[i + 1] == "Q") or _is_summary(labels[i]) != _is_summary(labels[i + 1])]


def cell_edges(labels) -> np.ndarray:
    """Cell edges in [0, 1] along a map's axis. With many steps the question and the summary get
    wider cells (1/8 of the step count each) so that the A row and the Q column stay visible;
    the steps share the rest equally. A cell's width is not its size in tokens."""
    steps = sum(1 for x in labels if not _is_end(x))
    summaries = sum(1 for x in labels if _is_summary(x))
    big = max(1, round(steps / 8))
    widths = np.array([big if x == "Q" else max(1.0, big / max(summaries, 1)) if _is_summary(x) else 1
                       for x in labels], dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(widths)]) / widths.sum()


def _panel(canvas, left, top, size, data, labels, ticks, norm, diff, title, show_x, show_y):
    """One heatmap drawn on the canvas's board at (left, top) inches, `size` inches square. All
    panels share one full-figure axes: a grid of 28 panels costs one axes, not 28."""
    board = canvas.board()
    edges = cell_edges(labels) * size
    centres = (edges[:-1] + edges[1:]) / 2
    image = board.pcolormesh(left + edges, top + edges, _prepare(data, norm, diff), cmap=_cmap(diff), norm=norm,
                             shading="flat", rasterized=True)
    bounds = [edges[int(b + 0.5)] for b in _boundaries(labels)]
    lines = [[(left + x, top), (left + x, top + size)] for x in bounds]
    lines += [[(left, top + y), (left + size, top + y)] for y in bounds]
    colours = ["#555555" if diff else "white"] * len(lines)
    tick = 0.04
    if show_x:
        lines += [[(left + centres[i], top + size), (left + centres[i], top + size + tick)] for i in ticks]
        for i in ticks:
            board.text(left + centres[i], top + size + tick + 0.02, labels[i], rotation=90, ha="center", va="top",
                       fontsize=6)
    if show_y:
        lines += [[(left - tick, top + centres[i]), (left, top + centres[i])] for i in ticks]
        for i in ticks:
            board.text(left - tick - 0.02, top + centres[i], labels[i], ha="right", va="center", fontsize=6)
    colours += ["black"] * (len(lines) - len(colours))
    board.add_collection(LineCollection(lines, colors=colours, linewidths=0.6, alpha=0.8))
    board.add_patch(Rectangle((left, top), size, size, fill=False, lw=0.8, edgecolor="black"))
    board.text(left + size / 2, top - 0.03, title, ha="center", va="bottom", fontsize=8)
    return image


class _Canvas:
    """A figure laid out in inches from the top-left corner."""

    def __init__(self, width, height):
        self.w, self.h = width, height
        self.fig = plt.figure(figsize=(width, height))
        self._board = None

    def board(self):
        """A full-figure axes in inch coordinates (y down) for the heatmap panels and their labels."""
        if self._board is None:
            ax = self.fig.add_axes((0, 0, 1, 1))
            ax.set_xlim(0, self.w)
            ax.set_ylim(self.h, 0)
            ax.set_axis_off()
            self._board = ax
        return self._board

    def axes(self, left, top, width, height):
        return self.fig.add_axes((left / self.w, 1 - (top + height) / self.h, width / self.w, height / self.h))

    def rect(self, left, top, width, height):
        return (left / self.w, 1 - (top + height) / self.h, width / self.w, height / self.h)

    def text(self, left, top, text, **kw):
        self.fig.text(left / self.w, 1 - top / self.h, text, va="top", **kw)

    def save(self, path):
        self.fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": 3})   # level 6 costs twice the time
        plt.close(self.fig)
        return str(path)


# Heatmap grid geometry (inches).
_LEFT, _GAP_X, _GAP_Y, _TITLE, _BOTTOM, _CBAR = 0.75, 0.12, 0.30, 0.65, 0.6, 1.3


def _grid_size(layers: int) -> tuple[float, float]:
    rows, cols = _grid_shape(layers)
    return (_LEFT + cols * PANEL + (cols - 1) * _GAP_X + _CBAR,
            _TITLE + rows * PANEL + (rows - 1) * _GAP_Y + _BOTTOM)


def _draw_grid(canvas, top, data, labels, layer_names=None, norm=None, diff=False, title=None, cbar_label=None):
    """Draw (L, S, S) maps with their top edge at `top` inches; returns the height used."""
    data = np.asarray(data, dtype=np.float64)
    layers = data.shape[0]
    rows, cols = _grid_shape(layers)
    width, height = _grid_size(layers)
    if norm is None:
        norm = diff_norm([data]) if diff else share_norm([data])
    ticks = pick_ticks(labels)
    image = None
    for idx in range(layers):
        r, c = divmod(idx, cols)
        image = _panel(canvas, _LEFT + c * (PANEL + _GAP_X), top + _TITLE + r * (PANEL + _GAP_Y), PANEL,
                       data[idx], labels, ticks, norm, diff,
                       layer_names[idx] if layer_names else f"layer {idx}",
                       show_x=idx + cols >= layers, show_y=c == 0)
    grid_w = cols * PANEL + (cols - 1) * _GAP_X
    grid_h = rows * PANEL + (rows - 1) * _GAP_Y
    cbar_h = min(grid_h, max(2.5, 0.8 * grid_h))
    _colorbar(canvas.fig, image, canvas.rect(_LEFT + grid_w + 0.2, top + _TITLE + (grid_h - cbar_h) / 2, 0.16, cbar_h),
              diff, cbar_label, values=data)
    if title:
        canvas.text(0.15, top + 0.12, title, fontsize=10, ha="left")
    canvas.text(0.15, top + 0.36, "rows: the segment whose saliency is shared out (query) · columns: the segment it "
                "draws from (key) · grey: undefined or the empty future", fontsize=7.5, color="#444", ha="left")
    return height


def plot_heatmaps(path, data, labels, title=None, diff=False, norm=None, layer_names=None):
    """One panel per layer of `data` (L, S, S): row shares (log scale) or differences (diff=True)."""
    data = np.asarray(data, dtype=np.float64)
    canvas = _Canvas(*_grid_size(data.shape[0]))
    _draw_grid(canvas, 0.0, data, labels, layer_names=layer_names, norm=norm, diff=diff, title=title)
    return canvas.save(path)


def _as_band(value):
    if isinstance(value, dict):
        return (np.asarray(value["mean"], float), np.clip(np.asarray(value["low"], float), 0, 1),
                np.clip(np.asarray(value["high"], float), 0, 1))
    return np.asarray(value, dtype=float), None, None


def _draw_curves(canvas, top, width, series, thresholds=None, highlight=None, text=None):
    """Three panels (LI, TS, RS) over layers with their top edge at `top` inches."""
    from .diagnostics import layer_windows

    thresholds = thresholds or {"lock_in_margin": 0.1, "decay_drop": 0.25}
    drop = thresholds.get("decay_drop", 0.25)
    text_h = 0.0
    if text:
        canvas.text(0.15, top + 0.1, text, fontsize=8.5, family="monospace", ha="left")
        text_h = 0.2 + 0.16 * (text.count("\n") + 1)
    first = series[0]["curves"]
    owner = f" ({series[0]['label']})" if len(series) > 1 else ""
    n = len(_as_band(first["lock_in_index"])[0])
    xs = np.arange(n)
    shallow, middle, deep = layer_windows(n)
    left, gap, ax_h = 0.6, 0.55, 2.3
    ax_w = (width - left - 0.25 - 2 * gap) / 3
    for k, name in enumerate(("lock_in_index", "summary_thinking_share", "summary_recent_share")):
        ax = canvas.axes(left + k * (ax_w + gap), top + text_h + 0.6, ax_w, ax_h)
        if highlight and name in highlight and len(highlight[name][0]):
            layers, label = highlight[name]
            for i, layer in enumerate(sorted(layers)):
                ax.axvspan(layer - 0.5, layer + 0.5, color="#ffe2b8", lw=0, label=label if i == 0 else None)
        mean0 = _as_band(first[name])[0]
        if name == "lock_in_index":
            for window, word in ((shallow, "shallow"), (middle, "middle")):
                vals = mean0[window.start:window.stop]
                if np.isfinite(vals).any():
                    ax.hlines(np.nanmean(vals), window.start - 0.5, window.stop - 0.5, colors="black", lw=2.2,
                              alpha=0.75, label=f"window means{owner}" if word == "shallow" else None)
            marks = (shallow, middle)
        elif name == "summary_thinking_share":
            if np.isfinite(mean0).any():
                ax.axhline((1 - drop) * np.nanmax(mean0), color="#b22222", ls=":", lw=1.3,
                           label=f"{1 - drop:g} × peak (decay bar){owner}")
                vals = mean0[deep.start:deep.stop]
                if np.isfinite(vals).any():
                    ax.hlines(np.nanmean(vals), deep.start - 0.5, deep.stop - 0.5, colors="black", lw=2.2,
                              alpha=0.75, label=f"deep-third mean{owner}")
            marks = (deep,)
        else:
            marks = ()
        for window in marks:
            word = "shallow" if window is shallow else "middle" if window is middle else "deep"
            for edge in (window.start - 0.5, window.stop - 0.5):
                if -0.5 < edge < n - 0.5:
                    ax.axvline(edge, color="#888", ls="--", lw=0.8)
            ax.text((window.start + window.stop - 1) / 2, 0.02, word + " third", ha="center", va="bottom",
                    fontsize=7, color="#555", transform=ax.get_xaxis_transform())
        for j, s in enumerate(series):
            mean, low, high = _as_band(s["curves"][name])
            colour = s.get("colour", f"C{j}")
            style = "--" if s.get("style") == "dashed" else "-"
            ax.plot(xs, mean, style, color=colour, marker="o", ms=2.5, lw=1.4, label=s["label"])
            if low is not None and np.isfinite(low).any() and not np.allclose(low, high, equal_nan=True):
                ax.fill_between(xs, low, high, color=colour, alpha=0.2, lw=0, label=f"{s['label']}: 95% band")
        if not any(np.isfinite(_as_band(s["curves"][name])[0]).any() for s in series):
            ax.text(0.5, 0.5, "undefined\n(no such segments, or no saliency)", transform=ax.transAxes, ha="center",
                    va="center", fontsize=8, color="#777")
        ax.set_title(CURVE_NAMES[name].format(w=thresholds.get("recent_window", 2)), fontsize=8.5, pad=3)
        # Shares live in [0, 1]; zoom in when the curves stay low so that small changes show.
        tops = [np.nanmax(b) for s in series for b in _as_band(s["curves"][name]) if b is not None
                and np.isfinite(b).any()]
        ax.set_ylim(0, min(1.0, max(0.1, 1.2 * max(tops, default=1.0))) * 1.04)
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_xlabel("layer", fontsize=8, labelpad=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, labels, fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                      ncol=2 if len(handles) <= 6 else 3, frameon=False, columnspacing=1.0, handlelength=1.8)
    return _curves_height(text)


def _curves_height(text):
    return (0.2 + 0.16 * (text.count("\n") + 1) if text else 0.0) + 0.6 + 2.3 + 1.1


def plot_curves(path, series, title=None, verdict_lines=(), thresholds=None, highlight=None, width=13.0):
    """The diagnostic curves as a PNG (three panels: LI, TS, RS over layers).

    series: list of {"label", "curves": {name: list | {"mean", "low", "high"}}, optional "style"
        ("dashed"), "colour"}; the windows and bars of the verdicts are drawn from the first one.
    highlight: {"lock_in_index": (layers, label), "summary_thinking_share": (layers, label)}: layers
        to shade (e.g. the OEB and SMI layers of a StepFlow config)."""
    series = series if isinstance(series, list) else [series]
    text = "\n".join(([title] if title else []) + list(verdict_lines)) or None
    canvas = _Canvas(width, _curves_height(text))
    _draw_curves(canvas, 0.0, width, series, thresholds, highlight, text)
    return canvas.save(path)
