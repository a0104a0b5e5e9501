/* RoPE on q and k in one launch, CUDA.
 *
 * Geometry: a row is one head of one token (head_dim elements).  Its
 * head_dim/2 rotation pairs are cut into slots of 8 pairs; P threads share a
 * row, thread `slot` owning pairs [8*slot, 8*slot + 8).  A block covers TB
 * tokens (threadIdx.y) and, for each, all q heads then all k heads: HB head
 * lanes (threadIdx.x / P), each lane taking two heads per step so that two
 * rows' loads are in flight before either is rotated.  cos/sin for a token
 * are read once per thread and reused for every head it rotates (the other
 * threads of the token hit L1/L2).
 *
 * Loads: rotate-half reads 8 elements from each half of the row, interleaved
 * reads 16 consecutive elements; 16-byte vectors where every row start and
 * the table rows are 16-byte aligned, else a scalar path. */
#include "common.cuh"

namespace {

constexpr int HEADS_PER_STEP = 2;

struct row_ref {
    const void *in;
    void *out;
};

__device__ __forceinline__ row_ref row_of(const l3k_rope_args &a, int64_t h, int64_t b, int64_t s,
                                          size_t es) {
    row_ref r;
    if (h < a.hq) {
        r.in = (const char *)a.q + (b * a.q_strides[0] + h * a.q_strides[1] + s * a.q_strides[2]) * (int64_t)es;
        r.out = (char *)a.q_out + (b * a.q_out_strides[0] + h * a.q_out_strides[1] + s * a.q_out_strides[2]) * (int64_t)es;
    } else {
        h -= a.hq;
        r.in = (const char *)a.k + (b * a.k_strides[0] + h * a.k_strides[1] + s * a.k_strides[2]) * (int64_t)es;
        r.out = (char *)a.k_out + (b * a.k_out_strides[0] + h * a.k_out_strides[1] + s * a.k_out_strides[2]) * (int64_t)es;
    }
    return r;
}

/* The 16 values of one slot: x1 in v[0..8) and x2 in v[8..16) for rotate-half;
 * 8 (x1, x2) pairs in order for interleaved. */
template <typename T, bool VEC, bool INTER>
__device__ __forceinline__ void load_slot(const T *row, int slot, int64_t half, float v[16]) {
    if (INTER) {
        l3k_load8<T, VEC>(row, (int64_t)slot * 16, 2 * half, v);
        l3k_load8<T, VEC>(row, (int64_t)slot * 16 + 8, 2 * half, v + 8);
    } else {
        l3k_load8<T, VEC>(row, (int64_t)slot * 8, half, v);
        l3k_load8<T, VEC>(row + half, (int64_t)slot * 8, half, v + 8);
    }
}

template <typename T, bool VEC, bool INTER>
__device__ __forceinline__ void rotate_store(T *row, int slot, int64_t half, float v[16],
                                             const float c[8], const float sn[8]) {
    float o[16];
    if (INTER) {
#pragma unroll
        for (int p = 0; p < 8; ++p) {
            const float x1 = v[2 * p], x2 = v[2 * p + 1];
            o[2 * p] = x1 * c[p] - x2 * sn[p];
            o[2 * p + 1] = x2 * c[p] + x1 * sn[p];
        }
        l3k_store8<T, VEC>(row, (int64_t)slot * 16, 2 * half, o);
        l3k_store8<T, VEC>(row, (int64_t)slot * 16 + 8, 2 * half, o + 8);
    } else {
#pragma unroll
        for (int p = 0; p < 8; ++p) {
            const float x1 = v[p], x2 = v[p + 8];
            o[p] = x1 * c[p] - x2 * sn[p];
            o[p + 8] = x2 * c[p] + x1 * sn[p];
        }
        l3k_store8<T, VEC>(row, (int64_t)slot * 8, half, o);
        l3k_store8<T, VEC>(row + half, (int64_t)slot * 8, half, o + 8);
    }
}

template <typename T, typename C, bool VEC, bool INTER>
__global__ void __launch_bounds__(512) rope_kernel(const l3k_rope_args a, int P, int HB, int TB) {
    const int64_t tokens = a.batch * a.seq, half = a.head_dim / 2, H = a.hq + a.hk;
    const int slot = threadIdx.x % P, lane = threadIdx.x / P;
    const float sign = a.inverse ? -1.0f : 1.0f;
    for (int64_t tok = (int64_t)blockIdx.x * TB + threadIdx.y; tok < tokens;
         tok += (int64_t)gridDim.x * TB) {
        const int64_t b = tok / a.seq, s = tok - b * a.seq;
        const int64_t trow = b * a.table_batch_stride + (s + a.offset) * half;
        float c[8], sn[8];
        l3k_load8<C, VEC>((const C *)a.cos + trow, (int64_t)slot * 8, half, c);
        l3k_load8<C, VEC>((const C *)a.sin + trow, (int64_t)slot * 8, half, sn);
#pragma unroll
        for (int p = 0; p < 8; ++p) sn[p] *= sign;
        for (int64_t h0 = lane; h0 < H; h0 += (int64_t)HEADS_PER_STEP * HB) {
            row_ref r[HEADS_PER_STEP];
            bool live[HEADS_PER_STEP];
            float v[HEADS_PER_STEP][16];
#pragma unroll
            for (int u = 0; u < HEADS_PER_STEP; ++u) {
                const int64_t h = h0 + (int64_t)u * HB;
                live[u] = h < H;
                if (live[u]) {
                    r[u] = row_of(a, h, b, s, sizeof(T));
                    load_slot<T, VEC, INTER>((const T *)r[u].in, slot, half, v[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < HEADS_PER_STEP; ++u)
                if (live[u]) rotate_store<T, VEC, INTER>((T *)r[u].out, slot, half, v[u], c, sn);
        }
    }
}

bool ptr16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Every row start of a (batch, heads, seq, .) view is 16-byte aligned. */
bool rows16(const void *p, const int64_t st[3], const int64_t sizes[3], size_t es) {
    if (!ptr16(p)) return false;
    for (int i = 0; i < 3; ++i)
        if (sizes[i] > 1 && ((st[i] * (int64_t)es) % 16) != 0) return false;
    return true;
}

template <typename T, typename C, bool INTER>
int launch(const l3k_rope_args &a, bool vec, cudaStream_t st) {
    const int64_t half = a.head_dim / 2, H = a.hq + a.hk, tokens = a.batch * a.seq;
    const int P = (int)((half + 7) / 8);
    const int64_t lanes_wanted = (H + HEADS_PER_STEP - 1) / HEADS_PER_STEP;
    const int HB = (int)l3k_clamp64(lanes_wanted, 1, 512 / P);
    const int TB = (int)l3k_clamp64(256 / (P * HB), 1, 64);
    const int64_t blocks = l3k_clamp64((tokens + TB - 1) / TB, 1, 0x7fffffff);
    const dim3 block((unsigned)(P * HB), (unsigned)TB);
    if (vec) rope_kernel<T, C, true, INTER><<<(unsigned)blocks, block, 0, st>>>(a, P, HB, TB);
    else rope_kernel<T, C, false, INTER><<<(unsigned)blocks, block, 0, st>>>(a, P, HB, TB);
    return (int)cudaGetLastError();
}

template <typename T, typename C>
int launch_table(const l3k_rope_args &a, bool vec, cudaStream_t st) {
    return a.interleaved ? launch<T, C, true>(a, vec, st) : launch<T, C, false>(a, vec, st);
}

} // namespace

extern "C" int l3k_cuda_rope(const l3k_rope_args *a, void *stream) {
    const size_t es = l3k_dt_size(a->dtype), tes = l3k_dt_size(a->table_dtype);
    const int64_t half = a->head_dim / 2;
    const int64_t qsz[3] = {a->batch, a->hq, a->seq}, ksz[3] = {a->batch, a->hk, a->seq};
    /* Vector loads need every row (and each half row for rotate-half) to start
     * on 16 bytes, and 16-byte pieces that never straddle the row's end. */
    const int64_t piece_span = a->interleaved ? a->head_dim : half;
    bool vec = ((size_t)piece_span * es) % 16 == 0 && ((size_t)half * tes) % 16 == 0 &&
               ptr16(a->cos) && ptr16(a->sin) && rows16(a->q, a->q_strides, qsz, es) &&
               rows16(a->q_out, a->q_out_strides, qsz, es);
    if (a->hk > 0)
        vec = vec && rows16(a->k, a->k_strides, ksz, es) && rows16(a->k_out, a->k_out_strides, ksz, es);
    cudaStream_t st = (cudaStream_t)stream;
    int err = 0;
    if (a->table_dtype == L3K_DT_F32) {
        L3K_DISPATCH_DTYPE(a->dtype, err = launch_table<T, float>(*a, vec, st));
    } else {
        L3K_DISPATCH_DTYPE(a->dtype, err = launch_table<T, T>(*a, vec, st));
    }
    return err;
}
