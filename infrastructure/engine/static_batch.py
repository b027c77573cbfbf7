"""Static-shape decoding: the running batch's KV cache lives in preallocated slots, and each decode step
runs with fixed shapes, so on a single GPU it is captured once per shape as a CUDA graph and replayed.

Layout: keys/values per layer [capacity, kv_heads, length, head_dim]; rows occupy slots 0..n-1 and share
one write column `t` (the next token of every row lands there). Rows are left-aligned to `t`: a row
joining with a w-token (left-padded) prefill occupies columns [t-w, t), and `valid` [capacity, length]
says which columns each row attends to. When `t` reaches the end, columns no row uses are dropped
(shift left); when a prefill is wider than `t`, the running rows shift right. Leaving rows are replaced
by rows from the tail, so only moved rows are copied.

A step's shape is (batch bucket b ≥ n, length bucket Lb > t, steering layout). Steering stays inside the
captured region: for each layout (which sites add, how many caps and captures) the step reads per-row
tables held in fixed buffers, refilled in place when the batch changes. The hooks that apply them are
registered only while a graph is captured (or, without graphs, for one eager forward) and removed at
once: the replayed graph carries the steering kernels, the model carries no hook of ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from infrastructure.engine.batch import run_forward
from infrastructure.steering.hooks import BatchSteering, SiteTable
from infrastructure.steering.sites import decoder_layers

log = logging.getLogger(__name__)

Layout = tuple[tuple[int, bool, int, int, int], ...]  # (site, adds, caps, captures, orthos) per site


class _SlotLayer(CacheLayerMixin):
    """One layer's slice of the static cache: writes the step's keys/values at the shared column."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return int(self.keys.shape[2]), 0

    def get_seq_length(self) -> int:
        return int(self.keys.shape[2])

    def get_max_length(self) -> int:
        return int(self.keys.shape[2])


@dataclass
class _Step:
    """Everything one (b, Lb, layout) step reads and writes; `graph` is None when replay is eager."""

    cache: Cache
    mask: torch.Tensor  # [b,1,1,Lb] view of `valid`
    state: BatchSteering
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


def decode_mode(requested: str, loaded) -> str:
    """Resolve DECODE_MODE: `auto` is the paged engine; `dynamic`, `static` and `graphs` are the legacy
    padded-batch modes (kept for comparison; `graphs` needs the model on one CUDA device)."""
    if requested == "auto":
        return "paged"
    if requested == "graphs" and loaded.device.type != "cuda":
        raise ValueError("DECODE_MODE=graphs needs a CUDA device")
    return requested


def buckets(limit: int, start: int, grow) -> list[int]:
    out, size = [], start
    while size < limit:
        out.append(size)
        size = grow(size)
    return [*out, limit]


def layout_of(steering: BatchSteering) -> Layout:
    tables = sorted(steering.tables.items())
    return tuple((site, t.add is not None, len(t.caps), len(t.captures), len(t.orthos)) for site, t in tables)


class StaticBatch:
    def __init__(self, model: torch.nn.Module, capacity: int, length: int, graphs: bool) -> None:
        config = model.config.get_text_config()
        kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        dtype = model.get_input_embeddings().weight.dtype
        self.model, self.capacity, self.length, self.graphs = model, capacity, length, graphs
        self.hidden_size = int(config.hidden_size)
        self.table_dtype = dtype if dtype.is_floating_point else torch.float32
        devices = [next(layer.parameters()).device for layer in decoder_layers(model)]
        self.device = devices[0]
        shape = (capacity, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.columns = {d: torch.zeros(1, dtype=torch.long, device=d) for d in set(devices)}
        self._layer_devices = devices
        self.valid = torch.zeros(capacity, length, dtype=torch.bool, device=self.device)
        self.valid[:, 0] = True  # idle slots attend to one (finite) column, never to nothing
        self.tokens = torch.zeros(capacity, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(capacity, 1, dtype=torch.long, device=self.device)
        self.steer_mask = torch.zeros(capacity, 1, dtype=torch.bool, device=self.device)
        self.n = 0
        self.t = 0
        # layout upkeep (tests and stats): shifts right, compactions, rows moved into holes, rows gone mid-step
        self.moves = {"shifts": 0, "compactions": 0, "moved_rows": 0, "left_in_flight": 0}
        self.batch_buckets = buckets(capacity, 1, lambda s: s * 2 if s < 8 else s + 8)
        self.length_buckets = buckets(length, 256, lambda s: s * 2)
        self._tables: dict[Layout, dict[int, SiteTable]] = {}
        self._steps: dict[tuple[int, int, Layout], _Step] = {}
        self._filled: BatchSteering | None = None
        self._flight: tuple[torch.Tensor, dict] | None = None  # a launched step's outputs, not yet collected
        self._order: list[int] = []  # for each current row, its slot when that step was launched
        self._pool = torch.cuda.graph_pool_handle() if graphs else None

    @property
    def size(self) -> int:
        return self.n

    @property
    def next_token(self) -> torch.Tensor:
        return self.tokens[: self.n, 0]

    @next_token.setter
    def next_token(self, tokens: torch.Tensor) -> None:
        self.tokens[: self.n, 0].copy_(tokens)

    def clear(self) -> None:
        with torch.inference_mode():  # also called as the engine thread exits
            self.valid.zero_()
            self.valid[:, 0] = True
        self.n, self.t, self._filled, self._flight = 0, 0, None, None

    # ---- rows join and leave ----

    def merge(self, cache, attention: torch.Tensor, next_position: torch.Tensor, next_token: torch.Tensor) -> None:
        """Copy freshly prefilled rows (a DynamicCache [k, heads, w, d] and mask [k, w]) into slots n..n+k-1."""
        k, w = attention.shape
        assert self._flight is None, "collect the launched step before rows join"
        if self.n == 0:
            self.t = w
        elif self.t < w:
            self._shift(w - self.t)
        lo, hi, t = self.n, self.n + k, self.t
        for i, layer in enumerate(cache.layers):
            self.keys[i][lo:hi, :, t - w : t].copy_(layer.keys)
            self.values[i][lo:hi, :, t - w : t].copy_(layer.values)
        self.valid[lo:hi] = False
        self.valid[lo:hi, t - w : t] = attention.to(self.device).bool()
        self.positions[lo:hi, 0] = next_position
        self.tokens[lo:hi, 0] = next_token
        self.n = hi
        self._filled = None

    def select(self, keep: list[int]) -> list[int]:
        """Keep the rows at `keep`; returns their new slot order (tail rows fill the holes left by leavers)."""
        m = len(keep)
        if m == 0:
            self.clear()
            return []
        kept = set(keep)
        holes = [s for s in range(m) if s not in kept]
        movers = [s for s in range(m, self.n) if s in kept]
        order = list(range(self.n))
        if holes:
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            for keys, values in zip(self.keys, self.values):
                d, s = dst.to(keys.device), src.to(keys.device)
                keys[d, :, : self.t] = keys[s, :, : self.t]
                values[d, :, : self.t] = values[s, :, : self.t]
            for buf in (self.valid, self.positions, self.tokens):
                buf[dst] = buf[src]
            for h, s in zip(holes, movers):
                order[h] = s
            self.moves["moved_rows"] += len(holes)
        self.valid[m : self.n] = False
        self.valid[m : self.n, 0] = True
        self.n = m
        self._filled = None
        if self._flight is not None:
            self._order = [self._order[i] for i in order[:m]]
            self.moves["left_in_flight"] += 1
        return order[:m]

    def _shift(self, d: int) -> None:
        """Move the running rows' columns [0, t) right by d (a prefill wider than t is joining)."""
        n, t = self.n, self.t
        for keys, values in zip(self.keys, self.values):
            keys[:n, :, d : d + t] = keys[:n, :, :t].clone()
            values[:n, :, d : d + t] = values[:n, :, :t].clone()
        self.valid[:n, d : d + t] = self.valid[:n, :t].clone()
        self.valid[:n, :d] = False
        self.t = t + d
        self.moves["shifts"] += 1

    def _compact(self) -> None:
        """Drop the leading columns no running row attends to (the write column reached the end)."""
        n, t = self.n, self.t
        used = self.valid[:n, :t].any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else t
        if start == 0:
            raise RuntimeError(f"a row outgrew the static cache ({self.length} columns)")
        for keys, values in zip(self.keys, self.values):
            keys[:n, :, : t - start] = keys[:n, :, start:t].clone()
            values[:n, :, : t - start] = values[:n, :, start:t].clone()
        self.valid[:n, : t - start] = self.valid[:n, start:t].clone()
        self.valid[:n, t - start :] = False
        self.t = t - start
        self.moves["compactions"] += 1

    # ---- one decode step ----

    @property
    def in_flight(self) -> bool:
        return self._flight is not None

    def collect(self) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]:
        """The launched step's float logits [n, V] and captures, in the rows' current slot order (rows that
        left since the launch are dropped; their slots' outputs are simply not read)."""
        logits, captured = self._flight
        self._flight = None
        if self._order == list(range(logits.shape[0])):
            return logits, captured
        index = torch.tensor(self._order, device=logits.device)
        return logits[index], {key: value[index.to(value.device)] for key, value in captured.items()}

    def launch(self, model: torch.nn.Module, steering: BatchSteering) -> None:
        """Queue one decode step for rows 0..n-1 (inputs already in place); `collect` returns its outputs."""
        if self.t >= self.length:
            self._compact()
        n, t = self.n, self.t
        b = next(s for s in self.batch_buckets if s >= n)
        span = next(s for s in self.length_buckets if s > t)
        layout = layout_of(steering)
        self.valid[:n, t] = True
        for column in self.columns.values():
            column.fill_(t)
        if self._filled is not steering:
            self._fill_tables(layout, steering)
            self._filled = steering
        if steering.mask is not None:
            self.steer_mask[:n].copy_(steering.mask)
        step = self._steps.get((b, span, layout))
        if step is None:
            step = self._steps[(b, span, layout)] = self._make_step(b, span, layout)
        if step.graph is not None:
            step.graph.replay()
            logits = step.logits
        else:
            logits = self._run(model, step)
        self._flight = (logits[:n], {key: value[:n] for key, value in step.state.captured.items()})
        self._order = list(range(n))
        self.t = t + 1
        self.positions[:n] += 1

    def _run(self, model: torch.nn.Module, step: _Step) -> torch.Tensor:
        b = step.mask.shape[0]
        step.state.set_mask(step.state.mask)
        return run_forward(model, step.state, self.tokens[:b], step.mask, self.positions[:b], step.cache)

    def _make_step(self, b: int, span: int, layout: Layout) -> _Step:
        layers = [
            _SlotLayer(k[:b, :, :span], v[:b, :, :span], self.columns[d])
            for k, v, d in zip(self.keys, self.values, self._layer_devices)
        ]
        tables = {
            site: SiteTable(
                add=t.add[:b] if t.add is not None else None,
                caps=[(u[:b], tau[:b]) for u, tau in t.caps],
                captures=[c[:b] for c in t.captures],
                orthos=[(u[:b], keep[:b]) for u, keep in t.orthos],
            )
            for site, t in self._tables[layout].items()
        }
        state = BatchSteering(tables=tables, mask=self.steer_mask[:b])
        step = _Step(cache=Cache(layers=layers), mask=self.valid[:b, None, None, :span], state=state)
        if self.graphs:
            self._capture(step)
        return step

    def _capture(self, step: _Step) -> None:
        """Warm the shape up on a side stream, then capture it (inputs already hold this step's values,
        so the warm-up's cache writes are the ones the step makes anyway)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(self.model, step)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step.logits = self._run(self.model, step)
        step.graph = graph
        log.info("captured decode graph: batch %d, length %d", step.mask.shape[0], step.mask.shape[-1])

    def _fill_tables(self, layout: Layout, steering: BatchSteering) -> None:
        """Copy the batch's per-row tables into the layout's fixed buffers (rows beyond n: zero, a no-op)."""
        static = self._tables.get(layout)
        if static is None:
            static = self._tables[layout] = self._new_tables(steering)
        n = self.n
        for site, table in steering.tables.items():
            fixed = static[site]
            if fixed.add is not None:
                fixed.add.zero_()[:n].copy_(table.add)
            for (u, tau), (u_now, tau_now) in zip(fixed.caps + fixed.orthos, table.caps + table.orthos):
                u.zero_()[:n].copy_(u_now)
                tau.zero_()[:n].copy_(tau_now)
            for direction, now in zip(fixed.captures, table.captures):
                direction.zero_()[:n].copy_(now)

    def _new_tables(self, steering: BatchSteering) -> dict[int, SiteTable]:
        cap, hidden = self.capacity, self.hidden_size

        def zeros(like: torch.Tensor, last: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(cap, 1, last, dtype=dtype, device=like.device)

        return {
            site: SiteTable(
                add=zeros(t.add, hidden, self.table_dtype) if t.add is not None else None,
                caps=[(zeros(u, hidden, self.table_dtype), zeros(tau, 1, self.table_dtype)) for u, tau in t.caps],
                captures=[zeros(c, hidden, torch.float32) for c in t.captures],
                orthos=[(zeros(u, hidden, self.table_dtype), zeros(k, 1, self.table_dtype)) for u, k in t.orthos],
            )
            for site, t in steering.tables.items()
        }
