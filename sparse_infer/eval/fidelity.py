"""Teacher-forced fidelity of a plan: how far its next-token distributions are from dense.

Answer accuracy (RULER, needle) needs hundreds of samples per task to tell a plan
within a point of dense from one a point below. A paired, teacher-forced measure
decides in minutes: run each prompt once dense and once under the plan, and compare
the next-token distributions position by position:

- KL(dense || plan) in nats per position, over the last `window` positions of the
  prompt and over the positions that predict a gold answer's tokens;
- top-1 agreement (the plan's most likely next token is dense's);
- the change in the gold answer's log-probability (summed over its tokens).

The same figures for the dense model run in bfloat16 are the noise floor: a plan no
further from dense fp32 than a dtype change is as faithful as users already accept.
A plan passes when its answer KL is at most `KL_FACTOR` times the floor's and its
top-1 agreement is at most `TOP1_POINTS` points below the floor's.

Prompts come in two kinds: ``prose`` (long natural text, every position scored)
and ``ruler`` (a RULER task with its gold answer appended, whose answer tokens are
scored apart). Only the scored positions go through the LM head (`logits_to_keep`),
so a 32K prompt never materialises a (32K x vocabulary) logits tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_infer.eval import _text
from sparse_infer.eval.outputs import check_writable_dir, locked_dir, write_json
from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.prompts import encode
from sparse_infer.eval.results import plan_fingerprint, weights_fingerprint
from sparse_infer.eval.ruler.catalogue import resolve_tasks
from sparse_infer.eval.ruler.generate import generate_task

FIDELITY_FILE = "fidelity.json"
FORMAT_VERSION = 1
KL_FACTOR = 2.0
TOP1_POINTS = 1.0
PROMPT_KINDS = ("prose", "ruler")
# tasks whose answers are copied from the context: the tokens sparse attention can lose
DEFAULT_RULER_TASKS = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt")


@dataclass
class FidelityPrompt:
    id: str
    kind: str
    length: int
    input_ids: list[int]
    answer_positions: list[int] = field(default_factory=list)   # positions whose next token is the answer's

    def sha(self) -> str:
        return hashlib.sha256(json.dumps(self.input_ids).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def prose_prompt(tokenizer: Any, length: int, index: int, seed: int = 0) -> FidelityPrompt:
    """`length` tokens of running prose, starting at a seeded offset in the offline essay text."""
    words = _text.essay_words()
    rng = random.Random(f"fidelity-prose/{seed}/{length}/{index}")
    start = rng.randrange(len(words))
    ids: list[int] = []
    chunk = max(256, length)        # words per encode call; about 1.3 tokens a word
    pos = start
    while len(ids) < length:
        piece = [words[(pos + i) % len(words)] for i in range(chunk)]
        pos += chunk
        ids.extend(encode(tokenizer, (" " if ids else "") + " ".join(piece)))
    return FidelityPrompt(id=f"prose/{length}/{index}", kind="prose", length=length, input_ids=ids[:length])


def ruler_prompt(tokenizer: Any, task: str, length: int, index: int, seed: int = 0) -> FidelityPrompt:
    """A RULER prompt of about `length` tokens followed by its gold answer (teacher-forced)."""
    sample = generate_task(tokenizer, task, length, index, seed)
    prompt_ids = encode(tokenizer, sample["input"])
    answer_text = " " + ", ".join(sample["answers"])
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise EvalError(f"{task} @ {length}: the gold answer encodes to no tokens")
    ids = prompt_ids + list(answer_ids)
    # logits at position p predict token p + 1: the answer's tokens are predicted from
    # the last prompt position up to the one before the last answer token
    positions = list(range(len(prompt_ids) - 1, len(ids) - 1))
    return FidelityPrompt(id=f"{task}/{length}/{index}", kind="ruler", length=length, input_ids=ids,
                          answer_positions=positions)


def make_prompts(tokenizer: Any, lengths: Sequence[int], samples: int, kinds: Sequence[str] = PROMPT_KINDS,
                 tasks: Sequence[str] = DEFAULT_RULER_TASKS, seed: int = 0) -> list[FidelityPrompt]:
    """`samples` prompts per length and kind; RULER prompts cycle through `tasks`."""
    bad = [k for k in kinds if k not in PROMPT_KINDS]
    if bad:
        raise EvalError(f"unknown prompt kind {bad[0]!r}; expected {', '.join(PROMPT_KINDS)}")
    if samples < 1:
        raise EvalError(f"--samples must be at least 1, got {samples}")
    task_list = resolve_tasks(list(tasks))
    out = []
    for length in lengths:
        for kind in kinds:
            for i in range(samples):
                if kind == "prose":
                    out.append(prose_prompt(tokenizer, length, i, seed))
                else:
                    out.append(ruler_prompt(tokenizer, task_list[i % len(task_list)], length, i, seed))
    return out


# ---------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------


def scored_positions(prompt: FidelityPrompt, window: int) -> list[int]:
    """The last `window` positions that predict a prompt token, plus the answer positions (sorted)."""
    n = len(prompt.input_ids)
    context_end = prompt.answer_positions[0] if prompt.answer_positions else n - 1
    last = range(max(0, context_end - window), context_end)
    return sorted(set(last) | set(prompt.answer_positions))


@torch.no_grad()
def next_token_logprobs(model: Any, input_ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """log-softmax of the next-token logits at `positions`, in fp32: (len(positions), vocab)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    keep = torch.tensor(list(positions), dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def compare(reference: torch.Tensor, other: torch.Tensor, positions: Sequence[int],
            prompt: FidelityPrompt) -> dict[str, float | None]:
    """Per-sample figures of `other` against `reference` (both from next_token_logprobs)."""
    # float64: over a 150K vocabulary, fp32 rounding alone gives KLs of ~1e-7, the size of real differences
    ref64, oth64 = reference.double(), other.double()
    kl = (ref64.exp() * (ref64 - oth64)).sum(-1).clamp_min(0.0)   # (P,)
    agree = (reference.argmax(-1) == other.argmax(-1)).float()
    answer = set(prompt.answer_positions)
    is_answer = torch.tensor([p in answer for p in positions])
    context = ~is_answer
    out: dict[str, float | None] = {
        "kl": float(kl[context].mean()) if context.any() else None,
        "top1": 100.0 * float(agree[context].mean()) if context.any() else None,
        "answer_kl": None, "answer_top1": None, "answer_logprob_delta": None,
    }
    if is_answer.any():
        targets = torch.tensor([prompt.input_ids[p + 1] for p in positions if p in answer])
        ref_lp = reference[is_answer].gather(-1, targets[:, None]).sum()
        oth_lp = other[is_answer].gather(-1, targets[:, None]).sum()
        out.update(answer_kl=float(kl[is_answer].mean()), answer_top1=100.0 * float(agree[is_answer].mean()),
                   answer_logprob_delta=float(oth_lp - ref_lp))
    return out


@torch.no_grad()
def greedy_continuation(model: Any, input_ids: Sequence[int], tokens: int) -> list[int]:
    """`tokens` greedy next tokens of the model as it is (the reference continuation)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def decode_logprobs(model: Any, input_ids: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
    """Teacher-forced decode: prefill `input_ids`, then feed the continuation one token at a time
    (each step a q_len-1 decode call); log-softmax of each step's next-token logits, in fp32:
    (len(continuation) - 1, vocab), the distributions at positions len(input_ids) .. len - 2 + T."""
    from sparse_infer.cache import AppendCache

    device = next(model.parameters()).device
    cache = AppendCache(config=model.config)
    model(input_ids=torch.tensor([list(input_ids)], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    steps = []
    for token in continuation[:-1]:
        logits = model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True).logits[0, -1]
        steps.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.stack(steps)


def decode_only(plan: Any) -> Any:
    """The plan with its prefill section switched off (dense at every length): the decode
    figures then measure decode selection alone."""
    return dataclasses.replace(plan, prefill=dataclasses.replace(plan.prefill, min_len=1 << 62))


# ---------------------------------------------------------------------------
# Summary and gate
# ---------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def summarize(records: Sequence[Mapping[str, Any]], plan: str) -> list[dict[str, Any]]:
    """Per length: the plan's and the bf16 floor's mean figures and the gate verdict."""
    rows = []
    for length in sorted({int(r["length"]) for r in records}):
        at = [r for r in records if int(r["length"]) == length]
        row: dict[str, Any] = {"length": length, "samples": len(at), "plan": plan}
        for who in ("plan", "bf16"):
            for key in ("kl", "top1", "answer_kl", "answer_top1", "answer_logprob_delta"):
                row[f"{who}_{key}"] = _mean([(r.get(who) or {}).get(key) for r in at])
        for who in ("dense", "plan"):
            row[f"{who}_seconds"] = _mean([r.get(f"{who}_seconds") for r in at])
        row["density"] = _mean([r.get("density") for r in at])
        row["passes"] = gate(row)
        rows.append(row)
    return rows


def gate(row: Mapping[str, Any]) -> bool | None:
    """Answer KL within KL_FACTOR x the bf16 floor's and top-1 within TOP1_POINTS of the floor's.

    Without answer positions (prose only) the KL over the last positions stands in.
    None when the floor was not measured.
    """
    kl_key = "answer_kl" if row.get("plan_answer_kl") is not None else "kl"
    plan_kl, floor_kl = row.get(f"plan_{kl_key}"), row.get(f"bf16_{kl_key}")
    plan_top1, floor_top1 = row.get("plan_top1"), row.get("bf16_top1")
    if None in (plan_kl, floor_kl, plan_top1, floor_top1):
        return None
    return bool(plan_kl <= KL_FACTOR * floor_kl and plan_top1 >= floor_top1 - TOP1_POINTS)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(rows: Sequence[Mapping[str, Any]], title: str | None = None):
    """A rich table: per length, the plan's KL and agreement with the bf16 floor's in brackets,
    the answer's log-probability change, the speed-up of this run and the gate's verdict."""
    from rich.table import Table

    table = Table(title=title)
    for name in ("length", "n", "KL (floor)", "answer KL (floor)", "top-1 % (floor)", "answer logp Δ",
                 "speed-up", "density", "gate"):
        table.add_column(name, justify="right")
    for r in rows:
        speed = (r["dense_seconds"] / r["plan_seconds"]) if r.get("dense_seconds") and r.get("plan_seconds") else None
        verdict = {True: "pass", False: "FAIL", None: "no floor"}[r.get("passes")]
        table.add_row(
            str(r["length"]), str(r["samples"]),
            f"{_fmt(r.get('plan_kl'), '.2g')} ({_fmt(r.get('bf16_kl'), '.2g')})",
            f"{_fmt(r.get('plan_answer_kl'), '.2g')} ({_fmt(r.get('bf16_answer_kl'), '.2g')})",
            f"{_fmt(r.get('plan_top1'), '.1f')} ({_fmt(r.get('bf16_top1'), '.1f')})",
            _fmt(r.get("plan_answer_logprob_delta"), "+.2f"), _fmt(speed, ".2f"), _fmt(r.get("density"), ".2f"),
            verdict)
    return table


# ---------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------


class FloorCache:
    """bf16 floor figures per (weights, prompt, window), kept in one JSON file.

    bf16 runs ~4x slower than fp32 on CPUs without bf16 units, so the floor is
    measured once per model and prompt and reused by every plan compared later.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, Any] = {}
        if path is not None and path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}      # a damaged cache only costs a re-measure

    @staticmethod
    def key(fingerprint: str, prompt: FidelityPrompt, window: int | str) -> str:
        return f"{fingerprint[:16]}/{prompt.sha()}/{window}"

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # re-read so two runs sharing the cache keep each other's entries
            if self.path.exists():
                try:
                    self.entries = {**json.loads(self.path.read_text()), **self.entries}
                except (OSError, ValueError):
                    pass
            write_json(self.path, self.entries)


def bf16_copy(model: Any) -> Any:
    """The same weights in bfloat16, apart from `model` (converting in place would lose its fp32 weights)."""
    return copy.deepcopy(model).to(torch.bfloat16)


def floor_figures(model: Any, prompt: FidelityPrompt, positions: Sequence[int], reference: torch.Tensor,
                  cache: FloorCache, key: str, bf16_model: Any = None) -> tuple[dict, Any]:
    """The bf16 floor's figures for `prompt` (from `cache`, else measured and cached) and the bf16
    copy of the model, made only when needed and returned for reuse on the next prompt."""
    figures = cache.get(key)
    if figures is None:
        if bf16_model is None:
            bf16_model = bf16_copy(model)
        figures = compare(reference, next_token_logprobs(bf16_model, prompt.input_ids, positions), positions, prompt)
        cache.put(key, figures)
    return figures, bf16_model


def _plan_density(model: Any, phase: str = "prefill") -> float | None:
    import sparse_infer
    value = sparse_infer.get_stats(model).get(f"{phase}_density")
    return None if value is None else float(value)


def run_fidelity(
    model: Any,
    prompts: Sequence[FidelityPrompt],
    plan: Any,
    plan_name: str,
    out_dir: str | Path,
    *,
    window: int = 256,
    floor: bool = True,
    floor_cache: str | Path | None = None,
    dense_above: float | str = 1.0,
    decode_tokens: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Teacher-force every prompt dense (fp32), under `plan`, and (for the floor) dense in bf16.

    Writes `out_dir/fidelity.json` after each prompt (per-sample figures, summary) and
    returns the summary rows. With `resume`, prompts already recorded are skipped; the
    stored plan, weights and window must match. `dense_above=1.0` runs the plan as written;
    "auto" runs it as `patch` does by default. The model is left unpatched.

    decode_tokens: measure decode instead of prefill. Dense (fp32, unpatched) continues each
    prompt (a RULER prompt without its answer) by this many greedy tokens; the plan, with its
    prefill dense, then decodes that continuation teacher-forced one token per step, and its
    next-token distributions at the decode steps (decode_tokens - 1 of them) are compared with
    dense's over the same tokens; the bf16 floor is dense bf16 over the same tokens.
    """
    from sparse_infer.plan import load_plan

    if window < 1:
        raise EvalError(f"--window must be at least 1, got {window}")
    if decode_tokens and decode_tokens < 2:
        raise EvalError(f"--decode-tokens must be at least 2 (one decode step is scored per token after the first), "
                        f"got {decode_tokens}")
    loaded = load_plan(plan, model_config=model.config)
    out = Path(out_dir)
    path = out / FIDELITY_FILE
    header = {"version": FORMAT_VERSION, "weights_sha256": weights_fingerprint(model),
              "dtype": str(next(model.parameters()).dtype), "plan": plan_name, "plan_sha256": plan_fingerprint(loaded), "window": window, "dense_above": dense_above,
              "decode_tokens": decode_tokens}
    created = check_out(out, resume)
    try:
        with locked_dir(out):
            check_out(out, resume)        # again under the lock: another run may have written meanwhile
            return _run_locked(model, prompts, loaded, plan_name, path, header, window=window, floor=floor,
                               floor_cache=floor_cache, dense_above=dense_above, decode_tokens=decode_tokens,
                               resume=resume, progress=progress)
    finally:
        if created and not path.exists():
            try:
                out.rmdir()             # a refused or failed run leaves no empty directory behind
            except OSError:
                pass


def check_out(out: Path, resume: bool) -> bool:
    """Refuse, before any model work, an OUT that cannot be written or that holds results
    without `resume`. Returns whether OUT was created here."""
    created = check_writable_dir(out)
    path = out / FIDELITY_FILE
    if path.exists() and not resume:
        raise EvalError(f"{path} already holds results; add --resume to continue them (same weights, plan "
                        "and window), or choose another --out")
    return created


def _run_locked(model, prompts, loaded, plan_name, path, header, *, window, floor, floor_cache, dense_above,
                decode_tokens, resume, progress):
    import sparse_infer

    fingerprint = header["weights_sha256"]
    doc: dict[str, Any] = {**header, "records": [], "summary": []}
    if resume and path.exists():
        doc = json.loads(path.read_text())
        for key in ("weights_sha256", "dtype", "plan_sha256", "window", "dense_above", "decode_tokens"):
            if doc.get(key, 0 if key == "decode_tokens" else None) != header[key]:
                raise EvalError(f"--resume: {path} was run with another {key} ({doc.get(key)!r}, now "
                                f"{header[key]!r}); use another --out")
    shas = {p.id: p.sha() for p in prompts}
    for rec in doc["records"]:
        if rec["id"] in shas and rec.get("input_sha") != shas[rec["id"]]:
            raise EvalError(f"--resume: {path} holds a different prompt for {rec['id']} (other seed, tokenizer "
                            "or length); use another --out")
    done = {r["id"] for r in doc["records"]}
    pending = [p for p in prompts if p.id not in done]
    cache = FloorCache(Path(floor_cache) if floor_cache else None)
    bf16_model = None

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress)
    if sparse_infer.is_patched(model):
        sparse_infer.unpatch(model)      # the reference is the model's own attention
    try:
        with bar:
            task = bar.add_task("fidelity", total=len(pending))
            for prompt in pending:
                bar.update(task, description=f"{plan_name} {prompt.id}")
                scored = prompt
                if decode_tokens:
                    # the prompt without its gold answer, continued by dense: every scored
                    # position is a decode step, none an answer token
                    context = prompt.input_ids[:prompt.answer_positions[0] + 1] if prompt.answer_positions \
                        else prompt.input_ids
                    continuation = greedy_continuation(model, context, decode_tokens)
                    scored = dataclasses.replace(prompt, input_ids=list(context) + continuation, answer_positions=[])
                    positions = list(range(len(context), len(scored.input_ids) - 1))
                else:
                    positions = scored_positions(prompt, window)
                t0 = time.perf_counter()
                reference = next_token_logprobs(model, scored.input_ids, positions)
                dense_seconds = time.perf_counter() - t0
                sparse_infer.patch(model, decode_only(loaded) if decode_tokens else loaded, dense_above=dense_above)
                try:
                    sparse_infer.reset_stats(model)
                    t0 = time.perf_counter()
                    if decode_tokens:
                        planned = decode_logprobs(model, context, continuation)
                    else:
                        planned = next_token_logprobs(model, scored.input_ids, positions)
                    plan_seconds = time.perf_counter() - t0
                    density = _plan_density(model, "decode" if decode_tokens else "prefill")
                finally:
                    sparse_infer.unpatch(model)
                rec: dict[str, Any] = {
                    "id": prompt.id, "kind": prompt.kind, "length": prompt.length, "tokens": len(scored.input_ids),
                    "input_sha": prompt.sha(), "positions": len(positions),
                    "answer_positions": len(scored.answer_positions),
                    "plan": compare(reference, planned, positions, scored),
                    "dense_seconds": round(dense_seconds, 3), "plan_seconds": round(plan_seconds, 3),
                    "density": density,
                }
                if floor:
                    key = FloorCache.key(fingerprint, scored, f"decode{decode_tokens}" if decode_tokens else window)
                    rec["bf16"], bf16_model = floor_figures(model, scored, positions, reference, cache, key, bf16_model)
                doc["records"].append(rec)
                doc["summary"] = summarize(doc["records"], plan_name)
                write_json(path, doc)
                bar.advance(task)
    finally:
        del bf16_model
    doc["summary"] = summarize(doc["records"], plan_name)
    write_json(path, doc)
    return doc["summary"]
