/* A tiny test harness for the C tests: tensors in host memory, checks that count failures. */
#ifndef L3K_TEST_CHECK_H_
#define L3K_TEST_CHECK_H_

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "l3k.h"
#include "kernels.h"

static int g_failures = 0;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            ++g_failures;                                        \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
        }                                                        \
    } while (0)

/* `call` fails with `status` and a last-error message containing `needle`. */
#define EXPECT_FAILS(call, status, needle)                                                           \
    do {                                                                                             \
        l3k_status got_ = (call);                                                                    \
        CHECK(got_ == (status), "%s: got %d (%s), expected %d", #call, got_, l3k_last_error(),       \
              (int)(status));                                                                        \
        CHECK(strstr(l3k_last_error(), needle) != NULL, "message '%s' lacks '%s'", l3k_last_error(), \
              needle);                                                                               \
    } while (0)

/* A host tensor that owns its shape array. */
typedef struct {
    DLTensor t;
    int64_t shape[4];
    int64_t strides[4];
} host_tensor;

/* A host tensor of any storage dtype; strides NULL = compact row-major. */
static void set_tensor(host_tensor *h, void *data, l3k_dt dt, int ndim, const int64_t *shape,
                       const int64_t *strides) {
    memset(h, 0, sizeof *h);
    for (int i = 0; i < ndim; ++i) {
        h->shape[i] = shape[i];
        if (strides) h->strides[i] = strides[i];
    }
    h->t.data = data;
    h->t.device.device_type = kDLCPU;
    h->t.ndim = ndim;
    h->t.dtype.code = dt == L3K_DT_BF16 ? kDLBfloat : kDLFloat;
    h->t.dtype.bits = dt == L3K_DT_F32 ? 32 : 16;
    h->t.dtype.lanes = 1;
    h->t.shape = h->shape;
    h->t.strides = strides ? h->strides : NULL;
}

/* The stride of dim i of compact row-major t, in elements. */
static int64_t compact_stride(const DLTensor *t, int i) {
    int64_t s = 1;
    for (int j = i + 1; j < t->ndim; ++j) s *= t->shape[j];
    return s;
}

static DLTensor *host_f32(host_tensor *h, float *data, int ndim, const int64_t *shape) {
    set_tensor(h, data, L3K_DT_F32, ndim, shape, NULL);
    return &h->t;
}

static const char *dt_label(l3k_dt dt) {
    return dt == L3K_DT_F32 ? "f32" : dt == L3K_DT_F16 ? "f16" : "bf16";
}

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((float)(*s >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

#endif
