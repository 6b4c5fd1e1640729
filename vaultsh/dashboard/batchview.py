"""The dashboard's batch viewer: the newest committed megabatch of a hook, one sequence at a time, with heat.

The data comes from `vaultsh.explore.batch` (headless) and the heat picture
from `vaultsh.explore.render.heat_text`, the same one `view --heat` prints.
Every store read (commit records, the file's ids and mask, one sequence's
states) runs on a thread worker, never on the UI thread; a failure is one line
on the screen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from vaultsh.terminal import one_line, safe_text

if TYPE_CHECKING:
    from vaultsh.explore.batch import Batch, LatestBatches
    from vaultsh.explore.heat import HeatResult
    from vaultsh.explore.values import ValueFn

KEYS_LINE = "←/→ j/k seq  h heat  n norm  d dim  x dir/SAE  tab hook  r reload  esc close"
VALUE_PROMPT = "a direction FILE (.npy/.safetensors), or an SAE CKPT and a FEATURE; enter"


class BatchScreen(ModalScreen[None]):
    """The newest committed megabatch of a hook of this run: ←/→ (j/k) between sequences, h heat, d dimension."""

    BINDINGS = [
        Binding("escape,q,v", "close", "Close"),
        Binding("right,j", "move(1)", "Next", show=False),
        Binding("left,k", "move(-1)", "Previous", show=False),
        Binding("h", "toggle_heat", "Heat"),
        Binding("n", "norm", "By norm", show=False),
        Binding("d", "ask_dim", "Dimension"),
        Binding("x", "ask_value", "Direction/SAE"),
        Binding("tab", "hook(1)", "Next hook", show=False),
        Binding("shift+tab", "hook(-1)", "Previous hook", show=False),
        Binding("r", "reload", "Reload", show=False),
    ]

    NEWER_CHECK_S = 1.0  # how often the viewer asks whether a newer megabatch was committed (no store I/O)

    def __init__(
        self,
        batches: LatestBatches | None,
        hooks: list[str],
        note: str | None = None,
        committed: Callable[[], int] | None = None,
    ):
        """`batches`: a `vaultsh.explore.batch.LatestBatches` (None with `note` saying why there is none);
        `committed()`: the megabatches the dashboard has seen committed, to say when a newer one is there."""
        super().__init__()
        self.batches = batches
        self.committed = committed
        self._committed_at_load: int | None = None
        self.newer = False  # a megabatch was committed after the shown one was read: `r` reads it
        self.hooks = list(hooks)
        self.hook_i = 0
        self.megabatch: Batch | None = None
        self.seq = 0
        self.heat_on = False
        self.heat_value: ValueFn | None = None  # None: by token norm; else a dimension, direction or SAE feature
        self.message: str | None = note
        self.loading = False
        self._heat: dict[tuple, HeatResult | str] = {}  # (key, sequence, dim) -> the heat, or an error line
        self._pending: set[tuple] = set()  # heat being read
        self._generation = 0  # bumped by every load: a late answer to an older one is dropped

    # -- layout -----------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Vertical(id="batchview"):
            yield Static(id="batch-title")
            yield Static(id="batch-status")
            yield Static(id="batch-heat")
            with VerticalScroll(id="batch-scroll"):
                yield Static(id="batch-text")
            yield Input(id="batch-dim", type="integer")
            yield Input(id="batch-value", placeholder=VALUE_PROMPT)
            yield Static(KEYS_LINE, id="batch-keys")

    def on_mount(self) -> None:
        for box in self.query(Input):
            box.display = False
        self.query_one("#batch-scroll").focus()
        if self.batches is not None:
            self.action_reload()
        else:
            self.show()
        if self.committed is not None:
            self.set_interval(self.NEWER_CHECK_S, self._check_newer)

    def _check_newer(self) -> None:
        if not self.app.is_running or self.committed is None or self._committed_at_load is None:
            return
        newer = self.committed() > self._committed_at_load
        if newer != self.newer:
            self.newer = newer
            self.show()

    @property
    def hook(self) -> str | None:
        return self.hooks[self.hook_i] if self.hooks else None

    # -- reading (threads) --------------------------------------------------
    def _in_thread(
        self, work: Callable[[], object], done: Callable[[object], None], group: str, exclusive: bool = True
    ) -> None:
        """`work()` on a thread worker; `done(result)` back on the UI thread (an exception's one line as a str)."""
        generation, app = self._generation, self.app

        def run() -> None:
            try:
                result = work()
            except Exception as exc:  # noqa: BLE001 - a bad file, a store error, a bug: one line, never a crash
                result = one_line(str(exc) or type(exc).__name__)
            if generation == self._generation and self.is_attached:
                try:
                    app.call_from_thread(done, result)
                except Exception:  # noqa: BLE001 - the screen (or the app) closed meanwhile
                    pass

        self.run_worker(run, thread=True, group=group, exclusive=exclusive, exit_on_error=False)

    def action_reload(self) -> None:
        if self.batches is None:
            return
        self._generation += 1
        self.loading, self.megabatch, self.message = True, None, None
        self.newer, self._committed_at_load = False, self.committed() if self.committed is not None else None
        self._heat.clear()  # the newest file may be another one now (or the same one, rewritten)
        self._pending.clear()
        self.show()
        hook = self.hook
        batches = self.batches

        def work():
            if hook is None:
                batches.refresh()
                return ("hooks", batches.hooks())
            return ("batch", batches.load(hook))

        self._in_thread(work, self._loaded, "load")

    def _loaded(self, result) -> None:
        self.loading = False
        if isinstance(result, str):
            self.message = f"cannot read the newest megabatch of {self.hook}: {result}"
        elif result[0] == "hooks":
            if result[1]:
                self.hooks = list(result[1])
                self.action_reload()
                return
            self.message = f"nothing committed yet in {self.batches.uri if self.batches else 'this run'}"
        elif result[1] is None:
            self.message = f"nothing committed yet: no megabatch of {self.hook} has been committed"
        else:
            self.megabatch = result[1]
            self.seq = min(self.seq, self.megabatch.n - 1) if self.megabatch.n else 0
        self.show()

    @property
    def heat_name(self) -> str:
        return "norm" if self.heat_value is None else self.heat_value.name

    def _want_heat(self) -> None:
        b, i, value = self.megabatch, self.seq, self.heat_value
        if b is None or not b.n:
            return
        key = (b.key, i, self.heat_name)
        if key in self._heat or key in self._pending:
            return
        self._pending.add(key)  # one read per sequence, however often it is drawn meanwhile
        self._in_thread(lambda: b.heat(i, value), lambda r: self._heat_ready(key, r), "heat", exclusive=False)

    def _heat_ready(self, key: tuple, result) -> None:
        self._pending.discard(key)
        self._heat[key] = result
        self.show()

    # -- drawing ----------------------------------------------------------
    def show(self) -> None:
        from vaultsh.explore.render import heat_scale, heat_text, segments_text
        from vaultsh.explore.source import source_text

        title = self.query_one("#batch-title", Static)
        status = self.query_one("#batch-status", Static)
        legend = self.query_one("#batch-heat", Static)
        text = self.query_one("#batch-text", Static)
        box = self.query_one("#batchview")
        box.border_title = "batch viewer" + (
            f" ({self.hook_i + 1}/{len(self.hooks)} hooks)" if len(self.hooks) > 1 else ""
        )
        hook = safe_text(self.hook or "?")
        b = self.megabatch
        legend.display = self.heat_on and b is not None and b.n > 0
        if b is None:
            title.update(Text(hook, style="bold cyan"))
            status.update("")
            if self.loading:
                text.update(Text(f"loading the newest committed megabatch of {hook}…", style="dim"))
            else:
                msg = safe_text(self.message or "")
                if self.newer:
                    msg += "\nsince then a megabatch is committed: r reads it"
                text.update(Text(msg, style="yellow"))
            return
        rec = b.record
        title.update(
            Text.assemble(
                (hook, "bold cyan"),
                f"  {safe_text(b.name)}  ",
                (f"worker {rec.worker}, megabatch {rec.index}, committed {safe_text(rec.created)}", "dim"),
            )
        )
        if not b.n:
            status.update("")
            text.update(Text("the megabatch holds no sequences", style="yellow"))
            return
        mask = b.mask[self.seq]
        line = Text.assemble(
            (f"sequence {self.seq} of {b.n}", "bold"), f"  {len(mask)} tokens, {sum(1 for m in mask if m)} real"
        )
        if b.sources:
            line.append(f"  [{safe_text(source_text(b.sources[self.seq]))}]", style="dim")
        if self.newer:
            line.append("  a newer megabatch is committed: r reads it", style="yellow")
        status.update(line)
        if not self.heat_on:
            text.update(segments_text(b.segments(self.seq)))
            return
        r = self._heat.get((b.key, self.seq, self.heat_name))
        if r is None:
            legend.update(Text(f"heat: {safe_text(self.heat_name)} (reading the sequence's states…)", style="dim"))
            text.update(segments_text(b.segments(self.seq)))
            self._want_heat()
        elif isinstance(r, str):
            legend.update(Text(f"heat: {r}", style="yellow"))
            text.update(segments_text(b.segments(self.seq)))
        else:
            legend.update(Text("heat: ") + Text(heat_scale(r), style="bold"))
            text.update(heat_text(r))

    # -- keys -------------------------------------------------------------
    def action_close(self) -> None:
        shown = [box for box in self.query(Input) if box.display]
        if shown:  # esc in the dimension or value box: cancel it, stay here
            self._close_input(shown[0])
            return
        self.dismiss(None)

    def _close_input(self, box: Input) -> None:
        box.display = False
        self.query_one("#batch-scroll").focus()

    def action_move(self, step: int) -> None:
        if self.megabatch is None or not self.megabatch.n:
            return
        self.seq = max(0, min(self.megabatch.n - 1, self.seq + step))
        self.show()

    def action_toggle_heat(self) -> None:
        self.heat_on = not self.heat_on
        self.show()

    def action_norm(self) -> None:
        self._colour_by(None)

    def _colour_by(self, value: ValueFn | None) -> None:
        self.heat_on, self.heat_value = True, value
        self.show()

    def action_ask_dim(self) -> None:
        box = self.query_one("#batch-dim", Input)
        d = self.megabatch.d_model if self.megabatch is not None else None
        box.placeholder = f"colour by dimension (0-{d - 1}), enter" if d else "colour by dimension, enter"
        self._open_input(box)

    def action_ask_value(self) -> None:
        self._open_input(self.query_one("#batch-value", Input))

    def _open_input(self, box: Input) -> None:
        for other in self.query(Input):
            other.display = False
        box.value = ""
        box.display = True
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        box = event.input
        if box.id == "batch-value":
            self._submit_value(box, event.value)
            return
        try:
            dim = int(event.value)
        except ValueError:
            self.notify(f"{safe_text(event.value)!r}: a dimension is a whole number", severity="warning", timeout=3)
            return
        d = self.megabatch.d_model if self.megabatch is not None else None
        if dim < 0 or (d is not None and dim >= d):
            self.notify(f"dimension {dim} out of range (0-{(d or 1) - 1})", severity="warning", timeout=3)
            return
        from vaultsh.explore.values import value_fn

        self._close_input(box)
        self._colour_by(value_fn(dim=dim))

    def _submit_value(self, box: Input, text: str) -> None:
        """`FILE` (a direction) or `CKPT FEATURE` (an SAE latent), loaded on a thread; a bad one is one line."""
        from vaultsh.errors import UserError
        from vaultsh.explore.values import value_fn, value_spec

        try:
            spec = value_spec(text)
        except UserError as exc:
            self.notify(safe_text(str(exc)), severity="warning")
            return
        self._close_input(box)

        def loaded(result) -> None:
            if isinstance(result, str):
                self.notify(f"cannot colour by {safe_text(text)}: {safe_text(result)}", severity="warning", timeout=6)
            else:
                self._colour_by(result)

        self._in_thread(lambda: value_fn(**spec), loaded, "value")

    def action_hook(self, step: int) -> None:
        if len(self.hooks) < 2:
            return
        self.hook_i = (self.hook_i + step) % len(self.hooks)
        self.seq = 0
        self.action_reload()
