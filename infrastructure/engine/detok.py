"""Incremental detokenisation: emit text deltas that never split a multi-byte character or a
word-piece whose spacing depends on its neighbours (decode a short window, diff against its prefix)."""

from __future__ import annotations

from typing import Any


def rust_decoder(tokenizer: Any):
    """The fast tokenizer's own `decode` (the `tokenizers` library), or None for other tokenizers. Without the
    clean-up of spaces, transformers' `decode` is exactly this call behind ~5 µs of argument conversion, paid
    twice per token per row on the inference thread (64 rows: about a millisecond a step)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - transformers' fast tokenizers need it
        return None
    return backend.decode if isinstance(backend, Tokenizer) else None


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._rust = rust_decoder(tokenizer)
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        if self._rust is not None:
            return self._rust(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def final_text(self) -> str:
        """The whole completion decoded at once (authoritative; equals the deltas joined)."""
        return self._decode(self.ids)
