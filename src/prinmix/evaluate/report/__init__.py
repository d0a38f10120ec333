"""`prinmix report`: one self-contained HTML page showing where a delta's bits went.

    build_report(delta, out_dir, eval_json=None, base=None, finetuned=None, options=ReportOptions()) -> index.html

The page (images embedded as base64 data URIs; the same PNGs are written beside it; no network) has:

* widths per rank for every matrix, as a heat map over layers × rank index, one panel per projection
  type (the paper's Fig. 4 / C.7), and the bytes spent on each width per layer (Fig. 4's memory view);
* kept rank and bytes per layer;
* the σᵢ² "scaling" term and the ΔVᵢ XXᵀ ΔVᵢᵀ "difference" term per rank for a few matrices (Fig. 2);
* Kendall τ between the width sequence and the singular-value sequence of every matrix (C.7);
* the results of `prinmix eval` when its JSON is given.

Three modules, one job each: `statistics` computes the numbers (per-matrix analysis, τ, Fig. 2's
terms; see its docstring for where σ and the rank order come from), `figures` draws them, `page`
writes the HTML with a "what to look at" paragraph per figure. This module only wires them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ...calibration.data import clamp_seqlen
from ...checkpoint.apply_delta import check_base
from ...checkpoint.compatibility import check_compatible
from ...checkpoint.reader import CheckpointReader
from ...device import resolve_device
from ...errors import PrinmixError
from ...format.delta_file import load_delta
from ...format.output_safety import REPORT, check_output_directory, refuse_input_overlap, write_marker
from ..layer_error import depth_group
from ..results import load_eval_json
from .page import Page
from .statistics import (
    MatrixStats,
    analyse_delta,
    candidate_widths,
    concordance,
    default_fig2_matrices,
    difference_terms,
    heldout_hessians,
)

__all__ = ["build_report", "report_data", "ReportOptions", "analyse_delta", "MatrixStats", "concordance",
           "depth_group"]


@dataclass
class ReportOptions:
    """Settings of the true-SVD view (used only with base and finetuned) and of the Fig. 2 plots.

    calib/nsamples/seqlen: held-out text for the difference term's XXᵀ (nsamples windows of seqlen tokens,
    seed 1234; calib None = the built-in text). matrices: weight names for Fig. 2 (None = a few chosen by
    default_fig2_matrices). device: where the SVDs and the simulation run ("auto", "cpu", "cuda").
    """
    calib: str | None = None
    nsamples: int = 8
    seqlen: int = 256
    matrices: list[str] | None = field(default=None)
    device: str = "auto"


def build_report(delta_path, out_dir=None, eval_json=None, base=None, finetuned=None,
                 options: ReportOptions | None = None, log=None) -> Path:
    """Write the report page of a delta file.

    Args:
        delta_path: the delta file.
        out_dir: output directory (default: `<delta stem>-report` beside the delta); index.html and PNGs go there.
        eval_json: a results .json written by `prinmix eval -o` (its tables and Eq. 1 plot are added).
        base, finetuned: both or neither; with them σ and the rank order come from the true ΔW's SVD.
        options: ReportOptions (held-out text, Fig. 2 matrices, device).
        log: None or a callable(str) for progress messages.

    Returns:
        The path of index.html.
    """
    opts = options or ReportOptions()
    log = log or (lambda m: None)
    if importlib.util.find_spec("matplotlib") is None:  # optional (the eval extra); figures import it on use
        raise PrinmixError("prinmix report draws with matplotlib, which is not installed: "
                           "pip install 'prinmix[eval]' (or pip install matplotlib)")
    delta_path = Path(delta_path)
    delta = load_delta(delta_path)
    results = load_eval_json(eval_json) if eval_json else None
    if (base is None) != (finetuned is None):
        raise PrinmixError("base and finetuned go together (the true delta needs both)")
    dev = resolve_device(opts.device)
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

    stats, _ = analyse_delta(delta)  # stored view first: to choose the Fig. 2 matrices cheaply
    if opts.matrices:
        unknown = [n for n in opts.matrices if n not in delta.matrices]
        if unknown:
            raise PrinmixError(f"{delta_path}: no compressed matrix {unknown[0]!r} (see `prinmix info`)")
        fig2 = list(opts.matrices)
    else:
        fig2 = default_fig2_matrices(stats)
    true_svd = base_r is not None
    differences = {}
    if true_svd:
        log("SVD of the true delta of every matrix")
        stats, svds = analyse_delta(delta, base_r, ft_r, dev, keep_svd=set(fig2), log=log)
        if fig2:
            log("held-out XXᵀ for the difference term")
            seqlen = clamp_seqlen(opts.seqlen, ft_r.config)
            hessians = heldout_hessians(ft_r, fig2, opts.calib, opts.nsamples, seqlen, device=dev)
            differences = difference_terms(delta, svds, hessians, dev)

    page = Page(out_dir, f"prinmix report — {delta_path.name}")
    page.overview(delta, delta_path, stats, true_svd)
    if results is not None:
        page.evaluation(results, str(eval_json))
    page.bits_per_rank(stats, true_svd)
    page.rank_and_bytes(stats)
    page.scaling_difference(stats, fig2, differences, candidate_widths(delta))
    page.kendall(stats, true_svd)
    index = out_dir / "index.html"
    index.write_text(page.html(), encoding="utf-8")
    return index


def report_data(delta_path, base=None, finetuned=None, device="cpu") -> list[MatrixStats]:
    """The per-matrix analysis behind the page (for scripts and tests)."""
    delta = load_delta(delta_path)
    if base is None:
        return analyse_delta(delta)[0]
    return analyse_delta(delta, CheckpointReader(base), CheckpointReader(finetuned), device)[0]
