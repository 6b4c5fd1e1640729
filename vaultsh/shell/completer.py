"""Tab completion: command names, flags, and keys under the current prefix.

The completer looks at the command being typed (after the last ';'): the
first word completes to command names; later words to the command's flags
or, by the argument's kind in the registry, to directories/files under the
prefix typed so far (relative to the current directory, `..` and `/x`
understood). Listings come from the shell's TTL cache shared with `ls`, and
`make_completer` wraps the completer in prompt_toolkit's ThreadedCompleter,
so a slow listing on S3 never blocks typing. A failing listing yields no
completions; it never raises into the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, ThreadedCompleter
from prompt_toolkit.document import Document

from vaultsh.shell.registry import Registry


class ShellCompleter(Completer):
    def __init__(self, ctx, registry: Registry):
        self.ctx = ctx
        self.registry = registry

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        try:
            yield from self._completions(document.text_before_cursor)
        except Exception:  # noqa: BLE001 - completion must never break the prompt
            return

    def _completions(self, text: str) -> Iterable[Completion]:
        segment = text.rsplit(";", 1)[-1].lstrip()
        words = segment.split()
        ends_with_space = segment[-1:].isspace()
        if not words or (len(words) == 1 and not ends_with_space):
            word = words[0] if words else ""
            yield from self._commands(word)
            return
        cmd = self.registry.get(words[0])
        if cmd is None:
            return
        word = "" if ends_with_space else words[-1]
        before = words[1:] if ends_with_space else words[1:-1]
        if word.startswith("-"):
            for flag in [*cmd.flags, "--json"]:
                if flag.startswith(word):
                    yield Completion(flag.split()[0], -len(word), display_meta=cmd.flags.get(flag, "JSON output"))
            return
        position = sum(1 for w in before if not (w.startswith("-") and w != "-"))
        if position >= len(cmd.args):
            return
        kind = cmd.args[position].complete
        if kind == "command":
            yield from self._commands(word)
        elif kind in ("path", "dir", "file"):
            yield from self._keys(word, dirs_only=(kind == "dir"))

    def _commands(self, word: str) -> Iterable[Completion]:
        for name in self.registry.names():
            if name.startswith(word):
                cmd = self.registry.get(name)
                yield Completion(name, -len(word), display_meta=cmd.help if cmd else None)

    def _keys(self, word: str, dirs_only: bool) -> Iterable[Completion]:
        ctx = self.ctx
        head, slash, base = word.rpartition("/")
        typed_dir = head + slash  # what the user typed before the last '/', kept in the completion
        if slash:
            directory = ctx.resolve(head if head else "/")
        else:
            directory = ctx.cwd
        listing = ctx.list_dir(directory)
        prefix = directory + "/" if directory else ""
        for p in listing.prefixes:
            name = p[len(prefix) :]
            if name.startswith(base):
                yield Completion(typed_dir + name, -len(word), display=name)
        if dirs_only:
            return
        for o in listing.objects:
            name = o.key[len(prefix) :]
            if name.startswith(base):
                yield Completion(typed_dir + name, -len(word), display=name)


def make_completer(ctx, registry: Registry) -> ThreadedCompleter:
    """The completer the prompt uses: runs in a background thread."""
    return ThreadedCompleter(ShellCompleter(ctx, registry))
