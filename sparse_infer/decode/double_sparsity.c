/* Double Sparsity's key choice and the attention over it in one call, on the CPU (no mask;
 * sparse_infer/decode/double_sparsity.py holds the method, the channels and the label cache,
 * and calls this through double_sparsity_decode_cpu). Per (batch row b, index row r), r serving
 * query heads r*G .. r*G+G-1 of cache head r*Hkv/Hi:
 *   approx_g(t) = sum_c (scaling * q_g[ch_c]) * label_t[c]        for every key t < n
 *   score(t)    = approx_0(t) when G == 1, else sum_g softmax_g(approx_g)(t) over all n keys
 * The best min(budget, hi - lo) keys of [lo, hi) = [min(sink, n), max(n - local, lo)) are read,
 * plus the keys [0, lo) and [hi, n): what double_sparsity.select + the executor read. The keys
 * [fold_from, n) first get their label rows (label_t[c] = k_t[ch_c], copied bits).
 * labels (B, Hkv, >= n, r), channels int64 (B, Hkv, r), both with unit last stride.
 */
#include "cpu_select.h"

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
