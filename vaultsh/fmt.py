"""Numbers for people: short, fixed-width renderings for table cells and status lines (humanize, no
textual; standard library at import), shared by the dashboard, the supervisor, worker-event notes and the shell."""

from __future__ import annotations


def count(n: float | None) -> str:
    """12345 -> '12.3k', 2_500_000 -> '2.5M' (compact; '-' for unknown)."""
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def size(n: float | None) -> str:
    """Bytes as a person reads them: '1.2 GB', '-' for unknown."""
    if n is None:
        return "-"
    if n < 1000:
        return f"{n:.0f} B"
    import humanize  # on first use: importing this module stays standard library only (vaultsh.events uses it)

    return humanize.naturalsize(n, format="%.1f")


def binary_size(n: float) -> str:
    """Bytes in binary units, as the shell prints them: '1.2 GiB', '340.0 MiB', '12 Bytes'."""
    import humanize

    return humanize.naturalsize(n, binary=True)


def short_size(n: float | None) -> str:
    """Bytes in at most 6 characters: '1.2G', '340M', '12k'."""
    if n is None:
        return "-"
    for unit, s in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n >= s:
            v = n / s
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{n:.0f}B"


def duration(s: float | None) -> str:
    """Seconds as '42s', '3m05s', '2h03m', '3d04h' ('-' for unknown)."""
    if s is None or s != s or s < 0:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def clock(s: float) -> str:
    """Seconds since the run started as 'hh:mm:ss'."""
    s = max(0, int(s))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rate(mb_per_s: float | None) -> str:
    if mb_per_s is None:
        return "-"
    return f"{mb_per_s:.1f}" if mb_per_s < 100 else f"{mb_per_s:.0f}"
