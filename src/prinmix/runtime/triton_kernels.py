"""Triton kernels of DeltaLinear: segmented shrink / expand over tenants, codes unpacked in registers.

Operands are the stacked buffers of runtime/packed.py (all tenants of one layer in flat uint8/float16
buffers plus an int64 meta table indexed by [slot, block]); tenants are addressed by integer slot
and element offsets, never by pointers loaded from memory (so the Triton interpreter runs them too).

Rows are grouped by tenant into segments (RowGroups: `order` holds the row indices sorted by slot):
    shrink  grid (segment, block × rank tile, row tile):  t[row, off_b + j] = σ_j Σ_c x[row, c] V̂_b[j, c]
    expand  grid (segment, output tile, row tile):        y[row, n] += Σ_b Σ_j t[row, off_b + j] Û_b[n, j]
    sign    grid (segment, output tile, row tile):        y[row, n] += s Σ_c x[row, c] (2·bit[n, c] − 1)
t is float32 [n_delta_rows, max tenant rank]; accumulation is float32. fp32 inputs use IEEE dots;
fp16/bf16 inputs feed dots in their own dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .packed import (
    BITS,
    META_FIELDS,
    RANK_OFF,
    SIGMA,
    U_DATA,
    U_GROUP,
    U_NGROUPS,
    U_SCALE,
    U_T,
    U_ZERO,
    V_DATA,
    V_GROUP,
    V_NGROUPS,
    V_SCALE,
    V_ZERO,
    K,
    StackedPacks,
)


@dataclass(frozen=True)
class KernelBlocks:
    """Tile sizes (powers of two; tl.dot needs m, r, k, n ≥ 16): m rows per tile, r ranks per shrink
    tile, k input columns per shrink step, n output columns per expand / sign tile. Decode runs 1–4
    rows per tenant, so m = 16 wastes rows; benchmarks/bench_kernels.py --sweep times the choices."""

    m: int = 16
    r: int = 16
    k: int = 32
    n: int = 32

    @classmethod
    def from_env(cls) -> "KernelBlocks":
        """PRINMIX_TRITON_BLOCKS="m,r,k,n" overrides the defaults (for tuning on a new device)."""
        spec = os.environ.get("PRINMIX_TRITON_BLOCKS")
        return cls(*(int(v) for v in spec.split(","))) if spec else cls()


DEFAULT_BLOCKS = KernelBlocks.from_env()


@triton.jit
def _dequant(codes_ptr, scales_ptr, zeros_ptr, raw_ptr, rows, cols, mask, bits, ncols, data_off, scale_off,
             zero_off, group, ngroups):
    """float32 values of a stored factor at integer tiles (rows, cols): packed codes of `bits` bits
    (row-major, LSB first) with a float16 scale and uint8 zero per (row, column group), or raw
    float16 when bits == 16."""
    flat = rows * ncols + cols
    is_raw = (flat * 0 + bits) == 16           # tile-shaped conditions (the interpreter needs them so)
    raw = tl.load(raw_ptr + data_off + flat, mask=mask & is_raw, other=0.0).to(tl.float32)
    qmask = mask & (flat * 0 + bits != 16)
    bitpos = flat * bits
    byte = bitpos >> 3
    shift = bitpos & 7
    lo = tl.load(codes_ptr + data_off + byte, mask=qmask, other=0).to(tl.int64)
    hi = tl.load(codes_ptr + data_off + byte + 1, mask=qmask & (shift + bits > 8), other=0).to(tl.int64)
    code = ((lo | (hi << 8)) >> shift) & ((1 << bits) - 1)
    g = rows * ngroups + cols // group
    scale = tl.load(scales_ptr + scale_off + g, mask=qmask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + zero_off + g, mask=qmask, other=0).to(tl.float32)
    return tl.where(is_raw, raw, scale * (code.to(tl.float32) - zero))


@triton.jit
def _shrink_kernel(x_ptr, stride_x, order_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, meta_ptr, nblk_ptr,
                   codes_ptr, scales_ptr, zeros_ptr, raw_ptr, t_ptr, stride_t, h_in, max_blocks, rank_tiles,
                   NF: tl.constexpr, F_BITS: tl.constexpr, F_K: tl.constexpr, F_OFF: tl.constexpr,
                   F_DATA: tl.constexpr, F_SCALE: tl.constexpr, F_ZERO: tl.constexpr, F_GROUP: tl.constexpr,
                   F_NG: tl.constexpr, F_SIGMA: tl.constexpr,
                   BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    seg = tl.program_id(0)
    pid_br = tl.program_id(1)
    pid_m = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg).to(tl.int64)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    blk = pid_br // rank_tiles
    r_tile = pid_br % rank_tiles
    if pid_m * BM >= length:
        return
    if blk >= tl.load(nblk_ptr + slot):
        return
    meta = meta_ptr + (slot * max_blocks + blk) * NF
    k = tl.load(meta + F_K)
    if r_tile * BR >= k:
        return
    bits = tl.load(meta + F_BITS)
    rank_off = tl.load(meta + F_OFF)
    data_off = tl.load(meta + F_DATA)
    scale_off = tl.load(meta + F_SCALE)
    zero_off = tl.load(meta + F_ZERO)
    group = tl.load(meta + F_GROUP)
    ngroups = tl.load(meta + F_NG)
    sigma_off = tl.load(meta + F_SIGMA)

    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < length
    rows = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0)
    offs_r = (r_tile * BR + tl.arange(0, BR)).to(tl.int64)
    r_mask = offs_r < k
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, h_in, BK):
        offs_k = (k0 + tl.arange(0, BK)).to(tl.int64)
        k_mask = offs_k < h_in
        xt = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                     other=0.0)
        vt = _dequant(codes_ptr, scales_ptr, zeros_ptr, raw_ptr, offs_r[None, :], offs_k[:, None],
                      r_mask[None, :] & k_mask[:, None], bits, h_in, data_off, scale_off, zero_off, group, ngroups)
        if DOT_F32:
            acc += tl.dot(xt.to(tl.float32), vt, input_precision="ieee")
        else:
            acc += tl.dot(xt, vt.to(xt.dtype))
    sigma = tl.load(raw_ptr + sigma_off + offs_r, mask=r_mask & (offs_r * 0 + sigma_off >= 0), other=1.0).to(tl.float32)
    acc = acc * sigma[None, :]
    t_ptrs = t_ptr + (start + offs_m)[:, None] * stride_t + (rank_off + offs_r)[None, :]
    tl.store(t_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(t_ptr, stride_t, y_ptr, stride_y, order_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, meta_ptr,
                   nblk_ptr, codes_ptr, scales_ptr, zeros_ptr, raw_ptr, h_out, max_blocks,
                   NF: tl.constexpr, F_BITS: tl.constexpr, F_K: tl.constexpr, F_OFF: tl.constexpr,
                   F_DATA: tl.constexpr, F_SCALE: tl.constexpr, F_ZERO: tl.constexpr, F_GROUP: tl.constexpr,
                   F_NG: tl.constexpr, F_T: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DOT_F32: tl.constexpr):
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg).to(tl.int64)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    if pid_m * BM >= length:
        return
    n_blocks = tl.load(nblk_ptr + slot)
    if n_blocks == 0:
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < length
    rows = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0)
    offs_n = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    n_mask = offs_n < h_out
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for blk in range(0, n_blocks):
        meta = meta_ptr + (slot * max_blocks + blk) * NF
        bits = tl.load(meta + F_BITS)
        k = tl.load(meta + F_K)
        rank_off = tl.load(meta + F_OFF)
        data_off = tl.load(meta + F_DATA)
        scale_off = tl.load(meta + F_SCALE)
        zero_off = tl.load(meta + F_ZERO)
        group = tl.load(meta + F_GROUP)
        ngroups = tl.load(meta + F_NG)
        tr = tl.load(meta + F_T)                                            # 1: U stored [k, h_out]
        ncols = h_out * tr + k * (1 - tr)
        for r0 in range(0, k, BR):
            offs_r = (r0 + tl.arange(0, BR)).to(tl.int64)
            r_mask = offs_r < k
            tt = tl.load(t_ptr + (start + offs_m)[:, None] * stride_t + (rank_off + offs_r)[None, :],
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            u_rows = offs_r[:, None] * tr + offs_n[None, :] * (1 - tr)         # [BR, BN] index into stored U
            u_cols = offs_n[None, :] * tr + offs_r[:, None] * (1 - tr)
            ut = _dequant(codes_ptr, scales_ptr, zeros_ptr, raw_ptr, u_rows, u_cols,
                          r_mask[:, None] & n_mask[None, :], bits, ncols, data_off, scale_off, zero_off, group,
                          ngroups)
            if DOT_F32:
                acc += tl.dot(tt, ut, input_precision="ieee")
            else:
                acc += tl.dot(tt.to(y_ptr.dtype.element_ty), ut.to(y_ptr.dtype.element_ty))
    y_ptrs = y_ptr + rows[:, None] * stride_y + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _sign_kernel(x_ptr, stride_x, y_ptr, stride_y, order_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, sign_off_ptr,
                 sign_scale_ptr, codes_ptr, h_in, h_out,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg).to(tl.int64)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    if pid_m * BM >= length:
        return
    sign_off = tl.load(sign_off_ptr + slot)
    if sign_off < 0:
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < length
    rows = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0)
    offs_n = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    n_mask = offs_n < h_out
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, h_in, BK):
        offs_k = (k0 + tl.arange(0, BK)).to(tl.int64)
        k_mask = offs_k < h_in
        xt = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                     other=0.0)
        flat = offs_n[None, :] * h_in + offs_k[:, None]                      # [BK, BN]
        w_mask = k_mask[:, None] & n_mask[None, :]
        byte = tl.load(codes_ptr + sign_off + (flat >> 3), mask=w_mask, other=0).to(tl.int64)
        bit = (byte >> (flat & 7)) & 1
        w = tl.where(w_mask, bit.to(tl.float32) * 2.0 - 1.0, 0.0)
        if DOT_F32:
            acc += tl.dot(xt.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(xt, w.to(xt.dtype))
    acc = acc * tl.load(sign_scale_ptr + slot)
    y_ptrs = y_ptr + rows[:, None] * stride_y + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def add_deltas(x: torch.Tensor, y: torch.Tensor, groups, stack: StackedPacks,
               blocks: KernelBlocks | None = None) -> None:
    """y[rows] += each row's tenant delta, in place. x [n, h_in], y [n, h_out] (same dtype, row-major);
    groups: RowGroups of the rows; stack: StackedPacks of the layer (on x's device); blocks: tile sizes
    (default DEFAULT_BLOCKS)."""
    b = blocks or DEFAULT_BLOCKS
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert y.stride(-1) == 1 and y.dtype == x.dtype
    h_in, h_out = x.shape[1], y.shape[1]
    seg_start, seg_len, seg_slot = groups.seg_tensors()
    n_segs, m_tiles = len(groups.segments), triton.cdiv(groups.max_len, b.m)
    dot_f32 = x.dtype == torch.float32
    if stack.max_blocks and stack.max_rank:
        t = torch.zeros(groups.order.numel(), stack.max_rank, dtype=torch.float32, device=x.device)
        rank_tiles = triton.cdiv(stack.max_block_rank, b.r)
        _shrink_kernel[(n_segs, stack.max_blocks * rank_tiles, m_tiles)](
            x, x.stride(0), groups.order, seg_start, seg_len, seg_slot, stack.meta, stack.n_blocks,
            stack.codes, stack.scales, stack.zeros, stack.raw, t, t.stride(0), h_in, stack.max_blocks, rank_tiles,
            NF=META_FIELDS, F_BITS=BITS, F_K=K, F_OFF=RANK_OFF, F_DATA=V_DATA, F_SCALE=V_SCALE, F_ZERO=V_ZERO,
            F_GROUP=V_GROUP, F_NG=V_NGROUPS, F_SIGMA=SIGMA, BM=b.m, BR=b.r, BK=b.k, DOT_F32=dot_f32)
        _expand_kernel[(n_segs, triton.cdiv(h_out, b.n), m_tiles)](
            t, t.stride(0), y, y.stride(0), groups.order, seg_start, seg_len, seg_slot, stack.meta, stack.n_blocks,
            stack.codes, stack.scales, stack.zeros, stack.raw, h_out, stack.max_blocks,
            NF=META_FIELDS, F_BITS=BITS, F_K=K, F_OFF=RANK_OFF, F_DATA=U_DATA, F_SCALE=U_SCALE, F_ZERO=U_ZERO,
            F_GROUP=U_GROUP, F_NG=U_NGROUPS, F_T=U_T, BM=b.m, BN=b.n, BR=b.r, DOT_F32=dot_f32)
    if stack.has_sign:
        _sign_kernel[(n_segs, triton.cdiv(h_out, b.n), m_tiles)](
            x, x.stride(0), y, y.stride(0), groups.order, seg_start, seg_len, seg_slot, stack.sign_off,
            stack.sign_scale, stack.codes, h_in, h_out, BM=b.m, BN=b.n, BK=b.k, DOT_F32=dot_f32)
