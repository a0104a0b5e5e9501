/* cuBLASLt, opened at the first CUDA GEMM instead of linked.
 *
 * A wheel cannot know where its user's cuBLASLt lives (the CUDA toolkit, a pip
 * package next to it, or the copy PyTorch has already loaded), and CPU-only use
 * needs none at all; so libl3k.so does not list it as a dependency and calls it
 * through this table. */
#ifndef L3K_CUBLASLT_LOAD_H_
#define L3K_CUBLASLT_LOAD_H_

#include <cublasLt.h>

struct l3k_cublaslt_api {
    decltype(&cublasLtCreate) Create;
    decltype(&cublasLtMatmul) Matmul;
    decltype(&cublasLtMatmulAlgoGetHeuristic) MatmulAlgoGetHeuristic;
    decltype(&cublasLtMatmulDescCreate) MatmulDescCreate;
    decltype(&cublasLtMatmulDescDestroy) MatmulDescDestroy;
    decltype(&cublasLtMatmulDescSetAttribute) MatmulDescSetAttribute;
    decltype(&cublasLtMatmulPreferenceCreate) MatmulPreferenceCreate;
    decltype(&cublasLtMatmulPreferenceDestroy) MatmulPreferenceDestroy;
    decltype(&cublasLtMatmulPreferenceSetAttribute) MatmulPreferenceSetAttribute;
    decltype(&cublasLtMatrixLayoutCreate) MatrixLayoutCreate;
    decltype(&cublasLtMatrixLayoutDestroy) MatrixLayoutDestroy;
};

/* The entry points, or NULL when no cuBLASLt of the build's major version could be
 * opened (l3k_cublaslt_error(), declared in linear.h for the C side, says where it looked).
 * Looked for once per process, at the first call. */
const l3k_cublaslt_api *l3k_cublaslt(void);

#endif /* L3K_CUBLASLT_LOAD_H_ */
