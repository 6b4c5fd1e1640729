"""The interactive shell driven through prompt_toolkit's pipe input (no terminal).

`create_pipe_input()` + `DummyOutput()` run the real PromptSession the shell
builds: completion (threaded), history across sessions in a file,
auto-suggestion, Ctrl-C/Ctrl-D, the batch viewer and rm's confirmations.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from prompt_toolkit.application import create_app_session
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from vaultsh.megabatch import write_megabatch
from vaultsh.shell.app import Shell
from vaultsh.shell.completer import ShellCompleter, make_completer
from vaultsh.shell.registry import REGISTRY
from vaultsh.store import LocalStore

from .modelfixtures import TOKENIZER_DIR

N, T, D = 4, 24, 8


@pytest.fixture(scope="module")
def texts():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    import pydoc_data.topics as topics

    docs = [topics.topics[k] for k in sorted(topics.topics)[:N]]
    ids = torch.stack([torch.tensor(tok.encode(d)[:T]) for d in docs])
    return tok, ids


@pytest.fixture
def store(tmp_path, texts):
    _, ids = texts
    s = LocalStore(tmp_path / "vault")
    s.put_bytes("run1/cfg.json", json.dumps({"tokenizer": {"source": str(TOKENIZER_DIR)}}).encode())
    s.put_bytes("run1/hook_a/metadata.json", b"{}")
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[2, T - 5 :] = False
    write_megabatch(
        s,
        "run1/hook_a/w0000--0000000.safetensors",
        torch.randn(N, T, D),
        ids,
        mask,
        metadata={"hook": "hook_a", "model": "m"},
    )
    s.put_bytes("run1/notes.txt", b"hello\n")
    s.put_bytes("run2/x/y.txt", b"y")
    s.put_bytes("rubble.txt", b"r")
    return s


def words(completions) -> list[str]:
    return [c.text for c in completions]


def complete(store, text: str, cwd: str = "") -> list[str]:
    shell = Shell(store=store, cwd=cwd, stdout=io.StringIO(), stderr=io.StringIO(), interactive=False)
    comp = ShellCompleter(shell.ctx, REGISTRY)
    return words(comp.get_completions(Document(text), CompleteEvent(completion_requested=True)))


def test_completes_commands_flags_and_keys(store):
    assert complete(store, "insp") == ["inspect"]
    assert set(complete(store, "")) == set(REGISTRY.names())
    assert complete(store, "cd ru") == ["run1/", "run2/"]  # directories only for cd
    assert complete(store, "ls ru") == ["run1/", "run2/", "rubble.txt"]
    assert complete(store, "ls run1/") == ["run1/hook_a/", "run1/cfg.json", "run1/notes.txt"]
    assert complete(store, "inspect hook_a/w", cwd="run1") == ["hook_a/w0000--0000000.safetensors"]
    assert complete(store, "cat ../run2/x/", cwd="run1") == ["../run2/x/y.txt"]
    assert complete(store, "ls -") == ["-l", "--json"]
    assert complete(store, "help filec") == ["filecount"]
    assert complete(store, "pwd; cd run1/h") == ["run1/hook_a/"]
    assert complete(store, "nosuchcmd ru") == []
    assert complete(store, "cd ../../..", cwd="run1") == []  # outside the root: nothing, and no error


def test_threaded_completion_and_a_failing_listing(store):
    shell = Shell(store=store, stdout=io.StringIO(), stderr=io.StringIO(), interactive=False)
    completer = make_completer(shell.ctx, REGISTRY)

    async def collect():
        return [c.text async for c in completer.get_completions_async(Document("cd ru"), CompleteEvent())]

    import asyncio

    assert asyncio.run(collect()) == ["run1/", "run2/"]

    class Broken:
        uri = store.uri

        def list_dir(self, prefix=""):
            raise OSError("listing failed")

    shell.ctx.store = Broken()
    shell.ctx.invalidate()
    assert asyncio.run(collect()) == []  # completion never raises into the prompt


def wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return
        time.sleep(0.02)


def feed_later(pipe, *chunks: str, delay: float = 0.3) -> threading.Thread:
    """Send chunks one by one with a pause between (lets threaded completion finish)."""

    def run():
        for chunk in chunks:
            time.sleep(delay)
            pipe.send_text(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def piped_shell(store, pipe, history: Path, out: io.StringIO | None = None, err: io.StringIO | None = None) -> Shell:
    """A shell reading keys from `pipe`, writing to `out`/`err` (default: thrown away), history in `history`."""
    return Shell(
        store=store,
        stdout=out if out is not None else io.StringIO(),
        stderr=err if err is not None else io.StringIO(),
        input=pipe,
        output=DummyOutput(),
        history=FileHistory(str(history)),
    )


def test_tab_completion_in_the_prompt(store, tmp_path):
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        shell = piped_shell(store, pipe, tmp_path / "h")
        session = shell.make_session()

        def keys():
            buf = session.default_buffer
            pipe.send_text("cd run1/ho")
            # completion runs in a thread while typing: Tab once the menu is up, as a person would
            wait_for(lambda: buf.complete_state is not None and bool(buf.complete_state.completions))
            pipe.send_text("\t")
            wait_for(lambda: buf.text != "cd run1/ho")
            pipe.send_text("\r")

        feeder = threading.Thread(target=keys, daemon=True)
        feeder.start()
        assert session.prompt(shell.prompt_text) == "cd run1/hook_a/"
        feeder.join()


def test_history_across_sessions_and_autosuggest(store, tmp_path):
    path = tmp_path / "hist"

    def session_with(pipe):
        return piped_shell(store, pipe, path).make_session()

    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text("ls -l run1\r")
        assert session_with(pipe).prompt("> ") == "ls -l run1"
    assert "+ls -l run1" in path.read_text()
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text("\x1b[A\r")  # up arrow: the previous session's line
        assert session_with(pipe).prompt("> ") == "ls -l run1"
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        session = session_with(pipe)

        def keys():
            pipe.send_text("ls -")
            wait_for(lambda: session.default_buffer.suggestion is not None)
            pipe.send_text("\x1b[C\r")  # right arrow takes the grey suggestion from history

        feeder = threading.Thread(target=keys, daemon=True)
        feeder.start()
        assert session.prompt("> ") == "ls -l run1"
        feeder.join()


def interactive(
    store, tmp_path, keys: str | list[str], delay: float = 0.2, truecolor: bool = False
) -> tuple[int, str, str, Shell]:
    """Run the interactive shell on piped keys (a string: all at once; a list: one by one, `delay` apart); with
    `truecolor` its console keeps the colours (24-bit SGR codes) in the output."""
    out, err = io.StringIO(), io.StringIO()
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        shell = piped_shell(store, pipe, tmp_path / "hist", out, err)
        if truecolor:
            from rich.console import Console

            shell.ctx.out = Console(
                file=out, force_terminal=True, color_system="truecolor", width=10_000, soft_wrap=True
            )
        if isinstance(keys, str):
            pipe.send_text(keys)
            pipe.close()
            rc = shell.run_interactive()
        else:
            feeder = feed_later(pipe, *keys, delay=delay)
            rc = shell.run_interactive()
            feeder.join()
    return rc, out.getvalue(), err.getvalue(), shell


def test_ctrl_c_clears_the_line_and_ctrl_d_leaves(store, tmp_path):
    rc, out, err, shell = interactive(
        store, tmp_path, ["cd run1\r", "ls half-typed\x03", "pwd\r", "nope\r", "pwd\r", "\x04"]
    )
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("vaultsh s3 shell on ") and "Ctrl-D leaves" in lines[0]
    assert lines[1:] == [f"{store.uri}/run1", f"{store.uri}/run1"]  # `ls half-typed` never ran
    assert err.strip() == "error: unknown command 'nope'; `help` lists commands"


def test_batch_viewer_then_q(store, tmp_path, texts):
    tok, ids = texts
    keys = "cd run1/hook_a\rinspect 0 --no-scan\r2\rt 1\r9\rq\rpwd\r"
    rc, out, err, shell = interactive(store, tmp_path, keys)
    assert rc == 0 and err == "", err
    assert "First 4 batches" in out
    assert f"Batch 2 of {N}: {T} tokens, {T - 5} real, 5 masked" in out
    real = tok.decode(ids[2, : T - 5].tolist())
    masked = tok.decode(ids[2, T - 5 :].tolist())
    assert real in out and f"«{masked}»" in out
    assert f"[{int(ids[1, 0])}]" in out  # `t 1`: token ids and boundaries
    assert f"batch 9 out of range (0-{N - 1})" in out
    assert out.rstrip().splitlines()[-1] == f"{store.uri}/run1/hook_a"  # q left the viewer, the shell went on


def test_rm_asks_and_respects_the_answers(store, tmp_path):
    keys = [
        "rm run1/notes.txt\r",
        "n\r",
        "rm run1/notes.txt\r",
        "y\r",
        "rm run2\r",
        "rm -r run2\r",
        "y\r",
        "wrong\r",
        "rm -r run2\r",
        "y\r",
        "run2\r",
        "\x04",
    ]
    rc, out, err, shell = interactive(store, tmp_path, keys)
    assert rc == 0
    assert not store.exists("run1/notes.txt")
    assert [o.key for o in store.iter_objects("run2/")] == []
    assert "not deleted:" in out and f"deleted 1 object (6 Bytes): {store.uri}/run1/notes.txt" in out
    assert f"deleted 1 object (1 Byte): {store.uri}/run2/" in out
    assert "a directory (prefix) holding objects; `rm -r run2` deletes it after two confirmations" in err
    assert store.exists("rubble.txt") and store.exists("run1/cfg.json")


# -- the batch viewer's heat keys ------------------------------------------------------
SGR = re.compile(r"\x1b\[([0-9;]*)m")


def coloured_chars(ansi: str) -> list[tuple[str, tuple[int, int, int] | None]]:
    """Every printed character of `ansi` with the background colour it was printed on (None: no background)."""
    out: list[tuple[str, tuple[int, int, int] | None]] = []
    bg = None
    pos = 0
    for m in SGR.finditer(ansi + "\x1b[m"):
        out.extend((c, bg) for c in ansi[pos : m.start()])
        pos = m.end()
        codes = [int(c) for c in m.group(1).split(";") if c] or [0]
        k = 0
        while k < len(codes):
            if codes[k] == 0 or codes[k] == 49:
                bg = None
            elif codes[k] == 48 and codes[k + 1] == 2:
                bg = tuple(codes[k + 2 : k + 5])
                k += 4
            elif codes[k] in (38, 48) and codes[k + 1] == 5:
                k += 2
            elif codes[k] == 38 and codes[k + 1] == 2:
                k += 4
            k += 1
    return out


def heat_line(ansi: str, title: str) -> list[tuple[str, tuple[int, int, int] | None]]:
    """The coloured characters of the heat picture printed after the line that contains `title`."""
    plain_lines = SGR.sub("", ansi).split("\n")
    raw_lines = ansi.split("\n")
    i = next((k for k, line in enumerate(plain_lines) if title in line), None)
    assert i is not None, f"no line with {title!r} in {plain_lines}"
    return coloured_chars(raw_lines[i + 1])


def expected_chars(r) -> list[tuple[str, tuple[int, int, int] | None]]:
    from vaultsh.terminal import safe_text

    return [(c, rgb if t.real else None) for t, rgb in zip(r.tokens, r.colours()) for c in safe_text(t.piece)]


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    from . import explorefixtures as fx

    store = LocalStore(tmp_path_factory.mktemp("planted") / "vault")
    return store, fx.build(store)


def test_batch_viewer_heat_keys_colour_the_planted_tokens(planted_store, tmp_path):
    """`h` colours the shown sequence as `view --heat --norm` does (the sink is the hottest token); `d 3` by
    dimension 3 (the planted 50 is the hottest); `h` again goes back to plain text; a bad dimension is one line."""
    from vaultsh.explore.heat import heat
    from vaultsh.explore.values import value_fn

    from . import explorefixtures as fx

    store, data = planted_store
    hook = f"{fx.RUN}/{fx.HOOK}"
    sink_f, sink_s, sink_p = fx.SINK_AT
    dim_f, dim_s, dim_p = fx.DIM_AT
    keys = [
        f"cd {hook}\r",
        f"inspect {sink_f} --no-scan\r",
        f"{sink_s}\r",  # plain text first
        "h\r",  # heat on: the current sequence by token norm
        "d 99\r",  # out of range: one error line, the viewer goes on
        "q\r",
        f"inspect {dim_f} --no-scan\r",
        f"h {dim_s}\r",  # batch dim_s's heat, by norm (the viewer starts plain)
        "d 3\r",  # the same sequence by dimension 3
        "h\r",  # heat off: plain text again
        "q\r",
        "\x04",
    ]
    rc, text, err, _ = interactive(store, tmp_path, keys, delay=0.3, truecolor=True)
    plain = SGR.sub("", text)
    assert rc == 0, err
    assert "heat view on: colour by token norm" in plain and "heat view on: colour by dimension 3" in plain
    assert "heat view off: plain text" in plain
    assert "--dim 99: out of range, d_model is 16" in err

    sink = heat(store, data["keys"][sink_f], sink_s, value_fn(norm=True))
    got = heat_line(text, f"w0000--0000000.safetensors #{sink_s}: norm, scale 0 .. 300")
    assert got == expected_chars(sink)  # every character on the colour view --heat gives its token
    hottest = max(range(len(sink.tokens)), key=lambda p: sink.tokens[p].value if sink.tokens[p].real else -1)
    assert hottest == sink_p and sink.colours()[sink_p] == (255, 0, 0)
    red = "".join(c for c, rgb in got if rgb == (255, 0, 0))
    assert red == sink.tokens[sink_p].piece  # the planted sink, and nothing else, in full red

    by_dim = heat(store, data["keys"][dim_f], dim_s, value_fn(dim=fx.DIM))
    got = heat_line(text, f"w0000--0000002.safetensors #{dim_s}: dim 3, scale -50 .. 50")
    assert got == expected_chars(by_dim)
    red = "".join(c for c, rgb in got if rgb == (255, 0, 0))
    assert red == by_dim.tokens[dim_p].piece and by_dim.tokens[dim_p].value == pytest.approx(50.0)
    by_norm = heat(store, data["keys"][dim_f], dim_s, value_fn(norm=True))
    assert heat_line(text, f"w0000--0000002.safetensors #{dim_s}: norm, scale 0") == expected_chars(by_norm)
    # `h` turned it off: the last page is the plain text of the same sequence
    assert plain.rstrip().split("heat view off: plain text")[-1].lstrip().startswith(f"Batch {dim_s} of {fx.N}")


def test_batch_viewer_colours_by_a_direction_and_an_sae_latent(planted_store, tmp_path):
    """`x FILE` colours as `view --heat --direction FILE` does (e_3 gives dimension 3's picture), `x CKPT F` as
    `--sae CKPT --feature F`; a path keeps its case; a missing file is one error line and the viewer goes on."""
    import numpy as np

    from vaultsh.explore.heat import heat
    from vaultsh.explore.values import value_fn

    from . import explorefixtures as fx

    store, data = planted_store
    dim_f, dim_s, dim_p = fx.DIM_AT
    e = np.zeros(fx.D, dtype=np.float32)
    e[fx.DIM] = 1.0
    direction = tmp_path / "Dir" / "E3.npy"
    direction.parent.mkdir()
    np.save(direction, e)
    ckpt = fx.write_saelens(tmp_path / "sae")
    keys = [
        f"cd {fx.RUN}/{fx.HOOK}\r",
        f"inspect {dim_f} --no-scan\r",
        f"x {direction}\r",
        f"{dim_s}\r",
        f"x {tmp_path / 'nowhere.npy'}\r",
        f"x {ckpt} {fx.FEATURE}\r",
        "q\r",
        "\x04",
    ]
    rc, text, err, _ = interactive(store, tmp_path, keys, delay=0.3, truecolor=True)
    plain = SGR.sub("", text)
    assert rc == 0, err
    assert "heat view on: colour by direction E3.npy" in plain and f"colour by SAE feature {fx.FEATURE}" in plain
    assert len([line for line in err.splitlines() if "nowhere.npy" in line]) == 1
    key = data["keys"][dim_f]
    by_dir = heat(store, key, dim_s, value_fn(direction=str(direction)))
    got = heat_line(text, f"w0000--0000002.safetensors #{dim_s}: direction E3.npy, scale -50 .. 50")
    assert got == expected_chars(by_dir) == expected_chars(heat(store, key, dim_s, value_fn(dim=fx.DIM)))
    by_sae = heat(store, key, dim_s, value_fn(sae=str(ckpt), feature=fx.FEATURE))
    assert heat_line(text, f"#{dim_s}: SAE feature {fx.FEATURE}, scale") == expected_chars(by_sae)
