/* GEMM reference on the CPU: column-major D = alpha op(A) op(B) + beta C, float
 * accumulation, OpenMP over the columns of D.  Plain loops: it is the spec the
 * cuBLASLt path is tested against on small shapes, not a fast CPU GEMM. */
#include "convert.h"
#include "linear.h"

int l3k_cpu_gemm(const l3k_gemm_args *g) {
    const int64_t m = g->m, n = g->n, k = g->k;
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = 0; i < m; ++i) {
            float acc = 0.0f;
            for (int64_t l = 0; l < k; ++l) {
                const int64_t ia = g->trans_a ? l + i * g->lda : i + l * g->lda;
                const int64_t ib = g->trans_b ? j + l * g->ldb : l + j * g->ldb;
                acc += l3k_load(g->a, ia, g->ab_dtype) * l3k_load(g->b, ib, g->ab_dtype);
            }
            float v = g->alpha * acc;
            /* beta * C added before the single rounding to D, as cuBLASLt does out of place */
            if (g->beta != 0.0f) v += g->beta * l3k_load(g->c, i + j * g->ldc, g->cd_dtype);
            l3k_store(g->d, i + j * g->ldd, v, g->cd_dtype);
        }
    }
    return 0;
}
