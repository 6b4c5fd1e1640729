"""Modal screens: the help overlay and the quit question."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

STATES_HELP = (
    "[cyan]starting/loading[/] model and data  [green]running[/] forward passes  "
    "[blue]uploading[/] last megabatches  [yellow]paused[/] SIGSTOP  [yellow]stopping[/] finishing its megabatch  "
    "[bold green]done[/]  [dim]stopped[/]  [bold red]failed[/] (r restarts it; it resumes after its last commit)"
)


class HelpScreen(ModalScreen[None]):
    """Every key binding (generated from the app's bindings) and what the states mean."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, bindings: list[Binding], read_only: bool = False):
        super().__init__()
        self.bindings_list = bindings
        self.read_only = read_only

    def compose(self) -> ComposeResult:
        from rich.table import Table

        keys = Table.grid(padding=(0, 2))
        keys.add_column(justify="right", style="bold", no_wrap=True)
        keys.add_column()
        seen = set()
        for b in self.bindings_list:
            if b.action in seen or b.key == "ctrl+c":
                continue
            seen.add(b.action)
            desc = _LONG.get(b.action, b.description)
            if self.read_only and b.action in ("pause", "pause_all", "stop", "stop_all", "restart"):
                desc += " [dim](not in watch mode)[/]"
            keys.add_row(b.key_display or b.key, desc)
        with VerticalScroll(id="help"):
            yield Static("[b]Keys[/]", classes="help-title")
            self.keys_table = keys
            yield Static(keys, id="help-text")
            yield Static("[b]States[/]", classes="help-title")
            yield Static(STATES_HELP, id="help-states")
            yield Static("[dim]esc / ? closes[/]", id="help-close")


_LONG = {
    "pause": "pause or resume the selected worker (its whole process group)",
    "pause_all": "pause or resume every worker",
    "stop": "stop the selected worker after it commits its megabatch in flight (twice: at once)",
    "stop_all": "stop every worker gracefully; queued workers will not start",
    "restart": "restart a failed or stopped worker (it resumes after its last commit)",
    "toggle_log": "show or hide the log pane",
    "worker_log": "show the selected worker's log file (enter again or esc: all workers)",
    "all_logs": "back to every worker's warnings and errors",
    "batch_view": "view the newest committed megabatch of a hook, sequence by sequence "
    "(←/→ or j/k; h heat by token norm, d a dimension, tab next hook, esc back)",
    "help": "this help",
    "quit": "quit (asks first while workers are running)",
}


class QuitScreen(ModalScreen[str]):
    """Workers are still running: stop them, leave them running, or cancel."""

    BINDINGS = [
        Binding("escape,c,n", "answer('cancel')", "Cancel"),
        Binding("s,y", "answer('stop')", "Stop and quit"),
        Binding("d", "answer('detach')", "Leave running"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="quit"):
            yield Static(
                "[b]Workers are still running.[/]\n"
                "Stop them (each commits its megabatch in flight), or leave them running?",
                id="quit-text",
            )
            with Horizontal(id="quit-buttons"):
                yield Button("[u]S[/u]top and quit", id="stop", variant="error")
                yield Button("Leave [u]d[/u]etached", id="detach", variant="primary")
                yield Button("[u]C[/u]ancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

    def action_answer(self, answer: str) -> None:
        self.dismiss(answer)
