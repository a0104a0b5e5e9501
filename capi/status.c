/* Status text, the thread-local last error, version. */
#include <stdarg.h>
#include <stdio.h>

#include "validate.h"

static _Thread_local char last_error[1024];

l3k_status l3k_fail(const l3k_call *c, l3k_status status, const char *fmt, ...) {
    int n = snprintf(last_error, sizeof last_error, "%s: ", c ? c->op : "l3k");
    if (n < 0 || (size_t)n >= sizeof last_error) n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error + n, sizeof last_error - (size_t)n, fmt, ap);
    va_end(ap);
    return status;
}

const char *l3k_last_error(void) { return last_error; }

const char *l3k_status_string(l3k_status status) {
    switch (status) {
        case L3K_SUCCESS:
            return "success";
        case L3K_ERROR_NULL_POINTER:
            return "null pointer";
        case L3K_ERROR_DEVICE:
            return "unsupported or mismatched device";
        case L3K_ERROR_NO_CUDA:
            return "library built without CUDA";
        case L3K_ERROR_DTYPE:
            return "unsupported or mismatched dtype";
        case L3K_ERROR_SHAPE:
            return "wrong ndim or mismatched shape";
        case L3K_ERROR_LAYOUT:
            return "unsupported strides";
        case L3K_ERROR_ALIGNMENT:
            return "misaligned data pointer";
        case L3K_ERROR_VALUE:
            return "scalar argument out of range";
        case L3K_ERROR_WORKSPACE:
            return "workspace missing or too small";
        case L3K_ERROR_CUDA:
            return "CUDA runtime error";
        case L3K_ERROR_CUBLAS:
            return "cuBLAS error";
        case L3K_ERROR_INTERNAL:
            return "internal error";
    }
    return "unknown status";
}

int l3k_version(void) { return L3K_VERSION; }

int l3k_has_cuda(void) {
#ifdef L3K_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}
