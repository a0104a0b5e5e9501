/* RMSNorm (optionally with a fused residual add), forward and backward, CUDA.
 *
 * Geometry: a row is cut into slots of 8 elements; a group of G threads (a
 * power of two) shares a row, thread `lane` owning slots lane, lane+G, ...
 * Rows up to SLOTS*G*8 elements are held in registers between the reduction
 * and the output pass (one read, one write per element); longer rows take a
 * two-pass loop kernel.  16-byte loads whenever the rows allow them.
 *
 * dweight: every backward block keeps the float32 sum of dy * x * rstd over
 * its rows in registers (a thread owns the same columns in every row), folds
 * its groups together in shared memory in a fixed order, and writes one
 * partial row to the workspace; a second kernel adds the partial rows in a
 * fixed tree order.  No atomics: the result is bit-for-bit reproducible. */
#include "common.cuh"

namespace {

constexpr int FWD_SLOTS = 4;
constexpr int FWD_BLOCK = 256;
constexpr int FWD_BLOCKS_PER_SM = 8;

/* Multiprocessors of the current device, read once per device. */
int sm_count() {
    static int cached[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
    if (!cached[dev]) {
        int v = 0;
        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
        cached[dev] = v > 0 ? v : 132;
    }
    return cached[dev];
}
constexpr int LOOP_BLOCK = 1024;

/* Sum K values over the G threads of each group; every thread gets the sums.
 * All threads of the block must call it (it may use __syncthreads). */
template <int K>
__device__ __forceinline__ void group_sum(float (&v)[K], int G, float *red /* 32*K */) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = l3k_subwarp_sum(v[k], G < 32 ? G : 32);
    if (G > 32) {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        __syncthreads(); /* the previous call's readers are done with `red` */
        if (lane == 0)
#pragma unroll
            for (int k = 0; k < K; ++k) red[warp * K + k] = v[k];
        __syncthreads();
        const int first = (threadIdx.x / G) * (G / 32);
#pragma unroll
        for (int k = 0; k < K; ++k) {
            float s = 0.0f;
            for (int w = 0; w < G / 32; ++w) s += red[(first + w) * K + k];
            v[k] = s;
        }
    }
}

/* A group per row; a thread keeps its S slots in the storage type between the
 * sum of squares and the output pass.  Blocks loop over rows with a stride of
 * the grid, so a resident grid streams the whole tensor. */
template <typename T, int S, bool VEC, bool RES>
__global__ void __launch_bounds__(1024) fwd_cached(l3k_rmsnorm_fwd_args a, int G) {
    __shared__ float red[32];
    const int R = blockDim.x / G, group = threadIdx.x / G, lane = threadIdx.x % G;
    const int64_t n = a.n;
    const int64_t first = (int64_t)blockIdx.x * R, step = (int64_t)gridDim.x * R;
    const int64_t iters = first < a.rows ? (a.rows - first + step - 1) / step : 0;
    for (int64_t it = 0; it < iters; ++it) {
        const int64_t row = first + group + it * step;
        const bool active = row < a.rows;
        const int64_t r = active ? row : 0;
        l3k_slot<T> v[S];
        float ss[1] = {0.0f};
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int64_t col = active ? ((int64_t)s * G + lane) * 8 : n;
            v[s] = l3k_load_slot<T, VEC>((const T *)a.x + r * a.x_stride, col, n);
            if (RES) {
                const l3k_slot<T> rv = l3k_load_slot<T, VEC>((const T *)a.residual + r * a.residual_stride, col, n);
#pragma unroll
                for (int i = 0; i < 8; ++i) v[s].at(i) = l3k_from_float<T>(v[s].get(i) + rv.get(i));
                if (active) l3k_store_slot<T, VEC>((T *)a.h_out + r * a.h_stride, col, n, v[s]);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) ss[0] += v[s].get(i) * v[s].get(i);
        }
        group_sum<1>(ss, G, red);
        if (!active) continue;
        const float rstd = rsqrtf(ss[0] / (float)n + a.eps);
        T *y = (T *)a.y + r * a.y_stride;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int64_t col = ((int64_t)s * G + lane) * 8;
            const l3k_slot<T> w = l3k_load_slot<T, VEC>((const T *)a.weight, col, n);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[s].at(i) = l3k_from_float<T>(v[s].get(i) * rstd * w.get(i));
            l3k_store_slot<T, VEC>(y, col, n, v[s]);
        }
        if (lane == 0 && a.rstd) a.rstd[r] = rstd;
    }
}

/* Rows too long for registers: one block per row, two passes over global memory. */
template <typename T, bool VEC>
__global__ void __launch_bounds__(LOOP_BLOCK) fwd_loop(l3k_rmsnorm_fwd_args a) {
    __shared__ float red[32];
    const int G = blockDim.x;
    const int64_t n = a.n;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const T *x = (const T *)a.x + r * a.x_stride;
        const T *res = (const T *)a.residual + r * a.residual_stride;
        T *h = (T *)a.h_out + r * a.h_stride;
        float ss[1] = {0.0f};
        for (int64_t col = (int64_t)threadIdx.x * 8; col < n; col += (int64_t)G * 8) {
            float v[8];
            l3k_load8<T, VEC>(x, col, n, v);
            if (a.residual) {
                float rv[8];
                l3k_load8<T, VEC>(res, col, n, rv);
                for (int i = 0; i < 8; ++i) v[i] = l3k_round_to<T>(v[i] + rv[i]);
                l3k_store8<T, VEC>(h, col, n, v);
            }
            for (int i = 0; i < 8; ++i) ss[0] += v[i] * v[i];
        }
        group_sum<1>(ss, G, red);
        const float rstd = rsqrtf(ss[0] / (float)n + a.eps);
        /* Second pass reads h back when fused: h may alias x. */
        const T *src = a.residual ? (const T *)h : x;
        T *y = (T *)a.y + r * a.y_stride;
        for (int64_t col = (int64_t)threadIdx.x * 8; col < n; col += (int64_t)G * 8) {
            float v[8], w[8];
            l3k_load8<T, VEC>(src, col, n, v);
            l3k_load8<T, VEC>((const T *)a.weight, col, n, w);
            for (int i = 0; i < 8; ++i) v[i] = v[i] * rstd * w[i];
            l3k_store8<T, VEC>(y, col, n, v);
        }
        if (threadIdx.x == 0 && a.rstd) a.rstd[r] = rstd;
    }
}

/* One row of the backward for the values a thread holds: dx written, dweight
 * contribution returned in acc. */
template <typename T, int S, bool VEC>
__global__ void __launch_bounds__(L3K_RMSNORM_BWD_BLOCK) bwd_cached(l3k_rmsnorm_bwd_args a, int G) {
    __shared__ float red[64];
    extern __shared__ float fold[]; /* n floats when the block has several groups */
    const int R = blockDim.x / G, group = threadIdx.x / G, lane = threadIdx.x % G;
    const int64_t n = a.n;
    const int64_t first = (int64_t)blockIdx.x * R, step = (int64_t)gridDim.x * R;
    const int64_t iters = first < a.rows ? (a.rows - first + step - 1) / step : 0;

    float w[S][8], acc[S][8];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        l3k_load8<T, VEC>((const T *)a.weight, ((int64_t)s * G + lane) * 8, n, w[s]);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[s][i] = 0.0f;
    }
    for (int64_t it = 0; it < iters; ++it) {
        const int64_t row = first + group + it * step;
        const bool active = row < a.rows;
        const int64_t r = active ? row : 0;
        const T *x = (const T *)a.x + r * a.x_stride;
        const T *dy = (const T *)a.dy + r * a.dy_stride;
        float xv[S][8], gv[S][8];
        float sums[2] = {0.0f, 0.0f}; /* sum x^2, sum dy*w*x */
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int64_t col = active ? ((int64_t)s * G + lane) * 8 : n;
            l3k_load8<T, VEC>(x, col, n, xv[s]);
            l3k_load8<T, VEC>(dy, col, n, gv[s]);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                sums[0] += xv[s][i] * xv[s][i];
                sums[1] += gv[s][i] * w[s][i] * xv[s][i];
            }
        }
        group_sum<2>(sums, G, red);
        if (!active) continue;
        const float rstd = a.rstd ? a.rstd[r] : rsqrtf(sums[0] / (float)n + a.eps);
        const float c = rstd * rstd * sums[1] / (float)n;
        const T *dh = (const T *)a.dh_in + r * a.dh_in_stride;
        T *dx = (T *)a.dx + r * a.dx_stride;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int64_t col = ((int64_t)s * G + lane) * 8;
            float out[8], dhv[8];
            if (a.dh_in) l3k_load8<T, VEC>(dh, col, n, dhv);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                acc[s][i] += gv[s][i] * xv[s][i] * rstd;
                out[i] = rstd * (gv[s][i] * w[s][i] - xv[s][i] * c) + (a.dh_in ? dhv[i] : 0.0f);
            }
            l3k_store8<T, VEC>(dx, col, n, out);
        }
    }
    if (!a.dweight) return;
    float *part = a.partials + (size_t)blockIdx.x * (size_t)n;
    if (R == 1) {
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int64_t col = ((int64_t)s * G + lane) * 8;
#pragma unroll
            for (int i = 0; i < 8; ++i)
                if (col + i < n) part[col + i] = acc[s][i];
        }
        return;
    }
    for (int g = 0; g < R; ++g) { /* fixed order: group 0, 1, ... */
        if (group == g) {
#pragma unroll
            for (int s = 0; s < S; ++s) {
                const int64_t col = ((int64_t)s * G + lane) * 8;
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    if (col + i < n) fold[col + i] = (g ? fold[col + i] : 0.0f) + acc[s][i];
            }
        }
        __syncthreads();
    }
    for (int64_t col = threadIdx.x; col < n; col += blockDim.x) part[col] = fold[col];
}

/* Rows too long for registers: a block per row, dweight summed straight into
 * the block's own partial row (no other block touches it). */
template <typename T, bool VEC>
__global__ void __launch_bounds__(LOOP_BLOCK) bwd_loop(l3k_rmsnorm_bwd_args a) {
    __shared__ float red[64];
    const int G = blockDim.x;
    const int64_t n = a.n;
    float *part = a.dweight ? a.partials + (size_t)blockIdx.x * (size_t)n : nullptr;
    if (part)
        for (int64_t col = threadIdx.x; col < n; col += G) part[col] = 0.0f;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const T *x = (const T *)a.x + r * a.x_stride;
        const T *dy = (const T *)a.dy + r * a.dy_stride;
        float sums[2] = {0.0f, 0.0f};
        for (int64_t col = (int64_t)threadIdx.x * 8; col < n; col += (int64_t)G * 8) {
            float xv[8], gv[8], w[8];
            l3k_load8<T, VEC>(x, col, n, xv);
            l3k_load8<T, VEC>(dy, col, n, gv);
            l3k_load8<T, VEC>((const T *)a.weight, col, n, w);
            for (int i = 0; i < 8; ++i) {
                sums[0] += xv[i] * xv[i];
                sums[1] += gv[i] * w[i] * xv[i];
            }
        }
        group_sum<2>(sums, G, red);
        const float rstd = a.rstd ? a.rstd[r] : rsqrtf(sums[0] / (float)n + a.eps);
        const float c = rstd * rstd * sums[1] / (float)n;
        const T *dh = (const T *)a.dh_in + r * a.dh_in_stride;
        T *dx = (T *)a.dx + r * a.dx_stride;
        for (int64_t col = (int64_t)threadIdx.x * 8; col < n; col += (int64_t)G * 8) {
            float xv[8], gv[8], w[8], dhv[8], out[8];
            l3k_load8<T, VEC>(x, col, n, xv);
            l3k_load8<T, VEC>(dy, col, n, gv);
            l3k_load8<T, VEC>((const T *)a.weight, col, n, w);
            if (a.dh_in) l3k_load8<T, VEC>(dh, col, n, dhv);
            for (int i = 0; i < 8; ++i) {
                if (part && col + i < n) part[col + i] += gv[i] * xv[i] * rstd;
                out[i] = rstd * (gv[i] * w[i] - xv[i] * c) + (a.dh_in ? dhv[i] : 0.0f);
            }
            l3k_store8<T, VEC>(dx, col, n, out);
        }
    }
}

/* dweight[col] = sum over p of partials[p][col], in a fixed tree order. */
constexpr int RED_COLS = 32, RED_LANES = 16;
template <typename T>
__global__ void __launch_bounds__(RED_COLS *RED_LANES) dweight_reduce(const float *__restrict__ partials,
                                                                     int64_t parts, int64_t n, T *dweight) {
    __shared__ float tile[RED_LANES][RED_COLS + 1];
    const int tx = threadIdx.x % RED_COLS, ty = threadIdx.x / RED_COLS;
    const int64_t col = (int64_t)blockIdx.x * RED_COLS + tx;
    float s = 0.0f;
    if (col < n)
        for (int64_t p = ty; p < parts; p += RED_LANES) s += partials[(size_t)p * (size_t)n + col];
    tile[ty][tx] = s;
    __syncthreads();
    for (int half = RED_LANES / 2; half > 0; half /= 2) {
        if (ty < half) tile[ty][tx] += tile[ty + half][tx];
        __syncthreads();
    }
    if (ty == 0 && col < n) dweight[col] = l3k_from_float<T>(tile[0][tx]);
}

bool aligned16(const void *p, int64_t stride, size_t es) {
    return p == nullptr || ((uintptr_t)p % 16 == 0 && ((size_t)stride * es) % 16 == 0);
}

template <typename T, bool VEC>
int launch_fwd(const l3k_rmsnorm_fwd_args &a, cudaStream_t st) {
    const int G = (int)l3k_rmsnorm_group(a.n, FWD_SLOTS);
    const int64_t slots = (a.n + 7) / 8, S = (slots + G - 1) / G;
    if (S > FWD_SLOTS) {
        const int64_t grid = a.rows < (1 << 20) ? a.rows : (1 << 20);
        fwd_loop<T, VEC><<<(unsigned)grid, LOOP_BLOCK, 0, st>>>(a);
        return (int)cudaGetLastError();
    }
    const int R = G >= FWD_BLOCK ? 1 : FWD_BLOCK / G;
    const int64_t blocks = (a.rows + R - 1) / R;
    const int64_t resident = (int64_t)sm_count() * FWD_BLOCKS_PER_SM;
    const unsigned grid = (unsigned)(blocks < resident ? blocks : resident);
    const bool res = a.residual != nullptr;
    if (S == 1) (res ? fwd_cached<T, 1, VEC, true> : fwd_cached<T, 1, VEC, false>)<<<grid, R * G, 0, st>>>(a, G);
    else if (S == 2) (res ? fwd_cached<T, 2, VEC, true> : fwd_cached<T, 2, VEC, false>)<<<grid, R * G, 0, st>>>(a, G);
    else (res ? fwd_cached<T, 4, VEC, true> : fwd_cached<T, 4, VEC, false>)<<<grid, R * G, 0, st>>>(a, G);
    return (int)cudaGetLastError();
}

template <typename T, bool VEC>
int launch_bwd(const l3k_rmsnorm_bwd_args &a, cudaStream_t st) {
    const int G = (int)l3k_rmsnorm_group(a.n, L3K_RMSNORM_BWD_SLOTS);
    const int64_t slots = (a.n + 7) / 8, S = (slots + G - 1) / G;
    const int64_t R = l3k_rmsnorm_bwd_rows_per_block(a.n);
    const int64_t parts = l3k_rmsnorm_bwd_partials(a.rows, a.n);
    if (parts > 0) {
        if (S > L3K_RMSNORM_BWD_SLOTS) {
            bwd_loop<T, VEC><<<(unsigned)parts, LOOP_BLOCK, 0, st>>>(a);
        } else {
            const size_t fold = R > 1 && a.dweight ? (size_t)a.n * sizeof(float) : 0;
            if (S == 1) bwd_cached<T, 1, VEC><<<(unsigned)parts, (unsigned)(R * G), fold, st>>>(a, G);
            else bwd_cached<T, 2, VEC><<<(unsigned)parts, (unsigned)(R * G), fold, st>>>(a, G);
        }
        L3K_CUDA_TRY(cudaGetLastError());
    }
    if (a.dweight) {
        const unsigned grid = (unsigned)((a.n + RED_COLS - 1) / RED_COLS);
        dweight_reduce<T><<<grid, RED_COLS * RED_LANES, 0, st>>>(a.partials, parts, a.n, (T *)a.dweight);
        L3K_CUDA_TRY(cudaGetLastError());
    }
    return 0;
}

} // namespace

extern "C" int l3k_cuda_rmsnorm_fwd(const l3k_rmsnorm_fwd_args *a, void *stream) {
    const size_t es = l3k_dt_size(a->dtype);
    const bool vec = ((size_t)a->n * es) % 16 == 0 && aligned16(a->x, a->x_stride, es) &&
                     aligned16(a->y, a->y_stride, es) && aligned16(a->weight, 0, es) &&
                     (!a->residual || (aligned16(a->residual, a->residual_stride, es) &&
                                       aligned16(a->h_out, a->h_stride, es)));
    cudaStream_t st = (cudaStream_t)stream;
    int err = 0;
    L3K_DISPATCH_DTYPE(a->dtype, err = vec ? launch_fwd<T, true>(*a, st) : launch_fwd<T, false>(*a, st));
    return err;
}

extern "C" int l3k_cuda_rmsnorm_bwd(const l3k_rmsnorm_bwd_args *a, void *stream) {
    const size_t es = l3k_dt_size(a->dtype);
    const bool vec = ((size_t)a->n * es) % 16 == 0 && aligned16(a->x, a->x_stride, es) &&
                     aligned16(a->dy, a->dy_stride, es) && aligned16(a->dx, a->dx_stride, es) &&
                     aligned16(a->weight, 0, es) && (!a->dh_in || aligned16(a->dh_in, a->dh_in_stride, es));
    cudaStream_t st = (cudaStream_t)stream;
    int err = 0;
    L3K_DISPATCH_DTYPE(a->dtype, err = vec ? launch_bwd<T, true>(*a, st) : launch_bwd<T, false>(*a, st));
    return err;
}
