/* Argument validation shared by every op; see validate.h. */
#include <math.h>
#include <stdio.h>

#include "validate.h"

#ifdef L3K_WITH_CUDA
#include <cuda_runtime_api.h>

#include "linear.h" /* L3K_GEMM_NO_CUBLASLT, l3k_cublaslt_error */
#endif

static const char *device_name(DLDevice d, char buf[32]) {
    switch ((int)d.device_type) {
        case kDLCPU:
            snprintf(buf, 32, "cpu");
            break;
        case kDLCUDA:
            snprintf(buf, 32, "cuda:%d", (int)d.device_id);
            break;
        default:
            snprintf(buf, 32, "device type %d:%d", (int)d.device_type, (int)d.device_id);
    }
    return buf;
}

const char *l3k_dtype_name(DLDataType dt, char buf[32]) {
    const char *base = "unknown";
    switch (dt.code) {
        case kDLInt:
            base = "int";
            break;
        case kDLUInt:
            base = dt.bits == 1 ? "bool" : "uint";
            break;
        case kDLFloat:
            base = "float";
            break;
        case kDLBfloat:
            base = "bfloat";
            break;
        default:
            break;
    }
    if (dt.code == kDLUInt && dt.bits == 1) snprintf(buf, 32, "bool");
    else if (dt.lanes > 1) snprintf(buf, 32, "%s%ux%u", base, (unsigned)dt.bits, (unsigned)dt.lanes);
    else snprintf(buf, 32, "%s%u", base, (unsigned)dt.bits);
    return buf;
}

static const char *dt_name(l3k_dt dt) {
    return dt == L3K_DT_F32 ? "float32" : dt == L3K_DT_F16 ? "float16" : "bfloat16";
}

/* ---- Checked size arithmetic ----------------------------------------------- */

int l3k_mul_ok(int64_t a, int64_t b, int64_t *out) { return !__builtin_mul_overflow(a, b, out); }

int l3k_add_ok(int64_t a, int64_t b, int64_t *out) { return !__builtin_add_overflow(a, b, out); }

l3k_status l3k_size_mul(l3k_call *c, const char *what, int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0 || !l3k_mul_ok(a, b, out))
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s = %lld * %lld, expected at most 2^63 - 1", what, (long long)a,
                        (long long)b);
    return L3K_SUCCESS;
}

l3k_status l3k_size_add(l3k_call *c, const char *what, int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0 || !l3k_add_ok(a, b, out))
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s = %lld + %lld, expected at most 2^63 - 1", what, (long long)a,
                        (long long)b);
    return L3K_SUCCESS;
}

/* Element count of shape[lo:hi]: 0 when a size is 0 (whatever the others are),
 * -1 when the product passes INT64_MAX. */
static int64_t count_of(const DLTensor *t, int lo, int hi) {
    for (int i = lo; i < hi; ++i)
        if (t->shape[i] == 0) return 0;
    int64_t n = 1;
    for (int i = lo; i < hi; ++i)
        if (!l3k_mul_ok(n, t->shape[i], &n)) return -1;
    return n;
}

int64_t l3k_numel(const DLTensor *t) {
    const int64_t n = count_of(t, 0, t->ndim);
    return n < 0 ? INT64_MAX : n;
}

/* A NULL data pointer stays NULL (a zero-size tensor may have one): NULL +
 * byte_offset would be undefined.  Integer arithmetic, so that a descriptor
 * whose offset wraps is refused (l3k_check_tensor) rather than undefined. */
void *l3k_data(const DLTensor *t) {
    if (!t->data) return NULL;
    return (void *)((uintptr_t)t->data + (uintptr_t)t->byte_offset);
}

void *l3k_ptr_add(void *p, int64_t bytes) { return p ? (void *)((uintptr_t)p + (uintptr_t)bytes) : NULL; }

int64_t l3k_stride(const DLTensor *t, int i) {
    if (t->strides) return t->strides[i];
    /* Compact strides never overflow for a tensor with elements; for an empty
     * one they are never used. */
    const int64_t s = count_of(t, i + 1, t->ndim);
    return s < 0 ? 0 : s;
}

static size_t elem_bytes(const DLTensor *t) { return ((size_t)t->dtype.bits * t->dtype.lanes + 7) / 8; }

/* Lowest and highest element offsets a tensor with elements reaches; 0 when an
 * offset passes int64. */
static int offset_span(const DLTensor *t, int64_t *lo, int64_t *hi) {
    *lo = *hi = 0;
    for (int i = 0; i < t->ndim; ++i) {
        if (t->shape[i] <= 1) continue;
        int64_t span;
        if (!l3k_mul_ok(t->shape[i] - 1, l3k_stride(t, i), &span)) return 0;
        if (!l3k_add_ok(span < 0 ? *lo : *hi, span, span < 0 ? lo : hi)) return 0;
    }
    return 1;
}

static void shape_str(const DLTensor *t, char *buf, size_t cap);

static void strides_str(const DLTensor *t, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "(");
    for (int i = 0; i < t->ndim && n < cap; ++i)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %lld" : "%lld", (long long)l3k_stride(t, i));
    if (n < cap) snprintf(buf + n, cap - n, t->ndim == 1 ? ",)" : ")");
}

/* Every size, element offset and byte offset the kernels derive from `t` fits in
 * int64 (kernels index with plain int64 arithmetic), and its bytes lie in the
 * address space without wrapping around it (the overlap tests compare addresses):
 * below 2^63 for host memory (user-space addresses are), anywhere below 2^64 for
 * device memory, whose pointers can use the top bit (e.g. under compute-sanitizer). */
static l3k_status check_extent(l3k_call *c, const DLTensor *t, const char *name) {
    char a[256], b[256];
    const int64_t numel = count_of(t, 0, t->ndim);
    if (numel < 0) {
        shape_str(t, a, sizeof a);
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s shape %s has more than 2^63 - 1 elements", name, a);
    }
    const uint64_t base = (uint64_t)(uintptr_t)t->data;
    const uint64_t limit = t->device.device_type == kDLCPU ? (uint64_t)INT64_MAX : UINT64_MAX;
    if (t->data && (t->byte_offset > limit || base > limit - t->byte_offset))
        return l3k_fail(c, L3K_ERROR_LAYOUT, "%s data %p + byte_offset %llu, expected an address below %s",
                        name, t->data, (unsigned long long)t->byte_offset,
                        limit == UINT64_MAX ? "2^64" : "2^63");
    if (numel == 0) return L3K_SUCCESS;
    int64_t lo, hi, lo_b, hi_b;
    const int64_t es = (int64_t)elem_bytes(t);
    if (!offset_span(t, &lo, &hi) || !l3k_mul_ok(lo, es, &lo_b) || !l3k_add_ok(hi, 1, &hi) ||
        !l3k_mul_ok(hi, es, &hi_b)) {
        shape_str(t, a, sizeof a);
        strides_str(t, b, sizeof b);
        return l3k_fail(c, L3K_ERROR_LAYOUT,
                        "%s strides %s over shape %s reach past 2^63 - 1 bytes, expected a smaller extent",
                        name, b, a);
    }
    const uint64_t start = base + t->byte_offset; /* <= limit, checked above */
    if ((lo_b < 0 && (uint64_t)(-(lo_b + 1)) >= start) || (uint64_t)hi_b > limit - start) {
        shape_str(t, a, sizeof a);
        strides_str(t, b, sizeof b);
        return l3k_fail(c, L3K_ERROR_LAYOUT,
                        "%s at %p with strides %s over shape %s spans bytes [%lld, %lld) around it, "
                        "expected them inside the address space [0, %s)",
                        name, l3k_data(t), b, a, (long long)lo_b, (long long)hi_b,
                        limit == UINT64_MAX ? "2^64" : "2^63");
    }
    return L3K_SUCCESS;
}

l3k_status l3k_check_tensor(l3k_call *c, const DLTensor *t, const char *name) {
    char a[32], b[32];
    if (!t) return l3k_fail(c, L3K_ERROR_NULL_POINTER, "%s is NULL", name);
    if (t->ndim < 0 || (t->ndim > 0 && !t->shape))
        return l3k_fail(c, L3K_ERROR_NULL_POINTER, "%s has ndim %d and shape NULL", name, (int)t->ndim);
    for (int i = 0; i < t->ndim; ++i)
        if (t->shape[i] < 0)
            return l3k_fail(c, L3K_ERROR_SHAPE, "%s.shape[%d] is %lld, expected >= 0", name, i,
                            (long long)t->shape[i]);
    if (count_of(t, 0, t->ndim) < 0) return check_extent(c, t, name);
    if (!t->data && l3k_numel(t) > 0) return l3k_fail(c, L3K_ERROR_NULL_POINTER, "%s.data is NULL", name);
    if (t->dtype.bits == 0 || t->dtype.lanes == 0)
        return l3k_fail(c, L3K_ERROR_DTYPE, "%s dtype has %u bits and %u lanes, expected at least 1 of each",
                        name, (unsigned)t->dtype.bits, (unsigned)t->dtype.lanes);
    int type = (int)t->device.device_type;
    if (type != kDLCPU && type != kDLCUDA)
        return l3k_fail(c, L3K_ERROR_DEVICE, "%s is on %s, expected cpu or cuda", name,
                        device_name(t->device, a));
#ifndef L3K_WITH_CUDA
    if (type == kDLCUDA)
        return l3k_fail(c, L3K_ERROR_NO_CUDA, "%s is on %s but this library was built without CUDA", name,
                        device_name(t->device, a));
#endif
    if (!c->have_device) {
        c->have_device = 1;
        c->device = t->device;
    } else if (c->device.device_type != t->device.device_type ||
               (type == kDLCUDA && c->device.device_id != t->device.device_id)) {
        return l3k_fail(c, L3K_ERROR_DEVICE, "%s is on %s, expected %s like the other tensors", name,
                        device_name(t->device, a), device_name(c->device, b));
    }
    return check_extent(c, t, name);
}

l3k_status l3k_check_float(l3k_call *c, const DLTensor *t, const char *name, l3k_dt *dt) {
    char a[32];
    DLDataType d = t->dtype;
    if (d.lanes == 1 && d.code == kDLFloat && d.bits == 32) *dt = L3K_DT_F32;
    else if (d.lanes == 1 && d.code == kDLFloat && d.bits == 16) *dt = L3K_DT_F16;
    else if (d.lanes == 1 && d.code == kDLBfloat && d.bits == 16) *dt = L3K_DT_BF16;
    else
        return l3k_fail(c, L3K_ERROR_DTYPE, "%s dtype %s, expected float32, float16 or bfloat16", name,
                        l3k_dtype_name(d, a));
    if (((uintptr_t)l3k_data(t)) % l3k_dt_size(*dt) != 0)
        return l3k_fail(c, L3K_ERROR_ALIGNMENT, "%s data pointer %p is not aligned to its %zu-byte elements",
                        name, l3k_data(t), l3k_dt_size(*dt));
    return L3K_SUCCESS;
}

l3k_status l3k_check_dtype(l3k_call *c, const DLTensor *t, const char *name, l3k_dt want, const char *like) {
    char a[32];
    l3k_dt got = want;
    l3k_status st = l3k_check_float(c, t, name, &got);
    if (st == L3K_ERROR_DTYPE || (st == L3K_SUCCESS && got != want))
        return l3k_fail(c, L3K_ERROR_DTYPE, "%s dtype %s, expected %s like %s", name,
                        l3k_dtype_name(t->dtype, a), dt_name(want), like);
    return st;
}

static void shape_str(const DLTensor *t, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "(");
    for (int i = 0; i < t->ndim && n < cap; ++i)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, t->ndim == 1 ? ",)" : ")");
}

l3k_status l3k_check_same_shape(l3k_call *c, const DLTensor *t, const char *name, const DLTensor *ref,
                                const char *ref_name) {
    int same = t->ndim == ref->ndim;
    for (int i = 0; same && i < t->ndim; ++i) same = t->shape[i] == ref->shape[i];
    if (same) return L3K_SUCCESS;
    char a[256], b[256];
    shape_str(t, a, sizeof a);
    shape_str(ref, b, sizeof b);
    return l3k_fail(c, L3K_ERROR_SHAPE, "%s shape %s, expected %s like %s", name, a, b, ref_name);
}

l3k_status l3k_check_rows(l3k_call *c, const DLTensor *t, const char *name, l3k_rows *out) {
    if (t->ndim < 1) return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim 0, expected >= 1", name);
    int last = t->ndim - 1;
    out->data = l3k_data(t);
    out->n = t->shape[last];
    /* The leading dims' count even when rows are empty: x of shape (4, 0) has 4 rows. */
    out->rows = count_of(t, 0, last);
    if (out->rows < 0) { /* possible only with n == 0: t has no element, but no row count either */
        char a[256];
        shape_str(t, a, sizeof a);
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s shape %s has more than 2^63 - 1 rows", name, a);
    }
    if (out->rows == 0 || out->n == 0) { /* nothing is read or written: any strides will do */
        out->row_stride = out->n;
        out->vec16 = 0;
        return L3K_SUCCESS;
    }
    if (out->n > 1 && l3k_stride(t, last) != 1)
        return l3k_fail(c, L3K_ERROR_LAYOUT, "%s stride[%d] is %lld, expected 1 (last dim contiguous)", name,
                        last, (long long)l3k_stride(t, last));
    /* Leading dims must form one arithmetic sequence of rows; size-1 dims do not count. */
    int64_t row_stride = 0, expect = 0;
    int have = 0, expect_ok = 1;
    for (int i = last - 1; i >= 0; --i) {
        if (t->shape[i] == 1) continue;
        if (!have) {
            row_stride = l3k_stride(t, i);
            expect_ok = l3k_mul_ok(row_stride, t->shape[i], &expect);
            have = 1;
        } else if (!expect_ok) {
            return l3k_fail(c, L3K_ERROR_LAYOUT,
                            "%s stride[%d] is %lld, expected the stride of the dims after it times "
                            "their size, which passes 2^63 - 1: the leading dims must flatten to "
                            "rows of one stride",
                            name, i, (long long)l3k_stride(t, i));
        } else if (l3k_stride(t, i) != expect) {
            return l3k_fail(c, L3K_ERROR_LAYOUT,
                            "%s stride[%d] is %lld, expected %lld: the leading dims must "
                            "flatten to rows of one stride",
                            name, i, (long long)l3k_stride(t, i), (long long)expect);
        } else {
            expect_ok = l3k_mul_ok(expect, t->shape[i], &expect);
        }
    }
    if (!have) row_stride = out->n;
    if (out->rows > 1 && row_stride < out->n)
        return l3k_fail(c, L3K_ERROR_LAYOUT, "%s row stride %lld is below the row length %lld", name,
                        (long long)row_stride, (long long)out->n);
    out->row_stride = row_stride;
    /* In range: the row stride and the row length are within t's extent in bytes. */
    const size_t es = elem_bytes(t);
    out->vec16 = ((uintptr_t)out->data % 16 == 0) && ((size_t)out->n * es) % 16 == 0 &&
                 ((size_t)row_stride * es) % 16 == 0;
    return L3K_SUCCESS;
}

/* Compact row-major; an empty tensor is, whatever its strides. */
static int is_contiguous(const DLTensor *t) {
    if (!t->strides || l3k_numel(t) == 0) return 1;
    int64_t expect = 1; /* at most numel: no overflow */
    for (int i = t->ndim - 1; i >= 0; --i) {
        if (t->shape[i] != 1 && t->strides[i] != expect) return 0;
        expect *= t->shape[i];
    }
    return 1;
}

l3k_status l3k_check_contiguous_numel(l3k_call *c, const DLTensor *t, const char *name, int64_t numel) {
    if (l3k_numel(t) != numel)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s has %lld elements, expected %lld", name,
                        (long long)l3k_numel(t), (long long)numel);
    if (!is_contiguous(t))
        return l3k_fail(c, L3K_ERROR_LAYOUT, "%s is not contiguous, expected compact row-major", name);
    return L3K_SUCCESS;
}

l3k_status l3k_check_exact_dtype(l3k_call *c, const DLTensor *t, const char *name, DLDataType want) {
    char a[32], b[32];
    L3K_TRY(l3k_check_tensor(c, t, name));
    if (t->dtype.code != want.code || t->dtype.bits != want.bits || t->dtype.lanes != want.lanes)
        return l3k_fail(c, L3K_ERROR_DTYPE, "%s dtype %s, expected %s", name, l3k_dtype_name(t->dtype, a),
                        l3k_dtype_name(want, b));
    return L3K_SUCCESS;
}

l3k_status l3k_check_packed(l3k_call *c, const DLTensor *t, const char *name, int64_t numel) {
    const unsigned es = (unsigned)elem_bytes(t);
    L3K_TRY(l3k_check_contiguous_numel(c, t, name, numel));
    if (es > 1 && (uintptr_t)l3k_data(t) % es != 0)
        return l3k_fail(c, L3K_ERROR_ALIGNMENT, "%s data pointer %p is not %u-byte aligned", name,
                        l3k_data(t), es);
    return L3K_SUCCESS;
}

l3k_status l3k_check_f32_vector(l3k_call *c, const DLTensor *t, const char *name, int64_t numel) {
    L3K_TRY(l3k_check_exact_dtype(c, t, name, (DLDataType){kDLFloat, 32, 1}));
    return l3k_check_packed(c, t, name, numel);
}

size_t l3k_tensor_bytes(const DLTensor *t) {
    /* numel * element size is within the extent that l3k_check_tensor bounds;
     * saturate for a tensor that skipped it. */
    int64_t bytes;
    if (!l3k_mul_ok(l3k_numel(t), (int64_t)((size_t)t->dtype.bits * t->dtype.lanes / 8), &bytes))
        return (size_t)INT64_MAX;
    return (size_t)bytes;
}

l3k_status l3k_check_workspace(l3k_call *c, const DLTensor *t, size_t bytes) {
    /* A workspace given where none is needed is still a tensor of this call. */
    if (bytes == 0) return t ? l3k_check_tensor(c, t, "workspace") : L3K_SUCCESS;
    if (!t) return l3k_fail(c, L3K_ERROR_WORKSPACE, "workspace is NULL, expected %zu bytes", bytes);
    l3k_status st = l3k_check_tensor(c, t, "workspace");
    if (st) return st;
    if (!is_contiguous(t)) return l3k_fail(c, L3K_ERROR_LAYOUT, "workspace is not contiguous");
    size_t have = l3k_tensor_bytes(t);
    if (have < bytes)
        return l3k_fail(c, L3K_ERROR_WORKSPACE, "workspace has %zu bytes, expected at least %zu", have,
                        bytes);
    if ((uintptr_t)l3k_data(t) % 16 != 0)
        return l3k_fail(c, L3K_ERROR_ALIGNMENT, "workspace data pointer %p is not 16-byte aligned",
                        l3k_data(t));
    return L3K_SUCCESS;
}

l3k_status l3k_check_eps(l3k_call *c, float eps) {
    if (!isfinite(eps) || eps < 0.0f)
        return l3k_fail(c, L3K_ERROR_VALUE, "eps is %g, expected a finite value >= 0", (double)eps);
    return L3K_SUCCESS;
}

l3k_status l3k_check_head_dim(l3k_call *c, const char *what, int64_t head_dim) {
    if (head_dim < 8 || head_dim > 256 || head_dim % 8 != 0)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s is %lld, expected a multiple of 8 in [8, 256]", what,
                        (long long)head_dim);
    return L3K_SUCCESS;
}

static _Thread_local int checking_only;

void l3k_set_checking_only(int on) { checking_only = on; }

int l3k_checking_only(void) { return checking_only; }

int l3k_on_cuda(const l3k_call *c) { return c->have_device && c->device.device_type == kDLCUDA; }

l3k_status l3k_cuda_launch(l3k_call *c, l3k_cuda_launch_fn fn, const void *args, void *stream) {
#ifdef L3K_WITH_CUDA
    int prev = -1;
    cudaError_t err = cudaGetDevice(&prev);
    if (err == cudaSuccess && prev != c->device.device_id) err = cudaSetDevice(c->device.device_id);
    if (err == cudaSuccess) err = (cudaError_t)fn(args, stream);
    if (prev >= 0 && prev != c->device.device_id) cudaSetDevice(prev);
    if ((int)err == L3K_GEMM_NO_CUBLASLT) /* "cuBLASLt not found; tried: ...; install ..." */
        return l3k_fail(c, L3K_ERROR_CUBLAS, "%s", l3k_cublaslt_error());
    if ((int)err < 0) /* launchers report cuBLAS failures as -(cublasStatus_t) */
        return l3k_fail(c, L3K_ERROR_CUBLAS, "cuBLAS status %d on cuda:%d", -(int)err,
                        (int)c->device.device_id);
    if (err != cudaSuccess)
        return l3k_fail(c, L3K_ERROR_CUDA, "CUDA error %d (%s) on cuda:%d", (int)err, cudaGetErrorString(err),
                        (int)c->device.device_id);
    return L3K_SUCCESS;
#else
    (void)fn;
    (void)args;
    (void)stream;
    return l3k_fail(c, L3K_ERROR_NO_CUDA, "this library was built without CUDA");
#endif
}

/* ---- Overlap between outputs and inputs ------------------------------------ */

void l3k_byte_range(const DLTensor *t, uintptr_t *lo, uintptr_t *hi) {
    const uintptr_t base = (uintptr_t)l3k_data(t);
    int64_t min_off, max_off, es = (int64_t)elem_bytes(t);
    if (l3k_numel(t) == 0) {
        *lo = *hi = base;
        return;
    }
    if (!offset_span(t, &min_off, &max_off) || !l3k_mul_ok(min_off, es, &min_off) ||
        !l3k_add_ok(max_off, 1, &max_off) || !l3k_mul_ok(max_off, es, &max_off)) {
        *lo = 0; /* only for a tensor l3k_check_tensor refuses: overlaps everything */
        *hi = UINTPTR_MAX;
        return;
    }
    *lo = base + (uintptr_t)min_off; /* modular: min_off <= 0 */
    *hi = base + (uintptr_t)max_off;
}

int l3k_same_view(const DLTensor *a, const DLTensor *b) {
    if (l3k_data(a) != l3k_data(b) || a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; ++i) {
        if (a->shape[i] != b->shape[i]) return 0;
        if (a->shape[i] > 1 && l3k_stride(a, i) != l3k_stride(b, i)) return 0;
    }
    return 1;
}

l3k_status l3k_check_no_overlap(l3k_call *c, const DLTensor *out, const char *out_name, const DLTensor *in,
                                const char *in_name, int allow_same) {
    if (allow_same && l3k_same_view(out, in)) return L3K_SUCCESS;
    uintptr_t a0, a1, b0, b1;
    l3k_byte_range(out, &a0, &a1);
    l3k_byte_range(in, &b0, &b1);
    if (a0 < b1 && b0 < a1)
        return l3k_fail(c, L3K_ERROR_LAYOUT,
                        allow_same ? "%s overlaps %s without being the same view (in place needs "
                                     "the same data pointer, shape and strides)"
                                   : "%s overlaps %s, expected separate memory",
                        out_name, in_name);
    return L3K_SUCCESS;
}

/* Is there r' in [0, rb) with r' + t in [0, ra)? */
static int rows_meet(int64_t t, int64_t ra, int64_t rb) { return t < ra && t > -rb; }

int l3k_rows_overlap(const l3k_rows *a, const l3k_rows *b, size_t es) {
    if (a->rows == 0 || a->n == 0 || b->rows == 0 || b->n == 0) return 0;
    const intptr_t pa = (intptr_t)a->data, pb = (intptr_t)b->data;
    const intptr_t ea = pa + (intptr_t)(((a->rows - 1) * a->row_stride + a->n) * (int64_t)es);
    const intptr_t eb = pb + (intptr_t)(((b->rows - 1) * b->row_stride + b->n) * (int64_t)es);
    if (ea <= pb || eb <= pa) return 0; /* byte ranges apart */
    /* Both views as rows of one stride S (a single row takes the other's). */
    int64_t S;
    if (a->rows > 1 && b->rows > 1) {
        if (a->row_stride != b->row_stride) return 1;
        S = a->row_stride;
    } else if (a->rows > 1) {
        S = a->row_stride;
    } else if (b->rows > 1) {
        S = b->row_stride;
    } else {
        return 1; /* two single rows whose ranges meet */
    }
    if ((pb - pa) % (intptr_t)es != 0 || a->n > S || b->n > S) return 1;
    /* Element r*S + i of a (i < na) equals d + r'*S + j of b (j < nb), d = q*S + e. */
    const int64_t d = (int64_t)((pb - pa) / (intptr_t)es);
    int64_t q = d / S, e = d % S;
    if (e < 0) {
        e += S;
        q -= 1;
    }
    if (e < a->n && rows_meet(q, a->rows, b->rows)) return 1;         /* i = j + e */
    if (S - e < b->n && rows_meet(q + 1, a->rows, b->rows)) return 1; /* j = i + S - e */
    return 0;
}

l3k_status l3k_check_rows_no_overlap(l3k_call *c, const l3k_rows *out, const char *out_name,
                                     const l3k_rows *in, const char *in_name, size_t es, int allow_same) {
    const int same = out->data == in->data && out->n == in->n && out->rows == in->rows &&
                     (out->rows <= 1 || out->row_stride == in->row_stride);
    if (allow_same && same) return L3K_SUCCESS;
    if (l3k_rows_overlap(out, in, es))
        return l3k_fail(c, L3K_ERROR_LAYOUT,
                        allow_same ? "%s overlaps %s without being the same view (in place needs "
                                     "the same data pointer and row stride)"
                                   : "%s overlaps %s, expected separate memory",
                        out_name, in_name);
    return L3K_SUCCESS;
}

l3k_status l3k_check_no_repeats(l3k_call *c, const DLTensor *t, const char *name) {
    if (l3k_numel(t) == 0) return L3K_SUCCESS;
    for (int i = 0; i < t->ndim; ++i)
        if (t->shape[i] > 1 && l3k_stride(t, i) == 0)
            return l3k_fail(c, L3K_ERROR_LAYOUT,
                            "%s stride[%d] is 0, expected an output that does not repeat elements", name, i);
    return L3K_SUCCESS;
}
