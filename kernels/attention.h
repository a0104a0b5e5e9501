/* kernels/attention.h -- internal interface of the flash-attention kernels.
 *
 * Plain C (no CUDA types); included by kernels/cpu/flash_attn.c, the kernels/cuda/flash_*.cu files
 * and the C ABI layer. Policy (validation of shapes, dtypes, strides, alignment) lives in capi/;
 * these entry points trust their arguments.
 *
 * Layout: q is (B, H, Sq, D), k/v are (B, Hkv, Sk, D), o is (B, H, Sq, D), each addressed with its
 * own int64 element strides for (batch, head, seq); the last dim is contiguous (stride 1).
 * A (B, S, H, D) buffer viewed as (B, H, S, D) is fine. lse is contiguous float32 (B, H, Sq).
 *
 * Semantics
 *  - scores s_ij = scale * <q_i, k_j>; softmax over visible keys; o_i = sum_j p_ij v_j.
 *  - causal is aligned bottom-right: key j is visible to query i iff j <= i + (Sk - Sq).
 *  - key_range (optional, NULL = every key): int32 (B, 2) contiguous, on the device of q; row b =
 *    [start, end) are the keys sequence b may see (padding on either side). Read by the kernels
 *    and clamped there to 0 <= start <= end <= Sk, so no value reads out of bounds. Key j is
 *    visible to query i of sequence b iff start <= j < end and (causal) j <= i + (Sk - Sq).
 *  - GQA/MQA: query head h reads kv head h / (H / Hkv); H must be a multiple of Hkv.
 *  - lse_i = log(sum_j exp(s_ij)) in natural log, float32.
 *  - FULLY MASKED ROWS (no visible key: causal with i + Sk - Sq < start, an empty key range, or
 *    Sk == 0): o_i = 0 and lse_i = +INFINITY. With that sentinel the backward's p = exp(s - lse) is
 *    exactly 0, so such rows contribute nothing to dk/dv and get dq_i = 0. A row is masked by the
 *    mask alone, never by its values: a NaN that reaches a row's scores makes its o and lse NaN.
 *  - head_dim: any multiple of 8 in [8, 256]. The CUDA fast paths are head_dim 64 and 128; other
 *    values run the kernel of the next size in {64, 128, 256} with zero-filled columns. On H100
 *    (sm_90a builds) the forward for 64 < head_dim <= 128 runs on wgmma, elsewhere on mma.sync.
 *  - CUDA dtypes: float16 and bfloat16 (fp32 accumulation). The CPU reference also takes float32.
 *  - CUDA pointers: q/k/v/o/dout/dq/dk/dv 16-byte aligned and every stride a multiple of 8
 *    elements (16-byte vector loads); the capi layer checks this.
 *
 * Backward
 *  - Inputs: q, k, v, o, lse (the forward's outputs) and dout; outputs dq, dk, dv in the input
 *    dtype with their own strides (dk/dv are (B, Hkv, Sk, D): the GQA group sum is done inside,
 *    never with float atomics on dk/dv).
 *  - deterministic == 0 (default): dq is accumulated with float32 atomics into the workspace,
 *    then scaled and converted (result may differ in the last bits between runs; dk/dv never).
 *  - deterministic != 0: a separate query-major kernel recomputes P and dS and writes dq with no
 *    atomics; bitwise reproducible. About 1.4x the backward FLOPs.
 *  - Workspace: see l3k_attn_bwd_workspace_bytes. It must be 256-byte aligned (cudaMalloc and
 *    torch allocations are). The CPU reference needs none (pass NULL/0); it mallocs host scratch.
 */
#ifndef L3K_KERNELS_ATTENTION_H
#define L3K_KERNELS_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const void *q, *k, *v; /* q: (B, H, Sq, D); k, v: (B, Hkv, Sk, D); strides below, last dim contiguous */
    void *o;               /* (B, H, Sq, D) with its own strides */
    float *lse;            /* (B, H, Sq) contiguous float32, natural log; +inf for fully masked rows */
    int64_t batch, n_heads, n_kv_heads, seq_q, seq_k, head_dim;
    int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3]; /* element strides: batch, head, seq */
    float scale;                                                /* usually 1/sqrt(head_dim) */
    int causal;                                                 /* bottom-right aligned */
    l3k_dt dtype;                                               /* of q, k, v, o (and dout, dq, dk, dv) */
    const int32_t *key_range; /* NULL = every key; else (B, 2) [start, end) per sequence, clamped */
} l3k_attn_fwd_args;

typedef struct {
    l3k_attn_fwd_args f; /* q, k, v, o, lse and sizes as in the forward (o, lse: forward outputs) */
    const void *dout;
    int64_t do_stride[3]; /* (B, H, Sq, D) */
    void *dq, *dk, *dv;   /* dq (B, H, Sq, D); dk, dv (B, Hkv, Sk, D) */
    int64_t dq_stride[3], dk_stride[3], dv_stride[3];
    void *workspace;
    size_t workspace_bytes; /* >= l3k_attn_bwd_workspace_bytes(...) */
    int deterministic;      /* 0 = default (float atomics into dq workspace) */
} l3k_attn_bwd_args;

/* Scratch bytes the backward needs; a pure function of its arguments (no device queries).
 * on_cuda == 0 (CPU reference): 0.
 * on_cuda != 0:
 *   dsum  = round_up(B*H*Sq*4, 256)                  float32 D_i = rowsum(dO_i * O_i)
 *   dqacc = deterministic ? 0 : round_up(B*H*Sq*D*4, 256)   float32 dq accumulator
 *   total = dsum + dqacc  (0 if any size is 0). */
size_t l3k_attn_bwd_workspace_bytes(int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t seq_q,
                                    int64_t seq_k, int64_t head_dim, int deterministic, int on_cuda);

/* CPU reference (OpenMP). Return 0 on success, 1 if host scratch could not be allocated. */
int l3k_cpu_attn_fwd(const l3k_attn_fwd_args *a);
int l3k_cpu_attn_bwd(const l3k_attn_bwd_args *a);

/* CUDA: enqueue on stream (a cudaStream_t; NULL = legacy default). Launch only: never allocates,
 * never synchronizes, safe under graph capture. Return a cudaError_t value (0 = cudaSuccess);
 * cudaErrorInvalidValue (1) for an unsupported dtype/head_dim or a too-small workspace. */
int l3k_cuda_attn_fwd(const l3k_attn_fwd_args *a, void *stream);
int l3k_cuda_attn_bwd(const l3k_attn_bwd_args *a, void *stream);

/* The kernels behind l3k_cuda_attn_fwd and l3k_cuda_attn_bwd, by direction and architecture
 * (kernels/cuda/flash_{fwd,bwd}_sm{80,90}.cu; kernels/cuda/flash_attn.cu picks and orders them).
 * Each trusts l3k_cuda_attn_fwd/_bwd's checks (dtype float16 or bfloat16, head_dim, sizes > 0)
 * and returns a cudaError_t value. */
/* The mma.sync forward (any sm_80+ GPU). variant 1: 8 warps a CTA; otherwise the default tiles. */
int l3k_cuda_attn_fwd_sm80(const l3k_attn_fwd_args *a, void *stream, int variant);
/* The Hopper (sm_90a, wgmma) forward: 64 < head_dim <= 128 on a compute capability 9.0 GPU with a
 * build that carries sm_90a code. Returns cudaErrorNotSupported (801) without launching anything
 * otherwise. */
int l3k_cuda_attn_fwd_sm90(const l3k_attn_fwd_args *a, void *stream);
/* Backward preprocess: dsum = rowsum(dout * o) (B*H*Sq float32) and, when dqacc is not NULL, a
 * zeroed dq accumulator (B*H*Sq*head_dim float32). */
int l3k_cuda_attn_bwd_pre(const l3k_attn_bwd_args *a, float *dsum, float *dqacc, void *stream);
/* The mma.sync backward main kernel: dk, dv written; unless deterministic, dS K added to dqacc
 * (row-major). */
int l3k_cuda_attn_bwd_main_sm80(const l3k_attn_bwd_args *a, const float *dsum, float *dqacc, void *stream);
/* The Hopper (sm_90a, wgmma) backward main kernel behind l3k_cuda_attn_bwd (non-deterministic
 * mode): dk, dv written, dS K added to dqacc. dsum and dqacc are the workspace's D and zeroed dq
 * accumulator, set up by the caller's preprocess kernel; the caller then converts dqacc to dq.
 * head_dim <= 128 on a compute capability 9.0 GPU with a build that carries sm_90a code; returns
 * cudaErrorNotSupported (801) without launching anything otherwise (deterministic, head_dim > 128,
 * other GPUs).
 * dqacc layout it leaves: row-major (B, H, Sq, head_dim) float32, except that every full 64-row
 * block (rows 64m..64m+63 < Sq) of a head_dim 64 or 128 problem keeps its span of the row-major
 * buffer but is stored in wgmma accumulator order (flash_bwd_sm90.cu); the dq convert kernel
 * must be told (tiled = 1). */
int l3k_cuda_attn_bwd_main_sm90(const l3k_attn_bwd_args *a, const float *dsum, float *dqacc, void *stream);
/* Deterministic mode's dq: a query-major kernel recomputes P and dS, dq written with no atomics. */
int l3k_cuda_attn_bwd_dq_sm80(const l3k_attn_bwd_args *a, const float *dsum, void *stream);
/* dq = dqacc * scale in the input dtype; tiled: dqacc as l3k_cuda_attn_bwd_main_sm90 leaves it. */
int l3k_cuda_attn_bwd_dq_convert(const l3k_attn_bwd_args *a, const float *dqacc, int tiled, void *stream);
/* Testing hook: variant 0 = l3k_cuda_attn_bwd; 1 = the mma.sync main kernel even where the wgmma
 * one is available. */
int l3k_cuda_attn_bwd_variant(const l3k_attn_bwd_args *a, void *stream, int variant);

#ifdef __cplusplus
}
#endif

#endif /* L3K_KERNELS_ATTENTION_H */
