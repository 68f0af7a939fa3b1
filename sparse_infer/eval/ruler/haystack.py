"""Seeds, random keys and values, and the haystacks needles are hidden in."""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Sequence

from sparse_infer.eval import _text


def derive_seed(*parts: object) -> int:
    # Python's hash() of str is salted per process; sha256 is stable.
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _rand_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))  # 7 digits, as RULER


def _rand_word(rng: random.Random) -> str:
    # RULER pairs an adjective and a noun ("ruthless-bother"); a pair of
    # distinct words keeps keys unlikely to occur in the haystack text.
    vocab = _text.vocabulary()
    a, b = rng.sample(vocab, 2)
    return f"{a}-{b}"


def _rand_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_DRAW_RANDOM = {"numbers": _rand_number, "words": _rand_word, "uuids": _rand_uuid}


def draw_unique(rng: random.Random, kind: str, count: int, exclude: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        v = _DRAW_RANDOM[kind](rng)
        if v not in exclude:
            exclude.add(v)
            out.append(v)
    return out


# ---------------------------------------------------------------------------
# Haystack helpers
# ---------------------------------------------------------------------------


def repeat_to_length(words: Sequence[str], n: int) -> list[str]:
    # Longer prompts than the source simply repeat it, as RULER repeats essays.
    if n <= len(words):
        return list(words[:n])
    reps, rest = divmod(n, len(words))
    return list(words) * reps + list(words[:rest])


def filler_text(pad: int) -> str:
    """Filler of `pad` noise words, used to close the last gap below one haystack unit."""
    return " ".join(repeat_to_length(_text.noise_words(), pad))


def _sentence_boundary(words: Sequence[str], depth: float) -> int:
    """Word index nearest to depth% at which a sentence starts (0 and len are boundaries)."""
    n = len(words)
    target = round(n * depth / 100)
    for delta in range(n + 1):
        for i in (target - delta, target + delta):
            if 0 <= i <= n and (i in (0, n) or words[i - 1].endswith((".", "!", "?"))):
                return i
    return target


def insert_at_depths(words: Sequence[str], items: Sequence[str], depths: Sequence[float]) -> str:
    """Put each item (a sentence) at a sentence boundary near its depth in percent."""
    out = list(words)
    # Insert from the back so earlier positions stay valid.
    placed = sorted(((_sentence_boundary(words, d), k) for k, d in enumerate(depths)), reverse=True)
    for pos, k in placed:
        out.insert(pos, items[k])
    return " ".join(out)


def insert_at_fractions(lines: list[str], items: Sequence[str], fractions: Sequence[float]) -> list[str]:
    """Insert items among lines at relative positions (stable as the list grows), keeping item order on ties."""
    out = list(lines)
    for pos, i in sorted(((int(f * len(lines)), i) for i, f in enumerate(fractions)), reverse=True):
        out.insert(pos, items[i])
    return out


DEPTHS = [round(i * 100 / 39, 2) for i in range(40)]  # RULER: linspace(0, 100, 40)
