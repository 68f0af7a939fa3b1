/* The machinery the CPU decode kernels share: fp32/bf16/fp16 row loads and stores, a
 * vectorizable exp, block dot products, and the attention of a GQA group's query heads over the
 * K/V rows an id list names (attend). Included by the executor (cpu_decode.c) and by the methods
 * whose choice and attention run in one C call (sparse_infer/decode/<method>.c). All static
 * inline but attend: the executor defines it once for the whole library (its head-dim
 * instances are most of the compile, and the methods attend exactly as the executor does).
 *
 * Tensors are addressed as (base pointer, strides in elements); rows have unit last stride.
 * dtype: 0 float32, 1 bfloat16, 2 float16 (all tensors the same); math in float32.
 */
#ifndef SPARSE_INFER_CPU_ATTEND_H
#define SPARSE_INFER_CPU_ATTEND_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_D 1024
/* Rows are processed in blocks of ROW_BLOCK slots that stay in L1 while each query head sweeps
 * them with its query (or its output accumulator) held in registers. */
#define ROW_BLOCK 32

/* GCC/Clang vector extensions: 16 floats, lowered to whatever vector width the target has */
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16u __attribute__((vector_size(64), aligned(4)));      /* unaligned loads/stores */
typedef int32_t vi16 __attribute__((vector_size(64)));

/* exp(x) for x <= 0 (softmax numerators after the max is taken out), written out so that the
 * loop over a score row vectorizes (libm's expf is a call per element). 2^k * p(r) with
 * r = x - k ln2 in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial: relative error < 3e-7
 * (2.3e-7 measured over [-87, 0]). Inputs below -87 (e^-87 ~ 1.6e-38, the float range) give 0. */
static inline float exp_nonpositive(float x) {
    if (x < -87.f) return 0.f;
    float k = __builtin_roundf(x * 1.44269504088896341f);
    float r = x - k * 0.693145751953125f - k * 1.428606765330187045e-06f;
    float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    int32_t bits = (int32_t)(k + 127.f) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {       /* round to nearest even, NaN kept */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void load_row(const void *base, int64_t offset, int dtype, int D, float *dst) {
    if (dtype == 1) {
        const uint16_t *p = (const uint16_t *)base + offset;
        for (int d = 0; d < D; d++) dst[d] = bf16_to_f32(p[d]);
    } else {
        const _Float16 *p = (const _Float16 *)base + offset;
        for (int d = 0; d < D; d++) dst[d] = (float)p[d];
    }
}

static inline void store_row(void *base, int64_t offset, int dtype, int D, const float *src) {
    if (dtype == 0) {
        memcpy((float *)base + offset, src, (size_t)D * sizeof(float));
    } else if (dtype == 1) {
        uint16_t *p = (uint16_t *)base + offset;
        for (int d = 0; d < D; d++) p[d] = f32_to_bf16(src[d]);
    } else {
        _Float16 *p = (_Float16 *)base + offset;
        for (int d = 0; d < D; d++) p[d] = (_Float16)src[d];
    }
}

/* Lane sums of 16 vectors: result lane r = sum of part[r]'s lanes. Pairs are folded in four
 * rounds (two shuffles and an add per pair) instead of 16 separate horizontal sums. */
#define LO16 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI16 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO8 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define HI8 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define LO4 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define HI4 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define LO2 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define HI2 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
static inline __attribute__((always_inline)) vf16 sum16(vf16 *part) {
    const vi16 lo16 = {LO16}, hi16 = {HI16}, lo8 = {LO8}, hi8 = {HI8}, lo4 = {LO4}, hi4 = {HI4},
               lo2 = {LO2}, hi2 = {HI2};
    vf16 x[8], y[4], z[2];
    for (int r = 0; r < 8; r++)
        x[r] = __builtin_shuffle(part[2 * r], part[2 * r + 1], lo16) + __builtin_shuffle(part[2 * r], part[2 * r + 1], hi16);
    for (int r = 0; r < 4; r++)
        y[r] = __builtin_shuffle(x[2 * r], x[2 * r + 1], lo8) + __builtin_shuffle(x[2 * r], x[2 * r + 1], hi8);
    for (int r = 0; r < 2; r++)
        z[r] = __builtin_shuffle(y[2 * r], y[2 * r + 1], lo4) + __builtin_shuffle(y[2 * r], y[2 * r + 1], hi4);
    return __builtin_shuffle(z[0], z[1], lo2) + __builtin_shuffle(z[0], z[1], hi2);
}

/* s[i] = q . rows[i] for the count rows of a block (D floats each): with D a multiple of 16, the
 * query stays in registers and 16 rows' lane sums are taken at once (sum16). */
static inline __attribute__((always_inline)) void dot_rows(float *s, const float *q, const float *const *rows,
                                                           int count, int D) {
    int i = 0;
    if (D % 16 == 0 && D <= 128) {
        vf16 qv[8];
        for (int c = 0; c < D / 16; c++) qv[c] = *(const vf16u *)(q + 16 * c);
        for (; i + 16 <= count; i += 16) {
            vf16 part[16];
            for (int r = 0; r < 16; r++) {
                const vf16u *row = (const vf16u *)rows[i + r];
                vf16 x = qv[0] * row[0];
                for (int c = 1; c < D / 16; c++) x += qv[c] * row[c];
                part[r] = x;
            }
            *(vf16u *)(s + i) = sum16(part);
        }
    }
    for (; i < count; i++) {
        const float *row = rows[i];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < D; d++) dot += q[d] * row[d];
        s[i] = dot;
    }
}

/* The G query rows h0 .. h0+G-1 of batch row b as fp32, times `scale`, into qf (G * D). */
static inline void load_queries(float *qf, const void *q, int b, int h0, int64_t q_sb, int64_t q_sh,
                                int G, int D, int dtype, float scale) {
    for (int g = 0; g < G; g++) {
        float *qg = qf + (int64_t)g * D;
        int64_t off = b * q_sb + (int64_t)(h0 + g) * q_sh;
        if (dtype == 0) memcpy(qg, (const float *)q + off, (size_t)D * sizeof(float));
        else load_row(q, off, dtype, D, qg);
        for (int d = 0; d < D; d++) qg[d] *= scale;
    }
}

/* Threads for `tasks` independent (batch row, index row) tasks: no more than there are tasks. */
static inline int team_size(int num_threads, int tasks) {
    if (num_threads > tasks) num_threads = tasks;
    return num_threads < 1 ? 1 : num_threads;
}

/* Query heads h0 .. h0+G-1 of batch row b over the K slots `ids` of cache head kvh: scores,
 * softmax, weighted V sum, written to G output rows. Slots outside [0, n) are unused; mask
 * (may be NULL) as sparse_decode_rows takes it. scratch: G * (K + 2 * D + 1) + (ROW_BLOCK + 1) * D
 * floats. Defined in cpu_decode.c; hidden: not an entry point of the library. */
__attribute__((visibility("hidden"))) void attend(
        int b, int64_t kvh, int h0, const int64_t *ids,
        const void *q, int64_t q_sb, int64_t q_sh,
        const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
        const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
        const uint8_t *mask, int64_t m_sb, int64_t m_sh, int64_t m_sn,
        void *out, int64_t o_sb, int64_t o_sh,
        int G, int K, int64_t n, int D, float scaling, float softcap, int dtype,
        float *scratch);

/* The attention of query heads h0 .. h0+G-1 over the chosen keys (no mask); nothing chosen
 * gives zeros, as the executors do. */
static inline void attend_chosen(int b, int64_t kvh, int h0, const int64_t *keys, int64_t count,
                                 const void *q, int64_t q_sb, int64_t q_sh,
                                 const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                                 const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                                 void *out, int64_t o_sb, int64_t o_sh, int G, int64_t n, int D,
                                 float scaling, float softcap, int dtype, float *scratch) {
    if (count == 0) {
        float zeros[MAX_D] = {0};
        for (int g = 0; g < G; g++) store_row(out, b * o_sb + (int64_t)(h0 + g) * o_sh, dtype, D, zeros);
        return;
    }
    attend(b, kvh, h0, keys, q, q_sb, q_sh, k, k_sb, k_sh, k_sn, v, v_sb, v_sh, v_sn,
           NULL, 0, 0, 0, out, o_sb, o_sh, G, (int)count, n, D, scaling, softcap, dtype, scratch);
}

#endif
