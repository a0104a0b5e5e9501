/* Hopper warpgroup MMA (wgmma) plumbing, sm_90a only.
 *
 * Operand conventions (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply"):
 *  - 16-bit operands in shared memory use the 128-byte swizzle: 64-element panels of 128-byte
 *    rows, the 16-byte chunk c of row r stored at chunk c ^ (r % 8), panels 1024-byte aligned.
 *  - K-major operand (the GEMM's K dimension contiguous): descriptor stride offset 1024 B (the
 *    next 8-row group); a k16 step adds 32 B to the start address inside a panel.
 *  - MN-major operand (M or N contiguous; the instruction's transpose bit): stride offset 1024 B
 *    steps 8 rows of K, leading offset steps to the next 64-element panel of M/N.
 *  - Accumulators (m64nN, fp32): warp w of the warpgroup holds rows 16w + lane/4 (+8);
 *    d[4j + 2r + e] is row (lane/4 + 8r), column 8j + 2(lane%4) + e. Two adjacent n8 chunks are
 *    exactly the register A fragment of an m64k16 product (l3k_pack2 pairs them).
 * Sequence: l3k_wgmma_fence(); wgmma...; l3k_wgmma_commit(); l3k_wgmma_wait<N>(); l3k_pin(registers read). */
#ifndef L3K_CUDA_WGMMA_CUH_
#define L3K_CUDA_WGMMA_CUH_

#include <cuda.h> /* CUtensorMap (types only: the encoder comes through the runtime) */
#include <cudaTypedefs.h>

#include "common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define L3K_HAVE_WGMMA 1
#else
#define L3K_HAVE_WGMMA 0
#endif

#if L3K_HAVE_WGMMA
/* Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
 * offsets (>> 4 each). K-major operands use only the stride offset (8-row groups, 1024 B);
 * MN-major operands also step between 64-element panels with the leading offset. */
__device__ __forceinline__ uint64_t l3k_sw128_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr >> 4) & 0x3FFFu) | ((uint64_t)((lbo >> 4) & 0x3FFFu) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}
__device__ __forceinline__ void l3k_wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void l3k_wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void l3k_wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* After the wait: the compiler must not read (or reuse) these registers earlier. */
template <int N>
__device__ __forceinline__ void l3k_pin(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void l3k_pin(uint32_t (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(r[i])::"memory");
}
/* Ordinary stores to shared memory become visible to the async proxy (wgmma, TMA, bulk copies). */
__device__ __forceinline__ void l3k_fence_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void l3k_warpgroup_sync(int wg) {
    asm volatile("bar.sync %0, 128;\n" ::"r"(wg + 1) : "memory");
}

/* Byte offset of 16-byte chunk `ch` (8 elements) of row `r` in a swizzled tile of `rows` rows:
 * the 128-byte-swizzle panel layout above. */
__device__ __forceinline__ uint32_t l3k_sw128_tile_off(int rows, int r, int ch) {
    return (uint32_t)((ch >> 3) * rows * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
}

/* mbarriers (8 bytes of shared memory each). A phase completes when its expected arrivals are in;
 * waiters name the phase by its parity (callers keep a barrier from running two phases ahead of
 * any waiter). */
__device__ __forceinline__ void l3k_mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void l3k_mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
/* One arrival on `bar` once every cp.async this thread has issued so far has landed. */
__device__ __forceinline__ void l3k_mbar_arrive_cp_async(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void l3k_mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    while (!done)
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, "
            "p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
}

/* m64nNk16, fp32 accumulators. ss_n128: D = A B (+ D if accumulate), A and B K-major in smem.
 * rs_nN: D += A B, A an m64k16 register fragment, B MN-major in smem (transpose bit set). */
template <typename T>
struct l3k_wgmma;

/* ss n64 with compile-time transpose bits (backward, flash_bwd_sm90.cu): TA/TB = 0 for a
 * K-major operand, 1 for an MN-major one. S^T = K Q^T uses <0, 0>; dQ = dS K reads dS^T and K
 * as stored (keys x columns), i.e. both MN-major: <1, 1>. */
template <typename T>
struct l3k_wgmma_ss;

#define L3K_WGMMA_T __nv_bfloat16
#define L3K_WGMMA_PTX "bf16"
#include "wgmma_ops.inc"
#undef L3K_WGMMA_T
#undef L3K_WGMMA_PTX
#define L3K_WGMMA_T __half
#define L3K_WGMMA_PTX "f16"
#include "wgmma_ops.inc"
#undef L3K_WGMMA_T
#undef L3K_WGMMA_PTX
/* TMA: the producer's arrival that also announces `bytes` of transactions the loads will complete. */
__device__ __forceinline__ void l3k_mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
/* One 64-column box of a (head_dim, seq, head, batch) tensor map (l3k_tma_map_bhsd) into
 * swizzled shared memory at `dst`, completing its bytes on `bar`. */
__device__ __forceinline__ void l3k_tma_box(uint32_t dst, const CUtensorMap *map, int col, int row, int head,
                                            int batch, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
        "%5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(head), "r"(batch), "r"(bar)
        : "memory");
}
/* A ROWS x HD tile of rows row0.. of (head, batch) as HD / 64 boxes (the 64-column panels). */
template <int ROWS, int HD>
__device__ __forceinline__ void l3k_tma_tile(uint32_t dst, const CUtensorMap *map, int row0, int head,
                                             int batch, uint32_t bar) {
#pragma unroll
    for (int p = 0; p < HD / 64; p++)
        l3k_tma_box(dst + (uint32_t)(p * ROWS * 128), map, 64 * p, row0, head, batch, bar);
}

#endif /* L3K_HAVE_WGMMA */

/* Host side, for launching the sm_90a kernels: whether `kernel` runs on the current device, i.e.
 * compute capability 9.0 and an sm_90a cubin of it in this binary (a build without sm_90a has only
 * the empty sm_80 body). The first call per device also raises the kernel's dynamic shared memory
 * limit to `smem` and caches the answer and the SM count in `cache` (one per kernel). Returns
 * cudaSuccess (*sm_count set when asked), cudaErrorNotSupported, or a failed query's error. No
 * stream work: legal while a stream is being captured. */
struct l3k_sm90a_cache {
    int ready[64]; /* per device: 0 unknown, 1 yes, 2 no */
    int sms[64];
};
template <typename K>
inline cudaError_t l3k_sm90a_prepare(K kernel, size_t smem, l3k_sm90a_cache &cache, int *sm_count) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    if (dev < 0 || dev >= 64) return cudaErrorNotSupported;
    if (cache.ready[dev] == 0) {
        int major = 0, minor = 0, sms = 0;
        cudaFuncAttributes attr;
        if ((e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess)
            return e;
        if ((e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess)
            return e;
        if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
        bool ok = major == 9 && minor == 0 && cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
                  attr.binaryVersion == 90;
        if (ok)
            ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) ==
                 cudaSuccess;
        (void)cudaGetLastError(); /* a failed probe is an answer, not a sticky error */
        cache.sms[dev] = sms;
        cache.ready[dev] = ok ? 1 : 2;
    }
    if (cache.ready[dev] != 1) return cudaErrorNotSupported;
    if (sm_count) *sm_count = cache.sms[dev];
    return cudaSuccess;
}

/* A TMA tensor map over a strided (batch, heads, seq, head_dim) view of 16-bit elements, as a 4-d
 * (head_dim, seq, heads, batch) tensor: boxes of 64 columns x `box_rows` rows in the 128-byte
 * swizzle above; rows and columns out of range read as zeros. cudaErrorNotSupported when this
 * driver has no encoder or the view does not suit TMA (address or strides not multiples of 16
 * bytes); the caller then takes another kernel. Host only, no stream work. */
inline cudaError_t l3k_tma_map_bhsd(CUtensorMap *m, const void *ptr, bool bf16, int64_t d, int64_t seq,
                                    int64_t heads, int64_t batch, const int64_t stride[3], int box_rows) {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
    if (!encode) {
        void *fn = nullptr;
        cudaDriverEntryPointQueryResult q;
        const cudaError_t e =
            cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
        if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !fn) return cudaErrorNotSupported;
        encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }
    const cuuint64_t dims[4] = {(cuuint64_t)d, (cuuint64_t)seq, (cuuint64_t)heads, (cuuint64_t)batch};
    /* A size-1 dimension's stride is arbitrary in a view but must be a multiple of 16 bytes for TMA:
     * give it the packed value (d * 2 is one: head_dim is a multiple of 8). */
    const cuuint64_t s_seq = seq == 1 ? (cuuint64_t)d * 2 : (cuuint64_t)stride[2] * 2;
    const cuuint64_t s_head = heads == 1 ? s_seq * (cuuint64_t)seq : (cuuint64_t)stride[1] * 2;
    const cuuint64_t s_batch = batch == 1 ? s_head * (cuuint64_t)heads : (cuuint64_t)stride[0] * 2;
    const cuuint64_t strides[3] = {s_seq, s_head, s_batch};
    const cuuint32_t box[4] = {64, (cuuint32_t)box_rows, 1, 1}, elem[4] = {1, 1, 1, 1};
    const CUresult r = encode(m, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                              const_cast<void *>(ptr), dims, strides, box, elem,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorNotSupported;
}

#endif /* L3K_CUDA_WGMMA_CUH_ */
