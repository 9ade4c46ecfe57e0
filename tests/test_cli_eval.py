"""`gptlab eval` end to end: JSON shape, the table, user errors, and 2 gloo ranks = 1 rank."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import json_objects, write_shard
from gptlab.cli import main

WORDS = ("a man woman dog runs jumps into the water slowly then picks up ball and throws it far away "
         "while people watch from shore laughing kids play on grass field in sun").split()


def make_items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 20)))) + "."
        b = str(rng.choice(WORDS))
        ends = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 10)))) + "." for _ in range(4)]
        out.append({"activity_label": "Playing", "ctx_a": a, "ctx_b": b, "ctx": a + " " + b,
                    "endings": ends, "label": int(rng.integers(0, 4))})
    return out


@pytest.fixture(scope="module")
def hs_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("hs") / "hellaswag_small.jsonl"
    p.write_text("".join(json.dumps(it) + "\n" for it in make_items(13)), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("valdata")
    rng = np.random.default_rng(1)
    write_shard(d / "test_val_000000.bin", rng.integers(0, 50257, 4000))
    write_shard(d / "test_train_000001.bin", rng.integers(0, 50257, 4000))
    return d


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_shape_hellaswag_only(capsys, gptlab_model_dir, hs_file):
    code, out, _ = run(capsys, gptlab_model_dir, "--hellaswag-file", hs_file, "--json", "--device", "cpu")
    assert code == 0
    res = json.loads(out)
    assert set(res) == {"hellaswag"}
    for style in ("completion", "harness"):
        assert set(res["hellaswag"][style]) == {"acc", "acc_norm", "n"}
        assert res["hellaswag"][style]["n"] == 13
        assert 0.0 <= res["hellaswag"][style]["acc"] <= 1.0
    assert res["hellaswag"]["cropped"] == 0


def test_json_shape_val_and_both(capsys, gptlab_model_dir, hs_file, data_dir):
    code, out, _ = run(capsys, gptlab_model_dir, "--val", data_dir, "--json", "--batch-size", "4")
    assert code == 0
    res = json.loads(out)
    assert set(res) == {"val"} and set(res["val"]) == {"loss", "perplexity", "tokens"}
    assert res["val"]["perplexity"] == pytest.approx(np.exp(res["val"]["loss"]))
    assert res["val"]["tokens"] == (4000 - 1) // 64 * 64  # every whole window of the tiny model's context

    code, out, _ = run(capsys, gptlab_model_dir, "--hellaswag", "--hellaswag-file", hs_file, "--limit", "5",
                       "--val", data_dir, "--val-tokens", "128", "--json")
    res = json.loads(out)
    assert code == 0 and set(res) == {"hellaswag", "val"}
    assert res["hellaswag"]["completion"]["n"] == 5 and res["val"]["tokens"] == 128


def test_table_output(capsys, gptlab_model_dir, hs_file, data_dir):
    code, out, _ = run(capsys, gptlab_model_dir, "--hellaswag-file", hs_file, "--val", data_dir, "--val-tokens", "256")
    assert code == 0
    assert "completion (build-nanogpt style)" in out and "harness (lm-eval-harness style)" in out
    assert "validation loss" in out and "perplexity" in out


@pytest.mark.parametrize("args, message", [
    ([], "nothing to evaluate"),
    (["--hellaswag-file", "{tmp}/missing.jsonl"], "no such HellaSwag file"),
    (["--hellaswag-file", "{tmp}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    (["--val", "{tmp}/nodata"], "no such dataset directory"),
    (["--val", "{tmp}/trainonly"], "no val split"),
    (["--val", "{tmp}", "--limit", "3"], "--limit applies to HellaSwag"),
    (["--hellaswag-file", "{tmp}/bad.jsonl", "--val-tokens", "1M"], "--val-tokens applies to validation loss"),
    (["--hellaswag", "--include-path", "{tmp}"], "--include-path applies to harness tasks"),
    (["--hellaswag", "--num-fewshot", "2"], "--num-fewshot applies to harness tasks"),
    (["--tasks", " , "], "--tasks needs at least one task name"),
    (["--tasks", "t", "--include-path", "{tmp}/nodir"], "no such task directory"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, gptlab_model_dir, args, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps(make_items(1)[0]) + "\n{oops\n")
    (tmp_path / "trainonly").mkdir()
    write_shard(tmp_path / "trainonly" / "x_train_000000.bin", np.arange(100))
    code, out, err = run(capsys, gptlab_model_dir, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_missing_model_is_a_user_error(capsys, tmp_path, hs_file):
    code, _, err = run(capsys, tmp_path / "no-model", "--hellaswag-file", hs_file)
    assert code == 2 and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- two ranks

def torchrun(nproc: int, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "gptlab", "eval", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one(capsys, gptlab_model_dir, hs_file, data_dir):
    # 13 items in batches of 2: 7 batches, so rank 0 runs 4 and rank 1 runs 3
    args = [gptlab_model_dir, "--hellaswag-file", hs_file, "--batch-size", "2", "--val", data_dir,
            "--device", "cpu", "--json"]
    code, out, _ = run(capsys, *args)
    assert code == 0
    one = json.loads(out)
    r = torchrun(2, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    objs = json_objects(r.stdout)  # two ranks share stdout: read the record, not a line
    assert len(objs) == 1, r.stdout  # rank 0 prints, rank 1 does not
    two = objs[0]
    assert two["hellaswag"] == one["hellaswag"]  # exactly: the same batches score the same
    assert two["val"]["tokens"] == one["val"]["tokens"]
    assert two["val"]["loss"] == pytest.approx(one["val"]["loss"], rel=1e-6)  # up to summation order


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing file", "bad download"])
def test_two_ranks_fail_together_on_a_user_error(tmp_path, gptlab_model_dir, hs_file, case):
    if case == "missing file":
        r = torchrun(2, gptlab_model_dir, "--hellaswag-file", tmp_path / "missing.jsonl", timeout=120)
        want = "no such HellaSwag file"
    else:
        # rank 0 downloads a file whose sha256 is not the pinned one; rank 1 must not hang waiting
        with serve(hs_file.parent) as base:
            r = torchrun(2, gptlab_model_dir, "--hellaswag", "--cache-dir", tmp_path / "cache", timeout=120,
                         env={"GPTLAB_HELLASWAG_URL": base + "/" + hs_file.name})
        want = "expected 0aa3b888"  # rank 0's line; rank 1 stops too (within the timeout), quietly
        assert not list((tmp_path / "cache").rglob("*.jsonl"))
    assert r.returncode != 0
    # rank 0 says it in one line (every rank exits 2); the only traceback is torchrun's own report
    assert r.stderr.count("gptlab eval: error:") == 1 and want in r.stderr, r.stderr[-3000:]
    assert not re.search(r'File "[^"]*[/\\]gptlab[/\\](data[/\\])?\w+\.py"', r.stderr), r.stderr


@contextlib.contextmanager
def serve(root: Path):
    """A local HTTP server over root; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_evaluation_is_the_library_function(gptlab_model_dir, hs_file):
    """cmd_eval only forwards flags: run_eval gives the same numbers as the CLI and the library."""
    from gptlab.checkpoint import load_model
    from gptlab.evaluate import run_eval
    from gptlab.hellaswag import evaluate_hellaswag

    res = run_eval(str(gptlab_model_dir), hellaswag_file=str(hs_file), as_json=True, out=open(os.devnull, "w"))
    model, _ = load_model(gptlab_model_dir, "cpu")
    direct = evaluate_hellaswag(model, hs_file, device=torch.device("cpu"), show_progress=False)
    assert res["hellaswag"] == direct


# ----------------------------------------------------------------------------- harness tasks

def mc_task_dir(root: Path) -> Path:
    """A local multiple-choice harness task `gl_cli_mc` over a json file (no network)."""
    rng = np.random.default_rng(5)
    docs = [{"q": " ".join(rng.choice(WORDS, size=6)), "choices": [str(w) for w in rng.choice(WORDS, size=3)],
             "label": int(rng.integers(0, 3))} for _ in range(6)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "mc.yaml").write_text(
        f"task: gl_cli_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return root


@pytest.fixture
def offline(monkeypatch, tmp_path):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def test_tasks_json_and_table(capsys, offline, tmp_path, gptlab_model_dir):
    tasks = mc_task_dir(tmp_path / "tasks")
    code, out, err = run(capsys, gptlab_model_dir, "--tasks", "gl_cli_mc", "--include-path", tasks,
                         "--limit", "4", "--batch-size", "3", "--device", "cpu", "--json")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res) == {"tasks"} and set(res["tasks"]) == {"gl_cli_mc"}
    metrics = res["tasks"]["gl_cli_mc"]
    assert {"acc", "acc_norm", "acc_stderr"} <= set(metrics)
    assert not any(k.endswith(",none") for k in metrics)
    assert metrics["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 documents (--limit)

    code, out, err = run(capsys, gptlab_model_dir, "--tasks", "gl_cli_mc", "--include-path", tasks, "--limit", "4")
    assert code == 0, err
    assert re.search(r"gl_cli_mc\s+acc\s+[01]\.\d{4}", out) and "acc_norm" in out


def test_unknown_task_is_a_user_error(capsys, offline, tmp_path, gptlab_model_dir):
    code, _, err = run(capsys, gptlab_model_dir, "--tasks", "gl_no_such_task", "--include-path",
                       mc_task_dir(tmp_path / "tasks"))
    assert code == 2 and "unknown harness task gl_no_such_task" in err and "Traceback" not in err
