/* SwiGLU activation a = silu(g) * u, forward and backward: the CPU reference.
 * Float32 arithmetic, OpenMP across rows.  This is the executable spec the
 * CUDA kernels are held to. */
#include <math.h>

#include "convert.h"

static const char *row_at(const void *base, int64_t row, int64_t stride, l3k_dt dt) {
    return (const char *)base + (size_t)(row * stride) * l3k_dt_size(dt);
}

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

int l3k_cpu_swiglu_fwd(const l3k_swiglu_fwd_args *a) {
    const l3k_dt dt = a->dtype;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < a->rows; ++r) {
        const void *g = row_at(a->g, r, a->g_stride, dt), *u = row_at(a->u, r, a->u_stride, dt);
        void *out = (void *)row_at(a->a, r, a->a_stride, dt);
        for (int64_t i = 0; i < a->n; ++i) {
            const float gv = l3k_load(g, i, dt), uv = l3k_load(u, i, dt);
            l3k_store(out, i, gv * sigmoid(gv) * uv, dt);
        }
    }
    return 0;
}

int l3k_cpu_swiglu_bwd(const l3k_swiglu_bwd_args *a) {
    const l3k_dt dt = a->dtype;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < a->rows; ++r) {
        const void *da = row_at(a->da, r, a->da_stride, dt);
        const void *g = row_at(a->g, r, a->g_stride, dt), *u = row_at(a->u, r, a->u_stride, dt);
        void *dg = (void *)row_at(a->dg, r, a->dg_stride, dt);
        void *du = (void *)row_at(a->du, r, a->du_stride, dt);
        void *ao = a->a_out ? (void *)row_at(a->a_out, r, a->a_out_stride, dt) : 0;
        for (int64_t i = 0; i < a->n; ++i) {
            /* All three inputs are read before any output is written: outputs may alias inputs. */
            const float dav = l3k_load(da, i, dt), gv = l3k_load(g, i, dt), uv = l3k_load(u, i, dt);
            const float sig = sigmoid(gv), silu = gv * sig;
            l3k_store(dg, i, dav * uv * sig * (1.0f + gv * (1.0f - sig)), dt);
            l3k_store(du, i, dav * silu, dt);
            if (ao) l3k_store(ao, i, silu * uv, dt);
        }
    }
    return 0;
}
