/* KV cache append and decode attention: validation and dispatch. */
#include <math.h>

#include "kv_cache.h"
#include "validate.h"

/* The cache pair: (batch, n_kv_heads, capacity, head_dim) each, one float dtype (float32 too on
 * CUDA: these kernels compute on CUDA cores), the same shape. */
static l3k_status check_cache(l3k_call *c, const DLTensor *kc, const DLTensor *vc, l3k_dt *dt, int64_t kst[3],
                              int64_t vst[3]) {
    L3K_TRY(l3k_check_tensor(c, kc, "k_cache"));
    L3K_TRY(l3k_check_float(c, kc, "k_cache", dt));
    L3K_TRY(l3k_check_bhsd(c, kc, "k_cache", *dt, "k_cache", kst));
    L3K_TRY(l3k_check_bhsd(c, vc, "v_cache", *dt, "k_cache", vst));
    L3K_TRY(l3k_check_same_shape(c, vc, "v_cache", kc, "k_cache"));
    return l3k_check_head_dim(c, "k_cache head_dim", kc->shape[3]);
}

/* t: (batch, heads, seq, head_dim) of the cache's dtype, batch and head_dim those of the cache;
 * heads == `heads` when heads >= 0, else a multiple of the cache's kv heads. */
static l3k_status check_tokens(l3k_call *c, const DLTensor *t, const char *name, const DLTensor *kc,
                               l3k_dt dt, int64_t heads, int64_t seq, int64_t strides[3]) {
    L3K_TRY(l3k_check_bhsd(c, t, name, dt, "k_cache", strides));
    static const char *what[4] = {"batch", "heads", "seq", "head_dim"};
    const int64_t want[4] = {kc->shape[0], heads, seq, kc->shape[3]};
    for (int i = 0; i < 4; ++i)
        if (want[i] >= 0 && t->shape[i] != want[i])
            return l3k_fail(c, L3K_ERROR_SHAPE, "%s.shape[%d] (%s) is %lld, expected %lld", name, i, what[i],
                            (long long)t->shape[i], (long long)want[i]);
    const int64_t hkv = kc->shape[1];
    if (heads < 0 && (hkv < 1 || t->shape[1] % hkv != 0))
        return l3k_fail(c, L3K_ERROR_SHAPE,
                        "%s has %lld heads, expected a multiple of the cache's %lld kv heads", name,
                        (long long)t->shape[1], (long long)hkv);
    return L3K_SUCCESS;
}

/* Every written tensor apart from every other tensor of the call (in_place: the pairs allowed to
 * be the very same view, as outs[i] over ins[i]). */
static l3k_status check_apart(l3k_call *c, const DLTensor *const *outs, const char *const *out_names,
                              int n_outs, const DLTensor *const *ins, const char *const *in_names, int n_ins,
                              const int *same_ok) {
    for (int i = 0; i < n_outs; ++i) {
        if (!outs[i]) continue;
        for (int j = i + 1; j < n_outs; ++j)
            if (outs[j]) L3K_TRY(l3k_check_no_overlap(c, outs[i], out_names[i], outs[j], out_names[j], 0));
        for (int j = 0; j < n_ins; ++j)
            if (ins[j])
                L3K_TRY(l3k_check_no_overlap(c, outs[i], out_names[i], ins[j], in_names[j], same_ok[i] == j));
    }
    return L3K_SUCCESS;
}

l3k_status l3k_kv_cache_append(const DLTensor *q, const DLTensor *k, const DLTensor *v, const DLTensor *cos,
                               const DLTensor *sin, const DLTensor *positions, const DLTensor *cache_range,
                               int mode, DLTensor *q_out, DLTensor *k_cache, DLTensor *v_cache,
                               void *stream) {
    l3k_call c = {.op = "kv_cache_append"};
    l3k_kv_append_args a = {0};
    L3K_TRY(check_cache(&c, k_cache, v_cache, &a.dtype, a.kc_stride, a.vc_stride));
    const int64_t B = k_cache->shape[0], hkv = k_cache->shape[1], D = k_cache->shape[3];
    L3K_TRY(l3k_check_tensor(&c, k, "k"));
    if (k->ndim != 4)
        return l3k_fail(&c, L3K_ERROR_SHAPE, "k has ndim %d, expected 4 (batch, n_kv_heads, seq, head_dim)",
                        (int)k->ndim);
    const int64_t seq = k->shape[2];
    L3K_TRY(check_tokens(&c, k, "k", k_cache, a.dtype, hkv, seq, a.k_stride));
    L3K_TRY(check_tokens(&c, v, "v", k_cache, a.dtype, hkv, seq, a.v_stride));
    if (!q != !q_out)
        return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "%s is NULL but %s is given: give both or neither",
                        q ? "q_out" : "q", q ? "q" : "q_out");
    if (q) {
        L3K_TRY(l3k_check_tensor(&c, q, "q"));
        L3K_TRY(check_tokens(&c, q, "q", k_cache, a.dtype, -1, seq, a.q_stride));
        L3K_TRY(check_tokens(&c, q_out, "q_out", k_cache, a.dtype, q->shape[1], seq, a.q_out_stride));
    }
    l3k_dt sdt;
    int64_t rows, srows;
    L3K_TRY(l3k_check_rope_table(&c, cos, "cos", a.dtype, "k_cache", B, D / 2, &a.table_dtype, &rows));
    L3K_TRY(l3k_check_rope_table(&c, sin, "sin", a.dtype, "k_cache", B, D / 2, &sdt, &srows));
    if (sdt != a.table_dtype) return l3k_check_dtype(&c, sin, "sin", a.table_dtype, "cos");
    L3K_TRY(l3k_check_same_shape(&c, sin, "sin", cos, "cos"));
    if (positions) {
        L3K_TRY(l3k_check_exact_dtype(&c, positions, "positions", (DLDataType){kDLInt, 32, 1}));
        if (positions->ndim != 1 || positions->shape[0] != B)
            return l3k_fail(
                &c, L3K_ERROR_SHAPE, "positions has ndim %d and %lld elements, expected shape (%lld,)",
                (int)positions->ndim, (long long)(positions->ndim ? positions->shape[0] : 0), (long long)B);
        L3K_TRY(l3k_check_packed(&c, positions, "positions", B));
    } else if (rows < seq) {
        return l3k_fail(&c, L3K_ERROR_SHAPE,
                        "cos has %lld rows, expected at least seq = %lld (without positions, new token i "
                        "reads row i)",
                        (long long)rows, (long long)seq);
    }
    L3K_TRY(l3k_check_key_range(&c, cache_range, "cache_range", B));
    if (mode != L3K_ROPE_HALF && mode != L3K_ROPE_INTERLEAVED)
        return l3k_fail(&c, L3K_ERROR_VALUE,
                        "mode is %d, expected L3K_ROPE_HALF (0) or L3K_ROPE_INTERLEAVED (1)", mode);
    const DLTensor *outs[3] = {q_out, k_cache, v_cache};
    static const char *out_names[3] = {"q_out", "k_cache", "v_cache"};
    for (int i = 0; i < 3; ++i)
        if (outs[i]) L3K_TRY(l3k_check_no_repeats(&c, outs[i], out_names[i]));
    const DLTensor *ins[7] = {q, k, v, cos, sin, positions, cache_range};
    static const char *in_names[7] = {"q", "k", "v", "cos", "sin", "positions", "cache_range"};
    /* In place (q_out the very view of q), q's heads may interleave with k's and v's, views of one
     * fused QKV projection as in the block: the byte-range test would refuse them, so q_out is held
     * apart from the tables, positions and range only (each element of q is read, then written, by
     * one thread; k and v are not written). */
    static const int q_out_apart[3] = {-1, -1, -1}, q_out_may_be_q[3] = {0, -1, -1};
    const int in_place = q && l3k_same_view(q_out, q);
    if (in_place) {
        L3K_TRY(check_apart(&c, outs, out_names, 3, ins + 3, in_names + 3, 4, q_out_apart));
        L3K_TRY(check_apart(&c, outs + 1, out_names + 1, 2, ins, in_names, 3, q_out_apart));
    } else {
        L3K_TRY(check_apart(&c, outs, out_names, 3, ins, in_names, 7, q_out_may_be_q));
    }
    /* A cache of no slot takes no token, but q is still rotated. */
    if (B == 0 || seq == 0 || hkv == 0 || (k_cache->shape[2] == 0 && !q)) return L3K_SUCCESS;
    a.batch = B;
    a.n_heads = q ? q->shape[1] : 0;
    a.n_kv_heads = hkv;
    a.seq = seq;
    a.head_dim = D;
    a.capacity = k_cache->shape[2];
    a.q = q ? l3k_data(q) : 0;
    a.q_out = q ? l3k_data(q_out) : 0;
    a.k = l3k_data(k);
    a.v = l3k_data(v);
    a.k_cache = l3k_data(k_cache);
    a.v_cache = l3k_data(v_cache);
    a.cos = l3k_data(cos);
    a.sin = l3k_data(sin);
    a.table_rows = rows;
    a.table_batch_stride = cos->ndim == 3 && cos->shape[0] > 1 ? rows * (D / 2) : 0;
    a.positions = positions ? (const int32_t *)l3k_data(positions) : 0;
    a.cache_range = (const int32_t *)l3k_data(cache_range);
    a.interleaved = mode == L3K_ROPE_INTERLEAVED;
    return L3K_RUN_KERNEL(&c, kv_append, &a, stream);
}

/* The workspace bytes, once every product behind them is known to fit. */
static l3k_status decode_workspace(l3k_call *c, const DLTensor *q, const DLTensor *kc, size_t *bytes) {
    const int64_t B = q->shape[0], H = q->shape[1], S = q->shape[2], D = q->shape[3];
    const int64_t hkv = kc->shape[1], cap = kc->shape[2];
    *bytes = 0;
    if (!l3k_on_cuda(c) || B == 0 || H == 0 || S == 0 || hkv == 0) return L3K_SUCCESS;
    const int64_t splits = l3k_decode_attn_splits(B, H, hkv, S, cap);
    int64_t n, width;
    L3K_TRY(l3k_size_mul(c, "workspace: batch * n_heads", B, H, &n));
    L3K_TRY(l3k_size_mul(c, "workspace: batch * n_heads * seq", n, S, &n));
    L3K_TRY(l3k_size_add(c, "workspace: head_dim + 2", D, 2, &width));
    L3K_TRY(l3k_size_mul(c, "workspace: rows * (head_dim + 2)", n, width, &n));
    L3K_TRY(l3k_size_mul(c, "workspace: rows * (head_dim + 2) * splits", n, splits, &n));
    L3K_TRY(l3k_size_mul(c, "workspace bytes", n, 4, &n));
    L3K_TRY(l3k_size_add(c, "workspace bytes with alignment", n, 256, &n));
    *bytes = l3k_decode_attn_workspace_bytes(B, H, hkv, S, cap, D, 1);
    return L3K_SUCCESS;
}

/* q against the cache: shapes that agree (checked after the cache). */
static l3k_status check_decode_shapes(l3k_call *c, const DLTensor *q, const DLTensor *kc) {
    L3K_TRY(l3k_check_tensor(c, q, "q"));
    L3K_TRY(l3k_check_tensor(c, kc, "k_cache"));
    if (q->ndim != 4 || kc->ndim != 4)
        return l3k_fail(c, L3K_ERROR_SHAPE, "q and k_cache have ndim %d and %d, expected 4", (int)q->ndim,
                        (int)kc->ndim);
    return L3K_SUCCESS;
}

l3k_status l3k_attention_decode_workspace_size(const DLTensor *q, const DLTensor *k_cache, size_t *bytes) {
    l3k_call c = {.op = "attention_decode_workspace_size"};
    if (!bytes) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "bytes is NULL");
    L3K_TRY(check_decode_shapes(&c, q, k_cache));
    return decode_workspace(&c, q, k_cache, bytes);
}

l3k_status l3k_attention_decode(const DLTensor *q, const DLTensor *k_cache, const DLTensor *v_cache,
                                const DLTensor *cache_range, float scale, DLTensor *o, DLTensor *workspace,
                                void *stream) {
    l3k_call c = {.op = "attention_decode"};
    l3k_decode_attn_args a = {0};
    L3K_TRY(check_cache(&c, k_cache, v_cache, &a.dtype, a.k_stride, a.v_stride));
    L3K_TRY(l3k_check_tensor(&c, q, "q"));
    if (q->ndim != 4)
        return l3k_fail(&c, L3K_ERROR_SHAPE, "q has ndim %d, expected 4 (batch, n_heads, seq, head_dim)",
                        (int)q->ndim);
    L3K_TRY(check_tokens(&c, q, "q", k_cache, a.dtype, -1, q->shape[2], a.q_stride));
    L3K_TRY(l3k_check_tensor(&c, o, "o"));
    L3K_TRY(check_tokens(&c, o, "o", k_cache, a.dtype, q->shape[1], q->shape[2], a.o_stride));
    L3K_TRY(l3k_check_key_range(&c, cache_range, "cache_range", q->shape[0]));
    if (!isfinite(scale) || scale < 0.0f)
        return l3k_fail(&c, L3K_ERROR_VALUE, "scale is %g, expected > 0 (or 0 for 1/sqrt(head_dim))",
                        (double)scale);
    size_t need;
    L3K_TRY(decode_workspace(&c, q, k_cache, &need));
    L3K_TRY(l3k_check_workspace(&c, workspace, need));
    if (need && (uintptr_t)l3k_data(workspace) % 256 != 0)
        return l3k_fail(&c, L3K_ERROR_ALIGNMENT, "workspace data pointer %p is not 256-byte aligned",
                        l3k_data(workspace));
    L3K_TRY(l3k_check_no_repeats(&c, o, "o"));
    const DLTensor *outs[2] = {o, need ? workspace : NULL};
    static const char *out_names[2] = {"o", "workspace"};
    const DLTensor *ins[4] = {q, k_cache, v_cache, cache_range};
    static const char *in_names[4] = {"q", "k_cache", "v_cache", "cache_range"};
    static const int same_ok[2] = {-1, -1};
    L3K_TRY(check_apart(&c, outs, out_names, 2, ins, in_names, 4, same_ok));
    const int64_t D = q->shape[3];
    if (q->shape[0] == 0 || q->shape[1] == 0 || q->shape[2] == 0) return L3K_SUCCESS;
    a.batch = q->shape[0];
    a.n_heads = q->shape[1];
    a.n_kv_heads = k_cache->shape[1];
    a.seq_q = q->shape[2];
    a.capacity = k_cache->shape[2];
    a.head_dim = D;
    a.q = l3k_data(q);
    a.k_cache = l3k_data(k_cache);
    a.v_cache = l3k_data(v_cache);
    a.o = l3k_data(o);
    a.cache_range = (const int32_t *)l3k_data(cache_range);
    a.scale = scale > 0.0f ? scale : 1.0f / sqrtf((float)D);
    a.workspace = need ? l3k_data(workspace) : 0;
    a.workspace_bytes = need;
    return L3K_RUN_KERNEL(&c, decode_attn, &a, stream);
}
