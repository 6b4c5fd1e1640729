"""Untrusted text made safe to print on a terminal (standard library only).

Keys, header fields, decoded tokens and error messages come from a store or a
worker: a crafted one could carry ANSI escape sequences or other control
characters that recolour, move the cursor or retitle the terminal. Everything
the CLI, the shell, explore, export cards and the dashboard print from there
goes through one of these:

- `inert`: every non-printable character as ``\\xNN`` (the CLI's error line, `verify`, `inspect`, cards);
- `safe_text`: the shell's and explore's rendering: ``\\xNN`` (``\\uNNNN`` past U+00FF), ``\\n``,
  newlines and tabs kept on request;
- `one_line`: a message as one inert line (whitespace runs collapsed);
- `json_text`: pretty JSON with every control character escaped.
"""

from __future__ import annotations

import json
import unicodedata


def inert(text: object) -> str:
    """`text` with every non-printable character (ESC, C0/C1 controls, newlines, ...) shown as \\xNN."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)


def safe_text(text: object, keep_newlines: bool = False) -> str:
    """Untrusted text (keys, header fields, decoded tokens) made inert for a terminal:
    control characters (ANSI escapes included) shown as \\xNN; newlines and tabs kept on request."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for c in s:
        if c.isprintable() or (keep_newlines and c in "\n\t"):
            out.append(c)
        elif c == "\n":
            out.append("\\n")
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
    return "".join(out)


def collapse(text: object) -> str:
    """`text` on one line: every run of whitespace (newlines included) as one space, none at the ends."""
    return " ".join(str(text).split())


def one_line(text: object) -> str:
    """A message as one printable line: whitespace runs collapsed, control characters escaped."""
    return inert(collapse(text))


def json_text(data) -> str:
    """Pretty JSON with every control character (C0, DEL, C1) escaped."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) == "Cc" and c != "\n" else c for c in text)
