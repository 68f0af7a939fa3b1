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
"""
from __future__ import annotations

import datetime
import json
import math
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from sparse_infer.params import PlanError
from sparse_infer.plan import DENSE, Plan, Rule, load_plan, parse_rule, plan_from_dict
from sparse_infer.presets import PRESET_RULES

# candidate rules when none are given: adaptive at two thresholds (densest first), then the
# rules of the two presets whose density falls with length (sparse_infer.presets)
DEFAULT_LEVELS: tuple[dict, ...] = (
    {"pattern": "adaptive", "gamma": 0.95, "tau": 0.1, "dense_tail": 128},
    {"pattern": "adaptive", "gamma": 0.85, "tau": 0.1, "dense_tail": 128},
    PRESET_RULES["vertical_slash"],
    PRESET_RULES["a_shape"],
)
TRIALS_VERSION = 1


@dataclass
class CalibrateConfig:
    length: int = 8192                 # prompt tokens of the calibration forward
    window: int = 256                  # last positions whose next-token KL is measured
    seed: int = 1                      # prose prompt seed (eval fidelity's prompts use seed 0)
    levels: Sequence[dict] = DEFAULT_LEVELS
    target_kl: float | None = None     # summed KL the plan may spend; None: floor_share x bf16 floor
    floor_share: float | None = None   # of the bf16 floor (default 1.0; the gate allows 2: half as margin)
    dense_above: float | str = "auto"  # as patch() runs the plan
    min_seq_len: int | None = None     # shorter prompts prefill dense (default: the calibration length)
    block_size: int = 64

    def validate(self) -> list[Rule]:
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
        if not self.levels:
            raise ValueError("at least one level (candidate prefill rule) is needed")
        rules = []
        for i, raw in enumerate(self.levels):
            try:
                rule = parse_rule(raw, f"--level {i + 1}", "prefill")
            except PlanError as exc:
                raise ValueError(str(exc)) from exc
            if rule.kind == DENSE:
                raise ValueError(f"--level {i + 1} is dense; dense is always an option, list sparse rules only")
            for j, other in enumerate(rules):
                if other.key() == rule.key():
                    raise ValueError(f"--level {j + 1} and --level {i + 1} are the same rule")
            rules.append(rule)
        return rules

    @property
    def share(self) -> float:
        return 1.0 if self.floor_share is None else self.floor_share

    def command(self, model_name: str, out: str | None, base: str | None = None) -> str:
        """The `sparse-infer calibrate` command line that reproduces this run."""
        parts = ["sparse-infer", "calibrate", model_name]
        if out is not None:
            parts += ["--out", str(out)]
        parts += ["--length", str(self.length), "--window", str(self.window), "--seed", str(self.seed)]
        if tuple(self.levels) != DEFAULT_LEVELS:
            for raw in self.levels:
                parts += ["--level", json.dumps(raw)]
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
    seconds: float          # layer L's forward (attention and MLP) under the level
    density: float | None   # layer L's measured prefill density (dense heads count 1)


@dataclass
class Calibration:
    """What the trials measured and what the knapsack chose."""

    dense_seconds: list[float]                      # per layer, median over the trials that ran it dense
    trials: dict[tuple[int, int], Trial]            # (layer, level) -> Trial; missing: skipped
    target_kl: float
    floor_kl: float | None
    choice: list[int | None] = field(default_factory=list)   # per layer: level index, None = dense
    predicted_kl: float = 0.0
    predicted_seconds: float = 0.0


# ---------------------------------------------------------------------------- allocation


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
    best = [0.0] + [inf] * resolution          # best[b]: least seconds of the layers so far using b units
    picks: list[list[list[int | None]]] = []
    for layer, dense_s in enumerate(dense_seconds):
        options: list[tuple[int | None, int, float]] = [(None, 0, dense_s)]
        for level in range(levels):
            t = trials.get((layer, level))
            # a level that ran every head of the layer dense (patch's break-even) only adds its
            # estimate to dense: a faster reading of it is timing noise
            if t is None or not math.isfinite(t.kl) or (t.density is not None and t.density >= 1.0):
                continue
            units = math.ceil(max(t.kl, 0.0) / unit - 1e-9)
            if units <= resolution:
                options.append((level, units, t.seconds))
        nxt = [inf] * (resolution + 1)
        choice: list[int | None] = [None] * (resolution + 1)
        for b in range(resolution + 1):
            for level, units, seconds in options:
                if units <= b and best[b - units] + seconds < nxt[b]:
                    nxt[b], choice[b] = best[b - units] + seconds, level
        best = nxt
        picks.append(choice)
    b = min(range(resolution + 1), key=lambda i: best[i])
    out: list[int | None] = [None] * len(dense_seconds)
    kl = 0.0
    for layer in reversed(range(len(dense_seconds))):
        level = picks[layer][b]
        out[layer] = level
        if level is not None:
            t = trials[(layer, level)]
            kl += t.kl
            b -= math.ceil(max(t.kl, 0.0) / unit - 1e-9)
    seconds = sum(dense_seconds[i] if c is None else trials[(i, c)].seconds for i, c in enumerate(out))
    return out, kl, seconds


# ---------------------------------------------------------------------------- trials


class _LayerClock:
    """Seconds of each decoder layer's forward in the last model call (hooks on every layer)."""

    def __init__(self, layers):
        self.seconds: dict[int, float] = {}
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
            self.seconds[idx] = self._now(module) - self._start.pop(idx)
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


def _layer_plan(model_config, rule: Rule | None, layer: int, block_size: int) -> Plan:
    """`rule` on every head of `layer`, the rest dense (rule None: every layer dense)."""
    from sparse_infer.plan import model_spec_from_config

    spec = model_spec_from_config(model_config)
    prefill = {"min_seq_len": 1, "block_size": block_size, "default": {"pattern": "dense"}}
    if rule is not None:
        prefill["layers"] = {layer: {"*": rule.to_yaml("pattern")}}
    plan = plan_from_dict({
        "sparse_infer_plan": 1,
        "model": {k: v for k, v in vars(spec).items() if v is not None},
        "prefill": prefill,
        "decode": {"min_kv_len": 1, "default": {"method": "dense"}},
    }, source=f"calibration:layer{layer}")
    plan.check_model(model_config)
    return plan


def _trials_header(model, prompt, levels: Sequence[Rule], config: CalibrateConfig) -> dict:
    from sparse_infer.eval.results import weights_fingerprint

    param = next(model.parameters())
    return {"version": TRIALS_VERSION, "weights_sha256": weights_fingerprint(model), "input_sha": prompt.sha(),
            "window": config.window, "dense_above": config.dense_above, "block_size": config.block_size,
            "device": str(param.device), "threads": torch.get_num_threads(),
            "levels": [r.to_yaml("pattern") for r in levels]}


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
        if doc.get(key) != value:
            raise ValueError(f"--resume: {record} was measured with another {key} ({doc.get(key)!r}, now "
                             f"{value!r}); use another --out or --force")
    return doc


def _skipped(done: dict[tuple[int, int], Trial], levels: Sequence[Rule], layer: int, level: int,
             target_kl: float) -> bool:
    """Levels of one pattern are listed densest first: one that already spent the whole target alone
    at this layer rules out the sparser ones after it (other patterns are still tried)."""
    return any(levels[v].kind == levels[level].kind and (layer, v) in done and done[(layer, v)].kl > target_kl
               for v in range(level))


def run_trials(model, prompt, levels: Sequence[Rule], config: CalibrateConfig, *, target_kl: float,
               record: Path | None = None, resume: bool = False, progress: bool = True,
               log=None) -> tuple[list[float], dict[tuple[int, int], Trial]]:
    """Measure every (layer, level) trial; see the module docstring. With `record`, each trial is
    written there as it finishes, and `resume` takes the trials a previous run recorded
    for the same weights, prompt, levels and machine. The model is left unpatched."""
    import sparse_infer
    from sparse_infer.eval.fidelity import compare, next_token_logprobs, scored_positions
    from sparse_infer.eval.outputs import write_json
    from sparse_infer.eval.progress import ProgressBar
    from sparse_infer.profiler.capture import decoder_layers

    layers = decoder_layers(model)
    last = len(layers) - 1
    positions = scored_positions(prompt, config.window)
    header = _trials_header(model, prompt, levels, config)
    previous = read_record(record, header, resume)
    done: dict[tuple[int, int], Trial] = {}
    dense_runs: dict[int, list[float]] = {i: [] for i in range(len(layers))}
    if previous is not None:
        for row in previous.get("trials", []):
            done[(row["layer"], row["level"])] = Trial(row["kl"], row["top1"], row["seconds"], row["density"])
        for idx, runs in previous.get("dense_runs", {}).items():
            dense_runs[int(idx)] = list(runs)
    if sparse_infer.is_patched(model):
        sparse_infer.unpatch(model)
    dense_plan = _layer_plan(model.config, None, 0, config.block_size)

    def forward(plan: Plan | None, first: int = 0) -> tuple[torch.Tensor, dict[int, float], float | None]:
        """Log-probs over the window, each layer's seconds and layer `first`'s density, with `plan`
        patched (None: the model as it is) and the layers before `first` replayed."""
        clock = _LayerClock(layers)
        try:
            if plan is not None:
                sparse_infer.patch(model, plan, dense_above=config.dense_above)
                sparse_infer.reset_stats(model)
            with _Replay(layers, outputs, first):
                logprobs = next_token_logprobs(model, prompt.input_ids, positions)
            density = None
            if plan is not None:
                density = sparse_infer.get_stats(model)["layers"].get(first, {}).get("prefill_density")
        finally:
            clock.close()
            sparse_infer.unpatch(model)
        return logprobs, clock.seconds, density

    outputs: list[Any] = [None] * len(layers)

    def keep(idx):
        def hook(module, args, output):
            outputs[idx] = output
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        next_token_logprobs(model, prompt.input_ids, positions[-1:])     # warm-up: a first call is slower
        reference, _, _ = forward(None)
    finally:
        for h in handles:
            h.remove()
    if previous is None or not any(dense_runs.values()):
        # every layer's dense time as the trials' later layers run (through patch), once more
        _, seconds, _ = forward(dense_plan)
        for idx, sec in seconds.items():
            dense_runs[idx].append(sec)

    def save():
        if record is None:
            return
        write_json(record, {**header, "trials": [
            {"layer": l, "level": v, **asdict(t)} for (l, v), t in sorted(done.items())],
            "dense_runs": {str(i): runs for i, runs in sorted(dense_runs.items())}})

    save()
    pending = [(layer, level) for layer in range(len(layers)) for level in range(len(levels))]
    weight = {key: len(layers) - key[0] for key in pending}
    warmed: set[int] = set()
    with ProgressBar(progress, sum(weight.values()), len(pending)) as bar:
        for layer, level in pending:
            key = (layer, level)
            bar.describe(f"layer {layer} level {level + 1}")
            if key in done:
                bar.advance(weight[key], "recorded")
                continue
            if _skipped(done, levels, layer, level, target_kl):
                bar.advance(weight[key], "skipped")
                continue
            if level not in warmed:
                # a level's first call pays one-off costs (kernel builds, compiles): pay them on
                # the last layer, the cheapest trial, untimed
                forward(_layer_plan(model.config, levels[level], last, config.block_size), last)
                warmed.add(level)
            trial_lp, seconds, density = forward(_layer_plan(model.config, levels[level], layer, config.block_size),
                                                 layer)
            figures = compare(reference, trial_lp, positions, prompt)
            done[key] = Trial(float(figures["kl"]), float(figures["top1"]), seconds[layer],
                              None if density is None else float(density))
            for idx, sec in seconds.items():
                if idx > layer:
                    dense_runs[idx].append(sec)
            save()
            t = done[key]
            summary = f"KL {t.kl:.2e}, density {'?' if t.density is None else f'{t.density:.2f}'}, {t.seconds:.2f} s"
            bar.advance(weight[key], summary)
            if log is not None:
                log(f"layer {layer} level {level + 1}: {summary}")
    dense_seconds = [statistics.median(dense_runs[i]) for i in range(len(layers))]
    return dense_seconds, done


def bf16_floor(model, prompt, window: int, floor_cache: Path | None) -> float:
    """The bf16 floor KL of this prompt and window (cached as `eval fidelity` caches it)."""
    from sparse_infer.eval.fidelity import FloorCache, floor_figures, next_token_logprobs, scored_positions
    from sparse_infer.eval.results import weights_fingerprint

    cache = FloorCache(floor_cache)
    key = FloorCache.key(weights_fingerprint(model), prompt, window)
    figures = cache.get(key)
    if figures is None:
        positions = scored_positions(prompt, window)
        reference = next_token_logprobs(model, prompt.input_ids, positions)
        figures, _ = floor_figures(model, prompt, positions, reference, cache, key)
    return float(figures["kl"])


# ---------------------------------------------------------------------------- the plan


def build_plan(model_config, base: Plan, levels: Sequence[Rule], calibration: Calibration,
               config: CalibrateConfig, command: str | None, model_name: str, base_name: str = "") -> Plan:
    """`base` with its prefill replaced by the chosen rule per layer; the measurements go in
    profile.calibration."""
    raw = base.to_dict()
    layers = {i: {"*": levels[c].to_yaml("pattern")} for i, c in enumerate(calibration.choice) if c is not None}
    raw["prefill"] = {"min_seq_len": config.min_seq_len or config.length, "block_size": config.block_size,
                      "default": {"pattern": "dense"}}
    if layers:
        raw["prefill"]["layers"] = layers
    n = len(calibration.dense_seconds)

    def per_level(attr):
        def value(i, v):
            got = getattr(calibration.trials[(i, v)], attr) if (i, v) in calibration.trials else None
            return None if got is None else round(got, 6)
        return [[value(i, v) for i in range(n)] for v in range(len(levels))]

    raw["profile"] = {
        "tool": "sparse_infer.profiler.calibrate",
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        **({"command": command} if command else {}),
        "model": model_name,
        "decode_from": base_name,          # as given (a shipped name or the user's path), not resolved
        "calibration": {
            "length": config.length, "window": config.window, "seed": config.seed,
            "dense_above": config.dense_above, "target_kl": calibration.target_kl,
            "bf16_floor_kl": calibration.floor_kl,
            "levels": [r.to_yaml("pattern") for r in levels],
            "choice": [0 if c is None else c + 1 for c in calibration.choice],   # 0: dense, k: level k
            "predicted_kl": round(calibration.predicted_kl, 8),
            "predicted_seconds": round(calibration.predicted_seconds, 3),
            "dense_seconds": round(sum(calibration.dense_seconds), 3),
            "measured": {"layer_dense_seconds": [round(s, 4) for s in calibration.dense_seconds],
                         "kl": per_level("kl"), "seconds": per_level("seconds"), "density": per_level("density")},
        },
    }
    plan = plan_from_dict(raw, source="calibration")
    plan.check_model(model_config)
    return plan


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

    levels = config.validate()
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"calibrate a float32 model (this one is {dtype}): the KLs are measured against its "
                         "fp32 dense run, and the bf16 floor against fp32")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and config.length > limit:
        raise ValueError(f"--length {config.length} is beyond the model's context ({limit} positions)")
    for level in levels:
        _layer_plan(model.config, level, 0, config.block_size)      # a rule this model cannot take fails now
    base_name = base or _default_base(name)
    base_plan = load_plan(base_name, model.config)
    prompt = prose_prompt(tokenizer, config.length, 0, config.seed)
    if sparse_infer.is_patched(model):
        sparse_infer.unpatch(model)
    read_record(record, _trials_header(model, prompt, levels, config), resume)   # a mismatch fails before the floor
    floor = None
    target = config.target_kl
    if target is None:
        if log is not None:
            log("measuring the bf16 floor of the calibration prompt (cached for later runs)")
        floor = bf16_floor(model, prompt, config.window, floor_cache)
        if not floor > 0:
            raise ValueError(f"the bf16 floor of the calibration prompt is {floor}; give --target-kl")
        target = config.share * floor
    dense_seconds, trials = run_trials(model, prompt, levels, config, target_kl=target, record=record,
                                       resume=resume, progress=progress, log=log)
    choice, kl, seconds = allocate(dense_seconds, trials, len(levels), target)
    calibration = Calibration(dense_seconds, trials, target, floor, choice, kl, seconds)
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
           "DEFAULT_LEVELS"]
