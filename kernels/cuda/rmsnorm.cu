/* RMSNorm (optionally with a fused residual add), forward and backward, CUDA.
 *
 * Geometry: a row is cut into slots of 8 elements; a group of G threads (a
 * power of two) shares a row, thread `lane` owning slots lane, lane+G, ...
 * Rows up to S*G*8 elements (S <= a few slots a thread) are held in registers,
 * in their storage type, between the reduction and the output pass (one read,
 * one write per element); longer rows take a two-pass loop kernel.  16-byte
 * loads whenever the rows allow them, 32-bit offsets inside a row, 64-bit
 * row offsets.
 *
 * Latency hiding: the register-cached kernels loop over rows with a stride of
 * the grid and, where registers allow (PF), issue the loads of their next row
 * before they reduce the current one, so a multiprocessor always has loads in
 * flight.  A group reduces through warp shuffles and, when it spans several
 * warps, one barrier per row (double-buffered scratch; a named barrier per
 * group when a block holds several groups).
 *
 * dweight: every backward block keeps the float32 sum of dy * x * rstd over
 * its rows in registers (a thread owns the same columns in every row), folds
 * its groups together in shared memory in a fixed order, and writes one
 * partial row to the workspace; a second kernel adds the partial rows in a
 * fixed order.  No atomics: the result is bit-for-bit reproducible.  On Hopper
 * the second kernel is launched as a programmatic dependent of the first, so
 * its launch overlaps the first kernel's tail. */
#include "common.cuh"

namespace {

/* Forward: G = the smallest power of two that covers a row with FWD_SLOTS
 * slots a thread; blocks of FWD_BLOCK threads (several groups when G is
 * smaller); a grid of as many blocks as are resident at once, looping over
 * the rows. */
constexpr int FWD_SLOTS = 2;     /* slots a thread the group is sized for */
constexpr int FWD_MAX_SLOTS = 4; /* longer rows: fwd_loop */
constexpr int FWD_BLOCK = 256;
constexpr int LOOP_BLOCK = 1024;
constexpr int BWD_MAX_SLOTS = 4; /* longer rows: bwd_loop */

/* Multiprocessors and compute capability of the current device, read once per device. */
struct dev_info {
    int sms, major;
};
dev_info device_info() {
    static dev_info cached[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return {132, 0};
    if (!cached[dev].sms) {
        int v = 0, m = 0;
        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
        cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev);
        cached[dev].major = m;
        cached[dev].sms = v > 0 ? v : 132;
    }
    return cached[dev];
}

/* ---- slot access with 32-bit in-row offsets --------------------------------
 * Eight elements from column `col`; elements at or past `lim` read as zero and
 * are not written (lim = 0 turns a whole row off).  VEC: as l3k_load8. */

/* How ld_slot reads: LD_PLAIN ordinary loads; LD_NC the read-only path, for
 * the weight (never written by these kernels); LD_FRESH the same as an asm
 * volatile load, which the compiler cannot hoist out of the row loop (a
 * hoisted weight costs registers: 8 floats a slot once converted). */
enum { LD_PLAIN, LD_NC, LD_FRESH };
template <bool FRESH>
__device__ __forceinline__ uint4 ld_nc16(const void *p) {
    if (!FRESH) return __ldg(reinterpret_cast<const uint4 *>(p));
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

template <typename T, bool VEC, int LD = LD_PLAIN>
__device__ __forceinline__ l3k_slot<T> ld_slot(const T *__restrict__ row, int col, int lim) {
    constexpr int PER16 = 16 / sizeof(T);
    l3k_slot<T> s;
    if (VEC) {
#pragma unroll
        for (int piece = 0; piece < 8 / PER16; ++piece) {
            const int c = col + piece * PER16;
            const uint4 *p = reinterpret_cast<const uint4 *>(row + c);
            if constexpr (LD == LD_PLAIN) s.raw[piece] = c < lim ? *p : make_uint4(0, 0, 0, 0);
            else s.raw[piece] = c < lim ? ld_nc16<LD == LD_FRESH>(row + c) : make_uint4(0, 0, 0, 0);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) s.at(i) = col + i < lim ? row[col + i] : l3k_from_float<T>(0.0f);
    }
    return s;
}

/* The weight; FRESH: see LD_FRESH. */
template <typename T, bool VEC, bool FRESH = false>
__device__ __forceinline__ l3k_slot<T> ld_weight(const T *__restrict__ w, int col, int lim) {
    return ld_slot<T, VEC, (FRESH ? LD_FRESH : LD_NC)>(w, col, lim);
}

template <typename T, bool VEC>
__device__ __forceinline__ void st_slot(T *__restrict__ row, int col, int lim, const l3k_slot<T> &s) {
    constexpr int PER16 = 16 / sizeof(T);
    if (VEC) {
#pragma unroll
        for (int piece = 0; piece < 8 / PER16; ++piece) {
            const int c = col + piece * PER16;
            if (c < lim) *reinterpret_cast<uint4 *>(row + c) = s.raw[piece];
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (col + i < lim) row[col + i] = reinterpret_cast<const T *>(s.raw)[i];
    }
}

/* ---- group reductions -------------------------------------------------------
 * Sum K values over the G threads of each group (blockDim.x / G groups a
 * block); every thread gets the sums.  Groups wider than a warp go through
 * `red` (2 * 32 * K floats): consecutive calls alternate halves (`parity`),
 * so one barrier a call suffices: a half is rewritten only two calls later,
 * after every reader of it has passed the barrier in between.  Every thread of
 * a group must call it; with one group a block that is the whole block
 * (__syncthreads), otherwise a named barrier per group (at most 15 groups). */
struct grp_t {
    int G, group, lane, nw, src; /* src: the warp sum this lane reads after the barrier */
    bool whole;                  /* one group spans the block */
};
__device__ __forceinline__ grp_t make_grp(int lg) {
    grp_t g;
    g.G = 1 << lg;
    g.group = threadIdx.x >> lg;
    g.lane = threadIdx.x & (g.G - 1);
    g.nw = g.G >> 5;
    g.src = g.group * g.nw + (threadIdx.x & 31 & (g.nw - 1));
    g.whole = g.G == (int)blockDim.x;
    return g;
}

__device__ __forceinline__ void group_barrier(const grp_t &g) {
    if (g.whole) __syncthreads();
    else asm volatile("bar.sync %0, %1;" ::"r"(g.group + 1), "r"(g.G) : "memory");
}

template <int K>
__device__ __forceinline__ void group_sum(float (&v)[K], const grp_t &g, float *red, int parity) {
    if (g.G >= 32) {
#pragma unroll
        for (int k = 0; k < K; ++k)
#pragma unroll
            for (int off = 16; off > 0; off /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
    } else {
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = l3k_subwarp_sum(v[k], g.G);
    }
    if (g.G > 32) {
        float *buf = red + parity * 32 * K;
        if ((threadIdx.x & 31) == 0)
#pragma unroll
            for (int k = 0; k < K; ++k) buf[(threadIdx.x >> 5) * K + k] = v[k];
        group_barrier(g);
        /* every aligned run of nw lanes reads the group's nw warp sums and
         * adds them in a fixed tree order */
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = l3k_subwarp_sum(buf[g.src * K + k], g.nw);
    }
}

/* ---- forward ----------------------------------------------------------------
 * A group per row; a thread keeps its S slots in the storage type between the
 * sum of squares and the output pass; the weight is read again per row (held
 * in registers it would cost 8 floats a slot).  PF: the next row's loads are
 * issued before this row is reduced.  Groups are at most 1024 threads; the
 * explicit minimum of one block is kept: without it ptxas allocates registers
 * differently (spills in the float32 S = 4 variants move). */
template <typename T, int S, bool VEC, bool RES, bool PF>
__global__ void __launch_bounds__(1024, 1) fwd_cached(l3k_rmsnorm_fwd_args a, int lg) {
    __shared__ float red[2 * 32];
    constexpr int SR = RES ? S : 1;
    const grp_t g = make_grp(lg);
    const int G = g.G, R = blockDim.x >> lg, lane = g.lane;
    const int n = (int)a.n;
    const float inv_n = 1.0f / (float)n;
    const int64_t block_first = (int64_t)blockIdx.x * R, step = (int64_t)gridDim.x * R;
    const int64_t first = block_first + g.group;
    const int64_t iters = block_first < a.rows ? (a.rows - block_first + step - 1) / step : 0;

    auto fetch = [&](int64_t row, l3k_slot<T>(&xd)[S], l3k_slot<T>(&rd)[SR]) {
        const bool act = row < a.rows;
        const int lim = act ? n : 0;
        const int64_t r = act ? row : 0;
        const T *x = (const T *)a.x + r * a.x_stride;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int col = (s * G + lane) * 8;
            xd[s] = ld_slot<T, VEC>(x, col, lim);
            if (RES) rd[s % SR] = ld_slot<T, VEC>((const T *)a.residual + r * a.residual_stride, col, lim);
        }
    };

    l3k_slot<T> xn[S], rn[SR]; /* the next row (PF) */
    if constexpr (PF) fetch(first, xn, rn);
    for (int64_t it = 0; it < iters; ++it) {
        const int64_t row = first + it * step;
        const bool active = row < a.rows;
        const int64_t r = active ? row : 0;
        l3k_slot<T> v[S], rv[SR];
        if constexpr (PF) {
#pragma unroll
            for (int s = 0; s < S; ++s) {
                v[s] = xn[s];
                if (RES) rv[s % SR] = rn[s % SR];
            }
            fetch(row + step, xn, rn);
        } else {
            fetch(row, v, rv);
        }
        float ss[1] = {0.0f};
#pragma unroll
        for (int s = 0; s < S; ++s) {
            if (RES) {
#pragma unroll
                for (int i = 0; i < 8; ++i) v[s].at(i) = l3k_from_float<T>(v[s].get(i) + rv[s % SR].get(i));
                if (active) st_slot<T, VEC>((T *)a.h_out + r * a.h_stride, (s * G + lane) * 8, n, v[s]);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) ss[0] += v[s].get(i) * v[s].get(i);
        }
        group_sum<1>(ss, g, red, (int)(it & 1));
        if (!active) continue;
        const float rstd = rsqrtf(ss[0] * inv_n + a.eps);
        T *y = (T *)a.y + r * a.y_stride;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int col = (s * G + lane) * 8;
            const l3k_slot<T> w = ld_weight<T, VEC, true>((const T *)a.weight, col, n);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[s].at(i) = l3k_from_float<T>(v[s].get(i) * rstd * w.get(i));
            st_slot<T, VEC>(y, col, n, v[s]);
        }
        if (lane == 0 && a.rstd) a.rstd[r] = rstd;
    }
}

/* Rows too long for registers: one block per row, two passes over global memory. */
template <typename T, bool VEC>
__global__ void __launch_bounds__(LOOP_BLOCK) fwd_loop(l3k_rmsnorm_fwd_args a) {
    __shared__ float red[2 * 32];
    const int G = blockDim.x;
    const grp_t g = make_grp(__ffs(G) - 1);
    const int64_t n = a.n;
    int parity = 0;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x, parity ^= 1) {
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
        group_sum<1>(ss, g, red, parity);
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

/* ---- backward ----------------------------------------------------------------
 * dx for the rows of a group; x, dy held in their storage type, the dweight
 * sums for the thread's columns in float32 registers.  PF: the next row's x,
 * dy and rstd are loaded before this row is reduced, and the weight slots are
 * held in registers for the whole kernel.  One slot a thread: two blocks a
 * multiprocessor. */
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

template <typename T, int S, bool VEC, bool PF>
__global__ void __launch_bounds__(L3K_RMSNORM_BWD_BLOCK, S == 1 ? 2 : 1)
    bwd_cached(l3k_rmsnorm_bwd_args a, int lg) {
    __shared__ float red[2 * 64];
    extern __shared__ float fold[]; /* n floats when the block has several groups */
    pdl_launch_dependents();        /* the dweight reduction may be launched; it waits for this grid */
    const grp_t g = make_grp(lg);
    const int G = g.G, R = blockDim.x >> lg, group = g.group, lane = g.lane;
    const int n = (int)a.n;
    const float inv_n = 1.0f / (float)n;
    const int64_t block_first = (int64_t)blockIdx.x * R, step = (int64_t)gridDim.x * R;
    const int64_t first = block_first + group;
    const int64_t iters = block_first < a.rows ? (a.rows - block_first + step - 1) / step : 0;

    l3k_slot<T> wv[S];
    float acc[S][8];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        if (PF) wv[s] = ld_weight<T, VEC>((const T *)a.weight, (s * G + lane) * 8, n);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[s][i] = 0.0f;
    }
    auto fetch = [&](int64_t row, l3k_slot<T>(&xd)[S], l3k_slot<T>(&gd)[S], float &rs) {
        const bool act = row < a.rows;
        const int lim = act ? n : 0;
        const int64_t r = act ? row : 0;
        const T *x = (const T *)a.x + r * a.x_stride;
        const T *dy = (const T *)a.dy + r * a.dy_stride;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int col = (s * G + lane) * 8;
            xd[s] = ld_slot<T, VEC>(x, col, lim);
            gd[s] = ld_slot<T, VEC>(dy, col, lim);
        }
        rs = a.rstd && act ? a.rstd[r] : 0.0f;
    };

    l3k_slot<T> xn[S], gn[S]; /* the next row (PF) */
    float rsn = 0.0f;
    if constexpr (PF) fetch(first, xn, gn, rsn);
    for (int64_t it = 0; it < iters; ++it) {
        const int64_t row = first + it * step;
        const bool active = row < a.rows;
        const int64_t r = active ? row : 0;
        l3k_slot<T> xv[S], gv[S];
        float rs;
        if constexpr (PF) {
#pragma unroll
            for (int s = 0; s < S; ++s) {
                xv[s] = xn[s];
                gv[s] = gn[s];
            }
            rs = rsn;
            fetch(row + step, xn, gn, rsn);
        } else {
            fetch(row, xv, gv, rs);
        }
        /* dh_in: loaded now, its latency hidden behind the reduction */
        l3k_slot<T> dhv[S];
        if (a.dh_in) {
            const T *dh = (const T *)a.dh_in + r * a.dh_in_stride;
#pragma unroll
            for (int s = 0; s < S; ++s) dhv[s] = ld_slot<T, VEC>(dh, (s * G + lane) * 8, active ? n : 0);
        }
        if (!PF)
#pragma unroll
            for (int s = 0; s < S; ++s)
                wv[s] = ld_weight<T, VEC, true>((const T *)a.weight, (s * G + lane) * 8, n);
        float sums[2] = {0.0f, 0.0f}; /* sum x^2, sum dy*w*x */
#pragma unroll
        for (int s = 0; s < S; ++s)
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float xf = xv[s].get(i);
                sums[0] += xf * xf;
                sums[1] += gv[s].get(i) * wv[s].get(i) * xf;
            }
        group_sum<2>(sums, g, red, (int)(it & 1));
        if (!active) continue;
        const float rstd = a.rstd ? rs : rsqrtf(sums[0] * inv_n + a.eps);
        const float c = rstd * rstd * sums[1] * inv_n;
        T *dx = (T *)a.dx + r * a.dx_stride;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int col = (s * G + lane) * 8;
            l3k_slot<T> o;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float xf = xv[s].get(i), gf = gv[s].get(i);
                acc[s][i] += gf * xf * rstd;
                o.at(i) =
                    l3k_from_float<T>(rstd * (gf * wv[s].get(i) - xf * c) + (a.dh_in ? dhv[s].get(i) : 0.0f));
            }
            st_slot<T, VEC>(dx, col, n, o);
        }
    }
    if (!a.dweight) return;
    float *part = a.partials + (size_t)blockIdx.x * (size_t)n;
    if (R == 1) {
        /* 16-byte stores where the partial row allows them: 4 times fewer L2
         * write requests than scalar stores at a 32-byte stride */
        const bool v4 = VEC && n % 4 == 0 && (uintptr_t)part % 16 == 0;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int col = (s * G + lane) * 8;
            if (v4) {
                if (col + 4 <= n)
                    *reinterpret_cast<float4 *>(part + col) =
                        make_float4(acc[s][0], acc[s][1], acc[s][2], acc[s][3]);
                if (col + 8 <= n)
                    *reinterpret_cast<float4 *>(part + col + 4) =
                        make_float4(acc[s][4], acc[s][5], acc[s][6], acc[s][7]);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    if (col + i < n) part[col + i] = acc[s][i];
            }
        }
        return;
    }
    for (int g = 0; g < R; ++g) { /* fixed order: group 0, 1, ... */
        if (group == g) {
#pragma unroll
            for (int s = 0; s < S; ++s) {
                const int col = (s * G + lane) * 8;
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    if (col + i < n) fold[col + i] = (g ? fold[col + i] : 0.0f) + acc[s][i];
            }
        }
        __syncthreads();
    }
    for (int col = threadIdx.x; col < n; col += blockDim.x) part[col] = fold[col];
}

/* Rows too long for registers: a block per row, dweight summed straight into
 * the block's own partial row (no other block touches it). */
template <typename T, bool VEC>
__global__ void __launch_bounds__(LOOP_BLOCK) bwd_loop(l3k_rmsnorm_bwd_args a) {
    __shared__ float red[2 * 64];
    pdl_launch_dependents();
    const int G = blockDim.x;
    const grp_t g = make_grp(__ffs(G) - 1);
    const int64_t n = a.n;
    float *part = a.dweight ? a.partials + (size_t)blockIdx.x * (size_t)n : nullptr;
    if (part)
        for (int64_t col = threadIdx.x; col < n; col += G) part[col] = 0.0f;
    int parity = 0;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x, parity ^= 1) {
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
        group_sum<2>(sums, g, red, parity);
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

/* dweight[col] = sum over p of partials[p][col], in a fixed order: lane ty
 * adds parts ty, ty + RED_LANES, ... in sequence, then the lanes are added in
 * a fixed tree.  parts <= L3K_RMSNORM_BWD_MAX_PARTIALS, so a lane's loads are
 * unrolled and all in flight at once.  PDL: launched as a programmatic
 * dependent of the backward kernel, it waits for that grid (and its memory)
 * before reading. */
constexpr int RED_COLS = 32, RED_LANES = 16;
constexpr int RED_PER_LANE = (L3K_RMSNORM_BWD_MAX_PARTIALS + RED_LANES - 1) / RED_LANES;
template <typename T, bool PDL>
__global__ void __launch_bounds__(RED_COLS *RED_LANES)
    dweight_reduce(const float *__restrict__ partials, int64_t parts, int64_t n, T *dweight) {
    __shared__ float tile[RED_LANES][RED_COLS + 1];
    if (PDL) pdl_wait();
    const int tx = threadIdx.x % RED_COLS, ty = threadIdx.x / RED_COLS;
    const int64_t col = (int64_t)blockIdx.x * RED_COLS + tx;
    float v[RED_PER_LANE];
#pragma unroll
    for (int q = 0; q < RED_PER_LANE; ++q) {
        const int64_t p = ty + (int64_t)q * RED_LANES;
        v[q] = col < n && p < parts ? partials[(size_t)p * (size_t)n + col] : 0.0f;
    }
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < RED_PER_LANE; ++q) s += v[q];
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

/* ---- launchers ---------------------------------------------------------------- */
int log2i(int v) {
    int l = 0;
    while ((1 << l) < v) ++l;
    return l;
}

struct fwd_cfg {
    int G, S, block; /* block = R * G */
    int64_t grid;
};

fwd_cfg default_fwd_cfg(const l3k_rmsnorm_fwd_args &a) {
    fwd_cfg c;
    c.G = (int)l3k_rmsnorm_group(a.n, FWD_SLOTS);
    const int64_t slots = (a.n + 7) / 8;
    c.S = (int)((slots + c.G - 1) / c.G);
    c.block = c.G >= FWD_BLOCK ? c.G : FWD_BLOCK;
    c.grid = (a.rows + c.block / c.G - 1) / (c.block / c.G); /* blocks; capped at launch */
    return c;
}

/* Blocks of a forward kernel resident at once on the current device (read once
 * per device, kernel and block size): the forward grid, so that every block
 * loops over rows from the start and none waits for a second wave. */
template <typename T, int S, bool VEC, bool RES, bool PF>
int64_t fwd_resident(int block) {
    static int cached[64][2]; /* per device: block size, blocks a multiprocessor */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
    if (cached[dev][0] != block) {
        int nb = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, fwd_cached<T, S, VEC, RES, PF>, block, 0) !=
                cudaSuccess ||
            nb < 1)
            nb = 1;
        cached[dev][1] = nb;
        cached[dev][0] = block;
    }
    return (int64_t)cached[dev][1] * device_info().sms;
}

/* PF (the next row's loads in flight) where the registers allow it: up to 4
 * registers of row data a thread (a 16-byte slot) at 64 registers a thread. */
template <typename T, int S, bool VEC>
int fwd_launch_s(const l3k_rmsnorm_fwd_args &a, cudaStream_t st, const fwd_cfg &c) {
    constexpr bool PF = S * sizeof(T) <= 4;
    auto k = a.residual ? fwd_cached<T, S, VEC, true, PF> : fwd_cached<T, S, VEC, false, PF>;
    const int64_t res = a.residual ? fwd_resident<T, S, VEC, true, PF>(c.block)
                                   : fwd_resident<T, S, VEC, false, PF>(c.block);
    k<<<(unsigned)(c.grid < res ? c.grid : res), c.block, 0, st>>>(a, log2i(c.G));
    return (int)cudaGetLastError();
}

template <typename T, bool VEC>
int launch(const l3k_rmsnorm_fwd_args &a, cudaStream_t st) {
    const fwd_cfg c = default_fwd_cfg(a);
    if (c.S > FWD_MAX_SLOTS) {
        const int64_t grid = a.rows < (1 << 20) ? a.rows : (1 << 20);
        fwd_loop<T, VEC><<<(unsigned)grid, LOOP_BLOCK, 0, st>>>(a);
        return (int)cudaGetLastError();
    }
    if (c.S == 1) return fwd_launch_s<T, 1, VEC>(a, st, c);
    if (c.S == 2) return fwd_launch_s<T, 2, VEC>(a, st, c);
    return fwd_launch_s<T, 4, VEC>(a, st, c);
}

struct bwd_cfg {
    int G, S, block; /* block = R * G */
    int64_t parts;   /* = grid */
    bool pdl;
};

bwd_cfg default_bwd_cfg(const l3k_rmsnorm_bwd_args &a) {
    bwd_cfg c;
    c.G = (int)l3k_rmsnorm_bwd_group(a.n);
    const int64_t slots = (a.n + 7) / 8;
    c.S = (int)((slots + c.G - 1) / c.G);
    c.block = (int)(l3k_rmsnorm_bwd_rows_per_block(a.n) * c.G);
    c.parts = l3k_rmsnorm_bwd_partials(a.rows, a.n);
    c.pdl = device_info().major >= 9;
    return c;
}

template <typename T, bool PDL>
int launch_reduce(const l3k_rmsnorm_bwd_args &a, int64_t parts, cudaStream_t st) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)((a.n + RED_COLS - 1) / RED_COLS));
    cfg.blockDim = dim3(RED_COLS * RED_LANES);
    cfg.stream = st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = PDL ? 1 : 0;
    return (int)cudaLaunchKernelEx(&cfg, dweight_reduce<T, PDL>, (const float *)a.partials, parts, a.n,
                                   (T *)a.dweight);
}

/* One slot a thread: two blocks a multiprocessor (64 registers a thread at
 * 512 threads), so the L3K_RMSNORM_BWD_MAX_PARTIALS blocks are resident at
 * once on an H100; the next row prefetched and the weight slot held in
 * registers (2-byte types).  Longer rows: one block a multiprocessor. */
template <typename T, int S, bool VEC>
int bwd_launch_s(const l3k_rmsnorm_bwd_args &a, cudaStream_t st, const bwd_cfg &c) {
    constexpr bool PF = S * sizeof(T) <= 2;
    const size_t fold = c.block > c.G && a.dweight ? (size_t)a.n * sizeof(float) : 0;
    bwd_cached<T, S, VEC, PF><<<(unsigned)c.parts, (unsigned)c.block, fold, st>>>(a, log2i(c.G));
    return (int)cudaGetLastError();
}

template <typename T, bool VEC>
int launch(const l3k_rmsnorm_bwd_args &a, cudaStream_t st) {
    const bwd_cfg c = default_bwd_cfg(a);
    if (c.parts > 0) {
        int err;
        if (c.S > BWD_MAX_SLOTS) {
            bwd_loop<T, VEC><<<(unsigned)c.parts, LOOP_BLOCK, 0, st>>>(a);
            err = (int)cudaGetLastError();
        } else if (c.S == 1) {
            err = bwd_launch_s<T, 1, VEC>(a, st, c);
        } else if (c.S == 2) {
            err = bwd_launch_s<T, 2, VEC>(a, st, c);
        } else {
            err = bwd_launch_s<T, 4, VEC>(a, st, c);
        }
        if (err) return err;
    }
    if (a.dweight)
        return c.pdl && c.parts > 0 ? launch_reduce<T, true>(a, c.parts, st)
                                    : launch_reduce<T, false>(a, c.parts, st);
    return 0;
}

bool fwd_vec(const l3k_rmsnorm_fwd_args *a) {
    const size_t es = l3k_dt_size(a->dtype);
    return ((size_t)a->n * es) % 16 == 0 && aligned16(a->x, a->x_stride, es) &&
           aligned16(a->y, a->y_stride, es) && aligned16(a->weight, 0, es) &&
           (!a->residual ||
            (aligned16(a->residual, a->residual_stride, es) && aligned16(a->h_out, a->h_stride, es)));
}

bool bwd_vec(const l3k_rmsnorm_bwd_args *a) {
    const size_t es = l3k_dt_size(a->dtype);
    return ((size_t)a->n * es) % 16 == 0 && aligned16(a->x, a->x_stride, es) &&
           aligned16(a->dy, a->dy_stride, es) && aligned16(a->dx, a->dx_stride, es) &&
           aligned16(a->weight, 0, es) && (!a->dh_in || aligned16(a->dh_in, a->dh_in_stride, es));
}

/* The launch (forward or backward, by the argument type) for a's dtype, on the vector path or not. */
template <typename Args>
int dispatch(const Args &a, bool vec, void *stream) {
    cudaStream_t st = (cudaStream_t)stream;
    int err = 0;
    L3K_DISPATCH_DTYPE(a.dtype, err = vec ? launch<T, true>(a, st) : launch<T, false>(a, st));
    return err;
}

} // namespace

extern "C" int l3k_cuda_rmsnorm_fwd(const l3k_rmsnorm_fwd_args *a, void *stream) {
    return dispatch(*a, fwd_vec(a), stream);
}

extern "C" int l3k_cuda_rmsnorm_bwd(const l3k_rmsnorm_bwd_args *a, void *stream) {
    return dispatch(*a, bwd_vec(a), stream);
}
