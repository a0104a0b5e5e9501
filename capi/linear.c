/* The linear layer's GEMMs: validation, and the row-major -> column-major mapping.
 *
 * Row-major X[T,K] is the column-major K x T matrix with leading dim = X's row
 * stride, so:  Y[T,N] = X W^T      is  Y^T = W^T' X^T:  m=N, n=T, k=K, A=W (op T), B=X
 *              dX[T,K] = dY W      is  dX^T = W^T dY^T: m=K, n=T, k=N, A=W (op N), B=dY
 *              dW[N,K] = dY^T X    is  dW^T = X^T dY:   m=K, n=N, k=T, A=X (op N), B=dY (op T) */
#include "linear.h"
#include "validate.h"

/* One of a GEMM's row-view operands: the tensor, its name for messages, its rows. */
typedef struct {
    const DLTensor *t;
    const char *name;
    l3k_rows *r; /* filled in by the checks */
} operand;

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

/* An output: a tensor of `x`'s dtype (`dt`, named `x_name`), its leading shape and last dim `n`, seen
 * as rows. */
static l3k_status check_output(l3k_call *c, const DLTensor *t, const char *name, const DLTensor *x,
                               const char *x_name, l3k_dt dt, int64_t n, l3k_rows *rows) {
    L3K_TRY(l3k_check_tensor(c, t, name));
    L3K_TRY(l3k_check_dtype(c, t, name, dt, x_name));
    int ok = t->ndim == x->ndim && t->shape[t->ndim - 1] == n;
    for (int i = 0; ok && i < x->ndim - 1; ++i) ok = t->shape[i] == x->shape[i];
    if (!ok) {
        return l3k_fail(c, L3K_ERROR_SHAPE,
                        "%s has ndim %d and last dim %lld, expected x's leading dims and last dim %lld", name,
                        (int)t->ndim, (long long)(t->ndim ? t->shape[t->ndim - 1] : 0), (long long)n);
    }
    return l3k_check_rows(c, t, name, rows);
}

/* The input `in` (x; dy for the input gradient) and the weight, whose in_features (out_features
 * when `backward`) must be in's last dim, and the output, with in's leading dims and the weight's
 * other dim.  in's dtype, *dt, is everyone's. */
static l3k_status check_in_weight_out(l3k_call *c, const operand *in, const operand *w, const operand *out,
                                      int backward, l3k_dt *dt) {
    L3K_TRY(check_rows_tensor(c, in->t, in->name, dt, in->r));
    L3K_TRY(check_weight(c, w->t, w->name, *dt, w->r));
    const int64_t features = backward ? w->r->rows : w->r->n;
    if (features != in->r->n)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s has %s %lld, expected %lld like %s's last dim", w->name,
                        backward ? "out_features" : "in_features", (long long)features, (long long)in->r->n,
                        in->name);
    return check_output(c, out->t, out->name, in->t, in->name, *dt, backward ? w->r->n : w->r->rows, out->r);
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

/* D = op(A) op(B) (+ C when `cin` is given) in the column-major terms above.  D, d.rows rows of
 * d.n, is the column-major d.n x d.rows matrix: m = d.n, n = d.rows; op(B) is k x n, so k is B's
 * row count when B is transposed, else its row length.  D shares no byte with A or B and is C's
 * very view or apart from it (C may be D itself: accumulate); the workspace is apart from all. */
static l3k_status gemm(l3k_call *c, const operand *a, int trans_a, const operand *b, int trans_b,
                       const operand *cin, const operand *d, l3k_dt ab_dtype, l3k_dt cd_dtype,
                       const DLTensor *workspace, void *stream) {
    const operand *ops[4] = {b, a, cin != d ? cin : 0, d};
    for (int i = 0; i < 3; ++i)
        if (ops[i]) L3K_TRY(l3k_check_no_overlap(c, d->t, d->name, ops[i]->t, ops[i]->name, ops[i] == cin));
    void *ws;
    size_t ws_bytes;
    L3K_TRY(workspace_of(c, workspace, &ws, &ws_bytes));
    for (int i = 0; ws_bytes && i < 4; ++i) /* cuBLASLt writes the workspace while it reads the operands */
        if (ops[i]) L3K_TRY(l3k_check_no_overlap(c, workspace, "workspace", ops[i]->t, ops[i]->name, 0));
    const l3k_gemm_args g = {
        .trans_a = trans_a,
        .trans_b = trans_b,
        .m = d->r->n,
        .n = d->r->rows,
        .k = trans_b ? b->r->rows : b->r->n,
        .a = a->r->data,
        .lda = a->r->row_stride,
        .b = b->r->data,
        .ldb = b->r->row_stride,
        .c = cin ? cin->r->data : 0,
        .ldc = cin ? cin->r->row_stride : 0,
        .d = d->r->data,
        .ldd = d->r->row_stride,
        .ab_dtype = ab_dtype,
        .cd_dtype = cd_dtype,
        .alpha = 1.0f,
        .beta = cin ? 1.0f : 0.0f,
        .workspace = ws,
        .workspace_bytes = ws_bytes,
    };
    if (g.m == 0 || g.n == 0) return L3K_SUCCESS;
    return L3K_RUN_KERNEL(c, gemm, &g, stream);
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
    const operand in = {x, "x", &xr}, w = {weight, "weight", &wr}, out = {y, "y", &yr};
    L3K_TRY(check_in_weight_out(&c, &in, &w, &out, 0, &dt));
    if (residual) {
        L3K_TRY(l3k_check_tensor(&c, residual, "residual"));
        L3K_TRY(l3k_check_dtype(&c, residual, "residual", dt, "x"));
        L3K_TRY(l3k_check_same_shape(&c, residual, "residual", y, "y"));
        L3K_TRY(l3k_check_rows(&c, residual, "residual", &rr));
        if (rr.data == yr.data && rr.row_stride != yr.row_stride)
            return l3k_fail(&c, L3K_ERROR_LAYOUT, "residual aliases y with another row stride");
    }
    const operand r = {residual, "residual", &rr};
    return gemm(&c, &w, 1, &in, 0, residual ? &r : 0, &out, dt, dt, workspace, stream);
}

l3k_status l3k_linear_backward_input(const DLTensor *dy, const DLTensor *weight, DLTensor *dx, int accumulate,
                                     DLTensor *workspace, void *stream) {
    l3k_call c = {.op = "linear_backward_input"};
    l3k_dt dt;
    l3k_rows dyr, wr, dxr;
    const operand in = {dy, "dy", &dyr}, w = {weight, "weight", &wr}, out = {dx, "dx", &dxr};
    L3K_TRY(check_in_weight_out(&c, &in, &w, &out, 1, &dt));
    return gemm(&c, &w, 0, &in, 0, accumulate ? &out : 0, &out, dt, dt, workspace, stream);
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
    const operand a = {x, "x", &xr}, b = {dy, "dy", &dyr}, d = {dweight, "dweight", &dwr};
    /* no rows: k == 0, dweight = 0 (or unchanged when accumulating) */
    return gemm(&c, &a, 0, &b, 1, accumulate ? &d : 0, &d, dt, wdt, workspace, stream);
}
