"""Sampling speed: gptlab's KV-cache generator against transformers' generate, same weights.

A randomly initialised gptlab model of a preset's shape is exported with gptlab.hf.export_hf and
loaded back by both libraries, so both run exactly the same fp32 weights on the same CPU threads.
Both decode the same prompt for a batch of samples with the same settings and no early stop
(min_new_tokens for transformers, stop_token=None for gptlab). Runs alternate between the two
libraries and the median is reported, so a neighbour's load on the machine hits both alike.

    .venv/bin/python benchmarks/generate.py --model gpt2 --batch 5 --new-tokens 128
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="gptlab preset whose shape to use (random weights)")
    p.add_argument("--batch", type=int, default=5, help="samples decoded together")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per sample")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="prompt text")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per library (median reported)")
    p.add_argument("--mode", choices=["greedy", "sample", "both"], default="both",
                   help="greedy decoding, top-k 50 sampling at temperature 1, or both")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import GPT2LMHeadModel

    from gptlab.config import model_preset
    from gptlab.generate import generate_ids
    from gptlab.hf import export_hf, load_hf_dir
    from gptlab.model import GPT
    from gptlab.tokenizer import get_tokenizer

    torch.manual_seed(0)
    prompt = get_tokenizer().encode(args.prompt)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(GPT(model_preset(args.model)), os.path.join(tmp, "m"))
        ours = load_hf_dir(os.path.join(tmp, "m")).eval()
        ref = GPT2LMHeadModel.from_pretrained(os.path.join(tmp, "m")).eval()
    B, N = args.batch, args.new_tokens
    x = torch.tensor([prompt] * B)

    def run_gptlab(sample: bool, seed: int) -> list[list[int]]:
        kw = dict(temperature=1.0, top_k=50, seed=seed) if sample else dict(temperature=0)
        return generate_ids(ours, prompt, num_samples=B, max_new_tokens=N, stop_token=None, **kw)

    def run_hf(sample: bool, seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        kw = dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0) if sample else dict(do_sample=False)
        with torch.inference_mode():
            out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, min_new_tokens=N,
                               pad_token_id=50256, **kw)
        return out[:, len(prompt):].tolist()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
          f"transformers {transformers.__version__}")
    print(f"model: {args.model} shape, {ours.num_params() / 1e6:.1f}M params, fp32, random weights; "
          f"batch {B}, prompt {len(prompt)} tokens, {N} new tokens per sample")
    modes = {"greedy": [False], "sample": [True], "both": [False, True]}[args.mode]
    for sample in modes:
        name = "top-k 50 sampling, temperature 1" if sample else "greedy"
        # warm-up (allocator, thread pool, lazy init), also a sanity check in greedy mode
        a, b = run_gptlab(sample, 0), run_hf(sample, 0)
        if not sample:
            same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
            print(f"[{name}] greedy tokens equal to transformers': {same}/{B * N}")
        times = {"gptlab": [], "transformers": []}
        for r in range(args.repeats):
            for lib, fn in (("gptlab", run_gptlab), ("transformers", run_hf)):
                t0 = time.perf_counter()
                out = fn(sample, r + 1)
                times[lib].append(time.perf_counter() - t0)
                assert all(len(s) == N for s in out)
        rate = {lib: B * N / statistics.median(ts) for lib, ts in times.items()}
        for lib, ts in times.items():
            runs = ", ".join(f"{B * N / t:.1f}" for t in ts)
            print(f"[{name}] {lib:12s} {rate[lib]:8.1f} tokens/s (median of {len(ts)}; runs: {runs})")
        print(f"[{name}] gptlab / transformers: {rate['gptlab'] / rate['transformers']:.2f}x")


if __name__ == "__main__":
    main()
