/* Descriptors whose sizes, strides or offsets overflow 64-bit arithmetic: every
 * public op refuses them with a message naming the op, and touches no byte.
 * Without the checks these calls either pass validation on a wrapped size and
 * then read or write far outside the buffers, or hand a wrapped workspace size
 * to the caller. */
#include <stdint.h>

#include "check.h"

enum { MAX_ARGS = 10 };

/* One argument of an op's valid small call: its name (as the op's messages give it), dtype and shape. */
typedef struct {
    const char *name;
    l3k_dt dt;
    int ndim;
    int64_t shape[4];
} arg_spec;

/* One op's valid small arguments, each in its own exact-size buffer. */
typedef struct {
    const char *op;
    int n;
    const char *names[MAX_ARGS];
    host_tensor t[MAX_ARGS];
    void *buf[MAX_ARGS];
    size_t bytes[MAX_ARGS];
} op_args;

typedef l3k_status (*op_fn)(DLTensor **a);

static void add_arg(op_args *o, const arg_spec *a) {
    size_t count = 1;
    for (int i = 0; i < a->ndim; ++i) count *= (size_t)a->shape[i];
    const int i = o->n++;
    o->names[i] = a->name;
    o->bytes[i] = count * l3k_dt_size(a->dt);
    o->buf[i] = malloc(o->bytes[i]);
    for (size_t e = 0; e < count; ++e) {
        if (a->dt == L3K_DT_F32) ((float *)o->buf[i])[e] = 0.25f;
        else ((uint16_t *)o->buf[i])[e] = 0x3e80; /* 0.25 in bfloat16 */
    }
    set_tensor(&o->t[i], o->buf[i], a->dt, a->ndim, a->shape, NULL);
}

static size_t g_ws_bytes;

static l3k_status rms_fwd(DLTensor **a) { return l3k_rmsnorm_forward(a[0], a[1], 1e-5f, a[2], a[3], NULL); }
static l3k_status add_rms_fwd(DLTensor **a) {
    return l3k_add_rmsnorm_forward(a[0], a[1], a[2], 1e-5f, a[3], a[4], a[5], NULL);
}
static l3k_status rms_bwd(DLTensor **a) {
    return l3k_rmsnorm_backward(a[0], a[1], a[2], a[3], a[4], 1e-5f, a[5], a[6], a[7], NULL);
}
static l3k_status rms_ws(DLTensor **a) { return l3k_rmsnorm_backward_workspace_size(a[0], &g_ws_bytes); }
static l3k_status rope_fwd(DLTensor **a) {
    return l3k_rope_forward(a[0], a[1], a[2], a[3], 1, 0, a[4], a[5], NULL);
}
static l3k_status rope_bwd(DLTensor **a) {
    return l3k_rope_backward(a[0], a[1], a[2], a[3], 1, 1, a[4], a[5], NULL);
}
static l3k_status swiglu_fwd(DLTensor **a) { return l3k_swiglu_forward(a[0], a[1], a[2], NULL); }
static l3k_status swiglu_ffwd(DLTensor **a) { return l3k_swiglu_fused_forward(a[0], a[1], NULL); }
static l3k_status swiglu_bwd(DLTensor **a) {
    return l3k_swiglu_backward(a[0], a[1], a[2], a[3], a[4], a[5], NULL);
}
static l3k_status swiglu_fbwd(DLTensor **a) {
    return l3k_swiglu_fused_backward(a[0], a[1], a[2], a[3], NULL);
}
static l3k_status lin_fwd(DLTensor **a) { return l3k_linear_forward(a[0], a[1], a[2], a[3], a[4], NULL); }
static l3k_status lin_bwd_in(DLTensor **a) {
    return l3k_linear_backward_input(a[0], a[1], a[2], 1, a[3], NULL);
}
static l3k_status lin_bwd_w(DLTensor **a) {
    return l3k_linear_backward_weight(a[0], a[1], a[2], 1, a[3], NULL);
}
static l3k_status lin_ws(DLTensor **a) { return l3k_linear_workspace_size(a[0], &g_ws_bytes); }
static l3k_status attn_fwd(DLTensor **a) {
    return l3k_attention_forward(a[0], a[1], a[2], NULL, 0.0f, 1, a[3], a[4], NULL);
}
static l3k_status attn_bwd(DLTensor **a) {
    return l3k_attention_backward(a[0], a[1], a[2], a[3], NULL, a[4], a[5], 0.0f, 1, 0, a[6], a[7], a[8],
                                  a[9], NULL);
}
static l3k_status attn_ws(DLTensor **a) {
    return l3k_attention_backward_workspace_size(a[0], a[1], 0, &g_ws_bytes);
}

#define F32 L3K_DT_F32
#define BF16 L3K_DT_BF16

/* ARG("x", F32, 3, 8): an arg_spec whose ndim is the number of dims listed. */
#define N_DIMS(...) (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t))
#define ARG(name, dt, ...)                             \
    {                                                  \
        name, dt, N_DIMS(__VA_ARGS__), { __VA_ARGS__ } \
    }

/* An op: its name, its call, and its valid small arguments in call order (a NULL name ends them). */
typedef struct {
    const char *op;
    op_fn fn;
    arg_spec args[MAX_ARGS];
} op_spec;

static const op_spec OPS[] = {
    {"rmsnorm_forward",
     rms_fwd,
     {ARG("x", BF16, 3, 8), ARG("weight", BF16, 8), ARG("y", BF16, 3, 8), ARG("rstd", F32, 3)}},
    {"add_rmsnorm_forward",
     add_rms_fwd,
     {ARG("x", F32, 3, 8), ARG("residual", F32, 3, 8), ARG("weight", F32, 8), ARG("h", F32, 3, 8),
      ARG("y", F32, 3, 8), ARG("rstd", F32, 3)}},
    {"rmsnorm_backward",
     rms_bwd,
     {ARG("dy", F32, 3, 8), ARG("dh", F32, 3, 8), ARG("x", F32, 3, 8), ARG("weight", F32, 8),
      ARG("rstd", F32, 3), ARG("dx", F32, 3, 8), ARG("dweight", F32, 8), ARG("workspace", F32, 4096)}},
    {"rmsnorm_backward_workspace_size", rms_ws, {ARG("x", F32, 3, 8)}},
    {"rope_forward",
     rope_fwd,
     {ARG("q", BF16, 1, 2, 3, 8), ARG("k", BF16, 1, 1, 3, 8), ARG("cos", F32, 4, 4), ARG("sin", F32, 4, 4),
      ARG("q_out", BF16, 1, 2, 3, 8), ARG("k_out", BF16, 1, 1, 3, 8)}},
    {"rope_backward",
     rope_bwd,
     {ARG("dq", BF16, 1, 2, 3, 8), ARG("dk", BF16, 1, 1, 3, 8), ARG("cos", F32, 4, 4), ARG("sin", F32, 4, 4),
      ARG("dq_out", BF16, 1, 2, 3, 8), ARG("dk_out", BF16, 1, 1, 3, 8)}},
    {"swiglu_forward", swiglu_fwd, {ARG("g", F32, 3, 8), ARG("u", F32, 3, 8), ARG("a", F32, 3, 8)}},
    {"swiglu_fused_forward", swiglu_ffwd, {ARG("gu", BF16, 3, 16), ARG("a", BF16, 3, 8)}},
    {"swiglu_backward",
     swiglu_bwd,
     {ARG("da", F32, 3, 8), ARG("g", F32, 3, 8), ARG("u", F32, 3, 8), ARG("dg", F32, 3, 8),
      ARG("du", F32, 3, 8), ARG("a", F32, 3, 8)}},
    {"swiglu_fused_backward",
     swiglu_fbwd,
     {ARG("da", F32, 3, 8), ARG("gu", F32, 3, 16), ARG("dgu", F32, 3, 16), ARG("a", F32, 3, 8)}},
    {"linear_forward",
     lin_fwd,
     {ARG("x", F32, 3, 8), ARG("weight", F32, 4, 8), ARG("residual", F32, 3, 4), ARG("y", F32, 3, 4),
      ARG("workspace", F32, 64)}},
    {"linear_backward_input",
     lin_bwd_in,
     {ARG("dy", F32, 3, 4), ARG("weight", F32, 4, 8), ARG("dx", F32, 3, 8), ARG("workspace", F32, 64)}},
    {"linear_backward_weight",
     lin_bwd_w,
     {ARG("dy", BF16, 3, 4), ARG("x", BF16, 3, 8), ARG("dweight", F32, 4, 8), ARG("workspace", F32, 64)}},
    {"linear_workspace_size", lin_ws, {ARG("x", F32, 3, 8)}},
    {"attention_forward",
     attn_fwd,
     {ARG("q", BF16, 1, 2, 3, 8), ARG("k", BF16, 1, 1, 3, 8), ARG("v", BF16, 1, 1, 3, 8),
      ARG("o", BF16, 1, 2, 3, 8), ARG("lse", F32, 6)}},
    {"attention_backward",
     attn_bwd,
     {ARG("dout", F32, 1, 2, 3, 8), ARG("q", F32, 1, 2, 3, 8), ARG("k", F32, 1, 1, 3, 8),
      ARG("v", F32, 1, 1, 3, 8), ARG("o", F32, 1, 2, 3, 8), ARG("lse", F32, 6), ARG("dq", F32, 1, 2, 3, 8),
      ARG("dk", F32, 1, 1, 3, 8), ARG("dv", F32, 1, 1, 3, 8), ARG("workspace", F32, 64)}},
    {"attention_backward_workspace_size", attn_ws, {ARG("q", F32, 1, 2, 3, 8), ARG("k", F32, 1, 1, 3, 8)}},
};

/* The op's arguments, each in its own buffer of 0.25s. */
static void build(const op_spec *spec, op_args *o) {
    memset(o, 0, sizeof *o);
    o->op = spec->op;
    for (int i = 0; i < MAX_ARGS && spec->args[i].name; ++i) add_arg(o, &spec->args[i]);
}

static void free_args(op_args *o) {
    for (int i = 0; i < o->n; ++i) free(o->buf[i]);
}

/* The first dim of t with at least two elements (every test tensor has one). */
static int long_dim(const DLTensor *t) {
    for (int i = 0; i < t->ndim; ++i)
        if (t->shape[i] >= 2) return i;
    return 0;
}

enum { N_HOSTILE = 7 };

/* Make t hostile in way `kind`, keeping its (small, real) data pointer. */
static const char *make_hostile(host_tensor *h, int kind) {
    DLTensor *t = &h->t;
    const int d = long_dim(t);
    for (int i = 0; i < t->ndim; ++i) h->strides[i] = compact_stride(t, i);
    switch (kind) {
        case 0: /* element count past 2^63: wraps to a small or zero count */
            h->shape[d] = (int64_t)1 << 62;
            if (t->ndim == 1) h->shape[d] = INT64_MAX;
            else h->shape[d == 0 ? 1 : 0] *= 4;
            return "element count past 2^63";
        case 1: /* a stride whose span passes 2^63 bytes */
            t->strides = h->strides;
            h->strides[d] = (int64_t)1 << 62;
            return "stride 2^62";
        case 2: /* a span that overflows int64 elements outright */
            t->strides = h->strides;
            h->strides[d] = INT64_MAX / 2 + 1;
            h->shape[d] = 3;
            return "stride span overflows";
        case 3: /* reaches below address 0 */
            t->strides = h->strides;
            h->strides[d] = -((int64_t)1 << 61);
            return "negative stride below address 0";
        case 4:
            t->byte_offset = (uint64_t)1 << 63;
            return "byte_offset 2^63";
        case 5: /* data + byte_offset wraps around to a small address */
            t->byte_offset = UINT64_MAX - 15;
            return "byte_offset wraps";
        case 6: /* the end of the span passes 2^63 */
            t->byte_offset = (uint64_t)INT64_MAX - (uint64_t)(uintptr_t)t->data - 4;
            return "span ends past 2^63";
    }
    return "";
}

/* Every argument of every op, made hostile in every way: refused, named, untouched. */
static void test_hostile_descriptors(void) {
    op_args o;
    for (size_t which = 0; which < sizeof OPS / sizeof OPS[0]; ++which) {
        const op_fn fn = OPS[which].fn;
        build(&OPS[which], &o);
        DLTensor *args[MAX_ARGS];
        for (int i = 0; i < o.n; ++i) args[i] = &o.t[i].t;
        l3k_status st = fn(args);
        CHECK(st == L3K_SUCCESS, "%s: the valid call fails: %s", o.op, l3k_last_error());
        /* Snapshot after the valid call: the hostile calls must leave exactly this. */
        void *snap[MAX_ARGS];
        for (int i = 0; i < o.n; ++i) {
            snap[i] = malloc(o.bytes[i]);
            memcpy(snap[i], o.buf[i], o.bytes[i]);
        }
        for (int arg = 0; arg < o.n; ++arg) {
            for (int kind = 0; kind < N_HOSTILE; ++kind) {
                host_tensor bad = o.t[arg];
                bad.t.shape = bad.shape;
                const char *what = make_hostile(&bad, kind);
                args[arg] = &bad.t;
                st = fn(args);
                args[arg] = &o.t[arg].t;
                const size_t len = strlen(o.op);
                CHECK(st != L3K_SUCCESS, "%s: %s with %s was accepted", o.op, o.names[arg], what);
                CHECK(strncmp(l3k_last_error(), o.op, len) == 0 && l3k_last_error()[len] == ':',
                      "%s: %s with %s: message '%s' does not name the op", o.op, o.names[arg], what,
                      l3k_last_error());
                CHECK(strstr(l3k_last_error(), o.names[arg]) != NULL,
                      "%s: %s with %s: message '%s' does not name it", o.op, o.names[arg], what,
                      l3k_last_error());
                for (int i = 0; i < o.n; ++i)
                    CHECK(memcmp(snap[i], o.buf[i], o.bytes[i]) == 0, "%s: %s with %s changed %s", o.op,
                          o.names[arg], what, o.names[i]);
            }
        }
        for (int i = 0; i < o.n; ++i) free(snap[i]);
        free_args(&o);
    }
}

/* RoPE: seq + offset wrapped for offset near INT64_MAX and passed the table
 * length check; the kernel then read cos/sin at row offset. */
static void test_rope_offset_overflow(void) {
    float q[16], qo[16], cs[8], sn[8];
    for (int i = 0; i < 16; ++i) {
        q[i] = 1.0f;
        qo[i] = 42.0f;
    }
    for (int i = 0; i < 8; ++i) cs[i] = sn[i] = 0.5f;
    int64_t qs[4] = {1, 1, 2, 8}, ts[2] = {2, 4};
    host_tensor tq, tqo, tc, ts_;
    set_tensor(&tq, q, L3K_DT_F32, 4, qs, NULL);
    set_tensor(&tqo, qo, L3K_DT_F32, 4, qs, NULL);
    set_tensor(&tc, cs, L3K_DT_F32, 2, ts, NULL);
    set_tensor(&ts_, sn, L3K_DT_F32, 2, ts, NULL);
    const int64_t offsets[] = {INT64_MAX, INT64_MAX - 1, INT64_MAX - 2, (int64_t)1 << 62, 1};
    for (size_t i = 0; i < sizeof offsets / sizeof offsets[0]; ++i) {
        EXPECT_FAILS(l3k_rope_forward(&tq.t, NULL, &tc.t, &ts_.t, offsets[i], 0, &tqo.t, NULL, NULL),
                     L3K_ERROR_SHAPE, "rope_forward: cos has 2 rows, expected at least seq + offset = 2 + ");
        EXPECT_FAILS(l3k_rope_backward(&tq.t, NULL, &tc.t, &ts_.t, offsets[i], 0, &tqo.t, NULL, NULL),
                     L3K_ERROR_SHAPE, "rope_backward: cos has 2 rows");
    }
    for (int i = 0; i < 16; ++i) CHECK(qo[i] == 42.0f, "q_out[%d] was written", i);
    CHECK(l3k_rope_forward(&tq.t, NULL, &tc.t, &ts_.t, 0, 0, &tqo.t, NULL, NULL) == L3K_SUCCESS,
          "offset 0: %s", l3k_last_error());
}

/* rmsnorm_backward_workspace_size on x (1, 2^62 + 1) float32: the size was
 * (2^62 + 1) * 4 bytes, 4 after wrapping, and a 4-byte workspace then passed
 * the backward's check. */
static void test_workspace_size_wrap(void) {
    float x[8] = {0}, w[8] = {0}, ws[1] = {0};
    int64_t xs[2] = {1, ((int64_t)1 << 62) + 1}, ws1[1] = {1};
    host_tensor tx, tw, tws;
    set_tensor(&tx, x, L3K_DT_F32, 2, xs, NULL);
    set_tensor(&tw, w, L3K_DT_F32, 1, xs + 1, NULL);
    set_tensor(&tws, ws, L3K_DT_F32, 1, ws1, NULL);
    size_t bytes = 12345;
    EXPECT_FAILS(l3k_rmsnorm_backward_workspace_size(&tx.t, &bytes), L3K_ERROR_LAYOUT,
                 "rmsnorm_backward_workspace_size: x strides (4611686018427387905, 1) over shape (1, "
                 "4611686018427387905) reach past 2^63 - 1 bytes");
    CHECK(bytes == 12345, "bytes was written on failure: %zu", bytes);
    EXPECT_FAILS(l3k_rmsnorm_backward(&tx.t, NULL, &tx.t, &tw.t, NULL, 1e-5f, &tx.t, &tw.t, &tws.t, NULL),
                 L3K_ERROR_LAYOUT, "rmsnorm_backward: x strides");
}

/* attention_backward: batch * n_heads * seq_q wrapped to 0, so an empty lse
 * passed its size check and the kernel read past it.  q and the others repeat
 * one row through stride 0, so their extent is small. */
static void test_lse_size_wrap(void) {
    float row[8] = {0}, out[8], lse[1] = {0};
    for (int i = 0; i < 8; ++i) out[i] = 42.0f;
    int64_t big[4] = {(int64_t)1 << 32, (int64_t)1 << 32, 1, 8}, zero[4] = {0, 0, 0, 1}, l0[1] = {0};
    host_tensor tq, to, tl, tout;
    set_tensor(&tq, row, L3K_DT_F32, 4, big, zero);
    set_tensor(&to, out, L3K_DT_F32, 4, big, zero);
    set_tensor(&tout, out, L3K_DT_F32, 4, big, zero);
    set_tensor(&tl, lse, L3K_DT_F32, 1, l0, NULL);
    EXPECT_FAILS(
        l3k_attention_backward(&tq.t, &tq.t, &tq.t, &tq.t, NULL, &tq.t, &tl.t, 0.0f, 0, 0, &tout.t, &tout.t,
                               &tout.t, NULL, NULL),
        L3K_ERROR_SHAPE,
        "attention_backward: q shape (4294967296, 4294967296, 1, 8) has more than 2^63 - 1 elements");
    EXPECT_FAILS(l3k_attention_forward(&tq.t, &tq.t, &tq.t, NULL, 0.0f, 0, &to.t, &tl.t, NULL),
                 L3K_ERROR_SHAPE,
                 "attention_forward: q shape (4294967296, 4294967296, 1, 8) has more than 2^63 - 1 elements");
    size_t bytes = 0;
    EXPECT_FAILS(l3k_attention_backward_workspace_size(&tq.t, &tq.t, 0, &bytes), L3K_ERROR_SHAPE,
                 "attention_backward_workspace_size: q shape");
    for (int i = 0; i < 8; ++i) CHECK(out[i] == 42.0f, "out[%d] was written", i);

    /* Within int64 but huge: 2^28 rows of one repeated key; the workspace size
     * on CUDA would be 2^28 * 2^28 * 8 * 4 bytes: refused as a size, not wrapped. */
    int64_t wide[4] = {(int64_t)1 << 28, (int64_t)1 << 28, 8, 8};
    set_tensor(&tq, row, L3K_DT_F32, 4, wide, zero);
    CHECK(l3k_attention_backward_workspace_size(&tq.t, &tq.t, 0, &bytes) == L3K_SUCCESS && bytes == 0,
          "a large repeated q on the CPU needs no workspace: %s", l3k_last_error());
}

/* A tensor with a zero dim is empty whatever its other sizes: valid, a no-op,
 * and no size derived from those other sizes may overflow on the way (the
 * RMSNorm workspace geometry, the u half of a fused gu, B * H * Sq). */
static void test_empty_huge_dims(void) {
    const int64_t big = INT64_MAX - 1;
    float w[4] = {0};
    int64_t xs[2] = {0, big}, gs[2] = {0, (INT64_MAX / 4) * 2}, as[2] = {0, INT64_MAX / 4};
    host_tensor tx, tgu, ta, tq, tk, tl;
    set_tensor(&tx, w, L3K_DT_BF16, 2, xs, NULL);
    size_t bytes = 7;
    CHECK(l3k_rmsnorm_backward_workspace_size(&tx.t, &bytes) == L3K_SUCCESS && bytes == 0,
          "rmsnorm workspace of an empty x with n = 2^63 - 2: %s, %zu bytes", l3k_last_error(), bytes);
    set_tensor(&tgu, NULL, L3K_DT_F32, 2, gs, NULL);
    set_tensor(&ta, NULL, L3K_DT_F32, 2, as, NULL);
    CHECK(l3k_swiglu_fused_forward(&tgu.t, &ta.t, NULL) == L3K_SUCCESS, "empty gu with a huge hidden: %s",
          l3k_last_error());
    CHECK(l3k_swiglu_fused_backward(&ta.t, &tgu.t, &tgu.t, &ta.t, NULL) == L3K_SUCCESS,
          "empty gu with a huge hidden, backward: %s", l3k_last_error());
    int64_t qs[4] = {(int64_t)1 << 40, (int64_t)1 << 40, 0, 8}, ks[4] = {(int64_t)1 << 40, 1, 4, 8},
            l0[1] = {0};
    int64_t z[4] = {0, 0, 8, 1};
    set_tensor(&tq, NULL, L3K_DT_F32, 4, qs, NULL);
    set_tensor(&tk, w, L3K_DT_F32, 4, ks, z); /* one row of 8, repeated */
    float kv[32] = {0};
    tk.t.data = kv;
    set_tensor(&tl, NULL, L3K_DT_F32, 1, l0, NULL);
    host_tensor to = tq;
    to.t.shape = to.shape;
    CHECK(l3k_attention_forward(&tq.t, &tk.t, &tk.t, NULL, 0.0f, 1, &to.t, &tl.t, NULL) == L3K_SUCCESS,
          "empty q with batch * heads = 2^80: %s", l3k_last_error());
    /* Rows of an empty last dim that cannot be counted: there is no rstd for them. */
    int64_t rs[3] = {(int64_t)1 << 40, (int64_t)1 << 40, 0}, w0[1] = {0};
    host_tensor tr, tw;
    set_tensor(&tx, NULL, L3K_DT_F32, 3, rs, NULL);
    set_tensor(&tw, NULL, L3K_DT_F32, 1, w0, NULL);
    set_tensor(&tr, NULL, L3K_DT_F32, 2, rs, NULL);
    EXPECT_FAILS(l3k_rmsnorm_forward(&tx.t, &tw.t, 1e-5f, &tx.t, &tr.t, NULL), L3K_ERROR_SHAPE,
                 "rmsnorm_forward: x shape (1099511627776, 1099511627776, 0) has more than 2^63 - 1 rows");
}

int main(int argc, char **argv) {
    static const named_test tests[] = {NAMED_TEST(hostile_descriptors), NAMED_TEST(rope_offset_overflow),
                                       NAMED_TEST(workspace_size_wrap), NAMED_TEST(lse_size_wrap),
                                       NAMED_TEST(empty_huge_dims)};
    return RUN_NAMED_TESTS(argc, argv, tests);
}
