"""The report's HTML: one self-contained page (PNGs embedded as data URIs and written beside it; no network).

Each figure comes with a caption (what is drawn) and a "what to look at" paragraph (how to read it,
what a good or a suspicious allocation looks like). Tables have a header row only when their columns
have names (the overview is a two-column key/value list without one).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from ..results import format_cell, main_table_rows
from . import figures
from .statistics import FLOAT_BITS, MatrixStats

__all__ = ["Page", "LOOK_AT"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1250px;
color:#222;background:#fff;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:8px 0} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left}
figure{margin:10px 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:12px;color:#555}
.note{font-size:12px;color:#555} details{margin:8px 0} code{background:#f6f6f6;padding:0 3px}
.look{font-size:13px;background:#f7f9fc;border-left:3px solid #7aa0d6;padding:4px 10px;margin:4px 0 14px}
"""

# "What to look at", per figure file name: how to read the figure and what would be suspicious.
LOOK_AT = {
    "eval_error.png": "Lower is better; the axis is logarithmic, so one bar half as tall as another is an order of "
                      "magnitude, not a factor of two. At the same ratio PrinMix should sit below low-rank and "
                      "BitDelta in every depth group, and the right panel (the 1% largest activations) is where "
                      "outlier-sensitive layers show: a method that is close on the left but far on the right "
                      "damages exactly the activations that matter most.",
    "widths_heatmap.png": "Read each row from left to right: the widest widths should come first (large σ) and fade "
                          "into grey (dropped) towards the right. A warm colour far to the right, or grey gaps "
                          "between coloured cells, marks ranks whose width does not follow σ — PrinMix does this on "
                          "purpose when a rank's difference term is small (see Fig. 2 below). How far the colour "
                          "reaches shows how many ranks each layer could afford.",
    "memory_per_width.png": "Where the bytes went: each bar is one layer's matrix of that type, stacked by width. "
                            "Equal bar heights mean an even budget per matrix (the ratio is applied per matrix); the "
                            "split inside a bar shows whether the budget bought a few wide ranks or many narrow ones.",
    "rank_bytes.png": "Left: how many ranks survive per layer and projection; a dip marks a layer whose delta has "
                      "a concentrated spectrum (few ranks carry it). Right: the bytes per layer, stacked by "
                      "projection; MLP projections dominate because they are the largest matrices.",
    "scaling_difference": "Eq. 5 splits each rank's error into σᵢ² (left, falling with i) times the difference term "
                          "(right, one curve per width; lower curve = more bits). Rank-by-σ allocation assumes the "
                          "right panel is flat; where it is not, PrinMix moves bits to ranks whose product is "
                          "largest. Circles are the widths actually assigned: they should sit where σᵢ² × "
                          "difference is largest, not simply on the first ranks.",
    "kendall_tau.png": "τ-b near 1 (blue) means the widths follow the singular values; lower values mean the "
                       "allocation departs from σ order — expected for PrinMix, which optimises Eq. 8 rather than "
                       "σ, and impossible for low-rank. A red (negative) cell would mean wider widths on smaller "
                       "singular values and deserves a look at that matrix's Fig. 2.",
}


def _table(header: list[str] | None, rows: list[list]) -> str:
    """An HTML table; header None: no header row (key/value lists)."""
    h = "" if header is None else \
        "<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{h}<tbody>{body}</tbody></table>"


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.2e}"
    return str(v)


class Page:
    """The page being built: HTML parts in order, and the PNGs written beside it."""

    def __init__(self, out_dir: Path, title: str):
        self.out_dir, self.title, self.parts, self.files = out_dir, title, [], []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def note(self, text: str) -> None:
        self.add(f"<p class='note'>{text}</p>")

    def image(self, name: str, png: bytes | None, caption: str, look_key: str | None = None) -> None:
        """Embed a PNG (skipped when None) with its caption and its "what to look at" paragraph."""
        if png is None:
            return
        (self.out_dir / name).write_bytes(png)
        self.files.append(self.out_dir / name)
        data = base64.b64encode(png).decode("ascii")
        self.add(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                 f'<figcaption>{html.escape(caption)} (<a href="{html.escape(name)}">{html.escape(name)}</a>)'
                 f'</figcaption></figure>')
        look = LOOK_AT.get(look_key or name)
        if look:
            self.add(f"<p class='look'><b>What to look at.</b> {html.escape(look)}</p>")

    def html(self) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")

    # ------------------------------------------------------------------ sections
    def overview(self, delta, delta_path: Path, stats: list[MatrixStats], true_svd: bool) -> None:
        rank_stats = [s for s in stats if not s.sign]
        total_lin, params = delta.linear_bytes(), delta.dense_delta_params()
        widths_hist: dict[int, int] = {}
        for s in rank_stats:
            for w in s.widths_stored:
                widths_hist[w] = widths_hist.get(w, 0) + 1
        base = delta.base_fingerprint or {}
        weights, whole_params = delta.weight_bytes(), delta.whole_delta_params()
        rows = [
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
        if base.get("source"):
            rows.append(["base model", base["source"] + (f" @ {base['revision']}" if base.get("revision") else "")])
        self.add(f"<h1>prinmix report — {html.escape(delta_path.name)}</h1>")
        self.add(_table(None, rows))
        cos = [c for s in rank_stats for c in (s.match_cos or [])] if true_svd else []
        if cos:
            self.note(f"Stored ranks were matched to the true singular vectors with |cos| mean {np.mean(cos):.3f}, "
                      f"min {np.min(cos):.3f} (a low value means a rank's identity is uncertain, e.g. near-equal "
                      "singular values).")

    def evaluation(self, results: dict, source: str) -> None:
        self.add("<h2>Evaluation results</h2>")
        self.note(f"from <code>{html.escape(source)}</code>")
        rows = main_table_rows(results)
        if rows:
            self.add(_table(list(rows[0]), [[format_cell(k, v) for k, v in r.items()] for r in rows]))
        le = results.get("layer_error")
        if le:
            s = le.get("settings", {})
            groups = figures.depth_groups_with_data(le)
            self.note(f"Eq. 1 error ‖ΔW X − ΔŴ X‖² on {s.get('nsamples')}×{s.get('seqlen')} held-out tokens "
                      f"({html.escape(str(s.get('calib')))}, seed {s.get('seed')}), X = the fine-tune's inputs. all: "
                      "mean over output activations; out: mean over the top 1% |fine-tune output|; rel: ΣE² / "
                      "Σ(ΔW X)². Groups average the per-type means, as Table 15's AVG; a depth group without layers "
                      "is not shown.")
            metrics = ("all", "out", "rel")
            self.add(_table(["delta"] + [f"{g}/{m}" for g in groups for m in metrics],
                            [[label] + [_f(v[g][m]) for g in groups for m in metrics]
                             for label, v in le["summary"].items()]))
            self.image("eval_error.png", figures.fig_eval_errors(results),
                       "Eq. 1 error per depth group and delta (log scale)")
            for metric in ("all", "out"):
                rows = [[label, t] + [_f(g[x][metric]) for x in groups]
                        for label, types in le["by_type"].items() for t, g in types.items()]
                self.add(f"<details><summary>Eq. 1 error per projection type ({metric}; Table 15)</summary>"
                         + _table(["delta", "type"] + groups, rows) + "</details>")
        tasks = results.get("tasks", {}).get("results", {})
        examples = [(label, t, e) for label, r in tasks.items() for t, v in r.items()
                    for e in v.get("examples", [])[:3]]
        if examples:
            self.add("<details><summary>task examples (prompt → prediction, expected)</summary>" + _table(
                ["model", "task", "prompt", "prediction", "answer"],
                [[label, t, e["prompt"], e["prediction"], e["answer"]] for label, t, e in examples]) + "</details>")

    def bits_per_rank(self, stats: list[MatrixStats], true_svd: bool) -> None:
        rank_stats = [s for s in stats if not s.sign]
        self.add("<h2>Bits per rank (Fig. 4, C.7)</h2>")
        if rank_stats:
            self.image("widths_heatmap.png", figures.fig_width_heatmaps(rank_stats, true_svd),
                       "Width of every rank, per projection type: rows are layers, columns rank indices "
                       + ("(original SVD order of the true delta; grey = dropped)" if true_svd
                          else "(kept ranks ordered by their stored σ estimate; white = beyond a layer's kept rank)"))
        else:
            self.note("No rank structure: this delta stores sign matrices (BitDelta).")
        self.image("memory_per_width.png", figures.fig_memory_per_width(stats),
                   "Stored bytes per width and layer, per projection type (the paper's Fig. 4)")

    def rank_and_bytes(self, stats: list[MatrixStats]) -> None:
        self.add("<h2>Kept rank and bytes per layer</h2>")
        self.image("rank_bytes.png", figures.fig_rank_bytes(stats), "Kept rank (width > 0) and stored bytes per layer")
        types = figures.projection_types(stats)
        rows = []
        for layer in sorted({s.layer for s in stats if s.layer is not None}):
            sel = {s.type: s for s in stats if s.layer == layer}
            rows.append([layer] + [("sign" if sel[t].sign else sel[t].kept_rank) if t in sel else "-" for t in types]
                        + [f"{sum(s.nbytes for s in sel.values()):,}"])
        if rows:
            self.add(_table(["layer"] + [f"{t} rank" for t in types] + ["bytes"], rows))

    def scaling_difference(self, stats: list[MatrixStats], names: list[str], differences: dict,
                           diff_widths: list[int]) -> None:
        by_name = {s.name: s for s in stats}
        shown = [n for n in names if n in by_name and by_name[n].widths_by_index]
        if not shown:
            return
        self.add("<h2>“Scaling” and “difference” terms (Fig. 2)</h2>")
        self.note("Eq. 5: eᵢ = σᵢ² · ΔVᵢ XXᵀ ΔVᵢᵀ. Left: the scaling term of every rank, coloured by the width the "
                  "delta gave it. Right: the difference term per candidate width, ΔVᵢ = Vᵢ − GPTQ_b(Vᵢ), with XXᵀ "
                  "the fine-tune's inputs on held-out text divided by the token count; circles mark the assigned "
                  "width.")
        for k, name in enumerate(shown):
            self.image(f"scaling_difference_{k}.png",
                       figures.fig_scaling_difference(by_name[name], differences.get(name), diff_widths),
                       f"{name}: scaling σᵢ² and difference terms", look_key="scaling_difference" if k == 0 else "-")

    def kendall(self, stats: list[MatrixStats], true_svd: bool) -> None:
        rank_stats = [s for s in stats if not s.sign]
        self.add("<h2>Kendall τ between widths and singular values (C.7)</h2>")
        self.note("τ-b (scipy) of the width sequence against the singular-value sequence, over "
                  + ("all ranks of the true delta (dropped ranks have width 0)" if true_svd else "the kept ranks")
                  + ". Ties make τ-b &lt; 1 even for an allocation that follows σ exactly, so γ = (C−D)/(C+D) and "
                  "the number D of discordant pairs (a smaller-σ rank given more bits than a larger-σ one) are shown "
                  "too: D = 0 ⇔ widths follow σ alone.")
        self.image("kendall_tau.png", figures.fig_kendall(rank_stats), "Kendall τ-b per matrix")
        taus = [s.tau for s in rank_stats if s.tau is not None]
        if taus:
            n_disc = sum(1 for s in rank_stats if s.discordant)
            self.add(f"<p>τ-b over {len(taus)} matrices: mean {np.mean(taus):.3f}, min {np.min(taus):.3f}, max "
                     f"{np.max(taus):.3f}; {n_disc} of them give some later rank more bits than an earlier one "
                     "(D &gt; 0).</p>")
        if rank_stats:
            rows = [[s.name, s.kept_rank, _f(s.tau), _f(s.gamma), _f(s.discordant), s.tau_over,
                     _f(float(np.mean(s.match_cos))) if s.match_cos else "-"] for s in rank_stats]
            self.add("<details><summary>per matrix</summary>" + _table(
                ["matrix", "kept rank", "τ-b", "γ", "discordant pairs", "over", "mean match |cos|"], rows)
                + "</details>")
