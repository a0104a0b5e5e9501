/* Cross-entropy (loss and dlogits in one pass) through the C ABI on host memory:
 * against a naive loop in double over float32 / float16 / bfloat16 logits, odd
 * class counts, ignored rows and out-of-range targets (NaN), grad_scale absent and
 * given, in place and out of place, strided rows; every bad input answered with its
 * own status and a message naming the argument, nothing written. */
#include "check.h"
#include "convert.h"

/* Against the double reference on the stored logits.  Some rows sit near +90 (past
 * float32's exp range without the max subtracted), where float32's lse carries
 * ~1e-5 of absolute error: loss within LOSS_TOL * (1 + |loss|); dlogits within
 * dlogits_rel(dtype) * |want| (one rounding to the dtype) + DLOGITS_ABS * |scale|. */
#define LOSS_TOL 2e-5
#define DLOGITS_ABS 2e-5
static double dlogits_rel(l3k_dt dt) {
    return dt == L3K_DT_F32 ? 2e-5 : dt == L3K_DT_F16 ? 1.0 / 1024 : 1.0 / 128;
}

static const DLDataType I64 = {kDLInt, 64, 1};

/* A host int64 tensor; strides NULL = compact. */
static void set_i64(host_tensor *h, int64_t *data, int ndim, const int64_t *shape) {
    set_tensor(h, data, L3K_DT_F32, ndim, shape, NULL);
    h->t.dtype = I64;
}

static int g_cases = 0;

/* rows x V logits, row stride V + pad; dlogits the logits themselves (inplace) or
 * a buffer of row stride V + 2 * pad.  scaled: 0 no grad_scale, 1 shape (1,), 2 a
 * 0-d tensor.  Target of logits' leading dims, loss flat. */
static void run_case(int64_t rows, int64_t V, int64_t pad, l3k_dt dt, int inplace, int scaled,
                     int64_t ignore) {
    unsigned seed = (unsigned)(rows * 131 + V * 7 + pad * 3 + inplace * 5 + scaled * 11 + dt);
    const size_t es = l3k_dt_size(dt);
    const int64_t ld = V + pad, dld = inplace ? ld : V + 2 * pad;
    const size_t xbytes = es * (size_t)(rows * ld), dbytes = es * (size_t)(rows * dld);
    void *xbuf = malloc(xbytes), *xcopy = malloc(xbytes), *dbuf = inplace ? xbuf : malloc(dbytes);
    double *xv = malloc(sizeof(double) * (size_t)(rows * V));
    int64_t *tgt = malloc(sizeof(int64_t) * (size_t)rows);
    float *loss = malloc(sizeof(float) * (size_t)rows);
    float gs = 0.37f;
    const double scale = scaled ? gs : 1.0;
    for (int64_t r = 0; r < rows; ++r) {
        const float offset = r % 5 == 4 ? 90.0f : r % 5 == 3 ? -40.0f : 0.0f;
        for (int64_t i = 0; i < ld; ++i) l3k_store(xbuf, r * ld + i, offset + 4.0f * frand(&seed), dt);
        for (int64_t i = 0; i < V; ++i) xv[r * V + i] = l3k_load(xbuf, r * ld + i, dt);
        /* Every 7th row ignored, every 11th out of range; the others a class in [0, V). */
        tgt[r] = r % 7 == 2    ? ignore
                 : r % 11 == 5 ? (r % 2 ? V + r : -2 - r)
                               : (int64_t)((frand(&seed) + 1.0f) * 0.5f * (float)V) % V;
        loss[r] = 42.0f;
    }
    memcpy(xcopy, xbuf, xbytes);
    if (!inplace)
        for (int64_t i = 0; i < rows * dld; ++i) l3k_store(dbuf, i, NAN, dt);

    /* (2, rows / 2, V) for even rows >= 4, else (rows, V): the shapes start at xs + !split. */
    const int split = rows >= 4 && rows % 2 == 0, nd = split ? 3 : 2;
    const int64_t lead = split ? rows / 2 : rows;
    int64_t xs[3] = {2, lead, V}, xst[3] = {lead * ld, ld, 1}, dst[3] = {lead * dld, dld, 1};
    int64_t ls[1] = {rows}, one[1] = {1};
    host_tensor tx, tdx, tt, tl, tg;
    set_tensor(&tx, xbuf, dt, nd, xs + !split, xst + !split);
    set_tensor(&tdx, dbuf, dt, nd, xs + !split, dst + !split);
    set_i64(&tt, tgt, nd - 1, xs + !split); /* the leading dims */
    set_tensor(&tl, loss, L3K_DT_F32, 1, ls, NULL);
    set_tensor(&tg, &gs, L3K_DT_F32, scaled == 2 ? 0 : 1, one, NULL);
    static const char *scaled_label[3] = {"", " grad_scale", " grad_scale 0-d"};
    char label[160];
    snprintf(label, sizeof label, "%s %lldx%lld ld %lld%s%s ignore %lld", dt_label(dt), (long long)rows,
             (long long)V, (long long)ld, inplace ? " in-place" : "", scaled_label[scaled],
             (long long)ignore);

    const l3k_status s = l3k_cross_entropy_forward_backward(&tx.t, &tt.t, ignore, scaled ? &tg.t : NULL,
                                                            &tl.t, inplace ? &tx.t : &tdx.t, NULL);
    CHECK(s == L3K_SUCCESS, "%s: %s", label, l3k_last_error());
    int bad = 0;
    for (int64_t r = 0; r < rows && s == L3K_SUCCESS; ++r) {
        const double *x = xv + r * V;
        const int64_t t = tgt[r];
        const int ignored = t == ignore, valid = !ignored && t >= 0 && t < V;
        double m = -INFINITY, sum = 0.0;
        for (int64_t i = 0; i < V; ++i) m = x[i] > m ? x[i] : m;
        for (int64_t i = 0; i < V; ++i) sum += exp(x[i] - m);
        const double lse = m + log(sum), want_loss = ignored ? 0.0 : valid ? lse - x[t] : NAN;
        const int loss_ok = valid     ? fabs(loss[r] - want_loss) <= LOSS_TOL * (1.0 + fabs(want_loss))
                            : ignored ? loss[r] == 0.0f
                                      : isnan(loss[r]);
        if (!loss_ok && bad++ < 3)
            CHECK(0, "%s: loss[%lld] (target %lld) %g, expected %g", label, (long long)r, (long long)t,
                  (double)loss[r], want_loss);
        for (int64_t i = 0; i < V; ++i) {
            const double got = l3k_load(dbuf, r * dld + i, dt);
            const double want = valid ? (exp(x[i] - lse) - (i == t)) * scale : 0.0;
            const int ok = valid     ? fabs(got - want) <= dlogits_rel(dt) * fabs(want) + DLOGITS_ABS * scale
                           : ignored ? got == 0.0
                                     : isnan(got);
            if (!ok && bad++ < 3)
                CHECK(0, "%s: dlogits[%lld, %lld] (target %lld) %g, expected %g", label, (long long)r,
                      (long long)i, (long long)t, got, valid || ignored ? want : NAN);
        }
        /* Nothing outside the rows' V elements is written. */
        for (int64_t i = V; i < dld; ++i)
            if (inplace ? memcmp((char *)dbuf + (size_t)(r * dld + i) * es,
                                 (char *)xcopy + (size_t)(r * dld + i) * es, es) != 0
                        : !isnan(l3k_load(dbuf, r * dld + i, dt)))
                if (bad++ < 3)
                    CHECK(0, "%s: padding [%lld, %lld] written", label, (long long)r, (long long)i);
    }
    CHECK(bad == 0, "%s: %d wrong", label, bad);
    if (!inplace) CHECK(memcmp(xbuf, xcopy, xbytes) == 0, "%s: logits written", label);
    ++g_cases;
    free(xbuf);
    free(xcopy);
    if (!inplace) free(dbuf);
    free(xv);
    free(tgt);
    free(loss);
}

static void test_parity(void) {
    const l3k_dt dts[3] = {L3K_DT_F32, L3K_DT_F16, L3K_DT_BF16};
    const int64_t vs[4] = {1, 7, 1000, 32003}, ignores[4] = {-100, -100, -1, 0}, pads[3] = {0, 3, 16};
    static const int64_t rows_big[] = {1, 2, 3, 8, 17, 37}, rows_huge[] = {1, 6, 37};
    int k = 0;
    for (int d = 0; d < 3; ++d)
        for (int v = 0; v < 4; ++v) {
            const int64_t *rl = vs[v] >= 32003 ? rows_huge : rows_big;
            const int nr = vs[v] >= 32003 ? 3 : vs[v] >= 1000 ? 6 : 37;
            for (int i = 0; i < nr; ++i, ++k) {
                const int64_t rows = vs[v] >= 1000 ? rl[i] : i + 1, pad = pads[k % 3];
                for (int inplace = 0; inplace < 2; ++inplace)
                    run_case(rows, vs[v], pad, dts[d], inplace, (k + inplace) % 3, ignores[k % 4]);
            }
        }
}

/* One bad argument: which one, what is changed in its descriptor, the status and a message
 * fragment expected.  Fields left 0 change nothing. */
enum { A_LOGITS, A_TARGET, A_GRAD_SCALE, A_LOSS, A_DLOGITS };
typedef struct {
    int arg;
    int null, null_data, drop_dims, device_type;
    DLDataType dtype; /* bits != 0: this dtype */
    const int64_t *shape, *strides;
    void *data; /* the tensor at this address */
    uint64_t byte_offset;
    l3k_status status; /* -1: L3K_ERROR_DEVICE, or L3K_ERROR_NO_CUDA in a build without CUDA */
    const char *needle;
} bad_arg;

/* Each bad input: its status, a message naming the argument, and not a byte written. */
static void test_bad_inputs(void) {
    enum { R = 3, V = 5, N = R * V };
    /* dx right after tgt: 8-byte aligned, so that a target can be placed inside it; gs
     * right after loss. */
    static struct {
        int64_t tgt[2 * R];
        float dx[N + 1], x[N + 1], loss[R + 1], gs[2];
    } b, b0;
    unsigned seed = 5;
    for (int i = 0; i < N; ++i) {
        b.x[i] = frand(&seed);
        b.dx[i] = 42.0f;
    }
    for (int i = 0; i < 2 * R; ++i) b.tgt[i] = i % V;
    for (int i = 0; i <= R; ++i) b.loss[i] = 42.0f;
    b.gs[0] = b.gs[1] = 0.5f;
    memcpy(&b0, &b, sizeof b);
    int64_t sx[2] = {R, V}, sr[1] = {R}, s1[1] = {1}, s2[1] = {2}, s36[2] = {R, V + 1}, s30[2] = {R, 0};
    int64_t s4[1] = {R + 1}, tr[2] = {1, R}, st2[1] = {2};
    host_tensor h[5];
    set_tensor(&h[A_LOGITS], b.x, L3K_DT_F32, 2, sx, NULL);
    set_i64(&h[A_TARGET], b.tgt, 1, sr);
    set_tensor(&h[A_GRAD_SCALE], b.gs, L3K_DT_F32, 1, s1, NULL);
    set_tensor(&h[A_LOSS], b.loss, L3K_DT_F32, 1, sr, NULL);
    set_tensor(&h[A_DLOGITS], b.dx, L3K_DT_F32, 2, sx, NULL);
    const DLDataType i32 = {kDLInt, 32, 1}, f64 = {kDLFloat, 64, 1}, f16 = {kDLFloat, 16, 1},
                     bf16 = {kDLBfloat, 16, 1};
    const bad_arg cases[] = {
        {A_LOGITS, .null = 1, .status = L3K_ERROR_NULL_POINTER,
         "cross_entropy_forward_backward: logits is NULL"},
        {A_TARGET, .null = 1, .status = L3K_ERROR_NULL_POINTER, "target is NULL"},
        {A_LOSS, .null = 1, .status = L3K_ERROR_NULL_POINTER, "loss is NULL"},
        {A_DLOGITS, .null = 1, .status = L3K_ERROR_NULL_POINTER, "dlogits is NULL"},
        {A_LOGITS, .null_data = 1, .status = L3K_ERROR_NULL_POINTER, "logits.data is NULL"},
        {A_LOSS, .null_data = 1, .status = L3K_ERROR_NULL_POINTER, "loss.data is NULL"},
        /* dtypes */
        {A_LOGITS, .dtype = i32, .status = L3K_ERROR_DTYPE,
         "logits dtype int32, expected float32, float16 or bfloat16"},
        {A_TARGET, .dtype = i32, .status = L3K_ERROR_DTYPE, "target dtype int32, expected int64"},
        {A_TARGET, .dtype = f64, .status = L3K_ERROR_DTYPE, "target dtype float64, expected int64"},
        {A_GRAD_SCALE, .dtype = f16, .status = L3K_ERROR_DTYPE, "grad_scale dtype float16, expected float32"},
        {A_LOSS, .dtype = bf16, .status = L3K_ERROR_DTYPE, "loss dtype bfloat16, expected float32"},
        {A_DLOGITS, .dtype = f16, .status = L3K_ERROR_DTYPE,
         "dlogits dtype float16, expected float32 like logits"},
        /* shapes and counts */
        {A_DLOGITS, .shape = s36, .status = L3K_ERROR_SHAPE,
         "dlogits shape (3, 6), expected (3, 5) like logits"},
        {A_TARGET, .shape = s4, .status = L3K_ERROR_SHAPE, "target has 4 elements, expected 3"},
        {A_LOSS, .shape = s2, .status = L3K_ERROR_SHAPE, "loss has 2 elements, expected 3"},
        {A_GRAD_SCALE, .shape = s2, .status = L3K_ERROR_SHAPE, "grad_scale has 2 elements, expected 1"},
        {A_LOGITS, .shape = s30, .status = L3K_ERROR_SHAPE,
         "logits.shape[-1] (V) is 0 with 3 rows, expected at least 1"},
        {A_LOGITS, .drop_dims = 2, .status = L3K_ERROR_SHAPE, "logits has ndim 0, expected >= 1"},
        /* layouts and alignment */
        {A_LOGITS, .strides = tr, .status = L3K_ERROR_LAYOUT, "logits stride[1] is 3, expected 1"},
        {A_DLOGITS, .strides = tr, .status = L3K_ERROR_LAYOUT, "dlogits stride[1] is 3, expected 1"},
        {A_TARGET, .strides = st2, .status = L3K_ERROR_LAYOUT, "target is not contiguous"},
        {A_TARGET, .byte_offset = 4, .status = L3K_ERROR_ALIGNMENT, "target data pointer"},
        {A_GRAD_SCALE, .byte_offset = 2, .status = L3K_ERROR_ALIGNMENT, "grad_scale data pointer"},
        {A_LOSS, .byte_offset = 2, .status = L3K_ERROR_ALIGNMENT, "loss data pointer"},
        {A_LOGITS, .byte_offset = 2, .status = L3K_ERROR_ALIGNMENT, "logits data pointer"},
        /* devices */
        {A_TARGET, .device_type = kDLCUDA, .status = -1, "target is on cuda:0"},
        {A_GRAD_SCALE, .device_type = kDLCUDA, .status = -1, "grad_scale is on cuda:0"},
        {A_DLOGITS, .device_type = kDLCUDA, .status = -1, "dlogits is on cuda:0"},
        {A_LOSS, .device_type = 7, .status = L3K_ERROR_DEVICE,
         "loss is on device type 7:0, expected cpu or cuda"},
        /* overlaps: dlogits the same view as logits or apart from everything; loss apart */
        {A_DLOGITS, .data = b.x, .byte_offset = 4, .status = L3K_ERROR_LAYOUT,
         "dlogits overlaps logits without being the same view"},
        {A_TARGET, .data = b.dx + 2, .status = L3K_ERROR_LAYOUT,
         "dlogits overlaps target, expected separate memory"},
        {A_GRAD_SCALE, .data = b.dx + 7, .status = L3K_ERROR_LAYOUT,
         "dlogits overlaps grad_scale, expected separate memory"},
        {A_LOSS, .data = b.x + 4, .status = L3K_ERROR_LAYOUT,
         "loss overlaps logits, expected separate memory"},
        {A_LOSS, .data = b.tgt, .status = L3K_ERROR_LAYOUT, "loss overlaps target, expected separate memory"},
        {A_LOSS, .data = b.loss + R, .status = L3K_ERROR_LAYOUT,
         "loss overlaps grad_scale, expected separate memory"},
        {A_LOSS, .data = b.dx + 12, .status = L3K_ERROR_LAYOUT,
         "loss overlaps dlogits, expected separate memory"},
    };
    const l3k_status no_device = l3k_has_cuda() ? L3K_ERROR_DEVICE : L3K_ERROR_NO_CUDA;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; ++k) {
        const bad_arg *c = &cases[k];
        DLTensor t[5], *p[5];
        for (int i = 0; i < 5; ++i) {
            t[i] = h[i].t;
            p[i] = &t[i];
        }
        DLTensor *a = &t[c->arg];
        if (c->null) p[c->arg] = NULL;
        if (c->null_data) a->data = NULL;
        if (c->data) a->data = c->data;
        if (c->dtype.bits) a->dtype = c->dtype;
        if (c->shape) a->shape = (int64_t *)c->shape;
        if (c->strides) a->strides = (int64_t *)c->strides;
        if (c->device_type) a->device.device_type = (DLDeviceType)c->device_type;
        a->ndim -= c->drop_dims;
        a->byte_offset = c->byte_offset;
        EXPECT_FAILS(l3k_cross_entropy_forward_backward(p[0], p[1], -100, p[2], p[3], p[4], NULL),
                     (int)c->status == -1 ? no_device : c->status, c->needle);
        CHECK(memcmp(&b, &b0, sizeof b) == 0, "a refused call wrote to a buffer (%s)", c->needle);
    }

    /* Accepted: out of place, in place (the same descriptor, or another with the same view), a
     * 0-d grad_scale, target and loss of any shape with one element per row. */
    DLTensor *X = &h[A_LOGITS].t, *T = &h[A_TARGET].t, *G = &h[A_GRAD_SCALE].t, *L = &h[A_LOSS].t;
    CHECK(l3k_cross_entropy_forward_backward(X, T, -100, G, L, &h[A_DLOGITS].t, NULL) == L3K_SUCCESS,
          "out of place: %s", l3k_last_error());
    for (int r = 0; r < R; ++r) CHECK(isfinite(b.loss[r]) && b.loss[r] > 0.0f, "loss[%d] = %g", r, b.loss[r]);
    int64_t cst[2] = {V, 1}, t13[2] = {1, R}, l31[2] = {R, 1};
    host_tensor tx, tg, tt, tl;
    set_tensor(&tx, b.x, L3K_DT_F32, 2, sx, cst);
    set_tensor(&tg, b.gs, L3K_DT_F32, 0, s1, NULL);
    set_i64(&tt, b.tgt, 2, t13);
    set_tensor(&tl, b.loss, L3K_DT_F32, 2, l31, NULL);
    CHECK(l3k_cross_entropy_forward_backward(X, &tt.t, -100, &tg.t, &tl.t, &tx.t, NULL) == L3K_SUCCESS,
          "in place, another descriptor: %s", l3k_last_error());
    CHECK(l3k_cross_entropy_forward_backward(X, T, -100, NULL, L, X, NULL) == L3K_SUCCESS, "in place: %s",
          l3k_last_error());
}

/* No rows (logits of shape xs, dlogits alike or logits itself, target of shape ts, all with
 * NULL data; loss (0,) at `loss`): the call succeeds. */
static void zero_rows_case(l3k_dt dt, int nd, const int64_t *xs, int tnd, const int64_t *ts, float *loss,
                           int inplace) {
    const int64_t s0[1] = {0};
    host_tensor tx, tdx, tt, tl;
    set_tensor(&tx, NULL, dt, nd, xs, NULL);
    set_tensor(&tdx, NULL, dt, nd, xs, NULL);
    set_i64(&tt, NULL, tnd, ts);
    set_tensor(&tl, loss, L3K_DT_F32, 1, s0, NULL);
    const l3k_status s =
        l3k_cross_entropy_forward_backward(&tx.t, &tt.t, -100, NULL, &tl.t, inplace ? &tx.t : &tdx.t, NULL);
    CHECK(s == L3K_SUCCESS, "no rows, %s logits of ndim %d, V %lld: %s", dt_label(dt), nd,
          (long long)xs[nd - 1], l3k_last_error());
}

/* No rows: nothing read or written, NULL data and V == 0 included. */
static void test_zero_rows(void) {
    float loss[2] = {42.0f, 42.0f};
    const int64_t s05[2] = {0, 5}, s00[2] = {0, 0}, s405[3] = {4, 0, 5}, s40[2] = {4, 0}, s0[1] = {0};
    zero_rows_case(L3K_DT_BF16, 2, s05, 1, s0, NULL, 0);
    zero_rows_case(L3K_DT_F32, 2, s00, 1, s0, NULL, 1);
    zero_rows_case(L3K_DT_F16, 3, s405, 2, s40, loss, 0);
    CHECK(loss[0] == 42.0f && loss[1] == 42.0f, "zero rows wrote loss");
}

int main(void) {
    test_parity();
    test_bad_inputs();
    test_zero_rows();
    printf("%d parity cases\n", g_cases);
    return report_failures();
}
