/* FlashAttention-2-class backward (mma.sync m16n8k16).
 *
 * Contract: kernels/attention.h. Valid for sm_80 and sm_90a (no Hopper-only instructions).
 * The pieces flash_attn.cu runs in order: preprocess (D = rowsum(dO*O), zero the fp32 dq
 * accumulator), main kernel with CTA = (BN keys, b, kv head): K,V resident, loop over the GQA
 * group's query heads and Q blocks, S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T,
 * dK += dS^T Q all in registers; dQ via dS staged in smem and fp32 atomics (default), then a
 * convert kernel. Deterministic mode: the main kernel skips dQ, a query-major kernel recomputes
 * P, dS and accumulates dQ in registers. On H100 the wgmma main kernel (flash_bwd_sm90.cu)
 * replaces this one in the default mode. */
#include <math.h>

#include "attention.h"
#include "mma.cuh"

namespace {

/* The row kernels (preprocess, dq convert) give one warp a row of the B*H*Sq rows (row_blocks):
 * this warp's row, bh = b * H + h and its query i; false past the last row. */
__device__ __forceinline__ bool warp_row(const l3k_attn_fwd_args &f, int64_t &row, int64_t &bh, int64_t &b,
                                         int64_t &h, int64_t &i) {
    const int64_t H = f.n_heads, Sq = f.seq_q;
    row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= f.batch * H * Sq) return false;
    bh = row / Sq;
    i = row % Sq;
    b = bh / H;
    h = bh % H;
    return true;
}

/* ---- backward: preprocess ---------------------------------------------------
 * D[row] = sum_d dO*O (fp32); zero the dq accumulator row. One warp per row. */
template <typename T>
__global__ void fa_bwd_pre_kernel(const l3k_attn_bwd_args a, float *dsum, float *dqacc) {
    const int hd = (int)a.f.head_dim;
    const int lane = threadIdx.x & 31;
    int64_t row, bh, b, h, i;
    if (!warp_row(a.f, row, bh, b, h, i)) return;
    const T *dog = static_cast<const T *>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1] +
                   i * a.do_stride[2];
    const T *og = static_cast<const T *>(a.f.o) + b * a.f.o_stride[0] + h * a.f.o_stride[1] +
                  i * a.f.o_stride[2];
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
        for (int c = lane * 4; c < hd; c += 128)
            *reinterpret_cast<float4 *>(q + c) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

/* dq = dqacc * scale -> T. One warp per row. tiled: full 64-row blocks of a head_dim 64/128
 * problem are in the wgmma accumulator order of flash_bwd_sm90.cu (DQ_TILE_BYTES): element
 * (row 16wi + g + 8r, column 64w + 8j + 2t + e) of the block at 4096w + 4(128j + 32wi + 4g + t) + 2r + e. */
template <typename T>
__global__ void fa_bwd_dq_convert_kernel(const l3k_attn_bwd_args a, const float *dqacc, int tiled) {
    const int64_t Sq = a.f.seq_q;
    const int hd = (int)a.f.head_dim;
    const int lane = threadIdx.x & 31;
    int64_t row, bh, b, h, i;
    if (!warp_row(a.f, row, bh, b, h, i)) return;
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
            for (int u = 0; u < 4; u++) { /* columns c + 2u, c + 2u + 1: t = u (c is a multiple of 8) */
                const int cc = c + 2 * u;
                const float2 v = *reinterpret_cast<const float2 *>(
                    blk + 4096 * (cc >> 6) + 4 * (128 * ((cc & 63) >> 3) + rbase + u) + roff);
                x[2 * u] = v.x;
                x[2 * u + 1] = v.y;
            }
            uint4 out;
            out.x = l3k_mma<T>::pack(x[0] * sc, x[1] * sc);
            out.y = l3k_mma<T>::pack(x[2] * sc, x[3] * sc);
            out.z = l3k_mma<T>::pack(x[4] * sc, x[5] * sc);
            out.w = l3k_mma<T>::pack(x[6] * sc, x[7] * sc);
            *reinterpret_cast<uint4 *>(dqg + c) = out;
        }
        return;
    }
    for (int c = lane * 8; c < hd; c += 256) {
        const float4 x0 = *reinterpret_cast<const float4 *>(src + c);
        const float4 x1 = *reinterpret_cast<const float4 *>(src + c + 4);
        uint4 out;
        out.x = l3k_mma<T>::pack(x0.x * sc, x0.y * sc);
        out.y = l3k_mma<T>::pack(x0.z * sc, x0.w * sc);
        out.z = l3k_mma<T>::pack(x1.x * sc, x1.y * sc);
        out.w = l3k_mma<T>::pack(x1.z * sc, x1.w * sc);
        *reinterpret_cast<uint4 *>(dqg + c) = out;
    }
}

/* ---- backward: main (KV-outer) ----------------------------------------------
 * CTA = (BN keys, b, kv head). Warp w owns key strip (w % (BN/16)) and, for dK/dV, the column
 * range [(w / (BN/16)) * HD/DSPLIT, +HD/DSPLIT). Loops over (query head of the group, Q block).
 * c = A B^T for the backward's 16-row strips: A is this warp's 16 x HD strip at byte address sA
 * (ldmatrix offsets oA), B the BM x HD tile at sB (offsets oB), both swizzled with row width HD;
 * c holds BM/8 m16n8 accumulator tiles. (S^T = K Q^T and dP^T = V dO^T.) */
template <typename T, int HD, int BM>
__device__ __forceinline__ void strip_times_rows_t(float (&c)[BM / 8][4], uint32_t sA, uint32_t sB,
                                                   uint32_t oA, uint32_t oB) {
    l3k_zero_acc(c);
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        uint32_t a[4];
        l3k_ldsm_x4(a[0], a[1], a[2], a[3], sA + l3k_xo(oA, kk * 2));
#pragma unroll
        for (int nj = 0; nj < BM / 16; nj++) {
            uint32_t b0, b1, b2, b3;
            l3k_ldsm_x4(b0, b1, b2, b3, sB + (l3k_xo(oB, kk * 2) + nj * 16 * HD * 2));
            l3k_mma<T>::run(c[2 * nj], a, b0, b1);
            l3k_mma<T>::run(c[2 * nj + 1], a, b2, b3);
        }
    }
}

template <typename T, int HD, int BM, int BN, int NW, int DSPLIT, bool DQ>
__global__ void __launch_bounds__(NW * 32, 1)
    fa_bwd_kernel(const l3k_attn_bwd_args a, const float *dsum, float *dqacc) {
    static_assert(NW == (BN / 16) * DSPLIT, "warps");
    static_assert(NW % (BM / 16) == 0, "dq warp split");
    constexpr int NT = NW * 32;
    constexpr int DW = HD / DSPLIT;            /* dK/dV columns per warp */
    constexpr int NQ = BM / 8;                 /* n-tiles of S^T (query columns) */
    constexpr int DQW = HD / (NW / (BM / 16)); /* dQ columns per warp */
    using Op = l3k_mma<T>;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sK = reinterpret_cast<T *>(smem_raw);              /* [BN][HD] */
    T *sV = sK + BN * HD;                                 /* [BN][HD] */
    T *sQ = sV + BN * HD;                                 /* [2][BM][HD] */
    T *sdO = sQ + 2 * BM * HD;                            /* [2][BM][HD] */
    T *sdS = sdO + 2 * BM * HD;                           /* [BN][BM]  (dS^T) */
    float *sL = reinterpret_cast<float *>(sdS + BN * BM); /* [2][BM] lse*log2e */
    float *sD = sL + 2 * BM;                              /* [2][BM] */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const l3k_attn_fwd_args &f = a.f;
    const int64_t H = f.n_heads, HKV = f.n_kv_heads, Sq = f.seq_q, Sk = f.seq_k;
    int64_t G, b, hk, n0; /* query heads per kv head; this CTA's sequence, kv head, first key */
    l3k_attn_kv_cta(H, HKV, BN, G, b, hk, n0);
    const int hd = (int)f.head_dim;
    const float sl2 = f.scale * L3K_LOG2E;

    const T *kg = static_cast<const T *>(f.k) + b * f.k_stride[0] + hk * f.k_stride[1] + n0 * f.k_stride[2];
    const T *vg = static_cast<const T *>(f.v) + b * f.v_stride[0] + hk * f.v_stride[1] + n0 * f.v_stride[2];

    /* Q blocks that see at least one key of this block (none: dk = dv = 0 are still written) */
    int64_t kb, ke; /* this sequence's keys */
    l3k_attn_keys(f.key_range, b, Sk, kb, ke);
    int64_t m_blocks, m_min;
    const int64_t per_head = l3k_attn_kv_q_blocks(n0, BN, BM, Sq, Sk, f.causal, kb, ke, m_blocks, m_min);
    const int64_t total = G * per_head;
    /* The key range waits in shared memory, read once per Q block: kept in registers across the
     * loop, it made these kernels spill more. */
    __shared__ int64_t s_keys[2];
    if (tid == 0) {
        s_keys[0] = kb;
        s_keys[1] = ke;
    }

    auto issue = [&](int64_t p, int stg) {
        const int64_t h = hk * G + p / per_head, mb = m_min + p % per_head, m0 = mb * BM;
        const T *qg = static_cast<const T *>(f.q) + b * f.q_stride[0] + h * f.q_stride[1] +
                      m0 * f.q_stride[2];
        const T *dog = static_cast<const T *>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1] +
                       m0 * a.do_stride[2];
        l3k_load_tile<BM, HD, NT>(sQ + stg * BM * HD, qg, f.q_stride[2], Sq - m0, hd, tid);
        l3k_load_tile<BM, HD, NT>(sdO + stg * BM * HD, dog, a.do_stride[2], Sq - m0, hd, tid);
        const int64_t rb = (b * H + h) * Sq + m0;
        for (int r = tid; r < BM; r += NT) {
            const bool ok = m0 + r < Sq;
            sL[stg * BM + r] = ok ? f.lse[rb + r] * L3K_LOG2E : INFINITY; /* +inf rows give P = 0 */
            sD[stg * BM + r] = ok ? dsum[rb + r] : 0.f;
        }
    };

    l3k_load_tile<BN, HD, NT>(sK, kg, f.k_stride[2], Sk - n0, hd, tid);
    l3k_load_tile<BN, HD, NT>(sV, vg, f.v_stride[2], Sk - n0, hd, tid);
    if (total > 0) issue(0, 0);
    l3k_cp_async_commit();

    const int ks = warp % (BN / 16); /* key strip */
    const int dbase = (warp / (BN / 16)) * DW;
    float acc_dk[DW / 8][4], acc_dv[DW / 8][4];
    l3k_zero_acc(acc_dk);
    l3k_zero_acc(acc_dv);

    const uint32_t sKa = l3k_smem_u32(sK), sQa = l3k_smem_u32(sQ), sdOa = l3k_smem_u32(sdO);
    const uint32_t sKw = sKa + 2u * (uint32_t)(ks * 16 * HD),
                   sVw = l3k_smem_u32(sV) + 2u * (uint32_t)(ks * 16 * HD);
    const uint32_t oA = l3k_off_a<HD>(lane), oB = l3k_off_b<HD>(lane), oT = l3k_off_t<HD>(lane);
    /* dS^T as the A operand of dS K: rows = keys (k), columns = this warp's query strip (m) */
    const uint32_t sdSw = l3k_smem_u32(sdS) + l3k_lane_off<BM>((lane & 7) + ((lane >> 4) << 3),
                                                               (warp % (BM / 16)) * 2 + ((lane >> 3) & 1));

    for (int64_t p = 0; p < total; p++) {
        const int st = (int)(p & 1);
        const int64_t h = hk * G + p / per_head, mb = m_min + p % per_head, m0 = mb * BM;
        l3k_cp_async_wait<0>();
        __syncthreads();
        if (p + 1 < total) issue(p + 1, st ^ 1);
        l3k_cp_async_commit();

        const uint32_t sQs = sQa + 2u * (uint32_t)(st * BM * HD), sdOs = sdOa + 2u * (uint32_t)(st * BM * HD);
        const float *sLs = sL + st * BM, *sDs = sD + st * BM;

        /* ---- S^T = K_strip Q^T  (16 keys x BM queries) */
        float sT[NQ][4];
        strip_times_rows_t<T, HD, BM>(sT, sKw, sQs, oA, oB);
        /* ---- P^T = exp2(S^T * scale*log2e - lse*log2e), masked to 0: tile rows (queries) before
         * first[r] do not see this thread's key r (0 in a tile with no masked pair).  Computed
         * for every tile, no tile test: a few integer operations, and one register fewer to hold. */
        int first[2];
#pragma unroll
        for (int r = 0; r < 2; r++)
            first[r] = l3k_attn_tile_first_row(n0 + ks * 16 + g + 8 * r, m0, BM, Sq, Sk, f.causal, s_keys[0],
                                               s_keys[1]);
#pragma unroll
        for (int j = 0; j < NQ; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qc = j * 8 + 2 * t + (e & 1);
                float pv = l3k_ex2(fmaf(sT[j][e], sl2, -sLs[qc]));
                if (qc < first[e >> 1]) pv = 0.f;
                sT[j][e] = pv;
            }
            /* ---- dV += P^T dO   (A = P^T from registers, B = dO [query][d] via ldmatrix.trans) */
#pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            uint32_t pa[4];
            l3k_acc_to_a<T>(pa, sT[2 * kk], sT[2 * kk + 1]);
            l3k_a_times_slab_t<T, HD, DW>(acc_dv, pa, sdOs, oT, dbase / 8, kk * 16 * HD * 2);
        }
        /* ---- dP^T = V_strip dO^T */
        float dpT[NQ][4];
        strip_times_rows_t<T, HD, BM>(dpT, sVw, sdOs, oA, oB);
        /* ---- dS^T = P^T * (dP^T - D) */
#pragma unroll
        for (int j = 0; j < NQ; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) dpT[j][e] = sT[j][e] * (dpT[j][e] - sDs[j * 8 + 2 * t + (e & 1)]);
                /* ---- dK += dS^T Q */
#pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            uint32_t da[4];
            l3k_acc_to_a<T>(da, dpT[2 * kk], dpT[2 * kk + 1]);
            if (DQ && dbase == 0) { /* stage dS^T (bf16/fp16) for the dQ product */
                *reinterpret_cast<uint32_t *>(sdS + l3k_sw<BM>(ks * 16 + g, kk * 16 + 2 * t)) = da[0];
                *reinterpret_cast<uint32_t *>(sdS + l3k_sw<BM>(ks * 16 + g + 8, kk * 16 + 2 * t)) = da[1];
                *reinterpret_cast<uint32_t *>(sdS + l3k_sw<BM>(ks * 16 + g, kk * 16 + 8 + 2 * t)) = da[2];
                *reinterpret_cast<uint32_t *>(sdS + l3k_sw<BM>(ks * 16 + g + 8, kk * 16 + 8 + 2 * t)) = da[3];
            }
            l3k_a_times_slab_t<T, HD, DW>(acc_dk, da, sQs, oT, dbase / 8, kk * 16 * HD * 2);
        }
        if constexpr (DQ) {
            __syncthreads(); /* dS^T complete */
            /* dQ_i (BM x HD) += dS (BM x BN) K (BN x HD); warp: query strip qs, columns [qd, qd+DQW) */
            const int qs = warp % (BM / 16);
            const int qd = (warp / (BM / 16)) * DQW;
            float acc_q[DQW / 8][4];
            l3k_zero_acc(acc_q);
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                uint32_t dsa[4]; /* A = dS rows qs*16.., keys kk*16..; stored transposed -> ldmatrix.trans */
                l3k_ldsm_x4_t(dsa[0], dsa[1], dsa[2], dsa[3], sdSw + kk * 16 * BM * 2);
                l3k_a_times_slab_t<T, HD, DQW>(acc_q, dsa, sKa, oT, qd / 8, kk * 16 * HD * 2);
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
                        atomicAdd(reinterpret_cast<float2 *>(dst),
                                  make_float2(acc_q[j][2 * r], acc_q[j][2 * r + 1]));
#else
                        atomicAdd(dst, acc_q[j][2 * r]);
                        atomicAdd(dst + 1, acc_q[j][2 * r + 1]);
#endif
                    }
                }
        }
    }
    /* ---- epilogue: dK * scale, dV -> T through smem (K/V tiles are no longer needed) */
    l3k_cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int j = 0; j < DW / 8; j++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int row = ks * 16 + g + 8 * r, col = dbase + j * 8 + 2 * t;
            *reinterpret_cast<uint32_t *>(sK + l3k_sw<HD>(row, col)) =
                Op::pack(acc_dk[j][2 * r] * f.scale, acc_dk[j][2 * r + 1] * f.scale);
            *reinterpret_cast<uint32_t *>(sV + l3k_sw<HD>(row, col)) =
                Op::pack(acc_dv[j][2 * r], acc_dv[j][2 * r + 1]);
        }
    __syncthreads();
    T *dkg = static_cast<T *>(a.dk) + b * a.dk_stride[0] + hk * a.dk_stride[1] + n0 * a.dk_stride[2];
    T *dvg = static_cast<T *>(a.dv) + b * a.dv_stride[0] + hk * a.dv_stride[1] + n0 * a.dv_stride[2];
    l3k_store_tile<BN, HD, NT>(dkg, a.dk_stride[2], sK, Sk - n0, hd, tid);
    l3k_store_tile<BN, HD, NT>(dvg, a.dv_stride[2], sV, Sk - n0, hd, tid);
}

/* ---- backward: deterministic dQ ---------------------------------------------
 * CTA = (BM query rows, b, h), warps own 16 rows; loop over KV blocks recomputing P and dS. */
template <typename T, int HD, int BM, int BN, int NW>
__global__ void __launch_bounds__(NW * 32, 1) fa_bwd_dq_kernel(const l3k_attn_bwd_args a, const float *dsum) {
    static_assert(BM == NW * 16, "BM");
    constexpr int NT = NW * 32;
    constexpr int NTS = BN / 8, NTO = HD / 8;
    using Op = l3k_mma<T>;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw); /* [BM][HD] */
    T *sdO = sQ + BM * HD;                   /* [BM][HD] */
    T *sK = sdO + BM * HD;                   /* [2][BN][HD] */
    T *sV = sK + 2 * BN * HD;                /* [2][BN][HD] */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const l3k_attn_fwd_args &f = a.f;
    const int64_t H = f.n_heads, Sq = f.seq_q, Sk = f.seq_k;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, hk = h / (H / f.n_kv_heads);
    const int64_t m0 = ((int64_t)gridDim.y - 1 - blockIdx.y) * BM;
    const int hd = (int)f.head_dim;
    const float sl2 = f.scale * L3K_LOG2E;

    const T *qg = static_cast<const T *>(f.q) + b * f.q_stride[0] + h * f.q_stride[1] + m0 * f.q_stride[2];
    const T *dog = static_cast<const T *>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1] +
                   m0 * a.do_stride[2];
    const T *kg = static_cast<const T *>(f.k) + b * f.k_stride[0] + hk * f.k_stride[1];
    const T *vg = static_cast<const T *>(f.v) + b * f.v_stride[0] + hk * f.v_stride[1];
    T *dqg = static_cast<T *>(a.dq) + b * a.dq_stride[0] + h * a.dq_stride[1] + m0 * a.dq_stride[2];

    int64_t kb, ke; /* this sequence's keys */
    l3k_attn_keys(f.key_range, b, Sk, kb, ke);
    const int64_t n_min = l3k_attn_kv_block_begin(kb, BN);
    const int64_t n_max = l3k_attn_kv_block_end(m0, BM, BN, Sq, Sk, f.causal, kb, ke);
    /* As in the forward: the key range and the blocks that need no mask wait in shared memory. */
    __shared__ int64_t s_keys[2];
    __shared__ int s_plain[2];
    l3k_attn_share_keys(tid, m0, BN, Sq, Sk, f.causal, kb, ke, s_keys, s_plain);
    const int wrow = warp * 16;
    float lse2[2], drow[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int64_t row = m0 + wrow + g + 8 * r;
        lse2[r] = row < Sq ? f.lse[bh * Sq + row] * L3K_LOG2E : INFINITY;
        drow[r] = row < Sq ? dsum[bh * Sq + row] : 0.f;
    }
    float acc[NTO][4];
    l3k_zero_acc(acc);

    if (n_max > n_min) {
        l3k_load_tile<BM, HD, NT>(sQ, qg, f.q_stride[2], Sq - m0, hd, tid);
        l3k_load_tile<BM, HD, NT>(sdO, dog, a.do_stride[2], Sq - m0, hd, tid);
        const int64_t nb = (n_max - 1) * BN;
        l3k_load_tile<BN, HD, NT>(sK, kg + nb * f.k_stride[2], f.k_stride[2], Sk - nb, hd, tid);
        l3k_load_tile<BN, HD, NT>(sV, vg + nb * f.v_stride[2], f.v_stride[2], Sk - nb, hd, tid);
        l3k_cp_async_commit();
    }
    const uint32_t sKa = l3k_smem_u32(sK), sVa = l3k_smem_u32(sV);
    const uint32_t sQw = l3k_smem_u32(sQ) + 2u * (uint32_t)(wrow * HD),
                   sdOw = l3k_smem_u32(sdO) + 2u * (uint32_t)(wrow * HD);
    const uint32_t oA = l3k_off_a<HD>(lane), oB = l3k_off_b<HD>(lane), oT = l3k_off_t<HD>(lane);
    const int n_lo = (int)n_min; /* block indices fit 32 bits: Sk / BN */
    for (int n = (int)n_max - 1, it = 0; n >= n_lo; --n, ++it) {
        const int st = it & 1;
        const int64_t n0 = (int64_t)n * BN;
        l3k_cp_async_wait<0>();
        __syncthreads();
        if (n > n_lo) {
            const int64_t n1 = n0 - BN;
            l3k_load_tile<BN, HD, NT>(sK + (st ^ 1) * BN * HD, kg + n1 * f.k_stride[2], f.k_stride[2],
                                      Sk - n1, hd, tid);
            l3k_load_tile<BN, HD, NT>(sV + (st ^ 1) * BN * HD, vg + n1 * f.v_stride[2], f.v_stride[2],
                                      Sk - n1, hd, tid);
        }
        l3k_cp_async_commit();
        const uint32_t sKs = sKa + 2u * (uint32_t)(st * BN * HD), sVs = sVa + 2u * (uint32_t)(st * BN * HD);
        float s[NTS][4], dp[NTS][4];
        l3k_zero_acc(s);
        l3k_zero_acc(dp);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            uint32_t qa[4], da[4];
            l3k_ldsm_x4(qa[0], qa[1], qa[2], qa[3], sQw + l3k_xo(oA, kk * 2));
            l3k_ldsm_x4(da[0], da[1], da[2], da[3], sdOw + l3k_xo(oA, kk * 2));
#pragma unroll
            for (int nj = 0; nj < BN / 16; nj++) {
                uint32_t b0, b1, b2, b3;
                const uint32_t ob = l3k_xo(oB, kk * 2) + nj * 16 * HD * 2;
                l3k_ldsm_x4(b0, b1, b2, b3, sKs + ob);
                Op::run(s[2 * nj], qa, b0, b1);
                Op::run(s[2 * nj + 1], qa, b2, b3);
                l3k_ldsm_x4(b0, b1, b2, b3, sVs + ob);
                Op::run(dp[2 * nj], da, b0, b1);
                Op::run(dp[2 * nj + 1], da, b2, b3);
            }
        }
        const bool need_mask = n < s_plain[0] || n >= s_plain[1];
        int lo[2] = {0, 0},
            cnt[2] = {BN, BN}; /* each of this thread's rows sees tile columns [lo, lo + cnt) */
        if (need_mask) {
#pragma unroll
            for (int r = 0; r < 2; r++)
                l3k_attn_tile_cols(m0 + wrow + g + 8 * r, n0, BN, Sq, Sk, f.causal, s_keys[0], s_keys[1],
                                   lo[r], cnt[r]);
        }
#pragma unroll
        for (int j = 0; j < NTS; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = e >> 1;
                float pv = l3k_ex2(fmaf(s[j][e], sl2, -lse2[r]));
                if (L3K_ATTN_COL_OUT(j * 8 + 2 * t + (e & 1), lo[r], cnt[r])) pv = 0.f;
                s[j][e] = pv * (dp[j][e] - drow[r]); /* dS */
            }
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t pa[4];
            l3k_acc_to_a<T>(pa, s[2 * kk], s[2 * kk + 1]);
            l3k_a_times_slab_t<T, HD, HD>(acc, pa, sKs, oT, 0, kk * 16 * HD * 2);
        }
    }
    l3k_cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int j = 0; j < NTO; j++)
#pragma unroll
        for (int r = 0; r < 2; r++)
            *reinterpret_cast<uint32_t *>(sQ + l3k_sw<HD>(wrow + g + 8 * r, j * 8 + 2 * t)) =
                Op::pack(acc[j][2 * r] * f.scale, acc[j][2 * r + 1] * f.scale);
    __syncwarp();
    l3k_store_tile<16, HD, 32>(dqg + (int64_t)wrow * a.dq_stride[2], a.dq_stride[2], sQ + wrow * HD,
                               Sq - m0 - wrow, hd, lane);
}

/* ---- host side --------------------------------------------------------------- */
template <typename T, int HD, int BM, int BN, int NW, int DSPLIT, bool DQ>
cudaError_t launch_bwd_main(const l3k_attn_bwd_args &a, const float *dsum, float *dqacc, cudaStream_t s) {
    auto kern = fa_bwd_kernel<T, HD, BM, BN, NW, DSPLIT, DQ>;
    const size_t smem = sizeof(T) * (size_t)(2 * BN * HD + 4 * BM * HD + BN * BM) + sizeof(float) * 4 * BM;
    static bool done[64] = {false};
    cudaError_t e = l3k_smem_prepare(kern, smem, done);
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
    cudaError_t e = l3k_smem_prepare(kern, smem, done);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)(a.f.batch * a.f.n_heads), (unsigned)((a.f.seq_q + BM - 1) / BM));
    kern<<<grid, NW * 32, smem, s>>>(a, dsum);
    return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_main(const l3k_attn_bwd_args &a, const float *dsum, float *dqacc, cudaStream_t s) {
    const int64_t d = a.f.head_dim;
    if (a.deterministic) {
        if (d <= 64) return launch_bwd_main<T, 64, 64, 128, 8, 1, false>(a, dsum, dqacc, s);
        if (d <= 128) return launch_bwd_main<T, 128, 64, 128, 8, 1, false>(a, dsum, dqacc, s);
        return launch_bwd_main<T, 256, 32, 64, 8, 2, false>(a, dsum, dqacc, s);
    }
    if (d <= 64) return launch_bwd_main<T, 64, 64, 128, 8, 1, true>(a, dsum, dqacc, s);
    if (d <= 128) return launch_bwd_main<T, 128, 64, 128, 8, 1, true>(a, dsum, dqacc, s);
    return launch_bwd_main<T, 256, 32, 64, 8, 2, true>(a, dsum, dqacc, s);
}

template <typename T>
cudaError_t bwd_dq(const l3k_attn_bwd_args &a, const float *dsum, cudaStream_t s) {
    const int64_t d = a.f.head_dim;
    if (d <= 64) return launch_bwd_dq<T, 64, 64, 64, 4>(a, dsum, s);
    if (d <= 128) return launch_bwd_dq<T, 128, 64, 64, 4>(a, dsum, s);
    return launch_bwd_dq<T, 256, 64, 32, 4>(a, dsum, s);
}

/* A row kernel (one warp a row of B*H*Sq: blocks of 8 warps) of a's dtype, bf16 or f16 its two
 * instances. */
template <typename K, typename... A>
int launch_rows(K bf16, K f16, const l3k_attn_bwd_args *a, void *stream, A... args) {
    const unsigned blocks = (unsigned)(((size_t)(a->f.batch * a->f.n_heads * a->f.seq_q) + 7) / 8);
    const K kern = a->f.dtype == L3K_DT_BF16 ? bf16 : f16;
    kern<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(*a, args...);
    return (int)cudaGetLastError();
}

} // namespace

extern "C" int l3k_cuda_attn_bwd_pre(const l3k_attn_bwd_args *a, float *dsum, float *dqacc, void *stream) {
    return launch_rows(fa_bwd_pre_kernel<__nv_bfloat16>, fa_bwd_pre_kernel<__half>, a, stream, dsum, dqacc);
}

extern "C" int l3k_cuda_attn_bwd_main_sm80(const l3k_attn_bwd_args *a, const float *dsum, float *dqacc,
                                           void *stream) {
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (a->f.dtype == L3K_DT_BF16) return (int)bwd_main<__nv_bfloat16>(*a, dsum, dqacc, s);
    return (int)bwd_main<__half>(*a, dsum, dqacc, s);
}

extern "C" int l3k_cuda_attn_bwd_dq_sm80(const l3k_attn_bwd_args *a, const float *dsum, void *stream) {
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (a->f.dtype == L3K_DT_BF16) return (int)bwd_dq<__nv_bfloat16>(*a, dsum, s);
    return (int)bwd_dq<__half>(*a, dsum, s);
}

extern "C" int l3k_cuda_attn_bwd_dq_convert(const l3k_attn_bwd_args *a, const float *dqacc, int tiled,
                                            void *stream) {
    return launch_rows(fa_bwd_dq_convert_kernel<__nv_bfloat16>, fa_bwd_dq_convert_kernel<__half>, a, stream,
                       dqacc, tiled);
}
