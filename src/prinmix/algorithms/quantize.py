"""Asymmetric uniform min-max quantiser (per row, optionally per column group).

    code  = clamp(round(w / scale) + zero, 0, 2**bits - 1)        (uint8)
    w_hat = scale * (code - zero)                                   (float32)

Storage contract: scale is stored as float16 and zero as uint8 in [0, 2**bits - 1]. The quantiser
therefore *computes with* the float16 value of the scale (rounded up, so the range [min, max] stays
covered and |w - w_hat| <= scale/2 without clipping) and with the integer zero point; dequantising
the stored values reproduces w_hat bit for bit.

Range choice: the range always includes 0, i.e. [min(x_min, 0), max(x_max, 0)], as in GPTQ's
reference quantiser. This makes the integer zero point land in [0, 2**bits - 1] by construction (so
it fits the uint8 field without clamping) and makes 0 exactly representable (code == zero), which
keeps dead/zeroed weights exactly 0.

Scale guards: scale is clamped to float16's positive range [2**-24, 65504]. An all-zero row gets
the smallest scale, zero 0, codes 0 and dequantises to exact zeros; a tiny row gets a (possibly
subnormal) float16 scale and keeps |w - w_hat| <= scale/2. Ranges wider than 65504 * (2**bits - 1)
saturate (codes clamp). Width 0 means "dropped": scale 0, zero 0, codes 0, w_hat 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_MIN_SCALE = 2.0 ** -24     # smallest positive (subnormal) float16
FP16_MAX_SCALE = 65504.0        # largest finite float16


@dataclass
class QuantizedValues:
    """Round-to-nearest result. codes uint8 [rows, cols]; scale, zero float32 [rows, n_groups]
    (scale float16-representable, zero integer-valued); bits int64 [rows]; group_size: columns per
    group (the last group may be shorter; equals cols when there is one group)."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: torch.Tensor
    group_size: int


def bits_per_row(bits, rows: int, device) -> torch.Tensor:
    """Bit widths as int64 [rows] from an int or an int tensor [rows]; checks 0 <= bits <= 8."""
    bits = torch.as_tensor(bits, device=device)
    if bits.dtype.is_floating_point or bits.dtype == torch.bool:
        raise TypeError(f"bits must be integer, got {bits.dtype}")
    if bits.numel() and (int(bits.min()) < 0 or int(bits.max()) > 8):
        raise ValueError(f"bit widths must lie in 0..8, got range [{int(bits.min())}, {int(bits.max())}]")
    return bits.long().expand(rows).contiguous()


def max_code(bits) -> torch.Tensor:
    """2**bits - 1 as float32 (same shape as bits)."""
    return (2 ** torch.as_tensor(bits).long() - 1).float()


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 value >= x (x clamped to [2**-24, 65504]), returned as float32."""
    x = x.float().clamp(FP16_MIN_SCALE, FP16_MAX_SCALE)
    h = x.half()
    below = h.float() < x                                   # rounded down: step one fp16 ulp up
    h_up = (h.view(torch.int16) + 1).view(torch.float16)    # x > 0, so +1 on the bit pattern is nextafter
    return torch.where(below, h_up, h).float()


def _params_from_range(x_min: torch.Tensor, x_max: torch.Tensor, top: torch.Tensor):
    """(scale, zero) float32 [rows] for ranges [x_min <= 0, x_max >= 0], top = 2**bits - 1 [rows]
    (top 0 -> dropped -> (0, 0))."""
    scale = fp16_ceil((x_max - x_min) / top.clamp(min=1))
    zero = torch.minimum(torch.round(-x_min / scale).clamp(min=0), top) + 0.0   # + 0.0: no -0
    dropped = top == 0
    return scale.masked_fill(dropped, 0.0), zero.masked_fill(dropped, 0.0)


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits) -> torch.Tensor:
    """codes = clamp(round(w / scale) + zero, 0, 2**bits - 1) as uint8.

    scale, zero, bits (int or int tensor) broadcast against w (e.g. [rows, 1]). scale == 0 (dropped)
    gives code 0 (with zero == 0 that dequantises to 0)."""
    top = max_code(torch.as_tensor(bits, device=w.device))
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w.float() / safe_scale) + zero
    q = torch.minimum(q.clamp(min=0), top)
    return q.masked_fill(scale == 0, 0).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = scale * (codes - zero), float32; scale/zero broadcast against codes."""
    return (codes.float() - zero) * scale


def minmax_params(w: torch.Tensor, bits, clip_search: bool = False, clip_grid: int = 20,
                  clip_min: float = 0.5, H_diag: torch.Tensor | None = None):
    """Per-row (scale, zero) for w [rows, cols] at widths bits (int or int tensor [rows]).

    Range [min(row_min, 0), max(row_max, 0)]. With clip_search the range is shrunk by factors
    p = 1, 1 - 1/clip_grid, ..., down to clip_min, and each row keeps the p with the smallest
    squared error sum_j d_j (w_j - w_hat_j)^2 (d = H_diag [cols] if given, else 1) -- GPTQ's "mse"
    option. p = 1 is always a candidate and ties keep the larger range, so clipping never increases
    that error. Returns scale float32 [rows] (float16-representable) and zero float32 [rows]
    (integers in [0, 2**bits - 1]); rows with width 0 get (0, 0).
    """
    w = w.float()
    rows = w.shape[0]
    bits = bits_per_row(bits, rows, w.device)
    top = max_code(bits)
    if w.shape[1] == 0:
        x_min = x_max = torch.zeros(rows, device=w.device)
    else:
        x_min = w.amin(dim=1).clamp(max=0)
        x_max = w.amax(dim=1).clamp(min=0)
    scale, zero = _params_from_range(x_min, x_max, top)
    if not clip_search or w.shape[1] == 0:
        return scale, zero

    weight = torch.ones(w.shape[1], device=w.device) if H_diag is None else H_diag.to(w.device).float()
    def weighted_error(s, z):
        w_hat = dequantize_codes(quantize_to_codes(w, s[:, None], z[:, None], bits[:, None]), s[:, None], z[:, None])
        return ((w_hat - w).square() * weight).sum(dim=1)

    best_err = weighted_error(scale, zero)
    for i in range(1, int(round((1.0 - clip_min) * clip_grid)) + 1):
        p = 1.0 - i / clip_grid
        s, z = _params_from_range(p * x_min, p * x_max, top)
        err = weighted_error(s, z)
        better = err < best_err
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        best_err = torch.where(better, err, best_err)
    return scale, zero


def group_bounds(cols: int, group_size: int | None) -> list[tuple[int, int]]:
    """Contiguous column groups [(start, end), ...] covering [0, cols); None -> one group."""
    if group_size is None or cols == 0:
        return [(0, cols)]
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return [(s, min(s + group_size, cols)) for s in range(0, cols, group_size)]


def quantize_rtn(w: torch.Tensor, bits, group_size: int | None = None,
                 clip_search: bool = False) -> QuantizedValues:
    """Round-to-nearest quantisation of w [rows, cols], params per (row, column group).

    bits: int or int tensor [rows] (0 = dropped row). group_size None -> one group of all columns.
    """
    w = w.float()
    rows, cols = w.shape
    bits_row = bits_per_row(bits, rows, w.device)
    bounds = group_bounds(cols, group_size)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    scale = torch.zeros(rows, len(bounds), device=w.device)
    zero = torch.zeros(rows, len(bounds), device=w.device)
    for g, (start, end) in enumerate(bounds):
        s, z = minmax_params(w[:, start:end], bits_row, clip_search=clip_search)
        codes[:, start:end] = quantize_to_codes(w[:, start:end], s[:, None], z[:, None], bits_row[:, None])
        scale[:, g], zero[:, g] = s, z
    return QuantizedValues(codes, scale, zero, bits_row, bounds[0][1] - bounds[0][0])


def dequantize(q: QuantizedValues) -> torch.Tensor:
    """float32 [rows, cols] from a QuantizedValues (group params expanded over their columns)."""
    cols = q.codes.shape[1]
    if cols == 0:
        return torch.zeros(q.codes.shape, device=q.codes.device)
    scale = q.scale.repeat_interleave(q.group_size, dim=1)[:, :cols]
    zero = q.zero.repeat_interleave(q.group_size, dim=1)[:, :cols]
    return dequantize_codes(q.codes, scale, zero)
