/* SwiGLU activation through the C ABI on host memory: forward and backward,
 * separate and fused gate_up layouts, against naive loops in double over
 * float32 / float16 / bfloat16, strided rows, in place; the row-overlap test
 * against brute force; every bad input answered with its own status and
 * message, outputs untouched. */
#include "check.h"
#include "convert.h"
#include "validate.h"

static double sig(double x) { return 1.0 / (1.0 + exp(-x)); }

static int close_to(double got, double want, l3k_dt dt) {
    const double rel = dt == L3K_DT_F32 ? 2e-6 : dt == L3K_DT_F16 ? 1.0 / 1024 : 1.0 / 128;
    return fabs(got - want) <= rel * fabs(want) + 1e-6;
}

static int g_cases = 0;

/* rows x n, row stride `ld` >= n (ld > n: a slice of wider rows).
 * fused: g and u are the halves of one (rows, 2n) buffer; the fused entry
 * points are used when fused_api.  inplace: outputs over inputs. */
static void run_case(int64_t rows, int64_t n, int64_t ld, l3k_dt dt, int fused, int fused_api, int inplace,
                     int with_a) {
    unsigned seed = (unsigned)(rows * 31 + n * 7 + ld + fused * 3 + inplace * 5 + dt);
    const size_t es = l3k_dt_size(dt);
    const int64_t gld = fused ? 2 * ld : ld; /* row stride of g and u */
    const int64_t cnt = rows * gld + 2 * ld;
    void *gbuf = malloc(es * (size_t)cnt), *ubuf = malloc(es * (size_t)cnt);
    void *dabuf = malloc(es * (size_t)(rows * ld)), *abuf = malloc(es * (size_t)(rows * ld));
    void *dgbuf = malloc(es * (size_t)cnt), *dubuf = malloc(es * (size_t)cnt);
    void *a2buf = malloc(es * (size_t)(rows * ld));
    float *gv = malloc(sizeof(float) * (size_t)(rows * n)), *uv = malloc(sizeof(float) * (size_t)(rows * n));
    float *dav = malloc(sizeof(float) * (size_t)(rows * n));
    for (int64_t i = 0; i < cnt; ++i) {
        l3k_store(gbuf, i, 6.0f * frand(&seed), dt);
        l3k_store(ubuf, i, 2.0f * frand(&seed), dt);
        l3k_store(dgbuf, i, NAN, dt);
        l3k_store(dubuf, i, NAN, dt);
    }
    for (int64_t i = 0; i < rows * ld; ++i) {
        l3k_store(dabuf, i, frand(&seed), dt);
        l3k_store(abuf, i, NAN, dt);
        l3k_store(a2buf, i, NAN, dt);
    }
    /* g at gbuf, u at gbuf + n (fused) or ubuf; row stride gld. */
    void *g = gbuf, *u = fused ? (char *)gbuf + (size_t)n * es : ubuf;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < n; ++i) {
            gv[r * n + i] = l3k_load(g, r * gld + i, dt);
            uv[r * n + i] = l3k_load(u, r * gld + i, dt);
            dav[r * n + i] = l3k_load(dabuf, r * ld + i, dt);
        }
    int64_t sh[2] = {rows, n}, st[2] = {gld, 1}, ast[2] = {ld, 1}, gush[2] = {rows, 2 * n};
    host_tensor tg, tu, ta, tda, tdg, tdu, tgu, tdgu, ta2;
    set_tensor(&tg, g, dt, 2, sh, st);
    set_tensor(&tu, u, dt, 2, sh, st);
    set_tensor(&tgu, gbuf, dt, 2, gush, st);
    set_tensor(&tda, dabuf, dt, 2, sh, ast);
    set_tensor(&ta2, a2buf, dt, 2, sh, ast);
    /* Outputs: over their inputs (in place) or separate buffers with g's layout. */
    if (inplace) {
        set_tensor(&ta, g, dt, 2, sh, st);
        tdg = tg;
        tdg.t.shape = tdg.shape;
        tdg.t.strides = tdg.strides;
        tdu = tu;
        tdu.t.shape = tdu.shape;
        tdu.t.strides = tdu.strides;
        tdgu = tgu;
        tdgu.t.shape = tdgu.shape;
        tdgu.t.strides = tdgu.strides;
    } else {
        set_tensor(&ta, abuf, dt, 2, sh, ast);
        set_tensor(&tdg, dgbuf, dt, 2, sh, st);
        set_tensor(&tdu, fused ? (char *)dgbuf + (size_t)n * es : dubuf, dt, 2, sh, st);
        set_tensor(&tdgu, dgbuf, dt, 2, gush, st);
    }
    char label[160];
    snprintf(label, sizeof label, "%s %lldx%lld ld %lld%s%s%s%s", dt_label(dt), (long long)rows, (long long)n,
             (long long)ld, fused ? " fused-layout" : "", fused_api ? " fused-api" : "",
             inplace ? " in-place" : "", with_a ? " +a" : "");

    /* Backward first (forward in place overwrites g). */
    l3k_status s =
        fused_api ? l3k_swiglu_fused_backward(&tda.t, &tgu.t, &tdgu.t, with_a ? &ta2.t : NULL, NULL)
                  : l3k_swiglu_backward(&tda.t, &tg.t, &tu.t, &tdg.t, &tdu.t, with_a ? &ta2.t : NULL, NULL);
    CHECK(s == L3K_SUCCESS, "backward %s: %s", label, l3k_last_error());
    int bad = 0;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < n; ++i) {
            const double gg = gv[r * n + i], uu = uv[r * n + i], dd = dav[r * n + i], sg = sig(gg);
            const double want_dg = dd * uu * sg * (1 + gg * (1 - sg)), want_du = dd * gg * sg;
            const double got_dg = l3k_load(tdg.t.data, r * gld + i, dt),
                         got_du = l3k_load(tdu.t.data, r * gld + i, dt);
            if (!close_to(got_dg, want_dg, dt) || !close_to(got_du, want_du, dt)) {
                if (bad++ < 3)
                    CHECK(0, "backward %s [%lld,%lld]: dg %g (want %g), du %g (want %g)", label, (long long)r,
                          (long long)i, got_dg, want_dg, got_du, want_du);
            }
            if (with_a && !close_to(l3k_load(a2buf, r * ld + i, dt), gg * sg * uu, dt))
                if (bad++ < 3) CHECK(0, "backward %s: a[%lld,%lld] wrong", label, (long long)r, (long long)i);
        }
    CHECK(bad == 0, "backward %s: %d wrong", label, bad);
    /* Restore g and u if the backward wrote over them. */
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < n; ++i) {
            l3k_store(g, r * gld + i, gv[r * n + i], dt);
            l3k_store(u, r * gld + i, uv[r * n + i], dt);
        }
    s = fused_api ? l3k_swiglu_fused_forward(&tgu.t, &ta.t, NULL)
                  : l3k_swiglu_forward(&tg.t, &tu.t, &ta.t, NULL);
    CHECK(s == L3K_SUCCESS, "forward %s: %s", label, l3k_last_error());
    bad = 0;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < n; ++i) {
            const double gg = gv[r * n + i], want = gg * sig(gg) * uv[r * n + i];
            const double got = l3k_load(ta.t.data, r * ta.t.strides[0] + i, dt);
            if (!close_to(got, want, dt) && bad++ < 3)
                CHECK(0, "forward %s [%lld,%lld]: %g, expected %g", label, (long long)r, (long long)i, got,
                      want);
        }
    CHECK(bad == 0, "forward %s: %d wrong", label, bad);
    /* Padding between rows of a separate output stays poisoned. */
    if (!inplace && ld > n) {
        int written = 0;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = n; i < ld; ++i)
                if (!isnan(l3k_load(abuf, r * ld + i, dt))) ++written;
        CHECK(written == 0, "forward %s: %d padding elements written", label, written);
    }
    ++g_cases;
    free(gbuf);
    free(ubuf);
    free(dabuf);
    free(abuf);
    free(dgbuf);
    free(dubuf);
    free(a2buf);
    free(gv);
    free(uv);
    free(dav);
}

/* l3k_rows_overlap against enumerating both element sets. */
static void test_rows_overlap(void) {
    unsigned seed = 11;
    static unsigned char mark[4096];
    int wrong = 0, overlaps = 0, cases = 0;
    for (int iter = 0; iter < 20000; ++iter) {
        l3k_rows a, b;
        const int64_t S = 1 + (int64_t)((frand(&seed) + 1) * 6);
        a.rows = (int64_t)((frand(&seed) + 1) * 3);
        b.rows = (int64_t)((frand(&seed) + 1) * 3);
        a.n = 1 + (int64_t)((frand(&seed) + 1) * 0.5 * (double)S);
        b.n = 1 + (int64_t)((frand(&seed) + 1) * 0.5 * (double)S);
        if (a.n > S) a.n = S;
        if (b.n > S) b.n = S;
        a.row_stride = S;
        b.row_stride = (frand(&seed) > 0.8f) ? S + 1 : S;
        if (b.n > b.row_stride) b.n = b.row_stride;
        const int64_t oa = 100 + (int64_t)((frand(&seed) + 1) * 20),
                      ob = 100 + (int64_t)((frand(&seed) + 1) * 20);
        a.data = (void *)(uintptr_t)(4096 + 4 * oa);
        b.data = (void *)(uintptr_t)(4096 + 4 * ob);
        memset(mark, 0, sizeof mark);
        for (int64_t r = 0; r < a.rows; ++r)
            for (int64_t i = 0; i < a.n; ++i) mark[oa + r * S + i] = 1;
        int truth = 0;
        for (int64_t r = 0; r < b.rows; ++r)
            for (int64_t j = 0; j < b.n; ++j) truth |= mark[ob + r * b.row_stride + j];
        const int got = l3k_rows_overlap(&a, &b, 4);
        /* Exact for one row stride; when strides differ it may only err towards 1. */
        const int exact = a.row_stride == b.row_stride || a.rows <= 1 || b.rows <= 1;
        if (exact ? got != truth : (truth && !got)) ++wrong;
        overlaps += truth;
        ++cases;
    }
    CHECK(wrong == 0, "rows_overlap wrong in %d of %d cases (%d overlapping)", wrong, cases, overlaps);
}

static void test_bad_inputs(void) {
    enum { N = 64 };
    static float g[N], u[N], a[N], da[N], dg[N], du[N], gu[N], dgu[N];
    unsigned seed = 9;
    frand_across(&seed, N, 4, (float *const[]){g, u, da, gu});
    for (int i = 0; i < N; ++i) a[i] = dg[i] = du[i] = dgu[i] = 42.0f;
    const float g0 = g[0], gu0 = gu[0];
    int64_t s34[2] = {3, 4}, s38[2] = {3, 8}, s35[2] = {3, 5}, s37[2] = {3, 7};
    host_tensor tg, tu, ta, tda, tdg, tdu, tgu, tdgu, tb, tb2;
    SET_TENSORS(L3K_DT_F32, 2, s34, {&tg, g}, {&tu, u}, {&ta, a}, {&tda, da}, {&tdg, dg}, {&tdu, du});
    SET_TENSORS(L3K_DT_F32, 2, s38, {&tgu, gu}, {&tdgu, dgu});
    DLTensor *G = &tg.t, *U = &tu.t, *A = &ta.t, *DA = &tda.t, *DG = &tdg.t, *DU = &tdu.t;
    DLTensor *GU = &tgu.t, *DGU = &tdgu.t;

#define EXPECT(call, status, needle)                                                        \
    do {                                                                                    \
        EXPECT_FAILS(call, status, needle);                                                 \
        for (int i_ = 0; i_ < N; ++i_)                                                      \
            CHECK(a[i_] == 42.0f && dg[i_] == 42.0f && du[i_] == 42.0f && dgu[i_] == 42.0f, \
                  "output [%d] was written", i_);                                           \
        CHECK(g[0] == g0 && gu[0] == gu0, "input was written");                             \
    } while (0)

    EXPECT(l3k_swiglu_forward(NULL, U, A, NULL), L3K_ERROR_NULL_POINTER, "swiglu_forward: g is NULL");
    EXPECT(l3k_swiglu_forward(G, NULL, A, NULL), L3K_ERROR_NULL_POINTER, "u is NULL");
    EXPECT(l3k_swiglu_forward(G, U, NULL, NULL), L3K_ERROR_NULL_POINTER, "a is NULL");
    EXPECT(l3k_swiglu_fused_forward(NULL, A, NULL), L3K_ERROR_NULL_POINTER,
           "swiglu_fused_forward: gu is NULL");
    EXPECT(l3k_swiglu_backward(DA, G, U, NULL, DU, NULL, NULL), L3K_ERROR_NULL_POINTER,
           "swiglu_backward: dg is NULL");
    EXPECT(l3k_swiglu_fused_backward(NULL, GU, DGU, NULL, NULL), L3K_ERROR_NULL_POINTER,
           "swiglu_fused_backward: da is NULL");

    tb.t = *U;
    tb.t.shape = s35;
    EXPECT(l3k_swiglu_forward(G, &tb.t, A, NULL), L3K_ERROR_SHAPE, "u shape (3, 5), expected (3, 4) like g");
    tb.t = *A;
    tb.t.shape = s35;
    EXPECT(l3k_swiglu_forward(G, U, &tb.t, NULL), L3K_ERROR_SHAPE, "a shape (3, 5), expected (3, 4) like g");
    tb.t = *DA;
    tb.t.shape = s35;
    EXPECT(l3k_swiglu_backward(&tb.t, G, U, DG, DU, NULL, NULL), L3K_ERROR_SHAPE,
           "da shape (3, 5), expected (3, 4) like g");
    tb.t = *U;
    tb.t.dtype.bits = 16;
    EXPECT(l3k_swiglu_forward(G, &tb.t, A, NULL), L3K_ERROR_DTYPE,
           "u dtype float16, expected float32 like g");
    tb.t = *G;
    tb.t.dtype.code = kDLInt;
    EXPECT(l3k_swiglu_forward(&tb.t, U, A, NULL), L3K_ERROR_DTYPE,
           "g dtype int32, expected float32, float16 or bfloat16");
    tb.t = *DU;
    tb.t.dtype.code = kDLBfloat;
    tb.t.dtype.bits = 16;
    EXPECT(l3k_swiglu_backward(DA, G, U, DG, &tb.t, NULL, NULL), L3K_ERROR_DTYPE,
           "du dtype bfloat16, expected float32 like g");
    int64_t tr[2] = {1, 3};
    tb.t = *G;
    tb.t.strides = tr;
    EXPECT(l3k_swiglu_forward(&tb.t, U, A, NULL), L3K_ERROR_LAYOUT, "g stride[1] is 3, expected 1");
    tb.t = *U;
    tb.t.device.device_type = kDLCUDA;
    EXPECT(l3k_swiglu_forward(G, &tb.t, A, NULL), l3k_has_cuda() ? L3K_ERROR_DEVICE : L3K_ERROR_NO_CUDA,
           l3k_has_cuda() ? "u is on cuda:0, expected cpu like the other tensors" : "built without CUDA");
    tb.t = *G;
    tb.t.byte_offset = 2;
    EXPECT(l3k_swiglu_forward(&tb.t, U, A, NULL), L3K_ERROR_ALIGNMENT, "g data pointer");

    /* Overlaps that are not the same view. */
    tb.t = *G;
    tb.t.byte_offset = 4;
    EXPECT(l3k_swiglu_forward(G, U, &tb.t, NULL), L3K_ERROR_LAYOUT,
           "a overlaps g without being the same view");
    EXPECT(l3k_swiglu_backward(DA, G, U, DG, DG, NULL, NULL), L3K_ERROR_LAYOUT,
           "du overlaps dg, expected separate memory");
    EXPECT(l3k_swiglu_backward(DA, G, U, DG, DU, DG, NULL), L3K_ERROR_LAYOUT,
           "a overlaps dg, expected separate memory");
    tb.t = *DA;
    tb.t.byte_offset = 8;
    EXPECT(l3k_swiglu_backward(DA, G, U, &tb.t, DU, NULL, NULL), L3K_ERROR_LAYOUT,
           "dg overlaps da without being the same view");
    tb.t = *GU;
    tb.t.byte_offset = 4;
    EXPECT(l3k_swiglu_fused_backward(DA, GU, &tb.t, NULL, NULL), L3K_ERROR_LAYOUT,
           "dgu overlaps gu without being the same view");
    int64_t s32[2] = {3, 2}, st32[2] = {8, 1};
    tb.t = *GU;
    tb.t.shape = s34;
    tb.t.strides = st32;
    tb.t.byte_offset = 4; /* a over gu[:, 1:5] */
    EXPECT(l3k_swiglu_fused_forward(GU, &tb.t, NULL), L3K_ERROR_LAYOUT,
           "a overlaps gu[..., :hidden] without being the same view");
    (void)s32;

    /* Fused layout shapes. */
    tb.t = *GU;
    tb.t.shape = s37;
    EXPECT(l3k_swiglu_fused_forward(&tb.t, A, NULL), L3K_ERROR_SHAPE,
           "gu.shape[-1] is 7, expected an even size");
    tb.t = *A;
    tb.t.shape = s35;
    EXPECT(l3k_swiglu_fused_forward(GU, &tb.t, NULL), L3K_ERROR_SHAPE, "a shape does not match gu");
    tb.t = *DA;
    tb.t.shape = s38;
    EXPECT(l3k_swiglu_fused_backward(&tb.t, GU, DGU, NULL, NULL), L3K_ERROR_SHAPE,
           "da shape does not match gu");
    int64_t s48[2] = {4, 8};
    tb.t = *DGU;
    tb.t.shape = s48;
    EXPECT(l3k_swiglu_fused_backward(DA, GU, &tb.t, NULL, NULL), L3K_ERROR_SHAPE,
           "dgu shape (4, 8), expected (3, 8) like gu");
    tb.t = *DGU;
    tb.t.dtype.bits = 16;
    EXPECT(l3k_swiglu_fused_backward(DA, GU, &tb.t, NULL, NULL), L3K_ERROR_DTYPE,
           "dgu dtype float16, expected float32 like gu");
    int64_t rs[2] = {5, 1}; /* rows overlapping: row stride below the row length */
    tb2.t = *GU;
    tb2.t.strides = rs;
    EXPECT(l3k_swiglu_fused_forward(&tb2.t, A, NULL), L3K_ERROR_LAYOUT,
           "gu row stride 5 is below the row length 8");
#undef EXPECT

    /* Same views are in place and fine; so is a over the g half of gu. */
    CHECK(l3k_swiglu_backward(DA, G, U, G, U, DA, NULL) == L3K_SUCCESS, "in place backward: %s",
          l3k_last_error());
    tb.t = *GU;
    tb.t.shape = s34;
    tb.t.strides = st32; /* gu[:, :4] */
    CHECK(l3k_swiglu_fused_forward(GU, &tb.t, NULL) == L3K_SUCCESS, "a over gu[..., :hidden]: %s",
          l3k_last_error());
    CHECK(l3k_swiglu_fused_backward(DA, GU, GU, NULL, NULL) == L3K_SUCCESS, "fused in place: %s",
          l3k_last_error());
}

static void test_zero_size(void) {
    int64_t s0[2] = {0, 4}, s00[2] = {5, 0}, sg0[2] = {0, 8};
    host_tensor tg, tu, ta, tgu;
    set_tensor(&tg, NULL, L3K_DT_BF16, 2, s0, NULL);
    set_tensor(&tu, NULL, L3K_DT_BF16, 2, s0, NULL);
    set_tensor(&ta, NULL, L3K_DT_BF16, 2, s0, NULL);
    CHECK(l3k_swiglu_forward(&tg.t, &tu.t, &ta.t, NULL) == L3K_SUCCESS, "zero rows: %s", l3k_last_error());
    CHECK(l3k_swiglu_backward(&ta.t, &tg.t, &tu.t, &ta.t, &tu.t, NULL, NULL) == L3K_SUCCESS,
          "zero rows bwd: %s", l3k_last_error());
    set_tensor(&tg, NULL, L3K_DT_F32, 2, s00, NULL);
    set_tensor(&tu, NULL, L3K_DT_F32, 2, s00, NULL);
    set_tensor(&ta, NULL, L3K_DT_F32, 2, s00, NULL);
    CHECK(l3k_swiglu_forward(&tg.t, &tu.t, &ta.t, NULL) == L3K_SUCCESS, "zero width: %s", l3k_last_error());
    set_tensor(&tgu, NULL, L3K_DT_F32, 2, sg0, NULL);
    set_tensor(&ta, NULL, L3K_DT_F32, 2, s0, NULL);
    CHECK(l3k_swiglu_fused_forward(&tgu.t, &ta.t, NULL) == L3K_SUCCESS, "fused zero rows: %s",
          l3k_last_error());
}

int main(void) {
    const l3k_dt dts[3] = {L3K_DT_F32, L3K_DT_F16, L3K_DT_BF16};
    const int64_t shapes[][3] = {{7, 13, 13}, {64, 256, 256},   {5, 24, 40},
                                 {1, 1, 1},   {33, 1000, 1003}, {3, 8, 8}};
    for (int d = 0; d < 3; ++d)
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; ++i)
            for (int fused = 0; fused < 2; ++fused)
                for (int inplace = 0; inplace < 2; ++inplace) {
                    const int64_t *s = shapes[i];
                    run_case(s[0], s[1], s[2], dts[d], fused, 0, inplace, inplace == 0);
                    if (fused) run_case(s[0], s[1], s[2], dts[d], 1, 1, inplace, inplace);
                }
    test_rows_overlap();
    test_bad_inputs();
    test_zero_size();
    printf("%d parity cases\n", g_cases);
    return report_failures();
}
