// Fused unpack-and-multiply of packed low-rank deltas on CPU: out = x·ΔŴᵀ for the rows of many tenants in
// one call per linear, read straight from the packed codes (no dequantised copy is kept). Loaded and documented
// by src/prinmix/runtime/packed_kernel.py, which builds the block table this file reads. Entry points (registered
// at the end): packed_lowrank_delta (the fused product; a column map for lm_head rows), packed_dense_delta (many
// rows of a tenant, a prefill: its factors dequantised once into a task's scratch, two float32 GEMMs),
// packed_rows (rows of ΔŴ: embedding lookups), packed_dequantize (a slot's factors), cpu_isa.
//
// A tenant's delta of one linear is ΔŴ = Σ_b Û_b diag(σ_b) V̂_b (runtime/packed.py) in PrinMix's layout: every
// factor row holds `bits`-bit codes (1..8, LSB first, rows back to back in one stream, algorithms/packing.py)
// with one float16 scale and one uint8 zero point per row, V̂_b [k, h_in], Û_b stored transposed [k, h_out]:
//     V̂[j, c] = sv_j (Cv[j, c] − zv_j)        Û[o, j] = su_j (Cu[j, o] − zu_j)
// so for one activation row x [h_in]:
//     shrink  t_j = σ_j sv_j (Σ_c Cv[j, c] x_c − zv_j Σ_c x_c)                  (one dot per rank)
//     expand  out_o = Σ_j a_j Cu[j, o] − Σ_j a_j zu_j,   a_j = su_j t_j          (one axpy per rank)
// Both loops walk the code rows contiguously. Work is split over torch's intra-op threads (at::parallel_for):
// the shrink by (segment, block, 16 ranks), the expand by (segment, 2048 outputs); each task writes its own
// entries of t / out, so there are no reductions across threads. Accumulation is float32.
//
// Code paths, chosen per call (Isa; the CPU's best unless the caller names a lower one): with AVX-512 VBMI the
// codes are decoded 64 a load (decode64_raw) into float32 lanes for the float32 FMAs (shrink_vbmi, the
// expand), and with AVX512_BF16 too a bfloat16 x is multiplied by vdpbf16ps (shrink_bf16): see the VBMI section.
// Without VBMI, the AVX-512BW decode below; without AVX-512, the scalar code (also the tests' reference path).
//
// Decoding 16 codes at once (AVX-512BW, when the CPU has it; a scalar path otherwise and for tests): 16 codes
// starting at stream bit p span at most 16 bytes from byte p/8 (7 + 16·bits ≤ 135 bits; 8-bit codes start on
// byte boundaries), so one 16-byte load broadcast to the four 128-bit lanes, one byte shuffle putting the two
// bytes of code l into 32-bit lane l, one variable right shift and one mask give the 16 codes as int32. The
// shuffle and shift depend only on (bits, p mod 8), which is constant along a row (chunks of 16 codes advance
// 2·bits bytes), so the tables are read once per row. Loads near a stream's end go through a zeroed copy so
// that nothing past the tensor is read.

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#if defined(__x86_64__)
#define PRINMIX_X86 1
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

// Columns of the block table, int64 [n_slots, max_blocks, N_FIELDS]; packed_kernel.py's BLOCK_FIELDS.
enum Field { F_BITS, F_K, F_RANK_OFF, F_V_CODES, F_V_SCALE, F_V_ZERO, F_V_NBYTES, F_U_CODES, F_U_SCALE, F_U_ZERO,
             F_U_NBYTES, F_SIGMA, N_FIELDS };

// Instruction-set levels, each including the ones below (packed_kernel.py's ISA_LEVELS): the portable scalar
// code, AVX-512F/BW (decode16), + VBMI (decode64_raw), + AVX512_BF16 (shrink_bf16 for bfloat16 activations).
enum Isa : int64_t { ISA_SCALAR = 0, ISA_AVX512 = 1, ISA_VBMI = 2, ISA_BF16 = 3 };

constexpr int RANKS_PER_TASK = 16;   // shrink task: ranks of one block for one segment
// Expand task: TILE output columns of one segment, walked rank by rank (each rank's codes of the tile are one
// sequential stretch of its row; the rows of consecutive ranks lie h_out·bits/8 bytes apart, 12 KiB for 2-bit
// lm_head rows), accumulating into R × TILE floats in L1. Measured on SmolLM2's 1/16 deltas, 8 tenants, 1
// thread: register tiles of 64 columns across all ranks 64 ms a step, of 256 columns 58 ms, rank by rank over
// 2048 columns 43–47 ms (1024 / 4096 within noise of that).
constexpr int TILE = 2048;
constexpr int ROWS = 4;              // activation rows per register tile
// A call reading fewer codes than this runs on the calling thread: ~15 µs of work at ~8 codes/ns, where a
// fork/join of torch's OpenMP threads costs several µs and a thread descheduled on a shared machine stalls it.
constexpr int64_t PARALLEL_MIN_CODES = 1 << 17;

struct Block {
  int bits;
  int64_t k, rank_off, v_nbytes, u_nbytes;
  const uint8_t *v_codes, *v_zero, *u_codes, *u_zero;
  const c10::Half *v_scale, *u_scale, *sigma;   // sigma may be null (σ folded into the factors)
};

Block read_block(const int64_t* f) {
  auto ptr = [](int64_t a) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(a)); };
  return Block{static_cast<int>(f[F_BITS]), f[F_K], f[F_RANK_OFF], f[F_V_NBYTES], f[F_U_NBYTES],
               static_cast<const uint8_t*>(ptr(f[F_V_CODES])), static_cast<const uint8_t*>(ptr(f[F_V_ZERO])),
               static_cast<const uint8_t*>(ptr(f[F_U_CODES])), static_cast<const uint8_t*>(ptr(f[F_U_ZERO])),
               static_cast<const c10::Half*>(ptr(f[F_V_SCALE])), static_cast<const c10::Half*>(ptr(f[F_U_SCALE])),
               static_cast<const c10::Half*>(ptr(f[F_SIGMA]))};
}

// Hints the cache lines of [p, p + bytes) into L1 (no access: a hint past a tensor's end is harmless). The
// kernel issues them for the next task's scales, zero points and first codes: at N tenants those are N
// separate allocations, cold at every call, which the hardware prefetchers cannot foresee (measured at 32
// tenants: half the shrink task's own time was its first load of a scale).
inline void prefetch(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
#endif
}

constexpr int64_t PREFETCH_CODE_BYTES = 2048;   // codes hinted ahead of a task (the hardware prefetch takes over)
// Within a task the VBMI loops hint the codes they will read PREFETCH_BYTES further along a shrink's stream
// and PREFETCH_RANKS rank rows further in an expand tile (whose rows are h_out codes apart: the hardware
// prefetchers see only short runs of them). Measured at 32 tenants (memory-resident codes): the expand stalled
// on its code loads ~35 % of its time without.
constexpr int64_t PREFETCH_BYTES = 4096;
constexpr int64_t PREFETCH_RANKS = 16;

// ---- scalar decoding (the portable path) -----------------------------------------------------------------

// Code starting at stream bit `bit`: it lies in the stream, so the second byte is read only when the code
// reaches into it.
inline float code_at(const uint8_t* p, int64_t bit, int bits) {
  const int64_t byte = bit >> 3;
  const int s = static_cast<int>(bit & 7);
  uint32_t w = p[byte];
  if (s + bits > 8) w |= static_cast<uint32_t>(p[byte + 1]) << 8;
  return static_cast<float>((w >> s) & ((1u << bits) - 1));
}

void shrink_scalar(const float* x, int64_t ldx, int64_t rows, int64_t h_in, const uint8_t* codes, int bits,
                   int64_t j, float* dots) {
  const int64_t bit0 = j * h_in * bits;
  for (int64_t r = 0; r < rows; ++r) dots[r] = 0.f;
  for (int64_t c = 0; c < h_in; ++c) {
    const float w = code_at(codes, bit0 + c * bits, bits);
    for (int64_t r = 0; r < rows; ++r) dots[r] += w * x[r * ldx + c];
  }
}

void expand_scalar(const float* a, int64_t rows, int64_t lda, const uint8_t* codes, int bits, int64_t j,
                   int64_t h_out, int64_t o0, int64_t o1, float* acc, int64_t ldacc) {
  const int64_t bit0 = (j * h_out + o0) * bits;
  for (int64_t o = o0; o < o1; ++o) {
    const float w = code_at(codes, bit0 + (o - o0) * bits, bits);
    for (int64_t r = 0; r < rows; ++r) acc[r * ldacc + (o - o0)] += a[r * lda] * w;
  }
}

// Position of element c of a row in the strided layout (the VBMI path's codes_f32_strided order within each 64 elements).
inline int64_t strided_index(int64_t c) { return (c & ~int64_t{63}) + 16 * (c & 3) + ((c & 63) >> 2); }

// Where a shrink task writes, for R activation rows: t[r·ldt + B.rank_off + j] = σ_j sv_j (dot_j[r] − zv_j xsum[r])
// (dot_j[r] = Σ_c C[j, c] x[r, c]), the rows' Σ_c x in xsum[r].
struct ShrinkOut {
  float* t;
  int64_t ldt;
  const float* xsum;
};

// ---- AVX-512 decoding (x86-64 only; elsewhere the scalar code runs) -----------------------------------------

#ifdef PRINMIX_X86

struct DecodeTables {
  // [bits][bit offset mod 8]: the byte shuffle and the right shifts of the 16 lanes; [bits]: the mask
  alignas(64) uint8_t shuffle[9][8][64];
  alignas(64) uint32_t shift[9][8][16];
  alignas(64) uint32_t mask[9][16];

  DecodeTables() {
    std::memset(this, 0, sizeof(*this));
    for (int bits = 1; bits <= 8; ++bits) {
      for (int l = 0; l < 16; ++l) mask[bits][l] = (1u << bits) - 1;
      for (int s0 = 0; s0 < 8; ++s0) {
        for (int l = 0; l < 16; ++l) {
          const int bit = s0 + l * bits, byte = bit >> 3, s = bit & 7;
          uint8_t* lane = &shuffle[bits][s0][4 * l];      // lane l = dword l % 4 of 128-bit lane l / 4
          lane[0] = byte < 16 ? static_cast<uint8_t>(byte) : 0x80;
          lane[1] = (s + bits > 8 && byte + 1 < 16) ? static_cast<uint8_t>(byte + 1) : 0x80;
          lane[2] = lane[3] = 0x80;                       // 0x80: the shuffle writes a zero byte
          shift[bits][s0][l] = static_cast<uint32_t>(s);
        }
      }
    }
  }
};

const DecodeTables& tables() {
  static const DecodeTables t;
  return t;
}

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
}

int64_t cpu_isa_level() {
  static const int64_t level = !cpu_has_avx512() ? 0 : !__builtin_cpu_supports("avx512vbmi") ? 1
                               : !__builtin_cpu_supports("avx512bf16") ? 2 : 3;
  return level;
}

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

struct RowDecoder {
  __m512i shuffle, shift, mask;
};

AVX512 inline RowDecoder row_decoder(int bits, int64_t bit0) {
  const DecodeTables& t = tables();
  const int s0 = static_cast<int>(bit0 & 7);
  return RowDecoder{_mm512_load_si512(t.shuffle[bits][s0]), _mm512_load_si512(t.shift[bits][s0]),
                    _mm512_load_si512(t.mask[bits])};
}

// 16 codes from stream byte `byte` on (the row's bit offset mod 8 is in d) as float32.
AVX512 inline __m512 decode16(const RowDecoder& d, const uint8_t* p, int64_t byte, int64_t nbytes) {
  __m128i raw;
  if (byte + 16 <= nbytes) {
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + byte));
  } else {
    alignas(16) uint8_t tail[16] = {0};
    if (byte < nbytes) std::memcpy(tail, p + byte, static_cast<size_t>(nbytes - byte));
    raw = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
  }
  __m512i v = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(raw), d.shuffle);
  v = _mm512_and_si512(_mm512_srlv_epi32(v, d.shift), d.mask);
  return _mm512_cvtepi32_ps(v);
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// dots[r] = Σ_c C[j, c] x[r, c] for R rows; two accumulators per row hide the FMA latency.
template <int R>
AVX512 void shrink_avx512(const float* x, int64_t ldx, int64_t h_in, const uint8_t* codes, int64_t nbytes,
                          int bits, int64_t j, float* dots) {
  const int64_t bit0 = j * h_in * bits;
  const RowDecoder d = row_decoder(bits, bit0);
  const int64_t byte0 = bit0 >> 3;
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= h_in; c += 32) {
    const __m512 w0 = decode16(d, codes, byte0 + c * bits / 8, nbytes);
    const __m512 w1 = decode16(d, codes, byte0 + (c + 16) * bits / 8, nbytes);
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * ldx + c), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * ldx + c + 16), acc1[r]);
    }
  }
  for (; c < h_in; c += 16) {           // codes past the row's end meet zeros of x (masked load)
    const __mmask16 m = tail_mask(h_in - c);
    const __m512 w = decode16(d, codes, byte0 + c * bits / 8, nbytes);
    for (int r = 0; r < R; ++r) acc0[r] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + r * ldx + c), acc0[r]);
  }
  for (int r = 0; r < R; ++r) dots[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

// out[r, 0:n] = Σ_j a[r, j] (C[j, o0 : o0 + n] − z_j) for R rows, n ≤ TILE outputs: rank by rank, each rank's
// codes of the tile read as one sequential stretch, the R × TILE accumulators in L1 (`out`, ldo ≥ 16·⌈n/16⌉).
template <int R>
AVX512 void expand_tile_avx512(const Block* blocks, int64_t n_blocks, const float* t, int64_t ldt, int64_t h_out,
                               int64_t o0, int64_t n, float* out, int64_t ldo) {
  const int64_t nq = (n + 15) / 16;
  for (int r = 0; r < R; ++r)
    for (int64_t q = 0; q < nq; ++q) _mm512_storeu_ps(out + r * ldo + 16 * q, _mm512_setzero_ps());
  float zsum[R] = {0};
  for (int64_t b = 0; b < n_blocks; ++b) {
    const Block& B = blocks[b];
    for (int64_t j = 0; j < B.k; ++j) {
      const int64_t bit0 = (j * h_out + o0) * B.bits;
      const RowDecoder d = row_decoder(B.bits, bit0);
      const int64_t byte0 = bit0 >> 3;
      const float su = static_cast<float>(B.u_scale[j]), zu = static_cast<float>(B.u_zero[j]);
      __m512 a[R];
      for (int r = 0; r < R; ++r) {
        const float ar = su * t[r * ldt + B.rank_off + j];
        zsum[r] += ar * zu;
        a[r] = _mm512_set1_ps(ar);
      }
      for (int64_t q = 0; q < nq; ++q) {                 // lanes past n accumulate unused values
        const __m512 w = decode16(d, B.u_codes, byte0 + q * 2 * B.bits, B.u_nbytes);
        for (int r = 0; r < R; ++r) {
          float* o = out + r * ldo + 16 * q;
          _mm512_storeu_ps(o, _mm512_fmadd_ps(a[r], w, _mm512_loadu_ps(o)));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 z = _mm512_set1_ps(zsum[r]);
    for (int64_t q = 0; q < nq; ++q)
      _mm512_storeu_ps(out + r * ldo + 16 * q, _mm512_sub_ps(_mm512_loadu_ps(out + r * ldo + 16 * q), z));
  }
}

// ---- AVX-512 VBMI decoding: 64 codes per load ------------------------------------------------------------------
//
// 64 codes of `bits` ≤ 8 starting at stream bit p occupy 8·bits bytes from byte p/8 on (+ the bit offset
// s = p mod 8, and 8·bits + s ≤ 64 since 8-bit codes have s = 0), so one 64-byte load holds them. A byte permute
// (vpermb) copies the 8 bytes from byte g·bits on (codes 8g .. 8g+7) into qword q, where the codes lie at bits
// s + i·bits; a multishift (vpmultishiftqb) moves code i of the qword to its byte i, carrying its neighbours'
// bits above `bits`. The permute index and shift control depend on (bits, s), constant along a factor row.
// Loads near a stream's end are masked loads (AVX-512 suppresses the masked-off bytes' accesses), so nothing
// past the tensor is read.
//
// Bytes → float32, strided: 32-bit lane d of the 64 bytes holds codes 4d .. 4d+3, so code 4d + m is
// ((lane >> 8m) & (2^bits − 1)) — a shift, an and and a convert for 16 codes, no byte shuffles. (On this
// project's AMD EPYC (Zen 4), where 512-bit shuffles issue one a cycle, this beat zero-extending bytes (extract +
// vpmovzxbd) or looking up float32 bytes with vpermi2b: 25.6 against 19.4 / 20.6 codes/ns in a throwaway loop
// on L1-resident codes (not kept), the decode16 above 17.2; whole-kernel ratios: bench_packed_kernel.py.)
// The 16 float32 lanes of vector m then belong to codes 4d + m: the shrink multiplies them with x stored in
// that order (strided_index), the expand accumulates in that order and puts the outputs back in order once
// per tile (unstride64).
//
// bfloat16 shrink (x bfloat16, AVX512_BF16): a code c ≤ 255 is exact in bfloat16 (≤ 8 significant bits), and so
// is each product c·x in float32 (8 × 8 mantissa bits). Two byte permutes look up the low and high byte of
// bf16(c) (tables of 64 entries index the code's byte by its low 6 bits, so they also drop the neighbours' bits;
// 7-bit codes use the two-table permute of 128 entries), two byte unpacks interleave them into 2 × 32 bfloat16
// lanes, and vdpbf16ps adds 32 products into 16 float32 accumulators (38.9 codes/ns in the loop above). The
// sums are float32 additions as in the float32 path (vdpbf16ps rounds each pair sum to nearest even and treats
// subnormal inputs and outputs as zero: |x| < 1.2e-38 counts as 0). The byte permute orders the codes so that
// the unpacks (which interleave within 128-bit lanes) give codes 0..31 and 32..63 in order. 8-bit codes and
// float32 / float16 activations take the float32 path (rounding those x to bfloat16 would change the product).

struct VbmiTables {
  alignas(64) uint8_t gather[9][64];        // [bits]: vpermb index, qword q ← codes 8q .. 8q+7 (natural order)
  alignas(64) uint8_t gather_bf16[9][64];   // [bits]: qword 2l ← codes 8l .., qword 2l+1 ← codes 32+8l .. (unpacks)
  alignas(64) uint8_t shift[9][8][64];      // [bits][s]: multishift control, byte i of each qword: s + i·bits
  alignas(64) uint8_t bf16_lo[9][128];      // [bits][i]: low / high byte of bf16(i mod 2^bits)
  alignas(64) uint8_t bf16_hi[9][128];
  alignas(64) uint32_t pair_lo[16], pair_hi[16], quad[2][16];   // unstride64's permutes

  VbmiTables() {
    std::memset(this, 0, sizeof(*this));
    for (int bits = 1; bits <= 8; ++bits) {
      for (int q = 0; q < 8; ++q) {
        const int g = q % 2 == 0 ? q / 2 : 4 + q / 2;
        for (int i = 0; i < 8; ++i) {
          gather[bits][8 * q + i] = static_cast<uint8_t>(q * bits + i);   // ≤ 7·8 + 7 = 63
          gather_bf16[bits][8 * q + i] = static_cast<uint8_t>(g * bits + i);
          for (int s = 0; s < 8; ++s) shift[bits][s][8 * q + i] = static_cast<uint8_t>((s + i * bits) & 63);
        }
      }
      for (int i = 0; i < 128; ++i) {
        const float v = static_cast<float>(i & ((1 << bits) - 1));
        uint32_t u;
        std::memcpy(&u, &v, 4);                 // integers ≤ 255: the high 16 bits of the float32 are exact
        bf16_lo[bits][i] = static_cast<uint8_t>(u >> 16);
        bf16_hi[bits][i] = static_cast<uint8_t>(u >> 24);
      }
    }
    // unstride64: A_m lane d holds output 4d + m. Level 1 interleaves A0, A1 (and A2, A3): lane 2i + t ← A_t[i]
    // (pair_lo: i < 8, pair_hi: i ≥ 8). Level 2: output vector v lane 4k + m ← A_m[4v + k] from the two pairs.
    for (int i = 0; i < 8; ++i)
      for (int t = 0; t < 2; ++t) {
        pair_lo[2 * i + t] = static_cast<uint32_t>(16 * t + i);
        pair_hi[2 * i + t] = static_cast<uint32_t>(16 * t + 8 + i);
      }
    for (int v = 0; v < 2; ++v)
      for (int k = 0; k < 4; ++k)
        for (int m = 0; m < 4; ++m) quad[v][4 * k + m] = static_cast<uint32_t>(16 * (m / 2) + 2 * (4 * v + k) + m % 2);
  }
};

const VbmiTables& vbmi_tables() {
  static const VbmiTables t;
  return t;
}

#define VBMI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,f16c")))
#define VBMI_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512bf16,f16c")))

struct VbmiRow {
  __m512i gather, shift;
};

VBMI inline VbmiRow vbmi_row(int bits, int64_t bit0, bool bf16_order) {
  const VbmiTables& t = vbmi_tables();
  return VbmiRow{_mm512_load_si512(bf16_order ? t.gather_bf16[bits] : t.gather[bits]),
                 _mm512_load_si512(t.shift[bits][bit0 & 7])};
}

// The 64 bytes of stream p from `byte` on, zeros past nbytes (never read).
VBMI inline __m512i load64(const uint8_t* p, int64_t byte, int64_t nbytes) {
  if (byte + 64 <= nbytes) return _mm512_loadu_si512(p + byte);
  const int64_t left = nbytes - byte;
  const __mmask64 m = left <= 0 ? __mmask64(0) : (~__mmask64(0)) >> (64 - left);
  return _mm512_maskz_loadu_epi8(m, p + byte);
}

// 64 codes from stream byte `byte` on, one a byte, still carrying their neighbours' bits above `bits`.
VBMI inline __m512i decode64_raw(const VbmiRow& d, const uint8_t* p, int64_t byte, int64_t nbytes) {
  return _mm512_multishift_epi64_epi8(d.shift, _mm512_permutexvar_epi8(d.gather, load64(p, byte, nbytes)));
}

// The 64 codes in b as float32, strided: w[m] lane d = code 4d + m (mask: 2^bits − 1 in every 32-bit lane).
VBMI inline void codes_f32_strided(const __m512i b, const __m512i mask, __m512 w[4]) {
  w[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, mask));
  w[1] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(b, 8), mask));
  w[2] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(b, 16), mask));
  w[3] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(b, 24), mask));
}

// out[0 : 64) = the 64 values of a[0 : 64) (strided order) in natural order.
VBMI inline void unstride64(const float* a, float* out) {
  const VbmiTables& t = vbmi_tables();
  const __m512i lo = _mm512_load_si512(t.pair_lo), hi = _mm512_load_si512(t.pair_hi);
  const __m512i q0 = _mm512_load_si512(t.quad[0]), q1 = _mm512_load_si512(t.quad[1]);
  const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16), a2 = _mm512_loadu_ps(a + 32),
               a3 = _mm512_loadu_ps(a + 48);
  const __m512 t0 = _mm512_permutex2var_ps(a0, lo, a1), t1 = _mm512_permutex2var_ps(a0, hi, a1);
  const __m512 u0 = _mm512_permutex2var_ps(a2, lo, a3), u1 = _mm512_permutex2var_ps(a2, hi, a3);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(t0, q0, u0));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(t0, q1, u0));
  _mm512_storeu_ps(out + 32, _mm512_permutex2var_ps(t1, q0, u1));
  _mm512_storeu_ps(out + 48, _mm512_permutex2var_ps(t1, q1, u1));
}

VBMI inline float half_f32(c10::Half h) { return _cvtsh_ss(h.x); }   // F16C (every AVX-512 CPU has it)

template <int R>
VBMI inline void shrink_store(const Block& B, int64_t j, const __m512* acc0, const __m512* acc1, const ShrinkOut& o) {
  const float mult = half_f32(B.v_scale[j]) * (B.sigma ? half_f32(B.sigma[j]) : 1.f);
  const float zv = static_cast<float>(B.v_zero[j]);
  for (int r = 0; r < R; ++r)
    o.t[r * o.ldt + B.rank_off + j] = mult * (_mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) - zv * o.xsum[r]);
}

// The shrink of ranks [j0, j1) of block B for R rows, 64 codes a decode; xs: the float32 rows in the strided
// layout, zero from h_in to the next multiple of 64 (the codes there, the next row's or zeros, meet zeros).
template <int R>
VBMI void shrink_vbmi(const float* xs, int64_t ldx, int64_t h_in, const Block& B, int64_t j0, int64_t j1,
                      const ShrinkOut& out) {
  const int bits = B.bits;
  const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t bit0 = j * h_in * bits, byte0 = bit0 >> 3;
    const VbmiRow d = vbmi_row(bits, bit0, false);
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    __m512 w[4];
    for (int64_t c = 0; c < h_in; c += 64) {
      __builtin_prefetch(B.v_codes + byte0 + c / 8 * bits + PREFETCH_BYTES, 0, 3);
      codes_f32_strided(decode64_raw(d, B.v_codes, byte0 + c / 8 * bits, B.v_nbytes), mask, w);
      for (int r = 0; r < R; ++r) {
        const float* xr = xs + r * ldx + c;
        acc0[r] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr), acc0[r]);
        acc1[r] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr + 16), acc1[r]);
        acc0[r] = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(xr + 32), acc0[r]);
        acc1[r] = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(xr + 48), acc1[r]);
      }
    }
    shrink_store<R>(B, j, acc0, acc1, out);
  }
}

// The same for bfloat16 x (raw bits, natural order, zero from h_in to the next multiple of 64) and codes of
// ≤ 7 bits (LUT128: 7 bits): 64 codes a decode, 32 products a vdpbf16ps.
template <int R, bool LUT128>
VBMI_BF16 void shrink_bf16_ranks(const uint16_t* xb, int64_t ldx, int64_t h_in, const Block& B, int64_t j0,
                                 int64_t j1, const ShrinkOut& out) {
  const VbmiTables& t = vbmi_tables();
  const int bits = B.bits;
  const __m512i lo0 = _mm512_load_si512(t.bf16_lo[bits]), lo1 = _mm512_load_si512(t.bf16_lo[bits] + 64);
  const __m512i hi0 = _mm512_load_si512(t.bf16_hi[bits]), hi1 = _mm512_load_si512(t.bf16_hi[bits] + 64);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t bit0 = j * h_in * bits, byte0 = bit0 >> 3;
    const VbmiRow d = vbmi_row(bits, bit0, true);
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < h_in; c += 64) {
      __builtin_prefetch(B.v_codes + byte0 + c / 8 * bits + PREFETCH_BYTES, 0, 3);
      const __m512i b = decode64_raw(d, B.v_codes, byte0 + c / 8 * bits, B.v_nbytes);
      const __m512i lo = LUT128 ? _mm512_permutex2var_epi8(lo0, b, lo1) : _mm512_permutexvar_epi8(b, lo0);
      const __m512i hi = LUT128 ? _mm512_permutex2var_epi8(hi0, b, hi1) : _mm512_permutexvar_epi8(b, hi0);
      const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, hi), w1 = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
      for (int r = 0; r < R; ++r) {
        const uint16_t* xr = xb + r * ldx + c;
        acc0[r] = _mm512_dpbf16_ps(acc0[r], w0, (__m512bh)_mm512_loadu_si512(xr));
        acc1[r] = _mm512_dpbf16_ps(acc1[r], w1, (__m512bh)_mm512_loadu_si512(xr + 32));
      }
    }
    shrink_store<R>(B, j, acc0, acc1, out);
  }
}

template <int R>
VBMI_BF16 void shrink_bf16(const uint16_t* xb, int64_t ldx, int64_t h_in, const Block& B, int64_t j0, int64_t j1,
                           const ShrinkOut& out) {
  if (B.bits <= 6) shrink_bf16_ranks<R, false>(xb, ldx, h_in, B, j0, j1, out);
  else shrink_bf16_ranks<R, true>(xb, ldx, h_in, B, j0, j1, out);
}

// acc[r, 0 : 64·nc) += Σ_g a[g·R + r] · C[j_g, o0 : o0 + 64·nc) (strided order) for G rank rows of one block
// (bit0[g]: row j_g's first code's stream bit), 64 outputs at a time, the R × 64 accumulators loaded and
// stored once for the G ranks, whose rows are read as G sequential streams.
template <int R, int G>
VBMI void expand_ranks_vbmi(const Block& B, const int64_t* bit0, const float* a, int64_t nc, float* acc,
                            int64_t lda, int64_t ahead) {
  VbmiRow d[G];
  int64_t byte0[G];
  for (int g = 0; g < G; ++g) {
    d[g] = vbmi_row(B.bits, bit0[g], false);
    byte0[g] = bit0[g] >> 3;
  }
  const __m512i mask = _mm512_set1_epi32((1 << B.bits) - 1);
  for (int64_t q = 0; q < nc; ++q) {
    __m512 o[4][R];
    for (int m = 0; m < 4; ++m)
      for (int r = 0; r < R; ++r) o[m][r] = _mm512_loadu_ps(acc + r * lda + 64 * q + 16 * m);
    for (int g = 0; g < G; ++g) {
      __m512 w[4];
      __builtin_prefetch(B.u_codes + byte0[g] + 8 * q * B.bits + ahead, 0, 3);
      codes_f32_strided(decode64_raw(d[g], B.u_codes, byte0[g] + 8 * q * B.bits, B.u_nbytes), mask, w);
      for (int m = 0; m < 4; ++m)
        for (int r = 0; r < R; ++r) o[m][r] = _mm512_fmadd_ps(_mm512_set1_ps(a[g * R + r]), w[m], o[m][r]);
    }
    for (int m = 0; m < 4; ++m)
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + r * lda + 64 * q + 16 * m, o[m][r]);
  }
}

// expand_tile_avx512 with the VBMI decode (same arguments and result; n ≤ TILE): the R × TILE accumulators in
// strided order on the stack, ranks of a block in groups of G (4 for one activation row, 2 for two, else 1: the
// accumulators, the code vectors and the tables stay in the 32 registers), lanes past n accumulating unused
// values; then the outputs in order minus Σ_j a_j zu_j.
template <int R>
VBMI void expand_tile_vbmi(const Block* blocks, int64_t n_blocks, const float* t, int64_t ldt, int64_t h_out,
                           int64_t o0, int64_t n, float* out, int64_t ldo) {
  constexpr int G = R == 1 ? 4 : R == 2 ? 2 : 1;
  alignas(64) float acc[R * TILE];
  const int64_t nc = (n + 63) / 64;
  for (int r = 0; r < R; ++r)
    for (int64_t q = 0; q < 4 * nc; ++q) _mm512_store_ps(acc + r * TILE + 16 * q, _mm512_setzero_ps());
  float zsum[R] = {0};
  for (int64_t b = 0; b < n_blocks; ++b) {
    const Block& B = blocks[b];
    for (int64_t j0 = 0; j0 < B.k; j0 += G) {
      const int gn = static_cast<int>(std::min<int64_t>(G, B.k - j0));
      int64_t bit0[G];
      float a[G * R];
      for (int g = 0; g < gn; ++g) {
        const int64_t j = j0 + g;
        bit0[g] = (j * h_out + o0) * B.bits;
        const float su = half_f32(B.u_scale[j]), zu = static_cast<float>(B.u_zero[j]);
        for (int r = 0; r < R; ++r) {
          a[g * R + r] = su * t[r * ldt + B.rank_off + j];
          zsum[r] += a[g * R + r] * zu;
        }
      }
      const int64_t ahead = PREFETCH_RANKS * h_out * B.bits / 8;   // the same codes PREFETCH_RANKS ranks on
      if (gn == G) {
        expand_ranks_vbmi<R, G>(B, bit0, a, nc, acc, TILE, ahead);
      } else {
        for (int g = 0; g < gn; ++g) expand_ranks_vbmi<R, 1>(B, bit0 + g, a + g * R, nc, acc, TILE, ahead);
      }
    }
  }
  const int64_t nq = (n + 15) / 16;
  for (int r = 0; r < R; ++r) {
    alignas(64) float chunk[64];
    const __m512 z = _mm512_set1_ps(zsum[r]);
    for (int64_t c = 0; c < nc; ++c) {
      unstride64(acc + r * TILE + 64 * c, chunk);
      for (int64_t k = 0; k < 4 && 4 * c + k < nq; ++k)
        _mm512_storeu_ps(out + r * ldo + 64 * c + 16 * k, _mm512_sub_ps(_mm512_load_ps(chunk + 16 * k), z));
    }
  }
}

#else
bool cpu_has_avx512() { return false; }
int64_t cpu_isa_level() { return 0; }
#endif

// The activation rows of a shrink in the layouts its code paths read: x float32 [n, h_in]; with ISA_VBMI, xs:
// the same in the strided layout (strided_index) and xb: bfloat16 x's bits when isa ≥ ISA_BF16 and x is bfloat16
// (else null), both [n, ldp] zero-padded to ldp = 64·⌈h_in / 64⌉.
struct ShrinkRows {
  const float* x;
  const float* xs;
  const uint16_t* xb;
  int64_t ldp;
};

// dots[r] = Σ_c C[j, c] x[row + r, c] in the AVX-512BW or scalar code.
template <int R>
void shrink_dots(int64_t isa, const ShrinkRows& in, int64_t row, int64_t h_in, const Block& B, int64_t j,
                 float* dots) {
#ifdef PRINMIX_X86
  if (isa >= ISA_AVX512) {
    shrink_avx512<R>(in.x + row * h_in, h_in, h_in, B.v_codes, B.v_nbytes, B.bits, j, dots);
    return;
  }
#endif
  shrink_scalar(in.x + row * h_in, h_in, R, h_in, B.v_codes, B.bits, j, dots);
}

// The shrink of ranks [j0, j1) of block B for the R rows from `row` on (ShrinkOut: where it writes).
template <int R>
void shrink_rows(int64_t isa, const ShrinkRows& in, int64_t row, int64_t h_in, const Block& B, int64_t j0,
                 int64_t j1, const ShrinkOut& out) {
#ifdef PRINMIX_X86
  if (isa >= ISA_BF16 && in.xb != nullptr && B.bits <= 7) {
    shrink_bf16<R>(in.xb + row * in.ldp, in.ldp, h_in, B, j0, j1, out);
    return;
  }
  if (isa >= ISA_VBMI) {
    shrink_vbmi<R>(in.xs + row * in.ldp, in.ldp, h_in, B, j0, j1, out);
    return;
  }
#endif
  for (int64_t j = j0; j < j1; ++j) {
    float dots[ROWS];
    shrink_dots<R>(isa, in, row, h_in, B, j, dots);
    const float mult = static_cast<float>(B.v_scale[j]) * (B.sigma ? static_cast<float>(B.sigma[j]) : 1.f);
    const float zv = static_cast<float>(B.v_zero[j]);
    for (int r = 0; r < R; ++r) out.t[r * out.ldt + B.rank_off + j] = mult * (dots[r] - zv * out.xsum[r]);
  }
}

template <int R>
void expand_rows(int64_t isa, const std::vector<Block>& blocks, const float* t, int64_t ldt, int64_t h_out,
                 int64_t o0, int64_t n, float* out, int64_t ldo) {
#ifdef PRINMIX_X86
  if (isa >= ISA_VBMI) {
    expand_tile_vbmi<R>(blocks.data(), static_cast<int64_t>(blocks.size()), t, ldt, h_out, o0, n, out, ldo);
    return;
  }
  if (isa >= ISA_AVX512) {
    expand_tile_avx512<R>(blocks.data(), static_cast<int64_t>(blocks.size()), t, ldt, h_out, o0, n, out, ldo);
    return;
  }
#endif
  float acc[R * TILE] = {0};
  float zsum[R] = {0};
  for (const Block& B : blocks) {
    for (int64_t j = 0; j < B.k; ++j) {
      const float su = static_cast<float>(B.u_scale[j]), zu = static_cast<float>(B.u_zero[j]);
      float a[R];
      for (int r = 0; r < R; ++r) {
        a[r] = su * t[r * ldt + B.rank_off + j];
        zsum[r] += a[r] * zu;
      }
      expand_scalar(a, R, 1, B.u_codes, B.bits, j, h_out, o0, o0 + n, acc, TILE);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t o = 0; o < n; ++o) out[r * ldo + o] = acc[r * TILE + o] - zsum[r];
}

// Runs f(R, row offset) over the rows [0, rows) in tiles of ROWS (remainder 1..3).
template <class F>
void over_row_tiles(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + ROWS <= rows; r += ROWS) f(ROWS, r);
  if (r < rows) f(static_cast<int>(rows - r), r);
}

template <class T>
void gather_rows(const at::Tensor& x, const int64_t* rows, int64_t n, float* xf) {
  const T* xp = x.data_ptr<T>();
  const int64_t h_in = x.size(1);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < h_in; ++c) xf[i * h_in + c] = static_cast<float>(xp[rows[i] * h_in + c]);
}

// y[row, col(o)] = round(y + d) for the R rows of a tile and outputs o ∈ [o0, o0 + n), col(o) = cols[o] when
// cols is given, else o: the reference's rounding (y + Δ once, in float32).
template <class T>
void add_into(const at::Tensor& y, const int64_t* rows, int R, int64_t o0, int64_t n, const float* d, int64_t ldd,
              const int64_t* cols) {
  T* yp = y.data_ptr<T>();
  const int64_t width = y.size(1);
  for (int r = 0; r < R; ++r) {
    T* yr = yp + rows[r] * width;
    if (cols == nullptr) {
      for (int64_t o = 0; o < n; ++o) yr[o0 + o] = static_cast<T>(static_cast<float>(yr[o0 + o]) + d[r * ldd + o]);
    } else {
      for (int64_t o = 0; o < n; ++o) {
        T& v = yr[cols[o0 + o]];
        v = static_cast<T>(static_cast<float>(v) + d[r * ldd + o]);
      }
    }
  }
}

template <class F>
void on_dtype(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "the packed kernel takes float32, bfloat16 or float16 activations");
  }
}

// The block table's layout (the ops' callers build it; a wrong one would read anywhere).
void check_table(const at::Tensor& table, const at::Tensor& n_blocks) {
  TORCH_CHECK(table.scalar_type() == at::kLong && table.is_contiguous() && table.dim() == 3 &&
              table.size(2) == N_FIELDS, "table must be int64 [slots, blocks, ", int(N_FIELDS), "]");
  TORCH_CHECK(n_blocks.scalar_type() == at::kLong && n_blocks.is_contiguous() && n_blocks.dim() == 1 &&
              n_blocks.size(0) == table.size(0), "n_blocks must be int64 [slots]");
}

// ... and of the segment list, with the table's.
void check_table(const at::Tensor& segments, const at::Tensor& table, const at::Tensor& n_blocks) {
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.is_contiguous() && segments.dim() == 2 &&
              segments.size(1) == 3, "segments must be int64 [S, 3]");
  check_table(table, n_blocks);
}

// ... and the products' operands: x [N, h_in], y [N, h_out] contiguous CPU matrices, rows int64 [n] of x's rows.
void check_product_args(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& segments,
                        const at::Tensor& table, const at::Tensor& n_blocks, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU matrix");
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.device().is_cpu() && y.size(0) == x.size(0),
              "y must be a contiguous CPU matrix with x's rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() == 1, "rows must be int64 [n]");
  const int64_t* row_of = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) TORCH_CHECK(row_of[i] >= 0 && row_of[i] < x.size(0), "row out of range");
  check_table(segments, table, n_blocks);
}

// The blocks of one slot in rank order and their total rank K (block b's ranks at rank_off = Σ of the earlier
// blocks' k), checked against the widths their codes are read with: V̂ [k, h_v] and Û stored [k, h_u].
std::vector<Block> slot_blocks(const at::Tensor& table, const at::Tensor& n_blocks, int64_t slot, int64_t h_v,
                               int64_t h_u, int64_t& K) {
  TORCH_CHECK(slot >= 0 && slot < table.size(0), "slot out of range");
  std::vector<Block> blocks;
  K = 0;
  for (int64_t i = 0; i < n_blocks.data_ptr<int64_t>()[slot]; ++i) {
    const Block B = read_block(table.data_ptr<int64_t>() + (slot * table.size(1) + i) * N_FIELDS);
    TORCH_CHECK(B.bits >= 1 && B.bits <= 8 && B.rank_off == K && B.k * h_v * B.bits <= 8 * B.v_nbytes &&
                B.k * h_u * B.bits <= 8 * B.u_nbytes, "invalid block");
    blocks.push_back(B);
    K += B.k;
  }
  return blocks;
}

// Segment s of int64 [S, 3] (first index, count, slot) within n indices: its slot's blocks and rank (slot_blocks).
std::vector<Block> segment_blocks(const int64_t* seg, int64_t s, int64_t n, const at::Tensor& table,
                                  const at::Tensor& n_blocks, int64_t h_v, int64_t h_u, int64_t& K) {
  TORCH_CHECK(seg[3 * s] >= 0 && seg[3 * s + 1] >= 0 && seg[3 * s] + seg[3 * s + 1] <= n, "segment out of range");
  return slot_blocks(table, n_blocks, seg[3 * s + 2], h_v, h_u, K);
}

// y[rows[i]] += x[rows[i]] · ΔŴᵀ of the slot of i's segment, rounded once to y's dtype (as the torch reference:
// float32 y + Δ, then cast). x [N, h_in], y [N, h_out] float32 / bfloat16 / float16, contiguous (with `cols`, int64
// [h_out] strictly increasing: output o goes to column cols[o] of y [N, ≥ h_out] — the compressed rows R of a
// vocabulary matrix among all its logits); rows int64 [n]
// (distinct); segments int64 [S, 3]: (first index into rows, count, slot), disjoint; table int64 [n_slots,
// max_blocks, N_FIELDS]; n_blocks int64 [n_slots]; max_rank: the largest Σ_b k_b of the segments' slots; isa: the
// highest instruction-set level to use (Isa; lowered to what the CPU has, 0: the portable scalar code); parallel:
// split the work over torch's intra-op threads when there is enough of it (false: the calling thread only).
void packed_lowrank_delta(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& segments,
                          const at::Tensor& table, const at::Tensor& n_blocks, int64_t max_rank, int64_t isa,
                          bool parallel, const at::Tensor& y, const c10::optional<at::Tensor>& cols) {
  check_product_args(x, rows, segments, table, n_blocks, y);
  isa = std::min(isa, cpu_isa_level());
  const int64_t* col_of = nullptr;
  int64_t h_out = y.size(1);
  if (cols.has_value()) {
    TORCH_CHECK(cols->scalar_type() == at::kLong && cols->is_contiguous() && cols->dim() == 1,
                "cols must be int64 [h_out]");
    col_of = cols->data_ptr<int64_t>();
    h_out = cols->size(0);
    for (int64_t o = 0; o < h_out; ++o)
      TORCH_CHECK(col_of[o] >= (o ? col_of[o - 1] + 1 : 0) && col_of[o] < y.size(1),
                  "cols must be increasing columns of y");
  }
  const int64_t n = rows.size(0), h_in = x.size(1), n_seg = segments.size(0);
  const int64_t* seg = segments.data_ptr<int64_t>();
  const int64_t* row_of = rows.data_ptr<int64_t>();

  std::vector<std::vector<Block>> blocks(static_cast<size_t>(n_seg));
  std::vector<int64_t> shrink_tasks;                 // (segment, block, first rank) triples
  int64_t codes = 0;                                 // codes read by the call (once per row tile)
  std::vector<int64_t> seg_tasks(static_cast<size_t>(n_seg + 1), 0);   // segment s: shrink tasks [seg_tasks[s],
                                                                        // seg_tasks[s + 1])
  for (int64_t s = 0; s < n_seg; ++s) {
    seg_tasks[s] = static_cast<int64_t>(shrink_tasks.size() / 3);
    int64_t K;
    blocks[s] = segment_blocks(seg, s, n, table, n_blocks, h_in, h_out, K);
    TORCH_CHECK(K <= max_rank, "a slot's rank exceeds max_rank");
    for (int64_t b = 0; b < static_cast<int64_t>(blocks[s].size()); ++b) {
      const Block& B = blocks[s][b];
      codes += B.k * (h_in + h_out) * ((seg[3 * s + 1] + ROWS - 1) / ROWS);
      for (int64_t j = 0; j < B.k; j += RANKS_PER_TASK) shrink_tasks.insert(shrink_tasks.end(), {s, b, j});
    }
  }
  seg_tasks[n_seg] = static_cast<int64_t>(shrink_tasks.size() / 3);
  // the delta rows in float32 (as the reference multiplies), their sums (for the zero points), t [n, max_rank]
  std::vector<float> xf(static_cast<size_t>(n * h_in)), xsum(static_cast<size_t>(n), 0.f);
  std::vector<float> t(static_cast<size_t>(n * std::max<int64_t>(max_rank, 1)), 0.f);
  on_dtype(x, [&](auto zero) { gather_rows<decltype(zero)>(x, row_of, n, xf.data()); });
  const float* xp = xf.data();
  const int64_t ldp = (h_in + 63) / 64 * 64;
  std::vector<float> xs;                             // ShrinkRows' strided float32 rows (VBMI)
  std::vector<uint16_t> xb;                          // and bfloat16 bits (BF16, bfloat16 x)
  if (isa >= ISA_VBMI) {
    xs.resize(static_cast<size_t>(n * ldp));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c0 = 0; c0 < ldp; c0 += 64)
        for (int m = 0; m < 4; ++m)
          for (int d = 0; d < 16; ++d) {
            const int64_t c = c0 + 4 * d + m;        // strided_index(c) = c0 + 16 m + d
            xs[i * ldp + c0 + 16 * m + d] = c < h_in ? xp[i * h_in + c] : 0.f;
          }
  }
  if (isa >= ISA_BF16 && x.scalar_type() == at::kBFloat16) {
    xb.assign(static_cast<size_t>(n * ldp), 0);
    const uint16_t* xr = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
    for (int64_t i = 0; i < n; ++i) std::memcpy(&xb[i * ldp], xr + row_of[i] * h_in, h_in * sizeof(uint16_t));
  }
  const ShrinkRows in{xp, xs.data(), xb.empty() ? nullptr : xb.data(), ldp};
  for (int64_t r = 0; r < n; ++r) {                  // 16 partial sums (vectorised; any order is within the bound)
    float part[16] = {0};
    int64_t c = 0;
    for (; c + 16 <= h_in; c += 16)
      for (int i = 0; i < 16; ++i) part[i] += xp[r * h_in + c + i];
    for (; c < h_in; ++c) part[c % 16] += xp[r * h_in + c];
    for (int i = 0; i < 16; ++i) xsum[r] += part[i];
  }

  // shrink: t[row, rank_off + j] = σ_j sv_j (Σ_c Cv[j, c] x[row, c] − zv_j Σ_c x[row, c]), one task per
  // (segment, block, RANKS_PER_TASK ranks); `limit`: the end of the tasks this thread may run next (prefetched)
  const int64_t n_shrink = static_cast<int64_t>(shrink_tasks.size() / 3), tiles = (h_out + TILE - 1) / TILE;
  auto shrink_task = [&](int64_t task, int64_t limit) {
    if (task + 1 < limit) {                        // the next task's scales, zero points, σ and first codes
      const Block& N = blocks[shrink_tasks[3 * task + 3]][shrink_tasks[3 * task + 4]];
      const int64_t jn = shrink_tasks[3 * task + 5], kn = std::min<int64_t>(RANKS_PER_TASK, N.k - jn);
      prefetch(N.v_scale + jn, 2 * kn);
      prefetch(N.v_zero + jn, kn);
      if (N.sigma) prefetch(N.sigma + jn, 2 * kn);
      prefetch(N.v_codes + jn * h_in * N.bits / 8, std::min(PREFETCH_CODE_BYTES, kn * h_in * N.bits / 8));
    }
    const int64_t s = shrink_tasks[3 * task], j0 = shrink_tasks[3 * task + 2];
    const Block& B = blocks[s][shrink_tasks[3 * task + 1]];
    const int64_t row0 = seg[3 * s], count = seg[3 * s + 1], j1 = std::min(B.k, j0 + RANKS_PER_TASK);
    over_row_tiles(count, [&](int R, int64_t r) {
      const ShrinkOut out{t.data() + (row0 + r) * max_rank, max_rank, xsum.data() + row0 + r};
      switch (R) {
        case 4: shrink_rows<4>(isa, in, row0 + r, h_in, B, j0, j1, out); break;
        case 3: shrink_rows<3>(isa, in, row0 + r, h_in, B, j0, j1, out); break;
        case 2: shrink_rows<2>(isa, in, row0 + r, h_in, B, j0, j1, out); break;
        default: shrink_rows<1>(isa, in, row0 + r, h_in, B, j0, j1, out);
      }
    });
  };
  // Many segments (a decode step's tenants): each thread runs whole segments, shrink then expand, in one
  // parallel region; otherwise the shrink's tasks, then (after the join) the expand's. Measured at 32 tenants,
  // 2 threads (bench_packed_kernel.py, linears of 3 SmolLM2 layers, bfloat16 x): 6.04 → 5.06–5.60 ms.
  const bool serial = !parallel || codes < PARALLEL_MIN_CODES;
  const bool by_segment = !serial && n_seg >= 2 * at::get_num_threads();
  if (!by_segment)
    at::parallel_for(0, n_shrink, serial ? n_shrink : 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) shrink_task(task, end);
    });

  // expand: y[row, o] += Σ_j su_j t[row, j] (Cu[j, o] − zu_j), one task per (segment, TILE outputs)
  on_dtype(y, [&](auto zero) {
    using T = decltype(zero);
    auto expand_task = [&](int64_t task, int64_t limit, float* d) {
      if (task + 1 < limit) {                      // the next task's scales, zero points and first codes
        const int64_t o1 = ((task + 1) % tiles) * TILE;
        for (const Block& N : blocks[(task + 1) / tiles]) {
          prefetch(N.u_scale, 2 * N.k);
          prefetch(N.u_zero, N.k);
          prefetch(N.u_codes + o1 * N.bits / 8, std::min(PREFETCH_CODE_BYTES / 4, N.k * h_out * N.bits / 8));
        }
      }
      const int64_t s = task / tiles, o0 = (task % tiles) * TILE, width = std::min<int64_t>(TILE, h_out - o0);
      const int64_t row0 = seg[3 * s], count = seg[3 * s + 1];
      over_row_tiles(count, [&](int R, int64_t r) {
        const float* tr = t.data() + (row0 + r) * max_rank;
        switch (R) {
          case 4: expand_rows<4>(isa, blocks[s], tr, max_rank, h_out, o0, width, d, TILE); break;
          case 3: expand_rows<3>(isa, blocks[s], tr, max_rank, h_out, o0, width, d, TILE); break;
          case 2: expand_rows<2>(isa, blocks[s], tr, max_rank, h_out, o0, width, d, TILE); break;
          default: expand_rows<1>(isa, blocks[s], tr, max_rank, h_out, o0, width, d, TILE);
        }
        add_into<T>(y, row_of + row0 + r, R, o0, width, d, TILE, col_of);
      });
    };
    if (by_segment) {
      at::parallel_for(0, n_seg, 1, [&](int64_t begin, int64_t end) {
        float d[ROWS * TILE];
        for (int64_t s = begin; s < end; ++s) {
          for (int64_t task = seg_tasks[s]; task < seg_tasks[s + 1]; ++task) shrink_task(task, n_shrink);
          for (int64_t task = s * tiles; task < (s + 1) * tiles; ++task) expand_task(task, end * tiles, d);
        }
      });
    } else {
      at::parallel_for(0, n_seg * tiles, serial ? n_seg * tiles : 1, [&](int64_t begin, int64_t end) {
        float d[ROWS * TILE];
        for (int64_t task = begin; task < end; ++task) expand_task(task, end, d);
      });
    }
  });
}

// y[rows[i], :] += ΔŴ[positions[i], :] of the slot of i's segment, rounded once to y's dtype: a tenant's
// embedding rows from its compressed vocabulary delta ΔŴ [h_rows, h_in] (the same table as the product above).
// Row p of ΔŴ = Σ_j a_j V̂[j, :] with a_j = σ_j su_j (Cu[j, p] − zu_j): the k codes of column p of Ûᵀ, read one by
// one, then the product's expand over V̂'s codes (blocks whose "u" side is V̂). positions, rows int64 [n];
// segments int64 [S, 3] (first index, count, slot); y [N, h_in] float32 / bfloat16 / float16, contiguous. Small
// work (k·h_in codes a row): on the calling thread.
void packed_rows(const at::Tensor& positions, const at::Tensor& rows, const at::Tensor& segments,
                 const at::Tensor& table, const at::Tensor& n_blocks, int64_t max_rank, int64_t h_rows, int64_t isa,
                 const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.device().is_cpu(), "y must be a contiguous CPU matrix");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.dim() == 1 &&
              rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.sizes() == positions.sizes(),
              "positions and rows must be int64 [n]");
  check_table(segments, table, n_blocks);
  isa = std::min(isa, cpu_isa_level());
  const int64_t n = positions.size(0), h_in = y.size(1), n_seg = segments.size(0), rank = std::max<int64_t>(max_rank, 1);
  const int64_t *seg = segments.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>(),
                *row_of = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < h_rows && row_of[i] >= 0 && row_of[i] < y.size(0), "row out of range");
  std::vector<float> t(static_cast<size_t>(ROWS * rank));
  std::vector<float> d(static_cast<size_t>(ROWS * TILE));
  on_dtype(y, [&](auto zero) {
    using T = decltype(zero);
    for (int64_t s = 0; s < n_seg; ++s) {
      const int64_t first = seg[3 * s], count = seg[3 * s + 1];
      int64_t K;
      const std::vector<Block> u_side = segment_blocks(seg, s, n, table, n_blocks, h_in, h_rows, K);
      TORCH_CHECK(K <= max_rank, "a slot's rank exceeds max_rank");
      std::vector<Block> v_side;
      for (const Block& B : u_side) {
        Block V = B;
        V.u_codes = B.v_codes, V.u_scale = B.v_scale, V.u_zero = B.v_zero, V.u_nbytes = B.v_nbytes;
        v_side.push_back(V);
      }
      over_row_tiles(count, [&](int R, int64_t r) {
        for (int i = 0; i < R; ++i) {
          const int64_t p = pos[first + r + i];
          for (const Block& B : u_side)
            for (int64_t j = 0; j < B.k; ++j) {
              const float sigma = B.sigma ? static_cast<float>(B.sigma[j]) : 1.f;
              const float c = code_at(B.u_codes, (j * h_rows + p) * B.bits, B.bits);
              t[i * rank + B.rank_off + j] = sigma * static_cast<float>(B.u_scale[j]) * (c - static_cast<float>(B.u_zero[j]));
            }
        }
        for (int64_t o0 = 0; o0 < h_in; o0 += TILE) {
          const int64_t width = std::min<int64_t>(TILE, h_in - o0);
          switch (R) {
            case 4: expand_rows<4>(isa, v_side, t.data(), rank, h_in, o0, width, d.data(), TILE); break;
            case 3: expand_rows<3>(isa, v_side, t.data(), rank, h_in, o0, width, d.data(), TILE); break;
            case 2: expand_rows<2>(isa, v_side, t.data(), rank, h_in, o0, width, d.data(), TILE); break;
            default: expand_rows<1>(isa, v_side, t.data(), rank, h_in, o0, width, d.data(), TILE);
          }
          add_into<T>(y, row_of + first + r, R, o0, width, d.data(), TILE, nullptr);
        }
      });
    }
  });
}

// One code row dequantised: out[o] = mult (C[row, o] − zero) for o < n, C the codes of a [rows, n] factor.
#ifdef PRINMIX_X86
AVX512 void dequantize_row_avx512(const uint8_t* codes, int64_t nbytes, int bits, int64_t row, int64_t n, float mult,
                                  float zero, float* out) {
  const int64_t bit0 = row * n * bits;
  const RowDecoder d = row_decoder(bits, bit0);
  const __m512 m = _mm512_set1_ps(mult), z = _mm512_set1_ps(zero);
  for (int64_t o = 0; o < n; o += 16) {
    const __m512 w = _mm512_mul_ps(m, _mm512_sub_ps(decode16(d, codes, (bit0 >> 3) + o * bits / 8, nbytes), z));
    _mm512_mask_storeu_ps(out + o, tail_mask(n - o), w);
  }
}
#endif

void dequantize_row(int64_t isa, const uint8_t* codes, int64_t nbytes, int bits, int64_t row, int64_t n, float mult,
                    float zero, float* out) {
#ifdef PRINMIX_X86
  if (isa >= ISA_AVX512) {
    dequantize_row_avx512(codes, nbytes, bits, row, n, mult, zero, out);
    return;
  }
#endif
  for (int64_t o = 0; o < n; ++o) out[o] = mult * (code_at(codes, (row * n + o) * bits, bits) - zero);
}

// Rank j of block B dequantised: a[rank_off + j, :] = σ_j sv_j (Cv[j, :] − zv_j), b[rank_off + j, :] = su_j (Cu[j, :] − zu_j).
void dequantize_rank(int64_t isa, const Block& B, int64_t j, int64_t h_in, int64_t h_out, float* a, float* b) {
  const int64_t k = B.rank_off + j;
  const float sigma = B.sigma ? static_cast<float>(B.sigma[j]) : 1.f;
  dequantize_row(isa, B.v_codes, B.v_nbytes, B.bits, j, h_in, sigma * static_cast<float>(B.v_scale[j]),
                 static_cast<float>(B.v_zero[j]), a + k * h_in);
  dequantize_row(isa, B.u_codes, B.u_nbytes, B.bits, j, h_out, static_cast<float>(B.u_scale[j]),
                 static_cast<float>(B.u_zero[j]), b + k * h_out);
}

// The factors of one slot's delta dequantised, x·ΔŴᵀ = (x aᵀ) b: a [K, h_in] float32 with row j = σ_j sv_j (Cv[j, :] − zv_j),
// b [K, h_out] float32 with row j = su_j (Cu[j, :] − zu_j), K = Σ_b k_b (ranks in block order). Split over torch's threads.
void packed_dequantize(const at::Tensor& table, const at::Tensor& n_blocks, int64_t slot, int64_t isa,
                       const at::Tensor& a, const at::Tensor& b) {
  check_table(table, n_blocks);
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.is_contiguous() &&
              b.is_contiguous() && a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "a, b: float32 [K, h]");
  isa = std::min(isa, cpu_isa_level());
  const int64_t h_in = a.size(1), h_out = b.size(1);
  int64_t K;
  const std::vector<Block> blocks = slot_blocks(table, n_blocks, slot, h_in, h_out, K);
  TORCH_CHECK(a.size(0) == K, "a, b must have the slot's rank ", K, " rows");
  std::vector<std::pair<int64_t, int64_t>> ranks;        // (block, j)
  for (size_t i = 0; i < blocks.size(); ++i)
    for (int64_t j = 0; j < blocks[i].k; ++j) ranks.emplace_back(static_cast<int64_t>(i), j);
  float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(ranks.size()), 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) dequantize_rank(isa, blocks[ranks[r].first], ranks[r].second, h_in, h_out, ap, bp);
  });
}

// y[rows[i]] = round(y + x[rows[i]] aᵀ b) for segments of many rows (a prefill: decoding every code once per 4 rows, as
// packed_lowrank_delta does, costs more than dequantising once): one task per segment, split over torch's threads;
// each dequantises its slot's factors (packed_dequantize's a, b; K = the slot's rank) into its own
// scratch and runs the two float32 GEMMs with ATen on its thread (inside the parallel region ATen does not split
// them further). x [N, h_in], y [N, h_out] contiguous; rows, segments as packed_lowrank_delta's.
void packed_dense_delta(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& segments, const at::Tensor& table,
                        const at::Tensor& n_blocks, int64_t isa, const at::Tensor& y) {
  check_product_args(x, rows, segments, table, n_blocks, y);
  isa = std::min(isa, cpu_isa_level());
  const int64_t n = rows.size(0), h_in = x.size(1), h_out = y.size(1), n_seg = segments.size(0);
  const int64_t *seg = segments.data_ptr<int64_t>(), *row_of = rows.data_ptr<int64_t>();
  std::vector<std::vector<Block>> blocks(static_cast<size_t>(n_seg));
  std::vector<int64_t> rank(static_cast<size_t>(n_seg), 0);
  for (int64_t s = 0; s < n_seg; ++s) blocks[s] = segment_blocks(seg, s, n, table, n_blocks, h_in, h_out, rank[s]);
  on_dtype(y, [&](auto zero) {
    using T = decltype(zero);
    at::parallel_for(0, n_seg, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t first = seg[3 * s], count = seg[3 * s + 1], K = rank[s];
        if (count == 0 || K == 0) continue;
        std::vector<float> a(static_cast<size_t>(K * h_in)), b(static_cast<size_t>(K * h_out)),
            xs(static_cast<size_t>(count * h_in));
        for (const Block& B : blocks[s])
          for (int64_t j = 0; j < B.k; ++j) dequantize_rank(isa, B, j, h_in, h_out, a.data(), b.data());
        on_dtype(x, [&](auto xz) { gather_rows<decltype(xz)>(x, row_of + first, count, xs.data()); });
        const auto f32 = at::TensorOptions().dtype(at::kFloat);
        const at::Tensor d = at::mm(at::mm(at::from_blob(xs.data(), {count, h_in}, f32),
                                           at::from_blob(a.data(), {K, h_in}, f32).t()),
                                    at::from_blob(b.data(), {K, h_out}, f32)).contiguous();
        add_into<T>(y, row_of + first, static_cast<int>(count), 0, h_out, d.data_ptr<float>(), h_out, nullptr);
      }
    });
  });
}

int64_t cpu_isa() { return cpu_isa_level(); }

}  // namespace

TORCH_LIBRARY(prinmix_packed, m) {
  m.def("packed_lowrank_delta(Tensor x, Tensor rows, Tensor segments, Tensor table, Tensor n_blocks, int max_rank, "
        "int isa, bool parallel, Tensor(a!) y, Tensor? cols=None) -> ()", &packed_lowrank_delta);
  m.def("packed_rows(Tensor positions, Tensor rows, Tensor segments, Tensor table, Tensor n_blocks, int max_rank, "
        "int h_rows, int isa, Tensor(a!) y) -> ()", &packed_rows);
  m.def("packed_dense_delta(Tensor x, Tensor rows, Tensor segments, Tensor table, Tensor n_blocks, int isa, "
        "Tensor(a!) y) -> ()", &packed_dense_delta);
  m.def("packed_dequantize(Tensor table, Tensor n_blocks, int slot, int isa, Tensor(a!) a, Tensor(b!) b) -> ()",
        &packed_dequantize);
  m.def("cpu_isa() -> int", &cpu_isa);
}
