"""Fitting a prompt to a token length: the largest haystack that stays within it."""

from __future__ import annotations

import math
from collections.abc import Callable

from sparse_infer.eval.errors import EvalError


TOLERANCE = 0.01


def fit_length(
    build: Callable[[int, int], str],
    count: Callable[[str], int],
    target: int,
    *,
    hint: int | None = None,
    pad_limit: int = 4096,
    what: str = "prompt",
) -> tuple[str, int]:
    """Largest haystack whose prompt has <= target tokens, padded to >= 99% of target.

    `build(n, pad)` must grow with n. Tokens grow almost linearly in n, so the
    search interpolates (with bisection steps to guarantee progress); a
    128K-token prompt then needs a handful of tokenizer calls, not ~17.
    """
    floor = math.ceil(target * (1 - TOLERANCE))
    cache: dict[tuple[int, int], tuple[str, int]] = {}

    def tokens_at(n: int, pad: int = 0) -> int:
        if (n, pad) not in cache:
            text = build(n, pad)
            cache[(n, pad)] = (text, count(text))
        return cache[(n, pad)][1]

    base = tokens_at(0)
    if base > target:
        raise EvalError(f"{what}: the task's fixed text alone is {base} tokens, more than the requested {target}")
    lo, tokens_lo = 0, base
    # Bracket: grow from the hint (or 64) by linear extrapolation until tokens_at(guess) > target.
    guess, hi, tokens_hi = max(1, hint or 64), None, 0
    while hi is None:
        tokens_guess = tokens_at(guess)
        if tokens_guess > target:
            hi, tokens_hi = guess, tokens_guess
            break
        lo, tokens_lo = guess, tokens_guess
        rate = (tokens_guess - base) / guess
        nxt = guess * 2 if rate <= 0 else int(guess + (target - tokens_guess) / rate * 1.02) + 1
        guess = min(max(nxt, guess + 1), guess * 8 + 64)
        if guess > 50_000_000:
            raise EvalError(f"{what}: the prompt does not grow with the haystack")
    step = 0
    while hi - lo > 1:
        step += 1
        if step % 2 and tokens_hi > tokens_lo:  # interpolation step
            mid = lo + int((target - tokens_lo) * (hi - lo) / (tokens_hi - tokens_lo))
            mid = min(max(mid, lo + 1), hi - 1)
        else:
            mid = (lo + hi) // 2
        tokens_mid = tokens_at(mid)
        if tokens_mid <= target:
            lo, tokens_lo = mid, tokens_mid
        else:
            hi, tokens_hi = mid, tokens_mid
    n, tokens = lo, tokens_lo
    pad = 0
    if tokens < floor:
        # The last haystack unit was too coarse: close the gap with filler words.
        plo, phi = 0, pad_limit
        while phi - plo > 1:
            mid = (plo + phi) // 2
            if tokens_at(n, mid) <= target:
                plo = mid
            else:
                phi = mid
        pad, tokens = plo, tokens_at(n, plo)
    if not floor <= tokens <= target:
        raise EvalError(f"{what}: could not size the prompt to {target} tokens (best {tokens}); try a longer length")
    return cache[(n, pad)][0], n
