"""All configuration in one place: environment variables of both seeds, validated at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings; every field reads the environment variable of the same name (upper case)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", protected_namespaces=())

    # --- model (seed 002 names, then seed 000 names) ---
    model_name: str | None = Field(
        default=None,
        description="Weights to load: HF id (from MODEL_CACHE_DIR / HF cache), local folder or .gguf file. "
        "Unset: the embedded SmolLM2-135M-Instruct.",
    )
    model_id: str | None = Field(
        default=None, description="Logical model id (seed 000): names the persona data folder and /v1/models."
    )
    override_model_id: str | None = Field(
        default=None, description="Weights actually loaded (seed 000); wins over MODEL_NAME."
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    model_cache_dir: Path = Path("./data/models")
    quantization: Literal["none", "bnb-8bit", "bnb-4bit"] = Field(
        default="none",
        description="bitsandbytes on the fly for unquantised weights; AWQ / GPTQ checkpoints are detected from "
        "their config.json and need none.",
    )
    quant_kernel: Literal["auto", "gemlite", "triton", "torch", "marlin", "library"] = Field(
        default="auto",
        description="4-bit kernel of AWQ / GPTQ checkpoints: auto = GemLite on a GPU where it imports and takes "
        "the checkpoint (else gptqmodel's Triton), the library's pick (torch's int4 kernels) on the CPU; gemlite "
        "= repacked for GemLite (on the CPU: dequantised, for tests); marlin needs gptqmodel's compiled extension.",
    )
    gpu_memory_utilization: float = Field(default=0.95, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="GPUs (or CPU processes with DEVICE=cpu) that each hold a shard of every layer: one process "
        "per GPU, started by the server, all-reducing over NCCL (gloo on the CPU); needs DECODE_MODE=paged.",
    )
    layer_split_size: int = Field(
        default=1,
        ge=1,
        description="GPUs the layers are spread over in one process (accelerate's device_map='balanced'): one GPU "
        "works at a time, so it adds memory, not speed. For models whose shards do not suit tensor parallelism.",
    )
    tensor_parallel_graph_reduce: Literal["auto", "symm_mem", "nccl", "off"] = Field(
        default="auto",
        description="How tensor-parallel decode steps all-reduce on GPUs, and so whether they replay CUDA graphs: "
        "symm_mem = PyTorch symmetric memory over NVLink/P2P (graphs), nccl = NCCL captured in the graph, off = "
        "eager steps over NCCL; auto = symm_mem where it sets up, else off.",
    )
    tensor_parallel_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Seconds a tensor-parallel rank may wait for the others (start-up, every collective) before "
        "the engine is declared failed (/health 503).",
    )
    token_limit: int = Field(default=65536, ge=1, description="Max prompt tokens per request.")
    max_model_len: int = Field(default=65536, ge=2, description="Max prompt + completion tokens.")

    # --- data ---
    vectors_dir: Path = Path("./data/vectors")
    prompts_dir: Path = Path("./data/prompts")
    persona_data_path: Path = Path("./data/persona")
    persona_monitoring: bool = True

    # --- server ---
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1)
    secret: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SECRET", "secret"),
        description="Shared secret every route but /health requires (API_KEY is read when SECRET is blank).",
    )
    api_key: str | None = Field(default=None, validation_alias=AliasChoices("API_KEY", "api_key"), repr=False)
    admin_secret: str | None = Field(
        default=None,
        description="When set, registry writes (POST/DELETE /api/v1/vectors) need this secret instead of SECRET.",
    )
    forwarded_allow_ips: str = Field(
        default="",
        description="Comma-separated proxy addresses whose X-Forwarded-For / X-Forwarded-Proto are trusted "
        "(uvicorn's forwarded_allow_ips); empty: forwarded headers are ignored, the peer address is the client.",
    )
    cors_origins: list[str] = Field(default_factory=list)
    webhook_hosts: str = Field(
        default="",
        description="Comma-separated host names a RunPod-style `webhook` may point at (the server POSTs results "
        "there); empty: requests with a webhook are refused, so no client can make the server call arbitrary URLs.",
    )
    # RunPod (runpod_worker.py): jobs one queue worker runs at once (0: as many as the batch holds, two rows
    # each), and the load-balancing health port RunPod sets (unset: PORT)
    runpod_concurrency: int = Field(default=0, ge=0)
    port_health: int | None = Field(default=None, ge=1, le=65535)

    # --- generation defaults (seed 002) ---
    max_tokens: int = Field(default=200, ge=1)
    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)

    # --- engine limits ---
    max_batch_size: int = Field(default=32, ge=1, description="Rows decoded together in one forward pass.")
    max_queue: int = Field(default=256, ge=1, description="Requests waiting beyond the running batch.")
    decode_mode: Literal["auto", "paged", "dynamic", "static", "graphs"] = Field(
        default="auto",
        description="Engine: paged (auto; paged KV cache, chunked ragged prefill) or the legacy padded-batch "
        "modes: dynamic KV cache, static slots, or static slots replayed as CUDA graphs.",
    )
    compile: Literal["auto", "on", "merge", "off"] = Field(
        default="auto",
        description="Paged engine: fused decoder layers (merged q/k/v and gate/up projections) compiled with "
        "torch.compile; auto = on for one unquantised CUDA GPU, off elsewhere; merge = fused but eager.",
    )
    overlap_schedule: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Paged engine: queue the next decode step on the GPU before this one's tokens reach the host "
        "when every row decodes greedily (its input ids taken from the device); auto = on (tensor parallelism "
        "included: rank 0 broadcasts the ids).",
    )
    kv_block_size: int = Field(default=16, ge=1, le=1024, description="Token positions per paged KV block.")
    kv_cache_tokens: int = Field(
        default=0, ge=0, description="Paged KV cache size in tokens; 0 = from GPU_MEMORY_UTILIZATION (CPU: 2,048/row)."
    )
    max_num_batched_tokens: int = Field(
        default=8192, ge=16, description="Tokens per engine step: decoding rows plus prompt chunks (chunked prefill)."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV blocks of equal prefixes (and steering).")
    max_unread_tokens: int = Field(
        default=256,
        ge=1,
        description="Back-pressure (paged engine): a request whose client has not read this many of its streamed "
        "tokens stops decoding (keeping its KV blocks) until the client catches up; REQUEST_TIMEOUT_S still runs.",
    )
    static_cache_len: int = Field(
        default=4096, ge=16, description="Columns of the static KV cache: the longest prompt + completion there."
    )
    max_new_tokens_limit: int = Field(default=4096, ge=1)
    max_vectors: int = Field(default=16, ge=1, description="Steering vectors per request.")
    max_layers: int = Field(default=16, ge=1, description="Distinct steered layers (hook sites) per request.")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_steering_value: float = Field(
        default=1e5,
        gt=0,
        le=1e30,
        description="Largest |strength x vector element| (ADD) or |cap| (PROJECTION_CAP) a request may apply; "
        "also capped at a quarter of the model dtype's range.",
    )
    registry_max_vectors: int = Field(default=256, ge=0, description="Vectors the registry holds at most.")
    presets_max: int = Field(default=256, ge=0, description="Steering presets (POST /api/v1/presets) held at most.")
    registry_max_file_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest control-vector file (GGUF / safetensors) upload."
    )
    raw_chat_templates: bool = Field(
        default=False,
        description="Let message contents carry chat-template control text (<|im_start|>...) as real special "
        "tokens; off: contents are tokenised as plain text and cannot forge roles.",
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="Time budget of one request.")
    shutdown_timeout_s: float = Field(default=30.0, ge=0, description="Grace period for in-flight work on stop.")

    # --- hardening and observability ---
    rate_limit: str = Field(
        default="",
        description='Per-client rate limit over every route but /health ("120/minute"; several: '
        '"10/second;500/hour", the syntax of `limits`/slowapi). Empty: off.',
    )
    fault_injection: str = Field(
        default="",
        pattern=r"^$|^(prefill|decode):[1-9][0-9]*(:oom)?(,(prefill|decode):[1-9][0-9]*(:oom)?)*$",
        description='Testing only: "decode:3" raises on the 3rd decode forward (once); ":oom" raises an '
        "out-of-memory error instead; comma-separate several.",
    )
    log_format: Literal["json", "text"] = Field(default="json", description="Log lines as JSON (with request ids).")
    log_level: str = Field(default="INFO")

    @field_validator("model_name", "model_id", "override_model_id", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("secret", "api_key", "admin_secret", mode="before")
    @classmethod
    def _stripped_secret(cls, value: object) -> object:
        """Surrounding whitespace (a stray newline in a secrets file) is not part of a secret; blank means unset."""
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> Settings:
        """SECRET and API_KEY name one secret: a blank SECRET must not disable a configured API_KEY."""
        if self.secret is None and self.api_key is not None:
            self.secret = self.api_key
        return self

    @model_validator(mode="after")
    def _one_split(self) -> Settings:
        if self.tensor_parallel_size > 1 and self.layer_split_size > 1:
            raise ValueError("TENSOR_PARALLEL_SIZE and LAYER_SPLIT_SIZE cannot both be above 1")
        if self.tensor_parallel_size > 1 and self.workers > 1:
            raise ValueError("TENSOR_PARALLEL_SIZE > 1 needs WORKERS=1 (each worker would start its own ranks)")
        return self

    @field_validator("rate_limit")
    @classmethod
    def _parsable_rate(cls, value: str) -> str:
        if value.strip():
            from limits import parse_many

            parse_many(value)  # raises ValueError on a malformed limit
        return value

    @property
    def weights_source(self) -> str | None:
        """What to load: OVERRIDE_MODEL_ID, else MODEL_NAME, else MODEL_ID; None means the embedded model."""
        return self.override_model_id or self.model_name or self.model_id

    def logical_model_id(self, loaded_id: str) -> str:
        """The id users see and persona data is filed under (seed 000's MODEL_ID semantics)."""
        return self.model_id or self.model_name or loaded_id
