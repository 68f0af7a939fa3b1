"""Common words extraction (RULER's cwe): the 10 most frequent words of a numbered list."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from sparse_infer.eval import _text
from sparse_infer.eval.ruler.haystack import derive_seed, filler_text

_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
_CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
CWE_NUM_CW = 10
CWE_FREQ_CW = 30  # RULER synthetic.yaml
CWE_FREQ_UCW = 3


def cwe_frequencies(n: int, pool: int, num_cw: int = CWE_NUM_CW) -> tuple[int, int]:
    """(freq of common words, freq of uncommon words) for a list of n entries.

    RULER uses 30/3. Short lists lower the common frequency so the common words
    stay at most a third of the list; a word pool too small for n lowers the
    contrast, but the common words always appear at least twice as often.
    """
    freq_cw = min(CWE_FREQ_CW, max(2, n // (3 * num_cw)))
    freq_ucw = max(1, min(CWE_FREQ_UCW, freq_cw - 1))
    for _ in range(4):
        rest = max(0, n - num_cw * freq_cw)
        need = math.ceil(rest / max(pool, 1))
        if need <= freq_ucw:
            break
        freq_ucw = need
        freq_cw = max(freq_cw, 2 * freq_ucw)
    return freq_cw, freq_ucw


def _cwe_list(words: Sequence[str], common: Sequence[str], n: int, rng: random.Random) -> list[str]:
    freq_cw, freq_ucw = cwe_frequencies(n, len(words))
    entries = [w for w in common for _ in range(freq_cw)][:n]
    rest = n - len(entries)
    k = math.ceil(rest / freq_ucw) if rest else 0
    entries += [w for w in words[:k] for _ in range(freq_ucw)][:rest]
    rng.shuffle(entries)
    return entries


def _numbered(entries: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))


def render_cwe(seed: int, n: int, pad: int) -> tuple[str, str, list[str]]:
    rng = random.Random(seed)
    vocab = list(_text.vocabulary())
    rng.shuffle(vocab)  # a fixed permutation; n only decides how much of it is used
    common, ex_common = vocab[:CWE_NUM_CW], vocab[CWE_NUM_CW : 2 * CWE_NUM_CW]
    ex_words, pool = vocab[2 * CWE_NUM_CW : 2 * CWE_NUM_CW + 20], vocab[2 * CWE_NUM_CW + 20 :]
    # In-context example: each example common word 3 times, 20 others once.
    ex_entries = [w for w in ex_common for _ in range(3)] + ex_words
    random.Random(derive_seed(seed, "icl")).shuffle(ex_entries)
    example = (
        _CWE_TEMPLATE.format(context=_numbered(ex_entries))
        + "\n"
        + _CWE_ANSWER.strip()
        + " "
        + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common))
        + "\n\n"
    )
    entries = _cwe_list(pool, common, n, random.Random(derive_seed(seed, "order", n)))
    context = _numbered(entries)
    if pad:
        context = filler_text(pad) + "\n" + context
    return example + _CWE_TEMPLATE.format(context=context), _CWE_ANSWER, list(common)
