#!/usr/bin/env bash
# Installs sgl-diffusion and its CPU-capable runtime into .venv/ at the repository root.
# sglang 0.5.23 is installed with --no-deps: its own pins pull the CUDA-only stack (sglang-kernel,
# flashinfer, deep-gemm, ...). On a CUDA host use `pip install -e .[cuda]` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# the machine's extra local indexes warn about every missing package; keep pip's exit status, drop the noise
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install -q -U pip
pip install -q -r requirements/cpu.txt
pip install -q --no-deps sglang==0.5.23
# FlashInfer's API for the tests, kept off sys.path (see requirements/flashinfer-api.txt)
pip install -q -U --no-deps --target .venv/flashinfer-api -r requirements/flashinfer-api.txt
pip install -q --no-deps -e .
.venv/bin/python -c "import sglang, sgl_diffusion, torch; print('installed: sglang', sglang.__version__, 'torch', torch.__version__)"
