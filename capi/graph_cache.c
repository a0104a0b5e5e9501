/* Replay of repeated multi-kernel calls as CUDA graphs; see graph_cache.h. */
#include "graph_cache.h"

#include <stdlib.h>
#include <string.h>

#ifdef L3K_WITH_CUDA
#include <cuda_runtime_api.h>
#include <pthread.h>
#endif

void l3k_graph_key_word(l3k_graph_key *k, uint64_t v) {
    if (k->n < L3K_GRAPH_KEY_WORDS) k->w[k->n++] = v;
    else k->usable = 0;
}

void l3k_graph_key_init(l3k_graph_key *k, int op, const DLTensor *x) {
    k->n = 0;
    k->usable = x && x->device.device_type == kDLCUDA && x->device.device_id >= 0 && x->device.device_id < 64;
    k->device = k->usable ? (int)x->device.device_id : -1;
    l3k_graph_key_word(k, (uint64_t)op);
}

void l3k_graph_key_tensor(l3k_graph_key *k, const DLTensor *t) {
    if (!t) {
        l3k_graph_key_word(k, 0);
        return;
    }
    if (t->ndim < 0 || t->ndim > 8 || (t->ndim > 0 && !t->shape)) { /* left to validation to refuse */
        k->usable = 0;
        return;
    }
    l3k_graph_key_word(k, 1);
    l3k_graph_key_word(k, (uint64_t)(uintptr_t)t->data);
    l3k_graph_key_word(k, t->byte_offset);
    l3k_graph_key_word(k, (uint64_t)t->dtype.code | (uint64_t)t->dtype.bits << 8 |
                              (uint64_t)t->dtype.lanes << 16 |
                              (uint64_t)(uint32_t)t->device.device_type << 32);
    l3k_graph_key_word(k, (uint64_t)(uint32_t)t->device.device_id | (uint64_t)(uint32_t)t->ndim << 32 |
                              (uint64_t)(t->strides != NULL) << 63);
    for (int i = 0; i < t->ndim; ++i) l3k_graph_key_word(k, (uint64_t)t->shape[i]);
    if (t->strides)
        for (int i = 0; i < t->ndim; ++i) l3k_graph_key_word(k, (uint64_t)t->strides[i]);
}

#ifndef L3K_WITH_CUDA

int l3k_set_graph_replay(int enabled) { return 0; }

l3k_status l3k_graph_run(l3k_call *c, const l3k_graph_key *k, l3k_graph_body body, const void *args,
                         void *stream) {
    return body(c, args, stream);
}

#else

/* Enough for the training forward and backward of every layer of a 64-layer model; the least
 * recently used entry makes room. */
#define CAPACITY 160

typedef enum { SEEN = 1, READY, EAGER } entry_state; /* EAGER: capture failed, never retried */

typedef struct {
    entry_state state;
    uint64_t hash, last_use;
    int n, device;
    uint64_t *words;
    cudaGraphExec_t exec;
} entry;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_capture_lock = PTHREAD_MUTEX_INITIALIZER; /* one capture stream per device */
static entry g_entries[CAPACITY];
static uint64_t g_clock;
static cudaStream_t g_capture_stream[64];
static int g_enabled = -1; /* -1: not yet read from L3K_GRAPH_REPLAY */

static int enabled_locked(void) {
    if (g_enabled < 0) {
        const char *env = getenv("L3K_GRAPH_REPLAY");
        g_enabled = !(env && env[0] == '0' && env[1] == '\0');
    }
    return g_enabled;
}

static void drop_locked(entry *e) {
    if (e->exec) cudaGraphExecDestroy(e->exec); /* one still running is freed when it completes */
    free(e->words);
    memset(e, 0, sizeof *e);
}

int l3k_set_graph_replay(int enabled) {
    pthread_mutex_lock(&g_lock);
    const int prev = enabled_locked();
    g_enabled = enabled != 0;
    if (!g_enabled)
        for (int i = 0; i < CAPACITY; ++i)
            if (g_entries[i].state) drop_locked(&g_entries[i]);
    pthread_mutex_unlock(&g_lock);
    return prev;
}

static uint64_t hash_of(const l3k_graph_key *k) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a over the words */
    for (int i = 0; i < k->n; ++i) h = (h ^ k->w[i]) * 1099511628211ull;
    return h;
}

static entry *find_locked(const l3k_graph_key *k, uint64_t h) {
    for (int i = 0; i < CAPACITY; ++i) {
        entry *e = &g_entries[i];
        if (e->state && e->hash == h && e->n == k->n && e->device == k->device &&
            memcmp(e->words, k->w, (size_t)k->n * sizeof k->w[0]) == 0)
            return e;
    }
    return NULL;
}

/* A new entry for k (the least recently used one is dropped when full); NULL without memory. */
static entry *insert_locked(const l3k_graph_key *k, uint64_t h, entry_state state) {
    entry *slot = &g_entries[0];
    for (int i = 0; i < CAPACITY; ++i) {
        if (!g_entries[i].state) {
            slot = &g_entries[i];
            break;
        }
        if (g_entries[i].last_use < slot->last_use) slot = &g_entries[i];
    }
    if (slot->state) drop_locked(slot);
    uint64_t *words = malloc((size_t)k->n * sizeof *words);
    if (!words) return NULL;
    memcpy(words, k->w, (size_t)k->n * sizeof *words);
    *slot = (entry){state, h, ++g_clock, k->n, k->device, words, NULL};
    return slot;
}

/* Launch on `stream` with the call's device current, as l3k_cuda_launch does. */
static cudaError_t launch_on_device(cudaGraphExec_t exec, int device, void *stream) {
    int prev = -1;
    cudaError_t err = cudaGetDevice(&prev);
    if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
    if (err == cudaSuccess) err = cudaGraphLaunch(exec, (cudaStream_t)stream);
    if (prev >= 0 && prev != device) cudaSetDevice(prev);
    return err;
}

static l3k_status launch_status(l3k_call *c, cudaError_t err, int device) {
    if (err == cudaSuccess) return L3K_SUCCESS;
    return l3k_fail(c, L3K_ERROR_CUDA, "CUDA error %d (%s) on cuda:%d", (int)err, cudaGetErrorString(err),
                    device);
}

/* Capture body into a graph on this library's own stream of the device (the caller's may be
 * the legacy default stream, which cannot be captured); NULL when it cannot be. */
static cudaGraphExec_t capture(l3k_call *c, int device, l3k_graph_body body, const void *args) {
    cudaGraphExec_t exec = NULL;
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess || (prev != device && cudaSetDevice(device) != cudaSuccess)) {
        (void)cudaGetLastError();
        return NULL;
    }
    pthread_mutex_lock(&g_capture_lock);
    cudaStream_t s = g_capture_stream[device];
    if (s || cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess) {
        g_capture_stream[device] = s;
        cudaGraph_t graph = NULL;
        if (cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
            const l3k_status st = body(c, args, s);
            const cudaError_t end = cudaStreamEndCapture(s, &graph);
            if (st == L3K_SUCCESS && end == cudaSuccess && graph &&
                cudaGraphInstantiateWithFlags(&exec, graph, 0) != cudaSuccess)
                exec = NULL;
            if (graph) cudaGraphDestroy(graph);
        }
    }
    pthread_mutex_unlock(&g_capture_lock);
    (void)cudaGetLastError(); /* a failed capture is an answer (run as usual), not a sticky error */
    if (prev >= 0 && prev != device) cudaSetDevice(prev);
    return exec;
}

l3k_status l3k_graph_run(l3k_call *c, const l3k_graph_key *k, l3k_graph_body body, const void *args,
                         void *stream) {
    if (!k->usable || l3k_checking_only()) return body(c, args, stream);
    enum cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing((cudaStream_t)stream, &capturing) != cudaSuccess) {
        (void)cudaGetLastError();
        return body(c, args, stream); /* a bad stream gets the usual error */
    }
    if (capturing != cudaStreamCaptureStatusNone) return body(c, args, stream);

    const uint64_t h = hash_of(k);
    pthread_mutex_lock(&g_lock);
    if (!enabled_locked()) {
        pthread_mutex_unlock(&g_lock);
        return body(c, args, stream);
    }
    entry *e = find_locked(k, h);
    if (e) e->last_use = ++g_clock;
    if (e && e->state == READY) {
        const cudaError_t err = launch_on_device(e->exec, k->device, stream);
        pthread_mutex_unlock(&g_lock);
        return launch_status(c, err, k->device);
    }
    const int second_sight = e && e->state == SEEN;
    pthread_mutex_unlock(&g_lock);

    if (!second_sight) { /* first sight (or capture failed before): run, and remember a success */
        const l3k_status st = body(c, args, stream);
        if (st == L3K_SUCCESS && !e) {
            pthread_mutex_lock(&g_lock);
            if (!find_locked(k, h)) insert_locked(k, h, SEEN);
            pthread_mutex_unlock(&g_lock);
        }
        return st;
    }
    cudaGraphExec_t exec = capture(c, k->device, body, args);
    pthread_mutex_lock(&g_lock);
    e = find_locked(k, h);
    if (!e) e = insert_locked(k, h, SEEN);
    if (e && e->state == SEEN) {
        e->state = exec ? READY : EAGER;
        e->exec = exec;
        exec = NULL;
    }
    cudaError_t err = cudaSuccess;
    if (e && e->state == READY) err = launch_on_device(e->exec, k->device, stream);
    const int ran = e && e->state == READY;
    pthread_mutex_unlock(&g_lock);
    if (exec) cudaGraphExecDestroy(exec); /* another thread captured the same call first */
    return ran ? launch_status(c, err, k->device) : body(c, args, stream);
}

#endif
