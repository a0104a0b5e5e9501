/* Internal: replay of whole multi-kernel calls as CUDA graphs.
 *
 * A call such as l3k_llama_block_backward validates ~30 tensors and launches ~25
 * kernels and GEMMs; at small shapes its host time is several times its GPU time.
 * A training loop repeats the same calls with the same tensors (the caching
 * allocators of torch and others hand back the same addresses step after step), so
 * the second time a call is seen with exactly the same arguments it is captured as
 * a CUDA graph, and from then on the graph is launched instead: one launch, no
 * validation (the arguments are those of a call that passed it).
 *
 * The key is every argument the call's host code reads: each tensor's address,
 * offset, dtype, device, shape and strides, and the scalar settings.  Memory
 * contents are read by the kernels when they run, so a graph stays right when the
 * data changes; any change of address or shape is a different key.  A call made
 * while its stream is being captured (the caller's own CUDA graph) runs as usual. */
#ifndef L3K_GRAPH_CACHE_H_
#define L3K_GRAPH_CACHE_H_

#include <stdint.h>

#include "validate.h"

#define L3K_GRAPH_KEY_WORDS 1024

typedef struct {
    int usable; /* 0: an argument the key cannot describe (the call runs as usual) */
    int device; /* CUDA device of the call */
    int n;
    uint64_t w[L3K_GRAPH_KEY_WORDS];
} l3k_graph_key;

/* Start a key for call `op` (a distinct small integer per entry point) on the CUDA
 * device of `x`; unusable unless x is a well-formed CUDA tensor. */
void l3k_graph_key_init(l3k_graph_key *k, int op, const DLTensor *x);
void l3k_graph_key_word(l3k_graph_key *k, uint64_t v);
/* A tensor's metadata (NULL is a value of its own). */
void l3k_graph_key_tensor(l3k_graph_key *k, const DLTensor *t);

/* The call's body: validates, then enqueues its work on `stream`. */
typedef l3k_status (*l3k_graph_body)(l3k_call *c, const void *args, void *stream);

/* Run body(c, args, stream), or the graph captured from an earlier identical call,
 * or capture it now if this key was seen once before and its call succeeded. */
l3k_status l3k_graph_run(l3k_call *c, const l3k_graph_key *k, l3k_graph_body body, const void *args,
                         void *stream);

#endif /* L3K_GRAPH_CACHE_H_ */
