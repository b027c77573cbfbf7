"""Layer numbers as they appear in text (hook names, trait-file keys, tensor names, JSON keys).

One spelling per layer: ASCII digits, no sign, no leading zero, at most six digits. `"01"`, `"+1"`,
`"١"` (an Arabic-Indic one) or a 5,000-digit number are refused instead of silently becoming a layer
(or merging with another key that means the same layer, or overflowing int())."""

from __future__ import annotations

import re

LAYER_DIGITS = r"(?:0|[1-9][0-9]{0,5})"
_CANONICAL = re.compile(LAYER_DIGITS, re.ASCII)


def layer_number(text: object) -> int:
    """The layer a canonical decimal string names; ValueError for any other spelling."""
    if not isinstance(text, str) or _CANONICAL.fullmatch(text) is None:
        shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:37] + "..."
        raise ValueError(f"{shown} is not a layer number (ASCII digits, no sign or leading zero, at most 6 digits)")
    return int(text)
