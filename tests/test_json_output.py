"""`--json` means JSON: every command that takes it writes exactly one JSON document to stdout,
and whatever gptlab's libraries print (lm-evaluation-harness's "bootstrapping for stddev",
progress bars, logging, writes to descriptor 1) goes to stderr. Run in subprocesses, because
output written below Python's sys.stdout only shows at the descriptor level. Offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_gptlab, run_gptlab

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def one_document(stdout: str):
    """The one JSON document stdout holds, on one line; fails on anything else there."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, f"stdout is not one line: {stdout!r}"
    return json.loads(stdout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from gptlab.checkpoint import save_model

    path = tmp_path_factory.mktemp("json") / "tiny"
    save_model(random_gptlab(seed=5, noise=0.3), path)
    return path


@pytest.fixture(scope="module")
def bleu_task(tmp_path_factory) -> Path:
    """A local generate_until task scored by bleu: the harness bootstraps its stderr and says so
    with a print()."""
    d = tmp_path_factory.mktemp("bleu_task")
    rows = [{"prompt": p, "answer": a} for p, a in [
        ("the cat sat on", " the mat"), ("dogs ran far into", " the green field"),
        ("birds sang loudly over", " old stone walls"), ("quiet rivers run", " near the walls"),
        ("a man throws", " the ball far away")]]
    data = d / "bleu.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (d / "bleu.yaml").write_text(
        f"task: gl_json_bleu\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: bleu\n", encoding="utf-8")
    return d


def test_eval_harness_task_scored_by_bleu_is_one_json_document(model_dir, bleu_task):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    r = run_gptlab("eval", model_dir, "--tasks", "gl_json_bleu", "--include-path", bleu_task,
                   "--device", "cpu", "--json", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    doc = one_document(r.stdout)
    bleu = doc["tasks"]["gl_json_bleu"]
    assert "bleu" in bleu and "bleu_stderr" in bleu, bleu
    assert "bootstrapping for stddev: bleu" in r.stderr  # the harness still speaks, on stderr


def test_eval_hellaswag_and_val_loss_are_one_json_document(model_dir, tmp_path):
    import numpy as np

    from conftest import write_shard

    items = [{"activity_label": "Playing", "ctx_a": "a man runs", "ctx_b": "then", "ctx": "a man runs then",
              "endings": ["he jumps.", "the dog swims.", "kids play.", "it rains."], "label": i % 4}
             for i in range(5)]
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    val = tmp_path / "val"
    val.mkdir()
    write_shard(val / "t_val_000000.bin", np.random.default_rng(0).integers(0, 50257, 600))
    write_shard(val / "t_train_000001.bin", np.random.default_rng(1).integers(0, 50257, 600))
    r = run_gptlab("eval", model_dir, "--hellaswag-file", hs, "--val", val, "--device", "cpu", "--json", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    doc = one_document(r.stdout)
    assert set(doc) == {"hellaswag", "val"}, doc


def test_sample_json_is_one_json_document(model_dir):
    r = run_gptlab("sample", model_dir, "--prompt", "hello", "--prompt", "the cat", "--num-samples", "2",
                   "--max-new-tokens", "5", "--seed", "1", "--device", "cpu", "--json", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    doc = one_document(r.stdout)
    assert [s["prompt"] for s in doc["samples"]] == ["hello", "hello", "the cat", "the cat"]
    assert "tokens/s" in r.stderr


BENCH = ("bench", "--model", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "32",
         "--batch-size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json")


def test_bench_json_is_one_json_document():
    r = run_gptlab(*BENCH, env=OFFLINE)
    assert r.returncode == 0, r.stderr
    doc = one_document(r.stdout)
    assert doc["ranks"] == 1 and doc["tokens_per_s"] > 0


@pytest.mark.slow
def test_bench_json_under_two_ranks_is_one_document_from_rank_0():
    # --nproc: the launcher re-runs the command under torchrun; each rank redirects its own stdout
    r = run_gptlab(*BENCH, "--nproc", "2", "--fsdp", env={**OFFLINE, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    doc = one_document(r.stdout)
    assert doc["ranks"] == 2 and doc["fsdp"]


# A child that plays the libraries' part: it prints, writes to descriptor 1 directly, logs through a
# handler bound to stdout before the command ran, keeps a reference to the stdout of import time
# and leaves text in C stdio's buffer; then it writes its document.
NOISY = r"""
import ctypes, logging, os, sys
from gptlab.cli import json_stdout
held = sys.stdout
log = logging.getLogger("noisy"); log.addHandler(logging.StreamHandler(sys.stdout)); log.setLevel(logging.INFO)
libc = ctypes.CDLL(None)
with json_stdout(True) as out:
    print("print")
    os.write(1, b"fd 1\n")
    log.info("logging")
    held.write("held reference\n")
    sys.__stdout__.write("sys.__stdout__\n")
    libc.printf(b"printf\n")
    out.write('{"ok": true}\n')
print("after")
"""


def test_json_stdout_sends_every_other_stdout_write_to_stderr():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a pipe
    r = subprocess.run([sys.executable, "-c", NOISY], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == '{"ok": true}\nafter\n'
    for said in ("print", "fd 1", "logging", "held reference", "sys.__stdout__", "printf"):
        assert said + "\n" in r.stderr, (said, r.stderr)
