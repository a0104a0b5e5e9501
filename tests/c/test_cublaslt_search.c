/* The search for cuBLASLt that a CUDA build runs at its first GEMM (kernels/cuda/cublaslt_search.h),
 * run here on the CPU with names that do not exist: the folders it tries, their order, and a
 * message that names every place tried (with why, where a file was there but would not load)
 * and ends with what to install, within the bound that keeps it whole in l3k_last_error(). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

#include "check.h"
#include "cuda/cublaslt_search.h"

static const char HINT[] =
    "install cuBLAS 13 (pip install nvidia-cublas) or put the CUDA toolkit's lib64 on LD_LIBRARY_PATH";

static int ends_with(const char *s, const char *tail) {
    const size_t n = strlen(s), m = strlen(tail);
    return n >= m && strcmp(s + n - m, tail) == 0;
}

static void test_dirs(void) {
    static char d[L3K_SEARCH_MAX_DIRS][L3K_SEARCH_PATH];
    int n = l3k_cublaslt_dirs("/venv/lib/python3.12/site-packages/llama3_kernels/libl3k.so", 13,
                              "/usr/local/cuda/targets/x86_64-linux/lib", d);
    CHECK(n == 3, "wheel layout: %d folders", n);
    if (n == 3) {
        CHECK(strcmp(d[0], "/venv/lib/python3.12/site-packages/nvidia/cublas/lib") == 0, "[0] %s", d[0]);
        CHECK(strcmp(d[1], "/venv/lib/python3.12/site-packages/nvidia/cu13/lib") == 0, "[1] %s", d[1]);
        CHECK(strcmp(d[2], "/usr/local/cuda/targets/x86_64-linux/lib") == 0, "[2] %s", d[2]);
    }
    n = l3k_cublaslt_dirs("/site/pkg/libl3k.so", 12, NULL, d);
    CHECK(
        n == 2 && strcmp(d[0], "/site/nvidia/cublas/lib") == 0 && strcmp(d[1], "/site/nvidia/cu12/lib") == 0,
        "no build folder: %d, %s, %s", n, d[0], d[1]);
    n = l3k_cublaslt_dirs("/pkg/libl3k.so", 13, "", d); /* site-packages is "/" */
    CHECK(n == 2 && strcmp(d[0], "/nvidia/cublas/lib") == 0, "at the root: %d, %s", n, d[0]);
    /* Relative, or ending in a dot: "/.." appended instead of a name taken off. */
    n = l3k_cublaslt_dirs("pkg/libl3k.so", 13, NULL, d);
    CHECK(n == 2 && strcmp(d[0], "pkg/../nvidia/cublas/lib") == 0, "relative: %d, %s", n, d[0]);
    n = l3k_cublaslt_dirs("./libl3k.so", 13, NULL, d);
    CHECK(n == 2 && strcmp(d[1], "./../nvidia/cu13/lib") == 0, "./: %d, %s", n, d[1]);
    n = l3k_cublaslt_dirs("libl3k.so", 13, NULL, d);
    CHECK(n == 2 && strcmp(d[0], "./../nvidia/cublas/lib") == 0, "no folder: %d, %s", n, d[0]);
    n = l3k_cublaslt_dirs("/a/site/pkg/../libl3k.so", 13, NULL, d);
    CHECK(n == 2 && strcmp(d[0], "/a/site/pkg/../../nvidia/cublas/lib") == 0, "/..: %d, %s", n, d[0]);
    n = l3k_cublaslt_dirs(NULL, 13, "/toolkit/lib64", d); /* dladdr found no file name */
    CHECK(n == 1 && strcmp(d[0], "/toolkit/lib64") == 0, "no library path: %d, %s", n, d[0]);
}

/* None found: every place named, in order, then the hint. */
static void test_not_found(void) {
    char tmp[] = "/tmp/l3k-search-XXXXXX";
    CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
    /* A file under the name that is not a shared library: listed with dlerror()'s reason. */
    char junk[L3K_SEARCH_PATH];
    snprintf(junk, sizeof junk, "%s/libl3k-absent.so.13", tmp);
    FILE *f = fopen(junk, "w");
    CHECK(f != NULL, "fopen %s", junk);
    if (f) {
        fputs("not an ELF file\n", f);
        fclose(f);
    }
    const char *dirs[3] = {"/nonexistent/site-packages/nvidia/cublas/lib",
                           "/nonexistent/site-packages/nvidia/cu13/lib", tmp};
    char err[1024];
    void *h = l3k_library_search("cuBLASLt", "libl3k-absent.so.13", dirs, 3, HINT, err, sizeof err);
    CHECK(h == NULL, "found a library that does not exist");
    char want[2 * L3K_SEARCH_PATH];
    snprintf(want, sizeof want,
             "cuBLASLt not found; tried: libl3k-absent.so.13 (dlopen search), "
             "/nonexistent/site-packages/nvidia/cublas/lib/libl3k-absent.so.13, "
             "/nonexistent/site-packages/nvidia/cu13/lib/libl3k-absent.so.13, %s (",
             junk);
    CHECK(strncmp(err, want, strlen(want)) == 0, "message:\n  %s\nexpected it to start with:\n  %s", err,
          want);
    CHECK(ends_with(err,
                    "); install cuBLAS 13 (pip install nvidia-cublas) or put the CUDA toolkit's lib64 on "
                    "LD_LIBRARY_PATH"),
          "message does not end with the junk file's reason and the hint: %s", err);
    CHECK(strlen(err) < L3K_SEARCH_ERROR, "message of %zu bytes", strlen(err));
    unlink(junk);
    rmdir(tmp);
}

/* Folders too long for the bound: the list is cut with "...", the hint stays whole. */
static void test_long_paths(void) {
    static char longdir[3][300]; /* one fits the bound, two would leave no room for the hint */
    const char *dirs[3];
    for (int i = 0; i < 3; ++i) {
        memset(longdir[i], 'a' + i, sizeof longdir[i] - 1);
        for (size_t j = 0; j < sizeof longdir[i] - 1; j += 40) longdir[i][j] = '/'; /* names < NAME_MAX */
        longdir[i][sizeof longdir[i] - 1] = '\0';
        dirs[i] = longdir[i];
    }
    char err[1024];
    void *h = l3k_library_search("cuBLASLt", "libl3k-absent.so.13", dirs, 3, HINT, err, sizeof err);
    CHECK(h == NULL, "found a library that does not exist");
    CHECK(strlen(err) < L3K_SEARCH_ERROR, "message of %zu bytes", strlen(err));
    CHECK(strncmp(err, "cuBLASLt not found; tried: libl3k-absent.so.13 (dlopen search), /aaaa", 68) == 0,
          "%s", err);
    CHECK(strstr(err, "/libl3k-absent.so.13, ...; install cuBLAS 13") != NULL, "no cut before the hint: %s",
          err);
    CHECK(strstr(err, "/bbbb") == NULL, "the second folder fits no more: %s", err);
    CHECK(ends_with(err, HINT), "hint cut: %s", err);
    /* A buffer smaller than the bound: the same, within it. */
    char small[300];
    h = l3k_library_search("cuBLASLt", "libl3k-absent.so.13", dirs, 3, HINT, small, sizeof small);
    CHECK(h == NULL && strlen(small) < sizeof small && ends_with(small, HINT), "small buffer: %s", small);
    CHECK(strstr(small, "(dlopen search), ...; install") != NULL, "small buffer: %s", small);
}

/* Found in the second folder: the handle is that library, the first folder was tried first. */
static void test_found_in_order(void) {
    void *libm = dlopen("libm.so.6", RTLD_NOW);
    CHECK(libm != NULL, "libm.so.6: %s", dlerror());
    if (!libm) return;
    Dl_info info;
    void *cos_fn = dlsym(libm, "cos");
    CHECK(cos_fn && dladdr(cos_fn, &info) && info.dli_fname, "no path for libm");
    char tmp[] = "/tmp/l3k-search-XXXXXX";
    CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
    char link[L3K_SEARCH_PATH];
    snprintf(link, sizeof link, "%s/libl3k-present.so.13", tmp);
    CHECK(symlink(info.dli_fname, link) == 0, "symlink %s -> %s", link, info.dli_fname);
    const char *dirs[2] = {"/nonexistent", tmp};
    char err[1024] = "stale";
    void *h = l3k_library_search("cuBLASLt", "libl3k-present.so.13", dirs, 2, HINT, err, sizeof err);
    CHECK(h != NULL, "not found in %s: %s", tmp, err);
    CHECK(err[0] == '\0', "message on success: %s", err);
    if (h) {
        CHECK(dlsym(h, "cos") == cos_fn, "opened another library than %s", info.dli_fname);
        dlclose(h);
    }
    /* Already in the process under its soname: no folder needed. */
    h = l3k_library_search("libm", "libm.so.6", NULL, 0, HINT, err, sizeof err);
    CHECK(h == libm, "libm.so.6 already loaded, got another handle: %s", err);
    if (h) dlclose(h);
    dlclose(libm);
    unlink(link);
    rmdir(tmp);
}

int main(int argc, char **argv) {
    static const named_test tests[] = {NAMED_TEST(dirs), NAMED_TEST(not_found), NAMED_TEST(long_paths),
                                       NAMED_TEST(found_in_order)};
    return RUN_NAMED_TESTS(argc, argv, tests);
}
