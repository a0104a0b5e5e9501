/* l3k.h: the public C ABI of llama3-kernels.
 *
 * Fused kernels for the LLaMA-3 transformer block, on the CPU (reference
 * kernels, OpenMP) and on NVIDIA GPUs (CUDA C), behind one plain C interface
 * that takes DLPack tensors.
 *
 * Conventions, true of every function below unless its comment says otherwise:
 *  - Every function returns an l3k_status; L3K_SUCCESS is 0.  On failure
 *    l3k_last_error() returns a message naming the op, the argument, what was
 *    expected and what came, e.g.
 *      "rmsnorm_forward: weight dtype float16, expected bfloat16 like x".
 *    The message lives in thread-local storage until the next failing call on
 *    the same thread.
 *  - Tensors are borrowed: `const DLTensor*` inputs and `DLTensor*` outputs
 *    are read during the call only.  The library never keeps a pointer to
 *    them and never calls a DLPack deleter.  data + byte_offset is honoured.
 *  - All tensors of one call live on one device (kDLCPU, or kDLCUDA with one
 *    device id).  CPU tensors run the reference kernels; CUDA tensors run the
 *    CUDA kernels, enqueued on `stream` (a cudaStream_t; NULL = the legacy
 *    default stream).  `stream` is ignored for CPU tensors.
 *  - The library never allocates device memory, never synchronizes the device,
 *    never exits or aborts.  Scratch memory comes from the caller through a
 *    `workspace` tensor (any dtype, 1-D, contiguous, on the same device, at
 *    least the bytes the matching *_workspace_size function returns).  So
 *    every call may be captured in a CUDA graph.
 *  - Floating-point tensors are float32, float16 or bfloat16; the arithmetic
 *    is carried out in float32 whatever the storage type.
 *  - Errors are found before anything is launched or written: a failing call
 *    leaves every tensor untouched.
 *  - A tensor with zero elements is valid; the call then does nothing.
 *  - Sizes and offsets are 64-bit: tensors past 2^31 elements are indexed
 *    correctly.  A tensor whose element count or strided byte range passes
 *    2^63 - 1, or whose data + byte_offset + that range leaves [0, 2^63), is
 *    refused, as is any size a call derives past 2^63 - 1.
 *
 * The DLPack types (DLTensor, DLDevice, DLDataType) are declared below,
 * binary-compatible with DLPack 0.6 to 1.x.  To use the official dlpack.h
 * instead, include it before this header.
 */
#ifndef L3K_H_
#define L3K_H_

#include <stddef.h>
#include <stdint.h>

#define L3K_VERSION_MAJOR 0
#define L3K_VERSION_MINOR 2
#define L3K_VERSION_PATCH 0
/* One integer that orders versions: major * 10000 + minor * 100 + patch. */
#define L3K_VERSION (L3K_VERSION_MAJOR * 10000 + L3K_VERSION_MINOR * 100 + L3K_VERSION_PATCH)

#if defined(_WIN32)
#define L3K_API __declspec(dllexport)
#else
#define L3K_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- DLPack ABI ---------------------------------------------------------- */
#ifndef DLPACK_DLPACK_H_
/* Same layout and values as dlpack.h.  Only what this ABI reads is declared. */
typedef enum { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3 } DLDeviceType;
typedef struct {
    DLDeviceType device_type;
    int32_t device_id;
} DLDevice;
typedef enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 } DLDataTypeCode;
typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;
typedef struct {
    void *data; /* base pointer; element 0 is at data + byte_offset */
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;   /* ndim sizes */
    int64_t *strides; /* ndim strides in elements; NULL = compact row-major */
    uint64_t byte_offset;
} DLTensor;
#endif

/* ---- Status -------------------------------------------------------------- */
typedef enum {
    L3K_SUCCESS = 0,
    L3K_ERROR_NULL_POINTER = 1, /* a required tensor, or its data/shape, is NULL */
    L3K_ERROR_DEVICE = 2,       /* unsupported device type, or tensors on different devices */
    L3K_ERROR_NO_CUDA = 3,      /* a CUDA tensor reached a library built without CUDA */
    L3K_ERROR_DTYPE = 4,        /* unsupported dtype, or dtypes that must match do not */
    L3K_ERROR_SHAPE = 5,        /* wrong ndim, or sizes that do not match */
    L3K_ERROR_LAYOUT = 6,       /* strides this op does not accept (e.g. last dim not contiguous) */
    L3K_ERROR_ALIGNMENT = 7,    /* a data pointer not aligned to its element size */
    L3K_ERROR_VALUE = 8,        /* a scalar argument out of range (e.g. eps < 0 or NaN) */
    L3K_ERROR_WORKSPACE = 9,    /* workspace missing or smaller than its size query says */
    L3K_ERROR_CUDA = 10,        /* the CUDA runtime reported an error (message has its text) */
    L3K_ERROR_CUBLAS = 11,      /* cuBLAS / cuBLASLt reported an error */
    L3K_ERROR_INTERNAL = 12     /* a bug in this library: please report it */
} l3k_status;

/* Static text for a status code ("success", "null pointer", ...).  Never NULL. */
L3K_API const char *l3k_status_string(l3k_status status);

/* The message of the last failing call on this thread ("" if none).  The
 * pointer is valid until the next failing call on this thread. */
L3K_API const char *l3k_last_error(void);

/* The library's version as L3K_VERSION encodes it; compare with the header's. */
L3K_API int l3k_version(void);

/* 1 if this library was built with CUDA kernels, else 0. */
L3K_API int l3k_has_cuda(void);

/* Graph replay of the block calls (l3k_llama_block_forward, _forward_train, _backward) on
 * CUDA: the second time a call is made with exactly the same arguments (every tensor's
 * address, dtype, shape, strides; the same settings) it is captured as a CUDA graph on a
 * stream of the library's own, and from then on that graph is launched on the caller's
 * stream instead: one launch instead of ~25, and no validation (the arguments are those of
 * a call that passed it).  Results are bitwise those of the kernels launched one by one;
 * memory contents may change freely between calls.  A call whose stream is being captured
 * runs as usual (it becomes part of the caller's graph).  Up to 160 graphs are kept, the
 * least recently used dropped first.  On by default; the environment variable
 * L3K_GRAPH_REPLAY=0 turns it off at load.  Sets it on (1) or off (0, dropping the graphs)
 * and returns the previous setting; always 0 without CUDA.  Thread-safe. */
L3K_API int l3k_set_graph_replay(int enabled);

/* ---- RMSNorm ------------------------------------------------------------- *
 * y = x * rsqrt(mean(x^2, last dim) + eps) * weight
 *
 * x:      (..., n), ndim >= 1.  Last dim contiguous (stride 1); the leading
 *         dims must flatten to rows with one row stride (any contiguous tensor,
 *         or a slice of rows of one).
 * weight: (n,), contiguous, dtype of x.
 * y:      shape of x, dtype of x, same layout rules (its own row stride).
 *         May alias x exactly (in place); any other overlap with x, weight
 *         or rstd is refused.
 * rstd:   optional (NULL): float32, contiguous, x.shape[:-1] (or (rows,) ),
 *         receives 1 / sqrt(mean(x^2) + eps) per row for the backward.
 * eps:    finite, >= 0.
 * Vector loads are used where rows are 16-byte aligned; other layouts take a
 * scalar path, so any n from 1 up works. */
L3K_API l3k_status l3k_rmsnorm_forward(const DLTensor *x, const DLTensor *weight, float eps, DLTensor *y,
                                       DLTensor *rstd, void *stream);

/* Fused residual add + RMSNorm: h = x + residual; y = rmsnorm(h) * weight.
 * x, residual, h and y share shape, dtype and the layout rules of x above;
 * h is written (it carries the residual stream on), rstd as above.  h and y
 * may each alias x or residual exactly; h and y must not overlap each other,
 * and other overlaps are refused. */
L3K_API l3k_status l3k_add_rmsnorm_forward(const DLTensor *x, const DLTensor *residual,
                                           const DLTensor *weight, float eps, DLTensor *h, DLTensor *y,
                                           DLTensor *rstd, void *stream);

/* Bytes of workspace l3k_rmsnorm_backward needs for x's shape when dweight is
 * asked for (without dweight it needs none).  `x` is only inspected. */
L3K_API l3k_status l3k_rmsnorm_backward_workspace_size(const DLTensor *x, size_t *bytes);

/* Gradients of RMSNorm (or of the fused add + RMSNorm).
 * dy:      gradient of y; shape, dtype, layout of x.
 * dh:      optional (NULL): for the fused op, the gradient that reaches h from
 *          its other consumers; it is added into dx.
 * x:       the normalized input (h for the fused op).
 * weight:  as in the forward.
 * rstd:    optional: the forward's rstd; NULL recomputes it from x.
 * dx:      output, shape/dtype of x; for the fused op it is the gradient of
 *          both x and residual.  May alias dy, dh or x exactly; other
 *          overlaps are refused.
 * dweight: optional output (n,), dtype of weight; overwritten (not
 *          accumulated) with sum over rows of dy * x * rstd, accumulated in
 *          float32 in a fixed order (deterministic).
 * workspace: needed when dweight is given (see the size query); may be NULL
 *          otherwise. */
L3K_API l3k_status l3k_rmsnorm_backward(const DLTensor *dy, const DLTensor *dh, const DLTensor *x,
                                        const DLTensor *weight, const DLTensor *rstd, float eps, DLTensor *dx,
                                        DLTensor *dweight, DLTensor *workspace, void *stream);

/* ---- RoPE (rotary position embedding) --------------------------------- *
 * Rotates q and k in one launch.  For every row x (one head of one token,
 * position t = s + offset) and pair p in [0, head_dim/2):
 *   out1 = x1 * cos[t][p] - x2 * sin[t][p]
 *   out2 = x2 * cos[t][p] + x1 * sin[t][p]
 * in float32, where (x1, x2) = (x[p], x[p + head_dim/2]) for L3K_ROPE_HALF
 * (rotate-half, the Hugging Face convention) or (x[2p], x[2p+1]) for
 * L3K_ROPE_INTERLEAVED (Meta's original layout).
 *
 * q:      (batch, n_heads, seq, head_dim); head_dim even, at most 256.  Last
 *         dim contiguous; dims 0..2 take any strides, so q and k may be views
 *         of one fused QKV projection, e.g. torch's
 *         qkv.view(b, s, h, d).transpose(1, 2).
 * k:      optional (NULL rotates q only): (batch, n_kv_heads, seq, head_dim),
 *         dtype of q, same stride rules; n_heads a multiple of n_kv_heads.
 * cos, sin: (rows, head_dim/2) shared by every batch, or (batch, rows,
 *         head_dim/2) per batch (leading size 1 also means shared).
 *         Contiguous; float32 or the dtype of q, both the same dtype.
 *         rows >= seq + offset (rows may exceed it).
 * offset: position of token 0 (>= 0), for continuing a sequence (KV cache).
 * mode:   L3K_ROPE_HALF or L3K_ROPE_INTERLEAVED.
 * q_out, k_out: shape and dtype of q / k, their own strides (same rules, no
 *         stride 0).  In place: pass the same view as the input (same data
 *         pointer, shape and strides).  An output that shares memory with its
 *         input in any other way is rejected (a byte-range test).  k_out is
 *         required iff k is given.  Outputs must not share elements with each
 *         other or with the other input (not checked beyond a shared start),
 *         nor overlap cos or sin (checked).
 * 16-byte vector loads are used where the rows allow them; any layout works. */
#define L3K_ROPE_HALF 0
#define L3K_ROPE_INTERLEAVED 1
L3K_API l3k_status l3k_rope_forward(const DLTensor *q, const DLTensor *k, const DLTensor *cos,
                                    const DLTensor *sin, int64_t offset, int mode, DLTensor *q_out,
                                    DLTensor *k_out, void *stream);

/* Gradient of l3k_rope_forward: the inverse rotation (sin negated) of dq and
 * (optional) dk into dq_out / dk_out, with the same arguments and rules as
 * the forward (dq in place of q, dk in place of k).  In place works. */
L3K_API l3k_status l3k_rope_backward(const DLTensor *dq, const DLTensor *dk, const DLTensor *cos,
                                     const DLTensor *sin, int64_t offset, int mode, DLTensor *dq_out,
                                     DLTensor *dk_out, void *stream);

/* ---- SwiGLU activation --------------------------------------------------- *
 * a = silu(g) * u = g * sigmoid(g) * u, in float32.
 *
 * g, u:   (..., hidden), same shape and dtype; the RMSNorm layout rules of x
 *         (last dim contiguous, leading dims flatten to rows of one stride;
 *         each tensor its own row stride).
 * a:      output, shape/dtype/layout rules of g.  May be the same view as g
 *         or u (in place); any other overlap with them is rejected (exactly:
 *         interleaved rows that share no element are fine). */
L3K_API l3k_status l3k_swiglu_forward(const DLTensor *g, const DLTensor *u, DLTensor *a, void *stream);

/* The same on one fused gate_up tensor gu (..., 2 * hidden) laid out as
 * [g | u] along the last dim: g = gu[..., :hidden], u = gu[..., hidden:].
 * a: (..., hidden).  gu follows the row rules above. */
L3K_API l3k_status l3k_swiglu_fused_forward(const DLTensor *gu, DLTensor *a, void *stream);

/* Gradients of a = silu(g) * u, silu recomputed from g (sig = sigmoid(g)):
 *   dg = da * u * sig * (1 + g * (1 - sig)),   du = da * silu(g).
 * da, g, u: shape/dtype of g (row rules above).
 * dg, du:   outputs like g.  Each may be the same view as one of da, g, u
 *           (in place, e.g. dg over g and du over u); other overlaps, and
 *           dg/du/a overlapping each other, are rejected.
 * a:        optional output (NULL): receives silu(g) * u recomputed, so a
 *           caller need not keep the forward's activation for the weight
 *           gradient of the down projection. */
L3K_API l3k_status l3k_swiglu_backward(const DLTensor *da, const DLTensor *g, const DLTensor *u, DLTensor *dg,
                                       DLTensor *du, DLTensor *a, void *stream);

/* Fused layout backward: gu (..., 2 * hidden) as in l3k_swiglu_fused_forward,
 * da (..., hidden); dgu (..., 2 * hidden) receives [dg | du].  a: optional
 * output as in l3k_swiglu_backward.  Each output may be the same view as an
 * input (every element reads its inputs before it is written): dgu over gu and
 * a over da turn the backward's buffers into its outputs with no extra memory. */
L3K_API l3k_status l3k_swiglu_fused_backward(const DLTensor *da, const DLTensor *gu, DLTensor *dgu,
                                             DLTensor *a, void *stream);

/* ---- Cross-entropy, loss and gradient in one pass ------------------------ *
 * For each row r of logits (V classes), in float32 arithmetic:
 *   lse       = log(sum_j exp(logits[r, j]))
 *   loss[r]   = lse - logits[r, target[r]]
 *   dlogits[r, j] = (exp(logits[r, j] - lse) - (j == target[r])) * scale
 * the gradient of sum_r loss[r] * scale, computed in the same pass so that a
 * caller never keeps logits and their gradient at once (dlogits may be logits
 * itself).  Rows whose target is ignore_index get loss 0 and dlogits 0.  A target
 * outside [0, V) that is not ignore_index gives that row's loss and dlogits NaN.
 *
 * logits:     (..., V), float32, float16 or bfloat16, seen as rows as for RMSNorm
 *             (last dim contiguous, leading dims flattening to one row stride); V >= 1
 *             unless there are no rows (a call with no rows does nothing).
 * target:     int64, contiguous, one element per row (any shape with that count),
 *             on logits' device.
 * grad_scale: optional (NULL: 1) float32 tensor of one element on logits' device,
 *             read by the kernel (e.g. 1 / the number of counted rows for a mean,
 *             computed on the device without a host synchronization).
 * loss:       float32, contiguous, one element per row; apart from every other tensor.
 * dlogits:    shape and dtype of logits (row rules above): the very same view as
 *             logits (in place) or apart from it and from the other tensors. */
L3K_API l3k_status l3k_cross_entropy_forward_backward(const DLTensor *logits, const DLTensor *target,
                                                      int64_t ignore_index, const DLTensor *grad_scale,
                                                      DLTensor *loss, DLTensor *dlogits, void *stream);

/* ---- Linear layer (the block's GEMMs; cuBLASLt on CUDA) ----------------- *
 * x:        (..., K), rows as for RMSNorm (last dim contiguous, leading dims
 *           flattening to one row stride).
 * weight:   (N, K), last dim contiguous, any row stride >= K (a row slice of
 *           a larger fused weight works).  dtype of x.
 * Arithmetic: float32 accumulation; the result is rounded once to its dtype.
 * workspace: optional scratch for cuBLASLt (l3k_linear_workspace_size bytes
 *           give it every algorithm; NULL, or a tensor of 0 bytes, restricts it
 *           to those needing none).  It must not overlap the call's tensors;
 *           one workspace must not serve two streams at the same time.
 * K = 0 (an empty sum) writes zeros (plus the residual, or leaves an
 *           accumulated output as it is).
 * cuBLASLt is not linked: the process's first CUDA GEMM (these calls or the
 *           block's) opens it: the copy already loaded, the loader's search,
 *           pip's nvidia-cublas next to the Python package, the build's toolkit.
 *           Where none has it, CUDA GEMMs fail with L3K_ERROR_CUBLAS and
 *           l3k_last_error() names every place tried.  CPU calls never need it.
 * The first CUDA call on a device creates that device's cuBLASLt handle:
 * make one call before capturing a CUDA graph.
 * Algorithm: the first CUDA call of a configuration (device, shapes, strides,
 *           dtypes, pointer alignments, workspace size, residual in place or
 *           not) times cuBLASLt's heuristic candidates (up to 8, six rounds)
 *           on the call's own operands and keeps the fastest for every later
 *           call; that first call waits for its stream.  Not tuned: calls on
 *           a stream being captured (the heuristic's first pick, not
 *           remembered), calls whose residual is y itself, and every call
 *           when the environment sets L3K_GEMM_AUTOTUNE=0 (first pick, as
 *           cuBLAS does).  Once tuned, a configuration runs the same algorithm
 *           for the rest of the process (bitwise repeatable results); another
 *           process may time a different pick.  The library keeps each
 *           configuration's cuBLASLt descriptors with its algorithm (a small,
 *           fixed amount of host memory per configuration, held until the
 *           process exits), so a later call costs one cublasLtMatmul. */

/* Bytes of workspace that serve every GEMM algorithm on x's device: 32 MiB on
 * CUDA, 0 on the CPU.  `x` is only inspected. */
L3K_API l3k_status l3k_linear_workspace_size(const DLTensor *x, size_t *bytes);

/* y = x @ weight^T (+ residual).  y: x's leading dims and N, dtype of x, must
 * not overlap x or weight.  residual: optional, shape and dtype of y, added
 * through the GEMM's beta = 1 before the single rounding; it may be y itself
 * (accumulate in place) or another buffer (out of place: keeps the residual). */
L3K_API l3k_status l3k_linear_forward(const DLTensor *x, const DLTensor *weight, const DLTensor *residual,
                                      DLTensor *y, DLTensor *workspace, void *stream);

/* dx = dy @ weight (accumulate != 0: dx += dy @ weight).  dy: (..., N) rows;
 * dx: dy's leading dims and K, dtype of dy, not overlapping dy or weight. */
L3K_API l3k_status l3k_linear_backward_input(const DLTensor *dy, const DLTensor *weight, DLTensor *dx,
                                             int accumulate, DLTensor *workspace, void *stream);

/* dweight = dy^T @ x summed over all rows (accumulate != 0: dweight += ...).
 * dy: (..., N), x: (..., K) with the same number of rows; dweight: (N, K),
 * dtype of x or float32 (full-precision gradient accumulation), not
 * overlapping dy or x. */
L3K_API l3k_status l3k_linear_backward_weight(const DLTensor *dy, const DLTensor *x, DLTensor *dweight,
                                              int accumulate, DLTensor *workspace, void *stream);

/* ---- Flash attention ----------------------------------------------------- *
 * o = softmax(scale * q k^T + mask) v, tiled with an online softmax: the
 * seq_q x seq_k matrix is never stored.
 * q: (batch, n_heads, seq_q, head_dim); k, v: (batch, n_kv_heads, seq_k,
 *    head_dim); n_heads a multiple of n_kv_heads (GQA; MQA when 1): query
 *    head h reads kv head h / (n_heads / n_kv_heads).
 * Layout: any strides with head_dim contiguous, so the (batch, seq, heads,
 *    head_dim) views of a fused QKV projection need no copy.  On CUDA each
 *    data pointer must be 16-byte aligned and each stride a multiple of 8.
 * head_dim: a multiple of 8 in [8, 256]; 64 and 128 are the fast paths.
 * dtype: float16 or bfloat16 on CUDA (float32 accumulation); the CPU
 *    reference also takes float32.  All of q, k, v, o, dout, dq, dk, dv share it.
 * scale: > 0, or 0 for 1/sqrt(head_dim).
 * causal: aligned bottom-right, as FlashAttention 2.1+: key j is visible to
 *    query i iff j <= i + seq_k - seq_q.
 * key_range: NULL (every key), or the keys each sequence may see, for padded
 *    batches (left or right padding) without a seq_q x seq_k mask: int32,
 *    contiguous, shape (batch, 2), on q's device, 4-byte aligned, not
 *    overlapping any output.  Row b = [start, end): keys start .. end - 1 of
 *    sequence b are visible, the others masked; with causal, key j is visible
 *    to query i iff start <= j < end and j <= i + seq_k - seq_q.  The values are
 *    read by the kernels (on the GPU the library cannot look at them without a
 *    sync, so they are never checked): they are clamped to
 *    0 <= start <= end <= seq_k, so no value makes a kernel read out of bounds.
 * A query that sees no key (causal with seq_q > seq_k, a query before its
 *    sequence's start under causal, an empty range) gets o = 0 and lse = +inf,
 *    and contributes nothing to the gradients (its dq is 0).  Whether a query
 *    sees a key is decided by the mask alone: a NaN that reaches a row's scores
 *    (from q or k) makes that row's o and lse NaN, one in v makes o NaN where
 *    it is weighted, and the backward's gradients carry NaN likewise, as in
 *    PyTorch; a NaN row is not taken for a masked one.  On CUDA, where the
 *    products run over whole tiles, a NaN or infinity can also meet a zero
 *    weight (0 * NaN in a tensor-core product) and reach what it does not on
 *    the CPU: one in v the outputs of the tile's other rows, one in q, k, v or
 *    dout the gradients of the tile's other rows and keys, as in PyTorch's own
 *    kernels; a row that sees no key keeps o = 0 and lse = +inf. */

/* o: shape of q, any strides as above (a (batch, seq, heads, head_dim)
 * buffer viewed as (batch, heads, seq, head_dim) lets the output projection
 * read it directly); its memory must not overlap q, k or v.  lse: float32, contiguous, 4-byte aligned,
 * batch * n_heads * seq_q elements, apart from q, k, v and o: the natural-log sum of exp of each
 * row's scores, for the backward. */
L3K_API l3k_status l3k_attention_forward(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                         const DLTensor *key_range, float scale, int causal, DLTensor *o,
                                         DLTensor *lse, void *stream);

/* Bytes of workspace l3k_attention_backward needs (0 on the CPU). */
L3K_API l3k_status l3k_attention_backward_workspace_size(const DLTensor *q, const DLTensor *k,
                                                         int deterministic, size_t *bytes);

/* dq, dk, dv from dout and the forward's q, k, v, o, lse (o and lse must be
 * the forward's own outputs).  dk and dv are summed over the query heads of
 * each kv group without atomics.  deterministic == 0 (the default) adds dq up
 * with float32 atomics (the last bits may differ between runs);
 * deterministic != 0 computes dq without atomics, bitwise reproducible, about
 * 10-15% slower.  dq: shape of q; dk, dv: shape of k; any strides as above;
 * they may be views of one buffer but must not overlap dout, q, k, v, o or lse.
 * key_range: as given to the forward (NULL or the same ranges).
 * workspace: at least l3k_attention_backward_workspace_size bytes, 256-byte
 * aligned (the same size with or without key_range). */
L3K_API l3k_status l3k_attention_backward(const DLTensor *dout, const DLTensor *q, const DLTensor *k,
                                          const DLTensor *v, const DLTensor *key_range, const DLTensor *o,
                                          const DLTensor *lse, float scale, int causal, int deterministic,
                                          DLTensor *dq, DLTensor *dk, DLTensor *dv, DLTensor *workspace,
                                          void *stream);

/* ---- KV cache: append, decode attention ----------------------------------- *
 * A layer's cache is two tensors, k_cache and v_cache, each (batch, n_kv_heads, capacity,
 * head_dim) (the layout of a transformers StaticCache), of one float dtype; head_dim contiguous,
 * the other strides any (on CUDA: 16-byte aligned data and strides that are multiples of 8
 * elements, as for attention).  head_dim: a multiple of 8 in [8, 256].  float32, float16 and
 * bfloat16 on both devices.
 *
 * cache_range: int32 (batch, 2), contiguous, on the cache's device.  Row b = [start, end): the
 *    slots that hold sequence b's tokens once the call's `seq` new tokens are in, the new ones last:
 *    new token i (0 <= i < seq) is at slot end - seq + i.  Slots before start (left padding) are
 *    never attended.  The values are read by the kernels (on the GPU the library cannot look at
 *    them without a sync, so they are never checked) and clamped first,
 *    0 <= start <= end <= capacity, so no value reads or writes outside the cache.  A decoding
 *    loop advances end by seq each step (in place, on the device: the calls can be captured in
 *    a CUDA graph once and replayed). */

/* Write `seq` new tokens of every sequence into the cache: k rotated by RoPE, v as it is, and q
 * (optional) rotated in the same launch.
 * k, v:      (batch, n_kv_heads, seq, head_dim), dtype of the cache; head_dim contiguous.
 * q, q_out:  optional (both NULL or both given): (batch, n_heads, seq, head_dim), n_heads a
 *            multiple of n_kv_heads.  q_out may be the same view as q (in place: then q, k and v
 *            may be interleaved views of one fused QKV projection), else apart from every tensor.
 * cos, sin:  RoPE tables as for l3k_rope_forward: (rows, head_dim/2) or (batch or 1, rows,
 *            head_dim/2), contiguous, float32 or the cache's dtype.
 * positions: optional int32 (batch,), contiguous, on the device: the table row of each sequence's
 *            first new token (new token i uses row positions[b] + i); NULL: row i (tables that
 *            hold this call's tokens, e.g. per-sequence tables of a Hugging Face model, then
 *            rows >= seq is required).  A row outside the table makes that token's rotated q
 *            and k NaN (visible, where reading past the table would not be).
 * mode:      L3K_ROPE_HALF or L3K_ROPE_INTERLEAVED.
 * k_cache, v_cache: written at the new tokens' slots only (a slot below 0, when end < seq, is
 *            skipped); apart from each other and from every input. */
L3K_API l3k_status l3k_kv_cache_append(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                       const DLTensor *cos, const DLTensor *sin, const DLTensor *positions,
                                       const DLTensor *cache_range, int mode, DLTensor *q_out,
                                       DLTensor *k_cache, DLTensor *v_cache, void *stream);

/* Bytes of workspace l3k_attention_decode needs (0 on the CPU; on CUDA 0 where the GPU is filled
 * without splitting the keys).  Only shapes are read. */
L3K_API l3k_status l3k_attention_decode_workspace_size(const DLTensor *q, const DLTensor *k_cache,
                                                       size_t *bytes);

/* Attention of each sequence's `seq` newest queries over its cache (decoding, chunked prefill,
 * speculative verification): query i of sequence b sits at slot p = end - seq + i and attends the
 * keys start <= j <= p (causal, after the left padding):
 *   o = softmax(scale * q k_cache^T) v_cache,  float32 arithmetic, one rounding.
 * q, o:      (batch, n_heads, seq, head_dim), n_heads a multiple of the cache's n_kv_heads (GQA:
 *            query head h reads kv head h / (n_heads / n_kv_heads)); o apart from every input.
 * scale:     > 0, or 0 for 1/sqrt(head_dim).
 * workspace: at least l3k_attention_decode_workspace_size bytes, 256-byte aligned; may be NULL
 *            when that is 0.
 * A query that sees no key (p < start) gets o = 0.  On CUDA the keys of a sequence are cut into
 * pieces (split-KV) whose results are merged, so the last bits may differ from the CPU's; the
 * result does not depend on the run (no atomics).  The environment variable L3K_DECODE_MMA=1
 * (read at each call) selects a tensor-core kernel for float16 / bfloat16 at head_dim 64 and 128,
 * experimental: not yet held to the parity tests on a GPU. */
L3K_API l3k_status l3k_attention_decode(const DLTensor *q, const DLTensor *k_cache, const DLTensor *v_cache,
                                        const DLTensor *cache_range, float scale, DLTensor *o,
                                        DLTensor *workspace, void *stream);

/* ---- The whole LLaMA-3 block --------------------------------------------- *
 *   h   = x + attention(rope(rmsnorm(x) * norm1_weight) Wqkv^T) Wo^T
 *   out = h + (silu(g) * u) Wd^T,  [g | u] = (rmsnorm(h) * norm2_weight) Wgu^T
 * composed once, in C, from the ops above: every step goes through the public
 * entry point, so it gets the same validation and dispatch as a direct call, and
 * a failing step reports its own message after the block op's name
 * ("llama_block_forward: rope_forward: ...").  RoPE is rotate-half; attention is
 * causal when cfg->causal; the residual adds ride on the GEMMs (beta = 1).
 *
 * Three calls share that composition: l3k_llama_block_forward (inference:
 * nothing is kept), l3k_llama_block_forward_train (the same forward, keeping the
 * activations the backward needs in caller buffers) and l3k_llama_block_backward
 * (every gradient in one call).  l3k_llama_block_training_layout tells the
 * caller what to allocate for the last two.
 *
 * Common arguments:
 *  x:        (batch, seq, dim), contiguous.  Weights in x's dtype, contiguous.
 *  cos, sin: RoPE tables as for l3k_rope_forward ((seq', head_dim/2) or
 *            (batch, seq', head_dim/2), seq' >= seq).
 *  out, dout, dx: shape and dtype of x, contiguous, each a separate buffer.
 *  workspace: at least the bytes the size query gives, on x's device, 1-D,
 *            contiguous, 256-byte aligned on CUDA, 16 on the CPU (cudaMalloc, torch and
 *            NumPy allocations are).
 *
 * Versioned structs: each begins with `struct_size`, which its L3K_..._INIT
 * macro sets to the size of the struct the caller was compiled against.  The
 * library reads only the fields that size covers, so fields appended in later
 * versions leave older callers working; a struct_size below the first
 * version's is refused (L3K_ERROR_VALUE). */
typedef struct {
    size_t struct_size;             /* sizeof(l3k_llama_block_weights): use L3K_LLAMA_BLOCK_WEIGHTS_INIT */
    const DLTensor *qkv_weight;     /* (dim + 2 * n_kv_heads * head_dim, dim): q, then k, then v rows;
                                       or NULL and q_weight, k_weight, v_weight below */
    const DLTensor *o_weight;       /* (dim, dim) */
    const DLTensor *gate_up_weight; /* (2 * hidden, dim): gate rows, then up rows; or NULL and
                                       gate_weight, up_weight below */
    const DLTensor *down_weight;    /* (dim, hidden) */
    const DLTensor *norm1_weight;   /* (dim,) */
    const DLTensor *norm2_weight;   /* (dim,) */
    /* The same projections as separate matrices (e.g. a Hugging Face model's own
     * parameters): q (dim, dim), k and v (n_kv_heads * head_dim, dim), gate and up
     * (hidden, dim).  Each part runs a GEMM of its own, wherever it lies in memory (parts
     * that happen to be adjacent are not joined, so results do not depend on placement). */
    const DLTensor *q_weight, *k_weight, *v_weight, *gate_weight, *up_weight;
} l3k_llama_block_weights;
#define L3K_LLAMA_BLOCK_WEIGHTS_INIT \
    { sizeof(l3k_llama_block_weights), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL }

typedef struct {
    size_t struct_size; /* sizeof(l3k_llama_block_config): use L3K_LLAMA_BLOCK_CONFIG_INIT */
    int64_t n_heads;    /* head_dim = dim / n_heads */
    int64_t n_kv_heads; /* divides n_heads */
    int causal;         /* 1 for a decoder (the default) */
    float eps;          /* of both RMSNorms, finite and >= 0 */
    int deterministic;  /* != 0: the attention backward's dq without atomics (bitwise repeatable) */
    /* Appended (a caller whose struct_size stops before this field gets no key range): per-call
     * padding of the attention, l3k_attention_forward's key_range (NULL: every key; else int32
     * (batch, 2) on x's device, [start, end) of each sequence's positions, clamped by the kernels).
     * The valid positions' outputs are those of each sequence alone; padded positions still get
     * outputs (from the keys they see), so a loss should ignore them (zero dout there) for the
     * weight gradients to be those of the sequences alone.  The forward and the backward of one
     * step must be given the same ranges. */
    const DLTensor *key_range;
} l3k_llama_block_config;
/* Defaults: causal, eps 1e-5, dq with atomics, no key range; n_heads and n_kv_heads must be set. */
#define L3K_LLAMA_BLOCK_CONFIG_INIT \
    { sizeof(l3k_llama_block_config), 0, 0, 1, 1e-5f, 0, NULL }

/* Bytes of workspace l3k_llama_block_forward needs for x's shape: every
 * intermediate plus the GEMM workspace.  `x` and the weights are only inspected. */
L3K_API l3k_status l3k_llama_block_forward_workspace_size(const DLTensor *x,
                                                          const l3k_llama_block_weights *weights,
                                                          const l3k_llama_block_config *cfg, size_t *bytes);

/* Inference forward: out = block(x), nothing kept for a backward. */
L3K_API l3k_status l3k_llama_block_forward(const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                                           const l3k_llama_block_weights *weights,
                                           const l3k_llama_block_config *cfg, DLTensor *out,
                                           DLTensor *workspace, void *stream);

/* The activations a training forward keeps for the backward, in caller-owned
 * buffers.  Each buffer is contiguous (any shape with the element count the
 * layout query gives), aligned as the workspace, on x's device, and shares no byte
 * with any other tensor of the call.  tokens = batch * seq. */
typedef struct {
    size_t struct_size; /* sizeof(l3k_llama_block_activations): use L3K_LLAMA_BLOCK_ACTIVATIONS_INIT */
    DLTensor *qkv;      /* (tokens, qkv rows), x's dtype: q and k rotated, then v */
    DLTensor *residual; /* (tokens, dim), x's dtype: x + the attention's output projection, the
                           residual stream between the two sublayers */
    DLTensor *gate_up;  /* (tokens, 2 * hidden), x's dtype: the gate/up projection */
    DLTensor *rstd1;    /* (tokens,) float32: 1 / rms of each row of x */
    DLTensor *rstd2;    /* (tokens,) float32: 1 / rms of each row of residual */
    DLTensor *attn_out; /* optional, (tokens, dim), x's dtype: the attention output; NULL: the
                           backward recomputes it (one attention forward) and saves the memory */
    DLTensor *lse;      /* (batch * n_heads * seq,) float32, given iff attn_out is */
} l3k_llama_block_activations;
#define L3K_LLAMA_BLOCK_ACTIVATIONS_INIT \
    { sizeof(l3k_llama_block_activations), NULL, NULL, NULL, NULL, NULL, NULL, NULL }

/* One buffer of the layout: rows * cols elements of `dtype`, row-major. */
typedef struct {
    int64_t rows, cols;
    DLDataType dtype;
} l3k_buffer_desc;

/* What a training step needs, for x's shape. */
typedef struct {
    size_t struct_size; /* sizeof(l3k_llama_block_layout): use L3K_LLAMA_BLOCK_LAYOUT_INIT */
    l3k_buffer_desc qkv, residual, gate_up, rstd1, rstd2, attn_out, lse; /* the activations, as above */
    size_t forward_workspace_bytes;                /* for l3k_llama_block_forward_train */
    size_t backward_workspace_bytes;               /* for l3k_llama_block_backward without flags */
    size_t backward_workspace_bytes_preserving;    /* ... with L3K_BLOCK_PRESERVE_ACTIVATIONS */
    size_t backward_workspace_extra_split_gate_up; /* to add to either when the gate and up gradients
                                                      are two separate buffers (not one after the other) */
} l3k_llama_block_layout;
#define L3K_LLAMA_BLOCK_LAYOUT_INIT \
    { sizeof(l3k_llama_block_layout) }

/* Fill `layout` for x's shape, the weights and cfg.  Only shapes and dtypes are
 * read.  The workspace sizes hold whether attn_out is kept or not. */
L3K_API l3k_status l3k_llama_block_training_layout(const DLTensor *x, const l3k_llama_block_weights *weights,
                                                   const l3k_llama_block_config *cfg,
                                                   l3k_llama_block_layout *layout);

/* Training forward: out = block(x) as l3k_llama_block_forward computes it
 * (bitwise the same), and the activations written into `saved`. */
L3K_API l3k_status l3k_llama_block_forward_train(const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                                                 const l3k_llama_block_weights *weights,
                                                 const l3k_llama_block_config *cfg, DLTensor *out,
                                                 const l3k_llama_block_activations *saved,
                                                 DLTensor *workspace, void *stream);

/* The weight gradients: each contiguous, the shape and dtype of its weight,
 * aligned as the workspace; overwritten (not accumulated).  Every gradient is
 * required, fused or in parts like the weights (the form of each projection's
 * gradient need not match its weight's): the backward also uses the buffers as
 * scratch before their values are written.  Gradient parts that lie one after the
 * other in one buffer are written as that buffer (one GEMM, and no extra workspace
 * for gate/up: see backward_workspace_extra_split_gate_up). */
typedef struct {
    size_t struct_size; /* sizeof(l3k_llama_block_grads): use L3K_LLAMA_BLOCK_GRADS_INIT */
    DLTensor *qkv_weight, *o_weight, *gate_up_weight, *down_weight, *norm1_weight, *norm2_weight;
    DLTensor *q_weight, *k_weight, *v_weight, *gate_weight, *up_weight;
} l3k_llama_block_grads;
#define L3K_LLAMA_BLOCK_GRADS_INIT \
    { sizeof(l3k_llama_block_grads), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL }

/* Backward flag: leave every activation as the forward wrote it (a second
 * backward over them works), at the cost of the larger workspace
 * (backward_workspace_bytes_preserving).  Without it the backward overwrites
 * saved->gate_up (its gradient and then scratch go there), so the activations
 * serve one backward. */
#define L3K_BLOCK_PRESERVE_ACTIVATIONS 1u

/* Gradients of the block: dx and every weight gradient from dout, given the
 * forward's x, tables, weights, cfg and the activations
 * l3k_llama_block_forward_train wrote.  The residual stream's gradient passes
 * through both residual adds; RMSNorm outputs and (unless kept) the attention
 * output are recomputed.  flags: 0 or L3K_BLOCK_PRESERVE_ACTIVATIONS. */
L3K_API l3k_status l3k_llama_block_backward(const DLTensor *dout, const DLTensor *x, const DLTensor *cos,
                                            const DLTensor *sin, const l3k_llama_block_weights *weights,
                                            const l3k_llama_block_config *cfg,
                                            const l3k_llama_block_activations *saved, unsigned flags,
                                            DLTensor *dx, const l3k_llama_block_grads *grads,
                                            DLTensor *workspace, void *stream);

/* ---- The block's decode step ---------------------------------------------- *
 * One call for the block over `seq` new tokens of each sequence with a KV cache (seq = 1 to
 * decode; a prompt, a chunk of one, or speculative tokens alike):
 *   [q | k | v] = rmsnorm(x) Wqkv^T;  k, v appended to the cache with RoPE (q rotated too);
 *   h = x + attention_decode(q, cache) Wo^T;  out = h + (silu(g) * u) Wd^T as in the forward.
 * The steps are l3k_kv_cache_append and l3k_attention_decode between the forward's others, each
 * through its public entry point.  Graph replay (l3k_set_graph_replay) applies: a decoding loop
 * that keeps its buffers and advances cache_range (and positions) in place on the device makes
 * every later step one graph launch.
 * x, out:   (batch, seq, dim), contiguous, as for l3k_llama_block_forward; cos, sin, weights and
 *           cfg too, except that cfg->causal must be 1 and cfg->key_range NULL (the cache's range
 *           gives the padding).
 * cache:    this layer's cache, cache_range and (optional) positions as l3k_kv_cache_append takes
 *           them; k and v (batch, n_kv_heads, capacity, head_dim) in x's dtype.
 * workspace: l3k_llama_block_decode_workspace_size bytes, aligned as for the forward. */
typedef struct {
    size_t struct_size;          /* sizeof(l3k_kv_cache): use L3K_KV_CACHE_INIT */
    DLTensor *k, *v;             /* (batch, n_kv_heads, capacity, head_dim): written at the new slots */
    const DLTensor *cache_range; /* int32 (batch, 2): [start, end) after this call's tokens */
    const DLTensor *positions;   /* optional int32 (batch,): RoPE row of each first new token */
} l3k_kv_cache;
#define L3K_KV_CACHE_INIT \
    { sizeof(l3k_kv_cache), NULL, NULL, NULL, NULL }

L3K_API l3k_status l3k_llama_block_decode_workspace_size(const DLTensor *x,
                                                         const l3k_llama_block_weights *weights,
                                                         const l3k_llama_block_config *cfg,
                                                         const l3k_kv_cache *cache, size_t *bytes);

L3K_API l3k_status l3k_llama_block_decode(const DLTensor *x, const DLTensor *cos, const DLTensor *sin,
                                          const l3k_llama_block_weights *weights,
                                          const l3k_llama_block_config *cfg, const l3k_kv_cache *cache,
                                          DLTensor *out, DLTensor *workspace, void *stream);

/* @@L3K_DECLARATIONS_END@@ (new ops are declared above this line) */

#ifdef __cplusplus
}
#endif
#endif /* L3K_H_ */
