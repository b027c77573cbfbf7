"""The serving benchmark's one markdown table, built from its JSON numbers."""

from __future__ import annotations

W2_RUNS = (
    ("w2_steered", "W2 {n} clients, distinct vectors", "≥ 3,000 (H100, 7B)"),
    ("w2_unsteered", "W2 {n} clients, no steering", ""),
    ("w2_one_at_a_time", "W2 {n} clients, one request at a time", ""),
)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def rows(n: dict) -> list[tuple[str, str, float | None, str]]:
    """(workload, metric, value, issue-5 target) for every line of the table."""
    w1 = n["w1"]
    out = [
        ("W1 one client, steered", "decode tokens/s", w1["decode_tokens_per_s"], "≥ 140 (H100, 7B)"),
        ("W1 one client, steered", "% of HBM roofline", w1["pct_roofline"], "≥ 70 % (H100, 7B)"),
    ]
    for key, label, target in W2_RUNS:
        r = n[key]
        name = label.format(n=r["requests"])
        out += [
            (name, "aggregate tokens/s", r["tokens_per_s"], target),
            (name, "TTFT p50 ms", r["ttft_p50_ms"], ""),
            (name, "TTFT p99 ms", r["ttft_p99_ms"], "≤ 1,000 (H100, 7B)" if key == "w2_steered" else ""),
            (name, "ITL p50 ms", r["itl_p50_ms"], ""),
            (name, "ITL p99 ms", r["itl_p99_ms"], ""),
        ]
        if "prefills" in r:  # where the time to first token went: arrivals at the engine, prefill batches
            out += [
                (name, "client send → engine p50 ms", r["to_engine_p50_ms"], ""),
                (name, "engine prefills", r["prefills"], ""),
                (name, "prefill ms, summed", r["prefill_ms_total"], ""),
                (name, "prefill end → client's first frame p50 ms", r["first_frame_after_prefill_p50_ms"], ""),
            ]
    if "w2_http_floor" in n:  # the same bodies against an app that answers at once: harness + HTTP + loopback
        floor = n["w2_http_floor"]
        name = f"W2 HTTP floor ({floor['requests']} clients, no model)"
        out += [
            (name, "client send → server p50 ms", floor["to_server_p50_ms"], ""),
            (name, "TTFT p99 ms", floor["ttft_p99_ms"], ""),
        ]
    steered, plain, seq = (n[k]["tokens_per_s"] for k in ("w2_steered", "w2_unsteered", "w2_one_at_a_time"))
    out += [
        ("W2 distinct vectors ÷ no steering", "throughput ratio", steered / plain, "≥ 0.9 (H100, 7B)"),
        ("W2 batched ÷ one at a time", "throughput ratio", steered / seq, "≥ 3 (CPU, 8 clients)"),
        ("W3 STEERED+DEFAULT ÷ DEFAULT only", "wall-time ratio", n["w3"]["ratio"], "≤ 1.15 (H100, 7B)"),
        (
            "W4 monitoring on ÷ off",
            "throughput ratio",
            n["w4_monitoring_on"]["tokens_per_s"] / n["w4_monitoring_off"]["tokens_per_s"],
            "≥ 0.95 (H100, 7B)",
        ),
    ]
    return out + mixed_rows(n) + kv_rows(n)


def mixed_rows(n: dict) -> list[tuple[str, str, float | None, str]]:
    """W5-W7 (issue 13): mixed lengths, one long context, a realistic arrival mix."""
    out = []
    w5, alone, w6, w7 = n["w5"], n["w6_alone"], n["w6_mixed"], n["w7"]
    name = f"W5 {w5['requests'] - 1} short + 1 × {n['w5_long']:,}-token prompt"
    out += [
        (name, "short rows' ITL p50 ÷ W2 ITL p50", w5.get("short_itl_ratio"), "≤ 1.2 (H200, 7B)"),
        (name, "short rows' TTFT p99 ms", w5.get("short_ttft_p99_ms"), "≤ 500 (H200, 7B)"),
        (name, "long row TTFT ms", w5["long_ttft_ms"], ""),
        (name, "aggregate tokens/s", w5["tokens_per_s"], ""),
    ]
    name = f"W6 one {n['w6_long']:,}-token prompt alone"
    out += [
        (name, "TTFT ms", alone["long_ttft_ms"], "≤ 3,000 (H200, 7B)"),
        (name, "decode tokens/s", alone["long_decode_tokens_per_s"], ""),
    ]
    name = f"W6 {n['w6_long']:,}-token prompt + {w6['requests'] - 1} short"
    out += [
        (name, "short rows' ITL p50 ÷ W2 ITL p50", w6.get("short_itl_ratio"), ""),
        (name, "short rows' TTFT p99 ms", w6.get("short_ttft_p99_ms"), ""),
        (name, "long row TTFT ms", w6["long_ttft_ms"], ""),
    ]
    name = f"W7 {w7['requests']} requests, Poisson {w7['rate_per_s']:g}/s"
    out += [(name, "aggregate tokens/s", w7["tokens_per_s"], "")]
    out += [(name, f"{m} ms", w7[f"{k}_ms"], "") for m, k in (("TTFT p50", "ttft_p50"), ("TTFT p99", "ttft_p99"))]
    out += [(name, f"{m} ms", w7[f"{k}_ms"], "") for m, k in (("ITL p50", "itl_p50"), ("ITL p99", "itl_p99"))]
    return out


def kv_rows(n: dict) -> list[tuple[str, str, float | None, str]]:
    """The paged KV cache during W2 (distinct vectors), when the engine is paged."""
    w2 = n["w2_steered"]
    if "kv_peak_blocks" not in w2:
        return []
    return [
        ("W2 KV cache", "blocks used × block size ÷ cached tokens, max", w2["kv_used_over_live_max"], "≤ 1.2"),
        ("W2 KV cache", "peak GB in use", w2["kv_peak_gb"], ""),
        ("W2 KV cache", "pool GB reserved", w2["kv_pool_gb"], ""),
    ]


def render_table(n: dict) -> str:
    """Markdown: a header line naming the setup, then | workload | metric | value | target |."""
    w1 = n["w1"]
    roof = f", roofline {w1['roofline_tokens_per_s']:.0f} tok/s" if w1.get("roofline_tokens_per_s") else ""
    head = (
        f"{n['date']} · {n['device']} · {n['model']} ({n['layers']} layers, {n['dtype']}) · "
        f"{n['clients']} clients × {n['prompt_tokens_mean']:.0f}-token prompts × {n['new_tokens']} new tokens"
        f" · weights {w1['weight_bytes'] / 1e9:.2f} GB{roof} · `{n['command']}`"
    )
    lines = [head, "", "| workload | metric | value | target (issues 5, 13) |", "|---|---|---:|---|"]
    lines += [f"| {w} | {m} | {_fmt(v)} | {t} |" for w, m, v, t in rows(n)]
    if "engine_warmup_s" in n:  # issue 14: the batched engine's start-up (compile + capture with COMPILE=on)
        lines.append(f"| start-up (COMPILE={n['compile']}) | engine warm-up s | {_fmt(n['engine_warmup_s'])} | ≤ 120 |")
    return "\n".join(lines)
