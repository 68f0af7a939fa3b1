"""The method registry: every prefill pattern and decode selector is one registered class.

A method file (sparse_infer/prefill/<name>.py or sparse_infer/decode/<name>.py) defines one
subclass of PrefillPattern or DecodeSelector and decorates it with @register. The class
declares everything the rest of the package needs to know about the method:

  * name, label                 the plan's `pattern:` / `method:` value, the report's short label
  * params                      {key: Param(parser, default)}: the plan schema and its messages
  * check / check_section / check_head_dim
                                cross-field checks (messages start with the YAML path)
  * prefill: build_index        (query, key, rule, ...) -> BlockSparseIndex
    decode:  select (or attend), State, select_and_attend_cpu, expected_rows
  * profiler hooks              search_grid, search_cost / search_recall, search_combine, search_session, ...
  * report hooks                expected density at a length
  * bench hooks (decode)        bench_cases (rules at a token budget), bytes_read (traffic model)

plan.py, the prefill and decode dispatchers, the profiler search, the report and the decode
benchmark loop over PREFILL_PATTERNS / DECODE_SELECTORS instead of switching on names (in the
spirit of transformers' AttentionInterface: the registry maps a name to the implementation).
This module imports no method file and no torch, so method files, plan.py and the
dispatchers can all import it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, ClassVar

from sparse_infer.params import PlanError, parse_budget

DENSE = "dense"   # the rule that reads everything: not a method, the absence of one
REQUIRED = object()   # a Param default meaning "the plan must give this key"


@dataclass(frozen=True)
class Param:
    """One plan key of a method: parse(value, yaml_path) -> value or PlanError; default or REQUIRED."""

    parse: Callable[[Any, str], Any]
    default: Any = REQUIRED


class Method:
    """What every registered method declares. Subclasses set the class attributes."""

    section: ClassVar[str]              # "prefill" | "decode"
    name: ClassVar[str]
    label: ClassVar[str]                # short label in the profiler summary and `plan show`
    params: ClassVar[dict[str, Param]] = {}

    def check(self, params: dict, path: str) -> None:
        """Cross-field checks on one rule's parsed params (raise PlanError(path, ...))."""

    def check_section(self, rule, path: str, section, layer: int | None) -> None:
        """Checks that need the rule's section (e.g. prefill.block_size, other layers' rules);
        `layer` is the rule's layer, None for the section's default."""

    def check_head_dim(self, rule, path: str, head_dim: int, where: str) -> None:
        """Checks against the model's head_dim (known from the plan's model section or the model)."""


class PrefillPattern(Method):
    section = "prefill"
    # how the profiler measures the grid (sparse_infer.profiler.search.evaluate_prefill_run):
    # "build" one index per grid point; "static" the index ignores q/k values, so it is built
    # once per length and cached (and the report's density is exact); "separable" the grid
    # crosses two budgets, `search_separable` = (blocks param, columns param), where the built
    # index's kv blocks depend only on the first and its columns only on the second, so the
    # k x k grid points are measured from 2k builds
    search_evaluation: ClassVar[str] = "build"
    search_separable: ClassVar[tuple[str, str] | None] = None

    def search_session(self):
        """A context manager the profiler holds while it measures one prompt (every pattern's grid,
        then the chosen rules; every registered pattern's session at once): the place to keep work
        that builds for different params share, e.g. an estimate that does not depend on them."""
        return contextlib.nullcontext()

    def build_index(self, query, key, rule, **kwargs):
        """(query (B, Hq, q, D), key (B, Hkv, n, D), rule, block_size=, scaling=, attention_mask=,
        granularity=, softcap=) -> BlockSparseIndex (see docs/ARCHITECTURE.md)."""
        raise NotImplementedError

    # ---- profiler hooks (sparse_infer.profiler.search): a pattern with an empty grid is never chosen
    def search_grid(self, n: int, block_size: int) -> list[dict]:
        """Candidate params at length n; each is built on the captured q/k and measured."""
        return []

    def search_overhead(self, n: int, block_size: int) -> float:
        """Estimation work as a share of dense causal attention, added to the measured density."""
        return 0.0

    def search_combine(self, points: dict[int, dict], longest: int, block_size: int):
        """One rule's params from the cheapest passing params per length {L: params}, and the grid
        point to read its cost from at the longest length: (params, lookup) or None to reject."""
        lookup = points[longest]
        return dict(lookup), lookup

    # ---- report hook (sparse_infer.profiler.report)
    def expected_density(self, rule, n: int, block_size: int, measured: dict[int, float] | None) -> float:
        """Expected share of causal pairs at length n; `measured` {length: density} when profiled."""
        if measured:
            return measured[min(measured, key=lambda x: abs(math.log(x / n)))]
        return float("nan")


class SideState:
    """A decode selector's side state for one part of a layer (a dataclass subclass).

    Fields named in `kept_across_sequences` (counters) survive a new sequence; the others
    go back to their defaults, so the next step rebuilds them from the whole cache."""

    kept_across_sequences: ClassVar[tuple[str, ...]] = ()

    def forget_sequence(self) -> None:
        for f in fields(self):
            if f.name not in self.kept_across_sequences:
                setattr(self, f.name, f.default_factory() if f.default_factory is not MISSING else f.default)


class DecodeSelector(Method):
    section = "decode"
    State: ClassVar[type | None] = None         # a SideState dataclass, or None for a stateless selector
    # select_and_attend_cpu(inp, rule, state, value) -> (out (B, h, 1, D), keys read (B, Hi)), or
    # None for a rule it does not cover: selection and attention in one C call, for steps with no
    # mask on the cpu executor
    select_and_attend_cpu: ClassVar[Callable | None] = None
    # among equally cheap candidates the profiler keeps the one with the lowest priority
    search_priority: ClassVar[int] = 100
    # ranks keys by the query: a retrieval head may take it (SearchSettings.retrieval_dense);
    # a selector declares it, as one that keeps keys regardless of the query must not
    query_aware: ClassVar[bool] = False
    # True: the dispatcher calls attend() (the selector reads the whole cache itself) instead of select()
    attends_whole_cache: ClassVar[bool] = False

    def new_state(self):
        return None if self.State is None else self.State()

    def select(self, inp, rule, state):
        """GroupInputs -> int64 (B, Hi, K) absolute kv positions, -1 = unused, no duplicates;
        or None: nothing to select from this step, the part runs dense."""
        raise NotImplementedError

    def attend(self, inp, rule, state, value):
        """For attends_whole_cache selectors: (out (B, h, 1, Dv), the token sets (B, S, K) it
        publishes for later layers of the step, S = 1 or one per cache head of the part; or None)."""
        raise NotImplementedError

    def expected_rows(self, rule, n: int) -> int | None:
        """Upper bound of the cache rows one selection holds at kv length n; None when only the
        selection itself tells (then dense_above is checked against it once made)."""
        raise NotImplementedError

    # ---- profiler hooks (sparse_infer.profiler.search)
    def search_available(self, channel_list) -> bool:
        """Whether the search may consider this method (e.g. it needs calibrated channels)."""
        return True

    # the recall curves need the profiler's calibrated channels (computed after every prompt is seen)
    search_needs_channels: ClassVar[bool] = False

    def search_curves(self, inputs, channels=None) -> dict:
        """{(name, ...): (Hq, m) recall curve} for one prompt, from a profiler.decode.CurveInputs
        (and the channels (Hq, r) when search_needs_channels); averaged over prompts by the
        profiler and handed to search_recall as {name: curve} or {name: {key: curve}}."""
        return {}

    def search_grid(self, n: int) -> list[dict]:
        return []

    def search_variants(self, settings) -> list[dict]:
        """Fixed params the search tries as candidates of their own (each its own grid and rule),
        e.g. another scoring; `settings` is the profiler's SearchSettings."""
        return [{}]

    def search_cost(self, params: dict, n: int, head_dim: int, channels: int) -> float:
        """Share of the dense decode K/V traffic (2*n*D values) the method reads."""
        raise NotImplementedError

    def search_recall(self, curves: dict, params: dict, n: int):
        """(Hq,) recall of params at length n from the profiler's recall curves."""
        raise NotImplementedError

    def search_combine(self, points: dict[int, dict], channel_list) -> dict | None:
        """One rule's params from the cheapest passing params per length, or None to reject."""
        raise NotImplementedError

    # ---- report hook
    def density(self, rule, n: int) -> float:
        """Share of the cached tokens read at kv length n."""
        return min(1.0, self.expected_rows(rule, n) / n)

    # ---- benchmark hooks (sparse_infer.bench.attention.bench_decode_methods)
    def bench_cases(self, budget: int) -> list[BenchCase]:
        """The rules the decode micro-benchmark times for a token budget: the method reading
        `budget` chosen tokens, or nothing for a method without a `budget` (its own hook says
        how to size it)."""
        if "budget" not in self.params:
            return []
        return [BenchCase(self.name, {"budget": budget})]

    def bytes_read(self, rule, n: int, rows: float, *, cache_heads: int, head_dim: int, elem_size: int,
                   counters: dict) -> float:
        """K/V bytes one decode step reads at kv length n over `cache_heads` cache heads (batch rows
        x kv heads), the method's scoring data included: `rows` is the K/V rows it selected over
        them, `counters` how much each side-state counter grew during the step. By default the
        selected rows' K and V (a method that scores from other data adds it)."""
        selected = rows * head_dim * elem_size
        return 2 * selected


@dataclass(frozen=True)
class BenchCase:
    """One row of the decode micro-benchmark: its label, the rule's params, a note for the table."""

    label: str
    params: dict
    note: str = ""


PREFILL_PATTERNS: dict[str, PrefillPattern] = {}
DECODE_SELECTORS: dict[str, DecodeSelector] = {}
_TABLES = {"prefill": PREFILL_PATTERNS, "decode": DECODE_SELECTORS}
SEARCH_EVALUATIONS = ("build", "static", "separable")


def register(cls):
    """Class decorator: register one instance of a PrefillPattern or DecodeSelector subclass."""
    table = _TABLES[cls.section]
    if cls.section == "prefill" and cls.search_evaluation not in SEARCH_EVALUATIONS:
        raise ValueError(f"{cls.name}: search_evaluation must be one of {', '.join(SEARCH_EVALUATIONS)}")
    if cls.section == "prefill" and cls.search_evaluation == "separable" and cls.search_separable is None:
        raise ValueError(f"{cls.name}: a separable search names its (blocks, columns) params in search_separable")
    if cls.name == DENSE:
        raise ValueError(f"{DENSE!r} is the plan's name for no method; pick another name")
    if cls.name in table:
        raise ValueError(f"{cls.section} method {cls.name!r} is already registered")
    table[cls.name] = cls()
    return cls


def unregister(section: str, name: str) -> None:
    _TABLES[section].pop(name, None)


def methods_of(section: str) -> dict:
    """Registered methods of a section, in registration order."""
    return _TABLES[section]


def prefill_pattern(name: str) -> PrefillPattern:
    return PREFILL_PATTERNS[name]


def decode_selector(name: str) -> DecodeSelector:
    return DECODE_SELECTORS[name]


# --------------------------------------------------------------------------- helpers for the profiler hooks
def budget_grid(lo: int, hi: int) -> list[int]:
    """Powers of two from lo and the points halfway between them in ratio (x1.5): budgets near
    a tenth of a long cache are otherwise rounded up to an eighth (32K: 3,072, not 4,096)."""
    return sorted({v for p in pow2_grid(lo, hi) for v in (p, p * 3 // 2) if v <= max(hi, lo)})


def pow2_grid(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v <= max(hi, lo):
        out.append(v)
        v *= 2
    return out


def window_grid(bs: int, hi: int) -> list[int]:
    """Every distinct a_shape window: local = k * bs keeps k + 1 kv blocks per query block.

    A static window pays for every block it spans, so it gets every step, not powers of two
    (evaluating it is cheap: its index does not depend on q/k and is cached)."""
    return list(range(bs, max(hi, bs) + 1, bs))


def combine_budget(needs: dict[int, int]):
    """A token budget meeting `needs` {length: tokens} at every length: int if it need not grow."""
    lengths = sorted(needs)
    longest = lengths[-1]
    shorter = max((needs[L] for L in lengths[:-1]), default=0)
    if needs[longest] <= shorter:
        return shorter
    if not lengths[:-1]:
        return needs[longest]
    # exact when the length is a power of two (then need/length is a short decimal); otherwise
    # rounded to 8 places, upwards, so that ceil(frac * length) still covers the need
    frac = round(needs[longest] / longest, 8)
    if frac * longest < needs[longest]:
        frac += 1e-8
    return {"frac": min(frac, 1.0), "min": max(shorter, 1)}


def fixed_size_ok(needs: dict[int, int]) -> bool:
    """A fixed window is trusted if its need grows at most like sqrt(length) between the
    shortest and longest profiled lengths (proportional growth = not a fixed-size structure;
    one grid step of threshold noise is tolerated)."""
    lengths = sorted(needs)
    short, long_ = lengths[0], lengths[-1]
    return needs[long_] <= needs[short] * math.sqrt(long_ / short) + 1e-9


def resolve(budget, n: int) -> int:
    """A budget as written in YAML (int or {frac, min, max}) at length n."""
    return parse_budget(budget, "budget").resolve(n)


def snap(value: int, grid: list[int]) -> int:
    """Smallest grid value >= value (costs of off-grid budgets are read conservatively)."""
    for g in grid:
        if g >= value:
            return g
    return grid[-1]


def curve_at(curve, count: int):
    """(Hq,) recall after the `count` best ranked items (budgets are >= 1)."""
    return curve[:, max(1, min(count, curve.shape[1])) - 1]


__all__ = ["DENSE", "REQUIRED", "Param", "Method", "PrefillPattern", "DecodeSelector", "SideState", "BenchCase",
           "PREFILL_PATTERNS", "DECODE_SELECTORS", "register", "unregister", "methods_of",
           "prefill_pattern", "decode_selector", "PlanError"]
