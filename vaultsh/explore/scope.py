"""Which runs and hooks a location means: a hook directory, a run, or a prefix holding runs."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from vaultsh.errors import NotFoundError, UserError
from vaultsh.run import CFG, INTERNAL, METADATA, Run
from vaultsh.store import Store


@dataclass(frozen=True)
class HookRef:
    """One hook directory of one run."""

    run: str
    hook: str

    @property
    def key(self) -> str:
        return f"{self.run}/{self.hook}" if self.run else self.hook


def _is_run(store: Store, key: str) -> bool:
    prefix = key + "/" if key else ""
    if store.exists(prefix + CFG):
        return True
    return any(p.rstrip("/").rsplit("/", 1)[-1] == INTERNAL for p in store.list_dir(prefix).prefixes)


def _is_hook(store: Store, key: str) -> bool:
    if "/" not in key:
        return False
    if store.exists(key + "/" + METADATA):
        return True
    return posixpath.basename(key) in Run(store, posixpath.dirname(key)).hooks()


def runs_under(store: Store, key: str) -> list[str]:
    """The runs a location means: itself when it is a run, else the runs one level below it."""
    key = key.strip("/")
    if key and _is_run(store, key):
        return [key]
    prefix = key + "/" if key else ""
    out = [p.rstrip("/") for p in store.list_dir(prefix).prefixes if _is_run(store, p.rstrip("/"))]
    if not out:
        raise NotFoundError(f"{store.child_uri(key) if key else store.uri}: no run here (a run holds cfg.json)")
    return out


def hooks_for(store: Store, key: str, hook: str | None = None, one_per_run: bool = False) -> list[HookRef]:
    """The hook directories a location means (narrowed to `hook` when given).

    `one_per_run`: only the first hook of each run (every hook of a run holds
    the same tokens, so `grep` reads one).
    """
    key = key.strip("/")
    if key and "/" in key and not _is_run(store, key) and _is_hook(store, key):
        run, h = posixpath.split(key)
        if hook is not None and hook != h:
            raise UserError(f"--hook {hook}: this is the hook directory {h!r} of run {run!r}")
        return [HookRef(run, h)]
    out: list[HookRef] = []
    for run in runs_under(store, key):
        hooks = Run(store, run).hooks()
        if hook is not None:
            if hook not in hooks:
                if len(runs_under(store, key)) == 1:
                    raise NotFoundError(f"run {run!r} has no hook {hook!r} (hooks: {', '.join(hooks) or 'none'})")
                continue
            hooks = [hook]
        if one_per_run:
            hooks = hooks[:1]
        out.extend(HookRef(run, h) for h in hooks)
    if not out:
        raise NotFoundError(f"no hook {hook!r} in any run under {store.child_uri(key) if key else store.uri}")
    return out


def one_hook(store: Store, key: str, hook: str | None) -> HookRef:
    """Exactly one hook directory: `key` itself, or `hook` of the run at `key`."""
    refs = hooks_for(store, key, hook)
    if len(refs) > 1:
        names = sorted({r.hook for r in refs})
        raise UserError(
            f"name one hook (hooks here: {', '.join(names)})"
            if hook is None
            else f"{len(refs)} runs have hook {hook!r}: cd into one run first"
        )
    return refs[0]
