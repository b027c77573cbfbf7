"""Optional LLM judge (any OpenAI-compatible chat endpoint) scoring how strongly an answer shows a trait."""

from __future__ import annotations

import re

import httpx

_PROMPT = (
    "Rate from 0 to 100 how strongly the ANSWER expresses this trait: {trait} ({description}).\n"
    "QUESTION: {question}\nANSWER: {answer}\nReply with the number only."
)


def judge_score(
    url: str,
    model: str,
    trait: str,
    description: str,
    question: str,
    answer: str,
    api_key: str | None = None,
    timeout: float = 60.0,
) -> float | None:
    """0-100 trait score from the judge, or None when its reply holds no number."""
    body = {
        "model": model,
        "temperature": 0,
        "max_tokens": 8,
        "messages": [
            {
                "role": "user",
                "content": _PROMPT.format(trait=trait, description=description, question=question, answer=answer),
            }
        ],
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reply = httpx.post(url.rstrip("/") + "/chat/completions", json=body, headers=headers, timeout=timeout)
    reply.raise_for_status()
    text = reply.json()["choices"][0]["message"]["content"] or ""
    match = re.search(r"\d+(\.\d+)?", text)
    return min(100.0, float(match.group())) if match else None


def keep_mask(scores: list[float | None], positive: bool, threshold: float = 50.0) -> list[bool]:
    """Positive answers must score >= threshold, negative ones below it; unscored answers are dropped."""
    return [s is not None and ((s >= threshold) if positive else (s < threshold)) for s in scores]
