/* Hopper backward attention main kernel: wgmma (sm_90a).
 *
 * Contract: kernels/attention.h. Replaces only fa_bwd_kernel<..., DQ = true> of flash_bwd_sm80.cu
 * (non-deterministic mode, head_dim <= 128); the preprocess (D = rowsum(dO*O), dqacc = 0) and the
 * dq convert kernel there are unchanged, so dqacc gets the same unscaled sum of dS K.
 *
 * CTA = 128 keys of one (batch, kv head), two warpgroups; warpgroup w owns keys 64w..64w+63 and
 * their dK, dV accumulators (64 x HD fp32 each, in registers for the whole kernel). K and V stay
 * resident in shared memory; the CTA walks the 64-row Q blocks (causal: only blocks that see a key
 * of this block) of the GQA group's query heads, Q, dO, LSE and D double-buffered. A third
 * (producer) warpgroup gives up its registers (setmaxnreg) and one of its warps loads them: TMA
 * boxes for the tiles, cp.async for the LSE and D rows, completing a "full" mbarrier per stage; the
 * math warps release a stage through its "empty" mbarrier and meet each other once per Q block
 * (their dS^T rows, double-buffered, are both in place).
 * Per Q block and warpgroup (scores transposed so that P^T and dS^T, keys x queries, come out in
 * the accumulator layout that is the A fragment of the register-A products):
 *   S^T  = K_w Q^T      ss m64n64, K and Q K-major
 *   dP^T = V_w dO^T     ss m64n64, V and dO K-major
 *   P^T  = exp2(S^T scale log2e - LSE log2e), masked;  dS^T = P^T o (dP^T - D)
 *   dV  += P^T dO       rs m64nHD, dO MN-major (transpose bit)
 *   dK  += dS^T Q       rs m64nHD, Q MN-major
 *   dQ   = dS K         ss m64n64 from the CTA's dS^T (both warpgroups' rows, staged in shared
 *                       memory) and K, both read MN-major; hd128: warpgroup w takes columns
 *                       64w.., all 128 keys; hd64: keys 64w.., all columns (two partial sums).
 *                       Added to dqacc in fp32 by one bulk reduce per warpgroup (below).
 * dK is scaled by the softmax scale at the end; dq's scale is applied by the convert kernel.
 * Registers: dK, dV 128 + S^T, dP^T 64 + packed P^T, dS^T 32 of the math warps' 240; one CTA per SM.
 * Tile layout as in flash_fwd_sm90.cu: 64-column panels of 128-byte rows, 16-byte chunk c of
 * row r at chunk c ^ (r % 8), tiles 1024-byte aligned. */
#include <math.h>

#include "attention.h"
#include "wgmma.cuh"

namespace {

constexpr int CONSUMERS = 256;           /* two math warpgroups */
constexpr int THREADS = CONSUMERS + 128; /* + the producer warpgroup */
constexpr int KEYS = 128;                /* keys per CTA (two warpgroups of 64) */
constexpr int ROWS_Q = 64;               /* query rows per Q block */

#if L3K_HAVE_WGMMA /* the device code exists only in the sm_90a pass */
/* 4-byte global->shared copy (LSE, D rows are not 16-byte aligned); pred == false writes zero. */
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, bool pred) {
    const int sz = pred ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(sz));
}

/* Two adjacent fp32 adds into dqacc, one vector reduction (sm_90). */
__device__ __forceinline__ void red_add_v2(float *dst, float x, float y) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(x), "f"(y) : "memory");
}
/* Bulk (TMA-unit) fp32 add of `bytes` (multiple of 16) contiguous shared memory into global. */
__device__ __forceinline__ void bulk_reduce_add_f32(float *dst, uint32_t src, uint32_t bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                 "r"(src), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
/* The shared memory source of this thread's bulk groups has been read (may be overwritten). */
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
__device__ __forceinline__ void bulk_wait_all() {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

/* acc (64 keys x HD, this warpgroup's dV or dK) += A B in one committed wgmma group: A (64 keys x 64
 * queries, P^T or dS^T) from registers, four k16 steps of 4; B the 64 x HD tile (dO or Q) at sB,
 * read MN-major. */
template <typename T, int HD>
__device__ __forceinline__ void regs_times_tile(float (&acc)[HD / 2], const uint32_t (&a)[16], uint32_t sB) {
    l3k_wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        const uint64_t db = l3k_sw128_desc(sB + (uint32_t)(kk * 16 * 128), ROWS_Q * 128, 1024);
        if constexpr (HD == 128) l3k_wgmma<T>::rs_n128(acc, &a[4 * kk], db);
        else l3k_wgmma<T>::rs_n64(acc, &a[4 * kk], db);
    }
    l3k_wgmma_commit();
}

/* Named barrier of the 256 math threads (ids 1, 2 are the warpgroups' own: l3k_warpgroup_sync). */
__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 3, %0;\n" ::"n"(CONSUMERS) : "memory");
}

#endif /* L3K_HAVE_WGMMA */

/* dQ accumulation (dqacc layout: attention.h, l3k_cuda_attn_bwd_main_sm90): a full 64-row block
 * with head_dim == HD is stored in accumulator order, float4 q of thread x of warpgroup w
 * (dq[4q..4q+3]) at float 4096 w + 4 (128 q + x) of the block's span (hd64: both warpgroups add onto
 * w = 0). Each warpgroup stages its tile with conflict-free 16-byte stores and adds it with ONE 16 KB
 * bulk reduce (TMA unit). Partial blocks and padded head dims stay row-major, added with red.v2.
 * Measured (H100, B=2 H=32 Hkv=8 S=2048 hd128 causal, backward main kernel alone): this 0.658 ms;
 * row-major with per-thread red.v2 0.682, row-major with per-row bulk reduces 0.690; with no dQ
 * adds at all 0.478 (timing probes, since removed). */
constexpr uint32_t DQ_TILE_BYTES = 64 * 64 * 4; /* one warpgroup's staged dQ tile */

template <typename T, int HD>
__global__ void __launch_bounds__(THREADS, 1)
    fa_bwd_sm90_kernel(const l3k_attn_bwd_args a, const float *dsum, float *dqacc,
                       const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_do,
                       const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v) {
#if L3K_HAVE_WGMMA
    static_assert(HD == 64 || HD == 128, "head_dim tile");
    constexpr uint32_t KT = KEYS * HD * 2;      /* K, V tile bytes */
    constexpr uint32_t QT = ROWS_Q * HD * 2;    /* Q, dO tile bytes (per stage) */
    constexpr uint32_t DST = KEYS * ROWS_Q * 2; /* dS^T tile: keys x 64 queries = one panel */
    constexpr int KSTEPS = HD / 16;
    using SS = l3k_wgmma_ss<T>;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sK = (l3k_smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t sV = sK + KT;
    const uint32_t sQ = sV + KT;               /* [2 stages] */
    const uint32_t sdO = sQ + 2 * QT;          /* [2 stages] */
    const uint32_t sdS = sdO + 2 * QT;         /* [2 Q blocks] */
    const uint32_t sLD = sdS + 2 * DST;        /* float L[2][64] (lse), D[2][64] */
    const uint32_t sdQ = sLD + 4 * ROWS_Q * 4; /* [2 warpgroups] staged dQ tiles, DQ_TILE_BYTES each */
    /* fullKV: K and V landed (once); fullQ[st]: stage st's Q, dO (TMA bytes) and LSE, D (the producer
     * warp's cp.async arrivals) landed; emptyQ[st]: every math thread is done reading stage st. */
    const uint32_t fullKV = sdQ + 2 * DQ_TILE_BYTES, fullQ = fullKV + 8, emptyQ = fullKV + 24;
    unsigned char *smem_gen = smem_raw + (sK - l3k_smem_u32(smem_raw));
    const float *sL = reinterpret_cast<const float *>(smem_gen + (sLD - sK));
    const float *sD = sL + 2 * ROWS_Q;

    const int tid = threadIdx.x, wg = tid >> 7, wl = tid & 127, wi = wl >> 5;
    const int lane = tid & 31, g = lane >> 2, t = lane & 3;
    const l3k_attn_fwd_args &f = a.f;
    const int64_t H = f.n_heads, HKV = f.n_kv_heads, Sq = f.seq_q, Sk = f.seq_k;
    int64_t G, b, hk, n0; /* query heads per kv head; this CTA's sequence, kv head, first key */
    l3k_attn_kv_cta(H, HKV, KEYS, G, b, hk, n0);
    const int hd = (int)f.head_dim;
    const float scale = f.scale;

    /* Q blocks that see at least one key of this block (causal: the first query seeing its first key
     * in the sequence's range on; none when no key is in range: dk = dv = 0 are still written) */
    int64_t kb, ke; /* this sequence's keys */
    l3k_attn_keys(f.key_range, b, Sk, kb, ke);
    int64_t m_blocks, m_min;
    const int64_t per_head =
        l3k_attn_kv_q_blocks(n0, KEYS, ROWS_Q, Sq, Sk, f.causal, kb, ke, m_blocks, m_min);
    const int64_t total = G * per_head;

    if (tid == 0) {
        l3k_mbar_init(fullKV, 1);
        for (int i = 0; i < 2; i++) {
            l3k_mbar_init(fullQ + 8 * i, 1 + 32);
            l3k_mbar_init(emptyQ + 8 * i, CONSUMERS);
        }
    }
    __syncthreads();

    /* Step order: Q blocks from the last one down to m_min, the group's query heads inside. Every CTA
     * of a (batch, kv head) then works on the same Q block at the same time (the causal ones just
     * stop earlier), so their dqacc adds and Q, dO, LSE, D reads hit the same L2 lines; head-major
     * order spread them over all of dqacc (measured 30% slower at S = 2048, dqacc > L2). */
    if (wg == 2) {
        /* ---- producer: warp 0 walks the same (query head, Q block) steps as the math warpgroups. */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (wl >= 32) return;
        if (lane == 0 && total > 0) { /* with no Q block to visit, the epilogue reuses sK, sV at once */
            l3k_mbar_expect_tx(fullKV, 2 * KT);
            l3k_tma_tile<KEYS, HD>(sK, &tm_k, (int)n0, (int)hk, (int)b, fullKV);
            l3k_tma_tile<KEYS, HD>(sV, &tm_v, (int)n0, (int)hk, (int)b, fullKV);
        }
        int64_t h = hk * G, m0 = (m_blocks - 1) * ROWS_Q;
        for (int64_t p = 0; p < total; p++) {
            const uint32_t st = (uint32_t)(p & 1);
            if (p >= 2) l3k_mbar_wait(emptyQ + 8 * st, (uint32_t)((p - 2) >> 1) & 1);
            if (lane == 0) {
                l3k_mbar_expect_tx(fullQ + 8 * st, 2 * QT);
                l3k_tma_tile<ROWS_Q, HD>(sQ + st * QT, &tm_q, (int)m0, (int)h, (int)b, fullQ + 8 * st);
                l3k_tma_tile<ROWS_Q, HD>(sdO + st * QT, &tm_do, (int)m0, (int)h, (int)b, fullQ + 8 * st);
            }
            /* Rows past Sq read as lse = 0, D = 0: their Q and dO rows are zero (TMA fill), so P^T dO,
             * dS^T = P^T o (0 - 0) and their dQ (never stored) contribute nothing. */
            const int64_t rb = (b * H + h) * Sq + m0;
#pragma unroll
            for (int u = 0; u < 4; u++) { /* lse rows lane, lane + 32, then D rows */
                const int r = lane + 32 * (u & 1);
                const bool ok = m0 + r < Sq;
                const float *src = (u < 2 ? f.lse : dsum) + (ok ? rb + r : 0);
                cp_async4(sLD + (uint32_t)(((u >> 1) * 2 + st) * ROWS_Q + r) * 4u, src, ok);
            }
            l3k_mbar_arrive_cp_async(fullQ + 8 * st);
            if (++h == (hk + 1) * G) {
                h = hk * G;
                m0 -= ROWS_Q;
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

    float dk[HD / 2], dv[HD / 2];
#pragma unroll
    for (int i = 0; i < HD / 2; i++) dk[i] = dv[i] = 0.f;

    const uint32_t sKw = sK + (uint32_t)(64 * wg * 128), sVw = sV + (uint32_t)(64 * wg * 128);
    const int krow0 = 64 * wg + 16 * wi + g; /* tile key row of accumulator elements 0,1 (+8: 2,3) */
    /* dQ split: hd128 -> columns 64wg.. over all keys; hd64 -> keys 64wg.. over all columns */
    constexpr int DQ_STEPS = HD == 128 ? KEYS / 16 : 64 / 16;
    const uint32_t dq_key0 = HD == 128 ? 0u : (uint32_t)(64 * wg);
    const uint32_t sKdq = sK + (HD == 128 ? (uint32_t)wg * (uint32_t)(KEYS * 128) : 0u);
    const int dq_col0 = HD == 128 ? 64 * wg : 0;

    int64_t h = hk * G, m0 = (m_blocks - 1) * ROWS_Q, h_next = h, m0_next = m0;
    if (total > 0) l3k_mbar_wait(fullKV, 0);
    for (int64_t p = 0; p < total; p++, h = h_next, m0 = m0_next) {
        const uint32_t st = (uint32_t)(p & 1);
        h_next = h + 1;
        m0_next = m0;
        if (h_next == (hk + 1) * G) {
            h_next = hk * G;
            m0_next = m0 - ROWS_Q;
        }
        l3k_mbar_wait(fullQ + 8 * st, (uint32_t)(p >> 1) & 1); /* this stage's Q, dO, LSE, D landed */
        const uint32_t sdSp = sdS + st * DST; /* this Q block's dS^T (the other buffer may still be read) */

        const uint32_t sQs = sQ + st * QT, sdOs = sdO + st * QT;
        /* ---- S^T = K_w Q^T, dP^T = V_w dO^T: two groups, P^T is computed while dP^T runs */
        float s[32], dp[32];
        l3k_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++) {
            const uint32_t ko = (uint32_t)((kk >> 2) * KEYS * 128 + (kk & 3) * 32);
            const uint32_t qo = (uint32_t)((kk >> 2) * ROWS_Q * 128 + (kk & 3) * 32);
            SS::template n64<0, 0>(s, l3k_sw128_desc(sKw + ko, 16, 1024), l3k_sw128_desc(sQs + qo, 16, 1024),
                                   kk > 0);
        }
        l3k_wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++) {
            const uint32_t ko = (uint32_t)((kk >> 2) * KEYS * 128 + (kk & 3) * 32);
            const uint32_t qo = (uint32_t)((kk >> 2) * ROWS_Q * 128 + (kk & 3) * 32);
            SS::template n64<0, 0>(dp, l3k_sw128_desc(sVw + ko, 16, 1024),
                                   l3k_sw128_desc(sdOs + qo, 16, 1024), kk > 0);
        }
        l3k_wgmma_commit();
        l3k_wgmma_wait<1>();
        l3k_pin(s);

        /* ---- P^T: element (key krow0 + 8r, query 8j + 2t + e) is s[4j + 2r + e] */
        const float *sLs = sL + st * ROWS_Q, *sDs = sD + st * ROWS_Q;
        const int64_t kw0 = n0 + 64 * wg; /* this warpgroup's first key */
        const bool need_mask = L3K_ATTN_TILE_MASKED(m0, kw0, 64, Sq, Sk, f.causal, kb, ke);
        /* The first query column that sees each of this thread's two keys (keys outside [kb, ke), the
         * tail past Sk among them, see none: ROWS_Q); 0 in a tile with no masked pair. */
        int first[2] = {0, 0};
        if (need_mask) {
#pragma unroll
            for (int r = 0; r < 2; r++)
                first[r] = l3k_attn_tile_first_row(n0 + krow0 + 8 * r, m0, ROWS_Q, Sq, Sk, f.causal, kb, ke);
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float2 L = *reinterpret_cast<const float2 *>(sLs + 8 * j + 2 * t);
            const float l0 = L.x * L3K_LOG2E, l1 = L.y * L3K_LOG2E; /* lse = +inf (fully masked row): P = 0 */
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float p0 = l3k_ex2(fmaf(s[4 * j + 2 * r], scale * L3K_LOG2E, -l0));
                float p1 = l3k_ex2(fmaf(s[4 * j + 2 * r + 1], scale * L3K_LOG2E, -l1));
                if (8 * j + 2 * t < first[r]) p0 = 0.f;
                if (8 * j + 2 * t + 1 < first[r]) p1 = 0.f;
                s[4 * j + 2 * r] = p0;
                s[4 * j + 2 * r + 1] = p1;
            }
        }
        /* ---- dV += P^T dO: k-step kk = queries 16kk..16kk+15 = accumulator chunks 2kk, 2kk+1 */
        uint32_t pp[16];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            pp[4 * kk + 0] = l3k_pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
            pp[4 * kk + 1] = l3k_pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
            pp[4 * kk + 2] = l3k_pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
            pp[4 * kk + 3] = l3k_pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
        }
        regs_times_tile<T, HD>(dv, pp, sdOs);
        l3k_wgmma_wait<1>(); /* dP^T done (the dV group may still run) */
        l3k_pin(dp);

        /* ---- dS^T = P^T o (dP^T - D), packed as the dK A fragment and staged for dQ */
        uint32_t dsp[16];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float2 D = *reinterpret_cast<const float2 *>(sDs + 8 * j + 2 * t);
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const float d0 = s[4 * j + 2 * r] * (dp[4 * j + 2 * r] - D.x);
                const float d1 = s[4 * j + 2 * r + 1] * (dp[4 * j + 2 * r + 1] - D.y);
                dsp[2 * j + r] = l3k_pack2<T>(d0, d1); /* = A fragment register 4(j/2) + 2(j%2) + r */
            }
        }
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int r = 0; r < 2; r++)
                *reinterpret_cast<uint32_t *>(smem_gen + (sdSp - sK) +
                                              l3k_sw128_tile_off(KEYS, krow0 + 8 * r, j) +
                                              4 * t) = dsp[2 * j + r];
        /* ---- dK += dS^T Q */
        regs_times_tile<T, HD>(dk, dsp, sQs);
        l3k_fence_async_shared(); /* dS^T stores -> async proxy */
        /* The previous Q block's bulk add has read this warpgroup's dQ staging rows (issued a whole
         * iteration ago, so this rarely waits); the barrier orders that before the stores below. Both
         * warpgroups are then past their previous dQ product, so the other dS^T buffer is free again. */
        if (wl == 0) bulk_wait_read();
        consumers_sync(); /* both warpgroups' dS^T rows are in place */

        /* ---- dQ (64 queries x 64 columns) = dS K over this warpgroup's key range */
        float dq[32];
        l3k_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < DQ_STEPS; kk++) {
            const uint32_t ko = (dq_key0 + 16u * kk) * 128u;
            SS::template n64<1, 1>(dq, l3k_sw128_desc(sdSp + ko, KEYS * 128, 1024),
                                   l3k_sw128_desc(sKdq + ko, KEYS * 128, 1024), kk > 0);
        }
        l3k_wgmma_commit();
        l3k_wgmma_wait<0>();
        l3k_pin(dq);
        l3k_pin(dv);
        l3k_pin(dk);
        l3k_pin(pp);
        l3k_pin(dsp);
        /* Stage st (Q, dO, LSE, D) is no longer read. Every thread arrives for its own LSE/D reads:
         * with one arrival per warp after __syncwarp, racecheck reported the producer's next cp.async
         * into the stage as a WAR hazard on those reads (1024 reports); with these, 0 hazards. */
        l3k_mbar_arrive(emptyQ + 8 * st);
        /* dq element (query 16wi + g + 8r, column dq_col0 + 8j + 2t + e) is dq[4j + 2r + e] */
        float *dqb = dqacc + ((b * H + h) * Sq + m0) * (int64_t)hd;
        if (m0 + ROWS_Q <= Sq && hd == HD) { /* a full block: CTA-uniform */
            const uint32_t sdQw = sdQ + (uint32_t)wg * DQ_TILE_BYTES;
            float *sdQg = reinterpret_cast<float *>(smem_gen + (sdQw - sK));
#pragma unroll
            for (int j = 0; j < 8; j++)
                *reinterpret_cast<float4 *>(sdQg + 4 * (128 * j + wl)) =
                    make_float4(dq[4 * j], dq[4 * j + 1], dq[4 * j + 2], dq[4 * j + 3]);
            l3k_fence_async_shared(); /* the stores -> the bulk copy's (async proxy) reads */
            l3k_warpgroup_sync(wg);
            if (wl == 0) {
                bulk_reduce_add_f32(dqb + (HD == 128 ? 4096 * wg : 0), sdQw, DQ_TILE_BYTES);
                bulk_commit();
            }
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const int row = 16 * wi + g + 8 * r, col = dq_col0 + 8 * j + 2 * t;
                    if (m0 + row < Sq && col < hd)
                        red_add_v2(dqb + (int64_t)row * hd + col, dq[4 * j + 2 * r], dq[4 * j + 2 * r + 1]);
                }
        }
    }
    if (wl == 0) bulk_wait_all();

    /* ---- epilogue: dK * scale, dV -> T, staged through the K and V tiles (all reads of them done) */
    consumers_sync();
#pragma unroll
    for (int j = 0; j < HD / 8; j++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const uint32_t o = l3k_sw128_tile_off(KEYS, krow0 + 8 * r, j) + 4 * t;
            *reinterpret_cast<uint32_t *>(smem_gen + o) =
                l3k_pack2<T>(dk[4 * j + 2 * r] * scale, dk[4 * j + 2 * r + 1] * scale);
            *reinterpret_cast<uint32_t *>(smem_gen + KT + o) =
                l3k_pack2<T>(dv[4 * j + 2 * r], dv[4 * j + 2 * r + 1]);
        }
    consumers_sync();
    T *dkg = static_cast<T *>(a.dk) + b * a.dk_stride[0] + hk * a.dk_stride[1] + n0 * a.dk_stride[2];
    T *dvg = static_cast<T *>(a.dv) + b * a.dv_stride[0] + hk * a.dv_stride[1] + n0 * a.dv_stride[2];
    constexpr int CH = HD / 8;
    for (int i = tid; i < KEYS * CH; i += CONSUMERS) {
        const int r = i / CH, ch = i % CH;
        if (n0 + r < Sk && ch * 8 < hd) {
            const uint32_t o = l3k_sw128_tile_off(KEYS, r, ch);
            *reinterpret_cast<uint4 *>(dkg + (int64_t)r * a.dk_stride[2] + ch * 8) =
                *reinterpret_cast<const uint4 *>(smem_gen + o);
            *reinterpret_cast<uint4 *>(dvg + (int64_t)r * a.dv_stride[2] + ch * 8) =
                *reinterpret_cast<const uint4 *>(smem_gen + KT + o);
        }
    }
#endif /* L3K_HAVE_WGMMA */
}

/* ---- host side ----------------------------------------------------------- */
template <typename T, int HD>
cudaError_t launch(const l3k_attn_bwd_args &a, const float *dsum, float *dqacc, cudaStream_t s) {
    auto kern = fa_bwd_sm90_kernel<T, HD>;
    /* K, V, 2 Q, 2 dO tiles, 2 dS^T, LSE/D stages, dQ staging, barriers, alignment slack */
    constexpr size_t smem = 2 * (size_t)KEYS * HD * 2 + 4 * (size_t)ROWS_Q * HD * 2 +
                            2 * (size_t)KEYS * ROWS_Q * 2 + 4 * ROWS_Q * sizeof(float) +
                            2 * (size_t)DQ_TILE_BYTES + 64 + 1024;
    static l3k_sm90a_cache cache;
    const cudaError_t e = l3k_sm90a_prepare(kern, smem, cache, nullptr);
    if (e != cudaSuccess) return e;
    const l3k_attn_fwd_args &f = a.f;
    const bool bf16 = f.dtype == L3K_DT_BF16;
    CUtensorMap tq, tdo, tk, tv;
    if (l3k_tma_map_bhsd(&tq, f.q, bf16, f.head_dim, f.seq_q, f.n_heads, f.batch, f.q_stride, ROWS_Q) !=
            cudaSuccess ||
        l3k_tma_map_bhsd(&tdo, a.dout, bf16, f.head_dim, f.seq_q, f.n_heads, f.batch, a.do_stride, ROWS_Q) !=
            cudaSuccess ||
        l3k_tma_map_bhsd(&tk, f.k, bf16, f.head_dim, f.seq_k, f.n_kv_heads, f.batch, f.k_stride, KEYS) !=
            cudaSuccess ||
        l3k_tma_map_bhsd(&tv, f.v, bf16, f.head_dim, f.seq_k, f.n_kv_heads, f.batch, f.v_stride, KEYS) !=
            cudaSuccess)
        return cudaErrorNotSupported; /* strides TMA cannot take, or no encoder: the mma.sync kernel runs */
    dim3 grid((unsigned)(f.batch * f.n_kv_heads), (unsigned)((f.seq_k + KEYS - 1) / KEYS));
    kern<<<grid, THREADS, smem, s>>>(a, dsum, dqacc, tq, tdo, tk, tv);
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const l3k_attn_bwd_args &a, const float *dsum, float *dqacc, cudaStream_t s) {
    if (a.f.head_dim <= 64) return launch<T, 64>(a, dsum, dqacc, s);
    return launch<T, 128>(a, dsum, dqacc, s);
}

} // namespace

/* The backward main kernel on wgmma (see the file comment) when this GPU and build have it,
 * head_dim <= 128 and deterministic == 0; otherwise cudaErrorNotSupported, nothing launched. */
extern "C" int l3k_cuda_attn_bwd_main_sm90(const l3k_attn_bwd_args *a, const float *dsum, float *dqacc,
                                           void *stream) {
    if (a->deterministic || dqacc == nullptr || a->f.head_dim > 128 ||
        (a->f.dtype != L3K_DT_BF16 && a->f.dtype != L3K_DT_F16))
        return (int)cudaErrorNotSupported;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (a->f.dtype == L3K_DT_BF16) return (int)dispatch<__nv_bfloat16>(*a, dsum, dqacc, s);
    return (int)dispatch<__half>(*a, dsum, dqacc, s);
}
