"""scripts/download_models.py run as a user would: the embedded path, the offline error, --list."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import download_models

ROOT = Path(__file__).resolve().parents[2]
REAL_CACHE = ROOT / "data" / "models"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.download_models", *args],
        cwd=ROOT,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # a subprocess that imports torch
def test_embedded_reports_ready_from_the_converted_cache():
    done = run(MODEL_CACHE_DIR=str(REAL_CACHE))
    assert done.returncode == 0, done.stderr
    assert "embedded SmolLM2-135M-Instruct ready (already converted)" in done.stdout
    assert str(REAL_CACHE / "embedded" / "SmolLM2-135M-Instruct") in done.stdout


def test_embedded_is_the_default_and_an_explicit_name():
    assert download_models.parse_args([]).model == "embedded"
    assert download_models.parse_args(["embedded"]).model == "embedded"


@pytest.mark.slow  # a subprocess that imports torch
@pytest.mark.skipif(download_models.hub_reachable(3.0) is None, reason="a hub is reachable here; no 15 GB download")
def test_unreachable_hub_gives_one_line_and_exit_2(tmp_path):
    done = run("qwen2.5-7b", MODEL_CACHE_DIR=str(tmp_path))
    assert done.returncode == download_models.EXIT_UNREACHABLE == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot download Qwen/Qwen2.5-7B-Instruct: the model hub is not reachable")
    assert "huggingface.co:443" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.slow  # a subprocess that imports torch
def test_closed_endpoint_port_is_reported_unreachable(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on: deterministic, nothing leaves the machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run("Qwen/Qwen2.5-1.5B-Instruct", MODEL_CACHE_DIR=str(tmp_path), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert done.returncode == 2
    assert f"127.0.0.1:{port} unreachable" in done.stderr
    assert "Traceback" not in done.stderr


def test_aliases_map_to_instruct_repos():
    assert download_models.ALIASES == {
        "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
        "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
        "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    }


@pytest.mark.slow  # a subprocess that imports torch
def test_bad_name_is_rejected_without_network(tmp_path):
    done = run("not-a-model", MODEL_CACHE_DIR=str(tmp_path))
    assert done.returncode == 1
    assert "neither 'embedded'" in done.stderr


@pytest.mark.slow  # a subprocess that imports torch
def test_list_shows_embedded_state(tmp_path):
    ready = run("--list", MODEL_CACHE_DIR=str(REAL_CACHE))
    assert ready.returncode == 0
    assert "embedded/SmolLM2-135M-Instruct  ready" in ready.stdout
    empty = run("--list", MODEL_CACHE_DIR=str(tmp_path))
    assert "not converted" in empty.stdout
    assert "hub " not in empty.stdout
