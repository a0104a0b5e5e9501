/* Hopper forward attention: wgmma tensor-core GEMMs (sm_90a).
 *
 * Contract: kernels/attention.h (same semantics, LSE convention and layouts as the mma.sync
 * forward in flash_fwd_sm80.cu, which stays the path for other GPUs and for head_dim <= 64 or > 128).
 *
 * Persistent CTAs (one per SM) walk 128-query-row tiles of one (batch, head), longest first under
 * a causal mask. A CTA has two warpgroups; warpgroup w owns rows 64w..64w+63. Per KV block of 128
 * keys (walked in reverse, masked blocks first):
 *   S = Q K^T   wgmma m64n128k16, Q and K read from shared memory (K-major)
 *   online softmax on the S accumulators in registers (exp2, scale*log2(e) folded in)
 *   O += P V    wgmma m64n128k16, P from registers (an accumulator pair is an A fragment),
 *               V read from shared memory MN-major (the instruction's transpose bit)
 * The P V product of block n+1 is issued right after S(n) and runs under the softmax of S(n).
 * A third (producer) warpgroup gives up its registers (setmaxnreg) and one of its threads issues
 * TMA loads of 64-column x 128-row boxes with the 128-byte swizzle wgmma expects (64-column panels
 * of 128-byte rows, 16-byte chunk c of row r at chunk c ^ (r % 8), tiles 1024-byte aligned).
 * Buffers: Q x2 (consecutive tiles), K x2, V x2 stages, each with a "full" mbarrier (TMA
 * transaction count) and an "empty" one (per-warp arrivals once its reads are done): the producer
 * runs ahead as far as the rings allow, and the two math warpgroups drift freely within them
 * (measured on the cp.async version: forcing them to alternate was slower).
 * The epilogue stages O through the warpgroup's own rows of its Q buffer for 16-byte stores. */
#include <math.h>

#include "attention.h"
#include "wgmma.cuh"

namespace {

constexpr int ROWS = 128;                  /* query rows per CTA (two warpgroups of 64) */
[[maybe_unused]] constexpr int KEYS = 128; /* keys per KV block (device code only: sm_90a pass) */
constexpr int CONSUMERS = 256;             /* two math warpgroups */
constexpr int THREADS = CONSUMERS + 128;   /* + one producer warpgroup (one thread issues TMA) */

/* One tile = ROWS query rows of one (batch, head); tile index i walks m blocks from the last
 * (longest under a causal mask) to the first, heads fastest. */
struct fwd_tile {
    int64_t b, h, hk, m0;
    int64_t kb, ke;       /* the sequence's keys */
    int64_t n_min, n_max; /* KV blocks [n_min, n_max) hold a visible key (n_max <= n_min: every row
                             fully masked) */
};

template <typename T>
__global__ void __launch_bounds__(THREADS, 1)
    fa_fwd_sm90_kernel(const l3k_attn_fwd_args a, const __grid_constant__ CUtensorMap tm_q,
                       const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v) {
#if L3K_HAVE_WGMMA
    constexpr int HD = 128;
    constexpr int TILE_BYTES = ROWS * HD * 2; /* a Q, K or V tile (KEYS == ROWS) */
    constexpr int NS = KEYS / 8;              /* score n8 chunks per row */
    constexpr int NO = HD / 8;                /* output n8 chunks per row */
    using W = l3k_wgmma<T>;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sQ = (l3k_smem_u32(smem_raw) + 1023u) &
                        ~1023u;              /* [2 buffers] consecutive tiles alternate */
    const uint32_t sK = sQ + 2 * TILE_BYTES; /* [2 stages] */
    const uint32_t sV = sK + 2 * TILE_BYTES; /* [2 stages] */
    unsigned char *smem_gen = smem_raw + (sQ - l3k_smem_u32(smem_raw));
    /* full*: the buffer's TMA bytes have landed (the producer's expect_tx arrival + the transaction
     * count); empty*: every math warp is done reading it (one arrival per warp). Each is a pair
     * (buffer or stage 0, 1), 8 bytes apart. */
    const uint32_t fullQ = sV + 2 * TILE_BYTES, fullK = fullQ + 16, fullV = fullQ + 32;
    const uint32_t emptyQ = fullQ + 48, emptyK = fullQ + 64, emptyV = fullQ + 80;

    const int tid = threadIdx.x, wg = tid >> 7, wl = tid & 127;
    const int lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int64_t H = a.n_heads, Sq = a.seq_q, Sk = a.seq_k;
    const int64_t n_bh = a.batch * H, n_m = (Sq + ROWS - 1) / ROWS, n_tiles = n_bh * n_m;
    const int hd = (int)a.head_dim;
    const float sl2 = a.scale * L3K_LOG2E;
    const int row0 = 64 * wg + 16 * (wl >> 5) + g; /* tile row of accumulator elements 0,1 (+8: 2,3) */

    if (tid == 0) {
        for (int i = 0; i < 2; i++) {
            l3k_mbar_init(fullQ + 8 * i, 1);
            l3k_mbar_init(fullK + 8 * i, 1);
            l3k_mbar_init(fullV + 8 * i, 1);
            l3k_mbar_init(emptyQ + 8 * i, CONSUMERS / 32);
            l3k_mbar_init(emptyK + 8 * i, CONSUMERS / 32);
            l3k_mbar_init(emptyV + 8 * i, CONSUMERS / 32);
        }
    }
    __syncthreads();

    auto tile_at = [&](int64_t i, fwd_tile &x) {
        const int64_t bh = i % n_bh;
        x.b = bh / H;
        x.h = bh % H;
        x.hk = x.h / (H / a.n_kv_heads);
        x.m0 = (n_m - 1 - i / n_bh) * ROWS;
        l3k_attn_keys(a.key_range, x.b, Sk, x.kb, x.ke);
        x.n_min = l3k_attn_kv_block_begin(x.kb, KEYS);
        x.n_max = l3k_attn_kv_block_end(x.m0, ROWS, KEYS, Sq, Sk, a.causal, x.kb, x.ke);
    };
    auto o_ptr = [&](const fwd_tile &x) {
        return static_cast<T *>(a.o) + x.b * a.o_stride[0] + x.h * a.o_stride[1] + x.m0 * a.o_stride[2];
    };
    auto lse_ptr = [&](const fwd_tile &x) { return a.lse + (x.b * H + x.h) * Sq + x.m0; };
    /* This CTA's tiles from i on: writes the fully masked ones (O = 0, LSE = +inf) and returns the
     * index of the first with keys to visit (n_tiles if none). */
    auto next_live = [&](int64_t i, fwd_tile &x) {
        for (; i < n_tiles; i += gridDim.x) {
            tile_at(i, x);
            if (x.n_max > x.n_min) break;
            if (wg == 2) continue; /* the producer only skips them */
            T *og = o_ptr(x);
            for (int c = tid; c < ROWS * NO; c += CONSUMERS) {
                const int r = c / NO, ch = c % NO;
                if (x.m0 + r < Sq && ch * 8 < hd)
                    *reinterpret_cast<uint4 *>(og + (int64_t)r * a.o_stride[2] + ch * 8) =
                        make_uint4(0, 0, 0, 0);
            }
            for (int r = tid; r < ROWS; r += CONSUMERS)
                if (x.m0 + r < Sq) lse_ptr(x)[r] = INFINITY;
        }
        return i;
    };
    float acc_o[HD / 2], s[KEYS / 2];
    uint32_t p[KEYS / 4]; /* P of the previous block as bf16/fp16 A fragments */
    /* O += P V for the block whose V sits in stage `vst`; k-step kk covers keys 16kk..16kk+15. */
    auto issue_pv = [&](uint32_t vst) {
        const uint32_t sVs = sV + vst * TILE_BYTES;
#pragma unroll
        for (int kk = 0; kk < KEYS / 16; kk++)
            W::rs_n128(acc_o, &p[4 * kk], l3k_sw128_desc(sVs + (uint32_t)(kk * 16 * 128), KEYS * 128, 1024));
    };

    fwd_tile x;
    int64_t idx = next_live(blockIdx.x, x);
    if (wg == 2) {
        /* ---- producer: one thread walks the same tiles and KV blocks as the math warpgroups and
         * issues each tile's Q, then per block K(n) and V(n), as soon as their buffers are free. */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (wl != 0) return;
        constexpr uint32_t TILE_TX = TILE_BYTES; /* bytes a tile's boxes complete */
        for (int64_t k = 0, j = 0; idx < n_tiles; k++) {
            const int head = (int)x.h, kvh = (int)x.hk, bat = (int)x.b;
            if (k >= 2) l3k_mbar_wait(emptyQ + 8 * (k & 1), (uint32_t)((k - 2) >> 1) & 1);
            const uint32_t qb = sQ + (uint32_t)(k & 1) * TILE_BYTES, qbar = fullQ + 8 * (k & 1);
            l3k_mbar_expect_tx(qbar, TILE_TX);
            l3k_tma_tile<ROWS, HD>(qb, &tm_q, (int)x.m0, head, bat, qbar);
            for (int64_t n = x.n_max - 1; n >= x.n_min; --n, ++j) {
                const uint32_t st = (uint32_t)(j & 1), par = (uint32_t)((j - 2) >> 1) & 1;
                const int row = (int)(n * KEYS);
                if (j >= 2) l3k_mbar_wait(emptyK + 8 * st, par);
                l3k_mbar_expect_tx(fullK + 8 * st, TILE_TX);
                l3k_tma_tile<KEYS, HD>(sK + st * TILE_BYTES, &tm_k, row, kvh, bat, fullK + 8 * st);
                if (j >= 2) l3k_mbar_wait(emptyV + 8 * st, par);
                l3k_mbar_expect_tx(fullV + 8 * st, TILE_TX);
                l3k_tma_tile<KEYS, HD>(sV + st * TILE_BYTES, &tm_v, row, kvh, bat, fullV + 8 * st);
            }
            idx = next_live(idx + gridDim.x, x);
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    if (idx >= n_tiles) return;
    int64_t j = 0; /* global KV iteration of this CTA: stage j & 1, a stage's u-th use has parity u & 1 */
    for (int64_t k = 0; idx < n_tiles; k++) {
        const int64_t m0 = x.m0, kb = x.kb, ke = x.ke;
        const uint32_t sQw = sQ + (uint32_t)((k & 1) * TILE_BYTES + 64 * wg * 128);
#pragma unroll
        for (int i = 0; i < HD / 2; i++) acc_o[i] = 0.f;
        float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};

        /* Iteration j handles block n: S(n) = Q K(n)^T is issued together with O += P(n+1) V(n+1), and
         * the softmax of S(n) runs while that P V product is still on the tensor cores. The producer
         * fills the rings ahead; the math warpgroups meet only through the buffer barriers, so one's
         * softmax can overlap the other's GEMMs. */
        for (int64_t n = x.n_max - 1, lit = 0; n >= x.n_min; --n, ++lit, ++j) {
            const uint32_t st = (uint32_t)(j & 1);
            const int64_t n0 = n * KEYS;
            if (lit == 0) l3k_mbar_wait(fullQ + 8 * (k & 1), (uint32_t)(k >> 1) & 1);
            l3k_mbar_wait(fullK + 8 * st, (uint32_t)(j >> 1) & 1);
            if (lit > 0) l3k_mbar_wait(fullV + 8 * (st ^ 1), (uint32_t)((j - 1) >> 1) & 1);
            /* ---- S = Q K^T: HD/16 k-steps; a k-step moves 32 bytes inside a 128-byte row, 4 per panel */
            const uint32_t sKs = sK + st * TILE_BYTES;
            l3k_wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const uint32_t koff = (uint32_t)((kk >> 2) * ROWS * 128 + (kk & 3) * 32);
                W::ss_n128(s, l3k_sw128_desc(sQw + koff, 16, 1024), l3k_sw128_desc(sKs + koff, 16, 1024),
                           kk > 0);
            }
            l3k_wgmma_commit();
            if (lit > 0) {
                issue_pv(st ^ 1);
                l3k_wgmma_commit();
                l3k_wgmma_wait<1>();
            } else {
                l3k_wgmma_wait<0>();
            }
            l3k_pin(s);
            if (lane == 0) l3k_mbar_arrive(emptyK + 8 * st);
            /* ---- mask (key range and tail, causal diagonal); CTA-uniform branch */
            const bool need_mask = L3K_ATTN_TILE_MASKED(m0, n0, KEYS, Sq, Sk, a.causal, kb, ke);
            if (need_mask) {
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    int lo, cnt;
                    l3k_attn_tile_cols(m0 + row0 + 8 * r, n0, KEYS, Sq, Sk, a.causal, kb, ke, lo, cnt);
#pragma unroll
                    for (int jj = 0; jj < NS; jj++)
#pragma unroll
                        for (int e = 0; e < 2; e++)
                            if (L3K_ATTN_COL_OUT(jj * 8 + 2 * t + e, lo, cnt))
                                s[4 * jj + 2 * r + e] = -INFINITY;
                }
            }
            /* ---- online softmax: row (row0 + 8r) lives in the quad of lanes sharing g */
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = row_m[r];
#pragma unroll
                for (int jj = 0; jj < NS; jj++)
                    mx = fmaxf(mx, fmaxf(s[4 * jj + 2 * r], s[4 * jj + 2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float msc = ((mx == -INFINITY) ? 0.f : mx) * sl2;
                alpha[r] = l3k_ex2(row_m[r] * sl2 - msc); /* old max -inf: 0 */
                row_m[r] = mx;
                float lsum = 0.f;
#pragma unroll
                for (int jj = 0; jj < NS; jj++) {
                    const float p0 = l3k_ex2(fmaf(s[4 * jj + 2 * r], sl2, -msc));
                    const float p1 = l3k_ex2(fmaf(s[4 * jj + 2 * r + 1], sl2, -msc));
                    s[4 * jj + 2 * r] = p0;
                    s[4 * jj + 2 * r + 1] = p1;
                    lsum += p0 + p1;
                }
                row_l[r] = row_l[r] * alpha[r] + lsum;
            }
            /* ---- the previous P V is done: rescale O to the new row max, P(n) into A fragments */
            l3k_wgmma_wait<0>();
            l3k_pin(acc_o);
            l3k_pin(p);
            if (lit > 0 && lane == 0) l3k_mbar_arrive(emptyV + 8 * (st ^ 1));
#pragma unroll
            for (int jj = 0; jj < NO; jj++) {
                acc_o[4 * jj + 0] *= alpha[0];
                acc_o[4 * jj + 1] *= alpha[0];
                acc_o[4 * jj + 2] *= alpha[1];
                acc_o[4 * jj + 3] *= alpha[1];
            }
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; kk++) {
                p[4 * kk + 0] = l3k_pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
                p[4 * kk + 1] = l3k_pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
                p[4 * kk + 2] = l3k_pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
                p[4 * kk + 3] = l3k_pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
            }
        }
        fwd_tile nx;
        const int64_t nidx = next_live(idx + gridDim.x, nx);
        const uint32_t vlast = (uint32_t)((j - 1) & 1);
        l3k_mbar_wait(fullV + 8 * vlast, (uint32_t)((j - 1) >> 1) & 1);
        l3k_wgmma_fence();
        issue_pv(vlast);
        l3k_wgmma_commit();
        l3k_wgmma_wait<0>();
        l3k_pin(acc_o);
        l3k_pin(p);
        if (lane == 0) l3k_mbar_arrive(emptyV + 8 * vlast);

        /* ---- epilogue: normalize, LSE, O staged in this warpgroup's rows of the Q buffer.  A row
         * is masked when the mask leaves it no key, not when l is 0 or NaN: a NaN score makes l
         * NaN, and the row comes out NaN (o and lse) as in PyTorch. */
        float *lseg = lse_ptr(x);
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float l = row_l[r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int lr = row0 + 8 * r;
            const bool live = l3k_attn_key_count(m0 + lr, Sq, Sk, a.causal, kb, ke) > 0;
            const float inv = live ? 1.f / l : 0.f;
#pragma unroll
            for (int jj = 0; jj < NO; jj++) {
                acc_o[4 * jj + 2 * r] *= inv;
                acc_o[4 * jj + 2 * r + 1] *= inv;
            }
            /* l == 0 with a key in view: every score -inf, a NaN softmax */
            if (t == 0 && m0 + lr < Sq)
                lseg[lr] = !live ? INFINITY : l > 0.f ? row_m[r] * a.scale + logf(l) : NAN;
        }
        unsigned char *sO = smem_gen + (k & 1) * TILE_BYTES;
#pragma unroll
        for (int jj = 0; jj < NO; jj++)
#pragma unroll
            for (int r = 0; r < 2; r++)
                *reinterpret_cast<uint32_t *>(sO + l3k_sw128_tile_off(ROWS, row0 + 8 * r, jj) + 4 * t) =
                    l3k_pack2<T>(acc_o[4 * jj + 2 * r], acc_o[4 * jj + 2 * r + 1]);
        l3k_warpgroup_sync(wg);
        T *og = o_ptr(x);
        for (int i = wl; i < 64 * NO; i += 128) {
            const int r = 64 * wg + i / NO, ch = i % NO;
            if (m0 + r < Sq && ch * 8 < hd)
                *reinterpret_cast<uint4 *>(og + (int64_t)r * a.o_stride[2] + ch * 8) =
                    *reinterpret_cast<const uint4 *>(sO + l3k_sw128_tile_off(ROWS, r, ch));
        }
        l3k_fence_async_shared(); /* these generic accesses come before the producer's next TMA write here */
        __syncwarp();
        if (lane == 0) l3k_mbar_arrive(emptyQ + 8 * (k & 1));
        idx = nidx;
        x = nx;
    }
#endif /* L3K_HAVE_WGMMA */
}

/* ---- host side ----------------------------------------------------------- */
template <typename T>
cudaError_t launch(const l3k_attn_fwd_args &a, cudaStream_t s) {
    auto kern = fa_fwd_sm90_kernel<T>;
    constexpr size_t smem = 6 * (size_t)ROWS * 128 * 2 + 128 +
                            1024; /* 2 Q, 2 K, 2 V tiles, barriers, alignment */
    static l3k_sm90a_cache cache;
    int sm_count = 0;
    const cudaError_t e = l3k_sm90a_prepare(kern, smem, cache, &sm_count);
    if (e != cudaSuccess) return e;
    CUtensorMap tq, tk, tv;
    const bool bf16 = a.dtype == L3K_DT_BF16;
    if (l3k_tma_map_bhsd(&tq, a.q, bf16, a.head_dim, a.seq_q, a.n_heads, a.batch, a.q_stride, ROWS) !=
            cudaSuccess ||
        l3k_tma_map_bhsd(&tk, a.k, bf16, a.head_dim, a.seq_k, a.n_kv_heads, a.batch, a.k_stride, ROWS) !=
            cudaSuccess ||
        l3k_tma_map_bhsd(&tv, a.v, bf16, a.head_dim, a.seq_k, a.n_kv_heads, a.batch, a.v_stride, ROWS) !=
            cudaSuccess)
        return cudaErrorNotSupported; /* e.g. a driver without the encoder, or strides TMA cannot take:
                                         mma.sync runs */
    /* Persistent: one CTA per SM walks the tiles. */
    const int64_t tiles = a.batch * a.n_heads * ((a.seq_q + ROWS - 1) / ROWS);
    const int64_t ctas = tiles < sm_count ? tiles : sm_count;
    kern<<<(unsigned)ctas, THREADS, smem, s>>>(a, tq, tk, tv);
    return cudaGetLastError();
}

} // namespace

/* Forward on the wgmma path when this GPU and build have it and 64 < head_dim <= 128 (head_dim 64
 * is faster on the mma.sync kernel: measured 213 vs 199 TFLOP/s); otherwise returns
 * cudaErrorNotSupported (nothing launched) and the caller takes the mma.sync kernel. */
extern "C" int l3k_cuda_attn_fwd_sm90(const l3k_attn_fwd_args *a, void *stream) {
    if (a->head_dim <= 64 || a->head_dim > 128 || (a->dtype != L3K_DT_BF16 && a->dtype != L3K_DT_F16))
        return (int)cudaErrorNotSupported;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (a->dtype == L3K_DT_BF16) return (int)launch<__nv_bfloat16>(*a, s);
    return (int)launch<__half>(*a, s);
}
