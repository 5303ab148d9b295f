"""Chat templates: the one place prompts become model text."""

from __future__ import annotations

from typing import Any


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The model text of a conversation, ready for the assistant to speak. When the last message
    is the assistant's, the assistant's turn is left open and generation continues it (a
    reasoning prefix being completed): the template must not close that turn."""
    partial = bool(messages) and messages[-1]["role"] == "assistant"
    if getattr(tokenizer, "chat_template", None):
        if partial:
            return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No template at all: plain concatenation keeps base models usable.
    text = "\n\n".join(m["content"] for m in messages)
    return text if partial else text + "\n"


def count_prompt_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    return len(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
