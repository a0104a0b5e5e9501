/* kernels/cpu/flash_attn.c -- C reference of flash attention, forward and backward.
 *
 * The executable spec of the kernels/cuda/flash_*.cu kernels (see kernels/attention.h for the contract).
 * Same algorithm as the GPU: key tiles of FA_CPU_BN columns, online softmax with a running row
 * max and a running sum (rescaled when the max grows), float32 accumulation, row statistics in
 * double. The backward recomputes p_ij = exp(s_ij - lse_i) from the saved LSE, D_i = <dO_i, O_i>,
 * dS = P * (dP - D), dV = P^T dO, dK = scale dS^T Q, dQ = scale dS K. GQA: one task per
 * (batch, kv head) sums its query heads in order, so the result is deterministic.
 */
#include "attention.h"
#include "convert.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FA_CPU_BN 64

static void fa_load_row(const void *p, int64_t off, l3k_dt dt, int64_t n, float *out) {
    for (int64_t d = 0; d < n; d++) out[d] = l3k_load(p, off + d, dt);
}

static inline int64_t fa_off(const int64_t st[3], int64_t b, int64_t h, int64_t s) {
    return b * st[0] + h * st[1] + s * st[2];
}

static inline size_t fa_round256(size_t x) { return (x + 255u) & ~(size_t)255u; }

size_t l3k_attn_bwd_workspace_bytes(int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t seq_q,
                                    int64_t seq_k, int64_t head_dim, int deterministic, int on_cuda) {
    (void)n_kv_heads;
    (void)seq_k;
    if (!on_cuda) return 0;
    if (batch <= 0 || n_heads <= 0 || seq_q <= 0 || head_dim <= 0) return 0;
    size_t rows = (size_t)batch * (size_t)n_heads * (size_t)seq_q;
    size_t total = fa_round256(rows * 4u);
    if (!deterministic) total += fa_round256(rows * (size_t)head_dim * 4u);
    return total;
}

/* *bytes = rows * n floats; 0 when that passes SIZE_MAX (the caller reports it as an
 * allocation failure rather than allocating a wrapped size). */
static int fa_floats(int64_t n, int64_t rows, size_t *bytes) {
    size_t count;
    return !__builtin_mul_overflow((size_t)n, (size_t)rows, &count) &&
           !__builtin_mul_overflow(count, sizeof(float), bytes);
}

/* Called by every thread of a parallel region after its scratch allocations: 1
 * in every thread when any thread lacks its scratch (nothing is written then),
 * else 0.  Every thread must meet the same worksharing loops, so the decision
 * is taken together, after a barrier, not thread by thread: a thread that
 * skipped the loop would leave the others waiting in its barrier forever. */
static int scratch_failed(int ok, int *fail) {
    if (!ok) {
#pragma omp atomic write
        *fail = 1;
    }
#pragma omp barrier
    int any;
#pragma omp atomic read
    any = *fail;
    return any;
}

/* The keys query row i of sequence b sees: [*begin, end), none when end <= *begin.  The key
 * range is clamped into [0, seq_k) as the CUDA kernels clamp it. */
static inline int64_t fa_keys(const l3k_attn_fwd_args *a, int64_t b, int64_t i, int64_t *begin) {
    const int64_t sk = a->seq_k;
    int64_t start = 0, end = sk;
    if (a->key_range) {
        const int64_t s = a->key_range[2 * b], e = a->key_range[2 * b + 1];
        end = e < 0 ? 0 : (e > sk ? sk : e);
        start = s < 0 ? 0 : (s > end ? end : s);
    }
    if (a->causal) {
        const int64_t c = i + 1 + sk - a->seq_q;
        if (c < end) end = c;
    }
    *begin = start;
    return end;
}

/* ------------------------------------------------------------------ forward */
int l3k_cpu_attn_fwd(const l3k_attn_fwd_args *a) {
    const int64_t B = a->batch, H = a->n_heads, HKV = a->n_kv_heads;
    const int64_t SQ = a->seq_q, D = a->head_dim;
    if (B <= 0 || H <= 0 || SQ <= 0 || D <= 0) return 0;
    const int64_t group = H / HKV;
    const l3k_dt dt = a->dtype;
    int fail = 0;

    size_t row_bytes, tile_bytes;
    if (!fa_floats(D, 1, &row_bytes) || !fa_floats(D, FA_CPU_BN, &tile_bytes)) return 1;

#pragma omp parallel
    {
        float *qrow = (float *)malloc(row_bytes);
        float *acc = (float *)malloc(row_bytes);
        float *kt = (float *)malloc(tile_bytes);
        float *vt = (float *)malloc(tile_bytes);
        float s[FA_CPU_BN];
        if (!scratch_failed(qrow && acc && kt && vt, &fail)) {
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (int64_t bh = 0; bh < B * H; bh++) {
                for (int64_t i = 0; i < SQ; i++) {
                    const int64_t b = bh / H, h = bh % H, hk = h / group;
                    int64_t kbeg;
                    const int64_t kend = fa_keys(a, b, i, &kbeg);
                    fa_load_row(a->q, fa_off(a->q_stride, b, h, i), dt, D, qrow);
                    double m = -INFINITY, l = 0.0; /* running max (scaled scores) and sum */
                    for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
                    for (int64_t j0 = kbeg; j0 < kend; j0 += FA_CPU_BN) {
                        const int64_t nj = (kend - j0 < FA_CPU_BN) ? kend - j0 : FA_CPU_BN;
                        double tmax = -INFINITY;
                        for (int64_t jj = 0; jj < nj; jj++) {
                            fa_load_row(a->k, fa_off(a->k_stride, b, hk, j0 + jj), dt, D, kt + jj * D);
                            fa_load_row(a->v, fa_off(a->v_stride, b, hk, j0 + jj), dt, D, vt + jj * D);
                            float dot = 0.f;
                            for (int64_t d = 0; d < D; d++) dot += qrow[d] * kt[jj * D + d];
                            s[jj] = dot * a->scale;
                            if (s[jj] > tmax) tmax = s[jj];
                        }
                        const double mnew = tmax > m ? tmax : m;
                        const float alpha = (float)exp(m - mnew); /* m = -inf first: 0 */
                        l *= alpha;
                        for (int64_t d = 0; d < D; d++) acc[d] *= alpha;
                        for (int64_t jj = 0; jj < nj; jj++) {
                            const float p = (float)exp((double)s[jj] - mnew);
                            l += p;
                            for (int64_t d = 0; d < D; d++) acc[d] += p * vt[jj * D + d];
                        }
                        m = mnew;
                    }
                    const int64_t ooff = fa_off(a->o_stride, b, h, i);
                    /* Masked means no visible key, not l == 0: a NaN score makes l NaN, and the row
                     * must come out NaN (o and lse), as PyTorch's softmax gives, not look masked. */
                    if (kend > kbeg) {
                        const float inv = (float)(1.0 / l);
                        for (int64_t d = 0; d < D; d++) l3k_store(a->o, ooff + d, acc[d] * inv, dt);
                        a->lse[bh * SQ + i] = (float)(m + log(l));
                    } else { /* fully masked row */
                        for (int64_t d = 0; d < D; d++) l3k_store(a->o, ooff + d, 0.f, dt);
                        a->lse[bh * SQ + i] = INFINITY;
                    }
                }
            }
        }
        free(qrow);
        free(acc);
        free(kt);
        free(vt);
    }
    return fail;
}

/* ------------------------------------------------------------------ backward */
int l3k_cpu_attn_bwd(const l3k_attn_bwd_args *ab) {
    const l3k_attn_fwd_args *a = &ab->f;
    const int64_t B = a->batch, H = a->n_heads, HKV = a->n_kv_heads;
    const int64_t SQ = a->seq_q, SK = a->seq_k, D = a->head_dim;
    if (B <= 0 || H <= 0 || HKV <= 0 || D <= 0) return 0;
    const int64_t group = H / HKV;
    const l3k_dt dt = a->dtype;
    const float scale = a->scale;
    int fail = 0;

    /* k may repeat one row through stride 0: its element count bounds nothing in bytes. */
    size_t row_bytes, kv_bytes;
    if (!fa_floats(D, 1, &row_bytes) || !fa_floats(D, SK > 0 ? SK : 1, &kv_bytes)) return 1;

#pragma omp parallel
    {
        /* per task: float dk, dv accumulators for one kv head; dq for one query head */
        float *dk = (float *)malloc(kv_bytes);
        float *dv = (float *)malloc(kv_bytes);
        float *kk = (float *)malloc(kv_bytes);
        float *vv = (float *)malloc(kv_bytes);
        float *qrow = (float *)malloc(row_bytes);
        float *dorow = (float *)malloc(row_bytes);
        float *dqrow = (float *)malloc(row_bytes);
        if (!scratch_failed(dk && dv && kk && vv && qrow && dorow && dqrow, &fail)) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t bhk = 0; bhk < B * HKV; bhk++) {
                const int64_t b = bhk / HKV, hk = bhk % HKV;
                for (int64_t j = 0; j < SK; j++) {
                    fa_load_row(a->k, fa_off(a->k_stride, b, hk, j), dt, D, kk + j * D);
                    fa_load_row(a->v, fa_off(a->v_stride, b, hk, j), dt, D, vv + j * D);
                }
                memset(dk, 0, sizeof(float) * (size_t)(SK * D));
                memset(dv, 0, sizeof(float) * (size_t)(SK * D));
                for (int64_t h = hk * group; h < (hk + 1) * group; h++) {
                    for (int64_t i = 0; i < SQ; i++) {
                        fa_load_row(a->q, fa_off(a->q_stride, b, h, i), dt, D, qrow);
                        fa_load_row(ab->dout, fa_off(ab->do_stride, b, h, i), dt, D, dorow);
                        /* D_i = <dO_i, O_i> with O as stored by the forward */
                        const int64_t ooff = fa_off(a->o_stride, b, h, i);
                        float Di = 0.f;
                        for (int64_t d = 0; d < D; d++) Di += dorow[d] * l3k_load(a->o, ooff + d, dt);
                        const float lse = a->lse[(b * H + h) * SQ + i];
                        int64_t kbeg;
                        const int64_t kend = fa_keys(a, b, i, &kbeg);
                        for (int64_t d = 0; d < D; d++) dqrow[d] = 0.f;
                        for (int64_t j0 = kbeg; j0 < kend; j0 += FA_CPU_BN) {
                            const int64_t j1 = (j0 + FA_CPU_BN < kend) ? j0 + FA_CPU_BN : kend;
                            for (int64_t j = j0; j < j1; j++) {
                                float s = 0.f, dp = 0.f;
                                for (int64_t d = 0; d < D; d++) {
                                    s += qrow[d] * kk[j * D + d];
                                    dp += dorow[d] * vv[j * D + d];
                                }
                                /* Only visible keys get here, so the masked rows' lse = +inf is never read;
                                 * a NaN in s, lse, dO or O flows into p or ds and on into dq, dk and dv. */
                                const float p = (float)exp((double)(s * scale) - (double)lse);
                                const float ds = p * (dp - Di);
                                for (int64_t d = 0; d < D; d++) {
                                    dv[j * D + d] += p * dorow[d];
                                    dk[j * D + d] += ds * qrow[d];
                                    dqrow[d] += ds * kk[j * D + d];
                                }
                            }
                        }
                        const int64_t qoff = fa_off(ab->dq_stride, b, h, i);
                        for (int64_t d = 0; d < D; d++) l3k_store(ab->dq, qoff + d, dqrow[d] * scale, dt);
                    }
                }
                for (int64_t j = 0; j < SK; j++) {
                    const int64_t koff = fa_off(ab->dk_stride, b, hk, j),
                                  voff = fa_off(ab->dv_stride, b, hk, j);
                    for (int64_t d = 0; d < D; d++) {
                        l3k_store(ab->dk, koff + d, dk[j * D + d] * scale, dt);
                        l3k_store(ab->dv, voff + d, dv[j * D + d], dt);
                    }
                }
            }
        }
        free(dk);
        free(dv);
        free(kk);
        free(vv);
        free(qrow);
        free(dorow);
        free(dqrow);
    }
    return fail;
}
