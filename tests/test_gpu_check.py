"""benchmarks/gpu_check.py (`make gpu-check`): one line and exit 2 without a GPU, --dry-run lists its
steps, and every step's command runs at a micro size on the CPU (the hidden --cpu-micro)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STEPS = ("gpu-tests", "bench-b16", "bench-b32", "bench-b64", "fp16", "train", "hellaswag", "serve")


def run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_without_a_gpu_one_line_and_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = run("--report", tmp_path / "r.md")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no CUDA GPU" in r.stderr
    assert not (tmp_path / "r.md").exists()


def test_dry_run_lists_the_steps():
    r = run("--dry-run")
    assert r.returncode == 0, r.stderr
    for name in STEPS:
        assert f"\n{name}: " in "\n" + r.stdout, name
    assert "--batch-size 64" in r.stdout and "--dtype fp16" in r.stdout and "--resume" in r.stdout
    assert "budget: 480 s" in r.stdout


@pytest.mark.slow
def test_every_step_runs_at_micro_size_on_the_cpu(tmp_path):
    report = tmp_path / "GPU_CHECK.md"
    r = run("--cpu-micro", "--report", report, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    text = report.read_text()
    assert "not GPU numbers" in text
    for name in STEPS:
        assert f"| {name} |" in text and f"| {name} | " in text
    assert text.count("| ok |") == len(STEPS)
    assert '"resumed": true' in text and "tokens_per_s_32_clients" in text
