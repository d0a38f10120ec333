"""`prinmix report`: one self-contained HTML page showing where a delta's bits went.

    build_report(delta, out_dir, eval_json=None, base=None, finetuned=None) -> out_dir/index.html

The page (images embedded as base64 data URIs; the same PNGs are written beside it; no network) has:

* widths per rank for every matrix, as a heat map over layers × rank index, one panel per projection
  type (the paper's Fig. 4 / C.7), and the bytes spent on each width per layer (Fig. 4's memory view);
* kept rank and bytes per layer;
* the σᵢ² "scaling" term and the ΔVᵢ XXᵀ ΔVᵢᵀ "difference" term per rank for a few matrices (Fig. 2);
* Kendall τ between the width sequence and the singular-value sequence of every matrix (C.7);
* the results of `prinmix eval` when its JSON is given.

Where σ and the rank order come from (the delta file stores only each kept rank's width, in stored
order — widest block first — and the factors ΔŴ = B A with Σ folded into B; the compressor's
diagnostics such as the original rank index are not stored):

* with --base and --finetuned: the SVD of the true delta ΔW = W_ft − W_base gives every singular
  value σᵢ (i = original rank index, σ descending). Each stored rank is matched to the original rank
  whose right singular vector Vᵢ is closest to its stored row Âⱼ (|cosine|, a one-to-one assignment);
  ranks not stored get width 0. τ is then taken over all min(h_out, h_in) ranks, as in C.7. The
  difference term uses X = the fine-tune's inputs to that linear on held-out text (seed 1234):
  difference(i, b) = ΔVᵢ(b) H ΔVᵢ(b)ᵀ with H = XXᵀ / n_tokens and ΔVᵢ(b) = Vᵢ − GPTQ_b(Vᵢ), exactly the
  compressor's simulation (prinmix.algorithms.compress_matrix.simulate_width_errors) divided by σᵢ².
* without them: σⱼ is estimated from the stored factors as ‖B₍:,ⱼ₎‖·‖Âⱼ‖, the kept ranks are ordered
  by that estimate, τ is taken over the kept ranks only, and the difference term is not shown.

Kendall τ is scipy's τ-b. The width sequence has many ties, so τ-b stays below 1 even when widths
never increase with the rank index; the page therefore also gives γ = (C − D)/(C + D) and D, the
number of discordant pairs (a rank with a smaller σ given strictly more bits than a rank with a
larger σ): D = 0 (γ = 1) exactly when the allocation follows σ alone, Delta-CoMe's assumption.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import PrinmixError
from ..format.output_safety import REPORT, check_output_directory, refuse_input_overlap, write_marker
from .layer_error import depth_group, layer_index_of, projection_type

FLOAT_BITS = 16


# --------------------------------------------------------------------------- per-matrix analysis
@dataclass
class MatrixStats:
    name: str
    layer: int | None
    type: str
    shape: tuple[int, int]
    nbytes: int
    method: str
    widths_stored: list[int]                  # per kept rank, stored order
    bytes_per_width: dict[int, int]           # width -> bytes of its block(s)
    sigma_est: list[float]                    # per kept rank, stored order: ‖B_j‖·‖A_j‖
    sigma_true: list[float] | None = None     # full spectrum of ΔW (with BASE+FT)
    orig_index: list[int] | None = None       # per kept rank, stored order (with BASE+FT)
    match_cos: list[float] | None = None
    # derived: widths by rank index (all ranks with BASE+FT, else kept ranks by σ_est desc) and σ alike
    widths_by_index: list[int] = field(default_factory=list)
    sigma_by_index: list[float] = field(default_factory=list)
    tau: float | None = None
    gamma: float | None = None
    discordant: int | None = None
    tau_over: str = ""
    sign: bool = False                        # a BitDelta sign matrix: no ranks

    @property
    def kept_rank(self) -> int:
        return len(self.widths_stored)


def concordance(widths, sigma) -> tuple[int, int]:
    """(C, D): pairs ordered the same / the opposite way by width and by σ (ties in either count in neither)."""
    w = np.asarray(widths)
    s = np.asarray(sigma, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    w, s = w[order], s[order]
    values = np.unique(w)
    conc = disc = 0
    # for each j, earlier i have σ_i ≥ σ_j; count width relations (exact σ ties are rare; handled below)
    less_before = {b: np.concatenate([[0], np.cumsum(w < b)[:-1]]) for b in values}
    more_before = {b: np.concatenate([[0], np.cumsum(w > b)[:-1]]) for b in values}
    for b in values:
        idx = np.nonzero(w == b)[0]
        disc += int(less_before[b][idx].sum())   # earlier (larger σ) rank with fewer bits than this one
        conc += int(more_before[b][idx].sum())
    if len(np.unique(s)) < len(s):  # remove pairs tied in σ (both orders counted above as one of C / D)
        for v in np.unique(s[np.r_[False, s[1:] == s[:-1]]]):
            g = w[s == v]
            for i in range(len(g)):
                for j in range(i + 1, len(g)):
                    if g[i] > g[j]:
                        conc -= 1
                    elif g[i] < g[j]:
                        disc -= 1
    return conc, disc


def _finish_order(st: MatrixStats) -> None:
    from scipy.stats import kendalltau

    if st.sigma_true is not None and st.orig_index is not None:
        w = [0] * len(st.sigma_true)
        for j, i in enumerate(st.orig_index):
            w[i] = st.widths_stored[j]
        st.widths_by_index, st.sigma_by_index = w, list(st.sigma_true)
        st.tau_over = f"all {len(w)} ranks (true SVD)"
    else:
        order = sorted(range(st.kept_rank), key=lambda j: -st.sigma_est[j])
        st.widths_by_index = [st.widths_stored[j] for j in order]
        st.sigma_by_index = [st.sigma_est[j] for j in order]
        st.tau_over = f"{st.kept_rank} kept ranks (stored σ)"
    w, s = st.widths_by_index, st.sigma_by_index
    if len(w) >= 2 and len(set(w)) > 1 and len(set(s)) > 1:
        st.tau = float(kendalltau(w, s).statistic)
        c, d = concordance(w, s)
        st.discordant = d
        st.gamma = (c - d) / (c + d) if c + d else None


def _match_ranks(a_rows: torch.Tensor, vh: torch.Tensor) -> tuple[list[int], list[float]]:
    """One-to-one match of stored rows Â [k, h_in] to true right singular vectors Vh [r, h_in] by |cosine|."""
    if a_rows.shape[0] == 0:
        return [], []
    an = a_rows / a_rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cos = (an.double() @ vh.double().T).abs()
    best = cos.argmax(dim=1)
    if len(set(best.tolist())) == len(best):
        idx = best.tolist()
    else:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(-cos.numpy())
        idx = [0] * len(rows)
        for r, c in zip(rows, cols):
            idx[r] = int(c)
    return idx, [float(cos[j, i]) for j, i in enumerate(idx)]


def analyse_delta(delta, base_r=None, ft_r=None, device="cpu", keep_svd: set[str] | None = None, log=None):
    """[MatrixStats] of every compressed matrix; with readers of BASE and FT, the true-SVD view.

    keep_svd: names whose (S, Vh) of the true ΔW are returned too, as {name: (S, Vh)}.
    """
    from ..algorithms.compressed import block_nbytes

    out, svd_kept = [], {}
    names = sorted(delta.matrices, key=lambda n: (layer_index_of(n) if layer_index_of(n) is not None else -1, n))
    for n_done, name in enumerate(names):
        m = delta.matrices[name]
        h_out, h_in = m.shape
        per_width: dict[int, int] = {}
        sigma_est: list[float] = []
        if m.sign is None:
            for b in m.blocks:
                per_width[b.bits] = per_width.get(b.bits, 0) + block_nbytes(
                    b.bits, b.rank, h_out, h_in, b.v.group_size if hasattr(b.v, "group_size") else 0,
                    b.u.group_size if hasattr(b.u, "group_size") else 0, b.u_transposed, b.sigma is not None)
            if m.rank:
                B, A = m.factors(torch.float32)
                sigma_est = (B.norm(dim=0) * A.norm(dim=1)).tolist()
        else:
            per_width[1] = m.nbytes()
        st = MatrixStats(name, layer_index_of(name), projection_type(name), (h_out, h_in), m.nbytes(), m.method,
                         m.rank_widths(), per_width, sigma_est, sign=m.sign is not None)
        if base_r is not None and m.sign is None:
            dw = (ft_r.get(name, torch.float32) - base_r.get(name, torch.float32)).to(device)
            _, S, Vh = torch.linalg.svd(dw, full_matrices=False)
            S, Vh = S.cpu(), Vh.cpu()
            st.sigma_true = S.tolist()
            if m.rank:
                st.orig_index, st.match_cos = _match_ranks(m.factors(torch.float32)[1], Vh)
            else:
                st.orig_index, st.match_cos = [], []
            if keep_svd and name in keep_svd:
                svd_kept[name] = (S, Vh)
        if m.sign is None:
            _finish_order(st)
        out.append(st)
        if log and (n_done + 1) % 50 == 0:
            log(f"  analysed {n_done + 1}/{len(names)} matrices")
    return out, svd_kept


# --------------------------------------------------------------------------- held-out Hessians
def heldout_hessians(ft_r, names: list[str], calib=None, nsamples=8, seqlen=256, seed=1234, device="cpu",
                     batch_size=4) -> dict[str, torch.Tensor]:
    """{weight name: XXᵀ / n_tokens} of the fine-tune's inputs to those linears on held-out windows."""
    from transformers import AutoTokenizer

    from ..models.calibration import load_calibration
    from ..models.decoder import DecoderStack, capture_hessians

    stack = DecoderStack(ft_r)
    wanted: dict[int, list[str]] = {}
    for i in range(stack.num_layers):
        prefix = stack.layer_prefix(i)
        for lin in stack.linear_names(i):
            if prefix + lin + ".weight" in names:
                wanted.setdefault(i, []).append(lin)
    if not wanted:
        return {}
    try:
        tok = AutoTokenizer.from_pretrained(str(ft_r.path))
    except Exception as e:  # noqa: BLE001
        raise PrinmixError(f"{ft_r.path}: cannot load its tokenizer ({e})") from None
    ids = load_calibration(calib, tok, nsamples, seqlen, seed)
    inputs = stack.embed(ft_r, ids, device, batch_size)
    out = {}
    for i in range(max(wanted) + 1):
        layer = stack.build_layer(i, stack.read_layer_state(ft_r, i), device)
        stats, outputs = capture_hessians(layer, inputs, batch_size, return_outputs=True)
        for lin in wanted.get(i, []):
            s = stats[lin]
            out[stack.layer_prefix(i) + lin + ".weight"] = (s.H / max(s.n_tokens, 1)).cpu()
        inputs = inputs.with_hidden(outputs)
        del layer
    return out


def default_fig2_matrices(stats: list[MatrixStats], count: int = 3) -> list[str]:
    """A few matrices for the scaling/difference plot: the last layer's q_proj (the paper's Fig. 2), the
    middle layer's down_proj and the first layer's v_proj when present, else the largest others."""
    ranked = [s for s in stats if s.kept_rank and s.layer is not None]
    if not ranked:
        return []
    layers = sorted({s.layer for s in ranked})
    picks = []
    for layer, t in ((layers[-1], "q_proj"), (layers[len(layers) // 2], "down_proj"), (layers[0], "v_proj")):
        for s in ranked:
            if s.layer == layer and s.type == t and s.name not in picks:
                picks.append(s.name)
                break
    for s in sorted(ranked, key=lambda s: -s.kept_rank):
        if len(picks) >= count:
            break
        if s.name not in picks:
            picks.append(s.name)
    return picks[:count]


# --------------------------------------------------------------------------- figures
TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _types(stats) -> list[str]:
    """Projection types present, in the usual decoder order (q k v o gate up down), others after by name."""
    present = {s.type for s in stats}
    return [t for t in TYPE_ORDER if t in present] + sorted(present - set(TYPE_ORDER))


def _figure(w, h):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _width_colours(widths: list[int]):
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    viridis = colormaps["viridis"]
    cols = []
    nonzero = [b for b in widths if b not in (0, FLOAT_BITS)]
    for b in widths:
        if b == 0:
            cols.append("#e6e6e6")
        elif b == FLOAT_BITS:
            cols.append("#b2182b")
        else:
            k = nonzero.index(b)
            cols.append(viridis(0.1 + 0.85 * (k / max(len(nonzero) - 1, 1))))
    cmap = ListedColormap(cols)
    cmap = cmap.with_extremes(bad="white")
    return cmap


def fig_width_heatmaps(stats: list[MatrixStats], true_svd: bool) -> bytes | None:
    """Per projection type: layers × rank index image of the width of each rank (Fig. 4 / C.7)."""
    ranked = [s for s in stats if s.layer is not None and s.widths_by_index]
    if not ranked:
        return None
    types = _types(ranked)
    layers = sorted({s.layer for s in ranked})
    widths = sorted({w for s in ranked for w in s.widths_by_index} | {0})
    cmap = _width_colours(widths)
    ncol = 2 if len(types) > 1 else 1
    nrow = math.ceil(len(types) / ncol)
    fig = _figure(6.2 * ncol, 2.6 * nrow + 0.6)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    im = None
    for k, t in enumerate(types):
        ax = axes[k // ncol][k % ncol]
        sel = {s.layer: s for s in ranked if s.type == t}
        last = max((max((i for i, w in enumerate(s.widths_by_index) if w), default=0) for s in sel.values()),
                   default=0)
        ncols = max(1, min(max(len(s.widths_by_index) for s in sel.values()), int(last * 1.05) + 2))
        img = np.full((len(layers), ncols), np.nan)
        for r, layer in enumerate(layers):
            s = sel.get(layer)
            if s is None:
                continue
            row = [widths.index(w) for w in s.widths_by_index[:ncols]]
            img[r, :len(row)] = row
        im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(widths) - 0.5,
                       origin="lower", extent=(-0.5, ncols - 0.5, -0.5, len(layers) - 0.5))
        ax.set_title(f"{t}: width per rank", fontsize=10)
        ax.set_xlabel("original rank index (σ descending)" if true_svd else "kept rank, by stored σ (descending)",
                      fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ticks = np.linspace(0, len(layers) - 1, min(len(layers), 8)).round().astype(int)
        ax.set_yticks(ticks, [str(layers[i]) for i in ticks], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    for k in range(len(types), nrow * ncol):
        axes[k // ncol][k % ncol].set_visible(False)
    cb = fig.colorbar(im, ax=axes, ticks=range(len(widths)), shrink=0.8, pad=0.01)
    cb.ax.set_yticklabels(["0 (dropped)" if w == 0 else ("fp16" if w == FLOAT_BITS else f"{w} bit") for w in widths],
                          fontsize=8)
    return _png(fig)


def fig_memory_per_width(stats: list[MatrixStats]) -> bytes | None:
    """Per projection type: stacked bytes per width across layers (the paper's Fig. 4)."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    ranked = [s for s in stats if s.layer is not None]
    if not ranked:
        return None
    types = _types(ranked)
    layers = sorted({s.layer for s in ranked})
    widths = sorted({w for s in ranked for w in s.bytes_per_width})
    cmap = _width_colours([0] + [w for w in widths if w != 0])
    colour = {w: cmap(k + 1) for k, w in enumerate(w for w in widths if w != 0)}
    ncol = 2 if len(types) > 1 else 1
    nrow = math.ceil(len(types) / ncol)
    fig = _figure(6.2 * ncol, 2.4 * nrow + 0.5)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for k, t in enumerate(types):
        ax = axes[k // ncol][k % ncol]
        sel = {s.layer: s for s in ranked if s.type == t}
        bottom = np.zeros(len(layers))
        for w in sorted(widths, reverse=True):
            vals = np.array([sel[layer].bytes_per_width.get(w, 0) / 1024 if layer in sel else 0 for layer in layers])
            if vals.any():
                ax.bar(layers, vals, bottom=bottom, color=colour.get(w, "#888888"), width=0.85)
                bottom += vals
        ax.set_title(f"{t}: bytes per width", fontsize=10)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("KiB", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for k in range(len(types), nrow * ncol):
        axes[k // ncol][k % ncol].set_visible(False)
    handles = [Patch(color=colour.get(w, "#888888"),
                     label=("sign (1 bit)" if w == 1 and any(s.sign for s in ranked) else
                            "fp16" if w == FLOAT_BITS else f"{w} bit")) for w in sorted(widths, reverse=True)]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=8)
    return _png(fig)


def fig_rank_bytes(stats: list[MatrixStats]) -> bytes | None:
    """Kept rank per layer (one line per type) and bytes per layer (stacked by type)."""
    from matplotlib.ticker import MaxNLocator

    ranked = [s for s in stats if s.layer is not None]
    if not ranked:
        return None
    types = _types(ranked)
    layers = sorted({s.layer for s in ranked})
    fig = _figure(12, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    from matplotlib import colormaps

    tab = colormaps["tab10"]
    bottom = np.zeros(len(layers))
    for k, t in enumerate(types):
        sel = {s.layer: s for s in ranked if s.type == t}
        ax1.plot(layers, [sel[layer].kept_rank if layer in sel and not sel[layer].sign else np.nan
                          for layer in layers], marker="o",
                 ms=3, label=t, color=tab(k % 10))
        vals = np.array([sel[layer].nbytes / 1024 if layer in sel else 0 for layer in layers])
        ax2.bar(layers, vals, bottom=bottom, label=t, color=tab(k % 10), width=0.85)
        bottom += vals
    if all(s.sign for s in ranked):
        ax1.text(0.5, 0.5, "sign matrices (BitDelta): no ranks", ha="center", va="center", fontsize=9,
                 transform=ax1.transAxes)
    ax1.set_title("kept rank per layer", fontsize=10)
    ax1.set_xlabel("layer", fontsize=8)
    ax1.set_ylabel("ranks stored (width > 0)", fontsize=8)
    ax1.legend(fontsize=7, ncol=2)
    ax2.set_title("stored bytes per layer", fontsize=10)
    ax2.set_xlabel("layer", fontsize=8)
    ax2.set_ylabel("KiB", fontsize=8)
    ax2.legend(fontsize=7, ncol=2)
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def fig_kendall(stats: list[MatrixStats]) -> bytes | None:
    """Heat map of Kendall τ-b (widths vs σ) over layers × projection types."""
    ranked = [s for s in stats if s.layer is not None and s.tau is not None]
    if not ranked:
        return None
    types = _types([s for s in stats if s.layer is not None])
    layers = sorted({s.layer for s in stats if s.layer is not None})
    img = np.full((len(types), len(layers)), np.nan)
    for s in ranked:
        img[types.index(s.type), layers.index(s.layer)] = s.tau
    from matplotlib import colormaps

    cmap = colormaps["coolwarm_r"].with_extremes(bad="#dddddd")
    fig = _figure(min(max(6.0, 0.3 * len(layers) + 2.5), 14), 0.45 * len(types) + 1.6)
    ax = fig.subplots()
    im = ax.imshow(img, aspect="auto", cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(types)), types, fontsize=8)
    step = max(1, len(layers) // 30)
    ax.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=7)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_title("Kendall τ-b between width and singular value, per matrix (grey: undefined)", fontsize=10)
    if len(layers) <= 32:
        for (r, c), v in np.ndenumerate(img):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, shrink=0.9, pad=0.01)
    return _png(fig)


def fig_scaling_difference(st: MatrixStats, difference: np.ndarray | None, diff_widths: list[int]) -> bytes:
    """Fig. 2 for one matrix: σᵢ² ("scaling") per rank; ΔVᵢ H ΔVᵢᵀ ("difference") per rank and width."""
    fig = _figure(12, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    widths_all = sorted(set(st.widths_by_index) | {0} | set(diff_widths))
    cmap = _width_colours(widths_all)
    s2 = np.asarray(st.sigma_by_index, dtype=np.float64) ** 2
    w = np.asarray(st.widths_by_index)
    x = np.arange(len(s2))
    ax1.plot(x, s2, color="#999999", lw=0.8, zorder=1)
    for b in sorted(set(w.tolist())):
        sel = w == b
        ax1.scatter(x[sel], s2[sel], s=8, color=cmap(widths_all.index(b)), zorder=2,
                    label="dropped" if b == 0 else ("fp16" if b == FLOAT_BITS else f"{b} bit"))
    ax1.set_yscale("log")
    ax1.set_title(f"“scaling” σᵢ² — {st.name}", fontsize=9)
    ax1.set_xlabel("rank index i (σ descending)", fontsize=8)
    ax1.legend(fontsize=7, ncol=2, title="assigned width", title_fontsize=7)
    if difference is not None:
        for j, b in enumerate(diff_widths):
            ax2.plot(np.arange(difference.shape[0]), difference[:, j], lw=0.9, color=cmap(widths_all.index(b)),
                     label=f"{b} bit")
        kept = np.nonzero((w > 0) & (w != FLOAT_BITS))[0]
        if kept.size:
            ys = [difference[i, diff_widths.index(w[i])] if w[i] in diff_widths else np.nan for i in kept]
            ax2.scatter(kept, ys, s=10, facecolors="none", edgecolors="k", lw=0.6, label="assigned", zorder=3)
        ax2.set_yscale("log")
        ax2.legend(fontsize=7, ncol=2)
        ax2.set_title("“difference” ΔVᵢ XXᵀ ΔVᵢᵀ per width (XXᵀ per token)", fontsize=9)
    else:
        ax2.text(0.5, 0.5, "difference term needs --base and --finetuned\n(the true V and the fine-tune's inputs X)",
                 ha="center", va="center", fontsize=9, transform=ax2.transAxes)
        ax2.set_axis_off()
    ax2.set_xlabel("rank index i (σ descending)", fontsize=8)
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=7)
    return _png(fig)


def fig_eval_errors(results: dict) -> bytes | None:
    """Grouped bars of the Eq. 1 error (all / out) per depth group for each delta (log scale)."""
    le = results.get("layer_error")
    if not le:
        return None
    summary = le["summary"]
    labels = list(summary)
    groups = ["low", "mid", "high", "all"]
    fig = _figure(12, 3.4)
    axes = fig.subplots(1, 2)
    from matplotlib import colormaps

    tab = colormaps["tab10"]
    for ax, metric in zip(axes, ("all", "out")):
        width = 0.8 / max(len(labels), 1)
        for k, label in enumerate(labels):
            vals = [summary[label][g][metric] or np.nan for g in groups]
            ax.bar(np.arange(len(groups)) + k * width, vals, width=width, label=label, color=tab(k % 10))
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"Eq. 1 error, {'all activations' if metric == 'all' else 'top 1% activations'}", fontsize=10)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return _png(fig)


# --------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1250px;
color:#222;background:#fff;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:8px 0} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left}
figure{margin:10px 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:12px;color:#555}
.note{font-size:12px;color:#555} details{margin:8px 0} code{background:#f6f6f6;padding:0 3px}
"""


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _f(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.2e}"
    return str(v)


class _Page:
    def __init__(self, out_dir: Path):
        self.out_dir, self.parts, self.files = out_dir, [], []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def image(self, name: str, png: bytes | None, caption: str) -> None:
        if png is None:
            return
        (self.out_dir / name).write_bytes(png)
        self.files.append(self.out_dir / name)
        data = base64.b64encode(png).decode("ascii")
        self.add(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                 f'<figcaption>{html.escape(caption)} (<a href="{html.escape(name)}">{html.escape(name)}</a>)'
                 f'</figcaption></figure>')


def _eval_section(page: _Page, results: dict, source: str) -> None:
    from .cli_commands import main_table_rows

    page.add(f"<h2>Evaluation results</h2><p class='note'>from <code>{html.escape(source)}</code></p>")
    rows = main_table_rows(results)
    if rows:
        page.add(_table(list(rows[0]), [list(r.values()) for r in rows]))
    le = results.get("layer_error")
    if le:
        s = le.get("settings", {})
        page.add(f"<p class='note'>Eq. 1 error ‖ΔW X − ΔŴ X‖² on {s.get('nsamples')}×{s.get('seqlen')} held-out tokens "
                 f"({html.escape(str(s.get('calib')))}, seed {s.get('seed')}), X = the fine-tune's inputs. all: mean "
                 "over output activations; out: mean over the top 1% |fine-tune output|; rel: ΣE² / Σ(ΔW X)². Groups "
                 "average the per-type means, as Table 15's AVG.</p>")
        header = ["delta"] + [f"{g}/{m}" for g in ("low", "mid", "high", "all") for m in ("all", "out", "rel")]
        page.add(_table(header, [[label] + [_f(v[g][m]) for g in ("low", "mid", "high", "all") for m in ("all", "out", "rel")]
                                 for label, v in le["summary"].items()]))
        page.image("eval_error.png", fig_eval_errors(results), "Eq. 1 error per depth group and delta (log scale)")
        for metric in ("all", "out"):
            rows = [[label, t] + [_f(g[x][metric]) for x in ("low", "mid", "high", "all")]
                    for label, types in le["by_type"].items() for t, g in types.items()]
            page.add(f"<details><summary>Eq. 1 error per projection type ({metric}; Table 15)</summary>"
                     + _table(["delta", "type", "low", "mid", "high", "all"], rows) + "</details>")
    tasks = results.get("tasks", {}).get("results", {})
    examples = [(label, t, e) for label, r in tasks.items() for t, v in r.items() for e in v.get("examples", [])[:3]]
    if examples:
        page.add("<details><summary>task examples (prompt → prediction, expected)</summary>" + _table(
            ["model", "task", "prompt", "prediction", "answer"],
            [[label, t, e["prompt"], e["prediction"], e["answer"]] for label, t, e in examples]) + "</details>")


def build_report(delta_path, out_dir=None, eval_json=None, base=None, finetuned=None, calib=None, nsamples: int = 8,
                 seqlen: int = 256, matrices: list[str] | None = None, device: str = "auto", log=None) -> Path:
    """Write out_dir/index.html (+ PNGs) for a delta file; returns the HTML path (see the module docstring)."""
    from ..algorithms.compress_matrix import DEFAULT_WIDTHS, PrinMixConfig, simulate_width_errors
    from ..api import resolve_device
    from ..format.delta_file import load_delta
    from ..models.apply_delta import check_base
    from ..models.checkpoint import CheckpointReader, check_compatible
    from .cli_commands import load_eval_json

    log = log or (lambda m: None)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PrinmixError("prinmix report draws with matplotlib, which is not installed: "
                           "pip install 'prinmix[eval]' (or pip install matplotlib)") from None
    delta_path = Path(delta_path)
    delta = load_delta(delta_path)
    results = load_eval_json(eval_json) if eval_json else None
    if (base is None) != (finetuned is None):
        raise PrinmixError("base and finetuned go together (the true delta needs both)")
    dev = resolve_device(device)
    base_r = ft_r = None
    if base is not None:
        base_r, ft_r = CheckpointReader(base), CheckpointReader(finetuned)
        check_compatible(base_r, ft_r)
        check_base(base_r, delta, delta_path)
    out_dir = Path(out_dir) if out_dir else delta_path.parent / f"{delta_path.stem}-report"
    refuse_input_overlap([out_dir], [delta_path, base, finetuned, eval_json], "report")
    check_output_directory(out_dir, overwrite=True, kind=REPORT)  # rewrites only an earlier report
    out_dir.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir, REPORT)

    probe_stats, _ = analyse_delta(delta)  # stored view first: to choose the Fig. 2 matrices cheaply
    if matrices:
        unknown = [n for n in matrices if n not in delta.matrices]
        if unknown:
            raise PrinmixError(f"{delta_path}: no compressed matrix {unknown[0]!r} (see `prinmix info`)")
        fig2 = list(matrices)
    else:
        fig2 = default_fig2_matrices(probe_stats)
    true_svd = base_r is not None
    if true_svd:
        log("SVD of the true delta of every matrix")
        stats, svds = analyse_delta(delta, base_r, ft_r, dev, keep_svd=set(fig2), log=log)
    else:
        stats, svds = probe_stats, {}
    by_name = {s.name: s for s in stats}
    cfg_dict = (delta.params.get("config") or {}) if delta.method == "prinmix" else {}
    cand = tuple(cfg_dict.get("widths") or DEFAULT_WIDTHS)
    diff_widths = [b for b in sorted(cand) if b > 0]
    differences: dict[str, np.ndarray] = {}
    if true_svd and fig2:
        log("held-out XXᵀ for the difference term")
        Hs = heldout_hessians(ft_r, fig2, calib, nsamples, seqlen, device=dev)
        cfg = PrinMixConfig(**{k: v for k, v in cfg_dict.items() if k in PrinMixConfig.__dataclass_fields__}) \
            if cfg_dict else PrinMixConfig()
        cfg.widths = tuple(sorted(set(cand) | {0}))
        for name in fig2:
            if name not in Hs or name not in svds:
                continue
            S, Vh = svds[name]
            E, _, _ = simulate_width_errors(S.to(dev), Vh.to(dev), Hs[name].to(dev), cfg.widths, cfg)
            s2 = (S.double() ** 2).clamp_min(1e-300)[:, None]
            cols = [cfg.widths.index(b) for b in diff_widths]
            differences[name] = (E[:, cols] / s2).numpy()

    # ---------------------------------------------------------------- page
    page = _Page(out_dir)
    rank_stats = [s for s in stats if not s.sign]
    total_lin = delta.linear_bytes()
    params = delta.dense_delta_params()
    page.add(f"<h1>prinmix report — {html.escape(delta_path.name)}</h1>")
    widths_hist: dict[int, int] = {}
    for s in rank_stats:
        for w in s.widths_stored:
            widths_hist[w] = widths_hist.get(w, 0) + 1
    weights, whole_params = delta.weight_bytes(), delta.whole_delta_params()
    overview = [
        ["whole delta (all weight bytes with header entries / 16-bit size of what differs)",
         _f(weights["total"] / (2 * whole_params), 6) if whole_params else "-"],
        ["  decoder linears (bytes)", f"{weights['linear']:,}"],
        *[[f"  {n} (compressed rows, bytes)", f"{b:,}"] for n, b in weights["vocab"].items()],
        ["  exact tensors: norms, biases, rows (bytes)", f"{weights['exact']:,}"],
        ["method", delta.method],
        ["ratio requested", _f(delta.ratio, 6)],
        ["ratio achieved (linear deltas, all stored bytes / 16-bit)",
         _f(8 * total_lin / (16 * params), 6) if params else "-"],
        ["compressed matrices", len(stats)],
        ["linear delta bytes", f"{total_lin:,}"],
        ["file bytes", f"{delta_path.stat().st_size:,}"],
        ["ranks stored per width", ", ".join(f"{'fp16' if w == FLOAT_BITS else f'{w} bit'}: {n}"
                                             for w, n in sorted(widths_hist.items(), reverse=True)) or "-"],
        ["σ and rank order from", "SVD of the true delta (--base/--finetuned)" if true_svd else
         "the stored factors (‖Bⱼ‖·‖Aⱼ‖; kept ranks only)"],
    ]
    page.add(_table(["", ""], overview))
    if true_svd:
        cos = [c for s in rank_stats for c in (s.match_cos or [])]
        if cos:
            page.add(f"<p class='note'>Stored ranks were matched to the true singular vectors with |cos| mean "
                     f"{np.mean(cos):.3f}, min {np.min(cos):.3f} (a low value means a rank's identity is uncertain, "
                     f"e.g. near-equal singular values).</p>")
    if results is not None:
        _eval_section(page, results, str(eval_json))

    page.add("<h2>Bits per rank (Fig. 4, C.7)</h2>")
    if rank_stats:
        page.image("widths_heatmap.png", fig_width_heatmaps(rank_stats, true_svd),
                   "Width of every rank, per projection type: rows are layers, columns rank indices "
                   + ("(original SVD order of the true delta; grey = dropped)" if true_svd
                      else "(kept ranks ordered by their stored σ estimate)"))
    else:
        page.add("<p class='note'>No rank structure: this delta stores sign matrices (BitDelta).</p>")
    page.image("memory_per_width.png", fig_memory_per_width(stats),
               "Stored bytes per width and layer, per projection type (the paper's Fig. 4)")

    page.add("<h2>Kept rank and bytes per layer</h2>")
    page.image("rank_bytes.png", fig_rank_bytes(stats), "Kept rank (width > 0) and stored bytes per layer")
    types = _types(stats)
    layers = sorted({s.layer for s in stats if s.layer is not None})
    rows = []
    for layer in layers:
        sel = {s.type: s for s in stats if s.layer == layer}
        rows.append([layer] + [("sign" if sel[t].sign else sel[t].kept_rank) if t in sel else "-" for t in types]
                    + [f"{sum(s.nbytes for s in sel.values()):,}"])
    page.add(_table(["layer"] + [f"{t} rank" for t in types] + ["bytes"], rows))

    page.add("<h2>“Scaling” and “difference” terms (Fig. 2)</h2>")
    page.add("<p class='note'>Eq. 5: eᵢ = σᵢ² · ΔVᵢ XXᵀ ΔVᵢᵀ. Left: the scaling term of every rank, coloured by the width "
             "the delta gave it. Right: the difference term per candidate width, ΔVᵢ = Vᵢ − GPTQ_b(Vᵢ), with XXᵀ the "
             "fine-tune's inputs on held-out text divided by the token count; circles mark the assigned width.</p>")
    for k, name in enumerate(fig2):
        st = by_name.get(name)
        if st is None or not st.widths_by_index:
            continue
        page.image(f"scaling_difference_{k}.png", fig_scaling_difference(st, differences.get(name), diff_widths),
                   f"{name}: scaling σᵢ² and difference terms")

    page.add("<h2>Kendall τ between widths and singular values (C.7)</h2>")
    page.add("<p class='note'>τ-b (scipy) of the width sequence against the singular-value sequence, over "
             + ("all ranks of the true delta (dropped ranks have width 0)" if true_svd else "the kept ranks")
             + ". Ties make τ-b &lt; 1 even for an allocation that follows σ exactly, so γ = (C−D)/(C+D) and the number "
             "D of discordant pairs (a smaller-σ rank given more bits than a larger-σ one) are shown too: D = 0 ⇔ widths "
             "follow σ alone.</p>")
    page.image("kendall_tau.png", fig_kendall(rank_stats), "Kendall τ-b per matrix")
    taus = [s.tau for s in rank_stats if s.tau is not None]
    if taus:
        n_disc = sum(1 for s in rank_stats if s.discordant)
        page.add(f"<p>τ-b over {len(taus)} matrices: mean {np.mean(taus):.3f}, min {np.min(taus):.3f}, max "
                 f"{np.max(taus):.3f}; {n_disc} of them give some later rank more bits than an earlier one (D &gt; 0)."
                 "</p>")
    trows = [[s.name, s.kept_rank, _f(s.tau), _f(s.gamma), _f(s.discordant), s.tau_over,
              _f(float(np.mean(s.match_cos))) if s.match_cos else "-"] for s in rank_stats]
    page.add("<details><summary>per matrix</summary>" + _table(
        ["matrix", "kept rank", "τ-b", "γ", "discordant pairs", "over", "mean match |cos|"], trows) + "</details>")

    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>prinmix report — {html.escape(delta_path.name)}</title><style>{CSS}</style></head><body>\n"
           + "\n".join(page.parts) + "\n</body></html>\n")
    index = out_dir / "index.html"
    index.write_text(doc, encoding="utf-8")
    return index


def report_data(delta_path, base=None, finetuned=None, device="cpu") -> list[MatrixStats]:
    """The per-matrix analysis behind the page (for scripts and tests)."""
    from ..format.delta_file import load_delta
    from ..models.checkpoint import CheckpointReader

    delta = load_delta(delta_path)
    if base is None:
        return analyse_delta(delta)[0]
    return analyse_delta(delta, CheckpointReader(base), CheckpointReader(finetuned), device)[0]


__all__ = ["build_report", "report_data", "analyse_delta", "MatrixStats", "concordance", "depth_group"]
