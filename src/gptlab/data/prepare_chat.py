"""Conversations (JSONL of {"messages": [...]}) -> token shards with loss masks, for SFT.

Each line of each file is one conversation in the OpenAI messages form, the layout of the Hugging
Face chat datasets. Each is checked (gptlab.chat.check_messages: a known role, non-empty content,
an assistant turn), rendered through the one chat template (gptlab.chat) into tokens and a loss
mask, and written, in file order, as shards (`data/shards.py` owns the bytes: an llm.c token shard
and a `.mask` beside it). A conversation is one document and never crosses a shard. The val split
is the first conversations (prepare's rule: 0.5%, at least one when there are two or more, or
--val-fraction). The manifest records the template and its token ids under "chat".

A bad line stops the prepare with one line naming the file and line; nothing is written.

This module does not import torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from gptlab import chat, jsonl
from gptlab import tokenizer as tk
from gptlab.data import shards as sh
from gptlab.data.prepare import val_plan
from gptlab.errors import UserError

DEFAULT_SHARD_TOKENS = 100_000_000


def read_conversations(paths: list[str | Path]) -> list[tuple[str, list[dict[str, str]]]]:
    """(where, checked messages) of every non-blank line of the files, in order."""
    if not paths:
        raise UserError("prepare chat: give one or more .jsonl files of {\"messages\": [...]} lines")
    out = []
    for path in map(Path, paths):
        for where, row in jsonl.rows(path, "file"):
            if not isinstance(row, dict) or "messages" not in row:
                raise UserError(f"{where}: expected an object with \"messages\"")
            out.append((where, chat.check_messages(row["messages"], where)))
    if not out:
        raise UserError(f"prepare chat: no conversations in {', '.join(map(str, paths))}")
    return out


def _write_split(out: Path, name: str, split: str, rendered: list[tuple[np.ndarray, np.ndarray]],
                 shard_tokens: int, shards: list[dict[str, Any]], eot: int) -> None:
    """Shards of whole conversations, each up to shard_tokens (a longer conversation alone)."""
    group: list[tuple[np.ndarray, np.ndarray]] = []
    fill = 0

    def flush() -> None:
        nonlocal group, fill
        if not group:
            return
        tokens = np.concatenate([g[0] for g in group])
        mask = np.concatenate([g[1] for g in group])
        fname = sh.shard_name(name, split, len(shards))
        digest = sh.write_shard(out / fname, tokens)
        mname = sh.mask_name(fname)
        shards.append({"file": fname, "split": split, "tokens": int(len(tokens)),
                       "documents": int(np.count_nonzero(tokens == eot)), "sha256": digest,
                       "mask": mname, "mask_sha256": sh.write_mask(out / mname, mask),
                       "target_tokens": int(mask.sum())})
        group, fill = [], 0

    for ids, mask in rendered:
        if group and fill + len(ids) > shard_tokens:
            flush()
        group.append((ids, mask))
        fill += len(ids)
    flush()


def prepare_chat(paths: list[str | Path], out_dir: str | Path, *, name: str = "chat",
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, val_fraction: float | None = None,
                 tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Check, render and write the conversations of `paths` under out_dir. Returns a summary
    (status prepared, or done for a finished prepare of the same files and settings)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if not 1 <= shard_tokens < 2**31:
        raise UserError(f"--shard-tokens must be between 1 and 2**31-1, got {shard_tokens}")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = tk.load_tokenizer(tokenizer)
    fmt = chat.chat_format(tok)
    params = json.loads(json.dumps({
        "name": name,
        "source": {"name": "chat", "files": [str(p) for p in paths]},
        "tokenizer": tk.tokenizer_info(tok),
        "chat": fmt.info(),
        "prepare": {"shard_tokens": shard_tokens, "val_fraction": val_fraction},
    }))
    if (out / sh.MANIFEST).exists():
        m = sh.read_manifest(out)
        if {k: m.get(k) for k in params} != params:
            raise UserError(f"{out} already holds a dataset prepared otherwise; choose another --out or remove it")
        return {"status": "done", "directory": str(out), **_summary(m["shards"]), "seconds": time.perf_counter() - t0}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty directory; choose another --out")
    convs = read_conversations(paths)  # every line checked before anything is written
    rendered = [chat.render_arrays(tok, messages) for _, messages in convs]
    n_val = val_plan(len(rendered), budget=None, val_fraction=val_fraction, val_tokens=None)["max_docs"] or 0
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    _write_split(out, name, "val", rendered[:n_val], shard_tokens, shards, fmt.eot)
    _write_split(out, name, "train", rendered[n_val:], shard_tokens, shards, fmt.eot)
    if isinstance(tok, tk.FileTokenizer):
        tk.copy_tokenizer(tok, out / tk.DATA_TOKENIZER_DIR)
    lengths = [len(r[0]) for r in rendered]
    stats = {"conversations": len(rendered), "max_conversation_tokens": max(lengths),
             "mean_conversation_tokens": sum(lengths) / len(lengths)}
    manifest = {"format": sh.FORMAT, "format_version": sh.FORMAT_VERSION, **params, "chat_stats": stats,
                "val": {"max_docs": n_val, "max_tokens": None}, **_summary(shards), "shards": shards}
    sh.write_manifest(out, manifest)
    return {"status": "prepared", "directory": str(out), **_summary(shards), **stats,
            "seconds": time.perf_counter() - t0}


def _summary(shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"splits": sh.split_totals(shards), "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards), "shard_count": len(shards),
            "target_tokens": sum(s.get("target_tokens", 0) for s in shards)}
