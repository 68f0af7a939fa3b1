"""`sparse-infer eval ...` commands (mounted under the main CLI as `eval`).

sparse-infer eval ruler MODEL --plan PLAN [--compare dense] --lengths 4096,8192
    --tasks all|LIST --samples N --out DIR [--data FILE] [--seed 0] [--resume] [--dtype float32]
sparse-infer eval needle [MODEL] --plan PLAN [--compare dense] --lengths ...
    --depths 0,10,...,100 --out DIR [--dtype float32]
sparse-infer eval merge SRC_DIR[:PLAN,...]... --out DIR [--common]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sparse_infer.eval.errors import EvalError

eval_app = typer.Typer(
    help="Accuracy of sparse plans against dense attention: RULER tasks and a needle-in-a-haystack grid.",
    no_args_is_help=True,
    add_completion=False,
)

console = Console()
err_console = Console(stderr=True)

DEFAULT_NEEDLE_MODEL = "smollm2-135m"
# Small enough for a laptop CPU in about 5 minutes (9 prompts per plan, up to 8,000 tokens);
# the longest is near SmolLM2-135M's context (8,192 positions, less room for the answer), where its
# shipped plan prefills sparse: the default job shows the plan's speed against dense
DEFAULT_NEEDLE_LENGTHS = "2048,4096,8000"
DEFAULT_NEEDLE_DEPTHS = "0,50,100"
DENSE = "dense"


# ---------------------------------------------------------------------------
# Argument parsing helpers
# ---------------------------------------------------------------------------


def _number(text: str, kind: type) -> Any:
    t = text.strip().lower()
    mult = 1
    if kind is int and t.endswith("k"):  # "4k" = 4096, as lengths are usually written
        t, mult = t[:-1], 1024
    try:
        return kind(float(t) * mult) if kind is int and mult != 1 else kind(t)
    except ValueError:
        raise EvalError(f"not a number: {text!r}") from None


def parse_list(spec: str, kind: type = int, what: str = "value") -> list:
    """'1,2,3', '4k,8k', or an arithmetic run written '0,10,...,100'."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise EvalError(f"no {what}s given")
    out: list = []
    i = 0
    while i < len(parts):
        if parts[i] in ("...", "…"):
            if len(out) < 2 or i + 1 >= len(parts):
                raise EvalError(f"'...' in {spec!r} needs two values before it and one after")
            step, end = out[-1] - out[-2], _number(parts[i + 1], kind)
            if step <= 0:
                raise EvalError(f"'...' in {spec!r} needs increasing values")
            v = out[-1] + step
            while v < end - 1e-9:
                out.append(kind(round(v, 6)) if kind is float else v)
                v += step
            i += 1
            continue
        out.append(_number(parts[i], kind))
        i += 1
    return list(dict.fromkeys(out))


def _plan_label(plan: str) -> str:
    p = Path(plan)
    return p.stem if p.suffix in (".json", ".yaml", ".yml", ".toml") else plan


def build_plans(plan: str, compare: str | None, label: str | None = None) -> dict[str, Any]:
    """Display name -> plan (None = dense). The baseline comes first so it runs first.

    A plan is stored under its name (a file's stem) in results.json, so two different plans
    that would share a name are refused: one would be stored as the other, and a baseline
    under the sparse plan's name would be skipped."""
    entries: list[tuple[str, str, str]] = []   # (name, spec, option)
    if compare and compare.lower() != "none":
        entries.append((DENSE if compare == DENSE else _plan_label(compare), compare, "--compare"))
    entries.append((label or (DENSE if plan == DENSE else _plan_label(plan)), plan, "--plan"))
    if len(entries) == 2 and entries[0][0] == entries[1][0]:
        (name, first, _), (_, second, _) = entries
        if first != second:
            raise EvalError(
                f"--plan {second!r} and --compare {first!r} would both be stored under the name {name!r}; "
                "copy or rename one plan file so their names differ"
            )
        entries.pop(0)   # the same plan asked for twice runs once
    return {name: None if spec == DENSE else spec for name, spec, _ in entries}


def shipped_plans() -> list[str]:
    """Names of the plans that ship with the package (for messages)."""
    from sparse_infer.plan import CONFIGS_DIR

    return sorted(p.stem for p in Path(CONFIGS_DIR).glob("*.yaml"))


def default_plan_for(model: str) -> str:
    """The plan shipped for `model`; EvalError when none ships for it.

    No preset is put in its place: the needle grid of some preset, shown as if it were the
    model's plan, would answer a question nobody asked. The message names the choices."""
    from sparse_infer.plan import CONFIGS_DIR
    from sparse_infer.presets import PRESETS

    # only a bare name can be a shipped plan's; a path is a model of the user's own
    if model and not any(c in model for c in "/\\:"):
        path = Path(CONFIGS_DIR) / f"{model}.yaml"
        if path.is_file():
            return str(path)
    presets = ", ".join(p for p in PRESETS if p != DENSE)
    raise EvalError(
        f"no plan ships for model {model!r} (plans ship for: {', '.join(shipped_plans()) or 'none'}); "
        f"give --plan: a plan file (e.g. from `sparse-infer profile`), a shipped plan name, or a preset ({presets})"
    )


def check_plans_exist(plans: dict[str, Any]) -> None:
    """Every named plan must be found (and parse) before any model work: a preset name, a
    shipped plan name or a plan file. Nothing is substituted for a plan that is not found."""
    from sparse_infer.plan import load_plan
    from sparse_infer.presets import PRESETS

    for spec in plans.values():
        if spec is None or (spec in PRESETS and not Path(spec).exists()):
            continue   # presets are built from the model's config, once it is loaded
        load_plan(spec)   # PlanError: not found, not YAML, or not a valid plan


def _plan_errors() -> tuple[type[BaseException], ...]:
    try:
        from sparse_infer.plan import PlanError

        return (EvalError, PlanError)
    except ImportError:
        return (EvalError,)


def _fail(msg: str) -> typer.Exit:
    err_console.print(f"[red]error:[/] {msg}")
    return typer.Exit(2)


DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name: str):
    """--dtype NAME -> torch dtype; an unknown name is refused before any model work."""
    import torch

    if name not in DTYPES:
        raise EvalError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


# one --dtype option for every command that loads a model
DtypeOption = Annotated[str, typer.Option(
    "--dtype", help="Weights and activations: float32, bfloat16 or float16 (dense and plan alike).")]

# --resume of the commands that write results.json (a needle cell's prompts are its samples)
ResumeOption = Annotated[bool, typer.Option(
    "--resume", help="Continue OUT/results.json: skip samples already there (same weights, plans, dtype).")]

# the margin the printed verdicts test each plan against: the accuracy goal is at most 1 point below dense
ToleranceOption = Annotated[float, typer.Option(
    "--tolerance", min=0, help="Points below the baseline a plan may score; the verdicts test against it.")]


def _load(model: str, dtype_name: str) -> tuple[Any, Any]:
    dtype = parse_dtype(dtype_name)     # refused before any model work
    try:
        from sparse_infer import load_model
    except ImportError as e:
        raise _fail(f"sparse_infer.load_model is not available ({e})") from None
    with console.status(f"loading {model} ..."):
        return load_model(model, dtype=dtype)


def _load_checked(model: str, dtype_name: str, lengths: list[int], plans: dict[str, Any]) -> tuple[Any, Any]:
    """The model and tokenizer, once lengths and plans are checked against the model config:
    before any prompt is built or token generated, so a plan for another model fails fast."""
    from sparse_infer.eval.runner import resolve_plan, validate_lengths

    loaded, tokenizer = _load(model, dtype_name)
    validate_lengths(loaded.config, lengths)
    for plan in plans.values():
        resolve_plan(plan, loaded.config)
    return loaded, tokenizer


def _interrupted(out: Path) -> typer.Exit:
    err_console.print(
        f"\n[yellow]interrupted[/]: finished samples are saved in {out / 'results.json'}; "
        "rerun the same command with --resume to continue"
    )
    return typer.Exit(130)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


@eval_app.command("ruler")
def ruler_cmd(
    model: Annotated[str, typer.Argument(help="Built-in name (smollm2-135m, qwen2.5-0.5b), HF dir, or dir:file.gguf.")],
    plan: Annotated[
        str,
        typer.Option("--plan", help="Plan file, shipped plan name, or preset (dense, a_shape, vertical_slash, block)."),
    ],
    compare: Annotated[str | None, typer.Option("--compare", help="Also run this baseline, usually 'dense'.")] = None,
    lengths: Annotated[
        str, typer.Option("--lengths", help="Prompt lengths in tokens, e.g. 4096,8192 or 4k,8k.")
    ] = "4096,8192",
    tasks: Annotated[
        str | None,
        typer.Option("--tasks", help="'all' or a comma list of RULER tasks (default: all, or none with --data)."),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Samples per task and length.")] = 10,
    out: Annotated[Path, typer.Option("--out", help="Output directory for results.json.")] = Path("eval_results/ruler"),
    data: Annotated[
        Path | None, typer.Option("--data", help="QA file (jsonl/json/parquet) with 'input' and 'answers' fields.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the synthetic prompts.")] = 0,
    resume: ResumeOption = False,
    dtype: DtypeOption = "float32",
    tolerance: ToleranceOption = 1.0,
) -> None:
    """Run RULER synthetic tasks (and optional QA data) under PLAN, optionally next to dense."""
    from sparse_infer.eval import results, ruler, runner, tables

    errors = _plan_errors()
    try:
        length_list = parse_list(lengths, int, "length")
        task_list = ruler.resolve_tasks(tasks or "all") if (tasks or data is None) else []
        if data is not None and not data.is_file():
            raise EvalError(f"data file not found: {data}")
        plans = build_plans(plan, compare)
        check_plans_exist(plans)
        parse_dtype(dtype)
        # OUT is checked and locked before the model loads, and held to the end
        with results.claim_out_dir(out, resume):
            m, tok = _load_checked(model, dtype, length_list, plans)
            all_samples: list[dict] = []
            if task_list:
                with console.status(
                        f"building prompts ({len(task_list)} tasks x {len(length_list)} lengths x {samples})"):
                    all_samples += ruler.generate_samples(tok, task_list, length_list, samples, seed)
            if data is not None:
                all_samples += ruler.load_user_tasks(data, tok, lengths=length_list, limit=samples)
            rows = runner.run_eval(m, tok, all_samples, plans, out, resume=resume)
            doc = results.load_results(out)
    except errors as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _interrupted(out) from None
    console.print(tables.render_table(rows, title=f"RULER {model}"))
    if len(plans) > 1:
        _print_changes(doc, tolerance)
    console.print(f"results: {out / results.RESULTS_FILE}")


@eval_app.command("needle")
def needle_cmd(
    model: Annotated[
        str | None, typer.Argument(help=f"Model spec (default {DEFAULT_NEEDLE_MODEL}).", show_default=False)
    ] = None,
    plan: Annotated[
        str | None, typer.Option("--plan", help="Plan (default: the plan shipped for MODEL; an error if none ships).")
    ] = None,
    compare: Annotated[str, typer.Option("--compare", help="Baseline to run too; 'none' for the plan alone.")] = DENSE,
    lengths: Annotated[str, typer.Option("--lengths", help="Context lengths in tokens.")] = DEFAULT_NEEDLE_LENGTHS,
    depths: Annotated[
        str, typer.Option("--depths", help="Needle depths in percent, e.g. 0,10,...,100.")
    ] = DEFAULT_NEEDLE_DEPTHS,
    out: Annotated[
        Path, typer.Option("--out", help="Output directory (needle.png, needle.json, results.json).")
    ] = Path("eval_results/needle"),
    samples: Annotated[int, typer.Option("--samples", min=1, help="Prompts per grid cell.")] = 1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: ResumeOption = False,
    dtype: DtypeOption = "float32",
    tolerance: ToleranceOption = 1.0,
) -> None:
    """Needle-in-a-haystack grid (length x depth) under PLAN and a heatmap PNG."""
    from sparse_infer.eval import needle, results, tables

    errors = _plan_errors()
    model = model or DEFAULT_NEEDLE_MODEL
    try:
        length_list = parse_list(lengths, int, "length")
        depth_list = parse_list(depths, float, "depth")
        bad = [d for d in depth_list if not 0 <= d <= 100]
        if bad:
            raise EvalError(f"depths must be within 0..100, got {bad}")
        chosen = plan or default_plan_for(model)
        # A shipped plan is shown under the model's name, as it is named in the docs.
        label = model if plan is None else None
        plans = build_plans(chosen, compare, label)
        check_plans_exist(plans)
        parse_dtype(dtype)
        with results.claim_out_dir(out, resume):
            m, tok = _load_checked(model, dtype, length_list, plans)
            result = needle.run_needle(
                m,
                tok,
                plans,
                out,
                length_list,
                depth_list,
                seed=seed,
                samples_per_cell=samples,
                resume=resume,
                title=f"needle in a haystack: {model}",
            )
            doc = results.load_results(out)
        doc["plans"] = {name: entry for name, entry in doc["plans"].items() if name in plans}
        rows = results.summarize(doc)
    except errors as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _interrupted(out) from None
    console.print(tables.render_table(rows, title=f"needle {model} (mean over depths)"))
    for line in needle.describe(result):
        console.print(line, markup=False, highlight=False)
    if len(plans) > 1:
        _print_changes(doc, tolerance)  # the depths of a length are its samples
    console.print(f"heatmap: {out / needle.NEEDLE_PNG}")
    console.print(f"grid: {out / needle.NEEDLE_JSON}")


@eval_app.command("fidelity")
def fidelity_cmd(
    model: Annotated[str, typer.Argument(help="Built-in name (smollm2-135m, qwen2.5-0.5b), HF dir, or dir:file.gguf.")],
    plan: Annotated[str, typer.Option("--plan", help="Plan file, shipped plan name, or preset.")],
    lengths: Annotated[str, typer.Option("--lengths", help="Prompt lengths in tokens, e.g. 4096,8192 or 4k,8k.")] = "4096",
    samples: Annotated[int, typer.Option("--samples", min=1, help="Prompts per kind and length.")] = 4,
    kinds: Annotated[str, typer.Option(
        "--kinds", help="prose (long natural text), ruler (RULER prompts with the gold answer appended), or both.")
    ] = "prose,ruler",
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="RULER tasks the ruler prompts cycle through (default: four retrieval tasks).")] = None,
    window: Annotated[int, typer.Option("--window", min=1, help="Scored positions at the end of each prompt.")] = 256,
    out: Annotated[Path, typer.Option("--out", help="Output directory for fidelity.json.")] = Path(
        "eval_results/fidelity"),
    floor: Annotated[bool, typer.Option(
        "--floor/--no-floor", help="Measure dense in bfloat16 as the noise floor (cached per weights and prompt).")
    ] = True,
    floor_cache: Annotated[Path | None, typer.Option(
        "--floor-cache", help="JSON file of cached bf16 floor figures (default: in the model cache dir).")] = None,
    as_patched: Annotated[bool, typer.Option(
        "--as-patched", help="Run the plan as patch() does by default (dense where sparse would be slower here), "
                             "not as written.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the prompts.")] = 0,
    decode_tokens: Annotated[int, typer.Option(
        "--decode-tokens", min=0,
        help="Measure decode instead of prefill: dense continues each prompt by this many greedy tokens and "
             "the plan (prefill dense) decodes them teacher-forced, one step per token.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Skip prompts already in OUT/fidelity.json.")] = False,
) -> None:
    """Teacher-forced KL and top-1 agreement of PLAN against dense fp32, next to the bf16 noise floor.

    Decides in minutes what answer accuracy needs hundreds of samples for. A plan passes at a
    length when its answer KL is within 2x the bf16 floor's and its top-1 agreement at most
    1 point below the floor's.
    """
    from sparse_infer.eval import fidelity

    errors = _plan_errors()
    try:
        length_list = parse_list(lengths, int, "length")
        kind_list = parse_list(kinds, str, "kind")
        task_list = parse_list(tasks, str, "task") if tasks else list(fidelity.DEFAULT_RULER_TASKS)
        plans = {"plan": plan}
        check_plans_exist(plans)
        if floor_cache is None:
            from sparse_infer.models import cache_dir
            floor_cache = cache_dir() / "fidelity_floor.json"
        created = fidelity.check_out(out, resume)       # before the model loads
        try:
            m, tok = _load_checked(model, "float32", length_list, plans)
            with console.status("building prompts"):
                prompts = fidelity.make_prompts(tok, length_list, samples, kind_list, task_list, seed)
            rows = fidelity.run_fidelity(m, prompts, plan, _plan_label(plan), out, window=window, floor=floor,
                                         floor_cache=floor_cache, dense_above="auto" if as_patched else 1.0,
                                         decode_tokens=decode_tokens, resume=resume)
        finally:
            if created and not (out / fidelity.FIDELITY_FILE).exists():
                try:
                    out.rmdir()
                except OSError:
                    pass
    except errors as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        err_console.print(f"\n[yellow]interrupted[/]: finished prompts are saved in {out / fidelity.FIDELITY_FILE}; "
                          "rerun the same command with --resume to continue")
        raise typer.Exit(130) from None
    console.print(fidelity.render_table(rows, title=f"fidelity {model}: {plan} vs dense fp32"))
    console.print(f"results: {out / fidelity.FIDELITY_FILE}")


@eval_app.command("merge")
def merge_cmd(
    sources: Annotated[list[str], typer.Argument(
        help="Result directories (each with a results.json); DIR:NAME[,NAME] takes only those plans of DIR.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the merged results.json (may be a source).")],
    common: Annotated[bool, typer.Option(
        "--common", help="Keep only the samples every plan has finished (runs still under way).")] = False,
    tolerance: ToleranceOption = 1.0,
) -> None:
    """Merge runs split over processes (by --tasks, or dense and plan apart) and print the table."""
    from sparse_infer.eval import merge, results, tables

    try:
        doc = merge.merge_results(sources, out, common=common)
    except EvalError as e:
        raise _fail(str(e)) from None
    console.print(tables.render_table(doc["summary"], title="merged results"))
    _print_changes(doc, tolerance)
    console.print(f"results: {out / results.RESULTS_FILE}")


def _print_changes(doc: dict, tolerance: float) -> None:
    """Which samples each plan changes, then whether its Δ is known well enough to meet the goal."""
    from sparse_infer.eval import compare, paired

    lines = compare.describe_changes(*compare.changed_answers(doc))
    lines += paired.describe_paired(*paired.paired_deltas(doc), tolerance=tolerance)
    for line in lines:
        console.print(line, markup=False, highlight=False)


def _main() -> None:  # pragma: no cover - convenience for `python -m sparse_infer.eval.cli`
    eval_app()


if __name__ == "__main__":  # pragma: no cover
    _main()
