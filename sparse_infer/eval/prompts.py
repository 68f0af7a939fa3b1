"""Prompts as the model sees them: chat template, answer prefix, and token counts.

Task generation sizes prompts with these and the runner encodes them with these, so a prompt's
counted length is exactly what generate() is given.
"""

from __future__ import annotations

from typing import Any


def _add_special_tokens(tokenizer: Any, text: str) -> bool:
    # A chat template usually writes the BOS itself; adding another would
    # shift every position by one and make the count disagree with generate().
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=_add_special_tokens(tokenizer, text))["input_ids"])


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(encode(tokenizer, text))


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, task_text: str, answer_prefix: str, chat_template: bool | None = None) -> str:
    """Wrap the task in the chat template (if any) and append the answer prefix.

    The prefix goes after the assistant turn's start, as RULER does, so the
    model continues the answer instead of deciding whether to answer.
    """
    use_chat = has_chat_template(tokenizer) if chat_template is None else chat_template
    if use_chat:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": task_text}], tokenize=False, add_generation_prompt=True
        )
        return head + answer_prefix.lstrip()
    return task_text + answer_prefix
