/* What the methods' C selections share (sparse_infer/decode/common.py holds the torch
 * versions): the group's soft vote over per-head scores and a top-k that needs no sort. */
#ifndef SPARSE_INFER_CPU_SELECT_H
#define SPARSE_INFER_CPU_SELECT_H

#include "cpu_attend.h"

/* score[0..m) <- per_head[0..m) for one head, else the sum over the G heads of each head's
 * softmax of its row of per_head (G * m, overwritten): the group's soft vote. */
static inline void group_vote(float *score, float *per_head, int G, int64_t m) {
    if (G == 1) {
        memcpy(score, per_head, (size_t)m * sizeof(float));
        return;
    }
    for (int64_t e = 0; e < m; e++) score[e] = 0.f;
    for (int g = 0; g < G; g++) {
        float *row = per_head + (int64_t)g * m, top = -INFINITY, sum = 0.f;
        /* simd: without it the compiler may not reorder a max (NaN order), and this loop ran
         * unvectorized at 6x the time of the exp loop */
#pragma omp simd reduction(max : top)
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

/* A uint32 that orders as the float does (-0 just below +0; no NaNs here). */
static inline uint32_t order_key(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* out[0..take) <- base + e for the `take` largest score[e], e in [0, m), in ascending e; among
 * scores equal at the threshold, the lowest e. Returns the count written: min(take, m).
 * Radix selection on order_key (11, 11 and 10 bits, each pass over the keys still tied with
 * the threshold) then one pass in index order: no sort, no indirection in the first pass, and
 * the ids come out sorted, so the rows they name are read front to back (a quickselect over
 * indirect ids took 2-3x longer at 32K keys and left them in no order). cand: m int64 of scratch. */
static inline int64_t top_k_ascending(const float *score, int64_t m, int64_t take, int64_t base,
                                      int64_t *out, int64_t *cand) {
    if (take <= 0) return 0;
    if (take >= m) {
        for (int64_t e = 0; e < m; e++) out[e] = base + e;
        return m;
    }
    static const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
    uint32_t prefix = 0, mask = 0;
    int64_t need = take, ncand = m;
    for (int pass = 0; pass < 3; pass++) {
        uint32_t hist[2048] = {0};
        const int shift = shifts[pass];
        const uint32_t bins = (1u << widths[pass]) - 1;
        if (pass == 0)
            for (int64_t e = 0; e < m; e++) hist[order_key(score[e]) >> shift]++;
        else
            for (int64_t i = 0; i < ncand; i++) hist[(order_key(score[cand[i]]) >> shift) & bins]++;
        int64_t above = 0;
        int bin = (int)bins;
        for (; bin > 0 && above + hist[bin] < need; bin--) above += hist[bin];
        need -= above;
        prefix |= (uint32_t)bin << shift;
        mask |= bins << shift;
        int64_t kept = 0;
        if (pass == 0) {
            for (int64_t e = 0; e < m; e++)
                if ((order_key(score[e]) & mask) == prefix) cand[kept++] = e;
        } else {
            for (int64_t i = 0; i < ncand; i++)
                if ((order_key(score[cand[i]]) & mask) == prefix) cand[kept++] = cand[i];
        }
        ncand = kept;
        if (need == ncand) break;            /* the whole bin is taken: no tie to break */
    }
    /* above the threshold's bits, or at them while `need` of those are still wanted */
    int64_t count = 0;
    for (int64_t e = 0; e < m; e++) {
        uint32_t key = order_key(score[e]) & mask;
        if (key > prefix || (key == prefix && need > 0)) {
            need -= key == prefix;
            out[count++] = base + e;
        }
    }
    return count;
}


#endif
