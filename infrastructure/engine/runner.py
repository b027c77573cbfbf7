"""ModelRunner: turns a scheduled step into one ragged forward over the paged KV pool.

Input: for each row in the step, the tokens it feeds, their first position, its block table (and the
table slot it holds in the runner), its steering mask bits. The runner flattens the rows into one
sequence [1, T] (no padding) and builds the attention layout on the device from the block tables it
keeps there (only new table entries are uploaded): where each token's keys/values go, and which pool
slots each row reads. The rows' steering tables are expanded to one entry per token (generic over the
tensors of `SiteTable`, so a new op kind needs no change here) and applied by hooks registered for
exactly that forward. Steps where every row decodes one token can replay a CUDA graph (`graphs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from itertools import chain

import numpy as np
import torch

from infrastructure.engine.paged_attention import KVPool, Span, StepLayout, enable_paged_attention
from infrastructure.engine.prompt_scores import kept_rows
from infrastructure.steering.hooks import BatchSteering, HookSet, SiteTable


@dataclass
class Work:
    """One row's part of a step."""

    tokens: list[int]
    position: int  # position of tokens[0]
    table: list[int]  # the row's block table (covers position + len(tokens)); grows in place
    steer: list[bool]  # steering mask bit per token
    wants_logits: bool  # the step feeds this row's last token: it samples next
    slot: int = 0  # the row's block-table slot in the runner (held while it runs)
    score: bool = False  # keep the logits of every token (prompt scoring, `prompt_scores.py`)


def map_tensors(obj, fn):
    """Apply `fn` to every tensor inside a (dataclass / list / tuple) structure, keeping its shape."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn) for f in fields(obj) if f.init})
    return obj


def per_token(tables: dict[int, SiteTable], row_of_token: torch.Tensor) -> dict[int, SiteTable]:
    """Row tables [R,1,...] -> token tables [1,T,...]: token t reads its row's entry."""
    moved: dict[torch.device, torch.Tensor] = {}

    def gather(x: torch.Tensor) -> torch.Tensor:
        index = moved.setdefault(x.device, row_of_token.to(x.device))
        return x.index_select(0, index).transpose(0, 1)

    return {site: map_tensors(table, gather) for site, table in tables.items()}


def flat_inputs(works: list[Work], counts: list[int]) -> torch.Tensor:
    """[4, T] int64 on the host: the step's token ids, positions, table slots and row numbers, token by token.
    Built with numpy: a 64-row prefill of 8,192 tokens takes ≈ 1 ms instead of ≈ 10 ms of Python lists and
    `torch.tensor` (2-core CPU), on the inference thread before the step's forward can start."""
    flat = np.empty((4, sum(counts)), dtype=np.int64)
    flat[0] = list(chain.from_iterable(w.tokens for w in works))
    flat[1] = np.concatenate([np.arange(w.position, w.position + n) for w, n in zip(works, counts)])
    flat[2] = np.repeat([w.slot for w in works], counts)
    flat[3] = np.repeat(np.arange(len(works)), counts)
    return torch.from_numpy(flat)


def decode_layout(tables, block_size: int, d_slots, d_lens, length: int, scratch: int):
    """Flat key/value slots of decoding rows (row i reads positions 0..d_lens[i]-1 of table row d_slots[i]),
    padded to `length` with the (zeroed) `scratch` slot, and the mask [1,1,n,length] letting each row see
    its own entries only. Shapes depend on n and `length` alone, so a CUDA graph can hold it."""
    cum = d_lens.cumsum(0)
    t = torch.arange(length, device=d_lens.device)
    valid = t < cum[-1]
    row = torch.searchsorted(cum, t, right=True).clamp_max(d_lens.shape[0] - 1)
    p = torch.where(valid, t - (cum - d_lens)[row], 0)
    kv = torch.where(valid, tables[d_slots[row], p // block_size] * block_size + p % block_size, scratch)
    own = (row.unsqueeze(0) == torch.arange(d_lens.shape[0], device=t.device).unsqueeze(1)) & valid
    return kv, own.unsqueeze(0).unsqueeze(0)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        kernel: str,
        max_rows: int,
        max_blocks: int,
    ) -> None:
        enable_paged_attention(model)
        self.model, self.block_size, self.kernel = model, block_size, kernel  # rows | grouped | flash | flash_paged
        self.grouped = kernel == "grouped"
        self.device = model.get_input_embeddings().weight.device
        self.pool = KVPool(model, num_blocks + 1, block_size, dtype)  # + a scratch block for padding rows
        self.heads = int(model.config.get_text_config().num_attention_heads)
        self.scratch_row = max_rows  # a table row whose every entry is the scratch block
        self.scratch_slot = num_blocks * block_size
        for keys, values in zip(self.pool.keys, self.pool.values):  # padding reads it: finite, never NaN
            keys[self.scratch_slot :].zero_()
            values[self.scratch_slot :].zero_()
        self.tables = torch.full((max_rows + 1, max_blocks), num_blocks, dtype=torch.long, device=self.device)
        self._known: dict[int, int] = {}  # table slot -> entries already uploaded
        self._dummy_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self.steer_fn = None  # COMPILE=on: the compiled steering function (compiled_step.py); None: eager

    def forget(self, slot: int) -> None:
        """A row left its table slot: the next holder's entries are uploaded from the start."""
        self._known.pop(slot, None)

    def sync_tables(self, works: list[Work]) -> None:
        """Upload the block-table entries added since the last step (one small copy per step)."""
        rows, cols, vals = [], [], []
        for w in works:
            known = self._known.get(w.slot, 0)
            if known < len(w.table):
                rows += [w.slot] * (len(w.table) - known)
                cols += range(known, len(w.table))
                vals += w.table[known:]
                self._known[w.slot] = len(w.table)
        if vals:
            index = torch.tensor([rows, cols, vals], dtype=torch.long).to(self.device, non_blocking=True)
            self.tables[index[0], index[1]] = index[2]

    def layout(self, works: list[Work], pos: torch.Tensor, tok_slot: torch.Tensor) -> StepLayout:
        bs = self.block_size
        write = self.tables[tok_slot, pos // bs] * bs + pos % bs
        if self.kernel in ("flash", "flash_paged"):
            return self.flash_layout(works, write)
        spans, start, decoding = [], 0, []
        for i, w in enumerate(works):
            n = len(w.tokens)
            kv = None
            if not (self.grouped and n == 1):
                p = torch.arange(w.position + n, device=self.device)
                kv = self.tables[w.slot, p // bs] * bs + p % bs
            else:
                decoding.append(i)
            spans.append(Span(start, n, w.position, kv))
            start += n
        layout = StepLayout(self.pool, write, spans, self.grouped)
        if decoding:
            meta = [[spans[i].start for i in decoding], [works[i].slot for i in decoding]]
            meta.append([works[i].position + 1 for i in decoding])
            q, d_slots, d_lens = torch.tensor(meta).to(self.device, non_blocking=True)
            total = -(-sum(meta[2]) // 16) * 16  # padded (masked) to an aligned length for the attention kernels
            layout.decode_q = q
            layout.decode_kv, layout.decode_mask = decode_layout(
                self.tables, bs, d_slots, d_lens, total, self.scratch_slot
            )
        return layout

    def flash_layout(self, works: list[Work], write: torch.Tensor) -> StepLayout:
        """One packed key/value tensor for every row (its positions 0..position+count-1) and the offsets."""
        counts = [len(w.tokens) for w in works]
        lens = [w.position + n for w, n in zip(works, counts)]
        meta = torch.tensor([[w.slot for w in works], lens]).to(self.device, non_blocking=True)
        layout = StepLayout(self.pool, write, [], False)
        if self.kernel == "flash_paged":
            layout.block_table = self.tables[meta[0]].to(torch.int32)
        else:
            layout.flat_kv, _ = decode_layout(
                self.tables, self.block_size, meta[0], meta[1], sum(lens), self.scratch_slot
            )
        offsets = torch.tensor([[0, *counts], [0, *lens]], dtype=torch.int32).cumsum(1, dtype=torch.int32)
        layout.cu_q, layout.cu_k = offsets.to(self.device, non_blocking=True)
        layout.max_q, layout.max_k = max(counts), max(lens)
        return layout

    def execute(
        self, works: list[Work], row_tables: dict[int, SiteTable], feed=None
    ) -> tuple[torch.Tensor | None, dict[tuple[int, int], torch.Tensor]]:
        """Run one step eagerly. Returns float logits [k,V] of the works that want them (in order; None when
        no work does; a scoring work contributes a row per token, see `kept_rows`) and the captures
        {(site, slot): [T] float} over the step's flat tokens. `feed` (overlap.Feed): a chained decode step's
        input ids, one per row, and its token-dependent steering bits, on the device."""
        self.sync_tables(works)
        counts = [len(w.tokens) for w in works]
        keep = sum(counts)
        ids, positions, tok_slot, row_of_token = flat_inputs(works, counts).to(self.device, non_blocking=True)
        if feed is not None:
            ids = feed.tokens.to(self.device)
        ends, _ = kept_rows(counts, [w.score for w in works], [w.wants_logits for w in works])
        state = BatchSteering(tables=per_token(row_tables, row_of_token), apply=self.steer_fn)
        if state.steers:
            bits = np.fromiter(chain.from_iterable(w.steer for w in works), dtype=np.bool_, count=keep)
            mask = torch.from_numpy(bits).to(self.device, non_blocking=True)
            state.set_mask((mask if feed is None else feed.mask(mask)).reshape(1, -1))
        layout = self.layout(works, positions, tok_slot)
        keep_index = torch.tensor(ends or [keep - 1]).to(self.device, non_blocking=True)
        with HookSet(self.model, state):
            out = self.model(
                input_ids=ids.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                attention_mask=self._dummy_mask,
                use_cache=False,
                logits_to_keep=keep_index,
                persona_step=layout,
            )
        logits = out.logits[0].float() if ends else None
        return logits, {key: value[0] for key, value in state.captured.items()}
