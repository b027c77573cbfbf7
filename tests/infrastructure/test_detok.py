"""Incremental detokenisation on a byte-level tokenizer: deltas never split a UTF-8 character, join
to the whole decode, and special tokens produce no text."""

from __future__ import annotations

from infrastructure.engine.detok import Detokenizer

EOS = 256


class ByteTokenizer:
    """Token id = one byte (0..255), 256 = a special end token: decoding a partial multi-byte
    character gives U+FFFD, exactly the case the detokeniser must hold back."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        data = bytes(i for i in ids if i != EOS or not skip_special_tokens)
        return data.decode("utf-8", errors="replace")


def push_all(text: str) -> tuple[Detokenizer, list[str]]:
    detok = Detokenizer(ByteTokenizer())
    return detok, [detok.push(b) for b in text.encode()]


def test_ascii_gives_one_delta_per_token():
    detok, deltas = push_all("Paris.")
    assert deltas == list("Paris.") and detok.text == "Paris." == detok.final_text()


def test_multibyte_characters_are_held_until_complete():
    detok, deltas = push_all("é€😀")  # 2, 3 and 4 bytes
    assert deltas == ["", "é", "", "", "€", "", "", "", "😀"]
    assert "".join(deltas) == detok.text == detok.final_text() == "é€😀"
    assert all("\ufffd" not in d for d in deltas)


def test_special_tokens_add_no_text_and_ids_are_kept():
    detok = Detokenizer(ByteTokenizer())
    assert [detok.push(i) for i in (72, 105, EOS)] == ["H", "i", ""]
    assert detok.ids == [72, 105, EOS] and detok.final_text() == "Hi"


def test_fast_path_equals_transformers_decode(loaded_model):
    """The real tokenizer goes through the `tokenizers` backend directly (rust_decoder): the same deltas and
    text as transformers' own decode, special tokens and multi-byte characters included."""
    tokenizer = loaded_model.tokenizer
    ids = tokenizer("Hello, wörld! 😀 Ça va? 東京", add_special_tokens=False)["input_ids"]
    ids = [*ids[:4], tokenizer.eos_token_id, *ids[4:]]
    fast = Detokenizer(tokenizer)
    assert fast._rust is not None

    class Plain:  # transformers' decode, no backend attribute
        def decode(self, *args, **kwargs):
            return tokenizer.decode(*args, **kwargs)

    slow = Detokenizer(Plain())
    assert slow._rust is None
    assert [fast.push(i) for i in ids] == [slow.push(i) for i in ids]
    assert fast.text == slow.text == fast.final_text() == tokenizer.decode(ids, skip_special_tokens=True)
