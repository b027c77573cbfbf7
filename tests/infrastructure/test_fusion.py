"""Fused decoder layers (merged projections, fused layer forward) equal transformers' own, and the compiled
step never recompiles for a new steering vector. Model-free units on tiny random models; one engine test
on a second copy of the embedded model (CPU, fp32, greedy): token-identical rows for every steering method."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from infrastructure.engine import compiled_step
from infrastructure.engine.compiled_step import resolve_compile
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.fusion import fusable, fuse_model, is_fused
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.model_loader import LoadedModel, load_model
from infrastructure.steering.hooks import BatchSteering
from infrastructure.steering.spec import Capture, Positions, SteeringSpec, add_op, cap_op, ortho_op
from tests.helpers import chat_ids

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _tiny(cls, config_cls, **extra) -> nn.Module:
    torch.manual_seed(0)
    return cls(config_cls(**TINY, num_key_value_heads=2, **extra)).eval()


@pytest.mark.parametrize(
    "cls,config_cls,extra",
    [(LlamaForCausalLM, LlamaConfig, {}), (LlamaForCausalLM, LlamaConfig, {"attention_bias": True}),
     (Qwen2ForCausalLM, Qwen2Config, {})],
)  # fmt: skip
def test_fused_layers_give_the_same_logits_and_merge_the_projections(cls, config_cls, extra):
    model = _tiny(cls, config_cls, **extra)
    fused = copy.deepcopy(model)
    assert fuse_model(fused) == 2 and fuse_model(fused) == 2  # idempotent
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    assert attn.qkv_proj.weight.shape == (64 + 2 * 32, 64) and mlp.gate_up_proj.weight.shape == (256, 64)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_column_shards_are_merged_as_found():
    """Tensor parallelism shards q/k/v and gate/up by output columns first (half the heads here): the fused
    layer merges the local shards and equals the sharded layer's own forward."""
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner, name, keep in ((attn, "q_proj", 32), (attn, "k_proj", 16), (attn, "v_proj", 16)):
            old = getattr(owner, name)
            setattr(owner, name, nn.Linear(64, keep, bias=False))
            getattr(owner, name).weight.data = old.weight.data[:keep].clone()
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            setattr(mlp, name, nn.Linear(64, 64, bias=False))
            getattr(mlp, name).weight.data = old.weight.data[:64].clone()
        mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, :64].clone()
    for layer in model.model.layers:
        layer.self_attn.o_proj = _first_columns(layer.self_attn.o_proj, 32)
    fused = copy.deepcopy(model)
    assert fuse_model(fused) == 2
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


class _Product(nn.Module):
    """A projection that must run as itself (like tp_shard.RowParallelLinear: partial product, all-reduce):
    here its own product, then a count of its calls."""

    fused_as_module = True

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear, self.calls = linear, 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


def test_output_and_down_projections_that_run_as_modules_are_called_by_the_fused_layer():
    model = _tiny(LlamaForCausalLM, LlamaConfig, attention_bias=True)
    for layer in model.model.layers:
        layer.self_attn.o_proj, layer.mlp.down_proj = _Product(layer.self_attn.o_proj), _Product(layer.mlp.down_proj)
    fused = copy.deepcopy(model)
    assert fuse_model(fused) == 2
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    layer = fused.model.layers[0]
    assert layer.self_attn.o_proj.calls == layer.mlp.down_proj.calls == 1
    assert isinstance(layer.self_attn.qkv_proj, nn.Linear)
    plain = type("Plain", (_Product,), {"fused_as_module": False})  # any other module: the layer is left alone
    model.model.layers[0].mlp.down_proj = plain(nn.Linear(128, 64))
    assert not fusable(model.model.layers[0])


def _first_columns(linear: nn.Linear, n: int) -> nn.Linear:
    out = nn.Linear(n, linear.out_features, bias=False)
    out.weight.data = linear.weight.data[:, :n].clone()
    return out


def test_layers_that_do_not_fit_are_left_alone():
    model = _tiny(LlamaForCausalLM, LlamaConfig)

    class QuantLinear(nn.Linear):  # stands for AWQ/GPTQ/bnb modules: never merged
        pass

    layer = model.model.layers[0]
    q = layer.self_attn.q_proj
    layer.self_attn.q_proj = QuantLinear(q.in_features, q.out_features, bias=False)
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    assert not fusable(layer) and not fusable(model.model.layers[1])
    attn = model.model.layers[1].self_attn
    attn.forward = attn.forward  # an instance-level forward (what a wrapper installs): never bypassed
    assert not fusable(model.model.layers[1])
    del attn.forward
    assert fuse_model(model) == 0 and not is_fused(model)
    handle.remove()
    assert fuse_model(model) == 1


def test_compile_setting_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_compile("auto", cpu, False, "none") == "off"
    assert resolve_compile("auto", cuda, True, "none") == "on"
    assert resolve_compile("auto", cuda, True, "bnb-4bit") == "off"
    assert resolve_compile("auto", cuda, True, "awq") == resolve_compile("auto", cuda, True, "gptq") == "on"
    assert resolve_compile("auto", cuda, False, "none") == "off"
    assert resolve_compile("merge", cpu, False, "none") == "merge"
    with pytest.raises(ValueError):
        resolve_compile("yes", cpu, False, "none")


def _unit(seed: int, hidden: int) -> torch.Tensor:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


async def _rows(engine, rows):
    jobs = [GenerationJob([RowRequest(ids, SamplingParams(max_new_tokens=n, temperature=0.0), s, c)])
            for ids, n, s, c in rows]  # fmt: skip
    return [d for done in await asyncio.gather(*(engine.collect(j) for j in jobs)) for d in done]


def _steered_rows(tokenizer, hidden: int):
    ids = chat_ids(tokenizer, "Describe a walk by the sea in two sentences.")
    other = chat_ids(tokenizer, "Name three colours.")
    u = _unit(3, hidden)
    return [
        (ids, 12, None, ()),
        (ids, 12, SteeringSpec((add_op(10, _unit(1, hidden), 24.0),)), ()),
        (ids, 12, SteeringSpec((add_op(8, 16 * u, 1.0), cap_op(14, u, -0.5))), ()),
        (ids, 12, SteeringSpec((ortho_op(12, _unit(5, hidden), 6.0),), positions=Positions.RESPONSE), ()),
        (other, 12, SteeringSpec((add_op(-1, _unit(4, hidden), 3.0),), positions=Positions.PROMPT,
                                 steer_special_tokens=False), (Capture("axis", 15, u),)),
        (other, 12, None, (Capture("axis", 15, u),)),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fused_engine(settings):
    """A second copy of the embedded model, fused (COMPILE=merge): the session model stays untouched."""
    loaded = load_model(settings)
    engine = PersonaEngine(loaded, max_batch_size=8, compile="merge")
    engine.start()
    assert engine.wait_ready(120), engine.broken
    assert engine.compile_mode == "merge" and is_fused(loaded.model)
    yield engine
    engine.stop()


async def test_fused_engine_rows_equal_the_unfused_engine_for_every_steering_method(engine, fused_engine):
    rows = _steered_rows(engine.tokenizer, int(engine.model.config.hidden_size))
    want = await _rows(engine, rows)
    got = await _rows(fused_engine, rows)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert len({tuple(w.token_ids) for w in want[:4]}) == 4  # the steering changed every steered row
    for g, w in zip(got[4:], want[4:]):
        torch.testing.assert_close(torch.tensor(g.captures["axis"]), torch.tensor(w.captures["axis"]), atol=1e-4,
                                   rtol=1e-4)  # fmt: skip


def _counting_engine(loaded_model: LoadedModel, monkeypatch) -> tuple[PersonaEngine, list]:
    """A started COMPILE=on engine on a 3-layer random Llama, with a backend that only counts what dynamo
    compiles (its guards decide recompiles, whatever the backend)."""
    compiles: list = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    monkeypatch.setattr(compiled_step, "BACKEND", counting)
    torch.manual_seed(0)
    tok = loaded_model.tokenizer
    config = LlamaConfig(**(TINY | {"vocab_size": len(tok), "num_hidden_layers": 3}), num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    loaded = LoadedModel(model, tok, "tiny", "tiny", "random", torch.device("cpu"), ["cpu"], torch.float32, "none", 0)
    engine = PersonaEngine(loaded, max_batch_size=4, compile="on", prefix_caching=False)
    engine.start()
    assert engine.wait_ready(120), engine.broken
    return engine, compiles


async def test_a_new_vector_never_recompiles_the_step(settings, loaded_model: LoadedModel, monkeypatch):
    """COMPILE=on with a counting backend (dynamo's guards decide recompiles, whatever the backend): after
    one request per steering layout, new vectors, strengths and capture directions compile nothing. Each
    method sits at its own site, so however the rows share steps, every site's layout is one already seen."""
    engine, compiles = _counting_engine(loaded_model, monkeypatch)
    tok = loaded_model.tokenizer
    try:
        ids = chat_ids(tok, "Hello, who are you?")

        def batch(seed: int):
            return [(ids, 4, SteeringSpec((add_op(1, _unit(seed, 64), 2.0 + seed),)), ()),
                    (ids, 4, SteeringSpec((cap_op(0, _unit(seed + 50, 64), 0.1 * seed),)), ()),
                    (ids, 4, None, (Capture("axis", 2, _unit(seed + 90, 64)),))]  # fmt: skip

        first = await _rows(engine, batch(0))
        warm = len(compiles)
        assert warm > 0 and engine.compile_mode == "on"
        for seed in range(1, 7):
            again = await _rows(engine, batch(seed))
            assert len(again) == 3 and len(again[2].captures["axis"]) == len(ids) + 3
        assert len(compiles) == warm, f"{len(compiles) - warm} recompiles for new vectors"
        assert first[0].token_ids != again[0].token_ids or first[1].token_ids != again[1].token_ids
    finally:
        engine.stop()


async def test_start_up_compiles_every_layout_requests_use(loaded_model: LoadedModel, monkeypatch):
    """COMPILE=on, counting backend: once the engine is ready, requests of new prompt lengths with an add, a cap,
    an orthogonal decomposition, a capture alone and an add beside a capture compile nothing (the first steered
    request on an H200 used to compile the steering function while holding the GIL: ~0.5 s on the TTFT of a
    whole burst of requests)."""
    monkeypatch.setattr(compiled_step, "_STEERING", {})
    engine, compiles = _counting_engine(loaded_model, monkeypatch)
    tok = loaded_model.tokenizer
    try:
        ready = len(compiles)
        assert ready > 0 and engine.compile_mode == "on"
        u = _unit(7, 64)
        for question in ("Hello, who are you?", "Name three colours, then explain why the sky looks blue at noon."):
            ids = chat_ids(tok, question)  # one layout per site (a site mixing methods is a layout of its own)
            done = await _rows(
                engine,
                [
                    (ids, 3, SteeringSpec((add_op(1, u, 2.0),)), ()),
                    (ids, 3, SteeringSpec((cap_op(0, u, 0.1),)), ()),
                    (ids, 3, SteeringSpec((ortho_op(2, u, 3.0),)), ()),
                    (ids, 3, None, (Capture("axis", 1, u),)),
                    (ids, 3, SteeringSpec((add_op(1, u, 2.0),)), (Capture("axis", 1, u),)),
                ],
            )
            assert len(done) == 5
        assert len(compiles) == ready, f"{len(compiles) - ready} graphs compiled while serving"
    finally:
        engine.stop()


def test_the_decode_graphs_steering_inputs_hit_what_start_up_compiled():
    """A decode graph's steering inputs are slices of fixed [1, max_rows, ...] buffers, its position mask too
    (`BatchSteering.mask_for` of `steer_mask[:, :b]`): after `warm_steering` they compile nothing, at any rows
    bucket. On the H200 the mask kept the buffer's row stride (max_rows), failed a guard of the warmed graphs,
    and the first steered request compiled the steering function while serving (W1: ~0.4 s of stalls)."""
    compiles: list = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    hidden_size, max_rows = 64, 8
    steer = compiled_step.compiled_steering(counting)
    compiled_step.warm_steering(steer, hidden_size, torch.device("cpu"), torch.float32, max_rows)
    warm = len(compiles)
    assert warm > 0
    steer_mask = torch.zeros(1, max_rows, dtype=torch.bool)
    add, direction = torch.zeros(1, max_rows, hidden_size), torch.zeros(1, max_rows, hidden_size)
    for b in (1, 2, 4, 8):
        state = BatchSteering(tables={}, apply=steer)
        state.set_mask(steer_mask[:, :b])
        hidden = torch.randn(1, b, hidden_size)
        steer(hidden, state.mask_for(hidden), add[:, :b], [], [], [])
        steer(hidden, state.mask_for(hidden), add[:, :b], [], [], [direction[:, :b]])
    assert len(compiles) == warm, f"{len(compiles) - warm} graphs compiled for the decode graphs' layout"


async def test_a_machine_that_cannot_compile_serves_the_fused_layers_eagerly(loaded_model: LoadedModel, monkeypatch):
    """COMPILE=on where torch.compile fails (e.g. Triton finds no C compiler): one warning, the engine runs as
    COMPILE=merge and its rows equal the unfused model's."""

    def broken(gm, example_inputs):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(compiled_step, "BACKEND", broken)
    tok = loaded_model.tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(**(TINY | {"vocab_size": len(tok)}), num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    plain = copy.deepcopy(model)
    rows = [(chat_ids(tok, "Hi there"), 5, SteeringSpec((add_op(1, _unit(1, 64), 3.0),)), ())]
    got = {}
    for name, m, mode in (("on", model, "on"), ("off", plain, "off")):
        loaded = LoadedModel(m, tok, "tiny", "tiny", "random", torch.device("cpu"), ["cpu"], torch.float32, "none", 0)
        engine = PersonaEngine(loaded, max_batch_size=2, compile=mode)
        engine.start()
        assert engine.wait_ready(120), engine.broken
        try:
            got[name] = [r.token_ids for r in await _rows(engine, rows)]
            assert engine.compile_mode == ("merge" if mode == "on" else "off")
        finally:
            engine.stop()
    assert is_fused(model) and not is_fused(plain)
    assert got["on"] == got["off"]
