"""gptlab's lm-evaluation-harness model against the harness's own HFLM on the same weights (a
tiny random GPT-2 exported with gptlab.hf.export_hf), on local YAML tasks of each output type.
Offline: the tasks read json files written here; nothing reaches the network."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets is imported (it reads them once)
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

from lm_eval.api.instance import Instance  # noqa: E402

from gptlab import harness  # noqa: E402
from gptlab.errors import UserError  # noqa: E402
from gptlab.hf import export_hf  # noqa: E402
from gptlab.scoring import ContextGroup, plan_shared_batches  # noqa: E402

WORDS = ("the cat sat on a mat while dogs ran far into the green field and birds sang loudly over "
         "old stone walls near quiet rivers").split()
GEN_KWARGS = {"until": ["e", "\n"], "max_gen_toks": 12, "do_sample": False}


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_yaml(name: str, data: Path, output_type: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {output_type}\n{body}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from conftest import random_gptlab

    out = tmp_path_factory.mktemp("harness") / "hf"
    export_hf(random_gptlab(seed=3, noise=0.3), out)  # seq_len 64: long documents take several windows
    return out


@pytest.fixture(scope="module")
def gptlab_lm(hf_dir):
    return harness.GptlabLM(pretrained=str(hf_dir), device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, gptlab_lm) -> Path:
    """Three local tasks: multiple choice, rolling log-likelihood (documents longer than the
    context) and generation (half of the answers are what the model generates, so exact_match
    is neither 0 nor 1 and both models must generate the same text to agree)."""
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    mc = [{"question": sentence(rng, 3, 12), "choices": [sentence(rng, 1, 6) for _ in range(4)],
           "label": rng.randint(0, 3)} for _ in range(12)]
    ppl = [{"text": sentence(rng, 5, 110)} for _ in range(5)]
    prompts = [sentence(rng, 3, 10) for _ in range(4)]
    made = gptlab_lm.generate_until([Instance("generate_until", {}, (p, dict(GEN_KWARGS)), i)
                                     for i, p in enumerate(prompts)], disable_tqdm=True)
    gen = [{"prompt": p, "answer": m if i % 2 == 0 else "no"} for i, (p, m) in enumerate(zip(prompts, made))]
    (d / "mc.yaml").write_text(task_yaml("gl_mc", write_jsonl(d / "mc.jsonl", mc), "multiple_choice", (
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (d / "ppl.yaml").write_text(task_yaml("gl_ppl", write_jsonl(d / "ppl.jsonl", ppl), "loglikelihood_rolling", (
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))
    (d / "gen.yaml").write_text(task_yaml("gl_gen", write_jsonl(d / "gen.jsonl", gen), "generate_until", (
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["e", "\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")))
    return d


TASKS = ["gl_mc", "gl_ppl", "gl_gen"]


@pytest.mark.slow
def test_every_metric_equals_the_harness_hflm(gptlab_lm, hf_dir, tasks_dir):
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = harness.run_tasks(gptlab_lm, TASKS, include_path=str(tasks_dir), bootstrap_iters=0)
    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32")
    theirs = harness.task_metrics(evaluator.simple_evaluate(
        model=hf, tasks=TASKS, task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=False,
        bootstrap_iters=0))
    assert set(ours) == set(TASKS) and ours.keys() == theirs.keys()
    for task in TASKS:
        assert ours[task].keys() == theirs[task].keys()
        for metric, value in theirs[task].items():
            assert ours[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    # the data is not degenerate: the metrics carry information
    assert 0 < ours["gl_gen"]["exact_match"] < 1
    assert ours["gl_ppl"]["byte_perplexity"] > 1
    assert {"acc", "acc_norm"} <= ours["gl_mc"].keys()


def test_loglikelihood_and_rolling_equal_hflm_request_by_request(gptlab_lm, hf_dir):
    """Raw request results, including contexts cropped from the left (longer than 64 tokens) and
    the greedy flag, for a model whose greedy continuation is known."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=3, dtype="float32")
    rng = random.Random(1)
    pairs = [(sentence(rng, 1, 90), " " + sentence(rng, 1, 5)) for _ in range(10)]
    pairs += [("", "the cat"), ("a dog ", "ran far")]  # empty context; a trailing space moves over
    greedy = gptlab_lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": [], "max_gen_toks": 3}), 0)],
                                      disable_tqdm=True)[0]
    pairs.append(("the cat", greedy))
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    ours, theirs = gptlab_lm.loglikelihood(reqs, disable_tqdm=True), hf.loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
        assert ga == gb
    assert ours[-1][1] is True
    docs = [Instance("loglikelihood_rolling", {}, (sentence(rng, n, n),), i) for i, n in enumerate((1, 40, 150))]
    torch.testing.assert_close(torch.tensor(gptlab_lm.loglikelihood_rolling(docs, disable_tqdm=True)),
                               torch.tensor(hf.loglikelihood_rolling(docs, disable_tqdm=True)), rtol=1e-5, atol=1e-4)


def test_generation_stops_at_stop_sequences_and_max_tokens(gptlab_lm):
    free = gptlab_lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": [], "max_gen_toks": 10}), 0)],
                                    disable_tqdm=True)[0]
    assert len(gptlab_lm.tok_encode(free)) == 10
    # a stop sequence taken from inside the free text cuts it right before its first occurrence
    stop = free[len(free) // 2:len(free) // 2 + 2]
    cut = gptlab_lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": [stop], "max_gen_toks": 10}), 0)],
                                   disable_tqdm=True)[0]
    assert cut == free[:free.index(stop)]


def test_shared_contexts_are_batched_by_packed_length():
    # packed lengths 3 + 2*1, 5 + 1*1, 3 + 3*2, 4 + 2*0: sorted 0, 1, 3, 2; at most 5 continuations a batch
    groups = [ContextGroup((1,) * n, ((2, 2),) * k) for n, k in ((3, 2), (5, 1))]
    groups += [ContextGroup((1,) * 3, ((2, 2, 2),) * 3), ContextGroup((1,) * 4, ((2,),) * 2)]
    assert [g.packed_len for g in groups] == [5, 6, 9, 4]
    assert plan_shared_batches(groups, max_rows=5) == [[3, 0, 1], [2]]


def test_task_metrics_drop_the_none_suffix_and_non_numbers():
    res = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                             "exact_match,strict-match": 1.0, "word_perplexity,none": 3.0}}}
    assert harness.task_metrics(res) == {"t": {"acc": 0.5, "exact_match,strict-match": 1.0,
                                               "word_perplexity": 3.0}}
    table = harness.format_tasks({"t": {"acc": 0.5, "acc_stderr": 0.1}})
    assert "acc" in table and "0.5000" in table and "0.1000" in table and "acc_stderr" not in table


def test_unknown_task_and_bad_batch_size_are_user_errors(gptlab_lm, tasks_dir):
    with pytest.raises(UserError, match="unknown harness task no_such_task"):
        harness.run_tasks(gptlab_lm, ["no_such_task"], include_path=str(tasks_dir))
    with pytest.raises(UserError, match="batch size"):
        harness.GptlabLM(model=gptlab_lm.model, batch_size="zero")


def test_lm_eval_command_line_finds_the_gptlab_model(hf_dir, tasks_dir, tmp_path):
    """`lm_eval --model gptlab` in a fresh interpreter: the installed start-up hook registers it."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = ("import sys; from lm_eval.api.registry import get_model; "
            "print(get_model('gptlab').__module__, get_model('gptlab').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["gptlab.harness", "GptlabLM"]


@pytest.mark.slow
def test_lm_eval_cli_runs_a_task_on_a_gptlab_model(hf_dir, tasks_dir, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    # no --device: lm_eval asks for cuda:0, and the model falls back to what the machine has
    out = subprocess.run([str(lm_eval), "--model", "gptlab", "--model_args", f"pretrained={hf_dir},dtype=float32",
                          "--tasks", "gl_mc", "--include_path", str(tasks_dir), "--limit", "4",
                          "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gl_mc" in out.stdout and "acc" in out.stdout


# ----------------------------------------------------------------------------- during training

@pytest.mark.slow
def test_eval_tasks_during_training_are_logged_plotted_and_match_gptlab_eval(tasks_dir, tmp_path):
    """--eval-tasks at each evaluation: a "tasks" record a step, a tasks.png, and the last record
    equal to what the harness says of the final checkpoint with the same limit."""
    from conftest import make_toy_data, read_metrics
    from gptlab.config import resolve_train_config
    from gptlab.train import train

    data = make_toy_data(tmp_path / "data", 4096, 40_000)
    run = tmp_path / "run"
    train(resolve_train_config(dict(
        model="tiny", n_layer=1, n_head=2, n_embd=32, seq_len=32, data=str(data), out=str(run), batch_size=4,
        total_batch_tokens=256, max_steps=4, lr=1e-2, warmup_steps=1, eval_every=2, eval_tokens=512,
        sample_tokens=0, checkpoint_every=0, device="cpu", eval_tasks="gl_mc,gl_ppl",
        eval_include_path=str(tasks_dir), eval_tasks_limit=6)))
    tasks = read_metrics(run, "tasks")
    assert [r["step"] for r in tasks] == [2, 4]
    assert {"acc", "acc_norm"} <= tasks[0]["tasks"]["gl_mc"].keys()
    assert tasks[0]["tasks"]["gl_ppl"]["word_perplexity"] != tasks[1]["tasks"]["gl_ppl"]["word_perplexity"]
    assert (run / "plots" / "tasks.png").stat().st_size > 0
    final = harness.run_tasks(harness.GptlabLM(pretrained=str(run), device="cpu"), ["gl_mc", "gl_ppl"],
                              include_path=str(tasks_dir), limit=6, bootstrap_iters=0)
    for task, row in final.items():
        for metric, value in row.items():
            assert tasks[-1]["tasks"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)


def test_tasks_during_training_leave_every_rng_as_it_was(gptlab_lm, tasks_dir):
    """The harness seeds python's, numpy's and torch's generators; the trainer's draws must not
    change because tasks ran in between."""
    import numpy as np

    runner = harness.TaskRunner(["gl_mc"], include_path=str(tasks_dir), limit=3)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    runner.run_during_training(gptlab_lm.model, "cpu", "fp32")
    after = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    assert after == (random.random(), float(np.random.rand()), float(torch.rand(())))


def test_eval_tasks_mistakes_are_one_line_before_training(cli, tasks_dir, tmp_path):
    from conftest import make_toy_data

    data = make_toy_data(tmp_path / "data", 4096, 40_000)
    common = ["train", "--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
              "--data", str(data), "--device", "cpu", "--max-steps", "2"]
    r = cli(*common, "--out", str(tmp_path / "a"), "--eval-tasks", "gl_mc,nope",
            "--eval-include-path", str(tasks_dir))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown harness task nope" in r.stderr, r.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()
    r = cli(*common, "--out", str(tmp_path / "b"), "--eval-tasks", "gl_mc", "--fsdp")
    assert r.returncode == 2 and "--eval-tasks" in r.stderr and "--fsdp" in r.stderr, r.stderr
