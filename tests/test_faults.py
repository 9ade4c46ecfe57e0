"""The fault suite (issue 17): kill -9 during steps and during saves, two trainers on one run, a
full disk (a real tmpfs where one can be mounted, and ENOSPC injected into the checkpoint writer
everywhere), an exploding learning rate. The real CLI runs in subprocesses; everything is slow."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_toy_data, markov_tokens, read_metrics, run_gptlab
from gptlab import checkpoint as ck
from gptlab.atomic import is_temporary
from gptlab.config import resolve_train_config
from gptlab.errors import UserError
from gptlab.rundir import RunDir
from gptlab.train import train

pytestmark = pytest.mark.slow

SHAPE = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("data"), 20_000, 200_000)


def common(data_dir, steps: int, *extra: str) -> list[str]:
    return ["train", *SHAPE, "--data", str(data_dir), "--batch-size", "8", "--total-batch-tokens", "256",
            "--max-steps", str(steps), "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "4",
            "--eval-tokens", "1024", "--sample-tokens", "0", "--device", "cpu", *extra]


def by_step_kind(run: Path) -> dict[tuple[int, str], dict]:
    recs = read_metrics(run)
    keys = [(r["step"], r["kind"]) for r in recs]
    assert len(keys) == len(set(keys)), f"a (step, kind) logged twice: {sorted(keys)}"
    return {(r["step"], r["kind"]): r for r in recs}


def assert_same_run(run: Path, ref: Path) -> None:
    """The same records (losses within 1e-6) and the same final weights as the unbroken run."""
    got, want = by_step_kind(run), by_step_kind(ref)
    assert sorted(got) == sorted(want)
    for key, rec in want.items():
        assert abs(got[key]["loss"] - rec["loss"]) <= 1e-6, key
    a = ck.load_model(run)[0].state_dict()
    b = ck.load_model(ref)[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in b)


def assert_no_leftovers(run: Path) -> None:
    names = os.listdir(run / "checkpoints")
    assert all(n == "latest" or n.startswith("step_") for n in names), names
    assert not [n for n in os.listdir(run) if n.endswith(".tmp") or is_temporary(n)]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptlab", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def train_lines(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_text().count('"kind": "train"')
    except FileNotFoundError:
        return 0


def kill_during_save(proc: subprocess.Popen, run: Path, timeout: float = 120) -> bool:
    """SIGKILL the moment a checkpoint is being written, renamed or pruned; False if none was seen."""
    ckdir = run / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            names = os.listdir(ckdir)
        except FileNotFoundError:
            names = []
        if any(n.startswith((".tmp-", ".step_", ".latest")) for n in names):
            proc.kill()
            return True
        time.sleep(0.0005)
    return False


def kill_during_steps(proc: subprocess.Popen, run: Path, rng: random.Random, timeout: float = 120) -> None:
    """SIGKILL after a random delay once this process has logged a step."""
    before = train_lines(run)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and train_lines(run) <= before:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 1.5))
    proc.kill()


def test_random_sigkills_during_steps_and_saves_then_resume_equal_the_unbroken_run(data_dir, tmp_path):
    steps = 14
    args = common(data_dir, steps, "--checkpoint-every", "2", "--keep-checkpoints", "2")
    ref = tmp_path / "unbroken"
    r = run_gptlab(*args, "--out", ref)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "killed"
    rng = random.Random(17)
    hit_saves = 0
    for kind in ["steps", "save", "steps", "save", "save", "steps"]:
        resume = RunDir(run).latest_checkpoint() is not None
        proc = start("train", "--out", run, "--resume") if resume else start(*args, "--out", run)
        if kind == "save":
            hit_saves += kill_during_save(proc, run)
        else:
            kill_during_steps(proc, run, rng)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -9), err
        if proc.returncode == 0:
            break
    assert hit_saves >= 1
    r = run_gptlab("train", "--out", run, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_run(run, ref)
    assert_no_leftovers(run)


def test_a_second_writer_is_refused_and_a_dead_ones_lock_does_not_block(cli, data_dir, tmp_path):
    run = tmp_path / "run"
    first = start(*common(data_dir, 500, "--checkpoint-every", "1"), "--out", run)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and RunDir(run).latest_checkpoint() is None:
            time.sleep(0.05)
        config = (run / "config.json").read_text()
        for second in (common(data_dir, 5, "--n-embd", "64"), ["train", "--resume"]):
            r = cli(*second, "--out", run)
            assert r.returncode == 2, r.stderr
            assert r.stderr.strip() == (f"gptlab train: error: {run} is in use by process {first.pid}; "
                                        f"wait for it to finish or choose another --out")
        assert (run / "config.json").read_text() == config  # the refused runs wrote nothing
    finally:
        first.kill()
        first.communicate()
    step = ck.checkpoint_step(RunDir(run).latest_checkpoint())
    r = cli("train", "--out", run, "--resume", "--max-steps", step + 1)
    assert r.returncode == 0, r.stderr
    assert max(by_step_kind(run))[0] == step + 1


def test_exploding_learning_rate_never_poisons_the_checkpoint_called_good(cli, data_dir, tmp_path):
    """The issue's case: --checkpoint-every 1 --lr 1e6. A finite step whose update blows the
    weights up must not be saved; the message names a checkpoint whose weights give a finite loss."""
    run = tmp_path / "boom"
    r = cli(*common(data_dir, 20, "--checkpoint-every", "1", "--keep-checkpoints", "0", "--lr", "1e6",
                    "--eval-every", "0"), "--out", run)
    assert r.returncode == 2, r.stderr
    error = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "Traceback" not in r.stderr
    good = RunDir(run).latest_checkpoint()
    assert error[0].endswith(f"the last good checkpoint is {good}")
    x = torch.tensor(markov_tokens(33 * 8, 9)).view(8, 33)
    for ckpt in RunDir(run).checkpoints():  # every checkpoint kept gives a finite loss
        model, _ = ck.load_model(ckpt)
        with torch.no_grad():
            _, loss = model(x[:, :-1], x[:, 1:])
        assert torch.isfinite(loss), ckpt
    r = cli("sample", run, "--max-new-tokens", "4", "--seed", "1")
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- a full disk

def _flags(data_dir, out, **kw):
    base = dict(model="tiny", n_layer=1, n_head=2, n_embd=32, seq_len=32, data=str(data_dir), out=str(out),
                batch_size=8, total_batch_tokens=256, max_steps=6, lr=3e-3, warmup_steps=2, eval_every=0,
                sample_tokens=0, checkpoint_every=2, keep_checkpoints=0, device="cpu")
    return {**base, **kw}


def test_enospc_injected_into_the_checkpoint_writer(data_dir, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted this is the full-disk test: the second checkpoint's weights
    file fails half-written with ENOSPC; one error naming the disk, the last checkpoint intact,
    and the run resumes once the 'space' is back, equal to an unbroken run."""
    train(resolve_train_config(_flags(data_dir, tmp_path / "ref")))
    real = ck.save_file
    calls = {"n": 0}

    def fills_up(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] < 2:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", fills_up)
    run = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train(resolve_train_config(_flags(data_dir, run)))
    message = str(info.value)
    assert "\n" not in message and message.startswith("no space left on the disk mounted at /")
    assert f"the last checkpoint {run / 'checkpoints' / 'step_000002'} is intact" in message
    assert f"gptlab train --out {run} --resume" in message
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_000002"]
    monkeypatch.undo()
    train(resolve_train_config({"out": str(run)}), resume=True, resume_flags={})
    assert_same_run(run, tmp_path / "ref")
    assert_no_leftovers(run)


def _namespace_prefix(probe: Path) -> list[str] | None:
    """How this machine lets a test mount a tmpfs of its own (a private mount namespace)."""
    if shutil.which("unshare") is None:
        return None
    probe.mkdir()
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        r = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{probe}'"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            return prefix
    return None


FULL_DISK_SCRIPT = """
set -u
py="$PY -m gptlab"
mount -t tmpfs -o size=30m tmpfs "$DISK"
$py $TRAIN --out "$DISK/run" 2> "$OUT/err1"; echo $? > "$OUT/rc1"
ls -a "$DISK/run/checkpoints" > "$OUT/ls1"
mount -o remount,size=200m "$DISK"
$py train --out "$DISK/run" --resume 2> "$OUT/err2"; echo $? > "$OUT/rc2"
cp -r "$DISK/run" "$OUT/run"
mount -t tmpfs -o size=40k tmpfs "$DISK2"
$py $PREPARE --out "$DISK2/data" 2> "$OUT/err3"; echo $? > "$OUT/rc3"
mount -o remount,size=10m "$DISK2"
$py $PREPARE --out "$DISK2/data" 2> "$OUT/err4"; echo $? > "$OUT/rc4"
cp -r "$DISK2/data" "$OUT/data"
"""


def test_full_tmpfs_during_training_and_prepare(data_dir, tmp_path):
    """A real full disk: a 30 MiB tmpfs holds one checkpoint (about 19.5 MB) of this model but not
    two; a 40 KiB one holds a few shards. One line naming the disk; the run and the prepare
    continue once the disk is made larger, equal to runs that never hit the limit."""
    prefix = _namespace_prefix(tmp_path / "probe")
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here; test_enospc_injected_into_the_checkpoint_writer covers this")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "river", "stone", "light", "wind", "field"]
    rng = random.Random(5)
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(1500)))
    prepare = f"prepare files {corpus} --shard-tokens 2000 --workers 1 --no-progress"
    train_args = " ".join(common(data_dir, 6, "--checkpoint-every", "2", "--keep-checkpoints", "0",
                                 "--eval-every", "0"))
    r = run_gptlab(*prepare.split(), "--out", tmp_path / "ref_data")
    assert r.returncode == 0, r.stderr
    r = run_gptlab(*train_args.split(), "--out", tmp_path / "ref_run")
    assert r.returncode == 0, r.stderr
    out, disk, disk2 = tmp_path / "out", tmp_path / "disk", tmp_path / "disk2"
    for d in (out, disk, disk2):
        d.mkdir()
    env = {**os.environ, "PY": sys.executable, "TRAIN": train_args, "PREPARE": prepare, "OUT": str(out),
           "DISK": str(disk), "DISK2": str(disk2)}
    subprocess.run([*prefix, "sh", "-c", FULL_DISK_SCRIPT], env=env, check=True, timeout=600)
    read = lambda name: (out / name).read_text()  # noqa: E731
    for rc, err, what in (("rc1", "err1", "train"), ("rc3", "err3", "prepare")):
        assert read(rc).strip() == "2", read(err)
        errors = [line for line in read(err).splitlines() if line.startswith(f"gptlab {what}: error:")]
        assert "Traceback" not in read(err) and len(errors) == 1, read(err)
        assert f"no space left on the disk mounted at {disk if what == 'train' else disk2}" in errors[0]
    assert f"the last checkpoint {disk}/run/checkpoints/step_000002 is intact" in read("err1")
    assert sorted(read("ls1").split()) == [".", "..", "latest", "step_000002"]
    assert read("rc2").strip() == "0", read("err2")
    assert_same_run(out / "run", tmp_path / "ref_run")
    assert_no_leftovers(out / "run")
    assert read("rc4").strip() == "0", read("err4")
    shards = lambda d: [(s["file"], s["sha256"]) for s in json.loads((d / "manifest.json").read_text())["shards"]]  # noqa: E731
    assert shards(out / "data") == shards(tmp_path / "ref_data")
