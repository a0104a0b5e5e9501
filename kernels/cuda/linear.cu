/* The GEMMs of the block through cuBLASLt.
 *
 * One cuBLASLt handle per device, created on first use and kept for the life
 * of the process (a handle is not tied to a stream and holds no workspace;
 * cuBLASLt is thread safe).  The workspace is the caller's, so nothing is
 * allocated here and calls are safe inside CUDA graph capture once the
 * handle exists.  The algorithm is cuBLASLt's first heuristic pick for the
 * exact shape, strides and pointer alignments (cuBLASLt caches those queries). */
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <mutex>

#include "linear.h"

namespace {

constexpr int kMaxDevices = 64;
cublasLtHandle_t g_handles[kMaxDevices];
std::mutex g_handle_mutex;

int handle_for_current_device(cublasLtHandle_t *out) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return (int)err;
    if (dev < 0 || dev >= kMaxDevices) return (int)cudaErrorInvalidDevice;
    std::lock_guard<std::mutex> lock(g_handle_mutex);
    if (!g_handles[dev]) {
        cublasStatus_t st = cublasLtCreate(&g_handles[dev]);
        if (st != CUBLAS_STATUS_SUCCESS) return -(int)st;
    }
    *out = g_handles[dev];
    return 0;
}

cudaDataType_t cuda_type(l3k_dt dt) {
    return dt == L3K_DT_F32 ? CUDA_R_32F : dt == L3K_DT_F16 ? CUDA_R_16F : CUDA_R_16BF;
}

/* Largest power of two <= 256 dividing the address: what the kernels may assume. */
uint32_t alignment_of(const void *p) {
    uint32_t a = 256;
    while (a > 1 && ((uintptr_t)p % a) != 0) a /= 2;
    return a;
}

/* Owns the descriptors of one call; destroys them on scope exit. */
struct Descriptors {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    ~Descriptors() {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (d) cublasLtMatrixLayoutDestroy(d);
        if (c) cublasLtMatrixLayoutDestroy(c);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (op) cublasLtMatmulDescDestroy(op);
    }
};

#define LT_TRY(expr)                                              \
    do {                                                          \
        cublasStatus_t st_ = (expr);                              \
        if (st_ != CUBLAS_STATUS_SUCCESS) return -(int)st_;       \
    } while (0)

} // namespace

extern "C" int l3k_cuda_gemm(const l3k_gemm_args *g, void *stream) {
    if (g->k == 0) { /* an empty sum: D = beta * C, i.e. zero or left as it is */
        if (g->beta != 0.0f && g->c == g->d) return 0;
        const size_t es = g->cd_dtype == L3K_DT_F32 ? 4 : 2;
        return (int)cudaMemset2DAsync(g->d, (size_t)g->ldd * es, 0, (size_t)g->m * es, (size_t)g->n,
                                      (cudaStream_t)stream);
    }
    cublasLtHandle_t handle;
    int err = handle_for_current_device(&handle);
    if (err) return err;

    Descriptors ds;
    const cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
    LT_TRY(cublasLtMatmulDescCreate(&ds.op, compute, CUDA_R_32F));
    const int32_t ta = g->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    LT_TRY(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_TRY(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));

    const cudaDataType_t ab = cuda_type(g->ab_dtype), cd = cuda_type(g->cd_dtype);
    LT_TRY(cublasLtMatrixLayoutCreate(&ds.a, ab, g->trans_a ? g->k : g->m, g->trans_a ? g->m : g->k, g->lda));
    LT_TRY(cublasLtMatrixLayoutCreate(&ds.b, ab, g->trans_b ? g->n : g->k, g->trans_b ? g->k : g->n, g->ldb));
    LT_TRY(cublasLtMatrixLayoutCreate(&ds.d, cd, g->m, g->n, g->ldd));
    const bool has_c = g->beta != 0.0f && g->c;
    const void *c = has_c ? g->c : g->d;
    if (has_c && (c != g->d || g->ldc != g->ldd)) {
        LT_TRY(cublasLtMatrixLayoutCreate(&ds.c, cd, g->m, g->n, g->ldc));
    }
    cublasLtMatrixLayout_t cdesc = ds.c ? ds.c : ds.d;

    LT_TRY(cublasLtMatmulPreferenceCreate(&ds.pref));
    const uint64_t ws = g->workspace ? g->workspace_bytes : 0;
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    const uint32_t al[4] = {alignment_of(g->a), alignment_of(g->b), alignment_of(c), alignment_of(g->d)};
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], 4));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], 4));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], 4));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[3], 4));

    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, ds.op, ds.a, ds.b, cdesc, ds.d, ds.pref, 1, &result, &found));
    if (found < 1) return -(int)CUBLAS_STATUS_NOT_SUPPORTED;

    const float alpha = g->alpha, beta = has_c ? g->beta : 0.0f;
    LT_TRY(cublasLtMatmul(handle, ds.op, &alpha, g->a, ds.a, g->b, ds.b, &beta, c, cdesc, g->d, ds.d,
                          &result.algo, g->workspace, g->workspace ? g->workspace_bytes : 0,
                          (cudaStream_t)stream));
    return 0;
}
