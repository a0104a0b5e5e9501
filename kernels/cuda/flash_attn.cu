/* The attention entry points: which kernel runs where.
 *
 * Contract: kernels/attention.h. Forward: the wgmma kernel (flash_fwd_sm90.cu) where this GPU and
 * build have it and 64 < head_dim <= 128, else mma.sync (flash_fwd_sm80.cu). Backward, in order:
 * preprocess, main kernel (wgmma, flash_bwd_sm90.cu, where available in the default mode; else
 * mma.sync, flash_bwd_sm80.cu), then the dq convert kernel or, deterministic, the dq kernel. */
#include "attention.h"
#include "common.cuh"

namespace {

inline size_t round256(size_t x) { return (x + 255u) & ~(size_t)255u; }

bool shape_ok(const l3k_attn_fwd_args &a) {
    return a.head_dim > 0 && a.head_dim <= 256 && a.head_dim % 8 == 0 && a.n_kv_heads > 0 &&
           a.n_heads % a.n_kv_heads == 0 && (a.dtype == L3K_DT_F16 || a.dtype == L3K_DT_BF16);
}

/* variant 0: default (the wgmma main kernel of flash_bwd_sm90.cu where this GPU and build
 * have it, non-deterministic mode, head_dim <= 128); 1: always the mma.sync main kernel. */
cudaError_t bwd_dispatch(const l3k_attn_bwd_args &a, void *s, int variant) {
    const size_t rows = (size_t)(a.f.batch * a.f.n_heads * a.f.seq_q);
    float *dsum = static_cast<float *>(a.workspace);
    float *dqacc = a.deterministic
                       ? nullptr
                       : reinterpret_cast<float *>(static_cast<char *>(a.workspace) + round256(rows * 4));
    cudaError_t e;
    int dq_tiled = 0; /* dqacc layout left by the main kernel (attention.h, l3k_cuda_attn_bwd_main_sm90) */
    if (rows > 0) {
        if ((e = (cudaError_t)l3k_cuda_attn_bwd_pre(&a, dsum, dqacc, s)) != cudaSuccess) return e;
    }
    if (a.f.seq_k > 0) {
        if (a.deterministic) {
            e = (cudaError_t)l3k_cuda_attn_bwd_main_sm80(&a, dsum, dqacc, s);
        } else {
            e = variant == 1 ? cudaErrorNotSupported
                             : (cudaError_t)l3k_cuda_attn_bwd_main_sm90(&a, dsum, dqacc, s);
            if (e == cudaSuccess) dq_tiled = 1;
            if (e == cudaErrorNotSupported) /* not an sm_90a build on H100, or head_dim > 128 */
                e = (cudaError_t)l3k_cuda_attn_bwd_main_sm80(&a, dsum, dqacc, s);
        }
        if (e != cudaSuccess) return e;
    }
    if (rows == 0) return cudaSuccess;
    if (a.deterministic) return (cudaError_t)l3k_cuda_attn_bwd_dq_sm80(&a, dsum, s);
    return (cudaError_t)l3k_cuda_attn_bwd_dq_convert(&a, dqacc, dq_tiled, s);
}

} // namespace

/* Tuning/testing hook (tools/attn_harness.py): 0 default (wgmma where available), 1 mma.sync
 * 8 warps, 2 mma.sync 4 warps. */
extern "C" int l3k_cuda_attn_fwd_variant(const l3k_attn_fwd_args *a, void *stream, int variant) {
    if (!a || !shape_ok(*a)) return (int)cudaErrorInvalidValue;
    if (a->batch <= 0 || a->n_heads <= 0 || a->seq_q <= 0) return (int)cudaSuccess;
    if (variant == 0) {
        const int rc = l3k_cuda_attn_fwd_sm90(a, stream);
        if (rc != (int)cudaErrorNotSupported) return rc;
    }
    return l3k_cuda_attn_fwd_sm80(a, stream, variant);
}

extern "C" int l3k_cuda_attn_fwd(const l3k_attn_fwd_args *a, void *stream) {
    return l3k_cuda_attn_fwd_variant(a, stream, 0);
}

/* Tuning/testing hook (tools/attn_harness.py): 0 default, 1 the mma.sync main kernel even on H100. */
extern "C" int l3k_cuda_attn_bwd_variant(const l3k_attn_bwd_args *a, void *stream, int variant) {
    if (!a || !shape_ok(a->f)) return (int)cudaErrorInvalidValue;
    const l3k_attn_fwd_args &f = a->f;
    if (f.batch <= 0 || f.n_heads <= 0) return (int)cudaSuccess;
    if (f.seq_q <= 0 && f.seq_k <= 0) return (int)cudaSuccess;
    const size_t need = l3k_attn_bwd_workspace_bytes(f.batch, f.n_heads, f.n_kv_heads, f.seq_q, f.seq_k,
                                                     f.head_dim, a->deterministic, 1);
    if (need > 0 && (a->workspace == nullptr || a->workspace_bytes < need)) return (int)cudaErrorInvalidValue;
    return (int)bwd_dispatch(*a, stream, variant);
}

extern "C" int l3k_cuda_attn_bwd(const l3k_attn_bwd_args *a, void *stream) {
    return l3k_cuda_attn_bwd_variant(a, stream, 0);
}
