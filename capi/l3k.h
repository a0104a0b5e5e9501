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
 *    correctly.
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
#define L3K_VERSION_MINOR 1
#define L3K_VERSION_PATCH 0
/* One integer that orders versions: major * 10000 + minor * 100 + patch. */
#define L3K_VERSION (L3K_VERSION_MAJOR * 10000 + L3K_VERSION_MINOR * 100 + L3K_VERSION_PATCH)

#if defined(_WIN32)
#  define L3K_API __declspec(dllexport)
#else
#  define L3K_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- DLPack ABI ---------------------------------------------------------- */
#ifndef DLPACK_DLPACK_H_
/* Same layout and values as dlpack.h.  Only what this ABI reads is declared. */
typedef enum { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3 } DLDeviceType;
typedef struct { DLDeviceType device_type; int32_t device_id; } DLDevice;
typedef enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 } DLDataTypeCode;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data;          /* base pointer; element 0 is at data + byte_offset */
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;      /* ndim sizes */
    int64_t *strides;    /* ndim strides in elements; NULL = compact row-major */
    uint64_t byte_offset;
} DLTensor;
#endif

/* ---- Status -------------------------------------------------------------- */
typedef enum {
    L3K_SUCCESS = 0,
    L3K_ERROR_NULL_POINTER = 1,      /* a required tensor, or its data/shape, is NULL */
    L3K_ERROR_DEVICE = 2,            /* unsupported device type, or tensors on different devices */
    L3K_ERROR_NO_CUDA = 3,           /* a CUDA tensor reached a library built without CUDA */
    L3K_ERROR_DTYPE = 4,             /* unsupported dtype, or dtypes that must match do not */
    L3K_ERROR_SHAPE = 5,             /* wrong ndim, or sizes that do not match */
    L3K_ERROR_LAYOUT = 6,            /* strides this op does not accept (e.g. last dim not contiguous) */
    L3K_ERROR_ALIGNMENT = 7,         /* a data pointer not aligned to its element size */
    L3K_ERROR_VALUE = 8,             /* a scalar argument out of range (e.g. eps < 0 or NaN) */
    L3K_ERROR_WORKSPACE = 9,         /* workspace missing or smaller than its size query says */
    L3K_ERROR_CUDA = 10,             /* the CUDA runtime reported an error (message has its text) */
    L3K_ERROR_CUBLAS = 11,           /* cuBLAS / cuBLASLt reported an error */
    L3K_ERROR_INTERNAL = 12          /* a bug in this library: please report it */
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

/* ---- RMSNorm ------------------------------------------------------------- *
 * y = x * rsqrt(mean(x^2, last dim) + eps) * weight
 *
 * x:      (..., n), ndim >= 1.  Last dim contiguous (stride 1); the leading
 *         dims must flatten to rows with one row stride (any contiguous tensor,
 *         or a slice of rows of one).
 * weight: (n,), contiguous, dtype of x.
 * y:      shape of x, dtype of x, same layout rules (its own row stride).
 *         May alias x exactly (in place).
 * rstd:   optional (NULL): float32, contiguous, x.shape[:-1] (or (rows,) ),
 *         receives 1 / sqrt(mean(x^2) + eps) per row for the backward.
 * eps:    finite, >= 0.
 * Vector loads are used where rows are 16-byte aligned; other layouts take a
 * scalar path, so any n from 1 up works. */
L3K_API l3k_status l3k_rmsnorm_forward(const DLTensor *x, const DLTensor *weight, float eps,
                                       DLTensor *y, DLTensor *rstd, void *stream);

/* Fused residual add + RMSNorm: h = x + residual; y = rmsnorm(h) * weight.
 * x, residual, h and y share shape, dtype and the layout rules of x above;
 * h is written (it carries the residual stream on), rstd as above.  h may
 * alias x or residual exactly. */
L3K_API l3k_status l3k_add_rmsnorm_forward(const DLTensor *x, const DLTensor *residual,
                                           const DLTensor *weight, float eps, DLTensor *h,
                                           DLTensor *y, DLTensor *rstd, void *stream);

/* Bytes of workspace l3k_rmsnorm_backward needs for x's shape (0 when dweight
 * is not asked for still needs no workspace).  `x` is only inspected. */
L3K_API l3k_status l3k_rmsnorm_backward_workspace_size(const DLTensor *x, size_t *bytes);

/* Gradients of RMSNorm (or of the fused add + RMSNorm).
 * dy:      gradient of y; shape, dtype, layout of x.
 * dh:      optional (NULL): for the fused op, the gradient that reaches h from
 *          its other consumers; it is added into dx.
 * x:       the normalized input (h for the fused op).
 * weight:  as in the forward.
 * rstd:    optional: the forward's rstd; NULL recomputes it from x.
 * dx:      output, shape/dtype of x; for the fused op it is the gradient of
 *          both x and residual.  May alias dy or dh exactly.
 * dweight: optional output (n,), dtype of weight; overwritten (not
 *          accumulated) with sum over rows of dy * x * rstd, accumulated in
 *          float32 in a fixed order (deterministic).
 * workspace: needed when dweight is given (see the size query); may be NULL
 *          otherwise. */
L3K_API l3k_status l3k_rmsnorm_backward(const DLTensor *dy, const DLTensor *dh, const DLTensor *x,
                                        const DLTensor *weight, const DLTensor *rstd, float eps,
                                        DLTensor *dx, DLTensor *dweight, DLTensor *workspace,
                                        void *stream);

/* @@L3K_DECLARATIONS_END@@ (new ops are declared above this line) */

#ifdef __cplusplus
}
#endif
#endif /* L3K_H_ */
