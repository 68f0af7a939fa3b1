"""Offline text sources for haystacks and word lists.

RULER uses Paul Graham essays and the `wonderwords` word lists; neither ships
with Python, and nothing may be downloaded, so the prose comes from the Python
language reference that CPython ships as ``pydoc_data.topics`` (falling back to
stdlib module docstrings). Everything is sorted so the output is identical on
every run of the same Python build.
"""

from __future__ import annotations

import functools
import re

from sparse_infer._stdlib_text import module_docstrings, pydoc_topic_texts

# RULER's "noise"/"repeat" haystack sentence.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Words too generic to make a distinctive needle key or a "common word" answer.
_STOP = frozenset(
    """about above after again against also although another because been before being below
    between both cannot could does doing down during each either else even every from further
    have having here however into itself just more most much must neither next once only other
    otherwise over same should since some such than that their them themselves then there
    these they this those though through under until upon very were what when where whether
    which while will with within without would your""".split()
)


def _prose_paragraphs(text: str) -> list[str]:
    """Keep flush-left paragraphs of sentences; indented blocks are code or grammar."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        if re.fullmatch(r"[*=\-~^\"]+", lines[-1].strip() or "x"):  # section heading underline
            continue
        para = " ".join(line.strip() for line in lines)
        if len(para.split()) < 8 or not para.endswith("."):
            continue
        out.append(para)
    return out


@functools.lru_cache(maxsize=None)
def essay_words() -> tuple[str, ...]:
    """The essay haystack as a word sequence (about 30k words)."""
    texts = pydoc_topic_texts() or module_docstrings()
    words: list[str] = []
    for text in texts:
        for para in _prose_paragraphs(text):
            words.extend(para.split())
    if len(words) < 1000:
        raise RuntimeError("could not find enough offline prose for the essay haystack")
    return tuple(words)


@functools.lru_cache(maxsize=None)
def vocabulary() -> tuple[str, ...]:
    """Distinct plain lowercase words from the prose, for keys and word lists."""
    seen = set()
    for w in essay_words():
        w = w.strip(".,;:()\"'!?").lower()
        if 4 <= len(w) <= 10 and w.isascii() and w.isalpha() and w not in _STOP:
            seen.add(w)
    return tuple(sorted(seen))


def noise_words() -> tuple[str, ...]:
    return tuple(NOISE.split())
