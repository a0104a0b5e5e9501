/* kernels/kv_cache.h -- internal interface of the KV-cache kernels: appending rotated keys and
 * values to a cache, and attention of a few new queries over it (decoding).
 *
 * Plain C (no CUDA types); included by kernels/cpu/kv_cache.c, kernels/cuda/kv_cache.cu and the
 * C ABI layer (capi/kv_cache.c), which validates every argument first: these entry points trust
 * their arguments.
 *
 * The cache of one layer is k_cache and v_cache, each (B, Hkv, capacity, D) with its own int64
 * element strides for (batch, head, slot) and the last dim contiguous (a transformers StaticCache
 * holds exactly this).
 *
 * cache_range: int32 (B, 2), contiguous, on the device of the tensors.  Row b = [start, end): the
 * slots that hold sequence b's tokens once the call's `seq` new tokens are in, the new ones being
 * the last: new token i (0 <= i < seq) is at slot end - seq + i.  start > 0 marks left padding
 * (slots before start are never attended).  The values are read by the kernels (on the GPU the
 * library cannot look at them without a sync) and clamped first, the same way everywhere:
 *     end' = min(max(end, 0), capacity),  start' = min(max(start, 0), end').
 * so no value makes a kernel read or write outside the cache.
 *
 * Append (l3k_kv_append_args): for every sequence b, new token i and kv head h:
 *     slot = end' - seq + i; when 0 <= slot (always < capacity):
 *     k_cache[b, h, slot] = rope(k[b, h, i], row), v_cache[b, h, slot] = v[b, h, i]
 * and, when n_heads > 0, q_out[b, hq, i] = rope(q[b, hq, i], row) for every query head hq (q_out may
 * be q itself: in place).  A token whose slot is negative is not written to the cache (its q is
 * still rotated).  row = i + (positions ? positions[b] : 0) picks the cos/sin row (of batch b's
 * table when table_batch_stride != 0); a row outside [0, table_rows) gives that token's rotated q
 * and k NaN, so a bad position shows instead of reading outside the tables.  RoPE as
 * l3k_rope_args defines it (rotate-half or interleaved pairs, float32 arithmetic, one rounding).
 *
 * Decode attention (l3k_decode_attn_args): q (B, H, seq_q, D), o the same shape, query i of
 * sequence b sits at slot p = end' - seq_q + i and attends to the keys start' <= j <= p (causal, and
 * the padding before start'):
 *     o[b, h, i] = softmax_j(scale * <q, k_cache[b, h / (H / Hkv), j]>) v_cache[b, h / (H / Hkv), j]
 * in float32, rounded once to the dtype.  A query with no visible key (p < start') gets o = 0.
 * GQA: the H / Hkv query heads of a kv head read its keys once (CUDA).  dtype float32, float16 or
 * bfloat16 on both devices; D a multiple of 8 in [8, 256].  On CUDA each data pointer is 16-byte
 * aligned and each stride a multiple of 8 elements (capi checks).
 *
 * Split-KV on CUDA: when B * Hkv * (query-row groups) would not fill the GPU, each sequence's
 * visible range is cut into `splits` pieces (l3k_decode_attn_splits) handled by separate CTAs,
 * whose partial results (float32 o, running max and sum per query row) go to the workspace and
 * are combined by a second kernel.  The pieces are cut from the range read on the device, so a
 * short sequence in a large cache uses every split.  The CPU reference needs no workspace. */
#ifndef L3K_KERNELS_KV_CACHE_H
#define L3K_KERNELS_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t batch, n_heads, n_kv_heads, seq, head_dim, capacity; /* n_heads 0: no q */
    l3k_dt dtype;                                                /* of q, k, v and the cache */
    const void *q;
    int64_t q_stride[3]; /* (B, H, seq, D) */
    void *q_out;
    int64_t q_out_stride[3]; /* may be q itself (same strides) */
    const void *k, *v;
    int64_t k_stride[3], v_stride[3]; /* (B, Hkv, seq, D) */
    void *k_cache, *v_cache;
    int64_t kc_stride[3], vc_stride[3]; /* (B, Hkv, capacity, D) */
    const void *cos, *sin;              /* (table_rows, D / 2) contiguous, per batch at table_batch_stride */
    l3k_dt table_dtype;                 /* float32 or dtype */
    int64_t table_rows, table_batch_stride;
    const int32_t *positions;   /* optional (B,): table row of each sequence's first new token */
    const int32_t *cache_range; /* (B, 2) */
    int interleaved;            /* pairs (2p, 2p + 1) instead of (p, p + D / 2) */
} l3k_kv_append_args;

typedef struct {
    int64_t batch, n_heads, n_kv_heads, seq_q, capacity, head_dim;
    l3k_dt dtype;
    const void *q;
    int64_t q_stride[3]; /* (B, H, seq_q, D) */
    const void *k_cache, *v_cache;
    int64_t k_stride[3], v_stride[3]; /* (B, Hkv, capacity, D) */
    void *o;
    int64_t o_stride[3]; /* (B, H, seq_q, D); apart from every input */
    const int32_t *cache_range;
    float scale;            /* > 0 */
    void *workspace;        /* CUDA: at least l3k_decode_attn_workspace_bytes, 256-byte aligned */
    size_t workspace_bytes; /* 0 on the CPU */
} l3k_decode_attn_args;

/* Key-range pieces per sequence on CUDA (1: no split, no workspace): a pure function of the sizes
 * (kernels/cuda/geometry.h), so capi sizes the workspace without a device. */
int64_t l3k_decode_attn_splits(int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t seq_q,
                               int64_t capacity);

/* Workspace bytes of the decode attention: on_cuda == 0: 0.  On CUDA, with S = the splits above:
 * 0 when S == 1, else round_up(S * B * H * seq_q * (D + 2) * 4, 256).  The caller has checked that
 * the product fits in int64. */
size_t l3k_decode_attn_workspace_bytes(int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t seq_q,
                                       int64_t capacity, int64_t head_dim, int on_cuda);

/* CPU reference (OpenMP).  Return 0, or 1 if host scratch could not be allocated. */
int l3k_cpu_kv_append(const l3k_kv_append_args *a);
int l3k_cpu_decode_attn(const l3k_decode_attn_args *a);

/* CUDA: enqueue on stream (a cudaStream_t; NULL = legacy default); never allocate, never
 * synchronize, safe under graph capture.  Return a cudaError_t value (0 = cudaSuccess). */
int l3k_cuda_kv_append(const l3k_kv_append_args *a, void *stream);
int l3k_cuda_decode_attn(const l3k_decode_attn_args *a, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* L3K_KERNELS_KV_CACHE_H */
