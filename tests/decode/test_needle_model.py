"""SmolLM2-135M finds a needle at 50 % depth of a ~4K-token prompt with every query-aware decode
method at a budget of ~25 % of the context, token for token like dense. Streaming (sink +
window, no query) is the control: the needle lies outside what it keeps, so it must miss."""
import copy

import pytest
import torch

import sparse_infer

NEEDLE = "The special magic number is 7364912."
QUESTION = ("\n\nQuestion: What is the special magic number mentioned in the text above? "
            "Answer: The special magic number is")
NEW_TOKENS = 8


def needle_prompt(tokenizer, words: int = 3200):
    from sparse_infer.eval._text import essay_words

    filler = essay_words()[:words]
    half = len(filler) // 2
    text = " ".join(filler[:half]) + " " + NEEDLE + " " + " ".join(filler[half:]) + QUESTION
    return tokenizer(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def greedy_from(model, cache, first_token, steps):
    token, out = first_token, [int(first_token)]
    for _ in range(steps - 1):
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
    return out


@pytest.mark.model
def test_needle_4k_every_method_at_quarter_budget(smollm2):
    from transformers import DynamicCache

    model, tok = smollm2
    ids = needle_prompt(tok)
    n = ids.shape[1]
    assert 3800 <= n <= 4600
    with torch.no_grad():                       # one dense prefill, shared by every method
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    dense = greedy_from(model, copy.deepcopy(cache), first, NEW_TOKENS)
    assert "7364912" in tok.decode(dense)

    budget = n // 4
    rules = {
        "token_select": {"method": "token_select", "budget": budget},
        "token_select_reuse": {"method": "token_select", "budget": budget, "reuse": 0.9},
        "double_sparsity": {"method": "double_sparsity", "channels": 16, "budget": budget},
        "quest": {"method": "quest", "page": 16, "budget": budget},
        "streaming": {"method": "streaming", "sink": 64, "local": budget},
    }
    answers = {}
    for name, rule in rules.items():
        plan = {"sparse_infer_plan": 1, "prefill": {"min_seq_len": 10**6},
                "decode": {"min_kv_len": 0, "default": rule}}
        sparse_infer.patch(model, plan)
        try:
            answers[name] = greedy_from(model, copy.deepcopy(cache), first, NEW_TOKENS)
            density = sparse_infer.get_stats(model)["decode_density"]
        finally:
            sparse_infer.unpatch(model)
        assert density < 0.3, (name, density)
    for name, tokens in answers.items():
        if name == "streaming":
            assert "7364912" not in tok.decode(tokens), "needle inside the streaming window: test not sparse"
        else:
            assert tokens == dense, (name, tok.decode(tokens), tok.decode(dense))
