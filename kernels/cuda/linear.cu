/* The GEMMs of the block through cuBLASLt.
 *
 * One cuBLASLt handle per device, created on first use and kept for the life
 * of the process (a handle is not tied to a stream and holds no workspace;
 * cuBLASLt is thread safe).  The workspace is the caller's, so nothing is
 * allocated here and calls are safe inside CUDA graph capture once the
 * handle exists.
 *
 * The algorithm: cuBLASLt's heuristic orders its candidates by an estimate,
 * and its first pick was 1-4% slower than the fastest candidate on several of
 * the LLaMA-3-8B layer's GEMMs on the H100 (tests/gpu/gemm_algos.cu).  So the
 * first call for a GEMM configuration (device, shape, ops, strides, dtypes,
 * pointer alignments, workspace) times the candidates on the caller's own
 * operands, keeps the fastest, and every later call reuses it together with
 * the configuration's cuBLASLt descriptors.  Tuning is skipped, and the first
 * pick runs, while the stream is being captured into a CUDA graph (not
 * remembered: a later call outside capture tunes) and when C is D (a
 * candidate's run would accumulate into the caller's output);
 * L3K_GEMM_AUTOTUNE=0 turns it off.
 *
 * cuBLASLt itself is opened at the first call (cublaslt_load.cu); when it cannot be,
 * every call returns L3K_GEMM_NO_CUBLASLT, which the C ABI reports with the places it tried. */
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "cublaslt_load.h"
#include "linear.h"

/* Every use of cuBLASLt follows handle_for_device, which has checked that it loaded. */
#define LT(fn) (l3k_cublaslt()->fn)

namespace {

constexpr int MAX_DEVICES = 64;
cublasLtHandle_t g_handles[MAX_DEVICES];
std::mutex g_handle_mutex;

int handle_for_device(int dev, cublasLtHandle_t *out) {
    if (dev < 0 || dev >= MAX_DEVICES) return (int)cudaErrorInvalidDevice;
    std::lock_guard<std::mutex> lock(g_handle_mutex);
    if (!g_handles[dev]) {
        if (!l3k_cublaslt()) return L3K_GEMM_NO_CUBLASLT;
        cublasStatus_t st = LT(Create)(&g_handles[dev]);
        if (st != CUBLAS_STATUS_SUCCESS) return -(int)st;
    }
    *out = g_handles[dev];
    return 0;
}

cudaDataType_t cuda_type(l3k_dt dt) {
    return dt == L3K_DT_F32 ? CUDA_R_32F : dt == L3K_DT_F16 ? CUDA_R_16F : CUDA_R_16BF;
}

/* Largest power of two <= 256 dividing the address: what the kernels may assume. */
uint32_t alignment_of(const void *p) {
    uint32_t a = 256;
    while (a > 1 && ((uintptr_t)p % a) != 0) a /= 2;
    return a;
}

/* The descriptors of one GEMM configuration.  Built on a configuration's first call and kept
 * with its algorithm for the life of the process (unless that call was being captured): a later
 * call goes straight to cublasLtMatmul (creating and destroying six descriptors cost more host
 * time than the launch itself at the small, host-bound shapes).  Never modified once built, so
 * threads may share them. */
struct Descriptors {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    Descriptors() = default;
    Descriptors(const Descriptors &) = delete;
    Descriptors &operator=(const Descriptors &) = delete;
    ~Descriptors() {
        if (d) LT(MatrixLayoutDestroy)(d);
        if (c) LT(MatrixLayoutDestroy)(c);
        if (b) LT(MatrixLayoutDestroy)(b);
        if (a) LT(MatrixLayoutDestroy)(a);
        if (op) LT(MatmulDescDestroy)(op);
    }
    cublasLtMatrixLayout_t c_layout() const { return c ? c : d; }
};

struct Preference { /* only the heuristic query needs one */
    cublasLtMatmulPreference_t p = nullptr;
    ~Preference() {
        if (p) LT(MatmulPreferenceDestroy)(p);
    }
};

#define LT_TRY(expr)                                        \
    do {                                                    \
        cublasStatus_t st_ = (expr);                        \
        if (st_ != CUBLAS_STATUS_SUCCESS) return -(int)st_; \
    } while (0)

/* Everything the heuristic's answer depends on, plus the device and workspace. */
using TuneKey = std::array<int64_t, 16>;
struct Plan {
    Descriptors ds;
    cublasLtMatmulAlgo_t algo;
};
std::map<TuneKey, std::unique_ptr<const Plan>> g_plans;
std::mutex g_plans_mutex;

constexpr int CANDIDATES = 8;     /* cuBLASLt returned at most 8 for these GEMMs */
constexpr int ROUNDS = 5;         /* timed rounds after one warm-up round; median per candidate */
constexpr float MIN_GAIN = 0.01f; /* leave the first pick unless another is >1% faster */

bool autotune_enabled() {
    static const bool on = [] {
        const char *v = std::getenv("L3K_GEMM_AUTOTUNE");
        return !(v && std::strcmp(v, "0") == 0);
    }();
    return on;
}

/* The candidates are run in rounds, each round once each, so drift in clocks reaches them
 * alike; events sit between consecutive runs.  Returns the index of the fastest, 0 when
 * the first pick is within MIN_GAIN of it or timing failed. */
int fastest_candidate(cublasLtHandle_t handle, const Descriptors &ds, const l3k_gemm_args *g, const void *c,
                      float alpha, float beta, const cublasLtMatmulHeuristicResult_t *cand, int count,
                      cudaStream_t stream) {
    const int per_round = count + 1, total = per_round * (ROUNDS + 1);
    std::vector<cudaEvent_t> ev(total, nullptr);
    bool ok = true;
    for (cudaEvent_t &e : ev) ok = ok && cudaEventCreate(&e) == cudaSuccess;
    std::vector<bool> failed(count, false);
    for (int r = 0; ok && r <= ROUNDS; ++r) {
        cudaEvent_t *round = &ev[r * per_round];
        ok = cudaEventRecord(round[0], stream) == cudaSuccess;
        for (int i = 0; ok && i < count; ++i) {
            if (LT(Matmul)(handle, ds.op, &alpha, g->a, ds.a, g->b, ds.b, &beta, c, ds.c_layout(), g->d, ds.d,
                           &cand[i].algo, g->workspace, g->workspace ? g->workspace_bytes : 0,
                           stream) != CUBLAS_STATUS_SUCCESS)
                failed[i] = true;
            ok = cudaEventRecord(round[i + 1], stream) == cudaSuccess;
        }
    }
    int best = 0;
    if (ok && cudaEventSynchronize(ev[total - 1]) == cudaSuccess) {
        std::vector<float> median(count, 0.f);
        for (int i = 0; ok && i < count; ++i) {
            std::vector<float> t;
            for (int r = 1; ok && r <= ROUNDS; ++r) {
                float ms = 0.f;
                ok = cudaEventElapsedTime(&ms, ev[r * per_round + i], ev[r * per_round + i + 1]) ==
                     cudaSuccess;
                t.push_back(ms);
            }
            std::sort(t.begin(), t.end());
            median[i] = t[t.size() / 2];
        }
        for (int i = 1; ok && i < count; ++i)
            if (!failed[i] && (failed[best] || median[i] < median[best])) best = i;
        if (!ok || failed[best] || (!failed[0] && median[best] > (1.0f - MIN_GAIN) * median[0])) best = 0;
    }
    for (cudaEvent_t e : ev)
        if (e) cudaEventDestroy(e);
    if (!ok) (void)cudaGetLastError(); /* timing failed: fall back to the first pick, report nothing */
    return best;
}

/* The descriptors of `g`'s configuration; has_c: C is read (beta != 0), separate_c: C needs its own
 * layout (another buffer or leading dimension than D). */
int build_descriptors(const l3k_gemm_args *g, bool has_c, bool separate_c, Descriptors &ds) {
    LT_TRY(LT(MatmulDescCreate)(&ds.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const int32_t ta = g->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    LT_TRY(LT(MatmulDescSetAttribute)(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_TRY(LT(MatmulDescSetAttribute)(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    const cudaDataType_t ab = cuda_type(g->ab_dtype), cd = cuda_type(g->cd_dtype);
    LT_TRY(LT(MatrixLayoutCreate)(&ds.a, ab, g->trans_a ? g->k : g->m, g->trans_a ? g->m : g->k, g->lda));
    LT_TRY(LT(MatrixLayoutCreate)(&ds.b, ab, g->trans_b ? g->n : g->k, g->trans_b ? g->k : g->n, g->ldb));
    LT_TRY(LT(MatrixLayoutCreate)(&ds.d, cd, g->m, g->n, g->ldd));
    if (has_c && separate_c) LT_TRY(LT(MatrixLayoutCreate)(&ds.c, cd, g->m, g->n, g->ldc));
    return 0;
}

} // namespace

extern "C" int l3k_cuda_gemm(const l3k_gemm_args *g, void *stream) {
    if (g->k == 0) { /* an empty sum: D = beta * C, i.e. zero or left as it is */
        if (g->beta != 0.0f && g->c == g->d) return 0;
        const size_t es = g->cd_dtype == L3K_DT_F32 ? 4 : 2;
        return (int)cudaMemset2DAsync(g->d, (size_t)g->ldd * es, 0, (size_t)g->m * es, (size_t)g->n,
                                      (cudaStream_t)stream);
    }
    int dev = 0;
    cudaError_t cerr = cudaGetDevice(&dev);
    if (cerr != cudaSuccess) return (int)cerr;
    cublasLtHandle_t handle;
    int err = handle_for_device(dev, &handle);
    if (err) return err;

    const bool has_c = g->beta != 0.0f && g->c;
    const void *c = has_c ? g->c : g->d;
    const bool in_place = has_c && c == g->d;
    const bool separate_c = has_c && (c != g->d || g->ldc != g->ldd);
    const float alpha = g->alpha, beta = has_c ? g->beta : 0.0f;
    const uint64_t ws = g->workspace ? g->workspace_bytes : 0;
    const uint32_t al[4] = {alignment_of(g->a), alignment_of(g->b), alignment_of(c), alignment_of(g->d)};
    const TuneKey key = {dev,
                         g->trans_a,
                         g->trans_b,
                         g->m,
                         g->n,
                         g->k,
                         g->lda,
                         g->ldb,
                         has_c ? g->ldc * 2 + in_place : -1,
                         g->ldd,
                         g->ab_dtype * 16 + g->cd_dtype,
                         al[0],
                         al[1],
                         al[2],
                         al[3],
                         (int64_t)ws};
    const Plan *plan = nullptr;
    {
        std::lock_guard<std::mutex> lock(g_plans_mutex);
        auto it = g_plans.find(key);
        if (it != g_plans.end()) plan = it->second.get();
    }
    std::unique_ptr<Plan> fresh;
    bool capturing = false;
    if (!plan) {
        fresh.reset(new Plan());
        Descriptors &ds = fresh->ds;
        if ((err = build_descriptors(g, has_c, separate_c, ds)) != 0) return err;
        Preference pref;
        LT_TRY(LT(MatmulPreferenceCreate)(&pref.p));
        LT_TRY(LT(MatmulPreferenceSetAttribute)(pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                sizeof ws));
        LT_TRY(
            LT(MatmulPreferenceSetAttribute)(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], 4));
        LT_TRY(
            LT(MatmulPreferenceSetAttribute)(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], 4));
        LT_TRY(
            LT(MatmulPreferenceSetAttribute)(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], 4));
        LT_TRY(
            LT(MatmulPreferenceSetAttribute)(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[3], 4));

        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
        if (cudaStreamIsCapturing((cudaStream_t)stream, &capture) != cudaSuccess) {
            (void)cudaGetLastError();
            capture = cudaStreamCaptureStatusActive; /* unknown: run nothing extra, remember nothing */
        }
        capturing = capture != cudaStreamCaptureStatusNone;
        const bool tune = autotune_enabled() && !capturing && !in_place;
        /* A one-result query is served from cuBLASLt's heuristics cache; a longer one is not (~160 us). */
        cublasLtMatmulHeuristicResult_t cand[CANDIDATES] = {};
        int found = 0;
        LT_TRY(LT(MatmulAlgoGetHeuristic)(handle, ds.op, ds.a, ds.b, ds.c_layout(), ds.d, pref.p,
                                          tune ? CANDIDATES : 1, cand, &found));
        if (found < 1) return -(int)CUBLAS_STATUS_NOT_SUPPORTED;
        fresh->algo = cand[tune && found > 1 ? fastest_candidate(handle, ds, g, c, alpha, beta, cand, found,
                                                                 (cudaStream_t)stream)
                                             : 0]
                          .algo;
        plan = fresh.get();
    }
    const Descriptors &ds = plan->ds;
    LT_TRY(LT(Matmul)(handle, ds.op, &alpha, g->a, ds.a, g->b, ds.b, &beta, c, ds.c_layout(), g->d, ds.d,
                      &plan->algo, g->workspace, ws, (cudaStream_t)stream));
    if (fresh && !capturing) {
        std::lock_guard<std::mutex> lock(g_plans_mutex);
        g_plans.emplace(key, std::move(fresh)); /* a thread that raced here keeps the first entry */
    }
    return 0;
}
