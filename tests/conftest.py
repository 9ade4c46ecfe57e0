"""Shared fixtures: small random GPT-2 models in gptlab's and in Hugging Face's formats, two
runners for the `gptlab` command line (in-process, `cli`, and in a subprocess, `run_gptlab`), a
reader of metrics.jsonl and of per-rank result files. Everything is created under pytest's
temporary directories."""

from __future__ import annotations

import json
import os
import subprocess
import time
import sys
from dataclasses import dataclass
from pathlib import Path

# One intra-op thread in every test process and every process a test starts: the suite runs two
# workers on two cores, so a second thread per process only competes (and spins) for a core the other
# worker is using; the models here are micro-sized. A test that wants more threads says so itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from gptlab.config import ModelConfig
from gptlab.model import GPT

# GPT-2's vocabulary with a tiny body: the embedding is the only large tensor (50257 x 32).
TINY_HF = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=50257)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so that LayerNorm gains/biases and Linear biases (initialised
    to 1 and 0) differ from each other and a swapped, dropped or untransposed tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def random_hf_gpt2(seed: int = 0, noise: float = 0.05, **overrides):
    """A transformers GPT2LMHeadModel (eval mode) with random, perturbed weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{**TINY_HF, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return perturb_(GPT2LMHeadModel(cfg), seed, noise).eval()


# torchrun waits this long for workers to end after it passed on a signal before it kills them (its
# default 30 s; gptlab's launcher's 120). The suite's micro runs save in well under a second, and the
# tests that stop or kill a rank would otherwise wait the whole default for the stopped one.
os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "10")


def random_gptlab(seed: int = 0, noise: float = 0.05, **overrides) -> GPT:
    """A gptlab GPT (eval mode) of the tiny shape with random, perturbed weights. More noise makes
    attention matter more (and greedy text less repetitive)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 32, "seq_len": 64, **overrides})
    return perturb_(GPT(cfg), seed, noise).eval()


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory) -> Path:
    """A Hugging Face GPT-2 directory written by transformers' save_pretrained (safetensors)."""
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    random_hf_gpt2(seed=0, noise=0.2).save_pretrained(path)  # noisy enough for varied greedy text
    return path


@pytest.fixture(scope="session")
def gptlab_model_dir(tmp_path_factory) -> Path:
    """A gptlab model directory (config.json + model.safetensors) of a random tiny model."""
    from gptlab.checkpoint import save_model

    path = tmp_path_factory.mktemp("gptlab") / "tiny"
    save_model(random_gptlab(seed=1), path)
    return path


def run_gptlab(*args, env: dict | None = None, timeout: float = 300, cwd: Path | str | None = None,
               ) -> subprocess.CompletedProcess:
    """Run `python -m gptlab ARGS...` in a subprocess (text mode, output captured). The one CLI
    runner of the suite: `env` adds to (or, with a None value, removes from) the environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    return subprocess.run([sys.executable, "-m", "gptlab", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture
def gptlab_cli():
    """run_gptlab as a fixture."""
    return run_gptlab


@dataclass
class Result:
    """What one in-process `gptlab` call did. Its fields are named as subprocess.CompletedProcess's,
    so a test reads the same whichever runner it uses."""
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """`gptlab ARGS...` in this process: cli(*args, env=None, cwd=None) -> Result(returncode,
    stdout, stderr), through gptlab.cli.main with capsys capturing both streams. An argparse error
    (SystemExit) becomes its exit status, as in a subprocess. `env` adds to (or, with a None value,
    removes from) os.environ for the call only; `cwd` is the working directory for the call only.
    No import-time check and no signal belongs here: those need a fresh process (run_gptlab).
    The global random generators (torch, numpy, random) are put back as they were, as a
    subprocess would leave them; a call that leaves other process-wide state changed (signal
    handlers, torch's thread count, a process group) fails the test, so that no leak reaches the
    tests after it."""
    import random
    import signal

    import torch.distributed as tdist

    from gptlab.cli import main

    def process_state():
        return ([signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)], torch.get_num_threads(),
                tdist.is_available() and tdist.is_initialized())

    def call(*args, env: dict | None = None, cwd: Path | str | None = None) -> Result:
        before = process_state()
        rngs = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
        with monkeypatch.context() as m:
            for k, v in (env or {}).items():
                if v is None:
                    m.delenv(k, raising=False)
                else:
                    m.setenv(k, str(v))
            if cwd is not None:
                m.chdir(cwd)
            capsys.readouterr()  # what the test printed before is not this call's output
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help (0) or a usage error (2)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            finally:
                torch.random.set_rng_state(rngs[0])
                np.random.set_state(rngs[1])
                random.setstate(rngs[2])
            out, err = capsys.readouterr()
        assert process_state() == before, f"gptlab {' '.join(map(str, args))} changed process state"
        return Result(code, out, err)

    return call


def read_metrics(run: Path | str, kind: str | None = None) -> list[dict]:
    """The records of one kind ("train", "val", "hellaswag", ...; None: every kind) in
    RUN/metrics.jsonl, in file order (a resumed run may log a step again)."""
    recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if kind is None or r.get("kind") == kind]


def metrics_by_step(run: Path | str, kind: str) -> dict[int, dict]:
    """read_metrics as {step: record}; where a resumed run logged a step again, its later record wins."""
    return {r["step"]: r for r in read_metrics(run, kind)}


# A script that several ranks run starts with this and ends with write_result(**fields): each rank
# writes its own JSON file into $RESULT_DIR, so no two ranks' output can run together (as lines on
# a shared stdout can). rank_results reads them back.
WRITE_RESULT = """
import json as _json, os as _os
def write_result(**fields):
    rank = int(_os.environ.get("RANK", "0"))
    path = _os.path.join(_os.environ["RESULT_DIR"], f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        _json.dump({"rank": rank, **fields}, f)
    _os.replace(path + ".tmp", path)
"""


def json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in `text`, wherever it starts: the exact reader of a JSON
    record on an output that several ranks share, where a line can run on into another rank's."""
    dec, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, i = dec.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def rank_results(result_dir: Path, nproc: int) -> list[dict]:
    """The records that ranks 0..nproc-1 wrote with WRITE_RESULT's write_result, by rank; each rank
    must have written exactly one."""
    files = sorted(Path(result_dir).glob("rank*.json"))
    assert [f.name for f in files] == sorted(f"rank{r}.json" for r in range(nproc)), files
    return [json.loads((Path(result_dir) / f"rank{r}.json").read_text()) for r in range(nproc)]


def write_shard(path: Path, tokens) -> None:
    """The one shard writer of the suite, independent of the code under test: llm.c's layout, a
    header of 256 little-endian int32 [20240520, 1, n_tokens, 0...], then the tokens as uint16."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    Path(path).write_bytes(header.tobytes() + np.asarray(tokens).astype("<u2").tobytes())


def markov_tokens(n: int, seed: int, vocab: int = 300) -> np.ndarray:
    """A learnable stream: each token mostly determines the next one (over `vocab` ids)."""
    nxt = np.random.default_rng(0).integers(0, vocab, size=vocab)  # the same chain for every split
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    t = 0
    for i in range(n):
        out[i] = t
        t = nxt[t] if rng.random() < 0.9 else rng.integers(0, vocab)
    return out


# The files that take longest (measured on the 2-core machine), scheduled first: `make test` hands
# whole files to its workers in collection order, and a long file started last is the suite's tail.
LONGEST_FIRST = ("test_train.py", "test_stream.py", "test_notebook.py", "test_precision.py", "test_soak.py",
                 "test_watchdog.py", "test_optim.py", "test_harness.py", "test_spikes.py", "test_restarts.py",
                 "test_hellaswag.py", "test_cli_eval.py", "test_dist.py", "test_faults.py", "test_chat_train.py",
                 "test_resume_auto.py", "test_fsdp.py", "test_slurm.py", "test_cli_errors.py")


def _schedule_rank(item) -> int:
    name = Path(str(item.fspath)).name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    """The longest files first (a stable sort: each file keeps its own order). Tests marked `gpu`
    need CUDA: they run wherever a GPU exists (`pytest -m gpu`), and are skipped, visibly, elsewhere."""
    items.sort(key=_schedule_rank)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_hf_gpt2():
    """random_hf_gpt2 as a fixture: make_hf_gpt2(seed=0, **GPT2Config overrides)."""
    return random_hf_gpt2


@pytest.fixture
def make_gptlab():
    """random_gptlab as a fixture: make_gptlab(seed=0, **ModelConfig overrides)."""
    return random_gptlab


# Three conversations in the OpenAI `messages` form: a system turn, two assistant turns, a short one.
CHAT_CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello."}],
    [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And three?"}, {"role": "assistant", "content": "Five, well, six."}],
    [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}],
]


def write_chat_jsonl(path: Path, convs) -> Path:
    """convs as a conversations file for `gptlab prepare chat`: one {"messages": [...]} a line."""
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs), encoding="utf-8")
    return path


def chat_test_model(seed: int = 5):
    """A random gptlab model with the chat template and tokens, its <|end|> (50260) made likely so
    that some replies end at the end-of-turn token."""
    from gptlab import chat

    model = random_gptlab(seed=seed, noise=0.3, vocab_size=50261, chat=chat.TEMPLATE)
    with torch.no_grad():
        model.lm_head.weight[50260] += 2.0 * model.transformer.ln_f.weight
    return model


def serve_in_background(model_dir, step_delay: float = 0.0, **cfg_kw):
    """`with serve_in_background(DIR, ...) as url:` gptlab's server for a model directory, on the CPU
    in a thread of this process (ServeConfig fields as keywords). step_delay slows every model step,
    so that streaming is visible; the BackgroundServer's .engine is the engine."""
    from gptlab.serve import BackgroundServer, ServeConfig, load_engine

    cfg = ServeConfig(model=str(model_dir), device="cpu", **cfg_kw)
    engine, name = load_engine(cfg, status=lambda m: None)
    if step_delay:
        hidden = engine.model.hidden

        def slow(*a, **k):
            time.sleep(step_delay)
            return hidden(*a, **k)

        engine.model.hidden = slow
    return BackgroundServer(engine, cfg, name)


def post_json(url: str, body, headers: dict | None = None, raw: bytes | None = None):
    """POST JSON (or `raw` bytes) with the standard library: (status, the parsed body, or its text)."""
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def make_toy_data(d: Path, val_tokens: int = 20_000, train_tokens: int = 200_000) -> Path:
    """A learnable toy dataset (markov_tokens) of one val and one train shard in directory d."""
    d.mkdir(parents=True, exist_ok=True)
    write_shard(d / "toy_val_000000.bin", markov_tokens(val_tokens, 1))
    write_shard(d / "toy_train_000001.bin", markov_tokens(train_tokens, 2))
    return d


def sigterm_after(args, metrics: Path, lines: int = 5, timeout: float = 120, env: dict | None = None):
    """Start `python -m gptlab ARGS...`, send SIGTERM once `metrics` holds `lines` records, and
    return (exit status, stderr): the interrupted half of a stop-then-resume test."""
    import signal
    import time

    full_env = None if env is None else {**os.environ, **env}
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= lines:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


import signal as _signal  # noqa: E402


def sigterm_at_step(monkeypatch, step: int) -> None:
    """A real SIGTERM to this process right after `step` (the loop saves there and stops)."""
    from gptlab import train as train_mod

    real = train_mod.Trainer.train_step

    def step_then_signal(trainer, fixed, bar):
        loss = real(trainer, fixed, bar)
        if trainer.step == step:
            os.kill(os.getpid(), _signal.SIGTERM)
        return loss
    monkeypatch.setattr(train_mod.Trainer, "train_step", step_then_signal)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With GPTLAB_TEST_CPU=FILE, append each test's wall time and CPU seconds (this process and
    the processes it started and waited for) to FILE, one JSON object a line: where the suite's
    time goes (sum it by file to order LONGEST_FIRST)."""
    path = os.environ.get("GPTLAB_TEST_CPU")
    if not path:
        return (yield)
    import resource
    import time

    def cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    t0, c0 = time.monotonic(), cpu()
    try:
        return (yield)
    finally:
        rec = {"test": item.nodeid, "wall": round(time.monotonic() - t0, 2), "cpu": round(cpu() - c0, 2),
               "worker": os.environ.get("PYTEST_XDIST_WORKER", ""), "end": round(time.time(), 1)}
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
