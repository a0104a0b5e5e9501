/* RMSNorm through the C ABI on host memory: results against a naive loop,
 * every bad input answered with its own status and message, version. */
#include "check.h"

static void naive_forward(const float *x, const float *w, int64_t rows, int64_t n, float eps, float *y,
                          float *rstd) {
    for (int64_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (int64_t i = 0; i < n; ++i) ss += (double)x[r * n + i] * x[r * n + i];
        double rs = 1.0 / sqrt(ss / n + eps);
        for (int64_t i = 0; i < n; ++i) y[r * n + i] = (float)(x[r * n + i] * rs * w[i]);
        rstd[r] = (float)rs;
    }
}

static void naive_backward(const float *dy, const float *x, const float *w, int64_t rows, int64_t n,
                           float eps, float *dx, float *dw) {
    for (int64_t i = 0; i < n; ++i) dw[i] = 0;
    for (int64_t r = 0; r < rows; ++r) {
        double ss = 0, gx = 0;
        for (int64_t i = 0; i < n; ++i) {
            ss += (double)x[r * n + i] * x[r * n + i];
            gx += (double)dy[r * n + i] * w[i] * x[r * n + i];
        }
        double rs = 1.0 / sqrt(ss / n + eps);
        for (int64_t i = 0; i < n; ++i) {
            dx[r * n + i] = (float)(rs * (dy[r * n + i] * w[i] - x[r * n + i] * rs * rs * gx / n));
            dw[i] += (float)(dy[r * n + i] * x[r * n + i] * rs);
        }
    }
}

static float max_rel_err(const float *a, const float *b, int64_t count) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < count; ++i) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return (float)sqrt(num / (den > 0 ? den : 1));
}

static void test_parity(int64_t rows, int64_t n) {
    unsigned seed = (unsigned)(rows * 7919 + n);
    const float eps = 1e-5f;
    int64_t count = rows * n;
    float *x = malloc(sizeof(float) * count), *dy = malloc(sizeof(float) * count);
    float *y = malloc(sizeof(float) * count), *yref = malloc(sizeof(float) * count);
    float *dx = malloc(sizeof(float) * count), *dxref = malloc(sizeof(float) * count);
    float *w = malloc(sizeof(float) * n), *dw = malloc(sizeof(float) * n), *dwref = malloc(sizeof(float) * n);
    float *rstd = malloc(sizeof(float) * rows), *rstdref = malloc(sizeof(float) * rows);
    for (int64_t i = 0; i < count; ++i) {
        x[i] = frand(&seed);
        dy[i] = frand(&seed);
        y[i] = dx[i] = NAN;
    }
    for (int64_t i = 0; i < n; ++i) {
        w[i] = 1.0f + 0.5f * frand(&seed);
        dw[i] = NAN;
    }
    for (int64_t i = 0; i < rows; ++i) rstd[i] = NAN;

    int64_t s2[2] = {rows, n}, s1[1] = {n}, sr[1] = {rows};
    host_tensor tx, tw, ty, tr, tdy, tdx, tdw, tws;
    DLTensor *X = host_f32(&tx, x, 2, s2), *W = host_f32(&tw, w, 1, s1), *Y = host_f32(&ty, y, 2, s2);
    DLTensor *R = host_f32(&tr, rstd, 1, sr), *DY = host_f32(&tdy, dy, 2, s2);
    DLTensor *DX = host_f32(&tdx, dx, 2, s2), *DW = host_f32(&tdw, dw, 1, s1);
    l3k_status st = l3k_rmsnorm_forward(X, W, eps, Y, R, NULL);
    CHECK(st == L3K_SUCCESS, "forward %lldx%lld: %s", (long long)rows, (long long)n, l3k_last_error());
    naive_forward(x, w, rows, n, eps, yref, rstdref);
    CHECK(max_rel_err(y, yref, count) < 1e-5f, "forward y error %g", max_rel_err(y, yref, count));
    CHECK(max_rel_err(rstd, rstdref, rows) < 1e-5f, "forward rstd error");

    size_t bytes = 0;
    CHECK(l3k_rmsnorm_backward_workspace_size(X, &bytes) == L3K_SUCCESS, "workspace size");
    int64_t wsn[1] = {(int64_t)(bytes / 4) + 1};
    float *ws = malloc(bytes + 16);
    DLTensor *WS = host_f32(&tws, ws, 1, wsn);
    /* once with the saved rstd, once recomputing it */
    for (int with_rstd = 0; with_rstd < 2; ++with_rstd) {
        st = l3k_rmsnorm_backward(DY, NULL, X, W, with_rstd ? R : NULL, eps, DX, DW, WS, NULL);
        CHECK(st == L3K_SUCCESS, "backward: %s", l3k_last_error());
        naive_backward(dy, x, w, rows, n, eps, dxref, dwref);
        /* n == 1: dx = rstd * dy * w * eps / (x^2 + eps), a difference of two
         * nearly equal terms; float32 keeps only ~1e-3 of it. */
        const float dx_tol = n == 1 ? 2e-3f : 1e-5f;
        CHECK(max_rel_err(dx, dxref, count) < dx_tol, "dx error %g at %lldx%lld",
              max_rel_err(dx, dxref, count), (long long)rows, (long long)n);
        CHECK(max_rel_err(dw, dwref, n) < 1e-5f, "dw error %g", max_rel_err(dw, dwref, n));
    }
    free(x);
    free(dy);
    free(y);
    free(yref);
    free(dx);
    free(dxref);
    free(w);
    free(dw);
    free(dwref);
    free(rstd);
    free(rstdref);
    free(ws);
}

/* Each bad input gets its status, a message naming op and argument, and
 * leaves the output untouched. */
static void test_bad_inputs(void) {
    float x[12], w[4], y[12], r[3];
    unsigned seed = 1;
    for (int i = 0; i < 12; ++i) {
        x[i] = frand(&seed);
        y[i] = 42.0f;
    }
    for (int i = 0; i < 4; ++i) w[i] = 1.0f;
    int64_t s2[2] = {3, 4}, s1[1] = {4}, s5[1] = {5}, sr[1] = {3};
    host_tensor tx, tw, ty, tr, tbad;
    DLTensor *X = host_f32(&tx, x, 2, s2), *W = host_f32(&tw, w, 1, s1), *Y = host_f32(&ty, y, 2, s2);
    DLTensor *R = host_f32(&tr, r, 1, sr);

#define EXPECT(call, status, needle)                                                    \
    do {                                                                                \
        EXPECT_FAILS(call, status, needle);                                             \
        for (int i_ = 0; i_ < 12; ++i_) CHECK(y[i_] == 42.0f, "y[%d] was written", i_); \
    } while (0)

    EXPECT(l3k_rmsnorm_forward(NULL, W, 1e-5f, Y, R, NULL), L3K_ERROR_NULL_POINTER,
           "rmsnorm_forward: x is NULL");
    EXPECT(l3k_rmsnorm_forward(X, NULL, 1e-5f, Y, R, NULL), L3K_ERROR_NULL_POINTER, "weight is NULL");
    EXPECT(l3k_rmsnorm_forward(X, W, -1.0f, Y, R, NULL), L3K_ERROR_VALUE, "eps is -1");
    EXPECT(l3k_rmsnorm_forward(X, W, NAN, Y, R, NULL), L3K_ERROR_VALUE, "eps is nan");
    EXPECT(l3k_rmsnorm_forward(X, W, INFINITY, Y, R, NULL), L3K_ERROR_VALUE, "finite");

    DLTensor *bad = host_f32(&tbad, w, 1, s5);
    EXPECT(l3k_rmsnorm_forward(X, bad, 1e-5f, Y, R, NULL), L3K_ERROR_SHAPE,
           "weight has ndim 1 and 5 elements, expected shape (4,)");

    tbad.t = *W;
    tbad.t.dtype.bits = 16; /* float16 weight, float32 x */
    EXPECT(l3k_rmsnorm_forward(X, &tbad.t, 1e-5f, Y, R, NULL), L3K_ERROR_DTYPE,
           "weight dtype float16, expected float32 like x");
    tbad.t = *X;
    tbad.t.dtype.code = kDLInt; /* integer x */
    EXPECT(l3k_rmsnorm_forward(&tbad.t, W, 1e-5f, Y, R, NULL), L3K_ERROR_DTYPE,
           "x dtype int32, expected float32, float16 or bfloat16");
    tbad.t = *X;
    tbad.t.device.device_type = kDLCUDA;
    EXPECT(l3k_rmsnorm_forward(&tbad.t, W, 1e-5f, Y, R, NULL),
           l3k_has_cuda() ? L3K_ERROR_DEVICE : L3K_ERROR_NO_CUDA,
           l3k_has_cuda() ? "weight is on cpu, expected cuda:0" : "built without CUDA");
    tbad.t = *X;
    tbad.t.device.device_type = (DLDeviceType)7; /* Vulkan */
    EXPECT(l3k_rmsnorm_forward(&tbad.t, W, 1e-5f, Y, R, NULL), L3K_ERROR_DEVICE, "expected cpu or cuda");
    int64_t strides[2] = {1, 3}; /* a transposed view: last dim not contiguous */
    tbad.t = *X;
    tbad.t.strides = strides;
    EXPECT(l3k_rmsnorm_forward(&tbad.t, W, 1e-5f, Y, R, NULL), L3K_ERROR_LAYOUT,
           "x stride[1] is 3, expected 1");
    tbad.t = *X;
    tbad.t.byte_offset = 2; /* misaligned float pointer */
    EXPECT(l3k_rmsnorm_forward(&tbad.t, W, 1e-5f, Y, R, NULL), L3K_ERROR_ALIGNMENT, "not aligned");
    int64_t s3[2] = {4, 3};
    tbad.t = *X;
    tbad.t.shape = s3;
    EXPECT(l3k_rmsnorm_forward(X, W, 1e-5f, &tbad.t, R, NULL), L3K_ERROR_SHAPE,
           "y shape (4, 3), expected (3, 4) like x");
    tbad.t = *R;
    tbad.t.dtype.bits = 64;
    EXPECT(l3k_rmsnorm_forward(X, W, 1e-5f, Y, &tbad.t, NULL), L3K_ERROR_DTYPE,
           "rstd dtype float64, expected float32");
    float ws[1];
    int64_t s0[1] = {1};
    host_tensor tws;
    DLTensor *WS = host_f32(&tws, ws, 1, s0);
    EXPECT(l3k_rmsnorm_backward(X, NULL, X, W, R, 1e-5f, Y, W, WS, NULL), L3K_ERROR_WORKSPACE,
           "workspace has 4 bytes, expected at least 16");
#undef EXPECT
    CHECK(strcmp(l3k_status_string(L3K_SUCCESS), "success") == 0, "status string");
    CHECK(l3k_status_string((l3k_status)999) != NULL, "unknown status string");
}

static void test_zero_size(void) {
    float dummy = 0;
    int64_t s2[2] = {0, 4}, s1[1] = {4}, sr[1] = {0};
    host_tensor tx, tw, ty, tr;
    DLTensor *X = host_f32(&tx, NULL, 2, s2), *W = host_f32(&tw, &dummy, 1, s1);
    DLTensor *Y = host_f32(&ty, NULL, 2, s2), *R = host_f32(&tr, NULL, 1, sr);
    CHECK(l3k_rmsnorm_forward(X, W, 1e-5f, Y, R, NULL) == L3K_SUCCESS, "zero rows: %s", l3k_last_error());
}

int main(void) {
    CHECK(l3k_version() == L3K_VERSION, "library version %d != header %d", l3k_version(), L3K_VERSION);
    int64_t shapes[][2] = {{256, 512}, {615, 123}, {1, 4096}, {3, 1}, {21, 8192}, {2, 70000}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; ++i) test_parity(shapes[i][0], shapes[i][1]);
    test_bad_inputs();
    test_zero_size();
    return report_failures();
}
