"""FSDP at scale on CPU/gloo: meta-device initialisation, sharded asynchronous checkpoints (DCP),
resharding on resume, and consolidation for export/sample without a process group."""

import copy
import datetime
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed as tdist

from conftest import make_toy_data, metrics_by_step, run_gptlab
from gptlab import checkpoint as ckpt_mod
from gptlab.atomic import is_temporary
from gptlab.checkpoint import Checkpointer, TrainState, load_model, load_sharded_checkpoint
from gptlab.config import ModelConfig
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.optim import make_adamw
from gptlab.parallel import init_shards_like_eager, shard_model
from gptlab.rundir import RunDir
from gptlab.runtime import get_runtime

COMMON = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
          "--total-batch-tokens", "512", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "4",
          "--eval-tokens", "2048", "--sample-tokens", "0", "--checkpoint-every", "4", "--device", "cpu",
          "--dist-timeout", "60", "--batch-size", "4", "--keep-checkpoints", "0"]
STEPS = 12
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "gptlab", *map(str, args)]


def torchrun(nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, *args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ONE_THREAD})


def losses(run: Path, kind: str) -> dict[int, float]:
    """{step: loss}; a resumed run's later record of a step wins."""
    return {step: rec["loss"] for step, rec in metrics_by_step(run, kind).items()}


def assert_same_curve(a: Path, b: Path, rel: float = 1e-5) -> None:
    for kind in ("train", "val"):
        ra, rb = losses(a, kind), losses(b, kind)
        assert sorted(ra) == sorted(rb) and ra, kind
        for step in ra:
            assert rb[step] == pytest.approx(ra[step], rel=rel), (kind, step)


def rewind(run: Path, step: int) -> None:
    """Keep checkpoints up to `step` and point `latest` at it, as if the run had stopped there."""
    for ckpt in (run / "checkpoints").glob("step_*"):
        if int(ckpt.name[len("step_"):]) > step:
            shutil.rmtree(ckpt)
    (run / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")


# ----------------------------------------------------------------------------- fast, in-process

@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process (FSDP2 needs a group, even of one)."""
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                             timeout=datetime.timedelta(seconds=60))
    yield
    tdist.destroy_process_group()


def test_meta_init_equals_eager_init(one_rank_group):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, seq_len=16, vocab_size=200, vocab_multiple=64)
    torch.manual_seed(7)
    eager = GPT(cfg).state_dict()
    after_eager = torch.get_rng_state()
    with torch.device("meta"):
        model = GPT(cfg)
    shard_model(model, get_runtime("cpu", "fp32", False))
    model.to_empty(device="cpu")
    init_shards_like_eager(model, seed=7)
    got = {k: v.full_tensor() for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(eager)
    for k in eager:
        assert torch.equal(got[k], eager[k]), k
    assert torch.equal(torch.get_rng_state(), after_eager)  # the RNG stream continues as after GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, seq_len=16, vocab_size=100, vocab_multiple=32))
    opt = make_adamw(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
    return model, opt


def _step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 100, (2, 16), generator=g)
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class SlowWriter(dcp.FileSystemWriter):
    """Writes a second late, so that training steps surely run while a save is in flight."""

    def write_data(self, plan, planner):
        time.sleep(1.0)
        return super().write_data(plan, planner)


def test_async_save_overlapping_steps_loses_nothing(tmp_path, monkeypatch):
    model, opt = _trained()
    _step(model, opt, 0)
    want_model = copy.deepcopy(model.state_dict())
    want_opt = copy.deepcopy(opt.state_dict())
    run = RunDir(tmp_path / "run")
    monkeypatch.setattr(dcp, "FileSystemWriter", SlowWriter)
    saver = Checkpointer(run, keep=0, rank=0, sharded=True)
    final = saver.save(1, model, opt, TrainState(step=1), wait=False)
    assert saver.pending is not None and not saver.pending[0].done()
    for i in range(3):  # the next steps change every weight and moment while the shards are written
        _step(model, opt, i + 1)
    assert not final.exists()  # nothing is published before it is whole
    assert not torch.equal(model.transformer.wte.weight, want_model["transformer.wte.weight"])
    assert saver.wait() == final
    assert run.latest_checkpoint() == final and ckpt_mod.is_sharded_checkpoint(final)
    assert not [p for p in run.checkpoints_dir.iterdir() if is_temporary(p.name)]

    fresh, fresh_opt = _trained(seed=1)  # other weights, no optimizer state yet
    load_sharded_checkpoint(final, fresh, fresh_opt)
    for k, v in want_model.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    got_opt = fresh_opt.state_dict()
    for idx, st in want_opt["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(got_opt["state"][idx][name]), torch.as_tensor(v)), (idx, name)
    assert got_opt["param_groups"][0]["lr"] == want_opt["param_groups"][0]["lr"]
    # consolidation for export / sample / eval: a plain GPT on the CPU, no process group
    loaded, where = load_model(run.path)
    assert where == str(final)
    for k, v in want_model.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_sharded_index_is_never_unpickled_freely(tmp_path):
    model, opt = _trained()
    run = RunDir(tmp_path / "run")
    final = Checkpointer(run, keep=0, rank=0, sharded=True, use_async=False).save(1, model, opt, TrainState(step=1))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (final / ckpt_mod.DCP_METADATA).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="not a readable checkpoint index"):
        load_model(final)
    assert not (tmp_path / "pwned").exists()


def test_prune_and_latest_with_sharded_saves(tmp_path):
    model, opt = _trained()
    run = RunDir(tmp_path / "run")
    saver = Checkpointer(run, keep=2, rank=0, sharded=True)
    for step in (1, 2, 3):
        _step(model, opt, step)
        saver.save(step, model, opt, TrainState(step=step), wait=False)
    saver.wait()
    assert [p.name for p in run.checkpoints()] == ["step_000002", "step_000003"]
    assert run.latest_checkpoint().name == "step_000003"


# ----------------------------------------------------------------------------- 2 ranks under torchrun

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("fdata"), 20_000, 100_000)


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("f1") / "run"
    r = run_gptlab("train", *COMMON, "--data", data_dir, "--out", out, "--max-steps", STEPS, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory):
    """An unbroken FSDP run on 2 ranks: sharded checkpoints at 4 and 8 (written in the background
    while steps go on) and 12 (the last, waited for)."""
    out = tmp_path_factory.mktemp("f2") / "run"
    r = torchrun(2, "train", *COMMON, "--data", data_dir, "--out", out, "--max-steps", STEPS, "--fsdp")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_fsdp_meta_init_and_sharded_checkpoints(fsdp_run, one_rank):
    # meta-device init replays the eager init: the first loss is the 1-rank run's
    assert losses(fsdp_run, "train")[1] == pytest.approx(losses(one_rank, "train")[1], rel=1e-6)
    assert_same_curve(one_rank, fsdp_run)
    for step in (4, 8, 12):
        ckpt = fsdp_run / "checkpoints" / f"step_{step:06d}"
        assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                          "config.json", "state.json"]
    assert (fsdp_run / "checkpoints" / "latest").read_text().strip() == "step_000012"


@pytest.mark.slow
def test_fsdp_sigterm_resume_equals_unbroken(data_dir, fsdp_run, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen(torchrun_cmd(2, "train", *COMMON, "--data", data_dir, "--out", run, "--max-steps", STEPS,
                                      "--fsdp"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **ONE_THREAD})
    deadline = time.time() + 240
    # complete lines only: the file is being written while it is read
    while time.time() < deadline and ((run / "metrics.jsonl").read_text().count('"kind": "train"') if (
            run / "metrics.jsonl").exists() else 0) < 5:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)  # one rank told: both agree to stop at the same step
    _, err = p.communicate(timeout=240)
    assert "stopped by" in err or "signal" in err, err
    stopped = int((run / "checkpoints" / "latest").read_text().strip()[len("step_"):])
    assert 5 <= stopped < STEPS, stopped
    assert ckpt_mod.is_sharded_checkpoint(run / "checkpoints" / f"step_{stopped:06d}")
    r = torchrun(2, "train", "--out", run, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:06d}'}" in r.stderr
    assert_same_curve(fsdp_run, run)


@pytest.mark.slow
def test_async_checkpoint_resumes_on_one_rank_without_fsdp(fsdp_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)
    rewind(run, 8)  # written in the background while steps 9.. ran
    r = run_gptlab("train", "--out", run, "--resume", "--no-fsdp", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "1 rank(s)" in r.stderr
    assert_same_curve(fsdp_run, run)
    assert (run / "checkpoints" / "step_000012" / "model.safetensors").is_file()  # back to the single file


@pytest.mark.slow
def test_single_file_checkpoint_resumes_under_fsdp(one_rank, tmp_path):
    """1 rank -> 2: rank 0 reads the full weights and sends each rank its shard."""
    run = tmp_path / "run"
    shutil.copytree(one_rank, run)
    rewind(run, 4)
    r = torchrun(2, "train", "--out", run, "--resume", "--fsdp")
    assert r.returncode == 0, r.stderr
    assert_same_curve(one_rank, run)
    assert ckpt_mod.is_sharded_checkpoint(run / "checkpoints" / "step_000012")


@pytest.mark.slow
def test_export_of_fsdp_run_greedy_equals_transformers(cli, fsdp_run, tmp_path):
    from transformers import GPT2LMHeadModel

    from gptlab.tokenizer import get_tokenizer

    r = cli("export", fsdp_run, "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    r = cli("sample", fsdp_run, "--prompt", "Hello world", "--temperature", "0", "--max-new-tokens", "12",
            "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)["samples"][0]["tokens"]
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([get_tokenizer().encode("Hello world")])
    with torch.no_grad():
        out = hf.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=50256)
    theirs = out[0, prompt.size(1):].tolist()
    assert ours and ours == theirs[: len(ours)]
