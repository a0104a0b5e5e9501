/* Cross-entropy loss and its gradient over rows of logits in one kernel, CUDA.
 *
 * A block owns a row at a time (grid-striding over rows): pass 1 reads the row
 * once for its maximum and the sum of exponentials (online, rescaled as the
 * maximum grows), combined across the block; pass 2 reads the row again (from L2:
 * a row is at most a few hundred KB and ~4 rows per SM are in flight) and writes
 * (softmax - onehot) * scale.  So HBM sees the logits read once and the gradient
 * written once.  Every read of a row precedes the block barrier that ends pass 1,
 * and pass 2 writes each element after reading it, so dlogits may be logits. */
#include <math.h>

#include "common.cuh"

namespace {

constexpr int MAX_BLOCK = 512;

/* (max, sum of exp(x - max)) of two parts of a row. */
__device__ __forceinline__ void combine(float &m, float &s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return; /* both empty (or every logit -inf so far) */
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

/* The block's (max, sum) in every thread. */
__device__ __forceinline__ void block_combine(float &m, float &s) {
    __shared__ float ms[MAX_BLOCK / 32], ss[MAX_BLOCK / 32];
    for (int off = 16; off > 0; off /= 2)
        combine(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads(); /* the previous row's readers of ms/ss are done */
    if (lane == 0) {
        ms[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = -INFINITY;
    s = 0.0f;
    for (int w = 0; w < warps; ++w) combine(m, s, ms[w], ss[w]);
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(MAX_BLOCK) cross_entropy(const l3k_cross_entropy_args a) {
    const float scale = a.grad_scale ? *a.grad_scale : 1.0f;
    const int64_t stride = (int64_t)blockDim.x * 8;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const T *x = (const T *)a.logits + r * a.logits_stride;
        T *dx = (T *)a.dlogits + r * a.dlogits_stride;
        const int64_t target = a.target[r];
        const bool ignored = target == a.ignore_index;
        const bool valid = !ignored && target >= 0 && target < a.n;
        float m = -INFINITY, s = 0.0f;
        if (!ignored)
            for (int64_t col = (int64_t)threadIdx.x * 8; col < a.n; col += stride) {
                float v[8];
                l3k_load8<T, VEC>(x, col, a.n, v);
                float lm = -INFINITY, ls = 0.0f;
                bool nan = false; /* fmaxf drops NaN: carry it in the sum instead */
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    if (col + i < a.n) {
                        lm = fmaxf(lm, v[i]);
                        nan |= v[i] != v[i];
                    }
                if (nan) {
                    lm = 0.0f;
                    ls = NAN;
                } else if (lm != -INFINITY) {
#pragma unroll
                    for (int i = 0; i < 8; ++i)
                        if (col + i < a.n) ls += expf(v[i] - lm);
                }
                combine(m, s, lm, ls);
            }
        /* Read before the barrier below, like the rest of the row. */
        const float x_target = threadIdx.x == 0 && valid ? l3k_to_float(x[target]) : 0.0f;
        block_combine(m, s);
        const float lse = m + logf(s);
        if (threadIdx.x == 0) a.loss[r] = ignored ? 0.0f : valid ? lse - x_target : NAN;
        for (int64_t col = (int64_t)threadIdx.x * 8; col < a.n; col += stride) {
            float v[8];
            if (ignored) {
#pragma unroll
                for (int i = 0; i < 8; ++i) v[i] = 0.0f;
            } else if (!valid) {
#pragma unroll
                for (int i = 0; i < 8; ++i) v[i] = NAN;
            } else {
                l3k_load8<T, VEC>(x, col, a.n, v);
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    v[i] = (expf(v[i] - lse) - (col + i == target ? 1.0f : 0.0f)) * scale;
            }
            l3k_store8<T, VEC>(dx, col, a.n, v);
        }
    }
}

bool rows16(const void *p, int64_t stride, int64_t rows, size_t es) {
    return ((uintptr_t)p & 15u) == 0 && (rows <= 1 || ((size_t)stride * es) % 16 == 0);
}

} // namespace

extern "C" int l3k_cuda_cross_entropy(const l3k_cross_entropy_args *args, void *stream) {
    const l3k_cross_entropy_args a = *args;
    if (a.rows == 0) return 0;
    const size_t es = l3k_dt_size(a.dtype);
    /* 16-byte pieces: whole pieces inside the row (n a multiple of 16 / es), aligned rows. */
    const bool vec = (a.n * es) % 16 == 0 && rows16(a.logits, a.logits_stride, a.rows, es) &&
                     rows16(a.dlogits, a.dlogits_stride, a.rows, es);
    const int64_t slots = (a.n + 7) / 8;
    const int threads = (int)l3k_clamp64(l3k_pow2_ceil(slots), 32, MAX_BLOCK);
    const unsigned blocks = (unsigned)l3k_clamp64(a.rows, 1, 1 << 20);
    cudaStream_t st = (cudaStream_t)stream;
    L3K_DISPATCH_DTYPE(a.dtype, const auto kern = vec ? cross_entropy<T, true> : cross_entropy<T, false>;
                       kern<<<blocks, threads, 0, st>>>(a));
    return (int)cudaGetLastError();
}
