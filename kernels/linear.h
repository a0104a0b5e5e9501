/* Internal GEMM interface: D = alpha * op(A) op(B) + beta * C, column-major, as
 * cuBLAS sees it.  capi/linear.c maps the row-major DLTensors of the linear
 * layer onto it (y^T = W x^T and the two backward products). */
#ifndef L3K_LINEAR_H_
#define L3K_LINEAR_H_

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int trans_a, trans_b; /* 1: op(X) = X^T */
    int64_t m, n, k;      /* op(A) is m x k, op(B) is k x n, D is m x n */
    const void *a;
    int64_t lda; /* stored (trans_a ? k x m : m x k), column-major */
    const void *b;
    int64_t ldb; /* stored (trans_b ? n x k : k x n) */
    const void *c;
    int64_t ldc; /* optional when beta == 0; same dtype as d; may equal d (then ldc == ldd) */
    void *d;
    int64_t ldd;
    l3k_dt ab_dtype, cd_dtype; /* cd_dtype: ab_dtype or float32 */
    float alpha, beta;
    void *workspace;
    size_t workspace_bytes;
} l3k_gemm_args;

/* Workspace the CUDA GEMM may use: 32 MiB serves every algorithm cuBLASLt
 * picks on Hopper (split-K for small shapes included). */
#define L3K_GEMM_WORKSPACE_BYTES ((size_t)32 << 20)

int l3k_cpu_gemm(const l3k_gemm_args *g);
/* Returns 0, a cudaError_t (> 0), -(cublasStatus_t) for a cuBLAS failure, or
 * L3K_GEMM_NO_CUBLASLT when cuBLASLt could not be opened (l3k_cublaslt_error() says why). */
int l3k_cuda_gemm(const l3k_gemm_args *g, void *stream);

/* Below every -(cublasStatus_t). */
#define L3K_GEMM_NO_CUBLASLT (-1000)

/* CUDA builds: why cuBLASLt could not be opened, naming every place it was looked for
 * (kernels/cuda/cublaslt_search.h), at most L3K_SEARCH_ERROR bytes; "" when it was opened. */
const char *l3k_cublaslt_error(void);

#ifdef __cplusplus
}
#endif
#endif /* L3K_LINEAR_H_ */
