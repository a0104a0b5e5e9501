/* tests/c/test_attention_cpu.c -- naive float64 attention (materialized S) vs l3k_cpu_attn_fwd/bwd,
 * with and without per-sequence key ranges; the key range through the C ABI (its checks, and that
 * padded rows equal their sequence alone).
 * Build: gcc -std=c11 -O2 -fopenmp -Ikernels tests/c/test_attention_cpu.c kernels/cpu/flash_attn.c -lm
 * Returns nonzero on failure; prints max errors per case. */
#include "attention.h"
#include "check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double urand(void) { /* xorshift64*, uniform in [-1, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

static float bits2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t f2bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float round_bf16(float x) {
    uint32_t u = f2bits(x);
    u += 0x7fffu + ((u >> 16) & 1u);
    return bits2f(u & 0xffff0000u);
}
static uint16_t to_bf16(float x) { return (uint16_t)(f2bits(round_bf16(x)) >> 16); }
static float from_bf16(uint16_t h) { return bits2f((uint32_t)h << 16); }

/* half: exact round trip via the library's rules is not exposed, so test fp16 through values
 * that are exactly representable (multiples of 2^-10 in [-2, 2]). */
static uint16_t to_f16_exact(float x) { /* x = k * 2^-10, |x| < 2: normal or subnormal half */
    if (x == 0.f) return 0;
    uint16_t sign = x < 0 ? 0x8000 : 0;
    float a = fabsf(x);
    int e;
    float m = frexpf(a, &e); /* a = m * 2^e, m in [0.5,1) */
    int he = e - 1 + 15;     /* biased */
    if (he <= 0) return (uint16_t)(sign | (uint16_t)lrintf(a * 16777216.f));
    uint32_t man = (uint32_t)lrintf((m * 2.f - 1.f) * 1024.f);
    return (uint16_t)(sign | (he << 10) | man);
}
static float from_f16(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    float s = (h & 0x8000) ? -1.f : 1.f;
    if (e == 0) return s * (float)m * 5.9604644775390625e-8f;
    return s * ldexpf(1.f + m / 1024.f, e - 15);
}

/* Key ranges of a case: none, left padding, right padding (the last sequence empty when B > 2), or
 * values past either end, reversed and extreme, which the kernels clamp into [0, Sk). */
enum { KR_NONE, KR_LEFT, KR_RIGHT, KR_WILD };

typedef struct {
    int64_t B, H, HKV, SQ, SK, D;
    int causal;
    l3k_dt dt;
    double mag;
    int kr;
} tcase;

static void make_key_ranges(int mode, int64_t B, int64_t SK, int32_t *kr) {
    for (int64_t b = 0; b < B; b++) {
        const int32_t sk = (int32_t)SK, cut = (int32_t)(SK * b / (2 * B) + b);
        int32_t s = 0, e = sk;
        if (mode == KR_LEFT) s = cut < sk ? cut : sk;
        if (mode == KR_RIGHT) e = b == B - 1 && B > 2 ? 0 : (cut < sk ? sk - cut : 0);
        if (mode == KR_WILD) {
            static const int32_t wild[4][2] = {{-5, 0}, {1, 1000000}, {3, 1}, {INT32_MIN, INT32_MAX}};
            s = wild[b % 4][0];
            e = wild[b % 4][1] ? wild[b % 4][1] : sk / 2;
        }
        kr[2 * b] = s;
        kr[2 * b + 1] = e;
    }
}

/* Sequence b's keys as the kernels clamp them: 0 <= *s <= *e <= SK. */
static void clamped_range(const int32_t *kr, int64_t b, int64_t SK, int64_t *s, int64_t *e) {
    *s = 0;
    *e = SK;
    if (!kr) return;
    const int64_t e0 = kr[2 * b + 1], s0 = kr[2 * b];
    *e = e0 < 0 ? 0 : (e0 > SK ? SK : e0);
    *s = s0 < 0 ? 0 : (s0 > *e ? *e : s0);
}

static size_t esz(l3k_dt dt) { return dt == L3K_DT_F32 ? 4 : 2; }
static void put(void *p, size_t i, l3k_dt dt, float x) {
    if (dt == L3K_DT_F32) ((float *)p)[i] = x;
    else if (dt == L3K_DT_BF16) ((uint16_t *)p)[i] = to_bf16(x);
    else ((uint16_t *)p)[i] = to_f16_exact(x);
}
static double get(const void *p, size_t i, l3k_dt dt) {
    if (dt == L3K_DT_F32) return ((const float *)p)[i];
    if (dt == L3K_DT_BF16) return from_bf16(((const uint16_t *)p)[i]);
    return from_f16(((const uint16_t *)p)[i]);
}
static float quant(float x, l3k_dt dt) {
    if (dt == L3K_DT_BF16) return round_bf16(x);
    if (dt == L3K_DT_F16) return roundf(x * 1024.f) / 1024.f;
    return x;
}

/* The kernels' buffers, and their argument block for them: shape is (batch, n_heads, n_kv_heads,
 * seq_q, seq_k, head_dim); q, o, dout and dq are strided by qst, k, v, dk and dv by kst; no key
 * range (the caller sets ab.f.key_range). */
typedef struct {
    void *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float *lse;
} attn_bufs;

static l3k_attn_bwd_args attn_args(const attn_bufs *p, const int64_t shape[6], const int64_t qst[3],
                                   const int64_t kst[3], float scale, int causal, l3k_dt dt) {
    l3k_attn_bwd_args ab = {
        .f = {.q = p->q,
              .k = p->k,
              .v = p->v,
              .o = p->o,
              .lse = p->lse,
              .batch = shape[0],
              .n_heads = shape[1],
              .n_kv_heads = shape[2],
              .seq_q = shape[3],
              .seq_k = shape[4],
              .head_dim = shape[5],
              .scale = scale,
              .causal = causal,
              .dtype = dt},
        .dout = p->dout,
        .dq = p->dq,
        .dk = p->dk,
        .dv = p->dv,
    };
    for (int i = 0; i < 3; i++) {
        ab.f.q_stride[i] = ab.f.o_stride[i] = ab.do_stride[i] = ab.dq_stride[i] = qst[i];
        ab.f.k_stride[i] = ab.f.v_stride[i] = ab.dk_stride[i] = ab.dv_stride[i] = kst[i];
    }
    return ab;
}

/* fill a tensor stored (B, S, Hn, D) (i.e. strided view of (B,Hn,S,D)) with values v */
static int run_case(const tcase *c) {
    const int64_t B = c->B, H = c->H, HKV = c->HKV, SQ = c->SQ, SK = c->SK, D = c->D;
    const l3k_dt dt = c->dt;
    const size_t nq = (size_t)(B * H * SQ * D), nk = (size_t)(B * HKV * SK * D);
    /* q, o, dout, dq use the (B, S, H, D) layout; k, v, dk, dv use (B, Hkv, S, D) */
    int64_t qst[3] = {SQ * H * D, D, H * D}, kst[3] = {HKV * SK * D, SK * D, D};
    void *q = malloc(nq * esz(dt) + 1), *k = malloc(nk * esz(dt) + 1), *v = malloc(nk * esz(dt) + 1);
    void *o = malloc(nq * esz(dt) + 1), *dout = malloc(nq * esz(dt) + 1), *dq = malloc(nq * esz(dt) + 1);
    void *dk = malloc(nk * esz(dt) + 1), *dv = malloc(nk * esz(dt) + 1);
    float *lse = (float *)malloc(sizeof(float) * (size_t)(B * H * SQ) + 4);
    double *Q = malloc(sizeof(double) * nq + 8), *K = malloc(sizeof(double) * nk + 8),
           *V = malloc(sizeof(double) * nk + 8);
    double *DO = malloc(sizeof(double) * nq + 8);
    for (size_t i = 0; i < nq; i++) {
        float x = quant((float)(urand() * c->mag), dt);
        put(q, i, dt, x);
        Q[i] = x;
    }
    for (size_t i = 0; i < nk; i++) {
        float x = quant((float)(urand() * c->mag), dt);
        put(k, i, dt, x);
        K[i] = x;
    }
    for (size_t i = 0; i < nk; i++) {
        float x = quant((float)urand(), dt);
        put(v, i, dt, x);
        V[i] = x;
    }
    for (size_t i = 0; i < nq; i++) {
        float x = quant((float)urand(), dt);
        put(dout, i, dt, x);
        DO[i] = x;
    }
    memset(o, 0xff, nq * esz(dt));
    memset(dq, 0xff, nq * esz(dt)); /* poison (NaN) */
    memset(dk, 0xff, nk * esz(dt));
    memset(dv, 0xff, nk * esz(dt));
    for (int64_t i = 0; i < B * H * SQ; i++) lse[i] = NAN;
    int32_t *kr = c->kr == KR_NONE ? NULL : malloc(sizeof(int32_t) * (size_t)(2 * B));
    if (kr) make_key_ranges(c->kr, B, SK, kr);

    const float scale = 1.f / sqrtf((float)D);
    const attn_bufs bufs = {q, k, v, o, dout, dq, dk, dv, lse};
    const int64_t shape[6] = {B, H, HKV, SQ, SK, D};
    l3k_attn_bwd_args ab = attn_args(&bufs, shape, qst, kst, scale, c->causal, dt);
    ab.f.key_range = kr;
    int rc = l3k_cpu_attn_fwd(&ab.f);
    rc |= l3k_cpu_attn_bwd(&ab);

    /* naive float64 reference */
    double eo = 0, else_ = 0, edq = 0, edk = 0, edv = 0, mo = 0, mdq = 0, mdk = 0, mdv = 0;
    int bad_inf = 0;
    double *S = malloc(sizeof(double) * (size_t)(SQ * SK) + 8),
           *P = malloc(sizeof(double) * (size_t)(SQ * SK) + 8);
    double *dKr = calloc((size_t)nk + 1, sizeof(double)), *dVr = calloc((size_t)nk + 1, sizeof(double));
    const int64_t G = H / HKV;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t hk = h / G;
            int64_t ks, ke;
            clamped_range(kr, b, SK, &ks, &ke);
#define QI(i, d) Q[(size_t)(b * qst[0] + h * qst[1] + (i)*qst[2] + (d))]
#define DOI(i, d) DO[(size_t)(b * qst[0] + h * qst[1] + (i)*qst[2] + (d))]
#define KJ(j, d) K[(size_t)(b * kst[0] + hk * kst[1] + (j)*kst[2] + (d))]
#define VJ(j, d) V[(size_t)(b * kst[0] + hk * kst[1] + (j)*kst[2] + (d))]
            for (int64_t i = 0; i < SQ; i++) {
                double mx = -INFINITY;
                for (int64_t j = 0; j < SK; j++) {
                    int vis = (!c->causal || j <= i + SK - SQ) && ks <= j && j < ke;
                    double s = 0;
                    for (int64_t d = 0; d < D; d++) s += QI(i, d) * KJ(j, d);
                    S[i * SK + j] = vis ? s * scale : -INFINITY;
                    if (S[i * SK + j] > mx) mx = S[i * SK + j];
                }
                double sum = 0;
                for (int64_t j = 0; j < SK; j++) {
                    P[i * SK + j] = mx == -INFINITY ? 0 : exp(S[i * SK + j] - mx);
                    sum += P[i * SK + j];
                }
                for (int64_t j = 0; j < SK; j++) P[i * SK + j] = sum > 0 ? P[i * SK + j] / sum : 0;
                double lref = sum > 0 ? mx + log(sum) : INFINITY;
                double lgot = lse[(b * H + h) * SQ + i];
                if (isinf(lref)) {
                    if (!(isinf(lgot) && lgot > 0)) bad_inf++;
                } else {
                    double e = fabs(lgot - lref);
                    if (!(e <= else_)) else_ = isnan(e) ? INFINITY : e;
                }
                double Di = 0;
                for (int64_t d = 0; d < D; d++) {
                    double od = 0;
                    for (int64_t j = 0; j < SK; j++) od += P[i * SK + j] * VJ(j, d);
                    double got = get(o, (size_t)(b * qst[0] + h * qst[1] + i * qst[2] + d), dt);
                    double e = fabs(got - od);
                    if (!(e <= eo)) eo = isnan(e) ? INFINITY : e;
                    if (fabs(od) > mo) mo = fabs(od);
                    Di += DOI(i, d) * od;
                }
                /* dS row */
                for (int64_t j = 0; j < SK; j++) {
                    double dp = 0;
                    for (int64_t d = 0; d < D; d++) dp += DOI(i, d) * VJ(j, d);
                    S[i * SK + j] = P[i * SK + j] * (dp - Di); /* reuse S as dS */
                }
                for (int64_t d = 0; d < D; d++) {
                    double g = 0;
                    for (int64_t j = 0; j < SK; j++) g += S[i * SK + j] * KJ(j, d);
                    g *= scale;
                    double got = get(dq, (size_t)(b * qst[0] + h * qst[1] + i * qst[2] + d), dt);
                    double e = fabs(got - g);
                    if (!(e <= edq)) edq = isnan(e) ? INFINITY : e;
                    if (fabs(g) > mdq) mdq = fabs(g);
                }
            }
            for (int64_t j = 0; j < SK; j++)
                for (int64_t d = 0; d < D; d++) {
                    double gk = 0, gv = 0;
                    for (int64_t i = 0; i < SQ; i++) {
                        gk += S[i * SK + j] * QI(i, d);
                        gv += P[i * SK + j] * DOI(i, d);
                    }
                    dKr[(size_t)(b * kst[0] + hk * kst[1] + j * kst[2] + d)] += gk * scale;
                    dVr[(size_t)(b * kst[0] + hk * kst[1] + j * kst[2] + d)] += gv;
                }
        }
    for (size_t i = 0; i < nk; i++) {
        double e = fabs(get(dk, i, dt) - dKr[i]);
        if (!(e <= edk)) edk = isnan(e) ? INFINITY : e;
        e = fabs(get(dv, i, dt) - dVr[i]);
        if (!(e <= edv)) edv = isnan(e) ? INFINITY : e;
        if (fabs(dKr[i]) > mdk) mdk = fabs(dKr[i]);
        if (fabs(dVr[i]) > mdv) mdv = fabs(dVr[i]);
    }
    /* tolerance relative to the max magnitude of each output (plus a floor) */
    const double rt = dt == L3K_DT_F32 ? 2e-5 : (dt == L3K_DT_F16 ? 4e-3 : 1.6e-2);
    const int ok = rc == 0 && bad_inf == 0 && eo <= rt * (mo + 1e-3) + 1e-6 &&
                   else_ <= (dt == L3K_DT_F32 ? 1e-4 : 1e-3) && edq <= rt * (mdq + 1e-3) + 1e-6 &&
                   edk <= rt * (mdk + 1e-3) + 1e-6 && edv <= rt * (mdv + 1e-3) + 1e-6;
    static const char *kr_names[4] = {"", " left-padded", " right-padded", " wild-ranges"};
    printf(
        "%s B=%lld H=%lld Hkv=%lld Sq=%lld Sk=%lld D=%lld causal=%d%s dt=%s | err o %.2e (max %.2f) lse %.2e "
        "dq %.2e (%.2f) dk %.2e (%.2f) dv %.2e (%.2f) inf-rows-bad %d\n",
        ok ? "PASS" : "FAIL", (long long)B, (long long)H, (long long)HKV, (long long)SQ, (long long)SK,
        (long long)D, c->causal, kr_names[c->kr],
        dt == L3K_DT_F32   ? "f32"
        : dt == L3K_DT_F16 ? "f16"
                           : "bf16",
        eo, mo, else_, edq, mdq, edk, mdk, edv, mdv, bad_inf);
    free(kr);
    free(q);
    free(k);
    free(v);
    free(o);
    free(dout);
    free(dq);
    free(dk);
    free(dv);
    free(lse);
    free(Q);
    free(K);
    free(V);
    free(DO);
    free(S);
    free(P);
    free(dKr);
    free(dVr);
    return ok ? 0 : 1;
}

/* NaN in, NaN out, as PyTorch's softmax attention gives: a NaN score row is not a
 * fully masked row (o = 0, lse = +inf).  Checks q, k, v and dout NaNs through the
 * forward and the backward; rows and keys the NaN does not reach stay finite, and
 * rows that see no key stay o = 0, lse = +inf, dq = 0. */
enum { NB = 1, NH = 2, NHKV = 1, NSQ = 5, NSK = 4, ND = 8 };
typedef struct {
    float q[NB * NH * NSQ * ND], k[NB * NHKV * NSK * ND], v[NB * NHKV * NSK * ND];
    float o[NB * NH * NSQ * ND], dout[NB * NH * NSQ * ND], lse[NB * NH * NSQ];
    float dq[NB * NH * NSQ * ND], dk[NB * NHKV * NSK * ND], dv[NB * NHKV * NSK * ND];
} nan_bufs;

static int nan_run(nan_bufs *t, int causal) {
    const int64_t qst[3] = {NH * NSQ * ND, NSQ * ND, ND}, kst[3] = {NHKV * NSK * ND, NSK * ND, ND};
    const attn_bufs bufs = {t->q, t->k, t->v, t->o, t->dout, t->dq, t->dk, t->dv, t->lse};
    const int64_t shape[6] = {NB, NH, NHKV, NSQ, NSK, ND};
    const l3k_attn_bwd_args ab = attn_args(&bufs, shape, qst, kst, 0.35f, causal, L3K_DT_F32);
    return l3k_cpu_attn_fwd(&ab.f) | l3k_cpu_attn_bwd(&ab);
}

static void nan_fill(nan_bufs *t) {
    for (size_t i = 0; i < sizeof t->q / 4; i++) {
        t->q[i] = (float)urand();
        t->dout[i] = (float)urand();
    }
    for (size_t i = 0; i < sizeof t->k / 4; i++) {
        t->k[i] = (float)urand();
        t->v[i] = (float)urand();
    }
}

/* What a row of ND values holds: all finite, all NaN, or NaN at one element only. */
enum { ROW_FINITE = -2, ROW_NAN = -1 }; /* >= 0: NaN at that element only */

static int row_is(const float *p, int want) {
    for (int d = 0; d < ND; d++) {
        const int nan_here = want == ROW_NAN || want == d;
        if (nan_here ? !isnan(p[d]) : !isfinite(p[d])) return 0;
    }
    return 1;
}

static int test_nan(void) {
    int bad = 0;
#define NAN_CHECK(cond, ...)                  \
    do {                                      \
        if (!(cond)) {                        \
            bad++;                            \
            printf("FAIL nan: " __VA_ARGS__); \
            printf("\n");                     \
        }                                     \
    } while (0)
    nan_bufs t;
    /* Causal with Sq = 5 > Sk = 4: query row r sees keys 0 .. r - 1, so row 0 sees none.
     * The NaN goes into q or dout at (head 1, row 3, element 5), or into k or v at
     * (key 2, element 1).  Both query heads share the one kv head. */
    static const char *names[4] = {"q", "k", "v", "dout"};
    for (int where = 0; where < 4; where++) {
        nan_fill(&t);
        const int ph = 1, pr = 3, pk = 2;
        if (where == 0) t.q[(ph * NSQ + pr) * ND + 5] = NAN;
        if (where == 1) t.k[pk * ND + 1] = NAN;
        if (where == 2) t.v[pk * ND + 1] = NAN;
        if (where == 3) t.dout[(ph * NSQ + pr) * ND + 5] = NAN;
        const char *what = names[where];
        NAN_CHECK(nan_run(&t, 1) == 0, "%s: scratch", what);
        for (int h = 0; h < NH; h++)
            for (int r = 0; r < NSQ; r++) {
                const float *o = t.o + (h * NSQ + r) * ND, *dq = t.dq + (h * NSQ + r) * ND;
                const float lse = t.lse[h * NSQ + r];
                if (r == 0) { /* sees no key: nothing reaches it */
                    int zero = 1;
                    for (int d = 0; d < ND; d++) zero &= o[d] == 0.f && dq[d] == 0.f;
                    NAN_CHECK(zero && isinf(lse) && lse > 0, "%s: masked row %d.%d: lse %g", what, h, r,
                              (double)lse);
                    continue;
                }
                const int poisoned_row = h == ph && r == pr, sees_key = r > pk;
                int want_o = ROW_FINITE, want_dq = ROW_FINITE, lse_nan = 0;
                if (where == 0 && poisoned_row) want_o = want_dq = ROW_NAN, lse_nan = 1;
                if (where == 1 && sees_key) want_o = want_dq = ROW_NAN, lse_nan = 1;
                if (where == 2 && sees_key) want_o = 1, want_dq = ROW_NAN; /* D_i = <dO_i, O_i> is NaN */
                if (where == 3 && poisoned_row) want_dq = ROW_NAN;
                NAN_CHECK(row_is(o, want_o), "%s: o row %d.%d, expected %d", what, h, r, want_o);
                NAN_CHECK(row_is(dq, want_dq), "%s: dq row %d.%d, expected %d", what, h, r, want_dq);
                NAN_CHECK(lse_nan ? isnan(lse) : isfinite(lse), "%s: lse row %d.%d = %g", what, h, r,
                          (double)lse);
            }
        for (int j = 0; j < NSK; j++) {
            /* Key j is seen by rows j + 1 ..; the poisoned row 3 sees keys 0 .. 2; every
             * row from 3 on sees key 2 and, through row 4, every key. */
            const int seen_by_row = j < pr;
            int want_dk = ROW_FINITE, want_dv = ROW_FINITE;
            if (where == 0 && seen_by_row) want_dk = want_dv = ROW_NAN;
            if (where == 1) want_dk = want_dv = ROW_NAN;
            if (where == 2) want_dk = ROW_NAN; /* dv = P^T dO does not read v */
            if (where == 3 && seen_by_row) want_dk = ROW_NAN, want_dv = 5;
            NAN_CHECK(row_is(t.dk + j * ND, want_dk), "%s: dk key %d, expected %d", what, j, want_dk);
            NAN_CHECK(row_is(t.dv + j * ND, want_dv), "%s: dv key %d, expected %d", what, j, want_dv);
        }
    }
    /* Every score -inf (keys of -inf against positive q): softmax is NaN, not a masked row. */
    nan_fill(&t);
    for (size_t e = 0; e < sizeof t.q / 4; e++) t.q[e] = 1.f;
    for (size_t e = 0; e < sizeof t.k / 4; e++) t.k[e] = -INFINITY;
    NAN_CHECK(nan_run(&t, 0) == 0, "-inf: scratch");
    for (int r = 0; r < NB * NH * NSQ; r++)
        NAN_CHECK(row_is(t.o + r * ND, ROW_NAN) && isnan(t.lse[r]), "-inf scores: row %d not NaN", r);
#undef NAN_CHECK
    printf("%s NaN propagation (%d failure(s))\n", bad ? "FAIL" : "PASS", bad);
    return bad ? 1 : 0;
}

/* ---- the key range through the C ABI ---------------------------------------------------------- */
enum { AB = 3, AH = 2, AHKV = 1, AS = 9, AD = 16 };

/* An int32 tensor (the harness's helpers make float ones). */
static DLTensor *host_i32(host_tensor *h, int32_t *data, int ndim, const int64_t *shape) {
    set_tensor(h, data, L3K_DT_F32, ndim, shape, NULL);
    h->t.dtype.code = kDLInt;
    return &h->t;
}

/* Forward and backward of b = 0 (every key), 1 (left padding: keys 3..), 2 (right padding: keys
 * ..4), causal, through l3k_attention_*: each padded sequence's valid rows and keys equal the
 * sequence run alone, with dout zero on its padded rows (as a loss that ignores them gives): the
 * padded rows' gradients reach nothing.  Then the key range's checks. */
static int test_abi_key_range(void) {
    const int before = g_failures;
    static float q[AB * AH * AS * AD], k[AB * AHKV * AS * AD], v[AB * AHKV * AS * AD],
        dout[AB * AH * AS * AD];
    static float o[AB * AH * AS * AD], lse[AB * AH * AS], dq[AB * AH * AS * AD], dk[AB * AHKV * AS * AD],
        dv[AB * AHKV * AS * AD];
    int32_t kr[AB * 2] = {0, AS, 3, AS, 0, 5};
    const int valid[AB][2] = {{0, AS}, {3, AS}, {0, 5}};
    for (size_t i = 0; i < sizeof q / 4; i++) q[i] = (float)urand();
    for (size_t i = 0; i < sizeof k / 4; i++) k[i] = (float)urand(), v[i] = (float)urand();
    for (int b = 0; b < AB; b++)
        for (int h = 0; h < AH; h++)
            for (int i = 0; i < AS; i++)
                for (int d = 0; d < AD; d++) {
                    const int in = i >= valid[b][0] && i < valid[b][1];
                    dout[((b * AH + h) * AS + i) * AD + d] = in ? (float)urand() : 0.f;
                }
    const int64_t qs[4] = {AB, AH, AS, AD}, ks[4] = {AB, AHKV, AS, AD}, ls[1] = {AB * AH * AS},
                  rs[2] = {AB, 2};
    host_tensor tq, tk, tv, to, tl, tdo, tdq, tdk, tdv, tkr;
    DLTensor *Q = host_f32(&tq, q, 4, qs), *K = host_f32(&tk, k, 4, ks), *V = host_f32(&tv, v, 4, ks);
    DLTensor *O = host_f32(&to, o, 4, qs), *L = host_f32(&tl, lse, 1, ls), *DO = host_f32(&tdo, dout, 4, qs);
    DLTensor *DQ = host_f32(&tdq, dq, 4, qs), *DK = host_f32(&tdk, dk, 4, ks),
             *DV = host_f32(&tdv, dv, 4, ks);
    DLTensor *KR = host_i32(&tkr, kr, 2, rs);
    CHECK(l3k_attention_forward(Q, K, V, KR, 0.0f, 1, O, L, NULL) == L3K_SUCCESS, "%s", l3k_last_error());
    CHECK(l3k_attention_backward(DO, Q, K, V, KR, O, L, 0.0f, 1, 0, DQ, DK, DV, NULL, NULL) == L3K_SUCCESS,
          "%s", l3k_last_error());

    for (int b = 0; b < AB; b++) {
        /* sequence b alone: its valid rows as a (1, H, n, D) batch, views of the same memory */
        const int s0 = valid[b][0], n = valid[b][1] - valid[b][0];
        static float o1[AH * AS * AD], l1[AH * AS], dq1[AH * AS * AD], dk1[AHKV * AS * AD],
            dv1[AHKV * AS * AD];
        const int64_t q1s[4] = {1, AH, n, AD}, k1s[4] = {1, AHKV, n, AD}, l1s[1] = {AH * n};
        const int64_t qst[4] = {AH * AS * AD, AS * AD, AD, 1}, kst[4] = {AHKV * AS * AD, AS * AD, AD, 1};
        host_tensor a[5], r[5];
        set_tensor(&a[0], q + (size_t)(b * AH * AS + s0) * AD, L3K_DT_F32, 4, q1s, qst);
        set_tensor(&a[1], k + (size_t)(b * AHKV * AS + s0) * AD, L3K_DT_F32, 4, k1s, kst);
        set_tensor(&a[2], v + (size_t)(b * AHKV * AS + s0) * AD, L3K_DT_F32, 4, k1s, kst);
        set_tensor(&a[3], dout + (size_t)(b * AH * AS + s0) * AD, L3K_DT_F32, 4, q1s, qst);
        DLTensor *O1 = host_f32(&r[0], o1, 4, q1s), *L1 = host_f32(&r[1], l1, 1, l1s);
        DLTensor *DQ1 = host_f32(&r[2], dq1, 4, q1s), *DK1 = host_f32(&r[3], dk1, 4, k1s),
                 *DV1 = host_f32(&r[4], dv1, 4, k1s);
        CHECK(l3k_attention_forward(&a[0].t, &a[1].t, &a[2].t, NULL, 0.0f, 1, O1, L1, NULL) == L3K_SUCCESS,
              "%s", l3k_last_error());
        CHECK(l3k_attention_backward(&a[3].t, &a[0].t, &a[1].t, &a[2].t, NULL, O1, L1, 0.0f, 1, 0, DQ1, DK1,
                                     DV1, NULL, NULL) == L3K_SUCCESS,
              "%s", l3k_last_error());
        double eo = 0, el = 0, edq = 0;
        for (int h = 0; h < AH; h++)
            for (int i = 0; i < AS; i++) {
                const int in = i >= s0 && i < s0 + n;
                const float *orow = o + ((b * AH + h) * AS + i) * AD,
                            *dqrow = dq + ((b * AH + h) * AS + i) * AD;
                const float l = lse[(b * AH + h) * AS + i];
                for (int d = 0; d < AD; d++) {
                    if (in) {
                        eo = fmax(eo, fabs(orow[d] - o1[(h * n + i - s0) * AD + d]));
                        edq = fmax(edq, fabs(dqrow[d] - dq1[(h * n + i - s0) * AD + d]));
                    } else {
                        /* a padded row gets its output from what it sees and passes no gradient on */
                        CHECK(dqrow[d] == 0.f, "b %d: padded row %d.%d has dq %g", b, h, i, dqrow[d]);
                        if (i < s0) CHECK(orow[d] == 0.f, "b %d: left-padded row %d sees no key", b, i);
                    }
                }
                if (in) el = fmax(el, fabs(l - l1[h * n + i - s0]));
                else if (i < s0) CHECK(isinf(l) && l > 0, "b %d: left-padded row %d: lse %g", b, i, l);
            }
        double ek = 0;
        for (int j = 0; j < AS; j++)
            for (int d = 0; d < AD; d++) {
                const float gk = dk[(b * AS + j) * AD + d], gv = dv[(b * AS + j) * AD + d];
                if (j >= s0 && j < s0 + n) {
                    ek = fmax(ek, fabs(gk - dk1[(j - s0) * AD + d]));
                    ek = fmax(ek, fabs(gv - dv1[(j - s0) * AD + d]));
                } else {
                    CHECK(gk == 0.f && gv == 0.f, "b %d: padded key %d has dk %g dv %g", b, j, gk, gv);
                }
            }
        CHECK(eo <= 1e-6 && el <= 1e-6 && edq <= 1e-6 && ek <= 1e-6,
              "b %d: padded batch vs the sequence alone: o %g lse %g dq %g dk/dv %g", b, eo, el, edq, ek);
    }

    /* The checks: each refused with its message, the outputs untouched. */
    for (size_t i = 0; i < sizeof o / 4; i++) o[i] = 7.f;
    for (size_t i = 0; i < sizeof dq / 4; i++) dq[i] = 7.f;
    host_tensor bad;
    float fr[AB * 2];
    EXPECT_FAILS(l3k_attention_forward(Q, K, V, host_f32(&bad, fr, 2, rs), 0.0f, 1, O, L, NULL),
                 L3K_ERROR_DTYPE, "attention_forward: key_range dtype float32, expected int32");
    const int64_t short_rows[2] = {AB - 1, 2}, flat[1] = {2 * AB}, wide[2] = {AB, 3};
    EXPECT_FAILS(l3k_attention_forward(Q, K, V, host_i32(&bad, kr, 2, short_rows), 0.0f, 1, O, L, NULL),
                 L3K_ERROR_SHAPE, "attention_forward: key_range shape (2, 2), expected (3, 2)");
    EXPECT_FAILS(l3k_attention_forward(Q, K, V, host_i32(&bad, kr, 2, wide), 0.0f, 1, O, L, NULL),
                 L3K_ERROR_SHAPE, "key_range shape (3, 3), expected (3, 2)");
    EXPECT_FAILS(l3k_attention_forward(Q, K, V, host_i32(&bad, kr, 1, flat), 0.0f, 1, O, L, NULL),
                 L3K_ERROR_SHAPE, "key_range has ndim 1, expected 2");
    static int32_t wide_buf[AB * 4];
    host_i32(&bad, wide_buf, 2, rs);
    bad.t.strides = bad.strides; /* every other pair of a (3, 4) buffer: not contiguous */
    bad.strides[0] = 4;
    bad.strides[1] = 1;
    CHECK(l3k_attention_forward(Q, K, V, &bad.t, 0.0f, 1, O, L, NULL) != L3K_SUCCESS,
          "strided key_range accepted");
    CHECK(strstr(l3k_last_error(), "key_range") != NULL, "%s", l3k_last_error());
    host_i32(&bad, (int32_t *)((char *)wide_buf + 2), 2, rs);
    EXPECT_FAILS(l3k_attention_forward(Q, K, V, &bad.t, 0.0f, 1, O, L, NULL), L3K_ERROR_ALIGNMENT,
                 "key_range data pointer");
    host_i32(&bad, (int32_t *)o, 2, rs); /* the output's own memory */
    EXPECT_FAILS(l3k_attention_forward(Q, K, V, &bad.t, 0.0f, 1, O, L, NULL), L3K_ERROR_LAYOUT,
                 "o overlaps key_range");
    host_i32(&bad, (int32_t *)dq, 2, rs);
    EXPECT_FAILS(l3k_attention_backward(DO, Q, K, V, &bad.t, O, L, 0.0f, 1, 0, DQ, DK, DV, NULL, NULL),
                 L3K_ERROR_LAYOUT, "attention_backward: dq overlaps key_range");
    int untouched = 1;
    for (size_t i = 0; i < sizeof o / 4; i++) untouched &= o[i] == 7.f && dq[i] == 7.f;
    CHECK(untouched, "a refused call wrote o or dq");
    const int fails = g_failures - before;
    printf("%s key range through the C ABI (%d failure(s))\n", fails ? "FAIL" : "PASS", fails);
    return fails ? 1 : 0;
}

int main(void) {
    const tcase cases[] = {
        {1, 1, 1, 1, 1, 64, 0, L3K_DT_F32, 1.0},
        {2, 4, 4, 17, 17, 64, 0, L3K_DT_F32, 1.0},
        {2, 4, 1, 17, 17, 40, 1, L3K_DT_F32, 1.0},
        {1, 8, 2, 100, 100, 64, 1, L3K_DT_F32, 2.0},
        {1, 8, 2, 100, 37, 40, 1, L3K_DT_F32, 1.0}, /* Sq > Sk causal: fully masked rows */
        {1, 4, 1, 37, 100, 64, 1, L3K_DT_F32, 1.0}, /* Sq < Sk causal */
        {2, 4, 1, 1, 100, 64, 1, L3K_DT_F32, 1.0},
        {1, 4, 4, 100, 1, 40, 1, L3K_DT_F32, 1.0},
        {2, 8, 2, 100, 100, 64, 1, L3K_DT_BF16, 1.0},
        {1, 4, 1, 17, 100, 40, 0, L3K_DT_BF16, 2.0},
        {1, 8, 2, 100, 17, 64, 1, L3K_DT_BF16, 1.0},
        {1, 4, 4, 100, 100, 64, 1, L3K_DT_F16, 1.0},
        {1, 8, 2, 17, 100, 40, 0, L3K_DT_F16, 1.0},
        /* per-sequence key ranges: padding on either side, empty and full ranges, causal or not, GQA */
        {3, 4, 2, 70, 70, 64, 1, L3K_DT_F32, 1.0, KR_LEFT},
        {3, 4, 2, 70, 70, 64, 0, L3K_DT_F32, 1.0, KR_LEFT},
        {3, 4, 1, 70, 70, 40, 1, L3K_DT_F32, 1.0, KR_RIGHT},
        {3, 4, 4, 70, 70, 64, 0, L3K_DT_F32, 1.0, KR_RIGHT},
        {4, 4, 2, 70, 70, 64, 1, L3K_DT_F32, 1.0, KR_WILD},
        {4, 2, 1, 30, 130, 64, 0, L3K_DT_F32, 1.0, KR_WILD},
        {3, 8, 2, 100, 37, 40, 1, L3K_DT_F32, 1.0, KR_LEFT},  /* Sq > Sk: masked rows twice over */
        {3, 4, 1, 37, 100, 64, 1, L3K_DT_F32, 1.0, KR_RIGHT}, /* Sq < Sk */
        {3, 8, 2, 100, 100, 64, 1, L3K_DT_BF16, 1.0, KR_LEFT},
        {4, 4, 4, 100, 100, 64, 1, L3K_DT_F16, 1.0, KR_WILD},
    };
    int fails = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) fails += run_case(&cases[i]);
    fails += test_nan();
    fails += test_abi_key_range();
    printf("%d failure(s)\n", fails);
    return fails ? 1 : 0;
}
