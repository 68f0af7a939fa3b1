/* Double Sparsity's key choice and the attention over it in one call, on the CPU (no mask, or
 * one hiding a prefix of each row; sparse_infer/decode/double_sparsity.py holds the method, the
 * channels and the label cache, and calls this through double_sparsity_decode_cpu). Per (batch
 * row b, index row r), r serving query heads r*G .. r*G+G-1 of cache head r*Hkv/Hi:
 *   approx_g(t) = sum_c (scaling * q_g[ch_c]) * label_t[c]        for every key t < n
 *   score(t)    = approx_0(t) when G == 1, else sum_g softmax_g(approx_g)(t) over all n keys
 * The best min(budget, hi - lo) keys of [lo, hi) = [min(sink, n), max(n - local, lo)) are read,
 * plus the keys [0, lo) and [hi, n): what double_sparsity.select + the executor read. The keys
 * [fold_from, n) first get their label rows (label_t[c] = k_t[ch_c], copied bits).
 * labels (B, Hkv, >= n, r), channels int64 (B, Hkv, r), both with unit last stride.
 *
 * starts (B int64, or NULL for zeros): batch row b sees the keys [starts[b], n) only (left
 * padding, or a sliding window's last keys): all of the above then runs on that range, with
 * the sinks its first keys, as the select() path does under such a mask.
 *
 * int8 labels (scales != NULL; token_select's `scoring: int8`, R <= 512): label_t[c] is the
 * int8 code rint(k_t[ch_c] * 127 / m_t) and scales_t = m_t / 127, m_t = max_c |k_t[ch_c]| (a zero
 * row: all codes and its scale 0). The query is quantized the same way per head (x_g = scaling *
 * q_g[ch], codes q8_g, scale qs_g) and
 *   approx_g(t) = ((sum_c q8_g[c] * label_t[c]) * qs_g) * scales_t
 * with the integer sum exact (below 2^24, so exact in float too): the same bits as
 * token_select.int8_scores. With AVX512-VNNI one instruction multiplies and sums 64 code pairs.
 * scales fp32 (B, Hkv, >= n), unit last stride.
 */
#include "cpu_select.h"
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

/* The library is built with -fassociative-math (cpu_decode.py), under which the compiler may
 * rewrite x * (127 / m) as (x * 127) / m, or merge two scale multiplications: either changes
 * bits. Quantization and scaling are therefore compiled without it, so that their bits are
 * token_select.quantize_keys' and int8_scores'. */
#if defined(__clang__)
#define NO_REASSOCIATION
#define NO_REASSOCIATION_BODY _Pragma("clang fp reassociate(off)")
#else
#define NO_REASSOCIATION __attribute__((optimize("no-associative-math")))
#define NO_REASSOCIATION_BODY
#endif

/* codes[c] = rint(x[ch[c]] * (127 / m)), *scale = m / 127, m = max_c |x[ch[c]]| (zero when m is 0);
 * ch NULL: channel c is x[c]. */
static NO_REASSOCIATION void quantize_row(const float *x, const int64_t *ch, int R, int8_t *codes, float *scale) {
    NO_REASSOCIATION_BODY
    float top = 0.f;
    for (int c = 0; c < R; c++) {
        float a = fabsf(x[ch ? ch[c] : c]);
        top = a > top ? a : top;
    }
    const float inv = top > 0.f ? 127.f / top : 0.f;
    for (int c = 0; c < R; c++) {
        float y = rintf(x[ch ? ch[c] : c] * inv);
        codes[c] = (int8_t)(y > 127.f ? 127.f : y < -127.f ? -127.f : y);
    }
    *scale = top / 127.f;
}

/* a[i] = ((a[i] - 128 * code_sum[i]) * qscale) * kscale[i]: exact integers, then one rounding per scale */
static NO_REASSOCIATION void scale_scores(float *a, const float *code_sum, float qscale, const float *kscale,
                                          int count) {
    NO_REASSOCIATION_BODY
    for (int i = 0; i < count; i++) {
        float dot = a[i] - 128.f * code_sum[i];
        float scaled = dot * qscale;
        a[i] = scaled * kscale[i];
    }
}

/* s[i] = sum_c qu[c] * rows[i][c] for the count int8 rows of a block, as exact integers in float
 * (R <= 512 keeps every partial sum below 2^24). qu: unsigned 8-bit (the caller offsets signed
 * codes by 128 and takes 128 * the row's code sum back off). */
static inline __attribute__((always_inline)) void int8_dot_rows(float *s, const uint8_t *qu, const int8_t *const *rows,
                                                                int count, int R) {
    int i = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    if (R % 64 == 0) {
        for (; i + 16 <= count; i += 16) {
            vf16 part[16];
            for (int r = 0; r < 16; r++) {
                __m512i acc = _mm512_setzero_si512();
                for (int c = 0; c < R; c += 64)
                    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(qu + c), _mm512_loadu_si512(rows[i + r] + c));
                part[r] = (vf16)_mm512_cvtepi32_ps(acc);
            }
            *(vf16u *)(s + i) = sum16(part);
        }
    }
#endif
    for (; i < count; i++) {
        const int8_t *row = rows[i];
        int32_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int c = 0; c < R; c++) dot += (int32_t)qu[c] * (int32_t)row[c];
        s[i] = (float)dot;
    }
}

/* approx[g * n + t] for every key t and head g from int8 codes (see the top of this file):
 * qu (G + 1) * R query codes + 128 then R ones; code_sum ROW_BLOCK floats of scratch. */
static inline __attribute__((always_inline)) void int8_scores(
        float *approx, float *code_sum, const uint8_t *qu, const float *qscale, const float *kscale,
        const int8_t *codes, int64_t l_sn, int64_t n, int G, int R) {
    const int8_t *rows[ROW_BLOCK];
    for (int64_t t0 = 0; t0 < n; t0 += ROW_BLOCK) {
        int count = n - t0 < ROW_BLOCK ? (int)(n - t0) : ROW_BLOCK;
        for (int i = 0; i < count; i++) rows[i] = codes + (t0 + i) * l_sn;
        int8_dot_rows(code_sum, qu + (int64_t)G * R, rows, count, R);
        for (int g = 0; g < G; g++) {
            float *a = approx + (int64_t)g * n + t0;
            int8_dot_rows(a, qu + (int64_t)g * R, rows, count, R);
            scale_scores(a, code_sum, qscale[g], kscale + t0, count);
        }
    }
}

int ds_decode_rows(const void *q, int64_t q_sb, int64_t q_sh,
                   void *labels, int64_t l_sb, int64_t l_sh, int64_t l_sn,
                   const int64_t *channels, int64_t c_sb, int64_t c_sh,
                   float *scales, int64_t s_sb, int64_t s_sh,
                   const int64_t *starts,                   /* (B) first visible key per row, or NULL */
                   const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                   const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                   void *out, int64_t o_sb, int64_t o_sh,
                   int64_t *selected,                       /* (B * Hi) keys read per row */
                   int B, int Hi, int G, int Hkv, int64_t n, int D, int R,
                   int64_t sink, int64_t local, int64_t budget, int64_t fold_from,
                   float scaling, float softcap, int dtype, int num_threads) {
    const int quantized = scales != NULL;
    if (D > MAX_D || D <= 0 || G <= 0 || R <= 0 || R > D || n <= 0 || dtype < 0 || dtype > 2) return 1;
    /* before anything is written: a refused call changes no state */
    if (starts)
        for (int b = 0; b < B; b++)
            if (starts[b] < 0 || starts[b] > n) return 1;
    if (quantized && R > 512) return 1;
    const int64_t elem = dtype == 0 ? 4 : 2;
    for (int b = 0; b < B; b++)
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t *ch = channels + b * c_sb + h * c_sh;
            for (int64_t t = fold_from < 0 ? 0 : fold_from; t < n; t++) {
                const int64_t key_off = b * k_sb + h * k_sh + t * k_sn, label_off = b * l_sb + h * l_sh + t * l_sn;
                if (quantized) {
                    float x[MAX_D];
                    if (dtype == 0) memcpy(x, (const float *)k + key_off, (size_t)D * sizeof(float));
                    else load_row(k, key_off, dtype, D, x);
                    quantize_row(x, ch, R, (int8_t *)labels + label_off, scales + b * s_sb + h * s_sh + t);
                    continue;
                }
                char *dst = (char *)labels + label_off * elem;
                const char *src = (const char *)k + key_off * elem;
                for (int c = 0; c < R; c++) memcpy(dst + c * elem, src + ch[c] * elem, (size_t)elem);
            }
        }
    /* sizes for a row that sees every key; a row seeing fewer needs no more */
    const int64_t lo = sink < n ? sink : n;
    const int64_t hi = n - local > lo ? n - local : lo;
    const int64_t eligible = hi - lo;
    const int64_t take = budget < eligible ? budget : eligible;
    const int64_t max_keys = lo + (n - hi) + take;
    int failed = 0;
    int tasks = B * Hi;
    num_threads = team_size(num_threads, tasks);
    /* approx G * n, score n, query G * D, label query G * R, label rows ROW_BLOCK * R,
     * int8 query codes (G + 1) * R bytes and scales G, code sums ROW_BLOCK,
     * attention G * (max_keys + 2D + 1) + (ROW_BLOCK + 1) * D */
    size_t floats = (size_t)G * (size_t)n + (size_t)n + (size_t)G * (size_t)D + (size_t)G * (size_t)R
                    + (size_t)ROW_BLOCK * (size_t)R + ((size_t)(G + 1) * (size_t)R + 3) / 4 + (size_t)G + ROW_BLOCK
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
            /* this row's visible keys [first, n): nv of them, the sinks, the window and the rest */
            const int64_t first = starts ? starts[b] : 0, nv = n - first;
            const int64_t row_lo = first + (sink < nv ? sink : nv);
            const int64_t row_hi = n - local > row_lo ? n - local : row_lo;
            const int64_t row_take = budget < row_hi - row_lo ? budget : row_hi - row_lo;
            float *approx = scratch;                          /* head g, key first + t at g * nv + t */
            float *score = approx + (size_t)G * n;            /* nv */
            float *qf = score + n;                            /* G * D */
            float *qlab = qf + (size_t)G * D;                 /* G * R */
            float *lbuf = qlab + (size_t)G * R;               /* ROW_BLOCK * R */
            float *qscale = lbuf + (size_t)ROW_BLOCK * R;     /* G */
            float *code_sum = qscale + G;                     /* ROW_BLOCK */
            uint8_t *qu = (uint8_t *)(code_sum + ROW_BLOCK);  /* head g at g * R, then R ones */
            float *attend_scratch = (float *)qu + ((size_t)(G + 1) * (size_t)R + 3) / 4;
            int64_t *cand = ids, *keys = ids + eligible;

            /* the query scaled first and then read on the label channels, as approximate_scores does */
            load_queries(qf, q, b, h0, q_sb, q_sh, G, D, dtype, scaling);
            for (int g = 0; g < G; g++)
                for (int c = 0; c < R; c++) qlab[(int64_t)g * R + c] = qf[(int64_t)g * D + ch[c]];
            const int64_t l_base = b * l_sb + kvh * l_sh + first * l_sn;
            if (quantized) {
                /* the query's codes offset by 128 (VNNI multiplies unsigned by signed bytes); the
                 * last R bytes are ones, whose dot product is a row's code sum */
                for (int g = 0; g < G; g++) {
                    uint8_t *codes = qu + (int64_t)g * R;
                    quantize_row(qlab + (int64_t)g * R, NULL, R, (int8_t *)codes, qscale + g);
                    for (int c = 0; c < R; c++) codes[c] = (uint8_t)((int)(int8_t)codes[c] + 128);
                }
                memset(qu + (int64_t)G * R, 1, (size_t)R);
                const float *kscale = scales + b * s_sb + kvh * s_sh + first;
#define INT8_SCORES(DIM) int8_scores(approx, code_sum, qu, qscale, kscale, (const int8_t *)labels + l_base, l_sn, \
                                     nv, G, DIM)
                if (R == 64) INT8_SCORES(64);           /* constant sizes: the code rows stay in registers */
                else if (R == 128) INT8_SCORES(128);
                else INT8_SCORES(R);
#undef INT8_SCORES
            } else {
                /* approximate scores: label rows in blocks, 16 rows' sums at once when R allows */
                const float *rows[ROW_BLOCK];
                for (int64_t t0 = 0; t0 < nv; t0 += ROW_BLOCK) {
                    int count = nv - t0 < ROW_BLOCK ? (int)(nv - t0) : ROW_BLOCK;
                    for (int i = 0; i < count; i++) {
                        int64_t off = l_base + (t0 + i) * l_sn;
                        if (dtype == 0) rows[i] = (const float *)labels + off;
                        else {
                            load_row(labels, off, dtype, R, lbuf + (int64_t)i * R);
                            rows[i] = lbuf + (int64_t)i * R;
                        }
                    }
                    for (int g = 0; g < G; g++)
                        dot_rows(approx + (int64_t)g * nv + t0, qlab + (int64_t)g * R, rows, count, R);
                }
            }
            /* key scores: the raw approximation for one head, else the group's summed softmaxes */
            group_vote(score, approx, G, nv);
            int64_t count = 0;
            for (int64_t t = first; t < row_lo; t++) keys[count++] = t;
            count += top_k_ascending(score + (row_lo - first), row_hi - row_lo, row_take, row_lo, keys + count, cand);
            for (int64_t t = row_hi; t < n; t++) keys[count++] = t;
            selected[task] = count;
            attend_chosen(b, kvh, h0, keys, count, q, q_sb, q_sh, k, k_sb, k_sh, k_sn, v, v_sb, v_sh, v_sn,
                          out, o_sb, o_sh, G, n, D, scaling, softcap, dtype, attend_scratch);
        }
        free(scratch);
        free(ids);
    }
    return failed;
}
