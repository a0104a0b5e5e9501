// kernels/cuda/flash_attn.cu -- FlashAttention-2-class forward and backward (mma.sync m16n8k16).
//
// Contract: kernels/attention.h. Valid for sm_80 and sm_90a (no Hopper-only instructions).
//
// Building blocks
//  - global->shared: 16-byte cp.async (zero-fill past the sequence end and past head_dim),
//    tiles stored row-major with the 16-byte chunk index XOR-swizzled by the row (bank-conflict
//    free ldmatrix), see sw<W>().
//  - shared->registers: ldmatrix.x4 (A operands and "col" B operands) and ldmatrix.x4.trans
//    (B operands stored k-major, i.e. V, dO, Q, K as right-hand matrices).
//  - mma.sync.aligned.m16n8k16 bf16/fp16 -> fp32. An m16n8 accumulator pair has the register
//    layout of an m16k16 A fragment, so P (forward) and dS/P^T (backward) feed the next MMA from
//    registers.
//
// Forward: CTA = (BM query rows, b, h); warps own 16*MW rows each; loop over KV blocks in
//   reverse (masked blocks first) with a 2-stage K/V cp.async ring; online softmax in exp2 with
//   scale*log2(e) folded in; O staged through shared memory for 16-byte stores.
// Backward: preprocess (D = rowsum(dO*O), zero the fp32 dq accumulator), main kernel with CTA =
//   (BN keys, b, kv head): K,V resident, loop over the GQA group's query heads and Q blocks,
//   S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q all in registers; dQ via
//   dS staged in smem and fp32 atomics (default), then a convert kernel. Deterministic mode: the
//   main kernel skips dQ, a query-major kernel recomputes P, dS and accumulates dQ in registers.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <math.h>

#include "attention.h"
#include "flash_common.cuh"

namespace {

using namespace l3k_fa;

// ------------------------------------------------------------------ PTX helpers
__device__ __forceinline__ void ldsm_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return pack2<__nv_bfloat16>(lo, hi); }
};
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return pack2<__half>(lo, hi); }
};

// Swizzled element offset of (r, c) in a row-major tile of W 16-bit columns. The 16-byte chunk
// index is XORed with row bits so that 8 consecutive rows at one logical chunk hit 8 distinct
// 16-byte bank groups. W >= 64: chunk ^ (r & 7) (stays within its 64-column panel); W == 32:
// chunk ^ ((r >> 1) & 3).
template <int W>
__device__ __forceinline__ int sw(int r, int c) {
  if constexpr (W >= 64) {
    return r * W + ((((c >> 3) ^ (r & 7))) << 3) + (c & 7);
  } else {
    static_assert(W == 32, "tile width");
    return r * W + ((((c >> 3) ^ ((r >> 1) & 3))) << 3) + (c & 7);
  }
}

// Per-lane byte offset of the row pointer an ldmatrix.x4 lane supplies, for lane row r_l and lane
// chunk c_l (both < 8 after masking by the tile pattern). For a constant even chunk cc and a constant
// row offset rr (multiple of 8) the address is base + ((off ^ (cc << 4)) + rr * 2W): the swizzle
// XOR only touches the chunk bits, so the compiler gets one LOP3 per chunk and immediate row offsets.
template <int W>
__device__ __forceinline__ uint32_t lane_off(int r_l, int c_l) { return 2u * (uint32_t)sw<W>(r_l, c_l * 8); }
// A operand (rows 0..15 of the strip, two 8-column halves)
template <int W> __device__ __forceinline__ uint32_t off_a(int lane) { return lane_off<W>(lane & 15, lane >> 4); }
// B operand stored [n][k] (non-transposed ldmatrix): n rows 0..15, k halves
template <int W> __device__ __forceinline__ uint32_t off_b(int lane) { return lane_off<W>((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1); }
// B operand stored [k][n] (ldmatrix.trans): k rows 0..15, n halves
template <int W> __device__ __forceinline__ uint32_t off_t(int lane) { return lane_off<W>((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4); }
__device__ __forceinline__ uint32_t xo(uint32_t off, int cc) { return off ^ ((uint32_t)cc << 4); }

// The m16k16 A fragment made of two adjacent m16n8 accumulator tiles (P or dS from the previous
// product, rounded to T): the register-A operand of the next product.
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = MmaOp<T>::pack(lo[0], lo[1]);
  a[1] = MmaOp<T>::pack(lo[2], lo[3]);
  a[2] = MmaOp<T>::pack(hi[0], hi[1]);
  a[3] = MmaOp<T>::pack(hi[2], hi[3]);
}

// acc (W / 8 m16n8 tiles) += A (m16k16 fragment) x B, where B is the 16-row slab at byte offset
// `slab` of the tile at sB (row width HD, swizzled), columns from 8-element chunk c0 on, read
// through ldmatrix.trans (lane offsets oT).
template <typename T, int HD, int W>
__device__ __forceinline__ void a_times_slab_t(float (&acc)[W / 8][4], const uint32_t (&a)[4], uint32_t sB,
                                               uint32_t oT, int c0, uint32_t slab) {
#pragma unroll
  for (int dj = 0; dj < W / 16; dj++) {
    uint32_t b0, b1, b2, b3;
    ldsm_x4_t(b0, b1, b2, b3, sB + (xo(oT, c0 + dj * 2) + slab));
    MmaOp<T>::run(acc[2 * dj], a, b0, b1);
    MmaOp<T>::run(acc[2 * dj + 1], a, b2, b3);
  }
}

// cp.async a ROWS x W tile (row stride `rs` elements) into swizzled smem; rows >= nrows and
// columns >= ncols are zero-filled.
template <int ROWS, int W, int NT, typename T>
__device__ __forceinline__ void load_tile(T *s, const T *g, int64_t rs, int64_t nrows, int ncols, int tid) {
  constexpr int CH = W / 8;
  const uint32_t sbase = smem_u32(s);
#pragma unroll
  for (int c = tid; c < ROWS * CH; c += NT) {
    const int r = c / CH, ch = c % CH;
    const bool p = (r < nrows) && (ch * 8 < ncols);
    const T *src = p ? g + (int64_t)r * rs + ch * 8 : g;
    cp_async16(sbase + 2u * (uint32_t)sw<W>(r, ch * 8), src, p);
  }
}

// store a ROWS x W swizzled smem tile to global with 16-byte stores (rows < nrows, cols < ncols)
template <int ROWS, int W, int NT, typename T>
__device__ __forceinline__ void store_tile(T *g, int64_t rs, const T *s, int64_t nrows, int ncols, int tid) {
  constexpr int CH = W / 8;
#pragma unroll
  for (int c = tid; c < ROWS * CH; c += NT) {
    const int r = c / CH, ch = c % CH;
    if (r < nrows && ch * 8 < ncols)
      *reinterpret_cast<uint4 *>(g + (int64_t)r * rs + ch * 8) = *reinterpret_cast<const uint4 *>(s + sw<W>(r, ch * 8));
  }
}

// ================================================================== forward
template <typename T, int HD, int BM, int BN, int NW, int MW>
__global__ void __launch_bounds__(NW * 32, 1) fa_fwd_kernel(const l3k_attn_fwd_args a) {
  static_assert(BM == NW * 16 * MW, "BM");
  constexpr int NT = NW * 32;
  constexpr int NTS = BN / 8;   // score n-tiles per row strip
  constexpr int NTO = HD / 8;   // output n-tiles
  using Op = MmaOp<T>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T *sQ = reinterpret_cast<T *>(smem_raw);
  T *sK = sQ + BM * HD;        // [2][BN][HD]
  T *sV = sK + 2 * BN * HD;    // [2][BN][HD]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t H = a.n_heads, Sq = a.seq_q, Sk = a.seq_k;
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, hk = h / (H / a.n_kv_heads);
  const int64_t m_block = (int64_t)gridDim.y - 1 - blockIdx.y;
  const int64_t m0 = m_block * BM;
  const int hd = (int)a.head_dim;

  const T *qg = static_cast<const T *>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + m0 * a.q_stride[2];
  const T *kg = static_cast<const T *>(a.k) + b * a.k_stride[0] + hk * a.k_stride[1];
  const T *vg = static_cast<const T *>(a.v) + b * a.v_stride[0] + hk * a.v_stride[1];
  T *og = static_cast<T *>(a.o) + b * a.o_stride[0] + h * a.o_stride[1] + m0 * a.o_stride[2];
  float *lseg = a.lse + bh * Sq + m0;

  int64_t n_max = ceil_div_pos(Sk, BN);
  if (a.causal) {
    const int64_t lim = ceil_div_pos(m0 + BM + Sk - Sq, BN);
    n_max = lim < n_max ? lim : n_max;
  }
  if (n_max <= 0) {  // every row fully masked (or Sk == 0): O = 0, LSE = +inf
    for (int c = tid; c < BM * (HD / 8); c += NT) {
      const int r = c / (HD / 8), ch = c % (HD / 8);
      if (m0 + r < Sq && ch * 8 < hd)
        *reinterpret_cast<uint4 *>(og + (int64_t)r * a.o_stride[2] + ch * 8) = make_uint4(0, 0, 0, 0);
    }
    for (int r = tid; r < BM; r += NT)
      if (m0 + r < Sq) lseg[r] = INFINITY;
    return;
  }

  const float sl2 = a.scale * kLog2e;
  load_tile<BM, HD, NT>(sQ, qg, a.q_stride[2], Sq - m0, hd, tid);
  cp_async_commit();
  {
    const int64_t n0 = (n_max - 1) * BN;
    load_tile<BN, HD, NT>(sK, kg + n0 * a.k_stride[2], a.k_stride[2], Sk - n0, hd, tid);
    cp_async_commit();
    load_tile<BN, HD, NT>(sV, vg + n0 * a.v_stride[2], a.v_stride[2], Sk - n0, hd, tid);
    cp_async_commit();
  }

  float acc_o[MW][NTO][4];
  float row_m[MW][2], row_l[MW][2];
#pragma unroll
  for (int mi = 0; mi < MW; mi++) {
#pragma unroll
    for (int j = 0; j < NTO; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc_o[mi][j][e] = 0.f;
    row_m[mi][0] = row_m[mi][1] = -INFINITY;
    row_l[mi][0] = row_l[mi][1] = 0.f;
  }

  const int wrow = warp * 16 * MW;  // first row of this warp within the tile
  const uint32_t sKa = smem_u32(sK), sVa = smem_u32(sV);
  const uint32_t sQw = smem_u32(sQ) + 2u * (uint32_t)(wrow * HD);
  const uint32_t oA = off_a<HD>(lane), oB = off_b<HD>(lane), oT = off_t<HD>(lane);

  for (int64_t n = n_max - 1, it = 0; n >= 0; --n, ++it) {
    const int st = (int)(it & 1);
    const int64_t n0 = n * BN;
    cp_async_wait<1>();  // Q and K(n) landed
    __syncthreads();     // ... for every thread; everyone is done with stage st^1
    const bool pf = n > 0;
    if (pf) {
      const int64_t n1 = n0 - BN;
      load_tile<BN, HD, NT>(sK + (st ^ 1) * BN * HD, kg + n1 * a.k_stride[2], a.k_stride[2], Sk - n1, hd, tid);
      cp_async_commit();
      load_tile<BN, HD, NT>(sV + (st ^ 1) * BN * HD, vg + n1 * a.v_stride[2], a.v_stride[2], Sk - n1, hd, tid);
      cp_async_commit();
    }
    // ---- S = Q K^T
    float s[MW][NTS][4];
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
      for (int j = 0; j < NTS; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[mi][j][e] = 0.f;
    const uint32_t sKs = sKa + 2u * (uint32_t)(st * BN * HD);
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
      uint32_t qa[MW][4];
#pragma unroll
      for (int mi = 0; mi < MW; mi++)
        ldsm_x4(qa[mi][0], qa[mi][1], qa[mi][2], qa[mi][3], sQw + (xo(oA, kk * 2) + mi * 16 * HD * 2));
#pragma unroll
      for (int nj = 0; nj < BN / 16; nj++) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3, sKs + (xo(oB, kk * 2) + nj * 16 * HD * 2));
#pragma unroll
        for (int mi = 0; mi < MW; mi++) {
          Op::run(s[mi][2 * nj], qa[mi], b0, b1);
          Op::run(s[mi][2 * nj + 1], qa[mi], b2, b3);
        }
      }
    }
    // ---- mask (key tail, causal diagonal); warp-uniform branch
    const bool need_mask = (n0 + BN > Sk) || (a.causal && n0 + BN - 1 > m0 + Sk - Sq);
    if (need_mask) {
#pragma unroll
      for (int mi = 0; mi < MW; mi++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
          const int64_t row = m0 + wrow + mi * 16 + g + 8 * r;
          int64_t lim = Sk;
          if (a.causal) { const int64_t c = row + 1 + Sk - Sq; lim = c < lim ? c : lim; }
#pragma unroll
          for (int j = 0; j < NTS; j++)
#pragma unroll
            for (int e = 0; e < 2; e++)
              if (n0 + j * 8 + 2 * t + e >= lim) s[mi][j][2 * r + e] = -INFINITY;
        }
    }
    // ---- online softmax (rows g and g+8 of each m16 strip; a row lives in one quad)
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
      for (int r = 0; r < 2; r++) {
        float mx = row_m[mi][r];
#pragma unroll
        for (int j = 0; j < NTS; j++) mx = fmaxf(mx, fmaxf(s[mi][j][2 * r], s[mi][j][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = (mx == -INFINITY) ? 0.f : mx;
        const float msc = m_use * sl2;
        const float alpha = ex2(row_m[mi][r] * sl2 - msc);  // old max -inf: 0
        row_m[mi][r] = mx;
        float lsum = 0.f;
#pragma unroll
        for (int j = 0; j < NTS; j++) {
          const float p0 = ex2(fmaf(s[mi][j][2 * r], sl2, -msc));
          const float p1 = ex2(fmaf(s[mi][j][2 * r + 1], sl2, -msc));
          s[mi][j][2 * r] = p0;
          s[mi][j][2 * r + 1] = p1;
          lsum += p0 + p1;
        }
        row_l[mi][r] = row_l[mi][r] * alpha + lsum;
#pragma unroll
        for (int j = 0; j < NTO; j++) {
          acc_o[mi][j][2 * r] *= alpha;
          acc_o[mi][j][2 * r + 1] *= alpha;
        }
      }
    // ---- O += P V
    if (pf) cp_async_wait<2>(); else cp_async_wait<0>();
    __syncthreads();
    const uint32_t sVs = sVa + 2u * (uint32_t)(st * BN * HD);
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
      uint32_t pa[MW][4];
#pragma unroll
      for (int mi = 0; mi < MW; mi++) acc_to_a<T>(pa[mi], s[mi][2 * kk], s[mi][2 * kk + 1]);
#pragma unroll
      for (int dj = 0; dj < HD / 16; dj++) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(b0, b1, b2, b3, sVs + (xo(oT, dj * 2) + kk * 16 * HD * 2));
#pragma unroll
        for (int mi = 0; mi < MW; mi++) {
          Op::run(acc_o[mi][2 * dj], pa[mi], b0, b1);
          Op::run(acc_o[mi][2 * dj + 1], pa[mi], b2, b3);
        }
      }
    }
  }

  // ---- epilogue: normalize, LSE, stage O through this warp's own Q rows, 16-byte stores
#pragma unroll
  for (int mi = 0; mi < MW; mi++)
#pragma unroll
    for (int r = 0; r < 2; r++) {
      float l = row_l[mi][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const bool live = l > 0.f;
      const float inv = live ? 1.f / l : 0.f;
#pragma unroll
      for (int j = 0; j < NTO; j++) {
        acc_o[mi][j][2 * r] *= inv;
        acc_o[mi][j][2 * r + 1] *= inv;
      }
      const int lr = wrow + mi * 16 + g + 8 * r;
      if (t == 0 && m0 + lr < Sq) lseg[lr] = live ? row_m[mi][r] * a.scale + logf(l) : INFINITY;
    }
  __syncwarp();
#pragma unroll
  for (int mi = 0; mi < MW; mi++)
#pragma unroll
    for (int j = 0; j < NTO; j++)
#pragma unroll
      for (int r = 0; r < 2; r++)
        *reinterpret_cast<uint32_t *>(sQ + sw<HD>(wrow + mi * 16 + g + 8 * r, j * 8 + 2 * t)) =
            Op::pack(acc_o[mi][j][2 * r], acc_o[mi][j][2 * r + 1]);
  __syncwarp();
  store_tile<16 * MW, HD, 32>(og + (int64_t)wrow * a.o_stride[2], a.o_stride[2], sQ + wrow * HD, Sq - m0 - wrow, hd, lane);
}

// ================================================================== backward: preprocess
// D[row] = sum_d dO*O (fp32); zero the dq accumulator row. One warp per row.
template <typename T>
__global__ void fa_bwd_pre_kernel(const l3k_attn_bwd_args a, float *dsum, float *dqacc) {
  const int64_t H = a.f.n_heads, Sq = a.f.seq_q;
  const int hd = (int)a.f.head_dim;
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int64_t total = a.f.batch * H * Sq;
  if (row >= total) return;
  const int64_t bh = row / Sq, i = row % Sq, b = bh / H, h = bh % H;
  const T *dog = static_cast<const T *>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1] + i * a.do_stride[2];
  const T *og = static_cast<const T *>(a.f.o) + b * a.f.o_stride[0] + h * a.f.o_stride[1] + i * a.f.o_stride[2];
  float acc = 0.f;
  for (int c = lane * 8; c < hd; c += 256) {
    const uint4 x = *reinterpret_cast<const uint4 *>(dog + c);
    const uint4 y = *reinterpret_cast<const uint4 *>(og + c);
    const T *xp = reinterpret_cast<const T *>(&x);
    const T *yp = reinterpret_cast<const T *>(&y);
#pragma unroll
    for (int e = 0; e < 8; e++) acc += (float)xp[e] * (float)yp[e];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) dsum[row] = acc;
  if (dqacc) {
    float *q = dqacc + row * hd;
    for (int c = lane * 4; c < hd; c += 128) *reinterpret_cast<float4 *>(q + c) = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// dq = dqacc * scale -> T. One warp per row. tiled: full 64-row blocks of a head_dim 64/128
// problem are in the wgmma accumulator order of flash_attn_bwd_sm90.cu (kDqTile): element
// (row 16wi + g + 8r, column 64w + 8j + 2t + e) of the block at 4096w + 4(128j + 32wi + 4g + t) + 2r + e.
template <typename T>
__global__ void fa_bwd_dq_convert_kernel(const l3k_attn_bwd_args a, const float *dqacc, int tiled) {
  const int64_t H = a.f.n_heads, Sq = a.f.seq_q;
  const int hd = (int)a.f.head_dim;
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int64_t total = a.f.batch * H * Sq;
  if (row >= total) return;
  const int64_t bh = row / Sq, i = row % Sq, b = bh / H, h = bh % H;
  T *dqg = static_cast<T *>(a.dq) + b * a.dq_stride[0] + h * a.dq_stride[1] + i * a.dq_stride[2];
  const float *src = dqacc + row * hd;
  const float sc = a.f.scale;
  const int64_t m0 = i - (i & 63);
  if (tiled && (hd == 64 || hd == 128) && m0 + 64 <= Sq) {
    const float *blk = dqacc + (bh * Sq + m0) * hd;
    const int lr = (int)(i & 63);
    const int rbase = 32 * (lr >> 4) + 4 * (lr & 7), roff = 2 * ((lr >> 3) & 1);
    for (int c = lane * 8; c < hd; c += 256) {
      float x[8];
#pragma unroll
      for (int u = 0; u < 4; u++) {  // columns c + 2u, c + 2u + 1: t = u (c is a multiple of 8)
        const int cc = c + 2 * u;
        const float2 v = *reinterpret_cast<const float2 *>(
            blk + 4096 * (cc >> 6) + 4 * (128 * ((cc & 63) >> 3) + rbase + u) + roff);
        x[2 * u] = v.x;
        x[2 * u + 1] = v.y;
      }
      uint4 out;
      out.x = MmaOp<T>::pack(x[0] * sc, x[1] * sc);
      out.y = MmaOp<T>::pack(x[2] * sc, x[3] * sc);
      out.z = MmaOp<T>::pack(x[4] * sc, x[5] * sc);
      out.w = MmaOp<T>::pack(x[6] * sc, x[7] * sc);
      *reinterpret_cast<uint4 *>(dqg + c) = out;
    }
    return;
  }
  for (int c = lane * 8; c < hd; c += 256) {
    const float4 x0 = *reinterpret_cast<const float4 *>(src + c);
    const float4 x1 = *reinterpret_cast<const float4 *>(src + c + 4);
    uint4 out;
    out.x = MmaOp<T>::pack(x0.x * sc, x0.y * sc);
    out.y = MmaOp<T>::pack(x0.z * sc, x0.w * sc);
    out.z = MmaOp<T>::pack(x1.x * sc, x1.y * sc);
    out.w = MmaOp<T>::pack(x1.z * sc, x1.w * sc);
    *reinterpret_cast<uint4 *>(dqg + c) = out;
  }
}

// ================================================================== backward: main (KV-outer)
// CTA = (BN keys, b, kv head). Warp w owns key strip (w % (BN/16)) and, for dK/dV, the column
// range [(w / (BN/16)) * HD/DSPLIT, +HD/DSPLIT). Loops over (query head of the group, Q block).
// c = A B^T for the backward's 16-row strips: A is this warp's 16 x HD strip at byte address sA
// (ldmatrix offsets oA), B the BM x HD tile at sB (offsets oB), both swizzled with row width HD;
// c holds BM/8 m16n8 accumulator tiles. (S^T = K Q^T and dP^T = V dO^T.)
template <typename T, int HD, int BM>
__device__ __forceinline__ void strip_times_rows_t(float (&c)[BM / 8][4], uint32_t sA, uint32_t sB, uint32_t oA,
                                                   uint32_t oB) {
#pragma unroll
  for (int j = 0; j < BM / 8; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) c[j][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < HD / 16; kk++) {
    uint32_t a[4];
    ldsm_x4(a[0], a[1], a[2], a[3], sA + xo(oA, kk * 2));
#pragma unroll
    for (int nj = 0; nj < BM / 16; nj++) {
      uint32_t b0, b1, b2, b3;
      ldsm_x4(b0, b1, b2, b3, sB + (xo(oB, kk * 2) + nj * 16 * HD * 2));
      MmaOp<T>::run(c[2 * nj], a, b0, b1);
      MmaOp<T>::run(c[2 * nj + 1], a, b2, b3);
    }
  }
}

template <typename T, int HD, int BM, int BN, int NW, int DSPLIT, bool DQ>
__global__ void __launch_bounds__(NW * 32, 1)
    fa_bwd_kernel(const l3k_attn_bwd_args a, const float *dsum, float *dqacc) {
  static_assert(NW == (BN / 16) * DSPLIT, "warps");
  static_assert(NW % (BM / 16) == 0, "dq warp split");
  constexpr int NT = NW * 32;
  constexpr int DW = HD / DSPLIT;          // dK/dV columns per warp
  constexpr int NQ = BM / 8;               // n-tiles of S^T (query columns)
  constexpr int DQW = HD / (NW / (BM / 16));  // dQ columns per warp
  using Op = MmaOp<T>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T *sK = reinterpret_cast<T *>(smem_raw);  // [BN][HD]
  T *sV = sK + BN * HD;                     // [BN][HD]
  T *sQ = sV + BN * HD;                     // [2][BM][HD]
  T *sdO = sQ + 2 * BM * HD;                // [2][BM][HD]
  T *sdS = sdO + 2 * BM * HD;               // [BN][BM]  (dS^T)
  float *sL = reinterpret_cast<float *>(sdS + BN * BM);  // [2][BM] lse*log2e
  float *sD = sL + 2 * BM;                               // [2][BM]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const l3k_attn_fwd_args &f = a.f;
  const int64_t H = f.n_heads, HKV = f.n_kv_heads, Sq = f.seq_q, Sk = f.seq_k;
  const int64_t G = H / HKV;
  const int64_t bhk = blockIdx.x, b = bhk / HKV, hk = bhk % HKV;
  const int64_t n0 = (int64_t)blockIdx.y * BN;
  const int hd = (int)f.head_dim;
  const float sl2 = f.scale * kLog2e;

  const T *kg = static_cast<const T *>(f.k) + b * f.k_stride[0] + hk * f.k_stride[1] + n0 * f.k_stride[2];
  const T *vg = static_cast<const T *>(f.v) + b * f.v_stride[0] + hk * f.v_stride[1] + n0 * f.v_stride[2];

  // Q blocks that see at least one key of this block
  const int64_t m_blocks = ceil_div_pos(Sq, BM);
  int64_t m_min = 0;
  if (f.causal) {
    const int64_t first = n0 - (Sk - Sq);  // first query row that sees key n0
    m_min = first > 0 ? first / BM : 0;
  }
  const int64_t per_head = m_blocks > m_min ? m_blocks - m_min : 0;
  const int64_t total = G * per_head;

  auto issue = [&](int64_t p, int stg) {
    const int64_t h = hk * G + p / per_head, mb = m_min + p % per_head, m0 = mb * BM;
    const T *qg = static_cast<const T *>(f.q) + b * f.q_stride[0] + h * f.q_stride[1] + m0 * f.q_stride[2];
    const T *dog = static_cast<const T *>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1] + m0 * a.do_stride[2];
    load_tile<BM, HD, NT>(sQ + stg * BM * HD, qg, f.q_stride[2], Sq - m0, hd, tid);
    load_tile<BM, HD, NT>(sdO + stg * BM * HD, dog, a.do_stride[2], Sq - m0, hd, tid);
    const int64_t rb = (b * H + h) * Sq + m0;
    for (int r = tid; r < BM; r += NT) {
      const bool ok = m0 + r < Sq;
      sL[stg * BM + r] = ok ? f.lse[rb + r] * kLog2e : INFINITY;  // +inf rows give P = 0
      sD[stg * BM + r] = ok ? dsum[rb + r] : 0.f;
    }
  };

  load_tile<BN, HD, NT>(sK, kg, f.k_stride[2], Sk - n0, hd, tid);
  load_tile<BN, HD, NT>(sV, vg, f.v_stride[2], Sk - n0, hd, tid);
  if (total > 0) issue(0, 0);
  cp_async_commit();

  const int ks = warp % (BN / 16);          // key strip
  const int dbase = (warp / (BN / 16)) * DW;
  float acc_dk[DW / 8][4], acc_dv[DW / 8][4];
#pragma unroll
  for (int j = 0; j < DW / 8; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) acc_dk[j][e] = acc_dv[j][e] = 0.f;

  const uint32_t sKa = smem_u32(sK), sQa = smem_u32(sQ), sdOa = smem_u32(sdO);
  const uint32_t sKw = sKa + 2u * (uint32_t)(ks * 16 * HD), sVw = smem_u32(sV) + 2u * (uint32_t)(ks * 16 * HD);
  const uint32_t oA = off_a<HD>(lane), oB = off_b<HD>(lane), oT = off_t<HD>(lane);
  // dS^T as the A operand of dS K: rows = keys (k), columns = this warp's query strip (m)
  const uint32_t sdSw = smem_u32(sdS) +
      lane_off<BM>((lane & 7) + ((lane >> 4) << 3), (warp % (BM / 16)) * 2 + ((lane >> 3) & 1));

  for (int64_t p = 0; p < total; p++) {
    const int st = (int)(p & 1);
    const int64_t h = hk * G + p / per_head, mb = m_min + p % per_head, m0 = mb * BM;
    cp_async_wait<0>();
    __syncthreads();
    if (p + 1 < total) issue(p + 1, st ^ 1);
    cp_async_commit();

    const uint32_t sQs = sQa + 2u * (uint32_t)(st * BM * HD), sdOs = sdOa + 2u * (uint32_t)(st * BM * HD);
    const float *sLs = sL + st * BM, *sDs = sD + st * BM;

    // ---- S^T = K_strip Q^T  (16 keys x BM queries)
    float sT[NQ][4];
    strip_times_rows_t<T, HD, BM>(sT, sKw, sQs, oA, oB);
    // ---- P^T = exp2(S^T * scale*log2e - lse*log2e), masked to 0
    const bool need_mask = (n0 + BN > Sk) || (f.causal && n0 + BN - 1 > m0 + Sk - Sq);
#pragma unroll
    for (int j = 0; j < NQ; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int qc = j * 8 + 2 * t + (e & 1);
        float pv = ex2(fmaf(sT[j][e], sl2, -sLs[qc]));
        if (need_mask) {
          const int64_t key = n0 + ks * 16 + g + 8 * (e >> 1), q = m0 + qc;
          if (key >= Sk || (f.causal && key > q + Sk - Sq)) pv = 0.f;
        }
        sT[j][e] = pv;
      }
    // ---- dV += P^T dO   (A = P^T from registers, B = dO [query][d] via ldmatrix.trans)
#pragma unroll
    for (int kk = 0; kk < BM / 16; kk++) {
      uint32_t pa[4];
      acc_to_a<T>(pa, sT[2 * kk], sT[2 * kk + 1]);
      a_times_slab_t<T, HD, DW>(acc_dv, pa, sdOs, oT, dbase / 8, kk * 16 * HD * 2);
    }
    // ---- dP^T = V_strip dO^T
    float dpT[NQ][4];
    strip_times_rows_t<T, HD, BM>(dpT, sVw, sdOs, oA, oB);
    // ---- dS^T = P^T * (dP^T - D)
#pragma unroll
    for (int j = 0; j < NQ; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) dpT[j][e] = sT[j][e] * (dpT[j][e] - sDs[j * 8 + 2 * t + (e & 1)]);
    // ---- dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < BM / 16; kk++) {
      uint32_t da[4];
      acc_to_a<T>(da, dpT[2 * kk], dpT[2 * kk + 1]);
      if (DQ && dbase == 0) {  // stage dS^T (bf16/fp16) for the dQ product
        *reinterpret_cast<uint32_t *>(sdS + sw<BM>(ks * 16 + g, kk * 16 + 2 * t)) = da[0];
        *reinterpret_cast<uint32_t *>(sdS + sw<BM>(ks * 16 + g + 8, kk * 16 + 2 * t)) = da[1];
        *reinterpret_cast<uint32_t *>(sdS + sw<BM>(ks * 16 + g, kk * 16 + 8 + 2 * t)) = da[2];
        *reinterpret_cast<uint32_t *>(sdS + sw<BM>(ks * 16 + g + 8, kk * 16 + 8 + 2 * t)) = da[3];
      }
      a_times_slab_t<T, HD, DW>(acc_dk, da, sQs, oT, dbase / 8, kk * 16 * HD * 2);
    }
    if constexpr (DQ) {
      __syncthreads();  // dS^T complete
      // dQ_i (BM x HD) += dS (BM x BN) K (BN x HD); warp: query strip qs, columns [qd, qd+DQW)
      const int qs = warp % (BM / 16);
      const int qd = (warp / (BM / 16)) * DQW;
      float acc_q[DQW / 8][4];
#pragma unroll
      for (int j = 0; j < DQW / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc_q[j][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; kk++) {
        uint32_t dsa[4];  // A = dS rows qs*16.., keys kk*16..; stored transposed -> ldmatrix.trans
        ldsm_x4_t(dsa[0], dsa[1], dsa[2], dsa[3], sdSw + kk * 16 * BM * 2);
        a_times_slab_t<T, HD, DQW>(acc_q, dsa, sKa, oT, qd / 8, kk * 16 * HD * 2);
      }
      float *dqb = dqacc + ((b * H + h) * Sq + m0) * (int64_t)hd;
#pragma unroll
      for (int j = 0; j < DQW / 8; j++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
          const int row = qs * 16 + g + 8 * r, col = qd + j * 8 + 2 * t;
          if (m0 + row < Sq && col < hd) {
            float *dst = dqb + (int64_t)row * hd + col;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            atomicAdd(reinterpret_cast<float2 *>(dst), make_float2(acc_q[j][2 * r], acc_q[j][2 * r + 1]));
#else
            atomicAdd(dst, acc_q[j][2 * r]);
            atomicAdd(dst + 1, acc_q[j][2 * r + 1]);
#endif
          }
        }
    }
  }
  // ---- epilogue: dK * scale, dV -> T through smem (K/V tiles are no longer needed)
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int j = 0; j < DW / 8; j++)
#pragma unroll
    for (int r = 0; r < 2; r++) {
      const int row = ks * 16 + g + 8 * r, col = dbase + j * 8 + 2 * t;
      *reinterpret_cast<uint32_t *>(sK + sw<HD>(row, col)) = Op::pack(acc_dk[j][2 * r] * f.scale, acc_dk[j][2 * r + 1] * f.scale);
      *reinterpret_cast<uint32_t *>(sV + sw<HD>(row, col)) = Op::pack(acc_dv[j][2 * r], acc_dv[j][2 * r + 1]);
    }
  __syncthreads();
  T *dkg = static_cast<T *>(a.dk) + b * a.dk_stride[0] + hk * a.dk_stride[1] + n0 * a.dk_stride[2];
  T *dvg = static_cast<T *>(a.dv) + b * a.dv_stride[0] + hk * a.dv_stride[1] + n0 * a.dv_stride[2];
  store_tile<BN, HD, NT>(dkg, a.dk_stride[2], sK, Sk - n0, hd, tid);
  store_tile<BN, HD, NT>(dvg, a.dv_stride[2], sV, Sk - n0, hd, tid);
}

// ================================================================== backward: deterministic dQ
// CTA = (BM query rows, b, h), warps own 16 rows; loop over KV blocks recomputing P and dS.
template <typename T, int HD, int BM, int BN, int NW>
__global__ void __launch_bounds__(NW * 32, 1) fa_bwd_dq_kernel(const l3k_attn_bwd_args a, const float *dsum) {
  static_assert(BM == NW * 16, "BM");
  constexpr int NT = NW * 32;
  constexpr int NTS = BN / 8, NTO = HD / 8;
  using Op = MmaOp<T>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T *sQ = reinterpret_cast<T *>(smem_raw);  // [BM][HD]
  T *sdO = sQ + BM * HD;                    // [BM][HD]
  T *sK = sdO + BM * HD;                    // [2][BN][HD]
  T *sV = sK + 2 * BN * HD;                 // [2][BN][HD]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const l3k_attn_fwd_args &f = a.f;
  const int64_t H = f.n_heads, Sq = f.seq_q, Sk = f.seq_k;
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, hk = h / (H / f.n_kv_heads);
  const int64_t m0 = ((int64_t)gridDim.y - 1 - blockIdx.y) * BM;
  const int hd = (int)f.head_dim;
  const float sl2 = f.scale * kLog2e;

  const T *qg = static_cast<const T *>(f.q) + b * f.q_stride[0] + h * f.q_stride[1] + m0 * f.q_stride[2];
  const T *dog = static_cast<const T *>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1] + m0 * a.do_stride[2];
  const T *kg = static_cast<const T *>(f.k) + b * f.k_stride[0] + hk * f.k_stride[1];
  const T *vg = static_cast<const T *>(f.v) + b * f.v_stride[0] + hk * f.v_stride[1];
  T *dqg = static_cast<T *>(a.dq) + b * a.dq_stride[0] + h * a.dq_stride[1] + m0 * a.dq_stride[2];

  int64_t n_max = ceil_div_pos(Sk, BN);
  if (f.causal) {
    const int64_t lim = ceil_div_pos(m0 + BM + Sk - Sq, BN);
    n_max = lim < n_max ? lim : n_max;
  }
  const int wrow = warp * 16;
  float lse2[2], drow[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int64_t row = m0 + wrow + g + 8 * r;
    lse2[r] = row < Sq ? f.lse[bh * Sq + row] * kLog2e : INFINITY;
    drow[r] = row < Sq ? dsum[bh * Sq + row] : 0.f;
  }
  float acc[NTO][4];
#pragma unroll
  for (int j = 0; j < NTO; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) acc[j][e] = 0.f;

  if (n_max > 0) {
    load_tile<BM, HD, NT>(sQ, qg, f.q_stride[2], Sq - m0, hd, tid);
    load_tile<BM, HD, NT>(sdO, dog, a.do_stride[2], Sq - m0, hd, tid);
    const int64_t nb = (n_max - 1) * BN;
    load_tile<BN, HD, NT>(sK, kg + nb * f.k_stride[2], f.k_stride[2], Sk - nb, hd, tid);
    load_tile<BN, HD, NT>(sV, vg + nb * f.v_stride[2], f.v_stride[2], Sk - nb, hd, tid);
    cp_async_commit();
  }
  const uint32_t sKa = smem_u32(sK), sVa = smem_u32(sV);
  const uint32_t sQw = smem_u32(sQ) + 2u * (uint32_t)(wrow * HD), sdOw = smem_u32(sdO) + 2u * (uint32_t)(wrow * HD);
  const uint32_t oA = off_a<HD>(lane), oB = off_b<HD>(lane), oT = off_t<HD>(lane);
  for (int64_t n = n_max - 1, it = 0; n >= 0; --n, ++it) {
    const int st = (int)(it & 1);
    const int64_t n0 = n * BN;
    cp_async_wait<0>();
    __syncthreads();
    if (n > 0) {
      const int64_t n1 = n0 - BN;
      load_tile<BN, HD, NT>(sK + (st ^ 1) * BN * HD, kg + n1 * f.k_stride[2], f.k_stride[2], Sk - n1, hd, tid);
      load_tile<BN, HD, NT>(sV + (st ^ 1) * BN * HD, vg + n1 * f.v_stride[2], f.v_stride[2], Sk - n1, hd, tid);
    }
    cp_async_commit();
    const uint32_t sKs = sKa + 2u * (uint32_t)(st * BN * HD), sVs = sVa + 2u * (uint32_t)(st * BN * HD);
    float s[NTS][4], dp[NTS][4];
#pragma unroll
    for (int j = 0; j < NTS; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
      uint32_t qa[4], da[4];
      ldsm_x4(qa[0], qa[1], qa[2], qa[3], sQw + xo(oA, kk * 2));
      ldsm_x4(da[0], da[1], da[2], da[3], sdOw + xo(oA, kk * 2));
#pragma unroll
      for (int nj = 0; nj < BN / 16; nj++) {
        uint32_t b0, b1, b2, b3;
        const uint32_t ob = xo(oB, kk * 2) + nj * 16 * HD * 2;
        ldsm_x4(b0, b1, b2, b3, sKs + ob);
        Op::run(s[2 * nj], qa, b0, b1);
        Op::run(s[2 * nj + 1], qa, b2, b3);
        ldsm_x4(b0, b1, b2, b3, sVs + ob);
        Op::run(dp[2 * nj], da, b0, b1);
        Op::run(dp[2 * nj + 1], da, b2, b3);
      }
    }
    const bool need_mask = (n0 + BN > Sk) || (f.causal && n0 + BN - 1 > m0 + Sk - Sq);
#pragma unroll
    for (int j = 0; j < NTS; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int r = e >> 1;
        float pv = ex2(fmaf(s[j][e], sl2, -lse2[r]));
        if (need_mask) {
          const int64_t row = m0 + wrow + g + 8 * r, key = n0 + j * 8 + 2 * t + (e & 1);
          if (key >= Sk || (f.causal && key > row + Sk - Sq)) pv = 0.f;
        }
        s[j][e] = pv * (dp[j][e] - drow[r]);  // dS
      }
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
      uint32_t pa[4];
      acc_to_a<T>(pa, s[2 * kk], s[2 * kk + 1]);
      a_times_slab_t<T, HD, HD>(acc, pa, sKs, oT, 0, kk * 16 * HD * 2);
    }
  }
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int j = 0; j < NTO; j++)
#pragma unroll
    for (int r = 0; r < 2; r++)
      *reinterpret_cast<uint32_t *>(sQ + sw<HD>(wrow + g + 8 * r, j * 8 + 2 * t)) =
          Op::pack(acc[j][2 * r] * f.scale, acc[j][2 * r + 1] * f.scale);
  __syncwarp();
  store_tile<16, HD, 32>(dqg + (int64_t)wrow * a.dq_stride[2], a.dq_stride[2], sQ + wrow * HD, Sq - m0 - wrow, hd, lane);
}

// ================================================================== host side
inline size_t round256(size_t x) { return (x + 255u) & ~(size_t)255u; }

// Raise the dynamic smem limit once per (kernel, device); not a stream operation, so it is also
// legal while a stream is being captured.
template <typename K>
cudaError_t prepare(K kernel, size_t smem, bool *done) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= 64) dev = 63;
  if (smem > 48 * 1024 && !done[dev]) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    done[dev] = true;
  }
  return cudaSuccess;
}

template <typename T, int HD, int BM, int BN, int NW, int MW>
cudaError_t launch_fwd(const l3k_attn_fwd_args &a, cudaStream_t s) {
  auto kern = fa_fwd_kernel<T, HD, BM, BN, NW, MW>;
  const size_t smem = sizeof(T) * (size_t)(BM * HD + 4 * BN * HD);
  static bool done[64] = {false};
  cudaError_t e = prepare(kern, smem, done);
  if (e != cudaSuccess) return e;
  dim3 grid((unsigned)(a.batch * a.n_heads), (unsigned)((a.seq_q + BM - 1) / BM));
  kern<<<grid, NW * 32, smem, s>>>(a);
  return cudaGetLastError();
}

template <typename T, int HD, int BM, int BN, int NW, int DSPLIT, bool DQ>
cudaError_t launch_bwd_main(const l3k_attn_bwd_args &a, const float *dsum, float *dqacc, cudaStream_t s) {
  auto kern = fa_bwd_kernel<T, HD, BM, BN, NW, DSPLIT, DQ>;
  const size_t smem = sizeof(T) * (size_t)(2 * BN * HD + 4 * BM * HD + BN * BM) + sizeof(float) * 4 * BM;
  static bool done[64] = {false};
  cudaError_t e = prepare(kern, smem, done);
  if (e != cudaSuccess) return e;
  dim3 grid((unsigned)(a.f.batch * a.f.n_kv_heads), (unsigned)((a.f.seq_k + BN - 1) / BN));
  kern<<<grid, NW * 32, smem, s>>>(a, dsum, dqacc);
  return cudaGetLastError();
}

template <typename T, int HD, int BM, int BN, int NW>
cudaError_t launch_bwd_dq(const l3k_attn_bwd_args &a, const float *dsum, cudaStream_t s) {
  auto kern = fa_bwd_dq_kernel<T, HD, BM, BN, NW>;
  const size_t smem = sizeof(T) * (size_t)(2 * BM * HD + 4 * BN * HD);
  static bool done[64] = {false};
  cudaError_t e = prepare(kern, smem, done);
  if (e != cudaSuccess) return e;
  dim3 grid((unsigned)(a.f.batch * a.f.n_heads), (unsigned)((a.f.seq_q + BM - 1) / BM));
  kern<<<grid, NW * 32, smem, s>>>(a, dsum);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_dispatch(const l3k_attn_fwd_args &a, cudaStream_t s, int variant) {
  const int64_t d = a.head_dim;
  if (d <= 64) {
    if (variant == 1) return launch_fwd<T, 64, 128, 128, 8, 1>(a, s);
    return launch_fwd<T, 64, 128, 64, 4, 2>(a, s);
  }
  if (d <= 128) {
    if (variant == 1) return launch_fwd<T, 128, 128, 64, 8, 1>(a, s);
    return launch_fwd<T, 128, 128, 64, 4, 2>(a, s);
  }
  return launch_fwd<T, 256, 64, 64, 4, 1>(a, s);
}

// variant 0: default (the wgmma main kernel of flash_attn_bwd_sm90.cu where this GPU and build
// have it, non-deterministic mode, head_dim <= 128); 1: always the mma.sync main kernel.
template <typename T>
cudaError_t bwd_dispatch(const l3k_attn_bwd_args &a, cudaStream_t s, int variant) {
  const int64_t d = a.f.head_dim;
  const size_t rows = (size_t)(a.f.batch * a.f.n_heads * a.f.seq_q);
  float *dsum = static_cast<float *>(a.workspace);
  float *dqacc = a.deterministic ? nullptr : reinterpret_cast<float *>(static_cast<char *>(a.workspace) + round256(rows * 4));
  cudaError_t e;
  int dq_tiled = 0;  // dqacc layout left by the main kernel (attention.h, l3k_cuda_attn_bwd_main_sm90)
  if (rows > 0) {
    const unsigned blocks = (unsigned)((rows + 7) / 8);
    fa_bwd_pre_kernel<T><<<blocks, 256, 0, s>>>(a, dsum, dqacc);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  if (a.f.seq_k > 0) {
    if (a.deterministic) {
      if (d <= 64) e = launch_bwd_main<T, 64, 64, 128, 8, 1, false>(a, dsum, dqacc, s);
      else if (d <= 128) e = launch_bwd_main<T, 128, 64, 128, 8, 1, false>(a, dsum, dqacc, s);
      else e = launch_bwd_main<T, 256, 32, 64, 8, 2, false>(a, dsum, dqacc, s);
    } else {
      e = variant == 1 ? cudaErrorNotSupported : (cudaError_t)l3k_cuda_attn_bwd_main_sm90(&a, dsum, dqacc, s);
      if (e == cudaSuccess) dq_tiled = 1;
      if (e == cudaErrorNotSupported) {  // not an sm_90a build on H100, or head_dim > 128
        if (d <= 64) e = launch_bwd_main<T, 64, 64, 128, 8, 1, true>(a, dsum, dqacc, s);
        else if (d <= 128) e = launch_bwd_main<T, 128, 64, 128, 8, 1, true>(a, dsum, dqacc, s);
        else e = launch_bwd_main<T, 256, 32, 64, 8, 2, true>(a, dsum, dqacc, s);
      }
    }
    if (e != cudaSuccess) return e;
  }
  if (rows == 0) return cudaSuccess;
  if (a.deterministic) {
    if (d <= 64) return launch_bwd_dq<T, 64, 64, 64, 4>(a, dsum, s);
    if (d <= 128) return launch_bwd_dq<T, 128, 64, 64, 4>(a, dsum, s);
    return launch_bwd_dq<T, 256, 64, 32, 4>(a, dsum, s);
  }
  fa_bwd_dq_convert_kernel<T><<<(unsigned)((rows + 7) / 8), 256, 0, s>>>(a, dqacc, dq_tiled);
  return cudaGetLastError();
}

bool shape_ok(const l3k_attn_fwd_args &a) {
  return a.head_dim > 0 && a.head_dim <= 256 && a.head_dim % 8 == 0 && a.n_kv_heads > 0 &&
         a.n_heads % a.n_kv_heads == 0 && (a.dtype == L3K_DT_F16 || a.dtype == L3K_DT_BF16);
}

}  // namespace

// Tuning/testing hook (tests/gpu/attn_harness.py): 0 default (wgmma where available), 1 mma.sync
// 8 warps, 2 mma.sync 4 warps.
extern "C" int l3k_cuda_attn_fwd_variant(const l3k_attn_fwd_args *a, void *stream, int variant) {
  if (!a || !shape_ok(*a)) return (int)cudaErrorInvalidValue;
  if (a->batch <= 0 || a->n_heads <= 0 || a->seq_q <= 0) return (int)cudaSuccess;
  // The wgmma kernel (flash_attn_sm90.cu) where this GPU and build have it, else mma.sync.
  if (variant == 0) {
    const int rc = l3k_cuda_attn_fwd_sm90(a, stream);
    if (rc != (int)cudaErrorNotSupported) return rc;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a->dtype == L3K_DT_BF16) return (int)fwd_dispatch<__nv_bfloat16>(*a, s, variant);
  return (int)fwd_dispatch<__half>(*a, s, variant);
}

extern "C" int l3k_cuda_attn_fwd(const l3k_attn_fwd_args *a, void *stream) {
  return l3k_cuda_attn_fwd_variant(a, stream, 0);
}

// Tuning/testing hook (tests/gpu/attn_harness.py): 0 default, 1 the mma.sync main kernel even on H100.
extern "C" int l3k_cuda_attn_bwd_variant(const l3k_attn_bwd_args *a, void *stream, int variant) {
  if (!a || !shape_ok(a->f)) return (int)cudaErrorInvalidValue;
  const l3k_attn_fwd_args &f = a->f;
  if (f.batch <= 0 || f.n_heads <= 0) return (int)cudaSuccess;
  if (f.seq_q <= 0 && f.seq_k <= 0) return (int)cudaSuccess;
  const size_t need = l3k_attn_bwd_workspace_bytes(f.batch, f.n_heads, f.n_kv_heads, f.seq_q, f.seq_k,
                                                   f.head_dim, a->deterministic, 1);
  if (need > 0 && (a->workspace == nullptr || a->workspace_bytes < need)) return (int)cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (f.dtype == L3K_DT_BF16) return (int)bwd_dispatch<__nv_bfloat16>(*a, s, variant);
  return (int)bwd_dispatch<__half>(*a, s, variant);
}

extern "C" int l3k_cuda_attn_bwd(const l3k_attn_bwd_args *a, void *stream) {
  return l3k_cuda_attn_bwd_variant(a, stream, 0);
}
