/* Host allocation failure inside the CPU attention: every scratch malloc of a
 * call is made to fail in turn (the test links with -Wl,--wrap=malloc).  The
 * call must return L3K_ERROR_INTERNAL with its message and leave every tensor
 * untouched, whichever thread's allocation failed.  A thread that gave up alone
 * used to skip the parallel loop that its team waited in: a hang, which the
 * ctest timeout turns into a failure. */
#include <stdatomic.h>

#include "check.h"

#ifdef _OPENMP
#include <omp.h>
#endif

void *__real_malloc(size_t size);

/* -1: no failure planned; k >= 0: the k-th malloc from now returns NULL. */
static atomic_long g_fail_countdown = -1;
static atomic_long g_calls;

void *__wrap_malloc(size_t size) {
    if (atomic_load(&g_fail_countdown) >= 0) {
        atomic_fetch_add(&g_calls, 1);
        if (atomic_fetch_sub(&g_fail_countdown, 1) == 0) return NULL;
    }
    return __real_malloc(size);
}

enum { B = 1, H = 4, HKV = 2, S = 9, D = 16, NQ = B * H * S * D, NK = B * HKV * S * D, NL = B * H * S };

typedef struct {
    float q[NQ], k[NK], v[NK], o[NQ], lse[NL], dout[NQ], dq[NQ], dk[NK], dv[NK];
} bufs;

static DLTensor *t4(host_tensor *h, float *p, int64_t heads) {
    const int64_t shape[4] = {B, heads, S, D};
    set_tensor(h, p, L3K_DT_F32, 4, shape, NULL);
    return &h->t;
}

/* Fail the k-th malloc of the call for k = 0, 1, ... until a call needs fewer. */
static void sweep(int backward) {
    const char *op = backward ? "attention_backward" : "attention_forward";
    bufs *b = malloc(sizeof *b), *keep = malloc(sizeof *keep);
    unsigned seed = 5;
    float *all = (float *)b;
    for (size_t i = 0; i < sizeof *b / sizeof(float); ++i) all[i] = frand(&seed);
    host_tensor tq, tk, tv, to, tl, tdo, tdq, tdk, tdv;
    DLTensor *Q = t4(&tq, b->q, H), *K = t4(&tk, b->k, HKV), *V = t4(&tv, b->v, HKV), *O = t4(&to, b->o, H);
    DLTensor *DO = t4(&tdo, b->dout, H), *DQ = t4(&tdq, b->dq, H), *DK = t4(&tdk, b->dk, HKV);
    DLTensor *DV = t4(&tdv, b->dv, HKV);
    const int64_t nl[1] = {NL};
    DLTensor *L = host_f32(&tl, b->lse, 1, nl);
    if (backward) /* o and lse from a forward that succeeds */
        CHECK(l3k_attention_forward(Q, K, V, NULL, 0.0f, 1, O, L, NULL) == L3K_SUCCESS, "%s",
              l3k_last_error());
    int failures_seen = 0;
    for (long k = 0; k < 1000; ++k) {
        memcpy(keep, b, sizeof *b);
        atomic_store(&g_calls, 0);
        atomic_store(&g_fail_countdown, k);
        l3k_status st =
            backward ? l3k_attention_backward(DO, Q, K, V, NULL, O, L, 0.0f, 1, 0, DQ, DK, DV, NULL, NULL)
                     : l3k_attention_forward(Q, K, V, NULL, 0.0f, 1, O, L, NULL);
        const long calls = atomic_load(&g_calls);
        atomic_store(&g_fail_countdown, -1);
        if (calls <= k) { /* no malloc was failed: the call must have worked */
            CHECK(st == L3K_SUCCESS, "%s with %ld mallocs: %s", op, calls, l3k_last_error());
            break;
        }
        ++failures_seen;
        CHECK(st == L3K_ERROR_INTERNAL, "%s, malloc %ld failed: status %d (%s)", op, k, (int)st,
              l3k_last_error());
        char want[128];
        snprintf(want, sizeof want, "%s: host scratch allocation failed", op);
        CHECK(strcmp(l3k_last_error(), want) == 0, "%s, malloc %ld failed: message '%s'", op, k,
              l3k_last_error());
        CHECK(memcmp(keep, b, sizeof *b) == 0, "%s, malloc %ld failed: a tensor was written", op, k);
    }
    CHECK(failures_seen > 0, "%s: no scratch allocation was seen", op);
    printf("%s: %d failing allocations, each refused cleanly\n", op, failures_seen);
    free(b);
    free(keep);
}

int main(void) {
#ifdef _OPENMP
    /* Several threads even on a small machine: the failure must reach one of many. */
    omp_set_num_threads(4);
#endif
    sweep(0);
    sweep(1);
    return report_failures();
}
