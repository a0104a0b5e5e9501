/* Workspace sizes of the CUDA kernels (kernels.h), from their launch geometry (geometry.h).
 * Plain C, built in every configuration: capi/ and the CPU reference use the same sizes. */
#include "kernels.h"

#include "geometry.h"
#include "kv_cache.h"

/* One partial row per backward block. */
int64_t l3k_rmsnorm_bwd_partials(int64_t rows, int64_t n) {
    int64_t r = l3k_rmsnorm_bwd_rows_per_block(n);
    int64_t blocks = (rows + r - 1) / r;
    return blocks < L3K_RMSNORM_BWD_MAX_PARTIALS ? blocks : L3K_RMSNORM_BWD_MAX_PARTIALS;
}

int64_t l3k_decode_attn_splits(int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t seq_q,
                               int64_t capacity) {
    return l3k_decode_splits_of(batch, n_heads, n_kv_heads, seq_q, capacity);
}

/* Per split and query row: D float32 partial outputs, then the row's running max and sum. */
size_t l3k_decode_attn_workspace_bytes(int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t seq_q,
                                       int64_t capacity, int64_t head_dim, int on_cuda) {
    if (!on_cuda || batch <= 0 || n_heads <= 0 || seq_q <= 0 || head_dim <= 0) return 0;
    const int64_t splits = l3k_decode_attn_splits(batch, n_heads, n_kv_heads, seq_q, capacity);
    if (splits == 1) return 0;
    const size_t bytes = (size_t)splits * (size_t)batch * (size_t)n_heads * (size_t)seq_q *
                         (size_t)(head_dim + 2) * 4u;
    return (bytes + 255u) & ~(size_t)255u;
}
