"""`gptlab bench`: tokens/s, MFU and peak memory through the training step, on the CPU (tiny)."""

import json

import pytest

from conftest import json_objects, run_gptlab
from gptlab import bench
from gptlab.bench import BenchConfig, format_table, run_bench

MICRO = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
         "--steps", "2", "--warmup", "1", "--device", "cpu"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_bench_runs_the_training_step(monkeypatch):
    calls = []
    real = bench.train_step

    def spy(placed, rt, batches, accum, optimizer=None, scaler=None, grad_clip=0.0):
        batches = list(batches)
        calls.append((batches[0][0].shape, optimizer is not None, grad_clip))
        return real(placed, rt, batches, accum, optimizer, scaler, grad_clip)

    monkeypatch.setattr(bench, "train_step", spy)
    res = run_bench(BenchConfig(model="tiny", n_layer=1, n_head=2, n_embd=32, seq_len=16, batch_size=3, steps=2,
                                warmup=1, device="cpu", peak_tflops=1.0))
    assert len(calls) == 3 and all(c == ((3, 16), True, 1.0) for c in calls)  # warm-up + timed, with AdamW
    assert res["tokens_per_s"] == pytest.approx(3 * 16 * 2 / (res["step_time_s"] * 2))
    assert res["mfu"] == pytest.approx(res["flops_per_token"] * res["tokens_per_s"] / 1e12)
    assert res["peak_memory_bytes"] > 10 * 2**20
    assert "MFU" in format_table(res) and "tokens/s" in format_table(res)


def test_cli_json(cli, tmp_path):
    r = cli("bench", *MICRO, "--batch-size", "2", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tokens_per_s"] > 0 and res["peak_memory_bytes"] > 0
    assert res["mfu"] is None  # a CPU has no peak in the table
    assert res["batch_size"] == 2 and res["seq_len"] == 16 and res["dtype"] == "fp32"


@pytest.mark.slow
def test_cli_table_bf16_auto_batch_and_peak(cli):
    r = cli("bench", *MICRO, "--batch-size", "auto", "--dtype", "bf16", "--peak-tflops", "0.5")
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and "% of 0.5 TFLOP/s" in r.stdout and "bf16" in r.stdout
    assert "batch             16 x 16" in r.stdout  # auto on a CPU: the largest divisor up to 16


@pytest.mark.slow
def test_cli_fsdp_two_ranks():
    r = run_gptlab("bench", *MICRO, "--batch-size", "2", "--nproc", "2", "--fsdp", "--json", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    res = json_objects(r.stdout)[-1]  # two ranks share stdout: read the record, not a line
    assert res["ranks"] == 2 and res["fsdp"] and res["tokens_per_s"] > 0


@pytest.mark.parametrize("args, msg", [(["--batch-size", "0"], "positive integer"),
                                       (["--peak-tflops", "-1"], "--peak-tflops must be positive"),
                                       (["--model", "nope"], "unknown model preset")])
def test_bad_input_is_one_line(cli, args, msg):
    r = cli("bench", *MICRO, *args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
