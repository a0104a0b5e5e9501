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

#endif /* L3K_CUDA_GEOMETRY_H_ */
