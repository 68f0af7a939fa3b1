/* Quest's page choice and the attention over it in one call, on the CPU (no mask, or one
 * hiding a prefix of each row: `starts`;
 * sparse_infer/decode/quest.py holds the method and the page bounds, and calls this through
 * quest_decode_cpu). Per (batch row b, index row r), r serving query heads r*G .. r*G+G-1 of
 * cache head r*Hkv/Hi:
 *   bound_g(p) = scaling * sum_d max(q_gd * kmin_pd, q_gd * kmax_pd)   (softcapped if asked)
 *   score(p)   = bound_0(p) when G == 1, else sum_g softmax_g(bound_g)(p) over eligible pages
 * Eligible pages hold a key in [lo, hi) = [min(sink, n), max(n - local, lo)); the best
 * min(budget_pages, eligible) of them (ties: either) are read, their keys within [lo, hi), plus
 * the keys [0, lo) and [hi, n). The same selection as quest.select + the executor, in one pass
 * over the bounds and one over the selected rows, without index tensors. The keys
 * [fold_from, n) are first folded into kmin/kmax (quest.update_bounds' per-step update, without
 * its two torch ops); fold_from = n folds nothing.
 * starts (B int64, or NULL for zeros): batch row b sees the keys [starts[b], n) only (left
 * padding); its sinks are that range's first keys and its eligible pages hold a key in
 * [starts[b] + sink, ...), as quest.select has them under the mask. Pages are aligned to
 * absolute positions; the bounds leave out the keys hidden when the sequence started
 * (quest.update_bounds); keys a sliding window hides later stay in them, as in select().
 */
#include "cpu_select.h"

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
                      const int64_t *starts,                   /* (B) first visible key per row, or NULL */
                      const void *k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                      const void *v, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                      void *out, int64_t o_sb, int64_t o_sh,
                      int64_t *selected,                       /* (B * Hi) keys read per row */
                      int B, int Hi, int G, int Hkv, int64_t n, int D, int64_t page,
                      int64_t sink, int64_t local, int64_t budget_pages, int64_t fold_from,
                      float scaling, float softcap, int dtype, int num_threads) {
    if (D > MAX_D || D <= 0 || G <= 0 || page <= 0 || n <= 0 || dtype < 0 || dtype > 2) return 1;
    /* before anything is written: a refused call changes no state */
    if (starts)
        for (int b = 0; b < B; b++)
            if (starts[b] < 0 || starts[b] > n) return 1;
    /* the keys that arrived since the last step, into the bounds (a few rows: one thread) */
    for (int b = 0; b < B; b++)
        for (int64_t h = 0; h < Hkv; h++)
            for (int64_t t = fold_from < 0 ? 0 : fold_from; t < n; t++)
                fold_key(kmin, b * a_sb + h * a_sh + (t / page) * a_sp, kmax, b * z_sb + h * z_sh + (t / page) * z_sp,
                         k, b * k_sb + h * k_sh + t * k_sn, t % page == 0, D, dtype);
    /* sizes for a row that sees every key; a row seeing fewer needs no more */
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
        int64_t *ids = (int64_t *)malloc((2 * (size_t)eligible + (size_t)max_keys + 1) * sizeof(int64_t));
#pragma omp for schedule(static)
        for (int task = 0; task < tasks; task++) {
            if (!scratch || !ids) { failed |= 2; continue; }
            const int b = task / Hi, r = task % Hi, h0 = r * G;
            const int64_t kvh = (int64_t)r * Hkv / Hi;
            /* this row's visible keys [first, n): the sinks, the pages that compete, the window */
            const int64_t first = starts ? starts[b] : 0, nv = n - first;
            const int64_t row_lo = first + (sink < nv ? sink : nv);
            const int64_t row_hi = n - local > row_lo ? n - local : row_lo;
            const int64_t row_first_page = row_lo / page;
            const int64_t row_eligible = (row_hi > row_lo ? (row_hi + page - 1) / page : row_first_page) - row_first_page;
            const int64_t row_take = budget_pages < row_eligible ? budget_pages : row_eligible;
            float *bounds = scratch;                           /* head g, page e at g * eligible + e */
            float *score = bounds + (size_t)G * eligible;      /* eligible (+1) */
            float *qf = score + eligible + 1;                  /* G * D */
            float *attend_scratch = qf + (size_t)G * D;
            int64_t *pages = ids, *cand = ids + eligible, *keys = ids + 2 * eligible;

            /* unscaled: the bound is scaled after the sum, as quest.upper_bounds does */
            load_queries(qf, q, b, h0, q_sb, q_sh, G, D, dtype, 1.f);
            /* bounds: one pass over the eligible pages' min/max rows (head dim constant when common) */
#define BOUNDS(DIM) page_bounds(bounds, qf, kmin, kmax, b, kvh, a_sb, a_sh, a_sp, z_sb, z_sh, z_sp, \
                                row_first_page, row_eligible, G, DIM, scaling, softcap, dtype, attend_scratch)
            if (D == 64) BOUNDS(64);
            else if (D == 128) BOUNDS(128);
            else BOUNDS(D);
#undef BOUNDS
            /* page scores: the raw bound for one head, else the group's summed softmaxes */
            group_vote(score, bounds, G, row_eligible);
            top_k_ascending(score, row_eligible, row_take, 0, pages, cand);
            /* the keys: sinks, the chosen pages' keys inside [row_lo, row_hi), the local window */
            int64_t count = 0;
            for (int64_t t = first; t < row_lo; t++) keys[count++] = t;
            for (int64_t i = 0; i < row_take; i++) {
                int64_t p = row_first_page + pages[i];
                int64_t start = p * page > row_lo ? p * page : row_lo;
                int64_t stop = (p + 1) * page < row_hi ? (p + 1) * page : row_hi;
                for (int64_t t = start; t < stop; t++) keys[count++] = t;
            }
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
