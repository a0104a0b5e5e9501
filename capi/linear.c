/* The linear layer's GEMMs: validation, and the row-major -> column-major mapping.
 *
 * Row-major X[T,K] is the column-major K x T matrix with leading dim = X's row
 * stride, so:  Y[T,N] = X W^T      is  Y^T = W^T' X^T:  m=N, n=T, k=K, A=W (op T), B=X
 *              dX[T,K] = dY W      is  dX^T = W^T dY^T: m=K, n=T, k=N, A=W (op N), B=dY
 *              dW[N,K] = dY^T X    is  dW^T = X^T dY:   m=K, n=N, k=T, A=X (op N), B=dY (op T) */
#include "linear.h"
#include "validate.h"

static l3k_status check_rows_tensor(l3k_call *c, const DLTensor *t, const char *name, l3k_dt *dt,
                                    l3k_rows *rows) {
    L3K_TRY(l3k_check_tensor(c, t, name));
    L3K_TRY(l3k_check_float(c, t, name, dt));
    return l3k_check_rows(c, t, name, rows);
}

static l3k_status check_weight(l3k_call *c, const DLTensor *w, const char *name, l3k_dt dt, l3k_rows *rows) {
    L3K_TRY(l3k_check_tensor(c, w, name));
    L3K_TRY(l3k_check_dtype(c, w, name, dt, "x"));
    if (w->ndim != 2)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim %d, expected 2 (out_features, in_features)", name,
                        (int)w->ndim);
    return l3k_check_rows(c, w, name, rows);
}

/* `t` has x's leading shape and last dim `n`. */
static l3k_status check_leading(l3k_call *c, const DLTensor *t, const char *name, const DLTensor *x,
                                int64_t n) {
    int ok = t->ndim == x->ndim && t->shape[t->ndim - 1] == n;
    for (int i = 0; ok && i < x->ndim - 1; ++i) ok = t->shape[i] == x->shape[i];
    if (!ok) {
        return l3k_fail(c, L3K_ERROR_SHAPE,
                        "%s has ndim %d and last dim %lld, expected x's leading dims and last dim %lld", name,
                        (int)t->ndim, (long long)(t->ndim ? t->shape[t->ndim - 1] : 0), (long long)n);
    }
    return L3K_SUCCESS;
}

/* The optional cuBLASLt workspace.  One of 0 bytes is none: what a caller gets
 * by allocating l3k_linear_workspace_size bytes on the CPU. */
static l3k_status workspace_of(l3k_call *c, const DLTensor *ws, void **data, size_t *bytes) {
    *data = 0;
    *bytes = 0;
    if (!ws) return L3K_SUCCESS;
    L3K_TRY(l3k_check_tensor(c, ws, "workspace"));
    if (l3k_tensor_bytes(ws) == 0) return L3K_SUCCESS;
    L3K_TRY(l3k_check_workspace(c, ws, 1));
    *data = l3k_data(ws);
    *bytes = l3k_tensor_bytes(ws);
    return L3K_SUCCESS;
}

/* cuBLASLt writes the workspace while it reads the operands. */
static l3k_status workspace_apart(l3k_call *c, const DLTensor *ws, size_t bytes, const DLTensor *const *ts,
                                  const char *const *names, int count) {
    if (!bytes) return L3K_SUCCESS;
    for (int i = 0; i < count; ++i)
        if (ts[i]) L3K_TRY(l3k_check_no_overlap(c, ws, "workspace", ts[i], names[i], 0));
    return L3K_SUCCESS;
}

static l3k_status run(l3k_call *c, const l3k_gemm_args *g, void *stream) {
    if (g->m == 0 || g->n == 0) return L3K_SUCCESS;
    if (l3k_checking_only()) return L3K_SUCCESS;
    if (l3k_on_cuda(c)) return l3k_cuda_launch(c, L3K_CUDA_FN(l3k_cuda_gemm), g, stream);
    l3k_cpu_gemm(g);
    return L3K_SUCCESS;
}

l3k_status l3k_linear_workspace_size(const DLTensor *x, size_t *bytes) {
    l3k_call c = {.op = "linear_workspace_size"};
    if (!bytes) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "bytes is NULL");
    L3K_TRY(l3k_check_tensor(&c, x, "x"));
    *bytes = l3k_on_cuda(&c) ? L3K_GEMM_WORKSPACE_BYTES : 0;
    return L3K_SUCCESS;
}

l3k_status l3k_linear_forward(const DLTensor *x, const DLTensor *weight, const DLTensor *residual,
                              DLTensor *y, DLTensor *workspace, void *stream) {
    l3k_call c = {.op = "linear_forward"};
    l3k_dt dt;
    l3k_rows xr, wr, yr, rr = {0};
    L3K_TRY(check_rows_tensor(&c, x, "x", &dt, &xr));
    L3K_TRY(check_weight(&c, weight, "weight", dt, &wr));
    if (wr.n != xr.n)
        return l3k_fail(&c, L3K_ERROR_SHAPE, "weight has in_features %lld, expected %lld like x's last dim",
                        (long long)wr.n, (long long)xr.n);
    L3K_TRY(l3k_check_tensor(&c, y, "y"));
    L3K_TRY(l3k_check_dtype(&c, y, "y", dt, "x"));
    L3K_TRY(check_leading(&c, y, "y", x, wr.rows));
    L3K_TRY(l3k_check_rows(&c, y, "y", &yr));
    if (residual) {
        L3K_TRY(l3k_check_tensor(&c, residual, "residual"));
        L3K_TRY(l3k_check_dtype(&c, residual, "residual", dt, "x"));
        L3K_TRY(l3k_check_same_shape(&c, residual, "residual", y, "y"));
        L3K_TRY(l3k_check_rows(&c, residual, "residual", &rr));
        if (rr.data == yr.data && rr.row_stride != yr.row_stride)
            return l3k_fail(&c, L3K_ERROR_LAYOUT, "residual aliases y with another row stride");
    }
    L3K_TRY(l3k_check_no_overlap(&c, y, "y", x, "x", 0));
    L3K_TRY(l3k_check_no_overlap(&c, y, "y", weight, "weight", 0));
    if (residual) L3K_TRY(l3k_check_no_overlap(&c, y, "y", residual, "residual", 1));
    void *ws;
    size_t ws_bytes;
    L3K_TRY(workspace_of(&c, workspace, &ws, &ws_bytes));
    const DLTensor *ts[4] = {x, weight, residual, y};
    static const char *const names[4] = {"x", "weight", "residual", "y"};
    L3K_TRY(workspace_apart(&c, workspace, ws_bytes, ts, names, 4));
    l3k_gemm_args g = {
        .trans_a = 1,
        .trans_b = 0,
        .m = wr.rows,
        .n = xr.rows,
        .k = xr.n,
        .a = wr.data,
        .lda = wr.row_stride,
        .b = xr.data,
        .ldb = xr.row_stride,
        .c = residual ? rr.data : 0,
        .ldc = rr.row_stride,
        .d = yr.data,
        .ldd = yr.row_stride,
        .ab_dtype = dt,
        .cd_dtype = dt,
        .alpha = 1.0f,
        .beta = residual ? 1.0f : 0.0f,
        .workspace = ws,
        .workspace_bytes = ws_bytes,
    };
    return run(&c, &g, stream);
}

l3k_status l3k_linear_backward_input(const DLTensor *dy, const DLTensor *weight, DLTensor *dx, int accumulate,
                                     DLTensor *workspace, void *stream) {
    l3k_call c = {.op = "linear_backward_input"};
    l3k_dt dt;
    l3k_rows dyr, wr, dxr;
    L3K_TRY(check_rows_tensor(&c, dy, "dy", &dt, &dyr));
    L3K_TRY(check_weight(&c, weight, "weight", dt, &wr));
    if (wr.rows != dyr.n)
        return l3k_fail(&c, L3K_ERROR_SHAPE, "weight has out_features %lld, expected %lld like dy's last dim",
                        (long long)wr.rows, (long long)dyr.n);
    L3K_TRY(l3k_check_tensor(&c, dx, "dx"));
    L3K_TRY(l3k_check_dtype(&c, dx, "dx", dt, "dy"));
    L3K_TRY(check_leading(&c, dx, "dx", dy, wr.n));
    L3K_TRY(l3k_check_rows(&c, dx, "dx", &dxr));
    L3K_TRY(l3k_check_no_overlap(&c, dx, "dx", dy, "dy", 0));
    L3K_TRY(l3k_check_no_overlap(&c, dx, "dx", weight, "weight", 0));
    void *ws;
    size_t ws_bytes;
    L3K_TRY(workspace_of(&c, workspace, &ws, &ws_bytes));
    const DLTensor *ts[3] = {dy, weight, dx};
    static const char *const names[3] = {"dy", "weight", "dx"};
    L3K_TRY(workspace_apart(&c, workspace, ws_bytes, ts, names, 3));
    l3k_gemm_args g = {
        .trans_a = 0,
        .trans_b = 0,
        .m = wr.n,
        .n = dyr.rows,
        .k = dyr.n,
        .a = wr.data,
        .lda = wr.row_stride,
        .b = dyr.data,
        .ldb = dyr.row_stride,
        .c = accumulate ? dxr.data : 0,
        .ldc = dxr.row_stride,
        .d = dxr.data,
        .ldd = dxr.row_stride,
        .ab_dtype = dt,
        .cd_dtype = dt,
        .alpha = 1.0f,
        .beta = accumulate ? 1.0f : 0.0f,
        .workspace = ws,
        .workspace_bytes = ws_bytes,
    };
    return run(&c, &g, stream);
}

l3k_status l3k_linear_backward_weight(const DLTensor *dy, const DLTensor *x, DLTensor *dweight,
                                      int accumulate, DLTensor *workspace, void *stream) {
    l3k_call c = {.op = "linear_backward_weight"};
    l3k_dt dt, wdt;
    l3k_rows dyr, xr, dwr;
    L3K_TRY(check_rows_tensor(&c, x, "x", &dt, &xr));
    L3K_TRY(l3k_check_tensor(&c, dy, "dy"));
    L3K_TRY(l3k_check_dtype(&c, dy, "dy", dt, "x"));
    L3K_TRY(l3k_check_rows(&c, dy, "dy", &dyr));
    if (dyr.rows != xr.rows)
        return l3k_fail(&c, L3K_ERROR_SHAPE, "dy has %lld rows, expected %lld like x", (long long)dyr.rows,
                        (long long)xr.rows);
    L3K_TRY(l3k_check_tensor(&c, dweight, "dweight"));
    L3K_TRY(l3k_check_float(&c, dweight, "dweight", &wdt));
    if (wdt != dt && wdt != L3K_DT_F32) {
        char a[32];
        return l3k_fail(&c, L3K_ERROR_DTYPE, "dweight dtype %s, expected float32 or the dtype of x",
                        l3k_dtype_name(dweight->dtype, a));
    }
    if (dweight->ndim != 2 || dweight->shape[0] != dyr.n || dweight->shape[1] != xr.n)
        return l3k_fail(&c, L3K_ERROR_SHAPE, "dweight has ndim %d, expected shape (%lld, %lld)",
                        (int)dweight->ndim, (long long)dyr.n, (long long)xr.n);
    L3K_TRY(l3k_check_rows(&c, dweight, "dweight", &dwr));
    L3K_TRY(l3k_check_no_overlap(&c, dweight, "dweight", dy, "dy", 0));
    L3K_TRY(l3k_check_no_overlap(&c, dweight, "dweight", x, "x", 0));
    void *ws;
    size_t ws_bytes;
    L3K_TRY(workspace_of(&c, workspace, &ws, &ws_bytes));
    const DLTensor *ts[3] = {dy, x, dweight};
    static const char *const names[3] = {"dy", "x", "dweight"};
    L3K_TRY(workspace_apart(&c, workspace, ws_bytes, ts, names, 3));
    l3k_gemm_args g = {
        .trans_a = 0,
        .trans_b = 1,
        .m = xr.n,
        .n = dyr.n,
        .k = xr.rows,
        .a = xr.data,
        .lda = xr.row_stride,
        .b = dyr.data,
        .ldb = dyr.row_stride,
        .c = accumulate ? dwr.data : 0,
        .ldc = dwr.row_stride,
        .d = dwr.data,
        .ldd = dwr.row_stride,
        .ab_dtype = dt,
        .cd_dtype = wdt,
        .alpha = 1.0f,
        .beta = accumulate ? 1.0f : 0.0f,
        .workspace = ws,
        .workspace_bytes = ws_bytes,
    };
    return run(&c, &g, stream); /* no rows: k == 0, dweight = 0 (or unchanged when accumulating) */
}
