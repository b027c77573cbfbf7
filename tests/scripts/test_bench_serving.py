"""scripts/bench_serving.py --smoke end to end: the real server, every workload, one table and its JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench_archs import ARCHS, arch_config
from scripts.bench_client import CHAT_ROUTE, percentile

ROOT = Path(__file__).resolve().parents[2]

EXPECTED_ROWS = [
    ("W1 one client, steered", "decode tokens/s"),
    ("W1 one client, steered", "% of HBM roofline"),
    *[
        (f"W2 3 clients, {kind}", metric)
        for kind in ("distinct vectors", "no steering", "one request at a time")
        for metric in (
            "aggregate tokens/s",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "ITL p50 ms",
            "ITL p99 ms",
            "client send → engine p50 ms",
            "engine prefills",
            "prefill ms, summed",
            "prefill end → client's first frame p50 ms",
        )
    ],
    ("W2 HTTP floor (3 clients, no model)", "client send → server p50 ms"),
    ("W2 HTTP floor (3 clients, no model)", "TTFT p99 ms"),
    ("W2 distinct vectors ÷ no steering", "throughput ratio"),
    ("W2 batched ÷ one at a time", "throughput ratio"),
    ("W3 STEERED+DEFAULT ÷ DEFAULT only", "wall-time ratio"),
    ("W4 monitoring on ÷ off", "throughput ratio"),
    *[
        ("W5 2 short + 1 × 96-token prompt", metric)
        for metric in ("short rows' ITL p50 ÷ W2 ITL p50", "short rows' TTFT p99 ms", "long row TTFT ms")
    ],
    ("W5 2 short + 1 × 96-token prompt", "aggregate tokens/s"),
    ("W6 one 160-token prompt alone", "TTFT ms"),
    ("W6 one 160-token prompt alone", "decode tokens/s"),
    *[
        ("W6 160-token prompt + 2 short", metric)
        for metric in ("short rows' ITL p50 ÷ W2 ITL p50", "short rows' TTFT p99 ms", "long row TTFT ms")
    ],
    *[
        ("W7 6 requests, Poisson 20/s", metric)
        for metric in ("aggregate tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms")
    ],
    ("W2 KV cache", "blocks used × block size ÷ cached tokens, max"),
    ("W2 KV cache", "peak GB in use"),
    ("W2 KV cache", "pool GB reserved"),
]


def chat_route_exists() -> bool:
    from app.factory import create_app
    from app.settings import Settings

    return CHAT_ROUTE in create_app(Settings()).openapi()["paths"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict]:
    if not chat_route_exists():
        pytest.skip(f"{CHAT_ROUTE} is not served yet")
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench_serving", "--smoke", "--device", "cpu", "--json", str(out)],
        cwd=ROOT,
        env=os.environ | {"MODEL_CACHE_DIR": str(ROOT / "data" / "models")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def table_rows(stdout: str) -> dict[tuple[str, str], str]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| W") and len(cells) == 4:
            rows[(cells[0], cells[1])] = cells[2]
    return rows


@pytest.mark.slow  # the smoke run
def test_table_has_every_row_with_a_positive_number(smoke):
    stdout, _ = smoke
    rows = table_rows(stdout)
    assert list(rows) == EXPECTED_ROWS
    for key, value in rows.items():
        if key == ("W1 one client, steered", "% of HBM roofline"):
            assert value == "n/a"  # no bandwidth to measure on the CPU
            continue
        assert re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?(e[-+]?[0-9]+)?", value), (key, value)
        assert float(value.replace(",", "")) > 0, key


@pytest.mark.slow  # the smoke run
def test_every_request_decoded_its_forced_length(smoke):
    _, numbers = smoke
    for name in ("w2_steered", "w2_unsteered", "w2_one_at_a_time", "w4_monitoring_off", "w4_monitoring_on"):
        run = numbers[name]
        assert run["requests"] == 3
        assert run["tokens"] == run["expected_tokens"] == 3 * numbers["new_tokens"], name
    assert numbers["w1"]["tokens"] == numbers["new_tokens"]
    floor = numbers["w2_http_floor"]  # the W2 bodies against an app that answers at once
    assert floor["requests"] == 3 and 0 < floor["to_server_p50_ms"] < floor["ttft_p99_ms"]
    for name in ("w5", "w6_alone", "w6_mixed", "w7"):
        run = numbers[name]
        assert run["tokens"] == run["expected_tokens"] > 0, name
    assert numbers["w5"]["long_prompt_tokens"] >= 96 and numbers["w6_alone"]["long_prompt_tokens"] >= 160
    assert numbers["w7"]["requests"] == 6 and numbers["w7"]["prompt_max"] == 120


@pytest.mark.slow  # the smoke run
def test_trace_accounts_for_every_request(smoke):
    _, numbers = smoke
    for name in ("w2_steered", "w2_unsteered", "w4_monitoring_off", "w4_monitoring_on"):
        run = numbers[name]
        assert sum(run["prefill_rows"]) == 3 and run["prefills"] == len(run["prefill_rows"]) >= 1, name
    assert numbers["w2_one_at_a_time"]["prefill_rows"] == [1, 1, 1]  # max_batch_size=1: one prefill per request


@pytest.mark.slow  # the smoke run
def test_paged_kv_use_is_close_to_the_live_tokens(smoke):
    _, numbers = smoke
    w2 = numbers["w2_steered"]
    assert 1.0 <= w2["kv_used_over_live_max"] <= 2.0  # 24-token prompts in 16-token blocks: at most one partly filled
    assert w2["kv_pool_gb"] > w2["kv_peak_gb"] > 0 and w2["preemptions"] == 0


@pytest.mark.slow  # the smoke run
def test_monitoring_rides_only_on_w4(smoke):
    _, numbers = smoke
    assert numbers["w4_monitoring_on"]["axis_frames"] == 3
    assert numbers["w2_steered"]["axis_frames"] == numbers["w4_monitoring_off"]["axis_frames"] == 0
    assert numbers["w3"]["ratio"] > 0 and numbers["w3"]["repeats"] == 1


@pytest.mark.slow  # the smoke run
def test_json_and_table_agree(smoke):
    stdout, numbers = smoke
    assert numbers["table"] in stdout
    assert numbers["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert numbers["w1"]["weight_bytes"] == 134_515_008 * 4  # SmolLM2-135M in fp32, tied embeddings once


def test_arch_configs_match_the_published_shapes():
    qwen7 = arch_config("qwen2.5-7b")
    assert (qwen7.hidden_size, qwen7.num_hidden_layers, qwen7.num_attention_heads) == (3584, 28, 28)
    assert (qwen7.num_key_value_heads, qwen7.intermediate_size, qwen7.vocab_size) == (4, 18944, 152064)
    assert not qwen7.tie_word_embeddings
    assert arch_config("qwen2.5-1.5b").tie_word_embeddings
    llama = arch_config("llama-3.3-70b", layers=4)
    assert (llama.hidden_size, llama.num_hidden_layers, llama.vocab_size) == (8192, 4, 128256)
    assert set(ARCHS) == {"qwen2.5-7b", "qwen2.5-1.5b", "qwen2.5-3b", "llama-3.3-70b"}


@pytest.mark.parametrize(
    ("arch", "billions"),
    [("qwen2.5-7b", 7.616), ("qwen2.5-1.5b", 1.544), ("qwen2.5-3b", 3.086), ("llama-3.3-70b", 70.554)],
)
def test_random_arch_has_the_published_parameter_count(arch, billions):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(arch_config(arch), dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=5e-4)


def test_nearest_rank_percentile():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
