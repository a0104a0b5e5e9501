/* Workspace sizes of the CUDA kernels (kernels.h), from their launch geometry (geometry.h).
 * Plain C, built in every configuration: capi/ and the CPU reference use the same sizes. */
#include "kernels.h"

#include "geometry.h"

/* One partial row per backward block. */
int64_t l3k_rmsnorm_bwd_partials(int64_t rows, int64_t n) {
    int64_t r = l3k_rmsnorm_bwd_rows_per_block(n);
    int64_t blocks = (rows + r - 1) / r;
    return blocks < L3K_RMSNORM_BWD_MAX_PARTIALS ? blocks : L3K_RMSNORM_BWD_MAX_PARTIALS;
}
