/* The whole LLaMA-3 block, composed once from this ABI's own ops: the inference
 * forward, the training forward and the backward (see l3k.h).
 *
 * Every intermediate lives in caller memory viewed through DLTensors built here;
 * each step goes through the public entry point, so it gets the same validation
 * and dispatch as a direct call, and a failing step's message is kept under the
 * block op's name.
 *
 * Memory plan of the backward (tokens T, the step's largest buffers first):
 *  - dgu, the gate/up gradient, is written over the saved gate/up activation
 *    (or into the workspace when the activations must be preserved);
 *  - da (T x hidden) lives in the gate/up weight gradient's buffer, which is
 *    written only after da is dead, when it is large enough (T <= 2 * dim);
 *  - the gradient of h lives in dx from the moment it exists: dx is written last,
 *    by the first RMSNorm's backward, which adds into it in place;
 *  - the second norm's output is recomputed into dx just before it is needed;
 *  - the attention part's scratch (attention output, dO, dQKV, the attention
 *    backward's workspace) goes where dgu was, once dgu is dead, when it fits.
 * So the workspace holds little more than the cuBLASLt workspace at the step's
 * memory peak (the gate/up weight gradient). */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "graph_cache.h"
#include "validate.h"

/* l3k_llama_block_config as first published ends before key_range: shorter ones are refused,
 * and one that stops there has no key range. */
#define CONFIG_FIRST_SIZE offsetof(l3k_llama_block_config, key_range)

#define ALIGN 256
#define ALIGN_UP(v) (((v) + (size_t)(ALIGN - 1)) & ~(size_t)(ALIGN - 1))

/* A DLTensor over caller memory; shape and strides live in the struct that owns it. */
typedef struct {
    DLTensor t;
    int64_t shape[4], strides[4];
} view;

/* A projection whose output columns come in parts, [q | k | v] or [gate | up]: its weight
 * (or gradient) is one (rows, dim) tensor, one GEMM, or one tensor per part, a GEMM each into
 * or from their columns.  Gradient parts that are consecutive rows of one buffer are seen as
 * that buffer (one GEMM, and the gate/up gradient's memory can hold scratch); weight parts
 * never are, so the forward and dx do not depend on where the weights happen to lie.  Not to
 * be copied: w[] may point into `joined`. */
typedef struct {
    int n;                    /* GEMMs */
    const DLTensor *w[3];     /* the tensor of each GEMM */
    int64_t col[3], width[3]; /* its output columns */
    view joined;
} proj;

/* Sizes of one call. */
typedef struct {
    int64_t b, s, t, dim, hd, h, hkv, qkv, hidden;
    proj wqkv, wgu; /* the weights of the two projections with parts */
    l3k_dt dt;
    size_t es;
    size_t gemm_ws;            /* cuBLASLt workspace bytes */
    size_t norm_ws;            /* RMSNorm backward's dweight partials */
    size_t attn_ws;            /* attention backward's workspace */
    const DLTensor *key_range; /* cfg->key_range where cfg's struct_size covers it, else NULL */
} dims;

/* A contiguous region: `bytes` at `off` from a base pointer. */
typedef struct {
    size_t off, bytes;
} region;

static region take(size_t *cursor, size_t bytes) {
    region r = {*cursor, bytes};
    *cursor += ALIGN_UP(bytes);
    return r;
}

/* ---- validation ---------------------------------------------------------- */

static l3k_status check_struct_size(l3k_call *c, const void *s, size_t have, size_t first, const char *name,
                                    const char *init) {
    if (!s) return l3k_fail(c, L3K_ERROR_NULL_POINTER, "%s is NULL", name);
    if (have < first)
        return l3k_fail(c, L3K_ERROR_VALUE,
                        "%s->struct_size is %zu, expected at least %zu (initialize it with %s)", name, have,
                        first, init);
    return L3K_SUCCESS;
}

/* ---- views ---------------------------------------------------------------- */

static DLTensor *make_view(view *v, DLDevice dev, void *base, size_t offset, DLDataType dt, int ndim,
                           const int64_t *shape, const int64_t *strides) {
    memset(v, 0, sizeof *v);
    v->t.data = base;
    v->t.byte_offset = offset;
    v->t.device = dev;
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

/* (rows, n) row-major at base + offset, of like's dtype. */
static DLTensor *rows_view(view *v, const DLTensor *like, void *base, size_t offset, int64_t rows,
                           int64_t n) {
    const int64_t shape[2] = {rows, n}, strides[2] = {n, 1};
    return make_view(v, like->device, base, offset, like->dtype, 2, shape, strides);
}

/* (batch, heads, seq, head_dim) view of `heads` heads starting at head `first` of a
 * (tokens, width) buffer laid out (batch, seq, width). */
static DLTensor *heads_view(view *v, const DLTensor *like, void *base, size_t offset, const dims *d,
                            int64_t width, int64_t first, int64_t heads) {
    const int64_t shape[4] = {d->b, heads, d->s, d->hd};
    /* seq * width fits when batch > 0 (check_plan_fits bounds tokens * qkv); with no batch, seq
     * may be any size (the views are empty) and the batch stride is unused. */
    const int64_t strides[4] = {d->b ? d->s * width : 0, d->hd, width, 1};
    return make_view(v, like->device, base, offset + (size_t)(first * d->hd) * d->es, like->dtype, 4, shape,
                     strides);
}

/* (n,) float32 at base + offset. */
static DLTensor *f32_view(view *v, const DLTensor *like, void *base, size_t offset, int64_t n) {
    const int64_t shape[1] = {n}, strides[1] = {1};
    return make_view(v, like->device, base, offset, (DLDataType){kDLFloat, 32, 1}, 1, shape, strides);
}

static DLTensor *bytes_view(view *v, const DLTensor *like, void *base, region r) {
    const int64_t shape[1] = {(int64_t)r.bytes}, strides[1] = {1};
    return make_view(v, like->device, base, r.off, (DLDataType){kDLUInt, 8, 1}, 1, shape, strides);
}

static int is_compact(const DLTensor *t) {
    if (!t->strides) return 1;
    int64_t want = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
        if (t->shape[i] != 1 && t->strides[i] != want) return 0;
        want *= t->shape[i];
    }
    return 1;
}

/* Set up `p` from `fused` (rows = the sum of widths) or from all of `parts`, each checked to
 * be a (width, cols) matrix of dtype dt; `contiguous`: each tensor must be compact (the
 * gradients', which are written whole). */
static l3k_status make_proj(l3k_call *c, proj *p, const DLTensor *fused, const char *fused_name,
                            const DLTensor *const *parts, const char *const *part_names, int n_parts,
                            const int64_t *widths, int64_t cols, l3k_dt dt, int contiguous) {
    int given = 0;
    int64_t total = 0;
    char what[96];
    snprintf(what, sizeof what, "%s rows (its parts' rows summed)", fused_name);
    for (int i = 0; i < n_parts; ++i) {
        given += parts[i] != NULL;
        /* hidden is a gate weight's own row count, not yet checked: the sum can pass 2^63 - 1. */
        L3K_TRY(l3k_size_add(c, what, total, widths[i], &total));
    }
    memset(p, 0, sizeof *p);
    if (fused && given)
        return l3k_fail(c, L3K_ERROR_VALUE, "%s and %s are both given, expected one form of the weight",
                        fused_name, part_names[0]);
    const DLTensor *const *ts = fused ? &fused : parts;
    const char *const *names = fused ? &fused_name : part_names;
    const int n = fused ? 1 : n_parts;
    if (!fused && given != n_parts) {
        for (int i = 0; i < n_parts; ++i)
            if (!parts[i])
                return l3k_fail(c, L3K_ERROR_NULL_POINTER,
                                "%s is NULL and so is %s, expected one of the two forms", fused_name,
                                part_names[i]);
    }
    int64_t col = 0;
    for (int i = 0; i < n; ++i) {
        const int64_t rows = fused ? total : widths[i];
        L3K_TRY(l3k_check_tensor(c, ts[i], names[i]));
        L3K_TRY(l3k_check_dtype(c, ts[i], names[i], dt, "x"));
        if (ts[i]->ndim != 2 || ts[i]->shape[0] != rows || ts[i]->shape[1] != cols)
            return l3k_fail(c, L3K_ERROR_SHAPE,
                            "%s has ndim %d and shape[0] %lld, expected shape (%lld, %lld)", names[i],
                            (int)ts[i]->ndim, (long long)(ts[i]->ndim ? ts[i]->shape[0] : 0), (long long)rows,
                            (long long)cols);
        if (contiguous) L3K_TRY(l3k_check_contiguous_numel(c, ts[i], names[i], rows * cols));
        p->w[i] = ts[i];
        p->col[i] = col;
        p->width[i] = rows;
        col += rows;
    }
    p->n = n;
    /* Gradient parts that follow each other in one buffer: one GEMM over the whole.  Weights
     * are not joined: adjacent split weights would round dx differently from the same weights
     * apart (one GEMM's float32 sum against bf16/fp16 partial sums). */
    int adjacent = n > 1 && contiguous;
    const size_t es = l3k_dt_size(dt);
    for (int i = 0; adjacent && i < n; ++i) {
        adjacent = is_compact(ts[i]) && ts[i]->device.device_type == ts[0]->device.device_type &&
                   ts[i]->device.device_id == ts[0]->device.device_id &&
                   l3k_data(ts[i]) ==
                       l3k_ptr_add(l3k_data(ts[0]), (int64_t)((size_t)(p->col[i] * cols) * es));
    }
    if (adjacent) {
        const int64_t shape[2] = {total, cols}, strides[2] = {cols, 1};
        p->w[0] = make_view(&p->joined, ts[0]->device, l3k_data(ts[0]), 0, ts[0]->dtype, 2, shape, strides);
        p->n = 1;
        p->width[0] = total;
    }
    return L3K_SUCCESS;
}

/* Every buffer the block plans is at most tokens * (qkv + 4 dim + 4 hidden + 2 heads) elements
 * of 8 bytes; bound that once, so no size the plans add up can overflow. */
static l3k_status check_plan_fits(l3k_call *c, const dims *d) {
    int64_t per_token = d->qkv, n;
    L3K_TRY(l3k_size_mul(c, "block buffers: 4 * dim", 4, d->dim, &n));
    L3K_TRY(l3k_size_add(c, "block buffers: elements per token", per_token, n, &per_token));
    L3K_TRY(l3k_size_mul(c, "block buffers: 4 * hidden", 4, d->hidden, &n));
    L3K_TRY(l3k_size_add(c, "block buffers: elements per token", per_token, n, &per_token));
    L3K_TRY(l3k_size_add(c, "block buffers: elements per token", per_token, 2 * d->h, &per_token));
    L3K_TRY(l3k_size_mul(c, "block buffers: tokens * elements per token", d->t, per_token, &n));
    return l3k_size_mul(c, "block buffers: bytes", n, 8, &n);
}

static l3k_status make_dims(l3k_call *c, const DLTensor *x, const l3k_llama_block_weights *w,
                            const l3k_llama_block_config *cfg, dims *d) {
    L3K_TRY(check_struct_size(c, w, w ? w->struct_size : 0, sizeof(l3k_llama_block_weights), "weights",
                              "L3K_LLAMA_BLOCK_WEIGHTS_INIT"));
    L3K_TRY(check_struct_size(c, cfg, cfg ? cfg->struct_size : 0, CONFIG_FIRST_SIZE, "cfg",
                              "L3K_LLAMA_BLOCK_CONFIG_INIT"));
    d->key_range = cfg->struct_size >= CONFIG_FIRST_SIZE + sizeof cfg->key_range ? cfg->key_range : NULL;
    L3K_TRY(l3k_check_tensor(c, x, "x"));
    L3K_TRY(l3k_check_float(c, x, "x", &d->dt));
    if (x->ndim != 3)
        return l3k_fail(c, L3K_ERROR_SHAPE, "x has ndim %d, expected 3 (batch, seq, dim)", (int)x->ndim);
    L3K_TRY(l3k_check_contiguous_numel(c, x, "x", l3k_numel(x)));
    d->b = x->shape[0];
    d->s = x->shape[1];
    d->dim = x->shape[2];
    L3K_TRY(l3k_size_mul(c, "tokens batch * seq", d->b, d->s, &d->t));
    if (cfg->n_heads < 1 || d->dim % cfg->n_heads != 0)
        return l3k_fail(c, L3K_ERROR_VALUE, "n_heads is %lld, expected a divisor of dim %lld",
                        (long long)cfg->n_heads, (long long)d->dim);
    if (cfg->n_kv_heads < 1 || cfg->n_heads % cfg->n_kv_heads != 0)
        return l3k_fail(c, L3K_ERROR_VALUE, "n_kv_heads is %lld, expected a divisor of n_heads %lld",
                        (long long)cfg->n_kv_heads, (long long)cfg->n_heads);
    L3K_TRY(l3k_check_eps(c, cfg->eps));
    d->h = cfg->n_heads;
    d->hkv = cfg->n_kv_heads;
    d->hd = d->dim / d->h;
    /* Checked here rather than by the attention step, midway through a call. */
    if (d->dim > 0) L3K_TRY(l3k_check_head_dim(c, "head_dim (dim / n_heads)", d->hd));
    int64_t kv_width;
    L3K_TRY(l3k_size_mul(c, "qkv width: 2 * n_kv_heads * head_dim", 2, d->hkv * d->hd, &kv_width));
    L3K_TRY(l3k_size_add(c, "qkv width: dim + 2 * n_kv_heads * head_dim", d->dim, kv_width, &d->qkv));
    const DLTensor *qkv_parts[3] = {w->q_weight, w->k_weight, w->v_weight};
    static const char *qkv_names[3] = {"q_weight", "k_weight", "v_weight"};
    const int64_t qkv_widths[3] = {d->dim, d->hkv * d->hd, d->hkv * d->hd};
    L3K_TRY(make_proj(c, &d->wqkv, w->qkv_weight, "qkv_weight", qkv_parts, qkv_names, 3, qkv_widths, d->dim,
                      d->dt, 0));
    /* hidden comes from the gate/up weight itself. */
    const DLTensor *gu_parts[2] = {w->gate_weight, w->up_weight};
    static const char *gu_names[2] = {"gate_weight", "up_weight"};
    const DLTensor *first = w->gate_up_weight ? w->gate_up_weight : w->gate_weight;
    d->hidden = 0; /* a missing, malformed or negative-size gate weight is refused by its own check below */
    if (first && first->ndim == 2 && first->shape && first->shape[0] >= 0) {
        if (w->gate_up_weight && first->shape[0] % 2 != 0)
            return l3k_fail(c, L3K_ERROR_SHAPE,
                            "gate_up_weight has %lld rows, expected an even count (gate rows, then up rows)",
                            (long long)first->shape[0]);
        d->hidden = w->gate_up_weight ? first->shape[0] / 2 : first->shape[0];
    }
    const int64_t gu_widths[2] = {d->hidden, d->hidden};
    L3K_TRY(make_proj(c, &d->wgu, w->gate_up_weight, "gate_up_weight", gu_parts, gu_names, 2, gu_widths,
                      d->dim, d->dt, 0));
    const DLTensor *ws[4] = {w->o_weight, w->down_weight, w->norm1_weight, w->norm2_weight};
    static const char *names[4] = {"o_weight", "down_weight", "norm1_weight", "norm2_weight"};
    const int64_t want[4][2] = {{d->dim, d->dim}, {d->dim, d->hidden}, {d->dim, 0}, {d->dim, 0}};
    for (int i = 0; i < 4; ++i) {
        L3K_TRY(l3k_check_tensor(c, ws[i], names[i]));
        L3K_TRY(l3k_check_dtype(c, ws[i], names[i], d->dt, "x"));
        const int nd = i < 2 ? 2 : 1;
        if (ws[i]->ndim != nd || ws[i]->shape[0] != want[i][0] ||
            (nd == 2 && ws[i]->shape[1] != want[i][1])) {
            if (nd == 2)
                return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim %d, expected shape (%lld, %lld)", names[i],
                                (int)ws[i]->ndim, (long long)want[i][0], (long long)want[i][1]);
            return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim %d, expected shape (%lld,)", names[i],
                            (int)ws[i]->ndim, (long long)want[i][0]);
        }
    }
    d->es = l3k_dt_size(d->dt);
    L3K_TRY(check_plan_fits(c, d));
    L3K_TRY(l3k_linear_workspace_size(x, &d->gemm_ws));
    /* The RMSNorm backward's scratch for (tokens, dim) rows, asked of the op itself. */
    const int64_t rows_shape[2] = {d->t, d->dim};
    DLTensor rows = *x;
    rows.ndim = 2;
    rows.shape = (int64_t *)rows_shape;
    rows.strides = NULL;
    L3K_TRY(l3k_rmsnorm_backward_workspace_size(&rows, &d->norm_ws));
    d->attn_ws = 0;
    return L3K_SUCCESS;
}

/* Run one step; on failure keep its message under this op's name. */
static l3k_status step(l3k_call *c, l3k_status st) {
    if (st == L3K_SUCCESS) return st;
    char inner[1024];
    snprintf(inner, sizeof inner, "%s", l3k_last_error());
    return l3k_fail(c, st, "%s", inner);
}

/* (rows, cols) at column `col` of a (rows, width) row-major buffer. */
static DLTensor *cols_view(view *v, const DLTensor *like, void *base, int64_t rows, int64_t width,
                           int64_t col, int64_t cols, size_t es) {
    const int64_t shape[2] = {rows, cols}, strides[2] = {width, 1};
    return make_view(v, like->device, base, (size_t)col * es, like->dtype, 2, shape, strides);
}

/* out (tokens, width) = in W^T, a GEMM per part of the projection. */
static l3k_status proj_forward(l3k_call *c, const dims *d, const proj *w, const DLTensor *in, void *out,
                               int64_t width, DLTensor *gemm, void *stream) {
    for (int i = 0; i < w->n; ++i) {
        view vy;
        DLTensor *y = cols_view(&vy, in, out, d->t, width, w->col[i], w->width[i], d->es);
        L3K_TRY(step(c, l3k_linear_forward(in, w->w[i], NULL, y, gemm, stream)));
    }
    return L3K_SUCCESS;
}

/* The gradient of each part's weight: dW = dout[:, part]^T in. */
static l3k_status proj_backward_weight(l3k_call *c, const dims *d, const proj *g, const void *dout,
                                       int64_t width, const DLTensor *in, DLTensor *gemm, void *stream) {
    for (int i = 0; i < g->n; ++i) {
        view vdy;
        DLTensor *dy = cols_view(&vdy, in, (void *)dout, d->t, width, g->col[i], g->width[i], d->es);
        L3K_TRY(step(c, l3k_linear_backward_weight(dy, in, (DLTensor *)g->w[i], 0, gemm, stream)));
    }
    return L3K_SUCCESS;
}

/* din = dout W, summed over the parts. */
static l3k_status proj_backward_input(l3k_call *c, const dims *d, const proj *w, const void *dout,
                                      int64_t width, DLTensor *din, DLTensor *gemm, void *stream) {
    for (int i = 0; i < w->n; ++i) {
        view vdy;
        DLTensor *dy = cols_view(&vdy, din, (void *)dout, d->t, width, w->col[i], w->width[i], d->es);
        L3K_TRY(step(c, l3k_linear_backward_input(dy, w->w[i], din, i > 0, gemm, stream)));
    }
    return L3K_SUCCESS;
}

/* ---- the forward ------------------------------------------------------------ */

/* Where the forward's buffers are: the kept ones (qkv, h, gate_up, rstds, attn_out,
 * lse) in the caller's activations or, for inference, in the workspace. */
typedef struct {
    void *qkv, *h, *gu, *o;
    float *rstd1, *rstd2, *lse;
} fwd_buffers;

/* Forward workspace: the norm output (reused by the SiLU product once the gate/up
 * GEMM has read it), the attention output and LSE unless kept, the GEMM workspace;
 * for inference also the buffers a training forward keeps. */
typedef struct {
    region norm_out, o, lse, a, qkv, h, gu, gemm, decode;
    size_t total;
} fwd_plan;

/* decode_ws: the decode attention's workspace bytes (decode step only, else 0). */
static void plan_forward(const dims *d, int inference, int keep_attn, size_t decode_ws, fwd_plan *p) {
    size_t at = 0;
    const size_t td = (size_t)d->t * (size_t)d->dim * d->es;
    memset(p, 0, sizeof *p);
    p->gemm = take(&at, d->gemm_ws);
    p->decode = take(&at, decode_ws);
    if (inference) {
        p->qkv = take(&at, (size_t)d->t * (size_t)d->qkv * d->es);
        p->h = take(&at, td);
        p->gu = take(&at, (size_t)d->t * 2 * (size_t)d->hidden * d->es);
    }
    /* norm_out, o, lse are dead once the MLP starts: a (T x hidden) reuses them. */
    size_t early = at;
    p->norm_out = take(&early, td);
    if (!keep_attn) {
        p->o = take(&early, td);
        p->lse = take(&early, (size_t)d->b * (size_t)d->h * (size_t)d->s * 4);
    }
    size_t late = at;
    p->a = take(&late, (size_t)d->t * (size_t)d->hidden * d->es);
    p->total = early > late ? early : late;
}

/* cache: NULL, or the decode step's: the new k and v go to the cache, and the queries attend it. */
static l3k_status run_forward(l3k_call *c, const dims *d, const DLTensor *x, const DLTensor *cos,
                              const DLTensor *sin, const l3k_llama_block_weights *w,
                              const l3k_llama_block_config *cfg, const l3k_kv_cache *cache, DLTensor *out,
                              const fwd_buffers *buf, const fwd_plan *p, char *ws, void *stream) {
    view vx, vn, vq, vk, vv, vo, vo4, vlse, vh, vgu, va, vout, vgemm, vr1, vr2, vdec;
    DLTensor *x2 = rows_view(&vx, x, l3k_data(x), 0, d->t, d->dim);
    DLTensor *out2 = rows_view(&vout, x, l3k_data(out), 0, d->t, d->dim);
    DLTensor *norm = rows_view(&vn, x, ws, p->norm_out.off, d->t, d->dim);
    DLTensor *q = heads_view(&vq, x, buf->qkv, 0, d, d->qkv, 0, d->h);
    DLTensor *k = heads_view(&vk, x, buf->qkv, 0, d, d->qkv, d->h, d->hkv);
    DLTensor *v = heads_view(&vv, x, buf->qkv, 0, d, d->qkv, d->h + d->hkv, d->hkv);
    DLTensor *o = rows_view(&vo, x, buf->o, 0, d->t, d->dim);
    DLTensor *o4 = heads_view(&vo4, x, buf->o, 0, d, d->dim, 0, d->h);
    /* batch * heads * seq as tokens * heads: batch * heads alone may overflow when seq is 0. */
    const int64_t nlse = d->t * d->h;
    DLTensor *lse = f32_view(&vlse, x, buf->lse, 0, nlse);
    DLTensor *h = rows_view(&vh, x, buf->h, 0, d->t, d->dim);
    DLTensor *gu = rows_view(&vgu, x, buf->gu, 0, d->t, 2 * d->hidden);
    DLTensor *a = rows_view(&va, x, ws, p->a.off, d->t, d->hidden);
    DLTensor *r1 = buf->rstd1 ? f32_view(&vr1, x, buf->rstd1, 0, d->t) : NULL;
    DLTensor *r2 = buf->rstd2 ? f32_view(&vr2, x, buf->rstd2, 0, d->t) : NULL;
    DLTensor *gemm = p->gemm.bytes ? bytes_view(&vgemm, x, ws, p->gemm) : NULL;
    DLTensor *dec = p->decode.bytes ? bytes_view(&vdec, x, ws, p->decode) : NULL;

    L3K_TRY(step(c, l3k_rmsnorm_forward(x2, w->norm1_weight, cfg->eps, norm, r1, stream)));
    L3K_TRY(proj_forward(c, d, &d->wqkv, norm, buf->qkv, d->qkv, gemm, stream));
    if (cache) {
        L3K_TRY(step(c, l3k_kv_cache_append(q, k, v, cos, sin, cache->positions, cache->cache_range,
                                            L3K_ROPE_HALF, q, cache->k, cache->v, stream)));
        L3K_TRY(
            step(c, l3k_attention_decode(q, cache->k, cache->v, cache->cache_range, 0.0f, o4, dec, stream)));
    } else {
        L3K_TRY(step(c, l3k_rope_forward(q, k, cos, sin, 0, L3K_ROPE_HALF, q, k, stream)));
        L3K_TRY(step(c, l3k_attention_forward(q, k, v, d->key_range, 0.0f, cfg->causal, o4, lse, stream)));
    }
    L3K_TRY(step(c, l3k_linear_forward(o, w->o_weight, x2, h, gemm, stream)));
    L3K_TRY(step(c, l3k_rmsnorm_forward(h, w->norm2_weight, cfg->eps, norm, r2, stream)));
    L3K_TRY(proj_forward(c, d, &d->wgu, norm, buf->gu, 2 * d->hidden, gemm, stream));
    L3K_TRY(step(c, l3k_swiglu_fused_forward(gu, a, stream)));
    return step(c, l3k_linear_forward(a, w->down_weight, h, out2, gemm, stream));
}

/* Every step checked before the first one runs (a refused call writes nothing), then run. */
static l3k_status checked_forward(l3k_call *c, const dims *d, const DLTensor *x, const DLTensor *cos,
                                  const DLTensor *sin, const l3k_llama_block_weights *w,
                                  const l3k_llama_block_config *cfg, const l3k_kv_cache *cache, DLTensor *out,
                                  const fwd_buffers *buf, const fwd_plan *p, char *ws, void *stream) {
    l3k_set_checking_only(1);
    const l3k_status st = run_forward(c, d, x, cos, sin, w, cfg, cache, out, buf, p, ws, stream);
    l3k_set_checking_only(0);
    return st ? st : run_forward(c, d, x, cos, sin, w, cfg, cache, out, buf, p, ws, stream);
}

/* The RoPE tables: checked here as tensors, so that a call with no token (which never reaches
 * the RoPE step) refuses bad descriptors too; their shapes are the RoPE step's to check. */
static l3k_status check_tables(l3k_call *c, const DLTensor *cos, const DLTensor *sin) {
    L3K_TRY(l3k_check_tensor(c, cos, "cos"));
    return l3k_check_tensor(c, sin, "sin");
}

/* A caller tensor the block writes: contiguous, `numel` elements, x's device, its dtype. */
static l3k_status check_buffer(l3k_call *c, const DLTensor *t, const char *name, int64_t numel, l3k_dt want,
                               const char *like) {
    L3K_TRY(l3k_check_tensor(c, t, name));
    L3K_TRY(l3k_check_dtype(c, t, name, want, like));
    L3K_TRY(l3k_check_contiguous_numel(c, t, name, numel));
    return L3K_SUCCESS;
}

/* out, dout or dx: a buffer of x's shape and dtype. */
static l3k_status check_like_x(l3k_call *c, const DLTensor *t, const char *name, const DLTensor *x,
                               const dims *d) {
    L3K_TRY(check_buffer(c, t, name, l3k_numel(x), d->dt, "x"));
    return l3k_check_same_shape(c, t, name, x, "x");
}

/* Scratch regions are placed inside the activation and gradient buffers, and the
 * CUDA kernels that use them (the attention backward's accumulators) want 256-byte
 * alignment; the CPU kernels want 16 (cudaMalloc, torch and NumPy give at least that). */
static l3k_status check_aligned(l3k_call *c, const DLTensor *t, const char *name) {
    const unsigned want = l3k_on_cuda(c) ? ALIGN : 16;
    if (t && (uintptr_t)l3k_data(t) % want != 0)
        return l3k_fail(c, L3K_ERROR_ALIGNMENT, "%s data pointer %p is not %u-byte aligned", name,
                        l3k_data(t), want);
    return L3K_SUCCESS;
}

/* Named tensors of a call; NULL entries (absent optional tensors) are skipped. */
enum { MAX_LISTED = 32 };
typedef struct {
    const DLTensor *t[MAX_LISTED];
    const char *name[MAX_LISTED];
    int n, overflow;
} tensor_list;

static void add(tensor_list *l, const DLTensor *t, const char *name) {
    if (l->n == MAX_LISTED) { /* the block lists at most 23: a bug if reached */
        l->overflow = 1;
        return;
    }
    l->t[l->n] = t;
    l->name[l->n++] = name;
}

/* The tensors of an l3k_llama_block_weights or l3k_llama_block_grads (the same fields, in the
 * same order), as an initializer list, and their names in messages. */
enum { N_WEIGHTS = 11 };
#define WEIGHT_FIELDS(s)                                                                      \
    (s)->qkv_weight, (s)->o_weight, (s)->gate_up_weight, (s)->down_weight, (s)->norm1_weight, \
        (s)->norm2_weight, (s)->q_weight, (s)->k_weight, (s)->v_weight, (s)->gate_weight, (s)->up_weight
static const char *const weight_names[N_WEIGHTS] = {
    "qkv_weight", "o_weight", "gate_up_weight", "down_weight", "norm1_weight", "norm2_weight",
    "q_weight",   "k_weight", "v_weight",       "gate_weight", "up_weight"};
static const char *const grad_names[N_WEIGHTS] = {
    "grads->qkv_weight",   "grads->o_weight",     "grads->gate_up_weight", "grads->down_weight",
    "grads->norm1_weight", "grads->norm2_weight", "grads->q_weight",       "grads->k_weight",
    "grads->v_weight",     "grads->gate_weight",  "grads->up_weight"};

static void add_all(tensor_list *l, const DLTensor *const *t, const char *const *names, int n) {
    for (int i = 0; i < n; ++i) add(l, t[i], names[i]);
}

/* What every block call reads: x, the RoPE tables and the weights. */
static tensor_list block_inputs(const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                                const l3k_llama_block_weights *w) {
    tensor_list l = {.n = 0};
    add(&l, x, "x");
    add(&l, cos, "cos");
    add(&l, sin, "sin");
    const DLTensor *ws[N_WEIGHTS] = {WEIGHT_FIELDS(w)};
    add_all(&l, ws, weight_names, N_WEIGHTS);
    return l;
}

/* The attention's key range, checked with the block's other arguments and listed with the inputs
 * no output may overlap. */
static l3k_status check_key_range(l3k_call *c, const dims *d, tensor_list *ins) {
    if (!d->key_range) return L3K_SUCCESS;
    L3K_TRY(l3k_check_key_range(c, d->key_range, "cfg->key_range", d->b));
    add(ins, d->key_range, "cfg->key_range");
    return L3K_SUCCESS;
}

/* No written tensor may share a byte with any other tensor of the call. */
static l3k_status check_disjoint(l3k_call *c, const tensor_list *outs, const tensor_list *ins) {
    if (outs->overflow || ins->overflow) return l3k_fail(c, L3K_ERROR_INTERNAL, "too many tensors to check");
    for (int i = 0; i < outs->n; ++i) {
        if (!outs->t[i]) continue;
        for (int j = i + 1; j < outs->n; ++j)
            if (outs->t[j])
                L3K_TRY(l3k_check_no_overlap(c, outs->t[i], outs->name[i], outs->t[j], outs->name[j], 0));
        for (int j = 0; j < ins->n; ++j)
            if (ins->t[j])
                L3K_TRY(l3k_check_no_overlap(c, outs->t[i], outs->name[i], ins->t[j], ins->name[j], 0));
    }
    return L3K_SUCCESS;
}

/* The activations, as tensors written (forward) or read (backward). */
static void add_activations(tensor_list *l, const l3k_llama_block_activations *s, int with_gate_up) {
    add(l, s->qkv, "saved->qkv");
    add(l, s->residual, "saved->residual");
    if (with_gate_up) add(l, s->gate_up, "saved->gate_up");
    add(l, s->rstd1, "saved->rstd1");
    add(l, s->rstd2, "saved->rstd2");
    add(l, s->attn_out, "saved->attn_out");
    add(l, s->lse, "saved->lse");
}

static l3k_status check_activations(l3k_call *c, const dims *d, const l3k_llama_block_activations *s) {
    L3K_TRY(check_struct_size(c, s, s ? s->struct_size : 0, sizeof(l3k_llama_block_activations), "saved",
                              "L3K_LLAMA_BLOCK_ACTIVATIONS_INIT"));
    L3K_TRY(check_buffer(c, s->qkv, "saved->qkv", d->t * d->qkv, d->dt, "x"));
    L3K_TRY(check_buffer(c, s->residual, "saved->residual", d->t * d->dim, d->dt, "x"));
    L3K_TRY(check_buffer(c, s->gate_up, "saved->gate_up", d->t * 2 * d->hidden, d->dt, "x"));
    L3K_TRY(check_buffer(c, s->rstd1, "saved->rstd1", d->t, L3K_DT_F32, "rstd"));
    L3K_TRY(check_buffer(c, s->rstd2, "saved->rstd2", d->t, L3K_DT_F32, "rstd"));
    if (!s->attn_out != !s->lse)
        return l3k_fail(c, L3K_ERROR_NULL_POINTER,
                        "saved->%s is NULL but saved->%s is not: give both or neither",
                        s->attn_out ? "lse" : "attn_out", s->attn_out ? "attn_out" : "lse");
    if (s->attn_out) {
        L3K_TRY(check_buffer(c, s->attn_out, "saved->attn_out", d->t * d->dim, d->dt, "x"));
        L3K_TRY(check_buffer(c, s->lse, "saved->lse", d->t * d->h, L3K_DT_F32, "lse"));
    }
    const DLTensor *all[7] = {s->qkv, s->residual, s->gate_up, s->rstd1, s->rstd2, s->attn_out, s->lse};
    static const char *names[7] = {"saved->qkv",   "saved->residual", "saved->gate_up", "saved->rstd1",
                                   "saved->rstd2", "saved->attn_out", "saved->lse"};
    for (int i = 0; i < 7; ++i) L3K_TRY(check_aligned(c, all[i], names[i]));
    return L3K_SUCCESS;
}

static l3k_status check_workspace_aligned(l3k_call *c, DLTensor *workspace, size_t bytes) {
    L3K_TRY(l3k_check_workspace(c, workspace, bytes));
    return bytes ? check_aligned(c, workspace, "workspace") : L3K_SUCCESS;
}

l3k_status l3k_llama_block_forward_workspace_size(const DLTensor *x, const l3k_llama_block_weights *weights,
                                                  const l3k_llama_block_config *cfg, size_t *bytes) {
    l3k_call c = {.op = "llama_block_forward_workspace_size"};
    dims d;
    fwd_plan p;
    if (!bytes) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "bytes is NULL");
    L3K_TRY(make_dims(&c, x, weights, cfg, &d));
    plan_forward(&d, 1, 0, 0, &p);
    *bytes = p.total;
    return L3K_SUCCESS;
}

/* The forward, for inference (train 0: saved is not read, qkv, h and gate_up live in the
 * workspace and the rstds are not written) or training (the activations go to saved; attn_out and
 * lse too when given, else the workspace holds them). */
static l3k_status forward(l3k_call *c, const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                          const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg, DLTensor *out,
                          const l3k_llama_block_activations *saved, int train, DLTensor *workspace,
                          void *stream) {
    dims d;
    fwd_plan p;
    L3K_TRY(make_dims(c, x, w, cfg, &d));
    L3K_TRY(check_tables(c, cos, sin));
    L3K_TRY(check_like_x(c, out, "out", x, &d));
    if (train) L3K_TRY(check_activations(c, &d, saved));
    const int keep_attn = train && saved->attn_out != NULL;
    plan_forward(&d, !train, keep_attn, 0, &p);
    L3K_TRY(check_workspace_aligned(c, workspace, p.total));
    tensor_list outs = {.n = 0}, ins = block_inputs(x, cos, sin, w);
    L3K_TRY(check_key_range(c, &d, &ins));
    add(&outs, out, "out");
    add(&outs, workspace, "workspace");
    if (train) add_activations(&outs, saved, 1);
    L3K_TRY(check_disjoint(c, &outs, &ins));
    if (d.t == 0 || d.dim == 0) return L3K_SUCCESS;
    char *ws = (char *)l3k_data(workspace);
    const fwd_buffers buf = {
        train ? l3k_data(saved->qkv) : l3k_ptr_add(ws, (int64_t)p.qkv.off),
        train ? l3k_data(saved->residual) : l3k_ptr_add(ws, (int64_t)p.h.off),
        train ? l3k_data(saved->gate_up) : l3k_ptr_add(ws, (int64_t)p.gu.off),
        keep_attn ? l3k_data(saved->attn_out) : l3k_ptr_add(ws, (int64_t)p.o.off),
        train ? (float *)l3k_data(saved->rstd1) : NULL,
        train ? (float *)l3k_data(saved->rstd2) : NULL,
        keep_attn ? (float *)l3k_data(saved->lse) : (float *)l3k_ptr_add(ws, (int64_t)p.lse.off),
    };
    return checked_forward(c, &d, x, cos, sin, w, cfg, NULL, out, &buf, &p, ws, stream);
}

/* ---- graph replay keys ------------------------------------------------------ */

enum { KEY_FORWARD = 1, KEY_FORWARD_TRAIN, KEY_BACKWARD, KEY_DECODE };

/* What every block call's host code reads of x, the tables, the weights and cfg.  Structs
 * shorter than this version's (or NULL) leave the key unusable: such a call runs as usual. */
static void key_common(l3k_graph_key *k, int op, const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                       const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg) {
    l3k_graph_key_init(k, op, x);
    if (!w || w->struct_size < sizeof *w || !cfg || cfg->struct_size < sizeof *cfg) {
        k->usable = 0;
        return;
    }
    const DLTensor *ts[3 + N_WEIGHTS] = {x, cos, sin, WEIGHT_FIELDS(w)};
    for (int i = 0; i < 3 + N_WEIGHTS; ++i) l3k_graph_key_tensor(k, ts[i]);
    uint32_t eps;
    memcpy(&eps, &cfg->eps, sizeof eps);
    const uint64_t settings[] = {(uint64_t)cfg->n_heads, (uint64_t)cfg->n_kv_heads, (uint64_t)cfg->causal,
                                 eps, (uint64_t)cfg->deterministic};
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; ++i) l3k_graph_key_word(k, settings[i]);
    l3k_graph_key_tensor(k, cfg->key_range);
}

static void key_activations(l3k_graph_key *k, const l3k_llama_block_activations *s) {
    if (!s || s->struct_size < sizeof *s) {
        k->usable = 0;
        return;
    }
    const DLTensor *all[7] = {s->qkv, s->residual, s->gate_up, s->rstd1, s->rstd2, s->attn_out, s->lse};
    for (int i = 0; i < 7; ++i) l3k_graph_key_tensor(k, all[i]);
}

/* ---- forward entry points ------------------------------------------------- */

typedef struct {
    const DLTensor *x, *cos, *sin;
    const l3k_llama_block_weights *w;
    const l3k_llama_block_config *cfg;
    DLTensor *out;
    const l3k_llama_block_activations *saved;
    int train;
    DLTensor *workspace;
} fwd_args;

static l3k_status forward_body(l3k_call *c, const void *args, void *stream) {
    const fwd_args *a = (const fwd_args *)args;
    return forward(c, a->x, a->cos, a->sin, a->w, a->cfg, a->out, a->saved, a->train, a->workspace, stream);
}

static l3k_status forward_call(l3k_call *c, const fwd_args *a, void *stream) {
    l3k_graph_key k;
    key_common(&k, a->train ? KEY_FORWARD_TRAIN : KEY_FORWARD, a->x, a->cos, a->sin, a->w, a->cfg);
    l3k_graph_key_tensor(&k, a->out);
    l3k_graph_key_tensor(&k, a->workspace);
    if (a->train) key_activations(&k, a->saved);
    return l3k_graph_run(c, &k, forward_body, a, stream);
}

l3k_status l3k_llama_block_forward(const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                                   const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg,
                                   DLTensor *out, DLTensor *workspace, void *stream) {
    l3k_call c = {.op = "llama_block_forward"};
    const fwd_args a = {x, cos, sin, w, cfg, out, NULL, 0, workspace};
    return forward_call(&c, &a, stream);
}

l3k_status l3k_llama_block_forward_train(const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                                         const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg,
                                         DLTensor *out, const l3k_llama_block_activations *saved,
                                         DLTensor *workspace, void *stream) {
    l3k_call c = {.op = "llama_block_forward_train"};
    const fwd_args a = {x, cos, sin, w, cfg, out, saved, 1, workspace};
    return forward_call(&c, &a, stream);
}

/* ---- the decode step -------------------------------------------------------- */

/* The cache struct and the cache tensors' dtype and shape against the block's (the cache ops
 * check the rest, each under its own name); the decode attention's workspace bytes. */
static l3k_status check_cache(l3k_call *c, const dims *d, const l3k_llama_block_config *cfg,
                              const l3k_kv_cache *cache, size_t *decode_ws) {
    L3K_TRY(check_struct_size(c, cache, cache ? cache->struct_size : 0, sizeof(l3k_kv_cache), "cache",
                              "L3K_KV_CACHE_INIT"));
    if (!cfg->causal)
        return l3k_fail(c, L3K_ERROR_VALUE, "cfg->causal is 0, expected 1: decoding with a cache is causal");
    if (d->key_range)
        return l3k_fail(c, L3K_ERROR_VALUE,
                        "cfg->key_range is given, expected NULL: the decode step reads each sequence's "
                        "padding from cache->cache_range");
    const DLTensor *kv[2] = {cache->k, cache->v};
    static const char *names[2] = {"cache->k", "cache->v"};
    for (int i = 0; i < 2; ++i) {
        L3K_TRY(l3k_check_tensor(c, kv[i], names[i]));
        L3K_TRY(l3k_check_dtype(c, kv[i], names[i], d->dt, "x"));
        if (kv[i]->ndim != 4 || kv[i]->shape[0] != d->b || kv[i]->shape[1] != d->hkv ||
            kv[i]->shape[3] != d->hd)
            return l3k_fail(c, L3K_ERROR_SHAPE,
                            "%s has ndim %d, expected shape (batch %lld, n_kv_heads %lld, capacity, head_dim "
                            "%lld)",
                            names[i], (int)kv[i]->ndim, (long long)d->b, (long long)d->hkv, (long long)d->hd);
    }
    L3K_TRY(l3k_check_tensor(c, cache->cache_range, "cache->cache_range"));
    if (cache->positions) L3K_TRY(l3k_check_tensor(c, cache->positions, "cache->positions"));
    view vq;
    DLTensor *q = heads_view(&vq, cache->k, (void *)0x100, 0, d, d->qkv, 0, d->h);
    return step(c, l3k_attention_decode_workspace_size(q, cache->k, decode_ws));
}

static l3k_status decode(l3k_call *c, const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                         const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg,
                         const l3k_kv_cache *cache, DLTensor *out, DLTensor *workspace, void *stream) {
    dims d;
    fwd_plan p;
    size_t decode_ws;
    L3K_TRY(make_dims(c, x, w, cfg, &d));
    L3K_TRY(check_tables(c, cos, sin));
    L3K_TRY(check_cache(c, &d, cfg, cache, &decode_ws));
    L3K_TRY(check_like_x(c, out, "out", x, &d));
    plan_forward(&d, 1, 0, decode_ws, &p);
    L3K_TRY(check_workspace_aligned(c, workspace, p.total));
    tensor_list outs = {.n = 0}, ins = block_inputs(x, cos, sin, w);
    add(&ins, cache->cache_range, "cache->cache_range");
    add(&ins, cache->positions, "cache->positions");
    add(&outs, out, "out");
    add(&outs, workspace, "workspace");
    add(&outs, cache->k, "cache->k");
    add(&outs, cache->v, "cache->v");
    L3K_TRY(check_disjoint(c, &outs, &ins));
    if (d.t == 0 || d.dim == 0) return L3K_SUCCESS;
    char *ws = (char *)l3k_data(workspace);
    const fwd_buffers buf = {
        l3k_ptr_add(ws, (int64_t)p.qkv.off),
        l3k_ptr_add(ws, (int64_t)p.h.off),
        l3k_ptr_add(ws, (int64_t)p.gu.off),
        l3k_ptr_add(ws, (int64_t)p.o.off),
        NULL,
        NULL,
        (float *)l3k_ptr_add(ws, (int64_t)p.lse.off),
    };
    return checked_forward(c, &d, x, cos, sin, w, cfg, cache, out, &buf, &p, ws, stream);
}

l3k_status l3k_llama_block_decode_workspace_size(const DLTensor *x, const l3k_llama_block_weights *weights,
                                                 const l3k_llama_block_config *cfg, const l3k_kv_cache *cache,
                                                 size_t *bytes) {
    l3k_call c = {.op = "llama_block_decode_workspace_size"};
    dims d;
    fwd_plan p;
    size_t decode_ws;
    if (!bytes) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "bytes is NULL");
    L3K_TRY(make_dims(&c, x, weights, cfg, &d));
    L3K_TRY(check_cache(&c, &d, cfg, cache, &decode_ws));
    plan_forward(&d, 1, 0, decode_ws, &p);
    *bytes = p.total;
    return L3K_SUCCESS;
}

typedef struct {
    const DLTensor *x, *cos, *sin;
    const l3k_llama_block_weights *w;
    const l3k_llama_block_config *cfg;
    const l3k_kv_cache *cache;
    DLTensor *out, *workspace;
} decode_args;

static l3k_status decode_body(l3k_call *c, const void *args, void *stream) {
    const decode_args *a = (const decode_args *)args;
    return decode(c, a->x, a->cos, a->sin, a->w, a->cfg, a->cache, a->out, a->workspace, stream);
}

l3k_status l3k_llama_block_decode(const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                                  const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg,
                                  const l3k_kv_cache *cache, DLTensor *out, DLTensor *workspace,
                                  void *stream) {
    l3k_call c = {.op = "llama_block_decode"};
    const decode_args a = {x, cos, sin, w, cfg, cache, out, workspace};
    l3k_graph_key k;
    key_common(&k, KEY_DECODE, x, cos, sin, w, cfg);
    /* A cache struct shorter than this version's is not read here: the call then runs as usual
     * (and its validation refuses it). */
    const int whole = cache && cache->struct_size >= sizeof *cache;
    if (!whole) k.usable = 0;
    const DLTensor *more[6] = {out,
                               workspace,
                               whole ? cache->k : NULL,
                               whole ? cache->v : NULL,
                               whole ? cache->cache_range : NULL,
                               whole ? cache->positions : NULL};
    for (int i = 0; i < 6; ++i) l3k_graph_key_tensor(&k, more[i]);
    return l3k_graph_run(&c, &k, decode_body, &a, stream);
}

/* ---- training ------------------------------------------------------------- */

/* Backward scratch of the attention part, at `base` (where dgu was, or the workspace). */
typedef struct {
    region o, lse, dout, dqkv, attn_ws;
    size_t total;
} attn_plan;

static void plan_attention_part(const dims *d, attn_plan *p) {
    size_t at = 0;
    const size_t td = (size_t)d->t * (size_t)d->dim * d->es;
    p->o = take(&at, td); /* the attention output (recomputed), later dQKV Wqkv */
    p->lse = take(&at, (size_t)d->b * (size_t)d->h * (size_t)d->s * 4);
    p->dout = take(&at, td); /* dO, later the first norm's output */
    p->dqkv = take(&at, (size_t)d->t * (size_t)d->qkv * d->es);
    p->attn_ws = take(&at, d->attn_ws);
    p->total = at;
}

typedef struct {
    region gemm, norm_ws, dgu, da, attn; /* attn: where attn_plan lives when not in dgu's place */
    int da_in_dgrad, attn_in_dgu;
    attn_plan ap;
    size_t total;
} bwd_plan;

/* split_gate_up: the gate and up gradients are two separate buffers, so da can wait only in
 * the gate part's. */
static void plan_backward(const dims *d, int preserve, int split_gate_up, bwd_plan *p) {
    size_t at = 0;
    const size_t dgu_bytes = (size_t)d->t * 2 * (size_t)d->hidden * d->es;
    const size_t da_bytes = (size_t)d->t * (size_t)d->hidden * d->es;
    memset(p, 0, sizeof *p);
    plan_attention_part(d, &p->ap);
    p->gemm = take(&at, d->gemm_ws);
    p->norm_ws = take(&at, d->norm_ws);
    if (preserve) p->dgu = take(&at, dgu_bytes);
    p->da_in_dgrad = da_bytes <= (size_t)(split_gate_up ? 1 : 2) * (size_t)d->hidden * (size_t)d->dim * d->es;
    p->attn_in_dgu = p->ap.total <= dgu_bytes;
    /* da is dead before the attention part starts: the two share one region. */
    size_t shared = 0;
    if (!p->da_in_dgrad) shared = da_bytes;
    if (!p->attn_in_dgu && p->ap.total > shared) shared = p->ap.total;
    p->da = p->attn = take(&at, shared);
    p->total = at;
}

static l3k_status attention_ws_size(l3k_call *c, const DLTensor *x, const l3k_llama_block_config *cfg,
                                    dims *d) {
    /* Shapes of the backward's q and k views are all the size query reads. */
    view vq, vk;
    DLTensor *q = heads_view(&vq, x, (void *)0x100, 0, d, d->qkv, 0, d->h);
    DLTensor *k = heads_view(&vk, x, (void *)0x100, 0, d, d->qkv, d->h, d->hkv);
    return step(c, l3k_attention_backward_workspace_size(q, k, cfg->deterministic, &d->attn_ws));
}

l3k_status l3k_llama_block_training_layout(const DLTensor *x, const l3k_llama_block_weights *w,
                                           const l3k_llama_block_config *cfg,
                                           l3k_llama_block_layout *layout) {
    l3k_call c = {.op = "llama_block_training_layout"};
    dims d;
    fwd_plan fp;
    bwd_plan consume, preserve;
    L3K_TRY(check_struct_size(&c, layout, layout ? layout->struct_size : 0, sizeof(l3k_llama_block_layout),
                              "layout", "L3K_LLAMA_BLOCK_LAYOUT_INIT"));
    L3K_TRY(make_dims(&c, x, w, cfg, &d));
    L3K_TRY(attention_ws_size(&c, x, cfg, &d));
    plan_forward(&d, 0, 0, 0, &fp);
    bwd_plan consume_split, preserve_split;
    plan_backward(&d, 0, 0, &consume);
    plan_backward(&d, 1, 0, &preserve);
    plan_backward(&d, 0, 1, &consume_split);
    plan_backward(&d, 1, 1, &preserve_split);
    const DLDataType f32 = {kDLFloat, 32, 1};
    layout->qkv = (l3k_buffer_desc){d.t, d.qkv, x->dtype};
    layout->residual = (l3k_buffer_desc){d.t, d.dim, x->dtype};
    layout->gate_up = (l3k_buffer_desc){d.t, 2 * d.hidden, x->dtype};
    layout->rstd1 = layout->rstd2 = (l3k_buffer_desc){d.t, 1, f32};
    layout->attn_out = (l3k_buffer_desc){d.t, d.dim, x->dtype};
    layout->lse = (l3k_buffer_desc){d.t * d.h, 1, f32}; /* batch * heads * seq */
    layout->forward_workspace_bytes = fp.total;
    layout->backward_workspace_bytes = consume.total;
    layout->backward_workspace_bytes_preserving = preserve.total;
    const size_t extra_c = consume_split.total - consume.total,
                 extra_p = preserve_split.total - preserve.total;
    layout->backward_workspace_extra_split_gate_up = extra_c > extra_p ? extra_c : extra_p;
    return L3K_SUCCESS;
}

/* The gradients, and their two projections with parts as GEMM targets. */
static l3k_status check_grads(l3k_call *c, const dims *d, const l3k_llama_block_weights *w,
                              const l3k_llama_block_grads *g, proj *gqkv, proj *ggu) {
    L3K_TRY(check_struct_size(c, g, g ? g->struct_size : 0, sizeof(l3k_llama_block_grads), "grads",
                              "L3K_LLAMA_BLOCK_GRADS_INIT"));
    const DLTensor *ws[4] = {w->o_weight, w->down_weight, w->norm1_weight, w->norm2_weight};
    const DLTensor *gs[4] = {g->o_weight, g->down_weight, g->norm1_weight, g->norm2_weight};
    static const char *names[4] = {"grads->o_weight", "grads->down_weight", "grads->norm1_weight",
                                   "grads->norm2_weight"};
    for (int i = 0; i < 4; ++i) {
        L3K_TRY(check_buffer(c, gs[i], names[i], l3k_numel(ws[i]), d->dt, "its weight"));
        L3K_TRY(l3k_check_same_shape(c, gs[i], names[i], ws[i], "its weight"));
    }
    const DLTensor *qkv_parts[3] = {g->q_weight, g->k_weight, g->v_weight};
    static const char *qkv_names[3] = {"grads->q_weight", "grads->k_weight", "grads->v_weight"};
    const int64_t qkv_widths[3] = {d->dim, d->hkv * d->hd, d->hkv * d->hd};
    L3K_TRY(make_proj(c, gqkv, g->qkv_weight, "grads->qkv_weight", qkv_parts, qkv_names, 3, qkv_widths,
                      d->dim, d->dt, 1));
    const DLTensor *gu_parts[2] = {g->gate_weight, g->up_weight};
    static const char *gu_names[2] = {"grads->gate_weight", "grads->up_weight"};
    const int64_t gu_widths[2] = {d->hidden, d->hidden};
    L3K_TRY(make_proj(c, ggu, g->gate_up_weight, "grads->gate_up_weight", gu_parts, gu_names, 2, gu_widths,
                      d->dim, d->dt, 1));
    const DLTensor *all[N_WEIGHTS] = {WEIGHT_FIELDS(g)};
    for (int i = 0; i < N_WEIGHTS; ++i) L3K_TRY(check_aligned(c, all[i], "a gradient"));
    return L3K_SUCCESS;
}

/* The backward's operands: views of the caller's buffers and of the workspace. */
typedef struct {
    view vx, vdout, vdx, vda, vdgu, vgu, vh, vr1, vr2, vq, vk, vv, vo, vo4, vlse, vdo, vdo4, vdq, vdk, vdv,
        vxpre, vnorm, vgemm, vnws, vaws;
    DLTensor *x2, *dout2, *dx2, *da, *gu, *dgu, *h, *r1, *r2, *q, *k, *v, *o, *o4, *lse, *dO, *dO4, *dq, *dk,
        *dv, *xpre, *norm1, *gemm, *norm_ws, *attn_ws;
    void *dgu_base, *dqkv_base;
    int keep_attn;
} bwd_views;

static void make_bwd_views(bwd_views *b, const dims *d, const bwd_plan *p, const DLTensor *x,
                           const DLTensor *dout, DLTensor *dx, const l3k_llama_block_activations *saved,
                           int preserve, const proj *ggu, char *ws) {
    const attn_plan *ap = &p->ap;
    char *dgu_base = preserve ? l3k_ptr_add(ws, (int64_t)p->dgu.off) : (char *)l3k_data(saved->gate_up);
    char *attn_base = p->attn_in_dgu ? dgu_base : l3k_ptr_add(ws, (int64_t)p->attn.off);
    /* da waits in the gate/up gradient's memory (the gate part's, when the parts are apart). */
    char *da_base = p->da_in_dgrad ? (char *)l3k_data(ggu->w[0]) : l3k_ptr_add(ws, (int64_t)p->da.off);
    void *qkv = l3k_data(saved->qkv);
    b->keep_attn = saved->attn_out != NULL;
    b->dgu_base = dgu_base;
    b->dqkv_base = l3k_ptr_add(attn_base, (int64_t)ap->dqkv.off);
    b->x2 = rows_view(&b->vx, x, l3k_data(x), 0, d->t, d->dim);
    b->dout2 = rows_view(&b->vdout, x, l3k_data(dout), 0, d->t, d->dim);
    b->dx2 = rows_view(&b->vdx, x, l3k_data(dx), 0, d->t, d->dim);
    b->da = rows_view(&b->vda, x, da_base, 0, d->t, d->hidden);
    b->gu = rows_view(&b->vgu, x, l3k_data(saved->gate_up), 0, d->t, 2 * d->hidden);
    b->dgu = rows_view(&b->vdgu, x, dgu_base, 0, d->t, 2 * d->hidden);
    b->h = rows_view(&b->vh, x, l3k_data(saved->residual), 0, d->t, d->dim);
    b->r1 = f32_view(&b->vr1, x, l3k_data(saved->rstd1), 0, d->t);
    b->r2 = f32_view(&b->vr2, x, l3k_data(saved->rstd2), 0, d->t);
    b->q = heads_view(&b->vq, x, qkv, 0, d, d->qkv, 0, d->h);
    b->k = heads_view(&b->vk, x, qkv, 0, d, d->qkv, d->h, d->hkv);
    b->v = heads_view(&b->vv, x, qkv, 0, d, d->qkv, d->h + d->hkv, d->hkv);
    void *o_base = b->keep_attn ? l3k_data(saved->attn_out) : attn_base;
    const size_t o_off = b->keep_attn ? 0 : ap->o.off;
    b->o = rows_view(&b->vo, x, o_base, o_off, d->t, d->dim);
    b->o4 = heads_view(&b->vo4, x, o_base, o_off, d, d->dim, 0, d->h);
    b->lse = f32_view(&b->vlse, x, b->keep_attn ? l3k_data(saved->lse) : attn_base,
                      b->keep_attn ? 0 : ap->lse.off, d->t * d->h);
    b->dO = rows_view(&b->vdo, x, attn_base, ap->dout.off, d->t, d->dim);
    b->dO4 = heads_view(&b->vdo4, x, attn_base, ap->dout.off, d, d->dim, 0, d->h);
    b->dq = heads_view(&b->vdq, x, attn_base, ap->dqkv.off, d, d->qkv, 0, d->h);
    b->dk = heads_view(&b->vdk, x, attn_base, ap->dqkv.off, d, d->qkv, d->h, d->hkv);
    b->dv = heads_view(&b->vdv, x, attn_base, ap->dqkv.off, d, d->qkv, d->h + d->hkv, d->hkv);
    /* dQKV Wqkv reuses the attention output's slot, the first norm's output dO's. */
    b->xpre = rows_view(&b->vxpre, x, attn_base, ap->o.off, d->t, d->dim);
    b->norm1 = rows_view(&b->vnorm, x, attn_base, ap->dout.off, d->t, d->dim);
    b->gemm = p->gemm.bytes ? bytes_view(&b->vgemm, x, ws, p->gemm) : NULL;
    b->norm_ws = p->norm_ws.bytes ? bytes_view(&b->vnws, x, ws, p->norm_ws) : NULL;
    const region aw = {ap->attn_ws.off, ap->attn_ws.bytes};
    b->attn_ws = aw.bytes ? bytes_view(&b->vaws, x, attn_base, aw) : NULL;
}

static l3k_status backward_steps(l3k_call *c, const dims *d, const bwd_views *b,
                                 const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg,
                                 const DLTensor *cos, const DLTensor *sin, const proj *gqkv, const proj *ggu,
                                 const l3k_llama_block_grads *g, void *stream) {
    DLTensor *gemm = b->gemm;
    /* MLP: out = h + a Wd^T, a = silu(g) * u.  a is written over da. */
    L3K_TRY(step(c, l3k_linear_backward_input(b->dout2, w->down_weight, b->da, 0, gemm, stream)));
    L3K_TRY(step(c, l3k_swiglu_fused_backward(b->da, b->gu, b->dgu, b->da, stream)));
    L3K_TRY(step(c, l3k_linear_backward_weight(b->dout2, b->da, g->down_weight, 0, gemm, stream)));
    /* [g | u] = rmsnorm(h) Wgu^T: the norm's output is recomputed into dx, read, then dx takes dh. */
    L3K_TRY(step(c, l3k_rmsnorm_forward(b->h, w->norm2_weight, cfg->eps, b->dx2, NULL, stream)));
    L3K_TRY(proj_backward_weight(c, d, ggu, b->dgu_base, 2 * d->hidden, b->dx2, gemm, stream));
    L3K_TRY(proj_backward_input(c, d, &d->wgu, b->dgu_base, 2 * d->hidden, b->dx2, gemm, stream));
    /* dx <- d(out)/dh: through the second norm, plus dout along the residual. */
    L3K_TRY(step(c, l3k_rmsnorm_backward(b->dx2, b->dout2, b->h, w->norm2_weight, b->r2, cfg->eps, b->dx2,
                                         g->norm2_weight, b->norm_ws, stream)));

    /* Attention: h = x + o Wo^T; dgu is dead, its memory is the scratch from here on. */
    if (!b->keep_attn)
        L3K_TRY(step(c, l3k_attention_forward(b->q, b->k, b->v, d->key_range, 0.0f, cfg->causal, b->o4,
                                              b->lse, stream)));
    L3K_TRY(step(c, l3k_linear_backward_input(b->dx2, w->o_weight, b->dO, 0, gemm, stream)));
    L3K_TRY(step(c, l3k_linear_backward_weight(b->dx2, b->o, g->o_weight, 0, gemm, stream)));
    L3K_TRY(step(
        c, l3k_attention_backward(b->dO4, b->q, b->k, b->v, d->key_range, b->o4, b->lse, 0.0f, cfg->causal,
                                  cfg->deterministic, b->dq, b->dk, b->dv, b->attn_ws, stream)));
    L3K_TRY(step(c, l3k_rope_backward(b->dq, b->dk, cos, sin, 0, L3K_ROPE_HALF, b->dq, b->dk, stream)));
    /* qkv = rmsnorm(x) Wqkv^T: the norm's output is recomputed. */
    L3K_TRY(step(c, l3k_rmsnorm_forward(b->x2, w->norm1_weight, cfg->eps, b->norm1, NULL, stream)));
    L3K_TRY(proj_backward_weight(c, d, gqkv, b->dqkv_base, d->qkv, b->norm1, gemm, stream));
    L3K_TRY(proj_backward_input(c, d, &d->wqkv, b->dqkv_base, d->qkv, b->xpre, gemm, stream));
    /* dx = through the first norm, plus dh along the residual (dx holds dh: in place). */
    return step(c, l3k_rmsnorm_backward(b->xpre, b->dx2, b->x2, w->norm1_weight, b->r1, cfg->eps, b->dx2,
                                        g->norm1_weight, b->norm_ws, stream));
}

typedef struct {
    const DLTensor *dout, *x, *cos, *sin;
    const l3k_llama_block_weights *w;
    const l3k_llama_block_config *cfg;
    const l3k_llama_block_activations *saved;
    unsigned flags;
    DLTensor *dx;
    const l3k_llama_block_grads *g;
    DLTensor *workspace;
} bwd_args;

static l3k_status backward(l3k_call *c, const void *args, void *stream) {
    const bwd_args *a = (const bwd_args *)args;
    const DLTensor *dout = a->dout, *x = a->x, *cos = a->cos, *sin = a->sin;
    const l3k_llama_block_weights *w = a->w;
    const l3k_llama_block_config *cfg = a->cfg;
    const l3k_llama_block_activations *saved = a->saved;
    const unsigned flags = a->flags;
    DLTensor *dx = a->dx, *workspace = a->workspace;
    const l3k_llama_block_grads *g = a->g;
    dims d;
    bwd_plan p;
    L3K_TRY(make_dims(c, x, w, cfg, &d));
    L3K_TRY(check_tables(c, cos, sin));
    if (flags & ~L3K_BLOCK_PRESERVE_ACTIVATIONS)
        return l3k_fail(c, L3K_ERROR_VALUE, "flags is %u, expected 0 or L3K_BLOCK_PRESERVE_ACTIVATIONS (%u)",
                        flags, L3K_BLOCK_PRESERVE_ACTIVATIONS);
    const int preserve = (flags & L3K_BLOCK_PRESERVE_ACTIVATIONS) != 0;
    L3K_TRY(check_like_x(c, dout, "dout", x, &d));
    L3K_TRY(check_like_x(c, dx, "dx", x, &d));
    L3K_TRY(check_activations(c, &d, saved));
    proj gqkv, ggu;
    L3K_TRY(check_grads(c, &d, w, g, &gqkv, &ggu));
    L3K_TRY(attention_ws_size(c, x, cfg, &d));
    plan_backward(&d, preserve, ggu.n > 1, &p);
    L3K_TRY(check_workspace_aligned(c, workspace, p.total));
    /* gate_up is written unless preserved; the other activations are read only. */
    tensor_list outs = {.n = 0}, ins = block_inputs(x, cos, sin, w);
    L3K_TRY(check_key_range(c, &d, &ins));
    add(&outs, dx, "dx");
    add(&outs, workspace, "workspace");
    const DLTensor *gs[N_WEIGHTS] = {WEIGHT_FIELDS(g)};
    add_all(&outs, gs, grad_names, N_WEIGHTS);
    if (!preserve) add(&outs, saved->gate_up, "saved->gate_up");
    add(&ins, dout, "dout");
    add_activations(&ins, saved, preserve);
    L3K_TRY(check_disjoint(c, &outs, &ins));
    /* With no token the steps still run: the weight gradients' GEMMs over zero rows write zeros. */
    if (d.dim == 0) return L3K_SUCCESS;

    bwd_views v;
    /* With no token the plan may need no workspace, and a NULL one is then accepted. */
    make_bwd_views(&v, &d, &p, x, dout, dx, saved, preserve, &ggu,
                   workspace ? (char *)l3k_data(workspace) : NULL);
    /* Every step is checked before the first one runs: a refused call writes nothing. */
    l3k_set_checking_only(1);
    const l3k_status st = backward_steps(c, &d, &v, w, cfg, cos, sin, &gqkv, &ggu, g, stream);
    l3k_set_checking_only(0);
    return st ? st : backward_steps(c, &d, &v, w, cfg, cos, sin, &gqkv, &ggu, g, stream);
}

l3k_status l3k_llama_block_backward(const DLTensor *dout, const DLTensor *x, const DLTensor *cos,
                                    const DLTensor *sin, const l3k_llama_block_weights *w,
                                    const l3k_llama_block_config *cfg,
                                    const l3k_llama_block_activations *saved, unsigned flags, DLTensor *dx,
                                    const l3k_llama_block_grads *g, DLTensor *workspace, void *stream) {
    l3k_call c = {.op = "llama_block_backward"};
    const bwd_args a = {dout, x, cos, sin, w, cfg, saved, flags, dx, g, workspace};
    l3k_graph_key k;
    key_common(&k, KEY_BACKWARD, x, cos, sin, w, cfg);
    key_activations(&k, saved);
    l3k_graph_key_word(&k, flags);
    if (!g || g->struct_size < sizeof *g) k.usable = 0;
    const DLTensor *more[] = {dout, dx, workspace};
    for (int i = 0; i < 3; ++i) l3k_graph_key_tensor(&k, more[i]);
    if (k.usable) {
        const DLTensor *gs[N_WEIGHTS] = {WEIGHT_FIELDS(g)};
        for (int i = 0; i < N_WEIGHTS; ++i) l3k_graph_key_tensor(&k, gs[i]);
    }
    return l3k_graph_run(&c, &k, backward, &a, stream);
}
