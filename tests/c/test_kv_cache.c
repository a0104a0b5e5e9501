/* The KV cache through the C ABI on host memory.
 *  - l3k_kv_cache_append against a naive float64 loop: float32 / float16 / bfloat16 (tables in
 *    float32 or the dtype), both RoPE conventions, GQA and MQA, head_dim 8 / 64 / 72, inputs and
 *    caches as transposed or padded views, q_out apart or in place, positions NULL (shared,
 *    per-batch and batch-1 tables) or given, every clamp of cache_range (end < seq, end past the
 *    capacity, start > end, negative and extreme values) and positions outside the tables (NaN
 *    q and k).  Every element of every buffer is checked: the new slots, and all the others
 *    (padding between heads too) byte for byte as they were.
 *  - l3k_attention_decode against a float64 softmax over the keys start' <= j <= end' - seq + i:
 *    seq 1 to 4, GQA and MQA, left padding, queries that see no key (o exactly 0), NaN in every
 *    slot before start and from end on (it must not reach o), scale 0 and explicit.
 *  - Bad inputs of both: the status, the message, and nothing written.
 *  - The block's decode step (l3k_llama_block_decode): a prompt prefilled in one call and
 *    continued token by token or in chunks gives the rows of l3k_llama_block_forward over the
 *    whole sequence; a left-padded sequence in a batch gives the rows of that sequence alone;
 *    the size query and the step's own refusals. */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include "check.h"
#include "convert.h"

/* Tolerances, against float64 references computed from the stored (rounded) inputs.
 * Append (RoPE): float32 arithmetic, then one rounding: float32 within 1e-6 relative, float16 and
 * bfloat16 within 1 unit in the last place of the dtype.  Decode attention: float32 within 1e-5
 * relative, float16 and bfloat16 within 2 ulps (one rounding of the output, after float32
 * arithmetic).  An absolute 1e-6 on top of each (results near 0).  Block decode step (float32):
 * within 1e-5 of the largest |output| of the reference forward (the same float32 arithmetic, the
 * attention summed in another order; what it gives here is ~2e-7). */
#define APPEND_REL 1e-6
#define APPEND_ULPS 1.0
#define DECODE_REL 1e-5
#define DECODE_ULPS 2.0
#define ABS_FLOOR 1e-6
#define BLOCK_REL 1e-5

static int g_append_cases = 0, g_decode_cases = 0, g_block_runs = 0;

/* One unit in the last place of dtype dt at |x| (the subnormal spacing below the normal range). */
static double ulp_of(double x, l3k_dt dt) {
    const int mant = dt == L3K_DT_F16 ? 10 : 7, emin = dt == L3K_DT_F16 ? -14 : -126;
    int e = emin + 1;
    if (x != 0) frexp(fabs(x), &e); /* |x| in [2^(e-1), 2^e) */
    return ldexp(1.0, (e - 1 < emin ? emin : e - 1) - mant);
}

static double tol_of(double want, l3k_dt dt, double rel, double ulps) {
    return (dt == L3K_DT_F32 ? rel * fabs(want) : ulps * ulp_of(want, dt)) + ABS_FLOOR;
}

/* ---- 4-D host tensors in several layouts ----------------------------------------------- */

/* (B, H, S, D) tensors: compact; (B, S, H, D) memory seen as (B, H, S, D) (a fused projection's
 * heads, a transformers cache's (batch, slot, head) order); padded: odd gaps after every row,
 * head and batch (a view of a larger buffer); fused (append's inputs only): q, k and v the heads of one
 * (B, S, H + 2 Hkv, D) projection, as the block passes them. */
enum { L_COMPACT, L_BSHD, L_PADDED, L_FUSED };
static const char *layout_names[4] = {"compact", "bshd", "padded", "fused"};

typedef struct {
    host_tensor ht;
    int64_t st[4], n; /* strides; elements of the buffer (the padding included) */
    l3k_dt dt;
    void *buf, *snap; /* the memory, and a copy of it taken before the call */
    int view;         /* buf is a part of another buffer (t4_view) */
} t4;

static void t4_make(t4 *t, l3k_dt dt, int64_t B, int64_t H, int64_t S, int64_t D, int layout) {
    const int64_t shape[4] = {B, H, S, D};
    memset(t, 0, sizeof *t);
    t->dt = dt;
    t->st[3] = 1;
    if (layout == L_COMPACT) {
        t->st[2] = D, t->st[1] = S * D, t->st[0] = H * S * D;
    } else if (layout == L_BSHD) {
        t->st[2] = H * D, t->st[1] = D, t->st[0] = S * H * D;
    } else {
        t->st[2] = D + 3, t->st[1] = S * (D + 3) + 5, t->st[0] = H * t->st[1] + 7;
    }
    t->n = B && H && S && D ? (B - 1) * t->st[0] + (H - 1) * t->st[1] + (S - 1) * t->st[2] + D : 0;
    t->buf = malloc(l3k_dt_size(dt) * (size_t)(t->n + 1));
    t->snap = malloc(l3k_dt_size(dt) * (size_t)(t->n + 1));
    set_tensor(&t->ht, t->buf, dt, 4, shape, layout == L_COMPACT ? NULL : t->st);
}

static int64_t t4_at(const t4 *t, int64_t b, int64_t h, int64_t s, int64_t d) {
    return b * t->st[0] + h * t->st[1] + s * t->st[2] + d;
}
/* The value before the call (from the snapshot). */
static double t4_old(const t4 *t, int64_t b, int64_t h, int64_t s, int64_t d) {
    return l3k_load(t->snap, t4_at(t, b, h, s, d), t->dt);
}
static void t4_set(t4 *t, int64_t b, int64_t h, int64_t s, int64_t d, float v) {
    l3k_store(t->buf, t4_at(t, b, h, s, d), v, t->dt);
}
static void t4_fill(t4 *t, float v) {
    for (int64_t i = 0; i < t->n; ++i) l3k_store(t->buf, i, v, t->dt);
}
static void t4_fill_random(t4 *t, float mag, unsigned *seed) {
    for (int64_t i = 0; i < t->n; ++i) l3k_store(t->buf, i, mag * frand(seed), t->dt);
}
static void t4_snap(t4 *t) { memcpy(t->snap, t->buf, l3k_dt_size(t->dt) * (size_t)t->n); }
static int t4_unchanged(const t4 *t) {
    return memcmp(t->snap, t->buf, l3k_dt_size(t->dt) * (size_t)t->n) == 0;
}
/* A view of (B, H, S, D) at element `off` of `base` with strides st (a part of a fused buffer):
 * the buffer is not its own. */
static void t4_view(t4 *t, l3k_dt dt, void *base, int64_t off, int64_t B, int64_t H, int64_t S, int64_t D,
                    const int64_t st[4]) {
    const int64_t shape[4] = {B, H, S, D};
    memset(t, 0, sizeof *t);
    t->dt = dt;
    t->view = 1;
    memcpy(t->st, st, sizeof t->st);
    t->n = B && H && S && D ? (B - 1) * st[0] + (H - 1) * st[1] + (S - 1) * st[2] + D : 0;
    t->buf = (char *)base + (size_t)off * l3k_dt_size(dt);
    t->snap = malloc(l3k_dt_size(dt) * (size_t)(t->n + 1));
    set_tensor(&t->ht, t->buf, dt, 4, shape, t->st);
}

static void t4_free(t4 *t) {
    if (!t->view) free(t->buf);
    free(t->snap);
}

/* What each element of a t4's buffer must hold after the call: as before (byte for byte), a value
 * within tolerance, exactly a value, NaN, or exactly 0. */
enum { K_SAME, K_APPROX, K_EXACT, K_NAN, K_ZERO };
typedef struct {
    double *want;
    unsigned char *kind;
} expect;

static void expect_init(expect *e, const t4 *t) {
    e->want = calloc((size_t)t->n + 1, sizeof(double));
    e->kind = calloc((size_t)t->n + 1, 1); /* K_SAME */
}
static void expect_set(expect *e, const t4 *t, int64_t b, int64_t h, int64_t s, int64_t d, int kind,
                       double want) {
    const int64_t i = t4_at(t, b, h, s, d);
    e->kind[i] = (unsigned char)kind;
    e->want[i] = want;
}
static void expect_free(expect *e) {
    free(e->want);
    free(e->kind);
}

/* Every element of t's buffer against e; the number of wrong ones. */
static int check_t4(const char *label, const char *name, const t4 *t, const expect *e, double rel,
                    double ulps) {
    static const char *kinds[5] = {"unchanged", "~", "exactly", "NaN", "exactly 0"};
    const size_t es = l3k_dt_size(t->dt);
    const int64_t *sh = t->ht.shape;
    /* A view checks its own elements (the buffer's others are its siblings' to check). */
    const int64_t count = t->view ? sh[0] * sh[1] * sh[2] * sh[3] : t->n;
    int bad = 0;
    for (int64_t k = 0; k < count; ++k) {
        const int64_t i = t->view ? t4_at(t, k / (sh[1] * sh[2] * sh[3]), k / (sh[2] * sh[3]) % sh[1],
                                          k / sh[3] % sh[2], k % sh[3])
                                  : k;
        const double got = l3k_load(t->buf, i, t->dt), want = e->want[i];
        int ok;
        switch (e->kind[i]) {
            case K_SAME:
                ok = memcmp((const char *)t->buf + (size_t)i * es, (const char *)t->snap + (size_t)i * es,
                            es) == 0;
                break;
            case K_EXACT:
                ok = got == want;
                break;
            case K_NAN:
                ok = isnan(got);
                break;
            case K_ZERO:
                ok = got == 0.0;
                break;
            default:
                ok = fabs(got - want) <= tol_of(want, t->dt, rel, ulps);
        }
        if (!ok && bad++ < 3)
            CHECK(0, "%s: %s buffer element %lld = %.9g, expected %s %.9g (before: %.9g)", label, name,
                  (long long)i, got, kinds[e->kind[i]], want, l3k_load(t->snap, i, t->dt));
    }
    CHECK(bad == 0, "%s: %s has %d wrong element(s)", label, name, bad);
    return bad;
}

/* An int32 host tensor. */
static DLTensor *i32_tensor(host_tensor *h, int32_t *data, int ndim, const int64_t *shape) {
    set_tensor(h, data, L3K_DT_F32, ndim, shape, NULL);
    h->t.dtype.code = kDLInt;
    return &h->t;
}

/* Sequence b's [start', end') as the kernels clamp cache_range. */
static void clamped(const int32_t range[2], int64_t cap, int64_t *start, int64_t *end) {
    const int64_t s = range[0], e = range[1];
    *end = e < 0 ? 0 : e > cap ? cap : e;
    *start = s < 0 ? 0 : s > *end ? *end : s;
}

/* A case table's positions, and its cache_range rows flattened: start0, end0, start1, end1, ... */
#define POS(...) \
    { __VA_ARGS__ }
#define RANGE(...) \
    { __VA_ARGS__ }

/* ---- append ---------------------------------------------------------------------------- */

enum { TAB_SHARED, TAB_BATCHED, TAB_ONE }; /* (rows, D/2), (B, rows, D/2), (1, rows, D/2) */

typedef struct {
    const char *what;
    int64_t B, H, Hkv, S, D, cap, rows; /* H 0: no q */
    int tables, with_pos, in_layout, cache_layout, inplace;
    int32_t pos[4], range[8];
} append_case;

/* Row (b, h, s) of x (its values before the call) rotated in float64 with table row cr / sr
 * (NULL: outside the table, NaN), into e at row (b, h, slot) of `into`. */
static void expect_rope(expect *e, const t4 *into, const t4 *x, int64_t b, int64_t h, int64_t s, int64_t slot,
                        int64_t D, int mode, const double *cr, const double *sr) {
    const int64_t half = D / 2;
    for (int64_t p = 0; p < half; ++p) {
        const int64_t i1 = mode == L3K_ROPE_INTERLEAVED ? 2 * p : p;
        const int64_t i2 = mode == L3K_ROPE_INTERLEAVED ? 2 * p + 1 : p + half;
        if (!cr) {
            expect_set(e, into, b, h, slot, i1, K_NAN, 0);
            expect_set(e, into, b, h, slot, i2, K_NAN, 0);
            continue;
        }
        const double x1 = t4_old(x, b, h, s, i1), x2 = t4_old(x, b, h, s, i2);
        expect_set(e, into, b, h, slot, i1, K_APPROX, x1 * cr[p] - x2 * sr[p]);
        expect_set(e, into, b, h, slot, i2, K_APPROX, x2 * cr[p] + x1 * sr[p]);
    }
}

static void run_append(const append_case *c, l3k_dt dt, l3k_dt tdt, int mode) {
    char label[256];
    snprintf(label, sizeof label, "append %s: %s B%lld H%lld Hkv%lld S%lld D%lld cap%lld %s table %s%s%s",
             c->what, dt_label(dt), (long long)c->B, (long long)c->H, (long long)c->Hkv, (long long)c->S,
             (long long)c->D, (long long)c->cap, mode ? "interleaved" : "half", dt_label(tdt),
             c->with_pos ? " positions" : "", c->inplace ? " in-place" : "");
    unsigned seed = (unsigned)(c->B * 7919 + c->H * 131 + c->S * 17 + c->D + 3 * mode + (int)dt * 1000);
    const int64_t B = c->B, H = c->H, Hkv = c->Hkv, S = c->S, D = c->D, half = D / 2, rows = c->rows;
    const int has_q = H > 0;
    t4 q, qo, k, v, kc, vc;
    void *fused = NULL;
    if (c->in_layout == L_FUSED) {
        const int64_t W = (H + 2 * Hkv) * D, st[4] = {S * W, D, W, 1}, nf = B * S * W;
        fused = malloc(l3k_dt_size(dt) * (size_t)(nf + 1));
        for (int64_t i = 0; i < nf; ++i) l3k_store(fused, i, 2.0f * frand(&seed), dt);
        t4_view(&q, dt, fused, 0, B, H, S, D, st);
        t4_view(&k, dt, fused, H * D, B, Hkv, S, D, st);
        t4_view(&v, dt, fused, (H + Hkv) * D, B, Hkv, S, D, st);
    } else {
        t4_make(&q, dt, B, H, S, D, c->in_layout);
        t4_make(&k, dt, B, Hkv, S, D, c->in_layout);
        t4_make(&v, dt, B, Hkv, S, D, c->in_layout);
        t4_fill_random(&q, 2.0f, &seed);
        t4_fill_random(&k, 2.0f, &seed);
        t4_fill_random(&v, 2.0f, &seed);
    }
    t4_make(&qo, dt, B, H, S, D, c->in_layout == L_PADDED ? L_COMPACT : L_PADDED);
    t4_make(&kc, dt, B, Hkv, c->cap, D, c->cache_layout);
    t4_make(&vc, dt, B, Hkv, c->cap, D, c->cache_layout == L_PADDED ? L_BSHD : c->cache_layout);
    t4_fill(&qo, -3.5f);
    t4_fill(&kc, 7.25f);
    t4_fill(&vc, 7.25f);

    const int64_t tb = c->tables == TAB_BATCHED ? B : 1, ntab = tb * rows * half;
    void *cbuf = malloc(l3k_dt_size(tdt) * (size_t)ntab), *sbuf = malloc(l3k_dt_size(tdt) * (size_t)ntab);
    double *cv = malloc(sizeof(double) * (size_t)ntab), *sv = malloc(sizeof(double) * (size_t)ntab);
    for (int64_t i = 0; i < ntab; ++i) {
        const double ang = 0.37 * (double)(i / half) / pow(10.0, (double)(i % half) / half) +
                           0.3 * frand(&seed);
        l3k_store(cbuf, i, (float)cos(ang), tdt);
        l3k_store(sbuf, i, (float)sin(ang), tdt);
        cv[i] = l3k_load(cbuf, i, tdt);
        sv[i] = l3k_load(sbuf, i, tdt);
    }
    host_tensor tc, ts, tp, tr;
    const int64_t t2[2] = {rows, half}, t3[3] = {tb, rows, half}, sp[1] = {B}, sr[2] = {B, 2};
    set_tensor(&tc, cbuf, tdt, c->tables == TAB_SHARED ? 2 : 3, c->tables == TAB_SHARED ? t2 : t3, NULL);
    set_tensor(&ts, sbuf, tdt, c->tables == TAB_SHARED ? 2 : 3, c->tables == TAB_SHARED ? t2 : t3, NULL);
    int32_t pos[4], range[8];
    for (int64_t b = 0; b < B; ++b) {
        pos[b] = c->pos[b];
        range[2 * b] = c->range[2 * b];
        range[2 * b + 1] = c->range[2 * b + 1];
    }
    DLTensor *P = c->with_pos ? i32_tensor(&tp, pos, 1, sp) : NULL, *R = i32_tensor(&tr, range, 2, sr);
    t4 *qout = c->inplace ? &q : &qo;
    t4 *all[6] = {&q, &qo, &k, &v, &kc, &vc};
    for (int i = 0; i < 6; ++i) t4_snap(all[i]);

    const l3k_status st = l3k_kv_cache_append(has_q ? &q.ht.t : NULL, &k.ht.t, &v.ht.t, &tc.t, &ts.t, P, R,
                                              mode, has_q ? &qout->ht.t : NULL, &kc.ht.t, &vc.ht.t, NULL);
    CHECK(st == L3K_SUCCESS, "%s: %s", label, l3k_last_error());

    expect e[6];
    for (int i = 0; i < 6; ++i) expect_init(&e[i], all[i]);
    expect *eq = c->inplace ? &e[0] : &e[1];
    for (int64_t b = 0; b < B; ++b) {
        int64_t start, end;
        clamped(c->range + 2 * b, c->cap, &start, &end);
        for (int64_t i = 0; i < S; ++i) {
            const int64_t row = i + (c->with_pos ? pos[b] : 0);
            const int in_table = row >= 0 && row < rows;
            const int64_t at = (c->tables == TAB_BATCHED ? b * rows * half : 0) + row * half;
            const double *cr = in_table ? cv + at : NULL, *srow = in_table ? sv + at : NULL;
            for (int64_t h = 0; h < H; ++h) expect_rope(eq, qout, &q, b, h, i, i, D, mode, cr, srow);
            const int64_t slot = end - S + i;
            if (slot < 0) continue;
            for (int64_t h = 0; h < Hkv; ++h) {
                expect_rope(&e[4], &kc, &k, b, h, i, slot, D, mode, cr, srow);
                for (int64_t d = 0; d < D; ++d)
                    expect_set(&e[5], &vc, b, h, slot, d, K_EXACT, t4_old(&v, b, h, i, d));
            }
        }
    }
    static const char *names[6] = {"q", "q_out", "k", "v", "k_cache", "v_cache"};
    for (int i = 0; i < 6; ++i) check_t4(label, names[i], all[i], &e[i], APPEND_REL, APPEND_ULPS);
    for (int i = 0; i < 6; ++i) {
        expect_free(&e[i]);
        t4_free(all[i]);
    }
    free(fused);
    free(cbuf);
    free(sbuf);
    free(cv);
    free(sv);
    ++g_append_cases;
}

static void test_append(void) {
    /* what, B, H, Hkv, S, D, capacity, table rows, tables, with positions, inputs' layout, cache layout,
     * in place, positions, cache_range */
    static const append_case cases[] = {
        /* A prompt into an empty cache: new token i reads row i of tables of exactly seq rows. */
        {"prefill", 2, 4, 2, 5, 8, 8, 5, TAB_SHARED, 0, L_COMPACT, L_COMPACT, 0, POS(0), RANGE(0, 5, 0, 5)},
        /* One token per sequence at its own position; transposed inputs, q rotated in place, a
         * padded cache (v_cache transposed); the last position on the table's last row. */
        {"decode", 3, 6, 2, 1, 64, 10, 12, TAB_SHARED, 1, L_BSHD, L_PADDED, 1, POS(3, 0, 11),
         RANGE(0, 4, 0, 1, 2, 10)},
        /* A chunk, positions NULL with per-batch tables; MQA, head_dim 72, left padding. */
        {"chunk", 2, 4, 1, 3, 72, 9, 4, TAB_BATCHED, 0, L_PADDED, L_PADDED, 0, POS(0), RANGE(1, 5, 0, 3)},
        /* cache_range clamps: end < seq (the negative slot skipped), end past the capacity
         * (clamped), start > end, end negative (nothing written); positions partly outside the
         * table (those tokens' q and k NaN, v still written). */
        {"clamps", 4, 2, 2, 3, 8, 6, 5, TAB_SHARED, 1, L_COMPACT, L_PADDED, 0, POS(0, 3, 2, -2),
         RANGE(0, 2, 1, 100, 5, 3, INT32_MIN, -4)},
        /* No q: only the cache; a (1, rows, D/2) table; the extremes of int32, an empty range. */
        {"no-q", 2, 0, 3, 2, 16, 4, 6, TAB_ONE, 1, L_BSHD, L_COMPACT, 0, POS(4, 1),
         RANGE(INT32_MIN, INT32_MAX, 3, 3)},
        /* The block's way: q, k and v the heads of one fused projection, q rotated in place;
         * positions into per-batch tables. */
        {"fused-in-place", 2, 6, 2, 2, 64, 12, 8, TAB_BATCHED, 1, L_FUSED, L_COMPACT, 1, POS(5, 0),
         RANGE(0, 12, 2, 4)},
        /* Fused inputs, q_out apart; a padded cache. */
        {"fused-apart", 3, 4, 2, 4, 64, 9, 12, TAB_SHARED, 1, L_FUSED, L_PADDED, 0, POS(0, 2, 8),
         RANGE(0, 4, 1, 6, 0, 9)},
    };
    static const l3k_dt dts[3] = {L3K_DT_F32, L3K_DT_F16, L3K_DT_BF16};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
        for (int d = 0; d < 3; ++d)
            for (int mode = 0; mode < 2; ++mode)
                run_append(&cases[i], dts[d], mode == L3K_ROPE_HALF ? L3K_DT_F32 : dts[d], mode);
    printf("kv_cache_append: %d cases\n", g_append_cases);
}

/* ---- decode attention ------------------------------------------------------------------ */

typedef struct {
    const char *what;
    int64_t B, H, Hkv, Sq, D, cap;
    float scale; /* the explicit scale (each case also runs with 0) */
    int q_layout, o_layout, cache_layout;
    int32_t range[8];
} decode_case;

static void run_decode(const decode_case *c, l3k_dt dt, float scale) {
    char label[256];
    snprintf(label, sizeof label, "decode %s: %s B%lld H%lld Hkv%lld Sq%lld D%lld cap%lld scale %g, %s cache",
             c->what, dt_label(dt), (long long)c->B, (long long)c->H, (long long)c->Hkv, (long long)c->Sq,
             (long long)c->D, (long long)c->cap, (double)scale, layout_names[c->cache_layout]);
    unsigned seed = (unsigned)(c->B * 31 + c->H * 7 + c->Sq * 1013 + c->D + (int)dt * 77);
    const int64_t B = c->B, H = c->H, Hkv = c->Hkv, Sq = c->Sq, D = c->D, group = H / Hkv;
    t4 q, o, kc, vc;
    t4_make(&q, dt, B, H, Sq, D, c->q_layout);
    t4_make(&o, dt, B, H, Sq, D, c->o_layout);
    t4_make(&kc, dt, B, Hkv, c->cap, D, c->cache_layout);
    t4_make(&vc, dt, B, Hkv, c->cap, D, c->cache_layout == L_PADDED ? L_BSHD : c->cache_layout);
    t4_fill_random(&q, 1.5f, &seed);
    t4_fill(&o, -3.5f);
    /* NaN everywhere (padding, slots before start and from end on), values in [start', end'). */
    t4_fill(&kc, NAN);
    t4_fill(&vc, NAN);
    int32_t range[8];
    for (int64_t b = 0; b < B; ++b) {
        range[2 * b] = c->range[2 * b];
        range[2 * b + 1] = c->range[2 * b + 1];
        int64_t start, end;
        clamped(c->range + 2 * b, c->cap, &start, &end);
        for (int64_t h = 0; h < Hkv; ++h)
            for (int64_t j = start; j < end; ++j)
                for (int64_t d = 0; d < D; ++d) {
                    t4_set(&kc, b, h, j, d, 1.5f * frand(&seed));
                    t4_set(&vc, b, h, j, d, frand(&seed));
                }
    }
    host_tensor tr;
    const int64_t sr[2] = {B, 2};
    DLTensor *R = i32_tensor(&tr, range, 2, sr);
    t4 *all[4] = {&q, &o, &kc, &vc};
    for (int i = 0; i < 4; ++i) t4_snap(all[i]);

    size_t bytes = 1;
    CHECK(l3k_attention_decode_workspace_size(&q.ht.t, &kc.ht.t, &bytes) == L3K_SUCCESS, "%s: %s", label,
          l3k_last_error());
    CHECK(bytes == 0, "%s: the workspace size on the CPU is %zu, expected 0", label, bytes);
    const l3k_status st = l3k_attention_decode(&q.ht.t, &kc.ht.t, &vc.ht.t, R, scale, &o.ht.t, NULL, NULL);
    CHECK(st == L3K_SUCCESS, "%s: %s", label, l3k_last_error());

    expect e[4];
    for (int i = 0; i < 4; ++i) expect_init(&e[i], all[i]);
    const double sc = scale > 0 ? scale : 1.0 / sqrt((double)D);
    double *w = malloc(sizeof(double) * (size_t)(c->cap + 1));
    int empty = 0;
    for (int64_t b = 0; b < B; ++b) {
        int64_t start, end;
        clamped(c->range + 2 * b, c->cap, &start, &end);
        for (int64_t h = 0; h < H; ++h)
            for (int64_t i = 0; i < Sq; ++i) {
                const int64_t p = end - Sq + i, kh = h / group;
                if (p < start) {
                    for (int64_t d = 0; d < D; ++d) expect_set(&e[1], &o, b, h, i, d, K_ZERO, 0);
                    ++empty;
                    continue;
                }
                double mx = -INFINITY, sum = 0;
                for (int64_t j = start; j <= p; ++j) {
                    double dot = 0;
                    for (int64_t d = 0; d < D; ++d) dot += t4_old(&q, b, h, i, d) * t4_old(&kc, b, kh, j, d);
                    w[j - start] = sc * dot;
                    mx = fmax(mx, w[j - start]);
                }
                for (int64_t j = start; j <= p; ++j) sum += (w[j - start] = exp(w[j - start] - mx));
                for (int64_t d = 0; d < D; ++d) {
                    double acc = 0;
                    for (int64_t j = start; j <= p; ++j) acc += w[j - start] * t4_old(&vc, b, kh, j, d);
                    expect_set(&e[1], &o, b, h, i, d, K_APPROX, acc / sum);
                }
            }
    }
    static const char *names[4] = {"q", "o", "k_cache", "v_cache"};
    for (int i = 0; i < 4; ++i) check_t4(label, names[i], all[i], &e[i], DECODE_REL, DECODE_ULPS);
    for (int i = 0; i < 4; ++i) {
        expect_free(&e[i]);
        t4_free(all[i]);
    }
    free(w);
    ++g_decode_cases;
}

static void test_decode(void) {
    /* what, B, H, Hkv, Sq, D, capacity, explicit scale, q, o and cache layouts, cache_range */
    static const decode_case cases[] = {
        /* One token: a sequence partway into its cache, one that fills it. */
        {"decode", 2, 4, 2, 1, 64, 16, 0.3f, L_COMPACT, L_COMPACT, L_COMPACT, RANGE(0, 9, 0, 16)},
        /* Three queries: left padding; end == seq; start past the first queries' slots (they see
         * no key: o = 0). */
        {"chunk", 3, 6, 2, 3, 72, 12, 0.3f, L_BSHD, L_BSHD, L_PADDED, RANGE(2, 9, 0, 3, 5, 6)},
        /* Four queries, MQA: end < seq (the first queries see nothing), an empty range, end past
         * the capacity (clamped), the extremes of int32. */
        {"clamps", 4, 4, 1, 4, 8, 10, 0.7f, L_PADDED, L_COMPACT, L_PADDED,
         RANGE(0, 2, 7, 7, 3, 100, INT32_MIN, INT32_MAX)},
        /* Two queries, a large explicit scale (peaked weights), no GQA, padded output. */
        {"peaked", 1, 2, 2, 2, 16, 20, 1.7f, L_COMPACT, L_PADDED, L_BSHD, RANGE(4, 11)},
    };
    static const l3k_dt dts[3] = {L3K_DT_F32, L3K_DT_F16, L3K_DT_BF16};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
        for (int d = 0; d < 3; ++d) {
            run_decode(&cases[i], dts[d], 0.0f);
            run_decode(&cases[i], dts[d], cases[i].scale);
        }
    printf("attention_decode: %d cases\n", g_decode_cases);
}

/* ---- bad inputs ------------------------------------------------------------------------ */

static void test_bad_inputs(void) {
    enum { B = 2, H = 4, HKV = 2, S = 2, D = 8, CAP = 8 };
    unsigned seed = 11;
    t4 q, qo, k, v, kc, vc, o;
    t4_make(&q, L3K_DT_F32, B, H, S, D, L_COMPACT);
    t4_make(&qo, L3K_DT_F32, B, H, S, D, L_COMPACT);
    t4_make(&k, L3K_DT_F32, B, HKV, S, D, L_COMPACT);
    t4_make(&v, L3K_DT_F32, B, HKV, S, D, L_COMPACT);
    t4_make(&kc, L3K_DT_F32, B, HKV, CAP, D, L_COMPACT);
    t4_make(&vc, L3K_DT_F32, B, HKV, CAP, D, L_COMPACT);
    t4_make(&o, L3K_DT_F32, B, H, S, D, L_COMPACT);
    t4 *all[7] = {&q, &qo, &k, &v, &kc, &vc, &o};
    for (int i = 0; i < 7; ++i) t4_fill_random(all[i], 1.0f, &seed);
    float cs[CAP * D / 2], sn[CAP * D / 2];
    for (int i = 0; i < CAP * D / 2; ++i) {
        cs[i] = (float)cos(0.1 * i);
        sn[i] = (float)sin(0.1 * i);
    }
    int32_t pos[B] = {0, 1}, range[2 * B] = {0, 2, 0, 3};
    int64_t range64[2 * B] = {0, 2, 0, 3};
    host_tensor tc, ts, tp, tr, tshort, tr64, tr3, tp3, tk16, tkc6, tvc6, tkc264, tvc264, tqo_in, tkc_in, tq3,
        tk_in, tq_t, to16;
    const int64_t stab[2] = {CAP, D / 2}, sp[1] = {B}, sr[2] = {B, 2}, sr3[2] = {B, 3}, sp3[1] = {3};
    const int64_t short_tab[2] = {S - 1, D / 2};
    DLTensor *COS = host_f32(&tc, cs, 2, stab), *SIN = host_f32(&ts, sn, 2, stab);
    DLTensor *P = i32_tensor(&tp, pos, 1, sp), *R = i32_tensor(&tr, range, 2, sr);
    DLTensor *Q = &q.ht.t, *QO = &qo.ht.t, *K = &k.ht.t, *V = &v.ht.t, *KC = &kc.ht.t, *VC = &vc.ht.t,
             *O = &o.ht.t;

    /* The valid calls first (then nothing may change). */
    CHECK(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, L3K_ROPE_HALF, QO, KC, VC, NULL) == L3K_SUCCESS, "%s",
          l3k_last_error());
    CHECK(l3k_attention_decode(Q, KC, VC, R, 0.0f, O, NULL, NULL) == L3K_SUCCESS, "%s", l3k_last_error());
    for (int i = 0; i < 7; ++i) t4_snap(all[i]);
    static const char *names[7] = {"q", "q_out", "k", "v", "k_cache", "v_cache", "o"};
    /* The call fails with `status` and a message containing `needle`, and wrote nothing. */
#define REFUSED(call, status, needle)                                                        \
    do {                                                                                     \
        EXPECT_FAILS(call, status, needle);                                                  \
        for (int i_ = 0; i_ < 7; ++i_)                                                       \
            CHECK(t4_unchanged(all[i_]), "%s: the refused call wrote %s", #call, names[i_]); \
    } while (0)

    /* kv_cache_append */
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, 0, QO, NULL, VC, NULL), L3K_ERROR_NULL_POINTER,
            "kv_cache_append: k_cache is NULL");
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, 0, QO, KC, NULL, NULL), L3K_ERROR_NULL_POINTER,
            "kv_cache_append: v_cache is NULL");
    REFUSED(l3k_kv_cache_append(NULL, K, V, COS, SIN, P, R, 0, QO, KC, VC, NULL), L3K_ERROR_NULL_POINTER,
            "kv_cache_append: q is NULL but q_out is given");
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, 0, NULL, KC, VC, NULL), L3K_ERROR_NULL_POINTER,
            "kv_cache_append: q_out is NULL but q is given");
    const int64_t kshape[4] = {B, HKV, S, D};
    set_tensor(&tk16, k.buf, L3K_DT_F16, 4, kshape, NULL);
    REFUSED(l3k_kv_cache_append(Q, &tk16.t, V, COS, SIN, P, R, 0, QO, KC, VC, NULL), L3K_ERROR_DTYPE,
            "kv_cache_append: k dtype float16, expected float32 like k_cache");
    /* head_dim 6 and 264: the same cache memory seen with another head_dim (fewer slots). */
    const int64_t s6[4] = {B, HKV, 2, 6}, s264[4] = {1, 1, 1, 264};
    set_tensor(&tkc6, kc.buf, L3K_DT_F32, 4, s6, NULL);
    set_tensor(&tvc6, vc.buf, L3K_DT_F32, 4, s6, NULL);
    REFUSED(l3k_kv_cache_append(NULL, K, V, COS, SIN, P, R, 0, NULL, &tkc6.t, &tvc6.t, NULL), L3K_ERROR_SHAPE,
            "kv_cache_append: k_cache head_dim is 6, expected a multiple of 8 in [8, 256]");
    set_tensor(&tkc264, kc.buf, L3K_DT_F32, 4, s264, NULL);
    set_tensor(&tvc264, vc.buf, L3K_DT_F32, 4, s264, NULL);
    REFUSED(l3k_kv_cache_append(NULL, K, V, COS, SIN, P, R, 0, NULL, &tkc264.t, &tvc264.t, NULL),
            L3K_ERROR_SHAPE, "k_cache head_dim is 264");
    REFUSED(l3k_attention_decode(Q, &tkc264.t, &tvc264.t, R, 0.0f, O, NULL, NULL), L3K_ERROR_SHAPE,
            "attention_decode: k_cache head_dim is 264");
    set_tensor(&tr64, range64, L3K_DT_F32, 2, sr, NULL);
    tr64.t.dtype.code = kDLInt;
    tr64.t.dtype.bits = 64;
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, &tr64.t, 0, QO, KC, VC, NULL), L3K_ERROR_DTYPE,
            "kv_cache_append: cache_range dtype int64, expected int32");
    int32_t range3[3 * B] = {0};
    i32_tensor(&tr3, range3, 2, sr3);
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, &tr3.t, 0, QO, KC, VC, NULL), L3K_ERROR_SHAPE,
            "kv_cache_append: cache_range shape (2, 3), expected (2, 2)");
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, NULL, 0, QO, KC, VC, NULL), L3K_ERROR_NULL_POINTER,
            "kv_cache_append: cache_range is NULL");
    int32_t pos3[3] = {0};
    i32_tensor(&tp3, pos3, 1, sp3);
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, &tp3.t, R, 0, QO, KC, VC, NULL), L3K_ERROR_SHAPE,
            "kv_cache_append: positions has ndim 1 and 3 elements, expected shape (2,)");
    DLTensor *SHORT = host_f32(&tshort, cs, 2, short_tab);
    REFUSED(l3k_kv_cache_append(Q, K, V, SHORT, SHORT, NULL, R, 0, QO, KC, VC, NULL), L3K_ERROR_SHAPE,
            "kv_cache_append: cos has 1 rows, expected at least seq = 2");
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, 2, QO, KC, VC, NULL), L3K_ERROR_VALUE,
            "kv_cache_append: mode is 2");
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, -1, QO, KC, VC, NULL), L3K_ERROR_VALUE,
            "mode is -1");
    const int64_t qshape[4] = {B, H, S, D};
    set_tensor(&tkc_in, kc.buf, L3K_DT_F32, 4, qshape, NULL); /* q_out over the k cache's memory */
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, 0, &tkc_in.t, KC, VC, NULL), L3K_ERROR_LAYOUT,
            "kv_cache_append: q_out overlaps k_cache");
    set_tensor(&tqo_in, qo.buf, L3K_DT_F32, 4, qshape, NULL);
    tqo_in.shape[2] = 1;
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, 0, &tqo_in.t, KC, VC, NULL), L3K_ERROR_SHAPE,
            "kv_cache_append: q_out.shape[2] (seq) is 1, expected 2");
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, 0, QO, KC, KC, NULL), L3K_ERROR_LAYOUT,
            "kv_cache_append: k_cache overlaps v_cache");
    set_tensor(&tk_in, kc.buf, L3K_DT_F32, 4, kshape, NULL); /* k read from the cache it writes */
    REFUSED(l3k_kv_cache_append(Q, &tk_in.t, V, COS, SIN, P, R, 0, QO, KC, VC, NULL), L3K_ERROR_LAYOUT,
            "kv_cache_append: k_cache overlaps k");
    const int64_t bshd[4] = {S * H * D, D, H * D, 1}; /* q's memory in another order */
    set_tensor(&tq_t, q.buf, L3K_DT_F32, 4, qshape, bshd);
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, 0, &tq_t.t, KC, VC, NULL), L3K_ERROR_LAYOUT,
            "kv_cache_append: q_out overlaps q without being the same view");
    /* In place (q_out is q) is no licence to overlap the cache. */
    REFUSED(l3k_kv_cache_append(&tkc_in.t, K, V, COS, SIN, P, R, 0, &tkc_in.t, KC, VC, NULL),
            L3K_ERROR_LAYOUT, "kv_cache_append: q_out overlaps k_cache");
    REFUSED(l3k_kv_cache_append(Q, K, V, COS, SIN, P, R, 0, QO, KC, &tkc6.t, NULL), L3K_ERROR_SHAPE,
            "kv_cache_append: v_cache shape (2, 2, 2, 6), expected (2, 2, 8, 8) like k_cache");
    const int64_t q3shape[4] = {B, 3, S, D};
    set_tensor(&tq3, q.buf, L3K_DT_F32, 4, q3shape, NULL);
    REFUSED(l3k_kv_cache_append(&tq3.t, K, V, COS, SIN, P, R, 0, QO, KC, VC, NULL), L3K_ERROR_SHAPE,
            "kv_cache_append: q has 3 heads, expected a multiple of the cache's 2 kv heads");

    /* attention_decode */
    REFUSED(l3k_attention_decode(Q, NULL, VC, R, 0.0f, O, NULL, NULL), L3K_ERROR_NULL_POINTER,
            "attention_decode: k_cache is NULL");
    REFUSED(l3k_attention_decode(Q, KC, VC, R, 0.0f, Q, NULL, NULL), L3K_ERROR_LAYOUT,
            "attention_decode: o overlaps q");
    REFUSED(l3k_attention_decode(Q, KC, VC, R, 0.0f, &tkc_in.t, NULL, NULL), L3K_ERROR_LAYOUT,
            "attention_decode: o overlaps k_cache");
    set_tensor(&to16, o.buf, L3K_DT_BF16, 4, qshape, NULL);
    REFUSED(l3k_attention_decode(Q, KC, VC, R, 0.0f, &to16.t, NULL, NULL), L3K_ERROR_DTYPE,
            "attention_decode: o dtype bfloat16, expected float32 like k_cache");
    REFUSED(l3k_attention_decode(Q, KC, VC, R, -1.0f, O, NULL, NULL), L3K_ERROR_VALUE,
            "attention_decode: scale is -1, expected > 0 (or 0 for 1/sqrt(head_dim))");
    REFUSED(l3k_attention_decode(Q, KC, VC, R, NAN, O, NULL, NULL), L3K_ERROR_VALUE,
            "attention_decode: scale is nan");
    REFUSED(l3k_attention_decode(Q, KC, VC, R, INFINITY, O, NULL, NULL), L3K_ERROR_VALUE,
            "attention_decode: scale is inf");
    REFUSED(l3k_attention_decode(&tq3.t, KC, VC, R, 0.0f, O, NULL, NULL), L3K_ERROR_SHAPE,
            "attention_decode: q has 3 heads, expected a multiple of the cache's 2 kv heads");
    REFUSED(l3k_attention_decode(Q, KC, VC, &tr3.t, 0.0f, O, NULL, NULL), L3K_ERROR_SHAPE,
            "attention_decode: cache_range shape (2, 3), expected (2, 2)");
    REFUSED(l3k_attention_decode(Q, KC, VC, &tr64.t, 0.0f, O, NULL, NULL), L3K_ERROR_DTYPE,
            "attention_decode: cache_range dtype int64, expected int32");
    size_t bytes = 1;
    REFUSED(l3k_attention_decode_workspace_size(Q, KC, NULL), L3K_ERROR_NULL_POINTER,
            "attention_decode_workspace_size: bytes is NULL");
    REFUSED(l3k_attention_decode_workspace_size(NULL, KC, &bytes), L3K_ERROR_NULL_POINTER,
            "attention_decode_workspace_size: q is NULL");
    CHECK(l3k_attention_decode_workspace_size(Q, KC, &bytes) == L3K_SUCCESS && bytes == 0,
          "workspace size on the CPU: %zu (%s)", bytes, l3k_last_error());

    for (int i = 0; i < 7; ++i) t4_free(all[i]);
#undef REFUSED
}

/* ---- the block's decode step ------------------------------------------------------------- */

/* A small float32 block; sequences of up to BS tokens (the padded test: up to BCAP slots). */
enum {
    BB = 2,
    BDIM = 64,
    BH = 4,
    BHKV = 2,
    BHD = BDIM / BH,
    BHALF = BHD / 2,
    BHID = 96,
    BQKV = BDIM + 2 * BHKV * BHD,
    BS = 7,
    BCAP = 12,
    BROWS = 16
};

typedef struct {
    float *buf[6]; /* qkv, o, gate_up, down, norm1, norm2 */
    host_tensor t[6];
    l3k_llama_block_weights w;
    l3k_llama_block_config cfg;
    float cs[BROWS * BHALF], sn[BROWS * BHALF]; /* shared RoPE tables: row p is position p */
    host_tensor tc, ts;
} block_model;

/* 256-byte aligned host memory (the block asks 16 of its buffers on the CPU). */
static void *alloc_aligned(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 256, bytes ? bytes : 256)) return NULL;
    return p;
}

/* The RoPE value of position pos, pair i: every table (shared or per call) holds these very
 * floats, so the decode step and the reference forward rotate alike. */
static float rope_cos(int64_t pos, int64_t i) {
    return (float)cos((double)pos * pow(500000.0, -2.0 * i / BHD));
}
static float rope_sin(int64_t pos, int64_t i) {
    return (float)sin((double)pos * pow(500000.0, -2.0 * i / BHD));
}

static void model_init(block_model *m, unsigned *seed) {
    static const int64_t shapes[6][2] = {{BQKV, BDIM}, {BDIM, BDIM}, {2 * BHID, BDIM},
                                         {BDIM, BHID}, {BDIM, 1},    {BDIM, 1}};
    for (int i = 0; i < 6; ++i) {
        const int64_t n = shapes[i][0] * shapes[i][1];
        m->buf[i] = alloc_aligned((size_t)n * 4);
        for (int64_t j = 0; j < n; ++j) m->buf[i][j] = (i < 4 ? 0.0f : 1.0f) + 0.2f * frand(seed);
        host_f32(&m->t[i], m->buf[i], i < 4 ? 2 : 1, shapes[i]);
    }
    const l3k_llama_block_weights w0 = L3K_LLAMA_BLOCK_WEIGHTS_INIT;
    const l3k_llama_block_config cfg0 = L3K_LLAMA_BLOCK_CONFIG_INIT;
    m->w = w0;
    m->cfg = cfg0;
    m->w.qkv_weight = &m->t[0].t, m->w.o_weight = &m->t[1].t, m->w.gate_up_weight = &m->t[2].t;
    m->w.down_weight = &m->t[3].t, m->w.norm1_weight = &m->t[4].t, m->w.norm2_weight = &m->t[5].t;
    m->cfg.n_heads = BH;
    m->cfg.n_kv_heads = BHKV;
    for (int64_t p = 0; p < BROWS; ++p)
        for (int64_t i = 0; i < BHALF; ++i) {
            m->cs[p * BHALF + i] = rope_cos(p, i);
            m->sn[p * BHALF + i] = rope_sin(p, i);
        }
    const int64_t st[2] = {BROWS, BHALF};
    host_f32(&m->tc, m->cs, 2, st);
    host_f32(&m->ts, m->sn, 2, st);
}

static void model_free(block_model *m) {
    for (int i = 0; i < 6; ++i) free(m->buf[i]);
}

/* A float32 workspace tensor of at least `bytes`, filled with `fill`. */
static DLTensor *workspace(host_tensor *h, size_t bytes, float fill) {
    const int64_t n = (int64_t)(bytes / 4 + 1);
    float *p = alloc_aligned((size_t)n * 4);
    for (int64_t i = 0; i < n; ++i) p[i] = fill;
    return host_f32(h, p, 1, &n);
}

/* The reference: l3k_llama_block_forward over whole sequences, x (b, s, BDIM) -> out. */
static void block_forward(const block_model *m, const float *x, int64_t b, int64_t s, float *out) {
    host_tensor tx, to, tw;
    const int64_t sx[3] = {b, s, BDIM};
    DLTensor *X = host_f32(&tx, (float *)x, 3, sx), *OUT = host_f32(&to, out, 3, sx);
    size_t bytes = 0;
    CHECK(l3k_llama_block_forward_workspace_size(X, &m->w, &m->cfg, &bytes) == L3K_SUCCESS, "%s",
          l3k_last_error());
    DLTensor *WS = workspace(&tw, bytes, NAN);
    CHECK(l3k_llama_block_forward(X, &m->tc.t, &m->ts.t, &m->w, &m->cfg, OUT, WS, NULL) == L3K_SUCCESS, "%s",
          l3k_last_error());
    free(WS->data);
}

/* One decode step of BB sequences: x (BB, seq, BDIM) -> out, the caches advanced to `range`. */
static l3k_status decode_step(const block_model *m, const float *x, int64_t seq, int32_t *range, int32_t *pos,
                              const DLTensor *cos, const DLTensor *sin, t4 *kc, t4 *vc, float *out) {
    host_tensor tx, to, tr, tp, tw;
    const int64_t sx[3] = {BB, seq, BDIM}, sr[2] = {BB, 2}, sp[1] = {BB};
    DLTensor *X = host_f32(&tx, (float *)x, 3, sx), *OUT = host_f32(&to, out, 3, sx);
    l3k_kv_cache cache = L3K_KV_CACHE_INIT;
    cache.k = &kc->ht.t;
    cache.v = &vc->ht.t;
    cache.cache_range = i32_tensor(&tr, range, 2, sr);
    cache.positions = pos ? i32_tensor(&tp, pos, 1, sp) : NULL;
    size_t bytes = 0;
    CHECK(l3k_llama_block_decode_workspace_size(X, &m->w, &m->cfg, &cache, &bytes) == L3K_SUCCESS, "%s",
          l3k_last_error());
    DLTensor *WS = workspace(&tw, bytes, NAN);
    const l3k_status st = l3k_llama_block_decode(X, cos, sin, &m->w, &m->cfg, &cache, OUT, WS, NULL);
    free(WS->data);
    return st;
}

/* RoPE tables for one call: (BB, seq, BHALF) (batched) or (seq, BHALF), row i of sequence b at
 * position first[b] + i (a negative position: anything, here 0). */
static void call_tables(float *cs, float *sn, const int64_t *first, int64_t seq, int batched) {
    for (int64_t b = 0; b < (batched ? BB : 1); ++b)
        for (int64_t i = 0; i < seq; ++i)
            for (int64_t p = 0; p < BHALF; ++p) {
                const int64_t pos = first[b] + i < 0 ? 0 : first[b] + i, at = (b * seq + i) * BHALF + p;
                cs[at] = rope_cos(pos, p);
                sn[at] = rope_sin(pos, p);
            }
}

/* Largest |got - ref| over n values (NaN: infinite), and the largest |ref|. */
static void compare_rows(const float *got, const float *ref, int64_t n, double *err, double *mag) {
    for (int64_t i = 0; i < n; ++i) {
        *err = fmax(*err, isnan(got[i]) ? INFINITY : fabs((double)got[i] - ref[i]));
        *mag = fmax(*mag, fabs((double)ref[i]));
    }
}

/* The BB sequences of x (BB, BS, BDIM) fed in chunks (sizes summing to BS): a prefill of the
 * first chunk, then the others, each call's output rows against the whole forward's. */
static void run_schedule(const block_model *m, const float *x, const float *ref, const int *chunks,
                         int with_pos, int cache_layout) {
    char label[128];
    int n = snprintf(label, sizeof label, "block decode, chunks");
    for (int i = 0, t = 0; t < BS; t += chunks[i++])
        n += snprintf(label + n, sizeof label - (size_t)n, " %d", chunks[i]);
    snprintf(label + n, sizeof label - (size_t)n, ", %s, %s cache",
             with_pos ? "positions + shared tables" : "no positions, per-call tables",
             layout_names[cache_layout]);
    t4 kc, vc;
    t4_make(&kc, L3K_DT_F32, BB, BHKV, BCAP, BHD, cache_layout);
    t4_make(&vc, L3K_DT_F32, BB, BHKV, BCAP, BHD, L_COMPACT);
    t4_fill(&kc, NAN); /* unused slots: NaN that must never reach an output */
    t4_fill(&vc, NAN);
    static float out[BB * BS * BDIM];
    for (int i = 0; i < BB * BS * BDIM; ++i) out[i] = NAN;
    for (int c = 0, t0 = 0; t0 < BS; t0 += chunks[c++]) {
        const int64_t seq = chunks[c];
        float *xs = malloc(sizeof(float) * BB * (size_t)seq * BDIM),
              *os = malloc(sizeof(float) * BB * (size_t)seq * BDIM);
        float *cs = malloc(sizeof(float) * (size_t)seq * BHALF),
              *sn = malloc(sizeof(float) * (size_t)seq * BHALF);
        for (int64_t b = 0; b < BB; ++b)
            memcpy(xs + b * seq * BDIM, x + (b * BS + t0) * BDIM, sizeof(float) * (size_t)seq * BDIM);
        int32_t range[2 * BB], pos[BB];
        for (int64_t b = 0; b < BB; ++b) {
            range[2 * b] = 0;
            range[2 * b + 1] = t0 + (int32_t)seq;
            pos[b] = range[2 * b + 1] - (int32_t)seq - range[2 * b]; /* end - seq - start */
        }
        const int64_t first[BB] = {t0, t0}, stab[2] = {seq, BHALF};
        call_tables(cs, sn, first, seq, 0);
        host_tensor tc, ts;
        const DLTensor *COS = with_pos ? &m->tc.t : host_f32(&tc, cs, 2, stab);
        const DLTensor *SIN = with_pos ? &m->ts.t : host_f32(&ts, sn, 2, stab);
        const l3k_status st = decode_step(m, xs, seq, range, with_pos ? pos : NULL, COS, SIN, &kc, &vc, os);
        CHECK(st == L3K_SUCCESS, "%s, tokens %d..%d: %s", label, t0, t0 + (int)seq - 1, l3k_last_error());
        for (int64_t b = 0; b < BB; ++b)
            memcpy(out + (b * BS + t0) * BDIM, os + b * seq * BDIM, sizeof(float) * (size_t)seq * BDIM);
        free(xs);
        free(os);
        free(cs);
        free(sn);
    }
    double err = 0, mag = 0;
    compare_rows(out, ref, BB * BS * BDIM, &err, &mag);
    CHECK(err <= BLOCK_REL * mag, "%s: max error %g against the whole forward (max |ref| %g)", label, err,
          mag);
    printf("%s: max error %.3g of %.3g\n", label, err, mag);
    t4_free(&kc);
    t4_free(&vc);
    ++g_block_runs;
}

/* A batch whose sequence 1 is left-padded by PAD slots (its padding rows hold garbage): prefill
 * PRE tokens, then STEPS single tokens; each sequence's rows equal that sequence alone. */
enum { PAD = 2, PRE = 6, STEPS = 3, L0 = PRE + STEPS, L1 = PRE - PAD + STEPS };
static void run_padded(const block_model *m, const float *x0, const float *x1, const float *ref0,
                       const float *ref1, int with_pos, int cache_layout, unsigned *seed) {
    char label[128];
    snprintf(label, sizeof label, "block decode, sequence 1 left-padded by %d, %s, %s cache", PAD,
             with_pos ? "positions + shared tables" : "no positions, per-batch tables",
             layout_names[cache_layout]);
    t4 kc, vc;
    t4_make(&kc, L3K_DT_F32, BB, BHKV, BCAP, BHD, cache_layout);
    t4_make(&vc, L3K_DT_F32, BB, BHKV, BCAP, BHD, L_BSHD);
    t4_fill(&kc, NAN);
    t4_fill(&vc, NAN);
    for (int64_t h = 0; h < BHKV; ++h) /* the padding's slots: written by the prefill */
        for (int64_t s = 0; s < PAD; ++s)
            for (int64_t d = 0; d < BHD; ++d) t4_set(&kc, 1, h, s, d, 7.25f);
    double err = 0, mag = 0;
    for (int step = 0; step <= STEPS; ++step) {
        const int64_t seq = step == 0 ? PRE : 1, end = step == 0 ? PRE : PRE + step;
        const int32_t start[BB] = {0, PAD};
        float xs[BB * PRE * BDIM], os[BB * PRE * BDIM], cs[BB * PRE * BHALF], sn[BB * PRE * BHALF];
        int32_t range[2 * BB], pos[BB];
        int64_t first[BB];
        for (int64_t b = 0; b < BB; ++b) {
            range[2 * b] = start[b];
            range[2 * b + 1] = (int32_t)end;
            pos[b] = (int32_t)(end - seq - start[b]);
            first[b] = pos[b];
            const float *src = b == 0 ? x0 : x1;
            for (int64_t i = 0; i < seq; ++i) {
                const int64_t tok = pos[b] + i; /* this row's token in its sequence (< 0: padding) */
                for (int64_t d = 0; d < BDIM; ++d)
                    xs[(b * seq + i) * BDIM + d] = tok < 0 ? 3.0f * frand(seed) : src[tok * BDIM + d];
            }
        }
        call_tables(cs, sn, first, seq, 1);
        host_tensor tc, ts;
        const int64_t stab[3] = {BB, seq, BHALF};
        const DLTensor *COS = with_pos ? &m->tc.t : host_f32(&tc, cs, 3, stab);
        const DLTensor *SIN = with_pos ? &m->ts.t : host_f32(&ts, sn, 3, stab);
        for (int i = 0; i < BB * PRE * BDIM; ++i) os[i] = NAN;
        const l3k_status st = decode_step(m, xs, seq, range, with_pos ? pos : NULL, COS, SIN, &kc, &vc, os);
        CHECK(st == L3K_SUCCESS, "%s, step %d: %s", label, step, l3k_last_error());
        for (int64_t b = 0; b < BB; ++b)
            for (int64_t i = 0; i < seq; ++i) {
                const int64_t tok = pos[b] + i;
                if (tok < 0) continue; /* padding: its output is not a token's */
                compare_rows(os + (b * seq + i) * BDIM, (b == 0 ? ref0 : ref1) + tok * BDIM, BDIM, &err,
                             &mag);
            }
    }
    CHECK(err <= BLOCK_REL * mag, "%s: max error %g against each sequence alone (max |ref| %g)", label, err,
          mag);
    printf("%s: max error %.3g of %.3g\n", label, err, mag);
    /* The padding tokens' keys went to slots 0 and 1 (never attended): with positions, rows -2 and
     * -1, outside the table, so NaN; without, rotated garbage. */
    int nan_keys = 0, written = 0;
    for (int64_t h = 0; h < BHKV; ++h)
        for (int64_t s = 0; s < PAD; ++s)
            for (int64_t d = 0; d < BHD; ++d) {
                const float kv = l3k_load(kc.buf, t4_at(&kc, 1, h, s, d), L3K_DT_F32);
                nan_keys += isnan(kv);
                written += kv != 7.25f;
            }
    CHECK(written == BHKV * PAD * BHD, "%s: the padding's slots were not written", label);
    CHECK(with_pos ? nan_keys == BHKV * PAD * BHD : nan_keys == 0,
          "%s: %d of the padding's keys are NaN, expected %s", label, nan_keys, with_pos ? "all" : "none");
    t4_free(&kc);
    t4_free(&vc);
    ++g_block_runs;
}

/* The decode step's own refusals: the status, the message, nothing written. */
static void block_bad_inputs(const block_model *m, unsigned *seed) {
    static float x[BB * BDIM], out[BB * BDIM];
    for (int i = 0; i < BB * BDIM; ++i) {
        x[i] = frand(seed);
        out[i] = 5.0f;
    }
    t4 kc, vc, k16;
    t4_make(&kc, L3K_DT_F32, BB, BHKV, BCAP, BHD, L_COMPACT);
    t4_make(&vc, L3K_DT_F32, BB, BHKV, BCAP, BHD, L_COMPACT);
    t4_make(&k16, L3K_DT_F16, BB, BHKV, BCAP, BHD, L_COMPACT);
    t4_fill_random(&kc, 1.0f, seed);
    t4_fill_random(&vc, 1.0f, seed);
    t4_fill_random(&k16, 1.0f, seed);
    t4_snap(&kc);
    t4_snap(&vc);
    int32_t range[2 * BB] = {0, 1, 0, 1}, pos[BB] = {0, 0}, pos3[3] = {0, 0, 0};
    host_tensor tx, to, tr, tp, tp3, tw, tsmall, tkr, tkbad, tobad;
    const int64_t sx[3] = {BB, 1, BDIM}, sr[2] = {BB, 2}, sp[1] = {BB}, sp3[1] = {3};
    DLTensor *X = host_f32(&tx, x, 3, sx), *OUT = host_f32(&to, out, 3, sx);
    l3k_kv_cache cache = L3K_KV_CACHE_INIT;
    cache.k = &kc.ht.t;
    cache.v = &vc.ht.t;
    cache.cache_range = i32_tensor(&tr, range, 2, sr);
    cache.positions = i32_tensor(&tp, pos, 1, sp);
    const DLTensor *COS = &m->tc.t, *SIN = &m->ts.t;
    const l3k_llama_block_weights *W = &m->w;
    size_t bytes = 0;
    CHECK(l3k_llama_block_decode_workspace_size(X, W, &m->cfg, &cache, &bytes) == L3K_SUCCESS, "%s",
          l3k_last_error());
    CHECK(bytes > 0, "decode workspace size 0");
    size_t fwd_bytes = 0;
    CHECK(l3k_llama_block_forward_workspace_size(X, W, &m->cfg, &fwd_bytes) == L3K_SUCCESS, "%s",
          l3k_last_error());
    printf("block decode workspace: %zu bytes (forward: %zu)\n", bytes, fwd_bytes);
    DLTensor *WS = workspace(&tw, bytes, 5.0f);
    const int64_t small_n = (int64_t)(bytes / 4) - 1;
    DLTensor *SMALL = host_f32(&tsmall, WS->data, 1, &small_n);

    EXPECT_FAILS(l3k_llama_block_decode_workspace_size(X, W, &m->cfg, &cache, NULL), L3K_ERROR_NULL_POINTER,
                 "llama_block_decode_workspace_size: bytes is NULL");
    EXPECT_FAILS(l3k_llama_block_decode_workspace_size(X, W, &m->cfg, NULL, &bytes), L3K_ERROR_NULL_POINTER,
                 "llama_block_decode_workspace_size: cache is NULL");
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, &cache, OUT, SMALL, NULL),
                 L3K_ERROR_WORKSPACE, "llama_block_decode: workspace has");
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, &cache, OUT, NULL, NULL),
                 L3K_ERROR_WORKSPACE, "llama_block_decode: workspace is NULL");
    l3k_llama_block_config cfg = m->cfg;
    cfg.causal = 0;
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &cfg, &cache, OUT, WS, NULL), L3K_ERROR_VALUE,
                 "llama_block_decode: cfg->causal is 0, expected 1");
    cfg = m->cfg;
    cfg.key_range = i32_tensor(&tkr, range, 2, sr);
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &cfg, &cache, OUT, WS, NULL), L3K_ERROR_VALUE,
                 "llama_block_decode: cfg->key_range is given, expected NULL");
    l3k_kv_cache bad = cache;
    bad.k = &k16.ht.t;
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, &bad, OUT, WS, NULL), L3K_ERROR_DTYPE,
                 "llama_block_decode: cache->k dtype float16, expected float32 like x");
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, NULL, OUT, WS, NULL), L3K_ERROR_NULL_POINTER,
                 "llama_block_decode: cache is NULL");
    bad = cache;
    bad.struct_size = 0;
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, &bad, OUT, WS, NULL), L3K_ERROR_VALUE,
                 "llama_block_decode: cache->struct_size is 0, expected at least");
    bad = cache;
    const int64_t wrong_heads[4] = {BB, 1, BCAP, 2 * BHD};
    set_tensor(&tkbad, kc.buf, L3K_DT_F32, 4, wrong_heads, NULL);
    bad.k = &tkbad.t;
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, &bad, OUT, WS, NULL), L3K_ERROR_SHAPE,
                 "llama_block_decode: cache->k has ndim 4, expected shape (batch 2, n_kv_heads 2, capacity, "
                 "head_dim 16)");
    bad = cache;
    bad.cache_range = NULL;
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, &bad, OUT, WS, NULL), L3K_ERROR_NULL_POINTER,
                 "llama_block_decode: cache->cache_range is NULL");
    bad = cache;
    bad.positions = i32_tensor(&tp3, pos3, 1, sp3);
    EXPECT_FAILS(
        l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, &bad, OUT, WS, NULL), L3K_ERROR_SHAPE,
        "llama_block_decode: kv_cache_append: positions has ndim 1 and 3 elements, expected shape (2,)");
    set_tensor(&tobad, kc.buf, L3K_DT_F32, 3, sx, NULL); /* out over the cache */
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, &cache, &tobad.t, WS, NULL),
                 L3K_ERROR_LAYOUT, "llama_block_decode: out overlaps cache->k, expected separate memory");
    bad = cache;
    bad.v = &kc.ht.t; /* one tensor as both caches */
    EXPECT_FAILS(l3k_llama_block_decode(X, COS, SIN, W, &m->cfg, &bad, OUT, WS, NULL), L3K_ERROR_LAYOUT,
                 "llama_block_decode: cache->k overlaps cache->v, expected separate memory");

    int untouched = t4_unchanged(&kc) && t4_unchanged(&vc);
    for (int i = 0; i < BB * BDIM; ++i) untouched &= out[i] == 5.0f;
    for (size_t i = 0; i < bytes / 4; ++i) untouched &= ((float *)WS->data)[i] == 5.0f;
    CHECK(untouched, "block decode: a refused call wrote out, the cache or the workspace");
    free(WS->data);
    t4_free(&kc);
    t4_free(&vc);
    t4_free(&k16);
}

static void test_block_decode(void) {
    unsigned seed = 2024;
    static block_model m;
    model_init(&m, &seed);
    /* Whole sequences through the forward: the reference rows. */
    static float x[BB * BS * BDIM], ref[BB * BS * BDIM];
    for (int i = 0; i < BB * BS * BDIM; ++i) x[i] = frand(&seed);
    block_forward(&m, x, BB, BS, ref);
    static const int schedules[][BS + 1] = {{4, 1, 1, 1}, {4, 2, 1}, {1, 1, 1, 1, 1, 1, 1}, {BS}};
    for (size_t s = 0; s < sizeof schedules / sizeof schedules[0]; ++s)
        for (int with_pos = 1; with_pos >= 0; --with_pos)
            run_schedule(&m, x, ref, schedules[s], with_pos, s % 2 ? L_PADDED : L_COMPACT);

    static float x0[L0 * BDIM], x1[L1 * BDIM], ref0[L0 * BDIM], ref1[L1 * BDIM];
    for (int i = 0; i < L0 * BDIM; ++i) x0[i] = frand(&seed);
    for (int i = 0; i < L1 * BDIM; ++i) x1[i] = frand(&seed);
    block_forward(&m, x0, 1, L0, ref0);
    block_forward(&m, x1, 1, L1, ref1);
    run_padded(&m, x0, x1, ref0, ref1, 1, L_COMPACT, &seed);
    run_padded(&m, x0, x1, ref0, ref1, 0, L_PADDED, &seed);

    block_bad_inputs(&m, &seed);
    model_free(&m);
    printf("block decode: %d runs\n", g_block_runs);
}

int main(int argc, char **argv) {
    static const named_test tests[] = {NAMED_TEST(append), NAMED_TEST(decode), NAMED_TEST(bad_inputs),
                                       NAMED_TEST(block_decode)};
    return RUN_NAMED_TESTS(argc, argv, tests);
}
