"""Fixtures for the eval tests: a real BPE tokenizer trained in-process (no hub access)
and tiny random-weight Llama models sized to it. The `smollm2` fixture comes from
tests/conftest.py."""

from __future__ import annotations

import pytest
import torch


def _train_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sparse_infer.eval import _text

    text = " ".join(_text.essay_words())
    # Byte-level BPE like GPT-2/SmolLM2/Qwen: any text encodes, and a small
    # vocabulary makes token counts differ from word counts, as real ones do.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [text[i : i + 5000] for i in range(0, len(text), 5000)] + [_text.NOISE] * 20
    tok.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat_template:
        wrapped.chat_template = chat_template
    return wrapped


# A minimal chat format that, like Llama 3's, writes the BOS itself.
CHAT_TEMPLATE = (
    "<s>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    return _train_tokenizer(CHAT_TEMPLATE)


def make_tiny_llama(tokenizer, max_position_embeddings: int = 4096, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.architectures = ["LlamaForCausalLM"]  # plans are checked against it
    return model.eval()


@pytest.fixture
def tiny_llama(tokenizer):
    return make_tiny_llama(tokenizer)


@pytest.fixture
def sparse_plan(tiny_llama):
    """A vertical-slash plan that is really sparse at a few hundred tokens."""
    from sparse_infer.presets import preset

    plan = preset("vertical_slash", tiny_llama.config, min_seq_len=128, min_kv_len=128).to_dict()
    # Budgets far below the prompt length so the prefill really skips pairs;
    # given as a dict to exercise that plan form too.
    plan["prefill"]["default"]["vertical"] = {"frac": 0.02, "min": 8, "max": 16}
    plan["prefill"]["default"]["slash"] = {"frac": 0.02, "min": 8, "max": 16}
    plan["prefill"]["default"]["sink"] = 16
    plan["prefill"]["default"]["local"] = 16
    plan["prefill"]["block_size"] = 16     # 64-token blocks would cover most of a 512-token prompt
    return plan


class Loads(list):
    """The model specs the faked load_model was asked for; `seed` picks the weights it returns,
    `max_positions` its context."""

    seed = 0
    max_positions = 4096


@pytest.fixture
def fake_load(monkeypatch, tokenizer):
    """sparse_infer.load_model answering every spec with a tiny Llama (seeded by `.seed`)."""
    import sparse_infer

    loaded = Loads()

    def load_model(spec, dtype=None):
        loaded.append(spec)
        model = make_tiny_llama(tokenizer, max_position_embeddings=loaded.max_positions, seed=loaded.seed)
        return (model if dtype is None else model.to(dtype)), tokenizer

    monkeypatch.setattr(sparse_infer, "load_model", load_model, raising=False)
    return loaded


@pytest.fixture
def fast_generation(monkeypatch):
    """A canned answer for every prompt: the plumbing is under test, not the model."""
    from sparse_infer.eval import runner

    prompts = []

    def generate_one(model, tok, prompt, max_new_tokens):
        prompts.append(prompt)
        return "nothing useful", 2

    monkeypatch.setattr(runner, "generate_one", generate_one)
    return prompts
