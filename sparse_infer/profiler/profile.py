"""The offline profiler: calibration prompts -> per-head statistics -> a validated plan.

    from sparse_infer.profiler import ProfileConfig, profile_model, save_plan
    result = profile_model(model, tokenizer, ProfileConfig(seq_len=4096, samples=4))
    save_plan(result.plan, "my-model.yaml")     # Plan.save writes the same content, less compactly
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from sparse_infer.plan import (MAX_BLOCK_SIZE, PLAN_VERSION, Plan, PlanError, load_plan, model_spec_from_config, plan_from_dict,
                               write_plan_text)
from sparse_infer.profiler.capture import decoder_layers, layerwise
from sparse_infer.profiler.layer import LayerRun, analyze_layer
from sparse_infer.profiler.prompts import calibration_set, sample_kinds
from sparse_infer.profiler.search import HeadReport, SearchSettings

TOOL = "sparse_infer.profiler"


@dataclass
class ProfileConfig:
    seq_len: int = 8192
    samples: int = 4
    target_recall: float = 0.95
    min_seq_len: int | None = None          # default: the shortest profiled length
    seed: int = 0
    channels: int = 16
    block_size: int = 64
    retrieval_threshold: float = 0.1
    # a rule shared by a whole GQA group is kept when it costs at most (1 + slack) x the
    # per-head rules; inf = always one rule per kv group (see SearchSettings.group_slack)
    group_slack: float = 0.1
    decode_granularity: str = "group"       # see SearchSettings.decode_granularity
    lengths: tuple[int, ...] | None = None  # default: (seq_len // 2, seq_len)
    decode_queries: int = 32      # last queries standing in for decode steps (answer tokens included)
    # measure decode only: prefill stays dense and its blockwise statistics (a whole causal
    # attention per head and prompt) are skipped, which makes long lengths affordable
    decode_only: bool = False
    int8_scoring: bool = True               # see SearchSettings.int8_scoring
    retrieval_dense: bool = True            # see SearchSettings.retrieval_dense
    # torch threads while profiling (None: leave torch's setting). "auto": one for a full
    # profile, whose per-block statistics are many small ops that extra threads on a shared
    # CPU mostly wait on (measured 25x slower with 2 busy cores); torch's setting for
    # --decode-only, whose work is a few large matmuls and the layers' forwards
    threads: int | str | None = "auto"

    def resolved_lengths(self) -> tuple[int, ...]:
        if self.lengths:
            return tuple(sorted(set(self.lengths)))
        return (self.seq_len // 2, self.seq_len)

    def validate(self, max_positions: int | None = None, head_dim: int | None = None) -> None:
        lengths = self.resolved_lengths()
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"--target-recall must be in (0, 1], got {self.target_recall}")
        if not 16 <= self.block_size <= MAX_BLOCK_SIZE or self.block_size & (self.block_size - 1):
            # the plan would be refused at the end of the run: say so before it starts
            raise ValueError(f"block size must be a power of two from 16 to {MAX_BLOCK_SIZE}, got {self.block_size}")
        if min(lengths) < 4 * self.block_size:
            raise ValueError(f"profiled lengths {lengths} are too short: each needs at least 4 blocks of "
                             f"{self.block_size} tokens (raise --seq-len)")
        if max_positions and max(lengths) > max_positions:
            raise ValueError(f"--seq-len {max(lengths)} exceeds the model's context ({max_positions} positions)")
        if self.channels < 1 or (head_dim and self.channels > head_dim):
            raise ValueError(f"--channels must be in [1, head_dim={head_dim}], got {self.channels}")
        if not self.group_slack >= 0:
            raise ValueError(f"--group-slack must be >= 0 (inf = one rule per kv group), got {self.group_slack}")
        if self.decode_granularity not in ("group", "head"):
            raise ValueError(f"--decode-granularity must be 'group' or 'head', got {self.decode_granularity!r}")
        if not (self.threads in ("auto", None) or (isinstance(self.threads, int) and self.threads >= 1)):
            raise ValueError(f"threads must be 'auto', None or a positive int, got {self.threads!r}")
        if self.min_seq_len is not None and self.min_seq_len < 0:
            raise ValueError(f"--min-seq-len must be >= 0, got {self.min_seq_len}")

    def settings(self) -> SearchSettings:
        return SearchSettings(target_recall=self.target_recall, block_size=self.block_size,
                              retrieval_threshold=self.retrieval_threshold, channels=self.channels,
                              group_slack=self.group_slack, decode_granularity=self.decode_granularity,
                              int8_scoring=self.int8_scoring, retrieval_dense=self.retrieval_dense)

    def command(self, model_name: str, out: str | None) -> str:
        """The exact `sparse-infer profile` command line that reproduces this run."""
        parts = ["sparse-infer", "profile", model_name]
        if out is not None:
            parts += ["--out", str(out)]
        parts += ["--seq-len", str(self.seq_len), "--samples", str(self.samples),
                  "--target-recall", f"{self.target_recall:g}"]
        if self.min_seq_len is not None:
            parts += ["--min-seq-len", str(self.min_seq_len)]
        parts += ["--seed", str(self.seed), "--channels", str(self.channels)]
        if self.block_size != 64:
            parts += ["--block-size", str(self.block_size)]
        if self.retrieval_threshold != 0.1:
            parts += ["--retrieval-threshold", f"{self.retrieval_threshold:g}"]
        if self.group_slack != 0.1:
            parts += ["--group-slack", f"{self.group_slack:g}"]
        if self.decode_granularity != "group":
            parts += ["--decode-granularity", self.decode_granularity]
        if not self.retrieval_dense:
            parts += ["--retrieval-heads", "select"]
        if not self.int8_scoring:
            parts += ["--no-int8-scoring"]
        if self.decode_only:
            parts += ["--decode-only"]
        return shlex.join(parts)


@dataclass
class ProfileResult:
    plan: Plan
    reports: list[list[HeadReport]]         # [layer][head]
    config: ProfileConfig
    lengths: tuple[int, ...]
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def model_fingerprint(model) -> str:
    """sha256 over parameter names and bytes: identifies the exact weights the plan was made for."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


@contextlib.contextmanager
def _threads(n: int | None):
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(enabled: bool, console=None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
        TimeElapsedColumn, TimeRemainingColumn

    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console or Console(stderr=True), disable=not enabled, transient=False)


def profile_model(model, tokenizer, config: ProfileConfig | None = None, *, name: str | None = None,
                  out: str | Path | None = None, progress: bool = True, console=None) -> ProfileResult:
    """Profile `model` on calibration prompts and return the plan (not yet saved)."""
    config = config or ProfileConfig()
    started = time.time()
    spec = model_spec_from_config(model.config)
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    config.validate(getattr(text_cfg, "max_position_embeddings", None), spec.head_dim)
    lengths = config.resolved_lengths()
    settings = config.settings()
    name = name or getattr(model, "sparse_infer_name", None) or getattr(model.config, "_name_or_path", "") or \
        (spec.architecture or "model")
    samples = calibration_set(tokenizer, lengths, config.samples, config.seed)
    num_layers = len(decoder_layers(model))
    reports: list[list[HeadReport]] = []

    was_training = model.training
    model.eval()
    runs_per_layer = sum(len(s.turns) for s in samples)
    threads = config.threads
    if threads == "auto":
        threads = None if config.decode_only else 1
    with _progress(progress, console) as bar, layerwise(model) as runner, _threads(threads):
        t_prep = bar.add_task("embedding prompts", total=len(samples))
        states = []
        for s in samples:
            states.append(runner.start(s.input_ids))
            bar.advance(t_prep)
        t_layers = bar.add_task("layers", total=num_layers)
        t_samples = bar.add_task("samples", total=len(samples) + runs_per_layer)
        for layer in range(num_layers):
            bar.reset(t_samples, total=len(samples) + runs_per_layer)
            runs, names = [], []
            for s, state in zip(samples, states):
                bar.update(t_samples, description=f"layer {layer}: forward {s.kind}#{s.index}")
                cap = runner.step(layer, state)
                for turn in s.turns:
                    # the prompt for a shorter length is this prompt's prefix (causal attention)
                    n = turn.end
                    mask = None if cap.mask is None else cap.mask[..., :n, :n]
                    runs.append(LayerRun(turn.length, cap.query[:, :n], cap.key[:, :n], cap.scaling, mask,
                                         cap.softcap, s.input_ids[:, :n], turn.answer_positions, turn.needle_span))
                    names.append(f"{s.kind}#{s.index} @ {turn.length}")
                bar.advance(t_samples)

            def on_run(i, layer=layer):
                bar.update(t_samples, advance=1,
                           description=f"layer {layer}: statistics {names[min(i + 1, len(names) - 1)]}")

            bar.update(t_samples, description=f"layer {layer}: statistics {names[0]}")
            reports.append(analyze_layer(runs, settings, block_size=config.block_size,
                                         decode_queries=config.decode_queries, on_run=on_run,
                                         prefill=not config.decode_only))
            del runs
            bar.advance(t_layers)
            if progress and not bar.console.is_terminal:
                # no live bar in logs and pipes: one line per layer instead
                bar.console.print(f"layer {layer + 1}/{num_layers} profiled ({time.time() - started:.0f} s)")
    if was_training:
        model.train()

    command = config.command(name, str(out) if out is not None else None)
    plan = build_plan(reports, model, config, lengths, name=name, command=command)
    meta = [{"kind": s.kind, "index": s.index, "length": t.length, "tokens": t.end,
             "depth": None if t.depth is None else round(t.depth, 3)} for s in samples for t in s.turns]
    return ProfileResult(plan, reports, config, lengths, meta, time.time() - started)


# --------------------------------------------------------------------------- plan assembly
def _canonical(rule: dict) -> str:
    return json.dumps(rule, sort_keys=True)


def _section_layers(per_layer: list[list[dict]]):
    """(default rule, layers mapping): the most common rule is the default; layers list only
    the heads that differ, or '*' when a whole layer shares one rule."""
    counts = collections.Counter(_canonical(r) for layer in per_layer for r in layer)
    # ties: the first rule met in layer order, so the output does not depend on hash order
    order = {}
    for layer in per_layer:
        for r in layer:
            order.setdefault(_canonical(r), len(order))
    default_key = max(counts, key=lambda k: (counts[k], -order[k]))
    default = json.loads(default_key)
    layers = {}
    for idx, rules in enumerate(per_layer):
        keys = [_canonical(r) for r in rules]
        if all(k == default_key for k in keys):
            continue
        if len(set(keys)) == 1:
            layers[idx] = {"*": rules[0]}
        else:
            layers[idx] = {h: r for h, (r, k) in enumerate(zip(rules, keys)) if k != default_key}
    return default, layers


def _r(x: float) -> float:
    return round(float(x), 4)


def build_plan(reports: list[list[HeadReport]], model, config: ProfileConfig, lengths, *, name: str,
               command: str) -> Plan:
    spec = model_spec_from_config(model.config)
    min_len = config.min_seq_len if config.min_seq_len is not None else min(lengths)
    prefill = [[r.prefill.to_yaml("prefill") for r in layer] for layer in reports]
    decode = [[r.decode.to_yaml("decode") for r in layer] for layer in reports]
    pdefault, players = _section_layers(prefill)
    ddefault, dlayers = _section_layers(decode)
    retrieval = [[li, h] for li, layer in enumerate(reports) for h, r in enumerate(layer)
                 if r.retrieval_score >= config.retrieval_threshold]
    measured = {
        "prefill_density": {L: [_r(sum(r.prefill_density[L] for r in layer) / len(layer)) for layer in reports]
                            for L in lengths},
        "prefill_recall": {L: [_r(sum(r.prefill_recall[L] for r in layer) / len(layer)) for layer in reports]
                           for L in lengths},
        "decode_cost": {L: [_r(sum(r.decode_cost[L] for r in layer) / len(layer)) for layer in reports]
                        for L in lengths},
        "decode_recall": {L: [_r(sum(r.decode_recall[L] for r in layer) / len(layer)) for layer in reports]
                          for L in lengths},
        # per head and length: lets `plan show` report data-dependent densities
        "head_prefill_density": {L: {li: [_r(r.prefill_density[L]) for r in layer]
                                     for li, layer in enumerate(reports)} for L in lengths},
        "retrieval_heads": retrieval,
    }
    if config.decode_only:          # nothing of prefill was measured
        for key in ("prefill_density", "prefill_recall", "head_prefill_density"):
            del measured[key]
    from sparse_infer import __version__

    profile = {
        "tool": f"{TOOL} {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "command": command,
        # GGUF-loaded configs carry no `architectures`: name the class that was profiled
        "model": {"name": name, "architecture": spec.architecture or type(model).__name__,
                  "fingerprint": model_fingerprint(model)},
        "seq_len": max(lengths),
        "lengths": list(lengths),
        "samples": config.samples,
        "sample_kinds": sample_kinds(config.samples),
        "seed": config.seed,
        "target_recall": config.target_recall,
        "channels": config.channels,
        "block_size": config.block_size,
        "retrieval_threshold": config.retrieval_threshold,
        "group_slack": config.group_slack,
        "decode_granularity": config.decode_granularity,
        "int8_scoring": config.int8_scoring,
        "retrieval_dense": config.retrieval_dense,
        "decode_only": config.decode_only,
        "measured": measured,
    }
    raw = {
        "sparse_infer_plan": PLAN_VERSION,
        "model": {k: v for k, v in vars(spec).items() if v is not None},
        "profile": profile,
        "prefill": {"min_seq_len": min_len, "block_size": config.block_size, "granularity": "group",
                    "default": pdefault, "layers": players},
        # the decode selections were measured at this granularity
        "decode": {"min_kv_len": min_len, "granularity": config.decode_granularity, "default": ddefault, "layers": dlayers},
    }
    plan = plan_from_dict(raw, source="profiler")
    plan.check_model(model.config)
    return plan


class _Flow(dict):
    """A mapping written on one line (one rule per line keeps a 270-head plan readable)."""


class _FlowList(list):
    pass


class _PlanDumper(yaml.SafeDumper):
    pass


_PlanDumper.add_representer(_Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(),
                                                                     flow_style=True))
_PlanDumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v,
                                                                         flow_style=True))


def plan_yaml(plan: Plan) -> str:
    """The plan as YAML, each rule and each measurement list on one line (same content as Plan.save),
    ending with `complete: true`."""
    raw = plan.to_document()
    for section in ("prefill", "decode"):
        sec = raw[section]
        sec["default"] = _Flow(sec["default"])
        for heads in (sec.get("layers") or {}).values():
            for head, rule in heads.items():
                heads[head] = _Flow(rule)
    def flow_lists(value):
        if isinstance(value, dict):
            return {k: flow_lists(v) for k, v in value.items()}
        if isinstance(value, list):
            return _FlowList(flow_lists(v) for v in value)
        return value

    if (raw.get("profile") or {}).get("measured"):
        raw["profile"]["measured"] = flow_lists(raw["profile"]["measured"])
    return yaml.dump(raw, Dumper=_PlanDumper, sort_keys=False, default_flow_style=None, width=120)


def check_out_path(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a destination the plan could not be written to, before any profiling is spent on it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a file name such as {path / 'plan.yaml'}")
    if path.exists() and not overwrite:
        raise ValueError(f"--out {path} exists; not overwritten (pass --force to replace it)")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"--out {path}: {parent} is not a directory")
    if not parent.is_dir():
        raise ValueError(f"--out {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: directory {parent} is not writable")
    return path


def save_plan(plan: Plan, path: str | Path, *, overwrite: bool = False, model_config=None) -> Path:
    """Write the plan atomically, after checking the text reads back as the same plan (and fits
    `model_config` when given): the destination only ever holds a whole, valid plan."""
    path = Path(path)
    text = plan_yaml(plan)
    fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".check")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        reloaded = load_plan(probe, model_config)
    finally:
        os.unlink(probe)
    if reloaded.to_dict() != plan.to_dict():
        raise RuntimeError(f"the plan for {path} does not read back as the plan that was profiled; not written")
    return write_plan_text(path, text, overwrite=overwrite)


def profile(model_spec: str, out: str | Path, config: ProfileConfig | None = None, *, progress: bool = True,
            console=None, overwrite: bool = False) -> ProfileResult:
    """Load a model by spec (see sparse_infer.models.load_model), profile it, save the validated plan.

    `out` is checked first (a writable directory, no existing file unless `overwrite`), so a long
    run never ends on a path it cannot write.
    """
    from sparse_infer.models import load_model

    config = config or ProfileConfig()
    check_out_path(out, overwrite=overwrite)
    model, tokenizer = load_model(model_spec)
    result = profile_model(model, tokenizer, config, name=model_spec, out=out, progress=progress, console=console)
    try:
        save_plan(result.plan, out, overwrite=overwrite, model_config=model.config)
    except FileExistsError as exc:
        raise ValueError(f"--out {exc}") from exc
    except PlanError as exc:
        raise RuntimeError(f"the profiled plan does not validate ({exc}); nothing written to {out}") from exc
    return result


__all__ = ["ProfileConfig", "ProfileResult", "profile", "profile_model", "build_plan", "model_fingerprint",
           "plan_yaml", "save_plan", "check_out_path"]
