"""Human-readable views: the profiler's summary table and `sparse-infer plan show`."""
from __future__ import annotations

import collections
import math

from rich.table import Table

from sparse_infer.methods import DECODE_SELECTORS, DENSE, PREFILL_PATTERNS
from sparse_infer.plan import Plan, Rule
from sparse_infer.profiler.search import _static_index, params_key


def short_labels() -> dict[str, str]:
    """{name: label}: dense, then every registered pattern and selector (the columns' order)."""
    return {DENSE: "dense", **{name: m.label for table in (PREFILL_PATTERNS, DECODE_SELECTORS)
                               for name, m in table.items()}}


def _counts(kinds) -> str:
    c = collections.Counter(kinds)
    short = short_labels()
    order = list(short)
    return " ".join(f"{short[k]}:{c[k]}" for k in sorted(c, key=order.index))


def summary_table(result) -> Table:
    """Per layer: chosen patterns/methods, measured density and recall, retrieval heads."""
    lengths = result.lengths
    table = Table(title=f"profile of {result.plan.profile.get('model', {}).get('name', 'model')} "
                        f"({result.seconds:.0f} s)")
    table.add_column("layer", justify="right")
    table.add_column("prefill")
    for L in lengths:
        table.add_column(f"density@{L}", justify="right")
    table.add_column(f"min recall@{lengths[-1]}", justify="right")
    table.add_column("decode")
    table.add_column(f"kv read@{lengths[-1]}", justify="right")
    table.add_column("retrieval heads")
    for li, heads in enumerate(result.reports):
        n = len(heads)
        row = [str(li), _counts(r.prefill.pattern for r in heads)]
        row += [f"{sum(r.prefill_density[L] for r in heads) / n:.3f}" for L in lengths]
        row.append(f"{min(r.prefill_recall[lengths[-1]] for r in heads):.3f}")
        row.append(_counts(r.decode.pattern for r in heads))
        row.append(f"{sum(r.decode_cost[lengths[-1]] for r in heads) / n:.3f}")
        ret = [f"{h}({r.retrieval_score:.2f})" for h, r in enumerate(heads)
               if r.retrieval_score >= result.config.retrieval_threshold]
        row.append(" ".join(ret))
        table.add_row(*row)
    all_heads = [r for layer in result.reports for r in layer]
    n = len(all_heads)
    table.add_section()
    table.add_row("all", _counts(r.prefill.pattern for r in all_heads),
                  *[f"{sum(r.prefill_density[L] for r in all_heads) / n:.3f}" for L in lengths],
                  f"{min(r.prefill_recall[lengths[-1]] for r in all_heads):.3f}",
                  _counts(r.decode.pattern for r in all_heads),
                  f"{sum(r.decode_cost[lengths[-1]] for r in all_heads) / n:.3f}",
                  str(sum(r.retrieval_score >= result.config.retrieval_threshold for r in all_heads)))
    return table


# --------------------------------------------------------------------------- expected density
def prefill_rule_density(rule: Rule, n: int, block_size: int, measured: dict[int, float] | None = None) -> float:
    """Expected share of causal pairs a rule computes at length n.

    Exact for dense and patterns whose index ignores q/k (a_shape). The others depend on the
    data: each pattern's expected_density reads the profiler's measured density (at the nearest
    profiled length; vertical_slash scales it by how its token budget grows) or, without
    measurements, estimates it (vertical_slash) or says unknown (NaN, block).
    """
    if rule.kind == DENSE:
        return 1.0
    pattern = PREFILL_PATTERNS[rule.kind]
    if pattern.search_evaluation == "static":
        return float(_static_index(rule.kind, params_key(dict(rule.params)), n, block_size, 1)[1][0])
    return pattern.expected_density(rule, n, block_size, measured)


def decode_rule_density(rule: Rule, n: int) -> float:
    """Share of the cached tokens a decode rule attends to at kv length n."""
    if rule.kind == DENSE:
        return 1.0
    return DECODE_SELECTORS[rule.kind].density(rule, n)


def show_lengths(plan: Plan) -> list[int]:
    lengths = plan.profile.get("lengths") if isinstance(plan.profile, dict) else None
    if lengths:
        top = max(lengths)
        return sorted(set(lengths) | {2 * top, 4 * top})
    return [4096, 8192, 16384, 32768]


class ShapeUnknown(ValueError):
    """A plan written for any model (no model section) shown without the model's shape."""


def model_shape(plan: Plan, heads: int | None = None, layers: int | None = None) -> tuple[int, int]:
    """(query heads, layers) to show the plan for: as given, else from the plan's model section."""
    heads = heads if heads is not None else plan.model.num_attention_heads
    layers = layers if layers is not None else plan.model.num_hidden_layers
    if heads is None or layers is None:
        raise ShapeUnknown("the plan has no model section (num_attention_heads, num_hidden_layers), so its "
                           "per-layer rules cannot be laid out: give the model's shape with --heads and --layers")
    return heads, layers


def expected_densities(plan: Plan, lengths: list[int], heads: int | None = None,
                       layers: int | None = None) -> list[dict[int, tuple[float, float]]]:
    """Per layer {n: (prefill density, decode density)}, averaged over the layer's heads (the
    model's shape from the plan unless given)."""
    heads, layers = model_shape(plan, heads, layers)
    measured = (plan.profile.get("measured") or {}).get("head_prefill_density", {}) if plan.profile else {}
    if not isinstance(measured, dict):
        measured = {}
    out = []
    for li in range(layers):
        prules = [plan.prefill.rule(li, h) for h in range(heads)]
        drules = [plan.decode.rule(li, h) for h in range(heads)]
        # {length: this layer's measured density per head}, from the profile when present
        head_measured = {L: per_layer[li] for L, per_layer in measured.items()
                         if isinstance(per_layer, dict) and len(per_layer.get(li) or []) == heads}
        row = {}
        for n in lengths:
            if n < plan.prefill.min_len:
                pre = 1.0
            else:
                pre = sum(prefill_rule_density(r, n, plan.prefill.block_size,
                                               {L: v[h] for L, v in head_measured.items()} or None)
                          for h, r in enumerate(prules)) / heads
            dec = 1.0 if n < plan.decode.min_len else sum(decode_rule_density(r, n) for r in drules) / heads
            row[n] = (pre, dec)
        out.append(row)
    return out


def plan_table(plan: Plan, lengths: list[int] | None = None, heads: int | None = None,
               layers: int | None = None) -> Table:
    """Per layer: pattern/method counts and expected prefill/decode density at a few lengths."""
    lengths = lengths or show_lengths(plan)
    heads, layers = model_shape(plan, heads, layers)
    dens = expected_densities(plan, lengths, heads, layers)
    title = f"plan {plan.source or ''}".strip()
    if plan.profile:
        name = (plan.profile.get("model") or {}).get("name") if isinstance(plan.profile.get("model"), dict) else None
        title += f" - {name or plan.model.architecture}, target recall {plan.profile.get('target_recall', '?')}"
    table = Table(title=title, caption=f"prefill dense below {plan.prefill.min_len} tokens, decode dense below "
                                       f"{plan.decode.min_len}; density = share of causal pairs (prefill) / "
                                       f"of cached tokens (decode)")
    table.add_column("layer", justify="right")
    table.add_column("prefill")
    for n in lengths:
        table.add_column(f"pre@{n}", justify="right")
    table.add_column("decode")
    for n in lengths:
        table.add_column(f"dec@{n}", justify="right")

    def fmt(x: float) -> str:
        return "?" if math.isnan(x) else f"{x:.3f}"

    for li, row in enumerate(dens):
        table.add_row(str(li), _counts(plan.prefill.rule(li, h).kind for h in range(heads)),
                      *[fmt(row[n][0]) for n in lengths],
                      _counts(plan.decode.rule(li, h).kind for h in range(heads)),
                      *[fmt(row[n][1]) for n in lengths])
    table.add_section()
    table.add_row("mean", "", *[fmt(sum(r[n][0] for r in dens) / len(dens)) for n in lengths],
                  "", *[fmt(sum(r[n][1] for r in dens) / len(dens)) for n in lengths])
    return table


def _level_label(number: int, rule: dict) -> str:
    """'2: adaptive gamma=0.85 tau=0.1 dense_tail=128': the level's number and every parameter written."""
    params = " ".join(f"{k}={v}" for k, v in rule.items() if k not in ("pattern", "method"))
    return f"{number}: {rule.get('pattern', rule.get('method', '?'))} {params}".rstrip()


_SELECT_LABEL = "select for later layers"


def calibration_table(plan: Plan) -> Table:
    """Per layer of a calibrated plan: the chosen rule, its measured KL, seconds and density."""
    cal = plan.profile["calibration"]
    measured = cal["measured"]
    dense_s = measured["layer_dense_seconds"]
    decode = cal.get("phase") == "decode"
    what = f"decode after {cal['length']} tokens ({cal['tokens']} steps)" if decode else f"{cal['length']} tokens"
    if cal.get("batch", 1) != 1:
        what += f", batch {cal['batch']}"
    seconds = (f"layer ms a step {1e3 * cal['predicted_seconds']:.1f} vs dense {1e3 * cal['dense_seconds']:.1f}"
               if decode else f"layer seconds {cal['predicted_seconds']:.1f} vs dense {cal['dense_seconds']:.1f}")
    table = Table(title=f"calibration at {what}: predicted KL {cal['predicted_kl']:.3g} of target "
                        f"{cal['target_kl']:.3g}; {seconds}")
    scale, unit = (1e3, "ms") if decode else (1.0, "seconds")
    for col in ("layer", "rule", "KL", unit, f"dense {'ms' if decode else 's'}", "density"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    reuse = cal.get("reuse") or {}
    for layer, pick in enumerate(cal["choice"]):
        dense = f"{scale * dense_s[layer]:.2f}"
        if pick == "select":
            # exact attention, at the seconds the allocation counted for it
            seconds = f"{scale * reuse['select_seconds'][layer]:.2f}"
            table.add_row(str(layer), f"{_SELECT_LABEL} (budget {reuse['rule'].get('budget')})", "0", seconds, dense,
                          "1")
            continue
        if pick == "reuse":
            density = reuse["density"][layer]
            table.add_row(str(layer), f"reuse layer {reuse['source'][layer]} (holds {reuse['held'][layer]:.3f})",
                          f"{reuse['kl'][layer]:.2e}", f"{scale * reuse['seconds'][layer]:.2f}", dense,
                          "?" if density is None else f"{density:.2f}")
            continue
        if pick == 0:
            table.add_row(str(layer), "dense", "0", dense, dense, "1")
            continue
        if isinstance(pick, dict):
            # a head-split trial: a level on the layer, some heads dense
            split = cal["split"]
            j = split["heads"].index(len(pick["dense_heads"]))
            density = split["density"][j][layer]
            table.add_row(str(layer), f"{_level_label(pick['level'], cal['levels'][pick['level'] - 1])}, heads "
                                      f"{','.join(map(str, pick['dense_heads']))} dense",
                          f"{split['kl'][j][layer]:.2e}", f"{scale * split['seconds'][j][layer]:.2f}", dense,
                          "?" if density is None else f"{density:.2f}")
            continue
        level = pick - 1
        density = measured["density"][level][layer]
        table.add_row(str(layer), _level_label(pick, cal["levels"][level]), f"{measured['kl'][level][layer]:.2e}",
                      f"{scale * measured['seconds'][level][layer]:.2f}", dense,
                      "?" if density is None else f"{density:.2f}")
    return table
