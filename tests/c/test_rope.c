/* RoPE through the C ABI on host memory: forward and backward against a naive
 * loop in double over float32 / float16 / bfloat16 inputs, contiguous and
 * fused-QKV strided views, in place and out of place, GQA/MQA, both
 * conventions, position offsets, per-batch tables, odd shapes; then every bad
 * input answered with its own status and message, outputs untouched. */
#include "check.h"
#include "convert.h"

typedef struct {
    int64_t B, Hq, Hk, S, D, offset, extra_rows;
    int mode;       /* L3K_ROPE_HALF / L3K_ROPE_INTERLEAVED */
    l3k_dt dt, tdt; /* activation and table dtypes */
    int batched;    /* cos/sin (B, rows, D/2) instead of (rows, D/2) */
    int fused;      /* q and k are views of one (B, S, Hq + 2 Hk, D) qkv buffer */
} rope_case;

/* Expected rotation of element (b, h, s, i) of x (values as floats, contiguous
 * (B, H, S, D)), in double. */
static double naive_rope(const float *x, int64_t H, const rope_case *c, const float *cosv, const float *sinv,
                         int64_t b, int64_t h, int64_t s, int64_t i, double sign) {
    const int64_t half = c->D / 2, rows = c->S + c->offset + c->extra_rows;
    const float *row = x + ((b * H + h) * c->S + s) * c->D;
    int64_t p, i1, i2;
    if (c->mode == L3K_ROPE_INTERLEAVED) {
        p = i / 2;
        i1 = 2 * p;
        i2 = 2 * p + 1;
    } else {
        p = i % half;
        i1 = p;
        i2 = p + half;
    }
    const int64_t t = (c->batched ? b * rows : 0) + s + c->offset;
    const double cs = cosv[t * half + p], sn = sign * sinv[t * half + p];
    const double x1 = row[i1], x2 = row[i2];
    return i == i1 ? x1 * cs - x2 * sn : x2 * cs + x1 * sn;
}

static int g_cases = 0;

/* One case, for the forward or the backward, in place or not. */
static void run_case(const rope_case *c, int inverse, int inplace) {
    unsigned seed = (unsigned)(c->B * 131 + c->Hq * 17 + c->S * 7 + c->D + inverse * 1000 + inplace);
    const l3k_dt dt = c->dt, tdt = c->tdt;
    const size_t es = l3k_dt_size(dt), tes = l3k_dt_size(tdt);
    const int64_t half = c->D / 2, rows = c->S + c->offset + c->extra_rows;
    const int64_t Htot = c->Hq + 2 * c->Hk;
    const int64_t nq = c->B * c->Hq * c->S * c->D, nk = c->B * c->Hk * c->S * c->D;
    const int64_t ntab = (c->batched ? c->B : 1) * rows * half;
    const int64_t nqkv = c->B * c->S * Htot * c->D;

    /* Inputs: either separate contiguous q, k or one fused qkv buffer. */
    void *qkv = malloc(es * (size_t)(nqkv + 1));
    void *qbuf = malloc(es * (size_t)(nq + 1)), *kbuf = malloc(es * (size_t)(nk + 1));
    void *qo = malloc(es * (size_t)(nq + 1)), *ko = malloc(es * (size_t)(nk + 1));
    void *cbuf = malloc(tes * (size_t)ntab), *sbuf = malloc(tes * (size_t)ntab);
    float *qv = malloc(sizeof(float) * (size_t)(nq + 1)), *kv = malloc(sizeof(float) * (size_t)(nk + 1));
    float *cv = malloc(sizeof(float) * (size_t)ntab), *sv = malloc(sizeof(float) * (size_t)ntab);
    float *qkv0 = malloc(sizeof(float) * (size_t)(nqkv + 1));

    for (int64_t i = 0; i < ntab; ++i) {
        const double ang = 0.37 * (double)(i / half) / pow(10.0, (double)(i % half) / half) +
                           0.1 * frand(&seed);
        l3k_store(cbuf, i, (float)cos(ang), tdt);
        l3k_store(sbuf, i, (float)sin(ang), tdt);
        cv[i] = l3k_load(cbuf, i, tdt);
        sv[i] = l3k_load(sbuf, i, tdt);
    }
    for (int64_t i = 0; i < nqkv; ++i) {
        l3k_store(qkv, i, 2.0f * frand(&seed), dt);
        qkv0[i] = l3k_load(qkv, i, dt);
    }
    int64_t q_st[4], k_st[4];
    const void *q_data, *k_data;
    if (c->fused) {
        /* qkv (B, S, Htot, D) viewed as (B, H, S, D): strides (S*Htot*D, D, Htot*D, 1). */
        q_st[0] = k_st[0] = c->S * Htot * c->D;
        q_st[1] = k_st[1] = c->D;
        q_st[2] = k_st[2] = Htot * c->D;
        q_st[3] = k_st[3] = 1;
        q_data = qkv;
        k_data = (char *)qkv + (size_t)(c->Hq * c->D) * es;
    } else {
        q_st[3] = k_st[3] = 1;
        q_st[2] = k_st[2] = c->D;
        q_st[1] = c->S * c->D;
        k_st[1] = c->S * c->D;
        q_st[0] = c->Hq * c->S * c->D;
        k_st[0] = c->Hk * c->S * c->D;
        for (int64_t i = 0; i < nq; ++i) l3k_store(qbuf, i, 2.0f * frand(&seed), dt);
        for (int64_t i = 0; i < nk; ++i) l3k_store(kbuf, i, 2.0f * frand(&seed), dt);
        q_data = qbuf;
        k_data = kbuf;
    }
    /* Gather the inputs as contiguous floats for the reference. */
    for (int64_t b = 0; b < c->B; ++b)
        for (int64_t s = 0; s < c->S; ++s)
            for (int64_t i = 0; i < c->D; ++i) {
                for (int64_t h = 0; h < c->Hq; ++h)
                    qv[((b * c->Hq + h) * c->S + s) * c->D + i] =
                        l3k_load(q_data, b * q_st[0] + h * q_st[1] + s * q_st[2] + i, dt);
                for (int64_t h = 0; h < c->Hk; ++h)
                    kv[((b * c->Hk + h) * c->S + s) * c->D + i] =
                        l3k_load(k_data, b * k_st[0] + h * k_st[1] + s * k_st[2] + i, dt);
            }
    const float poison = NAN;
    for (int64_t i = 0; i < nq; ++i) l3k_store(qo, i, poison, dt);
    for (int64_t i = 0; i < nk; ++i) l3k_store(ko, i, poison, dt);

    int64_t qshape[4] = {c->B, c->Hq, c->S, c->D}, kshape[4] = {c->B, c->Hk, c->S, c->D};
    int64_t tshape3[3] = {c->B, rows, half}, tshape2[2] = {rows, half};
    host_tensor tq, tk, tqo, tko, tc, ts;
    set_tensor(&tq, (void *)q_data, dt, 4, qshape, q_st);
    set_tensor(&tk, (void *)k_data, dt, 4, kshape, k_st);
    set_tensor(&tqo, qo, dt, 4, qshape, NULL);
    set_tensor(&tko, ko, dt, 4, kshape, NULL);
    set_tensor(&tc, cbuf, tdt, c->batched ? 3 : 2, c->batched ? tshape3 : tshape2, NULL);
    set_tensor(&ts, sbuf, tdt, c->batched ? 3 : 2, c->batched ? tshape3 : tshape2, NULL);
    DLTensor *Q = &tq.t, *K = c->Hk ? &tk.t : NULL;
    DLTensor *QO = inplace ? &tq.t : &tqo.t, *KO = c->Hk ? (inplace ? &tk.t : &tko.t) : NULL;
    const l3k_status st = inverse ? l3k_rope_backward(Q, K, &tc.t, &ts.t, c->offset, c->mode, QO, KO, NULL)
                                  : l3k_rope_forward(Q, K, &tc.t, &ts.t, c->offset, c->mode, QO, KO, NULL);
    char label[256];
    snprintf(label, sizeof label, "%s B%lld Hq%lld Hk%lld S%lld D%lld off%lld %s table %s%s%s%s%s",
             dt_label(dt), (long long)c->B, (long long)c->Hq, (long long)c->Hk, (long long)c->S,
             (long long)c->D, (long long)c->offset, c->mode ? "interleaved" : "half", dt_label(tdt),
             c->batched ? " batched" : "", c->fused ? " fused-qkv" : "", inplace ? " in-place" : "",
             inverse ? " backward" : "");
    CHECK(st == L3K_SUCCESS, "%s: %s", label, l3k_last_error());

    /* Tolerance: float32 arithmetic, then one rounding to the storage dtype. */
    const double rel = dt == L3K_DT_F32 ? 1e-6 : dt == L3K_DT_F16 ? 1.0 / 1024 : 1.0 / 128;
    const double sign = inverse ? -1.0 : 1.0;
    int bad = 0;
    for (int which = 0; which < 2; ++which) {
        const int64_t H = which ? c->Hk : c->Hq;
        const float *src = which ? kv : qv;
        for (int64_t b = 0; b < c->B; ++b)
            for (int64_t h = 0; h < H; ++h)
                for (int64_t s = 0; s < c->S; ++s)
                    for (int64_t i = 0; i < c->D; ++i) {
                        const double want = naive_rope(src, H, c, cv, sv, b, h, s, i, sign);
                        double got;
                        if (inplace) {
                            const int64_t *sst = which ? k_st : q_st;
                            got = l3k_load(which ? k_data : q_data, b * sst[0] + h * sst[1] + s * sst[2] + i,
                                           dt);
                        } else {
                            got = l3k_load(which ? ko : qo, ((b * H + h) * c->S + s) * c->D + i, dt);
                        }
                        if (!(fabs(got - want) <= rel * fabs(want) + 1e-6)) {
                            if (bad++ < 3)
                                CHECK(0, "%s: %s[%lld,%lld,%lld,%lld] = %g, expected %g", label,
                                      which ? "k" : "q", (long long)b, (long long)h, (long long)s,
                                      (long long)i, got, want);
                        }
                    }
    }
    CHECK(bad == 0, "%s: %d wrong elements", label, bad);
    if (c->fused) {
        /* v (and, out of place, all of qkv) must be untouched. */
        int changed = 0;
        for (int64_t b = 0; b < c->B; ++b)
            for (int64_t s = 0; s < c->S; ++s)
                for (int64_t h = inplace ? c->Hq + c->Hk : 0; h < Htot; ++h)
                    for (int64_t i = 0; i < c->D; ++i) {
                        const int64_t idx = ((b * c->S + s) * Htot + h) * c->D + i;
                        if (l3k_load(qkv, idx, dt) != qkv0[idx]) ++changed;
                    }
        CHECK(changed == 0, "%s: %d elements of qkv outside the outputs were written", label, changed);
    }
    ++g_cases;
    free(qkv);
    free(qbuf);
    free(kbuf);
    free(qo);
    free(ko);
    free(cbuf);
    free(sbuf);
    free(qv);
    free(kv);
    free(cv);
    free(sv);
    free(qkv0);
}

/* Forward then backward returns the input (up to rounding). */
static void test_round_trip(void) {
    const int64_t B = 2, H = 3, S = 10, D = 64, half = D / 2, n = B * H * S * D;
    float *x = malloc(sizeof(float) * n), *y = malloc(sizeof(float) * n), *x0 = malloc(sizeof(float) * n);
    float *cs = malloc(sizeof(float) * S * half), *sn = malloc(sizeof(float) * S * half);
    unsigned seed = 5;
    for (int64_t i = 0; i < n; ++i) x0[i] = x[i] = frand(&seed);
    for (int64_t i = 0; i < S * half; ++i) {
        cs[i] = (float)cos(0.3 * (double)i);
        sn[i] = (float)sin(0.3 * (double)i);
    }
    int64_t sh[4] = {B, H, S, D}, ts[2] = {S, half};
    host_tensor tx, ty, tc, tsn;
    set_tensor(&tx, x, L3K_DT_F32, 4, sh, NULL);
    set_tensor(&ty, y, L3K_DT_F32, 4, sh, NULL);
    set_tensor(&tc, cs, L3K_DT_F32, 2, ts, NULL);
    set_tensor(&tsn, sn, L3K_DT_F32, 2, ts, NULL);
    for (int mode = 0; mode < 2; ++mode) {
        CHECK(l3k_rope_forward(&tx.t, NULL, &tc.t, &tsn.t, 0, mode, &ty.t, NULL, NULL) == L3K_SUCCESS, "%s",
              l3k_last_error());
        CHECK(l3k_rope_backward(&ty.t, NULL, &tc.t, &tsn.t, 0, mode, &ty.t, NULL, NULL) == L3K_SUCCESS, "%s",
              l3k_last_error());
        double err = 0;
        for (int64_t i = 0; i < n; ++i) err = fmax(err, fabs((double)y[i] - x0[i]));
        CHECK(err < 1e-5, "round trip mode %d: max error %g", mode, err);
    }
    free(x);
    free(y);
    free(x0);
    free(cs);
    free(sn);
}

/* Each bad input gets its status, a message naming op and argument, and
 * leaves every tensor untouched. */
static void test_bad_inputs(void) {
    enum { N = 400 };
    static float q[N], k[N], qo[N], ko[N], cs[N], sn[N];
    unsigned seed = 3;
    frand_across(&seed, N, 4, (float *const[]){q, k, cs, sn});
    for (int i = 0; i < N; ++i) qo[i] = ko[i] = 42.0f;
    float q0 = q[0], k0 = k[0];
    int64_t qs[4] = {1, 2, 3, 4}, ks[4] = {1, 1, 3, 4}, ts[2] = {3, 2};
    host_tensor tq, tk, tqo, tko, tc, ts_, tb, tb2, tb3, tb4;
    SET_TENSORS(L3K_DT_F32, 4, qs, {&tq, q}, {&tqo, qo});
    SET_TENSORS(L3K_DT_F32, 4, ks, {&tk, k}, {&tko, ko});
    SET_TENSORS(L3K_DT_F32, 2, ts, {&tc, cs}, {&ts_, sn});
    DLTensor *Q = &tq.t, *K = &tk.t, *QO = &tqo.t, *KO = &tko.t, *C = &tc.t, *S = &ts_.t;

#define EXPECT(call, status, needle)                                                  \
    do {                                                                              \
        EXPECT_FAILS(call, status, needle);                                           \
        for (int i_ = 0; i_ < N; ++i_)                                                \
            CHECK(qo[i_] == 42.0f && ko[i_] == 42.0f, "output [%d] was written", i_); \
        CHECK(q[0] == q0 && k[0] == k0, "input was written");                         \
    } while (0)

    /* The valid call works (then the outputs are reset). */
    CHECK(l3k_rope_forward(Q, K, C, S, 0, L3K_ROPE_HALF, QO, KO, NULL) == L3K_SUCCESS, "%s",
          l3k_last_error());
    for (int i = 0; i < N; ++i) qo[i] = ko[i] = 42.0f;

    EXPECT(l3k_rope_forward(NULL, K, C, S, 0, 0, QO, KO, NULL), L3K_ERROR_NULL_POINTER,
           "rope_forward: q is NULL");
    EXPECT(l3k_rope_backward(NULL, K, C, S, 0, 0, QO, KO, NULL), L3K_ERROR_NULL_POINTER,
           "rope_backward: dq is NULL");
    EXPECT(l3k_rope_forward(Q, K, NULL, S, 0, 0, QO, KO, NULL), L3K_ERROR_NULL_POINTER, "cos is NULL");
    EXPECT(l3k_rope_forward(Q, K, C, NULL, 0, 0, QO, KO, NULL), L3K_ERROR_NULL_POINTER, "sin is NULL");
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, NULL, KO, NULL), L3K_ERROR_NULL_POINTER, "q_out is NULL");
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, QO, NULL, NULL), L3K_ERROR_NULL_POINTER,
           "k_out is NULL but k is given");
    EXPECT(l3k_rope_forward(Q, NULL, C, S, 0, 0, QO, KO, NULL), L3K_ERROR_NULL_POINTER,
           "k is NULL but k_out is given");
    EXPECT(l3k_rope_backward(Q, K, C, S, 0, 0, QO, NULL, NULL), L3K_ERROR_NULL_POINTER,
           "rope_backward: dk_out is NULL but dk is given");

    /* One of q, k, cos or sin with another shape: refused with a message naming it.  q's own
     * checks are made with no k (and no k_out); the backward names dq/dk. */
    enum { ARG_Q, ARG_K, ARG_COS, ARG_SIN };
    struct {
        int arg, ndim;
        int64_t shape[4];
        int backward;
        const char *needle;
    } bad_shapes[] = {
        {ARG_Q, 4, {1, 2, 3, 5}, 0, "q head_dim is 5, expected an even number"},
        {ARG_Q, 4, {1, 1, 1, 258}, 0, "q head_dim is 258, expected at most 256"},
        {ARG_Q, 3, {2, 3, 4}, 0, "q has ndim 3, expected 4"},
        {ARG_K, 4, {2, 1, 3, 4}, 0, "k.shape[0] (batch) is 2, expected 1 like q"},
        {ARG_K, 4, {1, 1, 4, 4}, 0, "k.shape[2] (seq) is 4, expected 3 like q"},
        {ARG_K, 4, {1, 1, 3, 2}, 0, "k.shape[3] (head_dim) is 2, expected 4 like q"},
        {ARG_K, 4, {1, 3, 3, 4}, 0, "q has 2 heads, expected a multiple of the 3 heads of k"},
        {ARG_K, 4, {1, 3, 3, 4}, 1, "dq has 2 heads, expected a multiple of the 3 heads of dk"},
        {ARG_COS, 2, {3, 3}, 0, "cos.shape[1] is 3, expected head_dim/2 = 2"},
        {ARG_COS, 1, {6}, 0, "cos has ndim 1, expected 2 (seq, head_dim/2) or 3"},
        {ARG_COS, 3, {2, 3, 2}, 0, "cos.shape[0] is 2, expected the batch size 1"},
        {ARG_SIN, 2, {4, 2}, 0, "sin shape (4, 2), expected (3, 2) like cos"},
    };
    for (size_t i = 0; i < sizeof bad_shapes / sizeof bad_shapes[0]; ++i) {
        const int arg = bad_shapes[i].arg;
        DLTensor *a[4] = {Q, arg == ARG_Q ? NULL : K, C, S};
        tb.t = *a[arg];
        tb.t.ndim = bad_shapes[i].ndim;
        tb.t.shape = bad_shapes[i].shape;
        a[arg] = &tb.t;
        EXPECT((bad_shapes[i].backward ? l3k_rope_backward : l3k_rope_forward)(
                   a[ARG_Q], a[ARG_K], a[ARG_COS], a[ARG_SIN], 0, 0, QO, arg == ARG_Q ? NULL : KO, NULL),
               L3K_ERROR_SHAPE, bad_shapes[i].needle);
    }

    EXPECT(l3k_rope_forward(Q, K, C, S, 1, 0, QO, KO, NULL), L3K_ERROR_SHAPE,
           "cos has 3 rows, expected at least seq + offset = 3 + 1 = 4");
    EXPECT(l3k_rope_forward(Q, K, C, S, -1, 0, QO, KO, NULL), L3K_ERROR_VALUE, "offset is -1, expected >= 0");
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 2, QO, KO, NULL), L3K_ERROR_VALUE, "mode is 2");
    int64_t tstr[2] = {1, 3}; /* a transposed table */
    tb.t = *C;
    tb.t.strides = tstr;
    EXPECT(l3k_rope_forward(Q, K, &tb.t, S, 0, 0, QO, KO, NULL), L3K_ERROR_LAYOUT, "cos is not contiguous");

    tb.t = *Q;
    tb.t.dtype.code = kDLInt;
    EXPECT(l3k_rope_forward(&tb.t, K, C, S, 0, 0, QO, KO, NULL), L3K_ERROR_DTYPE,
           "q dtype int32, expected float32, float16 or bfloat16");
    tb.t = *K;
    tb.t.dtype.bits = 16;
    EXPECT(l3k_rope_forward(Q, &tb.t, C, S, 0, 0, QO, KO, NULL), L3K_ERROR_DTYPE,
           "k dtype float16, expected float32 like q");
    tb.t = *C;
    tb.t.dtype.code = kDLBfloat;
    tb.t.dtype.bits = 16;
    EXPECT(l3k_rope_forward(Q, K, &tb.t, S, 0, 0, QO, KO, NULL), L3K_ERROR_DTYPE,
           "cos dtype bfloat16, expected float32 like q");
    tb.t = *QO;
    tb.t.dtype.bits = 16;
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, &tb.t, KO, NULL), L3K_ERROR_DTYPE,
           "q_out dtype float16, expected float32 like q");
    /* float16 activations: tables may be float32 or float16, but both alike. */
    tb.t = *Q;
    tb.t.dtype.bits = 16;
    tb2.t = *K;
    tb2.t.dtype.bits = 16;
    tb3.t = *QO;
    tb3.t.dtype.bits = 16;
    tb4.t = *KO;
    tb4.t.dtype.bits = 16;
    host_tensor th;
    th.t = *S;
    th.t.dtype.bits = 16;
    EXPECT(l3k_rope_forward(&tb.t, &tb2.t, C, &th.t, 0, 0, &tb3.t, &tb4.t, NULL), L3K_ERROR_DTYPE,
           "sin dtype float16, expected float32 like cos");
    th.t = *C;
    th.t.dtype.code = kDLBfloat;
    th.t.dtype.bits = 16;
    EXPECT(l3k_rope_forward(&tb.t, &tb2.t, &th.t, S, 0, 0, &tb3.t, &tb4.t, NULL), L3K_ERROR_DTYPE,
           "cos dtype bfloat16, expected float32 or float16 like q");

    int64_t qos[4] = {1, 3, 2, 4};
    tb.t = *QO;
    tb.t.shape = qos;
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, &tb.t, KO, NULL), L3K_ERROR_SHAPE,
           "q_out shape (1, 3, 2, 4), expected (1, 2, 3, 4) like q");
    int64_t nc[4] = {24, 12, 8, 2};
    tb.t = *Q;
    tb.t.strides = nc;
    EXPECT(l3k_rope_forward(&tb.t, K, C, S, 0, 0, QO, KO, NULL), L3K_ERROR_LAYOUT,
           "q stride[3] is 2, expected 1 (last dim contiguous)");
    tb.t = *KO;
    tb.t.strides = nc;
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, QO, &tb.t, NULL), L3K_ERROR_LAYOUT, "k_out stride[3] is 2");
    int64_t zs[4] = {24, 0, 4, 1};
    tb.t = *QO;
    tb.t.strides = zs;
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, &tb.t, KO, NULL), L3K_ERROR_LAYOUT, "q_out stride[1] is 0");
    /* Outputs that overlap their inputs without being the same view. */
    tb.t = *Q;
    tb.t.byte_offset = 4 * 4;
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, &tb.t, KO, NULL), L3K_ERROR_LAYOUT,
           "q_out overlaps q without being the same view");
    int64_t tr[4] = {24, 12, 4, 1}, sh2[4] = {1, 2, 3, 4};
    tb.t = *Q;
    tb.t.shape = sh2;
    tb.t.strides = tr; /* same strides as compact: same view */
    tb2.t = *Q;
    int64_t swap[4] = {24, 4, 8, 1};
    tb2.t.strides = swap; /* same data, other strides */
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, &tb2.t, KO, NULL), L3K_ERROR_LAYOUT,
           "q_out overlaps q without being the same view");
    tb.t = *K;
    tb.t.byte_offset = 4;
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, QO, &tb.t, NULL), L3K_ERROR_LAYOUT, "k_out overlaps k");
    tb.t = *QO;
    tb.t.shape = ks;
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, QO, &tb.t, NULL), L3K_ERROR_LAYOUT,
           "k_out starts at the same address as q_out");

    tb.t = *C;
    tb.t.device.device_type = kDLCUDA;
    EXPECT(l3k_rope_forward(Q, K, &tb.t, S, 0, 0, QO, KO, NULL),
           l3k_has_cuda() ? L3K_ERROR_DEVICE : L3K_ERROR_NO_CUDA,
           l3k_has_cuda() ? "cos is on cuda:0, expected cpu like the other tensors" : "built without CUDA");
    tb.t = *KO;
    tb.t.device.device_type = (DLDeviceType)7;
    EXPECT(l3k_rope_forward(Q, K, C, S, 0, 0, QO, &tb.t, NULL), L3K_ERROR_DEVICE,
           "k_out is on device type 7:0, expected cpu or cuda");
    tb.t = *Q;
    tb.t.byte_offset = 2;
    EXPECT(l3k_rope_forward(&tb.t, K, C, S, 0, 0, QO, KO, NULL), L3K_ERROR_ALIGNMENT, "q data pointer");
#undef EXPECT

    /* Same view passed as input and output: in place is fine (compact strides spelled out). */
    tb.t = *Q;
    tb.t.strides = tr;
    CHECK(l3k_rope_forward(Q, NULL, C, S, 0, 0, &tb.t, NULL, NULL) == L3K_SUCCESS,
          "in place with explicit strides: %s", l3k_last_error());
}

static void test_zero_size(void) {
    float dummy[8] = {0};
    int64_t qs[4] = {2, 4, 0, 8}, ks[4] = {2, 2, 0, 8}, ts[2] = {0, 4}, qe[4] = {0, 4, 5, 8},
            ke[4] = {0, 2, 5, 8};
    int64_t ts5[2] = {5, 4};
    host_tensor tq, tk, tc, ts_;
    set_tensor(&tq, NULL, L3K_DT_F32, 4, qs, NULL);
    set_tensor(&tk, NULL, L3K_DT_F32, 4, ks, NULL);
    set_tensor(&tc, NULL, L3K_DT_F32, 2, ts, NULL);
    set_tensor(&ts_, NULL, L3K_DT_F32, 2, ts, NULL);
    CHECK(l3k_rope_forward(&tq.t, &tk.t, &tc.t, &ts_.t, 7, 0, &tq.t, &tk.t, NULL) == L3K_SUCCESS, "seq 0: %s",
          l3k_last_error());
    set_tensor(&tq, NULL, L3K_DT_F32, 4, qe, NULL);
    set_tensor(&tk, NULL, L3K_DT_F32, 4, ke, NULL);
    set_tensor(&tc, dummy, L3K_DT_F32, 2, ts5, NULL);
    set_tensor(&ts_, dummy, L3K_DT_F32, 2, ts5, NULL);
    CHECK(l3k_rope_backward(&tq.t, &tk.t, &tc.t, &ts_.t, 0, 1, &tq.t, &tk.t, NULL) == L3K_SUCCESS,
          "batch 0: %s", l3k_last_error());
}

int main(void) {
    const rope_case cases[] = {
        /* B Hq Hk S D off extra mode dt tdt batched fused */
        {2, 4, 2, 5, 8, 0, 0, L3K_ROPE_HALF, L3K_DT_F32, L3K_DT_F32, 0, 0},
        {1, 3, 1, 7, 6, 3, 2, L3K_ROPE_INTERLEAVED, L3K_DT_BF16, L3K_DT_BF16, 0, 0},
        {2, 8, 8, 17, 128, 5, 0, L3K_ROPE_HALF, L3K_DT_BF16, L3K_DT_F32, 0, 1},
        {2, 2, 0, 3, 256, 0, 1, L3K_ROPE_INTERLEAVED, L3K_DT_F16, L3K_DT_F16, 1, 0},
        {3, 6, 2, 9, 64, 2, 0, L3K_ROPE_HALF, L3K_DT_F32, L3K_DT_F32, 1, 1},
        {1, 1, 1, 4, 2, 0, 0, L3K_ROPE_HALF, L3K_DT_BF16, L3K_DT_BF16, 0, 1},
        {2, 32, 8, 11, 128, 0, 0, L3K_ROPE_INTERLEAVED, L3K_DT_BF16, L3K_DT_BF16, 0, 1},
        {1, 5, 5, 13, 96, 1, 0, L3K_ROPE_HALF, L3K_DT_F16, L3K_DT_F32, 0, 0},
        {2, 4, 1, 6, 10, 4, 3, L3K_ROPE_HALF, L3K_DT_F32, L3K_DT_F32, 1, 1},
        {1, 2, 2, 3, 22, 0, 0, L3K_ROPE_INTERLEAVED, L3K_DT_F32, L3K_DT_F32, 0, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
        for (int inverse = 0; inverse < 2; ++inverse)
            for (int inplace = 0; inplace < 2; ++inplace) run_case(&cases[i], inverse, inplace);
    test_round_trip();
    test_bad_inputs();
    test_zero_size();
    printf("%d parity cases\n", g_cases);
    return report_failures();
}
