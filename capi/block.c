/* The whole LLaMA-3 block forward in one call, composed from this ABI's own ops.
 *
 * Every intermediate lives in the caller's workspace, viewed through DLTensors
 * built here; each step goes through the public entry point, so it gets the
 * same validation and dispatch as a direct call.  A failing step's message is
 * kept, prefixed with this op's name. */
#include <stdio.h>
#include <string.h>

#include "validate.h"

#define ALIGN_UP(v) (((v) + 255) & ~(size_t)255)

typedef struct {
    int64_t b, s, t, dim, hd, h, hkv, qkv, hidden;
    size_t es;
    size_t off_h1, off_qkv, off_o, off_lse, off_h, off_gu, off_a, off_gemm, total;
} plan;

static l3k_status make_plan(l3k_call *c, const DLTensor *x, const l3k_llama_block_weights *w,
                            const l3k_llama_block_config *cfg, plan *p) {
    if (!w || !cfg) return l3k_fail(c, L3K_ERROR_NULL_POINTER, "%s is NULL", w ? "cfg" : "weights");
    L3K_TRY(l3k_check_tensor(c, x, "x"));
    l3k_dt dt;
    L3K_TRY(l3k_check_float(c, x, "x", &dt));
    if (x->ndim != 3)
        return l3k_fail(c, L3K_ERROR_SHAPE, "x has ndim %d, expected 3 (batch, seq, dim)", (int)x->ndim);
    l3k_rows xr;
    L3K_TRY(l3k_check_rows(c, x, "x", &xr));
    if (xr.rows > 1 && xr.row_stride != xr.n)
        return l3k_fail(c, L3K_ERROR_LAYOUT, "x is not contiguous");
    const DLTensor *ws[6] = {w->qkv_weight, w->o_weight, w->gate_up_weight, w->down_weight,
                             w->norm1_weight, w->norm2_weight};
    static const char *names[6] = {"qkv_weight", "o_weight", "gate_up_weight", "down_weight",
                                   "norm1_weight", "norm2_weight"};
    for (int i = 0; i < 6; ++i) {
        L3K_TRY(l3k_check_tensor(c, ws[i], names[i]));
        if (ws[i]->ndim != (i < 4 ? 2 : 1))
            return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim %d, expected %d", names[i], (int)ws[i]->ndim,
                            i < 4 ? 2 : 1);
    }
    p->b = x->shape[0]; p->s = x->shape[1]; p->dim = x->shape[2]; p->t = p->b * p->s;
    if (cfg->n_heads < 1 || p->dim % cfg->n_heads != 0)
        return l3k_fail(c, L3K_ERROR_VALUE, "n_heads is %lld, expected a divisor of dim %lld",
                        (long long)cfg->n_heads, (long long)p->dim);
    if (cfg->n_kv_heads < 1 || cfg->n_heads % cfg->n_kv_heads != 0)
        return l3k_fail(c, L3K_ERROR_VALUE, "n_kv_heads is %lld, expected a divisor of n_heads %lld",
                        (long long)cfg->n_kv_heads, (long long)cfg->n_heads);
    p->h = cfg->n_heads; p->hkv = cfg->n_kv_heads; p->hd = p->dim / p->h;
    p->qkv = p->dim + 2 * p->hkv * p->hd;
    if (w->qkv_weight->shape[0] != p->qkv)
        return l3k_fail(c, L3K_ERROR_SHAPE, "qkv_weight has %lld rows, expected dim + 2 * n_kv_heads * head_dim = %lld",
                        (long long)w->qkv_weight->shape[0], (long long)p->qkv);
    if (w->gate_up_weight->shape[0] % 2 != 0)
        return l3k_fail(c, L3K_ERROR_SHAPE, "gate_up_weight has %lld rows, expected an even count (gate, then up)",
                        (long long)w->gate_up_weight->shape[0]);
    p->hidden = w->gate_up_weight->shape[0] / 2;
    p->es = l3k_dt_size(dt);
    const size_t td = (size_t)p->t * (size_t)p->dim * p->es;
    size_t off = 0;
    p->off_h1 = off; off += ALIGN_UP(td);
    p->off_qkv = off; off += ALIGN_UP((size_t)p->t * (size_t)p->qkv * p->es);
    p->off_o = off; off += ALIGN_UP(td);
    p->off_lse = off; off += ALIGN_UP((size_t)p->b * (size_t)p->h * (size_t)p->s * 4);
    p->off_h = off; off += ALIGN_UP(td);
    p->off_gu = off; off += ALIGN_UP((size_t)p->t * 2 * (size_t)p->hidden * p->es);
    p->off_a = off; off += ALIGN_UP((size_t)p->t * (size_t)p->hidden * p->es);
    p->off_gemm = off;
    size_t gemm = 0;
    L3K_TRY(l3k_linear_workspace_size(x, &gemm));
    p->total = off + gemm;
    return L3K_SUCCESS;
}

l3k_status l3k_llama_block_forward_workspace_size(const DLTensor *x, const l3k_llama_block_weights *weights,
                                                  const l3k_llama_block_config *cfg, size_t *bytes) {
    l3k_call c = {.op = "llama_block_forward_workspace_size"};
    plan p;
    if (!bytes) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "bytes is NULL");
    L3K_TRY(make_plan(&c, x, weights, cfg, &p));
    *bytes = p.total;
    return L3K_SUCCESS;
}

/* A DLTensor over workspace bytes; shape and strides are stored in the struct that owns it. */
typedef struct {
    DLTensor t;
    int64_t shape[4], strides[4];
} view;

static DLTensor *make_view(view *v, const DLTensor *like, char *base, size_t offset, DLDataType dt, int ndim,
                           const int64_t *shape, const int64_t *strides) {
    memset(v, 0, sizeof *v);
    v->t.data = base;
    v->t.byte_offset = offset;
    v->t.device = like->device;
    v->t.dtype = dt;
    v->t.ndim = ndim;
    for (int i = 0; i < ndim; ++i) {
        v->shape[i] = shape[i];
        v->strides[i] = strides[i];
    }
    v->t.shape = v->shape;
    v->t.strides = v->strides;
    return &v->t;
}

static DLTensor *rows_view(view *v, const DLTensor *like, char *base, size_t offset, int64_t rows, int64_t n) {
    const int64_t shape[2] = {rows, n}, strides[2] = {n, 1};
    return make_view(v, like, base, offset, like->dtype, 2, shape, strides);
}

/* (batch, heads, seq, head_dim) view of `heads` heads starting at head `first` of a
 * (tokens, width) buffer laid out (batch, seq, width). */
static DLTensor *heads_view(view *v, const DLTensor *like, char *base, size_t offset, const plan *p,
                            int64_t width, int64_t first, int64_t heads) {
    const int64_t shape[4] = {p->b, heads, p->s, p->hd};
    const int64_t strides[4] = {p->s * width, p->hd, width, 1};
    return make_view(v, like, base, offset + (size_t)(first * p->hd) * p->es, like->dtype, 4, shape, strides);
}

/* Run one step; on failure keep its message under this op's name. */
static l3k_status step(l3k_call *c, l3k_status st) {
    if (st == L3K_SUCCESS) return st;
    char inner[1024];
    snprintf(inner, sizeof inner, "%s", l3k_last_error());
    return l3k_fail(c, st, "%s", inner);
}

l3k_status l3k_llama_block_forward(const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                                   const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg,
                                   DLTensor *out, DLTensor *workspace, void *stream) {
    l3k_call c = {.op = "llama_block_forward"};
    plan p;
    L3K_TRY(make_plan(&c, x, w, cfg, &p));
    L3K_TRY(l3k_check_tensor(&c, out, "out"));
    L3K_TRY(l3k_check_same_shape(&c, out, "out", x, "x"));
    L3K_TRY(l3k_check_workspace(&c, workspace, p.total));
    if (l3k_data(out) == l3k_data(x))
        return l3k_fail(&c, L3K_ERROR_LAYOUT, "out aliases x, expected a separate buffer");
    if (p.t == 0) return L3K_SUCCESS;

    char *base = (char *)l3k_data(workspace);
    const DLDataType f32 = {kDLFloat, 32, 1};
    view vx, vh1, vqkv, vq, vk, vv, vo, vo4, vlse, vh, vgu, va, vout, vgemm;
    DLTensor *x2 = make_view(&vx, x, (char *)l3k_data(x), 0, x->dtype, 2, (int64_t[]){p.t, p.dim},
                             (int64_t[]){p.dim, 1});
    DLTensor *out2 = make_view(&vout, out, (char *)l3k_data(out), 0, out->dtype, 2, (int64_t[]){p.t, p.dim},
                               (int64_t[]){p.dim, 1});
    DLTensor *h1 = rows_view(&vh1, x, base, p.off_h1, p.t, p.dim);
    DLTensor *qkv = rows_view(&vqkv, x, base, p.off_qkv, p.t, p.qkv);
    DLTensor *q = heads_view(&vq, x, base, p.off_qkv, &p, p.qkv, 0, p.h);
    DLTensor *k = heads_view(&vk, x, base, p.off_qkv, &p, p.qkv, p.h, p.hkv);
    DLTensor *v = heads_view(&vv, x, base, p.off_qkv, &p, p.qkv, p.h + p.hkv, p.hkv);
    DLTensor *o = rows_view(&vo, x, base, p.off_o, p.t, p.dim);
    DLTensor *o4 = heads_view(&vo4, x, base, p.off_o, &p, p.dim, 0, p.h);
    DLTensor *lse = make_view(&vlse, x, base, p.off_lse, f32, 1, (int64_t[]){p.b * p.h * p.s}, (int64_t[]){1});
    DLTensor *h = rows_view(&vh, x, base, p.off_h, p.t, p.dim);
    DLTensor *gu = rows_view(&vgu, x, base, p.off_gu, p.t, 2 * p.hidden);
    DLTensor *a = rows_view(&va, x, base, p.off_a, p.t, p.hidden);
    const int64_t gemm_bytes = (int64_t)(p.total - p.off_gemm);
    DLTensor *gemm = gemm_bytes ? make_view(&vgemm, x, base, p.off_gemm, (DLDataType){kDLUInt, 8, 1}, 1,
                                            (int64_t[]){gemm_bytes}, (int64_t[]){1})
                                : NULL;

    L3K_TRY(step(&c, l3k_rmsnorm_forward(x2, w->norm1_weight, cfg->eps, h1, NULL, stream)));
    L3K_TRY(step(&c, l3k_linear_forward(h1, w->qkv_weight, NULL, qkv, gemm, stream)));
    L3K_TRY(step(&c, l3k_rope_forward(q, k, cos, sin, 0, L3K_ROPE_HALF, q, k, stream)));
    L3K_TRY(step(&c, l3k_attention_forward(q, k, v, 0.0f, cfg->causal, o4, lse, stream)));
    L3K_TRY(step(&c, l3k_linear_forward(o, w->o_weight, x2, h, gemm, stream)));
    L3K_TRY(step(&c, l3k_rmsnorm_forward(h, w->norm2_weight, cfg->eps, h1, NULL, stream)));
    L3K_TRY(step(&c, l3k_linear_forward(h1, w->gate_up_weight, NULL, gu, gemm, stream)));
    L3K_TRY(step(&c, l3k_swiglu_fused_forward(gu, a, stream)));
    return step(&c, l3k_linear_forward(a, w->down_weight, h, out2, gemm, stream));
}
