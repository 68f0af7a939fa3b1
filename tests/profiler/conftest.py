"""Fixtures of the calibration tests: a tiny random Llama with a character tokenizer, and the
same saved as a model directory for the CLI (one of each per test module, which patches it)."""
import pytest

from tests.conftest import tiny_model
from tests.profiler.helpers import char_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", num_hidden_layers=3), char_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny[0].save_pretrained(d)
    tiny[1].save_pretrained(d)
    return d
