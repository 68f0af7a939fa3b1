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
/* Selected rows are scattered, so the hardware prefetcher cannot follow them: ask for the
 * row this many slots ahead while computing on the current one. */
#define PREFETCH_AHEAD 8

static inline void prefetch_row(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 0);
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
 * softmax, weighted V sum, written to G output rows. scratch: G * (K + 2 * D + 1) floats. */
static inline __attribute__((always_inline)) void attend_one(int b, int64_t kvh, int h0, const int64_t *ids,
                       const void *q, int64_t q_sb, int64_t q_sh,
                       const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                       const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                       const uint8_t *mask, int64_t m_sb, int64_t m_sh, int64_t m_sn,
                       void *out, int64_t o_sb, int64_t o_sh,
                       int G, int K, int64_t n, int D, float scaling, float softcap, int dtype,
                       float *scratch) {
    float row[MAX_D];
    float *scores = scratch;                          /* head g, slot j at g * K + j */
    float *qf = scores + (int64_t)G * K;              /* head g at g * D */
    float *acc = qf + (int64_t)G * D;                 /* head g at g * D */
    float *total = acc + (int64_t)G * D;              /* head g at g */

    load_queries(qf, q, b, h0, q_sb, q_sh, G, D, dtype, scaling);

    /* pass 1: q.k for every slot, each K row read once for the G heads */
    const int64_t k_base = b * k_sb + kvh * k_sh;
    const int64_t elem = dtype == 0 ? 4 : 2, row_bytes = (int64_t)D * elem;
    for (int j = 0; j < K; j++) {
        if (j + PREFETCH_AHEAD < K) {
            int64_t ahead = ids[j + PREFETCH_AHEAD];
            if (ahead >= 0 && ahead < n) prefetch_row((const char *)k + (k_base + ahead * k_sn) * elem, row_bytes);
        }
        int64_t t = ids[j];
        if (t < 0 || t >= n) {
            for (int g = 0; g < G; g++) scores[(int64_t)g * K + j] = -INFINITY;
            continue;
        }
        const float *kr;
        if (dtype == 0) kr = (const float *)k + k_base + t * k_sn;
        else { load_row(k, k_base + t * k_sn, dtype, D, row); kr = row; }
        for (int g = 0; g < G; g++) {
            const float *qg = qf + (int64_t)g * D;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; d++) dot += qg[d] * kr[d];
            if (softcap > 0.f) dot = softcap * tanhf(dot / softcap);
            if (mask && !mask[b * m_sb + (int64_t)(h0 + g) * m_sh + t * m_sn]) dot = -INFINITY;
            scores[(int64_t)g * K + j] = dot;
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

    /* pass 2: weighted sum of V, each V row read once for the G heads */
    const int64_t v_base = b * v_sb + kvh * v_sh;
    for (int j = 0; j < K; j++) {
        if (j + PREFETCH_AHEAD < K) {
            int64_t ahead = ids[j + PREFETCH_AHEAD];
            if (ahead >= 0 && ahead < n) prefetch_row((const char *)v + (v_base + ahead * v_sn) * elem, row_bytes);
        }
        int64_t t = ids[j];
        if (t < 0 || t >= n) continue;
        const float *vr;
        if (dtype == 0) vr = (const float *)v + v_base + t * v_sn;
        else { load_row(v, v_base + t * v_sn, dtype, D, row); vr = row; }
        for (int g = 0; g < G; g++) {
            float p = scores[(int64_t)g * K + j];
            if (p == 0.f) continue;
            float *a = acc + (int64_t)g * D;
#pragma omp simd
            for (int d = 0; d < D; d++) a[d] += p * vr[d];
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
    if (num_threads > tasks) num_threads = tasks;
    if (num_threads < 1) num_threads = 1;
    size_t scratch_floats = (size_t)G * ((size_t)K + 2 * (size_t)D + 1);
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
 * over the bounds and one over the selected rows, without index tensors.
 */

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

/* Upper bounds of q.k over each eligible page, for the G heads: bounds[g * eligible + e]. */
static inline __attribute__((always_inline)) void page_bounds(
        float *bounds, const float *qf, const void *kmin, const void *kmax, int b, int64_t kvh,
        int64_t a_sb, int64_t a_sh, int64_t a_sp, int64_t z_sb, int64_t z_sh, int64_t z_sp,
        int64_t first_page, int64_t eligible, int G, int D, float scaling, float softcap, int dtype) {
    float mn_row[MAX_D], mx_row[MAX_D];
    for (int64_t e = 0; e < eligible; e++) {
        int64_t p = first_page + e;
        const float *mn, *mx;
        int64_t mo = b * a_sb + kvh * a_sh + p * a_sp, xo = b * z_sb + kvh * z_sh + p * z_sp;
        if (dtype == 0) { mn = (const float *)kmin + mo; mx = (const float *)kmax + xo; }
        else { load_row(kmin, mo, dtype, D, mn_row); load_row(kmax, xo, dtype, D, mx_row); mn = mn_row; mx = mx_row; }
        for (int g = 0; g < G; g++) {
            const float *qg = qf + (int64_t)g * D;
            float bound = 0.f;
#pragma omp simd reduction(+ : bound)
            for (int d = 0; d < D; d++) {
                float a = qg[d] * mn[d], c = qg[d] * mx[d];
                bound += a > c ? a : c;
            }
            bound *= scaling;
            if (softcap > 0.f) bound = softcap * tanhf(bound / softcap);
            bounds[(int64_t)g * eligible + e] = bound;
        }
    }
}

int quest_decode_rows(const void *q, int64_t q_sb, int64_t q_sh,
                      const void *kmin, int64_t a_sb, int64_t a_sh, int64_t a_sp,
                      const void *kmax, int64_t z_sb, int64_t z_sh, int64_t z_sp,
                      const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                      const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                      void *out, int64_t o_sb, int64_t o_sh,
                      int64_t *selected,                       /* (B * Hi) keys read per row */
                      int B, int Hi, int G, int Hkv, int64_t n, int D, int64_t page,
                      int64_t sink, int64_t local, int64_t budget_pages,
                      float scaling, float softcap, int dtype, int num_threads) {
    if (D > MAX_D || D <= 0 || G <= 0 || page <= 0 || n <= 0 || dtype < 0 || dtype > 2) return 1;
    const int64_t lo = sink < n ? sink : n;
    const int64_t hi = n - local > lo ? n - local : lo;
    const int64_t first_page = lo / page, end_page = hi > lo ? (hi + page - 1) / page : first_page;
    const int64_t eligible = end_page - first_page;
    const int64_t take = budget_pages < eligible ? budget_pages : eligible;
    const int64_t max_keys = lo + (n - hi) + take * page;
    int failed = 0;
    int tasks = B * Hi;
    if (num_threads > tasks) num_threads = tasks;
    if (num_threads < 1) num_threads = 1;
    /* bounds G * eligible, score eligible + 1, query G * D, attention G * (max_keys + 2D + 1) */
    size_t floats = (size_t)G * (size_t)eligible + (size_t)eligible + 1 + (size_t)G * (size_t)D
                    + (size_t)G * ((size_t)max_keys + 2 * (size_t)D + 1);
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
                                first_page, eligible, G, DIM, scaling, softcap, dtype)
            if (D == 64) BOUNDS(64);
            else if (D == 128) BOUNDS(128);
            else BOUNDS(D);
#undef BOUNDS
            /* page scores: the raw bound for one head, else the group's summed softmaxes */
            if (G == 1) {
                memcpy(score, bounds, (size_t)eligible * sizeof(float));
            } else {
                for (int64_t e = 0; e < eligible; e++) score[e] = 0.f;
                for (int g = 0; g < G; g++) {
                    float *bg = bounds + (int64_t)g * eligible, m = -INFINITY, sum = 0.f;
                    for (int64_t e = 0; e < eligible; e++) m = bg[e] > m ? bg[e] : m;
#pragma omp simd reduction(+ : sum)
                    for (int64_t e = 0; e < eligible; e++) {
                        float x = exp_nonpositive(bg[e] - m);
                        bg[e] = x;
                        sum += x;
                    }
                    float inv = 1.f / sum;
                    for (int64_t e = 0; e < eligible; e++) score[e] += bg[e] * inv;
                }
            }
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
            if (count == 0) {
                float zeros[MAX_D] = {0};
                for (int g = 0; g < G; g++) store_row(out, b * o_sb + (int64_t)(h0 + g) * o_sh, dtype, D, zeros);
                continue;
            }
            attend(b, kvh, h0, keys, q, q_sb, q_sh, k, k_sb, k_sh, k_sn, v, v_sb, v_sh, v_sn,
                       NULL, 0, 0, 0, out, o_sb, o_sh, G, (int)count, n, D, scaling, softcap, dtype,
                       attend_scratch);
        }
        free(scratch);
        free(ids);
    }
    return failed;
}
