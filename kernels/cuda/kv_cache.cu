/* KV cache on CUDA: appending rotated keys and values (kv_append), and decode attention of a few
 * queries over the cache, split-KV (decode_mma or decode_split, then decode_combine).  Contract
 * in kernels/kv_cache.h; kernels/cpu/kv_cache.c is the reference.
 *
 * kv_append: one thread per 8 elements of one row (a head of a token): 4 RoPE pairs of a q or k
 * row, or 8 values of a v row.  A token's rows are the query heads, then the kv heads' k, then
 * their v, so one launch covers all three.  A block holds 256 threads: several tokens when a
 * token has fewer than 256 items, else gridDim.y cuts a token's items; gridDim.x strides over
 * the tokens, so a prefill of thousands of tokens runs in parallel like a decode step.
 *
 * Decode attention: a CTA of 4 warps takes up to 16 query rows of one kv head (row r of the kv
 * head = query i * G + head g: the G heads of one query are adjacent, so a CTA's rows span few
 * query positions and its causal limit is tight) and one piece of the sequence's key range
 * (blockIdx.y of l3k_decode_attn_splits pieces), streamed through a cp.async ring (zero-filled
 * past the piece), K and V read once for all the CTA's rows.
 *
 * decode_mma (float16 and bfloat16, head_dim 64 or 128: the decode shapes; unless the
 * environment sets L3K_DECODE_MMA=0, see decode_mma_enabled) does the products on tensor cores,
 * see its comment.  decode_split (everything else) on CUDA cores, for
 * NR = 4, 8 or 16 rows, tiles of TK = 32 keys:
 *   QK: lane = key, warp = a quarter of head_dim's 8-column chunks (interleaved): every thread
 *       dots its key with all NR rows over its chunks; q (float32) is read from shared memory
 *       as warp-wide broadcasts, K rows are padded to an odd number of 16-byte chunks so the
 *       32 lanes' 16-byte reads of 32 rows hit distinct banks.  The 4 partial dots go to smem.
 *   softmax: warp w owns rows w, w + 4, ...; lane = key; it masks, scales, updates the row's
 *       running max and sum (log2 domain) and writes p and the rescale factor to smem.
 *   PV: warp = (block of 4 rows, subset of the tile's keys), lane = CW adjacent columns (CPL
 *       times): o += p v for its 4 rows.  The warps of one row block sum their accumulators at
 *       the end (every warp rescaled by the same CTA-wide running max, so the sum is exact).
 * On CUDA cores this is bound by instruction issue (about 600 instructions a warp per 32 keys,
 * 2 or 3 CTAs an SM), near 60% of the H100's copy bandwidth for bf16 D 128: hence decode_mma.
 *
 * With one split the CTA writes o; with several it writes float32 partials to the workspace and
 * decode_combine (one CTA per (b, h, i) row) merges them.
 *
 * Workspace (splits S > 1, R = B * H * seq_q rows, row index (b * H + h) * seq_q + i):
 *   float o[R][S][D]: each split's o, unnormalized (relative to its own max);
 *   float2 ml[R][S] from float offset S * R * D: the split's (max, sum), the max in log2 units
 *   (scale * log2(e) * <q, k>), (-inf, 0) for a split that saw no key of the row.
 * S * R * (D + 2) * 4 bytes: l3k_decode_attn_workspace_bytes before its rounding. */
#include <math.h>
#include <stdlib.h>

#include "common.cuh"
#include "kv_cache.h"
#include "mma.cuh" /* l3k_smem_prepare */

namespace {

/* N elements of T at p (N * sizeof(T) bytes, aligned to that size or to 16) as floats, with the
 * widest loads the size allows. */
template <typename T, int N>
__device__ __forceinline__ void ld_vec(const T *p, float (&f)[N]) {
    constexpr int BYTES = N * (int)sizeof(T);
    static_assert(BYTES == 4 || BYTES == 8 || BYTES % 16 == 0, "ld_vec: 4, 8 or 16k bytes");
    if constexpr (BYTES % 16 == 0) {
        constexpr int PER = 16 / (int)sizeof(T);
#pragma unroll
        for (int v = 0; v < BYTES / 16; ++v) {
            const uint4 u = reinterpret_cast<const uint4 *>(p)[v];
            const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
            for (int k = 0; k < PER; ++k) f[v * PER + k] = l3k_to_float(e[k]);
        }
    } else if constexpr (BYTES == 8) {
        const uint2 u = *reinterpret_cast<const uint2 *>(p);
        const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
        for (int k = 0; k < N; ++k) f[k] = l3k_to_float(e[k]);
    } else {
        const uint32_t u = *reinterpret_cast<const uint32_t *>(p);
        const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
        for (int k = 0; k < N; ++k) f[k] = l3k_to_float(e[k]);
    }
}

/* N floats rounded once to T and stored at p (alignment as for ld_vec). */
template <typename T, int N>
__device__ __forceinline__ void st_vec(T *p, const float (&f)[N]) {
    constexpr int BYTES = N * (int)sizeof(T);
    static_assert(BYTES == 8 || BYTES % 16 == 0, "st_vec: 8 or 16k bytes");
    if constexpr (BYTES % 16 == 0) {
        constexpr int PER = 16 / (int)sizeof(T);
#pragma unroll
        for (int v = 0; v < BYTES / 16; ++v) {
            uint4 u;
            T *e = reinterpret_cast<T *>(&u);
#pragma unroll
            for (int k = 0; k < PER; ++k) e[k] = l3k_from_float<T>(f[v * PER + k]);
            reinterpret_cast<uint4 *>(p)[v] = u;
        }
    } else {
        uint2 u;
        T *e = reinterpret_cast<T *>(&u);
#pragma unroll
        for (int k = 0; k < N; ++k) e[k] = l3k_from_float<T>(f[k]);
        *reinterpret_cast<uint2 *>(p) = u;
    }
}

/* ---- append ----------------------------------------------------------------- */

constexpr int APP_THREADS = 256;

struct app_geom {
    int64_t tokens;     /* batch * seq */
    int64_t tok_blocks; /* ceil(tokens / tpb) */
    int ipt;            /* items a token: (n_heads + 2 * n_kv_heads) * P */
    int span;           /* threads of a block on one token: min(ipt, APP_THREADS) */
    int tpb;            /* tokens a block */
    int P;              /* items a row: head_dim / 8 */
};

/* Pairs 4t .. 4t + 3 of one row, read from src (all four pairs before any write: src may be dst),
 * rotated by the table rows c_row, s_row (NULL: the position is outside the tables, NaN out).
 * Rotate-half: x1 at 4t, x2 at half + 4t, 4 elements each (8 or 16 bytes, aligned since half is
 * a multiple of 4); interleaved: the 8 elements from 8t. */
template <typename T, typename C, bool INTER>
__device__ __forceinline__ void rotate4(const T *src, T *dst, int t, int64_t half, const C *c_row,
                                        const C *s_row) {
    float x1[4], x2[4];
    if (INTER) {
        float x[8];
        ld_vec<T, 8>(src + 8 * t, x);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            x1[p] = x[2 * p];
            x2[p] = x[2 * p + 1];
        }
    } else {
        ld_vec<T, 4>(src + 4 * t, x1);
        ld_vec<T, 4>(src + half + 4 * t, x2);
    }
    /* The table rows start at row * half elements: only 2- or 4-byte aligned in general, and a
     * thread needs 4 values of each: scalar loads. */
    float c[4], s[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        c[p] = c_row ? l3k_to_float(__ldg(c_row + 4 * t + p)) : NAN;
        s[p] = s_row ? l3k_to_float(__ldg(s_row + 4 * t + p)) : NAN;
    }
    float y1[4], y2[4];
    /* Products and sum rounded separately (no FMA contraction), as the CPU reference computes
     * them: the same float32 result, so the same rounding to the dtype. */
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        y1[p] = __fsub_rn(__fmul_rn(x1[p], c[p]), __fmul_rn(x2[p], s[p]));
        y2[p] = __fadd_rn(__fmul_rn(x2[p], c[p]), __fmul_rn(x1[p], s[p]));
    }
    if (INTER) {
        float y[8];
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            y[2 * p] = y1[p];
            y[2 * p + 1] = y2[p];
        }
        st_vec<T, 8>(dst + 8 * t, y);
    } else {
        st_vec<T, 4>(dst + 4 * t, y1);
        st_vec<T, 4>(dst + half + 4 * t, y2);
    }
}

template <typename T, typename C, bool INTER>
__global__ void __launch_bounds__(APP_THREADS) kv_append(const l3k_kv_append_args a, const app_geom g) {
    const int sub = threadIdx.x / g.span;
    const int item = blockIdx.y * g.span + (threadIdx.x - sub * g.span);
    if (sub >= g.tpb || item >= g.ipt) return;
    const int row = item / g.P, t = item - row * g.P;
    const int64_t half = a.head_dim / 2, nq = a.n_heads, hkv = a.n_kv_heads;
    for (int64_t tb = blockIdx.x; tb < g.tok_blocks; tb += gridDim.x) {
        const int64_t tok = tb * g.tpb + sub;
        if (tok >= g.tokens) break; /* tok grows with tb */
        int64_t b, i;
        if (g.tokens <= INT_MAX) { /* 32-bit division where it fits */
            const int tk = (int)tok, sq = (int)a.seq, bi = tk / sq;
            b = bi;
            i = tk - bi * sq;
        } else {
            b = tok / a.seq;
            i = tok - b * a.seq;
        }
        int64_t start, end;
        l3k_attn_keys(a.cache_range, b, a.capacity, start, end);
        const int64_t slot = end - a.seq + i; /* < capacity always */
        if (row < nq + hkv) {
            const bool is_q = row < nq;
            if (!is_q && slot < 0) continue;
            const int64_t trow = i + (a.positions ? (int64_t)__ldg(a.positions + b) : 0);
            const C *c_row = nullptr, *s_row = nullptr;
            if (trow >= 0 && trow < a.table_rows) {
                const int64_t off = b * a.table_batch_stride + trow * half;
                c_row = (const C *)a.cos + off;
                s_row = (const C *)a.sin + off;
            }
            if (is_q) {
                const T *src = (const T *)a.q + (b * a.q_stride[0] + row * a.q_stride[1] + i * a.q_stride[2]);
                T *dst = (T *)a.q_out +
                         (b * a.q_out_stride[0] + row * a.q_out_stride[1] + i * a.q_out_stride[2]);
                rotate4<T, C, INTER>(src, dst, t, half, c_row, s_row);
            } else {
                const int64_t h = row - nq;
                const T *src = (const T *)a.k + (b * a.k_stride[0] + h * a.k_stride[1] + i * a.k_stride[2]);
                T *dst = (T *)a.k_cache + (b * a.kc_stride[0] + h * a.kc_stride[1] + slot * a.kc_stride[2]);
                rotate4<T, C, INTER>(src, dst, t, half, c_row, s_row);
            }
        } else {
            if (slot < 0) continue;
            const int64_t h = row - nq - hkv;
            /* v is copied bit for bit: 8 elements, one or two 16-byte moves */
            const uint4 *src = reinterpret_cast<const uint4 *>(
                (const T *)a.v + (b * a.v_stride[0] + h * a.v_stride[1] + i * a.v_stride[2]) + 8 * t);
            uint4 *dst = reinterpret_cast<uint4 *>(
                (T *)a.v_cache + (b * a.vc_stride[0] + h * a.vc_stride[1] + slot * a.vc_stride[2]) + 8 * t);
#pragma unroll
            for (int u = 0; u < (int)sizeof(T) / 2; ++u) dst[u] = src[u];
        }
    }
}

template <typename T, typename C>
int launch_append(const l3k_kv_append_args &a, cudaStream_t st) {
    app_geom g;
    g.P = (int)(a.head_dim / 8);
    const int64_t ipt = (a.n_heads + 2 * a.n_kv_heads) * (int64_t)g.P;
    const int64_t gy = ipt <= APP_THREADS ? 1 : (ipt + APP_THREADS - 1) / APP_THREADS;
    if (gy > 65535) return (int)cudaErrorInvalidConfiguration;
    g.ipt = (int)ipt;
    g.span = ipt < APP_THREADS ? (int)ipt : APP_THREADS;
    g.tpb = APP_THREADS / g.span;
    g.tokens = a.batch * a.seq;
    g.tok_blocks = (g.tokens + g.tpb - 1) / g.tpb;
    const unsigned gx = (unsigned)l3k_clamp64(g.tok_blocks, 1, INT_MAX);
    const dim3 grid(gx, (unsigned)gy);
    if (a.interleaved) kv_append<T, C, true><<<grid, APP_THREADS, 0, st>>>(a, g);
    else kv_append<T, C, false><<<grid, APP_THREADS, 0, st>>>(a, g);
    return (int)cudaGetLastError();
}

/* ---- decode attention ----------------------------------------------------------- */

constexpr int DEC_THREADS = 128, DEC_WARPS = DEC_THREADS / 32;
/* QK: the warps are DP parts of head_dim's 8-column chunks times KH groups of 32 keys (one a
 * lane): a tile holds TK = 32 KH keys. */
constexpr int DP = 4, KH = DEC_WARPS / DP, TK = 32 * KH;
static_assert(DEC_WARPS % DP == 0, "warps: a multiple of DP");

/* PV columns: a lane owns CW adjacent columns, CPL times (32 * CW apart); STAGES tiles in the
 * cp.async ring: 3 where a row is at most 256 bytes (2 tiles in flight while one is used; 3 and
 * 4 measured alike for bf16 D 128, and 3 leaves room for three CTAs an SM), else 2 (the ring is
 * as large already). */
template <typename T, int DMAX>
struct dec_cfg {
    static constexpr int CW = DMAX <= 64 ? 2 : 4;
    static constexpr int CPL = (DMAX + 32 * CW - 1) / (32 * CW);
    static constexpr int STAGES = sizeof(T) * DMAX <= 256 ? 3 : 2;
};

/* Byte offsets of the dynamic shared memory of decode_split, all multiples of 16:
 *   [0, q)       the K/V ring: STAGES x (K tile, V tile), TK rows of row_bytes each; after the
 *                key loop, the float32 partial accumulators of the warps (KSUB x NR x D floats,
 *                16 x D x 4 bytes <= the ring)
 *   [q, s)       q of the NR rows, float32, NR x D
 *   [s, p)       QK partial dots, DP x NR x TK floats
 *   [p, alpha)   p of the tile, NR x TK floats
 *   [alpha, ml)  the rescale factor of each row for the tile, NR floats
 *   [ml, total)  each row's final (max, sum), NR x 2 floats
 * row_bytes: D * sizeof(T) rounded up to an odd number of 16-byte chunks, so that QK's lanes,
 * each reading its own key's row at the same column, spread over all banks. */
struct dec_smem {
    int row_bytes, stage_bytes, q, s, p, alpha, ml, total;
};

__host__ __device__ constexpr dec_smem dec_layout(int D, int es, int NR, int stages) {
    dec_smem L{};
    L.row_bytes = ((D * es / 16) | 1) * 16;
    L.stage_bytes = 2 * TK * L.row_bytes;
    L.q = stages * L.stage_bytes;
    L.s = L.q + NR * D * 4;
    L.p = L.s + DP * NR * TK * 4;
    L.alpha = L.p + NR * TK * 4;
    L.ml = L.alpha + NR * 4;
    L.total = L.ml + NR * 2 * 4;
    return L;
}

/* CTAs an H100 SM holds by shared memory (228 KB, 1 KB reserved a CTA) at D = DMAX, at most 3:
 * the launch bound that tells ptxas how many registers it may use without costing occupancy. */
template <typename T, int NR, int DMAX>
constexpr int dec_min_blocks() {
    const int per = dec_layout(DMAX, (int)sizeof(T), NR, dec_cfg<T, DMAX>::STAGES).total + 1024;
    const int n = 233472 / per;
    return n < 1 ? 1 : (n > 3 ? 3 : n);
}

struct dec_geom {
    int64_t G;       /* query heads a kv head */
    int64_t rows_kv; /* G * seq_q: query rows a kv head */
    int64_t groups;  /* ceil(rows_kv / NR) */
    int64_t bhk;     /* batch * n_kv_heads */
    int64_t ws_ml;   /* float offset of the (max, sum) pairs in the workspace */
    int splits, D;
};

/* A thread's part of the tile loads: 16-byte chunk `ch` of the keys krow0, krow0 + kstep, ...
 * (kstep = DEC_THREADS / chunks-a-row keys a pass: every thread of a pass on a distinct chunk,
 * consecutive threads on consecutive chunks of a row).  The global offsets are set up once per
 * CTA row group, so a tile's loads cost a 64-bit add and a compare each. */
struct tile_loader {
    const char *k, *v;      /* the thread's chunk of slot krow0 of this kv head */
    uint32_t vofs;          /* bytes from a ring slot's K tile to its V tile */
    const char *k0, *v0;    /* slot 0 of the head: an address that exists, for zero-fills */
    int64_t k_key, v_key;   /* bytes between consecutive slots */
    int64_t k_step, v_step; /* bytes between the keys of two passes */
    uint32_t smem;          /* the chunk's offset in a ring slot */
    int krow0, kstep, passes;
};

/* TKEYS keys a tile; SWZ: the chunk index XORed with the row's low 3 bits (l3k_sw, rows of at
 * least 64 16-bit columns, kstep a multiple of 8 so that a thread's rows share those bits). */
template <typename T, int TKEYS, bool SWZ>
__device__ __forceinline__ tile_loader make_loader(const T *kg, const T *vg, int64_t ks, int64_t vs, int D,
                                                   int row_bytes, int tid) {
    constexpr int E16 = 16 / (int)sizeof(T);
    const int m16 = D / E16; /* chunks a row: 1 .. 64 */
    tile_loader t;
    t.kstep = DEC_THREADS / m16;
    t.krow0 = tid / m16;
    const int ch = tid - t.krow0 * m16;
    /* threads past kstep * m16 (m16 not a power of two) take no chunk */
    t.passes = t.krow0 < t.kstep ? (TKEYS - t.krow0 + t.kstep - 1) / t.kstep : 0;
    t.vofs = (uint32_t)(TKEYS * row_bytes);
    t.k0 = (const char *)kg;
    t.v0 = (const char *)vg;
    t.k_key = ks * (int64_t)sizeof(T);
    t.v_key = vs * (int64_t)sizeof(T);
    t.k = t.k0 + (int64_t)t.krow0 * t.k_key + ch * 16;
    t.v = t.v0 + (int64_t)t.krow0 * t.v_key + ch * 16;
    t.k_step = t.k_key * t.kstep;
    t.v_step = t.v_key * t.kstep;
    t.smem = (uint32_t)(t.krow0 * row_bytes + (SWZ ? ch ^ (t.krow0 & 7) : ch) * 16);
    return t;
}

/* One pass's pair of copies; keys past `keys` (the piece's end, relative to the tile) are
 * zero-filled without a read: a zero V times p = 0 adds nothing, where stale shared memory
 * could hold a NaN. */
__device__ __forceinline__ void load_pass(const tile_loader &t, uint32_t d, const char *kp, const char *vp,
                                          bool ok) {
    l3k_cp_async16(d, ok ? kp : t.k0, ok);
    l3k_cp_async16(d + t.vofs, ok ? vp : t.v0, ok);
}

/* The tile's keys from slot j0 into the ring slot at dst (K tile, then V tile), of which the first
 * `keys` are in the piece.  PASSES: the passes of every thread when known at compile time
 * (chunks a row a power of two), else 0: t.passes. */
template <int PASSES>
__device__ __forceinline__ void load_tile(const tile_loader &t, uint32_t dst, int64_t j0, int keys,
                                          int row_bytes) {
    const char *kp = t.k + j0 * t.k_key;
    const char *vp = t.v + j0 * t.v_key;
    uint32_t d = dst + t.smem;
    const uint32_t dstep = (uint32_t)(t.kstep * row_bytes);
    if constexpr (PASSES > 0) {
#pragma unroll
        for (int u = 0; u < PASSES; ++u) {
            load_pass(t, d, kp, vp, t.krow0 + u * t.kstep < keys);
            kp += t.k_step;
            vp += t.v_step;
            d += dstep;
        }
    } else {
        for (int u = 0; u < t.passes; ++u) {
            load_pass(t, d, kp, vp, t.krow0 + u * t.kstep < keys);
            kp += t.k_step;
            vp += t.v_step;
            d += dstep;
        }
    }
}

template <int U>
__device__ __forceinline__ float f4_at(const float4 &v) {
    return U == 0 ? v.x : U == 1 ? v.y : U == 2 ? v.z : v.w;
}

/* o += p v for one warp: its 4 rows (p rows at prow, TK apart) and keys [k0, k0 + KPW) of the
 * tile whose V rows are at vst.  MASKED: key kk counts for row rr only when kk <= lim[rr]; the
 * product is then skipped, not multiplied by p = 0, so a NaN in a key the row does not see
 * cannot reach it. */
template <typename T, int CW, int CPL, int KPW, bool MASKED>
__device__ __forceinline__ void pv_tile(float (&acc)[4][CPL * CW], const unsigned char *vst, int row_bytes,
                                        const float *prow, int k0, const int (&lim)[4], int lane, int D) {
#pragma unroll
    for (int kk = 0; kk < KPW; kk += 4) {
        float4 p4[4];
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) p4[rr] = *reinterpret_cast<const float4 *>(prow + rr * TK + k0 + kk);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int key = k0 + kk + u;
            const T *vrow = reinterpret_cast<const T *>(vst + key * row_bytes);
#pragma unroll
            for (int cp = 0; cp < CPL; ++cp) {
                const int col = (cp * 32 + lane) * CW;
                if (col < D) {
                    float vf[CW];
                    ld_vec<T, CW>(vrow + col, vf);
#pragma unroll
                    for (int rr = 0; rr < 4; ++rr) {
                        const float pu = u == 0   ? f4_at<0>(p4[rr])
                                         : u == 1 ? f4_at<1>(p4[rr])
                                         : u == 2 ? f4_at<2>(p4[rr])
                                                  : f4_at<3>(p4[rr]);
                        const bool take = !MASKED || key <= lim[rr];
#pragma unroll
                        for (int e = 0; e < CW; ++e) {
                            float &x = acc[rr][cp * CW + e];
                            const float y = fmaf(pu, vf[e], x);
                            x = take ? y : x;
                        }
                    }
                }
            }
        }
    }
}

/* One CTA: NR query rows (group grp of kv head hk of sequence b) over piece blockIdx.y of the
 * sequence's keys.  EXACT: D == DMAX (64 or 128) known at compile time; else D = g.D <= DMAX. */
template <typename T, int NR, int DMAX, bool EXACT>
__global__ void __launch_bounds__(DEC_THREADS, (dec_min_blocks<T, NR, DMAX>()))
    decode_split(const l3k_decode_attn_args a, const dec_geom g) {
    typedef dec_cfg<T, DMAX> cfg;
    constexpr int STAGES = cfg::STAGES, CW = cfg::CW, CPL = cfg::CPL, ES = (int)sizeof(T);
    constexpr int RB = NR / 4;                              /* row blocks of 4 (PV) */
    constexpr int KSUB = DEC_WARPS / RB;                    /* key subsets a row block is cut into (PV) */
    constexpr int KPW = TK / KSUB;                          /* keys a warp in PV */
    constexpr int SROWS = (NR + DEC_WARPS - 1) / DEC_WARPS; /* rows a warp in softmax */
    constexpr int QKU = (DMAX / 8 + DP - 1) / DP;           /* 8-column chunks a warp in QK */
    /* chunks a row a power of two (EXACT: D 64 or 128): every thread makes the same passes */
    constexpr int PASSES = EXACT ? TK * (DMAX * ES / 16) / DEC_THREADS : 0;
    static_assert(NR % 4 == 0 && NR >= 4 && NR <= 16, "NR: 4, 8 or 16");
    const int D = EXACT ? DMAX : g.D;
    const int DC = D / 8;
    const dec_smem L = dec_layout(D, ES, NR, STAGES);

    extern __shared__ __align__(128) unsigned char smem[];
    float *q_s = reinterpret_cast<float *>(smem + L.q);
    float *s_s = reinterpret_cast<float *>(smem + L.s);
    float *p_s = reinterpret_cast<float *>(smem + L.p);
    float *alpha_s = reinterpret_cast<float *>(smem + L.alpha);
    float *ml_s = reinterpret_cast<float *>(smem + L.ml);
    float *red_s = reinterpret_cast<float *>(smem); /* over the ring, after the key loop */
    const uint32_t ring = l3k_smem_u32(smem);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int rb = warp % RB, kset = warp / RB;
    const int dq = warp % DP, qkey = (warp / DP) * 32 + lane; /* QK: the warp's part, the lane's key */
    const int64_t split = blockIdx.y;
    const float scale2 = a.scale * L3K_LOG2E; /* scores in log2 units: exp2 below */

    for (int64_t bh = blockIdx.x; bh < g.bhk; bh += gridDim.x)
        for (int64_t grp = blockIdx.z; grp < g.groups; grp += gridDim.z) {
            const int64_t b = bh / a.n_kv_heads, hk = bh - b * a.n_kv_heads;
            int64_t kb, ke; /* [start', end') */
            l3k_attn_keys(a.cache_range, b, a.capacity, kb, ke);
            const int64_t r0 = grp * NR;
            const int nrows = (int)(g.rows_kv - r0 < NR ? g.rows_kv - r0 : NR);
            const int64_t qbase = ke - a.seq_q; /* slot of query 0; query i sees keys [kb, qbase + i] */
            const int64_t p_lo = qbase + r0 / g.G, p_hi = qbase + (r0 + nrows - 1) / g.G;
            /* This CTA's piece [lo, hi), cut down to the keys its last query can see. */
            const int64_t piece = (ke - kb + g.splits - 1) / g.splits;
            const int64_t lo = kb + split * piece;
            int64_t hi = lo + piece < ke ? lo + piece : ke;
            hi = hi < p_hi + 1 ? hi : p_hi + 1;
            const int64_t ntiles = hi > lo ? (hi - lo + TK - 1) / TK : 0;

            const tile_loader ld =
                make_loader<T, TK, false>((const T *)a.k_cache + (b * a.k_stride[0] + hk * a.k_stride[1]),
                                          (const T *)a.v_cache + (b * a.v_stride[0] + hk * a.v_stride[1]),
                                          a.k_stride[2], a.v_stride[2], D, L.row_bytes, tid);
            /* The ring's first tiles go out before q is read: their latency covers the q loads. */
#pragma unroll
            for (int s = 0; s < STAGES - 1; ++s) {
                if (s < ntiles) {
                    const int64_t j0 = lo + s * TK;
                    load_tile<PASSES>(ld, ring + s * L.stage_bytes, j0, hi - j0 < TK ? (int)(hi - j0) : TK,
                                      L.row_bytes);
                }
                l3k_cp_async_commit();
            }

            /* q of the rows, float32; zeros for the rows past nrows (never written out). */
            for (int idx = tid; idx < NR * DC; idx += DEC_THREADS) {
                const int r = idx / DC, c = idx - r * DC;
                float v[8];
                if (r < nrows) {
                    const int64_t rr = r0 + r, i = rr / g.G, h = hk * g.G + (rr - i * g.G);
                    const T *qrow = (const T *)a.q +
                                    (b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2]);
                    l3k_load8<T, true>(qrow, (int64_t)c * 8, D, v);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) v[e] = 0.0f;
                }
                float4 *dst = reinterpret_cast<float4 *>(q_s + r * D + c * 8);
                dst[0] = make_float4(v[0], v[1], v[2], v[3]);
                dst[1] = make_float4(v[4], v[5], v[6], v[7]);
            }

            /* Softmax state of this warp's rows (r = warp + 4k), and the last key each row sees
             * (-1 for padding rows: they see nothing). */
            float m_run[SROWS], l_run[SROWS];
            int64_t plast[SROWS];
#pragma unroll
            for (int k = 0; k < SROWS; ++k) {
                const int r = warp + DEC_WARPS * k; /* >= NR: a warp without a row (NR < warps) */
                m_run[k] = -INFINITY;
                l_run[k] = 0.0f;
                plast[k] = r < nrows ? qbase + (r0 + r) / g.G : -1;
            }
            /* PV: rows rb * 4 + rr, their last keys, the accumulators. */
            int64_t pv_last[4];
            float acc[4][CPL * CW];
#pragma unroll
            for (int rr = 0; rr < 4; ++rr) {
                const int r = rb * 4 + rr;
                pv_last[rr] = r < nrows ? qbase + (r0 + r) / g.G : -1;
#pragma unroll
                for (int e = 0; e < CPL * CW; ++e) acc[rr][e] = 0.0f;
            }

            int stage = 0;
            for (int64_t t = 0; t < ntiles; ++t) {
                l3k_cp_async_wait<STAGES - 2>(); /* this thread's copies of tile t have landed */
                __syncthreads(); /* everyone's have; and everyone is done with tile t - 1's slot */
                {
                    const int64_t tn = t + STAGES - 1;
                    const int sn = stage == 0 ? STAGES - 1 : stage - 1; /* (t - 1) % STAGES */
                    if (tn < ntiles) {
                        const int64_t jn = lo + tn * TK;
                        load_tile<PASSES>(ld, ring + sn * L.stage_bytes, jn,
                                          hi - jn < TK ? (int)(hi - jn) : TK, L.row_bytes);
                    }
                    l3k_cp_async_commit(); /* an empty group past the end keeps the count uniform */
                }
                const unsigned char *kst = smem + stage * L.stage_bytes;
                const unsigned char *vst = kst + TK * L.row_bytes;
                const int64_t j0 = lo + t * TK;

                /* QK: key qkey, this warp's chunks c = dq, dq + DP, ... */
                {
                    const T *krow = reinterpret_cast<const T *>(kst + qkey * L.row_bytes);
                    float sc[NR];
#pragma unroll
                    for (int r = 0; r < NR; ++r) sc[r] = 0.0f;
#pragma unroll
                    for (int u = 0; u < QKU; ++u) {
                        const int c = u * DP + dq;
                        if (c < DC) {
                            float kf[8];
                            ld_vec<T, 8>(krow + c * 8, kf);
#pragma unroll
                            for (int r = 0; r < NR; ++r) {
                                const float4 qa = *reinterpret_cast<const float4 *>(q_s + r * D + c * 8);
                                const float4 qb = *reinterpret_cast<const float4 *>(q_s + r * D + c * 8 + 4);
                                float x = sc[r];
                                x = fmaf(qa.x, kf[0], x);
                                x = fmaf(qa.y, kf[1], x);
                                x = fmaf(qa.z, kf[2], x);
                                x = fmaf(qa.w, kf[3], x);
                                x = fmaf(qb.x, kf[4], x);
                                x = fmaf(qb.y, kf[5], x);
                                x = fmaf(qb.z, kf[6], x);
                                x = fmaf(qb.w, kf[7], x);
                                sc[r] = x;
                            }
                        }
                    }
#pragma unroll
                    for (int r = 0; r < NR; ++r) s_s[(dq * NR + r) * TK + qkey] = sc[r];
                }
                __syncthreads();

                /* Softmax: lane = keys lane + 32 u.  Masked keys get p = 0 without an exp; the row's
                 * max skips NaN scores (fmaxf), but a NaN score's p is NaN, and so is the row's sum. */
#pragma unroll
                for (int k = 0; k < SROWS; ++k) {
                    const int r = warp + DEC_WARPS * k;
                    if (r >= NR) break; /* warp-uniform */
                    float x[KH];
                    bool vis[KH];
                    float tmax = -INFINITY;
#pragma unroll
                    for (int u = 0; u < KH; ++u) {
                        const int kk = lane + 32 * u;
                        float d = 0.0f;
#pragma unroll
                        for (int w = 0; w < DP; ++w) d += s_s[(w * NR + r) * TK + kk];
                        const int64_t j = j0 + kk;
                        vis[u] = j < hi && j <= plast[k];
                        x[u] = vis[u] ? d * scale2 : -INFINITY;
                        tmax = fmaxf(tmax, x[u]);
                    }
#pragma unroll
                    for (int off = 16; off > 0; off /= 2)
                        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
                    const float mn = fmaxf(m_run[k], tmax);
                    /* mn == -inf: nothing (finite) seen yet; exp2(x - 0) keeps -inf scores at 0
                     * and a row that only ever saw -inf scores ends with sum 0, made NaN below */
                    const float mu = mn == -INFINITY ? 0.0f : mn;
                    float psum = 0.0f;
#pragma unroll
                    for (int u = 0; u < KH; ++u) {
                        const float pr = vis[u] ? l3k_ex2(x[u] - mu) : 0.0f;
                        psum += pr;
                        p_s[r * TK + lane + 32 * u] = pr;
                    }
                    const float al = l3k_ex2(m_run[k] - mu); /* 0 while m_run is -inf */
                    l_run[k] = l_run[k] * al + l3k_subwarp_sum(psum, 32);
                    m_run[k] = mn;
                    if (lane == 0) alpha_s[r] = al;
                }
                __syncthreads();

                /* PV: rescale, then this warp's keys.  A tile needs the per-row test only where a
                 * key in it is past the first row's last key: keys past hi are zeros, p = 0. */
                {
#pragma unroll
                    for (int rr = 0; rr < 4; ++rr) {
                        const float f = alpha_s[rb * 4 + rr];
#pragma unroll
                        for (int e = 0; e < CPL * CW; ++e) acc[rr][e] *= f;
                    }
                    const float *prow = p_s + rb * 4 * TK;
                    int lim[4];
                    if (j0 + TK - 1 > p_lo) {
#pragma unroll
                        for (int rr = 0; rr < 4; ++rr) {
                            const int64_t d = pv_last[rr] - j0;
                            lim[rr] = d < -1 ? -1 : (d > TK ? TK : (int)d);
                        }
                        pv_tile<T, CW, CPL, KPW, true>(acc, vst, L.row_bytes, prow, kset * KPW, lim, lane, D);
                    } else {
#pragma unroll
                        for (int rr = 0; rr < 4; ++rr) lim[rr] = TK;
                        pv_tile<T, CW, CPL, KPW, false>(acc, vst, L.row_bytes, prow, kset * KPW, lim, lane,
                                                        D);
                    }
                }
                stage = stage == STAGES - 1 ? 0 : stage + 1;
            }

            l3k_cp_async_wait<0>(); /* only empty groups can be left; the ring becomes red_s */
            __syncthreads();
#pragma unroll
            for (int rr = 0; rr < 4; ++rr)
#pragma unroll
                for (int cp = 0; cp < CPL; ++cp) {
                    const int col = (cp * 32 + lane) * CW;
                    if (col < D) {
                        float *dst = red_s + (kset * NR + rb * 4 + rr) * D + col;
#pragma unroll
                        for (int e = 0; e < CW; ++e) dst[e] = acc[rr][cp * CW + e];
                    }
                }
            if (lane == 0) {
#pragma unroll
                for (int k = 0; k < SROWS; ++k) {
                    const int r = warp + DEC_WARPS * k;
                    if (r >= NR) break;
                    ml_s[2 * r] = m_run[k];
                    ml_s[2 * r + 1] = l_run[k];
                }
            }
            __syncthreads();

            /* Out: each (row, 8 columns) sums the KSUB warps' accumulators. */
            for (int idx = tid; idx < nrows * DC; idx += DEC_THREADS) {
                const int r = idx / DC, c = idx - r * DC;
                float o[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) o[e] = 0.0f;
#pragma unroll
                for (int ks = 0; ks < KSUB; ++ks) {
                    const float4 *src = reinterpret_cast<const float4 *>(red_s + (ks * NR + r) * D + c * 8);
                    const float4 x = src[0], y = src[1];
                    o[0] += x.x;
                    o[1] += x.y;
                    o[2] += x.z;
                    o[3] += x.w;
                    o[4] += y.x;
                    o[5] += y.y;
                    o[6] += y.z;
                    o[7] += y.w;
                }
                const int64_t rr = r0 + r, i = rr / g.G, h = hk * g.G + (rr - i * g.G);
                if (g.splits == 1) {
                    /* A row that sees no key: 0.  One that does with sum 0 (every score -inf):
                     * 0 * inf = NaN, as the reference's softmax gives. */
                    const bool live = qbase + i >= kb;
                    const float inv = live ? 1.0f / ml_s[2 * r + 1] : 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) o[e] = live ? o[e] * inv : 0.0f;
                    T *orow = (T *)a.o + (b * a.o_stride[0] + h * a.o_stride[1] + i * a.o_stride[2]);
                    l3k_store8<T, true>(orow, (int64_t)c * 8, D, o);
                } else {
                    const int64_t wrow = ((b * a.n_heads + h) * a.seq_q + i) * g.splits + split;
                    float4 *dst = reinterpret_cast<float4 *>((float *)a.workspace + wrow * D + c * 8);
                    dst[0] = make_float4(o[0], o[1], o[2], o[3]);
                    dst[1] = make_float4(o[4], o[5], o[6], o[7]);
                    if (c == 0)
                        reinterpret_cast<float2 *>((float *)a.workspace + g.ws_ml)[wrow] =
                            make_float2(ml_s[2 * r], ml_s[2 * r + 1]);
                }
            }
            __syncthreads(); /* red_s, ml_s and q_s are reused by the next (bh, grp) */
        }
}

/* ---- decode attention on tensor cores: 16-bit dtypes, head_dim 64 or 128 ----------------
 *
 * decode_mma: the same CTA work as decode_split (16 query rows of a kv head, one piece of the
 * keys, the same partials), with mma.sync m16n8k16 products (fp32 accumulators): the 16 rows are
 * the M of every product (rows past the group's are zero q, never written out), so each key's K
 * and V are still read once for all rows.  A tile holds MMA_TK = 64 keys; warp w owns keys
 * [16 w, 16 w + 16) of every tile with its own running max and sum (no barrier between its
 * product, softmax and PV), and the 4 warps' partials meet at the end of the piece:
 *   S = Q K_w^T: q's A fragments stay in registers for the whole piece, K through ldmatrix;
 *   softmax on the accumulator fragments (a row lives in one quad);
 *   O += P V_w: P rounded to T as the A fragment (as flash attention does), V through
 *   ldmatrix.trans.
 * Tiles are XOR-swizzled (l3k_sw) and go through a 2-slot cp.async ring: with the arithmetic this
 * short, a slot's 32 KB (bf16, D 128) in flight per CTA, 2 or 3 CTAs an SM, cover the latency.
 *
 * A product cannot skip a masked (row, key) pair: p = 0 times a NaN or infinite V is NaN.  Keys
 * outside the piece are zero-filled; the only keys a row may not see among those loaded are the
 * newest ones (causal, seq_q > 1).  A tile holding such keys checks their V rows, and where one
 * is not finite the warp takes that tile's PV on CUDA cores, skipping the masked pairs. */
/* L3K_DECODE_MMA=0 in the environment sends every shape to decode_split (read at each call, so a
 * test can hold both kernels to the reference in one process). */
bool decode_mma_enabled() {
    const char *e = getenv("L3K_DECODE_MMA");
    return !(e && e[0] == '0' && e[1] == 0);
}
constexpr int MMA_TK = 64, MMA_STAGES = 2, MMA_WARPS = 4;
static_assert(MMA_WARPS * 32 == DEC_THREADS, "decode_mma runs DEC_THREADS threads");

template <int HD>
struct mma_layout {
    static constexpr int ROW = HD * 2;                 /* bytes a row of K, V or q */
    static constexpr int TILE = MMA_TK * ROW;          /* a K or V tile */
    static constexpr int Q = 16 * ROW;                 /* q of the 16 rows, from 0 */
    static constexpr int RING = MMA_STAGES * 2 * TILE; /* from Q */
    static constexpr int RED_ROW = HD + 8;             /* floats a row of a warp's partial o */
    static constexpr int RED = MMA_WARPS * 16 * RED_ROW * 4;
    static constexpr int TOTAL = Q + RING;
    static_assert(RED + MMA_WARPS * 16 * 8 <= RING, "the partials fit the ring");
};

/* Exponent bits all ones: an infinite or NaN 16-bit value. */
template <typename T>
__device__ __forceinline__ bool nonfinite16(uint32_t h);
template <>
__device__ __forceinline__ bool nonfinite16<__half>(uint32_t h) {
    return (h & 0x7c00u) == 0x7c00u;
}
template <>
__device__ __forceinline__ bool nonfinite16<__nv_bfloat16>(uint32_t h) {
    return (h & 0x7f80u) == 0x7f80u;
}

/* The two 16-bit values of a 32-bit word (low one first) as floats. */
__device__ __forceinline__ float2 unpack2(uint32_t w, __nv_bfloat16 *) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(uint32_t w, __half *) {
    return __half22float2(__halves2half2(__ushort_as_half((unsigned short)(w & 0xffffu)),
                                         __ushort_as_half((unsigned short)(w >> 16))));
}

/* CTAs an SM holds by shared memory (68 KB each at D 128): 3 on the H100 (228 KB), 2 on the
 * A100 (164 KB), where asking for 3 made ptxas spill.  A 3-slot ring at 2 CTAs an SM (with
 * decode_combine launched early, programmatic dependent launch) measured slower on an H100 at
 * B1 and B8 over 4096 keys, 19.0 and 58.5 us against 17.6 and 55.2 (bf16, GQA 32/8, D 128). */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define L3K_MMA_MIN_BLOCKS 2
#else
#define L3K_MMA_MIN_BLOCKS 3
#endif

template <typename T, int HD>
__global__ void __launch_bounds__(DEC_THREADS, L3K_MMA_MIN_BLOCKS)
    decode_mma(const l3k_decode_attn_args a, const dec_geom g) {
    typedef mma_layout<HD> LY;
    constexpr int KS = HD / 16, NTO = HD / 8, CH = HD / 8; /* k-steps, output n-tiles, 16-byte chunks */
    constexpr int PASSES = MMA_TK * CH / DEC_THREADS;
    static_assert(PASSES * DEC_THREADS == MMA_TK * CH && (DEC_THREADS / CH) % 8 == 0, "tile loads");
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = l3k_smem_u32(smem), ring = sQ + LY::Q;
    float *red_s = reinterpret_cast<float *>(smem + LY::Q); /* over the ring, after the key loop */
    float *ml_s = red_s + LY::RED / 4;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    const uint32_t oA = l3k_off_a<HD>(lane), oB = l3k_off_b<HD>(lane), oT = l3k_off_t<HD>(lane);
    const uint32_t wkey = (uint32_t)(warp * 16 * LY::ROW); /* this warp's 16 keys in a tile */
    const int64_t split = blockIdx.y;
    const float scale2 = a.scale * L3K_LOG2E;

    for (int64_t bh = blockIdx.x; bh < g.bhk; bh += gridDim.x)
        for (int64_t grp = blockIdx.z; grp < g.groups; grp += gridDim.z) {
            const int64_t b = bh / a.n_kv_heads, hk = bh - b * a.n_kv_heads;
            int64_t kb, ke;
            l3k_attn_keys(a.cache_range, b, a.capacity, kb, ke);
            const int64_t r0 = grp * 16;
            const int nrows = (int)(g.rows_kv - r0 < 16 ? g.rows_kv - r0 : 16);
            const int64_t qbase = ke - a.seq_q;
            const int64_t p_lo = qbase + r0 / g.G, p_hi = qbase + (r0 + nrows - 1) / g.G;
            const int64_t piece = (ke - kb + g.splits - 1) / g.splits;
            const int64_t lo = kb + split * piece;
            int64_t hi = lo + piece < ke ? lo + piece : ke;
            hi = hi < p_hi + 1 ? hi : p_hi + 1;
            const int64_t ntiles = hi > lo ? (hi - lo + MMA_TK - 1) / MMA_TK : 0;

            const tile_loader ld =
                make_loader<T, MMA_TK, true>((const T *)a.k_cache + (b * a.k_stride[0] + hk * a.k_stride[1]),
                                             (const T *)a.v_cache + (b * a.v_stride[0] + hk * a.v_stride[1]),
                                             a.k_stride[2], a.v_stride[2], HD, LY::ROW, tid);
#pragma unroll
            for (int st = 0; st < MMA_STAGES - 1; ++st) {
                if (st < ntiles) {
                    const int64_t j0 = lo + st * MMA_TK;
                    load_tile<PASSES>(ld, ring + st * 2 * LY::TILE, j0,
                                      hi - j0 < MMA_TK ? (int)(hi - j0) : MMA_TK, LY::ROW);
                }
                l3k_cp_async_commit();
            }
            /* q of the 16 rows into its swizzled tile (zeros past nrows) */
            for (int idx = tid; idx < 16 * CH; idx += DEC_THREADS) {
                const int r = idx / CH, c = idx - r * CH;
                uint4 v = make_uint4(0u, 0u, 0u, 0u);
                if (r < nrows) {
                    const int64_t rr = r0 + r, i = rr / g.G, h = hk * g.G + (rr - i * g.G);
                    v = *reinterpret_cast<const uint4 *>(
                        (const T *)a.q + (b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2]) + c * 8);
                }
                *reinterpret_cast<uint4 *>(smem + 2 * l3k_sw<HD>(r, c * 8)) = v;
            }
            __syncthreads();
            uint32_t qa[KS][4];
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
                l3k_ldsm_x4(qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], sQ + l3k_xo(oA, kk * 2));

            /* this lane's rows gq and gq + 8: their last keys (-1: padding, sees nothing) */
            int64_t plast[2];
            float m_run[2], l_run[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = gq + 8 * r;
                plast[r] = row < nrows ? qbase + (r0 + row) / g.G : -1;
                m_run[r] = -INFINITY;
                l_run[r] = 0.0f;
            }
            float acc[NTO][4];
            l3k_zero_acc(acc);

            int stage = 0;
            for (int64_t t = 0; t < ntiles; ++t) {
                l3k_cp_async_wait<MMA_STAGES - 2>();
                __syncthreads(); /* tile t landed for all; everyone is done with tile t - 1's slot */
                {
                    const int64_t tn = t + MMA_STAGES - 1;
                    const int sn = stage == 0 ? MMA_STAGES - 1 : stage - 1;
                    if (tn < ntiles) {
                        const int64_t jn = lo + tn * MMA_TK;
                        load_tile<PASSES>(ld, ring + sn * 2 * LY::TILE, jn,
                                          hi - jn < MMA_TK ? (int)(hi - jn) : MMA_TK, LY::ROW);
                    }
                    l3k_cp_async_commit();
                }
                const uint32_t kst = ring + stage * 2 * LY::TILE, vst = kst + LY::TILE;
                const int64_t j0 = lo + t * MMA_TK;

                /* S = Q K_w^T: s[j] holds keys 16 warp + 8 j + 2 tq + (e & 1) of rows gq + 8 (e >> 1) */
                float s[2][4];
                l3k_zero_acc(s);
#pragma unroll
                for (int kk = 0; kk < KS; ++kk) {
                    uint32_t b0, b1, b2, b3;
                    l3k_ldsm_x4(b0, b1, b2, b3, kst + (l3k_xo(oB, kk * 2) + wkey));
                    l3k_mma<T>::run(s[0], qa[kk], b0, b1);
                    l3k_mma<T>::run(s[1], qa[kk], b2, b3);
                }

                /* mask (piece end, causal), online softmax of the warp's keys */
                const int64_t dh = hi - j0;
                const int lim_hi = dh > MMA_TK ? MMA_TK : (int)dh;
                int lim[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int64_t d = plast[r] - j0;
                    lim[r] = d < -1 ? -1 : (d > MMA_TK ? MMA_TK : (int)d);
                }
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = -INFINITY;
                    bool vis[2][2];
#pragma unroll
                    for (int j = 0; j < 2; ++j)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int key = warp * 16 + j * 8 + 2 * tq + e;
                            vis[j][e] = key < lim_hi && key <= lim[r];
                            const float x = vis[j][e] ? s[j][2 * r + e] * scale2 : -INFINITY;
                            s[j][2 * r + e] = x;
                            mx = fmaxf(mx, x);
                        }
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float mn = fmaxf(m_run[r], mx);
                    const float mu = mn == -INFINITY ? 0.0f : mn;
                    const float al = l3k_ex2(m_run[r] - mu); /* 0 while m_run is -inf */
                    float psum = 0.0f;
#pragma unroll
                    for (int j = 0; j < 2; ++j)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float pr = vis[j][e] ? l3k_ex2(s[j][2 * r + e] - mu) : 0.0f;
                            s[j][2 * r + e] = pr;
                            psum += pr;
                        }
                    l_run[r] = l_run[r] * al + psum; /* this lane's part; the quad's sum at the end */
                    m_run[r] = mn;
#pragma unroll
                    for (int n = 0; n < NTO; ++n) {
                        acc[n][2 * r] *= al;
                        acc[n][2 * r + 1] *= al;
                    }
                }

                /* Keys some row of the CTA does not see: (p_lo, hi) relative to the tile. */
                bool exact = false;
                if (j0 + MMA_TK - 1 > p_lo) {
                    const int64_t dl = p_lo - j0;
                    const int first = dl < -1 ? 0 : (int)dl + 1; /* < MMA_TK here */
                    bool bad = false;
                    for (int idx = lane; idx < 16 * CH; idx += 32) {
                        const int k = idx / CH, c = idx - k * CH, key = warp * 16 + k;
                        if (key >= first && key < lim_hi) {
                            const uint4 v = *reinterpret_cast<const uint4 *>(
                                smem + (vst - sQ) + key * LY::ROW + ((c ^ (key & 7)) << 4));
                            const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                            for (int e = 0; e < 4; ++e)
                                bad |= nonfinite16<T>(w[e]) || nonfinite16<T>(w[e] >> 16);
                        }
                    }
                    exact = __any_sync(0xffffffffu, bad);
                }
                if (!exact) {
                    uint32_t pa[4];
                    l3k_acc_to_a<T>(pa, s[0], s[1]);
#pragma unroll
                    for (int dj = 0; dj < KS; ++dj) {
                        uint32_t b0, b1, b2, b3;
                        l3k_ldsm_x4_t(b0, b1, b2, b3, vst + (l3k_xo(oT, dj * 2) + wkey));
                        l3k_mma<T>::run(acc[2 * dj], pa, b0, b1);
                        l3k_mma<T>::run(acc[2 * dj + 1], pa, b2, b3);
                    }
                } else {
                    /* CUDA cores: p from the quad's lanes, V pairs from the swizzled tile, masked
                     * pairs skipped (p kept in float32 here) */
                    const unsigned char *vs = smem + (vst - sQ);
#pragma unroll 1
                    for (int k = 0; k < 16; ++k) {
                        const int src = (lane & ~3) | ((k & 7) >> 1);
                        /* selects, not s[k >> 3][...]: a runtime index would put s in local memory */
                        const bool hi8 = k >= 8, odd = k & 1;
                        const float q0 = hi8 ? (odd ? s[1][1] : s[1][0]) : (odd ? s[0][1] : s[0][0]);
                        const float q1 = hi8 ? (odd ? s[1][3] : s[1][2]) : (odd ? s[0][3] : s[0][2]);
                        const float p0 = __shfl_sync(0xffffffffu, q0, src);
                        const float p1 = __shfl_sync(0xffffffffu, q1, src);
                        const int key = warp * 16 + k;
                        const bool v0 = key < lim_hi && key <= lim[0], v1 = key < lim_hi && key <= lim[1];
#pragma unroll
                        for (int n = 0; n < NTO; ++n) {
                            const int col = n * 8 + 2 * tq;
                            const uint32_t w = *reinterpret_cast<const uint32_t *>(
                                vs + key * LY::ROW + ((((col >> 3) ^ (key & 7)) << 4) | ((col & 7) * 2)));
                            const float2 x = unpack2(w, (T *)nullptr);
                            const float x0 = x.x, x1 = x.y;
                            if (v0) {
                                acc[n][0] = fmaf(p0, x0, acc[n][0]);
                                acc[n][1] = fmaf(p0, x1, acc[n][1]);
                            }
                            if (v1) {
                                acc[n][2] = fmaf(p1, x0, acc[n][2]);
                                acc[n][3] = fmaf(p1, x1, acc[n][3]);
                            }
                        }
                    }
                }
                stage = stage == MMA_STAGES - 1 ? 0 : stage + 1;
            }

            /* The warps' partials: o (rows padded to RED_ROW floats), max and quad-summed sum. */
            l3k_cp_async_wait<0>();
            __syncthreads();
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float l = l_run[r];
                l += __shfl_xor_sync(0xffffffffu, l, 1);
                l += __shfl_xor_sync(0xffffffffu, l, 2);
                const int row = gq + 8 * r;
                float *dst = red_s + (warp * 16 + row) * LY::RED_ROW + 2 * tq;
#pragma unroll
                for (int n = 0; n < NTO; ++n)
                    *reinterpret_cast<float2 *>(dst + n * 8) = make_float2(acc[n][2 * r], acc[n][2 * r + 1]);
                if (tq == 0) {
                    ml_s[(warp * 16 + row) * 2] = m_run[r];
                    ml_s[(warp * 16 + row) * 2 + 1] = l;
                }
            }
            __syncthreads();
            for (int idx = tid; idx < nrows * CH; idx += DEC_THREADS) {
                const int r = idx / CH, c = idx - r * CH;
                float M = -INFINITY;
#pragma unroll
                for (int w = 0; w < MMA_WARPS; ++w) M = fmaxf(M, ml_s[(w * 16 + r) * 2]);
                float L = 0.0f, o[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) o[e] = 0.0f;
#pragma unroll
                for (int w = 0; w < MMA_WARPS; ++w) {
                    const float mw = ml_s[(w * 16 + r) * 2];
                    const float sw = mw == -INFINITY ? 0.0f : l3k_ex2(mw - M);
                    L = fmaf(ml_s[(w * 16 + r) * 2 + 1], sw, L);
                    const float4 *src =
                        reinterpret_cast<const float4 *>(red_s + (w * 16 + r) * LY::RED_ROW + c * 8);
                    const float4 x = src[0], y = src[1];
                    o[0] = fmaf(x.x, sw, o[0]);
                    o[1] = fmaf(x.y, sw, o[1]);
                    o[2] = fmaf(x.z, sw, o[2]);
                    o[3] = fmaf(x.w, sw, o[3]);
                    o[4] = fmaf(y.x, sw, o[4]);
                    o[5] = fmaf(y.y, sw, o[5]);
                    o[6] = fmaf(y.z, sw, o[6]);
                    o[7] = fmaf(y.w, sw, o[7]);
                }
                const int64_t rr = r0 + r, i = rr / g.G, h = hk * g.G + (rr - i * g.G);
                if (g.splits == 1) {
                    const bool live = qbase + i >= kb;
                    const float inv = live ? 1.0f / L : 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) o[e] = live ? o[e] * inv : 0.0f;
                    T *orow = (T *)a.o + (b * a.o_stride[0] + h * a.o_stride[1] + i * a.o_stride[2]);
                    l3k_store8<T, true>(orow, (int64_t)c * 8, HD, o);
                } else {
                    const int64_t wrow = ((b * a.n_heads + h) * a.seq_q + i) * g.splits + split;
                    float4 *dst = reinterpret_cast<float4 *>((float *)a.workspace + wrow * HD + c * 8);
                    dst[0] = make_float4(o[0], o[1], o[2], o[3]);
                    dst[1] = make_float4(o[4], o[5], o[6], o[7]);
                    if (c == 0)
                        reinterpret_cast<float2 *>((float *)a.workspace + g.ws_ml)[wrow] = make_float2(M, L);
                }
            }
            __syncthreads(); /* red_s, ml_s and the q tile are reused by the next (bh, grp) */
        }
}

/* Merge of the splits: one CTA of COMB_THREADS per (b, h, i) row (grid-striding over rows).
 * Thread s < S weighs split s: w_s = exp2(m_s - M) with M = max m_s (0 for an empty split, whose
 * partial o is 0 and sum 0); then thread (chunk, part) sums w_s o_s over the splits s = part,
 * part + parts, ... for 4 columns, and the parts meet in shared memory:
 * o = sum w_s o_s / sum w_s l_s.  Every split's loads of a thread are independent, so they are
 * in flight together (a thread that walked all S splits in turn made the merge latency-bound).
 * A NaN partial (sum NaN) stays NaN: 0 * NaN is NaN. */
constexpr int COMB_THREADS = 128;
static_assert(L3K_DECODE_MAX_SPLITS <= COMB_THREADS, "one thread a split");

template <typename T>
__global__ void __launch_bounds__(COMB_THREADS)
    decode_combine(const l3k_decode_attn_args a, const dec_geom g, int chunks_p2) {
    __shared__ float w_s[COMB_THREADS], lw_s[COMB_THREADS];
    __shared__ __align__(16) float part_s[COMB_THREADS * 4];
    __shared__ float m_red[COMB_THREADS / 32];
    const int D = g.D, S = g.splits, CH = D / 4; /* float4 chunks a row */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int chunk = tid % chunks_p2, part = tid / chunks_p2, parts = COMB_THREADS / chunks_p2;
    const int64_t rows = a.batch * a.n_heads * a.seq_q;
    const float *wo = (const float *)a.workspace;
    const float2 *wml = reinterpret_cast<const float2 *>(wo + g.ws_ml);
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float2 ml = tid < S ? wml[row * S + tid] : make_float2(-INFINITY, 0.0f);
        float m = ml.x;
#pragma unroll
        for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        if (lane == 0) m_red[warp] = m;
        __syncthreads();
        float M = m_red[0];
#pragma unroll
        for (int w = 1; w < COMB_THREADS / 32; ++w) M = fmaxf(M, m_red[w]);
        const float w = ml.x == -INFINITY ? 0.0f : l3k_ex2(ml.x - M);
        w_s[tid] = w;
        lw_s[tid] = ml.y * w;
        __syncthreads();
        float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (chunk < CH) {
#pragma unroll 4
            for (int sp = part; sp < S; sp += parts) {
                const float ws = w_s[sp];
                const float4 x = reinterpret_cast<const float4 *>(wo + (row * S + sp) * D)[chunk];
                o.x = fmaf(x.x, ws, o.x);
                o.y = fmaf(x.y, ws, o.y);
                o.z = fmaf(x.z, ws, o.z);
                o.w = fmaf(x.w, ws, o.w);
            }
        }
        reinterpret_cast<float4 *>(part_s)[tid] = o;
        __syncthreads();
        if (part == 0 && chunk < CH) {
            float L = 0.0f;
            for (int sp = 0; sp < S; ++sp) L += lw_s[sp];
            for (int p = 1; p < parts; ++p) {
                const float4 x = reinterpret_cast<const float4 *>(part_s)[p * chunks_p2 + chunk];
                o.x += x.x;
                o.y += x.y;
                o.z += x.z;
                o.w += x.w;
            }
            const int64_t i = row % a.seq_q, bh = row / a.seq_q, h = bh % a.n_heads, b = bh / a.n_heads;
            int64_t kb, ke;
            l3k_attn_keys(a.cache_range, b, a.capacity, kb, ke);
            const bool live = ke - a.seq_q + i >= kb; /* the row sees a key (as in decode_split) */
            const float inv = live ? 1.0f / L : 0.0f;
            float r[4] = {o.x, o.y, o.z, o.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) r[e] = live ? r[e] * inv : 0.0f;
            T *orow = (T *)a.o + (b * a.o_stride[0] + h * a.o_stride[1] + i * a.o_stride[2]);
            st_vec<T, 4>(orow + 4 * chunk, r);
        }
        __syncthreads(); /* w_s, lw_s, part_s, m_red are reused by the next row */
    }
}

template <typename T, int NR, int DMAX, bool EXACT>
int launch_decode(const l3k_decode_attn_args &a, const dec_geom &g, cudaStream_t st) {
    constexpr int STAGES = dec_cfg<T, DMAX>::STAGES;
    const auto kern = decode_split<T, NR, DMAX, EXACT>;
    /* The limit once per (kernel, device), at the kernel's largest size (D = DMAX). */
    static bool done[64] = {false};
    L3K_CUDA_TRY(l3k_smem_prepare(kern, (size_t)dec_layout(DMAX, (int)sizeof(T), NR, STAGES).total, done));
    const size_t smem = (size_t)dec_layout(g.D, (int)sizeof(T), NR, STAGES).total;
    const dim3 grid((unsigned)l3k_clamp64(g.bhk, 1, INT_MAX), (unsigned)g.splits,
                    (unsigned)l3k_clamp64(g.groups, 1, 65535));
    kern<<<grid, DEC_THREADS, smem, st>>>(a, g);
    return (int)cudaGetLastError();
}

/* decode_split for float32 (any head_dim) and for the 16-bit types' head_dims other than 64
 * and 128 (decode_mma takes those). */
template <typename T, int NR>
int dispatch_dim(const l3k_decode_attn_args &a, const dec_geom &g, cudaStream_t st) {
    if constexpr (sizeof(T) == 4) {
        if (g.D == 64) return launch_decode<T, NR, 64, true>(a, g, st);
        if (g.D == 128) return launch_decode<T, NR, 128, true>(a, g, st);
    }
    return launch_decode<T, NR, 256, false>(a, g, st);
}

template <typename T, int HD>
int launch_mma(const l3k_decode_attn_args &a, const dec_geom &g, cudaStream_t st) {
    const auto kern = decode_mma<T, HD>;
    static bool done[64] = {false};
    L3K_CUDA_TRY(l3k_smem_prepare(kern, (size_t)mma_layout<HD>::TOTAL, done));
    const dim3 grid((unsigned)l3k_clamp64(g.bhk, 1, INT_MAX), (unsigned)g.splits,
                    (unsigned)l3k_clamp64(g.groups, 1, 65535));
    kern<<<grid, DEC_THREADS, mma_layout<HD>::TOTAL, st>>>(a, g);
    return (int)cudaGetLastError();
}

template <typename T>
int launch_attn(const l3k_decode_attn_args &a, const dec_geom &g, cudaStream_t st) {
    /* NR < 16 only where one group holds every row of a kv head: the same group count
     * (l3k_decode_row_groups, by L3K_DECODE_ROWS) that sized the splits. */
    int err = -1;
    if constexpr (sizeof(T) == 2) {
        if (decode_mma_enabled()) {
            if (g.D == 64) err = launch_mma<T, 64>(a, g, st);
            else if (g.D == 128) err = launch_mma<T, 128>(a, g, st);
        }
    }
    if (err == -1) {
        if (g.rows_kv <= 4) err = dispatch_dim<T, 4>(a, g, st);
        else if (g.rows_kv <= 8) err = dispatch_dim<T, 8>(a, g, st);
        else err = dispatch_dim<T, L3K_DECODE_ROWS>(a, g, st);
    }
    if (err != 0 || g.splits == 1) return err;
    const int chunks_p2 = (int)l3k_pow2_ceil(g.D / 4); /* 2 .. 64 */
    const int64_t rows = a.batch * a.n_heads * a.seq_q;
    const unsigned blocks = (unsigned)l3k_clamp64(rows, 1, INT_MAX);
    decode_combine<T><<<blocks, COMB_THREADS, 0, st>>>(a, g, chunks_p2);
    return (int)cudaGetLastError();
}

} // namespace

extern "C" int l3k_cuda_kv_append(const l3k_kv_append_args *args, void *stream) {
    const l3k_kv_append_args a = *args;
    if (a.batch <= 0 || a.seq <= 0 || a.n_kv_heads + a.n_heads <= 0) return 0;
    cudaStream_t st = (cudaStream_t)stream;
    int err = 0;
    if (a.table_dtype == L3K_DT_F32) {
        L3K_DISPATCH_DTYPE(a.dtype, err = launch_append<T, float>(a, st));
    } else {
        L3K_DISPATCH_DTYPE(a.dtype, err = launch_append<T, T>(a, st));
    }
    return err;
}

extern "C" int l3k_cuda_decode_attn(const l3k_decode_attn_args *args, void *stream) {
    const l3k_decode_attn_args a = *args;
    if (a.batch <= 0 || a.n_heads <= 0 || a.n_kv_heads <= 0 || a.seq_q <= 0) return 0;
    dec_geom g;
    g.G = a.n_heads / a.n_kv_heads;
    g.rows_kv = g.G * a.seq_q;
    g.groups = l3k_decode_row_groups(a.n_heads, a.n_kv_heads, a.seq_q);
    g.bhk = a.batch * a.n_kv_heads;
    g.D = (int)a.head_dim;
    const int64_t splits = l3k_decode_attn_splits(a.batch, a.n_heads, a.n_kv_heads, a.seq_q, a.capacity);
    g.splits = (int)splits;
    g.ws_ml = splits * a.batch * a.n_heads * a.seq_q * a.head_dim;
    if (splits > 1 && (!a.workspace || a.workspace_bytes < l3k_decode_attn_workspace_bytes(
                                                               a.batch, a.n_heads, a.n_kv_heads, a.seq_q,
                                                               a.capacity, a.head_dim, 1)))
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    int err = 0;
    L3K_DISPATCH_DTYPE(a.dtype, err = launch_attn<T>(a, g, st));
    return err;
}
