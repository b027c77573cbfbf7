"""Pure-logic regression tests for issue 20 (no model): the sampler's per-row guard, the bounded event
channel, canonical layer numbers, the bounded GGUF header walk, trait-file skipping, JSON without NaN."""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time

import pytest
import torch

from api.services.completion_chat_frames import AxisView, axis_entry
from api.services.finite import dumps, finite
from infrastructure.engine.job import (
    EventChannel,
    GenerationJob,
    RowFinished,
    RowRequest,
    RowToken,
    SamplingParams,
    emit_all,
)
from infrastructure.engine.sampling import RowSampler, sample
from infrastructure.errors import InvalidRequestError
from infrastructure.steering.layers import layer_number
from infrastructure.storage.control_vectors import read_control_vector
from infrastructure.storage.gguf_layout import check_gguf_layout
from infrastructure.storage.traits import load_traits


def samplers(*temps: float) -> list[RowSampler]:
    return [RowSampler(SamplingParams(4, temperature=t, seed=1), 8, torch.device("cpu")) for t in temps]


@pytest.mark.parametrize("temps", [(0.0, 0.0, 0.0), (0.7, 0.7, 0.7), (0.0, 0.7, 1e-30)])
def test_a_row_with_non_finite_logits_fails_alone(temps):
    logits = torch.tensor([[0.0, 5.0, 1.0, 0, 0, 0, 0, 0]] * 3)
    logits[1, 2] = float("nan")
    tokens = sample(logits, samplers(*temps))
    assert tokens[1] is None
    assert tokens[0] is not None and tokens[2] is not None
    if temps[0] == 0.0:
        assert tokens[0] == 1  # the neighbours' choices are untouched


def test_rows_the_sampler_cannot_draw_from_fail_alone():
    logits = torch.zeros(3, 8)
    logits[0] = float("-inf")  # nothing to choose from
    logits[1, 3] = float("inf")
    logits[2, 5] = 9.0
    # a temperature that overflows logits / T (the schemas refuse it; the guard is the net under them)
    tokens = sample(logits, samplers(0.7, 0.7, 1e-45))
    assert tokens[0] is None and tokens[1] is None
    assert tokens[2] is None or tokens[2] == 5


def test_layer_numbers_have_one_spelling():
    assert [layer_number(s) for s in ("0", "7", "123456")] == [0, 7, 123456]
    for bad in ("01", "+1", "-1", " 1", "1 ", "١", "1_0", "9" * 5000, "", "1234567"):
        with pytest.raises(ValueError):
            layer_number(bad)


def test_event_channel_merges_a_stalled_rows_tokens():
    """A reader that does not read holds one token event per row (the latest text), not one per token."""

    async def scenario():
        channel = EventChannel()
        text = ""
        for i in range(2000):
            text += "word "
            channel.put(RowToken(row=0, token_id=i, delta="word ", text=text))
            channel.put(RowToken(row=1, token_id=i, delta="x", text="x" * (i + 1)))
        channel.put(RowFinished(row=1, text="x" * 2000, token_ids=[], finish_reason="length", prompt_tokens=1))
        assert len(channel) == 3  # row 0's token, row 1's token, row 1's end
        first, second, third = [await channel.get() for _ in range(3)]
        assert first.row == 0 and first.text == text and first.delta == text and first.token_id == 1999
        assert second.row == 1 and second.delta == "x" * 2000 and isinstance(third, RowFinished)
        channel.put(RowToken(row=0, token_id=7, delta="more", text=text + "more"))  # after a read: a new event
        again = await channel.get()
        assert again.delta == "more" and again.text.endswith("more")

    asyncio.run(scenario())


def test_unread_tokens_count_from_the_hand_over_not_the_delivery():
    """Back-pressure sees a token as unread from the moment the inference thread hands it to the event loop (before
    the loop has run the delivery), and no longer once the reader took it, merged events included."""

    async def scenario():
        job = GenerationJob([RowRequest((1, 2), SamplingParams(max_new_tokens=4))])
        job.bind(asyncio.get_running_loop())
        emit_all([(job, RowToken(row=0, token_id=i, delta="a", text="a" * (i + 1))) for i in range(3)])
        assert job.unread_tokens == 3  # not delivered yet: the loop has not run
        await asyncio.sleep(0)
        event = await job._queue.get()  # the three merged into one event
        assert event.delta == "aaa" and job.unread_tokens == 0
        job.emit(RowToken(row=0, token_id=3, delta="b", text="aaab"))
        assert job.unread_tokens == 1

    asyncio.run(scenario())


def gguf_header(kv: bytes, n_kv: int, n_tensors: int = 0, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv


def gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    "data, words",
    [
        # the adversarial pass's 2,400-byte file: an array of 1,000,000 uint8 declared
        (gguf_header(gguf_string("a") + struct.pack("<IIQ", 9, 0, 10**6) + b"\0" * 2350, 1), "at most 4096"),
        # a uint64 count the size of the universe
        (gguf_header(gguf_string("a") + struct.pack("<IIQ", 9, 8, 2**64 - 1), 1), "declares"),
        (gguf_header(b"", 2**63), "declares"),
        (gguf_header(struct.pack("<Q", 2**40) + b"x", 1), "declares"),  # a key longer than the file
        (gguf_header(gguf_string("a") + struct.pack("<I", 77), 1), "unknown type"),
        (gguf_header(gguf_string("a") + struct.pack("<IIQ", 9, 9, 1), 1), "nested arrays"),
        (gguf_header(b"", 0, version=1), "version 1"),
    ],
)
def test_gguf_counts_are_bounded_before_parsing(data, words):
    start = time.perf_counter()
    with pytest.raises(InvalidRequestError) as info:
        read_control_vector(data)
    assert time.perf_counter() - start < 0.5  # refused from the header, not after looping
    assert info.value.param == "file" and words in info.value.message, info.value.message


def test_gguf_layout_accepts_a_well_formed_control_vector(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "cv.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_float32("controlvector.weird", float("nan"))
    writer.add_array("controlvector.tags", ["a", "b"])
    writer.add_tensor("direction.1", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    check_gguf_layout(data)
    parsed = read_control_vector(data)
    assert list(parsed.vectors) == [1] and "controlvector.weird" not in parsed.metadata  # NaN metadata dropped
    json.dumps(parsed.metadata, allow_nan=False)
    with pytest.raises(InvalidRequestError, match="beyond the end"):
        check_gguf_layout(data[:-8])


def test_a_malformed_trait_file_is_skipped_and_reported_without_paths(tmp_path):
    good = {"trait_name": "ok", "model_name": "m", "vectors": {"1": [1.0, 0.0]}, "metadata": {}}
    files = {
        "ok.json": good,
        "list.json": [],
        "vectors-list.json": {"vectors": []},
        "meta-str.json": {**good, "trait_name": "m2", "metadata": "x"},
        "padded-key.json": {**good, "trait_name": "p", "vectors": {"01": [1.0, 0.0]}},
        "sub/name-int.json": {**good, "trait_name": 5},
    }
    for name, doc in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(doc))
    (tmp_path / "broken.json").write_text("{")
    store = load_traits(tmp_path, tmp_path, {"m"}, 2, 4)
    assert sorted(store.traits) == ["ok"]
    assert sorted(store.skipped) == sorted([*files.keys() - {"ok.json"}, "broken.json"])
    assert not any(str(tmp_path) in k or str(tmp_path) in v for k, v in store.skipped.items())


def test_non_finite_numbers_never_reach_the_wire():
    frame = {"a": [1.0, float("nan"), {"b": float("inf")}], "c": "NaN"}
    assert json.loads(dumps(frame)) == {"a": [1.0, None, {"b": None}], "c": "NaN"}
    assert finite(float("-inf")) is None and finite(2.5) == 2.5
    axis = AxisView("- Role-playing ↔️ + Assistant-like", lambda values: sum(values))
    entry = axis_entry("STEERED", axis, [[float("nan")], [1.0]], ["one", "two"])
    first, second = entry["turns"]
    assert first["pc_values"][axis.title] is None and first["non_finite"] is True
    assert second["pc_values"][axis.title] == 1.0 and "non_finite" not in second
    assert "NaN" not in dumps(entry) and not math.isnan(second["pc_values"][axis.title])
