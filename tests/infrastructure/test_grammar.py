"""Structured output in the engine: a row with a JSON-schema grammar produces JSON that follows it (greedy
and sampled, steered too) and stops when the grammar is complete, while its batch neighbours generate
exactly what they generate alone; the mask itself is unit-tested on tiny logits."""

from __future__ import annotations

import json

import pytest
import torch

from infrastructure.engine.grammar import Constraint, check_grammar, constrain, json_schema_grammar
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.errors import InvalidRequestError
from infrastructure.prompting import render_chat
from infrastructure.steering.spec import SteeringSpec, add_op

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


def test_mask_keeps_only_allowed_tokens(loaded_model):
    tok = loaded_model.tokenizer
    c = Constraint(json_schema_grammar(SCHEMA), tok)
    logits = torch.zeros(2, loaded_model.model.config.vocab_size + 7)
    out = constrain(logits, [None, c])
    assert torch.equal(out[0], logits[0])  # the unconstrained row is untouched
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).lstrip().startswith("{") for t in allowed)
    assert not torch.isfinite(out[1, -7:]).any()  # ids past the tokenizer's vocabulary never come


def test_bad_schema_is_refused_naming_the_field(loaded_model):
    bad = '{"grammars": [{"json_schema": {"type": "objectx"}}]}'
    with pytest.raises(InvalidRequestError) as info:
        check_grammar(bad, loaded_model.tokenizer, "response_format.json_schema.schema")
    assert info.value.param == "response_format.json_schema.schema"


async def test_constrained_rows_follow_the_schema_and_neighbours_are_unchanged(loaded_model, engine):
    tok = loaded_model.tokenizer
    ids = render_chat(tok, [{"role": "user", "content": "Describe Paris as JSON."}]).ids
    grammar = json_schema_grammar(SCHEMA)
    vector = torch.randn(loaded_model.hidden_size, generator=torch.Generator().manual_seed(3))
    steer = SteeringSpec((add_op(12, vector, 2.0),))
    free = RowRequest(ids, SamplingParams(max_new_tokens=12))
    rows = [
        RowRequest(ids, SamplingParams(max_new_tokens=60, grammar=grammar)),
        free,
        RowRequest(ids, SamplingParams(max_new_tokens=60, temperature=1.0, seed=5, grammar=grammar), steer),
    ]
    done = {d.row: d for d in await engine.collect(GenerationJob(rows))}
    (alone,) = await engine.collect(GenerationJob([free]))
    assert done[1].text == alone.text and done[1].token_ids == alone.token_ids
    for i in (0, 2):
        value = json.loads(done[i].text)
        assert set(value) == {"city", "population"} and isinstance(value["population"], int)
        assert done[i].finish_reason == "stop"
