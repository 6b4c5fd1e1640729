#!/usr/bin/env python3
"""mypy over vaultsh/ and collector/, against a baseline: fail on any error not in scripts/mypy-baseline.txt.

Errors are compared as `file: [code] message`, without line numbers, so moving code does not break the check;
each entry is counted, so a second copy of a known error in the same file is new. Fixed errors print a hint to
shrink the baseline. `--update` rewrites the baseline from the current errors.

    python3 scripts/typecheck.py            # check
    python3 scripts/typecheck.py --update   # accept the current errors as the baseline
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "scripts" / "mypy-baseline.txt"
# path:line[:col]: error: message  [code]
_ERROR = re.compile(r"^(?P<path>[^:]+):\d+(?::\d+)?: error: (?P<msg>.*?)(?:\s+\[(?P<code>[a-z0-9-]+)\])?$")


def normalize(line: str) -> str | None:
    m = _ERROR.match(line.strip())
    if not m:
        return None
    msg = re.sub(r"\bline \d+\b", "line N", m["msg"])  # "defined on line 12", "see line 40"
    return f"{m['path']}: [{m['code'] or 'misc'}] {msg}"


def current_errors() -> Counter[str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-error-summary",
            "--no-pretty",
            "--hide-error-context",
            "--no-color-output",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode not in (0, 1):  # 1: type errors; 2: mypy itself failed (bad config, crash)
        sys.exit(f"typecheck: mypy failed to run (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return Counter(e for e in map(normalize, proc.stdout.splitlines()) if e)


def read_baseline() -> Counter[str]:
    if not BASELINE.exists():
        return Counter()
    return Counter(ln for ln in BASELINE.read_text().splitlines() if ln.strip() and not ln.startswith("#"))


def write_baseline(errors: Counter[str]) -> None:
    head = "# mypy errors accepted for now (scripts/typecheck.py --update); shrink it, never grow it by hand.\n"
    BASELINE.write_text(head + "".join(f"{e}\n" for e in sorted(errors.elements())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="rewrite the baseline from the current errors")
    args = ap.parse_args(argv)
    now = current_errors()
    if args.update:
        write_baseline(now)
        print(f"typecheck: baseline rewritten: {sum(now.values())} errors")
        return 0
    base = read_baseline()
    new, fixed = now - base, base - now
    if new:
        print(f"typecheck: {sum(new.values())} new mypy error(s) not in {BASELINE.relative_to(REPO)}:")
        for e in sorted(new.elements()):
            print(f"  {e}")
        print("  (run `python3 -m mypy` for line numbers)")
    if fixed:
        print(
            f"typecheck: {sum(fixed.values())} baseline error(s) are fixed; shrink the baseline with"
            " `python3 scripts/typecheck.py --update`"
        )
    if not new:
        print(f"typecheck: ok ({sum(now.values())} known errors, none new)")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
