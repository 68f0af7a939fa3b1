/* Sparse decode on the CPU: one query token per (batch row, index head) attends to the
 * K/V rows its index list names, reading them in place.
 *
 * Why C: the torch executor has to copy the selected rows (index_select) and then read the
 * copy; on a memory-bound CPU that costs about three passes over the selected bytes, and a
 * few dozen small torch ops per layer. Here each selected K row and V row is read once, for
 * all G query heads that share the index list. Built at first use by cpu_decode.py; the
 * contract is the torch executor's (sparse_infer/kernels/sparse_decode.py).
 *
 * Layout: query/out (B, Hq, 1, D), key/value (B, Hkv, n, D) with any strides whose last one
 * is 1, indices int64 (B, Hi, K) with last stride 1, -1 (or anything outside [0, n)) = unused
 * slot, kv_heads int64 (Hi,): the cache head index row r reads; row r serves query heads
 * r*G .. r*G+G-1. mask: optional uint8 (B, 1|Hq, 1, n), nonzero = may attend (its head
 * stride is 0 when it broadcasts). dtype: 0 float32, 1 bfloat16, 2 float16 (all tensors the
 * same); math in float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_D 1024
/* Rows are processed in blocks of ROW_BLOCK slots that stay in L1 while each query head sweeps
 * them with its query (or its output accumulator) held in registers. */
#define ROW_BLOCK 32
/* Selected rows are scattered, so the hardware prefetcher cannot follow them: while resolving a
 * slot, ask for the row PREFETCH_AHEAD slots on, and (pass 1) for the V row of the slot itself,
 * which pass 2 then finds in cache. Cold caches are the normal case in a model (each layer's
 * weights evict the previous layer's K/V): 128 measured best of 32 / 64 / 128. */
#define PREFETCH_AHEAD 128
/* GCC/Clang vector extensions: 16 floats, lowered to whatever vector width the target has */
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16u __attribute__((vector_size(64), aligned(4)));      /* unaligned loads/stores */
typedef int32_t vi16 __attribute__((vector_size(64)));

/* locality 0: a row read once now; 2: a row read again later in this call */
static inline void prefetch_row(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 0);
}

static inline void prefetch_row_for_later(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}

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

static void store_row(void *base, int64_t offset, int dtype, int D, const float *src) {
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

/* rows[0..count) <- the slots j0.. of ids: in place for float32, converted into buf otherwise,
 * a zero row for an unused slot (its score is set to -inf, its weight is 0). Prefetches the
 * slot PREFETCH_AHEAD on, and the slot's own row of `later` (V, during pass 1) when given. */
static inline __attribute__((always_inline)) void resolve_rows(
        const float **rows, float *buf, const int64_t *ids, int j0, int count, int K,
        const void *base, int64_t row_base, int64_t stride_n, int64_t n, int D, int dtype,
        const float *zeros, int64_t elem, int64_t row_bytes,
        const void *later, int64_t later_base, int64_t later_sn) {
    for (int i = 0; i < count; i++) {
        int j = j0 + i;
        if (j + PREFETCH_AHEAD < K) {
            int64_t ahead = ids[j + PREFETCH_AHEAD];
            if (ahead >= 0 && ahead < n) prefetch_row((const char *)base + (row_base + ahead * stride_n) * elem, row_bytes);
        }
        int64_t t = ids[j];
        if (t < 0 || t >= n) {
            rows[i] = zeros;
            continue;
        }
        if (later) prefetch_row_for_later((const char *)later + (later_base + t * later_sn) * elem, row_bytes);
        if (dtype == 0) rows[i] = (const float *)base + row_base + t * stride_n;
        else { load_row(base, row_base + t * stride_n, dtype, D, buf + (int64_t)i * D); rows[i] = buf + (int64_t)i * D; }
    }
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

/* score[0..m) <- per_head[0..m) for one head, else the sum over the G heads of each head's
 * softmax of its row of per_head (G * m, overwritten): the group's soft vote. */
static void group_vote(float *score, float *per_head, int G, int64_t m) {
    if (G == 1) {
        memcpy(score, per_head, (size_t)m * sizeof(float));
        return;
    }
    for (int64_t e = 0; e < m; e++) score[e] = 0.f;
    for (int g = 0; g < G; g++) {
        float *row = per_head + (int64_t)g * m, top = -INFINITY, sum = 0.f;
        for (int64_t e = 0; e < m; e++) top = row[e] > top ? row[e] : top;
#pragma omp simd reduction(+ : sum)
        for (int64_t e = 0; e < m; e++) {
            float x = exp_nonpositive(row[e] - top);
            row[e] = x;
            sum += x;
        }
        float inv = 1.f / sum;
        for (int64_t e = 0; e < m; e++) score[e] += row[e] * inv;
    }
}

/* The G query rows h0 .. h0+G-1 of batch row b as fp32, times `scale`, into qf (G * D). */
static void load_queries(float *qf, const void *q, int b, int h0, int64_t q_sb, int64_t q_sh,
                         int G, int D, int dtype, float scale) {
    for (int g = 0; g < G; g++) {
        float *qg = qf + (int64_t)g * D;
        int64_t off = b * q_sb + (int64_t)(h0 + g) * q_sh;
        if (dtype == 0) memcpy(qg, (const float *)q + off, (size_t)D * sizeof(float));
        else load_row(q, off, dtype, D, qg);
        for (int d = 0; d < D; d++) qg[d] *= scale;
    }
}

/* Query heads h0 .. h0+G-1 of batch row b over the K slots `ids` of cache head kvh: scores,
 * softmax, weighted V sum, written to G output rows.
 * scratch: G * (K + 2 * D + 1) + (ROW_BLOCK + 1) * D floats. */
static inline __attribute__((always_inline)) void attend_one(int b, int64_t kvh, int h0, const int64_t *ids,
                       const void *q, int64_t q_sb, int64_t q_sh,
                       const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                       const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                       const uint8_t *mask, int64_t m_sb, int64_t m_sh, int64_t m_sn,
                       void *out, int64_t o_sb, int64_t o_sh,
                       int G, int K, int64_t n, int D, float scaling, float softcap, int dtype,
                       float *scratch) {
    float *scores = scratch;                          /* head g, slot j at g * K + j */
    float *qf = scores + (int64_t)G * K;              /* head g at g * D */
    float *acc = qf + (int64_t)G * D;                 /* head g at g * D */
    float *total = acc + (int64_t)G * D;              /* head g at g */
    float *vbuf = total + G;                          /* ROW_BLOCK * D: converted 16-bit rows */
    float *zeros = vbuf + (int64_t)ROW_BLOCK * D;     /* D */
    memset(zeros, 0, (size_t)D * sizeof(float));

    load_queries(qf, q, b, h0, q_sb, q_sh, G, D, dtype, scaling);

    /* pass 1: q.k for every slot, per block of rows (kept in L1), per head with its query in
     * registers; 16 rows' dot products are summed across lanes together (sum16) */
    const int64_t k_base = b * k_sb + kvh * k_sh;
    const int64_t elem = dtype == 0 ? 4 : 2, row_bytes = (int64_t)D * elem;
    const float *rows[ROW_BLOCK];
    for (int j0 = 0; j0 < K; j0 += ROW_BLOCK) {
        int count = K - j0 < ROW_BLOCK ? K - j0 : ROW_BLOCK;
        resolve_rows(rows, vbuf, ids, j0, count, K, k, k_base, k_sn, n, D, dtype, zeros, elem, row_bytes,
                     v, b * v_sb + kvh * v_sh, v_sn);
        for (int g = 0; g < G; g++) dot_rows(scores + (int64_t)g * K + j0, qf + (int64_t)g * D, rows, count, D);
        for (int i = 0; i < count; i++) {
            int64_t t = ids[j0 + i];
            int unused = t < 0 || t >= n;
            for (int g = 0; g < G; g++) {
                float *s = scores + (int64_t)g * K + j0 + i;
                if (softcap > 0.f) *s = softcap * tanhf(*s / softcap);
                if (unused || (mask && !mask[b * m_sb + (int64_t)(h0 + g) * m_sh + t * m_sn])) *s = -INFINITY;
            }
        }
    }

    /* softmax numerators; a head with nothing allowed gets all zeros (and outputs zeros) */
    for (int g = 0; g < G; g++) {
        float *s = scores + (int64_t)g * K;
        float m = -INFINITY, sum = 0.f;
        for (int j = 0; j < K; j++) m = s[j] > m ? s[j] : m;
        if (m == -INFINITY) {
            memset(s, 0, (size_t)K * sizeof(float));
        } else {
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < K; j++) {
                float e = s[j] == -INFINITY ? 0.f : exp_nonpositive(s[j] - m);   /* unused slots: 0 */
                s[j] = e;
                sum += e;
            }
        }
        total[g] = sum;
    }
    memset(acc, 0, (size_t)G * D * sizeof(float));

    /* pass 2: weighted sum of V. Per block of rows (kept in L1) and per head, the head's output
     * accumulator stays in registers across the block's rows when D is a multiple of 16. */
    const int64_t v_base = b * v_sb + kvh * v_sh;
    for (int j0 = 0; j0 < K; j0 += ROW_BLOCK) {
        int count = K - j0 < ROW_BLOCK ? K - j0 : ROW_BLOCK;
        resolve_rows(rows, vbuf, ids, j0, count, K, v, v_base, v_sn, n, D, dtype, zeros, elem, row_bytes, NULL, 0, 0);
        if (D % 16 == 0 && D <= 128) {
            for (int g = 0; g < G; g++) {
                const float *p = scores + (int64_t)g * K + j0;
                float *a = acc + (int64_t)g * D;
                vf16 sum[8];
                for (int c = 0; c < D / 16; c++) sum[c] = *(const vf16u *)(a + 16 * c);
                for (int i = 0; i < count; i++) {
                    const vf16u *vr = (const vf16u *)rows[i];
                    float w = p[i];
                    for (int c = 0; c < D / 16; c++) sum[c] += w * vr[c];
                }
                for (int c = 0; c < D / 16; c++) *(vf16u *)(a + 16 * c) = sum[c];
            }
        } else {
            for (int g = 0; g < G; g++) {
                const float *p = scores + (int64_t)g * K + j0;
                float *a = acc + (int64_t)g * D;
                for (int i = 0; i < count; i++) {
#pragma omp simd
                    for (int d = 0; d < D; d++) a[d] += p[i] * rows[i][d];
                }
            }
        }
    }

    for (int g = 0; g < G; g++) {
        float *a = acc + (int64_t)g * D;
        float inv = total[g] > 0.f ? 1.f / total[g] : 0.f;
        for (int d = 0; d < D; d++) a[d] *= inv;
        store_row(out, b * o_sb + (int64_t)(h0 + g) * o_sh, dtype, D, a);
    }
}

/* attend_one with the head dim as a compile-time constant for the common sizes: the dot
 * products and row updates then unroll fully (measured ~1.5x faster at D = 64) */
static void attend(int b, int64_t kvh, int h0, const int64_t *ids,
                   const void *q, int64_t q_sb, int64_t q_sh,
                   const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                   const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                   const uint8_t *mask, int64_t m_sb, int64_t m_sh, int64_t m_sn,
                   void *out, int64_t o_sb, int64_t o_sh,
                   int G, int K, int64_t n, int D, float scaling, float softcap, int dtype,
                   float *scratch) {
#define ATTEND(DIM) attend_one(b, kvh, h0, ids, q, q_sb, q_sh, k, k_sb, k_sh, k_sn, v, v_sb, v_sh, v_sn, \
                               mask, m_sb, m_sh, m_sn, out, o_sb, o_sh, G, K, n, DIM, scaling, softcap, \
                               dtype, scratch)
    if (D == 64) ATTEND(64);
    else if (D == 128) ATTEND(128);
    else ATTEND(D);
#undef ATTEND
}

/* Threads for `tasks` independent (batch row, index row) tasks: no more than there are tasks. */
static inline int team_size(int num_threads, int tasks) {
    if (num_threads > tasks) num_threads = tasks;
    return num_threads < 1 ? 1 : num_threads;
}

/* Returns 0 on success, 1 on bad sizes, 2 when scratch could not be allocated. */
int sparse_decode_rows(const void *q, int64_t q_sb, int64_t q_sh,
                       const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                       const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                       const int64_t *idx, int64_t i_sb, int64_t i_sh,
                       const int64_t *kv_heads,
                       const uint8_t *mask, int64_t m_sb, int64_t m_sh, int64_t m_sn,
                       void *out, int64_t o_sb, int64_t o_sh,
                       int B, int Hi, int G, int K, int64_t n, int D,
                       float scaling, float softcap, int dtype, int num_threads) {
    if (D > MAX_D || D <= 0 || G <= 0 || K <= 0 || dtype < 0 || dtype > 2) return 1;
    int failed = 0;
    int tasks = B * Hi;
    num_threads = team_size(num_threads, tasks);
    size_t scratch_floats = (size_t)G * ((size_t)K + 2 * (size_t)D + 1) + (ROW_BLOCK + 1) * (size_t)D;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* every thread reaches the worksharing loop, even one whose allocation failed */
        float *scratch = (float *)malloc(scratch_floats * sizeof(float));
#pragma omp for schedule(static)
        for (int task = 0; task < tasks; task++) {
            if (!scratch) { failed |= 2; continue; }
            int b = task / Hi, r = task % Hi;
            attend(b, kv_heads[r], r * G, idx + b * i_sb + r * i_sh, q, q_sb, q_sh, k, k_sb, k_sh, k_sn,
                       v, v_sb, v_sh, v_sn, mask, m_sb, m_sh, m_sn, out, o_sb, o_sh,
                       G, K, n, D, scaling, softcap, dtype, scratch);
        }
        free(scratch);
    }
    return failed;
}

/* ------------------------------------------------------------------------------------------
 * Quest, selection and attention in one call (no mask; sparse_infer/decode/quest.py holds the
 * method and the page bounds). Per (batch row b, index row r), r serving query heads
 * r*G .. r*G+G-1 of cache head r*Hkv/Hi:
 *   bound_g(p) = scaling * sum_d max(q_gd * kmin_pd, q_gd * kmax_pd)   (softcapped if asked)
 *   score(p)   = bound_0(p) when G == 1, else sum_g softmax_g(bound_g)(p) over eligible pages
 * Eligible pages hold a key in [lo, hi) = [min(sink, n), max(n - local, lo)); the best
 * min(budget_pages, eligible) of them (ties: either) are read, their keys within [lo, hi), plus
 * the keys [0, lo) and [hi, n). The same selection as quest.select + the executor, in one pass
 * over the bounds and one over the selected rows, without index tensors. The keys
 * [fold_from, n) are first folded into kmin/kmax (quest.update_bounds' per-step update, without
 * its two torch ops); fold_from = n folds nothing.
 */

/* The attention of query heads h0 .. h0+G-1 over the chosen keys (no mask); nothing chosen
 * gives zeros, as the executors do. */
static void attend_chosen(int b, int64_t kvh, int h0, const int64_t *keys, int64_t count,
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

/* Reorder ids[0..m) so that its first k entries have the k largest scores (quickselect). */
static void top_k_first(const float *score, int64_t *ids, int64_t m, int64_t k) {
    int64_t lo = 0, hi = m - 1, want = k - 1;
    while (lo < hi) {
        float pivot = score[ids[lo + (hi - lo) / 2]];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (score[ids[i]] > pivot) i++;
            while (score[ids[j]] < pivot) j--;
            if (i <= j) {
                int64_t t = ids[i];
                ids[i] = ids[j];
                ids[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
}

/* Upper bounds of q.k over each eligible page, for the G heads: bounds[g * eligible + e].
 * max(q_d mn_d, q_d mx_d) = max(q_d, 0) mx_d + min(q_d, 0) mn_d (mn <= mx): two FMAs per
 * element. Pages go in blocks (kept in L1) and per head, as the attention's rows do.
 * buf: 2 * ROW_BLOCK * D floats (16-bit bounds converted). */
static inline __attribute__((always_inline)) void page_bounds(
        float *bounds, const float *qf, const void *kmin, const void *kmax, int b, int64_t kvh,
        int64_t a_sb, int64_t a_sh, int64_t a_sp, int64_t z_sb, int64_t z_sh, int64_t z_sp,
        int64_t first_page, int64_t eligible, int G, int D, float scaling, float softcap, int dtype,
        float *buf) {
    const float *mns[ROW_BLOCK], *mxs[ROW_BLOCK];
    float qpos[MAX_D], qneg[MAX_D];
    for (int64_t e0 = 0; e0 < eligible; e0 += ROW_BLOCK) {
        int count = eligible - e0 < ROW_BLOCK ? (int)(eligible - e0) : ROW_BLOCK;
        for (int i = 0; i < count; i++) {
            int64_t p = first_page + e0 + i;
            int64_t mo = b * a_sb + kvh * a_sh + p * a_sp, xo = b * z_sb + kvh * z_sh + p * z_sp;
            if (dtype == 0) { mns[i] = (const float *)kmin + mo; mxs[i] = (const float *)kmax + xo; }
            else {
                float *mn = buf + (int64_t)i * D, *mx = buf + (int64_t)(ROW_BLOCK + i) * D;
                load_row(kmin, mo, dtype, D, mn);
                load_row(kmax, xo, dtype, D, mx);
                mns[i] = mn;
                mxs[i] = mx;
            }
        }
        for (int g = 0; g < G; g++) {
            const float *qg = qf + (int64_t)g * D;
            float *out = bounds + (int64_t)g * eligible + e0;
            for (int d = 0; d < D; d++) {
                qpos[d] = qg[d] > 0.f ? qg[d] : 0.f;
                qneg[d] = qg[d] < 0.f ? qg[d] : 0.f;
            }
            int i = 0;
            if (D % 16 == 0 && D <= 128) {
                vf16 pv[8], nv[8];
                for (int c = 0; c < D / 16; c++) {
                    pv[c] = *(const vf16u *)(qpos + 16 * c);
                    nv[c] = *(const vf16u *)(qneg + 16 * c);
                }
                for (; i + 16 <= count; i += 16) {
                    vf16 part[16];
                    for (int r = 0; r < 16; r++) {
                        const vf16u *mn = (const vf16u *)mns[i + r], *mx = (const vf16u *)mxs[i + r];
                        vf16 x = pv[0] * mx[0] + nv[0] * mn[0];
                        for (int c = 1; c < D / 16; c++) x += pv[c] * mx[c] + nv[c] * mn[c];
                        part[r] = x;
                    }
                    *(vf16u *)(out + i) = sum16(part);
                }
            }
            for (; i < count; i++) {
                const float *mn = mns[i], *mx = mxs[i];
                float bound = 0.f;
#pragma omp simd reduction(+ : bound)
                for (int d = 0; d < D; d++) bound += qpos[d] * mx[d] + qneg[d] * mn[d];
                out[i] = bound;
            }
            for (i = 0; i < count; i++) {
                float bound = out[i] * scaling;
                out[i] = softcap > 0.f ? softcap * tanhf(bound / softcap) : bound;
            }
        }
    }
}

/* Fold key row `key_off` into its page's bounds; the page's first key sets them. Min and max
 * pick one of the values, so 16-bit bounds stay exact. */
static void fold_key(void *kmin, int64_t min_off, void *kmax, int64_t max_off, const void *k, int64_t key_off,
                     int first, int D, int dtype) {
    if (dtype == 0) {
        float *mn = (float *)kmin + min_off, *mx = (float *)kmax + max_off;
        const float *kr = (const float *)k + key_off;
        for (int d = 0; d < D; d++) {
            mn[d] = first || kr[d] < mn[d] ? kr[d] : mn[d];
            mx[d] = first || kr[d] > mx[d] ? kr[d] : mx[d];
        }
        return;
    }
    uint16_t *mn = (uint16_t *)kmin + min_off, *mx = (uint16_t *)kmax + max_off;
    const uint16_t *kr = (const uint16_t *)k + key_off;
    float x[MAX_D], lo[MAX_D], hi[MAX_D];
    load_row(k, key_off, dtype, D, x);
    load_row(kmin, min_off, dtype, D, lo);
    load_row(kmax, max_off, dtype, D, hi);
    for (int d = 0; d < D; d++) {
        if (first || x[d] < lo[d]) mn[d] = kr[d];
        if (first || x[d] > hi[d]) mx[d] = kr[d];
    }
}

int quest_decode_rows(const void *q, int64_t q_sb, int64_t q_sh,
                      void *kmin, int64_t a_sb, int64_t a_sh, int64_t a_sp,
                      void *kmax, int64_t z_sb, int64_t z_sh, int64_t z_sp,
                      const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                      const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                      void *out, int64_t o_sb, int64_t o_sh,
                      int64_t *selected,                       /* (B * Hi) keys read per row */
                      int B, int Hi, int G, int Hkv, int64_t n, int D, int64_t page,
                      int64_t sink, int64_t local, int64_t budget_pages, int64_t fold_from,
                      float scaling, float softcap, int dtype, int num_threads) {
    if (D > MAX_D || D <= 0 || G <= 0 || page <= 0 || n <= 0 || dtype < 0 || dtype > 2) return 1;
    /* the keys that arrived since the last step, into the bounds (a few rows: one thread) */
    for (int b = 0; b < B; b++)
        for (int64_t h = 0; h < Hkv; h++)
            for (int64_t t = fold_from < 0 ? 0 : fold_from; t < n; t++)
                fold_key(kmin, b * a_sb + h * a_sh + (t / page) * a_sp, kmax, b * z_sb + h * z_sh + (t / page) * z_sp,
                         k, b * k_sb + h * k_sh + t * k_sn, t % page == 0, D, dtype);
    const int64_t lo = sink < n ? sink : n;
    const int64_t hi = n - local > lo ? n - local : lo;
    const int64_t first_page = lo / page, end_page = hi > lo ? (hi + page - 1) / page : first_page;
    const int64_t eligible = end_page - first_page;
    const int64_t take = budget_pages < eligible ? budget_pages : eligible;
    const int64_t max_keys = lo + (n - hi) + take * page;
    int failed = 0;
    int tasks = B * Hi;
    num_threads = team_size(num_threads, tasks);
    /* bounds G * eligible, score eligible + 1, query G * D, attention G * (max_keys + 2D + 1) */
    size_t floats = (size_t)G * (size_t)eligible + (size_t)eligible + 1 + (size_t)G * (size_t)D
                    + (size_t)G * ((size_t)max_keys + 2 * (size_t)D + 1) + (2 * ROW_BLOCK + 1) * (size_t)D;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scratch = (float *)malloc(floats * sizeof(float));
        int64_t *ids = (int64_t *)malloc(((size_t)eligible + (size_t)max_keys + 1) * sizeof(int64_t));
#pragma omp for schedule(static)
        for (int task = 0; task < tasks; task++) {
            if (!scratch || !ids) { failed |= 2; continue; }
            const int b = task / Hi, r = task % Hi, h0 = r * G;
            const int64_t kvh = (int64_t)r * Hkv / Hi;
            float *bounds = scratch;                           /* head g, page e at g * eligible + e */
            float *score = bounds + (size_t)G * eligible;      /* eligible (+1) */
            float *qf = score + eligible + 1;                  /* G * D */
            float *attend_scratch = qf + (size_t)G * D;
            int64_t *pages = ids, *keys = ids + eligible;

            /* unscaled: the bound is scaled after the sum, as quest.upper_bounds does */
            load_queries(qf, q, b, h0, q_sb, q_sh, G, D, dtype, 1.f);
            /* bounds: one pass over the eligible pages' min/max rows (head dim constant when common) */
#define BOUNDS(DIM) page_bounds(bounds, qf, kmin, kmax, b, kvh, a_sb, a_sh, a_sp, z_sb, z_sh, z_sp, \
                                first_page, eligible, G, DIM, scaling, softcap, dtype, attend_scratch)
            if (D == 64) BOUNDS(64);
            else if (D == 128) BOUNDS(128);
            else BOUNDS(D);
#undef BOUNDS
            /* page scores: the raw bound for one head, else the group's summed softmaxes */
            group_vote(score, bounds, G, eligible);
            for (int64_t e = 0; e < eligible; e++) pages[e] = e;
            if (take < eligible) top_k_first(score, pages, eligible, take);
            /* the keys: sinks, the chosen pages' keys inside [lo, hi), the local window */
            int64_t count = 0;
            for (int64_t t = 0; t < lo; t++) keys[count++] = t;
            for (int64_t i = 0; i < take; i++) {
                int64_t p = first_page + pages[i];
                int64_t start = p * page > lo ? p * page : lo, stop = (p + 1) * page < hi ? (p + 1) * page : hi;
                for (int64_t t = start; t < stop; t++) keys[count++] = t;
            }
            for (int64_t t = hi; t < n; t++) keys[count++] = t;
            selected[task] = count;
            attend_chosen(b, kvh, h0, keys, count, q, q_sb, q_sh, k, k_sb, k_sh, k_sn, v, v_sb, v_sh, v_sn,
                          out, o_sb, o_sh, G, n, D, scaling, softcap, dtype, attend_scratch);
        }
        free(scratch);
        free(ids);
    }
    return failed;
}

/* ------------------------------------------------------------------------------------------
 * The continuity fingerprint of sparse_infer/decode/__init__.py without torch ops: a few key
 * rows per (batch row, head), compared and kept byte for byte. key (B, H, n, D) with any
 * strides whose last one is 1 (in elements of `elem` bytes); stored (B, H, P, D) contiguous.
 */

/* 1 when the key rows at positions[0..P) equal the stored rows, for every batch row and head. */
int fingerprint_matches(const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn, int B, int H, int D, int elem,
                        const int64_t *positions, int P, const void *stored) {
    const size_t row = (size_t)D * (size_t)elem;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int p = 0; p < P; p++) {
                const char *key_row = (const char *)k + (b * k_sb + h * k_sh + positions[p] * k_sn) * elem;
                const char *kept = (const char *)stored + (((size_t)b * H + h) * P + p) * row;
                if (memcmp(key_row, kept, row)) return 0;
            }
    return 1;
}

/* Keep key row `pos` (every batch row and head) in slot `slot` of stored, and pos in positions[slot]. */
void fingerprint_keep(const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn, int B, int H, int D, int elem,
                      int64_t pos, int64_t *positions, int P, int slot, void *stored) {
    const size_t row = (size_t)D * (size_t)elem;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            memcpy((char *)stored + (((size_t)b * H + h) * P + slot) * row,
                   (const char *)k + (b * k_sb + h * k_sh + pos * k_sn) * elem, row);
    positions[slot] = pos;
}

/* ------------------------------------------------------------------------------------------
 * Double Sparsity, selection and attention in one call (no mask; sparse_infer/decode/
 * double_sparsity.py holds the method, the channels and the label cache). Per (batch row b,
 * index row r), r serving query heads r*G .. r*G+G-1 of cache head r*Hkv/Hi:
 *   approx_g(t) = sum_c (scaling * q_g[ch_c]) * label_t[c]        for every key t < n
 *   score(t)    = approx_0(t) when G == 1, else sum_g softmax_g(approx_g)(t) over all n keys
 * The best min(budget, hi - lo) keys of [lo, hi) = [min(sink, n), max(n - local, lo)) are read,
 * plus the keys [0, lo) and [hi, n): what double_sparsity.select + the executor read. The keys
 * [fold_from, n) first get their label rows (label_t[c] = k_t[ch_c], copied bits).
 * labels (B, Hkv, >= n, r), channels int64 (B, Hkv, r), both with unit last stride.
 */
int ds_decode_rows(const void *q, int64_t q_sb, int64_t q_sh,
                   void *labels, int64_t l_sb, int64_t l_sh, int64_t l_sn,
                   const int64_t *channels, int64_t c_sb, int64_t c_sh,
                   const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                   const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                   void *out, int64_t o_sb, int64_t o_sh,
                   int64_t *selected,                       /* (B * Hi) keys read per row */
                   int B, int Hi, int G, int Hkv, int64_t n, int D, int R,
                   int64_t sink, int64_t local, int64_t budget, int64_t fold_from,
                   float scaling, float softcap, int dtype, int num_threads) {
    if (D > MAX_D || D <= 0 || G <= 0 || R <= 0 || R > D || n <= 0 || dtype < 0 || dtype > 2) return 1;
    const int64_t elem = dtype == 0 ? 4 : 2;
    for (int b = 0; b < B; b++)
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t *ch = channels + b * c_sb + h * c_sh;
            for (int64_t t = fold_from < 0 ? 0 : fold_from; t < n; t++) {
                char *dst = (char *)labels + (b * l_sb + h * l_sh + t * l_sn) * elem;
                const char *src = (const char *)k + (b * k_sb + h * k_sh + t * k_sn) * elem;
                for (int c = 0; c < R; c++) memcpy(dst + c * elem, src + ch[c] * elem, (size_t)elem);
            }
        }
    const int64_t lo = sink < n ? sink : n;
    const int64_t hi = n - local > lo ? n - local : lo;
    const int64_t eligible = hi - lo;
    const int64_t take = budget < eligible ? budget : eligible;
    const int64_t max_keys = lo + (n - hi) + take;
    int failed = 0;
    int tasks = B * Hi;
    num_threads = team_size(num_threads, tasks);
    /* approx G * n, score n, query G * D, label query G * R, label rows ROW_BLOCK * R,
     * attention G * (max_keys + 2D + 1) + (ROW_BLOCK + 1) * D */
    size_t floats = (size_t)G * (size_t)n + (size_t)n + (size_t)G * (size_t)D + (size_t)G * (size_t)R
                    + (size_t)ROW_BLOCK * (size_t)R
                    + (size_t)G * ((size_t)max_keys + 2 * (size_t)D + 1) + (ROW_BLOCK + 1) * (size_t)D;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scratch = (float *)malloc(floats * sizeof(float));
        int64_t *ids = (int64_t *)malloc(((size_t)eligible + (size_t)max_keys + 1) * sizeof(int64_t));
#pragma omp for schedule(static)
        for (int task = 0; task < tasks; task++) {
            if (!scratch || !ids) { failed |= 2; continue; }
            const int b = task / Hi, r = task % Hi, h0 = r * G;
            const int64_t kvh = (int64_t)r * Hkv / Hi;
            const int64_t *ch = channels + b * c_sb + kvh * c_sh;
            float *approx = scratch;                          /* head g, key t at g * n + t */
            float *score = approx + (size_t)G * n;            /* n */
            float *qf = score + n;                            /* G * D */
            float *qlab = qf + (size_t)G * D;                 /* G * R */
            float *lbuf = qlab + (size_t)G * R;               /* ROW_BLOCK * R */
            float *attend_scratch = lbuf + (size_t)ROW_BLOCK * R;
            int64_t *cand = ids, *keys = ids + eligible;

            /* the query scaled first and then read on the label channels, as approximate_scores does */
            load_queries(qf, q, b, h0, q_sb, q_sh, G, D, dtype, scaling);
            for (int g = 0; g < G; g++)
                for (int c = 0; c < R; c++) qlab[(int64_t)g * R + c] = qf[(int64_t)g * D + ch[c]];
            /* approximate scores: label rows in blocks, 16 rows' sums at once when R allows */
            const float *rows[ROW_BLOCK];
            const int64_t l_base = b * l_sb + kvh * l_sh;
            for (int64_t t0 = 0; t0 < n; t0 += ROW_BLOCK) {
                int count = n - t0 < ROW_BLOCK ? (int)(n - t0) : ROW_BLOCK;
                for (int i = 0; i < count; i++) {
                    int64_t off = l_base + (t0 + i) * l_sn;
                    if (dtype == 0) rows[i] = (const float *)labels + off;
                    else { load_row(labels, off, dtype, R, lbuf + (int64_t)i * R); rows[i] = lbuf + (int64_t)i * R; }
                }
                for (int g = 0; g < G; g++) dot_rows(approx + (int64_t)g * n + t0, qlab + (int64_t)g * R, rows, count, R);
            }
            /* key scores: the raw approximation for one head, else the group's summed softmaxes */
            group_vote(score, approx, G, n);
            for (int64_t e = 0; e < eligible; e++) cand[e] = lo + e;
            if (take > 0 && take < eligible) top_k_first(score, cand, eligible, take);
            int64_t count = 0;
            for (int64_t t = 0; t < lo; t++) keys[count++] = t;
            for (int64_t i = 0; i < take; i++) keys[count++] = cand[i];
            for (int64_t t = hi; t < n; t++) keys[count++] = t;
            selected[task] = count;
            attend_chosen(b, kvh, h0, keys, count, q, q_sb, q_sh, k, k_sb, k_sh, k_sn, v, v_sb, v_sh, v_sn,
                          out, o_sb, o_sh, G, n, D, scaling, softcap, dtype, attend_scratch);
        }
        free(scratch);
        free(ids);
    }
    return failed;
}
