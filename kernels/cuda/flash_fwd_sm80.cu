/* FlashAttention-2-class forward (mma.sync m16n8k16).
 *
 * Contract: kernels/attention.h. Valid for sm_80 and sm_90a (no Hopper-only instructions); on
 * H100 the wgmma forward (flash_fwd_sm90.cu) takes 64 < head_dim <= 128.
 *
 * CTA = (BM query rows, b, h); warps own 16*MW rows each; loop over KV blocks in
 * reverse (masked blocks first) with a 2-stage K/V cp.async ring; online softmax in exp2 with
 * scale*log2(e) folded in; O staged through shared memory for 16-byte stores. */
#include <math.h>

#include "attention.h"
#include "mma.cuh"

namespace {

template <typename T, int HD, int BM, int BN, int NW, int MW>
__global__ void __launch_bounds__(NW * 32, 1) fa_fwd_kernel(const l3k_attn_fwd_args a) {
    static_assert(BM == NW * 16 * MW, "BM");
    constexpr int NT = NW * 32;
    constexpr int NTS = BN / 8; /* score n-tiles per row strip */
    constexpr int NTO = HD / 8; /* output n-tiles */
    using Op = l3k_mma<T>;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sK = sQ + BM * HD;     /* [2][BN][HD] */
    T *sV = sK + 2 * BN * HD; /* [2][BN][HD] */

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

    int64_t kb, ke; /* this sequence's keys */
    l3k_attn_keys(a.key_range, b, Sk, kb, ke);
    const int64_t n_min = l3k_attn_kv_block_begin(kb, BN);
    const int64_t n_max = l3k_attn_kv_block_end(m0, BM, BN, Sq, Sk, a.causal, kb, ke);
    if (n_max <= n_min) { /* every row fully masked (or Sk == 0): O = 0, LSE = +inf */
        for (int c = tid; c < BM * (HD / 8); c += NT) {
            const int r = c / (HD / 8), ch = c % (HD / 8);
            if (m0 + r < Sq && ch * 8 < hd)
                *reinterpret_cast<uint4 *>(og + (int64_t)r * a.o_stride[2] + ch * 8) = make_uint4(0, 0, 0, 0);
        }
        for (int r = tid; r < BM; r += NT)
            if (m0 + r < Sq) lseg[r] = INFINITY;
        return;
    }

    const float sl2 = a.scale * L3K_LOG2E;
    l3k_load_tile<BM, HD, NT>(sQ, qg, a.q_stride[2], Sq - m0, hd, tid);
    l3k_cp_async_commit();
    {
        const int64_t n0 = (n_max - 1) * BN;
        l3k_load_tile<BN, HD, NT>(sK, kg + n0 * a.k_stride[2], a.k_stride[2], Sk - n0, hd, tid);
        l3k_cp_async_commit();
        l3k_load_tile<BN, HD, NT>(sV, vg + n0 * a.v_stride[2], a.v_stride[2], Sk - n0, hd, tid);
        l3k_cp_async_commit();
    }

    float acc_o[MW][NTO][4];
    float row_m[MW][2], row_l[MW][2];
#pragma unroll
    for (int mi = 0; mi < MW; mi++) {
        l3k_zero_acc(acc_o[mi]);
        row_m[mi][0] = row_m[mi][1] = -INFINITY;
        row_l[mi][0] = row_l[mi][1] = 0.f;
    }

    const int wrow = warp * 16 * MW; /* first row of this warp within the tile */
    const uint32_t sKa = l3k_smem_u32(sK), sVa = l3k_smem_u32(sV);
    const uint32_t sQw = l3k_smem_u32(sQ) + 2u * (uint32_t)(wrow * HD);
    const uint32_t oA = l3k_off_a<HD>(lane), oB = l3k_off_b<HD>(lane), oT = l3k_off_t<HD>(lane);

    /* The key range and the blocks that need no mask wait in shared memory, read where a masked
     * tile needs them: kept in registers across the loop, they made the hd128 kernel spill more. */
    __shared__ int64_t s_keys[2];
    __shared__ int s_plain[2];
    l3k_attn_share_keys(tid, m0, BN, Sq, Sk, a.causal, kb, ke, s_keys, s_plain);
    const int n_lo = (int)n_min; /* block indices fit 32 bits: Sk / BN */
    for (int n = (int)n_max - 1, it = 0; n >= n_lo; --n, ++it) {
        const int st = (int)(it & 1);
        const int64_t n0 = (int64_t)n * BN;
        l3k_cp_async_wait<1>(); /* Q and K(n) landed */
        __syncthreads();        /* ... for every thread; everyone is done with stage st^1 */
        const bool pf = n > n_lo;
        if (pf) {
            const int64_t n1 = n0 - BN;
            l3k_load_tile<BN, HD, NT>(sK + (st ^ 1) * BN * HD, kg + n1 * a.k_stride[2], a.k_stride[2],
                                      Sk - n1, hd, tid);
            l3k_cp_async_commit();
            l3k_load_tile<BN, HD, NT>(sV + (st ^ 1) * BN * HD, vg + n1 * a.v_stride[2], a.v_stride[2],
                                      Sk - n1, hd, tid);
            l3k_cp_async_commit();
        }
        /* ---- S = Q K^T */
        float s[MW][NTS][4];
#pragma unroll
        for (int mi = 0; mi < MW; mi++) l3k_zero_acc(s[mi]);
        const uint32_t sKs = sKa + 2u * (uint32_t)(st * BN * HD);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            uint32_t qa[MW][4];
#pragma unroll
            for (int mi = 0; mi < MW; mi++)
                l3k_ldsm_x4(qa[mi][0], qa[mi][1], qa[mi][2], qa[mi][3],
                            sQw + (l3k_xo(oA, kk * 2) + mi * 16 * HD * 2));
#pragma unroll
            for (int nj = 0; nj < BN / 16; nj++) {
                uint32_t b0, b1, b2, b3;
                l3k_ldsm_x4(b0, b1, b2, b3, sKs + (l3k_xo(oB, kk * 2) + nj * 16 * HD * 2));
                l3k_mma_strips<T>(s, 2 * nj, qa, b0, b1, b2, b3);
            }
        }
        /* ---- mask (key range and tail, causal diagonal); warp-uniform branch */
        const bool need_mask = n < s_plain[0] || n >= s_plain[1];
        if (need_mask) {
            const int64_t kb = s_keys[0], ke = s_keys[1];
#pragma unroll
            for (int mi = 0; mi < MW; mi++)
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const int64_t row = m0 + wrow + mi * 16 + g + 8 * r;
                    int lo, cnt;
                    l3k_attn_tile_cols(row, n0, BN, Sq, Sk, a.causal, kb, ke, lo, cnt);
#pragma unroll
                    for (int j = 0; j < NTS; j++)
#pragma unroll
                        for (int e = 0; e < 2; e++)
                            if (L3K_ATTN_COL_OUT(j * 8 + 2 * t + e, lo, cnt)) s[mi][j][2 * r + e] = -INFINITY;
                }
        }
        /* ---- online softmax (rows g and g+8 of each m16 strip; a row lives in one quad) */
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
                const float alpha = l3k_ex2(row_m[mi][r] * sl2 - msc); /* old max -inf: 0 */
                row_m[mi][r] = mx;
                float lsum = 0.f;
#pragma unroll
                for (int j = 0; j < NTS; j++) {
                    const float p0 = l3k_ex2(fmaf(s[mi][j][2 * r], sl2, -msc));
                    const float p1 = l3k_ex2(fmaf(s[mi][j][2 * r + 1], sl2, -msc));
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
        /* ---- O += P V */
        if (pf) l3k_cp_async_wait<2>();
        else l3k_cp_async_wait<0>();
        __syncthreads();
        const uint32_t sVs = sVa + 2u * (uint32_t)(st * BN * HD);
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t pa[MW][4];
#pragma unroll
            for (int mi = 0; mi < MW; mi++) l3k_acc_to_a<T>(pa[mi], s[mi][2 * kk], s[mi][2 * kk + 1]);
#pragma unroll
            for (int dj = 0; dj < HD / 16; dj++) {
                uint32_t b0, b1, b2, b3;
                l3k_ldsm_x4_t(b0, b1, b2, b3, sVs + (l3k_xo(oT, dj * 2) + kk * 16 * HD * 2));
                l3k_mma_strips<T>(acc_o, 2 * dj, pa, b0, b1, b2, b3);
            }
        }
    }

    /* ---- epilogue: normalize, LSE, stage O through this warp's own Q rows, 16-byte stores.
     * A row is masked when the mask leaves it no key, not when l is 0 or NaN: a NaN score
     * makes l NaN, and the row comes out NaN (o and lse) as in PyTorch. */
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float l = row_l[mi][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int lr = wrow + mi * 16 + g + 8 * r;
            const bool live = l3k_attn_key_count(m0 + lr, Sq, Sk, a.causal, s_keys[0], s_keys[1]) > 0;
            const float inv = live ? 1.f / l : 0.f;
#pragma unroll
            for (int j = 0; j < NTO; j++) {
                acc_o[mi][j][2 * r] *= inv;
                acc_o[mi][j][2 * r + 1] *= inv;
            }
            /* l == 0 with a key in view: every score -inf, a NaN softmax */
            if (t == 0 && m0 + lr < Sq)
                lseg[lr] = !live ? INFINITY : l > 0.f ? row_m[mi][r] * a.scale + logf(l) : NAN;
        }
    __syncwarp();
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
        for (int j = 0; j < NTO; j++)
#pragma unroll
            for (int r = 0; r < 2; r++)
                *reinterpret_cast<uint32_t *>(sQ + l3k_sw<HD>(wrow + mi * 16 + g + 8 * r, j * 8 + 2 * t)) =
                    Op::pack(acc_o[mi][j][2 * r], acc_o[mi][j][2 * r + 1]);
    __syncwarp();
    l3k_store_tile<16 * MW, HD, 32>(og + (int64_t)wrow * a.o_stride[2], a.o_stride[2], sQ + wrow * HD,
                                    Sq - m0 - wrow, hd, lane);
}

/* ---- host side --------------------------------------------------------------- */
template <typename T, int HD, int BM, int BN, int NW, int MW>
cudaError_t launch_fwd(const l3k_attn_fwd_args &a, cudaStream_t s) {
    auto kern = fa_fwd_kernel<T, HD, BM, BN, NW, MW>;
    const size_t smem = sizeof(T) * (size_t)(BM * HD + 4 * BN * HD);
    static bool done[64] = {false};
    cudaError_t e = l3k_smem_prepare(kern, smem, done);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)(a.batch * a.n_heads), (unsigned)((a.seq_q + BM - 1) / BM));
    kern<<<grid, NW * 32, smem, s>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const l3k_attn_fwd_args &a, cudaStream_t s, int variant) {
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

} // namespace

/* variant 1: 8 warps a CTA; otherwise the default tiles (4 warps, two m16 strips each). */
extern "C" int l3k_cuda_attn_fwd_sm80(const l3k_attn_fwd_args *a, void *stream, int variant) {
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (a->dtype == L3K_DT_BF16) return (int)dispatch<__nv_bfloat16>(*a, s, variant);
    return (int)dispatch<__half>(*a, s, variant);
}
