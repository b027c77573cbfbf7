"""CUDA graphs for the paged engine's decode steps (every row feeds one token).

A decode step has a shape (rows bucket b, key/value length bucket L, steering layout). Its inputs live in
fixed buffers: token ids, positions, block-table slots and context lengths of up to `max_rows` rows,
and per-token steering tables (one zeroed buffer per tensor of the rows' `SiteTable`s, so a new op kind
needs nothing here). The captured region computes the attention layout from those inputs and the
device block tables, then runs the model with the steering hooks inside; hooks are registered only
while a graph is captured (the replay carries the steering kernels, the model carries no hook of ours).
Padding rows decode a dummy token into a scratch block that no real row reads. With the `flash` kernel, a
step whose longest row is long and whose rows fill the GPU gets its own graph that splits long rows' keys
into chunks (`split_keys.py`), so one long conversation does not hold up every decode step.

A shape is captured once it has been seen `min_seen` times (steady decoding), so transient shapes of a
changing batch run eagerly instead of each costing a capture.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
from collections import Counter
from dataclasses import dataclass, fields, is_dataclass

import torch

from infrastructure.engine.paged_attention import StepLayout
from infrastructure.engine.runner import ModelRunner, Work, decode_layout, map_tensors
from infrastructure.engine.split_keys import split_layout, worth_splitting
from infrastructure.engine.static_batch import buckets
from infrastructure.steering.hooks import BatchSteering, HookSet, SiteTable

log = logging.getLogger(__name__)


def leaves(obj) -> list[torch.Tensor]:
    """The tensors of a (dataclass / list / tuple / dict) structure, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for key in sorted(obj) for t in leaves(obj[key])]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in leaves(x)]
    if is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in fields(obj) for t in leaves(getattr(obj, f.name))]
    return []


def signature(obj):
    """The structure of steering tables (which tensors exist, their trailing shapes): one graph each."""
    if isinstance(obj, torch.Tensor):
        return ("t", tuple(obj.shape[1:]), obj.dtype, obj.device)
    if isinstance(obj, dict):
        return tuple((key, signature(obj[key])) for key in sorted(obj))
    if isinstance(obj, (list, tuple)):
        return tuple(signature(x) for x in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return tuple(signature(getattr(obj, f.name)) for f in fields(obj))
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor
    state: BatchSteering


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_rows: int, max_len: int, min_seen: int = 3) -> None:
        self.runner, self.max_rows, self.min_seen = runner, max_rows, min_seen
        device = runner.device
        self.inputs = torch.zeros(4, max_rows, dtype=torch.long, device=device)  # ids, positions, slots, lengths
        self.steer_mask = torch.zeros(1, max_rows, dtype=torch.bool, device=device)
        self.row_buckets = buckets(max_rows, 1, lambda s: s * 2 if s < 8 else s + 8)
        self.len_buckets = buckets(max(max_len, 512), 512, lambda s: s * 2)
        self._tables: dict[tuple, dict[int, SiteTable]] = {}
        self._filled: tuple | None = None
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: Counter = Counter()
        self._pool = torch.cuda.graph_pool_handle()
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count
        # key/value heads the split decision counts: under tensor parallelism every rank uses rank 0's, so all
        # ranks capture and replay the same steps (their collectives must line up), uneven shards included
        self.split_kv_heads = runner.pool.kv_heads
        # tensor parallelism: "thread_local", so the NCCL watchdog thread's event queries during a capture are
        # not refused (CUDA forbids them from any thread while a "global" capture runs)
        self.capture_error_mode = "global"
        # tensor parallelism: seconds after which a capture still running dumps every thread's stack to stderr
        # (the server's log), so a capture stuck in a collective shows where each rank stands
        self.capture_deadline_s: float | None = None
        self.captures = 0
        self.replays = 0

    def run(self, works: list[Work], row_tables: dict[int, SiteTable], rows_key: tuple, feed=None):
        """Replay (capturing first if due) the step's graph; None when this step should run eagerly. `feed`
        (overlap.Feed): the rows' input ids and token-dependent steering bits, on the device."""
        n = len(works)
        if any(len(w.tokens) != 1 or not w.wants_logits for w in works):
            return None
        b = next(s for s in self.row_buckets if s >= n)
        total = sum(w.position + 1 for w in works) + (b - n)  # padding rows read one slot each
        length = next((s for s in self.len_buckets if s >= total), None)
        if length is None:
            return None
        sig = signature(row_tables)
        longest = max(w.position + 1 for w in works)
        split = self.runner.kernel == "flash" and worth_splitting(b, longest, self.split_kv_heads, self.sms)
        key = (b, length, sig, split)
        self._seen[key] += 1
        if key not in self._graphs and self._seen[key] < self.min_seen:
            return None
        self.runner.sync_tables(works)
        pad = b - n
        host = [
            [w.tokens[0] for w in works] + [0] * pad,
            [w.position for w in works] + [0] * pad,
            [w.slot for w in works] + [self.runner.scratch_row] * pad,
            [w.position + 1 for w in works] + [1] * pad,
        ]
        self.inputs[:, :b].copy_(torch.tensor(host), non_blocking=True)
        bits = torch.tensor([[w.steer[0] for w in works] + [False] * pad])
        self.steer_mask[:, :b].copy_(bits, non_blocking=True)
        if feed is not None:
            self.inputs[0, :n].copy_(feed.tokens)
            if feed.check is not None:
                self.steer_mask[0, :n].copy_(feed.mask(self.steer_mask[0, :n]))
        static = self._static_tables(sig, row_tables)
        if self._filled != (sig, rows_key):
            for fixed, now in zip(leaves(static), leaves(row_tables)):
                fixed.zero_()
                fixed[:, :n].copy_(now.transpose(0, 1))
            self._filled = (sig, rows_key)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(b, length, static, split)
        entry.graph.replay()
        self.replays += 1
        captured = {k: v[0, :n] for k, v in entry.state.captured.items()}
        return entry.logits[:n], captured

    def capture_padding(self, b: int) -> None:
        """Capture the unsteered graph of rows bucket `b` at the shortest key bucket ahead of traffic (start-up
        warm-up: with COMPILE=on this is where the step's code is compiled), all rows padding."""
        key = (b, self.len_buckets[0], signature({}), False)
        if key in self._graphs:
            return
        host = [[0] * b, [0] * b, [self.runner.scratch_row] * b, [1] * b]
        self.inputs[:, :b].copy_(torch.tensor(host), non_blocking=True)
        self.steer_mask[:, :b].zero_()
        self._graphs[key] = self._capture(b, key[1], {}, False)

    def _static_tables(self, sig: tuple, row_tables: dict[int, SiteTable]) -> dict[int, SiteTable]:
        if sig not in self._tables:
            rows = self.max_rows

            def zeros(x: torch.Tensor) -> torch.Tensor:
                return torch.zeros((1, rows, *x.shape[2:]), dtype=x.dtype, device=x.device)

            self._tables[sig] = {site: map_tensors(t, zeros) for site, t in row_tables.items()}
        return self._tables[sig]

    def _forward(self, b: int, length: int, state: BatchSteering, split: bool = False) -> torch.Tensor:
        r = self.runner
        ids, positions, slots, lengths = (self.inputs[i, :b] for i in range(4))
        bs = r.block_size
        write = r.tables[slots, positions // bs] * bs + positions % bs
        layout = StepLayout(r.pool, write, [], True)
        if r.kernel in ("flash", "flash_paged"):  # keys beyond the last offset are padding the kernel never reads
            layout.max_q, layout.max_k = 1, length
            layout.cu_q = torch.arange(b + 1, device=r.device, dtype=torch.int32)
            layout.cu_k = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
            if r.kernel == "flash_paged":  # read in place: the rows' block tables, no gathered copy
                layout.block_table = r.tables[slots].to(torch.int32)
            else:
                layout.flat_kv, _ = decode_layout(r.tables, bs, slots, lengths, length, r.scratch_slot)
            if split:  # a long row: its keys in chunks, merged (flash-decoding)
                layout.split = split_layout(lengths, length, r.heads // r.pool.kv_heads)
        else:
            kv, mask = decode_layout(r.tables, bs, slots, lengths, length, r.scratch_slot)
            layout.decode_q, layout.decode_kv, layout.decode_mask = torch.arange(b, device=r.device), kv, mask
        with HookSet(r.model, state):
            out = r.model(
                input_ids=ids.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                attention_mask=r._dummy_mask,
                use_cache=False,
                logits_to_keep=0,
                persona_step=layout,
            )
        return out.logits[0].float()

    def _capture(self, b: int, length: int, static: dict[int, SiteTable], split: bool = False) -> _Graph:
        """Warm the shape up on a side stream, then capture it (the inputs already hold this step's values, so
        the warm-up's cache writes are the ones the step makes anyway)."""
        tables = {site: map_tensors(t, lambda x: x[:, :b]) for site, t in static.items()}
        state = BatchSteering(tables=tables, apply=self.runner.steer_fn)
        mask = self.steer_mask[:, :b] if state.steers else None
        device = self.runner.device
        if self.capture_deadline_s:
            faulthandler.dump_traceback_later(self.capture_deadline_s, file=sys.stderr)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    state.set_mask(mask)
                    self._forward(b, length, state, split)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            state.set_mask(mask)
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode=self.capture_error_mode):
                logits = self._forward(b, length, state, split)
        finally:
            if self.capture_deadline_s:
                faulthandler.cancel_dump_traceback_later()
        self.captures += 1
        log.info("captured paged decode graph: %d rows, %d key/value slots", b, length)
        return _Graph(graph, logits, state)
