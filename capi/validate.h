/* Internal: argument validation shared by every op of the C ABI.
 *
 * Each check names the op and the argument in its message, so a failing call
 * tells the user exactly what to fix.  All checks run before any launch. */
#ifndef L3K_VALIDATE_H_
#define L3K_VALIDATE_H_

#include "l3k.h"
#include "kernels.h"

/* The op being validated and the device its tensors must share. */
typedef struct {
    const char *op;
    int have_device;
    DLDevice device;
} l3k_call;

/* A tensor seen as `rows` rows of `n` contiguous elements, row r at data + r * row_stride. */
typedef struct {
    void *data;
    int64_t rows, n, row_stride;
    int vec16; /* every row start is 16-byte aligned and n * elem is a multiple of 16 */
} l3k_rows;

/* Record the message "<op>: <fmt...>" as this thread's last error; return `status`. */
l3k_status l3k_fail(const l3k_call *c, l3k_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Human-readable name of a DLPack dtype ("bfloat16", "int32", "float64x4"). */
const char *l3k_dtype_name(DLDataType dt, char buf[32]);

/* Overflow-checked int64 arithmetic: 1 when the exact result fits (stored in *out). */
int l3k_mul_ok(int64_t a, int64_t b, int64_t *out);
int l3k_add_ok(int64_t a, int64_t b, int64_t *out);

/* *out = a * b (or a + b) for sizes a, b >= 0, or an L3K_ERROR_SHAPE failure
 * "<op>: <what> = a * b, expected at most 2^63 - 1".  Every size a call derives
 * from several tensors (B * H * Sq, workspace bytes) goes through these. */
l3k_status l3k_size_mul(l3k_call *c, const char *what, int64_t a, int64_t b, int64_t *out);
l3k_status l3k_size_add(l3k_call *c, const char *what, int64_t a, int64_t b, int64_t *out);

/* Element count; 0 when any size is 0; INT64_MAX when the product overflows
 * (only for a tensor l3k_check_tensor refuses). */
int64_t l3k_numel(const DLTensor *t);
int64_t l3k_stride(const DLTensor *t, int i); /* in elements; compact row-major when strides is NULL */
void *l3k_data(const DLTensor *t);            /* data + byte_offset; NULL when data is NULL */
void *l3k_ptr_add(void *p, int64_t bytes);    /* p + bytes; NULL stays NULL */

/* numel * element size (saturating at INT64_MAX). */
size_t l3k_tensor_bytes(const DLTensor *t);

/* Non-NULL tensor with a shape, data non-NULL unless empty, on a supported
 * device that matches the call's other tensors (the first checked sets it).
 * Its element count, the element offsets its strides reach and their byte
 * range fit in int64, and data + byte_offset plus that range stays in
 * [0, 2^63): no size or address a kernel derives from it can overflow. */
l3k_status l3k_check_tensor(l3k_call *c, const DLTensor *t, const char *name);

/* float32 / float16 / bfloat16, element-aligned data pointer. */
l3k_status l3k_check_float(l3k_call *c, const DLTensor *t, const char *name, l3k_dt *dt);

/* dtype equal to `want` (the dtype of `like`). */
l3k_status l3k_check_dtype(l3k_call *c, const DLTensor *t, const char *name, l3k_dt want, const char *like);

/* Same ndim and sizes as `ref`. */
l3k_status l3k_check_same_shape(l3k_call *c, const DLTensor *t, const char *name, const DLTensor *ref,
                                const char *ref_name);

/* Last dim contiguous and leading dims flatten to one row stride.  rows is the
 * product of the leading dims, also when the last dim is 0 (then any strides
 * do, as when rows is 0). */
l3k_status l3k_check_rows(l3k_call *c, const DLTensor *t, const char *name, l3k_rows *out);

/* Contiguous (compact row-major), exactly `numel` elements. */
l3k_status l3k_check_contiguous_numel(l3k_call *c, const DLTensor *t, const char *name, int64_t numel);

/* l3k_check_tensor, and dtype exactly `want` ("<name> dtype int64, expected int32"). */
l3k_status l3k_check_exact_dtype(l3k_call *c, const DLTensor *t, const char *name, DLDataType want);

/* Contiguous, `numel` elements, the data pointer aligned to the element size. */
l3k_status l3k_check_packed(l3k_call *c, const DLTensor *t, const char *name, int64_t numel);

/* float32, contiguous, `numel` elements, 4-byte aligned (rstd, lse). */
l3k_status l3k_check_f32_vector(l3k_call *c, const DLTensor *t, const char *name, int64_t numel);

/* Workspace: present when bytes > 0, contiguous, at least `bytes` long, 16-byte
 * aligned.  A workspace given when bytes is 0 must still be a valid tensor of
 * the call's device. */
l3k_status l3k_check_workspace(l3k_call *c, const DLTensor *t, size_t bytes);

/* eps finite and >= 0. */
l3k_status l3k_check_eps(l3k_call *c, float eps);

/* A head_dim the attention kernels take: a multiple of 8 in [8, 256].  `what` names where it
 * comes from ("head_dim", "k_cache head_dim", "head_dim (dim / n_heads)"). */
l3k_status l3k_check_head_dim(l3k_call *c, const char *what, int64_t head_dim);

/* An output must not repeat elements (stride 0 over a dim longer than 1: threads writing one
 * element at once would race); a tensor with no element passes. */
l3k_status l3k_check_no_repeats(l3k_call *c, const DLTensor *t, const char *name);

/* Byte range [lo, hi) spanned by a strided tensor's elements (lo == hi when empty). */
void l3k_byte_range(const DLTensor *t, uintptr_t *lo, uintptr_t *hi);

/* 1 when a and b are the very same view: data + byte_offset, shape and the
 * strides of every dim longer than 1 agree. */
int l3k_same_view(const DLTensor *a, const DLTensor *b);

/* An output must be the very same view as input `in` (in place, allowed when
 * allow_same) or share no byte with it.  A simple byte-range test: views that
 * interleave without sharing elements are rejected too. */
l3k_status l3k_check_no_overlap(l3k_call *c, const DLTensor *out, const char *out_name, const DLTensor *in,
                                const char *in_name, int allow_same);

/* 1 when two row views of `es`-byte elements share an element.  Exact for row
 * views with one row stride (e.g. the gate and up halves of one fused tensor
 * are disjoint); conservative (1 when unsure) otherwise. */
int l3k_rows_overlap(const l3k_rows *a, const l3k_rows *b, size_t es);

/* Row-view form of l3k_check_no_overlap, exact for interleaved rows. */
l3k_status l3k_check_rows_no_overlap(l3k_call *c, const l3k_rows *out, const char *out_name,
                                     const l3k_rows *in, const char *in_name, size_t es, int allow_same);

/* A (batch, heads, seq, head_dim) tensor of dtype dt (not checked when `like` is NULL: then only a
 * tensor), last dim contiguous; on CUDA the kernels load 16-byte vectors, so the data pointer must
 * be 16-byte aligned and every stride a multiple of 8 elements.  strides[] gets the first three
 * (capi/attention.c). */
l3k_status l3k_check_bhsd(l3k_call *c, const DLTensor *t, const char *name, l3k_dt dt, const char *like,
                          int64_t strides[3]);

/* A key or cache range tensor (not NULL): int32 (batch, 2), contiguous, 4-byte aligned, on the
 * call's device.  Its values are the kernels' to read (on the GPU they cannot be seen here without a
 * sync), and the kernels clamp them (capi/attention.c). */
l3k_status l3k_check_key_range(l3k_call *c, const DLTensor *kr, const char *name, int64_t batch);

/* A RoPE table, cos or sin: (rows, head_dim/2) or (batch or 1, rows, head_dim/2), contiguous,
 * float32 or dt (the dtype of `like`); *tdt gets its dtype, *rows its row count (capi/rope.c). */
l3k_status l3k_check_rope_table(l3k_call *c, const DLTensor *t, const char *name, l3k_dt dt, const char *like,
                                int64_t batch, int64_t half, l3k_dt *tdt, int64_t *rows);

/* While set (per thread), every op validates its arguments and returns without launching or
 * writing anything: a composite op (the block) checks all of its steps this way before it runs
 * the first, so that a refused call leaves every buffer as it was. */
void l3k_set_checking_only(int on);
int l3k_checking_only(void);

/* 1 when the call's tensors are on the GPU. */
int l3k_on_cuda(const l3k_call *c);

/* Run a CUDA launcher's result through the CUDA-build checks: make the call's
 * device current around the launch, translate a cudaError_t into a status. */
typedef int (*l3k_cuda_launch_fn)(const void *args, void *stream);
l3k_status l3k_cuda_launch(l3k_call *c, l3k_cuda_launch_fn fn, const void *args, void *stream);

/* The CUDA launcher `f`, or NULL in a build without CUDA (never reached there:
 * l3k_check_tensor rejects CUDA tensors first). */
#ifdef L3K_WITH_CUDA
#define L3K_CUDA_FN(f) ((l3k_cuda_launch_fn)(f))
#else
#define L3K_CUDA_FN(f) ((l3k_cuda_launch_fn)0)
#endif

/* A CPU kernel's return value as a status: nonzero when its host scratch could not be allocated. */
static inline l3k_status l3k_cpu_result(const l3k_call *c, int rc) {
    return rc ? l3k_fail(c, L3K_ERROR_INTERNAL, "host scratch allocation failed") : L3K_SUCCESS;
}

/* Run the kernel pair l3k_cpu_<k> / l3k_cuda_<k> on argument block `args` on the call's device
 * (the CUDA one through l3k_cuda_launch); nothing while checking only. */
#define L3K_RUN_KERNEL(c, k, args, stream)                                                   \
    (l3k_checking_only() ? L3K_SUCCESS                                                       \
     : l3k_on_cuda(c)    ? l3k_cuda_launch((c), L3K_CUDA_FN(l3k_cuda_##k), (args), (stream)) \
                         : l3k_cpu_result((c), l3k_cpu_##k(args)))

/* Return early from the enclosing function on a failing status. */
#define L3K_TRY(expr)                        \
    do {                                     \
        l3k_status l3k_try_st_ = (expr);     \
        if (l3k_try_st_) return l3k_try_st_; \
    } while (0)
#endif /* L3K_VALIDATE_H_ */
