/* Internal kernel interface: raw pointers, sizes and strides, no policy.
 *
 * capi/ validates every argument before it calls anything declared here, so the
 * kernels trust their inputs.  CPU entry points return 0.  CUDA entry points only
 * enqueue work on the given stream and return a cudaError_t value (0 = success);
 * they never allocate, synchronize or exit.  Strides and sizes are in elements,
 * 64-bit throughout. */
#ifndef L3K_KERNELS_H_
#define L3K_KERNELS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of the floating-point tensors a kernel reads and writes. */
typedef enum { L3K_DT_F32 = 0, L3K_DT_F16 = 1, L3K_DT_BF16 = 2 } l3k_dt;

static inline size_t l3k_dt_size(l3k_dt dt) { return dt == L3K_DT_F32 ? 4 : 2; }

/* ---- RMSNorm ----------------------------------------------------------------
 * x, y (and dy, dx) are `rows` rows of `n` elements; row r starts at
 * ptr + r * row_stride.  Optionally fuses a residual add in front of the norm:
 * when `residual` is non-NULL, h = x + residual is normalized and written to
 * `h_out` (row stride h_stride).  weight has n elements of the same dtype.
 * rstd (optional) receives rows float32 values, 1 / sqrt(mean(h^2) + eps). */
typedef struct {
    const void *x;
    int64_t x_stride;
    const void *residual;
    int64_t residual_stride; /* optional */
    void *h_out;
    int64_t h_stride; /* required iff residual */
    const void *weight;
    void *y;
    int64_t y_stride;
    float *rstd; /* optional */
    int64_t rows, n;
    float eps;
    l3k_dt dtype;
} l3k_rmsnorm_fwd_args;

/* dx = d/dx of sum(dy * y) (+ dh_in, the gradient arriving at h directly when
 * the residual add was fused: it is added to dx, which then serves as both the
 * gradient of x and of the residual).  dweight (optional) receives the sum over
 * rows of dy * x * rstd, accumulated in float32 in `partials` (workspace) and
 * reduced in a fixed order: the result is deterministic.  rstd may be NULL: it
 * is recomputed from x. */
typedef struct {
    const void *dy;
    int64_t dy_stride;
    const void *dh_in;
    int64_t dh_in_stride; /* optional */
    const void *x;
    int64_t x_stride; /* the normalized input (h when fused) */
    const void *weight;
    const float *rstd; /* optional */
    void *dx;
    int64_t dx_stride;
    void *dweight;   /* optional */
    float *partials; /* workspace, see l3k_rmsnorm_bwd_partials */
    int64_t rows, n;
    float eps;
    l3k_dt dtype;
} l3k_rmsnorm_bwd_args;

/* Number of float32 partial dweight rows (n floats each) the backward keeps in
 * `partials`: the workspace size, a pure function of the shape that holds for
 * both backends, so capi/ answers the size query without a device.  The CUDA
 * launch geometry behind it lives in kernels/cuda/geometry.h. */
int64_t l3k_rmsnorm_bwd_partials(int64_t rows, int64_t n);

int l3k_cpu_rmsnorm_fwd(const l3k_rmsnorm_fwd_args *a);
int l3k_cpu_rmsnorm_bwd(const l3k_rmsnorm_bwd_args *a);
int l3k_cuda_rmsnorm_fwd(const l3k_rmsnorm_fwd_args *a, void *stream);
int l3k_cuda_rmsnorm_bwd(const l3k_rmsnorm_bwd_args *a, void *stream);

/* ---- RoPE -------------------------------------------------------------------
 * Rotates q (batch, hq, seq, head_dim) and, when hk > 0, k (batch, hk, seq,
 * head_dim) in one pass.  Element (b, h, s, i) of a tensor is at
 * ptr + b * s[0] + h * s[1] + s * s[2] + i (strides s[] in elements, any sign);
 * an output may be the very same view as its input (in place).
 * Pair p in [0, head_dim/2) is (p, p + head_dim/2) (rotate-half) or
 * (2p, 2p + 1) (interleaved); with c = cos[t][p], s = sin[t][p] (s negated
 * when `inverse`) and t = token + offset:
 *   out1 = x1 * c - x2 * s;  out2 = x2 * c + x1 * s   (float32 arithmetic).
 * cos/sin are contiguous tables of head_dim/2 columns; batch b uses rows from
 * cos + b * table_batch_stride (0: one table shared by all batches). */
typedef struct {
    const void *q;
    int64_t q_strides[3];
    void *q_out;
    int64_t q_out_strides[3];
    const void *k;
    int64_t k_strides[3]; /* optional (hk == 0) */
    void *k_out;
    int64_t k_out_strides[3];
    const void *cos, *sin;
    int64_t table_batch_stride;
    int64_t batch, hq, hk, seq, head_dim, offset;
    int interleaved, inverse;
    l3k_dt dtype, table_dtype; /* table_dtype: float32 or dtype */
} l3k_rope_args;

int l3k_cpu_rope(const l3k_rope_args *a);
int l3k_cuda_rope(const l3k_rope_args *a, void *stream);

/* ---- Cross-entropy -----------------------------------------------------------
 * For each of `rows` rows of `n` logits (row r at logits + r * logits_stride):
 * lse = log(sum exp), loss[r] = lse - logit[target[r]], and dlogits (row stride
 * dlogits_stride, possibly the very same rows as logits) = (softmax - onehot) * scale,
 * scale = *grad_scale (device memory) or 1 when grad_scale is NULL.  A row whose
 * target is ignore_index: loss 0, dlogits 0; a target outside [0, n) otherwise:
 * loss and dlogits NaN.  Float32 arithmetic; each row is read in full before any of
 * its dlogits is written. */
typedef struct {
    int64_t rows, n; /* rows of n logits each */
    l3k_dt dtype;
    const void *logits;
    void *dlogits; /* may be logits itself */
    int64_t logits_stride, dlogits_stride;
    const int64_t *target;
    int64_t ignore_index;
    const float *grad_scale; /* optional */
    float *loss;
} l3k_cross_entropy_args;

int l3k_cpu_cross_entropy(const l3k_cross_entropy_args *a);
int l3k_cuda_cross_entropy(const l3k_cross_entropy_args *a, void *stream);

/* ---- SwiGLU activation ------------------------------------------------------
 * Row views as for RMSNorm: `rows` rows of `n` elements, row r at
 * ptr + r * stride.  Forward: a = silu(g) * u.  Backward, silu recomputed
 * from g, sig = sigmoid(g):
 *   dg = da * u * sig * (1 + g * (1 - sig)),  du = da * silu(g),
 *   a_out (optional) = silu(g) * u.
 * Every element reads all its inputs before it writes: an output may be the
 * very same view as an input.  The fused gate_up layout is expressed by
 * pointers: g = gu, u = gu + n, both with gu's row stride. */
typedef struct {
    const void *g;
    int64_t g_stride;
    const void *u;
    int64_t u_stride;
    void *a;
    int64_t a_stride;
    int64_t rows, n;
    l3k_dt dtype;
} l3k_swiglu_fwd_args;

typedef struct {
    const void *da;
    int64_t da_stride;
    const void *g;
    int64_t g_stride;
    const void *u;
    int64_t u_stride;
    void *dg;
    int64_t dg_stride;
    void *du;
    int64_t du_stride;
    void *a_out;
    int64_t a_out_stride; /* optional */
    int64_t rows, n;
    l3k_dt dtype;
} l3k_swiglu_bwd_args;

int l3k_cpu_swiglu_fwd(const l3k_swiglu_fwd_args *a);
int l3k_cpu_swiglu_bwd(const l3k_swiglu_bwd_args *a);
int l3k_cuda_swiglu_fwd(const l3k_swiglu_fwd_args *a, void *stream);
int l3k_cuda_swiglu_bwd(const l3k_swiglu_bwd_args *a, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* L3K_KERNELS_H_ */
