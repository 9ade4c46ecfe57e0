"""HellaSwag evaluation throughput (items/s) of gptlab.hellaswag on random-weight models: the
shared-context path (each item's 2 contexts run once, each packed with its 4 endings in one row)
against the former whole-row path (8 rows of context + ending an item), side by side on the
same model and items, and the largest difference between their row log-likelihoods.

Random weights score ~0.25 but cost exactly what trained ones do, so timings need no download.
The items come from the HellaSwag validation set in the preprocessed text layout that
../shared/data/hellaswag/hellaswag_val_full.txt.bz2 holds (6 lines an item: "label: context",
the gold index, 4 endings), converted to the authors' jsonl fields in memory; or from a real
hellaswag_val.jsonl with --file.

For comparison, --naive times the loop most GPT-2 reproductions use (build-nanogpt's): one item
per forward pass, 4 rows, logits at every position, completion style only.

    python benchmarks/hellaswag.py --preset tiny                 # all 10,042 items
    python benchmarks/hellaswag.py --preset gpt2 --limit 96
    python benchmarks/hellaswag.py --preset tiny --limit 500 --naive

Prints a markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import bz2
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2"


def read_items(path: Path, limit: int | None) -> list[dict]:
    """Items from a jsonl file, or from the 6-lines-an-item text layout (.txt or .txt.bz2)."""
    if path.suffix == ".jsonl":
        from gptlab.hellaswag import load_hellaswag

        return [dict(ctx=i.ctx, ctx_a=i.ctx_a, ctx_b=i.ctx_b, activity_label=i.activity_label,
                     endings=list(i.endings), label=i.label) for i in load_hellaswag(path, limit)]
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    items = []
    for i in range(0, len(lines) - 5, 6):
        # "activity label: context"; the layout merged ctx_a and ctx_b, so ctx_b stays empty
        activity, _, ctx = lines[i].partition(": ")
        items.append(dict(ctx=ctx, ctx_a=ctx, ctx_b="", activity_label=activity,
                          endings=lines[i + 2:i + 6], label=int(lines[i + 1])))
        if limit is not None and len(items) >= limit:
            break
    return items


@torch.no_grad()
def naive_items_per_s(model, rendered) -> float:
    """One item a forward: 4 rows padded to the longest, full logits, completion style."""
    t0 = time.perf_counter()
    for it in rendered:
        rows = it.rows[:4]
        T = max(len(r) for r, _ in rows)
        tokens = torch.zeros(4, T, dtype=torch.long)
        mask = torch.zeros(4, T)
        for i, (ids, n) in enumerate(rows):
            tokens[i, :len(ids)] = torch.tensor(ids)
            mask[i, len(ids) - n:len(ids)] = 1
        logits, _ = model(tokens)  # (4, T, V)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        losses = losses.view(4, T - 1) * mask[:, 1:]
        (losses.sum(1) / mask[:, 1:].sum(1)).argmin().item()
    return len(rendered) / (time.perf_counter() - t0)


def time_path(model, rendered, batch_size: int, share: bool) -> tuple[float, dict]:
    from gptlab.hellaswag import evaluate_hellaswag

    t0 = time.perf_counter()
    res = evaluate_hellaswag(model, rendered, device="cpu", batch_size=batch_size, show_progress=False,
                             share_context=share)
    dt = time.perf_counter() - t0
    print(f"  {'packed contexts' if share else 'whole rows'}: {dt:.1f} s, load {os.getloadavg()[0]:.1f}",
          file=sys.stderr, flush=True)
    return dt, res


def max_row_difference(model, rendered, batch_size: int) -> float:
    """Largest |shared - whole rows| row log-likelihood over the items (both scored here)."""
    from gptlab import hellaswag as ev

    rows, cropped = ev._crop_items(rendered, model.config.seq_len)
    kept = [i for i, c in enumerate(cropped) if not c]
    rendered, rows = [rendered[i] for i in kept], [rows[i] for i in kept]
    old = ev.hellaswag_row_scores(model, rendered, rows, [False] * len(rows), device="cpu", batch_size=batch_size)
    new = ev.hellaswag_row_scores(model, rendered, rows, [True] * len(rows), device="cpu", batch_size=batch_size)
    return (old - new).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", default=None, help="model preset (repeatable; default tiny)")
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE, help="items: hellaswag jsonl or the .txt.bz2 layout")
    ap.add_argument("--limit", type=int, default=None, help="first N items (default: all)")
    ap.add_argument("--batch-size", type=int, default=16, help="items per forward pass")
    ap.add_argument("--naive", action="store_true", help="also time a one-item-per-forward loop")
    ap.add_argument("--diff-items", type=int, default=32, help="items whose row scores are compared (0: skip)")
    args = ap.parse_args()

    from gptlab.config import PRESETS
    from gptlab.hellaswag import render_hellaswag
    from gptlab.model import GPT

    if not args.file.is_file():
        sys.exit(f"{args.file}: no such file (pass --file PATH)")
    items = read_items(args.file, args.limit)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    rendered = render_hellaswag(items)
    t_render = time.perf_counter() - t0
    rows = ["| preset | path | items | batch | seconds | items/s | speed-up | completion acc_norm | harness acc_norm |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    diffs = []
    for preset in args.preset or ["tiny"]:
        torch.manual_seed(0)
        model = GPT(PRESETS[preset]).eval()
        # old first, then new, then old again: the machine is shared, so the old rate is the mean
        # of the two runs around the new one
        t_old1, r_old = time_path(model, rendered, args.batch_size, share=False)
        t_new, r_new = time_path(model, rendered, args.batch_size, share=True)
        t_old2, _ = time_path(model, rendered, args.batch_size, share=False)
        t_old = (t_old1 + t_old2) / 2
        n = len(rendered)
        for path, dt, res in (("whole rows (before)", t_old, r_old), ("packed contexts (now)", t_new, r_new)):
            rows.append(f"| {preset} | {path} | {n} | {args.batch_size} | {dt:.1f} | {n / dt:.2f} | "
                        f"{t_old / dt:.2f}x | {res['completion']['acc_norm']:.4f} | {res['harness']['acc_norm']:.4f} |")
            print(rows[-1], file=sys.stderr, flush=True)
        print(f"{preset}: whole-row runs took {t_old1:.1f} s and {t_old2:.1f} s", file=sys.stderr, flush=True)
        if args.naive:
            rate = naive_items_per_s(model, rendered)
            rows.append(f"| {preset} | naive loop (1 item/forward, full logits, completion only) | "
                        f"{n} | 1 | {n / rate:.1f} | {rate:.2f} | {rate * t_old / n:.2f}x | | |")
        if args.diff_items:
            diffs.append(f"{preset}: largest |shared - whole rows| row log-likelihood over the first "
                         f"{min(args.diff_items, n)} items: "
                         f"{max_row_difference(model, rendered[:args.diff_items], args.batch_size):.2e}")
    print(f"tokenizing {len(rendered)} items (both styles): {t_render:.2f} s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
          f"1-minute load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} cores)")
    print("\n".join(diffs))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
