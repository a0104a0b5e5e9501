/* RMSNorm and fused residual-add + RMSNorm: validation and dispatch. */
#include "validate.h"

/* x-like tensor: a float tensor of x's dtype and shape, seen as rows. */
static l3k_status check_like_x(l3k_call *c, const DLTensor *t, const char *name,
                               const DLTensor *x, l3k_dt dt, l3k_rows *rows) {
    L3K_TRY(l3k_check_tensor(c, t, name));
    L3K_TRY(l3k_check_dtype(c, t, name, dt, "x"));
    L3K_TRY(l3k_check_same_shape(c, t, name, x, "x"));
    return l3k_check_rows(c, t, name, rows);
}

static l3k_status check_weight(l3k_call *c, const DLTensor *w, const char *name, int64_t n,
                               l3k_dt dt) {
    L3K_TRY(l3k_check_tensor(c, w, name));
    L3K_TRY(l3k_check_dtype(c, w, name, dt, "x"));
    if (w->ndim != 1 || w->shape[0] != n)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim %d and %lld elements, expected shape (%lld,)",
                        name, (int)w->ndim, (long long)l3k_numel(w), (long long)n);
    return l3k_check_contiguous_numel(c, w, name, n);
}

static l3k_status check_rstd(l3k_call *c, const DLTensor *rstd, int64_t rows) {
    char a[32];
    L3K_TRY(l3k_check_tensor(c, rstd, "rstd"));
    if (rstd->dtype.code != kDLFloat || rstd->dtype.bits != 32 || rstd->dtype.lanes != 1)
        return l3k_fail(c, L3K_ERROR_DTYPE, "rstd dtype %s, expected float32",
                        l3k_dtype_name(rstd->dtype, a));
    L3K_TRY(l3k_check_contiguous_numel(c, rstd, "rstd", rows));
    if ((uintptr_t)l3k_data(rstd) % 4 != 0)
        return l3k_fail(c, L3K_ERROR_ALIGNMENT, "rstd data pointer %p is not 4-byte aligned",
                        l3k_data(rstd));
    return L3K_SUCCESS;
}

static l3k_status forward(l3k_call *c, const DLTensor *x, const DLTensor *residual,
                          const DLTensor *weight, float eps, DLTensor *h, DLTensor *y,
                          DLTensor *rstd, void *stream) {
    l3k_dt dt;
    l3k_rows xr, rr = {0}, hr = {0}, yr;
    L3K_TRY(l3k_check_tensor(c, x, "x"));
    L3K_TRY(l3k_check_float(c, x, "x", &dt));
    L3K_TRY(l3k_check_rows(c, x, "x", &xr));
    if (residual) {
        L3K_TRY(check_like_x(c, residual, "residual", x, dt, &rr));
        L3K_TRY(check_like_x(c, h, "h", x, dt, &hr));
    }
    L3K_TRY(check_weight(c, weight, "weight", xr.n, dt));
    L3K_TRY(check_like_x(c, y, "y", x, dt, &yr));
    if (rstd) L3K_TRY(check_rstd(c, rstd, xr.rows));
    L3K_TRY(l3k_check_eps(c, eps));
    if (xr.rows == 0 || xr.n == 0) return L3K_SUCCESS;

    l3k_rmsnorm_fwd_args a = {
        .x = xr.data, .x_stride = xr.row_stride,
        .residual = residual ? rr.data : 0, .residual_stride = rr.row_stride,
        .h_out = residual ? hr.data : 0, .h_stride = hr.row_stride,
        .weight = l3k_data(weight),
        .y = yr.data, .y_stride = yr.row_stride,
        .rstd = rstd ? (float *)l3k_data(rstd) : 0,
        .rows = xr.rows, .n = xr.n, .eps = eps, .dtype = dt,
    };
    if (l3k_on_cuda(c)) return l3k_cuda_launch(c, L3K_CUDA_FN(l3k_cuda_rmsnorm_fwd), &a, stream);
    l3k_cpu_rmsnorm_fwd(&a);
    return L3K_SUCCESS;
}

l3k_status l3k_rmsnorm_forward(const DLTensor *x, const DLTensor *weight, float eps, DLTensor *y,
                               DLTensor *rstd, void *stream) {
    l3k_call c = {.op = "rmsnorm_forward"};
    return forward(&c, x, 0, weight, eps, 0, y, rstd, stream);
}

l3k_status l3k_add_rmsnorm_forward(const DLTensor *x, const DLTensor *residual,
                                   const DLTensor *weight, float eps, DLTensor *h, DLTensor *y,
                                   DLTensor *rstd, void *stream) {
    l3k_call c = {.op = "add_rmsnorm_forward"};
    if (!residual) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "residual is NULL");
    return forward(&c, x, residual, weight, eps, h, y, rstd, stream);
}

static size_t workspace_bytes(int64_t rows, int64_t n) {
    return (size_t)l3k_rmsnorm_bwd_partials(rows, n) * (size_t)n * sizeof(float);
}

l3k_status l3k_rmsnorm_backward_workspace_size(const DLTensor *x, size_t *bytes) {
    l3k_call c = {.op = "rmsnorm_backward_workspace_size"};
    l3k_rows xr;
    if (!bytes) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "bytes is NULL");
    L3K_TRY(l3k_check_tensor(&c, x, "x"));
    L3K_TRY(l3k_check_rows(&c, x, "x", &xr));
    *bytes = workspace_bytes(xr.rows, xr.n);
    return L3K_SUCCESS;
}

l3k_status l3k_rmsnorm_backward(const DLTensor *dy, const DLTensor *dh, const DLTensor *x,
                                const DLTensor *weight, const DLTensor *rstd, float eps,
                                DLTensor *dx, DLTensor *dweight, DLTensor *workspace,
                                void *stream) {
    l3k_call c = {.op = "rmsnorm_backward"};
    l3k_dt dt;
    l3k_rows xr, dyr, dhr = {0}, dxr;
    L3K_TRY(l3k_check_tensor(&c, x, "x"));
    L3K_TRY(l3k_check_float(&c, x, "x", &dt));
    L3K_TRY(l3k_check_rows(&c, x, "x", &xr));
    L3K_TRY(check_like_x(&c, dy, "dy", x, dt, &dyr));
    if (dh) L3K_TRY(check_like_x(&c, dh, "dh", x, dt, &dhr));
    L3K_TRY(check_weight(&c, weight, "weight", xr.n, dt));
    if (rstd) L3K_TRY(check_rstd(&c, rstd, xr.rows));
    L3K_TRY(check_like_x(&c, dx, "dx", x, dt, &dxr));
    if (dweight) L3K_TRY(check_weight(&c, dweight, "dweight", xr.n, dt));
    L3K_TRY(l3k_check_eps(&c, eps));
    size_t need = dweight ? workspace_bytes(xr.rows, xr.n) : 0;
    L3K_TRY(l3k_check_workspace(&c, workspace, need));
    if (xr.n == 0) return L3K_SUCCESS;

    l3k_rmsnorm_bwd_args a = {
        .dy = dyr.data, .dy_stride = dyr.row_stride,
        .dh_in = dh ? dhr.data : 0, .dh_in_stride = dhr.row_stride,
        .x = xr.data, .x_stride = xr.row_stride,
        .weight = l3k_data(weight),
        .rstd = rstd ? (const float *)l3k_data(rstd) : 0,
        .dx = dxr.data, .dx_stride = dxr.row_stride,
        .dweight = dweight ? l3k_data(dweight) : 0,
        .partials = need ? (float *)l3k_data(workspace) : 0,
        .rows = xr.rows, .n = xr.n, .eps = eps, .dtype = dt,
    };
    if (l3k_on_cuda(&c)) return l3k_cuda_launch(&c, L3K_CUDA_FN(l3k_cuda_rmsnorm_bwd), &a, stream);
    l3k_cpu_rmsnorm_bwd(&a);
    return L3K_SUCCESS;
}
