#!/usr/bin/env bash
# The GPU path measured (issue 22): benchmarks/gpu_check.sh OUT_DIR [--smoke] [--device D] [--work-dir DIR]
# Runs benchmarks/gpu_check.py from this checkout. Wheels in .whl/ (packages the GPU machine
# lacks, e.g. pydantic) are installed to /tmp/site first; see README.md, Performance, "The GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
