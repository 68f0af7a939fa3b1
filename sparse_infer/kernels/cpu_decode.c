/* Sparse decode on the CPU: one query token per (batch row, index head) attends to the
 * K/V rows its index list names, reading them in place.
 *
 * Why C: the torch executor has to copy the selected rows (index_select) and then read the
 * copy; on a memory-bound CPU that costs about three passes over the selected bytes, and a
 * few dozen small torch ops per layer. Here each selected K row and V row is read once, for
 * all G query heads that share the index list. The contract is the torch executor's
 * (sparse_infer/kernels/sparse_decode.py): attention over the rows it is given, nothing
 * chosen here. Methods that choose in C too keep that code beside their selectors
 * (sparse_infer/decode/<method>.c), sharing this file's machinery through cpu_attend.h; cpu_decode.py
 * builds them all into one library at first use.
 *
 * Layout: query/out (B, Hq, 1, D), key/value (B, Hkv, n, D) with any strides whose last one
 * is 1, indices int64 (B, Hi, K) with last stride 1, -1 (or anything outside [0, n)) = unused
 * slot, kv_heads int64 (Hi,): the cache head index row r reads; row r serves query heads
 * r*G .. r*G+G-1. mask: optional uint8 (B, 1|Hq, 1, n), nonzero = may attend (its head
 * stride is 0 when it broadcasts). dtype: 0 float32, 1 bfloat16, 2 float16 (all tensors the
 * same); math in float32.
 */
#include "cpu_attend.h"

/* Selected rows are scattered, so the hardware prefetcher cannot follow them: while resolving a
 * slot, ask for the row PREFETCH_AHEAD slots on, and (pass 1) for the V row of the slot itself,
 * which pass 2 then finds in cache. Cold caches are the normal case in a model (each layer's
 * weights evict the previous layer's K/V): 128 measured best of 32 / 64 / 128. */
#define PREFETCH_AHEAD 128

/* locality 0: a row read once now; 2: a row read again later in this call */
static inline void prefetch_row(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 0);
}

static inline void prefetch_row_for_later(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
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
#pragma omp simd reduction(max : m)     /* vectorized only when told it may reorder the max */
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
void attend(int b, int64_t kvh, int h0, const int64_t *ids,
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
