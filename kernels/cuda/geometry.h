/* Launch geometry of the CUDA kernels that a workspace size depends on, in plain C.
 *
 * sizes.c answers the size queries from it and is built in every configuration (the CPU-only
 * one too: capi/ sizes a workspace without a device, and the CPU reference partitions its work
 * the same way); rmsnorm.cu launches by it, so the size and the launch cannot disagree. */
#ifndef L3K_CUDA_GEOMETRY_H_
#define L3K_CUDA_GEOMETRY_H_

#include <stdint.h>

static inline int64_t l3k_pow2_ceil(int64_t v) {
    int64_t p = 1;
    while (p < v) p <<= 1;
    return p;
}

static inline int64_t l3k_clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

/* RMSNorm: a row is cut into slots of 8 elements; `group` threads (a power of two) share a row,
 * each holding a few slots in registers. */
static inline int64_t l3k_rmsnorm_group(int64_t n, int64_t slots_per_thread) {
    int64_t nslots = (n + 7) / 8;
    return l3k_clamp64(l3k_pow2_ceil((nslots + slots_per_thread - 1) / slots_per_thread), 32, 1024);
}

/* RMSNorm backward: groups of 32..L3K_RMSNORM_BWD_BLOCK threads, sized for L3K_RMSNORM_BWD_SLOTS
 * slots a thread; a block of L3K_RMSNORM_BWD_BLOCK threads holds one or several groups and owns
 * one partial dweight row; at most L3K_RMSNORM_BWD_MAX_PARTIALS blocks, so that every block is
 * resident at once on a large GPU. */
enum { L3K_RMSNORM_BWD_SLOTS = 1, L3K_RMSNORM_BWD_BLOCK = 512, L3K_RMSNORM_BWD_MAX_PARTIALS = 256 };

static inline int64_t l3k_rmsnorm_bwd_group(int64_t n) {
    int64_t g = l3k_rmsnorm_group(n, L3K_RMSNORM_BWD_SLOTS);
    return g < L3K_RMSNORM_BWD_BLOCK ? g : L3K_RMSNORM_BWD_BLOCK;
}

static inline int64_t l3k_rmsnorm_bwd_rows_per_block(int64_t n) {
    return L3K_RMSNORM_BWD_BLOCK / l3k_rmsnorm_bwd_group(n);
}

/* Decode attention (kv_cache.cu): a CTA takes up to L3K_DECODE_ROWS query rows of one kv head (its
 * H / Hkv query heads times the call's queries) over one piece of a sequence's keys.  Where the
 * CTAs without a split would not fill two waves of a large GPU (L3K_DECODE_TARGET_CTAS), each
 * sequence's keys are cut into more pieces, at most one per L3K_DECODE_MIN_KEYS slots of the
 * cache and at most L3K_DECODE_MAX_SPLITS. */
enum {
    L3K_DECODE_ROWS = 16,
    L3K_DECODE_TARGET_CTAS = 264,
    L3K_DECODE_MIN_KEYS = 128,
    L3K_DECODE_MAX_SPLITS = 128
};

static inline int64_t l3k_decode_row_groups(int64_t n_heads, int64_t n_kv_heads, int64_t seq_q) {
    return ((n_heads / n_kv_heads) * seq_q + L3K_DECODE_ROWS - 1) / L3K_DECODE_ROWS;
}

static inline int64_t l3k_decode_splits_of(int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t seq_q,
                                           int64_t capacity) {
    if (batch <= 0 || n_kv_heads <= 0 || seq_q <= 0 || capacity <= 0) return 1;
    const int64_t groups = l3k_decode_row_groups(n_heads, n_kv_heads, seq_q);
    /* ctas: capped before it can overflow; at the cap no split is wanted anyway */
    const int64_t ctas = batch > L3K_DECODE_TARGET_CTAS || n_kv_heads > L3K_DECODE_TARGET_CTAS ||
                                 groups > L3K_DECODE_TARGET_CTAS
                             ? L3K_DECODE_TARGET_CTAS
                             : batch * n_kv_heads * groups;
    if (ctas >= L3K_DECODE_TARGET_CTAS) return 1;
    const int64_t want = (L3K_DECODE_TARGET_CTAS + ctas - 1) / ctas;
    const int64_t by_keys = (capacity + L3K_DECODE_MIN_KEYS - 1) / L3K_DECODE_MIN_KEYS;
    return l3k_clamp64(want < by_keys ? want : by_keys, 1, L3K_DECODE_MAX_SPLITS);
}

#endif /* L3K_CUDA_GEOMETRY_H_ */
