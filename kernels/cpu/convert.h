/* Scalar conversions between the storage dtypes and float, for the CPU kernels.
 * Rounding is to nearest even, as the GPU's conversions do. */
#ifndef L3K_CPU_CONVERT_H_
#define L3K_CPU_CONVERT_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

static inline float l3k_bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t l3k_float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float l3k_bf16_to_float(uint16_t h) { return l3k_bits_to_float((uint32_t)h << 16); }

static inline uint16_t l3k_float_to_bf16(float f) {
    uint32_t u = l3k_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float l3k_f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return l3k_bits_to_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return l3k_bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t l3k_float_to_f16(float f) {
    uint32_t u = l3k_float_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;       /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u;      /* rounds past 65504: inf */
    if (a < 0x38800000u) {                            /* below 2^-14: subnormal or zero */
        float v = l3k_bits_to_float(a) * 16777216.0f; /* in units of 2^-24 */
        return sign | (uint16_t)lrintf(v);            /* lrintf rounds to nearest even */
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return sign | (uint16_t)(r >> 13);
}

static inline float l3k_load(const void *p, int64_t i, l3k_dt dt) {
    switch (dt) {
        case L3K_DT_F16:
            return l3k_f16_to_float(((const uint16_t *)p)[i]);
        case L3K_DT_BF16:
            return l3k_bf16_to_float(((const uint16_t *)p)[i]);
        default:
            return ((const float *)p)[i];
    }
}

static inline void l3k_store(void *p, int64_t i, float v, l3k_dt dt) {
    switch (dt) {
        case L3K_DT_F16:
            ((uint16_t *)p)[i] = l3k_float_to_f16(v);
            break;
        case L3K_DT_BF16:
            ((uint16_t *)p)[i] = l3k_float_to_bf16(v);
            break;
        default:
            ((float *)p)[i] = v;
    }
}

/* The value `v` takes once stored in dtype `dt` and read back. */
static inline float l3k_round(float v, l3k_dt dt) {
    switch (dt) {
        case L3K_DT_F16:
            return l3k_f16_to_float(l3k_float_to_f16(v));
        case L3K_DT_BF16:
            return l3k_bf16_to_float(l3k_float_to_bf16(v));
        default:
            return v;
    }
}

/* One RoPE table row, `half` values of cos and sin starting at element `at` of each table, in
 * float32; sin negated when `negate` (the inverse rotation). */
static inline void l3k_load_rope_row(const void *cos, const void *sin, int64_t at, int64_t half, l3k_dt dt,
                                     int negate, float *c, float *s) {
    for (int64_t p = 0; p < half; ++p) {
        c[p] = l3k_load(cos, at + p, dt);
        const float sv = l3k_load(sin, at + p, dt);
        s[p] = negate ? -sv : sv;
    }
}

#endif /* L3K_CPU_CONVERT_H_ */
