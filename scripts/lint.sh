#!/usr/bin/env bash
# Static checks: ruff check, ruff format --check, mypy against its baseline, import-linter contracts (see
# docs/architecture.md). Runs every check, then exits non-zero if any failed. Needs the dev extra
# (`pip install -e ".[dev]"`, which scripts/setup.sh does). `ruff format vaultsh collector tests benchmarks scripts
# vaultsh.py` fixes what the format check reports.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PATHS=(vaultsh collector tests benchmarks scripts vaultsh.py)
failed=()
step() {  # step NAME CMD...: run one check, time it, remember a failure
  local name=$1 t0=$SECONDS; shift
  echo "lint: $name"
  if "$@"; then echo "lint: $name ok ($((SECONDS - t0))s)"; else echo "lint: $name FAILED"; failed+=("$name"); fi
}
step "ruff check" "$PY" -m ruff check "${PATHS[@]}"
step "ruff format --check" "$PY" -m ruff format --check "${PATHS[@]}"
step "mypy (baseline)" "$PY" scripts/typecheck.py
step "import contracts" lint-imports
if [ ${#failed[@]} -gt 0 ]; then
  echo "lint: failed: ${failed[*]}"
  exit 1
fi
echo "lint: all checks passed"
