/* SwiGLU activation a = silu(g) * u, forward and backward, CUDA.
 *
 * Elementwise over rows x n: a thread owns one slot of 8 consecutive
 * elements (16-byte vector loads where the rows allow them), blockIdx.x walks
 * the slots of a row and blockIdx.y strides over rows.  When every view is
 * compact the rows are flattened into one long row, so odd widths still take
 * the vector path. */
#include "common.cuh"

namespace {

constexpr int MAX_BLOCK = 256;

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

template <typename T, bool VEC>
__global__ void __launch_bounds__(MAX_BLOCK) swiglu_fwd(const l3k_swiglu_fwd_args a) {
    const int64_t col = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (col >= a.n) return;
    for (int64_t r = blockIdx.y; r < a.rows; r += gridDim.y) {
        float g[8], u[8];
        l3k_load8<T, VEC>((const T *)a.g + r * a.g_stride, col, a.n, g);
        l3k_load8<T, VEC>((const T *)a.u + r * a.u_stride, col, a.n, u);
#pragma unroll
        for (int i = 0; i < 8; ++i) g[i] = g[i] * sigmoid(g[i]) * u[i];
        l3k_store8<T, VEC>((T *)a.a + r * a.a_stride, col, a.n, g);
    }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(MAX_BLOCK) swiglu_bwd(const l3k_swiglu_bwd_args a) {
    const int64_t col = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (col >= a.n) return;
    for (int64_t r = blockIdx.y; r < a.rows; r += gridDim.y) {
        float da[8], g[8], u[8], dg[8], du[8];
        /* Every input is read before any output is written: outputs may alias inputs. */
        l3k_load8<T, VEC>((const T *)a.da + r * a.da_stride, col, a.n, da);
        l3k_load8<T, VEC>((const T *)a.g + r * a.g_stride, col, a.n, g);
        l3k_load8<T, VEC>((const T *)a.u + r * a.u_stride, col, a.n, u);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float sig = sigmoid(g[i]), silu = g[i] * sig;
            dg[i] = da[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig));
            du[i] = da[i] * silu;
            u[i] = silu * u[i]; /* the activation, for a_out */
        }
        l3k_store8<T, VEC>((T *)a.dg + r * a.dg_stride, col, a.n, dg);
        l3k_store8<T, VEC>((T *)a.du + r * a.du_stride, col, a.n, du);
        if (a.a_out) l3k_store8<T, VEC>((T *)a.a_out + r * a.a_out_stride, col, a.n, u);
    }
}

bool rows16(const void *p, int64_t stride, int64_t rows, size_t es) {
    return p == nullptr || (((uintptr_t)p & 15u) == 0 && (rows <= 1 || ((size_t)stride * es) % 16 == 0));
}

/* Rows x n, or one row of rows * n when every view is compact. */
void flatten(int64_t &rows, int64_t &n, const int64_t *strides, int count) {
    if (rows <= 1) return;
    for (int i = 0; i < count; ++i)
        if (strides[i] != n) return;
    n *= rows;
    rows = 1;
}

/* The kernel of a direction (its argument type), dtype and path. */
template <typename T, bool VEC>
auto kernel_for(const l3k_swiglu_fwd_args &) {
    return swiglu_fwd<T, VEC>;
}
template <typename T, bool VEC>
auto kernel_for(const l3k_swiglu_bwd_args &) {
    return swiglu_bwd<T, VEC>;
}

/* One launch over a's rows x n: a thread a slot, blockIdx.y striding over the rows. */
template <typename Args>
int launch(const Args &a, bool vec, void *stream) {
    const int64_t slots = (a.n + 7) / 8;
    const int threads = (int)l3k_clamp64(l3k_pow2_ceil(slots), 32, MAX_BLOCK);
    const dim3 block((unsigned)threads);
    const dim3 grid((unsigned)((slots + threads - 1) / threads), (unsigned)l3k_clamp64(a.rows, 1, 65535));
    cudaStream_t st = (cudaStream_t)stream;
    L3K_DISPATCH_DTYPE(a.dtype, const auto kern = vec ? kernel_for<T, true>(a) : kernel_for<T, false>(a);
                       kern<<<grid, block, 0, st>>>(a));
    return (int)cudaGetLastError();
}

} // namespace

extern "C" int l3k_cuda_swiglu_fwd(const l3k_swiglu_fwd_args *args, void *stream) {
    l3k_swiglu_fwd_args a = *args;
    const size_t es = l3k_dt_size(a.dtype);
    const int64_t strides[3] = {a.g_stride, a.u_stride, a.a_stride};
    flatten(a.rows, a.n, strides, 3);
    const bool vec = ((size_t)a.n * es) % 16 == 0 && rows16(a.g, a.g_stride, a.rows, es) &&
                     rows16(a.u, a.u_stride, a.rows, es) && rows16(a.a, a.a_stride, a.rows, es);
    return launch(a, vec, stream);
}

extern "C" int l3k_cuda_swiglu_bwd(const l3k_swiglu_bwd_args *args, void *stream) {
    l3k_swiglu_bwd_args a = *args;
    const size_t es = l3k_dt_size(a.dtype);
    const int64_t strides[6] = {a.da_stride, a.g_stride,  a.u_stride,
                                a.dg_stride, a.du_stride, a.a_out ? a.a_out_stride : a.n};
    flatten(a.rows, a.n, strides, 6);
    const bool vec = ((size_t)a.n * es) % 16 == 0 && rows16(a.da, a.da_stride, a.rows, es) &&
                     rows16(a.g, a.g_stride, a.rows, es) && rows16(a.u, a.u_stride, a.rows, es) &&
                     rows16(a.dg, a.dg_stride, a.rows, es) && rows16(a.du, a.du_stride, a.rows, es) &&
                     rows16(a.a_out, a.a_out_stride, a.rows, es);
    return launch(a, vec, stream);
}
