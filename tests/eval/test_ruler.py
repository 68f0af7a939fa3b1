"""RULER task generation, sizing, scoring and user data loading (no model needed)."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

import pytest

from sparse_infer.eval import _text, ruler
from sparse_infer.eval.errors import EvalError
from sparse_infer.eval.ruler.common_words import render_cwe


def n_tokens(tok, text):
    # Counted independently of ruler.count_tokens: the runner feeds exactly this.
    add = not text.startswith(tok.bos_token)
    return len(tok(text, add_special_tokens=add)["input_ids"])


@pytest.mark.parametrize("task", ruler.TASK_NAMES)
@pytest.mark.parametrize("length", [1024, 3000])
def test_prompt_holds_answers_and_hits_length(tokenizer, task, length):
    s = ruler.generate_task(tokenizer, task, length, index=0, seed=0)
    assert {"task", "length", "index", "input", "answers", "max_new_tokens"} <= set(s)
    assert (s["task"], s["length"], s["index"]) == (task, length, 0)
    assert s["answers"] and all(a in s["input"] for a in s["answers"])
    tokens = n_tokens(tokenizer, s["input"])
    assert s["tokens"] == tokens
    assert 0.99 * length <= tokens <= length


@pytest.mark.parametrize("task", ruler.TASK_NAMES)
def test_deterministic_by_seed(tokenizer, task):
    a = ruler.generate_task(tokenizer, task, 1024, 0, seed=0)
    b = ruler.generate_task(tokenizer, task, 1024, 0, seed=0)
    c = ruler.generate_task(tokenizer, task, 1024, 0, seed=1)
    d = ruler.generate_task(tokenizer, task, 1024, 1, seed=0)
    assert a == b
    assert c["input"] != a["input"] and c["answers"] != a["answers"]
    assert d["input"] != a["input"]


def test_long_prompt_within_one_percent(tokenizer):
    s = ruler.generate_task(tokenizer, "niah_multikey_3", 16384, 0)
    assert 0.99 * 16384 <= s["tokens"] <= 16384
    assert s["answers"][0] in s["input"]


def test_generate_samples_order_and_count(tokenizer):
    samples = ruler.generate_samples(tokenizer, "niah_single_1,vt", [512, 1024], 2, seed=3)
    assert [(s["length"], s["task"], s["index"]) for s in samples] == [
        (L, t, i) for L in (512, 1024) for t in ("niah_single_1", "vt") for i in range(2)
    ]
    assert len({s["id"] for s in samples}) == len(samples)
    assert all("_units" not in s for s in samples)


def test_max_new_tokens_and_metric_per_task(tokenizer):
    expected = {"niah_single_2": 128, "vt": 30, "cwe": 120, "fwe": 50}
    for task, n in expected.items():
        s = ruler.generate_task(tokenizer, task, 1024, 0)
        assert s["max_new_tokens"] == n
        assert s["metric"] == ruler.STRING_MATCH_ALL


def test_single_needle_templates(tokenizer):
    s = ruler.generate_task(tokenizer, "niah_single_1", 1024, 0)
    text = s["input"]
    assert text.startswith("A special magic number is hidden within the following text.")
    assert "The grass is green. The sky is blue." in text
    key = re.search(r"One of the special magic numbers for (\S+) is: (\d{7})\.", text)
    assert key and key.group(2) == s["answers"][0]
    assert text.endswith(
        f"What is the special magic number for {key.group(1)} mentioned in the provided text?"
        f" The special magic number for {key.group(1)} mentioned in the provided text is"
    )


def test_multi_needle_tasks(tokenizer):
    mv = ruler.generate_task(tokenizer, "niah_multivalue", 2048, 0)
    assert len(mv["answers"]) == 4 and len(set(mv["answers"])) == 4
    assert "What are all the special magic numbers for" in mv["input"]
    mq = ruler.generate_task(tokenizer, "niah_multiquery", 2048, 0)
    assert len(mq["answers"]) == 4
    assert re.search(r"for \S+, \S+, \S+, and \S+ mentioned in the provided text\?", mq["input"])
    mk = ruler.generate_task(tokenizer, "niah_multikey_1", 2048, 0)
    assert len(mk["answers"]) == 1 and mk["input"].count("One of the special magic numbers for") == 4
    uuid_re = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    s3 = ruler.generate_task(tokenizer, "niah_single_3", 2048, 0)
    assert re.fullmatch(uuid_re, s3["answers"][0])
    mk3 = ruler.generate_task(tokenizer, "niah_multikey_3", 2048, 0)
    # The haystack is distractor needles keyed by uuids; the queried one appears once.
    assert mk3["input"].count("One of the special magic uuids for") > 10
    query = re.search(rf"What is the special magic uuid for ({uuid_re}) mentioned", mk3["input"]).group(1)
    assert f"One of the special magic uuids for {query} is: {mk3['answers'][0]}." in mk3["input"]


def test_vt_chain(tokenizer):
    s = ruler.generate_task(tokenizer, "vt", 2048, 0)
    names = s["answers"]
    assert len(names) == ruler.VT_NUM_HOPS + 1 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    task_part = s["input"].split("\n\n", 2)[-1]  # after the solved example
    value = re.search(rf"VAR {names[0]} = (\d+)", task_part).group(1)
    positions = [task_part.index(f"VAR {names[j + 1]} = VAR {names[j]}") for j in range(len(names) - 1)]
    assert positions == sorted(positions)
    assert s["input"].endswith(f"5 variables are assigned the value {value}, they are: ")


def test_cwe_answers_are_the_most_common(tokenizer):
    s = ruler.generate_task(tokenizer, "cwe", 4096, 0)
    listing = s["input"][s["input"].rindex("Memorize the ones that appear most often.") :]
    listing = listing[: listing.index("Question:")]
    words = re.findall(r"\d+\. ([a-z]+)", listing)
    counts = Counter(words)
    assert len(s["answers"]) == 10
    least_common_answer = min(counts[a] for a in s["answers"])
    most_other = max(c for w, c in counts.items() if w not in s["answers"])
    assert least_common_answer >= 2 * most_other


def test_cwe_frequencies():
    assert ruler.cwe_frequencies(5000, 5000) == (30, 3)  # RULER's defaults when the list is long
    cw, ucw = ruler.cwe_frequencies(60, 1000)
    assert cw > ucw >= 1 and 10 * cw <= 60
    cw, ucw = ruler.cwe_frequencies(40000, 1000)  # small pool: contrast shrinks but stays 2x
    assert cw >= 2 * ucw and (40000 - 10 * cw) <= 1000 * ucw


def test_fwe_answers_are_the_most_frequent(tokenizer):
    s = ruler.generate_task(tokenizer, "fwe", 2048, 0)
    coded = s["input"].rsplit("Find the three most frequently appeared coded words.", 1)[1]
    coded = coded[: coded.index("Question:")]
    counts = Counter(re.findall(r"[a-z]{6}", coded))
    top3 = [w for w, _ in counts.most_common(3)]
    assert sorted(top3) == sorted(s["answers"])
    ranked = counts.most_common(4)
    assert ranked[2][1] > ranked[3][1]  # no tie for third place


def test_fwe_counts_follow_zipf():
    counts = ruler.fwe_counts(1000)
    assert sum(counts) == 1000
    assert counts[0] > counts[1] > counts[2] > counts[3]
    assert counts[0] == int(1000 / (3.141592653589793**2 / 6))


def test_chat_template_puts_prefix_after_assistant_start(chat_tokenizer):
    s = ruler.generate_task(chat_tokenizer, "niah_single_2", 1024, 0)
    assert s["input"].startswith("<s><|user|>\nA special magic number")
    head, tail = s["input"].split("<|assistant|>\n")
    assert tail.startswith("The special magic number for ") and tail.endswith("mentioned in the provided text is")
    assert 0.99 * 1024 <= n_tokens(chat_tokenizer, s["input"]) <= 1024
    # No second BOS: the template already wrote it.
    ids = chat_tokenizer(s["input"], add_special_tokens=False)["input_ids"]
    assert ids.count(chat_tokenizer.bos_token_id) == 1
    plain = ruler.generate_task(chat_tokenizer, "niah_single_2", 1024, 0, chat_template=False)
    assert "<|assistant|>" not in plain["input"]


def test_resolve_tasks():
    assert ruler.resolve_tasks("all") == list(ruler.TASK_NAMES)
    assert ruler.resolve_tasks("vt, cwe,vt") == ["vt", "cwe"]
    assert ruler.resolve_tasks(["fwe"]) == ["fwe"]
    with pytest.raises(EvalError, match=r"unknown task\(s\): niah_single_9.*valid: all, niah_single_1"):
        ruler.resolve_tasks("vt,niah_single_9")
    with pytest.raises(EvalError):
        ruler.resolve_tasks("")


def test_bad_task_name_in_generator(tokenizer):
    with pytest.raises(EvalError, match="unknown task"):
        ruler.generate_samples(tokenizer, "needles", [1024], 1)


def test_length_too_short(tokenizer):
    with pytest.raises(EvalError, match="fixed text alone"):
        ruler.generate_task(tokenizer, "cwe", 100, 0)
    # Just above the fixed text: room for a few list entries only, too few for a top 10.
    for length in range(300, 2000):
        prompt = ruler.format_prompt(tokenizer, *render_cwe(ruler.derive_seed(0, "cwe", length, 0), 0, 0)[:2])
        if length - ruler.count_tokens(tokenizer, prompt) >= 20:
            break
    with pytest.raises(EvalError, match="too short to hold the task"):
        ruler.generate_task(tokenizer, "cwe", length, 0)


# ---------------------------------------------------------------- scoring


def test_string_match_all():
    preds = ["The numbers are 123 and 456.", "only 123", "nothing"]
    refs = [["123", "456"], ["123", "456"], ["123"]]
    assert ruler.string_match_all(preds, refs) == pytest.approx((1 + 0.5 + 0) / 3 * 100)
    assert ruler.string_match_all(["ABCDE fghij"], [["abcde", "FGHIJ"]]) == 100.0  # case-insensitive
    assert ruler.string_match_all([], []) == 0.0


def test_string_match_part():
    preds = ["Paris, France", "London", "rome"]
    refs = [["Paris", "Lyon"], ["Berlin"], ["Rome", "Roma"]]
    assert ruler.string_match_part(preds, refs) == pytest.approx(2 / 3 * 100)


def test_score_sample_postprocess():
    assert ruler.postprocess("  1234\x00567 \n") == "1234\n567"
    assert ruler.score_sample(" 7364912.\n", ["7364912"]) == 100.0
    assert ruler.score_sample("736 4912", ["7364912"]) == 0.0
    assert ruler.score_sample("berlin", ["Paris", "Berlin"], ruler.STRING_MATCH_PART) == 100.0
    assert ruler.score_sample("berlin", ["Paris", "Berlin"], ruler.STRING_MATCH_ALL) == 50.0
    with pytest.raises(EvalError, match="unknown metric"):
        ruler.score_sample("x", ["x"], "exact")


# ---------------------------------------------------------------- user QA data


def test_load_user_tasks_jsonl(tmp_path, tokenizer):
    f = tmp_path / "qa.jsonl"
    rows = [
        {"input": "Q: capital of France?", "answers": ["Paris"]},
        {"input": "Q: 2+2?", "answers": "4", "answer_prefix": "Answer:", "max_new_tokens": 4},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = ruler.load_user_tasks(f, tokenizer, lengths=[1024, 4096])
    assert [s["answers"] for s in samples] == [["Paris"], ["4"]]
    assert samples[0]["task"] == "qa" and samples[0]["metric"] == ruler.STRING_MATCH_PART
    assert samples[0]["length"] == 1024 and samples[0]["tokens"] > 0
    assert samples[1]["input"].endswith("Q: 2+2? Answer:") and samples[1]["max_new_tokens"] == 4
    assert len(ruler.load_user_tasks(f, tokenizer, limit=1)) == 1


def test_load_user_tasks_json_forms(tmp_path):
    records = [{"input": "a", "answers": ["b"], "task": "my_qa"}]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}))
    for name in ("list.json", "wrapped.json"):
        (s,) = ruler.load_user_tasks(tmp_path / name)
        assert s["task"] == "my_qa" and s["input"] == "a" and s["answers"] == ["b"]


def test_load_user_tasks_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(EvalError, match="needs 'input' and 'answers'"):
        ruler.load_user_tasks(bad)
    with pytest.raises(EvalError, match="not found"):
        ruler.load_user_tasks(tmp_path / "missing.jsonl")
    with pytest.raises(EvalError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("input,answers\n")
        ruler.load_user_tasks(tmp_path / "x.csv")


def test_parquet_needs_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail as if not installed
    f = tmp_path / "qa.parquet"
    f.write_bytes(b"PAR1")
    with pytest.raises(EvalError, match="pip install datasets"):
        ruler.load_user_tasks(f)


def test_load_user_tasks_parquet(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    f = tmp_path / "qa.parquet"
    datasets.Dataset.from_list([{"input": "Where?", "answers": ["here", "there"]}]).to_parquet(str(f))
    (s,) = ruler.load_user_tasks(f, tokenizer)
    assert s["answers"] == ["here", "there"] and s["input"] == "Where?" and s["tokens"] > 0


def test_offline_text_sources():
    words = _text.essay_words()
    assert len(words) > 10_000 and words == _text.essay_words()
    vocab = _text.vocabulary()
    assert len(vocab) > 1000 and list(vocab) == sorted(set(vocab))
