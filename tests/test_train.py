"""Training end to end on tiny CPU configs: the loss falls, resume is exact, errors are clear."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_toy_data, markov_tokens, read_metrics, run_gptlab, sigterm_after, write_shard
from gptlab import checkpoint as ck
from gptlab.rundir import RunDir
from gptlab.config import resolve_train_config
from gptlab.errors import UserError
from gptlab.train import train

SMALL = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--vocab-size", "320"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("data"), 20_000, 200_000)


def flags(data_dir, out, **kw):
    base = dict(model="tiny", n_layer=1, n_head=2, n_embd=32, seq_len=32, data=str(data_dir), out=str(out),
                batch_size=4, total_batch_tokens=256, max_steps=30, lr=1e-2, warmup_steps=3, eval_every=0,
                eval_tokens=2048, sample_tokens=0, checkpoint_every=0, device="cpu")
    base.update(kw)
    return base


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run, "train")}


def test_loss_falls(data_dir, tmp_path):
    res = train(resolve_train_config(flags(data_dir, tmp_path / "run", eval_every=15, sample_tokens=4)))
    ls = losses(tmp_path / "run")
    assert len(ls) == 30
    assert ls[1] > 10.0  # about ln(50257) at the start
    assert np.mean([ls[s] for s in range(26, 31)]) < ls[1] - 3.0
    assert res.val_loss is not None and res.val_loss < 7.5
    run = tmp_path / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["n_embd"] == 32 and cfg["train"]["lr"] == 1e-2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000030"
    assert (run / "samples.txt").read_text().count("=== step") == 2
    assert sorted(p.name for p in (run / "plots").glob("*.png")) >= ["loss.png", "lr.png", "throughput.png"]
    rec = read_metrics(run)[0]
    assert {"step", "kind", "loss", "lr", "grad_norm", "tokens", "tok_per_s", "mfu", "time"} <= set(rec)


def test_overfit_batch_drives_loss_down(data_dir, tmp_path):
    res = train(resolve_train_config(flags(data_dir, tmp_path / "o", overfit_batch=True, max_steps=150,
                                           lr=1e-2, schedule="constant", vocab_size=320)))
    assert res.final_loss < 0.5


def test_resume_in_process_equals_unbroken(data_dir, tmp_path):
    train(resolve_train_config(flags(data_dir, tmp_path / "full", max_steps=12, vocab_size=320)))
    train(resolve_train_config(flags(data_dir, tmp_path / "part", max_steps=12, checkpoint_every=5, vocab_size=320)))
    # throw away everything after step 5 and resume from its checkpoint
    ckdir = tmp_path / "part" / "checkpoints"
    for p in ckdir.glob("step_*"):
        if p.name != "step_000005":
            import shutil
            shutil.rmtree(p)
    (ckdir / "latest").write_text("step_000005\n")
    train(resolve_train_config({"out": str(tmp_path / "part")}), resume=True, resume_flags={})
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert full == part  # bit-identical floats on CPU


@pytest.mark.slow
def test_sigterm_then_resume_is_exact(data_dir, tmp_path):
    common = ["train", *SMALL, "--data", str(data_dir), "--batch-size", "4", "--total-batch-tokens", "256",
              "--max-steps", "40", "--lr", "3e-3", "--warmup-steps", "3", "--eval-every", "0",
              "--sample-tokens", "0", "--checkpoint-every", "0", "--device", "cpu"]
    r = run_gptlab(*common, "--out", str(tmp_path / "full"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "stopped"
    code, err = sigterm_after([*common, "--out", run], run / "metrics.jsonl", lines=5, timeout=120)
    assert code == 143, err
    assert "--resume" in err
    stopped_at = int(RunDir(run).latest_checkpoint().name.split("_")[1])
    assert 5 <= stopped_at < 40
    r = run_gptlab("train", "--out", str(run), "--resume")
    assert r.returncode == 0, r.stderr
    assert losses(run) == losses(tmp_path / "full")


def test_vocab_size_gives_a_fresh_model_a_smaller_vocabulary(cli, data_dir, tmp_path):
    """--vocab-size (new): the toy data's ids are all below 300, so a 320-id model trains on it; ids
    at or above a smaller vocabulary are one line naming the shard; a resume cannot change it."""
    args = ["train", *SMALL, "--data", str(data_dir), "--batch-size", "4", "--total-batch-tokens", "128",
            "--max-steps", "2", "--eval-every", "2", "--eval-tokens", "512", "--sample-tokens", "0", "--device", "cpu"]
    r = cli(*args, "--out", str(tmp_path / "v"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 320 and cfg["train"]["vocab_size"] == 320
    from gptlab.checkpoint import load_model

    model, _ = load_model(str(tmp_path / "v"))
    assert model.transformer.wte.weight.shape[0] == 320  # a multiple of 64 already
    small = [a if a != "320" else "100" for a in args]
    r = cli(*small, "--out", str(tmp_path / "w"))
    assert r.returncode == 2 and "outside the model's vocabulary of 100" in r.stderr
    assert "Traceback" not in r.stderr and sum("error" in line for line in r.stderr.splitlines()) == 1
    # it cannot read text: sampling from it is one line, not an IndexError
    r = cli("sample", str(tmp_path / "v"), "--max-new-tokens", "2", "--device", "cpu")
    assert r.returncode == 2 and "outside the model's vocabulary of 320" in r.stderr, r.stderr
    r = cli("train", "--out", str(tmp_path / "v"), "--resume", "--vocab-size", "512")
    assert r.returncode == 2 and "would change the model" in r.stderr


def test_resume_refuses_model_change(cli, data_dir, tmp_path):
    train(resolve_train_config(flags(data_dir, tmp_path / "r", max_steps=2)))
    r = cli("train", "--out", str(tmp_path / "r"), "--resume", "--n-layer", "3")
    assert r.returncode == 2 and "would change the model" in r.stderr
    assert "Traceback" not in r.stderr
    # a new run into a directory that has checkpoints is refused: nothing is overwritten
    with pytest.raises(UserError, match="--resume"):
        train(resolve_train_config(flags(data_dir, tmp_path / "r", max_steps=2)))
    # extending the run is allowed
    train(resolve_train_config({"out": str(tmp_path / "r")}), resume=True, resume_flags={"max_steps": 4})
    assert max(losses(tmp_path / "r")) == 4


def test_cli_errors(cli, data_dir, tmp_path):
    r = cli("train", *SMALL, "--data", str(data_dir), "--out", str(tmp_path / "e"), "--batch-size", "3",
                 "--total-batch-tokens", "256")
    assert r.returncode == 2 and "use a batch size in: 1, 2, 4, 8" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("train", *SMALL, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "no such data directory" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("train", "--out", str(tmp_path / "never"), "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr


def test_non_finite_loss_stops_and_keeps_checkpoint(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "nan"
    train(resolve_train_config(flags(data_dir, run, max_steps=3, checkpoint_every=3)))
    good = RunDir(run).latest_checkpoint()
    before = (good / "model.safetensors").read_bytes()
    from gptlab.model import GPT

    real_forward = GPT.forward

    def nan_forward(self, idx, targets=None, cache=None, **kw):
        logits, loss = real_forward(self, idx, targets, cache, **kw)
        return logits, (loss * float("nan") if loss is not None else None)

    monkeypatch.setattr(GPT, "forward", nan_forward)
    with pytest.raises(UserError, match="loss is nan at step 4"):
        train(resolve_train_config({"out": str(run)}), resume=True, resume_flags={"max_steps": 6})
    assert RunDir(run).latest_checkpoint() == good
    assert (good / "model.safetensors").read_bytes() == before


def test_trained_run_exports_to_transformers(cli, data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gptlab.generate import generate_ids

    run = tmp_path / "run"
    train(resolve_train_config(flags(data_dir, run, max_steps=8)))
    model, _ = ck.load_model(run)  # a run directory is a MODEL
    r = cli("export", str(run), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor(markov_tokens(32, 5)).unsqueeze(0)
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    prompt = x[0, :8].tolist()
    ours_ids = generate_ids(model, prompt, max_new_tokens=16, temperature=0.0, stop_token=None)[0]
    with torch.no_grad():
        theirs_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                 pad_token_id=50256, eos_token_id=None)[0, 8:].tolist()
    assert ours_ids == theirs_ids


def test_hellaswag_during_training(data_dir, tmp_path):
    items = tmp_path / "hs.jsonl"
    with open(items, "w") as f:
        for i in range(6):
            f.write(json.dumps({"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts onions.",
                                "ctx_b": "he", "ctx": "A man cuts onions. he",
                                "endings": ["puts them in a pan.", "flies away.", "sings loudly.", "reads."],
                                "label": i % 4}) + "\n")
    run = tmp_path / "run"
    train(resolve_train_config(flags(data_dir, run, max_steps=2, eval_every=2, hellaswag=True,
                                     hellaswag_file=str(items))))
    hs = read_metrics(run, "hellaswag")
    assert len(hs) == 1 and hs[0]["completion"]["n"] == 6 and hs[0]["harness"]["n"] == 6
    assert (run / "plots" / "hellaswag.png").is_file()


def test_batch_size_auto_keeps_the_global_batch(data_dir, tmp_path, capsys):
    # on a CPU memory is not the limit: the largest divisor of the per-rank sequences up to 16
    train(resolve_train_config(flags(data_dir, tmp_path / "a", batch_size="auto", max_steps=1)))
    err = capsys.readouterr().err
    assert "--batch-size auto chose 8" in err and "accum 1" in err
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["train"]["batch_size"] == "auto" and cfg["train"]["total_batch_tokens"] == 256


def test_init_from_pretrained_model_dir(data_dir, tmp_path):
    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    torch.manual_seed(3)
    pre = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, seq_len=64))
    ck.save_model(pre, tmp_path / "pre")
    # the pretrained model decides the shape; --seq-len may only shorten its context
    cfg = flags(data_dir, tmp_path / "ft", max_steps=1, lr=1e-12, warmup_steps=0, init_from=str(tmp_path / "pre"))
    train(resolve_train_config(cfg))
    tuned, _ = ck.load_model(tmp_path / "ft")
    assert tuned.config.seq_len == 32 and tuned.config.n_embd == 32
    assert torch.allclose(tuned.transformer.wpe.weight, pre.transformer.wpe.weight[:32], atol=1e-6)
    with pytest.raises(UserError, match="longer than the pretrained context"):
        train(resolve_train_config({**cfg, "out": str(tmp_path / "ft2"), "seq_len": 128}))


# ----------------------------------------------------------------------------- faults (issue 17)

def _nan_on_calls(monkeypatch, bad_calls: set[int]):
    """GPT.forward returns a NaN loss on the listed training calls (1-based, with targets): with
    batch_size 8 (one micro-batch per step) call n is step n."""
    from gptlab.model import GPT

    real_forward = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, cache=None, **kw):
        logits, loss = real_forward(self, idx, targets, cache, **kw)
        if loss is not None and torch.is_grad_enabled():  # training steps, not the save check
            calls["n"] += 1
            if calls["n"] in bad_calls:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def test_skip_nonfinite_skips_then_stops_naming_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "skip"
    _nan_on_calls(monkeypatch, {3, 5})
    train(resolve_train_config(flags(data_dir, run, max_steps=6, checkpoint_every=2, skip_nonfinite=2, batch_size=8)))
    recs = read_metrics(run)
    assert [r["step"] for r in recs if r.get("skipped")] == [3, 5]
    assert all(r["loss"] is None for r in recs if r.get("skipped"))
    assert json.loads((RunDir(run).latest_checkpoint() / "state.json").read_text())["nonfinite_skipped"] == 2
    # a third bad step is one too many: stopped, with the checkpoint of step 4 named as good
    run2 = tmp_path / "stop"
    _nan_on_calls(monkeypatch, {3, 5, 6})
    with pytest.raises(UserError, match=r"loss is nan at step 6: training stopped after skipping 2 "
                                        r"\(--skip-nonfinite 2\).*last good checkpoint is .*step_000004"):
        train(resolve_train_config(flags(data_dir, run2, max_steps=6, checkpoint_every=2, skip_nonfinite=2, batch_size=8)))
    assert [p.name for p in RunDir(run2).checkpoints()] == ["step_000002", "step_000004"]


def test_skipped_step_leaves_weights_unchanged(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "r"
    _nan_on_calls(monkeypatch, {2})
    train(resolve_train_config(flags(data_dir, run, max_steps=2, checkpoint_every=1, skip_nonfinite=1,
                                     keep_checkpoints=0, batch_size=8)))
    one = ck.load_model(run / "checkpoints" / "step_000001")[0].state_dict()
    two = ck.load_model(run / "checkpoints" / "step_000002")[0].state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_non_finite_gradient_norm_is_caught_before_the_update(data_dir, tmp_path, monkeypatch):
    from gptlab import train as train_module

    monkeypatch.setattr(train_module, "grad_norm", lambda model, clip: float("inf"))
    with pytest.raises(UserError, match="gradient norm is inf .* at step 1: training stopped"):
        train(resolve_train_config(flags(data_dir, tmp_path / "g", max_steps=3, checkpoint_every=1)))
    assert RunDir(tmp_path / "g").checkpoints() == []


def test_checkpoint_is_not_written_when_its_weights_give_nan(data_dir, tmp_path, monkeypatch):
    """A finite step whose update poisons the weights: the save's forward check refuses them, so
    the last good checkpoint (not these weights) is what `latest` and the message name."""
    from gptlab import train as train_module

    run = tmp_path / "p"
    real = train_module.next_batch_loss
    seen = {"n": 0}

    def check(placed, rt, loader):
        seen["n"] += 1
        return float("nan") if seen["n"] == 3 else real(placed, rt, loader)

    monkeypatch.setattr(train_module, "next_batch_loss", check)
    with pytest.raises(UserError, match="step 3: not checkpointed.*last good checkpoint is .*step_000002"):
        train(resolve_train_config(flags(data_dir, run, max_steps=3, checkpoint_every=1, keep_checkpoints=0)))
    assert [p.name for p in RunDir(run).checkpoints()] == ["step_000001", "step_000002"]
    assert RunDir(run).latest_checkpoint().name == "step_000002"


def test_new_run_in_a_directory_without_checkpoints_starts_a_new_log(data_dir, tmp_path):
    run = tmp_path / "r"
    train(resolve_train_config(flags(data_dir, run, max_steps=3)))
    import shutil

    shutil.rmtree(run / "checkpoints")
    train(resolve_train_config(flags(data_dir, run, max_steps=2)))
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_resume_drops_redone_steps_and_a_torn_line_from_the_log(data_dir, tmp_path):
    run = tmp_path / "r"
    train(resolve_train_config(flags(data_dir, run, max_steps=6, checkpoint_every=3, keep_checkpoints=0)))
    full = losses(run)
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000006")
    (run / "checkpoints" / "latest").write_text("step_000003\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "kind": "tr')  # a write torn by a kill
    train(resolve_train_config({"out": str(run)}), resume=True, resume_flags={})
    assert [(r["step"], r["kind"]) for r in read_metrics(run)] == [(s, "train") for s in range(1, 7)]
    assert losses(run) == full


def test_resume_below_the_current_step_is_one_error(data_dir, tmp_path):
    run = tmp_path / "r"
    train(resolve_train_config(flags(data_dir, run, max_steps=4)))
    before = (run / "config.json").read_text()
    with pytest.raises(UserError, match="is at step 4, past the 2 steps asked for"):
        train(resolve_train_config({"out": str(run)}), resume=True, resume_flags={"max_steps": 2})
    assert (run / "config.json").read_text() == before  # the refused flags were not recorded


def test_resume_refuses_a_checkpoint_without_optimizer_state(data_dir, tmp_path):
    run = tmp_path / "r"
    train(resolve_train_config(flags(data_dir, run, max_steps=2)))
    opt = RunDir(run).latest_checkpoint() / "optimizer.pt"
    opt.write_bytes(b"")
    with pytest.raises(UserError, match="optimizer.pt: empty"):
        train(resolve_train_config({"out": str(run)}), resume=True, resume_flags={"max_steps": 3})
    opt.unlink()
    with pytest.raises(UserError, match="no optimizer state .* not continue the run exactly"):
        train(resolve_train_config({"out": str(run)}), resume=True, resume_flags={"max_steps": 3})


def test_data_path_is_stored_absolute_and_compared_by_content(data_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(data_dir.parent)
    run = tmp_path / "r"
    train(resolve_train_config(flags(data_dir, run, max_steps=2, data=data_dir.name)))
    assert json.loads((run / "config.json").read_text())["train"]["data"] == str(data_dir)
    monkeypatch.chdir(tmp_path)  # another directory: the stored path still works
    train(resolve_train_config({"out": str(run)}), resume=True, resume_flags={"max_steps": 3})
    # the same directory spelled another way is the same data
    other = tmp_path / "link"
    other.symlink_to(data_dir)
    train(resolve_train_config({"out": str(run)}), resume=True,
          resume_flags={"max_steps": 4, "data": str(other)})
    # same shard names and sizes, other tokens: refused by the content fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    config = json.loads((run / "config.json").read_text())
    config["train"]["data"] = str(copy)
    (run / "config.json").write_text(json.dumps(config))
    write_shard(copy / "toy_train_000001.bin", markov_tokens(200_000, 3))
    with pytest.raises(UserError, match="holds other data than this run was trained on"):
        train(resolve_train_config({"out": str(run)}), resume=True, resume_flags={"max_steps": 5})


def test_init_from_refuses_a_shape_flag_it_would_ignore(data_dir, tmp_path):
    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    ck.save_model(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, seq_len=64)), tmp_path / "pre")
    cfg = flags(data_dir, tmp_path / "ft", max_steps=1, init_from=str(tmp_path / "pre"), n_layer=3)
    with pytest.raises(UserError, match="--n-layer 3: --init-from .* has n_layer 1"):
        train(resolve_train_config(cfg))


def test_out_naming_a_file_is_one_line(cli, data_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    r = cli("train", *SMALL, "--data", str(data_dir), "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not a directory" in r.stderr, r.stderr


def _signal_mid_step(data_dir, run: Path, sig: str, accum: int):
    """Start a run whose steps are `accum` micro-batches, send `sig` as step 2 begins, and return
    (exit status, stderr, seconds from the signal to the announcement or None, seconds to the exit)."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    args = ["train", *SMALL, "--data", str(data_dir), "--batch-size", "4", "--total-batch-tokens",
            str(4 * 32 * accum), "--max-steps", "3", "--eval-every", "0", "--sample-tokens", "0",
            "--checkpoint-every", "0", "--device", "cpu", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[tuple[float, str]] = []  # (time read, line), read by a thread so that no read holds the clock
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), ln) for ln in proc.stderr), daemon=True)
    reader.start()
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break  # step 1's record is written: its bookkeeping ends, then step 2 begins
        time.sleep(0.01)
    # a signal between step 1's record and its stop check stops after step 1 (rightly; the suite met it once):
    # let that moment pass, a small part of a step of 1,024 micro-batches
    time.sleep(0.5)
    assert proc.poll() is None, "".join(ln for _, ln in lines)
    sent = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    code = proc.wait(timeout=240)
    ended = time.monotonic()
    reader.join(timeout=10)
    said = [t - sent for t, ln in lines if "stopping after this step" in ln and "Ctrl-C again to stop now" in ln]
    assert len(said) <= 1, said
    return code, "".join(ln for _, ln in lines), (said[0] if said else None), ended - sent


@pytest.mark.parametrize("sig", ["SIGINT", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_first_signal_during_a_long_step_is_announced_at_once(data_dir, tmp_path, sig):
    """The first Ctrl-C (or SIGTERM) mid-step says at once what will happen, not when the step ends:
    with a step of many micro-batches (several seconds), the line must come well before the exit."""
    for accum in (1024, 1536):  # ~2 ms a micro-batch here; at most 1,562 of 4 windows fit data_dir's train split
        run = tmp_path / f"accum{accum}"
        code, err, said, left = _signal_mid_step(data_dir, run, sig, accum)
        if left > 1.0:
            break
    assert said is not None and sig in err, err
    assert code == (130 if sig == "SIGINT" else 143), err
    assert left > 1.0, f"step 2 took only {left:.1f} s: too short to tell 'at once' from 'at the end'"
    assert said < left / 3, (said, left, err)  # at once: most of the step was still to go
    assert RunDir(run).latest_checkpoint().name == "step_000002", err  # and it did stop after this step


def _count_step_worker(rank: int, port: int, out: str) -> None:
    """One rank of test_one_collective_and_one_host_sync_a_step: 3 DDP steps, counting."""
    import datetime
    import json

    import torch.distributed as tdist

    from gptlab import dist as gdist
    from gptlab import train as train_module
    from gptlab.config import ModelConfig, TrainConfig
    from gptlab.model import GPT
    from gptlab.optim import make_optimizers
    from gptlab.parallel import place
    from gptlab.runtime import get_runtime

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                             timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, seq_len=16, vocab_size=320))
        rt = get_runtime("cpu", "fp32", False)
        placed = place(model, rt, gdist.DistEnv(rank=rank, world_size=2, local_world_size=2))
        cfg = TrainConfig.for_model(model="tiny", lr=1e-3)
        opts = make_optimizers(placed.model, cfg, "cpu")
        counts = {"all_reduce": 0, "other_collectives": 0, "syncs": 0}

        def counting(fn, key):
            def wrapped(*a, **k):
                counts[key] += 1
                return fn(*a, **k)
            return wrapped
        tdist.all_reduce = counting(tdist.all_reduce, "all_reduce")
        for name in ("broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "barrier"):
            setattr(tdist, name, counting(getattr(tdist, name), "other_collectives"))
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name), "syncs"))
        g = torch.Generator().manual_seed(rank)
        per_step = []
        for step in range(3):
            before = dict(counts)
            batches = [(torch.randint(0, 320, (2, 16), generator=g), torch.randint(0, 320, (2, 16), generator=g))
                       for _ in range(2)]
            res = train_module.train_step(placed, rt, batches, 2, opts, None, 1.0, stop=rank == 1 and step == 2)
            per_step.append({k: counts[k] - before[k] for k in counts} | {"stop": res.stop})
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(per_step, f)
    finally:
        tdist.destroy_process_group()


def test_one_collective_and_one_host_sync_a_step(tmp_path):
    """2 gloo ranks under DDP, 2 micro-batches a step: the loss and the stop flag cross ranks in one
    all_reduce (DDP's gradient buckets are its own), and the host reads the loss, the flag and the
    grad norm in one sync; a stop flag on one rank reaches both."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_count_step_worker, args=(port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        steps = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [(s["all_reduce"], s["other_collectives"], s["syncs"]) for s in steps] == [(1, 0, 1)] * 3, steps
        assert [s["stop"] for s in steps] == [False, False, True]
