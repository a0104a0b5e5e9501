/* Where cuBLASLt is looked for, in order:
 *   1. already in the process under its soname (PyTorch loaded it): shared, not a second copy;
 *   2. the dynamic loader's own search (LD_LIBRARY_PATH, ld.so.cache, the system folders);
 *   3. the pip packages next to this library's package: site-packages/nvidia/cublas/lib
 *      (CUDA 12 wheels) and site-packages/nvidia/cu<major>/lib (CUDA 13 wheels);
 *   4. the toolkit this library was built against (a source build on its own machine).
 * Only the soname of the build's major version is opened: the API table differs between majors. */
#include <dlfcn.h>

#include <cstdio>
#include <string>
#include <type_traits>

#include "cublaslt_load.h"

#define L3K_STR2(x) #x
#define L3K_STR(x) L3K_STR2(x)
#define L3K_CUBLASLT_SONAME "libcublasLt.so." L3K_STR(CUBLAS_VER_MAJOR)

namespace {

std::string g_error;

std::string dir_of_this_library() {
    Dl_info info;
    if (!dladdr((const void *)&l3k_cublaslt, &info) || !info.dli_fname) return "";
    std::string path = info.dli_fname;
    const size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

void *open_cublaslt(std::string &tried) {
    void *h = dlopen(L3K_CUBLASLT_SONAME, RTLD_NOW | RTLD_NOLOAD);
    if (h) return h;
    h = dlopen(L3K_CUBLASLT_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (h) return h;
    tried = std::string(L3K_CUBLASLT_SONAME) + " (" + dlerror() + ")";
    const std::string pkg = dir_of_this_library();
    std::string dirs[3];
    if (!pkg.empty()) {
        dirs[0] = pkg + "/../nvidia/cublas/lib";
        dirs[1] = pkg + "/../nvidia/cu" L3K_STR(CUBLAS_VER_MAJOR) "/lib";
    }
#ifdef L3K_CUBLASLT_BUILD_DIR
    dirs[2] = L3K_CUBLASLT_BUILD_DIR;
#endif
    for (const std::string &dir : dirs) {
        if (dir.empty()) continue;
        const std::string path = dir + "/" L3K_CUBLASLT_SONAME;
        h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (h) return h;
        tried += ", " + path;
    }
    return nullptr;
}

bool load(l3k_cublaslt_api &api) {
    std::string tried;
    void *h = open_cublaslt(tried);
    if (!h) {
        g_error = "cuBLASLt (" L3K_CUBLASLT_SONAME ") not found; tried " + tried +
                  ". Install cuBLAS (pip: nvidia-cublas, or nvidia-cublas-cu12 for CUDA 12) or add its folder to LD_LIBRARY_PATH";
        return false;
    }
    bool ok = true;
    auto sym = [&](auto &fn, const char *name) {
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
        if (!fn) {
            ok = false;
            g_error += std::string(g_error.empty() ? "" : ", ") + name;
        }
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
    if (!ok) g_error = "the loaded " L3K_CUBLASLT_SONAME " lacks " + g_error;
    return ok;
}

}  // namespace

const l3k_cublaslt_api *l3k_cublaslt(void) {
    static l3k_cublaslt_api api;
    static const bool ok = [] {
        const bool loaded = load(api);
        /* The status a GEMM returns has no room for this text, and without it the
         * reason (a missing pip package, a path) is hard to find. */
        if (!loaded) std::fprintf(stderr, "llama3-kernels: %s\n", g_error.c_str());
        return loaded;
    }();
    return ok ? &api : nullptr;
}

const char *l3k_cublaslt_error(void) { return g_error.c_str(); }
