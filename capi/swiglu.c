/* SwiGLU activation a = silu(g) * u, separate and fused gate_up layouts:
 * validation and dispatch. */
#include "validate.h"

typedef struct {
    const char *name;
    const l3k_rows *rows;
} named_rows;

/* Each output is the same view as an input or apart from it; outputs apart from each other. */
static l3k_status check_overlaps(l3k_call *c, const named_rows *outs, int nout, const named_rows *ins,
                                 int nin, size_t es) {
    for (int o = 0; o < nout; ++o) {
        if (!outs[o].rows) continue;
        for (int i = 0; i < nin; ++i)
            L3K_TRY(
                l3k_check_rows_no_overlap(c, outs[o].rows, outs[o].name, ins[i].rows, ins[i].name, es, 1));
        for (int p = 0; p < o; ++p)
            if (outs[p].rows)
                L3K_TRY(l3k_check_rows_no_overlap(c, outs[o].rows, outs[o].name, outs[p].rows, outs[p].name,
                                                  es, 0));
    }
    return L3K_SUCCESS;
}

/* A float tensor of dtype `dt` and the shape of `ref`, seen as rows. */
static l3k_status check_like(l3k_call *c, const DLTensor *t, const char *name, const DLTensor *ref,
                             const char *ref_name, l3k_dt dt, l3k_rows *rows) {
    L3K_TRY(l3k_check_tensor(c, t, name));
    L3K_TRY(l3k_check_dtype(c, t, name, dt, ref_name));
    L3K_TRY(l3k_check_same_shape(c, t, name, ref, ref_name));
    return l3k_check_rows(c, t, name, rows);
}

/* A (..., hidden) tensor next to the fused gu (..., 2 * hidden). */
static l3k_status check_half_of(l3k_call *c, const DLTensor *t, const char *name, const DLTensor *gu,
                                l3k_dt dt, l3k_rows *rows) {
    L3K_TRY(l3k_check_tensor(c, t, name));
    L3K_TRY(l3k_check_dtype(c, t, name, dt, "gu"));
    int same = t->ndim == gu->ndim;
    for (int i = 0; same && i < t->ndim; ++i)
        same = t->shape[i] == (i == t->ndim - 1 ? gu->shape[i] / 2 : gu->shape[i]);
    if (!same)
        return l3k_fail(c, L3K_ERROR_SHAPE,
                        "%s shape does not match gu: expected gu's shape with the last dim halved "
                        "(%s has ndim %d, last dim %lld; gu has ndim %d, last dim %lld)",
                        name, name, (int)t->ndim, t->ndim ? (long long)t->shape[t->ndim - 1] : 0LL,
                        (int)gu->ndim, (long long)gu->shape[gu->ndim - 1]);
    return l3k_check_rows(c, t, name, rows);
}

/* gu (..., 2 * hidden) seen as rows, split into its g and u halves. */
static l3k_status check_fused(l3k_call *c, const DLTensor *gu, const char *name, l3k_dt *dt, int have_dt,
                              l3k_rows *whole, l3k_rows *g, l3k_rows *u) {
    L3K_TRY(l3k_check_tensor(c, gu, name));
    if (have_dt) L3K_TRY(l3k_check_dtype(c, gu, name, *dt, "gu"));
    else L3K_TRY(l3k_check_float(c, gu, name, dt));
    L3K_TRY(l3k_check_rows(c, gu, name, whole));
    if (whole->n % 2 != 0)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s.shape[-1] is %lld, expected an even size (2 * hidden)", name,
                        (long long)whole->n);
    *g = *whole;
    g->n = whole->n / 2;
    *u = *g;
    /* An empty gu addresses nothing, and its data may be NULL or its row length
     * past what a byte offset holds: u starts where gu does then. */
    if (whole->rows > 0 && g->n > 0) u->data = l3k_ptr_add(whole->data, g->n * (int64_t)l3k_dt_size(*dt));
    return L3K_SUCCESS;
}

/* A row view as the kernels' argument blocks take it: field f its data, f_stride its row stride. */
#define ROWS_ARG(f, r) .f = (r)->data, .f##_stride = (r)->row_stride

static l3k_status launch_fwd(l3k_call *c, const l3k_rows *g, const l3k_rows *u, const l3k_rows *a, l3k_dt dt,
                             void *stream) {
    if (g->rows == 0 || g->n == 0) return L3K_SUCCESS;
    const l3k_swiglu_fwd_args args = {
        ROWS_ARG(g, g), ROWS_ARG(u, u), ROWS_ARG(a, a), .rows = g->rows, .n = g->n, .dtype = dt,
    };
    return L3K_RUN_KERNEL(c, swiglu_fwd, &args, stream);
}

/* The backward; a (the forward's output, recomputed) is optional. */
static l3k_status launch_bwd(l3k_call *c, const l3k_rows *da, const l3k_rows *g, const l3k_rows *u,
                             const l3k_rows *dg, const l3k_rows *du, const l3k_rows *a, l3k_dt dt,
                             void *stream) {
    if (g->rows == 0 || g->n == 0) return L3K_SUCCESS;
    const l3k_swiglu_bwd_args args = {
        ROWS_ARG(da, da),
        ROWS_ARG(g, g),
        ROWS_ARG(u, u),
        ROWS_ARG(dg, dg),
        ROWS_ARG(du, du),
        .a_out = a ? a->data : 0,
        .a_out_stride = a ? a->row_stride : 0,
        .rows = g->rows,
        .n = g->n,
        .dtype = dt,
    };
    return L3K_RUN_KERNEL(c, swiglu_bwd, &args, stream);
}

l3k_status l3k_swiglu_forward(const DLTensor *g, const DLTensor *u, DLTensor *a, void *stream) {
    l3k_call c = {.op = "swiglu_forward"};
    l3k_dt dt;
    l3k_rows gr, ur, ar;
    L3K_TRY(l3k_check_tensor(&c, g, "g"));
    L3K_TRY(l3k_check_float(&c, g, "g", &dt));
    L3K_TRY(l3k_check_rows(&c, g, "g", &gr));
    L3K_TRY(check_like(&c, u, "u", g, "g", dt, &ur));
    L3K_TRY(check_like(&c, a, "a", g, "g", dt, &ar));
    const named_rows outs[] = {{"a", &ar}}, ins[] = {{"g", &gr}, {"u", &ur}};
    L3K_TRY(check_overlaps(&c, outs, 1, ins, 2, l3k_dt_size(dt)));
    return launch_fwd(&c, &gr, &ur, &ar, dt, stream);
}

l3k_status l3k_swiglu_fused_forward(const DLTensor *gu, DLTensor *a, void *stream) {
    l3k_call c = {.op = "swiglu_fused_forward"};
    l3k_dt dt;
    l3k_rows whole, gr, ur, ar;
    L3K_TRY(check_fused(&c, gu, "gu", &dt, 0, &whole, &gr, &ur));
    L3K_TRY(check_half_of(&c, a, "a", gu, dt, &ar));
    const named_rows outs[] = {{"a", &ar}}, ins[] = {{"gu[..., :hidden]", &gr}, {"gu[..., hidden:]", &ur}};
    L3K_TRY(check_overlaps(&c, outs, 1, ins, 2, l3k_dt_size(dt)));
    return launch_fwd(&c, &gr, &ur, &ar, dt, stream);
}

l3k_status l3k_swiglu_backward(const DLTensor *da, const DLTensor *g, const DLTensor *u, DLTensor *dg,
                               DLTensor *du, DLTensor *a, void *stream) {
    l3k_call c = {.op = "swiglu_backward"};
    l3k_dt dt;
    l3k_rows dar, gr, ur, dgr, dur, ar;
    L3K_TRY(l3k_check_tensor(&c, g, "g"));
    L3K_TRY(l3k_check_float(&c, g, "g", &dt));
    L3K_TRY(l3k_check_rows(&c, g, "g", &gr));
    L3K_TRY(check_like(&c, u, "u", g, "g", dt, &ur));
    L3K_TRY(check_like(&c, da, "da", g, "g", dt, &dar));
    L3K_TRY(check_like(&c, dg, "dg", g, "g", dt, &dgr));
    L3K_TRY(check_like(&c, du, "du", g, "g", dt, &dur));
    if (a) L3K_TRY(check_like(&c, a, "a", g, "g", dt, &ar));
    const named_rows outs[] = {{"dg", &dgr}, {"du", &dur}, {"a", a ? &ar : 0}};
    const named_rows ins[] = {{"da", &dar}, {"g", &gr}, {"u", &ur}};
    L3K_TRY(check_overlaps(&c, outs, 3, ins, 3, l3k_dt_size(dt)));
    return launch_bwd(&c, &dar, &gr, &ur, &dgr, &dur, a ? &ar : 0, dt, stream);
}

l3k_status l3k_swiglu_fused_backward(const DLTensor *da, const DLTensor *gu, DLTensor *dgu, DLTensor *a,
                                     void *stream) {
    l3k_call c = {.op = "swiglu_fused_backward"};
    l3k_dt dt;
    l3k_rows gu_r, gr, ur, dgu_r, dgr, dur, dar, ar;
    L3K_TRY(check_fused(&c, gu, "gu", &dt, 0, &gu_r, &gr, &ur));
    L3K_TRY(check_half_of(&c, da, "da", gu, dt, &dar));
    L3K_TRY(check_fused(&c, dgu, "dgu", &dt, 1, &dgu_r, &dgr, &dur));
    L3K_TRY(l3k_check_same_shape(&c, dgu, "dgu", gu, "gu"));
    if (a) L3K_TRY(check_half_of(&c, a, "a", gu, dt, &ar));
    /* dgu as a whole: the same view as gu (in place) or apart from gu and da. */
    const named_rows outs[] = {{"dgu", &dgu_r}}, ins[] = {{"gu", &gu_r}, {"da", &dar}};
    L3K_TRY(check_overlaps(&c, outs, 1, ins, 2, l3k_dt_size(dt)));
    if (a) {
        /* a: the same view as da or one half of gu, or apart from them; apart from dgu. */
        const named_rows ains[] = {{"da", &dar}, {"gu[..., :hidden]", &gr}, {"gu[..., hidden:]", &ur}};
        for (int i = 0; i < 3; ++i)
            L3K_TRY(l3k_check_rows_no_overlap(&c, &ar, "a", ains[i].rows, ains[i].name, l3k_dt_size(dt), 1));
        L3K_TRY(l3k_check_rows_no_overlap(&c, &ar, "a", &dgu_r, "dgu", l3k_dt_size(dt), 0));
    }
    return launch_bwd(&c, &dar, &gr, &ur, &dgr, &dur, a ? &ar : 0, dt, stream);
}
