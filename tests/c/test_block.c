/* The whole block from C on host memory: the inference forward, the training
 * forward and the backward (l3k_llama_block_*), against a naive float64 LLaMA
 * block written out in loops here.  The reference gradients are central
 * differences of that float64 block, element by element: independent of how
 * the library derives its backward, and accurate to ~1e-9 at these sizes,
 * far below the float32 kernels' rounding. */
#include "check.h"

enum { B = 2, S = 5, DIM = 32, H = 4, HKV = 2, HD = DIM / H, HID = 48, QKV = DIM + 2 * HKV * HD, T = B * S };

/* The parameters and input of the block, in float64. */
typedef struct {
    double x[T * DIM], wqkv[QKV * DIM], wo[DIM * DIM], wgu[2 * HID * DIM], wd[DIM * HID], n1[DIM], n2[DIM];
} params;

enum { N_PARTS = 7 };
static double *part(params *p, int i, int *n) {
    static const int sizes[N_PARTS] = {T * DIM, QKV * DIM, DIM * DIM, 2 * HID * DIM, DIM * HID, DIM, DIM};
    double *ptrs[N_PARTS] = {p->x, p->wqkv, p->wo, p->wgu, p->wd, p->n1, p->n2};
    *n = sizes[i];
    return ptrs[i];
}
static const char *part_names[N_PARTS] = {"dx",
                                          "d qkv_weight",
                                          "d o_weight",
                                          "d gate_up_weight",
                                          "d down_weight",
                                          "d norm1_weight",
                                          "d norm2_weight"};

static double cos_tab[S * HD / 2], sin_tab[S * HD / 2];

static void rmsnorm(const double *x, const double *w, double *y) {
    for (int r = 0; r < T; ++r) {
        double ss = 0;
        for (int i = 0; i < DIM; ++i) ss += x[r * DIM + i] * x[r * DIM + i];
        double rs = 1.0 / sqrt(ss / DIM + 1e-5);
        for (int i = 0; i < DIM; ++i) y[r * DIM + i] = x[r * DIM + i] * rs * w[i];
    }
}

/* y[t][n] = sum_k x[t][k] w[n][k] */
static void matmul(const double *x, const double *w, double *y, int n, int k) {
    for (int t = 0; t < T; ++t)
        for (int j = 0; j < n; ++j) {
            double acc = 0;
            for (int l = 0; l < k; ++l) acc += x[t * k + l] * w[j * k + l];
            y[t * n + j] = acc;
        }
}

/* out = block(x); h (x + attention's projection) too, for the saved-activation check. */
static void reference(const params *p, double *out, double *h) {
    double h1[T * DIM], qkv[T * QKV], o[T * DIM], gu[T * 2 * HID], a[T * HID], mlp[T * DIM];
    rmsnorm(p->x, p->n1, h1);
    matmul(h1, p->wqkv, qkv, QKV, DIM);
    for (int t = 0; t < T; ++t) /* rotate-half RoPE on the q and k heads */
        for (int hh = 0; hh < H + HKV; ++hh)
            for (int i = 0; i < HD / 2; ++i) {
                double *e = qkv + t * QKV + hh * HD;
                double c = cos_tab[(t % S) * (HD / 2) + i], s = sin_tab[(t % S) * (HD / 2) + i];
                double x1 = e[i], x2 = e[i + HD / 2];
                e[i] = x1 * c - x2 * s;
                e[i + HD / 2] = x2 * c + x1 * s;
            }
    for (int b = 0; b < B; ++b) /* causal attention, GQA */
        for (int hh = 0; hh < H; ++hh)
            for (int i = 0; i < S; ++i) {
                const double *q = qkv + (b * S + i) * QKV + hh * HD;
                const int kvh = hh / (H / HKV);
                double sc[S], mx = -1e300, sum = 0;
                for (int j = 0; j <= i; ++j) {
                    const double *k = qkv + (b * S + j) * QKV + DIM + kvh * HD;
                    double dot = 0;
                    for (int l = 0; l < HD; ++l) dot += q[l] * k[l];
                    sc[j] = dot / sqrt((double)HD);
                    if (sc[j] > mx) mx = sc[j];
                }
                for (int j = 0; j <= i; ++j) sum += (sc[j] = exp(sc[j] - mx));
                for (int l = 0; l < HD; ++l) {
                    double acc = 0;
                    for (int j = 0; j <= i; ++j)
                        acc += sc[j] * qkv[(b * S + j) * QKV + DIM + HKV * HD + kvh * HD + l];
                    o[(b * S + i) * DIM + hh * HD + l] = acc / sum;
                }
            }
    matmul(o, p->wo, h, DIM, DIM);
    for (int i = 0; i < T * DIM; ++i) h[i] += p->x[i];
    rmsnorm(h, p->n2, h1);
    matmul(h1, p->wgu, gu, 2 * HID, DIM);
    for (int t = 0; t < T; ++t)
        for (int j = 0; j < HID; ++j) {
            double g = gu[t * 2 * HID + j], u = gu[t * 2 * HID + HID + j];
            a[t * HID + j] = g / (1 + exp(-g)) * u;
        }
    matmul(a, p->wd, mlp, DIM, HID);
    for (int i = 0; i < T * DIM; ++i) out[i] = h[i] + mlp[i];
}

/* <dout, block(p)> */
static double loss(const params *p, const double *dout) {
    double out[T * DIM], h[T * DIM], l = 0;
    reference(p, out, h);
    for (int i = 0; i < T * DIM; ++i) l += dout[i] * out[i];
    return l;
}

/* Every gradient of <dout, block(p)> by central differences. */
static void reference_grads(const params *p0, const double *dout, params *grad) {
    static params p;
    p = *p0;
    for (int i = 0; i < N_PARTS; ++i) {
        int n;
        double *v = part(&p, i, &n), *gv = part(grad, i, &n);
        for (int j = 0; j < n; ++j) {
            const double keep = v[j], eps = 1e-5 * fmax(1.0, fabs(keep));
            v[j] = keep + eps;
            const double up = loss(&p, dout);
            v[j] = keep - eps;
            const double down = loss(&p, dout);
            v[j] = keep;
            gv[j] = (up - down) / (2 * eps);
        }
    }
}

/* float32 storage of the block's tensors and their descriptors. */
typedef struct {
    float x[T * DIM], wqkv[QKV * DIM], wo[DIM * DIM], wgu[2 * HID * DIM], wd[DIM * HID], n1[DIM], n2[DIM];
} params_f32;

static float *part_f32(params_f32 *p, int i) {
    float *ptrs[N_PARTS] = {p->x, p->wqkv, p->wo, p->wgu, p->wd, p->n1, p->n2};
    return ptrs[i];
}

static const int64_t part_shapes[N_PARTS][3] = {{B, S, DIM}, {QKV, DIM}, {DIM, DIM}, {2 * HID, DIM},
                                                {DIM, HID},  {DIM},      {DIM}};
static const int part_ndims[N_PARTS] = {3, 2, 2, 2, 2, 1, 1};

typedef struct {
    host_tensor t[N_PARTS];
} described;

static void describe(described *d, params_f32 *p) {
    for (int i = 0; i < N_PARTS; ++i) host_f32(&d->t[i], part_f32(p, i), part_ndims[i], part_shapes[i]);
}

/* The weight slots of a weights or a grads struct (the two name them alike) pointed at host
 * tensors ht.  Fused: qkv, o, gate_up, down, norm1, norm2 at ht[1..6] (the parts in part order).
 * Split: q, k, v, gate, up at ht[0..4], and the fused qkv and gate_up slots cleared. */
#define POINT_FUSED(s, ht)                                                                          \
    do {                                                                                            \
        (s).qkv_weight = &(ht)[1].t, (s).o_weight = &(ht)[2].t, (s).gate_up_weight = &(ht)[3].t;    \
        (s).down_weight = &(ht)[4].t, (s).norm1_weight = &(ht)[5].t, (s).norm2_weight = &(ht)[6].t; \
    } while (0)
#define POINT_SPLIT(s, ht)                                                               \
    do {                                                                                 \
        (s).qkv_weight = (s).gate_up_weight = NULL;                                      \
        (s).q_weight = &(ht)[0].t, (s).k_weight = &(ht)[1].t, (s).v_weight = &(ht)[2].t; \
        (s).gate_weight = &(ht)[3].t, (s).up_weight = &(ht)[4].t;                        \
    } while (0)

/* 256-byte aligned host memory (the block asks it of its buffers). */
static void *alloc_aligned(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 256, bytes ? bytes : 256)) return NULL;
    return p;
}

static DLTensor *f32_buffer(host_tensor *ht, size_t n, float fill) {
    float *p = alloc_aligned(n * sizeof(float));
    for (size_t i = 0; i < n; ++i) p[i] = fill;
    const int64_t shape[1] = {(int64_t)n};
    return host_f32(ht, p, 1, shape);
}

static float *data_of(const DLTensor *t) { return (float *)t->data; }

static double max_abs(const double *v, int n) {
    double m = 0;
    for (int i = 0; i < n; ++i) m = fmax(m, fabs(v[i]));
    return m;
}

/* ---- padding: cfg->key_range ---------------------------------------------------------------- */

/* One training step of the block on x (any batch and length): the output, dx and the six weight
 * gradients (fused form), through l3k_llama_block_forward_train and l3k_llama_block_backward. */
static void train_step(const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                       const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg,
                       const DLTensor *dout, float *out, float *dx, float *grads[N_PARTS]) {
    l3k_llama_block_layout lay = L3K_LLAMA_BLOCK_LAYOUT_INIT;
    CHECK(l3k_llama_block_training_layout(x, w, cfg, &lay) == L3K_SUCCESS, "%s", l3k_last_error());
    host_tensor ta[5], tfw, tbw, tout, tdx, tg[N_PARTS];
    l3k_llama_block_activations act = L3K_LLAMA_BLOCK_ACTIVATIONS_INIT;
    act.qkv = f32_buffer(&ta[0], (size_t)(lay.qkv.rows * lay.qkv.cols), NAN);
    act.residual = f32_buffer(&ta[1], (size_t)(lay.residual.rows * lay.residual.cols), NAN);
    act.gate_up = f32_buffer(&ta[2], (size_t)(lay.gate_up.rows * lay.gate_up.cols), NAN);
    act.rstd1 = f32_buffer(&ta[3], (size_t)(lay.rstd1.rows * lay.rstd1.cols), NAN);
    act.rstd2 = f32_buffer(&ta[4], (size_t)(lay.rstd2.rows * lay.rstd2.cols), NAN);
    DLTensor *FWS = f32_buffer(&tfw, lay.forward_workspace_bytes / 4 + 1, NAN);
    DLTensor *BWS = f32_buffer(&tbw, lay.backward_workspace_bytes / 4 + 1, NAN);
    DLTensor *OUT = host_f32(&tout, out, x->ndim, x->shape), *DX = host_f32(&tdx, dx, x->ndim, x->shape);
    l3k_llama_block_grads g = L3K_LLAMA_BLOCK_GRADS_INIT;
    for (int i = 1; i < N_PARTS; ++i) host_f32(&tg[i], grads[i], part_ndims[i], part_shapes[i]);
    POINT_FUSED(g, tg);
    CHECK(l3k_llama_block_forward_train(x, cos, sin, w, cfg, OUT, &act, FWS, NULL) == L3K_SUCCESS, "%s",
          l3k_last_error());
    CHECK(l3k_llama_block_backward(dout, x, cos, sin, w, cfg, &act, 0, DX, &g, BWS, NULL) == L3K_SUCCESS,
          "%s", l3k_last_error());
    free(act.qkv->data);
    free(act.residual->data);
    free(act.gate_up->data);
    free(act.rstd1->data);
    free(act.rstd2->data);
    free(FWS->data);
    free(BWS->data);
}

/* A padded batch: sequence 0 holds positions 0..2 and is padded on the right, sequence 1 holds
 * positions 2..4 and is padded on the left, with garbage in the padding and RoPE positions from 0
 * at each sequence's first token (per-sequence tables, as Hugging Face's position ids give).
 * With cfg->key_range = the valid positions and dout zero on the padding (a loss that ignores
 * it), each sequence's valid rows are the sequence run alone, no gradient reaches a padded
 * position (dx there is 0), and the weight gradients are the two sequences' sums. */
enum { PAD_LEN = 3 };
static void test_padded(const l3k_llama_block_weights *w, const l3k_llama_block_config *cfg0,
                        unsigned *seed) {
    static const int start[B] = {0, 2};
    static float x[T * DIM], dout[T * DIM], cs[B * S * HD / 2], sn[B * S * HD / 2], out[T * DIM], dx[T * DIM];
    static float x1[PAD_LEN * DIM], dout1[PAD_LEN * DIM], cs1[PAD_LEN * HD / 2], sn1[PAD_LEN * HD / 2];
    static float out1[PAD_LEN * DIM], dx1[PAD_LEN * DIM];
    float *grads[N_PARTS], *sum[N_PARTS], *grads1[N_PARTS];
    for (int i = 1; i < N_PARTS; ++i) {
        int n;
        static params dummy;
        part(&dummy, i, &n);
        grads[i] = alloc_aligned((size_t)n * 4);
        grads1[i] = alloc_aligned((size_t)n * 4);
        sum[i] = calloc((size_t)n, sizeof(float));
    }
    for (int i = 0; i < T * DIM; ++i) x[i] = 3.0f * frand(seed); /* padding: anything */
    for (int b = 0; b < B; ++b)
        for (int p = 0; p < S; ++p) {
            const int in = p >= start[b] && p < start[b] + PAD_LEN;
            for (int i = 0; i < DIM; ++i) dout[(b * S + p) * DIM + i] = in ? frand(seed) : 0.0f;
            const int pos = p >= start[b] ? p - start[b] : 0;
            for (int i = 0; i < HD / 2; ++i) {
                const double ang = pos * pow(500000.0, -2.0 * i / HD);
                cs[(b * S + p) * HD / 2 + i] = (float)cos(ang);
                sn[(b * S + p) * HD / 2 + i] = (float)sin(ang);
            }
        }
    int32_t kr[B * 2];
    for (int b = 0; b < B; ++b) {
        kr[2 * b] = start[b];
        kr[2 * b + 1] = start[b] + PAD_LEN;
    }
    host_tensor tx, tdo, tc, ts, tkr;
    const int64_t sx[3] = {B, S, DIM}, stab[3] = {B, S, HD / 2}, skr[2] = {B, 2};
    DLTensor *X = host_f32(&tx, x, 3, sx), *DOUT = host_f32(&tdo, dout, 3, sx);
    DLTensor *COS = host_f32(&tc, cs, 3, stab), *SIN = host_f32(&ts, sn, 3, stab);
    DLTensor *KR = host_f32(&tkr, (float *)kr, 2, skr);
    KR->dtype.code = kDLInt;
    l3k_llama_block_config cfg = *cfg0;
    cfg.key_range = KR;
    train_step(X, COS, SIN, w, &cfg, DOUT, out, dx, grads);

    double err_out = 0, err_dx = 0, mag_out = 0, mag_dx = 0;
    for (int b = 0; b < B; ++b) {
        memcpy(x1, x + (size_t)(b * S + start[b]) * DIM, sizeof x1);
        memcpy(dout1, dout + (size_t)(b * S + start[b]) * DIM, sizeof dout1);
        for (int p = 0; p < PAD_LEN; ++p)
            for (int i = 0; i < HD / 2; ++i) {
                cs1[p * HD / 2 + i] = cs[(b * S + start[b] + p) * HD / 2 + i];
                sn1[p * HD / 2 + i] = sn[(b * S + start[b] + p) * HD / 2 + i];
            }
        host_tensor tx1, tdo1, tc1, ts1;
        const int64_t sx1[3] = {1, PAD_LEN, DIM}, stab1[2] = {PAD_LEN, HD / 2};
        train_step(host_f32(&tx1, x1, 3, sx1), host_f32(&tc1, cs1, 2, stab1), host_f32(&ts1, sn1, 2, stab1),
                   w, cfg0, host_f32(&tdo1, dout1, 3, sx1), out1, dx1, grads1);
        for (int i = 1; i < N_PARTS; ++i) {
            int n;
            static params dummy;
            part(&dummy, i, &n);
            for (int j = 0; j < n; ++j) sum[i][j] += grads1[i][j];
        }
        for (int p = 0; p < S; ++p)
            for (int i = 0; i < DIM; ++i) {
                const int r = p - start[b], at = (b * S + p) * DIM + i;
                if (r >= 0 && r < PAD_LEN) {
                    err_out = fmax(err_out, fabs(out[at] - out1[r * DIM + i]));
                    err_dx = fmax(err_dx, fabs(dx[at] - dx1[r * DIM + i]));
                    mag_out = fmax(mag_out, fabs(out1[r * DIM + i]));
                    mag_dx = fmax(mag_dx, fabs(dx1[r * DIM + i]));
                } else {
                    CHECK(dx[at] == 0.0f, "padded: dx[%d][%d][%d] = %g at a padded position", b, p, i,
                          dx[at]);
                }
            }
    }
    CHECK(err_out <= 1e-5 * mag_out, "padded: output vs the sequences alone, max error %g (max %g)", err_out,
          mag_out);
    CHECK(err_dx <= 1e-5 * mag_dx, "padded: dx vs the sequences alone, max error %g (max %g)", err_dx,
          mag_dx);
    printf("block padded: output max error %.3g, dx %.3g against each sequence alone\n", err_out, err_dx);
    for (int i = 1; i < N_PARTS; ++i) {
        int n;
        static params dummy;
        part(&dummy, i, &n);
        double e = 0, m = 0;
        for (int j = 0; j < n; ++j) {
            e = fmax(e, isnan(grads[i][j]) ? INFINITY : fabs(grads[i][j] - sum[i][j]));
            m = fmax(m, fabs(sum[i][j]));
        }
        CHECK(e <= 1e-5 * m, "padded: %s max error %g against the sequences' sum (max %g)", part_names[i], e,
              m);
    }

    /* A caller built before key_range (struct_size stopping short of it) gets every key. */
    static float out_old[T * DIM], out_all[T * DIM], dx2[T * DIM];
    l3k_llama_block_config old = cfg;
    old.struct_size = offsetof(l3k_llama_block_config, key_range);
    train_step(X, COS, SIN, w, &old, DOUT, out_old, dx2, grads1);
    train_step(X, COS, SIN, w, cfg0, DOUT, out_all, dx2, grads1);
    CHECK(memcmp(out_old, out_all, sizeof out_old) == 0, "struct_size before key_range: the range was read");
    CHECK(memcmp(out_old, out, sizeof out_old) != 0, "the key range changed nothing");

    /* A bad key range is refused before anything runs. */
    host_tensor tws, tout2, tbad;
    size_t bytes = 0;
    CHECK(l3k_llama_block_forward_workspace_size(X, w, &cfg, &bytes) == L3K_SUCCESS, "%s", l3k_last_error());
    DLTensor *WS = f32_buffer(&tws, bytes / 4 + 1, 5.0f);
    for (int i = 0; i < T * DIM; ++i) out_old[i] = 5.0f;
    DLTensor *OUT = host_f32(&tout2, out_old, 3, sx);
    l3k_llama_block_config bad = cfg;
    bad.key_range = host_f32(&tbad, (float *)kr, 2, skr);
    EXPECT_FAILS(l3k_llama_block_forward(X, COS, SIN, w, &bad, OUT, WS, NULL), L3K_ERROR_DTYPE,
                 "llama_block_forward: cfg->key_range dtype float32, expected int32");
    const int64_t one_row[2] = {1, 2};
    host_tensor tshort;
    bad.key_range = host_f32(&tshort, (float *)kr, 2, one_row);
    tshort.t.dtype.code = kDLInt;
    EXPECT_FAILS(l3k_llama_block_forward(X, COS, SIN, w, &bad, OUT, WS, NULL), L3K_ERROR_SHAPE,
                 "cfg->key_range shape (1, 2), expected (2, 2)");
    bad.key_range = host_f32(&tbad, out_old, 2, skr); /* the output's memory */
    tbad.t.dtype.code = kDLInt;
    EXPECT_FAILS(l3k_llama_block_forward(X, COS, SIN, w, &bad, OUT, WS, NULL), L3K_ERROR_LAYOUT,
                 "out overlaps cfg->key_range");
    /* A head_dim the attention kernels do not take is refused up front, by the size query too. */
    bad = cfg;
    bad.n_heads = 8; /* head_dim 32 / 8 = 4 */
    EXPECT_FAILS(l3k_llama_block_forward(X, COS, SIN, w, &bad, OUT, WS, NULL), L3K_ERROR_SHAPE,
                 "llama_block_forward: head_dim (dim / n_heads) is 4, expected a multiple of 8 in [8, 256]");
    size_t bad_bytes = 0;
    EXPECT_FAILS(l3k_llama_block_forward_workspace_size(X, w, &bad, &bad_bytes), L3K_ERROR_SHAPE,
                 "head_dim (dim / n_heads) is 4");
    int untouched = 1;
    for (int i = 0; i < T * DIM; ++i) untouched &= out_old[i] == 5.0f;
    for (size_t i = 0; i < bytes / 4; ++i) untouched &= data_of(WS)[i] == 5.0f;
    CHECK(untouched, "a refused call wrote out or the workspace");
    free(WS->data);
    for (int i = 1; i < N_PARTS; ++i) {
        free(grads[i]);
        free(grads1[i]);
        free(sum[i]);
    }
}

int main(void) {
    static params p, ref_grad;
    static params_f32 pf, gf;
    static double dout[T * DIM], ref_out[T * DIM], ref_h[T * DIM];
    static float dout_f[T * DIM], out_inf[T * DIM], out_train[T * DIM], cs[S * HD / 2], sn[S * HD / 2];
    unsigned seed = 7;
    for (int i = 0; i < N_PARTS; ++i) {
        int n;
        double *v = part(&p, i, &n);
        float *f = part_f32(&pf, i);
        const float scale = i == 0 ? 1.0f : i < 5 ? 0.3f : 0.2f;
        for (int j = 0; j < n; ++j) {
            f[j] = (i >= 5 ? 1.0f : 0.0f) + scale * frand(&seed);
            v[j] = f[j];
        }
    }
    for (int i = 0; i < T * DIM; ++i) dout[i] = dout_f[i] = frand(&seed);
    for (int s = 0; s < S; ++s)
        for (int i = 0; i < HD / 2; ++i) {
            double ang = s * pow(500000.0, -2.0 * i / HD);
            cs[s * HD / 2 + i] = (float)cos(ang);
            sn[s * HD / 2 + i] = (float)sin(ang);
            cos_tab[s * HD / 2 + i] = cs[s * HD / 2 + i];
            sin_tab[s * HD / 2 + i] = sn[s * HD / 2 + i];
        }
    reference(&p, ref_out, ref_h);

    described in, grads_d;
    describe(&in, &pf);
    describe(&grads_d, &gf);
    DLTensor *X = &in.t[0].t;
    l3k_llama_block_weights w = L3K_LLAMA_BLOCK_WEIGHTS_INIT;
    POINT_FUSED(w, in.t);
    l3k_llama_block_config cfg = L3K_LLAMA_BLOCK_CONFIG_INIT;
    cfg.n_heads = H;
    cfg.n_kv_heads = HKV;
    host_tensor tout, tc, ts, tdo;
    const int64_t sx[3] = {B, S, DIM}, stab[2] = {S, HD / 2};
    DLTensor *COS = host_f32(&tc, cs, 2, stab), *SIN = host_f32(&ts, sn, 2, stab);
    DLTensor *DOUT = host_f32(&tdo, dout_f, 3, sx);

    /* ---- inference forward ---- */
    for (int i = 0; i < T * DIM; ++i) out_inf[i] = NAN;
    DLTensor *OUT = host_f32(&tout, out_inf, 3, sx);
    size_t bytes = 0;
    CHECK(l3k_llama_block_forward_workspace_size(X, &w, &cfg, &bytes) == L3K_SUCCESS, "%s", l3k_last_error());
    host_tensor tws;
    DLTensor *WS = f32_buffer(&tws, bytes / 4 + 1, NAN);
    CHECK(l3k_llama_block_forward(X, COS, SIN, &w, &cfg, OUT, WS, NULL) == L3K_SUCCESS, "%s",
          l3k_last_error());
    double err = 0, mag = max_abs(ref_out, T * DIM);
    for (int i = 0; i < T * DIM; ++i) err = fmax(err, fabs(out_inf[i] - ref_out[i]));
    CHECK(err <= 1e-4 * mag, "block output max error %g (max |ref| %g)", err, mag);
    printf("block forward: max error %.3g of max |ref| %.3g\n", err, mag);
    free(WS->data);

    /* ---- training forward: the same output bitwise, the activations kept ---- */
    l3k_llama_block_layout lay = L3K_LLAMA_BLOCK_LAYOUT_INIT;
    CHECK(l3k_llama_block_training_layout(X, &w, &cfg, &lay) == L3K_SUCCESS, "%s", l3k_last_error());
    CHECK(lay.qkv.rows == T && lay.qkv.cols == QKV && lay.gate_up.cols == 2 * HID &&
              lay.residual.cols == DIM && lay.rstd1.rows * lay.rstd1.cols == T &&
              lay.lse.rows * lay.lse.cols == B * H * S && lay.rstd1.dtype.code == kDLFloat &&
              lay.rstd1.dtype.bits == 32,
          "layout shapes");
    CHECK(lay.backward_workspace_bytes_preserving >= lay.backward_workspace_bytes, "preserving needs more");
    host_tensor tq, th, tgu, tr1, tr2, tao, tlse, tfw, tbw, tdx, tout2;
    l3k_llama_block_activations act = L3K_LLAMA_BLOCK_ACTIVATIONS_INIT;
    act.qkv = f32_buffer(&tq, (size_t)(lay.qkv.rows * lay.qkv.cols), NAN);
    act.residual = f32_buffer(&th, (size_t)(lay.residual.rows * lay.residual.cols), NAN);
    act.gate_up = f32_buffer(&tgu, (size_t)(lay.gate_up.rows * lay.gate_up.cols), NAN);
    act.rstd1 = f32_buffer(&tr1, T, NAN);
    act.rstd2 = f32_buffer(&tr2, T, NAN);
    DLTensor *FWS = f32_buffer(&tfw, lay.forward_workspace_bytes / 4 + 1, NAN);
    DLTensor *OUT2 = host_f32(&tout2, out_train, 3, sx);
    CHECK(l3k_llama_block_forward_train(X, COS, SIN, &w, &cfg, OUT2, &act, FWS, NULL) == L3K_SUCCESS, "%s",
          l3k_last_error());
    CHECK(memcmp(out_inf, out_train, sizeof out_inf) == 0, "training forward differs from inference");
    err = 0;
    for (int i = 0; i < T * DIM; ++i) err = fmax(err, fabs(data_of(act.residual)[i] - ref_h[i]));
    CHECK(err <= 1e-4 * max_abs(ref_h, T * DIM), "saved h max error %g", err);

    /* ---- backward against the float64 block's central differences ---- */
    reference_grads(&p, dout, &ref_grad);
    const size_t ws_bytes = lay.backward_workspace_bytes_preserving;
    DLTensor *BWS = f32_buffer(&tbw, ws_bytes / 4 + 1, NAN);
    static float dx_f[T * DIM];
    DLTensor *DX = host_f32(&tdx, dx_f, 3, sx);
    l3k_llama_block_grads g = L3K_LLAMA_BLOCK_GRADS_INIT;
    /* Gradient buffers, aligned as the block asks. */
    float *gbuf[N_PARTS];
    host_tensor gt[N_PARTS];
    for (int i = 1; i < N_PARTS; ++i) {
        int n;
        part(&p, i, &n);
        gbuf[i] = alloc_aligned((size_t)n * 4);
        host_f32(&gt[i], gbuf[i], part_ndims[i], part_shapes[i]);
    }
    POINT_FUSED(g, gt);
    gbuf[0] = dx_f;

    /* Three runs: activations preserved (twice: the second sees them intact), then consumed;
     * all three must agree bitwise and match the reference. */
    static float first[N_PARTS][2 * HID * DIM];
    const size_t gu_bytes = (size_t)(lay.gate_up.rows * lay.gate_up.cols) * 4;
    float *gu_copy = malloc(gu_bytes);
    memcpy(gu_copy, act.gate_up->data, gu_bytes);
    for (int run = 0; run < 3; ++run) {
        const unsigned flags = run < 2 ? L3K_BLOCK_PRESERVE_ACTIVATIONS : 0;
        for (int i = 0; i < N_PARTS; ++i) {
            int n;
            part(&p, i, &n);
            for (int j = 0; j < n; ++j) gbuf[i][j] = NAN;
        }
        CHECK(l3k_llama_block_backward(DOUT, X, COS, SIN, &w, &cfg, &act, flags, DX, &g, BWS, NULL) ==
                  L3K_SUCCESS,
              "backward run %d: %s", run, l3k_last_error());
        for (int i = 0; i < N_PARTS; ++i) {
            int n;
            const double *r = part(&ref_grad, i, &n);
            double e = 0, m = max_abs(r, n);
            for (int j = 0; j < n; ++j) e = fmax(e, isnan(gbuf[i][j]) ? INFINITY : fabs(gbuf[i][j] - r[j]));
            CHECK(e <= 2e-4 * m, "run %d: %s max error %g (max |ref| %g)", run, part_names[i], e, m);
            if (run == 0) {
                memcpy(first[i], gbuf[i], (size_t)n * 4);
                printf("block backward: %-16s max error %.3g of max |ref| %.3g\n", part_names[i], e, m);
            } else {
                CHECK(memcmp(first[i], gbuf[i], (size_t)n * 4) == 0, "run %d: %s differs from run 0", run,
                      part_names[i]);
            }
        }
        if (run < 2)
            CHECK(memcmp(gu_copy, act.gate_up->data, gu_bytes) == 0, "preserved gate_up was changed");
    }

    /* The attention output kept by the forward: the same gradients, bitwise (the CPU forward
     * is deterministic, so its recomputation is the same tensor). */
    act.attn_out = f32_buffer(&tao, (size_t)T * DIM, NAN);
    act.lse = f32_buffer(&tlse, (size_t)B * H * S, NAN);
    CHECK(l3k_llama_block_forward_train(X, COS, SIN, &w, &cfg, OUT2, &act, FWS, NULL) == L3K_SUCCESS, "%s",
          l3k_last_error());
    CHECK(l3k_llama_block_backward(DOUT, X, COS, SIN, &w, &cfg, &act, 0, DX, &g, BWS, NULL) == L3K_SUCCESS,
          "%s", l3k_last_error());
    for (int i = 0; i < N_PARTS; ++i) {
        int n;
        part(&p, i, &n);
        CHECK(memcmp(first[i], gbuf[i], (size_t)n * 4) == 0, "kept attention output: %s differs",
              part_names[i]);
    }

    /* ---- q/k/v and gate/up as separate matrices ---- */
    {
        /* Apart (copies in their own buffers): the same function, a GEMM per part. */
        const int64_t widths[5] = {DIM, HKV * HD, HKV * HD, HID, HID};
        const int64_t offsets[5] = {0, DIM, DIM + HKV * HD, 0, HID};
        float *wpart[5], *gpart[5];
        host_tensor wt[5], gt2[5];
        for (int i = 0; i < 5; ++i) {
            const float *src = i < 3 ? pf.wqkv : pf.wgu;
            const int64_t shape[2] = {widths[i], DIM};
            wpart[i] = alloc_aligned((size_t)(widths[i] * DIM) * 4);
            gpart[i] = alloc_aligned((size_t)(widths[i] * DIM) * 4);
            memcpy(wpart[i], src + offsets[i] * DIM, (size_t)(widths[i] * DIM) * 4);
            host_f32(&wt[i], wpart[i], 2, shape);
            host_f32(&gt2[i], gpart[i], 2, shape);
        }
        l3k_llama_block_weights ws_split = w;
        POINT_SPLIT(ws_split, wt);
        l3k_llama_block_grads gs_split = g;
        POINT_SPLIT(gs_split, gt2);
        l3k_llama_block_layout lay_split = L3K_LLAMA_BLOCK_LAYOUT_INIT;
        CHECK(l3k_llama_block_training_layout(X, &ws_split, &cfg, &lay_split) == L3K_SUCCESS, "%s",
              l3k_last_error());
        host_tensor tbs;
        DLTensor *BWS2 = f32_buffer(&tbs,
                                    (lay_split.backward_workspace_bytes_preserving +
                                     lay_split.backward_workspace_extra_split_gate_up) /
                                            4 +
                                        1,
                                    NAN);
        CHECK(
            l3k_llama_block_forward_train(X, COS, SIN, &ws_split, &cfg, OUT2, &act, FWS, NULL) == L3K_SUCCESS,
            "%s", l3k_last_error());
        err = 0;
        for (int i = 0; i < T * DIM; ++i) err = fmax(err, fabs(out_train[i] - ref_out[i]));
        CHECK(err <= 1e-4 * mag, "split weights: output max error %g", err);
        CHECK(l3k_llama_block_backward(DOUT, X, COS, SIN, &ws_split, &cfg, &act, 0, DX, &gs_split, BWS2,
                                       NULL) == L3K_SUCCESS,
              "%s", l3k_last_error());
        for (int i = 0; i < 5; ++i) {
            int n;
            const double *r = part(&ref_grad, i < 3 ? 1 : 3, &n) + offsets[i] * DIM;
            double e = 0, m = max_abs(r, (int)(widths[i] * DIM));
            for (int j = 0; j < widths[i] * DIM; ++j) e = fmax(e, fabs(gpart[i][j] - r[j]));
            CHECK(e <= 2e-4 * m, "split weights: part %d gradient max error %g (max |ref| %g)", i, e, m);
        }
        double e = 0;
        for (int j = 0; j < T * DIM; ++j) e = fmax(e, fabs(dx_f[j] - ref_grad.x[j]));
        CHECK(e <= 2e-4 * max_abs(ref_grad.x, T * DIM), "split weights: dx max error %g", e);
        /* What the parts apart gave, to hold the adjacent run to: the output, and every gradient
         * with the parts' own gradients laid out as the fused ones. */
        static float out_apart[T * DIM];
        memcpy(out_apart, out_train, sizeof out_apart);
        float *apart[N_PARTS];
        for (int i = 0; i < N_PARTS; ++i) {
            int n;
            part(&p, i, &n);
            apart[i] = alloc_aligned((size_t)n * 4);
            memcpy(apart[i], gbuf[i], (size_t)n * 4);
        }
        for (int i = 0; i < 5; ++i)
            memcpy(apart[i < 3 ? 1 : 3] + offsets[i] * DIM, gpart[i], (size_t)(widths[i] * DIM) * 4);
        /* Adjacent (views of the fused buffers): weight parts are never joined, so the results
         * are bitwise those of the same parts apart, wherever the parts lie. */
        const int64_t sh[5][2] = {{DIM, DIM}, {HKV * HD, DIM}, {HKV * HD, DIM}, {HID, DIM}, {HID, DIM}};
        host_tensor wa[5], ga[5];
        for (int i = 0; i < 5; ++i) {
            host_f32(&wa[i], (i < 3 ? pf.wqkv : pf.wgu) + offsets[i] * DIM, 2, sh[i]);
            host_f32(&ga[i], (i < 3 ? gbuf[1] : gbuf[3]) + offsets[i] * DIM, 2, sh[i]);
        }
        l3k_llama_block_weights wadj = ws_split;
        POINT_SPLIT(wadj, wa);
        l3k_llama_block_grads gadj = gs_split;
        POINT_SPLIT(gadj, ga);
        CHECK(l3k_llama_block_forward_train(X, COS, SIN, &wadj, &cfg, OUT2, &act, FWS, NULL) == L3K_SUCCESS,
              "%s", l3k_last_error());
        CHECK(memcmp(out_apart, out_train, sizeof out_apart) == 0,
              "adjacent parts: output differs from the parts apart");
        CHECK(l3k_llama_block_backward(DOUT, X, COS, SIN, &wadj, &cfg, &act, 0, DX, &gadj, BWS, NULL) ==
                  L3K_SUCCESS,
              "%s", l3k_last_error());
        for (int i = 0; i < N_PARTS; ++i) {
            int n;
            part(&p, i, &n);
            CHECK(memcmp(apart[i], gbuf[i], (size_t)n * 4) == 0,
                  "adjacent parts: %s differs from the parts apart", part_names[i]);
            free(apart[i]);
        }
        l3k_llama_block_weights both = w;
        both.q_weight = &wt[0].t;
        EXPECT_FAILS(l3k_llama_block_forward(X, COS, SIN, &both, &cfg, OUT, FWS, NULL), L3K_ERROR_VALUE,
                     "qkv_weight and q_weight are both given");
        l3k_llama_block_weights missing = ws_split;
        missing.v_weight = NULL;
        EXPECT_FAILS(l3k_llama_block_forward(X, COS, SIN, &missing, &cfg, OUT, FWS, NULL),
                     L3K_ERROR_NULL_POINTER, "qkv_weight is NULL and so is v_weight");
        for (int i = 0; i < 5; ++i) {
            free(wpart[i]);
            free(gpart[i]);
        }
        free(BWS2->data);
        /* the kept attention output and LSE are still in act: the bad-input checks below use them */
        CHECK(l3k_llama_block_forward_train(X, COS, SIN, &w, &cfg, OUT2, &act, FWS, NULL) == L3K_SUCCESS,
              "%s", l3k_last_error());
    }

    /* ---- bad inputs: a clear error, nothing written ---- */
    memcpy(gu_copy, act.gate_up->data, gu_bytes);
    for (int j = 0; j < T * DIM; ++j) dx_f[j] = 12345.0f;
    l3k_llama_block_weights w_old = w;
    w_old.struct_size = 8;
    EXPECT_FAILS(l3k_llama_block_backward(DOUT, X, COS, SIN, &w_old, &cfg, &act, 0, DX, &g, BWS, NULL),
                 L3K_ERROR_VALUE, "llama_block_backward: weights->struct_size is 8, expected at least");
    host_tensor tsmall;
    const int64_t small_n[1] = {(int64_t)(lay.backward_workspace_bytes / 4) - 64};
    DLTensor *SMALL = host_f32(&tsmall, data_of(BWS), 1, small_n);
    EXPECT_FAILS(l3k_llama_block_backward(DOUT, X, COS, SIN, &w, &cfg, &act, 0, DX, &g, SMALL, NULL),
                 L3K_ERROR_WORKSPACE, "llama_block_backward: workspace has");
    EXPECT_FAILS(l3k_llama_block_backward(DOUT, X, COS, SIN, &w, &cfg, &act, 0, DOUT, &g, BWS, NULL),
                 L3K_ERROR_LAYOUT, "dx");
    EXPECT_FAILS(l3k_llama_block_backward(DOUT, X, COS, SIN, &w, &cfg, &act, 4, DX, &g, BWS, NULL),
                 L3K_ERROR_VALUE, "flags is 4");
    l3k_llama_block_grads g_missing = g;
    g_missing.o_weight = NULL;
    EXPECT_FAILS(l3k_llama_block_backward(DOUT, X, COS, SIN, &w, &cfg, &act, 0, DX, &g_missing, BWS, NULL),
                 L3K_ERROR_NULL_POINTER, "grads->o_weight is NULL");
    l3k_llama_block_activations half = act;
    half.lse = NULL;
    EXPECT_FAILS(l3k_llama_block_backward(DOUT, X, COS, SIN, &w, &cfg, &half, 0, DX, &g, BWS, NULL),
                 L3K_ERROR_NULL_POINTER, "saved->lse is NULL but saved->attn_out is not");
    l3k_llama_block_grads g_alias = g;
    g_alias.down_weight = (DLTensor *)w.down_weight; /* a gradient written over its own weight */
    EXPECT_FAILS(l3k_llama_block_backward(DOUT, X, COS, SIN, &w, &cfg, &act, 0, DX, &g_alias, BWS, NULL),
                 L3K_ERROR_LAYOUT, "grads->down_weight");
    host_tensor tmis;
    float *misaligned = (float *)act.residual->data + 1;
    l3k_llama_block_activations mis = act;
    const int64_t hn[1] = {T * DIM - 1};
    mis.rstd1 = host_f32(&tmis, misaligned, 1, hn);
    EXPECT_FAILS(l3k_llama_block_backward(DOUT, X, COS, SIN, &w, &cfg, &mis, 0, DX, &g, BWS, NULL),
                 L3K_ERROR_SHAPE, "saved->rstd1");
    for (int j = 0; j < T * DIM; ++j) CHECK(dx_f[j] == 12345.0f, "a refused call wrote dx[%d]", j);
    CHECK(memcmp(gu_copy, act.gate_up->data, gu_bytes) == 0, "a refused call wrote saved->gate_up");
    l3k_llama_block_config cfg_old = cfg;
    cfg_old.struct_size = 0;
    EXPECT_FAILS(l3k_llama_block_forward(X, COS, SIN, &w, &cfg_old, OUT, FWS, NULL), L3K_ERROR_VALUE,
                 "llama_block_forward: cfg->struct_size is 0, expected at least");

    /* A failing step is reported under the block's name with the step's own message. */
    int64_t short_tab[2] = {S - 1, HD / 2};
    host_tensor tcs;
    DLTensor *SHORT = host_f32(&tcs, cs, 2, short_tab);
    CHECK(l3k_llama_block_forward_train(X, SHORT, SIN, &w, &cfg, OUT2, &act, FWS, NULL) != L3K_SUCCESS,
          "short table");
    CHECK(strncmp(l3k_last_error(), "llama_block_forward_train: rope_forward: ", 41) == 0, "%s",
          l3k_last_error());
    int64_t bad[2] = {QKV - 8, DIM};
    host_tensor tb;
    l3k_llama_block_weights wb = w;
    wb.qkv_weight = host_f32(&tb, pf.wqkv, 2, bad);
    EXPECT_FAILS(l3k_llama_block_forward(X, COS, SIN, &wb, &cfg, OUT, FWS, NULL), L3K_ERROR_SHAPE,
                 "llama_block_forward: qkv_weight has ndim 2 and shape[0] 56, expected shape (64, 32)");

    /* ---- no tokens: nothing to do forward; every gradient is zero ---- */
    host_tensor tx0, tdo0, tdx0;
    const int64_t s0[3] = {0, S, DIM};
    DLTensor *X0 = host_f32(&tx0, NULL, 3, s0), *DO0 = host_f32(&tdo0, NULL, 3, s0),
             *DX0 = host_f32(&tdx0, NULL, 3, s0);
    l3k_llama_block_layout lay0 = L3K_LLAMA_BLOCK_LAYOUT_INIT;
    CHECK(l3k_llama_block_training_layout(X0, &w, &cfg, &lay0) == L3K_SUCCESS, "%s", l3k_last_error());
    host_tensor e[5];
    const int64_t zero[1] = {0};
    l3k_llama_block_activations act0 = L3K_LLAMA_BLOCK_ACTIVATIONS_INIT;
    act0.qkv = host_f32(&e[0], NULL, 1, zero);
    act0.residual = host_f32(&e[1], NULL, 1, zero);
    act0.gate_up = host_f32(&e[2], NULL, 1, zero);
    act0.rstd1 = host_f32(&e[3], NULL, 1, zero);
    act0.rstd2 = host_f32(&e[4], NULL, 1, zero);
    CHECK(l3k_llama_block_backward(DO0, X0, COS, SIN, &w, &cfg, &act0, 0, DX0, &g, BWS, NULL) == L3K_SUCCESS,
          "%s", l3k_last_error());
    for (int i = 1; i < N_PARTS; ++i) {
        int n;
        part(&p, i, &n);
        for (int j = 0; j < n; ++j)
            CHECK(gbuf[i][j] == 0.0f, "no tokens: %s[%d] = %g", part_names[i], j, gbuf[i][j]);
    }

    test_padded(&w, &cfg, &seed);

    free(gu_copy);
    host_tensor *const owned[] = {&tq, &th, &tgu, &tr1, &tr2, &tfw, &tbw, &tao, &tlse};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; ++i) free(owned[i]->t.data);
    for (int i = 1; i < N_PARTS; ++i) free(gbuf[i]);
    return report_failures();
}
