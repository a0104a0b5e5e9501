// How far cuBLASLt's first heuristic pick is from the fastest algorithm it offers, for the
// twelve GEMMs of one LLaMA-3-8B layer training step (B2 S2048 bf16), mapped exactly as
// capi/linear.c maps them.  For each GEMM: the top candidates of cublasLtMatmulAlgoGetHeuristic,
// each timed (CUDA events, median of REPS after an L2-evicting read), with its tile and stages.
//
//   nvcc -O2 -arch=sm_90a tools/gemm_algos.cu -lcublasLt -o /tmp/gemm_algos && /tmp/gemm_algos [candidates]
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); std::exit(1); } } while (0)
#define LT(x) do { cublasStatus_t s_ = (x); if (s_ != CUBLAS_STATUS_SUCCESS) { \
    std::printf("%s:%d cublas status %d\n", __FILE__, __LINE__, (int)s_); std::exit(1); } } while (0)

struct Gemm {
    const char *name;
    int trans_a, trans_b;
    long m, n, k;
    float beta;      // 1: the residual / accumulate epilogue (C separate from D)
    bool workspace;  // the block passes the 32 MiB workspace
};

static __global__ void fill(__nv_bfloat16 *p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
        p[i] = __float2bfloat16(((h & 0xffff) / 65536.0f - 0.5f) * 0.1f);
    }
}

static __global__ void evict(const float4 *p, size_t n, float *sink) {
    float acc = 0.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += p[i].x;
    if (acc == 12345.f) *sink = acc;
}

int main(int argc, char **argv) {
    const int want = argc > 1 ? std::atoi(argv[1]) : 16;
    const int REPS = 15;
    const long T = 4096, D = 4096, H = 14336, QKV = 6144;
    // Forward Y = X W^T: m=N, n=T, k=K (A=W op T).  dX = dY W: m=K, n=T, k=N.  dW = dY^T X: m=K, n=N, k=T.
    const Gemm gemms[] = {
        {"fwd qkv", 1, 0, QKV, T, D, 0, true},        {"fwd o (+x)", 1, 0, D, T, D, 1, true},
        {"fwd gate_up", 1, 0, 2 * H, T, D, 0, true},  {"fwd down (+h)", 1, 0, D, T, H, 1, true},
        {"dX down", 0, 0, H, T, D, 0, true},          {"dW down", 0, 1, H, D, T, 0, true},
        {"dW gate_up", 0, 1, D, 2 * H, T, 0, false},  {"dX gate_up", 0, 0, D, T, 2 * H, 0, false},
        {"dX o", 0, 0, D, T, D, 0, true},             {"dW o", 0, 1, D, D, T, 0, true},
        {"dX qkv", 0, 0, D, T, QKV, 0, true},         {"dW qkv", 0, 1, D, QKV, T, 0, true},
    };
    size_t max_el = 0;
    for (const Gemm &g : gemms) max_el = std::max({max_el, (size_t)(g.m * g.k), (size_t)(g.k * g.n), (size_t)(g.m * g.n)});
    __nv_bfloat16 *a, *b, *c, *d;
    CK(cudaMalloc(&a, max_el * 2)); CK(cudaMalloc(&b, max_el * 2));
    CK(cudaMalloc(&c, max_el * 2)); CK(cudaMalloc(&d, max_el * 2));
    fill<<<1024, 256>>>(a, max_el, 1); fill<<<1024, 256>>>(b, max_el, 2); fill<<<1024, 256>>>(c, max_el, 3);
    const size_t ws_bytes = 32 << 20, flush_bytes = 256 << 20;
    void *ws; float4 *flush; float *sink;
    CK(cudaMalloc(&ws, ws_bytes)); CK(cudaMalloc(&flush, flush_bytes)); CK(cudaMalloc(&sink, 4));
    CK(cudaMemset(flush, 0, flush_bytes));
    cublasLtHandle_t lt;
    LT(cublasLtCreate(&lt));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    double sum_first = 0, sum_best = 0;
    std::printf("%-15s %5s %6s %6s  %9s %9s %6s  %s\n", "gemm", "m", "n", "k", "pick#0 us", "best us", "gain", "best (index: tile id, stages, splitk)");
    for (const Gemm &g : gemms) {
        cublasLtMatmulDesc_t op;
        LT(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        int32_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
        LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, 4));
        LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, 4));
        cublasLtMatrixLayout_t la, lb, lc, ld;
        LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.trans_a ? g.k : g.m));
        LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.trans_b ? g.n : g.k));
        LT(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, g.m, g.n, g.m));
        LT(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, g.m, g.n, g.m));
        cublasLtMatmulPreference_t pref;
        LT(cublasLtMatmulPreferenceCreate(&pref));
        uint64_t wsb = g.workspace ? ws_bytes : 0;
        LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb));
        std::vector<cublasLtMatmulHeuristicResult_t> res(want);
        int found = 0;
        LT(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, ld, pref, want, res.data(), &found));
        const float alpha = 1.f, beta = g.beta;
        std::vector<float> med(found, 1e30f);
        for (int i = 0; i < found; ++i) {
            std::vector<float> t;
            for (int r = 0; r < REPS + 2; ++r) {
                evict<<<528, 512>>>(flush, flush_bytes / 16, sink);
                CK(cudaEventRecord(e0));
                cublasStatus_t st = cublasLtMatmul(lt, op, &alpha, a, la, b, lb, &beta, c, lc, d, ld, &res[i].algo,
                                                   g.workspace ? ws : nullptr, wsb, 0);
                CK(cudaEventRecord(e1));
                if (st != CUBLAS_STATUS_SUCCESS) { t.clear(); break; }
                CK(cudaEventSynchronize(e1));
                float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
                if (r >= 2) t.push_back(ms * 1e3f);
            }
            if (!t.empty()) { std::sort(t.begin(), t.end()); med[i] = t[t.size() / 2]; }
        }
        int best = int(std::min_element(med.begin(), med.end()) - med.begin());
        int tile = 0, stages = 0, splitk = 0;
        size_t w;
        cublasLtMatmulAlgoConfigGetAttribute(&res[best].algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, 4, &w);
        cublasLtMatmulAlgoConfigGetAttribute(&res[best].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, 4, &w);
        cublasLtMatmulAlgoConfigGetAttribute(&res[best].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, 4, &w);
        std::printf("%-15s %5ld %6ld %6ld  %9.1f %9.1f %5.1f%%  #%d of %d: %d, %d, %d   all:", g.name, g.m, g.n, g.k,
                    med[0], med[best], 100.0 * (med[0] - med[best]) / med[0], best, found, tile, stages, splitk);
        for (int i = 0; i < found; ++i) std::printf(" %.0f", med[i] > 1e29f ? -1.f : med[i]);
        std::printf("\n");
        sum_first += med[0];
        sum_best += med[best];
        cublasLtMatmulPreferenceDestroy(pref);
        cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc); cublasLtMatrixLayoutDestroy(ld);
        cublasLtMatmulDescDestroy(op);
    }
    std::printf("sum over the step: heuristic pick %.1f us, best %.1f us (%.1f%%)\n", sum_first, sum_best,
                100.0 * (sum_first - sum_best) / sum_first);
    return 0;
}
