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

/* Reorder ids[0..m) so that its first k entries have the k largest scores (quickselect). */
static inline void top_k_first(const float *score, int64_t *ids, int64_t m, int64_t k) {
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


#endif
