"""Streamed shards from a loopback HTTP server (plain URL and a Hugging Face-style hub): the order,
resume, the disk budget, slow and dying servers, corrupt and truncated downloads, the CLI."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_gptlab, sigterm_after
from gptlab.atomic import is_temporary
from gptlab.config import EOT_TOKEN
from gptlab.data import shards as sh
from gptlab.data import remote, stream as st
from gptlab.data.loader import TrainLoader, iter_val_batches, open_val, val_windows
from gptlab.errors import UserError
from gptlab.net import Retry
from gptlab.units import parse_size
from shard_server import ShardServer

T = 16
TRAIN_SIZES = (1000, 701, 517, 900, 333, 1201)
FAST = Retry(attempts=3, backoff=0.05, timeout=2.0)
CLI_ENV = {"GPTLAB_STREAM_RETRIES": "2", "GPTLAB_STREAM_BACKOFF": "0.05", "GPTLAB_STREAM_TIMEOUT": "2"}


def write_dataset(d: Path, train_sizes=TRAIN_SIZES, val_sizes=(300,), manifest=True, seed=0, vocab=50257) -> Path:
    """Shards of random tokens (every window unique), with a manifest as `gptlab prepare` writes it."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, i = [], 0
    for split, sizes in (("val", val_sizes), ("train", train_sizes)):
        for n in sizes:
            toks = rng.integers(0, vocab, n).astype(np.uint16)
            name = sh.shard_name("r", split, i)
            digest = sh.write_shard(d / name, toks)
            entries.append({"file": name, "split": split, "tokens": n, "sha256": digest,
                            "documents": int((toks == EOT_TOKEN).sum())})
            i += 1
    if manifest:
        sh.write_manifest(d, {"format": sh.FORMAT, "format_version": sh.FORMAT_VERSION,
                              "source": {"name": "random"}, "shards": entries})
    return d


@pytest.fixture
def server(tmp_path):
    write_dataset(tmp_path / "www" / "ds")
    write_dataset(tmp_path / "www" / "hub", manifest=False)  # llm.c shards as on the hub: no manifest
    srv = ShardServer(tmp_path / "www")
    yield srv
    srv.stop()


def loader(source, tmp_path, cache="cache", **kw) -> TrainLoader:
    args = dict(seq_len=T, batch_size=4, grad_accum=1, cache=tmp_path / cache, retry=FAST, ahead=2)
    args.update(kw)
    return TrainLoader(source, **args)


def rows(x: torch.Tensor) -> list[tuple]:
    return [tuple(r) for r in x.tolist()]


def all_windows(d: Path) -> dict[tuple, str]:
    """Every train window of a directory -> its shard's name."""
    out = {}
    for s in sh.open_dataset(d).split("train"):
        toks = sh.read_tokens(s.path).astype(np.int64)
        for k in range((s.tokens - 1) // T):
            out[tuple(toks[k * T: k * T + T].tolist())] = s.path.name
    return out


def test_stream_order_one_epoch_shard_by_shard(server, tmp_path):
    ld = loader(f"{server.url}/ds", tmp_path, batch_size=1)
    W = ld.windows_per_epoch
    assert W == sum((n - 1) // T for n in TRAIN_SIZES) and ld.tokens_per_epoch == W * T
    windows = all_windows(tmp_path / "www" / "ds")
    seen = [rows(ld.next_batch()[0])[0] for _ in range(W)]
    assert sorted(seen) == sorted(windows)  # each window exactly once per epoch
    shard_seq = [windows[r] for r in seen]
    runs = [s for i, s in enumerate(shard_seq) if i == 0 or s != shard_seq[i - 1]]
    assert sorted(runs) == sorted(set(shard_seq))  # one shard at a time, each shard once
    assert runs != sorted(runs)  # in a shuffled shard order
    first = [windows[r] for r in seen[:5]]
    toks = sh.read_tokens(tmp_path / "www" / "ds" / first[0]).astype(np.int64)
    offsets = [next(k for k in range(0, len(toks), T) if tuple(toks[k:k + T]) == r) for r in seen[:5]]
    assert offsets != sorted(offsets)  # windows shuffled inside the shard
    assert ld.epoch == 1
    second = [rows(ld.next_batch()[0])[0] for _ in range(W)]
    assert sorted(second) == sorted(seen) and second != seen  # a new order each epoch
    ld.close()


def step_rows(source, tmp_path, steps, *, batch_size, grad_accum, world_size, seed=1337, cache="c"):
    lds = [loader(source, tmp_path, cache=cache, batch_size=batch_size, grad_accum=grad_accum, rank=r,
                  world_size=world_size, seed=seed, disk_budget="1M") for r in range(world_size)]
    out = [[r for ld in lds for _ in range(grad_accum) for r in rows(ld.next_batch()[0])] for _ in range(steps)]
    for ld in lds:
        ld.close()
    return out


def test_stream_order_is_deterministic_and_world_size_independent(server, tmp_path):
    url = f"{server.url}/ds"
    ref = step_rows(url, tmp_path, 40, batch_size=8, grad_accum=1, world_size=1)
    assert ref == step_rows(url, tmp_path, 40, batch_size=8, grad_accum=1, world_size=1, cache="again")
    for bs, ga, ws in ((4, 2, 1), (4, 1, 2), (2, 1, 4), (1, 2, 4)):
        assert step_rows(url, tmp_path, 40, batch_size=bs, grad_accum=ga, world_size=ws) == ref, (bs, ga, ws)
    assert step_rows(url, tmp_path, 3, batch_size=8, grad_accum=1, world_size=1, seed=7) != ref[:3]


def test_resume_exactly_refetching_what_it_needs(server, tmp_path):
    url = f"{server.url}/ds"
    a = loader(url, tmp_path, batch_size=4, grad_accum=2)
    for _ in range(2 * 21):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert state["order"] == "shards-v1" and state["step"] == 21
    want = [a.next_batch() for _ in range(120)]  # past an epoch boundary
    a.close()
    assert [p.name for p in (tmp_path / "cache").rglob("*.bin")] == []  # train shards deleted on close
    n_before = len(server.requests)
    b = loader(url, tmp_path, batch_size=4, grad_accum=2)
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(120)]
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(want, got))
    assert any(r.endswith(".bin") for r in server.requests[n_before:])  # fetched again
    # on another world size, from the same state
    ranks = [loader(url, tmp_path, cache=f"r{r}", batch_size=2, grad_accum=1, rank=r, world_size=4)
             for r in range(4)]
    for ld in ranks:
        ld.load_state_dict(state)
    for i in range(0, 40, 2):
        expect = rows(want[i][0]) + rows(want[i + 1][0])
        assert [r for ld in ranks for r in rows(ld.next_batch()[0])] == expect
    local = TrainLoader(tmp_path / "www" / "ds", seq_len=T, batch_size=4, grad_accum=2)
    with pytest.raises(UserError, match="order differs"):
        local.load_state_dict(state)  # the local order is another order
    for ld in (b, *ranks):
        ld.close()


def test_budget_is_never_exceeded(server, tmp_path):
    """The cache is sampled while a throttled server feeds a run; its size never exceeds the budget."""
    url = f"{server.url}/ds"
    sizes = sorted((sh.shard_bytes(n) for n in TRAIN_SIZES), reverse=True)
    budget = sh.shard_bytes(300) + sizes[0] + sizes[1] + 1000  # val + the two largest train shards
    server.rate = 400_000  # bytes/s: downloads overlap the consumption
    cache = tmp_path / "cache"
    ld = loader(url, tmp_path, disk_budget=budget, ahead=4)
    peak, files, stop = [0], [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], st.disk_usage(cache))
            files[0] = max(files[0], sum(1 for p in cache.rglob("*_train_*")))
            time.sleep(0.0005)
    t = threading.Thread(target=sample)
    t.start()
    try:
        for _ in range(3 * ld.windows_per_epoch // 4):  # three epochs, the val split fetched midway
            ld.next_batch()
            if ld.step == ld.windows_per_epoch // 4:
                assert len(list(iter_val_batches(ld.val_split(), seq_len=T, batch_size=4))) == (300 - 1) // T // 4 + 1
    finally:
        stop.set()
        t.join()
    assert 0 < peak[0] <= budget, (peak[0], budget)
    assert 2 <= files[0] <= 5  # fetched ahead, but never more than the one in use and `ahead` more
    assert ld._stream.peak_reserved <= budget
    ld.close()
    assert sorted(p.name for p in cache.rglob("*.bin")) == ["r_val_000000.bin"]  # the val split stays


def test_budget_too_small_is_refused(cli, server, tmp_path):
    with pytest.raises(UserError, match="too small"):
        loader(f"{server.url}/ds", tmp_path, disk_budget="3K")
    r = cli("train", "--model", "tiny", "--data", f"{server.url}/ds", "--data-disk-budget", "3K",
            "--data-cache", str(tmp_path / "c"), "--out", str(tmp_path / "run"), "--device", "cpu",
            env=CLI_ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--data-disk-budget" in r.stderr
    r = cli("train", "--data-disk-budget", "lots")
    assert r.returncode == 2 and "size" in r.stderr


def test_data_of_a_trained_tokenizer_is_refused_for_streaming_in_one_line(cli, server, tmp_path):
    """Its tokenizer files are not fetched, so it would be read as GPT-2's: refused, saying what to do."""
    d = tmp_path / "www" / "ds"
    m = sh.read_manifest(d)
    m["tokenizer"] = {"name": "shk500", "eot": 500, "vocab_size": 501, "sha256": "0" * 64}
    sh.write_manifest(d, m)
    with pytest.raises(UserError, match="tokenized with shk500"):
        loader(f"{server.url}/ds", tmp_path)
    r = cli("train", "--model", "tiny", "--data", f"{server.url}/ds", "--data-cache", str(tmp_path / "c"),
            "--out", str(tmp_path / "run"), "--device", "cpu", env=CLI_ENV)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "download the dataset" in r.stderr


def test_slow_server_gives_the_same_batches(server, tmp_path):
    url = f"{server.url}/ds"
    fast = loader(url, tmp_path, cache="fast")
    want = [fast.next_batch()[0] for _ in range(150)]
    fast.close()
    server.rate = 100_000  # a shard takes 10-25 ms
    slow = loader(url, tmp_path, cache="slow")
    got = [slow.next_batch()[0] for _ in range(150)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert slow.wait_seconds > 0
    slow.close()


def test_server_dying_mid_run_is_one_error_not_a_hang(server, tmp_path):
    ld = loader(f"{server.url}/ds", tmp_path, ahead=1)
    for _ in range(10):
        ld.next_batch()
    server.stop()
    t0 = time.time()
    with pytest.raises(UserError) as err:
        for _ in range(10 * ld.windows_per_epoch):
            ld.next_batch()
    assert time.time() - t0 < 20
    msg = str(err.value)
    assert "\n" not in msg and "cannot connect" in msg and "gave up after 3 attempts" in msg
    assert not [p for p in (tmp_path / "cache").rglob("*") if is_temporary(p.name)]
    ld.close()


@pytest.mark.parametrize("fault", ["corrupt", "truncate", "404"])
def test_bad_download_is_retried(server, tmp_path, fault):
    url = f"{server.url}/ds"
    ref = loader(url, tmp_path, cache="ref", ahead=1)
    n = ref.windows_per_epoch // 4  # the whole first epoch: every shard is used
    want = [ref.next_batch()[0] for _ in range(n)]
    ref.close()
    victim = sh.shard_name("r", "train", 2)
    server.faults[victim], server.fault_count[victim] = fault, 2  # fails twice, then serves it whole
    before = server.requests.count(f"/ds/{victim}")
    ld = loader(url, tmp_path, ahead=1)
    got = [ld.next_batch()[0] for _ in range(n)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert server.requests.count(f"/ds/{victim}") - before >= 3
    assert server.fault_count[victim] == 0
    ld.close()


@pytest.mark.parametrize("fault, message", [("corrupt", "sha256"), ("truncate", "truncated download"),
                                            ("404", "HTTP 404"), ("stall", "no data within 1 s")])
def test_persistent_bad_download_is_one_error(server, tmp_path, fault, message):
    for p in (tmp_path / "www" / "ds").glob("*_train_*"):
        server.faults[p.name] = fault
    ld = loader(f"{server.url}/ds", tmp_path, retry=Retry(attempts=2, backoff=0.01, timeout=1.0))
    t0 = time.time()
    with pytest.raises(UserError, match=message) as err:
        ld.next_batch()
    assert time.time() - t0 < 15 and "\n" not in str(err.value) and "gave up after 2 attempts" in str(err.value)
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("*") if "_train_" in p.name]  # nothing partial or bad was kept
    ld.close()


def test_unreachable_and_missing_sources(tmp_path):
    srv = ShardServer(tmp_path)
    url = srv.url
    with pytest.raises(UserError, match="HTTP 404"):
        loader(f"{url}/nothing", tmp_path)
    srv.stop()
    with pytest.raises(UserError, match="cannot connect"):
        loader(f"{url}/nothing", tmp_path)
    with pytest.raises(UserError, match="hf://datasets/OWNER/NAME"):
        loader("hf://models/gpt2", tmp_path)


@pytest.fixture
def hub(server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    # other test files (the harness's) switch huggingface_hub offline for the whole session; this
    # loopback "hub" must be reachable
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return server


def test_hub_listing_headers_and_order(hub, tmp_path):
    src = "hf://datasets/owner/shards/hub"
    ds = remote.open_remote(src, FAST)
    assert ds.manifest is None and [e.tokens for e in ds.split("train")] == list(TRAIN_SIZES)
    assert any(r.startswith("/api/datasets/owner/shards/tree/main") for r in hub.requests)
    assert all(not r.endswith(".bin") or r.startswith("/datasets/owner/shards/resolve/main/hub/")
               for r in hub.requests)
    # the same shards as the URL source (same names and sizes): the same order
    ref = step_rows(f"{hub.url}/ds", tmp_path, 30, batch_size=8, grad_accum=1, world_size=1, cache="u")
    got = step_rows(src, tmp_path, 30, batch_size=8, grad_accum=1, world_size=1, cache="h")
    assert got == ref
    # a shard cut short is caught by header and size, and retried
    victim = sh.shard_name("r", "train", 1)
    ld = loader(src, tmp_path, cache="t")
    hub.faults[victim] = "truncate"  # after the listing has read the headers
    with pytest.raises(UserError, match="truncated download"):
        ld.next_batch()
        for _ in range(ld.windows_per_epoch):
            ld.next_batch()
    ld.close()
    with pytest.raises(UserError, match="listing files"):
        remote.open_remote("hf://datasets/owner/missing", FAST)


def test_val_split_from_stream(server, tmp_path, monkeypatch):
    """A loader hands out its own copy of the val split (in its cache, within its budget); a source
    on its own is fetched into the default cache, even while a loader of it is open: nothing is
    passed through a module-level table."""
    url = f"{server.url}/ds"
    local = tmp_path / "www" / "ds"
    want = [x for x, _ in iter_val_batches(local, seq_len=T, batch_size=4)]
    ld = loader(url, tmp_path)
    val = ld.val_split()
    assert val.where == url and all((tmp_path / "cache") in s.path.parents for s in val.shards)
    assert val_windows(val, seq_len=T) == val_windows(local, seq_len=T)
    got = [x for x, _ in iter_val_batches(val, seq_len=T, batch_size=4)]
    assert all(torch.equal(a, b) for a, b in zip(want, got)) and len(got) == len(want)
    assert list((tmp_path / "cache").rglob("r_val_000000.bin"))  # in the loader's cache
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "home"))  # the URL alone: fetched into the default cache
    got = [x for x, _ in iter_val_batches(url, seq_len=T, batch_size=4)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert list((tmp_path / "home" / "data").rglob("r_val_000000.bin"))
    ld.close()
    assert not hasattr(st, "_OPEN")
    # a local loader's val split is the directory's
    assert [s.path for s in loader(local, tmp_path).val_split().shards] == [s.path for s in
                                                                           open_val(local).shards]


def test_cli_data_info_and_verify(server, tmp_path, gptlab_cli):
    env = {**CLI_ENV, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None}
    for src in (f"{server.url}/ds", "hf://datasets/owner/shards/ds", "hf://datasets/owner/shards/hub"):
        r = gptlab_cli("data", "info", src, env=env)
        assert r.returncode == 0, r.stderr
        assert "train" in r.stdout and f"{sum(TRAIN_SIZES):,}" in r.stdout
        r = gptlab_cli("data", "verify", src, "--no-progress", env=env)
        assert r.returncode == 0 and ("OK" if "/hub" not in src else "no manifest") in r.stdout, r.stderr
    victim = sh.shard_name("r", "train", 3)
    server.faults[victim] = "corrupt"
    r = gptlab_cli("data", "verify", f"{server.url}/ds", "--no-progress", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert victim in r.stderr and "sha256" in r.stderr
    r = gptlab_cli("data", "info", f"{server.url}/nope", env=env)
    assert r.returncode == 2 and "HTTP 404" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_parse_size():
    assert parse_size("10G") == 10 << 30 and parse_size("1.5M") == 3 << 19
    assert parse_size("20K") == 20480 and parse_size("2GiB") == 2 << 30 and parse_size(4096) == 4096
    for bad in ("x", "0", "-1G", "1Q"):
        with pytest.raises(UserError):
            parse_size(bad)


# ------------------------------------------------------------------------------- training end to end
def train_flags(data: str, out: Path, cache: Path, **kw) -> dict:
    base = dict(model="tiny", n_layer=1, n_head=2, n_embd=32, seq_len=32, vocab_size=320, data=data, out=str(out),
                data_cache=str(cache), data_disk_budget="64K", batch_size=4, total_batch_tokens=256,
                max_steps=8, lr=1e-2, warmup_steps=3, eval_every=4, eval_tokens=512, sample_tokens=0,
                checkpoint_every=0, device="cpu", seed=5)
    base.update(kw)
    return base


def metrics(run: Path) -> dict[tuple[str, int], float]:
    return {(r["kind"], r["step"]): r["loss"] for kind in ("train", "val") for r in read_metrics(run, kind)}


@pytest.fixture
def train_server(tmp_path, monkeypatch):
    for k, v in CLI_ENV.items():
        monkeypatch.setenv(k, v)
    # ids below 320: the runs below train a 320-id model (--vocab-size), 5x faster than GPT-2's 50,304 rows
    write_dataset(tmp_path / "www" / "tr", train_sizes=(3000, 2500, 4000, 1800), val_sizes=(1500,), vocab=320)
    srv = ShardServer(tmp_path / "www")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_train_from_url_resumes_exactly(train_server, tmp_path):
    from gptlab.config import resolve_train_config
    from gptlab.train import train

    url = f"{train_server.url}/tr"
    train(resolve_train_config(train_flags(url, tmp_path / "full", tmp_path / "c1")))
    train(resolve_train_config(train_flags(url, tmp_path / "part", tmp_path / "c2", checkpoint_every=3)))
    ckdir = tmp_path / "part" / "checkpoints"  # keep only step 3: the resume must refetch from there
    for p in ckdir.glob("step_*"):
        if p.name != "step_000003":
            import shutil
            shutil.rmtree(p)
    (ckdir / "latest").write_text("step_000003\n")
    train(resolve_train_config({"out": str(tmp_path / "part")}), resume=True, resume_flags={})
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert ("val", 8) in full and len([k for k in full if k[0] == "train"]) == 8
    assert full.keys() == part.keys()
    for k in full:
        assert abs(full[k] - part[k]) <= 1e-6, k
    assert not list((tmp_path / "c2").rglob("*_train_*"))  # train shards deleted at the end


@pytest.mark.slow
def test_sigterm_then_resume_from_url_is_exact(train_server, tmp_path):
    url = f"{train_server.url}/tr"
    common = ["train", "--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
              "--vocab-size", "320", "--data", url, "--data-cache", str(tmp_path / "c"), "--data-disk-budget", "40K",
              "--batch-size", "4", "--total-batch-tokens", "256", "--max-steps", "40", "--lr", "3e-3",
              "--warmup-steps", "3", "--eval-every", "0", "--sample-tokens", "0", "--checkpoint-every", "0",
              "--device", "cpu", "--seed", "5"]
    r = run_gptlab(*common, "--out", str(tmp_path / "full"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "stopped"
    code, err = sigterm_after([*common, "--out", run], run / "metrics.jsonl", lines=5, timeout=120)
    assert code == 143, err
    r = run_gptlab("train", "--out", str(run), "--resume")
    assert r.returncode == 0, r.stderr
    full, part = metrics(tmp_path / "full"), metrics(run)
    assert full.keys() == part.keys() and all(abs(full[k] - part[k]) <= 1e-6 for k in full)


def test_eval_val_loss_from_a_url_equals_the_local_copy(server, tmp_path, gptlab_model_dir, monkeypatch):
    """`gptlab eval MODEL --val URL` reads the val split through the stream (it was refused as "no
    such dataset directory" before); the same number as the local copy gives."""
    from gptlab.evaluate import run_eval

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    import io

    local = run_eval(str(gptlab_model_dir), val_dir=str(tmp_path / "www" / "ds"), device="cpu", out=io.StringIO())
    remote = run_eval(str(gptlab_model_dir), val_dir=f"{server.url}/ds", device="cpu", out=io.StringIO())
    assert remote["val"]["tokens"] == local["val"]["tokens"] > 0
    assert remote["val"]["loss"] == pytest.approx(local["val"]["loss"], abs=1e-6)


def shard_gets(srv: ShardServer) -> dict[str, int]:
    """How many times each shard file was asked for (manifest and listings left out)."""
    counts: dict[str, int] = {}
    for path in srv.requests:
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".bin"):
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_each_shard_is_fetched_once_per_epoch_across_checkpoints_evals_and_a_resume(train_server, tmp_path):
    """Checkpoints every 2 steps (each one runs the forward check on the next batch), evaluations
    every 3, then a resume: within one epoch a train shard is fetched once per process (the resume
    fetches the shard it continues in once more), the val split once. Before TrainLoader.peek_batch
    the check before each save re-planned the stream and every checkpoint fetched its shards again."""
    from gptlab.config import resolve_train_config
    from gptlab.train import train

    url = f"{train_server.url}/tr"
    flags = train_flags(url, tmp_path / "run", tmp_path / "c", max_steps=12, checkpoint_every=2,
                        eval_every=3, data_disk_budget="24K")
    train(resolve_train_config(flags))
    first = shard_gets(train_server)
    train_files = [n for n in first if "_train_" in n]
    assert len(train_files) >= 2, first  # 12 steps of 8 windows cross at least one shard boundary
    assert all(c == 1 for c in first.values()), first
    assert any("_val_" in n for n in first), first
    train_server.requests.clear()
    res = train(resolve_train_config({"out": str(tmp_path / "run")}), resume=True,
                resume_flags={"max_steps": 24})
    assert res.steps == 24
    second = shard_gets(train_server)
    assert all(c == 1 for c in second.values()), second  # the resume: once more at most
    assert not any("_val_" in n for n in second), second  # the val split is still on disk, verified


def test_peek_batch_does_not_move_or_refetch(server, tmp_path):
    """peek_batch before every next_batch (the pre-save check does it): the same batches as a loader
    that never peeks, state unmoved by a peek, and every train shard fetched once in the epoch, also
    when a peeked batch crosses into the next shard (the stream deletes the shard before it)."""
    url = f"{server.url}/ds"
    plain = loader(url, tmp_path, cache="a", disk_budget="12K")
    want = [plain.next_batch() for _ in range(40)]
    plain.close()
    server.requests.clear()
    peeking = loader(url, tmp_path, cache="b", disk_budget="12K")
    for i, (x, y) in enumerate(want):
        before = peeking.state_dict()
        px, py = peeking.peek_batch()
        assert peeking.state_dict() == before
        assert torch.equal(px, x) and torch.equal(py, y), i
        got = peeking.next_batch()
        assert torch.equal(got[0], x) and torch.equal(got[1], y), i
    peeking.close()
    gets = shard_gets(server)
    assert len(gets) >= 3 and all(c == 1 for c in gets.values()), gets
