/* fuzz/fuzz_abi.c: a libFuzzer target over the public C ABI (capi/l3k.h) on the
 * CPU path.
 *
 * One command builds it (clang's libFuzzer with ASan and UBSan, the library
 * built by CMake with the same sanitizers) and runs it:
 *
 *     bash fuzz/run.sh                     # 60 s, seeds from fuzz/corpus
 *     bash fuzz/run.sh -max_total_time=600 # any libFuzzer flag is passed on
 *     bash fuzz/run.sh build/fuzz/crash-…  # replay one input
 *
 * The input picks an entry point, its sizes, its scalars, and for each tensor
 * a layout (compact, padded rows, permuted, negative or zero strides) or a
 * defect (wrong dtype, device, ndim or shape, misaligned, NULL data or tensor,
 * an alias of an earlier tensor's memory, a zero-size dim, or a hostile size,
 * stride or byte_offset).  Every tensor is backed by a malloc of exactly the
 * bytes its shape, strides and byte_offset reach, so ASan reports any access
 * outside what it describes; an alias lies wholly inside the tensor it aliases.
 * The training entries may also give the qkv and gate/up projections (weights
 * or gradients) in parts carved out of one buffer of exactly their bytes, one
 * after the other (joined into one GEMM by the library) or apart.  The KV-cache append may
 * take q, k and v as the heads of one fused projection (q rotated in place), as the block's decode
 * step gives them; cache ranges and positions hold small integers, now and then extreme ones.
 *
 * Checked on every call:
 *  - the status is a valid l3k_status;
 *  - a failing call's l3k_last_error() starts with "<op>: ";
 *  - a failing call leaves every byte of every buffer as it was;
 *  - a descriptor whose element count or byte range passes 2^63 - 1, or whose
 *    address range leaves [0, 2^63), is refused (computed here in 128 bits).
 * A descriptor that is valid but too large to back (a huge count repeated
 * through stride 0, say) makes the call be skipped, not made.
 * L3K_FUZZ_ONLY=rope,linear_forward (name prefixes) restricts the entries.
 *
 * Adding an entry point: write `static int e_<name>(call *c)` that builds its
 * arguments with arg() (and the dims/scalar helpers) and returns
 * CALL(c, l3k_<name>(...)), then add one row {"<name>", e_<name>} to ENTRIES.
 * The block entry points share block_setup() (x, tables, weights, config) and
 * bytes_arg() (a workspace of a queried size), so the training layout, the
 * training forward and the backward each take a few lines: query the layout,
 * make each activation with arg() from its l3k_buffer_desc, call. */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "l3k.h"

enum { MAX_TENSORS = 48, MAX_NDIM = 6 };
#define WORK_CAP ((int64_t)1 << 15)  /* elements a tensor may reach and still be run */
#define BYTES_CAP ((int64_t)1 << 20) /* bytes a tensor may span and still be backed */
#define SKIPPED (-1)

typedef __int128 i128;

typedef struct {
    DLTensor t;
    int64_t shape[MAX_NDIM], strides[MAX_NDIM];
    unsigned char *block; /* the malloc this tensor owns (NULL: none, or it aliases another) */
    size_t block_bytes;
    unsigned char *snap;
} ften;

typedef struct {
    const uint8_t *p;
    size_t n;
    uint64_t rng;
    ften t[MAX_TENSORS];
    int nt;
    int must_fail;   /* a descriptor the library must refuse was passed */
    const char *why; /* ... which one */
    int skip;        /* a valid descriptor too large to back: do not call */
} call;

/* ---- input ------------------------------------------------------------------- */

static unsigned u8(call *c) {
    if (!c->n) return 0;
    c->n--;
    return *c->p++;
}
static unsigned pick(call *c, unsigned n) { return n ? u8(c) % n : 0; }
static int64_t dim(call *c, int64_t lo, int64_t hi) { return lo + (int64_t)pick(c, (unsigned)(hi - lo + 1)); }

static uint64_t rnd(call *c) { /* splitmix64: buffer contents, not steered by the input */
    uint64_t z = (c->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static const DLDataType F32 = {kDLFloat, 32, 1}, F16 = {kDLFloat, 16, 1}, BF16 = {kDLBfloat, 16, 1},
                        U8 = {kDLUInt, 8, 1}, I32 = {kDLInt, 32, 1};

static DLDataType fdt(call *c) {
    switch (pick(c, 3)) {
        case 0:
            return F32;
        case 1:
            return BF16;
        default:
            return F16;
    }
}

/* One of `n` choices: the i-th special value for i < n_special, else `otherwise`. */
static float pick_value(call *c, int n, const float *special, int n_special, float otherwise) {
    const int i = pick(c, n);
    return i < n_special ? special[i] : otherwise;
}

static float eps(call *c) {
    static const float special[] = {-1.0f, NAN, INFINITY, 0.0f};
    return pick_value(c, 16, special, 4, 1e-5f);
}

static float scale(call *c) {
    static const float special[] = {-0.5f, NAN, 0.25f};
    return pick_value(c, 16, special, 3, 0.0f);
}

static void *stream(call *c) { return pick(c, 8) == 0 ? (void *)(uintptr_t)0x1000 : NULL; }

static int64_t hostile_value(call *c) {
    static const int64_t v[] = {INT64_MAX,
                                INT64_MAX - 1,
                                INT64_MAX / 2 + 1,
                                (int64_t)1 << 62,
                                (int64_t)1 << 61,
                                (int64_t)1 << 32,
                                (int64_t)1 << 31,
                                -((int64_t)1 << 62),
                                INT64_MIN + 1,
                                INT64_MIN,
                                -1};
    return v[pick(c, sizeof v / sizeof v[0])];
}

/* ---- tensors ----------------------------------------------------------------- */

static size_t elem_bytes(DLDataType d) { return ((size_t)d.bits * d.lanes + 7) / 8; }

static void compact_strides(const int64_t *shape, int ndim, int64_t *st) {
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; --i) {
        st[i] = s;
        s *= shape[i] > 0 ? shape[i] : 1;
    }
}

static int64_t stride_of(const DLTensor *t, int i) {
    if (t->strides) return t->strides[i];
    i128 s = 1;
    for (int j = i + 1; j < t->ndim; ++j) s *= t->shape[j] > 0 ? t->shape[j] : 1;
    return s > INT64_MAX ? INT64_MAX : (int64_t)s;
}

/* Element count (saturated past 2^64) and lowest / one-past-highest byte
 * offsets from data + byte_offset, all in 128 bits. */
static i128 count_of(const DLTensor *t) {
    for (int i = 0; i < t->ndim; ++i)
        if (t->shape[i] == 0) return 0;
    i128 n = 1;
    for (int i = 0; i < t->ndim; ++i) {
        n *= t->shape[i] < 0 ? 1 : t->shape[i];
        if (n > ((i128)1 << 64)) n = (i128)1 << 64;
    }
    return n;
}

static void byte_span(const DLTensor *t, i128 *lo, i128 *hi) {
    i128 l = 0, h = 0;
    for (int i = 0; i < t->ndim; ++i) {
        if (t->shape[i] <= 1) continue;
        const i128 span = (i128)(t->shape[i] - 1) * stride_of(t, i);
        if (span < 0) l += span;
        else h += span;
    }
    const i128 es = (i128)elem_bytes(t->dtype);
    *lo = l * es;
    *hi = (h + 1) * es;
}

/* Random contents in the range the dtype holds, with a rare NaN or infinity. */
static void fill(call *c, unsigned char *p, size_t bytes, DLDataType d) {
    const size_t es = elem_bytes(d);
    size_t i = 0;
    for (; es == 4 && i + 4 <= bytes; i += 4) {
        const uint64_t r = rnd(c);
        float v = (float)((int)(r % 4001) - 2000) / 1000.0f;
        if (r % 97 == 0) v = (r & 1) ? NAN : INFINITY;
        memcpy(p + i, &v, 4);
    }
    for (; es == 2 && i + 2 <= bytes; i += 2) {
        const uint64_t r = rnd(c);
        /* sign, exponent near the bias, random mantissa: +-[2^-5, 2^3) in either format */
        uint16_t h = d.code == kDLBfloat
                         ? (uint16_t)((r & 0x8000) | ((122 + (r >> 16) % 8) << 7) | ((r >> 24) & 0x7f))
                         : (uint16_t)((r & 0x8000) | ((10 + (r >> 16) % 8) << 10) | ((r >> 24) & 0x3ff));
        if (r % 97 == 0) h = d.code == kDLBfloat ? 0x7fc0 : 0x7e00;
        memcpy(p + i, &h, 2);
    }
    for (; i < bytes; ++i) p[i] = (unsigned char)rnd(c);
}

static unsigned char *new_block(size_t bytes) {
    void *p = NULL;
    /* 256-aligned: the block entry points ask for it; misalignment is a mutation. */
    if (posix_memalign(&p, 256, bytes ? bytes : 1)) abort();
    return p;
}

/* The earlier tensor whose memory an alias uses, or -1. */
static int alias_target(call *c) {
    int cand[MAX_TENSORS], n = 0;
    for (int i = 0; i < c->nt - 1; ++i)
        if (c->t[i].block && c->t[i].block_bytes) cand[n++] = i;
    return n ? cand[pick(c, (unsigned)n)] : -1;
}

/* A float (or any) tensor of `dtype` and `shape`, laid out and possibly broken
 * as the input says; NULL when the input asks for a NULL tensor. */
static DLTensor *arg(call *c, DLDataType dtype, int ndim, const int64_t *shape) {
    if (c->nt == MAX_TENSORS) return NULL;
    ften *f = &c->t[c->nt++];
    memset(f, 0, sizeof *f);
    DLTensor *t = &f->t;
    for (int i = 0; i < ndim; ++i) f->shape[i] = shape[i];
    t->ndim = ndim;
    t->shape = f->shape;
    t->dtype = dtype;
    t->device.device_type = kDLCPU;
    const unsigned m = u8(c) % 32;
    int hostile = 0, alias = 0, misalign = 0, null_data = 0;
    switch (m) {
        case 14: /* explicit compact strides */
            compact_strides(f->shape, ndim, f->strides);
            t->strides = f->strides;
            break;
        case 15: /* rows padded: a slice of a wider buffer */
            if (ndim >= 2) {
                int64_t pad = dim(c, 1, 8), s = 1;
                for (int i = ndim - 1; i >= 0; --i) {
                    f->strides[i] = s;
                    s *= (f->shape[i] > 0 ? f->shape[i] : 1) + (i == ndim - 1 ? pad : 0);
                }
                t->strides = f->strides;
            }
            break;
        case 16: /* two leading dims swapped: e.g. (b, s, h, d) memory seen as (b, h, s, d) */
            if (ndim >= 3) {
                int64_t sh[MAX_NDIM], st[MAX_NDIM];
                memcpy(sh, f->shape, sizeof sh);
                const int a = ndim - 3, b = ndim - 2;
                sh[a] = f->shape[b];
                sh[b] = f->shape[a];
                compact_strides(sh, ndim, st);
                memcpy(f->strides, st, sizeof st);
                f->strides[a] = st[b];
                f->strides[b] = st[a];
                t->strides = f->strides;
            }
            break;
        case 17: /* a leading dim walked backwards */
        case 18: /* a leading dim repeated (stride 0) */
            compact_strides(f->shape, ndim, f->strides);
            if (ndim >= 2) {
                const int d = (int)pick(c, (unsigned)(ndim - 1));
                f->strides[d] = m == 17 ? -f->strides[d] : 0;
            }
            t->strides = f->strides;
            break;
        case 19: /* any small strides */
            for (int i = 0; i < ndim; ++i) f->strides[i] = dim(c, -4, 12);
            t->strides = f->strides;
            break;
        case 20:
            t->dtype.code = (uint8_t)pick(c, 6);
            t->dtype.bits = (uint8_t)(8 * dim(c, 0, 8));
            t->dtype.lanes = (uint16_t)dim(c, 0, 2);
            break;
        case 21: {
            static const int types[4] = {kDLCUDA, kDLCUDAHost, 7, 0};
            t->device.device_type = (DLDeviceType)types[pick(c, 4)];
            t->device.device_id = (int32_t)pick(c, 3);
            break;
        }
        case 22:
            if (ndim < MAX_NDIM && pick(c, 2)) f->shape[t->ndim++] = dim(c, 1, 3);
            else if (ndim > 0) t->ndim--;
            break;
        case 23:
            if (ndim > 0) f->shape[pick(c, (unsigned)ndim)] = dim(c, 0, 9);
            break;
        case 24:
            misalign = (int)dim(c, 1, 3);
            break;
        case 25:
            null_data = 1;
            break;
        case 26:
            c->nt--;
            return NULL;
        case 27:
            hostile = 1;
            break;
        case 28:
        case 29:
            alias = 1;
            break;
        case 30:
            if (ndim > 0) f->shape[pick(c, (unsigned)ndim)] = 0;
            break;
        default:
            break;
    }
    const size_t es = elem_bytes(t->dtype);
    i128 lo, hi;
    byte_span(t, &lo, &hi);
    const i128 numel = count_of(t);
    const i128 extent = numel ? hi - lo : 0;
    if (extent > BYTES_CAP || numel > WORK_CAP) { /* only from a huge legitimate layout */
        c->skip = 1;
        return t;
    }
    int target = alias ? alias_target(c) : -1;
    if (target >= 0 && extent <= (i128)c->t[target].block_bytes) {
        const ften *o = &c->t[target];
        const int same = o->t.ndim == t->ndim &&
                         !memcmp(o->t.shape, t->shape, sizeof(int64_t) * (size_t)t->ndim) &&
                         elem_bytes(o->t.dtype) == es;
        if (same && m == 28) { /* the very same view: in place */
            t->data = o->t.data;
            t->byte_offset = o->t.byte_offset;
            if (o->t.strides) {
                memcpy(f->strides, o->t.strides, sizeof(int64_t) * (size_t)t->ndim);
                t->strides = f->strides;
            } else {
                t->strides = NULL;
            }
        } else { /* somewhere inside it, element-aligned */
            const int64_t room = (int64_t)(c->t[target].block_bytes - (size_t)extent);
            const int64_t delta =
                es ? (int64_t)pick(c, 64) * (int64_t)es % (room + 1) / (int64_t)es * (int64_t)es : 0;
            t->data = (void *)((uintptr_t)o->block + (uintptr_t)delta - (uintptr_t)(int64_t)lo);
        }
    } else if (numel == 0) {
        t->data = pick(c, 2) ? NULL : (void *)(f->block = new_block(0));
        if (t->data && pick(c, 4) == 0) t->byte_offset = (uint64_t)dim(c, 0, 64);
    } else {
        f->block_bytes = (size_t)extent + (size_t)misalign;
        f->block = new_block(f->block_bytes);
        fill(c, f->block, f->block_bytes, t->dtype);
        if (pick(c, 4) == 0) t->byte_offset = (uint64_t)(es * (size_t)dim(c, 0, 8));
        /* data + byte_offset + lo is the block's first byte (after the misalignment) */
        t->data = (void *)((uintptr_t)f->block + (uintptr_t)misalign - (uintptr_t)(int64_t)lo -
                           (uintptr_t)t->byte_offset);
    }
    if (null_data) t->data = NULL;
    if (hostile) {
        const unsigned k = pick(c, 3);
        if (k == 0 && t->ndim > 0) {
            f->shape[pick(c, (unsigned)t->ndim)] = hostile_value(c);
        } else if (k == 1 && t->ndim > 0) {
            if (!t->strides) {
                compact_strides(f->shape, t->ndim, f->strides);
                t->strides = f->strides;
            }
            f->strides[pick(c, (unsigned)t->ndim)] = hostile_value(c);
        } else {
            t->byte_offset = (uint64_t)hostile_value(c) + (uint64_t)dim(c, 0, 8);
        }
    }
    /* What the library must make of the final descriptor. */
    for (int i = 0; i < t->ndim; ++i)
        if (t->shape[i] < 0) return t; /* refused as a negative size; nothing to predict */
    const i128 n2 = count_of(t);
    const i128 base = (i128)(uintptr_t)t->data + (i128)t->byte_offset;
    const char *why = NULL;
    i128 lo2 = 0, hi2 = 0;
    if (n2 > INT64_MAX) why = "element count past 2^63 - 1";
    else if (t->data && base > INT64_MAX) why = "data + byte_offset past 2^63 - 1";
    else if (n2 > 0 && t->data && es) {
        byte_span(t, &lo2, &hi2);
        if (base + lo2 < 0 || base + hi2 > INT64_MAX) why = "byte range outside [0, 2^63)";
    }
    if (why) {
        c->must_fail = 1;
        c->why = why;
    } else if (n2 > 0 && t->data && es) {
        /* Valid: it must lie inside the memory behind it, or the call is not made. */
        const ften *o = f->block ? f : NULL;
        for (int i = 0; !o && i < c->nt; ++i) {
            const ften *g = &c->t[i];
            if (g->block && base + lo2 >= (i128)(uintptr_t)g->block &&
                base + hi2 <= (i128)(uintptr_t)g->block + (i128)g->block_bytes)
                o = g;
        }
        if (!o || n2 > WORK_CAP || base + lo2 < (i128)(uintptr_t)o->block ||
            base + hi2 > (i128)(uintptr_t)o->block + (i128)o->block_bytes)
            c->skip = 1;
    }
    return t;
}

/* A 1-D byte tensor of about `bytes` (the input may shrink or grow it). */
static DLTensor *bytes_arg(call *c, size_t bytes) {
    switch (pick(c, 8)) {
        case 0:
            bytes = bytes > 16 ? bytes - 16 : 0;
            break;
        case 1:
            bytes += 256;
            break;
        default:
            break;
    }
    if (bytes > (size_t)BYTES_CAP) bytes = (size_t)BYTES_CAP;
    const int64_t n = (int64_t)bytes;
    return arg(c, U8, 1, &n);
}

static void snapshot(call *c) {
    for (int i = 0; i < c->nt; ++i) {
        ften *f = &c->t[i];
        if (!f->block || !f->block_bytes) continue;
        f->snap = malloc(f->block_bytes);
        memcpy(f->snap, f->block, f->block_bytes);
    }
}

/* Snapshot, then make the call, or skip it when a descriptor could not be backed. */
#define CALL(c, expr) ((c)->skip ? SKIPPED : (snapshot(c), (int)(expr)))

/* ---- entry points ------------------------------------------------------------ */

/* (..., n): 1 to 3 dims, the last one n. */
static int rows_shape(call *c, int64_t *s, int64_t n) {
    const int nd = (int)dim(c, 1, 3);
    for (int i = 0; i < nd - 1; ++i) s[i] = dim(c, 0, 4);
    s[nd - 1] = n;
    return nd;
}

/* out = s (nd dims) with its last dim n: another tensor over the same rows. */
static void rows_like(int64_t *out, const int64_t *s, int nd, int64_t n) {
    memcpy(out, s, MAX_NDIM * sizeof *s);
    out[nd - 1] = n;
}

/* rstd / the row statistics of a (..., n) tensor: x.shape[:-1], or (1,) for 1-D x. */
static DLTensor *rows_vector(call *c, const int64_t *s, int nd) {
    const int64_t one = 1;
    return nd > 1 ? arg(c, F32, nd - 1, s) : arg(c, F32, 1, &one);
}

static int e_rmsnorm_forward(call *c) {
    const DLDataType d = fdt(c);
    int64_t s[MAX_NDIM];
    const int nd = rows_shape(c, s, dim(c, 0, 40));
    DLTensor *x = arg(c, d, nd, s), *w = arg(c, d, 1, s + nd - 1), *y = arg(c, d, nd, s);
    DLTensor *r = pick(c, 2) ? rows_vector(c, s, nd) : NULL;
    return CALL(c, l3k_rmsnorm_forward(x, w, eps(c), y, r, stream(c)));
}

static int e_add_rmsnorm_forward(call *c) {
    const DLDataType d = fdt(c);
    int64_t s[MAX_NDIM];
    const int nd = rows_shape(c, s, dim(c, 0, 40));
    DLTensor *x = arg(c, d, nd, s), *res = arg(c, d, nd, s), *w = arg(c, d, 1, s + nd - 1);
    DLTensor *h = arg(c, d, nd, s), *y = arg(c, d, nd, s);
    DLTensor *r = pick(c, 2) ? rows_vector(c, s, nd) : NULL;
    return CALL(c, l3k_add_rmsnorm_forward(x, res, w, eps(c), h, y, r, stream(c)));
}

/* A size query on one (..., n) tensor, n up to max_n; now and then a NULL out-pointer. */
static int rows_size_query(call *c, int64_t max_n, l3k_status (*query)(const DLTensor *, size_t *)) {
    int64_t s[MAX_NDIM];
    const int nd = rows_shape(c, s, dim(c, 0, max_n));
    DLTensor *x = arg(c, fdt(c), nd, s);
    size_t bytes = 0;
    return CALL(c, query(x, pick(c, 16) ? &bytes : NULL));
}

static int e_rmsnorm_backward_workspace_size(call *c) {
    return rows_size_query(c, 40, l3k_rmsnorm_backward_workspace_size);
}

static int e_rmsnorm_backward(call *c) {
    const DLDataType d = fdt(c);
    int64_t s[MAX_NDIM];
    const int nd = rows_shape(c, s, dim(c, 0, 40));
    DLTensor *dy = arg(c, d, nd, s), *dh = pick(c, 2) ? arg(c, d, nd, s) : NULL, *x = arg(c, d, nd, s);
    DLTensor *w = arg(c, d, 1, s + nd - 1), *r = pick(c, 2) ? rows_vector(c, s, nd) : NULL;
    DLTensor *dx = arg(c, d, nd, s), *dw = pick(c, 4) ? arg(c, d, 1, s + nd - 1) : NULL;
    size_t bytes = 0;
    if (x) (void)l3k_rmsnorm_backward_workspace_size(x, &bytes);
    DLTensor *ws = bytes || pick(c, 4) == 0 ? bytes_arg(c, bytes) : NULL;
    return CALL(c, l3k_rmsnorm_backward(dy, dh, x, w, r, eps(c), dx, dw, ws, stream(c)));
}

static int rope(call *c, int backward) {
    const DLDataType d = fdt(c);
    const int64_t b = dim(c, 0, 2), hq = dim(c, 0, 4), s = dim(c, 0, 5), hd = 2 * dim(c, 0, 8);
    const int64_t hk = hq ? hq / dim(c, 1, 2) : dim(c, 0, 1);
    const int64_t qs[4] = {b, hq, s, hd}, ks[4] = {b, hk ? hk : 1, s, hd};
    DLTensor *q = arg(c, d, 4, qs), *k = pick(c, 4) ? arg(c, d, 4, ks) : NULL;
    const int64_t rows = s + dim(c, 0, 3), half = hd / 2;
    const DLDataType td = pick(c, 2) ? F32 : d;
    const int64_t t2[2] = {rows, half}, t3[3] = {pick(c, 2) ? b : 1, rows, half};
    const int batched = (int)pick(c, 3) == 0;
    DLTensor *cs = batched ? arg(c, td, 3, t3) : arg(c, td, 2, t2);
    DLTensor *sn = batched ? arg(c, td, 3, t3) : arg(c, td, 2, t2);
    DLTensor *qo = arg(c, d, 4, qs), *ko = k || pick(c, 8) == 0 ? arg(c, d, 4, ks) : NULL;
    const int64_t offset = pick(c, 8) == 0 ? hostile_value(c) : (int64_t)pick(c, 4);
    const int mode = pick(c, 16) == 0 ? 2 : (int)pick(c, 2);
    void *st = stream(c);
    if (backward) return CALL(c, l3k_rope_backward(q, k, cs, sn, offset, mode, qo, ko, st));
    return CALL(c, l3k_rope_forward(q, k, cs, sn, offset, mode, qo, ko, st));
}
static int e_rope_forward(call *c) { return rope(c, 0); }
static int e_rope_backward(call *c) { return rope(c, 1); }

static int e_swiglu_forward(call *c) {
    const DLDataType d = fdt(c);
    int64_t s[MAX_NDIM];
    const int nd = rows_shape(c, s, dim(c, 0, 24));
    DLTensor *g = arg(c, d, nd, s), *u = arg(c, d, nd, s), *a = arg(c, d, nd, s);
    return CALL(c, l3k_swiglu_forward(g, u, a, stream(c)));
}

static int e_swiglu_fused_forward(call *c) {
    const DLDataType d = fdt(c);
    int64_t s[MAX_NDIM], h[MAX_NDIM];
    const int64_t hidden = dim(c, 0, 12);
    const int nd = rows_shape(c, s, 2 * hidden + (pick(c, 16) == 0));
    rows_like(h, s, nd, hidden);
    DLTensor *gu = arg(c, d, nd, s), *a = arg(c, d, nd, h);
    return CALL(c, l3k_swiglu_fused_forward(gu, a, stream(c)));
}

static int e_swiglu_backward(call *c) {
    const DLDataType d = fdt(c);
    int64_t s[MAX_NDIM];
    const int nd = rows_shape(c, s, dim(c, 0, 24));
    DLTensor *da = arg(c, d, nd, s), *g = arg(c, d, nd, s), *u = arg(c, d, nd, s);
    DLTensor *dg = arg(c, d, nd, s), *du = arg(c, d, nd, s), *a = pick(c, 2) ? arg(c, d, nd, s) : NULL;
    return CALL(c, l3k_swiglu_backward(da, g, u, dg, du, a, stream(c)));
}

static int e_swiglu_fused_backward(call *c) {
    const DLDataType d = fdt(c);
    int64_t s[MAX_NDIM], h[MAX_NDIM];
    const int64_t hidden = dim(c, 0, 12);
    const int nd = rows_shape(c, s, 2 * hidden);
    rows_like(h, s, nd, hidden);
    DLTensor *da = arg(c, d, nd, h), *gu = arg(c, d, nd, s), *dgu = arg(c, d, nd, s);
    DLTensor *a = pick(c, 2) ? arg(c, d, nd, h) : NULL;
    return CALL(c, l3k_swiglu_fused_backward(da, gu, dgu, a, stream(c)));
}

static int e_linear_workspace_size(call *c) { return rows_size_query(c, 8, l3k_linear_workspace_size); }

static DLTensor *linear_workspace(call *c) {
    return pick(c, 2) ? bytes_arg(c, (size_t)(16 * pick(c, 4))) : NULL;
}

/* The linear ops' shapes: x (..., k) and y (..., n) over the same rows, the weight (n, k); dy has
 * y's shape, dx x's. */
typedef struct {
    DLDataType d;
    int nd;
    int64_t x[MAX_NDIM], y[MAX_NDIM], w[2];
} linear_dims;

static void linear_shapes(call *c, linear_dims *l) {
    l->d = fdt(c);
    const int64_t k = dim(c, 0, 16), n = dim(c, 0, 12);
    l->nd = rows_shape(c, l->x, k);
    rows_like(l->y, l->x, l->nd, n);
    l->w[0] = n;
    l->w[1] = k;
}

static int e_linear_forward(call *c) {
    linear_dims l;
    linear_shapes(c, &l);
    DLTensor *x = arg(c, l.d, l.nd, l.x), *w = arg(c, l.d, 2, l.w);
    DLTensor *res = pick(c, 2) ? arg(c, l.d, l.nd, l.y) : NULL;
    DLTensor *y = arg(c, l.d, l.nd, l.y), *wk = linear_workspace(c);
    return CALL(c, l3k_linear_forward(x, w, res, y, wk, stream(c)));
}

static int e_linear_backward_input(call *c) {
    linear_dims l;
    linear_shapes(c, &l);
    DLTensor *dy = arg(c, l.d, l.nd, l.y), *w = arg(c, l.d, 2, l.w), *dx = arg(c, l.d, l.nd, l.x);
    DLTensor *wk = linear_workspace(c);
    return CALL(c, l3k_linear_backward_input(dy, w, dx, (int)pick(c, 2), wk, stream(c)));
}

static int e_linear_backward_weight(call *c) {
    linear_dims l;
    linear_shapes(c, &l);
    DLTensor *dy = arg(c, l.d, l.nd, l.y), *x = arg(c, l.d, l.nd, l.x);
    DLTensor *dw = arg(c, pick(c, 2) ? F32 : l.d, 2, l.w), *wk = linear_workspace(c);
    return CALL(c, l3k_linear_backward_weight(dy, x, dw, (int)pick(c, 2), wk, stream(c)));
}

typedef struct {
    DLDataType d;
    int64_t qs[4], ks[4], nl;
} attn_dims;

static void attention_dims(call *c, attn_dims *a) {
    a->d = fdt(c);
    const int64_t b = dim(c, 0, 2), hkv = dim(c, 1, 2), h = hkv * dim(c, 1, 2), sq = dim(c, 0, 6),
                  sk = dim(c, 0, 6), hd = pick(c, 16) == 0 ? dim(c, 0, 20) : 8 * dim(c, 1, 2);
    const int64_t qs[4] = {b, h, sq, hd}, ks[4] = {b, hkv, sk, hd};
    memcpy(a->qs, qs, sizeof qs);
    memcpy(a->ks, ks, sizeof ks);
    a->nl = b * h * sq + (pick(c, 16) == 0);
}

/* The attention's optional key range: absent half the time; else (batch, 2) int32 (now and then
 * another row count or dtype), holding whatever fill() gives (the kernels clamp the values). */
static DLTensor *key_range_arg(call *c, const attn_dims *a) {
    if (pick(c, 2)) return NULL;
    const int64_t shape[2] = {a->qs[0] + (pick(c, 16) == 0), 2};
    return arg(c, pick(c, 16) ? I32 : F32, 2, shape);
}

static int e_attention_forward(call *c) {
    attn_dims a;
    attention_dims(c, &a);
    DLTensor *q = arg(c, a.d, 4, a.qs), *k = arg(c, a.d, 4, a.ks), *v = arg(c, a.d, 4, a.ks);
    DLTensor *o = arg(c, a.d, 4, a.qs), *lse = arg(c, F32, 1, &a.nl);
    DLTensor *kr = key_range_arg(c, &a);
    return CALL(c, l3k_attention_forward(q, k, v, kr, scale(c), (int)pick(c, 2), o, lse, stream(c)));
}

static int e_attention_backward_workspace_size(call *c) {
    attn_dims a;
    attention_dims(c, &a);
    DLTensor *q = arg(c, a.d, 4, a.qs), *k = arg(c, a.d, 4, a.ks);
    size_t bytes = 0;
    return CALL(c, l3k_attention_backward_workspace_size(q, k, (int)pick(c, 2), pick(c, 16) ? &bytes : NULL));
}

static int e_attention_backward(call *c) {
    attn_dims a;
    attention_dims(c, &a);
    DLTensor *dout = arg(c, a.d, 4, a.qs), *q = arg(c, a.d, 4, a.qs), *k = arg(c, a.d, 4, a.ks);
    DLTensor *v = arg(c, a.d, 4, a.ks), *o = arg(c, a.d, 4, a.qs), *lse = arg(c, F32, 1, &a.nl);
    DLTensor *dq = arg(c, a.d, 4, a.qs), *dk = arg(c, a.d, 4, a.ks), *dv = arg(c, a.d, 4, a.ks);
    DLTensor *kr = key_range_arg(c, &a);
    const int det = (int)pick(c, 2);
    size_t bytes = 0;
    if (q && k) (void)l3k_attention_backward_workspace_size(q, k, det, &bytes);
    DLTensor *ws = bytes || pick(c, 4) == 0 ? bytes_arg(c, bytes) : NULL;
    return CALL(c, l3k_attention_backward(dout, q, k, v, kr, o, lse, scale(c), (int)pick(c, 2), det, dq, dk,
                                          dv, ws, stream(c)));
}

/* The block's common arguments. */
typedef struct {
    DLDataType d;
    int64_t xs[3];
    int64_t dm, kv, qkv, hidden, heads; /* the sizes the weights are made for (kv = n_kv_heads * head_dim) */
    DLTensor *x, *cos, *sin;
    l3k_llama_block_weights w;
    l3k_llama_block_config cfg;
} block_args;

/* How a projection with parts ([q | k | v] or [gate | up]) is given: one fused tensor, a tensor
 * per part, the parts carved one after the other out of one buffer (the library joins them: one
 * GEMM), carved apart (rotated, or with a gap: a GEMM each), or both forms at once (refused). */
enum { FORM_FUSED, FORM_PARTS, FORM_CARVED, FORM_APART, FORM_BOTH };

static int proj_form(call *c) {
    const unsigned k = pick(c, 16);
    return k < 8 ? FORM_FUSED : k < 11 ? FORM_PARTS : k < 14 ? FORM_CARVED : k < 15 ? FORM_APART : FORM_BOTH;
}

/* A clean 1-D byte tensor of exactly `bytes`, filled as `dtype`, that views are carved from; it
 * is snapshotted and freed with the others, and no call is given it whole. */
static unsigned char *backing(call *c, size_t bytes, DLDataType dtype) {
    if (c->nt == MAX_TENSORS) return NULL;
    ften *f = &c->t[c->nt++];
    memset(f, 0, sizeof *f);
    f->shape[0] = (int64_t)bytes;
    f->t.ndim = 1;
    f->t.shape = f->shape;
    f->t.dtype = U8;
    f->t.device.device_type = kDLCPU;
    f->block_bytes = bytes;
    f->block = new_block(bytes);
    fill(c, f->block, bytes, dtype);
    f->t.data = f->block;
    return f->block;
}

/* A compact (rows, cols) view at p, inside a backing(). */
static DLTensor *view_at(call *c, DLDataType dtype, int64_t rows, int64_t cols, unsigned char *p) {
    if (!p || c->nt == MAX_TENSORS) return NULL;
    ften *f = &c->t[c->nt++];
    memset(f, 0, sizeof *f);
    f->shape[0] = rows;
    f->shape[1] = cols;
    f->t.ndim = 2;
    f->t.shape = f->shape;
    f->t.dtype = dtype;
    f->t.device.device_type = kDLCPU;
    f->t.data = p;
    return &f->t;
}

/* The tensors of a projection of n parts (widths[i] rows of cols each) in `form`: *fused and/or
 * parts[0 .. n).  FORM_FUSED makes exactly the one arg() the fused-only entries make. */
static void proj_arg(call *c, int form, DLDataType d, int n, const int64_t *widths, int64_t cols,
                     DLTensor **fused, DLTensor **parts) {
    int64_t total = 0;
    for (int i = 0; i < n; ++i) {
        parts[i] = NULL;
        total += widths[i];
    }
    const int64_t fs[2] = {total, cols};
    *fused = form == FORM_FUSED || form == FORM_BOTH ? arg(c, d, 2, fs) : NULL;
    if (form == FORM_PARTS || form == FORM_BOTH) {
        for (int i = 0; i < n; ++i) {
            const int64_t s[2] = {widths[i], cols};
            parts[i] = arg(c, d, 2, s);
        }
    } else if (form == FORM_CARVED || form == FORM_APART) {
        /* Apart: the parts rotated (k | v | q), or in order with a gap of rows or of one element. */
        const unsigned rot = form == FORM_APART ? pick(c, (unsigned)n) : 0;
        const int64_t gap =
            form == FORM_APART && (rot == 0 || pick(c, 2)) ? (pick(c, 8) ? cols * dim(c, 1, 2) : 1) : 0;
        const size_t es = elem_bytes(d);
        unsigned char *p = backing(c, (size_t)(total * cols + (n - 1) * gap) * es, d);
        size_t at = 0;
        for (int j = 0; j < n; ++j) {
            const int i = (int)((j + rot) % (unsigned)n);
            parts[i] = view_at(c, d, widths[i], cols, p ? p + at : NULL);
            at += (size_t)(widths[i] * cols + gap) * es;
        }
    }
}

/* with_tables: whether the call takes cos and sin (the size queries do not: a hostile table
 * that no call reads must not count as accepted).  parts: whether the qkv and gate/up weights
 * may come in parts (the training entries; the others keep their inputs' meaning). */
static void block_setup(call *c, block_args *a, int with_tables, int parts) {
    const l3k_llama_block_weights w0 = L3K_LLAMA_BLOCK_WEIGHTS_INIT;
    const l3k_llama_block_config cfg0 = L3K_LLAMA_BLOCK_CONFIG_INIT;
    a->w = w0;
    a->cfg = cfg0;
    a->d = fdt(c);
    const int64_t b = dim(c, 0, 2), s = dim(c, 0, 4), hkv = dim(c, 1, 2), h = hkv * dim(c, 1, 2),
                  hd = 8 * dim(c, 1, 2), hidden = 8 * dim(c, 0, 3), dm = h * hd, qkv = dm + 2 * hkv * hd;
    a->xs[0] = b;
    a->xs[1] = s;
    a->xs[2] = dm;
    a->dm = dm;
    a->kv = hkv * hd;
    a->qkv = qkv;
    a->hidden = hidden;
    a->heads = h;
    a->x = arg(c, a->d, 3, a->xs);
    const int64_t ts[2] = {s + dim(c, 0, 2), hd / 2};
    const DLDataType td = pick(c, 2) ? F32 : a->d;
    a->cos = with_tables ? arg(c, td, 2, ts) : NULL;
    a->sin = with_tables ? arg(c, td, 2, ts) : NULL;
    const int fqkv = parts ? proj_form(c) : FORM_FUSED, fgu = parts ? proj_form(c) : FORM_FUSED;
    const int64_t wq[3] = {dm, hkv * hd, hkv * hd}, wg[2] = {hidden, hidden}, so[2] = {dm, dm},
                  sd[2] = {dm, hidden};
    DLTensor *f, *p[3];
    proj_arg(c, fqkv, a->d, 3, wq, dm, &f, p);
    a->w.qkv_weight = f;
    a->w.q_weight = p[0];
    a->w.k_weight = p[1];
    a->w.v_weight = p[2];
    a->w.o_weight = arg(c, a->d, 2, so);
    proj_arg(c, fgu, a->d, 2, wg, dm, &f, p);
    a->w.gate_up_weight = f;
    a->w.gate_weight = p[0];
    a->w.up_weight = p[1];
    a->w.down_weight = arg(c, a->d, 2, sd);
    a->w.norm1_weight = arg(c, a->d, 1, &dm);
    a->w.norm2_weight = arg(c, a->d, 1, &dm);
    if (pick(c, 32) == 0) a->w.struct_size = (size_t)pick(c, 64);
    if (pick(c, 32) == 0) a->cfg.struct_size = (size_t)pick(c, 64);
    a->cfg.n_heads = pick(c, 16) == 0 ? hostile_value(c) : h;
    a->cfg.n_kv_heads = pick(c, 16) == 0 ? dim(c, -1, 3) : hkv;
    a->cfg.causal = (int)pick(c, 2);
    a->cfg.eps = eps(c);
    a->cfg.deterministic = (int)pick(c, 2);
}

static int e_llama_block_forward_workspace_size(call *c) {
    block_args a;
    block_setup(c, &a, 0, 0);
    size_t bytes = 0;
    return CALL(c, l3k_llama_block_forward_workspace_size(a.x, &a.w, &a.cfg, pick(c, 16) ? &bytes : NULL));
}

static int e_llama_block_forward(call *c) {
    block_args a;
    block_setup(c, &a, 1, 0);
    DLTensor *out = arg(c, a.d, 3, a.xs);
    size_t bytes = 0;
    (void)l3k_llama_block_forward_workspace_size(a.x, &a.w, &a.cfg, &bytes);
    DLTensor *ws = bytes_arg(c, bytes);
    return CALL(c, l3k_llama_block_forward(a.x, a.cos, a.sin, &a.w, &a.cfg, out, ws, stream(c)));
}

/* cfg->key_range half the time: int32 (batch, 2), now and then another row count or dtype.  A cfg
 * whose struct_size stops before the field has no key range: what the tensor is does not count. */
static void block_key_range(call *c, block_args *a) {
    if (pick(c, 2)) return;
    const int read = a->cfg.struct_size >=
                     offsetof(l3k_llama_block_config, key_range) + sizeof a->cfg.key_range;
    const int must_fail = c->must_fail;
    const char *why = c->why;
    const int64_t shape[2] = {a->xs[0] + (pick(c, 16) == 0), 2};
    a->cfg.key_range = arg(c, pick(c, 16) ? I32 : F32, 2, shape);
    if (!read) {
        c->must_fail = must_fail;
        c->why = why;
    }
}

/* The training layout for the setup's arguments, as the library reports it; where it refuses
 * them, the sizes the setup meant (and no workspace), so the other arguments stay as they were. */
static void block_layout(const block_args *a, l3k_llama_block_layout *lay) {
    /* L3K_LLAMA_BLOCK_LAYOUT_INIT's {sizeof} alone trips -Wmissing-field-initializers. */
    const l3k_llama_block_layout l0 = {.struct_size = sizeof l0};
    *lay = l0;
    if (l3k_llama_block_training_layout(a->x, &a->w, &a->cfg, lay) == L3K_SUCCESS) return;
    *lay = l0;
    const int64_t t = a->xs[0] * a->xs[1];
    lay->qkv = (l3k_buffer_desc){t, a->qkv, a->d};
    lay->residual = lay->attn_out = (l3k_buffer_desc){t, a->dm, a->d};
    lay->gate_up = (l3k_buffer_desc){t, 2 * a->hidden, a->d};
    lay->rstd1 = lay->rstd2 = (l3k_buffer_desc){t, 1, F32};
    lay->lse = (l3k_buffer_desc){a->xs[0] * a->heads * a->xs[1], 1, F32};
}

/* The training calls' first arguments: the block's (tables and split weights allowed), a key
 * range, and the layout for them. */
static void training_setup(call *c, block_args *a, l3k_llama_block_layout *lay) {
    block_setup(c, a, 1, 1);
    block_key_range(c, a);
    block_layout(a, lay);
}

/* One buffer from its layout entry: (rows, cols), or flattened; now and then another dtype or one
 * row or column more. */
static DLTensor *buffer_arg(call *c, l3k_buffer_desc b) {
    const DLDataType dt = pick(c, 16) ? b.dtype : fdt(c);
    int64_t s[2] = {b.rows, b.cols}, n;
    if (pick(c, 16) == 0) s[pick(c, 2)] += 1;
    if (pick(c, 4) == 0 && !__builtin_mul_overflow(s[0], s[1], &n)) return arg(c, dt, 1, &n);
    return arg(c, dt, 2, s);
}

/* The activations from the layout; attn_out and lse: neither, both, or (refused) one of them.
 * Now and then a struct_size of another version, or no struct at all. */
static const l3k_llama_block_activations *activations_arg(call *c, const l3k_llama_block_layout *lay,
                                                          l3k_llama_block_activations *s) {
    const l3k_llama_block_activations s0 = L3K_LLAMA_BLOCK_ACTIVATIONS_INIT;
    *s = s0;
    if (pick(c, 32) == 0) s->struct_size = (size_t)pick(c, 2 * sizeof *s);
    s->qkv = buffer_arg(c, lay->qkv);
    s->residual = buffer_arg(c, lay->residual);
    s->gate_up = buffer_arg(c, lay->gate_up);
    s->rstd1 = buffer_arg(c, lay->rstd1);
    s->rstd2 = buffer_arg(c, lay->rstd2);
    const unsigned k = pick(c, 16);
    if (k >= 7 && k != 15) s->attn_out = buffer_arg(c, lay->attn_out);
    if (k >= 7 && k != 14) s->lse = buffer_arg(c, lay->lse);
    return pick(c, 64) ? s : NULL;
}

/* The weight gradients, each projection in a form of its own (not necessarily its weight's).
 * *gu_apart: the gate and up gradients are two buffers not one after the other. */
static const l3k_llama_block_grads *grads_arg(call *c, const block_args *a, l3k_llama_block_grads *g,
                                              int *gu_apart) {
    const l3k_llama_block_grads g0 = L3K_LLAMA_BLOCK_GRADS_INIT;
    *g = g0;
    if (pick(c, 32) == 0) g->struct_size = (size_t)pick(c, 2 * sizeof *g);
    const int fqkv = proj_form(c), fgu = proj_form(c);
    const int64_t wq[3] = {a->dm, a->kv, a->kv}, wg[2] = {a->hidden, a->hidden}, so[2] = {a->dm, a->dm},
                  sd[2] = {a->dm, a->hidden};
    DLTensor *p[3];
    proj_arg(c, fqkv, a->d, 3, wq, a->dm, &g->qkv_weight, p);
    g->q_weight = p[0];
    g->k_weight = p[1];
    g->v_weight = p[2];
    g->o_weight = arg(c, a->d, 2, so);
    proj_arg(c, fgu, a->d, 2, wg, a->dm, &g->gate_up_weight, p);
    g->gate_weight = p[0];
    g->up_weight = p[1];
    g->down_weight = arg(c, a->d, 2, sd);
    g->norm1_weight = arg(c, a->d, 1, &a->dm);
    g->norm2_weight = arg(c, a->d, 1, &a->dm);
    *gu_apart = fgu == FORM_PARTS || fgu == FORM_APART;
    return pick(c, 64) ? g : NULL;
}

/* 0 or L3K_BLOCK_PRESERVE_ACTIVATIONS; now and then unknown bits (refused). */
static unsigned block_flags(call *c) {
    switch (pick(c, 16)) {
        case 0:
            return 2u;
        case 1:
            return L3K_BLOCK_PRESERVE_ACTIVATIONS | 0x80000000u;
        case 2:
            return ~0u;
        default:
            return pick(c, 2) ? L3K_BLOCK_PRESERVE_ACTIVATIONS : 0u;
    }
}

static int e_llama_block_training_layout(call *c) {
    block_args a;
    block_setup(c, &a, 0, 1);
    l3k_llama_block_layout lay = {.struct_size = sizeof lay};
    if (pick(c, 32) == 0) lay.struct_size = (size_t)pick(c, 2 * sizeof lay);
    const l3k_llama_block_weights *w = pick(c, 64) ? &a.w : NULL;
    const l3k_llama_block_config *cfg = pick(c, 64) ? &a.cfg : NULL;
    return CALL(c, l3k_llama_block_training_layout(a.x, w, cfg, pick(c, 16) ? &lay : NULL));
}

static int e_llama_block_forward_train(call *c) {
    block_args a;
    l3k_llama_block_layout lay;
    l3k_llama_block_activations s;
    training_setup(c, &a, &lay);
    DLTensor *out = arg(c, a.d, 3, a.xs);
    const l3k_llama_block_activations *saved = activations_arg(c, &lay, &s);
    DLTensor *ws = bytes_arg(c, lay.forward_workspace_bytes);
    return CALL(c, l3k_llama_block_forward_train(a.x, a.cos, a.sin, &a.w, &a.cfg, out, saved, ws, stream(c)));
}

static int e_llama_block_backward(call *c) {
    block_args a;
    l3k_llama_block_layout lay;
    l3k_llama_block_activations s;
    l3k_llama_block_grads g;
    int gu_apart;
    training_setup(c, &a, &lay);
    DLTensor *dout = arg(c, a.d, 3, a.xs), *dx = arg(c, a.d, 3, a.xs);
    const l3k_llama_block_activations *saved = activations_arg(c, &lay, &s);
    const l3k_llama_block_grads *grads = grads_arg(c, &a, &g, &gu_apart);
    const unsigned flags = block_flags(c);
    size_t bytes = flags & L3K_BLOCK_PRESERVE_ACTIVATIONS ? lay.backward_workspace_bytes_preserving
                                                          : lay.backward_workspace_bytes;
    if (gu_apart) bytes += lay.backward_workspace_extra_split_gate_up;
    DLTensor *ws = bytes_arg(c, bytes);
    /* A quarter of the time the activations first get a training forward's values (dout is its
     * out), before the snapshot; only with arguments that are all backed and none must fail. */
    if (saved && pick(c, 4) == 0) {
        const int must_fail = c->must_fail;
        const char *why = c->why;
        DLTensor *fws = bytes_arg(c, lay.forward_workspace_bytes);
        if (!c->skip && !c->must_fail)
            (void)l3k_llama_block_forward_train(a.x, a.cos, a.sin, &a.w, &a.cfg, dout, saved, fws, NULL);
        c->must_fail = must_fail;
        c->why = why;
    }
    return CALL(c, l3k_llama_block_backward(dout, a.x, a.cos, a.sin, &a.w, &a.cfg, saved, flags, dx, grads,
                                            ws, stream(c)));
}

/* Class indices for a target made by arg(), written over its own block (an alias or a
 * mutated descriptor keeps fill()'s bytes): mostly in [0, n), now and then ignore_index
 * or outside [0, n). */
static void targets_fill(call *c, DLTensor *t, int64_t n, int64_t ignore_index) {
    const ften *f = (const ften *)t; /* t is the first member of its ften */
    if (!t || !f->block) return;
    for (size_t i = 0; i + 8 <= f->block_bytes; i += 8) {
        const uint64_t r = rnd(c);
        int64_t v = n > 0 ? (int64_t)((r >> 8) % (uint64_t)n) : 0;
        if (r % 8 == 0) v = ignore_index;
        else if (r % 8 == 1) v = (r >> 4) % 2 ? n + (int64_t)((r >> 8) % 3) : -1 - (int64_t)((r >> 8) % 3);
        memcpy(f->block + i, &v, 8);
    }
}

static int e_cross_entropy_forward_backward(call *c) {
    static const DLDataType I64 = {kDLInt, 64, 1};
    const DLDataType d = fdt(c);
    int64_t s[MAX_NDIM];
    const int nd = rows_shape(c, s, dim(c, 0, 40));
    int64_t rows = 1;
    for (int i = 0; i < nd - 1; ++i) rows *= s[i];
    const int64_t one = 1;
    const int64_t ignore_index = pick(c, 8) == 0 ? hostile_value(c) : pick(c, 4) ? -100 : dim(c, -1, 3);
    DLTensor *logits = arg(c, d, nd, s);
    /* target: logits' leading dims, or flat (rows,): one element per row either way. */
    DLTensor *target = pick(c, 2) && nd > 1 ? arg(c, I64, nd - 1, s) : arg(c, I64, 1, &rows);
    targets_fill(c, target, s[nd - 1], ignore_index);
    const int64_t gs_n = pick(c, 16) ? 1 : 2; /* now and then two elements (refused) */
    DLTensor *grad_scale = pick(c, 2) ? arg(c, F32, pick(c, 4) ? 1 : 0, gs_n == 1 ? &one : &gs_n) : NULL;
    DLTensor *loss = rows_vector(c, s, nd);
    DLTensor *dlogits = pick(c, 4) == 0 ? logits : arg(c, d, nd, s); /* in place a quarter of the time */
    return CALL(c, l3k_cross_entropy_forward_backward(logits, target, ignore_index, grad_scale, loss, dlogits,
                                                      stream(c)));
}

/* ---- the KV cache ---------------------------------------------------------------- */

/* int32 values over an int32 tensor's own block (positions, cache ranges): mostly in [lo, hi], now
 * and then an extreme; an alias or a mutated descriptor keeps fill()'s bytes. */
static void ints_fill(call *c, DLTensor *t, int64_t lo, int64_t hi) {
    const ften *f = (const ften *)t; /* t is the first member of its ften */
    if (!t || !f->block) return;
    static const int32_t extreme[4] = {INT32_MIN, INT32_MAX, -1, 1 << 30};
    for (size_t i = 0; i + 4 <= f->block_bytes; i += 4) {
        const uint64_t r = rnd(c);
        const int32_t v = r % 16 == 0 ? extreme[(r >> 4) % 4]
                                      : (int32_t)(lo + (int64_t)((r >> 8) % (uint64_t)(hi - lo + 1)));
        memcpy(f->block + i, &v, 4);
    }
}

/* A strided view at p, inside a backing(). */
static DLTensor *view_nd(call *c, DLDataType dtype, int ndim, const int64_t *shape, const int64_t *strides,
                         unsigned char *p) {
    if (!p || c->nt == MAX_TENSORS) return NULL;
    ften *f = &c->t[c->nt++];
    memset(f, 0, sizeof *f);
    memcpy(f->shape, shape, sizeof(int64_t) * (size_t)ndim);
    memcpy(f->strides, strides, sizeof(int64_t) * (size_t)ndim);
    f->t.ndim = ndim;
    f->t.shape = f->shape;
    f->t.strides = f->strides;
    f->t.dtype = dtype;
    f->t.device.device_type = kDLCPU;
    f->t.data = p;
    return &f->t;
}

/* The cache ops' shapes: q (b, h, s, hd), k and v (b, hkv, s, hd), the caches (b, hkv, cap, hd);
 * now and then a head_dim the cache ops refuse. */
typedef struct {
    DLDataType d;
    int64_t qs[4], ks[4], cs[4];
} kv_dims;

static void kv_shapes(call *c, kv_dims *a) {
    a->d = fdt(c);
    const int64_t b = dim(c, 0, 2), hkv = dim(c, 1, 2), h = hkv * dim(c, 1, 2), s = dim(c, 0, 4),
                  cap = dim(c, 0, 8), hd = pick(c, 16) == 0 ? dim(c, 0, 20) : 8 * dim(c, 1, 2);
    const int64_t qs[4] = {b, h, s, hd}, ks[4] = {b, hkv, s, hd}, cs[4] = {b, hkv, cap, hd};
    memcpy(a->qs, qs, sizeof qs);
    memcpy(a->ks, ks, sizeof ks);
    memcpy(a->cs, cs, sizeof cs);
}

/* cache_range: int32 (batch, 2) (now and then another row count or dtype), values around
 * [0, capacity] (the kernels clamp them). */
static DLTensor *cache_range_arg(call *c, int64_t batch, int64_t cap) {
    const int64_t shape[2] = {batch + (pick(c, 16) == 0), pick(c, 32) ? 2 : 3};
    DLTensor *r = arg(c, pick(c, 16) ? I32 : F32, 2, shape);
    ints_fill(c, r, -2, cap + 2);
    return r;
}

/* positions: NULL half the time, else int32 (batch,) (now and then another length or dtype), values
 * around [0, rows]. */
static DLTensor *positions_arg(call *c, int64_t batch, int64_t rows) {
    if (pick(c, 2)) return NULL;
    const int64_t n = batch + (pick(c, 16) == 0);
    DLTensor *p = arg(c, pick(c, 16) ? I32 : F32, 1, &n);
    ints_fill(c, p, -2, rows + 1);
    return p;
}

static int e_kv_cache_append(call *c) {
    kv_dims a;
    kv_shapes(c, &a);
    const int64_t b = a.qs[0], h = a.qs[1], hkv = a.ks[1], s = a.qs[2], hd = a.qs[3];
    DLTensor *q = NULL, *k, *v, *qo = NULL;
    if (pick(c, 4) == 0) {
        /* q, k and v the heads of one fused (b, s, h + 2 hkv, hd) projection, as the block gives
         * them; q rotated in place most of the time. */
        const int64_t w = (h + 2 * hkv) * hd, st[4] = {s * w, hd, w, 1};
        const size_t es = elem_bytes(a.d);
        unsigned char *p = backing(c, (size_t)(b * s * w) * es, a.d);
        q = view_nd(c, a.d, 4, a.qs, st, p);
        k = view_nd(c, a.d, 4, a.ks, st, p ? p + (size_t)(h * hd) * es : NULL);
        v = view_nd(c, a.d, 4, a.ks, st, p ? p + (size_t)((h + hkv) * hd) * es : NULL);
        qo = pick(c, 4) ? q : arg(c, a.d, 4, a.qs);
    } else {
        q = pick(c, 4) ? arg(c, a.d, 4, a.qs) : NULL;
        k = arg(c, a.d, 4, a.ks);
        v = arg(c, a.d, 4, a.ks);
        if (q || pick(c, 16) == 0) qo = q && pick(c, 4) == 0 ? q : arg(c, a.d, 4, a.qs);
    }
    const int64_t rows = s + dim(c, 0, 3) - (pick(c, 16) == 0), half = hd / 2;
    const DLDataType td = pick(c, 2) ? F32 : a.d;
    const int64_t t2[2] = {rows, half}, t3[3] = {pick(c, 2) ? b : 1, rows, half};
    const int batched = pick(c, 3) == 0;
    DLTensor *cs = batched ? arg(c, td, 3, t3) : arg(c, td, 2, t2);
    DLTensor *sn = batched ? arg(c, td, 3, t3) : arg(c, td, 2, t2);
    DLTensor *pos = positions_arg(c, b, rows);
    DLTensor *range = cache_range_arg(c, b, a.cs[2]);
    DLTensor *kc = arg(c, a.d, 4, a.cs), *vc = arg(c, a.d, 4, a.cs);
    const int mode = pick(c, 16) == 0 ? 2 : (int)pick(c, 2);
    return CALL(c, l3k_kv_cache_append(q, k, v, cs, sn, pos, range, mode, qo, kc, vc, stream(c)));
}

static int e_attention_decode_workspace_size(call *c) {
    kv_dims a;
    kv_shapes(c, &a);
    DLTensor *q = arg(c, a.d, 4, a.qs), *kc = arg(c, a.d, 4, a.cs);
    size_t bytes = 0;
    return CALL(c, l3k_attention_decode_workspace_size(q, kc, pick(c, 16) ? &bytes : NULL));
}

static int e_attention_decode(call *c) {
    kv_dims a;
    kv_shapes(c, &a);
    DLTensor *q = arg(c, a.d, 4, a.qs), *kc = arg(c, a.d, 4, a.cs), *vc = arg(c, a.d, 4, a.cs);
    DLTensor *range = cache_range_arg(c, a.qs[0], a.cs[2]);
    DLTensor *o = arg(c, a.d, 4, a.qs);
    size_t bytes = 0;
    if (q && kc) (void)l3k_attention_decode_workspace_size(q, kc, &bytes);
    DLTensor *ws = bytes || pick(c, 4) == 0 ? bytes_arg(c, bytes) : NULL;
    return CALL(c, l3k_attention_decode(q, kc, vc, range, scale(c), o, ws, stream(c)));
}

/* The decode step's cache for the block's arguments: (batch, n_kv_heads, capacity, head_dim) k and
 * v in x's dtype (now and then another), the range and positions; now and then a struct_size of
 * another version, or no struct at all.  The setup's causal is mostly 1 and its key range mostly
 * absent (the step refuses both). */
static const l3k_kv_cache *block_cache(call *c, block_args *a, l3k_kv_cache *cache) {
    const l3k_kv_cache c0 = L3K_KV_CACHE_INIT;
    *cache = c0;
    a->cfg.causal = pick(c, 8) != 0;
    if (pick(c, 8) == 0) block_key_range(c, a);
    if (pick(c, 32) == 0) cache->struct_size = (size_t)pick(c, 2 * sizeof *cache);
    const int64_t hd = a->heads ? a->dm / a->heads : 0, hkv = hd ? a->kv / hd : 0;
    const int64_t cs[4] = {a->xs[0], hkv, dim(c, 0, 8), hd};
    const DLDataType d = pick(c, 16) ? a->d : fdt(c);
    cache->k = arg(c, d, 4, cs);
    cache->v = arg(c, d, 4, cs);
    cache->cache_range = cache_range_arg(c, a->xs[0], cs[2]);
    cache->positions = positions_arg(c, a->xs[0], a->xs[1] + 2);
    return pick(c, 64) ? cache : NULL;
}

static int e_llama_block_decode_workspace_size(call *c) {
    block_args a;
    l3k_kv_cache cs;
    block_setup(c, &a, 0, 1);
    const l3k_kv_cache *cache = block_cache(c, &a, &cs);
    size_t bytes = 0;
    return CALL(c,
                l3k_llama_block_decode_workspace_size(a.x, &a.w, &a.cfg, cache, pick(c, 16) ? &bytes : NULL));
}

static int e_llama_block_decode(call *c) {
    block_args a;
    l3k_kv_cache cs;
    block_setup(c, &a, 1, 1);
    const l3k_kv_cache *cache = block_cache(c, &a, &cs);
    DLTensor *out = arg(c, a.d, 3, a.xs);
    size_t bytes = 0;
    (void)l3k_llama_block_decode_workspace_size(a.x, &a.w, &a.cfg, cache, &bytes);
    DLTensor *ws = bytes_arg(c, bytes);
    return CALL(c, l3k_llama_block_decode(a.x, a.cos, a.sin, &a.w, &a.cfg, cache, out, ws, stream(c)));
}

/* The status and version functions: no tensors, never fail. */
static int e_status(call *c) {
    const int code = (int)dim(c, -2, 14);
    if (!l3k_status_string((l3k_status)code) || !l3k_last_error()) __builtin_trap();
    if (l3k_version() != L3K_VERSION || l3k_has_cuda() != 0) __builtin_trap();
    return SKIPPED;
}

typedef struct {
    const char *op;
    int (*fn)(call *c);
} entry;

/* New entries go at the end: an input's first byte indexes this table (so do the seeds'). */
static const entry ENTRIES[] = {
    {"rmsnorm_forward", e_rmsnorm_forward},
    {"add_rmsnorm_forward", e_add_rmsnorm_forward},
    {"rmsnorm_backward_workspace_size", e_rmsnorm_backward_workspace_size},
    {"rmsnorm_backward", e_rmsnorm_backward},
    {"rope_forward", e_rope_forward},
    {"rope_backward", e_rope_backward},
    {"swiglu_forward", e_swiglu_forward},
    {"swiglu_fused_forward", e_swiglu_fused_forward},
    {"swiglu_backward", e_swiglu_backward},
    {"swiglu_fused_backward", e_swiglu_fused_backward},
    {"linear_workspace_size", e_linear_workspace_size},
    {"linear_forward", e_linear_forward},
    {"linear_backward_input", e_linear_backward_input},
    {"linear_backward_weight", e_linear_backward_weight},
    {"attention_forward", e_attention_forward},
    {"attention_backward_workspace_size", e_attention_backward_workspace_size},
    {"attention_backward", e_attention_backward},
    {"llama_block_forward_workspace_size", e_llama_block_forward_workspace_size},
    {"llama_block_forward", e_llama_block_forward},
    {"status", e_status},
    {"llama_block_training_layout", e_llama_block_training_layout},
    {"llama_block_forward_train", e_llama_block_forward_train},
    {"llama_block_backward", e_llama_block_backward},
    {"cross_entropy_forward_backward", e_cross_entropy_forward_backward},
    {"kv_cache_append", e_kv_cache_append},
    {"attention_decode_workspace_size", e_attention_decode_workspace_size},
    {"attention_decode", e_attention_decode},
    {"llama_block_decode_workspace_size", e_llama_block_decode_workspace_size},
    {"llama_block_decode", e_llama_block_decode},
};
enum { N_ENTRIES = sizeof ENTRIES / sizeof ENTRIES[0] };

/* ---- the target -------------------------------------------------------------- */

static void fail(const entry *e, const call *c, int st, const char *what) {
    fprintf(stderr, "fuzz_abi: %s: %s (status %d, last error \"%s\"%s%s)\n", e->op, what, st,
            l3k_last_error(), c->why ? ", must fail: " : "", c->why ? c->why : "");
    __builtin_trap();
}

/* L3K_FUZZ_ONLY=name,name,...: fuzz only the entries whose name starts with one of these. */
static int entry_on(const entry *e) {
    const char *only = getenv("L3K_FUZZ_ONLY");
    if (!only || !*only) return 1;
    for (const char *p = only; *p;) {
        const size_t len = strcspn(p, ",");
        if (len && strncmp(e->op, p, len) == 0) return 1;
        p += len + (p[len] == ',');
    }
    return 0;
}

/* L3K_FUZZ_STATS=1: at exit, how many calls per entry succeeded, failed, were skipped. */
static long g_stats[N_ENTRIES][3];

static void print_stats(void) {
    for (int i = 0; i < N_ENTRIES; ++i)
        fprintf(stderr, "%-36s ok %8ld  refused %8ld  skipped %8ld\n", ENTRIES[i].op, g_stats[i][0],
                g_stats[i][1], g_stats[i][2]);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    if (getenv("L3K_FUZZ_STATS")) atexit(print_stats);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    call *c = calloc(1, sizeof *c);
    c->p = data;
    c->n = size;
    c->rng = 0x243f6a8885a308d3ull;
    for (size_t i = 0; i < size; ++i) c->rng = (c->rng ^ data[i]) * 0x100000001b3ull;
    const entry *e = &ENTRIES[pick(c, N_ENTRIES)];
    if (!entry_on(e)) {
        free(c);
        return 0;
    }
    const int st = e->fn(c);
    ++g_stats[e - ENTRIES][st == SKIPPED ? 2 : st != L3K_SUCCESS];
    if (st != SKIPPED) {
        if (st < L3K_SUCCESS || st > L3K_ERROR_INTERNAL) fail(e, c, st, "status out of range");
        if (c->must_fail && st == L3K_SUCCESS) fail(e, c, st, "a descriptor past 2^63 was accepted");
        if (st != L3K_SUCCESS) {
            const char *msg = l3k_last_error();
            const size_t len = strlen(e->op);
            if (strncmp(msg, e->op, len) != 0 || msg[len] != ':' || msg[len + 1] != ' ')
                fail(e, c, st, "the message does not start with the op's name");
            for (int i = 0; i < c->nt; ++i)
                if (c->t[i].snap && memcmp(c->t[i].snap, c->t[i].block, c->t[i].block_bytes) != 0) {
                    fprintf(stderr,
                            "fuzz_abi: the buffer of tensor %d (in the order the entry makes them) changed\n",
                            i);
                    fail(e, c, st, "a refused call changed a buffer");
                }
        }
    }
    for (int i = 0; i < c->nt; ++i) {
        free(c->t[i].block);
        free(c->t[i].snap);
    }
    free(c);
    return 0;
}
