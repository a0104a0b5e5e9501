/* KV cache: appending rotated keys and values, and decode attention over the cache.  The CPU
 * reference: the executable spec of kernels/cuda/kv_cache.cu (contract in kernels/kv_cache.h).
 * Float32 arithmetic; OpenMP across (sequence, head) pairs. */
#include "kv_cache.h"

#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "convert.h"

/* [start', end') of sequence b, clamped as every kernel clamps it. */
static void cache_span(const int32_t *range, int64_t b, int64_t capacity, int64_t *start, int64_t *end) {
    const int64_t s = range[2 * b], e = range[2 * b + 1];
    *end = e < 0 ? 0 : (e > capacity ? capacity : e);
    *start = s < 0 ? 0 : (s > *end ? *end : s);
}

static inline int64_t off3(const int64_t st[3], int64_t b, int64_t h, int64_t s) {
    return b * st[0] + h * st[1] + s * st[2];
}

/* One row of head_dim values rotated from `in` into `out` (they may be the same row): each pair
 * is read before it is written.  c, sn NULL: the position is outside the tables, the row is NaN. */
static void rotate_row(const l3k_kv_append_args *a, const void *in, int64_t in_off, void *out,
                       int64_t out_off, const float *c, const float *sn) {
    const l3k_dt dt = a->dtype;
    const int64_t half = a->head_dim / 2;
    for (int64_t p = 0; p < half; ++p) {
        const int64_t i1 = a->interleaved ? 2 * p : p, i2 = a->interleaved ? 2 * p + 1 : p + half;
        const float x1 = l3k_load(in, in_off + i1, dt), x2 = l3k_load(in, in_off + i2, dt);
        l3k_store(out, out_off + i1, c ? x1 * c[p] - x2 * sn[p] : NAN, dt);
        l3k_store(out, out_off + i2, c ? x2 * c[p] + x1 * sn[p] : NAN, dt);
    }
}

int l3k_cpu_kv_append(const l3k_kv_append_args *a) {
    const int64_t half = a->head_dim / 2, tokens = a->batch * a->seq;
#pragma omp parallel
    {
        float cbuf[128], sbuf[128];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; ++t) {
            const int64_t b = t / a->seq, i = t % a->seq;
            int64_t start, end;
            cache_span(a->cache_range, b, a->capacity, &start, &end);
            const int64_t slot = end - a->seq + i;
            const int64_t row = i + (a->positions ? a->positions[b] : 0);
            const int in_table = row >= 0 && row < a->table_rows;
            if (in_table)
                l3k_load_rope_row(a->cos, a->sin, b * a->table_batch_stride + row * half, half,
                                  a->table_dtype, 0, cbuf, sbuf);
            const float *c = in_table ? cbuf : NULL, *sn = in_table ? sbuf : NULL;
            for (int64_t h = 0; h < a->n_heads; ++h)
                rotate_row(a, a->q, off3(a->q_stride, b, h, i), a->q_out, off3(a->q_out_stride, b, h, i), c,
                           sn);
            if (slot < 0) continue;
            for (int64_t h = 0; h < a->n_kv_heads; ++h) {
                rotate_row(a, a->k, off3(a->k_stride, b, h, i), a->k_cache, off3(a->kc_stride, b, h, slot), c,
                           sn);
                const int64_t vi = off3(a->v_stride, b, h, i), vo = off3(a->vc_stride, b, h, slot);
                for (int64_t d = 0; d < a->head_dim; ++d)
                    l3k_store(a->v_cache, vo + d, l3k_load(a->v, vi + d, a->dtype), a->dtype);
            }
        }
    }
    return 0;
}

/* One query row: softmax over the keys [lo, hi] of kv head `kh` of sequence b, into o. */
static void decode_row(const l3k_decode_attn_args *a, int64_t b, int64_t h, int64_t kh, int64_t i, int64_t lo,
                       int64_t hi, float *q, float *acc, float *scores) {
    const int64_t D = a->head_dim;
    const int64_t qo = off3(a->q_stride, b, h, i), oo = off3(a->o_stride, b, h, i);
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
    if (hi < lo) { /* no visible key: o = 0 */
        for (int64_t d = 0; d < D; ++d) l3k_store(a->o, oo + d, 0.0f, a->dtype);
        return;
    }
    for (int64_t d = 0; d < D; ++d) q[d] = l3k_load(a->q, qo + d, a->dtype);
    float mx = -INFINITY;
    for (int64_t j = lo; j <= hi; ++j) {
        const int64_t ko = off3(a->k_stride, b, kh, j);
        float s = 0.0f;
        for (int64_t d = 0; d < D; ++d) s += q[d] * l3k_load(a->k_cache, ko + d, a->dtype);
        s *= a->scale;
        scores[j - lo] = s;
        /* fmaxf would drop a NaN score: keep it, so a NaN reaches the row's output */
        mx = (s > mx || isnan(s)) ? s : mx;
    }
    double sum = 0.0;
    for (int64_t j = lo; j <= hi; ++j) {
        const float p = expf(scores[j - lo] - mx);
        sum += p;
        const int64_t vo = off3(a->v_stride, b, kh, j);
        for (int64_t d = 0; d < D; ++d) acc[d] += p * l3k_load(a->v_cache, vo + d, a->dtype);
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t d = 0; d < D; ++d) l3k_store(a->o, oo + d, acc[d] * inv, a->dtype);
}

int l3k_cpu_decode_attn(const l3k_decode_attn_args *a) {
    const int64_t group = a->n_heads / a->n_kv_heads, tasks = a->batch * a->n_heads;
    /* Per thread: q, the output accumulator and one score per slot of the cache; taken before any
     * row is written, so a failed allocation leaves o untouched. */
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
#else
    const int threads = 1;
#endif
    const size_t per = (size_t)2 * (size_t)a->head_dim + (size_t)a->capacity;
    size_t bytes;
    if (__builtin_mul_overflow(per, (size_t)threads * sizeof(float), &bytes)) return 1;
    float *scratch = malloc(bytes);
    if (!scratch) return 1;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        float *buf = scratch + per * (size_t)omp_get_thread_num();
#else
        float *buf = scratch;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t b = t / a->n_heads, h = t % a->n_heads;
            int64_t start, end;
            cache_span(a->cache_range, b, a->capacity, &start, &end);
            for (int64_t i = 0; i < a->seq_q; ++i) {
                const int64_t p = end - a->seq_q + i; /* the query's own slot: the last key it sees */
                decode_row(a, b, h, h / group, i, start, p, buf, buf + a->head_dim, buf + 2 * a->head_dim);
            }
        }
    }
    free(scratch);
    return 0;
}
