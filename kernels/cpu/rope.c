/* RoPE (rotary position embedding) on q and k: the CPU reference.
 * Float32 arithmetic, OpenMP across (batch, token) pairs.  This is the
 * executable spec the CUDA kernel is held to. */
#include "convert.h"

/* Rotate the `heads` rows of one token of one tensor. */
static void rotate_token(const l3k_rope_args *a, const void *x, const int64_t *xs, void *out,
                         const int64_t *os, int64_t heads, int64_t b, int64_t s, const float *c,
                         const float *sn) {
    const l3k_dt dt = a->dtype;
    const size_t es = l3k_dt_size(dt);
    const int64_t half = a->head_dim / 2;
    for (int64_t h = 0; h < heads; ++h) {
        const char *xr = (const char *)x + (b * xs[0] + h * xs[1] + s * xs[2]) * (int64_t)es;
        char *orow = (char *)out + (b * os[0] + h * os[1] + s * os[2]) * (int64_t)es;
        for (int64_t p = 0; p < half; ++p) {
            const int64_t i1 = a->interleaved ? 2 * p : p;
            const int64_t i2 = a->interleaved ? 2 * p + 1 : p + half;
            /* Both elements are read before either is written: in place is safe. */
            const float x1 = l3k_load(xr, i1, dt), x2 = l3k_load(xr, i2, dt);
            l3k_store(orow, i1, x1 * c[p] - x2 * sn[p], dt);
            l3k_store(orow, i2, x2 * c[p] + x1 * sn[p], dt);
        }
    }
}

int l3k_cpu_rope(const l3k_rope_args *a) {
    const int64_t half = a->head_dim / 2, tokens = a->batch * a->seq;
#pragma omp parallel
    {
        /* One row of cos and sin in float32 (negated sin for the inverse rotation). */
        float cbuf[128], sbuf[128];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; ++t) {
            const int64_t b = t / a->seq, s = t % a->seq;
            const int64_t row = b * a->table_batch_stride + (s + a->offset) * half;
            l3k_load_rope_row(a->cos, a->sin, row, half, a->table_dtype, a->inverse, cbuf, sbuf);
            rotate_token(a, a->q, a->q_strides, a->q_out, a->q_out_strides, a->hq, b, s, cbuf, sbuf);
            if (a->hk > 0)
                rotate_token(a, a->k, a->k_strides, a->k_out, a->k_out_strides, a->hk, b, s, cbuf, sbuf);
        }
    }
    return 0;
}
