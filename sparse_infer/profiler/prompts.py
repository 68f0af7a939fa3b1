"""Calibration prompts, generated in-process and deterministic by seed.

Three kinds, sized with the model's own tokenizer:

  needle  "special magic number" sentences hidden at given depths of running text, then
          the question; the answer is appended (teacher forcing) so the last queries are
          the ones that copy it (retrieval-head scores, decode recall)
  kv      JSON objects of random uuid pairs; the queried key sits at a given depth
  text    plain running text

One prompt serves every profiled length: it is a conversation whose k-th turn ends
(question, answer) exactly at the k-th length, and the prompt for length k is its
prefix up to there (causality makes the prefix's q/k identical to running it alone).

Running text comes from software that ships with Python: the language reference
topics in ``pydoc_data`` (stdlib), falling back to stdlib module docstrings and the
Zen of Python. Pieces are tokenized separately and concatenated, so the answer's
tokens appear verbatim inside the context (a head copying them can be recognised).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import random
import re
import weakref
from dataclasses import dataclass, field

import torch

from sparse_infer._stdlib_text import module_docstrings, pydoc_topic_texts

KINDS = ("needle", "kv", "text")


@dataclass
class Turn:
    """The part of a sample that ends at one profiled length: its own question and answer."""

    length: int                              # nominal length this turn was sized for
    end: int                                 # tokens of the sample up to the end of this turn (<= length)
    depth: float | None = None               # where the copied value sits, as a share of `end`
    needle_span: tuple[int, int] | None = None     # [lo, hi) positions of the value to copy
    answer_positions: list[int] = field(default_factory=list)
    answer: str | None = None


@dataclass
class CalibrationSample:
    """One prompt, as long as the longest length. Its prefix up to turn k's end is the prompt
    for length k: causal attention makes the first `end` tokens' q/k identical to running
    that prefix alone, so one forward pass serves every length."""

    kind: str
    index: int
    input_ids: torch.Tensor                  # (1, n)
    turns: list[Turn]

    def turn(self, length: int) -> Turn:
        return next(t for t in self.turns if t.length == length)


@functools.lru_cache(maxsize=1)
def corpus_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs from the stdlib, in a fixed order."""
    texts = pydoc_topic_texts()
    paras = _prose(texts)
    if sum(len(p.split()) for p in paras) < 20000:
        texts += module_docstrings()
        with contextlib.redirect_stdout(io.StringIO()):   # importing `this` prints the Zen
            this = importlib.import_module("this")
        texts.append("".join(this.d.get(c, c) for c in this.s))
        paras = _prose(texts)
    if not paras:
        raise RuntimeError("no offline prose found for calibration prompts")
    return tuple(paras)


def _prose(texts: list[str]) -> list[str]:
    """Flush-left paragraphs that read as sentences (indented blocks are code or grammar)."""
    out = []
    for text in texts:
        for block in re.split(r"\n\s*\n", text):
            lines = block.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):
                continue
            para = " ".join(line.strip() for line in lines).strip()
            if len(para.split()) >= 8 and para.endswith("."):
                out.append(para)
    return out


@functools.lru_cache(maxsize=1)
def _key_words() -> tuple[str, ...]:
    words = {w.lower() for p in corpus_paragraphs() for w in re.findall(r"[A-Za-z]{6,10}", p)}
    return tuple(sorted(words))


class _Tokens:
    """Piecewise tokenization with a per-paragraph cache."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[str, list[int]] = {}
        probe = tokenizer("a")["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []

    def __call__(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]


_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tokens(tokenizer) -> _Tokens:
    if tokenizer not in _TOKENS:
        _TOKENS[tokenizer] = _Tokens(tokenizer)
    return _TOKENS[tokenizer]


def _depth(index: int, count: int, seed: int) -> float:
    """Depths spread evenly over the retrieval samples, rotated by the seed."""
    offset = random.Random(f"depth-{seed}").random()
    return 0.05 + 0.9 * (((index + 0.5) / count + offset) % 1.0)


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _chat_pieces(tk: _Tokens):
    """(first user turn start, user end -> assistant start, assistant end -> next user start)."""
    tok = tk.tok
    marks = ["\u2063M1\u2063", "\u2063M2\u2063", "\u2063M3\u2063"]
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(
                [{"role": "user", "content": marks[0]}, {"role": "assistant", "content": marks[1]},
                 {"role": "user", "content": marks[2]}], tokenize=False, add_generation_prompt=True)
        except Exception:    # a template with other expectations: fall back to plain text
            text = None
        if text and all(m in text for m in marks):
            pre, rest = text.split(marks[0], 1)
            to_asst, rest = rest.split(marks[1], 1)
            to_user, post = rest.split(marks[2], 1)
            # the assistant's content is followed by to_user; the answer is teacher-forced after `post`
            return tk.bos + tk(pre), tk(post), tk(to_user)
    return tk.bos, tk("\n\n"), tk("\n\n")


class _Paragraphs:
    """Running text continuing across the turns of one sample."""

    def __init__(self, tk: _Tokens, rng: random.Random):
        self.tk, self.paras = tk, corpus_paragraphs()
        self.i = rng.randrange(len(self.paras))

    def take(self, budget: int) -> tuple[list[int], list[int]]:
        """`budget` tokens; (ids, paragraph boundaries within them)."""
        if budget < 0:
            raise ValueError(f"calibration length too short for the prompt template (short by {-budget} tokens)")
        ids, bounds = [], [0]
        while len(ids) < budget:
            ids += self.tk(self.paras[self.i % len(self.paras)] + "\n\n")
            self.i += 1
            bounds.append(len(ids))
        return ids[:budget], [b for b in bounds if b <= budget]


def _insert(body: list[int], bounds: list[int], inserts: list[tuple[float, list[int], int, int]]):
    """Place pieces at the boundaries nearest their relative depths.
    inserts: (depth, piece, value offset in piece, value length); returns (ids, value spans)."""
    placed = sorted(((min(bounds, key=lambda b: abs(b - d * len(body))), i) for i, (d, *_rest) in
                     enumerate(inserts)))
    ids, spans, at = [], [None] * len(inserts), 0
    for cut, i in placed:
        ids += body[at:cut]
        at = cut
        _, piece, off, size = inserts[i]
        spans[i] = (len(ids) + off, len(ids) + off + size)
        ids += piece
    ids += body[at:]
    return ids, spans


def _turn_depths(first: float, turns: int) -> list[float]:
    """Later turns hide their value elsewhere (golden-ratio steps), covering several depths."""
    return [0.05 + 0.9 * (((first - 0.05) / 0.9 + k * 0.618034) % 1.0) for k in range(turns)]


def build_sample(tokenizer, kind: str, lengths, *, index: int = 0, seed: int = 0, depth: float = 0.5,
                 with_answer: bool = True) -> CalibrationSample:
    """One calibration prompt of `kind` with a turn ending at each of `lengths` (sorted).

    needle / kv: turn k asks for a value hidden at depth d_k of the whole context so far
    (possibly inside an earlier turn's text, as a distractor for that turn) and, with
    `with_answer`, ends with the value teacher-forced after the answer prefix.
    """
    lengths = sorted(int(L) for L in ([lengths] if isinstance(lengths, int) else lengths))
    tk = _tokens(tokenizer)
    rng = random.Random(f"{seed}-{index}-{kind}")
    if kind == "text":
        ids, _ = _Paragraphs(tk, rng).take(lengths[-1] - len(tk.bos))
        ids = tk.bos + ids
        return CalibrationSample(kind, index, torch.tensor([ids]), [Turn(L, L) for L in lengths])
    if kind not in ("needle", "kv"):
        raise ValueError(f"unknown calibration kind {kind!r}; expected one of {', '.join(KINDS)}")

    first, to_asst, to_user = _chat_pieces(tk)
    depths = _turn_depths(depth, len(lengths))
    # what each turn asks for: (key, value, value ids, piece holding the value, value offset in it)
    tasks = []
    for _ in lengths:
        if kind == "needle":
            key, value = rng.choice(_key_words()), str(rng.randint(1_000_000, 9_999_999))
            value_ids = tk(" " + value)
            pre = tk(f" One of the special magic numbers for {key} is:")
            piece = pre + value_ids + tk(".\n\n")
        else:
            key, value = _uuid(rng), _uuid(rng)
            value_ids = tk(value)
            pre = tk(f' "{key}": "')
            piece = pre + value_ids + tk('",')
        tasks.append((key, value, value_ids, piece, len(pre)))
    # which turn's body hosts each value: the one spanning its target position d_k * L_k
    hosts: dict[int, list[int]] = {}
    for k, L in enumerate(lengths):
        target = depths[k] * L
        host = next(j for j, Lj in enumerate(lengths) if target < Lj or j == k)
        hosts.setdefault(host, []).append(k)

    text = _Paragraphs(tk, random.Random(f"{seed}-{index}-{kind}-hay"))
    ids: list[int] = []
    turns: list[Turn] = []
    spans: dict[int, tuple[int, int]] = {}
    prev_len = 0
    for k, L in enumerate(lengths):
        key, value, value_ids, _, _ = tasks[k]
        if kind == "needle":
            intro = tk("Some special magic numbers are hidden within the following text. Make sure to memorize "
                       "it. I will quiz you about the numbers afterwards.\n\n" if k == 0 else
                       "Here is more of the text. More special magic numbers may be hidden in it.\n\n")
            question = tk(f"\n\nWhat is the special magic number for {key} mentioned in the provided text?")
            answer_prefix = tk(f"The special magic number for {key} mentioned in the provided text is:")
        else:
            intro = tk("Extract the value corresponding to the specified key in the JSON object below.\n\n{"
                       if k == 0 else "Here is another JSON object.\n\n{")
            question = tk(f'}}\n\nWhat is the value associated with key "{key}"?')
            answer_prefix = tk('The value associated with the specified key is: "')
        head = (first if k == 0 else to_user) + intro
        tail = question + to_asst + answer_prefix
        answer = value_ids if with_answer else []
        hosted = hosts.get(k, [])
        # relative depth of each hosted value inside this turn's body
        span_lo = prev_len
        inserts = []
        for t in hosted:
            rel = (depths[t] * lengths[t] - span_lo) / max(L - span_lo, 1)
            inserts.append((min(max(rel, 0.0), 1.0), tasks[t][3], tasks[t][4], len(tasks[t][2])))
        budget = L - len(ids) - len(head) - len(tail) - len(answer) - sum(len(i[1]) for i in inserts)
        if kind == "needle":
            body, bounds = text.take(budget)
        else:
            body, bounds = [], [0]
            close = tk('",')
            while True:
                pair = tk(f' "{_uuid(rng)}": "') + tk(_uuid(rng)) + close
                if len(body) + len(pair) > budget:
                    break
                body += pair
                bounds.append(len(body))
            if budget < 0:
                raise ValueError(f"calibration length {L} too short for the key-value prompt")
        body_ids, body_spans = _insert(body, bounds, inserts)
        base = len(ids) + len(head)
        for t, sp in zip(hosted, body_spans):
            spans[t] = (base + sp[0], base + sp[1])
        ids += head + body_ids + tail
        start = len(ids)
        ids += answer
        turns.append(Turn(L, len(ids), spans[k][0] / max(len(ids), 1), spans[k], list(range(start, len(ids))),
                          value))
        prev_len = len(ids)
    return CalibrationSample(kind, index, torch.tensor([ids]), turns)


def sample_kinds(samples: int) -> list[str]:
    """needle, kv, text, needle, kv, text, ...: retrieval-style inputs first."""
    return [KINDS[i % len(KINDS)] for i in range(samples)]


def calibration_set(tokenizer, lengths, samples: int, seed: int = 0) -> list[CalibrationSample]:
    """`samples` prompts, each as long as the longest length with a turn ending at every length."""
    kinds = sample_kinds(samples)
    retrieval = [i for i, k in enumerate(kinds) if k != "text"]
    out = []
    for i, kind in enumerate(kinds):
        depth = _depth(retrieval.index(i), len(retrieval), seed) if kind != "text" else 0.5
        out.append(build_sample(tokenizer, kind, lengths, index=i, seed=seed, depth=depth))
    return out
