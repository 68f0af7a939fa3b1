"""RULER synthetic long-context tasks, generated in-process.

Task definitions, templates, answer prefixes and metrics follow RULER
(Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"). Differences, all forced by the offline setting or by
exact sizing, are noted where they happen: the essay haystack is the Python
language reference shipped with CPython instead of Paul Graham essays, and
word lists come from that same text instead of `wonderwords`.

A sample is a plain dict::

    {"id", "task", "length", "index", "input", "answers", "max_new_tokens",
     "metric", "tokens", "seed"}

`input` is the final prompt string (chat template and answer prefix
applied); `tokens` is its length in the model tokenizer's tokens, which is
within 1% of (and never above) `length`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_infer.eval import _text


class EvalError(ValueError):
    """A user-facing problem with an evaluation request (bad task, length, file...)."""


# ---------------------------------------------------------------------------
# Task table
# ---------------------------------------------------------------------------

STRING_MATCH_ALL = "string_match_all"
STRING_MATCH_PART = "string_match_part"
QA_TASK = "qa"


@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # "noise" (repeated sentences), "essay", or "needle" (distractor needles)
    key_type: str  # "words" | "uuids"
    value_type: str  # "numbers" | "words" | "uuids"
    num_keys: int = 1  # needles with distinct keys (the others are distractors)
    num_values: int = 1  # values per queried key
    num_queries: int = 1  # keys asked about


# RULER's synthetic.yaml settings.
NIAH_TASKS: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", num_values=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", num_keys=4, num_queries=4),
}
TASK_NAMES: tuple[str, ...] = (*NIAH_TASKS, "vt", "cwe", "fwe")

# RULER's tokens_to_generate per task family.
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, QA_TASK: 32}


def task_metric(task: str) -> str:
    return STRING_MATCH_PART if task == QA_TASK else STRING_MATCH_ALL


def resolve_tasks(spec: str | Iterable[str]) -> list[str]:
    """'all' or a comma list (or iterable) of task names -> validated list, order kept."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(TASK_NAMES)
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or not names:
        raise EvalError(
            f"unknown task(s): {', '.join(unknown) or '(none given)'}; "
            f"valid: all, {', '.join(TASK_NAMES)} (QA data comes from --data FILE)"
        )
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------
# Scoring (RULER metrics, x100)
# ---------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    """RULER's post-processing: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def _as_refs(refs: Sequence[str] | str) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references found (case-insensitive) x100."""
    if not preds:
        return 0.0
    total = 0.0
    for pred, ref in zip(preds, refs, strict=True):
        ref = _as_refs(ref)
        p = pred.lower()
        total += sum(r.lower() in p for r in ref) / len(ref) if ref else 0.0
    return total / len(preds) * 100


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any reference is found (case-insensitive) x100."""
    if not preds:
        return 0.0
    total = 0.0
    for pred, ref in zip(preds, refs, strict=True):
        p = pred.lower()
        total += max((r.lower() in p for r in _as_refs(ref)), default=False)
    return total / len(preds) * 100


METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    STRING_MATCH_ALL: string_match_all,
    STRING_MATCH_PART: string_match_part,
}


def score_sample(pred: str, answers: Sequence[str] | str, metric: str = STRING_MATCH_ALL) -> float:
    if metric not in METRICS:
        raise EvalError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    return METRICS[metric]([postprocess(pred)], [_as_refs(answers)])


# ---------------------------------------------------------------------------
# Tokenizer helpers (shared with the runner so counts match what is generated)
# ---------------------------------------------------------------------------


def _add_special_tokens(tokenizer: Any, text: str) -> bool:
    # A chat template usually writes the BOS itself; adding another would
    # shift every position by one and make the count disagree with generate().
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=_add_special_tokens(tokenizer, text))["input_ids"])


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(encode(tokenizer, text))


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, task_text: str, answer_prefix: str, chat_template: bool | None = None) -> str:
    """Wrap the task in the chat template (if any) and append the answer prefix.

    The prefix goes after the assistant turn's start, as RULER does, so the
    model continues the answer instead of deciding whether to answer.
    """
    use_chat = has_chat_template(tokenizer) if chat_template is None else chat_template
    if use_chat:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": task_text}], tokenize=False, add_generation_prompt=True
        )
        return head + answer_prefix.lstrip()
    return task_text + answer_prefix


# ---------------------------------------------------------------------------
# Random values
# ---------------------------------------------------------------------------


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


_RANDOM = {"numbers": _rand_number, "words": _rand_word, "uuids": _rand_uuid}


def _unique(rng: random.Random, kind: str, count: int, exclude: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        v = _RANDOM[kind](rng)
        if v not in exclude:
            exclude.add(v)
            out.append(v)
    return out


# ---------------------------------------------------------------------------
# Haystack helpers
# ---------------------------------------------------------------------------


def _cycled(words: Sequence[str], n: int) -> list[str]:
    # Longer prompts than the source simply repeat it, as RULER repeats essays.
    if n <= len(words):
        return list(words[:n])
    reps, rest = divmod(n, len(words))
    return list(words) * reps + list(words[:rest])


def _pad_text(pad: int) -> str:
    """Filler of `pad` noise words, used to close the last gap below one haystack unit."""
    return " ".join(_cycled(_text.noise_words(), pad))


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


def _insert_lines(lines: list[str], items: Sequence[str], fractions: Sequence[float]) -> list[str]:
    """Insert items among lines at relative positions (stable as the list grows), keeping item order on ties."""
    out = list(lines)
    for pos, i in sorted(((int(f * len(lines)), i) for i, f in enumerate(fractions)), reverse=True):
        out.insert(pos, items[i])
    return out


# ---------------------------------------------------------------------------
# Task renderers: render(seed, n, pad) -> (task_text, answer_prefix, answers)
# n is the haystack size in task units; all random choices that do not depend
# on n are drawn first, so growing n only grows the haystack.
# ---------------------------------------------------------------------------

DEPTHS = [round(i * 100 / 39, 2) for i in range(40)]  # RULER: linspace(0, 100, 40)

_NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
_NIAH_ANSWER = " The special magic {type_v} for {query} mentioned in the provided text are"
_NIAH_TEMPLATE_ONE = (
    "A special magic {type_v} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What is the special magic {type_v} for {query} mentioned in the provided text?"
)
_NIAH_ANSWER_ONE = " The special magic {type_v} for {query} mentioned in the provided text is"
NEEDLE_TEMPLATE = "One of the special magic {type_v} for {key} is: {value}."


def _render_niah(cfg: NiahConfig, seed: int, n: int, pad: int) -> tuple[str, str, list[str]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    keys = _unique(rng, cfg.key_type, cfg.num_keys, seen)
    values = [_unique(rng, cfg.value_type, cfg.num_values, seen) for _ in keys]
    needles = [
        NEEDLE_TEMPLATE.format(type_v=cfg.value_type, key=k, value=v)
        for k, vs in zip(keys, values, strict=True)
        for v in vs
    ]
    rng.shuffle(needles)
    queried = rng.sample(range(cfg.num_keys), cfg.num_queries)
    if cfg.haystack == "needle":
        fractions = [rng.random() for _ in needles]
        # Distractor needles with fresh keys and values; drawn one by one so a
        # larger n extends the same list.
        lines = [
            NEEDLE_TEMPLATE.format(
                type_v=cfg.value_type,
                key=_unique(rng, cfg.key_type, 1, seen)[0],
                value=_unique(rng, cfg.value_type, 1, seen)[0],
            )
            for _ in range(n)
        ]
        lines = _insert_lines(lines, needles, fractions)
        context = "\n".join(([_pad_text(pad)] if pad else []) + lines)
    else:
        depths = rng.sample(DEPTHS, len(needles))
        source = _text.noise_words() if cfg.haystack == "noise" else _text.essay_words()
        context = insert_at_depths(_cycled(source, n), needles, depths)
        if pad:
            context = _pad_text(pad) + " " + context
    query_keys = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    if len(answers) == 1:
        type_v = cfg.value_type[:-1]  # "numbers" -> "number", as RULER does for one answer
        template, prefix = _NIAH_TEMPLATE_ONE, _NIAH_ANSWER_ONE
    else:
        type_v, template, prefix = cfg.value_type, _NIAH_TEMPLATE, _NIAH_ANSWER
    return (
        template.format(type_v=type_v, context=context, query=query),
        prefix.format(type_v=type_v, query=query),
        answers,
    )


# -- variable tracking -------------------------------------------------------

_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
_VT_ANSWER = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assigned the value {query}, they are: "
)
VT_NUM_CHAINS = 1
VT_NUM_HOPS = 4
_NOISE_SENTENCES = [s.strip() + "." for s in _text.NOISE.split(".") if s.strip()]


def _vt_parts(rng: random.Random, n: int, used: set[str]) -> tuple[str, str, list[str]]:
    chains, answers, query = [], [], ""
    for c in range(VT_NUM_CHAINS):
        names = []
        while len(names) < VT_NUM_HOPS + 1:
            name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
            if name not in used:
                used.add(name)
                names.append(name)
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(VT_NUM_HOPS)]
        chains.append(chain)
        if c == 0:  # the first chain is queried; others are distractors
            answers, query = names, value
    statements = [s for chain in chains for s in chain]
    # Sorted fractions keep each chain's statements in order.
    fractions = sorted(rng.random() for _ in statements)
    lines = _insert_lines(_cycled(_NOISE_SENTENCES, n), statements, fractions)
    task = _VT_TEMPLATE.format(context="\n".join(lines), query=query)
    return task, _VT_ANSWER.format(num_v=len(answers), query=query), answers


def _render_vt(seed: int, n: int, pad: int) -> tuple[str, str, list[str]]:
    used: set[str] = set()
    # One solved example first (RULER's in-context demonstration for VT).
    ex_task, ex_prefix, ex_answers = _vt_parts(random.Random(derive_seed(seed, "icl")), 10, used)
    task, prefix, answers = _vt_parts(random.Random(seed), n, used)
    if pad:
        task = task.replace("\n\n", "\n\n" + _pad_text(pad) + "\n", 1)
    example = f"{ex_task}\n{ex_prefix.strip()} {' '.join(ex_answers)}\n\n"
    return example + task, prefix, answers


# -- common words extraction -------------------------------------------------

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


def _render_cwe(seed: int, n: int, pad: int) -> tuple[str, str, list[str]]:
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
        context = _pad_text(pad) + "\n" + context
    return example + _CWE_TEMPLATE.format(context=context), _CWE_ANSWER, list(common)


# -- frequent words extraction -----------------------------------------------

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


def _render_fwe(seed: int, n: int, pad: int) -> tuple[str, str, list[str]]:
    ex_ctx, ex_answers = _coded_text(
        random.Random(derive_seed(seed, "icl")), random.Random(derive_seed(seed, "icl-order")), 40
    )
    example = _FWE_TEMPLATE.format(context=ex_ctx) + "\n" + _FWE_ANSWER.strip() + " " + " ".join(ex_answers) + "\n\n"
    context, answers = _coded_text(random.Random(seed), random.Random(derive_seed(seed, "order", n)), n)
    if pad:
        context = _pad_text(pad) + " " + context
    return example + _FWE_TEMPLATE.format(context=context), _FWE_ANSWER, answers


def _renderer(task: str) -> Callable[[int, int, int], tuple[str, str, list[str]]]:
    if task in NIAH_TASKS:
        cfg = NIAH_TASKS[task]
        return lambda seed, n, pad: _render_niah(cfg, seed, n, pad)
    return {"vt": _render_vt, "cwe": _render_cwe, "fwe": _render_fwe}[task]


# Below these list sizes the top words are not well separated (ties, or
# common words that do not all appear).
MIN_UNITS = {"cwe": 6 * CWE_NUM_CW, "fwe": 60}


def max_new_tokens_for(task: str) -> int:
    return MAX_NEW_TOKENS["niah" if task.startswith("niah") else task]


# ---------------------------------------------------------------------------
# Sizing
# ---------------------------------------------------------------------------

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

    def f(n: int, pad: int = 0) -> int:
        if (n, pad) not in cache:
            text = build(n, pad)
            cache[(n, pad)] = (text, count(text))
        return cache[(n, pad)][1]

    base = f(0)
    if base > target:
        raise EvalError(f"{what}: the task's fixed text alone is {base} tokens, more than the requested {target}")
    lo, flo = 0, base
    # Bracket: grow from the hint (or 64) by linear extrapolation until f > target.
    guess, hi, fhi = max(1, hint or 64), None, 0
    while hi is None:
        fg = f(guess)
        if fg > target:
            hi, fhi = guess, fg
            break
        lo, flo = guess, fg
        rate = (fg - base) / guess
        nxt = guess * 2 if rate <= 0 else int(guess + (target - fg) / rate * 1.02) + 1
        guess = min(max(nxt, guess + 1), guess * 8 + 64)
        if guess > 50_000_000:
            raise EvalError(f"{what}: the prompt does not grow with the haystack")
    step = 0
    while hi - lo > 1:
        step += 1
        if step % 2 and fhi > flo:  # interpolation step
            mid = lo + int((target - flo) * (hi - lo) / (fhi - flo))
            mid = min(max(mid, lo + 1), hi - 1)
        else:
            mid = (lo + hi) // 2
        fm = f(mid)
        if fm <= target:
            lo, flo = mid, fm
        else:
            hi, fhi = mid, fm
    n, tokens = lo, flo
    pad = 0
    if tokens < floor:
        # The last haystack unit was too coarse: close the gap with filler words.
        plo, phi = 0, pad_limit
        while phi - plo > 1:
            mid = (plo + phi) // 2
            if f(n, mid) <= target:
                plo = mid
            else:
                phi = mid
        pad, tokens = plo, f(n, plo)
    if not floor <= tokens <= target:
        raise EvalError(f"{what}: could not size the prompt to {target} tokens (best {tokens}); try a longer length")
    return cache[(n, pad)][0], n


# ---------------------------------------------------------------------------
# Public generators
# ---------------------------------------------------------------------------


def sample_id(task: str, length: int, index: int) -> str:
    return f"{task}/{length}/{index}"


def generate_task(
    tokenizer: Any,
    task: str,
    length: int,
    index: int,
    seed: int = 0,
    *,
    chat_template: bool | None = None,
    hint: int | None = None,
) -> dict[str, Any]:
    """One sample of `task` whose prompt is `length` tokens (within 1%, never over)."""
    resolve_tasks([task])
    render = _renderer(task)
    s = derive_seed(seed, task, length, index)
    def build(n: int, pad: int) -> str:
        task_text, prefix, _ = render(s, n, pad)
        return format_prompt(tokenizer, task_text, prefix, chat_template)

    prompt, n = fit_length(build, lambda t: count_tokens(tokenizer, t), length, hint=hint, what=f"{task} @ {length}")
    answers = render(s, n, 0)[2]  # answers never depend on pad
    if n < MIN_UNITS.get(task, 1) or not all(a in prompt for a in answers):
        raise EvalError(f"{task} @ {length}: too short to hold the task (haystack of {n} units); use a longer length")
    return {
        "id": sample_id(task, length, index),
        "task": task,
        "length": length,
        "index": index,
        "input": prompt,
        "answers": answers,
        "max_new_tokens": max_new_tokens_for(task),
        "metric": task_metric(task),
        "tokens": count_tokens(tokenizer, prompt),
        "seed": seed,
        "_units": n,
    }


def generate_samples(
    tokenizer: Any,
    tasks: str | Iterable[str],
    lengths: Iterable[int],
    num_samples: int,
    seed: int = 0,
    *,
    chat_template: bool | None = None,
) -> list[dict[str, Any]]:
    """All samples for tasks x lengths x num_samples, in (length, task, index) order."""
    names = resolve_tasks(tasks)
    out = []
    for length in lengths:
        for task in names:
            hint = None
            for index in range(num_samples):
                sample = generate_task(tokenizer, task, length, index, seed, chat_template=chat_template, hint=hint)
                hint = sample.pop("_units") or None  # next sample's haystack is about as large
                out.append(sample)
    return out


# ---------------------------------------------------------------------------
# User QA data
# ---------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import datasets
        except ImportError:
            raise EvalError(f"reading {path.name} needs the datasets library: pip install datasets") from None
        return [dict(r) for r in datasets.load_dataset("parquet", data_files=str(path), split="train")]
    # JSON is read with the stdlib even when datasets is installed: Arrow's
    # schema inference rejects a field that is a string in one record and a
    # list in another (answers: "x" vs ["x", "y"]), which hand-written files do.
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            try:
                return [json.loads(line) for line in fh if line.strip()]
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}: invalid JSON line ({e})") from None
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: invalid JSON ({e})") from None
        if isinstance(data, dict):  # {"data": [...]} as written by many exporters
            data = data.get("data", data.get("samples"))
        if not isinstance(data, list):
            raise EvalError(f"{path}: expected a list of records or {{'data': [...]}}")
        return data
    raise EvalError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _bucket(tokens: int, lengths: Sequence[int] | None) -> int:
    # Group user samples with the smallest requested length that holds them,
    # else the next power of two, so the summary has few rows.
    for L in sorted(lengths or []):
        if tokens <= L:
            return L
    return 1 << max(0, (tokens - 1).bit_length())


def load_user_tasks(
    file: str | Path,
    tokenizer: Any = None,
    *,
    lengths: Sequence[int] | None = None,
    limit: int | None = None,
    task: str = QA_TASK,
    max_new_tokens: int = MAX_NEW_TOKENS[QA_TASK],
    chat_template: bool | None = None,
) -> list[dict[str, Any]]:
    """QA samples from a jsonl/json/parquet file with `input` and `answers` fields.

    Optional per-record fields: `task`, `answer_prefix`, `max_new_tokens`,
    `metric` (default string_match_part, as RULER's QA). With a tokenizer the
    prompt gets the chat template and `length` is a bucket of its token count.
    """
    path = Path(file)
    if not path.is_file():
        raise EvalError(f"data file not found: {path}")
    records = _read_records(path)
    if limit is not None:
        records = records[:limit]
    samples = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "input" not in rec or "answers" not in rec:
            raise EvalError(f"{path}: record {i} needs 'input' and 'answers' fields")
        answers = _as_refs(rec["answers"])
        if not answers or not all(isinstance(a, str) for a in answers):
            raise EvalError(f"{path}: record {i}: 'answers' must be a string or a list of strings")
        name = str(rec.get("task") or task)
        prefix = str(rec.get("answer_prefix") or "")
        if prefix and not prefix.startswith(" "):
            prefix = " " + prefix
        prompt = format_prompt(tokenizer, rec["input"], prefix, chat_template) if tokenizer else rec["input"] + prefix
        tokens = count_tokens(tokenizer, prompt) if tokenizer else 0
        length = _bucket(tokens, lengths) if tokenizer else int(rec.get("length", 0))
        samples.append(
            {
                "id": sample_id(name, length, i),
                "task": name,
                "length": length,
                "index": i,
                "input": prompt,
                "answers": answers,
                "max_new_tokens": int(rec.get("max_new_tokens") or max_new_tokens),
                "metric": str(rec.get("metric") or STRING_MATCH_PART),
                "tokens": tokens,
            }
        )
    if not samples:
        raise EvalError(f"{path}: no records")
    return samples
