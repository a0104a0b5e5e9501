/* Flash attention: validation and dispatch. */
#include <math.h>

#include "attention.h"
#include "validate.h"

l3k_status l3k_check_bhsd(l3k_call *c, const DLTensor *t, const char *name, l3k_dt dt, const char *like,
                          int64_t strides[3]) {
    L3K_TRY(l3k_check_tensor(c, t, name));
    L3K_TRY(like ? l3k_check_dtype(c, t, name, dt, like) : L3K_SUCCESS);
    if (t->ndim != 4)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim %d, expected 4 (batch, heads, seq, head_dim)", name,
                        (int)t->ndim);
    if (l3k_numel(t) == 0) {
        strides[0] = strides[1] = strides[2] = 0;
        return L3K_SUCCESS;
    }
    if (t->shape[3] > 1 && l3k_stride(t, 3) != 1)
        return l3k_fail(c, L3K_ERROR_LAYOUT, "%s stride[3] is %lld, expected 1 (head_dim contiguous)", name,
                        (long long)l3k_stride(t, 3));
    for (int i = 0; i < 3; ++i) strides[i] = l3k_stride(t, i);
    if (c->device.device_type == kDLCUDA) {
        if ((uintptr_t)l3k_data(t) % 16 != 0)
            return l3k_fail(c, L3K_ERROR_ALIGNMENT, "%s data pointer %p is not 16-byte aligned", name,
                            l3k_data(t));
        for (int i = 0; i < 3; ++i)
            if (t->shape[i] > 1 && strides[i] % 8 != 0)
                return l3k_fail(c, L3K_ERROR_LAYOUT,
                                "%s stride[%d] is %lld, expected a multiple of 8 elements on CUDA", name, i,
                                (long long)strides[i]);
    }
    return L3K_SUCCESS;
}

/* batch * n_heads * seq_q: the rows of lse (0 when any size is 0). */
static l3k_status lse_rows(l3k_call *c, int64_t B, int64_t H, int64_t Sq, int64_t *rows) {
    *rows = 0;
    if (B == 0 || H == 0 || Sq == 0) return L3K_SUCCESS;
    int64_t bh;
    L3K_TRY(l3k_size_mul(c, "lse size batch * n_heads", B, H, &bh));
    return l3k_size_mul(c, "lse size batch * n_heads * seq_q", bh, Sq, rows);
}

/* The backward's workspace bytes, once every product in l3k_attn_bwd_workspace_bytes
 * is known to fit (q may repeat elements through stride 0, so its element
 * count bounds nothing in bytes).  The CPU needs none. */
static l3k_status workspace_bytes(l3k_call *c, int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk,
                                  int64_t D, int deterministic, size_t *bytes) {
    if (!l3k_on_cuda(c)) {
        *bytes = 0;
        return L3K_SUCCESS;
    }
    int64_t rows, elems, need;
    L3K_TRY(lse_rows(c, B, H, Sq, &rows));
    L3K_TRY(l3k_size_mul(c, "workspace size batch * n_heads * seq_q * head_dim", rows, D, &elems));
    L3K_TRY(
        l3k_size_add(c, "workspace size (batch * n_heads * seq_q) * (head_dim + 1)", elems, rows, &elems));
    L3K_TRY(
        l3k_size_mul(c, "workspace bytes (batch * n_heads * seq_q) * (head_dim + 1) * 4", elems, 4, &need));
    L3K_TRY(l3k_size_add(c, "workspace bytes with alignment", need, 512, &need));
    *bytes = l3k_attn_bwd_workspace_bytes(B, H, Hkv, Sq, Sk, D, deterministic, l3k_on_cuda(c));
    return L3K_SUCCESS;
}

/* q, k, v, o (and lse) of either pass, filled into the forward's argument block. */
static l3k_status check_qkv(l3k_call *c, const DLTensor *q, const DLTensor *k, const DLTensor *v,
                            const DLTensor *o, const DLTensor *lse, float scale, int causal,
                            l3k_attn_fwd_args *a) {
    l3k_dt dt;
    L3K_TRY(l3k_check_tensor(c, q, "q"));
    L3K_TRY(l3k_check_float(c, q, "q", &dt));
    if (c->device.device_type == kDLCUDA && dt == L3K_DT_F32)
        return l3k_fail(c, L3K_ERROR_DTYPE,
                        "q dtype float32 on CUDA, expected float16 or bfloat16 (float32 runs on the CPU)");
    L3K_TRY(l3k_check_bhsd(c, q, "q", dt, 0, a->q_stride));
    L3K_TRY(l3k_check_bhsd(c, k, "k", dt, "q", a->k_stride));
    L3K_TRY(l3k_check_bhsd(c, v, "v", dt, "q", a->v_stride));
    L3K_TRY(l3k_check_same_shape(c, v, "v", k, "k"));
    const int64_t B = q->shape[0], H = q->shape[1], Sq = q->shape[2], D = q->shape[3];
    const int64_t Hkv = k->shape[1], Sk = k->shape[2];
    if (k->shape[0] != B)
        return l3k_fail(c, L3K_ERROR_SHAPE, "k batch is %lld, expected %lld like q", (long long)k->shape[0],
                        (long long)B);
    if (k->shape[3] != D)
        return l3k_fail(c, L3K_ERROR_SHAPE, "k head_dim is %lld, expected %lld like q",
                        (long long)k->shape[3], (long long)D);
    if (Hkv < 1 || H % Hkv != 0)
        return l3k_fail(c, L3K_ERROR_SHAPE, "q has %lld heads, expected a multiple of k's %lld heads",
                        (long long)H, (long long)Hkv);
    L3K_TRY(l3k_check_head_dim(c, "head_dim", D));
    L3K_TRY(l3k_check_bhsd(c, o, "o", dt, "q", a->o_stride));
    L3K_TRY(l3k_check_same_shape(c, o, "o", q, "q"));
    int64_t rows;
    L3K_TRY(lse_rows(c, B, H, Sq, &rows));
    L3K_TRY(l3k_check_f32_vector(c, lse, "lse", rows));
    const DLTensor *ins[3] = {q, k, v};
    static const char *in_names[3] = {"q", "k", "v"};
    for (int i = 0; i < 3; ++i) L3K_TRY(l3k_check_no_overlap(c, o, "o", ins[i], in_names[i], 0));
    /* lse is the forward's output too and the backward's input: apart from the rest either way. */
    for (int i = 0; i < 3; ++i) L3K_TRY(l3k_check_no_overlap(c, lse, "lse", ins[i], in_names[i], 0));
    L3K_TRY(l3k_check_no_overlap(c, lse, "lse", o, "o", 0));
    if (!isfinite(scale) || scale < 0.0f)
        return l3k_fail(c, L3K_ERROR_VALUE, "scale is %g, expected > 0 (or 0 for 1/sqrt(head_dim))",
                        (double)scale);
    a->q = l3k_data(q);
    a->k = l3k_data(k);
    a->v = l3k_data(v);
    a->o = l3k_data(o);
    a->lse = (float *)l3k_data(lse);
    a->batch = B;
    a->n_heads = H;
    a->n_kv_heads = Hkv;
    a->seq_q = Sq;
    a->seq_k = Sk;
    a->head_dim = D;
    a->scale = scale > 0.0f ? scale : 1.0f / sqrtf((float)D);
    a->causal = causal != 0;
    a->dtype = dt;
    return L3K_SUCCESS;
}

l3k_status l3k_check_key_range(l3k_call *c, const DLTensor *kr, const char *name, int64_t batch) {
    L3K_TRY(l3k_check_exact_dtype(c, kr, name, (DLDataType){kDLInt, 32, 1}));
    if (kr->ndim != 2)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim %d, expected 2 (batch, [start, end))", name,
                        (int)kr->ndim);
    if (kr->shape[0] != batch || kr->shape[1] != 2)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s shape (%lld, %lld), expected (%lld, 2) (batch, [start, end))",
                        name, (long long)kr->shape[0], (long long)kr->shape[1], (long long)batch);
    return l3k_check_packed(c, kr, name, 2 * batch);
}

/* key_range: NULL, or as l3k_check_key_range, apart from every output. */
static l3k_status check_key_range(l3k_call *c, const DLTensor *kr, int64_t batch, DLTensor *const *outs,
                                  const char *const *out_names, int n_outs, l3k_attn_fwd_args *a) {
    a->key_range = 0;
    if (!kr) return L3K_SUCCESS;
    L3K_TRY(l3k_check_key_range(c, kr, "key_range", batch));
    for (int i = 0; i < n_outs; ++i)
        if (outs[i]) L3K_TRY(l3k_check_no_overlap(c, outs[i], out_names[i], kr, "key_range", 0));
    a->key_range = (const int32_t *)l3k_data(kr);
    return L3K_SUCCESS;
}

l3k_status l3k_attention_forward(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                 const DLTensor *key_range, float scale, int causal, DLTensor *o,
                                 DLTensor *lse, void *stream) {
    l3k_call c = {.op = "attention_forward"};
    l3k_attn_fwd_args a = {0};
    L3K_TRY(check_qkv(&c, q, k, v, o, lse, scale, causal, &a));
    DLTensor *const outs[2] = {o, lse};
    static const char *const out_names[2] = {"o", "lse"};
    L3K_TRY(check_key_range(&c, key_range, a.batch, outs, out_names, 2, &a));
    if (a.batch == 0 || a.n_heads == 0 || a.seq_q == 0) return L3K_SUCCESS;
    return L3K_RUN_KERNEL(&c, attn_fwd, &a, stream);
}

l3k_status l3k_attention_backward_workspace_size(const DLTensor *q, const DLTensor *k, int deterministic,
                                                 size_t *bytes) {
    l3k_call c = {.op = "attention_backward_workspace_size"};
    if (!bytes) return l3k_fail(&c, L3K_ERROR_NULL_POINTER, "bytes is NULL");
    L3K_TRY(l3k_check_tensor(&c, q, "q"));
    L3K_TRY(l3k_check_tensor(&c, k, "k"));
    if (q->ndim != 4 || k->ndim != 4)
        return l3k_fail(&c, L3K_ERROR_SHAPE, "q and k have ndim %d and %d, expected 4", (int)q->ndim,
                        (int)k->ndim);
    return workspace_bytes(&c, q->shape[0], q->shape[1], k->shape[1], q->shape[2], k->shape[2], q->shape[3],
                           deterministic != 0, bytes);
}

l3k_status l3k_attention_backward(const DLTensor *dout, const DLTensor *q, const DLTensor *k,
                                  const DLTensor *v, const DLTensor *key_range, const DLTensor *o,
                                  const DLTensor *lse, float scale, int causal, int deterministic,
                                  DLTensor *dq, DLTensor *dk, DLTensor *dv, DLTensor *workspace,
                                  void *stream) {
    l3k_call c = {.op = "attention_backward"};
    l3k_attn_bwd_args a = {0};
    L3K_TRY(check_qkv(&c, q, k, v, o, lse, scale, causal, &a.f));
    L3K_TRY(l3k_check_bhsd(&c, dout, "dout", a.f.dtype, "q", a.do_stride));
    L3K_TRY(l3k_check_same_shape(&c, dout, "dout", q, "q"));
    L3K_TRY(l3k_check_bhsd(&c, dq, "dq", a.f.dtype, "q", a.dq_stride));
    L3K_TRY(l3k_check_same_shape(&c, dq, "dq", q, "q"));
    L3K_TRY(l3k_check_bhsd(&c, dk, "dk", a.f.dtype, "q", a.dk_stride));
    L3K_TRY(l3k_check_same_shape(&c, dk, "dk", k, "k"));
    L3K_TRY(l3k_check_bhsd(&c, dv, "dv", a.f.dtype, "q", a.dv_stride));
    L3K_TRY(l3k_check_same_shape(&c, dv, "dv", v, "v"));
    /* The gradients may share one buffer (views of a fused dQKV) but no input's memory. */
    const DLTensor *outs[3] = {dq, dk, dv}, *ins[5] = {dout, q, k, v, o};
    static const char *out_names[3] = {"dq", "dk", "dv"}, *in_names[5] = {"dout", "q", "k", "v", "o"};
    for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 5; ++j)
            L3K_TRY(l3k_check_no_overlap(&c, outs[i], out_names[i], ins[j], in_names[j], 0));
        L3K_TRY(l3k_check_no_overlap(&c, outs[i], out_names[i], lse, "lse", 0));
    }
    size_t need;
    L3K_TRY(workspace_bytes(&c, a.f.batch, a.f.n_heads, a.f.n_kv_heads, a.f.seq_q, a.f.seq_k, a.f.head_dim,
                            deterministic != 0, &need));
    L3K_TRY(l3k_check_workspace(&c, workspace, need));
    if (need && (uintptr_t)l3k_data(workspace) % 256 != 0)
        return l3k_fail(&c, L3K_ERROR_ALIGNMENT, "workspace data pointer %p is not 256-byte aligned",
                        l3k_data(workspace));
    if (need) {
        const DLTensor *all[9] = {dout, q, k, v, o, lse, dq, dk, dv};
        static const char *all_names[9] = {"dout", "q", "k", "v", "o", "lse", "dq", "dk", "dv"};
        for (int i = 0; i < 9; ++i)
            L3K_TRY(l3k_check_no_overlap(&c, workspace, "workspace", all[i], all_names[i], 0));
    }
    DLTensor *const kr_outs[4] = {dq, dk, dv, need ? workspace : NULL};
    static const char *const kr_out_names[4] = {"dq", "dk", "dv", "workspace"};
    L3K_TRY(check_key_range(&c, key_range, a.f.batch, kr_outs, kr_out_names, 4, &a.f));
    a.dout = l3k_data(dout);
    a.dq = l3k_data(dq);
    a.dk = l3k_data(dk);
    a.dv = l3k_data(dv);
    a.workspace = need ? l3k_data(workspace) : 0;
    a.workspace_bytes = need;
    a.deterministic = deterministic != 0;
    if (a.f.batch == 0 || a.f.n_kv_heads == 0 || a.f.head_dim == 0) return L3K_SUCCESS;
    return L3K_RUN_KERNEL(&c, attn_bwd, &a, stream);
}
