"""Variable tracking (RULER's vt): follow a chain of assignments back to a value."""

from __future__ import annotations

import random

from sparse_infer.eval import _text
from sparse_infer.eval.ruler.haystack import derive_seed, filler_text, insert_at_fractions, repeat_to_length

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
    lines = insert_at_fractions(repeat_to_length(_NOISE_SENTENCES, n), statements, fractions)
    task = _VT_TEMPLATE.format(context="\n".join(lines), query=query)
    return task, _VT_ANSWER.format(num_v=len(answers), query=query), answers


def render_vt(seed: int, n: int, pad: int) -> tuple[str, str, list[str]]:
    used: set[str] = set()
    # One solved example first (RULER's in-context demonstration for VT).
    ex_task, ex_prefix, ex_answers = _vt_parts(random.Random(derive_seed(seed, "icl")), 10, used)
    task, prefix, answers = _vt_parts(random.Random(seed), n, used)
    if pad:
        task = task.replace("\n\n", "\n\n" + filler_text(pad) + "\n", 1)
    example = f"{ex_task}\n{ex_prefix.strip()} {' '.join(ex_answers)}\n\n"
    return example + task, prefix, answers
