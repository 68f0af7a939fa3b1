/* The decode continuity fingerprint of sparse_infer/decode/dispatch.py without torch ops: a
 * few key rows per (batch row, head), compared and kept byte for byte. key (B, H, n, D) with
 * any strides whose last one is 1 (in elements of `elem` bytes); stored (B, H, P, D) contiguous.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

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
