/* ABI rules the ops share: float32 statistics are aligned, outputs overlap
 * inputs only as the very same view, zero-size tensors are valid no-ops (a
 * NULL data pointer with a byte_offset included). */
#include "check.h"

/* lse is read and written as float32: its pointer must be 4-byte aligned, as rstd's is. */
static void test_lse_alignment(void) {
    enum { B = 1, H = 2, S = 3, D = 8, N = B * H * S * D };
    float q[N], o[N], dq[N], dk[N], dv[N];
    float lse_buf[B * H * S + 1];
    for (int i = 0; i < N; ++i) {
        q[i] = 0.1f * (float)(i % 7);
        o[i] = dq[i] = dk[i] = dv[i] = 42.0f;
    }
    for (int i = 0; i < B * H * S + 1; ++i) lse_buf[i] = 42.0f;
    int64_t qs[4] = {B, H, S, D}, ls[1] = {B * H * S};
    host_tensor tq, to, tl, tdq, tdk, tdv;
    SET_TENSORS(L3K_DT_F32, 4, qs, {&tq, q}, {&to, o}, {&tdq, dq}, {&tdk, dk}, {&tdv, dv});
    set_tensor(&tl, lse_buf, L3K_DT_F32, 1, ls, NULL);
    tl.t.byte_offset = 2;
    EXPECT_FAILS(l3k_attention_forward(&tq.t, &tq.t, &tq.t, NULL, 0.0f, 1, &to.t, &tl.t, NULL),
                 L3K_ERROR_ALIGNMENT, "attention_forward: lse data pointer");
    EXPECT_FAILS(l3k_attention_backward(&tq.t, &tq.t, &tq.t, &tq.t, NULL, &to.t, &tl.t, 0.0f, 1, 0, &tdq.t,
                                        &tdk.t, &tdv.t, NULL, NULL),
                 L3K_ERROR_ALIGNMENT, "attention_backward: lse data pointer");
    CHECK(strstr(l3k_last_error(), "4-byte aligned") != NULL, "message: %s", l3k_last_error());
    for (int i = 0; i < N; ++i) CHECK(o[i] == 42.0f && dq[i] == 42.0f, "output [%d] was written", i);
    for (int i = 0; i < B * H * S + 1; ++i) CHECK(lse_buf[i] == 42.0f, "lse [%d] was written", i);
    tl.t.byte_offset = 4; /* aligned again: accepted */
    CHECK(l3k_attention_forward(&tq.t, &tq.t, &tq.t, NULL, 0.0f, 1, &to.t, &tl.t, NULL) == L3K_SUCCESS, "%s",
          l3k_last_error());
}

/* lse and the outputs must not share memory with each other or the inputs. */
static void test_lse_overlap(void) {
    enum { N = 1 * 2 * 4 * 8 };
    float q[N], o[N];
    for (int i = 0; i < N; ++i) {
        q[i] = 0.25f;
        o[i] = 42.0f;
    }
    int64_t qs[4] = {1, 2, 4, 8}, ls[1] = {8};
    host_tensor tq, to, tl;
    set_tensor(&tq, q, L3K_DT_F32, 4, qs, NULL);
    set_tensor(&to, o, L3K_DT_F32, 4, qs, NULL);
    set_tensor(&tl, q, L3K_DT_F32, 1, ls, NULL); /* lse over q's first row */
    EXPECT_FAILS(l3k_attention_forward(&tq.t, &tq.t, &tq.t, NULL, 0.0f, 1, &to.t, &tl.t, NULL),
                 L3K_ERROR_LAYOUT, "attention_forward: lse overlaps q, expected separate memory");
    set_tensor(&tl, o + 8, L3K_DT_F32, 1, ls, NULL); /* lse inside o */
    EXPECT_FAILS(l3k_attention_forward(&tq.t, &tq.t, &tq.t, NULL, 0.0f, 1, &to.t, &tl.t, NULL),
                 L3K_ERROR_LAYOUT, "attention_forward: lse overlaps o, expected separate memory");
    for (int i = 0; i < N; ++i) CHECK(q[i] == 0.25f && o[i] == 42.0f, "[%d] was written", i);
}

/* y over x shifted by part of a row: every other op refuses such an overlap;
 * RMSNorm wrote rows that later rows then read.  The same view (in place)
 * stays allowed, and so do interleaved row views that share no element. */
static void test_rmsnorm_overlap(void) {
    enum { R = 3, N = 8 };
    float buf[(R + 1) * N + 8], w[N], r[R];
    for (int i = 0; i < N; ++i) w[i] = 1.0f;
    for (int i = 0; i < (R + 1) * N + 8; ++i) buf[i] = 0.5f + 0.01f * (float)i;
    float keep[(R + 1) * N + 8];
    memcpy(keep, buf, sizeof buf);
    int64_t s2[2] = {R, N}, s1[1] = {N}, sr[1] = {R};
    host_tensor tx, ty, tw, tr, th, tres;
    set_tensor(&tx, buf, L3K_DT_F32, 2, s2, NULL);
    set_tensor(&tw, w, L3K_DT_F32, 1, s1, NULL);
    set_tensor(&tr, r, L3K_DT_F32, 1, sr, NULL);
    const int shifts[3] = {1, N / 2, N + 3};
    for (int i = 0; i < 3; ++i) {
        set_tensor(&ty, buf + shifts[i], L3K_DT_F32, 2, s2, NULL);
        EXPECT_FAILS(l3k_rmsnorm_forward(&tx.t, &tw.t, 1e-5f, &ty.t, &tr.t, NULL), L3K_ERROR_LAYOUT,
                     "rmsnorm_forward: y overlaps x without being the same view");
        CHECK(memcmp(buf, keep, sizeof buf) == 0, "shift %d: x was written", shifts[i]);
    }
    /* The fused op: y over residual shifted, h over x shifted, y over h. */
    set_tensor(&tres, buf + N, L3K_DT_F32, 2, s2, NULL);
    float hb[R * N], yb[R * N];
    set_tensor(&th, hb, L3K_DT_F32, 2, s2, NULL);
    set_tensor(&ty, buf + N + 1, L3K_DT_F32, 2, s2, NULL);
    EXPECT_FAILS(l3k_add_rmsnorm_forward(&tx.t, &tres.t, &tw.t, 1e-5f, &th.t, &ty.t, NULL, NULL),
                 L3K_ERROR_LAYOUT, "add_rmsnorm_forward: y overlaps");
    set_tensor(&ty, yb, L3K_DT_F32, 2, s2, NULL);
    set_tensor(&th, buf + 2, L3K_DT_F32, 2, s2, NULL);
    EXPECT_FAILS(l3k_add_rmsnorm_forward(&tx.t, &tres.t, &tw.t, 1e-5f, &th.t, &ty.t, NULL, NULL),
                 L3K_ERROR_LAYOUT, "add_rmsnorm_forward: h overlaps x without being the same view");
    set_tensor(&th, hb, L3K_DT_F32, 2, s2, NULL);
    EXPECT_FAILS(l3k_add_rmsnorm_forward(&tx.t, &tres.t, &tw.t, 1e-5f, &th.t, &th.t, NULL, NULL),
                 L3K_ERROR_LAYOUT, "add_rmsnorm_forward: y overlaps h, expected separate memory");
    CHECK(memcmp(buf, keep, sizeof buf) == 0, "fused: inputs were written");
    /* rstd over y, dx over dy shifted. */
    set_tensor(&ty, yb, L3K_DT_F32, 2, s2, NULL);
    set_tensor(&tr, yb + 4, L3K_DT_F32, 1, sr, NULL);
    EXPECT_FAILS(l3k_rmsnorm_forward(&tx.t, &tw.t, 1e-5f, &ty.t, &tr.t, NULL), L3K_ERROR_LAYOUT,
                 "rmsnorm_forward: rstd overlaps y, expected separate memory");
    set_tensor(&tr, r, L3K_DT_F32, 1, sr, NULL);
    host_tensor tdx;
    set_tensor(&tdx, buf + 5, L3K_DT_F32, 2, s2, NULL);
    EXPECT_FAILS(l3k_rmsnorm_backward(&tx.t, NULL, &tx.t, &tw.t, &tr.t, 1e-5f, &tdx.t, NULL, NULL, NULL),
                 L3K_ERROR_LAYOUT, "rmsnorm_backward: dx overlaps dy without being the same view");
    CHECK(memcmp(buf, keep, sizeof buf) == 0, "backward: inputs were written");

    /* Allowed: in place, and the even/odd rows of one buffer as x and y. */
    CHECK(l3k_rmsnorm_forward(&tx.t, &tw.t, 1e-5f, &tx.t, &tr.t, NULL) == L3K_SUCCESS, "in place: %s",
          l3k_last_error());
    int64_t st[2] = {2 * N, 1}, s2b[2] = {2, N};
    set_tensor(&tx, buf, L3K_DT_F32, 2, s2b, st);
    set_tensor(&ty, buf + N, L3K_DT_F32, 2, s2b, st);
    set_tensor(&tr, r, L3K_DT_F32, 1, (int64_t[1]){2}, NULL);
    CHECK(l3k_rmsnorm_forward(&tx.t, &tw.t, 1e-5f, &ty.t, &tr.t, NULL) == L3K_SUCCESS, "interleaved rows: %s",
          l3k_last_error());
}

/* x (4, 0): four empty rows.  rstd has x.shape[:-1] = 4 elements; the call is
 * a no-op (rstd untouched).  Before, the rows of an empty last dim counted 0
 * and this rstd was refused. */
static void test_rmsnorm_zero_width(void) {
    float w0[1], r[4] = {42.0f, 42.0f, 42.0f, 42.0f}, dummy[1] = {7.0f};
    int64_t xs[2] = {4, 0}, ws0[1] = {0}, rs[1] = {4};
    host_tensor tx, tw, ty, tr, tdx;
    SET_TENSORS(L3K_DT_F32, 2, xs, {&tx, dummy}, {&ty, dummy}, {&tdx, dummy});
    set_tensor(&tw, w0, L3K_DT_F32, 1, ws0, NULL);
    set_tensor(&tr, r, L3K_DT_F32, 1, rs, NULL);
    CHECK(l3k_rmsnorm_forward(&tx.t, &tw.t, 1e-5f, &ty.t, &tr.t, NULL) == L3K_SUCCESS, "forward (4, 0): %s",
          l3k_last_error());
    CHECK(l3k_add_rmsnorm_forward(&tx.t, &tx.t, &tw.t, 1e-5f, &ty.t, &tdx.t, &tr.t, NULL) == L3K_SUCCESS,
          "fused forward (4, 0): %s", l3k_last_error());
    size_t bytes = 99;
    CHECK(l3k_rmsnorm_backward_workspace_size(&tx.t, &bytes) == L3K_SUCCESS && bytes == 0,
          "workspace (4, 0): %s, %zu bytes", l3k_last_error(), bytes);
    CHECK(l3k_rmsnorm_backward(&tx.t, NULL, &tx.t, &tw.t, &tr.t, 1e-5f, &tdx.t, &tw.t, NULL, NULL) ==
              L3K_SUCCESS,
          "backward (4, 0): %s", l3k_last_error());
    for (int i = 0; i < 4; ++i) CHECK(r[i] == 42.0f, "rstd[%d] was written", i);
    CHECK(dummy[0] == 7.0f, "an empty tensor's memory was written");
    /* The rstd of a wrong length is still refused. */
    int64_t rs3[1] = {3};
    set_tensor(&tr, r, L3K_DT_F32, 1, rs3, NULL);
    EXPECT_FAILS(l3k_rmsnorm_forward(&tx.t, &tw.t, 1e-5f, &ty.t, &tr.t, NULL), L3K_ERROR_SHAPE,
                 "rmsnorm_forward: rstd has 3 elements, expected 4");
}

/* linear with K = 0: y = x @ W^T is an empty sum: zeros (or the residual),
 * as torch gives.  Before, x (3, 0) counted 0 rows and W (2, 0) 0 out_features,
 * so a y of shape (3, 2) was refused.  A 0-byte workspace (what the size query
 * returns on the CPU) is the same as none. */
static void test_linear_zero_size(void) {
    float dummy[1] = {7.0f}, y[6], res[6], dx[6], ws[1];
    for (int i = 0; i < 6; ++i) {
        y[i] = 42.0f;
        res[i] = (float)i;
        dx[i] = 42.0f;
    }
    int64_t xs[2] = {3, 0}, wsz[2] = {2, 0}, ys[2] = {3, 2}, w0[1] = {0};
    host_tensor tx, tw, ty, tres, tws;
    set_tensor(&tx, dummy, L3K_DT_F32, 2, xs, NULL);
    set_tensor(&tw, dummy, L3K_DT_F32, 2, wsz, NULL);
    SET_TENSORS(L3K_DT_F32, 2, ys, {&ty, y}, {&tres, res});
    set_tensor(&tws, ws, L3K_DT_F32, 1, w0, NULL);
    CHECK(l3k_linear_forward(&tx.t, &tw.t, NULL, &ty.t, &tws.t, NULL) == L3K_SUCCESS, "forward K = 0: %s",
          l3k_last_error());
    for (int i = 0; i < 6; ++i) CHECK(y[i] == 0.0f, "y[%d] = %g, expected 0", i, (double)y[i]);
    CHECK(l3k_linear_forward(&tx.t, &tw.t, &tres.t, &ty.t, NULL, NULL) == L3K_SUCCESS,
          "forward K = 0 + residual: %s", l3k_last_error());
    for (int i = 0; i < 6; ++i) CHECK(y[i] == (float)i, "y[%d] = %g, expected the residual", i, (double)y[i]);
    /* dx (3, 2) = dy (3, 0) @ W (0, 2): zeros. */
    int64_t wt[2] = {0, 2};
    set_tensor(&tw, dummy, L3K_DT_F32, 2, wt, NULL);
    host_tensor tdx;
    set_tensor(&tdx, dx, L3K_DT_F32, 2, ys, NULL);
    CHECK(l3k_linear_backward_input(&tx.t, &tw.t, &tdx.t, 0, &tws.t, NULL) == L3K_SUCCESS,
          "backward_input N = 0: %s", l3k_last_error());
    for (int i = 0; i < 6; ++i) CHECK(dx[i] == 0.0f, "dx[%d] = %g, expected 0", i, (double)dx[i]);
    /* dweight (2, 0) from x (3, 0): empty, a no-op. */
    set_tensor(&tw, dummy, L3K_DT_F32, 2, wsz, NULL);
    CHECK(l3k_linear_backward_weight(&ty.t, &tx.t, &tw.t, 0, &tws.t, NULL) == L3K_SUCCESS,
          "backward_weight K = 0: %s", l3k_last_error());
    CHECK(dummy[0] == 7.0f, "an empty tensor's memory was written");
    /* A 0-byte workspace still has to be a tensor of the call's device. */
    tws.t.device.device_type = (DLDeviceType)7;
    EXPECT_FAILS(l3k_linear_forward(&tx.t, &tw.t, NULL, &ty.t, &tws.t, NULL), L3K_ERROR_DEVICE,
                 "linear_forward: workspace is on device type 7");
}

/* Zero-size tensors may carry a NULL data pointer with a byte_offset: NULL +
 * offset is undefined behaviour (caught by UBSan), and nothing may be read. */
static void test_zero_size_null_offset(void) {
    int64_t e2[2] = {0, 8}, e1[1] = {0}, w8[1] = {8}, e4[4] = {1, 2, 0, 8}, ek[4] = {1, 1, 0, 8};
    float w[8] = {1, 1, 1, 1, 1, 1, 1, 1}, cs[16] = {0};
    host_tensor tx, tw, tr, tq, tk, tc, tl, tgu;
    set_tensor(&tx, NULL, L3K_DT_BF16, 2, e2, NULL);
    tx.t.byte_offset = 64;
    set_tensor(&tw, w, L3K_DT_F32, 1, w8, NULL);
    set_tensor(&tr, NULL, L3K_DT_F32, 1, e1, NULL);
    tr.t.byte_offset = 12;
    tw.t.dtype = tx.t.dtype;
    tw.t.shape = w8;
    CHECK(l3k_rmsnorm_forward(&tx.t, &tw.t, 1e-5f, &tx.t, &tr.t, NULL) == L3K_SUCCESS, "rmsnorm: %s",
          l3k_last_error());
    CHECK(l3k_swiglu_forward(&tx.t, &tx.t, &tx.t, NULL) == L3K_SUCCESS, "swiglu: %s", l3k_last_error());
    int64_t e16[2] = {0, 16};
    set_tensor(&tgu, NULL, L3K_DT_BF16, 2, e16, NULL);
    tgu.t.byte_offset = 1024;
    int64_t e8[2] = {0, 8};
    set_tensor(&tx, NULL, L3K_DT_BF16, 2, e8, NULL);
    tx.t.byte_offset = 2;
    CHECK(l3k_swiglu_fused_forward(&tgu.t, &tx.t, NULL) == L3K_SUCCESS, "swiglu fused: %s", l3k_last_error());
    CHECK(l3k_swiglu_fused_backward(&tx.t, &tgu.t, &tgu.t, &tx.t, NULL) == L3K_SUCCESS,
          "swiglu fused bwd: %s", l3k_last_error());
    set_tensor(&tq, NULL, L3K_DT_F32, 4, e4, NULL);
    tq.t.byte_offset = 16;
    set_tensor(&tk, NULL, L3K_DT_F32, 4, ek, NULL);
    tk.t.byte_offset = 32;
    int64_t ts[2] = {4, 4};
    set_tensor(&tc, cs, L3K_DT_F32, 2, ts, NULL);
    CHECK(l3k_rope_forward(&tq.t, &tk.t, &tc.t, &tc.t, 0, 0, &tq.t, &tk.t, NULL) == L3K_SUCCESS, "rope: %s",
          l3k_last_error());
    int64_t l0[1] = {0};
    set_tensor(&tl, NULL, L3K_DT_F32, 1, l0, NULL);
    tl.t.byte_offset = 4;
    host_tensor to;
    set_tensor(&to, NULL, L3K_DT_F32, 4, e4, NULL);
    to.t.byte_offset = 4096;
    CHECK(l3k_attention_forward(&tq.t, &tk.t, &tk.t, NULL, 0.0f, 1, &to.t, &tl.t, NULL) == L3K_SUCCESS,
          "attention: %s", l3k_last_error());
    int64_t xs[2] = {0, 8}, wsz[2] = {4, 8}, ys[2] = {0, 4};
    host_tensor tlx, tlw, tly;
    set_tensor(&tlx, NULL, L3K_DT_F32, 2, xs, NULL);
    tlx.t.byte_offset = 8;
    set_tensor(&tlw, cs, L3K_DT_F32, 2, wsz, NULL);
    set_tensor(&tly, NULL, L3K_DT_F32, 2, ys, NULL);
    tly.t.byte_offset = 16;
    CHECK(l3k_linear_forward(&tlx.t, &tlw.t, NULL, &tly.t, NULL, NULL) == L3K_SUCCESS, "linear: %s",
          l3k_last_error());
}

int main(int argc, char **argv) {
    static const named_test tests[] = {NAMED_TEST(lse_alignment),    NAMED_TEST(lse_overlap),
                                       NAMED_TEST(rmsnorm_overlap),  NAMED_TEST(rmsnorm_zero_width),
                                       NAMED_TEST(linear_zero_size), NAMED_TEST(zero_size_null_offset)};
    return RUN_NAMED_TESTS(argc, argv, tests);
}
