/* The common header of the CUDA kernels: dtype traits, 8-element slot loads
 * and stores, warp and group reductions, dtype dispatch; the PTX wrappers the
 * attention kernels share (cp.async, ex2, packing); the attention mask and the
 * blocks a tile visits.  Instruction wrappers of one architecture are in
 * mma.cuh (mma.sync, sm_80 on) and wgmma.cuh (wgmma and TMA, sm_90a). */
#ifndef L3K_CUDA_COMMON_CUH_
#define L3K_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include "geometry.h"
#include "kernels.h"

template <typename T>
struct l3k_type;
template <>
struct l3k_type<float> {
    static __device__ __forceinline__ float to_float(float v) { return v; }
    static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct l3k_type<__half> {
    static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct l3k_type<__nv_bfloat16> {
    static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float l3k_to_float(T v) {
    return l3k_type<T>::to_float(v);
}
template <typename T>
__device__ __forceinline__ T l3k_from_float(float v) {
    return l3k_type<T>::from_float(v);
}
template <typename T>
__device__ __forceinline__ float l3k_round_to(float v) {
    return l3k_to_float(l3k_from_float<T>(v));
}

/* Eight consecutive elements starting at column `col` of `row`, as floats.
 * VEC: the row is 16-byte aligned and every 16-byte piece is either wholly
 * inside [0, n) or wholly outside (n a multiple of the piece's element count). */
template <typename T, bool VEC>
__device__ __forceinline__ void l3k_load8(const T *__restrict__ row, int64_t col, int64_t n, float v[8]) {
    constexpr int PER16 = 16 / sizeof(T);
    if (VEC) {
#pragma unroll
        for (int piece = 0; piece < 8 / PER16; ++piece) {
            const int64_t c = col + piece * PER16;
            if (c < n) {
                uint4 raw = *reinterpret_cast<const uint4 *>(row + c);
                const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
                for (int i = 0; i < PER16; ++i) v[piece * PER16 + i] = l3k_to_float(e[i]);
            } else {
#pragma unroll
                for (int i = 0; i < PER16; ++i) v[piece * PER16 + i] = 0.0f;
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = col + i < n ? l3k_to_float(row[col + i]) : 0.0f;
    }
}

template <typename T, bool VEC>
__device__ __forceinline__ void l3k_store8(T *__restrict__ row, int64_t col, int64_t n, const float v[8]) {
    constexpr int PER16 = 16 / sizeof(T);
    if (VEC) {
#pragma unroll
        for (int piece = 0; piece < 8 / PER16; ++piece) {
            const int64_t c = col + piece * PER16;
            if (c < n) {
                uint4 raw;
                T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
                for (int i = 0; i < PER16; ++i) e[i] = l3k_from_float<T>(v[piece * PER16 + i]);
                *reinterpret_cast<uint4 *>(row + c) = raw;
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (col + i < n) row[col + i] = l3k_from_float<T>(v[i]);
    }
}

/* Eight consecutive elements kept in their storage type (16 bytes for 2-byte
 * types, 32 for float32): half the registers of eight floats, so more rows
 * can be in flight per multiprocessor. */
template <typename T>
struct l3k_slot {
    uint4 raw[sizeof(T) / 2];
    __device__ __forceinline__ T &at(int i) { return reinterpret_cast<T *>(raw)[i]; }
    __device__ __forceinline__ float get(int i) const {
        return l3k_to_float(reinterpret_cast<const T *>(raw)[i]);
    }
};

/* Sum over the `width` lanes (a power of two <= 32) that share a sub-warp. */
template <typename V>
__device__ __forceinline__ V l3k_subwarp_sum(V v, int width) {
    for (int off = width / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off, width);
    return v;
}

#define L3K_CUDA_TRY(expr)                                 \
    do {                                                   \
        cudaError_t l3k_err_ = (expr);                     \
        if (l3k_err_ != cudaSuccess) return (int)l3k_err_; \
    } while (0)

/* Dispatch a dtype to a C++ type and evaluate `body` with it as `T`. */
#define L3K_DISPATCH_DTYPE(dt, ...)  \
    switch (dt) {                    \
        case L3K_DT_F32: {           \
            typedef float T;         \
            __VA_ARGS__;             \
            break;                   \
        }                            \
        case L3K_DT_F16: {           \
            typedef __half T;        \
            __VA_ARGS__;             \
            break;                   \
        }                            \
        case L3K_DT_BF16: {          \
            typedef __nv_bfloat16 T; \
            __VA_ARGS__;             \
            break;                   \
        }                            \
    }

/* ---- PTX wrappers of the attention kernels -------------------------------- */

constexpr float L3K_LOG2E = 1.4426950408889634f;

__device__ __forceinline__ uint32_t l3k_smem_u32(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/* 16-byte global->shared copy; pred == false writes 16 zero bytes (src is not read). */
__device__ __forceinline__ void l3k_cp_async16(uint32_t dst, const void *src, bool pred) {
    const int sz = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(sz));
}
__device__ __forceinline__ void l3k_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void l3k_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float l3k_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* Two floats rounded to the 16-bit type T, packed low-high in one register. */
template <typename T>
__device__ __forceinline__ uint32_t l3k_pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t l3k_pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <>
__device__ __forceinline__ uint32_t l3k_pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

__device__ __forceinline__ int64_t l3k_ceil_div_pos(int64_t a, int64_t b) {
    return a <= 0 ? 0 : (a + b - 1) / b;
}

/* ---- attention: the mask and the blocks a tile visits ---------------------------
 * attention.h's mask: query row q (of sq) of sequence b sees key j (of sk) iff
 * kb <= j < ke and, when causal, j <= q + sk - sq (the diagonal aligned
 * bottom-right), where [kb, ke) is b's key range (l3k_attn_keys; [0, sk)
 * without one).  Its faces below: the
 * keys a query row sees (l3k_attn_key_count), and the part of a tile's columns
 * (l3k_attn_tile_cols) for a loop over keys; the query rows that see a key
 * (l3k_attn_query_begin), and the part of a tile's rows (l3k_attn_tile_first_row)
 * for a loop over queries; whether a tile holds a masked pair
 * (L3K_ATTN_TILE_MASKED), or which blocks of a loop need no mask; and the
 * blocks of keys or queries that a tile of the other meets.
 *
 * The mma.sync kernels run with every register spoken for: the tile tests are
 * written to keep little alive across their loops (block thresholds as 32-bit
 * block indices, 32-bit in-tile column and row offsets), and the per-element
 * test of a masked tile is one 32-bit compare, as the key-end test alone was. */

/* Sequence b's key range [kb, ke), clamped into 0 <= kb <= ke <= sk whatever the
 * caller's values (they are never checked on the host): no tile loop can leave
 * [0, sk).  Without a key_range, [0, sk). */
__device__ __forceinline__ void l3k_attn_keys(const int32_t *key_range, int64_t b, int64_t sk, int64_t &kb,
                                              int64_t &ke) {
    kb = 0;
    ke = sk;
    if (key_range) {
        const int64_t s = __ldg(key_range + 2 * b), e = __ldg(key_range + 2 * b + 1);
        ke = e < 0 ? 0 : (e < sk ? e : sk);
        kb = s < 0 ? 0 : (s < ke ? s : ke);
    }
}

/* Whether the tile of query rows q0.. and keys [j0, j0 + keys) may hold a
 * masked pair: a key outside [kb, ke), or its last key masked for row q0, the
 * row that sees fewest.  A macro where the helpers around it are inline
 * functions: NVVM turns an inlined callee's `||` into selects before it inlines
 * it, which cost the mma.sync kernels up to 14 registers and new spills. */
#define L3K_ATTN_TILE_MASKED(q0, j0, keys, sq, sk, causal, kb, ke) \
    ((j0) < (kb) || (j0) + (keys) > (ke) || ((causal) && ((j0) + (keys)) - 1 > (q0) + (sk) - (sq)))

/* Query row q sees the keys [kb, kb + count) (count 0: none, a fully masked row). */
__device__ __forceinline__ int64_t l3k_attn_key_count(int64_t q, int64_t sq, int64_t sk, int causal,
                                                      int64_t kb, int64_t ke) {
    int64_t end = ke;
    if (causal) {
        const int64_t c = q + 1 + sk - sq;
        end = c < end ? c : end;
    }
    return end > kb ? end - kb : 0;
}

/* Query row q's keys within the tile of `keys` keys from j0: the tile's
 * columns [lo, lo + n); column c is masked iff L3K_ATTN_COL_OUT(c, lo, n). */
__device__ __forceinline__ void l3k_attn_tile_cols(int64_t q, int64_t j0, int keys, int64_t sq, int64_t sk,
                                                   int causal, int64_t kb, int64_t ke, int &lo, int &n) {
    int64_t first = kb - j0, end = kb + l3k_attn_key_count(q, sq, sk, causal, kb, ke) - j0;
    first = first < 0 ? 0 : (first > keys ? keys : first);
    end = end < first ? first : (end > keys ? keys : end);
    lo = (int)first;
    n = (int)(end - first);
}
/* Both ends in one unsigned compare. */
#define L3K_ATTN_COL_OUT(c, lo, n) ((unsigned)((c) - (lo)) >= (unsigned)(n))

/* Key j is seen by the query rows [begin, sq) (begin -1: every row; INT64_MAX:
 * none, j outside [kb, ke)). */
__device__ __forceinline__ int64_t l3k_attn_query_begin(int64_t j, int64_t sq, int64_t sk, int causal,
                                                        int64_t kb, int64_t ke) {
    if (j < kb || j >= ke) return INT64_MAX;
    return causal ? j - (sk - sq) : -1;
}

/* The first row of the tile of `rows` query rows from q0 that sees key j, in
 * [0, rows] (rows: none); tile row r is masked for j iff r < the result. */
__device__ __forceinline__ int l3k_attn_tile_first_row(int64_t j, int64_t q0, int rows, int64_t sq,
                                                       int64_t sk, int causal, int64_t kb, int64_t ke) {
    const int64_t first = l3k_attn_query_begin(j, sq, sk, causal, kb, ke);
    if (first == INT64_MAX) return rows;
    const int64_t r = first - q0;
    return r < 0 ? 0 : (r > rows ? rows : (int)r);
}

/* The blocks of `keys` keys that hold a key some row of [q0, q0 + rows) sees:
 * blocks [l3k_attn_kv_block_begin, l3k_attn_kv_block_end); none when end <=
 * begin. */
__device__ __forceinline__ int64_t l3k_attn_kv_block_begin(int64_t kb, int keys) { return kb / keys; }
__device__ __forceinline__ int64_t l3k_attn_kv_block_end(int64_t q0, int rows, int keys, int64_t sq,
                                                         int64_t sk, int causal, int64_t kb, int64_t ke) {
    int64_t end = ke;
    if (causal) {
        const int64_t lim = q0 + rows + sk - sq;
        end = lim < end ? lim : end;
    }
    return end > kb ? l3k_ceil_div_pos(end, keys) : 0;
}

/* The KV blocks n whose tile with query rows q0.. holds no masked pair
 * (L3K_ATTN_TILE_MASKED false for j0 = n * keys): lo <= n < hi.  32-bit block
 * indices, computed once where a loop would test the tile per block. */
__device__ __forceinline__ void l3k_attn_unmasked_kv_blocks(int64_t q0, int keys, int64_t sq, int64_t sk,
                                                            int causal, int64_t kb, int64_t ke, int &lo,
                                                            int &hi) {
    int64_t end = ke / keys; /* n * keys + keys <= ke */
    if (causal) {            /* n * keys + keys - 1 <= q0 + sk - sq, floor division */
        const int64_t d = q0 + sk - sq + 1;
        const int64_t c = d >= 0 ? d / keys : -((keys - 1 - d) / keys);
        end = c < end ? c : end;
    }
    lo = (int)((kb + keys - 1) / keys); /* n * keys >= kb */
    hi = (int)(end < lo ? lo : end);
}

/* The first block of `rows` query rows with a row that sees a key of [j0, j0 +
 * keys) (the blocks after it see one too); ceil(sq / rows), no block, when the
 * keys are all outside [kb, ke). */
__device__ __forceinline__ int64_t l3k_attn_q_block_begin(int64_t j0, int keys, int rows, int64_t sq,
                                                          int64_t sk, int causal, int64_t kb, int64_t ke) {
    const int64_t j = j0 > kb ? j0 : kb; /* the block's first key in range */
    if (j >= ke || j >= j0 + keys) return l3k_ceil_div_pos(sq, rows);
    if (!causal) return 0;
    /* l3k_attn_query_begin written out: calling it changed the mma.sync backward's code */
    const int64_t first = j - (sk - sq);
    return first > 0 ? first / rows : 0;
}

/* Thread tid 0 puts the key range [kb, ke) and the KV blocks that need no mask (lo <= n < hi of
 * l3k_attn_unmasked_kv_blocks for the query rows q0..) in shared memory, read where a masked tile
 * needs them (after the tile loop's first barrier): kept in registers across the loop, they made
 * the mma.sync kernels spill more.  The arrays stay the kernel's own __shared__ variables. */
__device__ __forceinline__ void l3k_attn_share_keys(int tid, int64_t q0, int keys, int64_t sq, int64_t sk,
                                                    int causal, int64_t kb, int64_t ke, int64_t (&s_keys)[2],
                                                    int (&s_plain)[2]) {
    if (tid == 0) {
        s_keys[0] = kb;
        s_keys[1] = ke;
        l3k_attn_unmasked_kv_blocks(q0, keys, sq, sk, causal, kb, ke, s_plain[0], s_plain[1]);
    }
}

/* The CTA of a KV-outer backward kernel (flash_bwd_sm80.cu, flash_bwd_sm90.cu) on the grid
 * (batch * kv heads, blocks of `keys` keys): kv head hk of sequence b, the keys from n0; G = h / hkv
 * query heads share the kv head. */
__device__ __forceinline__ void l3k_attn_kv_cta(int64_t h, int64_t hkv, int keys, int64_t &G, int64_t &b,
                                                int64_t &hk, int64_t &n0) {
    G = h / hkv;
    const int64_t bhk = blockIdx.x;
    b = bhk / hkv;
    hk = bhk % hkv;
    n0 = (int64_t)blockIdx.y * keys;
}

/* The blocks of `rows` query rows that such a CTA visits for each query head: of the m_blocks
 * blocks, the ones from m_min on (returned: how many), those with a row that sees one of the keys
 * [n0, n0 + keys); none when no key of the block is in the sequence's key range [kb, ke)
 * (l3k_attn_keys; called by the kernel: inside this helper its branch changed the kernels' code). */
__device__ __forceinline__ int64_t l3k_attn_kv_q_blocks(int64_t n0, int keys, int rows, int64_t sq,
                                                        int64_t sk, int causal, int64_t kb, int64_t ke,
                                                        int64_t &m_blocks, int64_t &m_min) {
    m_blocks = l3k_ceil_div_pos(sq, rows);
    m_min = l3k_attn_q_block_begin(n0, keys, rows, sq, sk, causal, kb, ke);
    return m_blocks > m_min ? m_blocks - m_min : 0;
}

#endif /* L3K_CUDA_COMMON_CUH_ */
