"""Flash-decoding by hand (split_keys.py), checked on the CPU with a reference kernel that returns what
FlashAttention-2's varlen call returns (outputs per query token, log-sum-exp as [kv_heads, tokens])."""

from __future__ import annotations

import torch

from infrastructure.engine.split_keys import group_queries, merge, split_layout, worth_splitting

KV, G, D = 2, 3, 8


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q, cu_k) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq,KV,d], k/v [Tk,KV,d]: each sequence's queries see all its keys (empty: output 0, lse +inf)."""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"))
    for s in range(cu_q.shape[0] - 1):
        qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        if cu_k[s + 1] == cu_k[s]:
            continue
        scores = torch.einsum("qhd,khd->hqk", q[qs], k[ks]) / D**0.5
        out[qs] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks])
        lse[:, qs] = scores.logsumexp(-1)
    return out, lse


def _reference(q, k, v, lengths) -> torch.Tensor:
    rows, start = [], 0
    for i, n in enumerate(lengths):
        kk = k[start : start + n].repeat_interleave(G, dim=1)
        vv = v[start : start + n].repeat_interleave(G, dim=1)
        scores = torch.einsum("hd,khd->hk", q[i], kk) / D**0.5
        rows.append(torch.einsum("hk,khd->hd", scores.softmax(-1), vv))
        start += n
    return torch.stack(rows)


def test_split_rows_merge_to_full_attention_and_single_chunks_are_untouched():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 37, 3, 16]
    padded = 64  # keys beyond the rows are padding, as in a CUDA graph's bucket
    q = torch.randn(len(lengths), KV * G, D, generator=gen, dtype=torch.float32)
    k = torch.randn(padded, KV, D, generator=gen, dtype=torch.float32)
    v = torch.randn(padded, KV, D, generator=gen, dtype=torch.float32)
    split = split_layout(torch.tensor(lengths), padded, G, chunk=8)
    assert split.row.tolist()[:10] == [0, 1, 2, 2, 2, 2, 2, 3, 4, 4]  # 37 keys: five chunks of 8, 16: two
    assert set(split.row.tolist()[10:]) == {len(lengths)}  # padding chunks merge into a dummy row
    out, lse = _kernel(group_queries(q[split.q_index], KV), k, v, split.cu_q, split.cu_k)
    merged = merge(out, lse, split, KV * G)
    assert torch.allclose(merged, _reference(q, k, v, lengths), atol=1e-5)
    whole, _ = _kernel(group_queries(q, KV), k, v, torch.arange(6) * G, torch.tensor([0, 5, 6, 43, 46, 62]))
    whole = whole.view(5, G, KV, D).permute(0, 2, 1, 3).reshape(5, KV * G, D)
    for i in (0, 1, 3):  # one chunk each: exactly the kernel's output
        assert torch.equal(merged[i], whole[i])


def test_only_steps_with_a_long_row_and_enough_rows_to_fill_the_gpu_are_split():
    assert worth_splitting(rows=64, longest=6001, kv_heads=4, sms=132)
    assert not worth_splitting(rows=64, longest=384, kv_heads=4, sms=132)  # short rows: nothing to balance
    assert not worth_splitting(rows=1, longest=32001, kv_heads=4, sms=132)  # the kernel splits few rows itself
