"""Per-layer prefill budgets chosen by the fidelity gate's own measure, not by attention recall.

The recall profiler ranks heads by how much attention mass their pattern keeps; measured on
Qwen2.5-0.5B that does not rank plans as the teacher-forced KL of `eval fidelity` does (in decode,
the recall-allocated plan failed the gate where a uniform budget reading as much passed).
Calibration measures what the gate measures, one layer at a time:

1. one dense forward of a long prose prompt (another seed than `eval fidelity`'s prompts: other
   starting points in the same essay text, so the texts may overlap in part) records every
   decoder layer's output and the next-token distribution over the last `window` positions;
2. for each layer L and each candidate rule ("level", densest first): the model is patched
   with that rule on layer L only, the layers before L are replaced by their recorded outputs
   (their inputs are dense's, exactly), and layers L.. run for real. The trial records
   KL(dense || trial) over the window, layer L's measured prefill density and its seconds;
   a dense forward under patch and every later (dense) layer of the trials give each layer's
   dense seconds (median);
3. a knapsack over layers picks one option per layer (dense or a level) with the least total
   layer time whose summed KL stays within the target. KL is close to additive over layers
   while each layer's change is small (second order in the logits); `eval fidelity` on other
   prompts is the check that it held.

Cost: per level, the layers after each L once: about (layers + 1) / 2 forwards. A level is
not tried at a layer where an earlier level of the same pattern (listed densest first) already
exceeded the target alone.

`phase="decode"` chooses decode rules the same way, by the measure of `eval fidelity
--decode-tokens`: dense greedily continues the prompt by `tokens` tokens; the prompt is
prefilled dense once into a cache, and each trial decodes from a copy of that cache, feeding
the continuation one token at a time (teacher-forced decode steps) with the level on layer L
only. Its KL is over the decode steps' next-token distributions, its seconds are layer L's per
step. A trial costs `tokens` decode steps, not a forward: no replay is needed. With a `reuse`
rule, each layer is also tried reusing an earlier layer's token set (profiler/reuse.py).

With `split_heads` (prefill), the layers the levels leave dense are also tried with the level
that cost least KL there on all heads but the K whose output it changes most, and the sparse
layers whose level spends at least SPLIT_SPARSE_SHARE of the target with that level
(_run_split_trials).
"""
from __future__ import annotations

import datetime
import json
import math
import shlex
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from sparse_infer.decode.cross_layer import REUSE, SELECT
from sparse_infer.params import PlanError
from sparse_infer.plan import DENSE, Plan, Rule, load_plan, parse_rule, plan_from_dict, schema
from sparse_infer.presets import PRESET_RULES

# candidate rules when none are given: adaptive at two thresholds (densest first), then the
# rules of the two presets whose density falls with length (sparse_infer.presets); their dense
# tail is left out so that it follows --window (see tail_covers_window)
DEFAULT_LEVELS: tuple[dict, ...] = (
    {"pattern": "adaptive", "gamma": 0.95, "tau": 0.1},
    {"pattern": "adaptive", "gamma": 0.85, "tau": 0.1},
    {k: v for k, v in PRESET_RULES["vertical_slash"].items() if k != "dense_tail"},
    {k: v for k, v in PRESET_RULES["a_shape"].items() if k != "dense_tail"},
)
# decode: token selection ranked by int8 codes (the shipped plans' method) at a tenth of the cache
# and less, densest first
DEFAULT_DECODE_LEVELS: tuple[dict, ...] = tuple(
    {"method": "token_select", "budget": {"frac": frac}, "scoring": "int8"} for frac in (0.1, 0.05, 0.025))
PHASES = ("prefill", "decode")


def tail_covers_window(raw: dict, window: int) -> dict:
    """`raw` with `dense_tail: window` when it names no dense tail.

    An answer is read from the prompt's last row and from decode steps, which read the cache
    the prefill wrote; the other prompt rows reach it only through the K/V they
    write in later layers. With the window's rows dense, the KL measured over the window is
    what the plan does to answers, not the error of sparse rows no answer is read from (on
    SmolLM2 at 8K the shipped plan's KL fell from 0.00147 to 0.00034 with its tail raised
    from 128 to 256 rows). It costs window x length scores per head (3% of dense causal
    attention at 16K).
    """
    if not isinstance(raw, Mapping) or "dense_tail" in raw:
        return raw
    if "dense_tail" not in schema("prefill").get(raw.get("pattern"), {}):
        return raw     # dense, an unknown pattern (parse_rule names it) or one without a tail
    return {**raw, "dense_tail": window}


TRIALS_VERSION = 1
# the prefill granularity of a head-split layer: its sparse heads of a group that keeps some heads
# dense still share the group's K/V and one index (plan.py); a record of split trials run with
# another one has its split trials measured again
SPLIT_GRANULARITY = "subgroup"


@dataclass
class CalibrateConfig:
    length: int = 8192                 # prompt tokens of the calibration forward
    window: int = 256                  # last positions whose next-token KL is measured
    seed: int = 1                      # prose prompt seed (eval fidelity's prompts use seed 0)
    levels: Sequence[dict] | None = None   # None: DEFAULT_LEVELS, or DEFAULT_DECODE_LEVELS in decode
    target_kl: float | None = None     # summed KL the plan may spend; None: floor_share x bf16 floor
    floor_share: float | None = None   # of the bf16 floor (default 1.0; the gate allows 2: half as margin)
    dense_above: float | str = "auto"  # as patch() runs the plan
    min_seq_len: int | None = None     # shorter prompts prefill dense (default: the calibration length)
    block_size: int = 64
    phase: str = "prefill"             # which section the levels and the plan's choice are of
    tokens: int = 64                   # decode: the dense continuation's tokens (tokens - 1 steps scored)
    reuse: Mapping | None = None       # decode: a layer_select rule whose sets later layers may reuse
    batch: int = 1                     # decode: rows decoded together (copies of the prompt), for the seconds
    # prefill: at the layers the levels leave dense, also try the least costly level with its K
    # worst heads dense, for each K here (_run_split_trials)
    split_heads: Sequence[int] = ()

    @property
    def level_list(self) -> tuple[dict, ...]:
        if self.levels is not None:
            return tuple(self.levels)
        return self.level_list_default()

    def validate(self, *, as_recorded: bool = False) -> list[Rule]:
        """The levels as rules, once every setting is checked. `as_recorded`: the levels of a
        calibrate record, exactly as they ran (a level without a dense tail is not given the
        window's: plans calibrated before that rule recorded such levels)."""
        if self.phase not in PHASES:
            raise ValueError(f"--phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        if not (isinstance(self.batch, int) and self.batch >= 1):
            raise ValueError(f"--batch must be a positive integer, got {self.batch!r}")
        if self.batch > 1 and self.phase != "decode":
            raise ValueError("--batch times decode steps of several rows: it needs --phase decode")
        self.check_split_heads()
        if self.phase == "decode" and self.tokens < 2:
            raise ValueError(f"--tokens must be at least 2 (the first token is the prefill's), got {self.tokens}")
        if self.length < 2 * self.block_size:
            raise ValueError(f"--length must be at least {2 * self.block_size} tokens, got {self.length}")
        if not 1 <= self.window < self.length:
            raise ValueError(f"--window must be in [1, length), got {self.window}")
        if self.target_kl is not None and not (self.target_kl > 0 and math.isfinite(self.target_kl)):
            raise ValueError(f"--target-kl must be a positive number, got {self.target_kl}")
        if self.floor_share is not None:
            if self.target_kl is not None:
                raise ValueError("give --target-kl or --floor-share, not both")
            if not (self.floor_share > 0 and math.isfinite(self.floor_share)):
                raise ValueError(f"--floor-share must be a positive number, got {self.floor_share}")
        if self.min_seq_len is not None and self.min_seq_len < 1:
            raise ValueError(f"--min-seq-len must be positive, got {self.min_seq_len}")
        if not self.level_list:
            raise ValueError(f"at least one level (candidate {self.phase} rule) is needed")
        self.reuse_rule()
        rules = []
        for i, raw in enumerate(self.level_list):
            try:
                if self.phase == "prefill" and not as_recorded:
                    raw = tail_covers_window(raw, self.window)
                rule = parse_rule(raw, f"--level {i + 1}", self.phase)
            except PlanError as exc:
                raise ValueError(str(exc)) from exc
            if rule.kind == DENSE:
                raise ValueError(f"--level {i + 1} is dense; dense is always an option, list sparse rules only")
            for j, other in enumerate(rules):
                if other.key() == rule.key():
                    raise ValueError(f"--level {j + 1} and --level {i + 1} are the same rule")
            rules.append(rule)
        return rules

    def check_split_heads(self, num_heads: int | None = None) -> None:
        ks = list(self.split_heads)
        if not ks:
            return
        if self.phase != "prefill":
            raise ValueError("--split-heads keeps a prefill layer's worst heads dense: it needs --phase prefill")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"--split-heads must be positive head counts, got {ks}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"--split-heads lists a count twice: {ks}")
        if num_heads is not None and max(ks) >= num_heads:
            raise ValueError(f"--split-heads {max(ks)}: the model has {num_heads} query heads a layer; at most "
                             f"{num_heads - 1} can be kept dense beside a sparse rule")

    def reuse_rule(self) -> Rule | None:
        """The layer_select rule of --reuse (its method implied), None without --reuse."""
        if self.reuse is None:
            return None
        if self.phase != "decode":
            raise ValueError("--reuse chooses cross-layer reuse of decode selections: it needs --phase decode")
        if not isinstance(self.reuse, Mapping):
            raise ValueError(f"--reuse must be a mapping such as '{{budget: {{frac: 0.1}}}}', got {self.reuse!r}")
        raw = dict(self.reuse)
        method = raw.pop("method", SELECT)
        if method != SELECT:
            raise ValueError(f"--reuse.method must be {SELECT} (the rule of the selecting layers), got {method!r}")
        try:
            return parse_rule({"method": SELECT, **raw}, "--reuse", "decode")
        except PlanError as exc:
            raise ValueError(str(exc)) from exc

    def level_list_default(self) -> tuple[dict, ...]:
        return DEFAULT_DECODE_LEVELS if self.phase == "decode" else DEFAULT_LEVELS

    @property
    def share(self) -> float:
        return 1.0 if self.floor_share is None else self.floor_share

    def command(self, model_name: str, out: str | None, base: str | None = None) -> str:
        """The `sparse-infer calibrate` command line that reproduces this run."""
        parts = ["sparse-infer", "calibrate", model_name]
        if out is not None:
            parts += ["--out", str(out)]
        if self.phase != "prefill":
            parts += ["--phase", self.phase, "--tokens", str(self.tokens)]
        parts += ["--length", str(self.length)]
        if self.phase == "prefill":
            parts += ["--window", str(self.window)]
        parts += ["--seed", str(self.seed)]
        if self.levels is not None and tuple(self.levels) != self.level_list_default():
            for raw in self.levels:
                parts += ["--level", json.dumps(raw)]
        if self.reuse is not None:
            parts += ["--reuse", json.dumps(dict(self.reuse))]
        if self.batch != 1:
            parts += ["--batch", str(self.batch)]
        if self.split_heads:
            parts += ["--split-heads", ",".join(str(k) for k in self.split_heads)]
        if self.target_kl is not None:
            parts += ["--target-kl", f"{self.target_kl:g}"]
        elif self.floor_share is not None:
            parts += ["--floor-share", f"{self.floor_share:g}"]
        if self.min_seq_len is not None:
            parts += ["--min-seq-len", str(self.min_seq_len)]
        if self.dense_above != "auto":
            parts += ["--as-written"]
        if base is not None:
            parts += ["--base", base]
        return " ".join(shlex.quote(p) for p in parts)


@dataclass
class Trial:
    kl: float
    top1: float
    seconds: float          # layer L's forward (attention and MLP) under the level; decode: per step
    density: float | None   # layer L's measured prefill density (dense heads count 1)
    # reuse trials (decode): the layer whose set L reuses, its seconds a step as the selecting
    # layer, and the share of L's dense attention that set holds
    source: int | None = None
    source_seconds: float | None = None
    held: float | None = None
    # split trials (prefill): the level run on the layer's other heads, and the heads kept dense
    base_level: int | None = None
    dense_heads: list[int] | None = None


@dataclass
class Calibration:
    """What the trials measured and what the knapsack chose."""

    dense_seconds: list[float]                      # per layer, median over the trials that ran it dense
    trials: dict[tuple[int, int], Trial]            # (layer, level) -> Trial; missing: skipped
    target_kl: float
    floor_kl: float | None
    # per layer: level index (prefill: len(levels) + j = the split trial of split_heads[j]), None = dense
    choice: list[int | None] = field(default_factory=list)
    predicted_kl: float = 0.0
    predicted_seconds: float = 0.0
    # with reuse: the selecting layers (their choice is None), and choice len(levels) = reuse
    selecting: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------- allocation


def _is_option(t: Trial | None) -> bool:
    """Whether a trial can stand for its layer: measured, finite, and sparse. A level that ran every
    head of the layer dense (patch's break-even) only adds its estimate to dense: a faster reading
    of it is timing noise."""
    return (t is not None and math.isfinite(t.kl) and math.isfinite(t.seconds)
            and (t.density is None or t.density < 1.0))


def allocate(dense_seconds: Sequence[float], trials: dict[tuple[int, int], Trial], levels: int,
             target_kl: float, resolution: int = 4000) -> tuple[list[int | None], float, float]:
    """One option per layer (None = dense, or a level index) with the least summed seconds
    whose summed KL is at most `target_kl`: a knapsack over the KL budget cut into
    `resolution` units, each option's KL rounded up to whole units (so the sum of the true
    KLs stays within the target, up to float rounding). Returns (choice, predicted KL,
    predicted seconds)."""
    if target_kl <= 0:
        raise ValueError("target_kl must be positive")
    unit = target_kl / resolution
    inf = float("inf")
    # best[b]: least seconds of the layers so far using b units (vectorized over b: the reuse
    # search runs this knapsack many times)
    best = torch.full((resolution + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks: list[tuple[list[int | None], torch.Tensor]] = []
    for layer, dense_s in enumerate(dense_seconds):
        options: list[tuple[int | None, int, float]] = [(None, 0, dense_s)]
        for level in range(levels):
            t = trials.get((layer, level))
            if not _is_option(t):
                continue
            units = math.ceil(max(t.kl, 0.0) / unit - 1e-9)
            if units <= resolution:
                options.append((level, units, t.seconds))
        totals = torch.full((len(options), resolution + 1), inf, dtype=torch.float64)
        for row, (_, units, seconds) in enumerate(options):
            totals[row, units:] = best[:resolution + 1 - units] + seconds
        best, arg = totals.min(0)
        picks.append(([level for level, _, _ in options], arg))
    b = int(best.argmin())
    out: list[int | None] = [None] * len(dense_seconds)
    kl = 0.0
    for layer in reversed(range(len(dense_seconds))):
        names, arg = picks[layer]
        level = names[int(arg[b])]
        out[layer] = level
        if level is not None:
            t = trials[(layer, level)]
            kl += t.kl
            b -= math.ceil(max(t.kl, 0.0) / unit - 1e-9)
    seconds = sum(dense_seconds[i] if c is None else trials[(i, c)].seconds for i, c in enumerate(out))
    return out, kl, seconds


# ---------------------------------------------------------------------------- trials


class _LayerClock:
    """Seconds of each decoder layer's forwards since the clock was made, summed over calls, and
    the calls counted (hooks on every layer)."""

    def __init__(self, layers):
        self.seconds: dict[int, float] = {}
        self.calls: dict[int, int] = {}
        self._start: dict[int, float] = {}
        self._handles = []
        for idx, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(idx)))
            self._handles.append(layer.register_forward_hook(self._post(idx)))

    @staticmethod
    def _now(module) -> float:
        param = next(module.parameters(), None)
        if param is not None and param.device.type == "cuda":
            torch.cuda.synchronize(param.device)      # CUDA runs async: wait for the layer's work
        return time.perf_counter()

    def _pre(self, idx):
        def hook(module, args):
            self._start[idx] = self._now(module)
        return hook

    def _post(self, idx):
        def hook(module, args, output):
            self.seconds[idx] = self.seconds.get(idx, 0.0) + self._now(module) - self._start.pop(idx)
            self.calls[idx] = self.calls.get(idx, 0) + 1
        return hook

    def close(self):
        for h in self._handles:
            h.remove()


class _Replay:
    """Layers before `first` return their recorded dense outputs instead of running."""

    def __init__(self, layers, outputs, first: int):
        self.layers, self.outputs, self.first = layers, outputs, first

    def __enter__(self):
        # a forward set on the instance (accelerate's device hooks) is put back on exit
        self.saved = [vars(self.layers[idx]).get("forward") for idx in range(self.first)]
        for idx in range(self.first):
            recorded = self.outputs[idx]
            self.layers[idx].forward = lambda *a, _out=recorded, **k: _out
        return self

    def __exit__(self, *exc):
        for idx, saved in enumerate(self.saved):
            if saved is None:
                del self.layers[idx].forward     # back to the class's forward
            else:
                self.layers[idx].forward = saved
        return False


def _layer_plan(model_config, rule: Rule | None, layer: int, block_size: int, phase: str = "prefill",
                reuse_from: int | None = None, dense_heads: Sequence[int] = ()) -> Plan:
    """`rule` (of `phase`) on every head of `layer`, the rest dense (rule None: every layer dense).
    With `reuse_from` (decode), `rule` is a layer_select rule on that layer, and `layer` reuses
    its set. `dense_heads`: query heads of `layer` that stay dense beside the rule."""
    from sparse_infer.plan import model_spec_from_config

    spec = model_spec_from_config(model_config)
    prefill = {"min_seq_len": 1, "block_size": block_size, "default": {"pattern": "dense"}}
    if dense_heads:
        prefill["granularity"] = SPLIT_GRANULARITY
    decode = {"min_kv_len": 1, "default": {"method": "dense"}}
    if reuse_from is not None:
        decode["layers"] = {reuse_from: {"*": rule.to_yaml("method")},
                            layer: {"*": {"method": REUSE, "from_layer": reuse_from}}}
    elif rule is not None:
        section, name_key = (prefill, "pattern") if phase == "prefill" else (decode, "method")
        section["layers"] = {layer: {"*": rule.to_yaml(name_key), **{h: {name_key: DENSE} for h in dense_heads}}}
    plan = plan_from_dict({
        "sparse_infer_plan": 1,
        "model": {k: v for k, v in vars(spec).items() if v is not None},
        "prefill": prefill,
        "decode": decode,
    }, source=f"calibration:layer{layer}")
    plan.check_model(model_config)
    return plan


def _trials_header(model, prompt, levels: Sequence[Rule], config: CalibrateConfig,
                   fingerprint: str | None = None) -> dict:
    from sparse_infer.eval.results import weights_fingerprint

    param = next(model.parameters())
    header = {"version": TRIALS_VERSION, "weights_sha256": fingerprint or weights_fingerprint(model),
              "input_sha": prompt.sha(),
              "window": config.window, "dense_above": config.dense_above, "block_size": config.block_size,
              "device": str(param.device), "threads": torch.get_num_threads(),
              "levels": [r.to_yaml(_name_key(config.phase)) for r in levels]}
    if config.phase != "prefill":            # prefill records keep the keys they were written with
        header.update(phase=config.phase, tokens=config.tokens)
    reuse = config.reuse_rule()
    if reuse is not None:
        header["reuse"] = reuse.to_yaml("method")
    if config.batch != 1:                    # seconds differ by batch; KLs do not
        header["batch"] = config.batch
    if config.split_heads:
        header["split_heads"] = list(config.split_heads)
        header["split_granularity"] = SPLIT_GRANULARITY
    return header


def _name_key(phase: str) -> str:
    return "pattern" if phase == "prefill" else "method"


# header keys of the trials beyond the levels' (keys (layer, len(levels) + j)): a record made with
# other values of these keeps its level trials
_EXTRA_TRIALS = ("reuse", "split_heads", "split_granularity")


def read_record(record: Path | None, header: dict, resume: bool) -> dict | None:
    """The trials an earlier run recorded for the same setup (with `resume`), else None; a record
    of another setup is refused with the field and both values."""
    if record is None or not resume or not record.exists():
        return None
    try:
        doc = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--resume: {record} cannot be read ({exc}); use another --out or --force") from exc
    for key, value in header.items():
        # trials of another --reuse rule or --split-heads (or none) are dropped by run_trials; the
        # levels' trials stay
        if key not in _EXTRA_TRIALS and doc.get(key) != value:
            raise ValueError(f"--resume: {record} was measured with another {key} ({doc.get(key)!r}, now "
                             f"{value!r}); use another --out or --force")
    return doc


def _skipped(done: dict[tuple[int, int], Trial], levels: Sequence[Rule], layer: int, level: int,
             target_kl: float) -> bool:
    """Levels of one pattern are listed densest first: one that already spent the whole target alone
    at this layer rules out the sparser ones after it (other patterns are still tried)."""
    return any(levels[v].kind == levels[level].kind and (layer, v) in done and done[(layer, v)].kl > target_kl
               for v in range(level))


class _Trials:
    """What a trial runs: `_logprobs(first)` under a patched plan, timed per layer."""

    phase = "prefill"
    model: Any
    config: CalibrateConfig
    layers: Any

    def _logprobs(self, first: int) -> torch.Tensor:
        raise NotImplementedError

    def run(self, plan: Plan | None, first: int = 0) -> tuple[torch.Tensor, dict[int, float], float | None]:
        """The scored log-probs, each layer's seconds per call (a prefill forward calls each layer
        once, a decode step once a step) and layer `first`'s density, with `plan` patched (None:
        the model as it is)."""
        import sparse_infer

        clock = _LayerClock(self.layers)
        try:
            if plan is not None:
                sparse_infer.patch(self.model, plan, dense_above=self.config.dense_above)
                sparse_infer.reset_stats(self.model)
            logprobs = self._logprobs(first)
            density = None
            if plan is not None:
                density = sparse_infer.get_stats(self.model)["layers"].get(first, {}).get(f"{self.phase}_density")
        finally:
            clock.close()
            sparse_infer.unpatch(self.model)
        per_call = {idx: sec / max(clock.calls.get(idx, 1), 1) for idx, sec in clock.seconds.items()}
        return logprobs, per_call, density


class _PrefillTrials(_Trials):
    """Prefill trials: one teacher-forced forward of the prompt per trial, the layers before the
    trial's layer replayed from the recorded dense outputs."""

    def __init__(self, model, prompt, config: CalibrateConfig):
        from sparse_infer.eval.fidelity import next_token_logprobs, scored_positions
        from sparse_infer.profiler.capture import decoder_layers

        self.model, self.prompt, self.config = model, prompt, config
        self.layers = decoder_layers(model)
        self.positions = scored_positions(prompt, config.window)
        self.outputs: list[Any] = [None] * len(self.layers)

        def keep(idx):
            def hook(module, args, output):
                self.outputs[idx] = output
            return hook

        handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(self.layers)]
        try:
            next_token_logprobs(model, prompt.input_ids, self.positions[-1:])   # warm-up: a first call is slower
            self.reference, _, _ = self.run(None)
        finally:
            for h in handles:
                h.remove()

    def _logprobs(self, first: int) -> torch.Tensor:
        from sparse_infer.eval.fidelity import next_token_logprobs

        with _Replay(self.layers, self.outputs, first):
            return next_token_logprobs(self.model, self.prompt.input_ids, self.positions)

    def head_errors(self, layer: int, rule: Rule) -> list[float]:
        """Per query head of `layer`, how much `rule` on that layer alone (as the trials run it)
        changes what the head writes to the residual stream: the squared norm, summed over the
        prompt's rows, of the change in the head's slice of the output projection's input, mapped
        through that head's columns of the projection. Two runs of the layer on dense's input."""
        out_proj = _output_projection(self.layers[layer], layer)
        dense = self._projection_input(layer, out_proj, None)
        plan = _layer_plan(self.model.config, rule, layer, self.config.block_size)
        sparse = self._projection_input(layer, out_proj, plan)
        weight = out_proj.weight.detach()
        width = _head_width(self.model.config, out_proj)
        heads = weight.shape[1] // width
        errors = []
        for h in range(heads):
            cols = slice(h * width, (h + 1) * width)
            change = (sparse[..., cols] - dense[..., cols]).to(weight.dtype) @ weight[:, cols].T
            errors.append(float(change.double().pow(2).sum()))
        return errors

    def _projection_input(self, layer: int, out_proj, plan: Plan | None) -> torch.Tensor:
        """The input of `layer`'s output projection with `plan` patched (None: dense), the layers
        before it replayed and the forward stopped once the layer has run."""
        import sparse_infer
        from sparse_infer.eval.fidelity import next_token_logprobs

        got = {}
        grab = out_proj.register_forward_pre_hook(lambda module, args: got.__setitem__("x", args[0].detach().clone()))

        def stop(module, args, output):
            raise _LayerDone

        halt = self.layers[layer].register_forward_hook(stop)
        try:
            if plan is not None:
                sparse_infer.patch(self.model, plan, dense_above=self.config.dense_above)
            with _Replay(self.layers, self.outputs, layer):
                try:
                    next_token_logprobs(self.model, self.prompt.input_ids, self.positions)
                except _LayerDone:
                    pass
        finally:
            grab.remove()
            halt.remove()
            sparse_infer.unpatch(self.model)
        if "x" not in got:
            raise ValueError(f"layer {layer}'s output projection (o_proj) did not run in the layer's forward: "
                             "--split-heads cannot rank this model's heads")
        return got["x"]


class _LayerDone(Exception):
    """Raised after the layer being measured ran: the rest of the forward is not needed."""


def _head_width(model_config, out_proj: torch.nn.Linear) -> int:
    """Features per query head in the output projection's input (its columns per head)."""
    from sparse_infer.plan import model_spec_from_config

    spec = model_spec_from_config(model_config)
    if spec.head_dim and spec.num_attention_heads and out_proj.in_features == spec.head_dim * spec.num_attention_heads:
        return spec.head_dim
    raise ValueError(f"the output projection (o_proj) takes {out_proj.in_features} features, not "
                     f"{spec.num_attention_heads} heads of {spec.head_dim}: --split-heads cannot tell this model's "
                     "heads apart")


def _output_projection(layer_module, layer: int) -> torch.nn.Linear:
    """The attention's output projection of a decoder layer (the `o_proj` of Llama-like models)."""
    found = [m for name, m in layer_module.named_modules()
             if name.rsplit(".", 1)[-1] == "o_proj" and isinstance(m, torch.nn.Linear)]
    if len(found) != 1:
        raise ValueError(f"--split-heads ranks heads through the attention's output projection (o_proj); layer "
                         f"{layer} of this model has {len(found)} such modules")
    return found[0]


class _DecodeTrials(_Trials):
    """Decode trials: the prompt (the scored prompt's first len - tokens ids) is prefilled dense
    once into a cache; each trial decodes from a copy of it (a crop would not bring back what a
    sliding-window layer dropped), feeding the continuation one token at a time with the plan
    patched. Seconds are per decode step."""

    phase = "decode"

    def __init__(self, model, prompt, config: CalibrateConfig):
        from sparse_infer.cache import AppendCache
        from sparse_infer.eval.fidelity import next_token_logprobs
        from sparse_infer.profiler.capture import decoder_layers

        self.model, self.prompt, self.config = model, prompt, config
        self.layers = decoder_layers(model)
        ids = list(prompt.input_ids)
        self.context, self.continuation = ids[:-config.tokens], ids[-config.tokens:]
        self.positions = list(range(len(self.context), len(ids) - 1))
        self.device = next(model.parameters()).device
        self.reference = next_token_logprobs(model, ids, self.positions)
        # `batch` copies of the prompt: every row decodes the same tokens, so row 0's log-probs
        # are the batch-1 ones (up to float rounding) while the seconds are those of the batch
        self.batch = config.batch
        self.prefilled = AppendCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([self.context] * self.batch, device=self.device), cache=self.prefilled,
                  use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def _logprobs(self, first: int) -> torch.Tensor:
        import copy

        cache = copy.deepcopy(self.prefilled)
        steps = []
        for token in self.continuation[:-1]:
            logits = self.model(input_ids=torch.tensor([[token]] * self.batch, device=self.device), cache=cache,
                                use_cache=True).logits[0, -1]
            steps.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        return torch.stack(steps)


def run_trials(model, prompt, levels: Sequence[Rule], config: CalibrateConfig, *, target_kl: float,
               record: Path | None = None, resume: bool = False, progress: bool = True,
               log=None, fingerprint: str | None = None) -> tuple[list[float], dict[tuple[int, int], Trial]]:
    """Measure every (layer, level) trial; see the module docstring. With `record`, each trial is
    written there as it finishes, and `resume` takes the trials a previous run recorded
    for the same weights, prompt, levels and machine. The model is left unpatched. In decode,
    `prompt` is the scored prompt: the context followed by dense's `config.tokens` next tokens
    (decode_prompt). `fingerprint`: the weights' digest when the caller has it (hashing the weights
    takes seconds)."""
    import sparse_infer
    from sparse_infer.eval.outputs import write_json
    from sparse_infer.eval.progress import ProgressBar
    from sparse_infer.profiler.capture import decoder_layers

    header = _trials_header(model, prompt, levels, config, fingerprint)
    previous = read_record(record, header, resume)
    n_layers = len(decoder_layers(model))
    done: dict[tuple[int, int], Trial] = {}
    dense_runs: dict[int, list[float]] = {i: [] for i in range(n_layers)}
    if previous is not None:
        same_extra = all(previous.get(key) == header.get(key) for key in _EXTRA_TRIALS)
        for row in previous.get("trials", []):
            level = row["level"]
            if level >= len(levels) and not same_extra:
                # a split trial is one of K heads dense: kept where this run asks for that K too
                kept = len(row.get("dense_heads") or ())
                if previous.get("reuse") != header.get("reuse") or kept not in config.split_heads \
                        or previous.get("split_granularity") != header.get("split_granularity"):
                    continue
                level = len(levels) + list(config.split_heads).index(kept)
            done[(row["layer"], level)] = Trial(
                row["kl"], row["top1"], row["seconds"], row["density"],
                **{key: row.get(key) for key in ("source", "source_seconds", "held", "base_level", "dense_heads")})
        for idx, runs in previous.get("dense_runs", {}).items():
            dense_runs[int(idx)] = list(runs)
    if sparse_infer.is_patched(model):
        sparse_infer.unpatch(model)
    phase = config.phase
    trials = _PrefillTrials(model, prompt, config) if phase == "prefill" else _DecodeTrials(model, prompt, config)
    last = n_layers - 1

    reuse_rule = config.reuse_rule()
    reuse_level = len(levels)              # the key of a reuse trial: (layer, len(levels))
    sources: list[int | None] = []
    held = None
    if reuse_rule is not None:
        from sparse_infer.profiler.reuse import best_sources, overlap

        if log is not None:
            log("measuring how much of each layer's attention earlier layers' sets hold")
        held = overlap(model, trials.prefilled, trials.continuation, reuse_rule, batch=config.batch)
        sources = best_sources(held)

    def layer_plan(level: int | None, layer: int) -> Plan:
        if level == reuse_level:
            return _layer_plan(model.config, reuse_rule, layer, config.block_size, phase, reuse_from=sources[layer])
        return _layer_plan(model.config, None if level is None else levels[level], layer, config.block_size, phase)

    if previous is None or not any(dense_runs.values()):
        # every layer's dense time as the trials' other layers run (through patch), once more
        _, seconds, _ = trials.run(layer_plan(None, 0))
        for idx, sec in seconds.items():
            dense_runs[idx].append(sec)

    def save():
        if record is None:
            return
        write_json(record, {**header, "trials": [
            {"layer": l, "level": v, **asdict(t)} for (l, v), t in sorted(done.items())],
            "dense_runs": {str(i): runs for i, runs in sorted(dense_runs.items())}})

    save()
    pending = [(layer, level) for layer in range(n_layers) for level in range(len(levels))]
    if reuse_rule is not None:
        pending += [(layer, reuse_level) for layer in range(1, n_layers) if sources[layer] is not None]
    # prefill trials run the layers from L on; decode trials every layer
    weight = {key: n_layers - key[0] if phase == "prefill" else n_layers for key in pending}
    warmed: set[int] = set()
    with ProgressBar(progress, sum(weight.values()), len(pending)) as bar:
        for layer, level in pending:
            key = (layer, level)
            label = f"layer {layer} " + (f"reusing layer {sources[layer]}" if level == reuse_level
                                         else f"level {level + 1}")
            bar.describe(label)
            if key in done:
                bar.advance(weight[key], "recorded")
                continue
            if level < reuse_level and _skipped(done, levels, layer, level, target_kl):
                bar.advance(weight[key], "skipped")
                continue
            if level not in warmed:
                # a level's first call pays one-off costs (kernel builds, compiles): pay them on
                # the last layer, the cheapest prefill trial, untimed
                trials.run(layer_plan(level, last), last)
                warmed.add(level)
            source = sources[layer] if level == reuse_level else None
            done[key], seconds = _measure(trials, layer_plan(level, layer), layer, prompt, source=source)
            if source is not None:
                done[key] = replace(done[key], source_seconds=seconds[source],
                                    held=round(float(held[source, layer]), 6))
            for idx, sec in seconds.items():
                if idx > layer or (phase != "prefill" and idx not in (layer, source)):
                    dense_runs[idx].append(sec)
            _recorded(done[key], label, save, bar, weight[key], log, "s" if phase == "prefill" else "s a step")
    dense_seconds = [statistics.median(dense_runs[i]) for i in range(n_layers)]
    if config.split_heads:
        _run_split_trials(trials, prompt, levels, config, done, dense_seconds, target_kl, save, progress, log)
    return dense_seconds, done


def _measure(trials, plan: Plan, layer: int, prompt, **fields) -> tuple[Trial, dict[int, float]]:
    """Run one trial (`plan` from `layer` on) and compare it with the reference: (its Trial, with
    `fields` set, and every timed layer's seconds)."""
    from sparse_infer.eval.fidelity import compare

    trial_lp, seconds, density = trials.run(plan, layer)
    figures = compare(trials.reference, trial_lp, trials.positions, prompt)
    trial = Trial(float(figures["kl"]), float(figures["top1"]), seconds[layer],
                  None if density is None else float(density), **fields)
    return trial, seconds


def _recorded(trial: Trial, label: str, save, bar, weight: float, log, unit: str, prefix: str = "") -> None:
    """Save the record with a new trial and report it on the progress bar and the log."""
    save()
    summary = prefix + _trial_summary(trial, unit)
    bar.advance(weight, summary)
    if log is not None:
        log(f"{label}: {summary}")


def _trial_summary(t: Trial, unit: str) -> str:
    """A trial's figures as the progress bar and the log show them."""
    density = "?" if t.density is None else f"{t.density:.2f}"
    return f"KL {t.kl:.2e}, density {density}, {t.seconds:.3g} {unit}"


def _least_costly_level(done: dict[tuple[int, int], Trial], levels: Sequence[Rule], layer: int) -> int | None:
    """The level whose trial at `layer` cost the least KL among those the knapsack could take (None:
    none)."""
    tried = [(done[(layer, v)].kl, v) for v in range(len(levels)) if _is_option(done.get((layer, v)))]
    return min(tried)[1] if tried else None


# a sparse layer whose level spends at least this share of the KL target is tried with heads
# split too: its split frees KL for a layer left dense (a dense layer's cheapest level costs about
# a fifth of the target on Qwen2.5-0.5B at 16K, docs/PROFILER.md); a smaller share rarely frees
# enough to be worth the trial's forward
SPLIT_SPARSE_SHARE = 1 / 8


def _split_layers(first_choice: Sequence[int | None], done: dict[tuple[int, int], Trial],
                  levels: Sequence[Rule], target_kl: float) -> list[tuple[int, int]]:
    """(layer, base level) of the layers tried with heads split: those the knapsack over the levels
    leaves dense, on the level of least KL there, and the sparse ones whose chosen level spends at
    least SPLIT_SPARSE_SHARE of the target, on that level."""
    out = []
    for layer, c in enumerate(first_choice):
        if c is None:
            base = _least_costly_level(done, levels, layer)
        else:
            base = c if done[(layer, c)].kl >= SPLIT_SPARSE_SHARE * target_kl else None
        if base is not None:
            out.append((layer, base))
    return out


def _split_layout(model_config, dense_heads: Sequence[int]) -> tuple:
    """The calls a split layer's sparse heads run as under SPLIT_GRANULARITY: (query heads, key
    heads) per call, as prefill.dispatch._head_parts forms them."""
    from sparse_infer.plan import model_spec_from_config
    from sparse_infer.prefill.dispatch import _head_parts

    spec = model_spec_from_config(model_config)
    num_heads, num_kv = spec.num_attention_heads, spec.num_key_value_heads or spec.num_attention_heads
    sparse = [h for h in range(num_heads) if h not in set(dense_heads)]
    return tuple((len(q), len(kv)) for q, kv in _head_parts(sparse, num_heads, num_kv, True))


def _run_split_trials(trials, prompt, levels: Sequence[Rule], config: CalibrateConfig,
                      done: dict[tuple[int, int], Trial], dense_seconds: Sequence[float], target_kl: float,
                      save, progress: bool, log) -> None:
    """Head-split trials: at each layer the levels alone leave dense (the knapsack over them), the
    level that cost least KL there runs on all heads but the K whose output it changes most,
    which stay dense, for each K of `config.split_heads`; keys (layer, len(levels) + j). The
    sparse layers whose level spends a large share of the target get the same trials with their
    chosen level (_split_layers).

    Why: in a layer too costly to make sparse, the cost is often a few heads' (Qwen2.5-0.5B at
    16K, layer 10: keeping 2 of 14 heads dense cut its KL under a_shape from 9.3e-3 to 9.7e-5,
    docs/PROFILER.md). Which heads is measured per layer by head_errors: two runs of the layer,
    not a forward per head."""
    from sparse_infer.eval.progress import ProgressBar

    first_choice, _, _ = allocate(dense_seconds, done, len(levels), target_kl)
    layers = _split_layers(first_choice, done, levels, target_kl)
    n_layers = len(dense_seconds)
    pending = [(layer, base, j) for layer, base in layers for j in range(len(config.split_heads))]
    weight = {(layer, j): n_layers - layer for layer, _, j in pending}
    order: dict[int, list[int]] = {}
    warmed: set[tuple] = set()
    with ProgressBar(progress, sum(weight.values()), len(pending)) as bar:
        for layer, base, j in pending:
            k, key = config.split_heads[j], (layer, len(levels) + j)
            label = f"layer {layer} level {base + 1} with {k} heads dense"
            bar.describe(label)
            if key in done and done[key].base_level == base:
                bar.advance(weight[(layer, j)], "recorded")
                continue
            # a split recorded on another base level (a resume at another target chose another
            # level for this layer) is measured again on this one
            if layer not in order:
                errors = trials.head_errors(layer, levels[base])
                order[layer] = sorted(range(len(errors)), key=lambda h: (-errors[h], h))
            heads = sorted(order[layer][:k])
            layout = (base, _split_layout(trials.model.config, heads))
            if layout not in warmed:
                # a layer of mixed dense and sparse heads takes other paths than a level's first
                # call paid for, and each split of its groups into calls its own (a compiled kernel
                # per heads-per-key-head count on GPUs): pay theirs once, untimed, on the last
                # layer (the cheapest trial)
                trials.run(_layer_plan(trials.model.config, levels[base], n_layers - 1, config.block_size,
                                       dense_heads=heads), n_layers - 1)
                warmed.add(layout)
            plan = _layer_plan(trials.model.config, levels[base], layer, config.block_size, dense_heads=heads)
            done[key], _ = _measure(trials, plan, layer, prompt, base_level=base, dense_heads=heads)
            _recorded(done[key], label, save, bar, weight[(layer, j)], log, "s", f"heads {heads} dense: ")


def decode_prompt(model, prompt, tokens: int):
    """`prompt` followed by dense's `tokens` greedy next tokens, as `eval fidelity --decode-tokens`
    scores decode (no answer positions)."""
    from sparse_infer.eval.fidelity import greedy_continuation

    continuation = greedy_continuation(model, prompt.input_ids, tokens)
    return replace(prompt, input_ids=list(prompt.input_ids) + continuation, answer_positions=[])


def bf16_floor(model, prompt, window: int, floor_cache: Path | None, decode_tokens: int = 0,
               fingerprint: str | None = None, log=None) -> float:
    """The bf16 floor KL of this prompt and window, or of its last `decode_tokens - 1` decode
    positions (a decode prompt), cached as `eval fidelity` caches it."""
    from sparse_infer.eval.fidelity import FloorCache, floor_figures, next_token_logprobs, scored_positions
    from sparse_infer.eval.results import weights_fingerprint

    cache = FloorCache(floor_cache)
    key = FloorCache.key(fingerprint or weights_fingerprint(model), prompt,
                         f"decode{decode_tokens}" if decode_tokens else window)
    figures = cache.get(key)
    if figures is None:
        if log is not None:
            log("measuring the bf16 floor of the calibration prompt (cached for later runs)")
        if decode_tokens:
            n = len(prompt.input_ids)
            positions = list(range(n - decode_tokens, n - 1))
        else:
            positions = scored_positions(prompt, window)
        reference = next_token_logprobs(model, prompt.input_ids, positions)
        figures, _ = floor_figures(model, prompt, positions, reference, cache, key)
    return float(figures["kl"])


# ---------------------------------------------------------------------------- the plan


def _figure(x: float) -> float:
    """A measured figure as the plan records it: 6 significant digits. Fixed decimals would cut a
    KL of 2e-5 to 2 digits, and `plan reallocate` chooses again from these figures: near ties
    between levels must come out as they did from the trials themselves."""
    return float(f"{x:.6g}")


def build_plan(model_config, base: Plan, levels: Sequence[Rule], calibration: Calibration,
               config: CalibrateConfig, command: str | None, model_name: str, base_name: str = "") -> Plan:
    """`base` with its prefill (or decode) section replaced by the chosen rule per layer; the
    measurements go in profile.calibration."""
    raw = base.to_dict()
    name_key = _name_key(config.phase)
    reuse_rule, reuse_level = config.reuse_rule(), len(levels)
    layers: dict[int, dict] = {}
    picks: list = []                 # as recorded: 0 dense, k level k, "select", "reuse", or a head split
                                     # {"level": k, "dense_heads": [...]}
    for i, c in enumerate(calibration.choice):
        if i in calibration.selecting:
            layers[i], pick = {"*": reuse_rule.to_yaml("method")}, "select"
        elif c == reuse_level and reuse_rule is not None:
            layers[i], pick = {"*": {"method": REUSE, "from_layer": calibration.trials[(i, c)].source}}, "reuse"
        elif c is not None and c >= len(levels):
            # a head-split trial: its level on the layer, its heads dense
            t = calibration.trials[(i, c)]
            layers[i] = {"*": levels[t.base_level].to_yaml(name_key), **{h: {name_key: DENSE} for h in t.dense_heads}}
            pick = {"level": t.base_level + 1, "dense_heads": list(t.dense_heads)}
        elif c is not None:
            layers[i], pick = {"*": levels[c].to_yaml(name_key)}, c + 1
        else:
            pick = 0
        picks.append(pick)
    if config.phase == "prefill":
        raw["prefill"] = {"min_seq_len": config.min_seq_len or config.length, "block_size": config.block_size,
                          "default": {"pattern": "dense"}}
        if config.split_heads:
            # as the split trials ran: a layer's sparse heads keep sharing their groups' K/V
            raw["prefill"]["granularity"] = SPLIT_GRANULARITY
    else:
        # selection per GQA group, as the trials ran it (the plan's default granularity)
        raw["decode"] = {"min_kv_len": config.min_seq_len or config.length, "default": {"method": "dense"}}
    if layers:
        raw[config.phase]["layers"] = layers
    n = len(calibration.dense_seconds)

    def value(i, v, attr):
        got = getattr(calibration.trials[(i, v)], attr) if (i, v) in calibration.trials else None
        return None if got is None else _figure(got)

    def per_level(attr):
        return [[value(i, v, attr) for i in range(n)] for v in range(len(levels))]

    reuse = {}
    if reuse_rule is not None:
        from sparse_infer.profiler.reuse import selecting_seconds

        select_s = selecting_seconds(calibration.trials, reuse_level)
        reuse = {"reuse": {
            "rule": reuse_rule.to_yaml("method"), "selecting": list(calibration.selecting),
            # the seconds a step the allocation counted for each selecting layer
            "select_seconds": {s: round(select_s[s], 6) for s in calibration.selecting},
            # per layer, its reuse trial: the source, the share of its attention the source's
            # set held (dense), and the measured KL, seconds a step (and the source's) and density
            **{attr: [value(i, reuse_level, attr) for i in range(n)]
               for attr in ("source", "held", "kl", "seconds", "source_seconds", "density")}}}

    split = {}
    if config.split_heads:
        # per K (`heads`) and layer, the head-split trial: its level, the heads it kept dense and
        # the measured KL, seconds and density (None: not tried there)
        keys = [[(i, len(levels) + j) for i in range(n)] for j in range(len(config.split_heads))]

        def split_value(key, attr):
            t = calibration.trials.get(key)
            got = None if t is None else getattr(t, attr)
            return _figure(got) if isinstance(got, float) else got

        split = {"split": {"heads": list(config.split_heads),
                           "level": [None if (t := calibration.trials.get((i, len(levels)))) is None
                                     else t.base_level + 1 for i in range(n)],
                           **{attr: [[split_value(key, attr) for key in row] for row in keys]
                              for attr in ("dense_heads", "kl", "seconds", "density")}}}

    raw["profile"] = {
        "tool": "sparse_infer.profiler.calibrate",
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        **({"command": command} if command else {}),
        "model": model_name,
        # the other section's source, as given (a shipped name or the user's path), not resolved
        ("decode_from" if config.phase == "prefill" else "prefill_from"): base_name,
        "calibration": {
            **({} if config.phase == "prefill" else {"phase": config.phase, "tokens": config.tokens}),
            **({} if config.batch == 1 else {"batch": config.batch}),
            "length": config.length, "window": config.window, "seed": config.seed,
            "dense_above": config.dense_above, "target_kl": calibration.target_kl,
            "bf16_floor_kl": calibration.floor_kl,
            "levels": [r.to_yaml(name_key) for r in levels],
            "choice": picks,
            "predicted_kl": round(calibration.predicted_kl, 8),
            "predicted_seconds": round(calibration.predicted_seconds, 6),
            "dense_seconds": round(sum(calibration.dense_seconds), 6),
            "measured": {"layer_dense_seconds": [_figure(s) for s in calibration.dense_seconds],
                         "kl": per_level("kl"), "seconds": per_level("seconds"), "density": per_level("density")},
            **reuse,
            **split,
        },
    }
    plan = plan_from_dict(raw, source="calibration")
    plan.check_model(model_config)
    return plan


def _recorded_number(value, path: str, *, optional: bool = False) -> float | None:
    """A figure of a calibrate record: a finite number (or None where `optional`), else an error
    naming where it is."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"profile.calibration.{path} must be a finite number, got {value!r:.40}")
    return float(value)


def _recorded_rows(record: Mapping, path: str, rows: int, n: int, *, numbers: bool = True) -> list[list]:
    """record[key] (path = "measured.kl", ...) as `rows` lists of one value (or None) per layer."""
    value = record.get(path.rsplit(".", 1)[-1])
    if not (isinstance(value, list) and len(value) == rows
            and all(isinstance(row, list) and len(row) == n for row in value)):
        raise ValueError(f"profile.calibration.{path} must hold {rows} list(s) of {n} values (one per layer), "
                         f"got {value!r:.80}")
    if numbers:
        for j, row in enumerate(value):
            for i, cell in enumerate(row):
                _recorded_number(cell, f"{path}[{j}][{i}]", optional=True)
    return value


def calibration_from_plan(plan: Plan) -> tuple[CalibrateConfig, list[Rule], Calibration]:
    """The settings, levels and trials a plan written by `calibrate` records in
    profile.calibration, read back so that the knapsack can choose again at another target
    without running a trial. The trials' top-1 figures are not recorded (nan here): the
    choice does not read them. Figures are as recorded: 6 significant digits (6 decimals in plans
    written before `_figure`)."""
    record = plan.profile.get("calibration")
    if plan.profile.get("tool") != "sparse_infer.profiler.calibrate" or not isinstance(record, Mapping):
        raise ValueError(f"{plan.source or 'the plan'} was not written by `sparse-infer calibrate` (it has no "
                         "profile.calibration record of trials to choose from)")
    if record.get("reuse"):
        raise ValueError("profile.calibration has reuse trials: choosing again is not supported for them "
                         "(their seconds depend on which layers select); run calibrate with --resume instead")
    phase = record.get("phase", "prefill")
    split = record.get("split") or {}
    measured = record.get("measured")
    if not isinstance(split, Mapping) or not isinstance(measured, Mapping):
        raise ValueError("profile.calibration.measured and .split must be mappings: not a calibrate record")
    try:
        config = CalibrateConfig(length=record["length"], window=record["window"], seed=record["seed"],
                                 levels=tuple(record["levels"]), dense_above=record["dense_above"], phase=phase,
                                 tokens=record.get("tokens", 64), batch=record.get("batch", 1),
                                 split_heads=tuple(split.get("heads", ())),
                                 # the plan's own threshold (it may have been edited); 0 and 1 mean the same
                                 min_seq_len=max(1, getattr(plan, phase).min_len))
        dense_seconds = measured["layer_dense_seconds"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"profile.calibration is incomplete or malformed ({exc!r}): not a calibrate record") from exc
    if not isinstance(dense_seconds, list):
        raise ValueError(f"profile.calibration.measured.layer_dense_seconds must be a list, got {dense_seconds!r:.40}")
    dense_seconds = [_recorded_number(x, f"measured.layer_dense_seconds[{i}]") for i, x in enumerate(dense_seconds)]
    try:
        levels = config.validate(as_recorded=True)
    except ValueError as exc:
        # its messages name calibrate's options, which set these fields
        raise ValueError(f"profile.calibration holds settings calibrate refuses: {exc}") from exc
    n = len(dense_seconds)
    kls, secs, dens = (_recorded_rows(measured, f"measured.{f}", len(levels), n) for f in ("kl", "seconds", "density"))
    trials: dict[tuple[int, int], Trial] = {}
    for v in range(len(levels)):
        for i in range(n):
            if kls[v][i] is not None:
                trials[(i, v)] = Trial(kls[v][i], math.nan, _recorded_number(secs[v][i], f"measured.seconds[{v}][{i}]"),
                                       dens[v][i])
    if config.split_heads:
        ks = len(config.split_heads)
        base_levels = split.get("level")
        if not (isinstance(base_levels, list) and len(base_levels) == n):
            raise ValueError(f"profile.calibration.split.level must hold one level per layer ({n}), "
                             f"got {base_levels!r:.80}")
        rows = {f: _recorded_rows(split, f"split.{f}", ks, n, numbers=f != "dense_heads")
                for f in ("dense_heads", "kl", "seconds", "density")}
        for j in range(ks):
            for i in range(n):
                if rows["kl"][j][i] is None:
                    continue
                level, heads = base_levels[i], rows["dense_heads"][j][i]
                if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= len(levels):
                    raise ValueError(f"profile.calibration.split.level[{i}] must be a level 1..{len(levels)} where "
                                     f"a split trial is recorded, got {level!r}")
                if not (isinstance(heads, list) and heads and all(isinstance(h, int) for h in heads)):
                    raise ValueError(f"profile.calibration.split.dense_heads[{j}][{i}] must list head indices, "
                                     f"got {heads!r:.40}")
                trials[(i, len(levels) + j)] = Trial(
                    rows["kl"][j][i], math.nan, _recorded_number(rows["seconds"][j][i], f"split.seconds[{j}][{i}]"),
                    rows["density"][j][i], base_level=level - 1, dense_heads=list(heads))
    floor = _recorded_number(record.get("bf16_floor_kl"), "bf16_floor_kl", optional=True)
    calibration = Calibration(dense_seconds, trials, record.get("target_kl"), floor)
    return config, levels, calibration


def reallocate(plan: Plan, *, target_kl: float | None = None, floor_share: float | None = None,
               command: str | None = None) -> Plan:
    """A calibrated plan chosen again from its own recorded trials at another target (`target_kl`,
    or `floor_share` x the recorded bf16 floor): the same knapsack `calibrate` runs, no model and
    no trial. The plan's other section, its `min_seq_len` and its record are kept; the record's
    target, choice and predictions become the new ones."""
    if (target_kl is None) == (floor_share is None):
        raise ValueError("give --target-kl or --floor-share (one of them)")
    config, levels, calibration = calibration_from_plan(plan)
    spec = plan.model
    if spec.num_hidden_layers is not None and spec.num_hidden_layers != len(calibration.dense_seconds):
        raise ValueError(f"profile.calibration records {len(calibration.dense_seconds)} layers, the plan's model "
                         f"{spec.num_hidden_layers}")
    if floor_share is not None:
        if not (floor_share > 0 and math.isfinite(floor_share)):
            raise ValueError(f"--floor-share must be a positive number, got {floor_share}")
        if not calibration.floor_kl:
            raise ValueError("the plan records no bf16 floor (it was calibrated with --target-kl); give --target-kl")
        target_kl = floor_share * calibration.floor_kl
    if not (target_kl > 0 and math.isfinite(target_kl)):
        raise ValueError(f"--target-kl must be a positive number, got {target_kl}")
    choice, kl, seconds = allocate(calibration.dense_seconds, calibration.trials,
                                   len(levels) + len(config.split_heads), target_kl)
    chosen = replace(calibration, target_kl=target_kl, choice=choice, predicted_kl=kl, predicted_seconds=seconds)
    shape = SimpleNamespace(num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                            num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
                            architectures=[spec.architecture] if spec.architecture else [])
    other = "decode_from" if config.phase == "prefill" else "prefill_from"
    new = build_plan(shape, plan, levels, chosen, config, command, plan.profile.get("model", ""),
                     plan.profile.get(other, ""))
    # the section runs as its trials ran (split trials recorded before `subgroup` ran per head)
    section = getattr(new, config.phase)
    section.granularity = getattr(plan, config.phase).granularity
    return new


def _default_base(model_name: str) -> str:
    from sparse_infer.plan import shipped_plan_names

    return model_name if model_name in shipped_plan_names() else "dense"


def calibrate_model(model, tokenizer, config: CalibrateConfig, *, name: str, base: str | None = None,
                    record: Path | None = None, resume: bool = False, floor_cache: Path | None = None,
                    progress: bool = True, command: str | None = None, log=None) -> tuple[Plan, Calibration]:
    """Calibrate an already loaded fp32 model; returns the plan and what was measured. A patched
    model is unpatched first (the reference is the model's own attention) and left unpatched."""
    import sparse_infer
    from sparse_infer.eval.fidelity import prose_prompt
    from sparse_infer.eval.results import weights_fingerprint

    levels = config.validate()
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"calibrate a float32 model (this one is {dtype}): the KLs are measured against its "
                         "fp32 dense run, and the bf16 floor against fp32")
    limit = getattr(model.config, "max_position_embeddings", None)
    extra = config.tokens if config.phase == "decode" else 0
    if limit and config.length + extra > limit:
        raise ValueError(f"--length {config.length}{f' + --tokens {extra}' if extra else ''} is beyond the model's "
                         f"context ({limit} positions)")
    for level in levels:
        _layer_plan(model.config, level, 0, config.block_size, config.phase)   # a rule this model cannot take fails now
    if config.split_heads:
        from sparse_infer.plan import model_spec_from_config
        from sparse_infer.profiler.capture import decoder_layers

        config.check_split_heads(model_spec_from_config(model.config).num_attention_heads)
        for i, layer_module in enumerate(decoder_layers(model)):
            _head_width(model.config, _output_projection(layer_module, i))
    base_name = base or _default_base(name)
    base_plan = load_plan(base_name, model.config)
    prompt = prose_prompt(tokenizer, config.length, 0, config.seed)
    if sparse_infer.is_patched(model):
        sparse_infer.unpatch(model)
    decode_tokens = config.tokens if config.phase == "decode" else 0
    if decode_tokens:
        if log is not None:
            log(f"continuing the prompt by {decode_tokens} tokens (dense, greedy)")
        prompt = decode_prompt(model, prompt, decode_tokens)
    fingerprint = weights_fingerprint(model)        # once: hashing the weights takes seconds
    read_record(record, _trials_header(model, prompt, levels, config, fingerprint), resume)   # fails before the floor
    floor = None
    target = config.target_kl
    if target is None:
        floor = bf16_floor(model, prompt, config.window, floor_cache, decode_tokens, fingerprint, log)
        if not floor > 0:
            raise ValueError(f"the bf16 floor of the calibration prompt is {floor}; give --target-kl")
        target = config.share * floor
    dense_seconds, trials = run_trials(model, prompt, levels, config, target_kl=target, record=record,
                                       resume=resume, progress=progress, log=log, fingerprint=fingerprint)
    selecting: list[int] = []
    if config.reuse is None:
        # the head-split trials are options of their layers beside the levels
        choice, kl, seconds = allocate(dense_seconds, trials, len(levels) + len(config.split_heads), target)
    else:
        from sparse_infer.profiler.reuse import allocate_with_reuse

        choice, selecting, kl, seconds = allocate_with_reuse(dense_seconds, trials, len(levels), target)
    calibration = Calibration(dense_seconds, trials, target, floor, choice, kl, seconds, selecting=selecting)
    plan = build_plan(model.config, base_plan, levels, calibration, config, command, name, base_name)
    return plan, calibration


def calibrate(model_spec: str, out: str | Path, config: CalibrateConfig | None = None, *, base: str | None = None,
              resume: bool = False, overwrite: bool = False, progress: bool = True, log=None) -> tuple[Plan, Calibration]:
    """Load a model by spec, calibrate it, write the plan to `out` (checked before anything runs)
    and the trials beside it (`out` + `.trials.json`), so an interrupted run resumes."""
    from sparse_infer.eval.fidelity import FloorCache  # noqa: F401  (the eval extra must be installed)
    from sparse_infer.models import cache_dir, load_model
    from sparse_infer.profiler.profile import check_out_path, save_plan

    config = config or CalibrateConfig()
    config.validate()
    out = check_out_path(out, overwrite=overwrite)
    record = out.with_name(out.name + ".trials.json")
    if record.exists() and not resume and not overwrite:
        raise ValueError(f"{record} holds the trials of an earlier run; pass --resume to use them or --force "
                         "to measure anew")
    if base is not None:
        load_plan(base)        # a bad --base fails before the model loads
    model, tokenizer = load_model(model_spec)
    plan, calibration = calibrate_model(model, tokenizer, config, name=model_spec, base=base, record=record,
                                        resume=resume, floor_cache=cache_dir() / "fidelity_floor.json",
                                        progress=progress, command=config.command(model_spec, str(out), base),
                                        log=log)
    save_plan(plan, out, overwrite=overwrite, model_config=model.config)
    return plan, calibration


__all__ = ["CalibrateConfig", "Calibration", "Trial", "allocate", "calibrate", "calibrate_model", "run_trials",
           "calibration_from_plan", "reallocate",
           "decode_prompt", "DEFAULT_LEVELS", "DEFAULT_DECODE_LEVELS"]
