"""Eq. 5 of the PrinMix paper: the weighted error of every rank at every candidate width, simulated.

E[i, j] = σᵢ² · ΔVᵢ H ΔVᵢᵀ with ΔV = V − GPTQ_{b_j}(V): what quantising rank i's row of V to width b_j
costs in the output error ‖(ΔW − ΔŴ) X‖², the error matrix the allocation (Eq. 8) minimises over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq import GPTQLayout, gptq_quantize, prepare_hessian
from .prinmix_config import PrinMixConfig
from .quantize import dequantize_codes

__all__ = ["SIM_CHUNK_BYTES", "WidthSimulation", "simulate_width_errors"]

SIM_CHUNK_BYTES = 1 << 30  # float32 rows of stacked V per GPTQ call in the width simulation


@dataclass
class WidthSimulation:
    """GPTQ of V at every non-zero candidate width: codes uint8 [nb·r, h_in] (width k's rows at k·r..),
    scale/zero [nb·r, n_groups], column groups; dequantised rows are rebuilt on demand (rows())."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_bounds: list[tuple[int, int]]

    def rows(self, index: torch.Tensor):
        """(dequant float32, codes, scale, zero) of the given stacked rows; dequant is bit-identical to
        GPTQ's own (dequantize_codes of the same codes and params)."""
        codes, scale, zero = self.codes[index], self.scale[index], self.zero[index]
        sizes = torch.tensor([e - s for s, e in self.group_bounds], device=codes.device)
        dequant = dequantize_codes(codes, scale.repeat_interleave(sizes, dim=1), zero.repeat_interleave(sizes, dim=1))
        return dequant, codes, scale, zero


def simulate_width_errors(S: torch.Tensor, Vh: torch.Tensor, H: torch.Tensor, widths, cfg: PrinMixConfig,
                          chunk_bytes: int | None = None, rank_iso: torch.Tensor | None = None,
                          H_quant: torch.Tensor | None = None):
    """E[i, j] = σᵢ² · ΔVᵢ H ΔVᵢᵀ for every rank i and candidate width j (Eq. 5), ΔV = V − GPTQ_b(V).

    rank_iso [r] (row-weighted objective, see compress_prinmix): E[i, j] += σᵢ² ρᵢ ‖ΔVᵢ‖², ρᵢ = Σ_t c_t U_ti².
    H_quant: the Hessian GPTQ quantises V with (default H).

    GPTQ quantises V stacked once per non-zero width (rows are independent under a shared H, so this
    equals one run per width), in as few calls as fit `chunk_bytes` of float32 rows each, all sharing
    one factorisation of H; only codes and scales are kept (a 70B down_proj: 7 × 8192 × 28672 rows
    would be 6.6 GB of float32 per copy). chunk_bytes None: the module's SIM_CHUNK_BYTES.
    Returns (E float64 [r, nb], WidthSimulation, nonzero widths).
    """
    chunk_bytes = SIM_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    r, h_in = Vh.shape
    nonzero = [b for b in widths if b > 0]
    column = {b: j for j, b in enumerate(widths)}
    E = torch.zeros(r, len(widths), dtype=torch.float64)
    sigma2 = S.double() ** 2

    iso = None if rank_iso is None else rank_iso.to(device=Vh.device, dtype=torch.float64)
    H_quant = H if H_quant is None else H_quant

    def weighted(dV: torch.Tensor) -> torch.Tensor:  # σᵢ² · ΔVᵢ (H + ρᵢ I) ΔVᵢᵀ per rank
        quad = ((dV @ H) * dV).sum(1).double()
        if iso is not None:
            quad = quad + iso * (dV * dV).sum(1).double()
        return (sigma2.to(quad.device) * quad).cpu()

    if 0 in column:  # a dropped rank's error is all of it: ΔV = V
        E[:, column[0]] = weighted(Vh)
    sim = None
    if nonzero and r:
        prepared = prepare_hessian(H_quant, cfg.percdamp)
        per_call = max(1, chunk_bytes // max(1, 4 * r * h_in))
        parts = []
        for c in range(0, len(nonzero), per_call):
            chunk = nonzero[c:c + per_call]
            row_bits = torch.tensor(chunk, device=Vh.device).repeat_interleave(r)
            res = gptq_quantize(Vh.repeat(len(chunk), 1), H_quant, row_bits, layout=GPTQLayout.ROWS,
                                group_size=cfg.v_group, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                                clip_search=cfg.clip_search, prepared=prepared)
            for k, b in enumerate(chunk):
                E[:, column[b]] = weighted(Vh - res.dequant[k * r:(k + 1) * r])
            parts.append((res.codes, res.scale, res.zero))
            bounds = res.group_bounds
            del res
        sim = WidthSimulation(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                              torch.cat([p[2] for p in parts]), bounds)
    return E.clamp_min(0.0), sim, nonzero
