"""GPTQ (Frantar et al., 2022) with mixed per-row or per-column bit widths.

Quantises W [rows, cols] to Ŵ minimising the layer-output error

    ‖(W − Ŵ) X‖²_F = tr((W − Ŵ) H (W − Ŵ)ᵀ),   H = X Xᵀ [cols, cols]          (paper Eq. 2 / Eq. 4)

one column at a time: column j is rounded, and its error is spread over the not-yet-quantised
columns by the OBQ update  W[:, F] −= (w_j − q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_{j,F}.  As in the paper,
the rows [H_F⁻¹]_{j, j:} / sqrt([H_F⁻¹]_jj) for all j are read off one upper Cholesky factor of H⁻¹,
and updates are applied lazily per block of `blocksize` columns (one matmul per block).

Rows of W never interact (they share H), so a row's result does not depend on the other rows:
quantising [V; V; V] with three widths in one call equals three calls. PrinMix uses this to
simulate all candidate widths at once.

Float32 compute on w's device. Quantiser and storage contract: see quantize.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import Enum

import torch

from .quantize import bits_per_row, dequantize_codes, group_bounds, minmax_params, quantize_to_codes


class GPTQLayout(Enum):
    """Which axis of w [rows, cols] carries the widths (bits) and which the (scale, zero) pairs — the three
    layouts GPTQ supports here (per-column scales need per-column widths and no column groups):

    ROWS: widths per row, scales per (row, column group) — V̂ (PrinMix, Delta-CoMe).
    COLUMN_BITS: widths per column, scales per (row, column group) — Delta-CoMe's Û.
    COLUMNS: widths and one (scale, zero) per column over all rows — PrinMix's Û (H_U = V̂ H V̂ᵀ).
    """

    ROWS = ("row", "row")
    COLUMN_BITS = ("col", "row")
    COLUMNS = ("col", "col")

    @property
    def bits_axis(self) -> str:
        return self.value[0]

    @property
    def scale_axis(self) -> str:
        return self.value[1]


@dataclass
class GPTQResult:
    """codes uint8 [rows, cols]; scale, zero float32: [rows, n_groups] (scale_axis "row") or [cols]
    (scale_axis "col"), scale float16-representable, zero integer in [0, 2**bits - 1];
    dequant float32 [rows, cols] == dequantize_codes(codes, *element_params()) bit for bit;
    bits int64 [rows] or [cols] (per bits_axis); group_bounds: the column ranges (start, end) of the
    scale groups ([(j, j + 1), ...] for scale_axis "col")."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    dequant: torch.Tensor
    bits: torch.Tensor
    group_bounds: list[tuple[int, int]]
    bits_axis: str = "row"
    scale_axis: str = "row"

    def element_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) broadcastable to [rows, cols]: one entry per weight (row mode) or [1, cols]."""
        if self.scale_axis == "col":
            return self.scale.unsqueeze(0), self.zero.unsqueeze(0)
        sizes = torch.tensor([e - s for s, e in self.group_bounds], device=self.scale.device)
        return (self.scale.repeat_interleave(sizes, dim=1), self.zero.repeat_interleave(sizes, dim=1))


def _column_groups(cols: int, group_size: int | None, groups) -> list[tuple[int, int]]:
    if groups is None:
        return group_bounds(cols, group_size)
    if group_size is not None:
        raise ValueError("give either group_size or groups, not both")
    bounds = [(int(s), int(e)) for s, e in groups]
    expected_start = 0
    for s, e in bounds:
        if s != expected_start or e <= s:
            raise ValueError(f"groups must be contiguous non-empty (start, end) ranges covering [0, {cols}), "
                             f"got {bounds}")
        expected_start = e
    if expected_start != cols:
        raise ValueError(f"groups cover [0, {expected_start}), expected [0, {cols})")
    return bounds


def prepare_hessian(H: torch.Tensor, percdamp: float = 0.01, device=None):
    """H's factorisation as gptq_quantize uses it (pass it as `prepared=` to reuse it across calls that
    share H and percdamp): (upper Cholesky factor of (H + damp·I)⁻¹, diag H, dead mask)."""
    return _inverse_hessian_cholesky(H, H.shape[0], percdamp, device if device is not None else H.device)


def _inverse_hessian_cholesky(H: torch.Tensor, cols: int, percdamp: float, device):
    """Upper Cholesky factor of (H + damp·I)⁻¹ [cols, cols], diag(H) with dead entries set to 1, dead mask.

    Dead inputs (H_jj == 0) get H_jj = 1 (their weights are zeroed by the caller). damp =
    percdamp · mean(diag H). If float32 Cholesky still fails, damping grows tenfold (with a warning).
    Memory: at most two [cols, cols] float32 matrices besides H itself (3.3 GB each at cols = 28672),
    each intermediate is released as soon as the next one exists.
    """
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"H must be [{cols}, {cols}], got {tuple(H.shape)}")
    H_diag = H.diagonal().to(device=device, dtype=torch.float32, copy=True)
    dead = H_diag == 0
    H_diag[dead] = 1.0
    mean_diag = H_diag.mean()
    damp = percdamp * mean_diag
    for attempt in range(4):
        damped = H.to(device=device, dtype=torch.float32, copy=True)
        damped.diagonal()[dead] = 1.0
        damped.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0:
                return U, H_diag, dead
        if attempt == 3:
            break
        new_damp = 10 * damp if damp > 0 else 0.01 * mean_diag
        warnings.warn(f"GPTQ: damped H is not positive definite in float32; damping raised to "
                      f"{float(new_damp / mean_diag):g} x mean(diag H)", RuntimeWarning, stacklevel=3)
        damp = new_damp
    raise ValueError("GPTQ: H is not positive definite even with 1000x more damping (does it hold NaN/Inf?)")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits, *, layout: GPTQLayout = GPTQLayout.ROWS,
                  group_size: int | None = None, groups=None, blocksize: int = 128, percdamp: float = 0.01,
                  clip_search: bool = False, prepared=None) -> GPTQResult:
    """GPTQ-quantise w [rows, cols] under H = XXᵀ [cols, cols] (symmetric PSD, not modified).

    layout: which axis carries the widths and which the scales (GPTQLayout; bits_axis/scale_axis below).
    bits: int, or int tensor [rows] (bits_axis "row") / [cols] (bits_axis "col"); 0 = the row or
        column is dropped (quantised to exactly 0; a dropped column's error w[:, j] − 0 is still
        compensated in the later columns).
    scale_axis "row": one (scale, zero) per (row, column group); groups = [(start, end), ...]
        contiguous over [0, cols), or group_size (None = one group). A group's params are computed
        from the current, error-updated weights when GPTQ reaches its first column. With bits_axis
        "col" all columns of a group must have the same width.
    scale_axis "col" (needs bits_axis "col"): one (scale, zero) per column over all rows, from the
        column's current values when GPTQ reaches it (PrinMix's U step with H_U = V̂ H V̂ᵀ).
    blocksize: lazy-batch block; percdamp: damping as a fraction of mean(diag H); clip_search: the
        quantiser's range-shrink search (row scales: squared error weighted by diag H).
    Dead inputs (H_jj == 0) have their weights set to 0 (no information about them).
    prepared: prepare_hessian(H, percdamp, device) computed once for several calls sharing H.
    """
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D, got shape {tuple(w.shape)}")
    layout = GPTQLayout(layout)
    bits_axis, scale_axis = layout.bits_axis, layout.scale_axis
    if layout is GPTQLayout.COLUMNS and (group_size is not None or groups is not None):
        raise ValueError("GPTQLayout.COLUMNS has one scale per column: no column groups")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    rows, cols = w.shape
    device = w.device
    n_bits = rows if bits_axis == "row" else cols
    bits = torch.as_tensor(bits, device=device)
    if bits.ndim > 0 and tuple(bits.shape) != (n_bits,):
        raise ValueError(f"bits must be an int or a tensor of shape [{n_bits}] for bits_axis={bits_axis!r}, "
                         f"got shape {tuple(bits.shape)}")
    bits = bits_per_row(bits, n_bits, device)
    if scale_axis == "row":
        bounds = _column_groups(cols, group_size, groups)
    else:
        bounds = [(j, j + 1) for j in range(cols)]
    if bits_axis == "col" and scale_axis == "row":
        for s, e in bounds:
            if e > s and not bool((bits[s:e] == bits[s]).all()):
                raise ValueError(f"columns {s}..{e - 1} form one scale group but have different widths "
                                 f"{sorted(set(bits[s:e].tolist()))}")

    if prepared is None:
        prepared = _inverse_hessian_cholesky(H, cols, percdamp, device)
    Hinv, H_diag, dead = prepared
    if tuple(Hinv.shape) != (cols, cols):
        raise ValueError(f"prepared Hessian is [{Hinv.shape[0]}, {Hinv.shape[1]}], w has {cols} columns")
    W = w.to(device=device, dtype=torch.float32, copy=True)
    W[:, dead] = 0.0

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
    n_params = (rows, len(bounds)) if scale_axis == "row" else (cols,)
    scale = torch.zeros(n_params, device=device)
    zero = torch.zeros(n_params, device=device)
    result = GPTQResult(codes, scale, zero, W, bits, bounds, bits_axis, scale_axis)
    if rows == 0 or cols == 0:
        return result

    if bits_axis == "row" and not bool((bits > 0).all()):
        # Dropped rows stay 0 (codes 0, scale 0, zero 0); run GPTQ on the kept rows only.
        kept = (bits > 0).nonzero().squeeze(1)
        W_kept, codes_kept = W[kept], codes[kept]
        scale_kept, zero_kept = scale[kept], zero[kept]
        if kept.numel():
            _gptq_columns(W_kept, Hinv, H_diag, bits[kept], bits_axis, scale_axis, bounds, blocksize,
                          clip_search, codes_kept, scale_kept, zero_kept)
        W.zero_()
        W[kept], codes[kept], scale[kept], zero[kept] = W_kept, codes_kept, scale_kept, zero_kept
    else:
        _gptq_columns(W, Hinv, H_diag, bits, bits_axis, scale_axis, bounds, blocksize, clip_search,
                      codes, scale, zero)
    return result


def _gptq_columns(W, Hinv, H_diag, bits, bits_axis, scale_axis, bounds, blocksize, clip_search,
                  codes, scale, zero) -> None:
    """The GPTQ column loop. W [rows, cols] float32 is overwritten with Ŵ (the dequantised values);
    codes, scale, zero (zero-initialised, shapes as in GPTQResult) are filled in.

    Hinv: upper Cholesky factor of H⁻¹ [cols, cols]; H_diag [cols] weights clip_search's error.
    """
    cols = W.shape[1]
    group_at = {s: g for g, (s, _) in enumerate(bounds)} if scale_axis == "row" else {}  # first col -> group

    # Blocks also start at every group start, so that when a group begins all earlier errors have
    # been applied to W (the lazy update of the previous block is done) and its params see the
    # current weights.
    starts = sorted(set(range(0, cols, blocksize)) | set(group_at))
    for b1, b2 in zip(starts, starts[1:] + [cols]):
        W1 = W[:, b1:b2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            j = b1 + i
            if scale_axis == "row":
                if j in group_at:                                     # then i == 0: W is current
                    g = group_at[j]
                    gs, ge = bounds[g]
                    group_bits = bits if bits_axis == "row" else bits[gs]
                    col_scale, col_zero = minmax_params(W[:, gs:ge], group_bits, clip_search=clip_search,
                                                        H_diag=H_diag[gs:ge])
                    scale[:, g], zero[:, g] = col_scale, col_zero
            else:
                col_scale, col_zero = minmax_params(W1[:, i].unsqueeze(0), bits[j], clip_search=clip_search)
                scale[j], zero[j] = col_scale[0], col_zero[0]
            col_bits = bits if bits_axis == "row" else bits[j]

            w_col = W1[:, i]
            c = quantize_to_codes(w_col, col_scale, col_zero, col_bits)
            q = dequantize_codes(c, col_scale, col_zero)
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i + 1:].addr_(err, Hinv1[i, i + 1:], alpha=-1.0)  # OBQ update within the block
            W1[:, i] = q
            Err1[:, i] = err
            codes[:, j] = c
        W[:, b1:b2] = W1
        W[:, b2:].addmm_(Err1, Hinv[b1:b2, b2:], alpha=-1.0)          # lazy batch update of later columns
