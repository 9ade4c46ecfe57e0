"""Configs built from shared option groups: the flags, --help and JSON they generate."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from gptlab import cli
from gptlab.config import (BenchConfig, EvalConfig, LaunchOptions, ModelShapeOptions, RuntimeOptions,
                           SampleConfig, ServeConfig, TrainConfig, launch_only, resolve_train_config)
from gptlab.errors import UserError


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> list[str]:
    """One string per argument of a --help page: its line and the indented lines under it."""
    entries: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            entries.append(line.strip())
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            entries.append("")  # a heading or a blank line ends an entry
    return [e for e in entries if e]


COMMANDS = [[name] for name in cli.COMMANDS if name != "data"] + [["data", "info"], ["data", "verify"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_names_each_default_once(capsys, argv):
    entries = help_entries(help_of(capsys, *argv))
    assert any(e.startswith("-h, --help") for e in entries)
    for entry in entries:
        assert entry.count("(default:") <= 1, entry
        assert "(default: None)" not in entry, entry


def test_help_entries_see_a_doubled_default():
    page = "options:\n  --seq-len SEQ_LEN     context length T (default: the preset's)\n" \
           "                        (default: None)\n  --out OUT  where (default: x)\n"
    entries = help_entries(page)
    assert entries == ["--seq-len SEQ_LEN     context length T (default: the preset's) (default: None)",
                       "--out OUT  where (default: x)"]


def _actions(add_args) -> dict[str, argparse.Action]:
    p = argparse.ArgumentParser()
    add_args(p)
    return {a.option_strings[0] if a.option_strings else a.dest: a for a in p._actions}


def _text(help_text: str) -> str:
    return re.sub(r" \(default: [^()]*\)$", "", help_text)  # the default may differ, the words may not


def test_train_and_bench_share_flags_and_help():
    train, bench = _actions(cli.add_train_args), _actions(cli.add_bench_args)
    shared = set(train) & set(bench) - {"-h"}
    for group in (ModelShapeOptions, RuntimeOptions, LaunchOptions):  # defined once, in both commands
        for name in group.__dataclass_fields__:
            assert "--" + name.replace("_", "-") in shared
    assert {"--seed", "--batch-size"} <= shared
    for flag in sorted(shared):
        assert _text(train[flag].help) == _text(bench[flag].help), flag
        assert type(train[flag]) is type(bench[flag]) and train[flag].type == bench[flag].type, flag
    # the defaults they print are each command's own
    assert train["--seed"].help.endswith("(default: 1337)") and bench["--seed"].help.endswith("(default: 0)")


def test_runtime_flags_are_the_same_in_every_command():
    pages = [_actions(add) for add in (cli.add_train_args, cli.add_bench_args, cli.add_sample_args,
                                       cli.add_eval_args, cli.add_serve_args)]
    for flag in ("--device", "--dtype"):
        assert len({(a[flag].help, a[flag].choices) for a in pages}) == 1, flag


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_flags_parse_as_before():
    a = parse("train", "--total-batch-tokens", "4K", "--max-tokens", "1M", "--eval-tokens", "40960",
              "--batch-size", "auto", "--data-disk-budget", "1G", "--max-steps", "3", "--no-compile",
              "--dtype", "bf16", "--seq-len", "64", "--lr", "3e-3", "--nproc", "auto", "--fsdp",
              "--dist-timeout", "60", "--gpu-memory", "24GB", "--dry-run")
    assert (a.total_batch_tokens, a.max_tokens, a.eval_tokens, a.batch_size) == (4000, 10**6, 40960, "auto")
    assert (a.data_disk_budget, a.max_steps, a.compile, a.dtype, a.seq_len) == (1 << 30, 3, False, "bf16", 64)
    assert (a.lr, a.nproc, a.fsdp, a.dist_timeout, a.gpu_memory, a.dry_run) == (3e-3, "auto", True, 60.0,
                                                                                 "24GB", True)
    assert parse("train").model is None and parse("train").hellaswag is None  # not given: the preset decides
    b = parse("bench", "--steps", "2", "--warmup", "0", "--batch-size", "3", "--json", "--peak-tflops", "1.5")
    assert (b.steps, b.warmup, b.batch_size, b.json, b.peak_tflops) == (2, 0, 3, True, 1.5)
    s = parse("serve", "m", "--port", "0", "--max-batch", "4", "--api-key", "k")
    assert ServeConfig(**cli.given(cli.config_flags(s, ServeConfig))) == ServeConfig(
        model="m", port=0, max_batch=4, api_key="k")
    e = parse("eval", "m", "--hellaswag", "--limit", "5", "--val-tokens", "10M", "--num-fewshot", "0")
    ecfg = EvalConfig(**cli.given(cli.config_flags(e, EvalConfig)))
    assert (ecfg.hellaswag, ecfg.limit, ecfg.val_tokens, ecfg.num_fewshot, ecfg.split) == (True, 5, 10**7, 0, "val")
    sm = parse("sample", "m", "--prompt", "a", "--prompt", "b", "--top-k", "0", "--seed", "7")
    scfg = SampleConfig.from_flags(cli.config_flags(sm, SampleConfig))
    assert (scfg.prompt, scfg.top_k, scfg.seed, scfg.num_samples, scfg.temperature) == (["a", "b"], 0, 7, 1, 1.0)


@pytest.mark.parametrize("argv", [["bench", "--steps", "0"], ["bench", "--warmup", "-1"],
                                  ["train", "--max-steps", "0"], ["train", "--total-batch-tokens", "x"],
                                  ["serve", "m", "--max-batch", "0"], ["eval", "m", "--split", "dev"]])
def test_bad_flag_types_are_refused_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


def test_sample_numbers_are_checked_with_one_line_messages():
    with pytest.raises(UserError, match=r"^--top-p: expected a number in \(0, 1\], got '0'$"):
        SampleConfig.from_flags({"top_p": "0"})
    with pytest.raises(UserError, match="--seed: expected a non-negative integer"):
        SampleConfig.from_flags({"seed": "x"})


def test_eval_task_flags_need_tasks():
    assert EvalConfig(tasks="a, b").task_names() == ("a", "b")
    assert EvalConfig().task_names() is None
    with pytest.raises(UserError, match="--num-fewshot applies to harness tasks"):
        EvalConfig(num_fewshot=0).task_names()
    with pytest.raises(UserError, match="--tasks needs at least one task name"):
        EvalConfig(tasks=" , ").task_names()


# ----------------------------------------------------------------------------- JSON

def test_launch_only_options_are_not_saved():
    assert set(launch_only(TrainConfig)) == {"nproc", "dist_timeout", "max_restarts", "stall_timeout", "dry_run", "gpu_memory",
                                             "bench", "mfu", "gpu", "peak_tflops", "gpu_hour_price", "json"}
    cfg = TrainConfig(nproc="2", dry_run=True, gpu_memory="24GB", dist_timeout=5.0, fsdp=True)
    saved = cfg.to_dict()
    assert not set(saved) & set(launch_only(TrainConfig))
    assert saved["fsdp"] is True  # it decides the checkpoint's format: part of the run
    assert TrainConfig.from_dict(json.loads(json.dumps(saved))) == TrainConfig(fsdp=True)


def test_old_config_json_with_launch_options_still_loads():
    old = {**TrainConfig().to_dict(), "nproc": None, "dry_run": False, "gpu_memory": "80GB", "dist_timeout": 60.0}
    assert TrainConfig.from_dict(old) == TrainConfig()  # the launch options of that launch are dropped
    with pytest.raises(UserError, match="unknown fields"):
        TrainConfig.from_dict({"bogus": 1})


def test_flags_and_config_files_keep_launch_options(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"gpu_memory": "24GB", "lr": 1e-3}))
    cfg = resolve_train_config({"model": "tiny", "dist_timeout": 30.0}, str(tmp_path / "c.json"))
    assert (cfg.gpu_memory, cfg.dist_timeout, cfg.lr) == ("24GB", 30.0, 1e-3)


def test_resume_takes_launch_options_from_its_command_line(tmp_path):
    from gptlab.rundir import RunDir
    from gptlab.train import resume_config

    run = RunDir(tmp_path / "run")
    run.create()
    train = {**TrainConfig(model="tiny", lr=1e-3).to_dict(), "dist_timeout": 60.0, "gpu_memory": "80GB"}
    run.write_config({}, train)  # as a run written before launch options were left out
    cfg = resume_config(run, {"dist_timeout": 20.0, "nproc": None, "max_steps": 9})
    assert (cfg.model, cfg.lr, cfg.max_steps) == ("tiny", 1e-3, 9)
    assert (cfg.dist_timeout, cfg.gpu_memory) == (20.0, None)
    assert resume_config(run, {}).dist_timeout == 600.0


# ----------------------------------------------------------------------------- checks and derived values

def test_derived_values_are_config_methods():
    cfg = TrainConfig(total_batch_tokens=4096, batch_size=4, max_steps=7, warmup_steps=3)
    assert cfg.grad_accum_steps(seq_len=128, world_size=2) == 4
    assert cfg.grad_accum_steps(seq_len=128, world_size=1, batch_size=32) == 1
    with pytest.raises(UserError, match=r"--batch-size 3 does not divide the global batch: 4096 tokens = 32 "
                                        r"sequences of 128 per rank over 1 rank\(s\); use a batch size in: "
                                        r"1, 2, 4, 8, 16, 32"):
        cfg.grad_accum_steps(128, 1, 3)
    with pytest.raises(UserError, match="not a multiple of seq_len x ranks = 100 x 3 = 300; try 3900"):
        cfg.grad_accum_steps(100, 3)
    assert cfg.total_steps(tokens_per_epoch=10**6) == 7 and cfg.warmup_for(100) == 3
    assert TrainConfig(epochs=0.5, total_batch_tokens=1000).total_steps(10_001) == 6
    assert TrainConfig(max_tokens=1500, total_batch_tokens=1000).total_steps(1) == 2
    assert TrainConfig(warmup_frac=0.1).warmup_for(25) == 2


@pytest.mark.parametrize("kw, msg", [
    (dict(batch_size=0), "--batch-size must be a positive integer or 'auto'"),
    (dict(schedule="step"), "--schedule must be one of cosine, linear, constant, wsd"),
    (dict(fsdp=True, eval_tasks="x"), "--eval-tasks runs the whole model in one process"),
])
def test_train_validate(kw, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        TrainConfig(**kw).validate()
    TrainConfig().validate()


def test_bench_validate():
    with pytest.raises(UserError, match="--batch-size must be a positive integer or 'auto'"):
        BenchConfig(batch_size=0).validate()
    with pytest.raises(UserError, match="--peak-tflops must be positive"):
        BenchConfig(peak_tflops=0.0).validate()
    BenchConfig(batch_size="auto").validate()
