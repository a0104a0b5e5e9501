/* RMSNorm and fused residual-add + RMSNorm: validation and dispatch. */
#include "validate.h"

/* x-like tensor: a float tensor of x's dtype and shape, seen as rows. */
static l3k_status check_like_x(l3k_call *c, const DLTensor *t, const char *name, const DLTensor *x, l3k_dt dt,
                               l3k_rows *rows) {
    L3K_TRY(l3k_check_tensor(c, t, name));
    L3K_TRY(l3k_check_dtype(c, t, name, dt, "x"));
    L3K_TRY(l3k_check_same_shape(c, t, name, x, "x"));
    return l3k_check_rows(c, t, name, rows);
}

static l3k_status check_weight(l3k_call *c, const DLTensor *w, const char *name, int64_t n, l3k_dt dt) {
    L3K_TRY(l3k_check_tensor(c, w, name));
    L3K_TRY(l3k_check_dtype(c, w, name, dt, "x"));
    if (w->ndim != 1 || w->shape[0] != n)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim %d and %lld elements, expected shape (%lld,)", name,
                        (int)w->ndim, (long long)l3k_numel(w), (long long)n);
    return l3k_check_contiguous_numel(c, w, name, n);
}

static l3k_status check_rstd(l3k_call *c, const DLTensor *rstd, int64_t rows) {
    return l3k_check_f32_vector(c, rstd, "rstd", rows);
}

static l3k_status forward(l3k_call *c, const DLTensor *x, const DLTensor *residual, const DLTensor *weight,
                          float eps, DLTensor *h, DLTensor *y, DLTensor *rstd, void *stream) {
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
    /* In place is the same view; a partial overlap would feed rows already
     * written back into later ones.  weight and rstd are apart from the rows. */
    const size_t es = l3k_dt_size(dt);
    L3K_TRY(l3k_check_rows_no_overlap(c, &yr, "y", &xr, "x", es, 1));
    if (residual) {
        L3K_TRY(l3k_check_rows_no_overlap(c, &yr, "y", &rr, "residual", es, 1));
        L3K_TRY(l3k_check_rows_no_overlap(c, &hr, "h", &xr, "x", es, 1));
        L3K_TRY(l3k_check_rows_no_overlap(c, &hr, "h", &rr, "residual", es, 1));
        L3K_TRY(l3k_check_rows_no_overlap(c, &yr, "y", &hr, "h", es, 0));
        L3K_TRY(l3k_check_no_overlap(c, h, "h", weight, "weight", 0));
        if (rstd) L3K_TRY(l3k_check_no_overlap(c, rstd, "rstd", h, "h", 0));
    }
    L3K_TRY(l3k_check_no_overlap(c, y, "y", weight, "weight", 0));
    if (rstd) {
        L3K_TRY(l3k_check_no_overlap(c, rstd, "rstd", x, "x", 0));
        L3K_TRY(l3k_check_no_overlap(c, rstd, "rstd", y, "y", 0));
        L3K_TRY(l3k_check_no_overlap(c, rstd, "rstd", weight, "weight", 0));
        if (residual) L3K_TRY(l3k_check_no_overlap(c, rstd, "rstd", residual, "residual", 0));
    }
    if (xr.rows == 0 || xr.n == 0) return L3K_SUCCESS;

    l3k_rmsnorm_fwd_args a = {
        .x = xr.data,
        .x_stride = xr.row_stride,
        .residual = residual ? rr.data : 0,
        .residual_stride = rr.row_stride,
        .h_out = residual ? hr.data : 0,
        .h_stride = hr.row_stride,
        .weight = l3k_data(weight),
        .y = yr.data,
        .y_stride = yr.row_stride,
        .rstd = rstd ? (float *)l3k_data(rstd) : 0,
        .rows = xr.rows,
        .n = xr.n,
        .eps = eps,
        .dtype = dt,
    };
    return L3K_RUN_KERNEL(c, rmsnorm_fwd, &a, stream);
}

l3k_status l3k_rmsnorm_forward(const DLTensor *x, const DLTensor *weight, float eps, DLTensor *y,
                               DLTensor *rstd, void *stream) {
    l3k_call c = {.op = "rmsnorm_forward"};
    return forward(&c, x, 0, weight, eps, 0, y, rstd, stream);
}

l3k_status l3k_add_rmsnorm_forward(const DLTensor *x, const DLTensor *residual, const DLTensor *weight,
                                   float eps, DLTensor *h, DLTensor *y, DLTensor *rstd, void *stream) {
    l3k_call c = {.op = "add_rmsnorm_forward"};
    if (!residual) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "residual is NULL");
    return forward(&c, x, residual, weight, eps, h, y, rstd, stream);
}

static l3k_status workspace_bytes(l3k_call *c, int64_t rows, int64_t n, size_t *bytes) {
    int64_t floats, b;
    /* No partial rows without elements; an empty x may have any n, past what the
     * launch geometry's arithmetic takes. */
    if (rows == 0 || n == 0) {
        *bytes = 0;
        return L3K_SUCCESS;
    }
    L3K_TRY(l3k_size_mul(c, "workspace floats (partial rows * n)", l3k_rmsnorm_bwd_partials(rows, n), n,
                         &floats));
    L3K_TRY(l3k_size_mul(c, "workspace bytes (floats * 4)", floats, (int64_t)sizeof(float), &b));
    *bytes = (size_t)b;
    return L3K_SUCCESS;
}

l3k_status l3k_rmsnorm_backward_workspace_size(const DLTensor *x, size_t *bytes) {
    l3k_call c = {.op = "rmsnorm_backward_workspace_size"};
    l3k_rows xr;
    if (!bytes) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "bytes is NULL");
    l3k_dt dt;
    L3K_TRY(l3k_check_tensor(&c, x, "x"));
    L3K_TRY(l3k_check_float(&c, x, "x", &dt));
    L3K_TRY(l3k_check_rows(&c, x, "x", &xr));
    return workspace_bytes(&c, xr.rows, xr.n, bytes);
}

l3k_status l3k_rmsnorm_backward(const DLTensor *dy, const DLTensor *dh, const DLTensor *x,
                                const DLTensor *weight, const DLTensor *rstd, float eps, DLTensor *dx,
                                DLTensor *dweight, DLTensor *workspace, void *stream) {
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
    size_t need = 0;
    if (dweight) L3K_TRY(workspace_bytes(&c, xr.rows, xr.n, &need));
    L3K_TRY(l3k_check_workspace(&c, workspace, need));
    /* dx: in place over dy, dh (or x) is the same view; any other overlap is
     * refused.  dweight and the partial sums are written while the rows are
     * read: apart from everything. */
    const size_t es = l3k_dt_size(dt);
    L3K_TRY(l3k_check_rows_no_overlap(&c, &dxr, "dx", &dyr, "dy", es, 1));
    if (dh) L3K_TRY(l3k_check_rows_no_overlap(&c, &dxr, "dx", &dhr, "dh", es, 1));
    L3K_TRY(l3k_check_rows_no_overlap(&c, &dxr, "dx", &xr, "x", es, 1));
    L3K_TRY(l3k_check_no_overlap(&c, dx, "dx", weight, "weight", 0));
    if (rstd) L3K_TRY(l3k_check_no_overlap(&c, dx, "dx", rstd, "rstd", 0));
    const DLTensor *all[6] = {dy, dh, x, weight, rstd, dx};
    static const char *all_names[6] = {"dy", "dh", "x", "weight", "rstd", "dx"};
    for (int i = 0; i < 6; ++i) {
        if (!all[i]) continue;
        if (dweight) L3K_TRY(l3k_check_no_overlap(&c, dweight, "dweight", all[i], all_names[i], 0));
        if (need) L3K_TRY(l3k_check_no_overlap(&c, workspace, "workspace", all[i], all_names[i], 0));
    }
    if (dweight && need) L3K_TRY(l3k_check_no_overlap(&c, workspace, "workspace", dweight, "dweight", 0));
    if (xr.n == 0) return L3K_SUCCESS;

    l3k_rmsnorm_bwd_args a = {
        .dy = dyr.data,
        .dy_stride = dyr.row_stride,
        .dh_in = dh ? dhr.data : 0,
        .dh_in_stride = dhr.row_stride,
        .x = xr.data,
        .x_stride = xr.row_stride,
        .weight = l3k_data(weight),
        .rstd = rstd ? (const float *)l3k_data(rstd) : 0,
        .dx = dxr.data,
        .dx_stride = dxr.row_stride,
        .dweight = dweight ? l3k_data(dweight) : 0,
        .partials = need ? (float *)l3k_data(workspace) : 0,
        .rows = xr.rows,
        .n = xr.n,
        .eps = eps,
        .dtype = dt,
    };
    return L3K_RUN_KERNEL(&c, rmsnorm_bwd, &a, stream);
}
