"""Typer commands of the profiler, mounted by the main CLI as

    sparse-infer profile MODEL --out NAME.yaml [--force] [--seq-len 8192] [--samples 4] ...
    sparse-infer calibrate MODEL --out NAME.yaml [--length 8192] [--level RULE ...] ...
    sparse-infer plan show PLAN
    sparse-infer plan reallocate PLAN --out NAME.yaml --target-kl KL

`app` also works on its own: ``python -m sparse_infer.profiler profile ...``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

def _console(stderr: bool = False) -> Console:
    """Tables are wide: when not on a terminal (pipes, logs, tests) do not squeeze them to 80 columns."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)


def _fail(message: str) -> None:
    """One plain line on stderr (no markup, no wrapping: messages quote YAML such as [1, 2]), exit 1."""
    typer.echo(" ".join(str(message).split()), err=True)
    raise typer.Exit(1)


app = typer.Typer(help="Offline profiler: measure each head's attention and write a sparse_infer plan.",
                  no_args_is_help=True, add_completion=False)


def profile_command(
    model: Annotated[str, typer.Argument(help="Built-in name (smollm2-135m, qwen2.5-0.5b), a Hugging Face model "
                                              "directory, DIR:FILE.gguf or a .gguf path.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the plan (YAML); checked before "
                                                          "profiling, never overwritten without --force.")],
    seq_len: Annotated[int, typer.Option("--seq-len", help="Longest calibration length; statistics are also "
                                                           "taken at half of it to see how budgets grow.")] = 8192,
    samples: Annotated[int, typer.Option("--samples", help="Calibration prompts (needle, key-value, "
                                                           "text, ...), each serving both lengths.")] = 4,
    target_recall: Annotated[float, typer.Option("--target-recall", help="Share of each head's true attention "
                                                                         "mass its pattern must keep.")] = 0.95,
    min_seq_len: Annotated[Optional[int], typer.Option("--min-seq-len", help="Shorter prompts / caches run dense "
                                                                             "(default: seq_len / 2).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Calibration prompt seed.")] = 0,
    channels: Annotated[int, typer.Option("--channels", help="Double Sparsity channels per head.")] = 16,
    block_size: Annotated[int, typer.Option("--block-size", help="Prefill block size of the plan.")] = 64,
    retrieval_threshold: Annotated[float, typer.Option("--retrieval-threshold",
                                                       help="Retrieval-head score above which a head keeps "
                                                            "the whole cache in decode.")] = 0.1,
    group_slack: Annotated[float, typer.Option(
        "--group-slack", help="Keep one rule for a whole GQA group (K/V loaded once per group) when it costs at "
                              "most this much more than per-head rules; 'inf' = always one rule per kv group.")] = 0.1,
    decode_granularity: Annotated[str, typer.Option(
        "--decode-granularity",
        help="'group': one decode selection per GQA group (the group's soft vote), chosen so every head of the "
             "group keeps the target recall; 'head': one per query head, priced at (query heads per kv head) x "
             "its share of the cache, as it is gathered once per query head.")] = "group",
    int8_scoring: Annotated[bool, typer.Option(
        "--int8-scoring/--no-int8-scoring",
        help="Let token_select rank keys by int8 codes (scoring: int8; it pays on CPU, where the cost model "
             "is measured; other devices score exactly).")] = True,
    retrieval_heads: Annotated[str, typer.Option(
        "--retrieval-heads", help="'dense': a retrieval head's decode keeps the whole cache (with per-group "
                                  "selections, its whole GQA group); 'select': it may take a query-aware "
                                  "selector (not streaming) that keeps the target recall on the queries "
                                  "copying the answer.")] = "dense",
    decode_only: Annotated[bool, typer.Option(
        "--decode-only", help="Profile decode only: prefill stays dense and its statistics (a whole causal "
                              "attention per head) are skipped, so long lengths take about one dense forward "
                              "per sample.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Profile MODEL on generated calibration prompts and write a per-head plan to --out."""
    from sparse_infer.profiler.profile import ProfileConfig, check_out_path, profile
    from sparse_infer.profiler.report import summary_table

    console = _console(stderr=True)
    if retrieval_heads not in ("dense", "select"):
        raise typer.BadParameter(f"--retrieval-heads must be 'dense' or 'select', got {retrieval_heads!r}")
    config = ProfileConfig(seq_len=seq_len, samples=samples, target_recall=target_recall, min_seq_len=min_seq_len,
                           seed=seed, channels=channels, block_size=block_size,
                           retrieval_threshold=retrieval_threshold, group_slack=group_slack,
                           decode_granularity=decode_granularity, int8_scoring=int8_scoring,
                           decode_only=decode_only, retrieval_dense=retrieval_heads == "dense")
    try:
        config.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        check_out_path(out, overwrite=force)      # before the model is loaded: fail in seconds, not hours
        result = profile(model, out, config, progress=progress, console=console, overwrite=force)
    except (ValueError, OSError, RuntimeError) as exc:
        _fail(f"error: {exc}")
    console.print(summary_table(result))
    console.print(f"plan written to [bold]{out}[/bold] ({result.seconds:.0f} s)")


def calibrate_command(
    model: Annotated[str, typer.Argument(help="Built-in name (smollm2-135m, qwen2.5-0.5b), a Hugging Face model "
                                              "directory, DIR:FILE.gguf or a .gguf path.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the plan (YAML); checked before "
                                                          "anything runs, never overwritten without --force. "
                                                          "The trials go beside it (OUT.trials.json).")],
    length: Annotated[int, typer.Option("--length", help="Tokens of the calibration prompt (long prose).")] = 8192,
    level: Annotated[Optional[list[str]], typer.Option(
        "--level", help="A candidate rule of --phase as a YAML mapping, e.g. '{pattern: adaptive, gamma: 0.9}' "
                        "or '{method: quest, budget: {frac: 0.05}}'; repeat, densest first (a level is skipped "
                        "at a layer where a denser one of its kind already exceeded the target). Default: "
                        "prefill adaptive 0.95 and 0.85, the vertical_slash and a_shape presets' rules (dense "
                        "tail = --window); decode token_select (int8 scoring) at 0.1, 0.05 and 0.025 of the "
                        "cache.")] = None,
    phase: Annotated[str, typer.Option(
        "--phase", help="prefill: choose prefill rules, KL over the prompt's last --window positions; decode: "
                        "choose decode rules, KL over --tokens teacher-forced decode steps after a dense "
                        "prefill (as eval fidelity --decode-tokens).")] = "prefill",
    tokens: Annotated[int, typer.Option("--tokens", help="Decode: tokens dense continues the prompt by "
                                                         "(tokens - 1 decode steps are scored).")] = 64,
    reuse: Annotated[Optional[str], typer.Option(
        "--reuse", help="Decode: also try cross-layer reuse. A layer_select rule as a YAML mapping, e.g. "
                        "'{budget: {frac: 0.1}}': each layer is tried reading the set of the earlier layer whose "
                        "set holds most of its attention, and selecting layers are chosen with the rest.")] = None,
    batch: Annotated[int, typer.Option(
        "--batch", help="Decode: rows decoded together (copies of the prompt) when timing the trials, for a "
                        "plan that will serve batches (its KLs are those of one row).")] = 1,
    split_heads: Annotated[Optional[str], typer.Option(
        "--split-heads", help="Prefill: head counts K, e.g. '1,3'. At each layer the levels alone leave dense, "
                              "also try the level that cost least KL there with its K heads whose output it "
                              "changes most kept dense; likewise at the sparse layers whose level spends at "
                              "least an eighth of the target, on that level.")] = None,
    target_kl: Annotated[Optional[float], typer.Option(
        "--target-kl", help="Summed KL (nats per position) the plan may spend. Default: --floor-share x the "
                            "bf16 floor of the calibration prompt, measured and cached.")] = None,
    floor_share: Annotated[Optional[float], typer.Option(
        "--floor-share", help="Target as a share of the bf16 floor (default 1; the fidelity gate allows 2).")] = None,
    window: Annotated[int, typer.Option("--window", help="Last positions whose next-token KL is measured.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Prose prompt seed (eval fidelity's prompts use 0: "
                                                     "calibrate on other text than the gate checks).")] = 1,
    base: Annotated[Optional[str], typer.Option(
        "--base", help="Plan whose other section (decode, or prefill with --phase decode) the new plan keeps "
                       "(default: the shipped plan of a built-in model, else dense).")] = None,
    min_seq_len: Annotated[Optional[int], typer.Option(
        "--min-seq-len", help="Shorter prompts prefill dense, or shorter caches decode dense with --phase "
                              "decode (default: --length).")] = None,
    as_written: Annotated[bool, typer.Option(
        "--as-written", help="Measure the rules as written; by default as patch() runs them (heads whose "
                             "index is denser than the executor's break-even run dense).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse the trials in OUT.trials.json.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file and its trials.")] = False,
) -> None:
    """Choose each layer's prefill (or decode) rule by the KL it costs: per layer and candidate rule,
    measure the teacher-forced KL to dense and the layer's seconds, then keep the fastest per-layer
    mix whose summed KL fits the target."""
    import yaml

    from sparse_infer.profiler.calibrate import CalibrateConfig, calibrate
    from sparse_infer.profiler.report import calibration_table

    console = _console(stderr=True)
    levels = []
    for i, text in enumerate(level or []):
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise typer.BadParameter(f"--level {i + 1} is not YAML: {text!r}") from exc
        if not isinstance(raw, dict):
            raise typer.BadParameter(f"--level {i + 1} must be a mapping such as '{{pattern: a_shape}}', got {text!r}")
        levels.append(raw)
    reuse_raw = None
    if reuse is not None:
        try:
            reuse_raw = yaml.safe_load(reuse)
        except yaml.YAMLError as exc:
            raise typer.BadParameter(f"--reuse is not YAML: {reuse!r}") from exc
        if reuse_raw is None:
            raise typer.BadParameter("--reuse is empty; give a layer_select rule such as '{budget: {frac: 0.1}}'")
    split = ()
    if split_heads is not None:
        try:
            split = tuple(int(k) for k in split_heads.split(","))
        except ValueError as exc:
            raise typer.BadParameter(f"--split-heads must be comma-separated head counts such as '1,3', got "
                                     f"{split_heads!r}") from exc
    config = CalibrateConfig(length=length, window=window, seed=seed, levels=tuple(levels) or None,
                             target_kl=target_kl, floor_share=floor_share, min_seq_len=min_seq_len,
                             dense_above=1.0 if as_written else "auto", phase=phase, tokens=tokens,
                             reuse=reuse_raw, batch=batch, split_heads=split)
    try:
        config.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        plan, calibration = calibrate(model, out, config, base=base, resume=resume, overwrite=force,
                                      progress=progress,
                                      log=None if progress else lambda s: console.print(s, highlight=False))
    except KeyboardInterrupt:
        _fail(f"interrupted; the trials measured so far are in {out}.trials.json: rerun with --resume")
    except (ValueError, OSError, RuntimeError) as exc:
        _fail(f"error: {exc}")
    console.print(calibration_table(plan))
    console.print(f"plan written to [bold]{out}[/bold]")


def plan_reallocate_command(
    plan: Annotated[str, typer.Argument(help="A plan written by `sparse-infer calibrate` (path or shipped name).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the new plan (YAML).")],
    target_kl: Annotated[Optional[float], typer.Option(
        "--target-kl", help="Summed KL (nats per position) the new plan may spend.")] = None,
    floor_share: Annotated[Optional[float], typer.Option(
        "--floor-share", help="Target as a share of the bf16 floor the plan records.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Choose each layer's rule again from the trials a calibrated plan records, at another
    target: the knapsack of `calibrate`, without loading a model or running a trial (a point of
    the speed / KL frontier in seconds)."""
    import shlex

    from sparse_infer.plan import PlanError, load_plan
    from sparse_infer.profiler.calibrate import reallocate
    from sparse_infer.profiler.profile import check_out_path, save_plan
    from sparse_infer.profiler.report import calibration_table

    console = _console(stderr=True)
    try:
        checked = check_out_path(out, overwrite=force)
        source = load_plan(plan)
        parts = ["sparse-infer", "plan", "reallocate", plan, "--out", str(out)]
        # repr: the recorded command must give back the exact target
        parts += ["--target-kl", repr(target_kl)] if target_kl is not None else []
        parts += ["--floor-share", repr(floor_share)] if floor_share is not None else []
        new = reallocate(source, target_kl=target_kl, floor_share=floor_share,
                         command=" ".join(shlex.quote(p) for p in parts))
        save_plan(new, checked, overwrite=force)
    except (PlanError, ValueError, OSError, RuntimeError) as exc:
        _fail(f"error: {exc}")
    console.print(calibration_table(new))
    console.print(f"plan written to [bold]{out}[/bold]")


def plan_show_command(
    plan: Annotated[str, typer.Argument(help="A plan YAML path or a shipped plan name.")],
    heads: Annotated[Optional[int], typer.Option(min=1, help="query heads per layer, for a plan without a model "
                                                               "section")] = None,
    layers: Annotated[Optional[int], typer.Option(min=1, help="layers, for a plan without a model section")] = None,
) -> None:
    """Print per layer the pattern and method counts and the expected density at a few lengths."""
    from sparse_infer.plan import PlanError, load_plan
    from sparse_infer.profiler.report import ShapeUnknown, plan_table

    console = _console()
    try:
        loaded = load_plan(plan)
    except PlanError as exc:
        _fail(f"invalid plan: {exc}")
    try:
        table = plan_table(loaded, heads=heads, layers=layers)
    except ShapeUnknown as exc:
        _fail(str(exc))
    console.print(table)
    if loaded.profile.get("command"):
        console.print(f"made by: {loaded.profile['command']}  ({loaded.profile.get('created', '?')})")


app.command("profile")(profile_command)
app.command("calibrate")(calibrate_command)
plan_app = typer.Typer(help="Inspect plans.", no_args_is_help=True)
plan_app.command("show")(plan_show_command)
plan_app.command("reallocate")(plan_reallocate_command)
app.add_typer(plan_app, name="plan")


def main() -> None:
    app()
