"""The numbers behind `prinmix report`: per-matrix width/σ analysis, Kendall τ, and Fig. 2's terms.

Where σ and the rank order come from (the delta file stores only each kept rank's width, in stored
order — widest block first — and the factors ΔŴ = B A with Σ folded into B; the compressor's
diagnostics such as the original rank index are not stored):

* with BASE and FT: the SVD of the true delta ΔW = W_ft − W_base gives every singular value σᵢ
  (i = original rank index, σ descending). Each stored rank is matched to the original rank whose
  right singular vector Vᵢ is closest to its stored row Âⱼ (|cosine|, a one-to-one assignment); ranks
  not stored get width 0. τ is then taken over all min(h_out, h_in) ranks, as in C.7. The difference
  term uses X = the fine-tune's inputs to that linear on held-out text (seed 1234):
  difference(i, b) = ΔVᵢ(b) H ΔVᵢ(b)ᵀ with H = XXᵀ / n_tokens and ΔVᵢ(b) = Vᵢ − GPTQ_b(Vᵢ), exactly the
  compressor's simulation (prinmix.algorithms.width_simulation.simulate_width_errors) divided by σᵢ².
* without them: σⱼ is estimated from the stored factors as ‖B₍:,ⱼ₎‖·‖Âⱼ‖, the kept ranks are ordered
  by that estimate, τ is taken over the kept ranks only, and the difference term is not shown.

Kendall τ is scipy's τ-b. The width sequence has many ties, so τ-b stays below 1 even when widths
never increase with the rank index; the page therefore also gives γ = (C − D)/(C + D) and D, the
number of discordant pairs (a rank with a smaller σ given strictly more bits than a rank with a
larger σ): D = 0 (γ = 1) exactly when the allocation follows σ alone, Delta-CoMe's assumption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoTokenizer

from ...algorithms.compressed_linear import block_nbytes
from ...algorithms.prinmix_config import DEFAULT_WIDTHS, PrinMixConfig
from ...algorithms.width_simulation import simulate_width_errors
from ...calibration.data import load_calibration
from ...calibration.decoder_stack import DecoderStack
from ...calibration.hessians import capture_hessians
from ...errors import PrinmixError
from ..layer_error import layer_index_of, projection_type

__all__ = ["MatrixStats", "concordance", "analyse_delta", "heldout_hessians", "default_fig2_matrices",
           "difference_terms", "candidate_widths", "FLOAT_BITS"]

FLOAT_BITS = 16  # a width of 16 bits marks a rank kept in fp16 (low-rank's factors)


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
    from scipy.stats import kendalltau  # scipy's submodules take seconds to import: loaded on use

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


def heldout_hessians(ft_r, names: list[str], calib=None, nsamples=8, seqlen=256, seed=1234, device="cpu",
                     batch_size=4) -> dict[str, torch.Tensor]:
    """{weight name: XXᵀ / n_tokens} of the fine-tune's inputs to those linears on held-out windows."""
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


def candidate_widths(delta) -> list[int]:
    """The nonzero candidate widths the compressor chose from (PrinMix's stored config, else the defaults)."""
    cfg = (delta.params.get("config") or {}) if delta.method == "prinmix" else {}
    return [b for b in sorted(cfg.get("widths") or DEFAULT_WIDTHS) if b > 0]


def difference_terms(delta, svds: dict, hessians: dict, device) -> dict[str, np.ndarray]:
    """{name: [rank, width] array} of Fig. 2's difference term ΔVᵢ(b) H ΔVᵢ(b)ᵀ per candidate width b.

    svds: {name: (S [r], Vh [r, h_in])} of the true ΔW; hessians: {name: H = XXᵀ / n_tokens [h_in, h_in]}.
    Uses the compressor's own simulation (Eq. 5's eᵢ = σᵢ² · difference) divided by σᵢ², with the
    delta's stored PrinMix settings (group size, damping…) so the curves are those it optimised.
    """
    cfg_dict = (delta.params.get("config") or {}) if delta.method == "prinmix" else {}
    cfg = PrinMixConfig(**{k: v for k, v in cfg_dict.items() if k in PrinMixConfig.__dataclass_fields__}) \
        if cfg_dict else PrinMixConfig()
    diff_widths = candidate_widths(delta)
    cfg.widths = tuple(sorted(set(diff_widths) | {0}))
    cols = [cfg.widths.index(b) for b in diff_widths]
    out = {}
    for name, (S, Vh) in svds.items():
        if name not in hessians:
            continue
        E, _, _ = simulate_width_errors(S.to(device), Vh.to(device), hessians[name].to(device), cfg.widths, cfg)
        s2 = (S.double() ** 2).clamp_min(1e-300)[:, None]
        out[name] = (E[:, cols].cpu() / s2).numpy()
    return out
