"""StreamingLLM-style heads: attend to the first `sink` valid tokens and the last `local` ones.

No scoring and no side state: the index set depends only on positions (and the mask,
so left padding is skipped and the sinks are the first *real* tokens).
"""
from __future__ import annotations

from sparse_infer.decode.common import GroupInputs, forced_and_eligible


def select(inp: GroupInputs, rule, state: dict):
    forced, _ = forced_and_eligible(inp, rule.sink, rule.local)
    return forced
