"""The shell: a prompt-toolkit loop (interactive) or a batch runner over the same handlers.

Input and output are injectable (aws-shell style): `Shell(..., input=, output=)`
are prompt_toolkit's input/output (tests pass `create_pipe_input()` and
`DummyOutput()`), `stdout=`/`stderr=` are where command output and errors go.

- interactive: `s3://bucket/run/hook> ` prompt, history in a file
  (`$VAULTSH_HISTORY`, else `$XDG_CACHE_HOME/vaultsh/s3_history`, else
  `~/.cache/vaultsh/s3_history`), suggestions from history, threaded
  completion. Ctrl-C at the prompt clears the line, during a command cancels
  the command; Ctrl-D or `exit` leaves. An error prints one `error: ...` line
  and the shell goes on.
- batch (`-c "cd run; ls"` or commands piped on stdin): commands run in
  order; the first error stops the batch with exit status 2; a `verify` that
  finds problems makes the exit status 1.
- `--json` (for the whole session, or per command) prints one JSON document
  per command instead of text.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rich.console import Console

from vaultsh.errors import NotFoundError, UserError
from vaultsh.shell import commands as _commands  # noqa: F401 - registers the commands
from vaultsh.shell.commands import ExitShell
from vaultsh.shell.context import ShellContext, open_shell_location
from vaultsh.shell.registry import REGISTRY, split_commands, split_words
from vaultsh.shell.render import render
from vaultsh.terminal import json_text, safe_text

if TYPE_CHECKING:  # prompt_toolkit is imported only when the shell prompts
    from prompt_toolkit import PromptSession

HISTORY_ENV = "VAULTSH_HISTORY"
DEBUG_ENV = "VAULTSH_DEBUG"


def history_path() -> Path:
    """Where the shell keeps its history across sessions."""
    env = os.environ.get(HISTORY_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(cache) / "vaultsh" / "s3_history"


def _default_history():
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        return FileHistory(str(path))
    except OSError:
        return InMemoryHistory()


def _isatty(f: IO) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def _console(f: IO) -> Console:
    tty = _isatty(f)
    return Console(file=f, width=None if tty else 200, highlight=False, emoji=False, soft_wrap=not tty)


class Shell:
    def __init__(
        self,
        uri: str | None = None,
        *,
        store=None,
        cwd: str = "",
        input=None,
        output=None,
        stdout: IO | None = None,
        stderr: IO | None = None,
        json_mode: bool = False,
        interactive: bool = True,
        history=None,
    ):
        if store is None:
            from vaultsh.store import default_s3_uri

            store, cwd = open_shell_location(uri or default_s3_uri())
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self.input = input
        self.output = output
        self.json_mode = json_mode
        self.interactive = interactive
        self._history = history
        self._ask_session: PromptSession[str] | None = None
        self.ctx = ShellContext(
            store,
            "",
            _console(self.stdout),
            _console(self.stderr),
            interactive=interactive,
            ask=self._ask if interactive else None,
        )
        self._start_at(cwd)

    # -- start -----------------------------------------------------------------
    def _start_at(self, cwd: str) -> None:
        """Check the store answers and place the shell at `cwd` (a file's directory for a file)."""
        ctx = self.ctx
        if cwd and not ctx.is_dir(cwd):
            if ctx.is_file(cwd):
                cwd = cwd.rsplit("/", 1)[0] if "/" in cwd else ""
            else:
                raise NotFoundError(f"nothing stored under {ctx.display(cwd)}")
        elif not cwd:
            ctx.list_dir("")  # a missing bucket or bad credentials fail here, before the prompt
        ctx.cwd = cwd

    # -- prompt ------------------------------------------------------------------
    def prompt_text(self) -> str:
        return f"{self.ctx.location()}> "

    def _styled_prompt(self):
        from prompt_toolkit.formatted_text import FormattedText

        return FormattedText([("ansicyan bold", safe_text(self.prompt_text()))])

    def _ask(self, question: str) -> str | None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory

        if self._ask_session is None:
            self._ask_session = PromptSession(history=InMemoryHistory(), input=self.input, output=self.output)
        try:
            return self._ask_session.prompt(question)
        except (EOFError, KeyboardInterrupt):
            return None

    def make_session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory

        from vaultsh.shell.completer import make_completer

        return PromptSession(
            history=self._history if self._history is not None else _default_history(),
            auto_suggest=AutoSuggestFromHistory(),
            completer=make_completer(self.ctx, REGISTRY),
            complete_while_typing=True,
            input=self.input,
            output=self.output,
        )

    def run_interactive(self) -> int:
        session = self.make_session()
        self.ctx.out.print(
            f"vaultsh s3 shell on {safe_text(self.ctx.display(''))}: `help` lists commands, Tab completes, Ctrl-D leaves",
            markup=False,
            highlight=False,
            style="dim",
        )
        while True:
            try:
                line = session.prompt(self._styled_prompt)
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            try:
                self.execute(line)
            except ExitShell:
                break
        return 0

    # -- running commands ----------------------------------------------------------
    def execute(self, line: str, stop_on_error: bool = False) -> int:
        """Run one line (commands separated by ';'); returns 0, 1 (problems found) or 2 (an error).
        Raises ExitShell for `exit`."""
        status = 0
        for cmdline in split_commands(line):
            rc = self.run_command(cmdline)
            status = max(status, rc)
            if stop_on_error and rc >= 2:
                break
        return status

    def run_lines(self, lines: Iterable[str]) -> int:
        """Batch mode: every command of every line, stopping at the first error."""
        status = 0
        for line in lines:
            try:
                rc = self.execute(line, stop_on_error=True)
            except ExitShell:
                break
            status = max(status, rc)
            if rc >= 2:
                break
        return status

    def dispatch(self, words: list[str]) -> int:
        """Run one command given as words; errors propagate (UserError for the user's mistakes).
        Returns 0, or 1 when a result reports problems (verify)."""
        if not words:
            return 0
        name, argv = words[0], words[1:]
        as_json = self.json_mode or "--json" in argv
        argv = [w for w in argv if w != "--json"]
        cmd = REGISTRY.get(name)
        if cmd is None:
            near = REGISTRY.suggest(name)
            hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
            raise UserError(f"unknown command {name!r}{hint}; `help` lists commands")
        parsed = REGISTRY.parse(cmd, argv)
        return self._emit(cmd.handler(self.ctx, parsed), as_json)

    def run_command(self, cmdline: str) -> int:
        """Run one command line; an error is printed as one line and gives status 2 (130 for Ctrl-C)."""
        try:
            return self.dispatch(split_words(cmdline))
        except ExitShell:
            raise
        except UserError as exc:
            self.error(str(exc))
            return 2
        except KeyboardInterrupt:
            self.error("interrupted")
            return 130
        except OSError as exc:  # a local file or directory `get` could not use
            names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
            self.error(f"{names + ': ' if names else ''}{exc.strerror or exc}")
            return 2
        except Exception as exc:  # noqa: BLE001 - a bug in one command must not end the session
            if os.environ.get(DEBUG_ENV):
                raise
            self.error(
                f"internal error in {cmdline.split()[0]!r}: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for a traceback)"
            )
            return 2

    def _emit(self, result, as_json: bool) -> int:
        parts: Iterable = result if isinstance(result, Iterator) else ([] if result is None else [result])
        failed = False
        docs = []
        for part in parts:
            failed = failed or bool(getattr(part, "failed", False))
            if as_json:
                doc = part.to_json()
                if doc is not None:
                    docs.append(doc)
                continue
            render(part, self.ctx.out)
            if self.interactive and hasattr(part, "interact"):
                part.interact(self.ctx)
        if docs:
            self._print_json(docs)
        return 1 if failed else 0

    def _print_json(self, docs: list) -> None:
        if len(docs) == 1:
            out = docs[0]
        else:
            out = {}
            for d in docs:
                if isinstance(d, dict):
                    out.update(d)
                else:
                    out.setdefault("items", []).append(d)
        text = json.dumps(out, default=str, ensure_ascii=False)
        if _isatty(self.stdout):
            text = json_text(out)
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, message: str) -> None:
        self.ctx.error(message)
        try:
            self.stderr.flush()
        except (AttributeError, ValueError):
            pass
