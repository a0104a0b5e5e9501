/* RMSNorm (optionally with a fused residual add): the CPU reference.
 * Float32 arithmetic with row sums in double, OpenMP across rows.  This is the executable spec the
 * CUDA kernels are held to. */
#include <math.h>
#include <stdlib.h>

#include "convert.h"

static const char *row_at(const void *base, int64_t row, int64_t stride, l3k_dt dt) {
    return (const char *)base + (size_t)(row * stride) * l3k_dt_size(dt);
}

int l3k_cpu_rmsnorm_fwd(const l3k_rmsnorm_fwd_args *a) {
    const int64_t n = a->n;
    const l3k_dt dt = a->dtype;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < a->rows; ++r) {
        const void *x = row_at(a->x, r, a->x_stride, dt);
        const void *res = a->residual ? row_at(a->residual, r, a->residual_stride, dt) : 0;
        void *h = a->residual ? (void *)row_at(a->h_out, r, a->h_stride, dt) : 0;
        void *y = (void *)row_at(a->y, r, a->y_stride, dt);
        /* The residual sum is rounded to the storage dtype before it is normalized:
         * the stored h and the normalized h are then the same numbers. */
        double ss = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            float v = l3k_load(x, i, dt);
            if (res) v = l3k_round(v + l3k_load(res, i, dt), dt);
            ss += (double)v * v;
        }
        const float rstd = (float)(1.0 / sqrt(ss / (double)n + a->eps));
        for (int64_t i = 0; i < n; ++i) {
            float v = l3k_load(x, i, dt);
            if (res) {
                v = l3k_round(v + l3k_load(res, i, dt), dt);
                l3k_store(h, i, v, dt); /* h may alias x or residual: written after both reads */
            }
            l3k_store(y, i, v * rstd * l3k_load(a->weight, i, dt), dt);
        }
        if (a->rstd) a->rstd[r] = rstd;
    }
    return 0;
}

int l3k_cpu_rmsnorm_bwd(const l3k_rmsnorm_bwd_args *a) {
    const int64_t n = a->n, rows = a->rows;
    const l3k_dt dt = a->dtype;
    const int64_t parts = a->dweight ? l3k_rmsnorm_bwd_partials(rows, n) : 0;
    const int64_t per_part = parts ? (rows + parts - 1) / parts : rows;
    /* Rows are cut into `parts` contiguous chunks; each chunk sums its dweight
     * contribution into its own partial row, and the partial rows are added in
     * order at the end: deterministic for any thread count. */
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < (parts ? parts : 1); ++p) {
        float *dw = parts ? a->partials + (size_t)p * (size_t)n : 0;
        if (dw)
            for (int64_t i = 0; i < n; ++i) dw[i] = 0.0f;
        const int64_t r0 = parts ? p * per_part : 0;
        const int64_t r1 = parts ? (r0 + per_part < rows ? r0 + per_part : rows) : rows;
        for (int64_t r = r0; r < r1; ++r) {
            const void *x = row_at(a->x, r, a->x_stride, dt);
            const void *dy = row_at(a->dy, r, a->dy_stride, dt);
            const void *dh = a->dh_in ? row_at(a->dh_in, r, a->dh_in_stride, dt) : 0;
            void *dx = (void *)row_at(a->dx, r, a->dx_stride, dt);
            /* Row sums in double: the reference should not be the noisy side of a comparison. */
            double ss = 0.0, gx = 0.0;
            for (int64_t i = 0; i < n; ++i) {
                const float xv = l3k_load(x, i, dt);
                ss += (double)xv * xv;
                gx += (double)l3k_load(dy, i, dt) * l3k_load(a->weight, i, dt) * xv;
            }
            const float rstd = a->rstd ? a->rstd[r] : (float)(1.0 / sqrt(ss / (double)n + a->eps));
            /* d/dx of x * rstd * w . dy  =  rstd * (g - x * rstd^2 * mean(g * x)),  g = dy * w */
            const float c = (float)((double)rstd * rstd * gx / (double)n);
            for (int64_t i = 0; i < n; ++i) {
                const float xv = l3k_load(x, i, dt), dyv = l3k_load(dy, i, dt);
                float g = rstd * (dyv * l3k_load(a->weight, i, dt) - xv * c);
                if (dh) g += l3k_load(dh, i, dt);
                if (dw) dw[i] += dyv * xv * rstd;
                l3k_store(dx, i, g, dt);
            }
        }
    }
    if (a->dweight)
        for (int64_t i = 0; i < n; ++i) {
            float s = 0.0f;
            for (int64_t p = 0; p < parts; ++p) s += a->partials[(size_t)p * (size_t)n + i];
            l3k_store(a->dweight, i, s, dt);
        }
    return 0;
}
