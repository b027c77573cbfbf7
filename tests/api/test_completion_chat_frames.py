"""Pure frame building: cumulative outputs, the final frame, and assistant-axis turns from captures."""

from __future__ import annotations

from api.services.completion_chat_frames import (
    SNIPPET_CHARS,
    AxisView,
    ChatContext,
    assistant_axis,
    final_frame,
    frame,
    turn_projections,
)

MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke"},
]
CTX = ChatContext(messages=MESSAGES, prompt_text="<t>", types=["STEERED", "DEFAULT"])
AXIS = AxisView(title="axis", value=lambda p: sum(p) / len(p) - 1.0 if p else None)


def test_frame_is_cumulative_and_carries_prompt_and_messages():
    out = frame(CTX, ["Why", "Sure"])
    assert out["input"] == {"raw": "<t>", "chat_template": MESSAGES}
    assert [o["type"] for o in out["outputs"]] == ["STEERED", "DEFAULT"]
    assert out["outputs"][0]["raw"] == "<t>Why"
    assert out["outputs"][1]["chat_template"] == [*MESSAGES, {"role": "assistant", "content": "Sure"}]
    assert "assistant_axis" not in out


def test_turn_projections_split_prompt_spans_and_generated_positions():
    projections = [0, 1, 2, 3, 4, 5, 6, 7]  # 5 prompt positions, then 3 fed generated tokens
    assert turn_projections(projections, [(1, 3), None], prompt_len=5) == [[1, 2], [], [5, 6, 7]]


def test_assistant_axis_one_entry_per_type_one_turn_per_assistant_turn():
    long = "x" * 300
    entries = assistant_axis(CTX, AXIS, [(1, 3)], 5, [long, "ok"], [[0, 2, 4, 9, 9, 3], [0, 0, 0, 9, 9]])
    assert [e["type"] for e in entries] == ["STEERED", "DEFAULT"]
    steered = entries[0]
    assert steered["pc_titles"] == ["axis"]
    assert [t["pc_values"]["axis"] for t in steered["turns"]] == [2.0, 2.0]  # mean(2,4)-1, mean(3)-1
    assert steered["turns"][0]["snippet"] == "Hello! How can I help?"
    assert len(steered["turns"][1]["snippet"]) == SNIPPET_CHARS + 1 and steered["turns"][1]["snippet"].endswith("…")
    assert entries[1]["turns"][1]["pc_values"] == {"axis": None}  # no fed generated token: no value


def test_final_frame_with_axis_and_without():
    with_axis = final_frame(CTX, ["a", "b"], [{"type": "STEERED"}], None)
    assert with_axis["assistant_axis"] == [{"type": "STEERED"}]
    assert "assistant_axis_unavailable" not in with_axis
    without = final_frame(CTX, ["a", "b"], None, "no persona data")
    assert without["assistant_axis"] == [] and without["assistant_axis_unavailable"] == "no persona data"
    assert without["outputs"] == frame(CTX, ["a", "b"])["outputs"]


def test_logprobs_only_when_there_are_some_and_axis_can_be_turned_off():
    lp = [{"token": "a", "logprob": -0.1, "top_logprobs": [{"token": "a", "logprob": -0.1}]}]
    out = frame(CTX, ["a", "b"], [lp, []])["outputs"]
    assert out[0]["logprobs"] == lp and "logprobs" not in out[1]  # Neuronpedia omits an empty list
    assert set(final_frame(CTX, ["a", "b"], None, "x", with_axis=False)) == {"outputs", "input"}


def test_capped_rows_report_pre_and_post_cap_values():
    spans = [(3, 6)]
    generated = [0.0] * 10 + [5.0, 5.0]  # prompt 10 tokens, then the capped turn
    unsteered = [0.0] * 10 + [9.0, 7.0]
    entries = assistant_axis(CTX, AXIS, spans, 10, ["x", "y"], [generated, generated], [unsteered, None])
    capped, plain = entries[0]["turns"][-1], entries[1]["turns"][-1]
    assert capped["pc_values"] == {AXIS.title: 7.0} and capped["pc_values_post_cap"] == {AXIS.title: 4.0}
    assert plain["pc_values"] == {AXIS.title: 4.0} and "pc_values_post_cap" not in plain
