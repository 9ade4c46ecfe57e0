"""Validation loss and the `gptlab eval` command (HellaSwag is gptlab.hellaswag, harness tasks
gptlab.harness).

Validation loss: token-weighted sums of the loss over the val split's fixed windows (the loader
gives each rank its share), summed over ranks once at the end. It runs the raw module (no DDP
wrapper), or, during training, the run's compiled forward (`forward`): then every batch has the
training batch's shape (a short last batch is padded with ignored targets), so evaluation adds one
compiled graph (eval mode, no gradients) and never recompiles. It restores each module's
train/eval mode.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from gptlab import dist, hellaswag as hs
from gptlab.config import VAL_LOSS_REFERENCES, preset_for_shape
from gptlab.data.remote import is_remote
from gptlab.errors import UserError, require_extra
from gptlab.scoring import autocast_or_null, context_len, eval_mode, progress, rank_world
from gptlab.tokenizer import model_tokenizer, val_tokenizer
from gptlab.weights import raw_model

# ----------------------------------------------------------------------------- validation loss

def evaluate_val_loss(
    model: torch.nn.Module,
    data,
    *,
    device,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    autocast: Callable[[], Any] | None = None,
    show_progress: bool = False,
    tokenizer=None,
    forward: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
) -> dict:
    """Mean cross-entropy over the val split's fixed windows (capped at max_tokens), and its
    perplexity. When a process group is up every rank must call this: each takes its share of
    the windows from the loader, and the token-weighted sums are reduced once at the end, so any
    number of ranks gives the 1-rank number up to float summation order.
    data: a dataset directory, a remote source (its val split fetched on its own), or the ValSplit
    to read (a train loader's, TrainLoader.val_split(): a streamed run's copy in its own cache).
    Returns {"loss", "perplexity", "tokens"}; with the data's `tokenizer`, also "bytes" (the UTF-8
    bytes of the scored target tokens, end-of-text counting none) and "bits_per_byte": the summed
    loss in bits over those bytes, which compares models whatever their tokenizers.
    forward(x, y) -> (logits, loss): what runs a batch instead of the raw module (a compiled one);
    its batches are all batch_size rows (a short last one padded with ignored targets)."""
    from gptlab.data.loader import iter_val_batches, open_val, val_windows

    if seq_len <= 0 or batch_size <= 0:
        raise UserError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    net = raw_model(model)
    T = context_len(net)
    if T is not None and seq_len > T:
        raise UserError(f"seq_len {seq_len} is longer than the model's context ({T})")
    rank, world = rank_world()
    val = open_val(data)  # once: a remote source's val split is checked (and fetched) here
    # float64 sums keep 1e8 tokens' worth of losses exact enough; MPS has no float64
    acc = torch.float32 if torch.device(device).type == "mps" else torch.float64
    loss_sum = torch.zeros((), dtype=acc, device=device)
    tokens = 0
    nbytes = None if tokenizer is None else torch.zeros((), dtype=torch.int64, device=device)
    table = None if tokenizer is None else torch.tensor(token_byte_lengths(tokenizer), dtype=torch.int64, device=device)
    ctx = autocast_or_null(autocast)
    bar = progress(val_windows(val, seq_len=seq_len, max_tokens=max_tokens) // world * seq_len,
                   "val loss", "tok", show_progress and rank == 0, unit_scale=True)  # rank 0's share
    with bar, eval_mode(net), torch.no_grad():
        for x, y in iter_val_batches(val, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                                     rank=rank, world_size=world, model_vocab=_vocab_of(net)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if forward is not None and x.size(0) < batch_size:  # the compiled graph's static shape
                x, y = _pad_rows(x, y, batch_size)
            with ctx():
                logits, loss = (forward or net)(x, y)
                if loss is None:
                    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
            scored = y[y != -100]  # a chat split's targets are only the assistant tokens
            if scored.numel():
                loss_sum += loss.to(acc) * scored.numel()  # the mean over them, weighted back to a sum
            tokens += scored.numel()
            if table is not None:  # chat tokens (past the tokenizer's ids) have no bytes
                in_vocab = scored < len(table)
                nbytes += torch.where(in_vocab, table[scored.clamp(max=len(table) - 1)], 0).sum()
            bar.update(y.numel())
    extra = [] if nbytes is None else [nbytes.to(acc)]
    t = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=acc, device=device), *extra])
    dist.all_reduce_sum(t)
    total_loss, total_tokens, *total_bytes = t.tolist()
    if total_tokens == 0:
        raise UserError(f"{val.where}: the val split has no complete window of {seq_len + 1} tokens")
    loss = total_loss / total_tokens
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(total_tokens)}
    if total_bytes:
        out["bytes"] = int(total_bytes[0])
        out["bits_per_byte"] = total_loss / math.log(2) / total_bytes[0] if total_bytes[0] else None
    return out


def _pad_rows(x: torch.Tensor, y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y padded to `rows` rows: token 0 in, ignored (-100) targets out, so nothing is scored."""
    pad = rows - x.size(0)
    return (torch.cat([x, x.new_zeros(pad, x.size(1))]), torch.cat([y, y.new_full((pad, y.size(1)), -100)]))


def _vocab_of(net) -> int | None:
    cfg = getattr(net, "config", None)
    return getattr(cfg, "vocab_size", None)


def token_byte_lengths(tokenizer) -> list[int]:
    from gptlab.tokenizer import token_byte_lengths as lengths

    return lengths(tokenizer)


# ----------------------------------------------------------------------------- the report

def format_report(results: dict, *, preset: str | None = None, split: str = "val") -> str:
    """The human-readable table of `results` (run_eval's dict), with the references of `preset`."""
    lines = []
    if results.get("hellaswag") is not None:
        lines += hs.format_hellaswag(results["hellaswag"], preset=preset, split=split)
    val = results.get("val")
    if val is not None:
        lines.append(f"validation loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f} "
                     f"over {val['tokens']:,} tokens")
        if val.get("bits_per_byte") is not None:
            lines.append(f"  bits per byte {val['bits_per_byte']:.4f} over {val['bytes']:,} bytes "
                         f"(comparable across tokenizers)")
        if preset in VAL_LOSS_REFERENCES:
            lines.append(f"  {hs.GPT2_NAMES[preset]}: {VAL_LOSS_REFERENCES[preset]:.4f} on FineWeb-Edu's first "
                         "100M val tokens (comparable on that data only)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command

@dataclass(frozen=True)
class TaskOptions:
    """lm-evaluation-harness tasks for `gptlab eval --tasks` (see harness.py)."""

    tasks: tuple[str, ...]
    include_path: str | None = None
    num_fewshot: int | None = None


def _check_eval_args(hellaswag: bool, val_dir: str | None, val_tokens: int | None, limit: int | None,
                     tasks: TaskOptions | None) -> None:
    if not hellaswag and val_dir is None and tasks is None:
        raise UserError("nothing to evaluate: pass --hellaswag, --val DIR and/or --tasks T1,T2")
    if limit is not None and not hellaswag and tasks is None:
        raise UserError("--limit applies to HellaSwag and harness tasks; add --hellaswag or --tasks")
    if val_tokens is not None and val_dir is None:
        raise UserError("--val-tokens applies to validation loss; add --val DIR")
    if val_dir is not None and not is_remote(str(val_dir)) and not Path(val_dir).is_dir():
        raise UserError(f"{val_dir}: no such dataset directory")
    if tasks is not None and tasks.include_path is not None and not Path(tasks.include_path).is_dir():
        raise UserError(f"{tasks.include_path}: no such task directory")


def _run_tasks(net, where: str, tasks: TaskOptions, *, device, dtype: str | None, limit: int | None,
               batch_size: int | None, distributed: bool) -> dict:
    if distributed:
        raise UserError("--tasks runs in one process; start it without torchrun")
    harness = require_extra("gptlab.harness", "eval", "harness tasks need lm-evaluation-harness")
    lm = harness.GptlabLM(pretrained=where, model=net, device=str(device), dtype=dtype, batch_size=batch_size)
    return harness.run_tasks(lm, tasks.tasks, include_path=tasks.include_path, limit=limit,
                             num_fewshot=tasks.num_fewshot)


def _print_results(results: dict, net, where: str, rt, env, *, as_json: bool, split: str, out) -> None:
    if as_json:
        print(json.dumps(results), file=out)
        return
    preset = preset_for_shape(net.config)
    shape = f"{net.num_params() / 1e6:.1f}M parameters" + (f", {preset} shape" if preset else "")
    print(f"model {where} ({shape}); {rt.describe()}"
          + (f"; {env.world_size} ranks" if env.is_distributed else ""), file=out)
    if "hellaswag" in results or "val" in results:
        print(format_report(results, preset=preset, split=split), file=out)
    if "tasks" in results:
        from gptlab.harness import format_tasks

        print(format_tasks(results["tasks"]), file=out)


def run_eval(
    model: str,
    *,
    hellaswag: bool = False,
    hellaswag_file: str | None = None,
    split: str = "val",
    cache: str | None = None,
    limit: int | None = None,
    val_dir: str | None = None,
    val_tokens: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    as_json: bool = False,
    tasks: TaskOptions | None = None,
    out=None,
) -> dict:
    """`gptlab eval`: load MODEL, run what was asked for, print a table (or one JSON object) on
    rank 0, and return the results. Under torchrun the work is shared by the ranks (harness tasks
    run in one process). limit: the first N HellaSwag items and N documents of each task.
    batch_size: HellaSwag items per forward pass (default 16), val windows per batch (default 8),
    continuations per forward pass for tasks (default 32)."""
    from gptlab.checkpoint import load_model
    from gptlab.runtime import get_runtime

    out = out or sys.stdout
    hellaswag = hellaswag or hellaswag_file is not None
    _check_eval_args(hellaswag, val_dir, val_tokens, limit, tasks)
    rt = get_runtime(device, dtype, compile=False)
    env = dist.init(rt.device_type)
    try:
        dev = env.device(rt.device)
        items = None
        if hellaswag:
            path = hs.find_on_all_ranks(env, dev, path=hellaswag_file, cache_dir=cache, split=split)
            items = hs.load_hellaswag(path, limit)
        net, where = load_model(model, dev)
        if items is not None:  # in the model's own tokenizer (GPT-2's, or the trained one it carries)
            items = hs.render_hellaswag(items, model_tokenizer(net))
        results: dict[str, Any] = {}
        if items is not None:
            results["hellaswag"] = hs.evaluate_hellaswag(
                net, items, device=dev, batch_size=batch_size or 16, autocast=rt.autocast, show_progress=True
            )
        if val_dir is not None:
            results["val"] = evaluate_val_loss(
                net, val_dir, device=dev, seq_len=net.config.seq_len, batch_size=batch_size or 8,
                max_tokens=val_tokens, autocast=rt.autocast, show_progress=True,
                tokenizer=val_tokenizer(net, val_dir),
            )
        if tasks is not None:
            results["tasks"] = _run_tasks(net, str(where), tasks, device=dev, dtype=dtype, limit=limit,
                                          batch_size=batch_size, distributed=env.is_distributed)
        if env.is_main:
            _print_results(results, net, str(where), rt, env, as_json=as_json,
                           split="file" if hellaswag_file else split, out=out)
        return results
    finally:
        if env.is_distributed:
            dist.shutdown()
