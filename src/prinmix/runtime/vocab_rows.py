"""A tenant's compressed embedding / lm_head rows, served from the packed form (no dense per-tenant copy).

The delta file stores the changed rows R of a vocabulary matrix [V, d] as one compressed delta
ΔŴ_R [n, d] (PackedLinear: rank blocks ΔŴ_R = Σ_b Û_b diag(σ_b) V̂_b, or BitDelta signs), plus exact
rows (added vocabulary) apart. Serving needs two things of it:
    lookup  rows ΔŴ_R[p] for the positions p of the batch's tokens in R: `gather_rows` reads just the
            codes of those rows of Û (or of the sign bits) from the packed stream, dequantises them and
            multiplies by V̂ — a [T, k] × [k, d] product, never the [n, d] matrix
    head    logits[:, R] += h ΔŴ_Rᵀ: the same shrink/expand product as any DeltaLinear (`delta_rows`)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..algorithms.compressed_linear import FLOAT_BITS
from .packed import PackedLinear, PackedMatrix
from .packed_kernel import PackedTable, add_packed_deltas, add_packed_rows, supported


def packed_codes_at(data: torch.Tensor, bits: int, flat_index: torch.Tensor) -> torch.Tensor:
    """Codes (int64) at the given flat positions of a packed stream of `bits`-bit codes (LSB first,
    packing.py's layout): code i occupies bits [i·b, (i+1)·b), so it spans at most two bytes. A code in
    the stream's last byte lies within it, so its second byte (clamped to that byte) is masked away."""
    offset = flat_index.to(torch.int64) * bits
    byte, shift = offset >> 3, offset & 7
    second = (byte + 1).clamp(max=data.numel() - 1)
    word = data[byte].to(torch.int64) | (data[second].to(torch.int64) << 8)
    return (word >> shift) & ((1 << bits) - 1)


def sorted_positions(index: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos, hit) of tokens [T] in a sorted, non-empty index [n]: index[pos[t]] == tokens[t] where hit[t]."""
    pos = torch.searchsorted(index, tokens).clamp(max=index.numel() - 1)
    return pos, index[pos] == tokens


def values_at(m: PackedMatrix, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Dequantised entries m[rows, cols] (broadcast index tensors) as float32, read from the packed codes."""
    rows, cols = torch.broadcast_tensors(rows.to(torch.int64), cols.to(torch.int64))
    if m.bits == FLOAT_BITS:
        return m.data[rows, cols].to(torch.float32)
    codes = packed_codes_at(m.data, m.bits, rows * m.cols + cols).to(torch.float32)
    g = cols // m.group
    return m.scale[rows, g].to(torch.float32) * (codes - m.zero[rows, g].to(torch.float32))


def gather_rows(p: PackedLinear, positions: torch.Tensor) -> torch.Tensor:
    """ΔŴ[positions] [T, h_in] float32 of a packed [h_out, h_in] delta, reading only those rows' codes."""
    h_in = p.shape[1]
    pos = positions.to(torch.int64)
    if p.sign is not None:
        flat = pos[:, None] * h_in + torch.arange(h_in, device=pos.device)[None, :]
        bits = packed_codes_at(p.sign.bits, 1, flat)
        return (bits.to(torch.float32) * 2 - 1) * p.sign.scale.float()
    out = torch.zeros(pos.numel(), h_in, device=pos.device)
    for b in p.blocks:
        k = torch.arange(b.rank, device=pos.device)
        if b.u_transposed:                                        # stored [k, h_out]
            u = values_at(b.u, k[None, :], pos[:, None])
        else:                                                     # stored [h_out, k]
            u = values_at(b.u, pos[:, None], k[None, :])
        if b.sigma is not None:
            u = u * b.sigma.float()[None, :]
        out += u @ b.v_matrix()
    return out


def delta_rows(p: PackedLinear, xs: torch.Tensor) -> torch.Tensor:
    """xs ΔŴᵀ [n, h_out] float32 (xs [n, h_in]): shrink by V̂, expand by Û (or the signs)."""
    h_out = p.shape[0]
    if p.sign is not None:
        return xs @ gather_rows(p, torch.arange(h_out, device=xs.device)).T
    out = torch.zeros(xs.shape[0], h_out, device=xs.device)
    for b in p.blocks:
        t = xs @ b.v_matrix().T
        if b.sigma is not None:
            t = t * b.sigma.float()
        out += t @ b.u_matrix().T
    return out


@dataclass
class VocabPayload:
    """One tenant's rows of a vocabulary matrix: compressed delta of rows `index` (sorted int64 [n]) and
    exact replacement rows (`exact_index` sorted [m], `exact_values` [m, d]; added vocabulary) — either may
    be empty."""

    index: torch.Tensor
    packed: PackedLinear | None
    exact_index: torch.Tensor
    exact_values: torch.Tensor
    _table: PackedTable | None = field(default=None, init=False, repr=False, compare=False)   # packed_kernel's

    def nbytes(self) -> int:
        packed = self.packed.resident_bytes if self.packed is not None else 0
        return packed + 8 * (self.index.numel() + self.exact_index.numel()) \
            + self.exact_values.numel() * self.exact_values.element_size()

    def to(self, device) -> "VocabPayload":
        return VocabPayload(self.index.to(device), None if self.packed is None else self.packed.to(device),
                            self.exact_index.to(device), self.exact_values.to(device))

    def lookup(self, tokens: torch.Tensor, base_rows: torch.Tensor, factors=None) -> torch.Tensor:
        """The tenant's embedding rows of `tokens` [T], given the base's rows [T, d] of those tokens.
        `factors`: the compressed rows' cached factors (runtime/factor_cache.py; None, or factors without row
        access (Int4Factors), = from the packed codes)."""
        out = base_rows.float()
        if self.packed is not None and self.index.numel():
            pos, hit = sorted_positions(self.index, tokens)
            if hit.any():
                out[hit] += factors.rows(pos[hit]) if factors is not None and factors.has_rows \
                    else gather_rows(self.packed, pos[hit])
        if self.exact_index.numel():
            pos, hit = sorted_positions(self.exact_index, tokens)
            out[hit] = self.exact_values[pos[hit]].float()
        return out

    def head(self, h: torch.Tensor, base_logits: torch.Tensor, bias: torch.Tensor | None,
             factors=None) -> torch.Tensor:
        """The tenant's logits for hidden rows h [n, d], given the base's logits [n, V]. `factors`: the
        compressed rows' cached factors (runtime/factor_cache.py; None = from the packed codes in torch)."""
        out = base_logits.float()
        if self.packed is not None and self.index.numel():
            if factors is not None:
                delta = factors.apply(h.to(factors.input_dtype)).float()
            else:
                delta = delta_rows(self.packed, h.float())
            out[:, self.index] += delta
        if self.exact_index.numel():
            out[:, self.exact_index] = torch.nn.functional.linear(
                h.float(), self.exact_values.float(), None if bias is None else bias[self.exact_index].float())
        return out

    # ---- in place, by the packed C++ kernel (runtime/packed_kernel.py) ------------------------------
    def kernel_table(self) -> PackedTable | None:
        """The packed kernel's table of the compressed rows (built once), None where there are none or the kernel
        does not take their layout (then lookup / head run)."""
        if self.packed is None or not self.index.numel() or not supported(self.packed):
            return None
        if self._table is None:
            self._table = PackedTable.build({0: self.packed})
        return self._table

    def lookup_into(self, ids: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> None:
        """`lookup` in place: out[rows] (the base's embedding rows of tokens ids[rows]; out [N, d], ids [N],
        contiguous) become the tenant's, each entry rounded once as lookup's result cast to out's dtype. Needs
        kernel_table()."""
        tokens = ids.index_select(0, rows)
        pos, hit = sorted_positions(self.index, tokens)
        if hit.any():
            pos_hit, rows_hit = pos[hit], rows[hit]
            add_packed_rows(pos_hit, out, rows_hit, [(0, pos_hit.numel(), 0)], self.kernel_table())
        if self.exact_index.numel():
            pos, hit = sorted_positions(self.exact_index, tokens)
            out[rows[hit]] = self.exact_values[pos[hit]].to(out.dtype)

    def head_into(self, h: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> None:
        """`head` in place: logits[rows] (the base's; logits [N, V], h [N, d], contiguous) become the tenant's,
        each entry rounded once as head's result cast to logits' dtype — no [n, V] float32 copy. Needs
        kernel_table()."""
        add_packed_deltas(h, logits, rows, [(0, rows.numel(), 0)], self.kernel_table(), cols=self.index)
        if self.exact_index.numel():
            exact = torch.nn.functional.linear(
                h.index_select(0, rows).float(), self.exact_values.float(),
                None if bias is None else bias[self.exact_index].float())
            logits[rows[:, None], self.exact_index[None, :]] = exact.to(logits.dtype)
