/* RoPE on q and k: validation and dispatch. */
#include "validate.h"

static const char *dt_str(l3k_dt dt) {
    return dt == L3K_DT_F32 ? "float32" : dt == L3K_DT_F16 ? "float16" : "bfloat16";
}

/* A (batch, heads, seq, head_dim) tensor: float, 4-D, last dim contiguous. */
static l3k_status check_4d(l3k_call *c, const DLTensor *t, const char *name, l3k_dt *dt, int64_t strides[3]) {
    L3K_TRY(l3k_check_tensor(c, t, name));
    L3K_TRY(l3k_check_float(c, t, name, dt));
    if (t->ndim != 4)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s has ndim %d, expected 4 (batch, heads, seq, head_dim)", name,
                        (int)t->ndim);
    if (t->shape[3] > 1 && l3k_stride(t, 3) != 1)
        return l3k_fail(c, L3K_ERROR_LAYOUT, "%s stride[3] is %lld, expected 1 (last dim contiguous)", name,
                        (long long)l3k_stride(t, 3));
    for (int i = 0; i < 3; ++i) strides[i] = l3k_stride(t, i);
    return L3K_SUCCESS;
}

/* An output of the shape and dtype of `in`, in place (the same view) or apart from it. */
static l3k_status check_out(l3k_call *c, const DLTensor *out, const char *name, const DLTensor *in,
                            const char *in_name, l3k_dt dt, int64_t strides[3]) {
    l3k_dt got;
    L3K_TRY(l3k_check_tensor(c, out, name));
    L3K_TRY(l3k_check_dtype(c, out, name, dt, in_name));
    L3K_TRY(check_4d(c, out, name, &got, strides));
    L3K_TRY(l3k_check_same_shape(c, out, name, in, in_name));
    L3K_TRY(l3k_check_no_repeats(c, out, name));
    return l3k_check_no_overlap(c, out, name, in, in_name, 1);
}

l3k_status l3k_check_rope_table(l3k_call *c, const DLTensor *t, const char *name, l3k_dt dt, const char *like,
                                int64_t batch, int64_t half, l3k_dt *tdt, int64_t *rows) {
    char a[32];
    L3K_TRY(l3k_check_tensor(c, t, name));
    l3k_status st = l3k_check_float(c, t, name, tdt);
    if (st == L3K_ERROR_DTYPE || (st == L3K_SUCCESS && *tdt != L3K_DT_F32 && *tdt != dt)) {
        if (dt == L3K_DT_F32)
            return l3k_fail(c, L3K_ERROR_DTYPE, "%s dtype %s, expected float32 like %s", name,
                            l3k_dtype_name(t->dtype, a), like);
        return l3k_fail(c, L3K_ERROR_DTYPE, "%s dtype %s, expected float32 or %s like %s", name,
                        l3k_dtype_name(t->dtype, a), dt_str(dt), like);
    }
    if (st) return st;
    if (t->ndim != 2 && t->ndim != 3)
        return l3k_fail(c, L3K_ERROR_SHAPE,
                        "%s has ndim %d, expected 2 (seq, head_dim/2) or 3 (batch, seq, head_dim/2)", name,
                        (int)t->ndim);
    if (t->shape[t->ndim - 1] != half)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s.shape[%d] is %lld, expected head_dim/2 = %lld", name,
                        t->ndim - 1, (long long)t->shape[t->ndim - 1], (long long)half);
    if (t->ndim == 3 && t->shape[0] != batch && t->shape[0] != 1)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s.shape[0] is %lld, expected the batch size %lld (or 1)", name,
                        (long long)t->shape[0], (long long)batch);
    *rows = t->shape[t->ndim - 2];
    return l3k_check_contiguous_numel(c, t, name, l3k_numel(t));
}

static l3k_status rope(l3k_call *c, const DLTensor *q, const DLTensor *k, const DLTensor *cos,
                       const DLTensor *sin, int64_t offset, int mode, DLTensor *q_out, DLTensor *k_out,
                       int inverse, void *stream, const char *xname) {
    /* Argument names: "q" and "k" for the forward, "dq" and "dk" for the backward. */
    const char *qn = xname[0] == 'd' ? "dq" : "q", *kn = xname[0] == 'd' ? "dk" : "k";
    const char *qon = xname[0] == 'd' ? "dq_out" : "q_out", *kon = xname[0] == 'd' ? "dk_out" : "k_out";
    l3k_dt dt, kdt, tdt, sdt;
    l3k_rope_args a = {0};
    L3K_TRY(check_4d(c, q, qn, &dt, a.q_strides));
    const int64_t batch = q->shape[0], hq = q->shape[1], seq = q->shape[2], d = q->shape[3];
    if (d % 2 != 0)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s head_dim is %lld, expected an even number", qn, (long long)d);
    if (d > 256)
        return l3k_fail(c, L3K_ERROR_SHAPE, "%s head_dim is %lld, expected at most 256", qn, (long long)d);
    if (k) {
        L3K_TRY(l3k_check_tensor(c, k, kn));
        L3K_TRY(l3k_check_dtype(c, k, kn, dt, qn));
        L3K_TRY(check_4d(c, k, kn, &kdt, a.k_strides));
        static const char *dim_name[4] = {"batch", "heads", "seq", "head_dim"};
        static const int dims[3] = {0, 2, 3}; /* heads may differ (GQA) */
        for (int j = 0; j < 3; ++j) {
            const int i = dims[j];
            if (k->shape[i] != q->shape[i])
                return l3k_fail(c, L3K_ERROR_SHAPE, "%s.shape[%d] (%s) is %lld, expected %lld like %s", kn, i,
                                dim_name[i], (long long)k->shape[i], (long long)q->shape[i], qn);
        }
        if (k->shape[1] > 0 && hq % k->shape[1] != 0)
            return l3k_fail(c, L3K_ERROR_SHAPE,
                            "%s has %lld heads, expected a multiple of the %lld heads of %s", qn,
                            (long long)hq, (long long)k->shape[1], kn);
        if (k->shape[1] == 0 && hq > 0)
            return l3k_fail(c, L3K_ERROR_SHAPE, "%s has 0 heads, expected at least 1 (or pass NULL)", kn);
    } else if (k_out) {
        return l3k_fail(c, L3K_ERROR_NULL_POINTER, "%s is NULL but %s is given", kn, kon);
    }
    int64_t crows = 0, srows = 0;
    L3K_TRY(l3k_check_rope_table(c, cos, "cos", dt, "q", batch, d / 2, &tdt, &crows));
    L3K_TRY(l3k_check_rope_table(c, sin, "sin", dt, "q", batch, d / 2, &sdt, &srows));
    if (sdt != tdt) return l3k_check_dtype(c, sin, "sin", tdt, "cos");
    L3K_TRY(l3k_check_same_shape(c, sin, "sin", cos, "cos"));
    if (offset < 0) return l3k_fail(c, L3K_ERROR_VALUE, "offset is %lld, expected >= 0", (long long)offset);
    /* rows >= seq + offset, written so that no sum can wrap (offset may be near INT64_MAX). */
    if (seq > 0 && (crows < seq || offset > crows - seq)) {
        int64_t need;
        if (l3k_add_ok(seq, offset, &need))
            return l3k_fail(c, L3K_ERROR_SHAPE,
                            "cos has %lld rows, expected at least seq + offset = %lld + %lld = %lld",
                            (long long)crows, (long long)seq, (long long)offset, (long long)need);
        return l3k_fail(c, L3K_ERROR_SHAPE,
                        "cos has %lld rows, expected at least seq + offset = %lld + %lld, which passes "
                        "2^63 - 1",
                        (long long)crows, (long long)seq, (long long)offset);
    }
    if (mode != L3K_ROPE_HALF && mode != L3K_ROPE_INTERLEAVED)
        return l3k_fail(c, L3K_ERROR_VALUE,
                        "mode is %d, expected L3K_ROPE_HALF (0) or L3K_ROPE_INTERLEAVED (1)", mode);
    L3K_TRY(check_out(c, q_out, qon, q, qn, dt, a.q_out_strides));
    if (k) {
        if (!k_out) return l3k_fail(c, L3K_ERROR_NULL_POINTER, "%s is NULL but %s is given", kon, kn);
        L3K_TRY(check_out(c, k_out, kon, k, kn, dt, a.k_out_strides));
        if (l3k_numel(k_out) > 0 && l3k_numel(q_out) > 0 && l3k_data(k_out) == l3k_data(q_out))
            return l3k_fail(c, L3K_ERROR_LAYOUT,
                            "%s starts at the same address as %s, expected separate outputs", kon, qon);
    }
    /* The tables are read by every row: an output over them would change later rows' angles. */
    const DLTensor *outs[2] = {q_out, k ? k_out : 0};
    const char *out_names[2] = {qon, kon};
    for (int i = 0; i < 2; ++i) {
        if (!outs[i]) continue;
        L3K_TRY(l3k_check_no_overlap(c, outs[i], out_names[i], cos, "cos", 0));
        L3K_TRY(l3k_check_no_overlap(c, outs[i], out_names[i], sin, "sin", 0));
    }
    const int64_t hk = k ? k->shape[1] : 0;
    if (batch == 0 || seq == 0 || d == 0 || (hq == 0 && hk == 0)) return L3K_SUCCESS;

    a.q = l3k_data(q);
    a.q_out = l3k_data(q_out);
    a.k = k ? l3k_data(k) : 0;
    a.k_out = k ? l3k_data(k_out) : 0;
    a.cos = l3k_data(cos);
    a.sin = l3k_data(sin);
    a.table_batch_stride = cos->ndim == 3 && cos->shape[0] > 1 ? crows * (d / 2) : 0;
    a.batch = batch;
    a.hq = hq;
    a.hk = hk;
    a.seq = seq;
    a.head_dim = d;
    a.offset = offset;
    a.interleaved = mode == L3K_ROPE_INTERLEAVED;
    a.inverse = inverse;
    a.dtype = dt;
    a.table_dtype = tdt;
    return L3K_RUN_KERNEL(c, rope, &a, stream);
}

l3k_status l3k_rope_forward(const DLTensor *q, const DLTensor *k, const DLTensor *cos, const DLTensor *sin,
                            int64_t offset, int mode, DLTensor *q_out, DLTensor *k_out, void *stream) {
    l3k_call c = {.op = "rope_forward"};
    return rope(&c, q, k, cos, sin, offset, mode, q_out, k_out, 0, stream, "q");
}

l3k_status l3k_rope_backward(const DLTensor *dq, const DLTensor *dk, const DLTensor *cos, const DLTensor *sin,
                             int64_t offset, int mode, DLTensor *dq_out, DLTensor *dk_out, void *stream) {
    l3k_call c = {.op = "rope_backward"};
    return rope(&c, dq, dk, cos, sin, offset, mode, dq_out, dk_out, 1, stream, "dq");
}
