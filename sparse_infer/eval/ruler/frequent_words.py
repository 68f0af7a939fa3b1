"""Frequent words extraction (RULER's fwe): the 3 most frequent coded words of a Zipf stream."""

from __future__ import annotations

import math
import random

from sparse_infer.eval.ruler.haystack import derive_seed, filler_text


_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. {context}\n"
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
_FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_ALPHA = 2.0  # RULER: Zipf exponent
FWE_WORD_LEN = 6
_ZETA2 = math.pi**2 / 6


def fwe_counts(n: int, alpha: float = FWE_ALPHA) -> list[int]:
    """Zipf counts by rank for n words: floor(n k^-a / zeta(a)), tail filled with singletons."""
    zeta = _ZETA2 if alpha == 2.0 else sum(k**-alpha for k in range(1, 100_000))
    counts = []
    k = 1
    while True:
        c = int(n * k**-alpha / zeta)
        if c <= 1:
            break
        counts.append(c)
        k += 1
    counts += [1] * max(0, n - sum(counts))
    return counts


def _coded_text(rng: random.Random, order_rng: random.Random, n: int) -> tuple[str, list[str]]:
    counts = fwe_counts(n)
    seen: set[str] = set()
    words = []
    while len(words) < len(counts):
        w = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=FWE_WORD_LEN))
        if w not in seen:
            seen.add(w)
            words.append(w)
    stream = [w for w, c in zip(words, counts, strict=True) for _ in range(c)]
    order_rng.shuffle(stream)
    return " ... ".join(stream), words[:3]


def render_fwe(seed: int, n: int, pad: int) -> tuple[str, str, list[str]]:
    ex_ctx, ex_answers = _coded_text(
        random.Random(derive_seed(seed, "icl")), random.Random(derive_seed(seed, "icl-order")), 40
    )
    example = _FWE_TEMPLATE.format(context=ex_ctx) + "\n" + _FWE_ANSWER.strip() + " " + " ".join(ex_answers) + "\n\n"
    context, answers = _coded_text(random.Random(seed), random.Random(derive_seed(seed, "order", n)), n)
    if pad:
        context = filler_text(pad) + " " + context
    return example + _FWE_TEMPLATE.format(context=context), _FWE_ANSWER, answers
