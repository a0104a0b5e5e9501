/* Where cuBLASLt is looked for, and the message that names every place when it is not found.
 *
 * Plain C, static functions only (C and C++ alike): cublaslt_load.cu includes it for the
 * library, and tests/c/test_cublaslt_search.c runs the same search with names that do not
 * exist, so the list of places and the message a user gets are tested on the CPU, without
 * a GPU, cuBLAS or a CUDA build.
 *
 * The order (l3k_library_search):
 *   1. already in the process under its soname (PyTorch loaded it): shared, not a second copy;
 *   2. the dynamic loader's own search (LD_LIBRARY_PATH, ld.so.cache, the system folders);
 *   3. the folders l3k_cublaslt_dirs lists: the pip packages next to this library's package,
 *      site-packages/nvidia/cublas/lib (CUDA 12 wheels) and site-packages/nvidia/cu<major>/lib
 *      (CUDA 13 wheels), then the toolkit the library was built against. */
#ifndef L3K_CUBLASLT_SEARCH_H_
#define L3K_CUBLASLT_SEARCH_H_

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#define L3K_SEARCH_MAX_DIRS 3
#define L3K_SEARCH_PATH 4096
/* The longest message: it reaches l3k_last_error() (1024 bytes) as "<op>: <message>", and
 * inside a block's own "<block op>: " prefix too.  A longer list of places is cut ("...")
 * before the hint, which is always kept. */
#define L3K_SEARCH_ERROR 768

/* The folders to try after the loader's search, in order, into dirs; returns how many.
 * lib_path: this library's file (site-packages/llama3_kernels/libl3k.so in a wheel), or NULL;
 * build_dir: the toolkit's library folder of the build, or NULL.  A folder whose path does not
 * fit L3K_SEARCH_PATH is left out. */
static int l3k_cublaslt_dirs(const char *lib_path, int major, const char *build_dir,
                             char dirs[L3K_SEARCH_MAX_DIRS][L3K_SEARCH_PATH]) {
    int n = 0;
    if (lib_path && *lib_path) {
        /* site-packages: the folder above the one holding the library.  An absolute package
         * folder loses its last name ("/a/site/pkg" -> "/a/site"); any other gets "/..". */
        char site[L3K_SEARCH_PATH];
        const char *slash = strrchr(lib_path, '/');
        const int pkg_len = slash ? (int)(slash - lib_path) : 1;
        const char *pkg = slash ? lib_path : ".";
        int cut = pkg_len; /* where the package folder's own name starts, after its '/' */
        while (cut > 0 && pkg[cut - 1] != '/') --cut;
        const int name_len = pkg_len - cut;
        const int dots = (name_len == 1 && pkg[cut] == '.') ||
                         (name_len == 2 && pkg[cut] == '.' && pkg[cut + 1] == '.');
        int w;
        if (pkg[0] == '/' && cut > 0 && name_len > 0 && !dots)
            w = snprintf(site, sizeof site, "%.*s", cut - 1, pkg); /* "" for "/pkg" */
        else w = snprintf(site, sizeof site, "%.*s/..", pkg_len, pkg);
        if (w >= 0 && w < (int)sizeof site) {
            w = snprintf(dirs[n], L3K_SEARCH_PATH, "%s/nvidia/cublas/lib", site);
            if (w > 0 && w < L3K_SEARCH_PATH) ++n;
            w = snprintf(dirs[n], L3K_SEARCH_PATH, "%s/nvidia/cu%d/lib", site, major);
            if (w > 0 && w < L3K_SEARCH_PATH) ++n;
        }
    }
    if (build_dir && *build_dir) {
        int w = snprintf(dirs[n], L3K_SEARCH_PATH, "%s", build_dir);
        if (w > 0 && w < L3K_SEARCH_PATH) ++n;
    }
    return n;
}

/* The list of places being written: out[0, len), never past `limit` bytes. */
typedef struct {
    char *out;
    size_t len, limit;
    int count, full;
} l3k_search_list;

/* Appends ", name" or ", name (reason)" (no comma before the first), unless that would leave
 * no room for a final ", ..." within the limit: then that "..." ends the list. */
static void l3k_search_add(l3k_search_list *l, const char *name, const char *reason) {
    if (l->full) return;
    const char *sep = l->count ? ", " : "";
    char entry[L3K_SEARCH_PATH + 256];
    if (reason && *reason) snprintf(entry, sizeof entry, "%s%s (%.160s)", sep, name, reason);
    else snprintf(entry, sizeof entry, "%s%s", sep, name);
    const size_t n = strlen(entry);
    if (l->len + n + 6 <= l->limit) { /* 6: a later ", ..." and the NUL */
        memcpy(l->out + l->len, entry, n + 1);
        l->len += n;
        ++l->count;
        return;
    }
    l->full = 1;
    const char *more = l->count ? ", ..." : "...";
    if (l->len + strlen(more) + 1 <= l->limit) {
        memcpy(l->out + l->len, more, strlen(more) + 1);
        l->len += strlen(more);
    }
}

/* Why dlopen(name) failed, when it is worth showing: "" when the file simply is not there (the
 * list of places says that), else dlerror()'s text without its leading "<name>: " (a file of the
 * wrong class, a missing dependency or symbol version). */
static const char *l3k_search_reason(const char *name, const char *err) {
    static const char missing[] = ": cannot open shared object file: No such file or directory";
    const size_t n = strlen(name);
    if (!err) return "";
    if (strncmp(err, name, n) != 0 || strncmp(err + n, ": ", 2) != 0) return err;
    if (strcmp(err + n, missing) == 0) return "";
    return err + n + 2;
}

/* Opens `soname`: already loaded, the loader's search, then dir/soname for each of the ndirs
 * folders; returns its handle.  On failure returns NULL and writes into err (cap bytes, of which
 * at most L3K_SEARCH_ERROR are used; cap >= 1)
 *     "<what> not found; tried: <soname> (dlopen search), <dir>/<soname>, ...; <hint>",
 * each place with dlerror()'s reason where it is more than a missing file.  On success err is "". */
static void *l3k_library_search(const char *what, const char *soname, const char *const *dirs, int ndirs,
                                const char *hint, char *err, size_t cap) {
    err[0] = '\0';
    void *h = dlopen(soname, RTLD_NOW | RTLD_NOLOAD);
    if (!h) h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (h) return h;
    if (cap > L3K_SEARCH_ERROR) cap = L3K_SEARCH_ERROR;
    const size_t tail = strlen("; ") + strlen(hint) + 1; /* the hint is always kept */
    l3k_search_list l = {err, 0, cap > tail ? cap - tail : 1, 0, 0};
    snprintf(err, l.limit, "%s not found; tried: ", what);
    l.len = strlen(err);
    char reason[256];
    const char *why = l3k_search_reason(soname, dlerror());
    snprintf(reason, sizeof reason, "dlopen search%s%s", *why ? ": " : "", why);
    l3k_search_add(&l, soname, reason);
    for (int i = 0; i < ndirs; ++i) {
        char path[L3K_SEARCH_PATH];
        const int w = snprintf(path, sizeof path, "%s/%s", dirs[i], soname);
        if (w <= 0 || w >= (int)sizeof path) continue;
        h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (h) {
            err[0] = '\0';
            return h;
        }
        l3k_search_add(&l, path, l3k_search_reason(path, dlerror()));
    }
    snprintf(err + l.len, cap - l.len, "; %s", hint);
    return NULL;
}

#endif /* L3K_CUBLASLT_SEARCH_H_ */
