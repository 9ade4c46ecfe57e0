"""Mistakes in the flags of any command: one line on stderr, exit status 2, no usage block; and a
reader that closes the pipe early is not an error."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, says", [
    (["train", "--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    (["train", "--dtype", "zz"], "argument --dtype: invalid choice: 'zz'"),
    (["bench", "--steps", "0"], "argument --steps"),
    (["prepare", "files", "x.txt", "--shard-tokens", "0"], "argument --shard-tokens"),
    (["data", "info"], "the following arguments are required"),
    (["frob"], "invalid choice: 'frob'"),
])
def test_a_bad_flag_is_one_line_and_exit_2(cli, args, says):
    r = cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no usage block before the message
    assert says in lines[0] and "--help" in lines[0] and "usage:" not in r.stderr


def test_a_reader_that_closes_the_pipe_early_is_no_traceback(gptlab_model_dir):
    """`gptlab sample ... | head -c 1`: the closed pipe ends the command quietly (it was a
    BrokenPipeError traceback, exit 1: the OSError handler came first and re-raised it)."""
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "sample", str(gptlab_model_dir), "--prompt", "Hi",
                             "--num-samples", "40", "--max-new-tokens", "40", "--device", "cpu", "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()  # the reader is gone; gptlab still has samples to write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) in (0, 141), err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# ----------------------------------------------------------------------------- issue 24's table
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import make_toy_data  # noqa: E402

TINY = ["--model", "tiny", "--device", "cpu", "--batch-size", "2", "--total-batch-tokens", "256",
        "--eval-every", "0", "--sample-tokens", "0"]


def one_line_error(r, *says):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1, r.stderr
    for s in says:
        assert s in lines[0], r.stderr
    return lines[0]


@pytest.mark.parametrize("args, says", [  # these gave the right message after the usage; one line since Parser
    (["train", "--max-steps", "0"], "argument --max-steps"),
    (["train", "--max-tokens", "5X"], "argument --max-tokens"),
    (["eval", "m", "--val-tokens", "0"], "argument --val-tokens"),
    (["serve", "m", "--port", "99999"], "expected a port from 0 to 65535"),  # was served on 99999 mod 65536
    (["serve", "m", "--port", "-1"], "argument --port"),
])
def test_numeric_flags_are_one_line(cli, args, says):
    r = cli(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert says in r.stderr and "usage:" not in r.stderr


def read_only_under(monkeypatch, root: Path) -> None:
    """Writes under `root` fail as on a read-only mount (EROFS): creating directories and opening
    files for writing. (chmod cannot stand in for it: the suite may run as root.)"""
    real_mkdir, real_open = os.mkdir, os.open
    inside = lambda p: os.path.abspath(p).startswith(str(root))  # noqa: E731

    def mkdir(path, *a, **k):
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **k)

    def open_(path, flags, *a, **k):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("command", ["train", "export", "prepare"])
def test_a_read_only_out_is_one_line_naming_the_path_and_disk(cli, monkeypatch, tmp_path, gptlab_model_dir,
                                                                 command):
    """--out on a read-only file system: an OSError [Errno 30] traceback, exit 1, before."""
    data = make_toy_data(tmp_path / "data")
    (tmp_path / "a.txt").write_text("some text to tokenize\n" * 20)
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only_under(monkeypatch, ro)
    out = ro / "out"
    args = {"train": ["train", *TINY, "--data", data, "--max-steps", "1", "--out", out],
            "export": ["export", gptlab_model_dir, "--out", out],
            "prepare": ["prepare", "files", tmp_path / "a.txt", "--out", out, "--no-progress"]}[command]
    line = one_line_error(cli(*args), "read-only file system", "the disk mounted at")
    assert str(ro) in line


def test_a_full_disk_during_export_is_one_line(cli, monkeypatch, tmp_path, gptlab_model_dir):
    """safetensors' own error for ENOSPC (not an OSError) was a SafetensorError traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    one_line_error(cli("export", gptlab_model_dir, "--out", tmp_path / "exp"), "no space left on the disk")
    assert not (tmp_path / "exp").exists()


def test_a_config_file_value_of_the_wrong_type_names_the_field(cli, tmp_path):
    """{"lr": "fast"} was a TypeError traceback from a comparison deep in validate()."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lr": "fast"}))
    one_line_error(cli("train", "--config", cfg, "--out", tmp_path / "r"), "lr must be a number", '"fast"')
    cfg.write_text(json.dumps({"max_steps": 2.5}))
    one_line_error(cli("train", "--config", cfg, "--out", tmp_path / "r"), "max_steps must be an integer")


def test_the_python_config_keeps_its_types(tmp_path):
    from gptlab.config import resolve_train_config

    cfg = resolve_train_config({"batch_size": "auto", "lr": 1, "max_steps": None, "model": "tiny"})
    assert cfg.batch_size == "auto" and cfg.lr == 1


def test_export_is_world_readable_like_its_neighbours(cli, tmp_path, gptlab_model_dir):
    """safetensors wrote model.safetensors 0600 beside 0644 files."""
    old = os.umask(0o022)
    try:
        assert cli("export", gptlab_model_dir, "--out", tmp_path / "exp").returncode == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "exp").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_sample_keeps_the_prompt_and_caps_the_new_tokens(cli, gptlab_model_dir):
    """--max-new-tokens 100000 kept only the prompt's last token, yet printed the prompt as if
    seen; now the new tokens are capped to the context (64) after the whole prompt."""
    r = cli("sample", gptlab_model_dir, "--prompt", "ROMEO:", "--max-new-tokens", "100000", "--json",
            "--temperature", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    n_prompt = 3  # "ROMEO:" is R-OME-O: in GPT-2's tokens
    from gptlab.tokenizer import get_tokenizer
    assert len(get_tokenizer().encode("ROMEO:")) == n_prompt
    assert f"only {64 - n_prompt + 1} new tokens fit" in r.stderr and "keeping its last" not in r.stderr
    tokens = json.loads(r.stdout)["samples"][0]["tokens"]
    assert len(tokens) <= 64 - n_prompt + 1


def test_prepare_warns_about_an_empty_corpus(cli, tmp_path):
    """An empty file was "prepared 1 shards, 1 tokens", exit 0, without a word."""
    (tmp_path / "empty.txt").write_text("")
    r = cli("prepare", "files", tmp_path / "empty.txt", "--out", tmp_path / "d", "--no-progress")
    assert "warning: the corpus is empty" in r.stderr, r.stderr


def test_serve_on_every_interface_without_a_key_warns(cli, monkeypatch, gptlab_model_dir):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # listen, then return
    r = cli("serve", gptlab_model_dir, "--host", "0.0.0.0", "--port", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "warning: listening on 0.0.0.0" in r.stderr and "--api-key" in r.stderr
    r = cli("serve", gptlab_model_dir, "--host", "127.0.0.1", "--port", "0", "--device", "cpu")
    assert "warning" not in r.stderr
    r = cli("serve", gptlab_model_dir, "--host", "0.0.0.0", "--port", "0", "--device", "cpu", "--api-key", "k")
    assert "warning" not in r.stderr


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 4-step tiny run with a checkpoint at step 2 and at the end."""
    from gptlab.cli import main

    d = tmp_path_factory.mktemp("short")
    data = make_toy_data(d / "data")
    run = d / "run"
    assert main([*map(str, ["train", *TINY, "--data", data, "--max-steps", "4", "--warmup-steps", "1",
                            "--checkpoint-every", "2", "--out", run])]) == 0
    return run


def test_resume_names_the_real_shape_not_none(cli, short_run):
    """`--resume --n-layer 3` on a tiny (4-layer) run said "(None -> 3)"."""
    line = one_line_error(cli("train", "--resume", "--out", short_run, "--n-layer", "3"), "--n-layer")
    assert "(4 -> 3)" in line and "None" not in line


def test_resume_that_rescales_the_schedule_warns(cli, short_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    r = cli("train", "--resume", "--out", run, "--max-steps", "6")
    assert r.returncode == 0, r.stderr
    assert "the run was 4 steps and now is 6" in r.stderr and "rescaled" in r.stderr, r.stderr


def test_a_full_disk_before_the_first_checkpoint_never_says_none(cli, monkeypatch, tmp_path):
    """It said "the last checkpoint None is intact ... continue with --resume" (which then failed)."""
    from gptlab import checkpoint

    def full(*a, **k):
        raise checkpoint.DiskFullError(tmp_path)
    monkeypatch.setattr(checkpoint, "save_checkpoint", full)
    data = make_toy_data(tmp_path / "data")
    line = one_line_error(cli("train", *TINY, "--data", data, "--max-steps", "1", "--out", tmp_path / "r"),
                          "no checkpoint was saved before it")
    assert "None" not in line and "--resume\n" not in line


def test_a_diverged_last_step_before_any_checkpoint_never_says_none(cli, tmp_path):
    data = make_toy_data(tmp_path / "data")
    r = cli("train", *TINY, "--data", data, "--max-steps", "1", "--warmup-steps", "0", "--lr", "1e6",
            "--skip-nonfinite", "5", "--out", tmp_path / "r")
    assert r.returncode != 0
    assert "checkpoint None" not in r.stderr and "is None" not in r.stderr, r.stderr


def test_a_seq_len_beyond_the_preset_warns_with_numbers(cli, tmp_path):
    data = make_toy_data(tmp_path / "data")
    r = cli("train", *TINY, "--data", data, "--seq-len", "256", "--batch-size", "1", "--max-steps", "1",
            "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert "warning: --seq-len 256 is 2x the tiny preset's context of 128" in r.stderr, r.stderr
    r = cli("train", *TINY, "--data", data, "--seq-len", "1000000", "--batch-size", "1",
            "--total-batch-tokens", "1000000", "--max-steps", "1", "--out", tmp_path / "r2")
    one_line_error(r, "1000001 tokens")  # more than the data holds: refused


def test_bench_bf16_on_a_cpu_says_it_is_emulated(cli, monkeypatch):
    from gptlab import runtime

    monkeypatch.setattr(runtime, "native_bf16_matmul", lambda device: False)
    import gptlab.bench
    monkeypatch.setattr(gptlab.bench, "native_bf16_matmul", lambda device: False, raising=False)
    r = cli("bench", "--model", "tiny", "--device", "cpu", "--dtype", "bf16", "--batch-size", "1",
            "--steps", "1", "--warmup", "0", "--no-compile")
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stderr.splitlines() if "bf16 is emulated" in ln], r.stderr

