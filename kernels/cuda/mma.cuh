/* The mma.sync building blocks of the attention kernels (sm_80 and later; also
 * valid in the sm_90a pass): ldmatrix, m16n8k16 bf16/fp16 products with fp32
 * accumulators, swizzled shared-memory tiles and their cp.async loads.
 *
 *  - global->shared: 16-byte cp.async (zero-fill past the sequence end and past head_dim),
 *    tiles stored row-major with the 16-byte chunk index XOR-swizzled by the row (bank-conflict
 *    free ldmatrix), see l3k_sw<W>().
 *  - shared->registers: ldmatrix.x4 (A operands and "col" B operands) and ldmatrix.x4.trans
 *    (B operands stored k-major, i.e. V, dO, Q, K as right-hand matrices).
 *  - mma.sync.aligned.m16n8k16 bf16/fp16 -> fp32. An m16n8 accumulator pair has the register
 *    layout of an m16k16 A fragment, so P (forward) and dS/P^T (backward) feed the next MMA from
 *    registers. */
#ifndef L3K_CUDA_MMA_CUH_
#define L3K_CUDA_MMA_CUH_

#include "common.cuh"

__device__ __forceinline__ void l3k_ldsm_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3,
                                            uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void l3k_ldsm_x4_t(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3,
                                              uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

/* m16n8k16 products c += a b (a: the m16k16 A fragment, b0 b1: a k16n8 B fragment, c: an m16n8
 * fp32 accumulator tile) and the packing of their results, for the 16-bit types: T and its PTX
 * name PTX ("bf16", "f16"). */
template <typename T>
struct l3k_mma;
#define L3K_MMA_TYPE(T, PTX)                                                                                 \
    template <>                                                                                              \
    struct l3k_mma<T> {                                                                                      \
        static __device__ __forceinline__ void run(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {  \
            asm("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX                                         \
                ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                               \
                : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                             \
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                             \
        }                                                                                                    \
        static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return l3k_pack2<T>(lo, hi); } \
    };
L3K_MMA_TYPE(__nv_bfloat16, "bf16")
L3K_MMA_TYPE(__half, "f16")
#undef L3K_MMA_TYPE

/* Zero N m16n8 fp32 accumulator tiles. */
template <int N>
__device__ __forceinline__ void l3k_zero_acc(float (&c)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[j][e] = 0.f;
}

/* The 2 * MW products of one ldmatrix.x4 B load (b0 b1 | b2 b3: two k16n8 fragments, the n8 tiles n
 * and n + 1) with the A fragments of MW m16 row strips: c[mi][n] += a[mi] (b0 b1), c[mi][n + 1] +=
 * a[mi] (b2 b3). */
template <typename T, int MW, int N>
__device__ __forceinline__ void l3k_mma_strips(float (&c)[MW][N][4], int n, const uint32_t (&a)[MW][4],
                                               uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
#pragma unroll
    for (int mi = 0; mi < MW; mi++) {
        l3k_mma<T>::run(c[mi][n], a[mi], b0, b1);
        l3k_mma<T>::run(c[mi][n + 1], a[mi], b2, b3);
    }
}

/* Swizzled element offset of (r, c) in a row-major tile of W 16-bit columns. The 16-byte chunk
 * index is XORed with row bits so that 8 consecutive rows at one logical chunk hit 8 distinct
 * 16-byte bank groups. W >= 64: chunk ^ (r & 7) (stays within its 64-column panel); W == 32:
 * chunk ^ ((r >> 1) & 3). */
template <int W>
__device__ __forceinline__ int l3k_sw(int r, int c) {
    if constexpr (W >= 64) {
        return r * W + ((((c >> 3) ^ (r & 7))) << 3) + (c & 7);
    } else {
        static_assert(W == 32, "tile width");
        return r * W + ((((c >> 3) ^ ((r >> 1) & 3))) << 3) + (c & 7);
    }
}

/* Per-lane byte offset of the row pointer an ldmatrix.x4 lane supplies, for lane row r_l and lane
 * chunk c_l (both < 8 after masking by the tile pattern). For a constant even chunk cc and a constant
 * row offset rr (multiple of 8) the address is base + ((off ^ (cc << 4)) + rr * 2W): the swizzle
 * XOR only touches the chunk bits, so the compiler gets one LOP3 per chunk and immediate row offsets. */
template <int W>
__device__ __forceinline__ uint32_t l3k_lane_off(int r_l, int c_l) {
    return 2u * (uint32_t)l3k_sw<W>(r_l, c_l * 8);
}
/* A operand (rows 0..15 of the strip, two 8-column halves) */
template <int W>
__device__ __forceinline__ uint32_t l3k_off_a(int lane) {
    return l3k_lane_off<W>(lane & 15, lane >> 4);
}
/* B operand stored [n][k] (non-transposed ldmatrix): n rows 0..15, k halves */
template <int W>
__device__ __forceinline__ uint32_t l3k_off_b(int lane) {
    return l3k_lane_off<W>((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
}
/* B operand stored [k][n] (ldmatrix.trans): k rows 0..15, n halves */
template <int W>
__device__ __forceinline__ uint32_t l3k_off_t(int lane) {
    return l3k_lane_off<W>((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
}
__device__ __forceinline__ uint32_t l3k_xo(uint32_t off, int cc) { return off ^ ((uint32_t)cc << 4); }

/* The m16k16 A fragment made of two adjacent m16n8 accumulator tiles (P or dS from the previous
 * product, rounded to T): the register-A operand of the next product. */
template <typename T>
__device__ __forceinline__ void l3k_acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = l3k_mma<T>::pack(lo[0], lo[1]);
    a[1] = l3k_mma<T>::pack(lo[2], lo[3]);
    a[2] = l3k_mma<T>::pack(hi[0], hi[1]);
    a[3] = l3k_mma<T>::pack(hi[2], hi[3]);
}

/* acc (W / 8 m16n8 tiles) += A (m16k16 fragment) x B, where B is the 16-row slab at byte offset
 * `slab` of the tile at sB (row width HD, swizzled), columns from 8-element chunk c0 on, read
 * through ldmatrix.trans (lane offsets oT). */
template <typename T, int HD, int W>
__device__ __forceinline__ void l3k_a_times_slab_t(float (&acc)[W / 8][4], const uint32_t (&a)[4],
                                                   uint32_t sB, uint32_t oT, int c0, uint32_t slab) {
#pragma unroll
    for (int dj = 0; dj < W / 16; dj++) {
        uint32_t b0, b1, b2, b3;
        l3k_ldsm_x4_t(b0, b1, b2, b3, sB + (l3k_xo(oT, c0 + dj * 2) + slab));
        l3k_mma<T>::run(acc[2 * dj], a, b0, b1);
        l3k_mma<T>::run(acc[2 * dj + 1], a, b2, b3);
    }
}

/* cp.async a ROWS x W tile (row stride `rs` elements) into swizzled smem; rows >= nrows and
 * columns >= ncols are zero-filled. */
template <int ROWS, int W, int NT, typename T>
__device__ __forceinline__ void l3k_load_tile(T *s, const T *g, int64_t rs, int64_t nrows, int ncols,
                                              int tid) {
    constexpr int CH = W / 8;
    const uint32_t sbase = l3k_smem_u32(s);
#pragma unroll
    for (int c = tid; c < ROWS * CH; c += NT) {
        const int r = c / CH, ch = c % CH;
        const bool p = (r < nrows) && (ch * 8 < ncols);
        const T *src = p ? g + (int64_t)r * rs + ch * 8 : g;
        l3k_cp_async16(sbase + 2u * (uint32_t)l3k_sw<W>(r, ch * 8), src, p);
    }
}

/* store a ROWS x W swizzled smem tile to global with 16-byte stores (rows < nrows, cols < ncols) */
template <int ROWS, int W, int NT, typename T>
__device__ __forceinline__ void l3k_store_tile(T *g, int64_t rs, const T *s, int64_t nrows, int ncols,
                                               int tid) {
    constexpr int CH = W / 8;
#pragma unroll
    for (int c = tid; c < ROWS * CH; c += NT) {
        const int r = c / CH, ch = c % CH;
        if (r < nrows && ch * 8 < ncols)
            *reinterpret_cast<uint4 *>(g + (int64_t)r * rs + ch * 8) =
                *reinterpret_cast<const uint4 *>(s + l3k_sw<W>(r, ch * 8));
    }
}

/* Set the kernel's dynamic smem limit to `smem` once per (kernel, device), whatever its size: a
 * kernel's static __shared__ variables count against the 48 KB default too, so a dynamic size of
 * exactly 48 KB plus a few static bytes fails to launch without it.  Not a stream operation, so
 * it is also legal while a stream is being captured. */
template <typename K>
inline cudaError_t l3k_smem_prepare(K kernel, size_t smem, bool *done) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    if (dev < 0 || dev >= 64) dev = 63;
    if (!done[dev]) {
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return e;
        done[dev] = true;
    }
    return cudaSuccess;
}

#endif /* L3K_CUDA_MMA_CUH_ */
