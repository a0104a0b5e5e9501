/* Cross-entropy loss and its gradient in one pass: the CPU reference.
 * Float32 arithmetic with the row's sum of exponentials in double, OpenMP across
 * rows.  This is the executable spec the CUDA kernel is held to. */
#include <math.h>

#include "convert.h"

static const char *row_at(const void *base, int64_t row, int64_t stride, l3k_dt dt) {
    return (const char *)base + (size_t)(row * stride) * l3k_dt_size(dt);
}

/* log(sum_j exp(x[j])) of one row of n >= 1 logits.  A NaN logit makes it NaN (fmaxf skips
 * NaN, exp does not). */
static float row_lse(const void *x, int64_t n, l3k_dt dt) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) m = fmaxf(m, l3k_load(x, i, dt));
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += expf(l3k_load(x, i, dt) - m);
    return m + (float)log(sum);
}

int l3k_cpu_cross_entropy(const l3k_cross_entropy_args *a) {
    const int64_t n = a->n;
    const l3k_dt dt = a->dtype;
    const float scale = a->grad_scale ? *a->grad_scale : 1.0f;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < a->rows; ++r) {
        const void *x = row_at(a->logits, r, a->logits_stride, dt);
        void *dx = (void *)row_at(a->dlogits, r, a->dlogits_stride, dt);
        const int64_t t = a->target[r];
        if (t == a->ignore_index) {
            a->loss[r] = 0.0f;
            for (int64_t i = 0; i < n; ++i) l3k_store(dx, i, 0.0f, dt);
            continue;
        }
        if (t < 0 || t >= n) {
            a->loss[r] = NAN;
            for (int64_t i = 0; i < n; ++i) l3k_store(dx, i, NAN, dt);
            continue;
        }
        /* The whole row (its lse and the target's logit) is read before any dlogits is
         * written: dlogits may be the very same row. */
        const float lse = row_lse(x, n, dt), xt = l3k_load(x, t, dt);
        a->loss[r] = lse - xt;
        for (int64_t i = 0; i < n; ++i)
            l3k_store(dx, i, (expf(l3k_load(x, i, dt) - lse) - (i == t ? 1.0f : 0.0f)) * scale, dt);
    }
    return 0;
}
