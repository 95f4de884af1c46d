// Quantized HiCache page codec kernels. Spec: docs/page-format.md. Ground truth:
// python/kvtuner_hicache/quant/reference.py.
//
// Bit-exactness rules followed here (compile WITHOUT --use_fast_math; -fmad=false as a guard):
//  * every float step is one IEEE fp32 operation through an explicit intrinsic
//    (__fsub_rn, __fdiv_rn, __fmul_rn, __fadd_rn, __frcp_rn), so no FMA contraction and no
//    approximate division or reciprocal can creep in;
//  * rint is rintf (round half to even, like torch.round);
//  * fp16 metadata: min rounded down (__float2half_rd), scale rounded up (__float2half_ru). Both
//    equal the reference's "round to nearest, then step one fp16 ulp" for every finite input,
//    including signed zeros and subnormals;
//  * inputs are sanitized like the reference (NaN -> 0, clamp to +-65504, -0 -> +0), so min/max
//    are order-independent and the reduction order does not matter. The encode sanitizes an item only
//    when one of its 16-bit inputs is NaN, inf or beyond fp16's range (has_special: integer ops on the raw
//    words); a -0 is left as it is, because it yields the code of +0, and make_qp turns a group's
//    min/max of -0 into +0;
//  * a code is rint(RN(n * RN(1 / s))) (the reference's rule since kernel 0.9.0): one multiply and a
//    round-to-integer add per element, RN(1 / s) once per group. Until 0.8.1 it was rint(RN(n / s)), which
//    needed an exact-division path for quotients near a half-integer (14 % of the KV4 encode, run 17);
//  * the dequantized fp32 value is rounded to the pool dtype with round-to-nearest-even.
#include "kvtq_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kvtq {
namespace {

constexpr float kF16Max = 65504.f;

// ---- element conversion ------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    uint32_t x = __bfloat16_as_ushort(__float2bfloat16_rn(a));
    uint32_t y = __bfloat16_as_ushort(__float2bfloat16_rn(b));
    return x | (y << 16);
  }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float lo(uint32_t w) { return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu))); }
  static __device__ __forceinline__ float hi(uint32_t w) { return __half2float(__ushort_as_half((unsigned short)(w >> 16))); }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    uint32_t x = __half_as_ushort(__float2half_rn(a));
    uint32_t y = __half_as_ushort(__float2half_rn(b));
    return x | (y << 16);
  }
};

__device__ __forceinline__ float sanitize(float x) {
  x = isnan(x) ? 0.f : x;                         // nan_to_num(nan=0)
  x = fminf(fmaxf(x, -kF16Max), kF16Max);          // +-inf -> +-65504, clamp to the fp16 range
  return __fadd_rn(x, 0.f);                        // -0 -> +0 (min/max of signed zeros is order-dependent)
}

// The smallest |x| bit pattern (sign cleared) that sanitize() changes: bf16 >= 65536 (clamped to 65504),
// inf and NaN; fp16 inf and NaN.
template <typename T>
struct SpecialFrom;
template <>
struct SpecialFrom<__nv_bfloat16> { static constexpr uint32_t kBits = 0x4780u; };
template <>
struct SpecialFrom<__half> { static constexpr uint32_t kBits = 0x7c00u; };

// Whether any of the 8 inputs is one that sanitize() changes (other than -0): per 16-bit half,
// (|h| + 0x8000 - kBits) sets bit 15 exactly when |h| >= kBits, and never carries into the next half.
template <typename T>
__device__ __forceinline__ bool has_special(const uint4& r) {
  constexpr uint32_t add = (0x8000u - SpecialFrom<T>::kBits) * 0x10001u;
  const uint32_t s = ((r.x & 0x7fff7fffu) + add) | ((r.y & 0x7fff7fffu) + add) | ((r.z & 0x7fff7fffu) + add) |
                     ((r.w & 0x7fff7fffu) + add);
  return (s & 0x80008000u) != 0u;
}

// 8 inputs as fp32, sanitized where it changes a value (see has_special; -0 stays -0).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& r, float v[8]) {
  v[0] = Elem<T>::lo(r.x); v[1] = Elem<T>::hi(r.x);
  v[2] = Elem<T>::lo(r.y); v[3] = Elem<T>::hi(r.y);
  v[4] = Elem<T>::lo(r.z); v[5] = Elem<T>::hi(r.z);
  v[6] = Elem<T>::lo(r.w); v[7] = Elem<T>::hi(r.w);
  if (has_special<T>(r)) {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = sanitize(v[e]);
  }
}

// ---- quantizer math (one IEEE op per step, exactly as reference.py) ---------------------------

struct QP {
  float s, m;         // stored scale / min, as fp32
  float inv;          // RN(1 / s) (0 when s == 0), for the division fast path
  uint16_t s16, m16;  // their fp16 bit patterns
};

__device__ __forceinline__ QP make_qp(float mn, float mx, int bits, bool asym) {
  QP q;
  mn = __fadd_rn(mn, 0.f);  // -0 -> +0: the reference's min/max of sanitized inputs (unpack8 keeps -0)
  mx = __fadd_rn(mx, 0.f);
  if (asym) {
    const float levels = (float)((1 << bits) - 1);
    const __half hm = __float2half_rd(mn);
    q.m = __half2float(hm);
    const __half hs = __float2half_ru(__fdiv_rn(__fsub_rn(mx, q.m), levels));
    q.s = __half2float(hs);
    q.m16 = __half_as_ushort(hm);
    q.s16 = __half_as_ushort(hs);
  } else {
    const float qmax = (float)((1 << (bits - 1)) - 1);
    const float amax = fmaxf(fabsf(mn), fabsf(mx));  // == max|x| exactly
    const __half hs = __float2half_ru(__fdiv_rn(amax, qmax));
    q.s = __half2float(hs);
    q.m = 0.f;
    q.s16 = __half_as_ushort(hs);
    q.m16 = 0;
  }
  q.inv = q.s > 0.f ? __frcp_rn(q.s) : 0.f;
  return q;
}

// The code of one element, rint(RN(n * RN(1/s))) clamped (n = RN(x - m), or x when symmetric): RN(n * inv)
// rounded to an integer by adding 1.5 * 2^23 (exact round-half-even for |r| < 2^22; the quantizer's
// |r| <= 2^bits + 1), clamped in that biased domain, the code read from the low mantissa bits. s == 0 gives
// inv == 0, hence the reference's code 0 (the code of a 0 quotient).
constexpr float kRintShift = 12582912.f;  // 1.5 * 2^23
constexpr uint32_t kRintShiftBits = 0x4B400000u;

template <int BITS, bool ASYM>
__device__ __forceinline__ uint32_t quant_fast(float x, float m, float inv) {
  constexpr float lo = ASYM ? 0.f : -(float)((1 << (BITS - 1)) - 1);
  constexpr float hi = ASYM ? (float)((1 << BITS) - 1) : (float)((1 << (BITS - 1)) - 1);
  constexpr uint32_t bias = ASYM ? 0u : (1u << (BITS - 1));
  const float r = __fmul_rn(ASYM ? __fsub_rn(x, m) : x, inv);
  const float y = __fadd_rn(r, kRintShift);
  const float yc = fminf(fmaxf(y, kRintShift + lo), kRintShift + hi);
  return __float_as_uint(yc) - kRintShiftBits + bias;
}

// quant() of 8 elements of one group.
template <int BITS, bool ASYM>
__device__ __forceinline__ void quant8(const float v[8], const QP& q, uint32_t code[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) code[e] = quant_fast<BITS, ASYM>(v[e], q.m, q.inv);
}

template <int BITS>
__device__ __forceinline__ float dequant(uint32_t u, float s, float m, bool asym) {
  if (asym) return __fadd_rn(__fmul_rn((float)u, s), m);
  return __fmul_rn(__fsub_rn((float)u, (float)(1 << (BITS - 1))), s);
}

// Dequantize a code given as fp32 (an integer code, or an elastic code c + (2r + 1 - 2^b) / 2^(b+1),
// exact in fp32): the same two roundings as dequant.
template <int BITS>
__device__ __forceinline__ float dequant_f(float u, float s, float m, bool asym) {
  if (asym) return __fadd_rn(__fmul_rn(u, s), m);
  return __fmul_rn(__fsub_rn(u, (float)(1 << (BITS - 1))), s);
}

// The refinement code of an elastic page (elastic.quantize_embedded): t = RN((x - m) / s) (0 when s == 0),
// r = clamp(floor(RN(RN(t - c) + 1/2) * 2^bits), 0, 2^bits - 1) for the clamped direct code c. Asym only.
__device__ __forceinline__ uint32_t refine_code(float x, const QP& q, uint32_t c, int bits) {
  const float t = q.s > 0.f ? __fdiv_rn(__fsub_rn(x, q.m), q.s) : 0.f;
  const float cells = (float)(1 << bits);
  const float f = floorf(__fmul_rn(__fadd_rn(__fsub_rn(t, (float)c), 0.5f), cells));
  return (uint32_t)fminf(fmaxf(f, 0.f), cells - 1.f);
}

// r codes -> the fp32 offset added to the floor code: (2r + 1 - 2^bits) / 2^(bits+1), exact.
template <int BITS>
__device__ __forceinline__ float refine_offset(uint32_t r) {
  return ((float)(int)(2 * r + 1) - (float)(1 << BITS)) * (1.f / (float)(2 << BITS));
}

// 8 codes -> `bits` bytes, element e at bit e * bits (little-endian inside the word). 3-bit items are 3 bytes
// at any byte offset, so they go as byte stores.
__device__ __forceinline__ void store_codes8(uint8_t* dst, const uint32_t u[8], int bits) {
  if (bits == 3) {
    uint32_t w = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) w |= u[e] << (3 * e);
    dst[0] = (uint8_t)w;
    dst[1] = (uint8_t)(w >> 8);
    dst[2] = (uint8_t)(w >> 16);
  } else if (bits == 8) {
    uint2 w;
    w.x = u[0] | (u[1] << 8) | (u[2] << 16) | (u[3] << 24);
    w.y = u[4] | (u[5] << 8) | (u[6] << 16) | (u[7] << 24);
    *reinterpret_cast<uint2*>(dst) = w;
  } else if (bits == 4) {
    uint32_t w = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) w |= u[e] << (4 * e);
    *reinterpret_cast<uint32_t*>(dst) = w;
  } else {
    uint32_t w = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) w |= u[e] << (2 * e);
    *reinterpret_cast<uint16_t*>(dst) = (uint16_t)w;
  }
}

template <int BITS>
__device__ __forceinline__ void load_codes8(const uint8_t* src, uint32_t u[8]) {
  constexpr uint32_t mask = (1u << BITS) - 1u;
  if constexpr (BITS == 8) {
    const uint2 w = *reinterpret_cast<const uint2*>(src);
#pragma unroll
    for (int e = 0; e < 4; ++e) { u[e] = (w.x >> (8 * e)) & mask; u[e + 4] = (w.y >> (8 * e)) & mask; }
  } else if constexpr (BITS == 4) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(src);
#pragma unroll
    for (int e = 0; e < 8; ++e) u[e] = (w >> (4 * e)) & mask;
  } else if constexpr (BITS == 3) {
    const uint32_t w = (uint32_t)src[0] | ((uint32_t)src[1] << 8) | ((uint32_t)src[2] << 16);
#pragma unroll
    for (int e = 0; e < 8; ++e) u[e] = (w >> (3 * e)) & mask;
  } else {
    const uint32_t w = *reinterpret_cast<const uint16_t*>(src);
#pragma unroll
    for (int e = 0; e < 8; ++e) u[e] = (w >> (2 * e)) & mask;
  }
}

__device__ __forceinline__ void put_meta(uint8_t* chunk, const ChunkDesc& c, int64_t g, const QP& q) {
  reinterpret_cast<uint16_t*>(chunk + c.scale_off)[g] = q.s16;
  if (c.asym) reinterpret_cast<uint16_t*>(chunk + c.min_off)[g] = q.m16;
}

// ---- bad indices --------------------------------------------------------------------------------

// First bad index wins: one atomicCAS on device memory elects the reporter, which writes the report
// (mapped host memory) with `code` last, so a host that sees a non-zero code sees the whole report.
__device__ __noinline__ void report_error(const ErrorSink& e, int code, int64_t value, int64_t bound) {
  if (e.word == nullptr) return;
  if (atomicCAS(e.word, 0, code) == 0) {
    volatile int64_t* r = e.report;
    r[1] = value;
    r[2] = bound;
    __threadfence_system();
    r[0] = code;
    __threadfence_system();
  }
}

__device__ __forceinline__ bool bad_index(int64_t v, int64_t bound) { return (uint64_t)v >= (uint64_t)bound; }

// Where page p's refinement codes of chunk c go, or nullptr (no planes in this launch, a chunk without
// one, a page admitted at its floor, or an offset out of range: reported, nothing written).
__device__ __forceinline__ uint8_t* plane_out(const EncodeArgs& A, const ChunkDesc& c, int p) {
  if (A.plane_base == nullptr || c.plane_stream < 0) return nullptr;
  const int64_t off = A.plane_dst[(int64_t)c.plane_stream * A.plane_n + p];
  if (off < 0) return nullptr;
  if (off > A.plane_bound - c.plane_off - c.codes_bytes) {
    if (threadIdx.x == 0) report_error(A.err, kErrEncodePlane, off, A.plane_bound);
    return nullptr;
  }
  return A.plane_base + off + c.plane_off;
}

// ---- encode -------------------------------------------------------------------------------------
// n / d for 0 <= n < 2^24 and a divisor fixed for the block (checked on the host: Plan._check): a shift for a
// power of two, else a float reciprocal and one correction step (|n * RZ(1/d) - n/d| < 1 for d >= 3), in
// place of an integer division (~25 instructions) per item.
struct DivBy {
  int d, shift;  // shift >= 0: d == 1 << shift
  float inv;
};

__device__ __forceinline__ DivBy div_by(int d) {
  DivBy b;
  b.d = d;
  b.shift = (d & (d - 1)) == 0 ? __ffs(d) - 1 : -1;
  b.inv = __frcp_rn((float)d);
  return b;
}

__device__ __forceinline__ int divide(int n, const DivBy& b) {
  if (b.shift >= 0) return n >> b.shift;
  int q = (int)__fmul_rz((float)n, b.inv);
  const int r = n - q * b.d;
  q += (r >= b.d) - (r < 0);
  return q;
}


// Shared memory of one encode block, per axis (so a per-token block does not reserve the per-channel
// reduction's 16 KiB, which would cap its occupancy).
struct Axis0Shared {  // per-token groups of more than 256 elements span warps
  float w_min[kEncItemsPerThread][kThreads / 32];
  float w_max[kEncItemsPerThread][kThreads / 32];
};
struct Axis1Shared {  // per-channel column min/max across the block's rows, then each column's parameters
  float red_min[kThreads * 8];
  float red_max[kThreads * 8];
  float s_s[kThreads];
  float s_m[kThreads];
  float s_i[kThreads];
};

// Groups smaller than one 8-element item (G = 2 or 4), fully unrolled. Inline although rare: out of line, its
// array arguments put every item's values on the stack (local stores that saturated L2: 0.80 against 0.60 ms
// for the per-token class at 256 pages, H100, ncu).
template <int GS, int BITS>
__device__ __forceinline__ void small_groups(const float v[8], uint32_t code[8], uint32_t* rcode, uint8_t* chunk,
                                             const ChunkDesc& c, int i, bool asym) {
#pragma unroll
  for (int g0 = 0; g0 < 8; g0 += GS) {
    float mn = v[g0], mx = v[g0];
#pragma unroll
    for (int e = 1; e < GS; ++e) { mn = fminf(mn, v[g0 + e]); mx = fmaxf(mx, v[g0 + e]); }
    const QP q = make_qp(mn, mx, BITS, asym);
    put_meta(chunk, c, ((int64_t)i * 8 + g0) / GS, q);
#pragma unroll
    for (int e = 0; e < GS; ++e)
      code[g0 + e] = asym ? quant_fast<BITS, true>(v[g0 + e], q.m, q.inv) : quant_fast<BITS, false>(v[g0 + e], q.m, q.inv);
    if (rcode != nullptr) {
#pragma unroll
      for (int e = 0; e < GS; ++e) rcode[g0 + e] = refine_code(v[g0 + e], q, code[g0 + e], BITS);
    }
  }
}

// Item i of a per-token group of `lanes` items with parameters q: its codes, its refinement codes when the
// launch writes planes, and the group's metadata from the group's first item.
template <int BITS>
__device__ __forceinline__ void emit_item(const float v[8], const QP& q, bool asym, uint8_t* chunk, uint8_t* rplane,
                                          const ChunkDesc& c, int i, int lanes) {
  uint32_t code[8];
  if (asym) quant8<BITS, true>(v, q, code);
  else quant8<BITS, false>(v, q, code);
  store_codes8(chunk + (int64_t)i * BITS, code, BITS);
  if ((i & (lanes - 1)) == 0) put_meta(chunk, c, ((int64_t)i * 8) / c.group, q);
  if (rplane != nullptr) {
    uint32_t r[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) r[e] = refine_code(v[e], q, code[e], BITS);
    store_codes8(rplane + (int64_t)i * BITS, r, BITS);
  }
}

// Per-token groups (axis 0): group = G consecutive elements of one (token, head).
// Unit = kEncItemsPerUnit consecutive 8-element items of the chunk's [page_size, width] plane.
template <typename T, bool PLANES, int BITS>
__device__ __forceinline__ void encode_axis0(const EncodeArgs& A, const ChunkDesc& c, int p, int u, uint8_t* chunk, Axis0Shared& sh) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int W8 = c.width >> 3;
  const int items = A.page_size * W8;
  const T* src = reinterpret_cast<const T*>(A.ptrs[c.buffer ? 1 : 0][c.layer]);
  const int64_t rs = c.buffer ? A.row_stride[1] : A.row_stride[0];
  const int64_t hs = c.buffer ? A.head_stride[1] : A.head_stride[0];
  const int64_t nrows = c.buffer ? A.rows[1] : A.rows[0];
  const int64_t* tok = A.token_index + (int64_t)p * A.page_size;
  const int G = c.group;
  constexpr int bits = BITS;
  const bool asym = c.asym != 0;
  uint8_t* rplane = PLANES ? plane_out(A, c, p) : nullptr;
  const DivBy by_w8 = div_by(W8), by_dim = div_by(c.dim);

  uint4 raw[kEncItemsPerThread];
#pragma unroll
  for (int j = 0; j < kEncItemsPerThread; ++j) {
    const int i = u * kEncItemsPerUnit + j * kThreads + tid;
    raw[j] = make_uint4(0u, 0u, 0u, 0u);
    if (i < items) {
      const int t = divide(i, by_w8);
      const int col = (i - t * W8) * 8;
      const int h = divide(col, by_dim), d = col - h * c.dim;
      const int64_t row = tok[t];
      if (bad_index(row, nrows)) report_error(A.err, kErrEncodeRow, row, nrows);
      else raw[j] = *reinterpret_cast<const uint4*>(src + row * rs + h * hs + c.col_off + d);
    }
  }

  const int glanes = G >> 3;  // items (lanes) per group
  if (glanes >= kEncItemsPerThread && glanes <= 32) {  // groups of 32-256 elements; block-uniform branch
    // Pass 1: each item's group min/max (every lane of a group ends with the same two values). Each lane keeps
    // those of one item, j = lane % kEncItemsPerThread, and computes that item's parameters once (below).
    const int mine = lane & (kEncItemsPerThread - 1);
    float smn = 0.f, smx = 0.f;
#pragma unroll
    for (int j = 0; j < kEncItemsPerThread; ++j) {
      const bool valid = u * kEncItemsPerUnit + j * kThreads + tid < items;
      float v[8];
      unpack8<T>(raw[j], v);
      float mn = v[0], mx = v[0];
#pragma unroll
      for (int e = 1; e < 8; ++e) { mn = fminf(mn, v[e]); mx = fmaxf(mx, v[e]); }
      if (!valid) { mn = INFINITY; mx = -INFINITY; }
      for (int off = 1; off < glanes; off <<= 1) {
        mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      }
      if (mine == j) { smn = mn; smx = mx; }
    }
    // The group's lanes take the other items' parameters by shuffle instead of computing all of them. Same
    // inputs, same bits; make_qp is ~40 instructions, and the kernel is issue-bound (ncu, run 15: 58 % issue
    // slots busy, 27 % DRAM).
    const QP own = make_qp(smn, smx, bits, asym);
    const uint32_t own_sm = (uint32_t)own.s16 | ((uint32_t)own.m16 << 16);
    const int base = lane & ~(glanes - 1);
#pragma unroll
    for (int j = 0; j < kEncItemsPerThread; ++j) {
      const int i = u * kEncItemsPerUnit + j * kThreads + tid;
      QP q;
      const uint32_t sm = __shfl_sync(0xffffffffu, own_sm, base + j);
      q.inv = __shfl_sync(0xffffffffu, own.inv, base + j);
      q.s16 = (uint16_t)(sm & 0xffffu);
      q.m16 = (uint16_t)(sm >> 16);
      q.s = __half2float(__ushort_as_half(q.s16));
      q.m = asym ? __half2float(__ushort_as_half(q.m16)) : 0.f;
      if (i < items) {
        float v[8];
        unpack8<T>(raw[j], v);
        emit_item<BITS>(v, q, asym, chunk, rplane, c, i, glanes);
      }
    }
    return;
  }

#pragma unroll
  for (int j = 0; j < kEncItemsPerThread; ++j) {
    const int i = u * kEncItemsPerUnit + j * kThreads + tid;
    const bool valid = i < items;
    float v[8];
    unpack8<T>(raw[j], v);
    if (G >= 8) {
      float mn = v[0], mx = v[0];
#pragma unroll
      for (int e = 1; e < 8; ++e) { mn = fminf(mn, v[e]); mx = fmaxf(mx, v[e]); }
      if (!valid) { mn = INFINITY; mx = -INFINITY; }
      const int lanes = G >> 3;  // items per group
      const int wl = lanes < 32 ? lanes : 32;
      for (int off = 1; off < wl; off <<= 1) {
        mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      }
      if (lanes > 32) {  // group spans warps (G > 256); block-uniform branch
        if (lane == 0) { sh.w_min[j][warp] = mn; sh.w_max[j][warp] = mx; }
        __syncthreads();
        const int nw = lanes >> 5;
        const int w0 = warp & ~(nw - 1);
        mn = INFINITY; mx = -INFINITY;
        for (int w = w0; w < w0 + nw; ++w) { mn = fminf(mn, sh.w_min[j][w]); mx = fmaxf(mx, sh.w_max[j][w]); }
      }
      if (valid) emit_item<BITS>(v, make_qp(mn, mx, bits, asym), asym, chunk, rplane, c, i, lanes);
    } else if (valid) {  // G in {2, 4}: 8 / G whole groups per item
      uint32_t code[8], r[8];
      uint32_t* rp = rplane != nullptr ? r : nullptr;
      if (G == 4) small_groups<4, BITS>(v, code, rp, chunk, c, i, asym);
      else small_groups<2, BITS>(v, code, rp, chunk, c, i, asym);
      store_codes8(chunk + (int64_t)i * bits, code, bits);
      if (rp != nullptr) store_codes8(rplane + (int64_t)i * bits, r, bits);
    }
  }
}

// Per-channel groups (axis 1): group = G consecutive tokens of one (head, channel).
// Unit = (token tile of G tokens, block of kc 8-column items). Thread (kc_i, tr) holds rows
// tr, tr + TR, ... of its 8 columns; column min/max are reduced through shared memory.
template <typename T, bool PLANES, int BITS>
__device__ __forceinline__ void encode_axis1(const EncodeArgs& A, const ChunkDesc& c, int p, int u, uint8_t* chunk, Axis1Shared& sh) {
  const int tid = threadIdx.x;
  const int KC = c.kc;
  const int TR = kThreads / KC;
  const int kci = tid & (KC - 1);
  const int tr = tid / KC;
  const int G = c.group;
  constexpr int bits = BITS;
  const int W8 = c.width >> 3;
  const bool asym = c.asym != 0;
  const int tile = u / c.ncb;
  const int cb = u - tile * c.ncb;
  const int k = cb * KC + kci;
  const bool colvalid = k < W8;
  const int col = k * 8;
  const int h = col / c.dim, d = col - h * c.dim;
  const int t0 = tile * G;
  const int nt = (G + TR - 1) / TR;
  const T* src = reinterpret_cast<const T*>(A.ptrs[c.buffer ? 1 : 0][c.layer]);
  const int64_t rs = c.buffer ? A.row_stride[1] : A.row_stride[0];
  const int64_t hs = c.buffer ? A.head_stride[1] : A.head_stride[0];
  const int64_t nrows = c.buffer ? A.rows[1] : A.rows[0];
  const int64_t* tok = A.token_index + (int64_t)p * A.page_size + t0;
  uint8_t* rplane = PLANES ? plane_out(A, c, p) : nullptr;

  uint4 raw[kEncMaxTokensPerThread];
#pragma unroll
  for (int m = 0; m < kEncMaxTokensPerThread; ++m) {
    raw[m] = make_uint4(0u, 0u, 0u, 0u);
    const int t = tr + m * TR;
    if (m < nt && colvalid && t < G) {
      const int64_t row = tok[t];
      if (bad_index(row, nrows)) report_error(A.err, kErrEncodeRow, row, nrows);
      else raw[m] = *reinterpret_cast<const uint4*>(src + row * rs + h * hs + c.col_off + d);
    }
  }
  float lmn[8], lmx[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) { lmn[e] = INFINITY; lmx[e] = -INFINITY; }
#pragma unroll
  for (int m = 0; m < kEncMaxTokensPerThread; ++m) {
    const int t = tr + m * TR;
    if (m < nt && colvalid && t < G) {
      float v[8];
      unpack8<T>(raw[m], v);
#pragma unroll
      for (int e = 0; e < 8; ++e) { lmn[e] = fminf(lmn[e], v[e]); lmx[e] = fmaxf(lmx[e], v[e]); }
    }
  }
  const int CW = KC * 8;  // columns per unit
  float4* rmn = reinterpret_cast<float4*>(sh.red_min + tr * CW + kci * 8);
  float4* rmx = reinterpret_cast<float4*>(sh.red_max + tr * CW + kci * 8);
  rmn[0] = make_float4(lmn[0], lmn[1], lmn[2], lmn[3]);
  rmn[1] = make_float4(lmn[4], lmn[5], lmn[6], lmn[7]);
  rmx[0] = make_float4(lmx[0], lmx[1], lmx[2], lmx[3]);
  rmx[1] = make_float4(lmx[4], lmx[5], lmx[6], lmx[7]);
  __syncthreads();
  if (tid < CW) {
    float mn = INFINITY, mx = -INFINITY;
    for (int r = 0; r < TR; ++r) { mn = fminf(mn, sh.red_min[r * CW + tid]); mx = fmaxf(mx, sh.red_max[r * CW + tid]); }
    const int gcol = cb * CW + tid;
    if (gcol < c.width) {
      const QP q = make_qp(mn, mx, bits, asym);
      sh.s_s[tid] = q.s;
      sh.s_m[tid] = q.m;
      sh.s_i[tid] = q.inv;
      put_meta(chunk, c, (int64_t)tile * c.width + gcol, q);
    }
  }
  __syncthreads();
  if (colvalid) {
    // Only min and 1/scale stay in registers; the scale is read from shared memory where it is needed.
    float qm[8], qi[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      qm[e] = sh.s_m[kci * 8 + e];
      qi[e] = sh.s_i[kci * 8 + e];
    }
#pragma unroll
    for (int m = 0; m < kEncMaxTokensPerThread; ++m) {
      const int t = tr + m * TR;
      if (m < nt && t < G) {
        float v[8];
        unpack8<T>(raw[m], v);
        uint32_t code[8];
        if (asym) {
#pragma unroll
          for (int e = 0; e < 8; ++e) code[e] = quant_fast<BITS, true>(v[e], qm[e], qi[e]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) code[e] = quant_fast<BITS, false>(v[e], qm[e], qi[e]);
        }
        const int64_t at = ((int64_t)(t0 + t) * W8 + k) * bits;
        store_codes8(chunk + at, code, bits);
        if (rplane != nullptr) {
          uint32_t r[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            QP q;
            q.s = sh.s_s[kci * 8 + e];
            q.m = qm[e];
            q.inv = qi[e];
            r[e] = refine_code(v[e], q, code[e], bits);
          }
          store_codes8(rplane + at, r, bits);
        }
      }
    }
  }
}

__device__ __forceinline__ void zero_range(uint8_t* base, int a, int b) {
  for (int x = a + (int)threadIdx.x; x < b; x += kThreads) base[x] = 0;
}

// One instantiation per (axis, bits) class: a launch covers the units of one class only (the plan orders the
// unit table by class; EncodeArgs.spans), so each kernel holds one path, with the bit width a constant. One
// kernel with every path inline spent half its stall cycles on instruction fetch and took the registers of
// its largest path. PLANES: the launch writes refinement planes (a separate instantiation, so that the
// fixed-page encode keeps its register budget and occupancy).
// Resident blocks per SM that each encode class is compiled for (registers per thread <= 64K / (256 * n)).
// Checked with scripts/kernel_resources.sh: no spills at these but 8 bytes in the per-channel 3-bit path (the
// plane-writing per-channel path would spill more at 3, so it keeps 2).
template <bool PLANES, int AXIS>
constexpr int kEncMinBlocks = AXIS == 0 ? (PLANES ? 3 : 4) : (PLANES ? 2 : 3);

// The work of one block: unit `ua` of page blockIdx.y of the launch, of class (AXIS, BITS) (checked by the caller).
template <typename T, bool PLANES, int AXIS, int BITS, typename Shared>
__device__ __forceinline__ void encode_unit(const EncodeArgs& A, const ChunkDesc& c, int ua, Shared& sh) {
  const int p = A.page_base + (int)blockIdx.y;  // page within the batch
  const int u = ua - c.unit_start;
  uint8_t* page = A.out + (int64_t)p * A.out_stride;
  uint8_t* chunk = page + c.offset;
  if (ua == 0 && threadIdx.x < 8)
    reinterpret_cast<uint4*>(page)[threadIdx.x] = reinterpret_cast<const uint4*>(A.header)[threadIdx.x];
  if (u == 0) {  // zero the alignment padding of this chunk
    const int ng2 = c.num_groups * 2;
    zero_range(chunk, c.codes_bytes, c.scale_off);
    zero_range(chunk, c.scale_off + ng2, c.asym ? c.min_off : c.nbytes);
    if (c.asym) zero_range(chunk, c.min_off + ng2, c.nbytes);
  }
  if constexpr (AXIS == 0) encode_axis0<T, PLANES, BITS>(A, c, p, u, chunk, sh);
  else encode_axis1<T, PLANES, BITS>(A, c, p, u, chunk, sh);
}

template <typename T, bool PLANES, int AXIS, int BITS>
__global__ void __launch_bounds__(kThreads, kEncMinBlocks<PLANES, AXIS>) encode_kernel(const __grid_constant__ EncodeArgs A) {
  const int ua = A.unit_base + blockIdx.x;  // unit within the page
  const ChunkDesc c = A.chunks[A.unit_chunk[ua]];
  if (c.axis != AXIS || c.bits != BITS) {  // a unit table out of class order: write nothing, report it
    if (threadIdx.x == 0) report_error(A.err, kErrEncodeClass, ua, A.units_per_page);
    return;
  }
  if constexpr (AXIS == 0) {
    __shared__ Axis0Shared sh;
    encode_unit<T, PLANES, 0, BITS>(A, c, ua, sh);
  } else {
    __shared__ __align__(16) Axis1Shared sh;
    encode_unit<T, PLANES, 1, BITS>(A, c, ua, sh);
  }
}

// Every class of a page in one launch (grid: all units x pages), for small batches of pages with several
// classes (mixed precision: up to 8): there the launches, not the GPU, set the time (run 18, H100: the
// mixed-kivi4 encode op of one page took 43 us of host time against 21 for KV4's two launches). The
// per-class kernels stay for large batches (see above: one kernel with every path lost half its issue
// slots to instruction fetch). Each block takes its unit's class from the chunk table; one shared area
// serves whichever path runs.
union __align__(16) EncodeShared {
  Axis0Shared a0;
  Axis1Shared a1;
};

template <typename T, bool PLANES>
__global__ void __launch_bounds__(kThreads) encode_all_classes_kernel(const __grid_constant__ EncodeArgs A) {
  const int ua = blockIdx.x;
  const ChunkDesc c = A.chunks[A.unit_chunk[ua]];
  __shared__ EncodeShared sh;
  switch (c.axis * 16 + c.bits) {
    case 2: encode_unit<T, PLANES, 0, 2>(A, c, ua, sh.a0); break;
    case 3: encode_unit<T, PLANES, 0, 3>(A, c, ua, sh.a0); break;
    case 4: encode_unit<T, PLANES, 0, 4>(A, c, ua, sh.a0); break;
    case 8: encode_unit<T, PLANES, 0, 8>(A, c, ua, sh.a0); break;
    case 18: encode_unit<T, PLANES, 1, 2>(A, c, ua, sh.a1); break;
    case 19: encode_unit<T, PLANES, 1, 3>(A, c, ua, sh.a1); break;
    case 20: encode_unit<T, PLANES, 1, 4>(A, c, ua, sh.a1); break;
    case 24: encode_unit<T, PLANES, 1, 8>(A, c, ua, sh.a1); break;
    default:
      if (threadIdx.x == 0) report_error(A.err, kErrEncodeClass, ua, A.units_per_page);
  }
}

// ---- decode -------------------------------------------------------------------------------------

// Everything a block needs about one unit (= a token range of one stream of one page).
struct UnitCtx {
  int s;            // stream
  int p;            // page within the batch
  int t0;           // first token of the unit inside the page
  int nwords;       // 16-byte code words
  int m0, mcount;   // metadata range (fp16 entries)
  bool meta_vec;    // metadata range is 16-byte aligned
  bool valid;       // the page id is in range (else the unit reads and writes nothing)
  const uint8_t* codes;
  const uint8_t* rcodes;  // elastic: this unit's refinement codes (nullptr: decode at the floor)
  const uint8_t* scale;
  const uint8_t* minp;
};

template <bool PLANES>
__device__ __forceinline__ UnitCtx unit_ctx(const DecodeArgs& A, int unit) {
  UnitCtx x;
  x.p = unit / A.units_per_page;
  const int r = unit - x.p * A.units_per_page;
  x.s = (A.nstreams > 1 && r >= (int)A.st[0].units) ? 1 : 0;
  const DecodeStream S = x.s ? A.st[1] : A.st[0];
  const int uu = x.s ? r - (int)A.st[0].units : r;
  const int W = (int)S.width, G = (int)S.group, TU = (int)S.unit_tokens;
  x.t0 = uu * TU;
  int64_t page_id = A.page_ids[x.p];
  x.valid = !bad_index(page_id, A.num_pages);
  if (!x.valid) {
    if (threadIdx.x == 0) report_error(A.err, kErrDecodePage, page_id, A.num_pages);
    page_id = 0;
  }
  const uint8_t* chunk = A.pages + page_id * A.page_stride + S.offset;
  x.nwords = (int)((int64_t)TU * W * S.bits / 128);
  x.codes = chunk + (int64_t)x.t0 * W * S.bits / 8;
  if (S.axis == 0) {
    x.m0 = (int)((int64_t)x.t0 * W / G);
    x.mcount = (int)((int64_t)TU * W / G);
  } else {
    x.m0 = (x.t0 / G) * W;
    x.mcount = ((TU + G - 1) / G) * W;
  }
  x.scale = chunk + S.scale_off + 2 * (int64_t)x.m0;
  x.minp = chunk + S.min_off + 2 * (int64_t)x.m0;
  x.meta_vec = ((x.m0 | x.mcount) & 7) == 0;
  x.rcodes = nullptr;
  if (PLANES && S.refine && x.valid) {
    const int64_t off = A.plane_src[(int64_t)x.s * A.n_pages + x.p];
    const int64_t bound = A.num_pages * A.page_stride;
    if (off >= 0) {
      if (off > bound - S.plane_off - (int64_t)A.page_size * W * S.bits / 8) {
        if (threadIdx.x == 0) report_error(A.err, kErrDecodePlane, off, bound);
      } else {
        x.rcodes = A.pages + off + S.plane_off + (int64_t)x.t0 * W * S.bits / 8;
      }
    }
  }
  return x;
}

struct UnitRegs {
  uint4 c[kDecCodeWordsPerThread];
  uint4 r[kDecCodeWordsPerThread];
  uint4 s[kDecMetaWordsPerThread];
  uint4 m[kDecMetaWordsPerThread];
};

// Issue every global (host) load of a unit into registers: 16-byte words, coalesced.
__device__ __forceinline__ void unit_load(const DecodeArgs& A, const UnitCtx& x, UnitRegs& R) {
  if (!x.valid) return;
  const int tid = threadIdx.x;
  const bool asym = (x.s ? A.st[1].asym : A.st[0].asym) != 0;
#pragma unroll
  for (int j = 0; j < kDecCodeWordsPerThread; ++j) {
    const int w = tid + j * kThreads;
    if (w < x.nwords) R.c[j] = reinterpret_cast<const uint4*>(x.codes)[w];
  }
  if (x.rcodes != nullptr) {
#pragma unroll
    for (int j = 0; j < kDecCodeWordsPerThread; ++j) {
      const int w = tid + j * kThreads;
      if (w < x.nwords) R.r[j] = reinterpret_cast<const uint4*>(x.rcodes)[w];
    }
  }
  if (x.meta_vec) {
    const int nmw = x.mcount >> 3;
#pragma unroll
    for (int j = 0; j < kDecMetaWordsPerThread; ++j) {
      const int w = tid + j * kThreads;
      if (w < nmw) {
        R.s[j] = reinterpret_cast<const uint4*>(x.scale)[w];
        if (asym) R.m[j] = reinterpret_cast<const uint4*>(x.minp)[w];
      }
    }
  }
}

__device__ __forceinline__ void unit_stash(const DecodeArgs& A, const UnitCtx& x, const UnitRegs& R, uint8_t* s_codes,
                                           uint8_t* s_r, uint16_t* s_scale, uint16_t* s_min) {
  if (!x.valid) return;
  const int tid = threadIdx.x;
  const bool asym = (x.s ? A.st[1].asym : A.st[0].asym) != 0;
#pragma unroll
  for (int j = 0; j < kDecCodeWordsPerThread; ++j) {
    const int w = tid + j * kThreads;
    if (w < x.nwords) reinterpret_cast<uint4*>(s_codes)[w] = R.c[j];
  }
  if (x.rcodes != nullptr) {
#pragma unroll
    for (int j = 0; j < kDecCodeWordsPerThread; ++j) {
      const int w = tid + j * kThreads;
      if (w < x.nwords) reinterpret_cast<uint4*>(s_r)[w] = R.r[j];
    }
  }
  if (x.meta_vec) {
    const int nmw = x.mcount >> 3;
#pragma unroll
    for (int j = 0; j < kDecMetaWordsPerThread; ++j) {
      const int w = tid + j * kThreads;
      if (w < nmw) {
        reinterpret_cast<uint4*>(s_scale)[w] = R.s[j];
        if (asym) reinterpret_cast<uint4*>(s_min)[w] = R.m[j];
      }
    }
  } else {  // unaligned metadata range (tiny shapes only): 2-byte loads
    for (int w = tid; w < x.mcount; w += kThreads) {
      s_scale[w] = reinterpret_cast<const uint16_t*>(x.scale)[w];
      if (asym) s_min[w] = reinterpret_cast<const uint16_t*>(x.minp)[w];
    }
  }
}

template <typename T, int BITS, bool REFINE>
__device__ __forceinline__ void unit_emit(const DecodeArgs& A, const UnitCtx& x, const uint8_t* s_codes, const uint8_t* s_r,
                                          const uint16_t* s_scale, const uint16_t* s_min) {
  if (!x.valid) return;
  const DecodeStream S = x.s ? A.st[1] : A.st[0];
  const int W = (int)S.width, W8 = W >> 3, G = (int)S.group, dim = (int)S.dim, TU = (int)S.unit_tokens;
  const bool asym = S.asym != 0;
  const int col_off = (int)S.col_off;
  const int b = (int)S.buffer;
  T* base = reinterpret_cast<T*>(b ? A.dst[1] : A.dst[0]);
  const int64_t rs = b ? A.row_stride[1] : A.row_stride[0];
  const int64_t hs = b ? A.head_stride[1] : A.head_stride[0];
  const int64_t nrows = b ? A.rows[1] : A.rows[0];
  const int64_t* tok = A.token_index + (int64_t)x.p * A.page_size + x.t0;
  const int npieces = TU * W8;
  const int tile0 = x.t0 / G;
  for (int q = threadIdx.x; q < npieces; q += kThreads) {
    const int lt = q / W8;
    const int col = (q - lt * W8) * 8;
    const int64_t row = tok[lt];
    if (bad_index(row, nrows)) {
      report_error(A.err, kErrDecodeRow, row, nrows);
      continue;
    }
    uint32_t u[8];
    load_codes8<BITS>(s_codes + q * BITS, u);
    float fc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) fc[e] = (float)u[e];
    if constexpr (REFINE) {
      uint32_t r[8];
      load_codes8<BITS>(s_r + q * BITS, r);
#pragma unroll
      for (int e = 0; e < 8; ++e) fc[e] += refine_offset<BITS>(r[e]);
    }
    float val[8];
    if (S.axis == 0) {
      if (G >= 8) {
        const int gi = (q * 8) / G;
        const float s = __half2float(__ushort_as_half(s_scale[gi]));
        const float m = asym ? __half2float(__ushort_as_half(s_min[gi])) : 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) val[e] = dequant_f<BITS>(fc[e], s, m, asym);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int gi = (q * 8 + e) / G;
          const float s = __half2float(__ushort_as_half(s_scale[gi]));
          const float m = asym ? __half2float(__ushort_as_half(s_min[gi])) : 0.f;
          val[e] = dequant_f<BITS>(fc[e], s, m, asym);
        }
      }
    } else {
      const int gi = ((x.t0 + lt) / G - tile0) * W + col;
      const uint4 sv = *reinterpret_cast<const uint4*>(s_scale + gi);
      uint4 mv = make_uint4(0u, 0u, 0u, 0u);
      if (asym) mv = *reinterpret_cast<const uint4*>(s_min + gi);
      const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w};
      const uint32_t mw[4] = {mv.x, mv.y, mv.z, mv.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float s = __half2float(__ushort_as_half((unsigned short)((sw[e >> 1] >> (16 * (e & 1))) & 0xffffu)));
        const float m = __half2float(__ushort_as_half((unsigned short)((mw[e >> 1] >> (16 * (e & 1))) & 0xffffu)));
        val[e] = dequant_f<BITS>(fc[e], s, m, asym);
      }
    }
    uint4 o;
    o.x = Elem<T>::pack2(val[0], val[1]);
    o.y = Elem<T>::pack2(val[2], val[3]);
    o.z = Elem<T>::pack2(val[4], val[5]);
    o.w = Elem<T>::pack2(val[6], val[7]);
    const int h = col / dim, d = col - h * dim;
    *reinterpret_cast<uint4*>(base + row * rs + h * hs + col_off + d) = o;
  }
}

// Persistent, bounded grid: block `first` handles units first, first + stride, ...; the global (PCIe)
// loads of the next unit are in flight while the current one is dequantized and stored.
template <typename T, bool PLANES>
__device__ __forceinline__ void decode_units(const DecodeArgs& A, int first, int stride, uint8_t* smem) {
  uint8_t* s_codes = smem;
  uint16_t* s_scale = reinterpret_cast<uint16_t*>(smem + A.smem_codes);
  uint16_t* s_min = s_scale + A.smem_meta;
  uint8_t* s_r = reinterpret_cast<uint8_t*>(s_min + A.smem_meta);  // only with planes (the launch sized it)
  const int64_t total = (int64_t)A.n_pages * A.units_per_page;  // < 2^31: the launchers check
  int unit = first;
  if (unit >= total) return;
  UnitCtx cur = unit_ctx<PLANES>(A, unit);
  UnitRegs R;
  unit_load(A, cur, R);
  while (true) {
    unit_stash(A, cur, R, s_codes, s_r, s_scale, s_min);
    __syncthreads();
    const int next = unit + stride;
    UnitCtx nxt;
    if (next < total) {
      nxt = unit_ctx<PLANES>(A, next);
      unit_load(A, nxt, R);
    }
    const int bits = (int)(cur.s ? A.st[1].bits : A.st[0].bits);
    const bool ref = PLANES && cur.rcodes != nullptr;
    if (bits == 8) unit_emit<T, 8, false>(A, cur, s_codes, s_r, s_scale, s_min);
    else if (bits == 4 && ref) unit_emit<T, 4, PLANES>(A, cur, s_codes, s_r, s_scale, s_min);
    else if (bits == 4) unit_emit<T, 4, false>(A, cur, s_codes, s_r, s_scale, s_min);
    else if (bits == 3) unit_emit<T, 3, false>(A, cur, s_codes, s_r, s_scale, s_min);  // never has planes
    else if (ref) unit_emit<T, 2, PLANES>(A, cur, s_codes, s_r, s_scale, s_min);
    else unit_emit<T, 2, false>(A, cur, s_codes, s_r, s_scale, s_min);
    if (next >= total) break;
    __syncthreads();
    unit = next;
    cur = nxt;
  }
}

// PLANES: the launch reads refinement planes (a separate instantiation: the fixed-page load keeps its
// register budget).
template <typename T, bool PLANES>
__global__ void __launch_bounds__(kThreads) decode_kernel(const __grid_constant__ DecodeArgs A) {
  extern __shared__ __align__(16) uint8_t smem[];
  decode_units<T, PLANES>(A, blockIdx.x, gridDim.x, smem);
}

// blockIdx.y = layer: the block copies its layer's arguments into shared memory, adds the load's indices.
template <typename T, bool PLANES>
__global__ void __launch_bounds__(kThreads) decode_layers_kernel(const DecodeArgs* __restrict__ table,
                                                                const int64_t* page_ids, const int64_t* token_index,
                                                                const int64_t* plane_src, int n_pages) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ __align__(16) DecodeArgs sA;
  static_assert(sizeof(DecodeArgs) % 8 == 0 && sizeof(DecodeArgs) / 8 <= kThreads, "DecodeArgs copy");
  const int64_t* src = reinterpret_cast<const int64_t*>(table + blockIdx.y);
  if (threadIdx.x < sizeof(DecodeArgs) / 8) reinterpret_cast<int64_t*>(&sA)[threadIdx.x] = src[threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) {
    sA.page_ids = page_ids;
    sA.token_index = token_index;
    sA.plane_src = plane_src;
    sA.n_pages = n_pages;
  }
  __syncthreads();
  decode_units<T, PLANES>(sA, blockIdx.x, gridDim.x, smem);
}

template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

// One decode launch of instantiation K with `smem` bytes of dynamic shared memory.
template <typename K, typename... Args>
cudaError_t launch(K kernel, dim3 grid, size_t smem, cudaStream_t stream, Args... args) {
  const cudaError_t e = allow_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<grid, kThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

template <typename T, bool PLANES>
cudaError_t launch_encode_class(const EncodeArgs& b, int axis, int bits, dim3 grid, cudaStream_t stream) {
  switch (axis * 16 + bits) {
    case 2: encode_kernel<T, PLANES, 0, 2><<<grid, kThreads, 0, stream>>>(b); break;
    case 3: encode_kernel<T, PLANES, 0, 3><<<grid, kThreads, 0, stream>>>(b); break;
    case 4: encode_kernel<T, PLANES, 0, 4><<<grid, kThreads, 0, stream>>>(b); break;
    case 8: encode_kernel<T, PLANES, 0, 8><<<grid, kThreads, 0, stream>>>(b); break;
    case 18: encode_kernel<T, PLANES, 1, 2><<<grid, kThreads, 0, stream>>>(b); break;
    case 19: encode_kernel<T, PLANES, 1, 3><<<grid, kThreads, 0, stream>>>(b); break;
    case 20: encode_kernel<T, PLANES, 1, 4><<<grid, kThreads, 0, stream>>>(b); break;
    case 24: encode_kernel<T, PLANES, 1, 8><<<grid, kThreads, 0, stream>>>(b); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_encode(const EncodeArgs& a, int dtype, cudaStream_t stream, bool all_classes) {
  if (a.n_pages <= 0 || a.units_per_page <= 0) return cudaSuccess;
  constexpr int kMaxY = 65535;
  const bool planes = a.plane_base != nullptr;
  all_classes = all_classes && a.n_spans > 1;  // one class is one launch either way
  for (int base = 0; base < a.n_pages; base += kMaxY) {
    const int n = (a.n_pages - base) < kMaxY ? (a.n_pages - base) : kMaxY;
    if (all_classes) {
      EncodeArgs b = a;
      b.page_base = base;
      b.unit_base = 0;
      const dim3 grid((unsigned)a.units_per_page, (unsigned)n);
      if (dtype == kBF16) {
        if (planes) encode_all_classes_kernel<__nv_bfloat16, true><<<grid, kThreads, 0, stream>>>(b);
        else encode_all_classes_kernel<__nv_bfloat16, false><<<grid, kThreads, 0, stream>>>(b);
      } else {
        if (planes) encode_all_classes_kernel<__half, true><<<grid, kThreads, 0, stream>>>(b);
        else encode_all_classes_kernel<__half, false><<<grid, kThreads, 0, stream>>>(b);
      }
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      continue;
    }
    for (int k = 0; k < a.n_spans; ++k) {
      const EncodeSpan& sp = a.spans[k];
      EncodeArgs b = a;
      b.page_base = base;
      b.unit_base = sp.unit_begin;
      const dim3 grid((unsigned)sp.units, (unsigned)n);
      cudaError_t e;
      if (dtype == kBF16) e = planes ? launch_encode_class<__nv_bfloat16, true>(b, sp.axis, sp.bits, grid, stream)
                                     : launch_encode_class<__nv_bfloat16, false>(b, sp.axis, sp.bits, grid, stream);
      else e = planes ? launch_encode_class<__half, true>(b, sp.axis, sp.bits, grid, stream)
                      : launch_encode_class<__half, false>(b, sp.axis, sp.bits, grid, stream);
      if (e != cudaSuccess) return e;
    }
  }
  return cudaSuccess;
}

cudaError_t launch_decode(const DecodeArgs& a, int dtype, int blocks, cudaStream_t stream) {
  const int64_t total = (int64_t)a.n_pages * a.units_per_page;
  if (total <= 0) return cudaSuccess;
  if (total > 0x7fffffffLL) return cudaErrorInvalidValue;  // unit numbers are int inside the kernel
  if (blocks <= 0 || blocks > total) blocks = (int)total;
  const bool planes = a.plane_src != nullptr;
  const size_t smem = (size_t)a.smem_codes * (planes ? 2 : 1) + (size_t)a.smem_meta * 4;
  const dim3 grid((unsigned)blocks);
  if (dtype == kBF16)
    return planes ? launch(decode_kernel<__nv_bfloat16, true>, grid, smem, stream, a)
                  : launch(decode_kernel<__nv_bfloat16, false>, grid, smem, stream, a);
  return planes ? launch(decode_kernel<__half, true>, grid, smem, stream, a)
                : launch(decode_kernel<__half, false>, grid, smem, stream, a);
}

cudaError_t launch_decode_layers(const DecodeArgs* table, int num_layers, int max_units_per_page,
                                 const int64_t* page_ids, const int64_t* token_index, const int64_t* plane_src,
                                 int64_t n_pages, int smem_codes, int smem_meta, int dtype, int blocks_per_layer,
                                 cudaStream_t stream) {
  const int64_t total = n_pages * max_units_per_page;  // units of the largest layer
  if (total <= 0 || num_layers <= 0) return cudaSuccess;
  if (total > 0x7fffffffLL || num_layers > 65535) return cudaErrorInvalidValue;
  const int64_t per_layer = (blocks_per_layer <= 0 || blocks_per_layer > total) ? total : blocks_per_layer;
  const dim3 grid((unsigned)per_layer, (unsigned)num_layers);
  const bool planes = plane_src != nullptr;
  const size_t smem = (size_t)smem_codes * (planes ? 2 : 1) + (size_t)smem_meta * 4;
  const int n = (int)n_pages;
  if (dtype == kBF16)
    return planes ? launch(decode_layers_kernel<__nv_bfloat16, true>, grid, smem, stream, table, page_ids, token_index, plane_src, n)
                  : launch(decode_layers_kernel<__nv_bfloat16, false>, grid, smem, stream, table, page_ids, token_index, plane_src, n);
  return planes ? launch(decode_layers_kernel<__half, true>, grid, smem, stream, table, page_ids, token_index, plane_src, n)
                : launch(decode_layers_kernel<__half, false>, grid, smem, stream, table, page_ids, token_index, plane_src, n);
}

}  // namespace kvtq
