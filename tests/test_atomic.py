"""atomic.py: a replaced file and a staged directory appear whole or not at all, temporary names
have one spelling, leftovers are cleaned at startup, and no other module renames temporaries."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gptlab
from gptlab import atomic
from gptlab.atomic import (DiskFullError, StagedDir, is_temporary, remove_dir, remove_leftovers, replaced_file,
                           staged_dir, temp_name, temp_path, write_bytes, write_json, write_text)

PKG = Path(gptlab.__file__).parent


class Boom(Exception):
    pass


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------- the one spelling

def test_temporary_names_have_one_spelling():
    pid = os.getpid()
    assert temp_name("step_000010") == f".step_000010.tmp-{pid}"
    assert temp_path(Path("a/config.json")) == Path(f"a/.config.json.tmp-{pid}")
    assert is_temporary(temp_name("config.json")) and is_temporary(".x.tmp-1")
    for name in ("config.json", "x.tmp", ".tmp-step_000001-12", ".x.12.tmp", ".x.old-12", ".x.tmp-",
                 ".x.tmp-12a", "x.tmp-12", ".tmp-12", ".lock"):
        assert not is_temporary(name), name


def test_remove_leftovers_takes_temporaries_and_only_the_named_old_spellings(tmp_path):
    (tmp_path / ".big.tmp-5").mkdir()
    (tmp_path / ".big.tmp-5" / "w").write_bytes(b"x")
    (tmp_path / ".a.json.tmp-6").write_text("{")
    (tmp_path / "a.json.tmp").write_text("{")
    (tmp_path / "other.tmp").write_text("mine")
    (tmp_path / "a.json").write_text("{}")
    removed = remove_leftovers(tmp_path, re.compile(r"a\.json\.tmp"))
    assert [p.name for p in removed] == [".a.json.tmp-6", ".big.tmp-5", "a.json.tmp"]
    assert names(tmp_path) == ["a.json", "other.tmp"]
    assert remove_leftovers(tmp_path / "missing") == []
    for name in (".a.json.tmp-7", ".notes.txt.tmp-7"):
        (tmp_path / name).write_text("x")
    removed = remove_leftovers(tmp_path, targets=re.compile(r"a\.json"))  # only the temporaries of a.json
    assert [p.name for p in removed] == [".a.json.tmp-7"]
    assert names(tmp_path) == [".notes.txt.tmp-7", "a.json", "other.tmp"]


# ----------------------------------------------------------------------------- a replaced file

@pytest.mark.parametrize("existed", [False, True])
def test_replaced_file_is_all_or_nothing_when_the_writer_raises_midway(tmp_path, existed):
    target = tmp_path / "data.bin"
    if existed:
        target.write_bytes(b"old")
    with pytest.raises(Boom):
        with replaced_file(target, "wb") as f:
            f.write(b"new, half")
            f.flush()
            assert target.read_bytes() == b"old" if existed else not target.exists()  # nothing shows yet
            raise Boom
    assert (target.read_bytes() == b"old") if existed else not target.exists()
    assert names(tmp_path) == (["data.bin"] if existed else [])  # and no temporary is left


def test_replaced_file_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with replaced_file(target, "w") as f:
        f.write("héllo\n")
        assert is_temporary(Path(f.name).name) and Path(f.name).parent == tmp_path
    assert target.read_text(encoding="utf-8") == "héllo\n" and names(tmp_path) == ["t.txt"]
    write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    write_text(target, "x")
    assert target.read_text() == "x"
    write_json(target, {"b": 1, "a": [2]}, sort_keys=True)
    assert target.read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert names(tmp_path) == ["t.txt"]
    with pytest.raises(ValueError, match="mode"):
        with replaced_file(target, "a"):
            pass


def test_replaced_file_on_a_full_disk_is_one_error_naming_the_target(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("{}")
    with pytest.raises(DiskFullError, match=f"no space left on the disk mounted at .* while writing {target}$"):
        with replaced_file(target, "w") as f:
            f.write("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "{}" and names(tmp_path) == ["config.json"]


def test_a_kill_while_writing_leaves_the_old_file_and_a_temporary_that_startup_removes(tmp_path):
    target = tmp_path / "state.json"
    target.write_text('{"step": 1}')
    code = textwrap.dedent(f"""
        import sys, time
        from gptlab.atomic import replaced_file
        with replaced_file({str(target)!r}, "w") as f:
            f.write('{{"step": 2, "half')
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert json.loads(target.read_text()) == {"step": 1}
    assert names(tmp_path) == sorted([f".state.json.tmp-{proc.pid}", "state.json"])
    assert [p.name for p in remove_leftovers(tmp_path)] == [f".state.json.tmp-{proc.pid}"]
    assert names(tmp_path) == ["state.json"]


# ----------------------------------------------------------------------------- a staged directory

def test_staged_dir_never_appears_half_written(tmp_path):
    target = tmp_path / "step_000002"
    with pytest.raises(Boom):
        with staged_dir(target) as tmp:
            assert is_temporary(tmp.name) and tmp.parent == tmp_path
            (tmp / "config.json").write_text("{}")
            assert not target.exists()  # filling it shows nothing under the final name
            raise Boom
    assert names(tmp_path) == []


def test_staged_dir_replaces_an_existing_directory_only_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(Boom):
        with staged_dir(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise Boom
    assert names(tmp_path) == ["export"] and names(target) == ["old.txt"]
    with staged_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "deep.txt").write_text("deep")  # nested files are flushed too
        (tmp / "new.txt").write_text("new")
        assert names(target) == ["old.txt"]
    assert names(tmp_path) == ["export"] and names(target) == ["new.txt", "sub"]
    assert (target / "sub" / "deep.txt").read_text() == "deep"


def test_staged_dir_on_a_full_disk_is_one_error_and_removes_the_temporary(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(DiskFullError, match=f"while writing {target}$"):
        with staged_dir(target) as tmp:
            (tmp / "w").write_bytes(b"x")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert names(tmp_path) == []


def test_a_failed_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "d"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the new directory onto the final name
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        with staged_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert calls[0] == ("d", temp_name("d.old"))
    assert names(tmp_path) == ["d"] and names(target) == ["old.txt"]


def test_staged_dir_in_two_steps_publishes_or_discards(tmp_path):
    stage = StagedDir(tmp_path / "sub" / "step_000001")  # parents are made
    tmp = stage.create()
    (tmp / "a").write_text("a")
    assert not stage.path.exists()
    assert stage.publish() == tmp_path / "sub" / "step_000001"
    assert names(stage.path) == ["a"] and names(tmp_path / "sub") == ["step_000001"]
    other = StagedDir(tmp_path / "sub" / "step_000002")
    other.create()
    other.discard()
    assert names(tmp_path / "sub") == ["step_000001"]


def test_remove_dir_renames_before_it_deletes(tmp_path, monkeypatch):
    d = tmp_path / "step_000001"
    d.mkdir()
    (d / "w").write_bytes(b"x")
    seen = []
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda p, ignore_errors=False: seen.append(Path(p)))
    remove_dir(d)  # a kill at rmtree: only a temporary is left
    assert [p.name for p in seen] == [temp_name("step_000001.deleting")] and not d.exists()
    monkeypatch.undo()
    remove_leftovers(tmp_path)
    assert names(tmp_path) == []


# ----------------------------------------------------------------------------- startup clean-up

def test_a_resume_removes_temporaries_of_both_spellings(tmp_path):
    """What killed saves left, in this spelling and in the earlier ones, is gone after a resume;
    the run continues from its complete checkpoint, and a user's look-alike file stays."""
    from conftest import make_toy_data
    from gptlab.config import resolve_train_config
    from gptlab.rundir import RunDir
    from gptlab.train import train

    data = make_toy_data(tmp_path / "data", 10_000, 50_000)
    run = RunDir(tmp_path / "run")
    flags = dict(model="tiny", n_layer=1, n_head=2, n_embd=32, seq_len=32, data=str(data), out=str(run.path),
                 batch_size=2, total_batch_tokens=64, max_steps=4, lr=1e-2, warmup_steps=1, eval_every=0,
                 eval_tokens=512, sample_tokens=0, checkpoint_every=2, device="cpu")
    train(resolve_train_config(flags))
    ck = run.checkpoints_dir
    remove_dir(ck / "step_000004")  # as if killed after step 2's save
    (ck / "latest").write_text("step_000002\n")
    half = ck / ".step_000003.tmp-99999"  # a save killed halfway, this spelling
    half.mkdir()
    (half / "config.json").write_text("{")
    old = ck / ".tmp-step_000003-99998"  # the same, as today's main spelt it
    old.mkdir()
    for p in (ck / ".latest.tmp-99999", ck / ".latest.tmp", run.path / ".config.json.tmp-99999",
              run.path / "config.json.tmp", run.path / "user.tmp"):
        p.write_text("x")
    train(resolve_train_config({"out": str(run.path)}), resume=True, resume_flags={})
    assert names(ck) == ["latest", "step_000002", "step_000004"]
    assert not [n for n in names(run.path) if is_temporary(n) or n == "config.json.tmp"]
    assert (run.path / "user.tmp").exists()


# ----------------------------------------------------------------------------- the rule holds

def renames_outside_atomic(tree: ast.Module) -> list[int]:
    """Lines that rename or replace a file themselves: os.replace/os.rename/os.renames,
    shutil.move, tempfile.mkstemp/NamedTemporaryFile, and Path.rename / Path.replace (a method
    `replace` with one argument and no keywords: str.replace takes two)."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        attr, owner = node.func.attr, node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else None
        if owner_name == "os" and attr in ("replace", "rename", "renames"):
            lines.append(node.lineno)
        elif owner_name == "shutil" and attr == "move":
            lines.append(node.lineno)
        elif owner_name == "tempfile" and attr in ("mkstemp", "NamedTemporaryFile"):
            lines.append(node.lineno)
        elif attr == "rename" or (attr == "replace" and len(node.args) == 1 and not node.keywords):
            lines.append(node.lineno)
    return lines


def test_the_rule_finder_finds_renames():
    code = ("import os, shutil\nos.replace(a, b)\np.rename(q)\ntmp.replace(path)\nshutil.move(a, b)\n"
            "s.replace('a', 'b')\ndataclasses.replace(cfg, lr=1)\n")
    assert renames_outside_atomic(ast.parse(code)) == [2, 3, 4, 5]


def test_only_atomic_renames_temporaries_into_place():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "atomic.py" and path.parent == PKG:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        found += [f"{path.relative_to(PKG)}:{line}" for line in renames_outside_atomic(tree)]
    assert not found, ("write through gptlab.atomic (replaced_file, staged_dir, remove_dir) instead of "
                       "renaming temporaries: " + ", ".join(found))
