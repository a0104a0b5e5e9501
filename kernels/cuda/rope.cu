/* RoPE on q and k in one launch, CUDA.
 *
 * Two kernels.
 *
 * rope_fast (every row start and both tables 16-byte aligned, head_dim/2 a
 * multiple of E = 16 / sizeof(T), fewer than 2^31 tokens): a row is one head of
 * one token; P = head_dim / (2E) threads share a row, thread `slot` owning one
 * 16-byte piece of each half (rotate-half: pairs [E*slot, E*slot + E) of x1 and
 * x2; interleaved: the two consecutive 16-byte pieces holding those pairs).
 * A token's H = hq + hk rows (q heads, then k heads) are dealt to HL head
 * lanes, R rows each (lane, lane + HL, ...); a block holds TB tokens, and
 * gridDim.y splits a token's rows when H > HL * R.  Each thread reads its
 * cos/sin pieces once per token and reuses them for its R rows, issues all 2R
 * row loads before the first use, keeps the rows in storage form (8 registers
 * a row for 2-byte types), and does its index math in 32 bits except the
 * per-row pointer offsets (any int64 strides).
 *
 * rope_generic (everything else: misaligned views, odd half widths): P
 * threads share a row, 8 pairs each, scalar or 16-byte loads as alignment
 * allows, 64-bit index math. */
#include "common.cuh"

namespace {

/* ---- fast kernel ------------------------------------------------------------ */

struct fast_geom {
    int P;      /* threads per row: half / E */
    int HL;     /* head lanes per token */
    int G;      /* threads per token: P * HL */
    int TB;     /* tokens per block */
    int tokens; /* batch * seq */
    int seq, H, hq, half;
};

template <typename T>
__device__ __forceinline__ uint4 ld16(const T *p) {
    return *reinterpret_cast<const uint4 *>(p);
}
template <typename T>
__device__ __forceinline__ void st16(T *p, uint4 v) {
    *reinterpret_cast<uint4 *>(p) = v;
}

/* Two floats from a 4-byte word of a 16-byte vector of T (2-byte types). */
__device__ __forceinline__ float2 unpack2(uint32_t w, __nv_bfloat16 *) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(uint32_t w, __half *) {
    __half2 h = *reinterpret_cast<__half2 *>(&w);
    return __half22float2(h);
}

/* Element i (0..E) of a 16-byte piece of T, as float. */
template <typename T>
__device__ __forceinline__ float elem(const uint4 &v, int i) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    if constexpr (sizeof(T) == 4) {
        return __uint_as_float(w[i]);
    } else {
        const float2 f = unpack2(w[i / 2], (T *)nullptr);
        return (i & 1) ? f.y : f.x;
    }
}

/* A 16-byte piece of T from E floats. */
template <typename T>
__device__ __forceinline__ uint4 pack(const float *f) {
    if constexpr (sizeof(T) == 4) {
        return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                          __float_as_uint(f[3]));
    } else {
        return make_uint4(l3k_pack2<T>(f[0], f[1]), l3k_pack2<T>(f[2], f[3]), l3k_pack2<T>(f[4], f[5]),
                          l3k_pack2<T>(f[6], f[7]));
    }
}

/* E table values (pairs E*slot ..) of one table row, as floats. */
template <typename C, int E>
__device__ __forceinline__ void load_table(const C *__restrict__ row, float out[E]) {
    constexpr int PER16 = 16 / sizeof(C);
#pragma unroll
    for (int piece = 0; piece < E / PER16; ++piece) {
        const uint4 v = __ldg(reinterpret_cast<const uint4 *>(row) + piece);
#pragma unroll
        for (int i = 0; i < PER16; ++i) out[piece * PER16 + i] = elem<C>(v, i);
    }
}

template <typename T, typename C, bool INTER, int R>
__global__ void __launch_bounds__(256) rope_fast(const l3k_rope_args a, const fast_geom g) {
    constexpr int E = 16 / sizeof(T);
    const int tid = threadIdx.x;
    const int tsub = tid / g.G, r0 = tid - tsub * g.G;
    const int lane = r0 / g.P, slot = r0 - lane * g.P;
    const int tok = blockIdx.x * g.TB + tsub;
    if (tsub >= g.TB || tok >= g.tokens) return;
    const int b = tok / g.seq, s = tok - b * g.seq;
    const int h0 = blockIdx.y * (g.HL * R) + lane;

    /* Offsets of this thread's two pieces within a row, in elements. */
    const int o1 = INTER ? slot * 2 * E : slot * E;
    const int o2 = INTER ? o1 + E : o1 + g.half;

    const T *qin = (const T *)a.q + ((int64_t)b * a.q_strides[0] + (int64_t)s * a.q_strides[2]);
    const T *kin = (const T *)a.k + ((int64_t)b * a.k_strides[0] + (int64_t)s * a.k_strides[2]);

    uint4 x1[R], x2[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int h = h0 + r * g.HL;
        if (h < g.H) {
            const T *row = h < g.hq ? qin + (int64_t)h * a.q_strides[1]
                                    : kin + (int64_t)(h - g.hq) * a.k_strides[1];
            x1[r] = ld16(row + o1);
            x2[r] = ld16(row + o2);
        }
    }

    const int64_t trow = (int64_t)b * a.table_batch_stride + (int64_t)(s + a.offset) * g.half +
                         (int64_t)slot * E;
    float c[E], sn[E];
    load_table<C, E>((const C *)a.cos + trow, c);
    load_table<C, E>((const C *)a.sin + trow, sn);
    if (a.inverse) {
#pragma unroll
        for (int i = 0; i < E; ++i) sn[i] = -sn[i];
    }

    T *qout = (T *)a.q_out + ((int64_t)b * a.q_out_strides[0] + (int64_t)s * a.q_out_strides[2]);
    T *kout = (T *)a.k_out + ((int64_t)b * a.k_out_strides[0] + (int64_t)s * a.k_out_strides[2]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int h = h0 + r * g.HL;
        if (h < g.H) {
            float y1[E], y2[E];
            if (INTER) {
                /* piece 1 holds pairs 0 .. E/2, piece 2 pairs E/2 .. E */
#pragma unroll
                for (int p = 0; p < E / 2; ++p) {
                    const float a1 = elem<T>(x1[r], 2 * p), a2 = elem<T>(x1[r], 2 * p + 1);
                    y1[2 * p] = a1 * c[p] - a2 * sn[p];
                    y1[2 * p + 1] = a2 * c[p] + a1 * sn[p];
                    const float b1 = elem<T>(x2[r], 2 * p), b2 = elem<T>(x2[r], 2 * p + 1);
                    const int q = p + E / 2;
                    y2[2 * p] = b1 * c[q] - b2 * sn[q];
                    y2[2 * p + 1] = b2 * c[q] + b1 * sn[q];
                }
            } else {
#pragma unroll
                for (int i = 0; i < E; ++i) {
                    const float v1 = elem<T>(x1[r], i), v2 = elem<T>(x2[r], i);
                    y1[i] = v1 * c[i] - v2 * sn[i];
                    y2[i] = v2 * c[i] + v1 * sn[i];
                }
            }
            T *row = h < g.hq ? qout + (int64_t)h * a.q_out_strides[1]
                              : kout + (int64_t)(h - g.hq) * a.k_out_strides[1];
            st16(row + o1, pack<T>(y1));
            st16(row + o2, pack<T>(y2));
        }
    }
}

/* Launch geometry for rows-per-thread R and about `nt` threads a block. */
template <int R>
fast_geom fast_geometry(const l3k_rope_args &a, int E, int nt, unsigned *gy, unsigned *gx) {
    fast_geom g;
    g.half = (int)(a.head_dim / 2);
    g.P = g.half / E;
    g.H = (int)(a.hq + a.hk);
    g.hq = (int)a.hq;
    g.seq = (int)a.seq;
    g.tokens = (int)(a.batch * a.seq);
    const int max_lanes = nt / g.P > 0 ? nt / g.P : 1;
    const int lanes_wanted = (g.H + R - 1) / R;
    g.HL = lanes_wanted < max_lanes ? lanes_wanted : max_lanes;
    g.G = g.P * g.HL;
    g.TB = nt / g.G > 0 ? nt / g.G : 1;
    *gy = (unsigned)((g.H + g.HL * R - 1) / (g.HL * R));
    *gx = (unsigned)((g.tokens + g.TB - 1) / g.TB);
    return g;
}

template <typename T, typename C, bool INTER, int R>
int launch_fast_cfg(const l3k_rope_args &a, int nt, cudaStream_t st) {
    constexpr int E = 16 / sizeof(T);
    unsigned gx, gy;
    const fast_geom g = fast_geometry<R>(a, E, nt, &gy, &gx);
    rope_fast<T, C, INTER, R><<<dim3(gx, gy), (unsigned)(g.G * g.TB), 0, st>>>(a, g);
    return (int)cudaGetLastError();
}

/* Two rows a thread (four 16-byte loads in flight, 62 registers for bf16 with
 * float32 tables) wherever a token has rows to pair; R = 4, 5 or 8 measured
 * no faster on the H100 (within 0.3 us), R = 1 2.5 us slower. */
template <typename T, typename C, bool INTER>
int launch_fast(const l3k_rope_args &a, cudaStream_t st) {
    if (a.hq + a.hk >= 2) return launch_fast_cfg<T, C, INTER, 2>(a, 256, st);
    return launch_fast_cfg<T, C, INTER, 1>(a, 256, st);
}

/* ---- generic kernel --------------------------------------------------------- */

constexpr int HEADS_PER_STEP = 2;

struct row_ref {
    const void *in;
    void *out;
};

__device__ __forceinline__ row_ref row_of(const l3k_rope_args &a, int64_t h, int64_t b, int64_t s,
                                          size_t es) {
    row_ref r;
    if (h < a.hq) {
        r.in = (const char *)a.q +
               (b * a.q_strides[0] + h * a.q_strides[1] + s * a.q_strides[2]) * (int64_t)es;
        r.out = (char *)a.q_out +
                (b * a.q_out_strides[0] + h * a.q_out_strides[1] + s * a.q_out_strides[2]) * (int64_t)es;
    } else {
        h -= a.hq;
        r.in = (const char *)a.k +
               (b * a.k_strides[0] + h * a.k_strides[1] + s * a.k_strides[2]) * (int64_t)es;
        r.out = (char *)a.k_out +
                (b * a.k_out_strides[0] + h * a.k_out_strides[1] + s * a.k_out_strides[2]) * (int64_t)es;
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
__device__ __forceinline__ void rotate_store(T *row, int slot, int64_t half, float v[16], const float c[8],
                                             const float sn[8]) {
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
__global__ void __launch_bounds__(512) rope_generic(const l3k_rope_args a, int P, int HB, int TB) {
    const int64_t tokens = a.batch * a.seq, half = a.head_dim / 2, H = a.hq + a.hk;
    const int slot = threadIdx.x % P, lane = threadIdx.x / P;
    const float sign = a.inverse ? -1.0f : 1.0f;
    for (int64_t tok = (int64_t)blockIdx.x * TB + threadIdx.y; tok < tokens; tok += (int64_t)gridDim.x * TB) {
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
    if (vec) rope_generic<T, C, true, INTER><<<(unsigned)blocks, block, 0, st>>>(a, P, HB, TB);
    else rope_generic<T, C, false, INTER><<<(unsigned)blocks, block, 0, st>>>(a, P, HB, TB);
    return (int)cudaGetLastError();
}

template <typename T, typename C>
int launch_table(const l3k_rope_args &a, bool vec, bool fast, cudaStream_t st) {
    if (fast) return a.interleaved ? launch_fast<T, C, true>(a, st) : launch_fast<T, C, false>(a, st);
    return a.interleaved ? launch<T, C, true>(a, vec, st) : launch<T, C, false>(a, vec, st);
}

/* rope_fast takes the call: 16-byte rows and tables (vec), whole 16-byte pieces
 * per half row, and sizes that its 32-bit index math and grid can hold. */
bool fast_ok(const l3k_rope_args &a, bool vec) {
    const int64_t E = 16 / (int64_t)l3k_dt_size(a.dtype), half = a.head_dim / 2;
    const int64_t lim = 0x7fffffff;
    return vec && half > 0 && half % E == 0 && a.batch * a.seq <= lim && a.hq + a.hk <= 65535 &&
           a.seq + a.offset <= lim;
}

} // namespace

extern "C" int l3k_cuda_rope(const l3k_rope_args *a, void *stream) {
    const size_t es = l3k_dt_size(a->dtype), tes = l3k_dt_size(a->table_dtype);
    const int64_t half = a->head_dim / 2;
    const int64_t qsz[3] = {a->batch, a->hq, a->seq}, ksz[3] = {a->batch, a->hk, a->seq};
    /* Vector loads need every row (and each half row for rotate-half) to start
     * on 16 bytes, and 16-byte pieces that never straddle the row's end. */
    const int64_t piece_span = a->interleaved ? a->head_dim : half;
    bool vec = ((size_t)piece_span * es) % 16 == 0 && ((size_t)half * tes) % 16 == 0 && ptr16(a->cos) &&
               ptr16(a->sin) && rows16(a->q, a->q_strides, qsz, es) &&
               rows16(a->q_out, a->q_out_strides, qsz, es);
    if (a->hk > 0)
        vec = vec && rows16(a->k, a->k_strides, ksz, es) && rows16(a->k_out, a->k_out_strides, ksz, es);
    const bool fast = fast_ok(*a, vec);
    cudaStream_t st = (cudaStream_t)stream;
    int err = 0;
    if (a->table_dtype == L3K_DT_F32) {
        L3K_DISPATCH_DTYPE(a->dtype, err = launch_table<T, float>(*a, vec, fast, st));
    } else {
        L3K_DISPATCH_DTYPE(a->dtype, err = launch_table<T, T>(*a, vec, fast, st));
    }
    return err;
}
