"""LocalStore specifics: file modes, durability, S3-like directory semantics, key clashes.

The Store protocol itself is tested on both stores in test_store.py; this file
pins what a filesystem would otherwise do differently from S3.
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import vaultsh.store.local as local_mod
from vaultsh.errors import NotFoundError, StoreError
from vaultsh.store import LocalStore


def keys(infos) -> list[str]:
    return [i.key for i in infos]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


# -- (a) modes ---------------------------------------------------------------
@pytest.mark.parametrize("how", ["put_bytes", "put_file", "put_stream"])
def test_written_files_get_the_umask_mode_not_0600(local_store, tmp_path, umask_027, how):
    src = tmp_path / "src.bin"
    src.write_bytes(b"data")
    if how == "put_bytes":
        local_store.put_bytes("run/h/a.bin", b"data")
    elif how == "put_file":
        local_store.put_file("run/h/a.bin", src)
    else:
        local_store.put_stream("run/h/a.bin", lambda f: f.write(b"data"))
    assert mode(local_store.root / "run/h/a.bin") == 0o666 & ~0o027 == 0o640
    # the same as a plain open() under that umask
    (tmp_path / "plain").write_bytes(b"x")
    assert mode(tmp_path / "plain") == 0o640


def test_mode_follows_a_changed_umask(local_store):
    old = os.umask(0o002)
    try:
        local_store.put_bytes("a.bin", b"x")
        assert mode(local_store.root / "a.bin") == 0o664
        os.umask(0o077)
        local_store.put_bytes("a.bin", b"y")  # an overwrite gets the mode anew
        assert mode(local_store.root / "a.bin") == 0o600
    finally:
        os.umask(old)


def test_get_file_mode_and_no_temp_left(local_store, tmp_path, umask_027):
    local_store.put_bytes("k.bin", b"payload")
    dest = tmp_path / "out" / "k.bin"
    local_store.get_file("k.bin", dest)
    assert dest.read_bytes() == b"payload"
    assert mode(dest) == 0o640
    assert os.listdir(dest.parent) == ["k.bin"]


# -- (b) durability: the directory is fsynced after the rename ---------------
def test_parent_directory_fsynced_after_rename(local_store, monkeypatch):
    events: list[tuple[str, str]] = []
    real_replace, real_fsync_dir = os.replace, local_mod._fsync_dir

    def replace(src, dst, *a, **kw):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst, *a, **kw)

    def fsync_dir(path):
        events.append(("fsync_dir", os.fspath(path)))
        return real_fsync_dir(path)

    monkeypatch.setattr(local_mod.os, "replace", replace)
    monkeypatch.setattr(local_mod, "_fsync_dir", fsync_dir)
    local_store.put_bytes("new/deep/k.bin", b"x")
    final = str(local_store.root / "new/deep/k.bin")
    assert events[0] == ("replace", final)
    synced = [p for kind, p in events[1:] if kind == "fsync_dir"]
    # the file's directory first, then the parents of each directory this write created
    assert synced[0] == str(local_store.root / "new/deep")
    assert str(local_store.root) in synced and str(local_store.root / "new") in synced


def test_fsync_dir_really_fsyncs(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(local_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    local_mod._fsync_dir(tmp_path)
    assert len(calls) == 1


# -- (c) no phantom prefixes -------------------------------------------------
def test_delete_removes_emptied_directories_up_to_the_root(local_store):
    local_store.put_bytes("run/hook/a.bin", b"a")
    local_store.put_bytes("run/keep.json", b"{}")
    local_store.delete("run/hook/a.bin")
    assert not (local_store.root / "run/hook").exists()
    assert (local_store.root / "run").is_dir()  # still holds keep.json
    assert local_store.list_dir("run/").prefixes == []
    local_store.delete("run/keep.json")
    assert not (local_store.root / "run").exists()
    assert local_store.root.is_dir()  # never the root itself
    assert os.listdir(local_store.root) == []
    assert local_store.list_dir() == local_store.list_dir("")
    assert local_store.list_dir().prefixes == [] and local_store.list_dir().objects == []


def test_delete_keeps_directories_with_other_objects(local_store):
    local_store.put_bytes("a/b/1.bin", b"1")
    local_store.put_bytes("a/b/c/2.bin", b"2")
    local_store.delete("a/b/c/2.bin")
    assert keys(local_store.iter_objects()) == ["a/b/1.bin"]
    assert local_store.list_dir("a/b/").prefixes == []
    assert not (local_store.root / "a/b/c").exists()


def test_list_dir_hides_directories_without_objects(local_store):
    """Whatever left them (a crash, a failed write, a hand-made mkdir), empty dirs are no prefixes."""
    local_store.put_bytes("run/h/a.bin", b"a")
    (local_store.root / "run/empty/deeper").mkdir(parents=True)
    (local_store.root / "ghost").mkdir()
    (local_store.root / "run/tmponly").mkdir()
    (local_store.root / "run/tmponly/.x.vaultsh-tmp").write_bytes(b"half")
    assert local_store.list_dir().prefixes == ["run/"]
    assert local_store.list_dir("run/").prefixes == ["run/h/"]


def test_failed_write_leaves_no_object_and_no_prefix(local_store):
    def boom(f):
        f.write(b"partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        local_store.put_stream("fresh/dir/k.bin", boom)
    assert list(local_store.iter_objects()) == []
    assert local_store.list_dir().prefixes == []
    assert local_store.list_dir("fresh/").prefixes == []


def test_concurrent_writes_and_deletes_in_one_directory(local_store):
    """A delete pruning an emptied directory never breaks a write into it."""
    errors: list[BaseException] = []

    def churn(i: int) -> None:
        try:
            for j in range(40):
                key = f"shared/dir/w{i}-{j}.bin"
                local_store.put_bytes(key, b"x")
                local_store.delete(key)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(churn, range(8)))
    assert errors == []
    assert list(local_store.iter_objects()) == []
    assert local_store.list_dir().prefixes == []


# -- (d) key clashes -----------------------------------------------------------
def test_object_over_a_prefix_is_a_store_error(local_store):
    local_store.put_bytes("a/inner.bin", b"x")
    with pytest.raises(StoreError) as exc_info:
        local_store.put_bytes("a", b"y")
    msg = str(exc_info.value)
    assert not isinstance(exc_info.value, OSError)
    assert "'a'" in msg and "'a/'" in msg and "\n" not in msg
    assert local_store.get_bytes("a/inner.bin") == b"x"
    assert not local_store.exists("a")
    assert [n for n in os.listdir(local_store.root)] == ["a"]  # no temp file left behind


def test_prefix_under_an_object_is_a_store_error(local_store, tmp_path):
    local_store.put_bytes("c", b"file")
    src = tmp_path / "src.bin"
    src.write_bytes(b"data")
    for attempt in (
        lambda: local_store.put_bytes("c/d", b"x"),
        lambda: local_store.put_file("c/d/e.bin", src),
        lambda: local_store.put_stream("c/d", lambda f: f.write(b"x")),
    ):
        with pytest.raises(StoreError) as exc_info:
            attempt()
        msg = str(exc_info.value)
        assert "'c'" in msg and "already an object" in msg
    assert local_store.get_bytes("c") == b"file"
    assert keys(local_store.iter_objects()) == ["c"]


def test_object_over_an_empty_directory_is_fine(local_store):
    (local_store.root / "e").mkdir()  # no objects under it: not a prefix (as on S3)
    local_store.put_bytes("e", b"now an object")
    assert local_store.get_bytes("e") == b"now an object"


def test_key_ending_in_slash_cannot_be_written(local_store):
    with pytest.raises(StoreError, match="invalid key"):
        local_store.put_bytes("x/", b"data")
    assert list(local_store.iter_objects()) == []


# -- (e) get_file is atomic ------------------------------------------------------
def test_get_file_failure_keeps_the_old_destination(local_store, tmp_path, monkeypatch):
    local_store.put_bytes("k.bin", b"new contents")
    dest = tmp_path / "dl" / "k.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old contents")

    def failing_copy(src, dst, length=0):
        dst.write(b"half")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(local_mod.shutil, "copyfileobj", failing_copy)
    with pytest.raises(OSError):
        local_store.get_file("k.bin", dest)
    assert dest.read_bytes() == b"old contents"
    assert os.listdir(dest.parent) == ["k.bin"]  # the temp file is gone
    monkeypatch.undo()
    local_store.get_file("k.bin", dest)
    assert dest.read_bytes() == b"new contents"


def test_get_file_never_shows_a_partial_file(local_store, tmp_path, monkeypatch):
    """While the copy runs, the final name does not exist yet."""
    local_store.put_bytes("k.bin", b"x" * 1000)
    dest = tmp_path / "k.bin"
    seen = {}
    real = local_mod.shutil.copyfileobj

    def spying_copy(src, dst, length=0):
        real(src, dst, length)
        seen["exists_during_copy"] = dest.exists()

    monkeypatch.setattr(local_mod.shutil, "copyfileobj", spying_copy)
    local_store.get_file("k.bin", dest)
    assert seen["exists_during_copy"] is False
    assert dest.read_bytes() == b"x" * 1000


# -- (f) directory-ish keys name no object ---------------------------------------
def test_directory_keys_are_not_found(local_store, tmp_path):
    local_store.put_bytes("x", b"an object")
    local_store.put_bytes("d/inner.bin", b"inner")
    for key in ("x/", "d", "d/", ""):
        with pytest.raises(NotFoundError):
            local_store.head(key)
        with pytest.raises(NotFoundError):
            local_store.get_bytes(key)
        with pytest.raises(NotFoundError):
            local_store.get_range(key, 0, 4)
        with pytest.raises(NotFoundError):
            local_store.open_read(key)
        with pytest.raises(NotFoundError):
            local_store.get_file(key, tmp_path / "out.bin")
        assert not local_store.exists(key)
    with pytest.raises(NotFoundError, match="a directory"):
        local_store.head("d/")
    local_store.delete("x/")  # names no object: nothing happens
    local_store.delete("d")
    assert keys(local_store.iter_objects()) == ["d/inner.bin", "x"]


def test_read_errors_are_store_errors(local_store, monkeypatch):
    local_store.put_bytes("k.bin", b"x")

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(local_mod.Path, "read_bytes", denied)
    with pytest.raises(StoreError, match="cannot read .*k.bin: Permission denied"):
        local_store.get_bytes("k.bin")


def test_umask_is_read_without_changing_it():
    old = os.umask(0o037)
    try:
        seen = []
        t = threading.Thread(target=lambda: seen.append(local_mod._umask()))
        t.start()
        t.join()
        assert seen == [0o037]
        assert local_mod._new_file_mode() == 0o640
    finally:
        os.umask(old)


def test_repr(local_store):
    assert repr(local_store) == f"LocalStore({str(local_store.root)!r})"
    assert isinstance(local_store, LocalStore)
