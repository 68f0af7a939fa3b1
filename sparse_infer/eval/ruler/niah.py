"""Needle-in-a-haystack tasks (RULER's niah_* family)."""

from __future__ import annotations

import random

from sparse_infer.eval import _text
from sparse_infer.eval.ruler.catalogue import NiahConfig
from sparse_infer.eval.ruler.haystack import (
    DEPTHS,
    draw_unique,
    filler_text,
    insert_at_depths,
    insert_at_fractions,
    repeat_to_length,
)

NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER = " The special magic {type_v} for {query} mentioned in the provided text are"
NIAH_TEMPLATE_ONE = (
    "A special magic {type_v} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What is the special magic {type_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_ONE = " The special magic {type_v} for {query} mentioned in the provided text is"
NEEDLE_TEMPLATE = "One of the special magic {type_v} for {key} is: {value}."


def render_niah(cfg: NiahConfig, seed: int, n: int, pad: int) -> tuple[str, str, list[str]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    keys = draw_unique(rng, cfg.key_type, cfg.num_keys, seen)
    values = [draw_unique(rng, cfg.value_type, cfg.num_values, seen) for _ in keys]
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
                key=draw_unique(rng, cfg.key_type, 1, seen)[0],
                value=draw_unique(rng, cfg.value_type, 1, seen)[0],
            )
            for _ in range(n)
        ]
        lines = insert_at_fractions(lines, needles, fractions)
        context = "\n".join(([filler_text(pad)] if pad else []) + lines)
    else:
        depths = rng.sample(DEPTHS, len(needles))
        source = _text.noise_words() if cfg.haystack == "noise" else _text.essay_words()
        context = insert_at_depths(repeat_to_length(source, n), needles, depths)
        if pad:
            context = filler_text(pad) + " " + context
    query_keys = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    if len(answers) == 1:
        type_v = cfg.value_type[:-1]  # "numbers" -> "number", as RULER does for one answer
        template, prefix = NIAH_TEMPLATE_ONE, NIAH_ANSWER_ONE
    else:
        type_v, template, prefix = cfg.value_type, NIAH_TEMPLATE, NIAH_ANSWER
    return (
        template.format(type_v=type_v, context=context, query=query),
        prefix.format(type_v=type_v, query=query),
        answers,
    )
