#!/usr/bin/env bash
# Static checks (issue #20): ruff, mypy against its baseline, import-linter contracts. Runs every check, then exits
# non-zero if any failed. Needs the dev extra (`pip install -e ".[dev]"`, which scripts/setup.sh does).
#   LINT_FORMAT=1 bash scripts/lint.sh   also runs `ruff format --check` (off until the one-time format pass)
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
if [ "${LINT_FORMAT:-0}" = 1 ]; then
  step "ruff format --check" "$PY" -m ruff format --check "${PATHS[@]}"
fi
step "mypy (baseline)" "$PY" scripts/typecheck.py
step "import contracts" lint-imports
if [ ${#failed[@]} -gt 0 ]; then
  echo "lint: failed: ${failed[*]}"
  exit 1
fi
echo "lint: all checks passed"
