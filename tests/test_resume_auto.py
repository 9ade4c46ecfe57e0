"""`--resume auto`: one command line that starts a run when its directory holds no complete
checkpoint and continues it exactly when it does: what a scheduler's requeue, torchrun's restarts
and a spot-instance supervisor need, since each runs the same command again."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_toy_data, sigterm_at_step
from gptlab.cli import main
from gptlab.rundir import RunDir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("data"), 20_000, 100_000)


def command(data_dir, out, *extra) -> list[str]:
    return ["train", "--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--vocab-size", "320",
            "--data", str(data_dir), "--batch-size", "4", "--total-batch-tokens", "256", "--max-steps", "12",
            "--lr", "1e-2", "--warmup-steps", "3", "--eval-every", "0", "--sample-tokens", "0",
            "--checkpoint-every", "5", "--device", "cpu", "--out", str(out), *extra]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    train = [r for r in records(run) if r["kind"] == "train"]
    assert len(train) == len({r["step"] for r in train}), "a step logged twice"
    return {r["step"]: r["loss"] for r in train}


@pytest.fixture(scope="module")
def unbroken(data_dir, tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("unbroken") / "run"
    assert main(command(data_dir, run)) == 0
    return losses(run)


def test_the_same_command_twice_continues_exactly(data_dir, tmp_path, unbroken, monkeypatch, capsys):
    run = tmp_path / "r"
    cmd = command(data_dir, run, "--resume", "auto")
    with monkeypatch.context() as m:
        sigterm_at_step(m, 7)
        assert main(cmd) == 143  # stopped by SIGTERM, saved at step 7
    assert RunDir(run).latest_checkpoint().name == "step_000007"
    assert "resumed from" not in capsys.readouterr().err
    assert main(cmd) == 0
    assert "step_000007 at step 7" in capsys.readouterr().err
    assert losses(run) == unbroken  # bit-identical floats on the CPU
    # once more, after the end (a requeue of a finished job): nothing is trained or logged again
    assert main(cmd) == 0
    assert losses(run) == unbroken


def test_second_run_says_where_it_resumed(data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "r"
    cmd = command(data_dir, run, "--resume", "auto", "--max-steps", "6")
    with monkeypatch.context() as m:
        sigterm_at_step(m, 3)
        assert main(cmd) == 143
    capsys.readouterr()
    assert main(cmd) == 0
    err = capsys.readouterr().err
    assert f"resumed from {run / 'checkpoints' / 'step_000003'} at step 3" in err


def test_killed_before_the_first_save_starts_afresh(data_dir, tmp_path, unbroken):
    """What a kill before or during the first save leaves: config.json, a metrics log (its last line
    torn), no complete checkpoint, and a half-written temporary one. The same command starts over."""
    run = tmp_path / "r"
    cmd = command(data_dir, run, "--resume", "auto")
    assert main(command(data_dir, run, "--max-steps", "3", "--checkpoint-every", "0")) == 0
    ckdir = run / "checkpoints"
    for p in ckdir.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    half = ckdir / ".tmp-step_000005-4242"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tr')
    assert (run / "config.json").is_file() and RunDir(run).latest_checkpoint() is None
    assert main(cmd) == 0
    assert losses(run) == unbroken  # one record a step: the old log was not appended to
    assert not half.exists()


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_the_same_command(data_dir, tmp_path, unbroken):
    run = tmp_path / "r"
    cmd = command(data_dir, run, "--resume", "auto", "--checkpoint-every", "10")
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=60)
    assert RunDir(run).latest_checkpoint() is None, "killed too late: a checkpoint exists already"
    r = subprocess.run([sys.executable, "-m", "gptlab", *cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed from" not in r.stderr
    assert losses(run) == unbroken


def test_a_changed_model_or_data_order_flag_is_refused_in_one_line(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(command(data_dir, run, "--resume", "auto", "--max-steps", "5")) == 0
    capsys.readouterr()
    assert main(command(data_dir, run, "--resume", "auto", "--max-steps", "5", "--n-embd", "64")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--n-embd would change the model" in err, err
    assert main(command(data_dir, run, "--resume", "auto", "--max-steps", "5", "--seed", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seed would change the data order" in err, err
    # a budget may grow, as with --resume
    assert main(command(data_dir, run, "--resume", "auto", "--max-steps", "6")) == 0
    assert max(losses(run)) == 6


def test_config_file_with_resume_auto(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    conf = tmp_path / "train.json"
    conf.write_text(json.dumps({"n_layer": 1, "lr": 1e-2, "max_steps": 4}))
    cmd = ["train", "--config", str(conf), "--model", "tiny", "--n-head", "2", "--n-embd", "32",
           "--seq-len", "32", "--data", str(data_dir), "--batch-size", "4", "--total-batch-tokens", "256",
           "--eval-every", "0", "--sample-tokens", "0", "--device", "cpu", "--out", str(run), "--resume", "auto"]
    assert main(cmd) == 0
    assert json.loads((run / "config.json").read_text())["train"]["n_layer"] == 1
    conf.write_text(json.dumps({"n_layer": 1, "lr": 1e-2, "max_steps": 6}))
    capsys.readouterr()
    assert main(cmd) == 0
    assert "resumed from" in capsys.readouterr().err and max(losses(run)) == 6
    conf.write_text(json.dumps({"n_layer": 2, "lr": 1e-2, "max_steps": 6}))  # the file's model changed
    assert main(cmd) == 2
    assert "--n-layer would change the model" in capsys.readouterr().err


def test_plain_start_and_bare_resume_keep_their_meaning(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    # bare --resume on a run that never started: refused, as before
    assert main(["train", "--out", str(run), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(command(data_dir, run, "--resume", "auto", "--max-steps", "5")) == 0
    # a plain start into a directory with checkpoints: refused, nothing is overwritten
    before = (run / "metrics.jsonl").read_text()
    assert main(command(data_dir, run, "--max-steps", "5")) == 2
    assert "already holds a run with checkpoints; add --resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before
    # bare --resume still continues with the run's own config, and still refuses --config
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6"]) == 0
    assert max(losses(run)) == 6
    conf = tmp_path / "c.json"
    conf.write_text("{}")
    assert main(["train", "--out", str(run), "--resume", "--config", str(conf)]) == 2
    assert "drop --config" in capsys.readouterr().err


def test_resume_takes_only_auto(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "r"), "--resume", "latest"])
    assert e.value.code == 2 and "--resume auto" in capsys.readouterr().err
    assert main(["train", "--resume", "auto"]) == 2
    assert "--resume auto needs --out RUN" in capsys.readouterr().err


def test_dry_run_with_resume_auto_plans_the_run_it_would_train(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(command(data_dir, run, "--resume", "auto", "--dry-run")) == 0  # a new run: planned
    assert not run.exists()
    assert main(command(data_dir, run, "--resume", "auto", "--max-steps", "2")) == 0
    capsys.readouterr()
    assert main(command(data_dir, run, "--resume", "auto", "--dry-run", "--n-embd", "64")) == 2
    assert "would change the model" in capsys.readouterr().err
