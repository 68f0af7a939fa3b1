"""`sparse-infer`: eval, bench, profile and plan commands."""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Training-free sparse attention for Hugging Face transformers.", no_args_is_help=True)
bench_app = typer.Typer(help="Speed benchmarks: dense vs sparse in one run.", no_args_is_help=True)
plan_app = typer.Typer(help="Inspect and check plans.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(plan_app, name="plan")
console = Console()


def _mount_optional():
    """Sub-commands that live beside their feature; a missing one must not break the others."""
    try:
        from sparse_infer.eval.cli import eval_app
        app.add_typer(eval_app, name="eval")
    except ImportError:
        pass
    try:
        from sparse_infer.profiler.cli import (
            calibrate_command, plan_reallocate_command, plan_show_command, profile_command,
        )
        app.command("profile")(profile_command)
        app.command("calibrate")(calibrate_command)
        plan_app.command("show")(plan_show_command)
        plan_app.command("reallocate")(plan_reallocate_command)
    except ImportError:
        pass


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _table(rows, columns, title):
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    console.print(table)


def _model_config(model: str):
    from transformers import AutoConfig

    from sparse_infer.models import resolve_spec
    directory, gguf = resolve_spec(model)
    return AutoConfig.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))


def _plan_fail(message: str) -> None:
    """One plain line on stderr (no markup, no wrapping: messages quote YAML such as [1, 2]), exit 1."""
    typer.echo(" ".join(str(message).split()), err=True)
    raise typer.Exit(1)


@plan_app.command("check")
def plan_check(plan: str, model: Optional[str] = typer.Option(None, help="check against this model's config")):
    """Validate a plan (optionally against a model); exits 1 with the bad field's path."""
    from sparse_infer.plan import PlanError, load_plan

    try:
        config = _model_config(model) if model else None
    except (OSError, ValueError) as exc:
        _plan_fail(f"cannot read the config of model {model!r}: {exc}")
    try:
        load_plan(plan, config)
    except PlanError as exc:
        _plan_fail(f"invalid plan: {exc}")
    console.print(f"[green]ok[/green] {plan}")


@plan_app.command("preset")
def plan_preset(
    name: str = typer.Argument(..., help="dense, a_shape, vertical_slash or block"),
    model: str = typer.Option(..., help="model whose shape the plan is written for"),
    out: str = typer.Option(..., help="YAML file to write (refused if it exists)"),
    min_seq_len: int = typer.Option(4096, help="shorter prompts prefill densely"),
    min_kv_len: int = typer.Option(4096, help="shorter caches decode densely"),
):
    """Write a preset as an editable plan file, e.g. with a lower dense threshold."""
    from pathlib import Path

    from sparse_infer.plan import PlanError
    from sparse_infer.presets import preset

    if Path(out).exists():
        _plan_fail(f"refused: {out} exists")
    if not Path(out).parent.is_dir():
        _plan_fail(f"refused: directory {Path(out).parent} does not exist")
    try:
        plan = preset(name, _model_config(model), min_seq_len=min_seq_len, min_kv_len=min_kv_len)
    except PlanError as exc:
        _plan_fail(f"invalid: {exc}")
    try:
        plan.save(out)
    except OSError as exc:
        _plan_fail(f"refused: {exc}")
    console.print(f"[green]wrote[/green] {out}")


def _json_target(json_out: Optional[str]):
    """--json checked before any benchmark runs or model loads: a file that exists is not
    replaced, and one that cannot be created is refused now rather than after minutes of timing."""
    if not json_out:
        return None
    from pathlib import Path

    from sparse_infer.eval.outputs import check_new_file
    from sparse_infer.eval.errors import EvalError

    target = Path(json_out)
    try:
        check_new_file(target, "--json")
    except EvalError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    return target


def _write_bench_json(target, doc) -> None:
    if target is not None:
        from sparse_infer.eval.outputs import write_json

        write_json(target, doc, indent=2)
        console.print(f"wrote {target}")


def _check_bench_plans(names) -> None:
    """A plan named for the end-to-end run must be found before any timing: presets are built
    from the model's config later, anything else must load as a plan now."""
    from sparse_infer.plan import PlanError, load_plan
    from sparse_infer.presets import PRESETS

    for name in names:
        if name in PRESETS:
            continue
        try:
            load_plan(name)
        except PlanError as exc:
            console.print(f"[red]error:[/red] --plans {name}: {exc}")
            raise typer.Exit(2)


@bench_app.command("prefill")
def bench_prefill(
    lengths: str = typer.Option("4096,8192,16384", help="sequence lengths for the attention micro-benchmark"),
    heads: str = typer.Option("32,8", help="query heads,kv heads (Llama-like)"),
    head_dim: int = 128,
    model: Optional[str] = typer.Option(None, help="also time end-to-end prefill of this model"),
    model_lengths: str = typer.Option("4096,8192,16384"),
    plans: str = typer.Option("a_shape,vertical_slash,block", help="plans for the end-to-end run"),
    repeats: int = typer.Option(1, min=1, help="end-to-end forwards per plan and length (the fastest counts)"),
    detail: bool = typer.Option(False, "--detail", help="per-layer prefill attention time: estimate, "
                                                        "sparse executor, dense heads"),
    json_out: Optional[str] = typer.Option(None, "--json", help="write all rows to this new JSON file"),
):
    """Dense SDPA vs each pattern: attention time, ratio, density; then end-to-end prefill with
    each plan's fidelity against dense (KL over the last 256 positions, top-1 agreement)."""
    import torch

    from sparse_infer.bench.attention import bench_prefill_attention

    target = _json_target(json_out)
    plan_names = [p for p in plans.split(",") if p.strip()]
    if model:
        _check_bench_plans(plan_names)
    hq, hkv = _ints(heads)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = bench_prefill_attention(lengths=_ints(lengths), heads=(hq, hkv), head_dim=head_dim)
    _table(rows, ["n", "pattern", "density", "backend", "dense_ms", "sparse_ms", "ratio"],
           f"prefill attention, Hq={hq} Hkv={hkv} D={head_dim}")
    e2e = []
    if model:
        import sparse_infer
        m, tok = sparse_infer.load_model(model)
        e2e = bench_prefill_end_to_end_rows(m, tok, _ints(model_lengths), plan_names, repeats, detail)
        _table([{**r, "kl": f"{r['kl']:.5f}", "top1": f"{r['top1']:.1f}"} for r in e2e],
               ["n", "plan", "seconds", "ratio", "density", "kl", "top1"], f"end-to-end prefill, {model}")
        if detail:
            _print_layer_detail(e2e)
    _write_bench_json(target, {"attention": rows, "end_to_end": e2e})


def bench_prefill_end_to_end_rows(model, tok, lengths, plan_names, repeats=1, detail=False):
    from sparse_infer.bench.prefill import bench_prefill_end_to_end, named_plans

    return bench_prefill_end_to_end(model, tok, lengths, named_plans(plan_names, model.config), repeats=repeats,
                                    detail=detail)


def _print_layer_detail(rows) -> None:
    """One table per length: per layer, each plan's attention ms (estimate + sparse + dense)."""
    for n in dict.fromkeys(r["n"] for r in rows):
        at = [r for r in rows if r["n"] == n]
        table = Table(title=f"prefill attention per layer at n={n}, ms per forward: "
                            "estimate + sparse executor + dense heads = total (density)")
        table.add_column("layer", justify="right")
        for r in at:
            table.add_column(r["plan"], justify="right")
        for layer in sorted({idx for r in at for idx in r["layers"]}):
            cells = []
            for r in at:
                t = r["layers"].get(layer)
                cells.append("-" if t is None else
                             f"{t['estimate'] * 1e3:.0f}+{t['sparse'] * 1e3:.0f}+{t['dense'] * 1e3:.0f}"
                             f"={t['attention'] * 1e3:.0f} ({'-' if t['density'] is None else format(t['density'], '.2f')})")
            table.add_row(str(layer), *cells)
        table.add_row("rest of the model", *[f"{r['other_s'] * 1e3:.0f}" for r in at])
        console.print(table)


@bench_app.command("decode")
def bench_decode(
    kv_lens: str = typer.Option("16384,32768,65536"),
    budget: int = 2048,
    heads: str = typer.Option("32,8"),
    head_dim: int = 128,
    model: Optional[str] = typer.Option(None, help="also time end-to-end decode tokens/s of this model"),
    prompt_len: int = 16384,
    new_tokens: int = 32,
    cache: str = typer.Option("dynamic", help="end-to-end KV cache for dense and sparse alike: 'dynamic' "
                                               "(DynamicCache, copies K/V every step) or 'append' (AppendCache)"),
    plans: Optional[str] = typer.Option(None, help="with --model: time whole decode steps of these plans "
                                                   "(shipped names, presets, YAML files, or decode method names) "
                                                   "over synthetic caches of each --kv-lens and --batch"),
    batch: str = typer.Option("1", help="with --model --plans: batch sizes of the step benchmark"),
    padding: int = typer.Option(0, min=0, help="with --model --plans: left-pad the odd rows of each batch by "
                                                 "this many cached tokens (masked), as generate does for prompts "
                                                 "of different lengths"),
    json_out: Optional[str] = typer.Option(None, "--json", help="write all rows to this new JSON file"),
):
    """Dense vs each decode method: per-step attention time, bytes read; then tokens/s, or with
    --plans whole decode steps per cache length and batch (ratio, K/V bytes read, selection ms,
    attention's share of dense's step)."""
    from sparse_infer.bench.attention import bench_decode_attention, bench_decode_methods

    target = _json_target(json_out)
    plan_names = [p for p in (plans or "").split(",") if p.strip()]
    if plan_names:
        if not model:
            console.print("[red]error:[/red] --plans needs --model")
            raise typer.Exit(2)
        from sparse_infer.bench.decode import method_or_plan
        from sparse_infer.methods import DECODE_SELECTORS
        _check_bench_plans([p for p in plan_names if p not in DECODE_SELECTORS])
    hq, hkv = _ints(heads)
    rows = bench_decode_attention(kv_lens=_ints(kv_lens), budget=budget, heads=(hq, hkv), head_dim=head_dim)
    _table(rows, [c for c in ("kv_len", "budget", "dense_ms", "dense_grouped_ms", "sparse_ms", "ratio", "ratio_grouped",
                              "dense_kv_bytes", "sparse_kv_bytes") if c in rows[0]], f"decode attention, budget {budget}")
    methods = bench_decode_methods(kv_lens=_ints(kv_lens), budget=budget, heads=(hq, hkv), head_dim=head_dim)
    shown = [{**r, "reuse_rate": "-" if r["reuse_rate"] is None else f"{r['reuse_rate']:.2f}"} for r in methods]
    _table(shown, ["kv_len", "method", "dense_ms", "sparse_ms", "ratio", "bytes_read", "dense_bytes", "selected",
                   "reuse_rate", "note"],
           f"decode attention per method (decode_attention, growing cache, mean of "
           f"{methods[0]['steps'] if methods else 0} steps), budget {budget}")
    results = {"attention": rows, "methods": methods}
    if model and plan_names:
        import sparse_infer
        from sparse_infer.bench.decode import bench_decode_steps

        m, _ = sparse_infer.load_model(model)
        if padding >= min(_ints(kv_lens)):
            console.print(f"[red]error:[/red] --padding {padding} must be shorter than every --kv-lens")
            raise typer.Exit(2)
        steps = bench_decode_steps(m, _ints(kv_lens), _ints(batch),
                                   {name: method_or_plan(name, budget) for name in plan_names}, padding=padding)
        shown = [{**r, "attention_share": f"{r['attention_share']:.2f}", "kv_bytes": f"{r['kv_bytes'] / 2**20:.1f} MiB",
                  "decode_density": f"{r['decode_density']:.2f}"} for r in steps]
        _table(shown, ["kv_len", "batch", "plan", "step_ms", "ratio", "kv_bytes", "select_ms", "select_attend_ms",
                       "decode_density", "attention_share"],
               f"decode step, {model} (synthetic cache{f', odd rows padded by {padding}' if padding else ''})")
        results["steps"] = steps
    elif model:
        from sparse_infer.bench.decode import bench_decode_end_to_end, decode_method_plan
        from sparse_infer.methods import DECODE_SELECTORS
        # every registered selector that reads a token budget (streaming keeps a fixed window)
        plans = {m: decode_method_plan(m, budget) for m, selector in DECODE_SELECTORS.items()
                 if "budget" in selector.params}
        e2e = bench_decode_end_to_end(model, prompt_len, new_tokens, plans, cache=cache)["rows"]
        _table(e2e, list(e2e[0].keys()), f"end-to-end decode, {model}")
        results["end_to_end"] = e2e
    else:
        results["end_to_end"] = []
    _write_bench_json(target, results)


_mount_optional()


def main():
    app()


if __name__ == "__main__":
    main()
