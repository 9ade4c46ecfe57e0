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
