/* cuBLASLt, opened at the first CUDA GEMM: the places it is looked for, in order, and the
 * message naming them all when it is in none, are in cublaslt_search.h.  Only the soname of the
 * build's major version is opened: the API table differs between majors. */
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <type_traits>

#include "cublaslt_load.h"
#include "cublaslt_search.h"
#include "linear.h"

#define L3K_STR2(x) #x
#define L3K_STR(x) L3K_STR2(x)
#define L3K_CUBLASLT_SONAME "libcublasLt.so." L3K_STR(CUBLAS_VER_MAJOR)
#if CUBLAS_VER_MAJOR >= 13
#define L3K_CUBLASLT_PIP "nvidia-cublas"
#else
#define L3K_CUBLASLT_PIP "nvidia-cublas-cu" L3K_STR(CUBLAS_VER_MAJOR)
#endif
#define L3K_CUBLASLT_HINT                                                         \
    "install cuBLAS " L3K_STR(CUBLAS_VER_MAJOR) " (pip install " L3K_CUBLASLT_PIP \
                                                ") or put the CUDA toolkit's lib64 on LD_LIBRARY_PATH"

namespace {

/* Written once, by the first l3k_cublaslt() (a thread-safe static initialization), read after. */
char g_error[L3K_SEARCH_ERROR];

void *open_cublaslt() {
    static char dirs[L3K_SEARCH_MAX_DIRS][L3K_SEARCH_PATH];
    Dl_info info;
    const char *self = dladdr((const void *)&l3k_cublaslt, &info) ? info.dli_fname : NULL;
#ifdef L3K_CUBLASLT_BUILD_DIR
    const char *build_dir = L3K_CUBLASLT_BUILD_DIR;
#else
    const char *build_dir = NULL;
#endif
    const int n = l3k_cublaslt_dirs(self, CUBLAS_VER_MAJOR, build_dir, dirs);
    const char *list[L3K_SEARCH_MAX_DIRS];
    for (int i = 0; i < n; ++i) list[i] = dirs[i];
    return l3k_library_search("cuBLASLt", L3K_CUBLASLT_SONAME, list, n, L3K_CUBLASLT_HINT, g_error,
                              sizeof g_error);
}

bool load(l3k_cublaslt_api &api) {
    void *h = open_cublaslt();
    if (!h) return false;
    size_t len = 0;
    auto sym = [&](auto &fn, const char *name) {
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
        if (fn) return;
        if (!len) {
            snprintf(g_error, sizeof g_error, "%s was opened but lacks", L3K_CUBLASLT_SONAME);
            len = strlen(g_error);
        }
        snprintf(g_error + len, sizeof g_error - len, " %s", name); /* cut at the buffer's end */
        len += strlen(g_error + len);
    };
    sym(api.Create, "cublasLtCreate");
    sym(api.Matmul, "cublasLtMatmul");
    sym(api.MatmulAlgoGetHeuristic, "cublasLtMatmulAlgoGetHeuristic");
    sym(api.MatmulDescCreate, "cublasLtMatmulDescCreate");
    sym(api.MatmulDescDestroy, "cublasLtMatmulDescDestroy");
    sym(api.MatmulDescSetAttribute, "cublasLtMatmulDescSetAttribute");
    sym(api.MatmulPreferenceCreate, "cublasLtMatmulPreferenceCreate");
    sym(api.MatmulPreferenceDestroy, "cublasLtMatmulPreferenceDestroy");
    sym(api.MatmulPreferenceSetAttribute, "cublasLtMatmulPreferenceSetAttribute");
    sym(api.MatrixLayoutCreate, "cublasLtMatrixLayoutCreate");
    sym(api.MatrixLayoutDestroy, "cublasLtMatrixLayoutDestroy");
    return len == 0;
}

} // namespace

const l3k_cublaslt_api *l3k_cublaslt(void) {
    static l3k_cublaslt_api api;
    static const bool ok = load(api);
    return ok ? &api : nullptr;
}

extern "C" const char *l3k_cublaslt_error(void) {
    l3k_cublaslt(); /* the search runs once, whoever asks first */
    return g_error;
}
