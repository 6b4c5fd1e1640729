"""The shell's command registry (pgcli/litecli style).

A decorator records each command's name, aliases, arguments, flags, one-line
help and handler; `help`, the completer and the argument parser are all
generated from these records, so a command is declared in exactly one place::

    @command("ls", help="list a directory", args=[Arg("path", complete="path", optional=True)],
             flags={"-l": "long listing"})
    def ls(ctx, a): ...

A handler is called as `handler(ctx, parsed)` and returns a result object (or
yields several, for output that should appear as it is computed); it never
prints. `parsed` gives each argument and flag as an attribute (`a.path`,
`a.l`, `a.nan` for `--nan`).
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from vaultsh.errors import UserError


class UsageError(UserError):
    """A command line the command cannot take: unknown option, missing or extra argument."""


@dataclass(frozen=True)
class Arg:
    """One positional argument. `complete` says what the completer offers for it:
    "path" (directories and files), "dir" (directories only), "file" (directories
    to walk through, and files), "command" (command names), or None."""

    name: str
    complete: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class Command:
    name: str
    handler: Callable
    help: str
    aliases: tuple[str, ...] = ()
    args: tuple[Arg, ...] = ()
    flags: dict[str, str] = field(default_factory=dict)  # "-l" -> what it does; "-n N" takes a value
    details: str = ""

    @property
    def syntax(self) -> str:
        parts = [self.name]
        parts += [f"[{f}]" for f in self.flags]
        for a in self.args:
            parts.append(f"[{a.name}]" if a.optional else f"<{a.name}>")
        return " ".join(parts)


class Parsed:
    """A parsed command line: arguments and flags as attributes (`a.path`, `a.l`, `a.nan`)."""

    def __init__(self, values: dict[str, object]):
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Parsed({self.__dict__!r})"


def flag_attr(flag: str) -> str:
    """'-l' -> 'l', '--no-scan' -> 'no_scan', '--context K' (an option taking a value) -> 'context'."""
    return flag.split()[0].lstrip("-").replace("-", "_")


class Registry:
    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._lookup: dict[str, Command] = {}

    def command(
        self,
        name: str,
        *,
        help: str,
        aliases: tuple[str, ...] | list[str] = (),
        args: tuple[Arg, ...] | list[Arg] = (),
        flags: dict[str, str] | None = None,
        details: str = "",
    ) -> Callable[[Callable], Callable]:
        """Decorator: register `fn` as the handler of command `name`."""

        def deco(fn: Callable) -> Callable:
            cmd = Command(name, fn, help, tuple(aliases), tuple(args), dict(flags or {}), details.strip())
            for n in (name, *cmd.aliases):
                if n in self._lookup:
                    raise ValueError(f"command name {n!r} registered twice")
                self._lookup[n] = cmd
            self._commands[name] = cmd
            return fn

        return deco

    def get(self, name: str) -> Command | None:
        return self._lookup.get(name)

    def commands(self) -> list[Command]:
        """Every command once, in registration order."""
        return list(self._commands.values())

    def names(self) -> list[str]:
        """Every name and alias, sorted."""
        return sorted(self._lookup)

    def suggest(self, name: str) -> list[str]:
        """The closest command names to a mistyped one."""
        return difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)

    def parse(self, cmd: Command, argv: list[str]) -> Parsed:
        """Match `argv` (the words after the command name) against the command's flags and args."""
        values: dict[str, object] = {flag_attr(f): (None if " " in f else False) for f in cmd.flags}
        options = {f.split()[0]: f for f in cmd.flags if " " in f}  # "-n N": takes a value
        positional: list[str] = []
        only_positional = False
        words = iter(argv)
        for word in words:
            if not only_positional and word.split("=", 1)[0] in options:
                name, eq, inline = word.partition("=")
                value = inline if eq else next(words, None)
                if value is None:
                    raise UsageError(f"{cmd.name}: {options[name]} needs a value; usage: {cmd.syntax}")
                values[flag_attr(options[name])] = value
                continue
            if only_positional or word == "-" or not word.startswith("-") or _is_number(word):
                positional.append(word)
                continue
            if word == "--":
                only_positional = True
                continue
            if word in cmd.flags:
                values[flag_attr(word)] = True
                continue
            # combined short flags: -rf
            letters = [f"-{c}" for c in word[1:]] if not word.startswith("--") else []
            if letters and all(f in cmd.flags for f in letters):
                for f in letters:
                    values[flag_attr(f)] = True
                continue
            allowed = ", ".join(cmd.flags) or "none"
            raise UsageError(f"{cmd.name}: unknown option {word!r} (options: {allowed}); usage: {cmd.syntax}")
        required = [a for a in cmd.args if not a.optional]
        if len(positional) < len(required):
            missing = required[len(positional)].name
            raise UsageError(f"{cmd.name}: missing <{missing}>; usage: {cmd.syntax}")
        if len(positional) > len(cmd.args):
            raise UsageError(f"{cmd.name}: too many arguments; usage: {cmd.syntax}")
        for a, v in zip(cmd.args, positional + [None] * (len(cmd.args) - len(positional))):
            values[a.name] = v
        return Parsed(values)


def _is_number(word: str) -> bool:
    try:
        int(word)
    except ValueError:
        return False
    return True


def split_words(line: str) -> list[str]:
    """Shell-style words of one command (quotes group words; backslashes are kept, keys never need them)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.escape = ""  # a backslash is an ordinary character
    try:
        return list(lexer)
    except ValueError as exc:  # no closing quotation
        raise UsageError(f"cannot parse {line!r}: {exc}") from None


def split_commands(text: str) -> list[str]:
    """Split `cd run; ls; inspect 0` on semicolons outside quotes; blank commands are dropped."""
    out: list[str] = []
    cur: list[str] = []
    quote: str | None = None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
            cur.append(ch)
        elif ch in (";", "\n"):
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [c.strip() for c in out if c.strip() and not c.strip().startswith("#")]


REGISTRY = Registry()
command = REGISTRY.command
