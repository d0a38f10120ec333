"""The report's figures: matplotlib, drawn off-screen to PNG bytes (no pyplot state, no display).

Every figure follows the same rules, checked by rendering the page in Chromium:
* every axis has a label naming the quantity and its unit;
* legends sit outside the plotting area (beside or above it), never over data;
* rank and layer axes carry integer ticks only;
* a group without data (e.g. the "low"/"mid" depth groups of a 2-layer model) is not drawn.

matplotlib is an optional dependency (the `eval` extra) and takes seconds to import: it is imported
inside the functions that draw, so importing prinmix (or its API) does not pay for it.
"""

from __future__ import annotations

import io
import math

import numpy as np

from .statistics import FLOAT_BITS, MatrixStats

__all__ = ["fig_width_heatmaps", "fig_memory_per_width", "fig_rank_bytes", "fig_kendall", "fig_scaling_difference",
           "fig_eval_errors", "projection_types", "width_label", "width_colour", "width_colour_map", "depth_groups_with_data"]

TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LABEL_SIZE = 9
TICK_SIZE = 8


def projection_types(stats) -> list[str]:
    """Projection types present, in the usual decoder order (q k v o gate up down), others after by name."""
    present = {s.type for s in stats}
    return [t for t in TYPE_ORDER if t in present] + sorted(present - set(TYPE_ORDER))


def width_label(w: int, sign: bool = False) -> str:
    if w == 0:
        return "0 (dropped)"
    if w == FLOAT_BITS:
        return "fp16"
    if w == 1 and sign:
        return "sign (1 bit)"
    return f"{w} bit"


def _figure(w, h):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _integer_axis(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _style(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)


def width_colour(w: int):
    """The colour of width W in every figure of the report (the same width, the same colour): light grey for 0
    (dropped), black for fp16, and a fixed place on the high-contrast "turbo" map per quantised width 1..8
    (2 bit blue, 3 cyan, 4 green, 5 yellow-green, … 8 red). Spreading a map over the widths one figure happens
    to show gave a 3-bit rank two colours on one page; a fixed "viridis" place made 2/3/4 bit hard to tell apart."""
    from matplotlib import colormaps

    if w == 0:
        return "#e6e6e6"
    if w == FLOAT_BITS:
        return "#1a1a1a"
    return colormaps["turbo"](0.08 + 0.84 * (min(max(w, 1), 8) - 1) / 7)


def width_colour_map(widths: list[int]):
    """ListedColormap with one entry per width of WIDTHS (width_colour each); NaN (no rank) is white."""
    from matplotlib.colors import ListedColormap

    return ListedColormap([width_colour(b) for b in widths]).with_extremes(bad="white")


def _panel_grid(n: int, w: float, h: float, extra_h: float = 0.6):
    ncol = 2 if n > 1 else 1
    nrow = math.ceil(n / ncol)
    fig = _figure(w * ncol, h * nrow + extra_h)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for k in range(n, nrow * ncol):
        axes[k // ncol][k % ncol].set_visible(False)
    return fig, [axes[k // ncol][k % ncol] for k in range(n)]


def fig_width_heatmaps(stats: list[MatrixStats], true_svd: bool) -> bytes | None:
    """Per projection type: layers × rank index image of the width of each rank (Fig. 4 / C.7)."""
    ranked = [s for s in stats if s.layer is not None and s.widths_by_index]
    if not ranked:
        return None
    types = projection_types(ranked)
    layers = sorted({s.layer for s in ranked})
    widths = sorted({w for s in ranked for w in s.widths_by_index})  # 0 only where dropped ranks are shown
    cmap = width_colour_map(widths)
    fig, axes = _panel_grid(len(types), 6.2, 2.6)
    im = None
    for ax, t in zip(axes, types):
        sel = {s.layer: s for s in ranked if s.type == t}
        last = max((max((i for i, w in enumerate(s.widths_by_index) if w), default=0) for s in sel.values()),
                   default=0)  # the widest kept rank index: the dropped tail beyond it is cut off
        ncols = max(1, min(max(len(s.widths_by_index) for s in sel.values()), int(last * 1.05) + 2))
        img = np.full((len(layers), ncols), np.nan)
        for r, layer in enumerate(layers):
            if layer in sel:
                row = [widths.index(w) for w in sel[layer].widths_by_index[:ncols]]
                img[r, :len(row)] = row
        im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(widths) - 0.5,
                       origin="lower", extent=(-0.5, ncols - 0.5, -0.5, len(layers) - 0.5))
        ax.set_title(f"{t}: width per rank", fontsize=10)
        _style(ax, "original rank index (σ descending)" if true_svd else "kept rank, by stored σ (descending)",
               "layer")
        step = next(k for k in (1, 2, 5, 10, 20, 50, 100, 10**9) if len(layers) <= 8 * k)  # evenly spaced
        ticks = range(0, len(layers), step)
        ax.set_yticks(ticks, [str(layers[i]) for i in ticks])
        _integer_axis(ax.xaxis)
    cb = fig.colorbar(im, ax=axes, ticks=range(len(widths)), shrink=0.8, pad=0.01)
    cb.ax.set_yticklabels([width_label(w) for w in widths], fontsize=TICK_SIZE)
    cb.set_label("bit width of the rank", fontsize=LABEL_SIZE)
    return _png(fig)


def fig_memory_per_width(stats: list[MatrixStats]) -> bytes | None:
    """Per projection type: stacked bytes per width across layers (the paper's Fig. 4)."""
    from matplotlib.patches import Patch

    ranked = [s for s in stats if s.layer is not None]
    if not ranked:
        return None
    types = projection_types(ranked)
    layers = sorted({s.layer for s in ranked})
    widths = sorted({w for s in ranked for w in s.bytes_per_width})
    fig, axes = _panel_grid(len(types), 6.2, 2.4, 0.5)
    for ax, t in zip(axes, types):
        sel = {s.layer: s for s in ranked if s.type == t}
        bottom = np.zeros(len(layers))
        for w in sorted(widths, reverse=True):
            vals = np.array([sel[layer].bytes_per_width.get(w, 0) / 1024 if layer in sel else 0 for layer in layers])
            if vals.any():
                ax.bar(layers, vals, bottom=bottom, color=width_colour(w), width=0.85)
                bottom += vals
        ax.set_title(f"{t}: bytes per width", fontsize=10)
        _style(ax, "layer", "stored KiB")
        _integer_axis(ax.xaxis)
    sign = any(s.sign for s in ranked)
    handles = [Patch(color=width_colour(w), label=width_label(w, sign)) for w in sorted(widths, reverse=True)]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=TICK_SIZE)
    return _png(fig)


def fig_rank_bytes(stats: list[MatrixStats]) -> bytes | None:
    """Kept rank per layer (one line per type) and bytes per layer (stacked by type); one legend beside both."""
    from matplotlib import colormaps

    ranked = [s for s in stats if s.layer is not None]
    if not ranked:
        return None
    types = projection_types(ranked)
    layers = sorted({s.layer for s in ranked})
    fig = _figure(12, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    tab = colormaps["tab10"]
    bottom = np.zeros(len(layers))
    for k, t in enumerate(types):
        sel = {s.layer: s for s in ranked if s.type == t}
        ax1.plot(layers, [sel[layer].kept_rank if layer in sel and not sel[layer].sign else np.nan
                          for layer in layers], marker="o", ms=3, color=tab(k % 10))
        vals = np.array([sel[layer].nbytes / 1024 if layer in sel else 0 for layer in layers])
        ax2.bar(layers, vals, bottom=bottom, label=t, color=tab(k % 10), width=0.85)
        bottom += vals
    if all(s.sign for s in ranked):
        ax1.text(0.5, 0.5, "sign matrices (BitDelta): no ranks", ha="center", va="center", fontsize=LABEL_SIZE,
                 transform=ax1.transAxes)
    ax1.set_title("kept rank per layer", fontsize=10)
    _style(ax1, "layer", "ranks stored (width > 0)")
    _integer_axis(ax1.yaxis)
    ax2.set_title("stored bytes per layer", fontsize=10)
    _style(ax2, "layer", "stored KiB")
    for ax in (ax1, ax2):
        _integer_axis(ax.xaxis)
    fig.legend(title="projection", loc="outside right upper", fontsize=TICK_SIZE, title_fontsize=TICK_SIZE)
    return _png(fig)


def fig_kendall(stats: list[MatrixStats]) -> bytes | None:
    """Heat map of Kendall τ-b (widths vs σ) over layers (rows) × projection types (columns), each cell labelled.

    Layers run down the rows, as in the width heat map, so a deep model makes the figure taller, not
    wider: every cell keeps room for its two-decimal label at 8 pt whatever the depth.
    """
    from matplotlib import colormaps

    ranked = [s for s in stats if s.layer is not None and s.tau is not None]
    if not ranked:
        return None
    types = projection_types([s for s in stats if s.layer is not None])
    layers = sorted({s.layer for s in stats if s.layer is not None})
    img = np.full((len(layers), len(types)), np.nan)
    for s in ranked:
        img[layers.index(s.layer), types.index(s.type)] = s.tau
    cmap = colormaps["coolwarm_r"].with_extremes(bad="#dddddd")
    fig = _figure(1.05 * len(types) + 2.2, 0.26 * len(layers) + 1.5)
    ax = fig.subplots()
    im = ax.imshow(img, aspect="auto", cmap=cmap, vmin=-1, vmax=1, interpolation="nearest", origin="lower")
    ax.set_xticks(range(len(types)), types)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    _style(ax, "projection", "layer")
    ax.set_title("Kendall τ-b, width vs singular value (grey: undefined)", fontsize=10)
    for (r, c), v in np.ndenumerate(img):
        if not np.isnan(v):  # dark cells (|τ| > 0.75) get white text
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(v) > 0.75 else "black")
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.01)
    cb.set_label("τ-b", fontsize=LABEL_SIZE)
    cb.ax.tick_params(labelsize=TICK_SIZE)
    return _png(fig)


def fig_scaling_difference(st: MatrixStats, difference: np.ndarray | None, diff_widths: list[int]) -> bytes:
    """Fig. 2 for one matrix: σᵢ² ("scaling") per rank; ΔVᵢ H ΔVᵢᵀ ("difference") per rank and width."""
    fig = _figure(12, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    s2 = np.asarray(st.sigma_by_index, dtype=np.float64) ** 2
    w = np.asarray(st.widths_by_index)
    x = np.arange(len(s2))
    ax1.plot(x, s2, color="#999999", lw=0.8, zorder=1)
    for b in sorted(set(w.tolist())):
        sel = w == b
        ax1.scatter(x[sel], s2[sel], s=8, color=width_colour(b), zorder=2,
                    label="dropped" if b == 0 else width_label(b))
    ax1.set_yscale("log")
    ax1.set_title(f"“scaling” σᵢ² — {st.name}", fontsize=9)
    _style(ax1, "rank index i (σ descending)", "σᵢ²")
    ax1.legend(fontsize=7, title="assigned width", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    if difference is not None:
        for j, b in enumerate(diff_widths):
            ax2.plot(np.arange(difference.shape[0]), difference[:, j], lw=0.9, color=width_colour(b),
                     label=f"{b} bit")
        kept = np.nonzero((w > 0) & (w != FLOAT_BITS))[0]
        if kept.size:
            ys = [difference[i, diff_widths.index(w[i])] if w[i] in diff_widths else np.nan for i in kept]
            ax2.scatter(kept, ys, s=10, facecolors="none", edgecolors="k", lw=0.6, label="assigned", zorder=3)
        ax2.set_yscale("log")
        ax2.legend(fontsize=7, title="width", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax2.set_title("“difference” ΔVᵢ XXᵀ ΔVᵢᵀ per width (XXᵀ per token)", fontsize=9)
        _style(ax2, "rank index i (σ descending)", "ΔVᵢ XXᵀ ΔVᵢᵀ")
    else:
        ax2.text(0.5, 0.5, "difference term needs --base and --finetuned\n(the true V and the fine-tune's inputs X)",
                 ha="center", va="center", fontsize=LABEL_SIZE, transform=ax2.transAxes)
        ax2.set_axis_off()
    for ax in (ax1, ax2):
        _integer_axis(ax.xaxis)
    return _png(fig)


def depth_groups_with_data(layer_error: dict) -> list[str]:
    """The depth groups of a layer-error result that hold layers ("low", "mid", "high" in order), then "all"."""
    groups = layer_error.get("groups", {})
    return [g for g in ("low", "mid", "high") if groups.get(g)] + ["all"]


def fig_eval_errors(results: dict) -> bytes | None:
    """Grouped bars of the Eq. 1 error (all / out) per depth group for each delta (log scale).

    Depth groups without layers (a model with fewer than 3 layers has no "low"/"mid") are left out.
    """
    from matplotlib import colormaps

    le = results.get("layer_error")
    if not le:
        return None
    summary = le["summary"]
    labels = list(summary)
    groups = depth_groups_with_data(le)
    if not labels or not groups:
        return None
    fig = _figure(12, 3.4)
    axes = fig.subplots(1, 2)
    tab = colormaps["tab10"]
    width = 0.8 / len(labels)
    for ax, metric in zip(axes, ("all", "out")):
        for k, label in enumerate(labels):
            vals = [summary[label][g][metric] if summary[label][g][metric] is not None else np.nan for g in groups]
            ax.bar(np.arange(len(groups)) + k * width, vals, width=width, label=label if metric == "all" else None,
                   color=tab(k % 10))
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
        ax.set_yscale("log")
        ax.set_title(f"Eq. 1 error, {'all activations' if metric == 'all' else 'top 1% activations'}", fontsize=10)
        _style(ax, "depth group", "mean ‖ΔW X − ΔŴ X‖² per activation")
    fig.legend(title="delta", loc="outside right upper", fontsize=TICK_SIZE, title_fontsize=TICK_SIZE)
    return _png(fig)
