/* The whole block forward in one C call (l3k_llama_block_forward) on host memory,
 * against a naive float64 LLaMA block written out in loops here. */
#include "check.h"

enum { B = 2, S = 5, DIM = 32, H = 4, HKV = 2, HD = DIM / H, HID = 48, QKV = DIM + 2 * HKV * HD };

static void rmsnorm(const double *x, const float *w, double *y, int rows) {
    for (int r = 0; r < rows; ++r) {
        double ss = 0;
        for (int i = 0; i < DIM; ++i) ss += x[r * DIM + i] * x[r * DIM + i];
        double rs = 1.0 / sqrt(ss / DIM + 1e-5);
        for (int i = 0; i < DIM; ++i) y[r * DIM + i] = x[r * DIM + i] * rs * w[i];
    }
}

/* y[t][n] = sum_k x[t][k] w[n][k] */
static void matmul(const double *x, const float *w, double *y, int rows, int n, int k) {
    for (int t = 0; t < rows; ++t)
        for (int j = 0; j < n; ++j) {
            double acc = 0;
            for (int l = 0; l < k; ++l) acc += x[t * k + l] * w[j * k + l];
            y[t * n + j] = acc;
        }
}

static void reference(const float *xf, const float *wqkv, const float *wo, const float *wgu, const float *wd,
                      const float *n1, const float *n2, const float *cosf, const float *sinf, double *out) {
    static double x[B * S * DIM], h1[B * S * DIM], qkv[B * S * QKV], o[B * S * DIM], h[B * S * DIM];
    static double gu[B * S * 2 * HID], a[B * S * HID], mlp[B * S * DIM];
    for (int i = 0; i < B * S * DIM; ++i) x[i] = xf[i];
    rmsnorm(x, n1, h1, B * S);
    matmul(h1, wqkv, qkv, B * S, QKV, DIM);
    for (int t = 0; t < B * S; ++t) /* rotate-half RoPE on the q and k heads */
        for (int hh = 0; hh < H + HKV; ++hh)
            for (int p = 0; p < HD / 2; ++p) {
                double *e = qkv + t * QKV + hh * HD;
                double c = cosf[(t % S) * (HD / 2) + p], s = sinf[(t % S) * (HD / 2) + p];
                double x1 = e[p], x2 = e[p + HD / 2];
                e[p] = x1 * c - x2 * s;
                e[p + HD / 2] = x2 * c + x1 * s;
            }
    for (int b = 0; b < B; ++b) /* causal attention, GQA */
        for (int hh = 0; hh < H; ++hh)
            for (int i = 0; i < S; ++i) {
                const double *q = qkv + (b * S + i) * QKV + hh * HD;
                const int kvh = hh / (H / HKV);
                double sc[S], mx = -1e300, sum = 0;
                for (int j = 0; j <= i; ++j) {
                    const double *k = qkv + (b * S + j) * QKV + DIM + kvh * HD;
                    double d = 0;
                    for (int l = 0; l < HD; ++l) d += q[l] * k[l];
                    sc[j] = d / sqrt((double)HD);
                    if (sc[j] > mx) mx = sc[j];
                }
                for (int j = 0; j <= i; ++j) sum += (sc[j] = exp(sc[j] - mx));
                for (int l = 0; l < HD; ++l) {
                    double acc = 0;
                    for (int j = 0; j <= i; ++j) acc += sc[j] * qkv[(b * S + j) * QKV + DIM + HKV * HD + kvh * HD + l];
                    o[(b * S + i) * DIM + hh * HD + l] = acc / sum;
                }
            }
    matmul(o, wo, h, B * S, DIM, DIM);
    for (int i = 0; i < B * S * DIM; ++i) h[i] += x[i];
    rmsnorm(h, n2, h1, B * S);
    matmul(h1, wgu, gu, B * S, 2 * HID, DIM);
    for (int t = 0; t < B * S; ++t)
        for (int j = 0; j < HID; ++j) {
            double g = gu[t * 2 * HID + j], u = gu[t * 2 * HID + HID + j];
            a[t * HID + j] = g / (1 + exp(-g)) * u;
        }
    matmul(a, wd, mlp, B * S, DIM, HID);
    for (int i = 0; i < B * S * DIM; ++i) out[i] = h[i] + mlp[i];
}

int main(void) {
    static float x[B * S * DIM], out[B * S * DIM], wqkv[QKV * DIM], wo[DIM * DIM], wgu[2 * HID * DIM],
        wd[DIM * HID], n1[DIM], n2[DIM], cs[S * HD / 2], sn[S * HD / 2];
    static double ref[B * S * DIM];
    unsigned seed = 7;
    float *ws_[] = {wqkv, wo, wgu, wd};
    int sizes[] = {QKV * DIM, DIM * DIM, 2 * HID * DIM, DIM * HID};
    for (int m = 0; m < 4; ++m)
        for (int i = 0; i < sizes[m]; ++i) ws_[m][i] = 0.3f * frand(&seed);
    for (int i = 0; i < DIM; ++i) { n1[i] = 1 + 0.2f * frand(&seed); n2[i] = 1 + 0.2f * frand(&seed); }
    for (int i = 0; i < B * S * DIM; ++i) { x[i] = frand(&seed); out[i] = NAN; }
    for (int s = 0; s < S; ++s)
        for (int p = 0; p < HD / 2; ++p) {
            double ang = s * pow(500000.0, -2.0 * p / HD);
            cs[s * HD / 2 + p] = (float)cos(ang);
            sn[s * HD / 2 + p] = (float)sin(ang);
        }
    host_tensor tx, tout, tq, to, tg, td, t1, t2, tc, ts, tw;
    int64_t sx[3] = {B, S, DIM}, sq[2] = {QKV, DIM}, so[2] = {DIM, DIM}, sg[2] = {2 * HID, DIM},
            sd[2] = {DIM, HID}, sn1[1] = {DIM}, stab[2] = {S, HD / 2};
    l3k_llama_block_weights w = {host_f32(&tq, wqkv, 2, sq), host_f32(&to, wo, 2, so), host_f32(&tg, wgu, 2, sg),
                                 host_f32(&td, wd, 2, sd), host_f32(&t1, n1, 1, sn1), host_f32(&t2, n2, 1, sn1)};
    l3k_llama_block_config cfg = {H, HKV, 1, 1e-5f};
    DLTensor *X = host_f32(&tx, x, 3, sx), *OUT = host_f32(&tout, out, 3, sx);
    DLTensor *COS = host_f32(&tc, cs, 2, stab), *SIN = host_f32(&ts, sn, 2, stab);
    size_t bytes = 0;
    CHECK(l3k_llama_block_forward_workspace_size(X, &w, &cfg, &bytes) == L3K_SUCCESS, "%s", l3k_last_error());
    float *ws = malloc(bytes + 256);
    float *ws_aligned = (float *)(((uintptr_t)ws + 255) & ~(uintptr_t)255);
    int64_t swn[1] = {(int64_t)(bytes / 4)};
    DLTensor *WS = host_f32(&tw, ws_aligned, 1, swn);
    CHECK(l3k_llama_block_forward(X, COS, SIN, &w, &cfg, OUT, WS, NULL) == L3K_SUCCESS, "%s", l3k_last_error());
    reference(x, wqkv, wo, wgu, wd, n1, n2, cs, sn, ref);
    double err = 0, mag = 0;
    for (int i = 0; i < B * S * DIM; ++i) {
        err = fmax(err, fabs(out[i] - ref[i]));
        mag = fmax(mag, fabs(ref[i]));
    }
    CHECK(err <= 1e-4 * mag, "block output max error %g (max |ref| %g)", err, mag);
    printf("block forward: max error %.3g of max |ref| %.3g\n", err, mag);

    /* A bad weight is reported under the block's name with the step's own message. */
    int64_t bad[2] = {QKV - 8, DIM};
    host_tensor tb;
    l3k_llama_block_weights wb = w;
    wb.qkv_weight = host_f32(&tb, wqkv, 2, bad);
    CHECK(l3k_llama_block_forward(X, COS, SIN, &wb, &cfg, OUT, WS, NULL) == L3K_ERROR_SHAPE, "bad qkv rows");
    CHECK(strstr(l3k_last_error(), "llama_block_forward: qkv_weight has 56 rows, expected") != NULL, "%s",
          l3k_last_error());
    int64_t short_tab[2] = {S - 1, HD / 2};
    host_tensor tcs;
    DLTensor *SHORT = host_f32(&tcs, cs, 2, short_tab);
    CHECK(l3k_llama_block_forward(X, SHORT, SIN, &w, &cfg, OUT, WS, NULL) != L3K_SUCCESS, "short table");
    CHECK(strncmp(l3k_last_error(), "llama_block_forward: rope_forward: ", 35) == 0, "%s", l3k_last_error());
    free(ws);
    printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "ok", g_failures);
    return g_failures ? 1 : 0;
}
