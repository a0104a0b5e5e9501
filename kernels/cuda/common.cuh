/* Shared device helpers for the CUDA kernels: dtype traits, 8-element slot
 * loads/stores in float32 registers, warp/group reductions. */
#ifndef L3K_CUDA_COMMON_CUH_
#define L3K_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "geometry.h"
#include "kernels.h"

template <typename T> struct l3k_type;
template <> struct l3k_type<float> {
    static __device__ __forceinline__ float to_float(float v) { return v; }
    static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <> struct l3k_type<__half> {
    static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct l3k_type<__nv_bfloat16> {
    static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T> __device__ __forceinline__ float l3k_to_float(T v) { return l3k_type<T>::to_float(v); }
template <typename T> __device__ __forceinline__ T l3k_from_float(float v) { return l3k_type<T>::from_float(v); }
template <typename T> __device__ __forceinline__ float l3k_round_to(float v) { return l3k_to_float(l3k_from_float<T>(v)); }

/* Eight consecutive elements starting at column `col` of `row`, as floats.
 * VEC: the row is 16-byte aligned and every 16-byte piece is either wholly
 * inside [0, n) or wholly outside (n a multiple of the piece's element count). */
template <typename T, bool VEC>
__device__ __forceinline__ void l3k_load8(const T *__restrict__ row, int64_t col, int64_t n, float v[8]) {
    constexpr int PER16 = 16 / sizeof(T);
    if (VEC) {
#pragma unroll
        for (int piece = 0; piece < 8 / PER16; ++piece) {
            const int64_t c = col + piece * PER16;
            if (c < n) {
                uint4 raw = *reinterpret_cast<const uint4 *>(row + c);
                const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
                for (int i = 0; i < PER16; ++i) v[piece * PER16 + i] = l3k_to_float(e[i]);
            } else {
#pragma unroll
                for (int i = 0; i < PER16; ++i) v[piece * PER16 + i] = 0.0f;
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = col + i < n ? l3k_to_float(row[col + i]) : 0.0f;
    }
}

template <typename T, bool VEC>
__device__ __forceinline__ void l3k_store8(T *__restrict__ row, int64_t col, int64_t n, const float v[8]) {
    constexpr int PER16 = 16 / sizeof(T);
    if (VEC) {
#pragma unroll
        for (int piece = 0; piece < 8 / PER16; ++piece) {
            const int64_t c = col + piece * PER16;
            if (c < n) {
                uint4 raw;
                T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
                for (int i = 0; i < PER16; ++i) e[i] = l3k_from_float<T>(v[piece * PER16 + i]);
                *reinterpret_cast<uint4 *>(row + c) = raw;
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (col + i < n) row[col + i] = l3k_from_float<T>(v[i]);
    }
}

/* Eight consecutive elements kept in their storage type (16 bytes for 2-byte
 * types, 32 for float32): half the registers of eight floats, so more rows
 * can be in flight per multiprocessor. */
template <typename T>
struct l3k_slot {
    uint4 raw[sizeof(T) / 2];
    __device__ __forceinline__ T &at(int i) { return reinterpret_cast<T *>(raw)[i]; }
    __device__ __forceinline__ float get(int i) const { return l3k_to_float(reinterpret_cast<const T *>(raw)[i]); }
};

/* Sum over the `width` lanes (a power of two <= 32) that share a sub-warp. */
template <typename V>
__device__ __forceinline__ V l3k_subwarp_sum(V v, int width) {
    for (int off = width / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off, width);
    return v;
}

#define L3K_CUDA_TRY(expr)                        \
    do {                                          \
        cudaError_t l3k_err_ = (expr);            \
        if (l3k_err_ != cudaSuccess) return (int)l3k_err_; \
    } while (0)

/* Dispatch a dtype to a C++ type and evaluate `body` with it as `T`. */
#define L3K_DISPATCH_DTYPE(dt, ...)                                    \
    switch (dt) {                                                      \
    case L3K_DT_F32: { typedef float T; __VA_ARGS__; break; }          \
    case L3K_DT_F16: { typedef __half T; __VA_ARGS__; break; }         \
    case L3K_DT_BF16: { typedef __nv_bfloat16 T; __VA_ARGS__; break; } \
    }

#endif /* L3K_CUDA_COMMON_CUH_ */
