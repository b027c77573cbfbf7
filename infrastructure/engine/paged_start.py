"""The paged engine's start: KV pool size, attention kernel, fused/compiled layers, model runner and CUDA
graphs, then a warm-up step (and, with COMPILE=on, every rows bucket compiled and captured). Mixed into
PagedLoop, whose `_admit`/`_step`/`_reader_behind` the warm-up uses.
"""

from __future__ import annotations

import time

import torch

from infrastructure.engine.compiled_step import resolve_compile, set_up, warm_up
from infrastructure.engine.graphs import DecodeGraphs
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.engine.kv_cache import KVCacheManager
from infrastructure.engine.paged_attention import KVPool
from infrastructure.engine.runner import ModelRunner
from infrastructure.engine.scheduler import Scheduler


class PagedStart:
    warms_buckets = True  # capture every rows bucket at start (tensor parallelism: no, see TensorParallelEngine)

    def _kv_blocks(self) -> int:
        """Blocks in the pool: KV_CACHE_TOKENS when set; on CUDA, what the memory fraction leaves free
        after the weights (minus activation headroom); on the CPU, max_batch_size x min(context, 2048)."""
        per_token = KVPool.bytes_per_token(self.model, self._kv_dtype)
        if self.kv_cache_tokens:
            tokens = self.kv_cache_tokens
        elif self.loaded.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.loaded.device)
            headroom = 6 * 1024**3  # activations of a step, sampling, CUDA graphs' memory
            budget = free - (1 - self.gpu_memory_utilization) * total - headroom
            tokens = max(int(budget // per_token), self.block_size)
        else:
            tokens = self.max_batch_size * min(self.context_len, 2048)
        return max(1, tokens // self.block_size)

    def _kernel(self) -> str:
        """PAGED_ATTENTION: auto = flash (bf16/fp16 on CUDA), grouped SDPA (fp32 on CUDA), per-row SDPA (CPU)."""
        if self.attention != "auto":
            return self.attention
        if self.loaded.device.type != "cuda":
            return "rows"
        return "flash" if self._kv_dtype in (torch.bfloat16, torch.float16) else "grouped"

    @property
    def _kv_dtype(self) -> torch.dtype:
        return self._table_dtype

    @property
    def _one_gpu(self) -> bool:
        return self.loaded.device.type == "cuda" and len(set(self.loaded.devices)) == 1

    def _start_paged(self) -> None:
        mode = resolve_compile(self.compile, self.loaded.device, self._one_gpu, self.loaded.quantization)
        started = time.perf_counter()  # fused before the KV pool takes the free memory
        self.compile_mode, steer = set_up(self.model, mode, self._kv_dtype, self.max_batch_size, self.compile_cache_dir)
        self.warmup_seconds = time.perf_counter() - started
        blocks = self._kv_blocks()
        self.kv_bytes_per_token = KVPool.bytes_per_token(self.model, self._kv_dtype)
        self.attention_kernel = self._kernel()
        self.context_len = min(self.context_len, blocks * self.block_size)
        max_blocks = -(-self.context_len // self.block_size) + 1
        self._build_runner(blocks, max_blocks)
        self._runner.steer_fn = steer  # read when a step runs or a graph is captured
        self._kv = KVCacheManager(blocks, self.block_size, prefix_caching=self.prefix_caching)
        self._sched = Scheduler(self._kv, self.max_batch_size, self.step_tokens)
        self._sched.holds = self._reader_behind
        self._free_slots = list(range(self.max_batch_size - 1, -1, -1))
        self._live = []  # the PagedRows holding a slot
        self._ahead = None  # Launched: the next step, launched before this one's tokens were streamed
        self.ahead_launches = 0
        self.chained_launches = 0  # steps launched on the last one's device tokens (overlap.py)
        self._specials = None  # the special token ids on the device (overlap.Feed)
        self._seq_ids = 0
        self._tables_for: tuple[tuple[int, ...], dict] | None = None
        hello = tuple(self.tokenizer("Hello")["input_ids"]) or (self.pad_id,)
        prompts = []
        if self.loaded.device.type == "cuda":  # a full step first: kernels chosen, activation memory reserved
            full = min(self.step_tokens, self.context_len - 4)
            prompts.append((hello * (full // len(hello) + 1))[:full])
        if self.compile_mode == "on":  # another prompt length: the compiled layers become dynamic in it now, not
            n = 64 if self.step_tokens != 64 else 32  # at the first request (a compile: seconds, every stream waits);
            other = tuple(self.tokenizer("Warm up")["input_ids"]) or hello  # other tokens: no prefix-cache hit
            prompts.append((other * n)[: min(n, self.context_len - 4)])
        started = time.perf_counter()
        for ids in prompts or [hello]:
            self._admit([GenerationJob([RowRequest(ids, SamplingParams(max_new_tokens=2))])])
            while self._sched.has_work:
                self._step()
        self.warmup_seconds += time.perf_counter() - started
        # compile + capture every rows bucket now (COMPILE=on; 4-bit kernels: Triton JIT-compiles per rows class)
        compiled = self.compile_mode == "on" or self.loaded.quantization in ("awq", "gptq")
        if self._graphs is not None and self.warms_buckets and compiled:
            self.warmup_seconds += warm_up(self._graphs, self.max_batch_size)

    def _build_runner(self, blocks: int, max_blocks: int) -> None:
        """The model runner over `blocks` KV blocks, and CUDA graphs for its decode steps where they apply (one
        unquantised GPU). A tensor-parallel engine builds the same on every rank (`tensor_parallel.py`)."""
        self._runner = ModelRunner(
            self.model, blocks, self.block_size, self._kv_dtype, self.attention_kernel, self.max_batch_size, max_blocks
        )
        self._graphs = None
        # bitsandbytes cannot be captured; AWQ / GPTQ run gptqmodel's Triton kernels, which can (issue 15)
        if self.cuda_graphs and self._one_gpu and self.loaded.quantization in ("none", "awq", "gptq"):
            self._graphs = DecodeGraphs(self._runner, self.max_batch_size, blocks * self.block_size)
