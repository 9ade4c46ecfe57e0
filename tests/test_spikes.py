"""Loss spikes: --skip-spikes Z skips the update of a step whose loss is an outlier of the recent
applied steps' losses; --spike-rollback K goes back to the newest scheduled checkpoint before K such
skips and on past their batches. The data: a repetitive text the tiny model learns within a few
steps, and a small region of uniformly random tokens (loss near ln 50257 = 10.8), which the shuffled
order visits at a few known steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_metrics, sigterm_at_step, write_shard
from gptlab import train as train_mod
from gptlab.checkpoint import TrainState, load_model_dir
from gptlab.data.loader import TrainLoader
from gptlab.rundir import RunDir

TEXT_IDS = range(100, 113)  # the repeated "sentence": 13 tokens, so windows start at every phase
STEPS, WARM = 40, 18  # the random windows must come after the model has learned the text


def _batches(data: Path, seed: int, n: int) -> list[torch.Tensor]:
    loader = TrainLoader(data, seq_len=32, batch_size=1, seed=seed)
    return [loader.next_batch()[0] for _ in range(n)]


def random_steps(data: Path, seed: int) -> list[int]:
    """The steps (1-based) whose one window holds random tokens, by reading the batches."""
    text = torch.tensor(list(TEXT_IDS))
    return [s + 1 for s, x in enumerate(_batches(data, seed, STEPS)) if not bool(torch.isin(x, text).all())]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(data dir, seed, random steps): a seed whose order meets the random region at least four
    times within the run, and only after step WARM."""
    d = tmp_path_factory.mktemp("spiky")
    text = np.tile(np.array(TEXT_IDS), 200)
    write_shard(d / "toy_val_000000.bin", text[:1000])
    write_shard(d / "toy_train_000001.bin", text[:64 * 32 + 1])
    write_shard(d / "toy_train_000002.bin", np.random.default_rng(0).integers(0, 50257, 8 * 32 + 1))
    for seed in range(200):
        steps = random_steps(d, seed)
        if len(steps) >= 4 and steps[0] > WARM:
            return d, seed, steps
    raise AssertionError("no seed meets the random region four times after the warm-up")


def command(data, out, *extra) -> list[str]:
    d, seed, _ = data
    return ["train", "--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
            "--data", str(d), "--seed", str(seed), "--batch-size", "1", "--total-batch-tokens", "32",
            "--max-steps", str(STEPS), "--lr", "1e-2", "--warmup-steps", "3", "--eval-every", "0",
            "--sample-tokens", "0", "--checkpoint-every", "5", "--keep-checkpoints", "0", "--device", "cpu",
            "--out", str(out), *extra]


SKIP = ("--skip-spikes", "6", "--spike-window", "8")
ROLLBACK = SKIP + ("--spike-rollback", "2", "--spike-rollback-window", str(STEPS))


def train_records(run: Path) -> dict[int, dict]:
    recs = read_metrics(run, "train")
    assert len(recs) == len({r["step"] for r in recs}), "a step logged twice"
    return {r["step"]: r for r in recs}


def skipped(run: Path) -> list[int]:
    return [s for s, r in train_records(run).items() if r.get("skipped")]


def rollbacks(run: Path) -> list[tuple[int, int]]:
    return [(r["step"], r["checkpoint_step"]) for r in read_metrics(run, "rollback")]


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory):
    from gptlab.cli import main
    run = tmp_path_factory.mktemp("plain") / "run"
    assert main(command(data, run)) == 0
    return run


@pytest.fixture(scope="module")
def skipping(data, tmp_path_factory):
    from gptlab.cli import main
    run = tmp_path_factory.mktemp("skip") / "run"
    assert main(command(data, run, *SKIP)) == 0
    return run


@pytest.fixture(scope="module")
def rolling(data, tmp_path_factory):
    from gptlab.cli import main
    run = tmp_path_factory.mktemp("rollback") / "run"
    assert main(command(data, run, *ROLLBACK)) == 0
    return run


def test_the_random_region_is_a_spike_and_the_text_is_learned(data, plain):
    """The premise: without the flags, every step is applied, the random windows' loss stays near
    ln 50257 while the text's falls far below it."""
    _, _, rand = data
    recs = train_records(plain)
    assert not skipped(plain) and read_metrics(plain, "rollback") == []
    assert all(r.get("skip_reason") is None for r in recs.values())
    for s in rand:
        assert recs[s]["loss"] > 9.5, (s, recs[s]["loss"])
    text_after = [recs[s]["loss"] for s in range(WARM, STEPS + 1) if s not in rand]
    assert max(text_after) < 4.5, text_after


def test_skip_spikes_skips_the_random_region_and_nothing_else(data, plain, skipping, capfd):
    _, _, rand = data
    assert skipped(skipping) == rand
    recs = train_records(skipping)
    for s in rand:
        assert recs[s]["skip_reason"] == "spike" and recs[s]["spike_z"] > 6 and recs[s]["loss"] > 9.5
    # until the first spike the two runs are the same run; then the skipped updates make the difference
    ref = train_records(plain)
    assert [recs[s]["loss"] for s in range(1, rand[0] + 1)] == [ref[s]["loss"] for s in range(1, rand[0] + 1)]
    assert recs[rand[0] + 1]["loss"] != ref[rand[0] + 1]["loss"]
    state = json.loads((RunDir(skipping).latest_checkpoint() / "state.json").read_text())
    assert state["spike_skipped"] == len(rand) and len(state["spike_losses"]) == 8
    assert state["rollbacks"] == []


def test_a_vetoed_step_leaves_weights_and_optimizer_as_they_were(make_gptlab):
    """train_step's veto sees the loss before the update and keeps the update out: the same
    parameters and optimizer state after it, and the result says why."""
    from gptlab.dist import DistEnv
    from gptlab.parallel import place
    from gptlab.runtime import get_runtime

    rt = get_runtime("cpu", "fp32", False)
    placed = place(make_gptlab(seed=3, seq_len=32), rt, DistEnv())
    opt = torch.optim.AdamW(placed.model.parameters(), lr=1e-2)
    x = torch.randint(0, 50257, (2, 33))
    batch = [(x[:, :-1], x[:, 1:])]
    train_mod.train_step(placed, rt, batch, 1, opt, grad_clip=1.0)  # the optimizer has state now
    before = {k: v.clone() for k, v in placed.model.state_dict().items()}
    moments = [t.clone() for st in opt.state.values() for t in st.values()]
    seen = []
    out = train_mod.train_step(placed, rt, batch, 1, opt, grad_clip=1.0, veto=lambda loss: seen.append(loss) or "spike")
    assert not out.applied and out.skip_reason == "spike" and seen == [out.loss] and math.isfinite(out.loss)
    assert all(torch.equal(before[k], v) for k, v in placed.model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(moments, [t for st in opt.state.values() for t in st.values()]))
    assert all(p.grad is None for p in placed.model.parameters())
    out = train_mod.train_step(placed, rt, batch, 1, opt, grad_clip=1.0, veto=lambda loss: None)
    assert out.applied and out.skip_reason is None
    assert not all(torch.equal(before[k], v) for k, v in placed.model.state_dict().items())


def _targets(d, seed, step):
    loader = TrainLoader(d, seq_len=32, batch_size=1, seed=seed)
    for _ in range(step - 1):
        loader.next_batch()
    return loader.next_batch()[1]


def expected_rollbacks(rand: list[int], every: int = 5, k: int = 2) -> list[tuple[int, int]]:
    """K=2 skips in a window as long as the run: a rollback at every second spike, to the newest
    multiple of `every` before the first of its pair that no earlier rollback discarded."""
    out = []
    for first, second in zip(rand[0::2], rand[1::2]):
        target = max(s for s in range(every, first, every) if not any(a < s < b for b, a in out))
        out.append((second, target))
    return out


def test_rollback_triggers_at_the_second_spike_and_restores_the_checkpoint(data, skipping, rolling, capfd):
    d, seed, rand = data
    assert skipped(rolling) == rand  # the spikes are skipped as before
    assert rollbacks(rolling) == expected_rollbacks(rand)
    (at, to), = rollbacks(rolling)[:1]
    rec = read_metrics(rolling, "rollback")[0]
    assert rec["discarded"] == [to + 1, at] and rec["skips"] == rand[:2] and rec["checkpoint"] == f"step_{to:06d}"
    # up to the rollback it is the skipping run; the step after it trains the checkpoint's weights
    recs, ref = train_records(rolling), train_records(skipping)
    assert [recs[s]["loss"] for s in range(1, at + 1)] == [ref[s]["loss"] for s in range(1, at + 1)]
    model = load_model_dir(RunDir(rolling).checkpoint_path(to))
    x, y = _batches(d, seed, at + 1)[at], _targets(d, seed, at + 1)
    with torch.no_grad():
        _, loss = model(x, y)
    assert abs(float(loss) - recs[at + 1]["loss"]) < 1e-5, (float(loss), recs[at + 1]["loss"], ref[at + 1]["loss"])
    assert abs(recs[at + 1]["loss"] - ref[at + 1]["loss"]) > 1e-3  # not the weights the skipping run had
    state = TrainState.from_json(json.loads((RunDir(rolling).latest_checkpoint() / "state.json").read_text()),
                                 Path("state.json"))
    assert [(r["step"], r["checkpoint_step"]) for r in state.rollbacks] == expected_rollbacks(rand)
    assert state.step == STEPS and state.spike_skipped == len(rand)


@pytest.mark.parametrize("where", ["between the spikes", "after the rollback"])
def test_a_resumed_run_repeats_the_decisions(data, rolling, tmp_path, monkeypatch, capsys, where):
    from gptlab.cli import main
    _, _, rand = data
    stop = rand[0] + 1 if where == "between the spikes" else rand[1] + 1
    if stop % 5 == 0:
        stop += 1  # an extra checkpoint off the schedule
    run = tmp_path / "r"
    cmd = command(data, run, *ROLLBACK, "--resume", "auto")
    with monkeypatch.context() as m:
        sigterm_at_step(m, stop)
        assert main(cmd) == 143
    assert RunDir(run).latest_checkpoint().name == f"step_{stop:06d}"
    capsys.readouterr()
    assert main(cmd) == 0
    err = capsys.readouterr().err
    assert f"step {rand[2]}: loss " in err and "is a spike" in err and "update skipped" in err
    assert f"step {rand[3]}: 2 loss spikes within {STEPS} steps (steps {rand[2]}, {rand[3]}): rolled back to" in err
    assert skipped(run) == skipped(rolling)
    assert rollbacks(run) == rollbacks(rolling)
    got, want = train_records(run), train_records(rolling)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for s in want:
        assert abs(got[s]["loss"] - want[s]["loss"]) <= 1e-6, s


def test_old_state_json_without_the_spike_fields_loads(tmp_path):
    state = TrainState.from_json({"step": 3, "tokens": 96, "loader": {}}, tmp_path / "state.json")
    assert state.spike_losses == [] and state.spike_skipped == 0 and state.rollbacks == []
    guard = train_mod.SpikeGuard(3.0, 4)
    guard.load(state)
    assert guard.zscore(100.0) is None  # an empty window: no decision yet


@pytest.mark.parametrize("bad", [{"spike_losses": [1.0, "x"]}, {"spike_skipped": -1}, {"spike_recent": [0]},
                                 {"rollbacks": [{"step": 3}]}])
def test_bad_spike_state_is_refused_in_one_line(tmp_path, bad):
    from gptlab.errors import UserError
    with pytest.raises(UserError, match=next(iter(bad))):
        TrainState.from_json({"step": 3, "tokens": 96, "loader": {}, **bad}, tmp_path / "state.json")


def test_the_detector_decides_on_a_full_window_only():
    g = train_mod.SpikeGuard(3.0, 4, rollback_after=2, rollback_window=5)
    for loss in (2.0, 2.1, 1.9):
        assert g.veto(loss) is None
        g.applied(loss)
    assert g.veto(50.0) is None  # three losses: no decision yet
    g.applied(2.0)
    assert g.veto(2.2) is None and g.veto(2.3) == "spike"  # mean 2.0, deviation 0.0707: z 2.8, 4.2
    assert g.last_z == pytest.approx(0.3 / math.sqrt(0.005))
    g.spike(10)
    assert not g.wants_rollback()
    g.spike(16)  # 10 is out of the window of 5 steps
    assert not g.wants_rollback()
    g.spike(18)
    assert g.wants_rollback() and g.recent == [16, 18]


@pytest.mark.parametrize("flags, message", [
    (("--skip-spikes", "-1"), "--skip-spikes must be"),
    (("--skip-spikes", "3", "--spike-window", "1"), "--spike-window must be at least 2"),
    (("--spike-rollback", "2"), "--spike-rollback needs --skip-spikes"),
])
def test_bad_flags_are_one_line(cli, data, tmp_path, flags, message):
    res = cli(*command(data, tmp_path / "r", *flags))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_rollback_targets_skip_checkpoints_an_earlier_rollback_discarded(tmp_path):
    """After a rollback at step 21 to step 15, the checkpoint of step 20 holds discarded updates:
    a later rollback goes to 15 again, or to a checkpoint saved after the rollback (25, 30)."""
    from types import SimpleNamespace

    from gptlab.atomic import write_json
    from gptlab.config import TrainConfig

    run = RunDir(tmp_path / "r")
    for step in (5, 10, 15, 20, 23, 25, 30):
        run.checkpoint_path(step).mkdir(parents=True)
        write_json(run.checkpoint_path(step) / "state.json", {"step": step})
    guard = train_mod.SpikeGuard(3.0, 4, 2, 10)
    guard.rollbacks = [{"step": 21, "checkpoint_step": 15, "skips": [20, 21], "discarded": [16, 21]}]
    fake = SimpleNamespace(cfg=TrainConfig(checkpoint_every=5), run=run, spikes=guard,
                           placed=SimpleNamespace(fsdp=False))
    target = train_mod.Trainer._rollback_target
    assert target(fake, 22) == (run.checkpoint_path(15), 15)  # not 20
    assert target(fake, 27) == (run.checkpoint_path(25), 25)  # not 23: off the schedule
    assert target(fake, 31) == (run.checkpoint_path(30), 30)
    assert target(fake, 5) is None


@pytest.mark.slow
def test_two_ranks_decide_alike_and_roll_back(data, tmp_path, gptlab_cli):
    """Under DDP (2 ranks on gloo) the decisions use the loss averaged over the ranks: both ranks
    skip and roll back at the same steps (a rank that did not would hang the next collective)."""
    run = tmp_path / "r"
    cmd = command(data, run, *SKIP, "--spike-rollback", "2", "--spike-rollback-window", str(STEPS),
                  "--nproc", "2", "--dist-timeout", "60")
    cmd[cmd.index("--total-batch-tokens") + 1] = "64"  # one window per rank per step
    cmd[cmd.index("--spike-window") + 1] = "4"
    res = gptlab_cli(*cmd, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = train_records(run)
    assert sorted(recs) == list(range(1, STEPS + 1))
    spikes = skipped(run)
    assert spikes and all(recs[s]["loss"] > 5 for s in spikes)  # a random window in the pair of the step
    assert all(recs[s]["loss"] < 3 for s in recs if s > WARM + 4 and s not in spikes)
    assert rollbacks(run) and all(at in spikes for at, _ in rollbacks(run))
    assert "rolled back to" in res.stderr
