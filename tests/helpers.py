"""Small helpers shared by tests."""

from __future__ import annotations


def chat_ids(tokenizer, question: str, system: str | None = None) -> tuple[int, ...]:
    """Prompt ids of a one-question chat, as the routes render it."""
    from infrastructure.prompting import render_chat

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return render_chat(tokenizer, messages).ids
