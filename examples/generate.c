/* l3k_generate: greedy text generation with a KV cache, from plain C, on llama3-kernels' C ABI.
 *
 *   l3k_generate MODEL.bin PROMPT_IDS NEW_TOKENS
 *   e.g. l3k_generate model.bin 1,15,7,42,3 16
 *
 * reads a LLaMA model (the format below) into float32 host buffers, runs the prompt (token ids,
 * comma-separated) through every layer in one prefill call of l3k_llama_block_decode, then one
 * call per new token, each appending the tokens' keys and values to the layer's KV cache; after
 * each call the final RMSNorm and the LM head run on the last position and the next token is the
 * argmax of its logits (the first on ties, as torch.argmax).  Prints the NEW_TOKENS new ids (not
 * the prompt's), comma-separated, on stdout; on an error prints it (with l3k_last_error() for a
 * library call) on stderr and exits with status 1.  Batch 1, on the CPU (the library's reference
 * kernels).  The same greedy tokens as Hugging Face's generate(do_sample=False) of the model
 * exported (tests/python/test_c_generate.py).
 *
 * Build, with only l3k.h (and libc) besides the library:
 *   cc -O2 examples/generate.c -I capi -L <libdir> -ll3k -Wl,-rpath,<libdir>
 * or the CMake target l3k_generate (configured with BUILD_TESTING).
 *
 * Model file, written by python/llama3_kernels/examples/export_c.py (write_model), little-endian:
 *   header, 40 bytes: the magic "L3KM"; int32 version (1); int32 vocab, dim, hidden, n_layers,
 *     n_heads, n_kv_heads, max_positions; float32 eps (of every RMSNorm).
 *     head_dim = dim / n_heads, kv_dim = n_kv_heads * head_dim.
 *   then float32 arrays, row-major, one after the other:
 *     cos, sin        (max_positions, head_dim/2)  rotate-half RoPE tables: row p is position p, the
 *                                                  first half of what Hugging Face's rotary
 *                                                  embedding gives (any rope scaling applied)
 *     embedding       (vocab, dim)
 *     for each of the n_layers layers, l3k_llama_block_weights' fused layout:
 *       qkv_weight     (dim + 2 * kv_dim, dim)     q rows, then k rows, then v rows
 *       o_weight       (dim, dim)
 *       gate_up_weight (2 * hidden, dim)           gate rows, then up rows
 *       down_weight    (dim, hidden)
 *       norm1_weight   (dim)                       before the attention
 *       norm2_weight   (dim)                       before the MLP
 *     norm            (dim)                        the final RMSNorm
 *     lm_head         (vocab, dim)
 *   and nothing after.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "l3k.h"

/* ---- error handling -------------------------------------------------------------------------- */

/* Prints "l3k_generate: <message>" on stderr and exits with status 1. */
static void die(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "l3k_generate: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    exit(EXIT_FAILURE);
}

/* Every library call: on failure, the status and the library's message, then exit. */
#define CHECK(call)                                                                                      \
    do {                                                                                                 \
        const l3k_status st_ = (call);                                                                   \
        if (st_ != L3K_SUCCESS) {                                                                        \
            fprintf(stderr, "l3k_generate: %s:%d: %s: %s\n", __FILE__, __LINE__, l3k_status_string(st_), \
                    l3k_last_error());                                                                   \
            exit(EXIT_FAILURE);                                                                          \
        }                                                                                                \
    } while (0)

/* 64-byte aligned memory (the library wants 16 for its workspace), or exit. */
static void *alloc_check(size_t bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    void *p = aligned_alloc(64, rounded ? rounded : 64);
    if (!p) die("out of memory (%zu bytes)", bytes);
    return p;
}

/* a * b and a + b of sizes >= 0, or exit when they pass INT64_MAX (sizes from a file are not trusted). */
static int64_t mul_check(int64_t a, int64_t b) {
    if (a != 0 && b > INT64_MAX / a) die("a size in the model file overflows");
    return a * b;
}
static int64_t add_check(int64_t a, int64_t b) {
    if (b > INT64_MAX - a) die("a size in the model file overflows");
    return a + b;
}

/* ---- host tensors ------------------------------------------------------------------------------ */

/* A DLTensor on the CPU that owns its shape (compact row-major: strides NULL). */
typedef struct {
    DLTensor t;
    int64_t shape[4];
} Tensor;

static DLTensor *tensor(Tensor *h, void *data, uint8_t code, uint8_t bits, int ndim, const int64_t *shape) {
    memset(h, 0, sizeof *h);
    memcpy(h->shape, shape, sizeof(int64_t) * (size_t)ndim);
    h->t.data = data;
    h->t.device.device_type = kDLCPU;
    h->t.ndim = ndim;
    h->t.dtype.code = code;
    h->t.dtype.bits = bits;
    h->t.dtype.lanes = 1;
    h->t.shape = h->shape;
    return &h->t;
}
static DLTensor *f32(Tensor *h, float *data, int ndim, const int64_t *shape) {
    return tensor(h, data, kDLFloat, 32, ndim, shape);
}
static DLTensor *i32(Tensor *h, int32_t *data, int ndim, const int64_t *shape) {
    return tensor(h, data, kDLInt, 32, ndim, shape);
}
/* A workspace of `bytes` (NULL when 0, as the library allows). */
static DLTensor *workspace(Tensor *h, void **buf, size_t bytes) {
    *buf = bytes ? alloc_check(bytes) : NULL;
    const int64_t n = (int64_t)bytes;
    return bytes ? tensor(h, *buf, kDLUInt, 8, 1, &n) : NULL;
}

/* ---- the model --------------------------------------------------------------------------------- */

typedef struct {
    int32_t vocab, dim, hidden, n_layers, n_heads, n_kv_heads, max_positions;
    float eps;
    int64_t head_dim;
} Config;

enum { QKV, O, GATE_UP, DOWN, NORM1, NORM2, N_BLOCK };

typedef struct {
    float *data[N_BLOCK];
    Tensor t[N_BLOCK];
    l3k_llama_block_weights w; /* points at t */
} Layer;

typedef struct {
    Config c;
    float *cos, *sin, *embedding, *norm, *lm_head;
    Tensor t_cos, t_sin, t_norm, t_lm_head;
    Layer *layers;
} Model;

/* The shape of block weight i. */
static void block_shape(const Config *c, int i, int64_t shape[2]) {
    const int64_t dim = c->dim, kv = c->n_kv_heads * c->head_dim;
    const int64_t rows[N_BLOCK] = {dim + 2 * kv, dim, 2 * (int64_t)c->hidden, dim, dim, dim};
    const int64_t cols[N_BLOCK] = {dim, dim, dim, c->hidden, 1, 1};
    shape[0] = rows[i];
    shape[1] = cols[i];
}

/* The float32 elements after the header, as the format above lists them. */
static int64_t model_floats(const Config *c) {
    int64_t layer = 0;
    for (int i = 0; i < N_BLOCK; ++i) {
        int64_t s[2];
        block_shape(c, i, s);
        layer = add_check(layer, mul_check(s[0], s[1]));
    }
    const int64_t tables = mul_check(2 * (int64_t)c->max_positions, c->head_dim / 2);
    const int64_t embeddings = mul_check(2 * (int64_t)c->vocab, c->dim);
    return add_check(add_check(tables, embeddings), add_check(mul_check(c->n_layers, layer), c->dim));
}

static void read_config(FILE *f, const char *path, Config *c) {
    char magic[4];
    int32_t v[8];
    if (fread(magic, 1, 4, f) != 4 || fread(v, 4, 8, f) != 8 || fread(&c->eps, 4, 1, f) != 1)
        die("%s: file ends inside the 40-byte header (truncated?)", path);
    if (memcmp(magic, "L3KM", 4) != 0) die("%s: not a model file (no magic \"L3KM\")", path);
    if (v[0] != 1) die("%s: format version is not 1", path);
    c->vocab = v[1], c->dim = v[2], c->hidden = v[3], c->n_layers = v[4];
    c->n_heads = v[5], c->n_kv_heads = v[6], c->max_positions = v[7];
    for (int i = 1; i < 8; ++i)
        if (v[i] <= 0) die("%s: a size in the header is not positive", path);
    if (c->dim % c->n_heads || c->n_heads % c->n_kv_heads || (c->dim / c->n_heads) % 2)
        die("%s: dim, n_heads and n_kv_heads do not divide (head_dim must be even)", path);
    c->head_dim = c->dim / c->n_heads;
}

/* n float32 values from f into new memory. */
static float *read_floats(FILE *f, const char *path, int64_t n) {
    float *p = alloc_check(sizeof(float) * (size_t)n);
    if (fread(p, sizeof(float), (size_t)n, f) != (size_t)n) die("%s: file ends early (truncated?)", path);
    return p;
}

static void load_model(Model *m, const char *path) {
    const uint16_t one = 1;
    if (*(const uint8_t *)&one != 1) die("this program reads little-endian files on little-endian hosts");
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    Config *c = &m->c;
    read_config(f, path, c);
    /* The size first: a truncated or overlong file is refused before anything is allocated. */
    const int64_t want = add_check(40, mul_check(4, model_floats(c)));
    if (fseek(f, 0, SEEK_END) != 0) die("cannot seek in %s", path);
    const long have = ftell(f);
    if (have != want)
        die("%s: %ld bytes, expected %lld for the sizes in its header (%s)", path, have, (long long)want,
            have < want ? "truncated?" : "extra bytes at the end");
    if (fseek(f, 40, SEEK_SET) != 0) die("cannot seek in %s", path);

    const int64_t tab[2] = {c->max_positions, c->head_dim / 2}, vd[2] = {c->vocab, c->dim}, d[1] = {c->dim};
    m->cos = read_floats(f, path, tab[0] * tab[1]);
    m->sin = read_floats(f, path, tab[0] * tab[1]);
    m->embedding = read_floats(f, path, vd[0] * vd[1]);
    m->layers = calloc((size_t)c->n_layers, sizeof(Layer));
    if (!m->layers) die("out of memory");
    for (int32_t l = 0; l < c->n_layers; ++l) {
        Layer *L = &m->layers[l];
        DLTensor *t[N_BLOCK];
        for (int i = 0; i < N_BLOCK; ++i) {
            int64_t s[2];
            block_shape(c, i, s);
            L->data[i] = read_floats(f, path, s[0] * s[1]);
            t[i] = f32(&L->t[i], L->data[i], i < NORM1 ? 2 : 1, s);
        }
        const l3k_llama_block_weights w0 = L3K_LLAMA_BLOCK_WEIGHTS_INIT;
        L->w = w0;
        L->w.qkv_weight = t[QKV], L->w.o_weight = t[O], L->w.gate_up_weight = t[GATE_UP];
        L->w.down_weight = t[DOWN], L->w.norm1_weight = t[NORM1], L->w.norm2_weight = t[NORM2];
    }
    m->norm = read_floats(f, path, c->dim);
    m->lm_head = read_floats(f, path, vd[0] * vd[1]);
    fclose(f);
    f32(&m->t_cos, m->cos, 2, tab);
    f32(&m->t_sin, m->sin, 2, tab);
    f32(&m->t_norm, m->norm, 1, d);
    f32(&m->t_lm_head, m->lm_head, 2, vd);
}

static void free_model(Model *m) {
    for (int32_t l = 0; l < m->c.n_layers; ++l)
        for (int i = 0; i < N_BLOCK; ++i) free(m->layers[l].data[i]);
    void *owned[] = {m->layers, m->cos, m->sin, m->embedding, m->norm, m->lm_head};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; ++i) free(owned[i]);
}

/* ---- the decoding state ------------------------------------------------------------------------ */

/* What decoding needs besides the weights.  max_seq: the most tokens of one call (the prompt's). */
typedef struct {
    float **k, **v;                   /* per layer: (1, n_kv_heads, capacity, head_dim) */
    Tensor *tk, *tv;                  /* their tensors */
    float *x, *out, *normed, *logits; /* (max_seq, dim) twice, (dim), (vocab) */
    void *block_buf, *head_buf;       /* the workspaces of the block and of the LM head */
    Tensor t_block_ws, t_head_ws;     /* their tensors */
    DLTensor *block_ws, *head_ws;     /* &t_block_ws.t, &t_head_ws.t, or NULL where 0 bytes */
    l3k_llama_block_config cfg;
} State;

/* The block decode workspace for calls of `seq` tokens (layer 0's weights and cache: all alike). */
static size_t block_ws_bytes(const Model *m, State *s, int64_t seq) {
    Tensor tx, tr;
    int32_t range[2] = {0, 0};
    const int64_t sx[3] = {1, seq, m->c.dim}, sr[2] = {1, 2};
    l3k_kv_cache cache = L3K_KV_CACHE_INIT;
    cache.k = &s->tk[0].t;
    cache.v = &s->tv[0].t;
    cache.cache_range = i32(&tr, range, 2, sr);
    size_t bytes = 0;
    CHECK(l3k_llama_block_decode_workspace_size(f32(&tx, s->x, 3, sx), &m->layers[0].w, &s->cfg, &cache,
                                                &bytes));
    return bytes;
}

static void init_state(State *s, const Model *m, int64_t capacity, int64_t max_seq) {
    const Config *c = &m->c;
    const l3k_llama_block_config cfg0 = L3K_LLAMA_BLOCK_CONFIG_INIT;
    s->cfg = cfg0;
    s->cfg.n_heads = c->n_heads;
    s->cfg.n_kv_heads = c->n_kv_heads;
    s->cfg.eps = c->eps;
    s->k = calloc((size_t)c->n_layers, sizeof(float *));
    s->v = calloc((size_t)c->n_layers, sizeof(float *));
    s->tk = calloc((size_t)c->n_layers, sizeof(Tensor));
    s->tv = calloc((size_t)c->n_layers, sizeof(Tensor));
    if (!s->k || !s->v || !s->tk || !s->tv) die("out of memory");
    const int64_t sc[4] = {1, c->n_kv_heads, capacity, c->head_dim};
    const size_t cache_bytes = sizeof(float) * (size_t)mul_check(sc[1] * sc[2], sc[3]);
    for (int32_t l = 0; l < c->n_layers; ++l) {
        s->k[l] = alloc_check(cache_bytes);
        s->v[l] = alloc_check(cache_bytes);
        f32(&s->tk[l], s->k[l], 4, sc);
        f32(&s->tv[l], s->v[l], 4, sc);
    }
    s->x = alloc_check(sizeof(float) * (size_t)(max_seq * c->dim));
    s->out = alloc_check(sizeof(float) * (size_t)(max_seq * c->dim));
    s->normed = alloc_check(sizeof(float) * (size_t)c->dim);
    s->logits = alloc_check(sizeof(float) * (size_t)c->vocab);
    /* One workspace for every call: the larger of the prefill's and a single token's. */
    const size_t prefill = block_ws_bytes(m, s, max_seq), step = block_ws_bytes(m, s, 1);
    s->block_ws = workspace(&s->t_block_ws, &s->block_buf, prefill > step ? prefill : step);
    Tensor tn;
    const int64_t sn[2] = {1, c->dim};
    size_t head = 0;
    CHECK(l3k_linear_workspace_size(f32(&tn, s->normed, 2, sn), &head));
    s->head_ws = workspace(&s->t_head_ws, &s->head_buf, head);
}

static void free_state(State *s, const Model *m) {
    for (int32_t l = 0; l < m->c.n_layers; ++l) {
        free(s->k[l]);
        free(s->v[l]);
    }
    void *owned[] = {s->k, s->v, s->tk, s->tv, s->x, s->out, s->normed, s->logits, s->block_buf, s->head_buf};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; ++i) free(owned[i]);
}

/* ---- one step ---------------------------------------------------------------------------------- */

/* The first index of the largest value (torch.argmax's pick on ties). */
static int32_t argmax(const float *v, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; ++i)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Runs `seq` tokens at positions pos .. pos + seq - 1 through the model, their keys and values
 * into the caches; returns the greedy next token after the last of them. */
static int32_t forward(const Model *m, State *s, const int32_t *tokens, int64_t seq, int64_t pos) {
    const Config *c = &m->c;
    for (int64_t i = 0; i < seq; ++i)
        memcpy(s->x + i * c->dim, m->embedding + (int64_t)tokens[i] * c->dim, sizeof(float) * (size_t)c->dim);

    /* The cache holds slots [0, pos + seq) once the call's tokens are in; the first new token
     * takes RoPE row pos of the stored tables. */
    int32_t range[2] = {0, (int32_t)(pos + seq)}, first[1] = {(int32_t)pos};
    Tensor tx, to, tr, tp;
    const int64_t sx[3] = {1, seq, c->dim}, sr[2] = {1, 2}, sp[1] = {1};
    DLTensor *x = f32(&tx, s->x, 3, sx), *out = f32(&to, s->out, 3, sx);
    l3k_kv_cache cache = L3K_KV_CACHE_INIT;
    cache.cache_range = i32(&tr, range, 2, sr);
    cache.positions = i32(&tp, first, 1, sp);
    for (int32_t l = 0; l < c->n_layers; ++l) {
        cache.k = &s->tk[l].t;
        cache.v = &s->tv[l].t;
        CHECK(l3k_llama_block_decode(x, &m->t_cos.t, &m->t_sin.t, &m->layers[l].w, &s->cfg, &cache, out,
                                     s->block_ws, NULL));
        DLTensor *t = x; /* this layer's output is the next one's input */
        x = out;
        out = t;
    }

    /* The final norm and the LM head on the last position only. */
    Tensor tl, tn, tg;
    const int64_t sl[2] = {1, c->dim}, sg[2] = {1, c->vocab};
    float *last = (float *)x->data + (seq - 1) * c->dim;
    DLTensor *normed = f32(&tn, s->normed, 2, sl);
    CHECK(l3k_rmsnorm_forward(f32(&tl, last, 2, sl), &m->t_norm.t, c->eps, normed, NULL, NULL));
    CHECK(l3k_linear_forward(normed, &m->t_lm_head.t, NULL, f32(&tg, s->logits, 2, sg), s->head_ws, NULL));
    return argmax(s->logits, c->vocab);
}

/* ---- main -------------------------------------------------------------------------------------- */

/* The prompt's ids from "1,15,7": n of them, each in [0, vocab), or exit. */
static int32_t *parse_ids(const char *s, int64_t *n, int32_t vocab) {
    int64_t count = 1;
    for (const char *p = s; *p; ++p) count += *p == ',';
    int32_t *ids = alloc_check(sizeof(int32_t) * (size_t)count);
    const char *p = s;
    for (int64_t i = 0; i < count; ++i) {
        char *e;
        const long v = strtol(p, &e, 10);
        if (e == p || (*e != ',' && *e != '\0') || v < 0 || v >= vocab)
            die("PROMPT_IDS \"%s\": expected comma-separated token ids in [0, %d)", s, (int)vocab);
        ids[i] = (int32_t)v;
        p = e + 1; /* past the comma (the last id ends the string and the loop) */
    }
    *n = count;
    return ids;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.bin PROMPT_IDS NEW_TOKENS  (e.g. model.bin 1,15,7,42 16)\n",
                argv[0]);
        return EXIT_FAILURE;
    }
    Model m;
    load_model(&m, argv[1]);
    int64_t n_prompt;
    int32_t *prompt = parse_ids(argv[2], &n_prompt, m.c.vocab);
    char *e;
    const long n_new = strtol(argv[3], &e, 10);
    if (e == argv[3] || *e != '\0' || n_new < 1 || n_new > INT32_MAX)
        die("NEW_TOKENS \"%s\": expected a count from 1", argv[3]);
    /* The last new token is printed, not fed back: the cache holds n_prompt + n_new - 1 tokens. */
    const int64_t capacity = n_prompt + n_new - 1;
    if (capacity > m.c.max_positions)
        die("%s: %lld prompt + %ld new tokens need %lld RoPE rows, the file has %d (max_positions)", argv[1],
            (long long)n_prompt, n_new, (long long)capacity, (int)m.c.max_positions);

    State s;
    init_state(&s, &m, capacity, n_prompt);
    int32_t *generated = alloc_check(sizeof(int32_t) * (size_t)n_new);
    generated[0] = forward(&m, &s, prompt, n_prompt, 0);
    for (int64_t i = 1; i < n_new; ++i)
        generated[i] = forward(&m, &s, &generated[i - 1], 1, n_prompt + i - 1);
    for (int64_t i = 0; i < n_new; ++i) printf(i ? ",%d" : "%d", (int)generated[i]);
    printf("\n");

    free(generated);
    free(prompt);
    free_state(&s, &m);
    free_model(&m);
    return EXIT_SUCCESS;
}
