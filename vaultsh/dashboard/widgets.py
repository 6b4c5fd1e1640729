"""The dashboard's widgets: each renders one part of a supervisor snapshot."""

from __future__ import annotations

from rich.markup import escape
from rich.text import Text
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Static

from vaultsh import fmt
from vaultsh.supervise import state as st
from vaultsh.supervise.state import WorkerStatus
from vaultsh.supervise.supervisor import RunInfo, Totals

STATE_STYLE = {
    st.QUEUED: "dim",
    st.STARTING: "cyan",
    st.LOADING: "cyan",
    st.RUNNING: "green",
    st.UPLOADING: "blue",
    st.PAUSED: "yellow",
    st.STOPPING: "yellow",
    st.DONE: "bold green",
    st.STOPPED: "dim",
    st.FAILED: "bold red",
    st.WAITING: "dim",
    st.IDLE: "yellow",
}
STATE_ICON = {
    st.QUEUED: "·",
    st.STARTING: "◌",
    st.LOADING: "◌",
    st.RUNNING: "▶",
    st.UPLOADING: "⇡",
    st.PAUSED: "‖",
    st.STOPPING: "■",
    st.DONE: "✔",
    st.STOPPED: "■",
    st.FAILED: "✘",
    st.WAITING: "·",
    st.IDLE: "…",
}


def bar(fraction: float | None, width: int, style: str = "green") -> Text:
    """A progress bar in `width` cells with eighth-block resolution, then the percentage."""
    t = Text()
    if fraction is None:
        t.append("─" * width, style="dim")
        t.append("   ?", style="dim")
        return t
    cells = fraction * width
    full = int(cells)
    part = int((cells - full) * 8)
    t.append("█" * full, style=style)
    if full < width:
        if part:
            t.append(" ▏▎▍▌▋▊▉"[part], style=style)
        t.append("─" * (width - full - (1 if part else 0)), style="grey37")
    t.append(f"{fraction * 100:4.0f}%", style="bold" if fraction >= 1 else "")
    return t


# Columns: key, header, width, min terminal width to show it. Widths are content widths.
COLUMNS = [
    ("w", "#", 2, 0),
    ("state", "state", 11, 0),
    ("progress", "progress", 17, 0),
    ("batches", "batches", 11, 0),
    ("tokens", "tokens", 7, 120),
    ("rate", "tok/s", 6, 0),
    ("eta", "ETA", 6, 0),
    ("mb", "mb", 4, 0),
    ("mem", "RSS", 6, 0),
    ("queue", "upq", 4, 100),
    ("mbps", "MB/s", 5, 100),
    ("retries", "retry", 5, 140),
    ("gpu", "GPU mem", 7, 140),
    ("restarts", "rst", 3, 160),
    ("error", "last problem", 30, 170),
]


def columns_for(width: int) -> list[tuple[str, str, int]]:
    """The columns that fit `width`; the last one ("last problem") takes what is left."""
    cols = [(k, h, w) for k, h, w, min_width in COLUMNS if width >= min_width]
    if cols[-1][0] == "error":
        used = sum(w + 2 for _, _, w in cols[:-1]) + 2 + 2  # cell padding, scrollbar
        cols[-1] = ("error", "last problem", max(20, width - used))
    return cols


def worker_cells(w: WorkerStatus, keys: list[str], bar_width: int = 10) -> list:
    """One table row for `w`, for the columns `keys`."""
    style = STATE_STYLE.get(w.state, "")
    cells = {
        "w": Text(str(w.index), style="bold"),
        "state": Text(f"{STATE_ICON.get(w.state, ' ')} {w.state}", style=style),
        "progress": bar(
            w.fraction, bar_width, "red" if w.state == st.FAILED else "green" if w.state != st.PAUSED else "yellow"
        ),
        "batches": Text(f"{w.batches}/{w.total_batches if w.total_batches is not None else '?'}", justify="right"),
        "tokens": Text(fmt.count(w.tokens), justify="right"),
        "rate": Text(
            fmt.count(w.tokens_per_s) if w.state in (st.RUNNING, st.UPLOADING, st.STOPPING) else "-", justify="right"
        ),
        "eta": Text(fmt.duration(w.eta_s), justify="right"),
        "mb": Text(str(w.committed), justify="right"),
        "mem": Text(fmt.short_size(w.memory_total()) if w.active else "-", justify="right"),
        "queue": Text(str(w.queued) if w.active else "-", justify="right"),
        "mbps": Text(fmt.rate(w.mb_per_s) if w.active else "-", justify="right"),
        "retries": Text(str(w.retries), justify="right", style="yellow" if w.retries else ""),
        "gpu": Text(fmt.short_size(w.gpu_allocated) if w.gpu_allocated is not None else "-", justify="right"),
        "restarts": Text(str(w.restarts), justify="right"),
        "error": Text(w.last_error or "", style="red", overflow="ellipsis", no_wrap=True),
    }
    return [cells[k] for k in keys]


def fit(cell: Text, width: int) -> Text:
    """`cell` cut (with an ellipsis) or padded to exactly `width` cells, honouring its justify."""
    t = cell.copy()
    t.truncate(width, overflow="ellipsis")
    pad = width - t.cell_len
    if pad <= 0:
        return t
    if t.justify == "right":
        return Text(" " * pad) + t
    return t + Text(" " * pad)


def render_row(cells: list[Text], widths: list[int]) -> Text:
    """One table line: every cell fitted to its column, one space either side."""
    line = Text()
    for c, w in zip(cells, widths):
        pad = w - c.cell_len
        if pad < 0:
            c = fit(c, w)
            pad = 0
        line.append(" " + (" " * pad if c.justify == "right" else ""))
        line.append_text(c)
        line.append((" " * pad if c.justify != "right" else "") + " ")
    return line


class WorkerRow(Static):
    """One worker's line; only this line is redrawn when its values change."""

    def __init__(self, index: int, **kw):
        super().__init__("", **kw)
        self.index = index

    def on_click(self) -> None:
        table = self.parent
        if isinstance(table, WorkerTable):
            table.select(self.index)


class WorkerTable(VerticalScroll, can_focus=True):
    """One line per worker under a fixed header; up/down move the selection, enter opens its log.

    Lighter than a DataTable: a changed value re-renders one line, not the table.
    """

    BINDINGS = [
        Binding("up,k", "move(-1)", "Up", show=False),
        Binding("down,j", "move(1)", "Down", show=False),
        Binding("home", "move(-1000000)", "First", show=False),
        Binding("end", "move(1000000)", "Last", show=False),
        Binding("enter", "open", "Worker log", show=False),
    ]

    class Opened(Message):
        """Enter (or a click on the selected row) on a worker."""

        def __init__(self, index: int):
            super().__init__()
            self.index = index

    def __init__(self, **kw):
        super().__init__(**kw)
        self._keys: list[str] = []
        self._widths: list[int] = []
        self._cells: dict[int, dict[str, str]] = {}
        self._lines: dict[int, str] = {}
        self._rows: dict[int, WorkerRow] = {}
        self._order: list[int] = []
        self._cursor = 0

    def compose(self):
        yield Static("", id="workers-header")

    def set_columns(self, width: int) -> bool:
        cols = columns_for(width)
        keys = [k for k, _, _ in cols]
        widths = [w for _, _, w in cols]
        if keys == self._keys and widths == self._widths:
            return False
        self._keys, self._widths = keys, widths
        header = render_row(
            [Text(h, style="bold", justify="right" if k not in _LEFT else "left") for k, h, _ in cols], widths
        )
        self.query_one("#workers-header", Static).update(header, layout=False)
        self._lines = {}  # every row is redrawn with the new columns
        self._cells = {}
        return True

    def show(self, workers: list[WorkerStatus]) -> None:
        """Redraw the lines whose text changed; add rows for new workers."""
        for w in workers:
            cells = worker_cells(w, self._keys)
            plain = {k: c.plain for k, c in zip(self._keys, cells)}
            if plain == self._cells.get(w.index) and w.index in self._lines:
                continue
            self._cells[w.index] = plain
            line = render_row(cells, self._widths)
            row = self._rows.get(w.index)
            if row is None:
                row = WorkerRow(w.index, classes="worker-row")
                self._rows[w.index] = row
                self._order.append(w.index)
                self.mount(row)
                if len(self._order) == 1 + self._cursor:
                    row.add_class("-selected")
            if self._lines.get(w.index) != line.plain:
                row.update(line, layout=False)
                self._lines[w.index] = line.plain

    def cells(self, index: int) -> dict[str, str]:
        """The plain text of worker `index`'s cells, by column key."""
        return dict(self._cells[index])

    @property
    def selected(self) -> int | None:
        if not self._order:
            return None
        return self._order[min(self._cursor, len(self._order) - 1)]

    def select(self, index: int) -> None:
        if index not in self._order:
            return
        if self.selected == index and self.has_focus:
            self.post_message(self.Opened(index))
        old = self._rows.get(self.selected) if self.selected is not None else None
        if old is not None:
            old.remove_class("-selected")
        self._cursor = self._order.index(index)
        row = self._rows[index]
        row.add_class("-selected")
        row.scroll_visible()
        self.focus()

    def action_move(self, delta: int) -> None:
        if not self._order:
            return
        new = max(0, min(len(self._order) - 1, self._cursor + delta))
        old = self._rows[self._order[self._cursor]]
        old.remove_class("-selected")
        self._cursor = new
        row = self._rows[self._order[new]]
        row.add_class("-selected")
        row.scroll_visible()

    def action_open(self) -> None:
        if self.selected is not None:
            self.post_message(self.Opened(self.selected))


_LEFT = {"w", "state", "progress", "error"}


class TitleBar(Static):
    """Run name, state counts, elapsed time."""

    def show(self, info: RunInfo, totals: Totals, mode: str, note: str = "", width: int = 80) -> None:
        parts = [f"[b]vaultsh {mode}[/]", f"[b $accent]{escape(info.run or '?')}[/]"]
        counts = []
        order = [
            st.RUNNING,
            st.UPLOADING,
            st.LOADING,
            st.STARTING,
            st.PAUSED,
            st.STOPPING,
            st.QUEUED,
            st.WAITING,
            st.IDLE,
            st.DONE,
            st.STOPPED,
            st.FAILED,
        ]
        narrow = width < 110
        for state in order:
            n = totals.by_state.get(state, 0)
            if n:
                label = f"{STATE_ICON[state]}{n}" if narrow else f"{n} {state}"
                counts.append(f"[{STATE_STYLE[state]}]{label}[/]")
        parts.append(" ".join(counts))
        parts.append(f"[dim]elapsed[/] [b]{fmt.clock(totals.elapsed)}[/]")
        if note:
            parts.append(f"[reverse yellow] {escape(note)} [/]")
        self.update("  ".join(p for p in parts if p), layout=False)


class SummaryPanel(Static):
    """What is being collected, where it goes, how much is done."""

    def show(self, info: RunInfo, totals: Totals, system_memory: tuple[int, int] | None, wide: bool) -> None:
        hooks = ", ".join(info.hooks) if info.hooks else "?"
        done = f"[b]{fmt.count(totals.tokens)}[/] tokens"
        if totals.total_batches:
            done += f"  [b]{totals.batches}[/]/{totals.total_batches} batches"
        memory = []
        if totals.rss:
            memory.append(f"workers {fmt.size(totals.rss)}")
        if system_memory:
            memory.append(f"system {fmt.size(system_memory[0])}/{fmt.size(system_memory[1])}")
        if totals.gpu_allocated is not None:
            memory.append(f"GPU {fmt.size(totals.gpu_allocated)}")
        retries = (
            f"  [yellow]{totals.retries} {'retry' if totals.retries == 1 else 'retries'}[/]"
            if totals.retries
            else "  0 retries"
        )
        lines = [
            f"[dim]model[/]  {escape(info.model or '?')}",
            f"[dim]hooks[/]  {escape(hooks)}",
            f"[dim]store[/]  {escape(info.store or '?')}",
            f"[dim]done[/]   {done}  [dim]written[/] [b]{fmt.size(totals.committed_bytes)}[/]"
            f" in [b]{totals.committed}[/] megabatches",
            f"[dim]upload[/] queue [b]{totals.queued}[/]  {fmt.size(totals.in_flight_bytes)} in flight{retries}"
            + (f"   [dim]mem[/] {'  '.join(memory)}" if memory else ""),
        ]
        if wide and info.plan:
            lines += [f"[dim]plan[/]   {escape(line)}" for line in info.plan[:4]]
        self.styles.height = len(lines)
        self.update("\n".join(lines), layout=False)


_BARS = " ▁▂▃▄▅▆▇█"


def spark(data: list[float], width: int, height: int = 1) -> str:
    """`data` as `height` rows of bars scaled from 0 (blank) to its peak (full height), one
    sample a cell, the latest on the right (older samples beyond `width` are dropped)."""
    data = data[-width:] if width > 0 else data
    peak = max(data, default=0.0)
    levels = [round(v / peak * 8 * height) if peak > 0 and v > 0 else 0 for v in data]
    rows = []
    for r in reversed(range(height)):
        rows.append("".join(_BARS[max(0, min(8, n - 8 * r))] for n in levels))
    return "\n".join(rows)


class Chart(Vertical):
    """A labelled chart of one rate over time: bars from 0 to the peak, one sample per cell.

    The label is its scale: the current value, the peak (a full bar) and the time the bars span.
    """

    def __init__(self, label: str, unit: str, **kw):
        super().__init__(**kw)
        self.label, self.unit = label, unit

    def compose(self):
        yield Static(f"{self.label}", classes="chart-label")
        yield Static("", classes="chart-bars")

    def _value(self, v: float) -> str:
        return fmt.count(v) if self.unit == "tok/s" else fmt.rate(v)

    def show(self, data: list[float], every_s: float = 1.0) -> None:
        now = data[-1] if data else 0.0
        peak = max(data) if data else 0.0
        bars = self.query_one(".chart-bars", Static)
        width = min(len(data), bars.size.width or len(data))
        line = spark(list(data), width, max(1, bars.size.height))
        span = fmt.duration(width * every_s) if width else "-"
        self.query_one(".chart-label", Static).update(
            layout=False,
            content=f"[b]{self.label}[/] {self._value(now)}  [dim]peak[/] {self._value(peak)}  [dim]last {span}[/]",
        )
        bars.update(line, layout=False)


class Charts(Horizontal):
    def compose(self):
        yield Chart("tokens/s", "tok/s", id="chart-tokens")
        yield Chart("upload MB/s", "MB/s", id="chart-upload")
