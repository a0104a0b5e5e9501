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

/* One of several host tensors of the same dtype and shape: the tensor and its data. */
typedef struct {
    host_tensor *h;
    void *data;
} tensor_slot;

/* Compact row-major host tensors of one dtype and shape, one per slot. */
static void set_tensors(l3k_dt dt, int ndim, const int64_t *shape, const tensor_slot *s, size_t n) {
    for (size_t i = 0; i < n; ++i) set_tensor(s[i].h, s[i].data, dt, ndim, shape, NULL);
}
/* SET_TENSORS(L3K_DT_F32, 2, shape, {&ta, a}, {&tb, b}): the slots listed in place. */
#define SET_TENSORS(dt, ndim, shape, ...)                            \
    set_tensors(dt, ndim, shape, (const tensor_slot[]){__VA_ARGS__}, \
                sizeof((const tensor_slot[]){__VA_ARGS__}) / sizeof(tensor_slot))

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

/* n elements of each of nbufs buffers from frand, drawn element by element across the buffers:
 * bufs[0][0], bufs[1][0], ..., bufs[0][1], ... */
static void frand_across(unsigned *seed, int n, int nbufs, float *const *bufs) {
    for (int i = 0; i < n; ++i)
        for (int b = 0; b < nbufs; ++b) bufs[b][i] = frand(seed);
}

/* A main's last step: the failure count printed; the exit status. */
static int report_failures(void) {
    printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "ok", g_failures);
    return g_failures ? 1 : 0;
}

/* A test a main runs by name. */
typedef struct {
    const char *name;
    void (*fn)(void);
} named_test;
/* NAMED_TEST(dirs): test_dirs, run by the name "dirs". */
#define NAMED_TEST(name) \
    { #name, test_##name }

/* Runs the test named by argv[1] (to run one alone), or all of them; the exit status. */
static int run_named_tests(int argc, char **argv, const named_test *tests, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (argc < 2 || strcmp(argv[1], tests[i].name) == 0) tests[i].fn();
    return report_failures();
}
#define RUN_NAMED_TESTS(argc, argv, tests) run_named_tests(argc, argv, tests, sizeof tests / sizeof tests[0])

#endif
