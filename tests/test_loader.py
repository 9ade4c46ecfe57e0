"""The loader: shuffled epochs, exact resume, world-size and micro-batch independence, validation windows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.data import shards as sh
from gptlab.data.loader import Permutation, TrainLoader, dataset_summary, iter_val_batches, val_windows
from gptlab.errors import UserError

T = 16


def make_dataset(d: Path, train_sizes=(1000, 701, 517), val_sizes=(300,), seed=0) -> Path:
    """llm.c-style shards of random tokens: every window is unique, so rows identify windows."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    i = 0
    for split, sizes in (("val", val_sizes), ("train", train_sizes)):
        for n in sizes:
            sh.write_shard(d / sh.shard_name("t", split, i), rng.integers(0, 50257, n).astype(np.uint16))
            i += 1
    return d


@pytest.fixture
def data(tmp_path) -> Path:
    return make_dataset(tmp_path / "d")


def windows_per_epoch(sizes=(1000, 701, 517)) -> int:
    return sum((n - 1) // T for n in sizes)


def rows(x: torch.Tensor) -> list[tuple]:
    return [tuple(r) for r in x.tolist()]


def all_windows(data: Path) -> set[tuple]:
    out = set()
    for s in sh.open_dataset(data).split("train"):
        toks = sh.read_tokens(s.path).astype(np.int64)
        for k in range((s.tokens - 1) // T):
            out.add(tuple(toks[k * T: k * T + T].tolist()))
    return out


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 65, 1000, 4099):
        for key in (0, 1, 2**63 + 5):
            p = Permutation(n, key)(np.arange(n))
            assert sorted(p.tolist()) == list(range(n))
    a, b = Permutation(1000, 1)(np.arange(1000)), Permutation(1000, 2)(np.arange(1000))
    assert (a != b).mean() > 0.9
    np.testing.assert_array_equal(a, Permutation(1000, 1)(np.arange(1000)))


def test_batches_shapes_targets_and_one_epoch(data):
    loader = TrainLoader(data, seq_len=T, batch_size=5, grad_accum=1)
    W = loader.windows_per_epoch
    assert W == windows_per_epoch() and loader.tokens_per_epoch == W * T
    seen = []
    while loader.step * 5 < W - 4:
        x, y = loader.next_batch()
        assert x.shape == y.shape == (5, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        seen += rows(x)
    assert loader.epoch == 0
    assert len(seen) == len(set(seen))  # no window twice in an epoch
    assert set(seen) <= all_windows(data)


def test_epochs_cover_every_window_and_reshuffle(data):
    W = windows_per_epoch()
    loader = TrainLoader(data, seq_len=T, batch_size=W)  # one step is exactly one epoch
    e0 = rows(loader.next_batch()[0])
    assert loader.epoch == 1 and loader.state_dict()["epoch"] == 1
    e1 = rows(loader.next_batch()[0])
    assert set(e0) == set(e1) == all_windows(data)
    assert e0 != e1  # a new order
    # shuffled across and within shards: not build-nanogpt's sequential order
    first = TrainLoader(data, seq_len=T, batch_size=W).window_ids(np.arange(20))
    assert not np.all(np.diff(first) == 1)
    shard_of = np.searchsorted(np.cumsum([(n - 1) // T for n in (1000, 701, 517)]), first, side="right")
    assert len(set(shard_of.tolist())) == 3


def test_epoch_boundary_inside_a_step(data):
    W = windows_per_epoch()
    loader = TrainLoader(data, seq_len=T, batch_size=7)
    steps = -(-2 * W // 7)
    seen = [r for _ in range(steps) for r in rows(loader.next_batch()[0])]
    assert set(seen[:W]) == all_windows(data) and set(seen[W: 2 * W]) == all_windows(data)
    assert loader.epoch == (steps * 7) // W


def global_step_rows(data, steps, *, batch_size, grad_accum, world_size, seed=1337) -> list[list[tuple]]:
    """For each step: the rows every rank sees, rank by rank, micro-step by micro-step."""
    loaders = [TrainLoader(data, seq_len=T, batch_size=batch_size, grad_accum=grad_accum, rank=r,
                           world_size=world_size, seed=seed) for r in range(world_size)]
    out = []
    for _ in range(steps):
        per_rank = [[r for _ in range(grad_accum) for r in rows(ld.next_batch()[0])] for ld in loaders]
        for i in range(world_size):
            for j in range(i):
                assert not set(per_rank[i]) & set(per_rank[j])  # ranks take disjoint parts
        out.append([r for part in per_rank for r in part])
    return out


def test_world_size_and_micro_batch_independence(data):
    ref = global_step_rows(data, 30, batch_size=8, grad_accum=1, world_size=1)
    for bs, ga, ws in ((4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4), (2, 1, 4)):
        got = global_step_rows(data, 30, batch_size=bs, grad_accum=ga, world_size=ws)
        assert got == ref, (bs, ga, ws)  # the same windows, even in the same order
    other_seed = global_step_rows(data, 3, batch_size=8, grad_accum=1, world_size=1, seed=7)
    assert other_seed != ref[:3]


def test_resume_exactly(data):
    a = TrainLoader(data, seq_len=T, batch_size=4, grad_accum=2)
    for _ in range(2 * 37 + 1):
        a.next_batch()
    a.next_batch()  # finish the step: state is saved at step boundaries
    state = json.loads(json.dumps(a.state_dict()))  # through state.json
    assert state["step"] == 38 and state["micro_step"] == 0
    b = TrainLoader(data, seq_len=T, batch_size=4, grad_accum=2)
    b.load_state_dict(state)
    assert (b.step, b.epoch) == (a.step, a.epoch)
    for _ in range(100):  # runs past an epoch boundary
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.state_dict() == a.state_dict()


def test_resume_mid_step_same_layout(data):
    a = TrainLoader(data, seq_len=T, batch_size=4, grad_accum=3)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert state["micro_step"] == 2
    b = TrainLoader(data, seq_len=T, batch_size=4, grad_accum=3)
    b.load_state_dict(state)
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    c = TrainLoader(data, seq_len=T, batch_size=6, grad_accum=2)
    with pytest.raises(UserError, match="middle of a step"):
        c.load_state_dict(state)


def test_resume_on_another_world_size(data):
    one = TrainLoader(data, seq_len=T, batch_size=4, grad_accum=2)
    for _ in range(2 * 11):
        one.next_batch()
    state = json.loads(json.dumps(one.state_dict()))
    ranks = [TrainLoader(data, seq_len=T, batch_size=2, grad_accum=1, rank=r, world_size=4) for r in range(4)]
    for ld in ranks:
        ld.load_state_dict(state)
    for _ in range(20):
        want = rows(one.next_batch()[0]) + rows(one.next_batch()[0])
        got = [r for ld in ranks for r in rows(ld.next_batch()[0])]
        assert got == want
    assert ranks[0].state_dict()["step"] == one.state_dict()["step"]


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 8}, "windows per step"),
    ({"seq_len": 8}, "seq_len differs"),
    ({"seed": 1}, "seed differs"),
])
def test_load_state_mismatch(data, change, message):
    state = TrainLoader(data, seq_len=T, batch_size=4).state_dict()
    kw = {"seq_len": T, "batch_size": 4, **change}
    with pytest.raises(UserError, match=message):
        TrainLoader(data, **kw).load_state_dict(state)


def test_load_state_other_dataset(tmp_path, data):
    state = TrainLoader(data, seq_len=T, batch_size=4).state_dict()
    other = make_dataset(tmp_path / "other", train_sizes=(1000, 701, 518))
    with pytest.raises(UserError, match="dataset differs"):
        TrainLoader(other, seq_len=T, batch_size=4).load_state_dict(state)


def test_validation_windows(data):
    n = val_windows(data, seq_len=T)
    assert n == (300 - 1) // T
    one = [r for x, y in iter_val_batches(data, seq_len=T, batch_size=4) for r in rows(x)]
    assert len(one) == n and one == [r for x, y in iter_val_batches(data, seq_len=T, batch_size=4) for r in rows(x)]
    toks = sh.read_tokens(sh.open_dataset(data).split("val")[0].path).astype(np.int64)
    assert one[0] == tuple(toks[:T].tolist()) and one[1] == tuple(toks[T: 2 * T].tolist())  # in order
    for ws in (2, 3, 5):
        parts = [[r for x, y in iter_val_batches(data, seq_len=T, batch_size=3, rank=r, world_size=ws) for r in rows(x)]
                 for r in range(ws)]
        assert [r for p in parts for r in p] == one
    limited = [r for x, _ in iter_val_batches(data, seq_len=T, batch_size=4, max_tokens=5 * T) for r in rows(x)]
    assert limited == one[:5]


def test_manifest_dataset(tmp_path):
    """A dataset written by prepare loads through its manifest."""
    import json as _json

    from gptlab.data.prepare import prepare
    from gptlab.data.sources import files_source

    corpus = tmp_path / "c.jsonl"
    rng = np.random.default_rng(0)
    corpus.write_text("".join(_json.dumps({"text": " ".join(map(str, rng.integers(0, 999, 60)))}) + "\n"
                              for _ in range(40)))
    prepare(files_source([str(corpus)]), tmp_path / "ds", shard_tokens=1000, workers=1, progress=False)
    loader = TrainLoader(tmp_path / "ds", seq_len=T, batch_size=4)
    x, y = loader.next_batch()
    assert x.shape == (4, T)
    assert next(iter_val_batches(tmp_path / "ds", seq_len=T, batch_size=2))[0].shape == (2, T)
    s = dataset_summary(tmp_path / "ds")
    assert s["splits"]["train"]["documents"] + s["splits"]["val"]["documents"] == 40


def test_errors(tmp_path, data):
    with pytest.raises(UserError, match="no such directory"):
        TrainLoader(tmp_path / "missing", seq_len=T, batch_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no token shards"):
        TrainLoader(tmp_path / "empty", seq_len=T, batch_size=2)
    with pytest.raises(UserError, match="fewer than one global batch"):
        TrainLoader(data, seq_len=T, batch_size=50, grad_accum=2, world_size=2)
    only_val = make_dataset(tmp_path / "v", train_sizes=())
    with pytest.raises(UserError, match="no train split"):
        TrainLoader(only_val, seq_len=T, batch_size=2)
    only_train = make_dataset(tmp_path / "t", val_sizes=())
    with pytest.raises(UserError, match="no val split"):
        next(iter_val_batches(only_train, seq_len=T, batch_size=2))
    with pytest.raises(UserError, match="fewer than one window"):
        next(iter_val_batches(data, seq_len=400, batch_size=2))
    with pytest.raises(UserError, match="rank"):
        TrainLoader(data, seq_len=T, batch_size=2, rank=2, world_size=2)
    bad = make_dataset(tmp_path / "b")
    victim = sorted(bad.glob("*train*"))[0]
    victim.write_bytes(victim.read_bytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        TrainLoader(bad, seq_len=T, batch_size=2)
    raw = bytearray(victim.read_bytes())
    raw[0:4] = (123).to_bytes(4, "little")
    victim.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="bad magic"):
        TrainLoader(bad, seq_len=T, batch_size=2)


def test_token_ids_beyond_the_vocabulary_are_one_error(tmp_path):
    """Ids >= 50257 used to reach the embedding (an IndexError deep in training): now the shard is
    refused when the loader opens it, naming the position and the id."""
    d = make_dataset(tmp_path / "d")
    bad = sh.read_tokens(d / sh.shard_name("t", "train", 1)).copy()
    bad[123] = 60000
    sh.write_shard(d / sh.shard_name("t", "train", 1), bad)
    loader = TrainLoader(d, seq_len=T, batch_size=4)
    with pytest.raises(UserError, match="token 123 is id 60000, outside GPT-2's vocabulary"):
        for _ in range(100):
            loader.next_batch()
    with pytest.raises(UserError, match="outside GPT-2's vocabulary"):
        sh.check_vocab(np.array([0, 50257], dtype=np.uint16), "x")
    sh.check_vocab(np.array([0, 50256], dtype=np.uint16), "x")  # the end-of-text id is a token


def test_corrupted_shard_content_is_caught_when_opened(tmp_path):
    """A flipped byte in a prepared shard (same size, valid header) is caught by the manifest's
    sha256 when training opens it, not only by `gptlab data verify`."""
    from gptlab.data.prepare import prepare
    from gptlab.data.sources import files_source

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(40)))
    prepare(files_source([str(corpus)]), tmp_path / "ds", shard_tokens=1000, workers=1, progress=False)
    TrainLoader(tmp_path / "ds", seq_len=T, batch_size=4).next_batch()  # intact: fine
    train = sorted((tmp_path / "ds").glob("*_train_*.bin"))[0]
    raw = bytearray(train.read_bytes())
    raw[-2] ^= 0x01  # a token id changes, still inside the vocabulary
    train.write_bytes(bytes(raw))
    loader = TrainLoader(tmp_path / "ds", seq_len=T, batch_size=4)
    with pytest.raises(UserError, match="does not match the manifest's sha256"):
        for _ in range(200):
            loader.next_batch()


def test_a_trained_vocabulary_larger_than_gpt2s_is_read_up_to_its_own_size(tmp_path):
    """Shards stay uint16, so a trained tokenizer may have up to 65,536 ids. The loader used to
    refuse every id above GPT-2's 50,256 whatever the manifest said (fails before the fix)."""
    import hashlib
    import json

    d = tmp_path / "big"
    d.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i, (split, n) in enumerate((("val", 400), ("train", 2000))):
        toks = rng.integers(50_000, 60_001, n).astype(np.uint16)  # up to the eot of a 60,001-id vocabulary
        toks[7] = 60_000
        name = sh.shard_name("big", split, i)
        sh.write_shard(d / name, toks)
        entries.append({"file": name, "split": split, "tokens": n, "documents": 1,
                        "sha256": hashlib.sha256((d / name).read_bytes()).hexdigest()})
    manifest = {"format": sh.FORMAT, "format_version": sh.FORMAT_VERSION, "shards": entries,
                "tokenizer": {"name": "big60k", "eot": 60_000, "vocab_size": 60_001}, "source": {"name": "test"}}
    (d / sh.MANIFEST).write_text(json.dumps(manifest))
    loader = TrainLoader(d, seq_len=T, batch_size=4)
    x, y = loader.next_batch()
    assert int(x.max()) > 50_256 and int(max(x.max(), y.max())) <= 60_000
    # ids beyond the dataset's own vocabulary are still refused, with its size in the message
    ds = sh.open_dataset(d)
    bad = sh.Shard(ds.shards[0].path, "val", 400, None, None, 60_000)
    with pytest.raises(UserError, match="60000"):
        sh.open_checked(bad)


def test_prefetch_same_batches_and_state_of_consumed(data, monkeypatch):
    """The background thread (one step ahead) hands out the batches a plain loader cuts; the state is
    the position of the batches handed out, not of those prepared; a load restarts the thread there.
    On the CPU nothing is pinned."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(1) or self)
    plain = TrainLoader(data, seq_len=T, batch_size=3, grad_accum=2)
    ahead = TrainLoader(data, seq_len=T, batch_size=3, grad_accum=2)
    ahead.prefetch(pin_memory=False)
    try:
        for _ in range(5):
            a, b = plain.next_batch(), ahead.next_batch()
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(plain.peek_batch()[0], ahead.peek_batch()[0])
        deadline = time.time() + 10
        while ahead._worker.queue.qsize() < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert ahead._worker.queue.qsize() == 2  # prepared ahead of what was handed out ...
        state = ahead.state_dict()
        assert state == plain.state_dict() and (state["step"], state["micro_step"]) == (2, 1)  # ... not saved
        resumed = TrainLoader(data, seq_len=T, batch_size=3, grad_accum=2)
        resumed.prefetch(pin_memory=False)
        resumed.load_state_dict(state)
        for _ in range(7):
            a, b, c = plain.next_batch(), ahead.next_batch(), resumed.next_batch()
            assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
        ahead.load_state_dict(state)  # backwards: the thread starts again at the loaded position
        assert torch.equal(ahead.next_batch()[0], resumed_first(data, state))
        resumed.stop_prefetch()
    finally:
        ahead.close()
    assert not pinned


def resumed_first(data, state):
    ld = TrainLoader(data, seq_len=T, batch_size=3, grad_accum=2)
    ld.load_state_dict(state)
    return ld.next_batch()[0]


def test_prefetch_pins_when_asked(data, monkeypatch):
    """pin_memory=True (a CUDA device) pins every batch the thread prepares."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(1) or self)
    ld = TrainLoader(data, seq_len=T, batch_size=2)
    ld.prefetch(pin_memory=True)
    try:
        ld.next_batch()
        ld.next_batch()
    finally:
        ld.close()
    assert len(pinned) >= 4  # x and y of each
