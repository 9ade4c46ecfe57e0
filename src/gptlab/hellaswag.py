"""HellaSwag (Zellers et al. 2019): the data files, rendering in two scoring styles, scoring
sharded over ranks, and the published references.

An item gives a context and 4 endings; a language model picks the ending it finds most likely. Two
conventions are in use and they give different numbers, so both are reported:

- **completion** (build-nanogpt / llm.c): the tokens of `ctx`, then the tokens of " " + ending;
  only the ending's tokens are scored. acc picks the lowest summed loss, acc_norm the lowest mean
  loss per token.
- **harness** (EleutherAI lm-evaluation-harness, task `hellaswag`): the query
  `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()` and each ending go through the
  harness's cleaning (`harness_preprocess`); the continuation is " " + cleaned ending. acc picks
  the highest summed log-likelihood, acc_norm the highest log-likelihood divided by the length in
  characters of the cleaned ending (`len(choice)` in the harness: the choice string without the
  leading space that joins it to the query).

Each item has 2 contexts (one per style) and 8 rows (4 endings x 2 styles). A gptlab GPT runs
each context once, packed in one row with its 4 endings (scoring.PackedRows: each ending takes
the positions after the context and sees only the context and itself); rows are sorted by length
and right-padded, and pad positions are never scored. Items cropped to the model's context (their
rows crop differently) and other modules run whole rows instead (score_rows).

Sharding: the batches are cut the same way for any world size and batch b runs on rank b %
world_size; each rank writes its rows' log-likelihoods into a zeroed (items, 8) table, and one sum
over ranks at the end gives every rank the whole table, so 2 ranks give exactly the 1-rank numbers.

The evaluation runs the raw module (no DDP wrapper, no torch.compile), so it works on a model that
is being trained compiled or wrapped, and it restores each module's train/eval mode.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from gptlab import dist, downloads, jsonl
from gptlab.atomic import sha256_file
from gptlab.config import EOT_TOKEN, HELLASWAG_REFERENCES
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.scoring import (ContextGroup, autocast_or_null, context_len, eval_mode, plan_shared_batches,
                            progress, rank_world, score_rows, score_shared, sum_dtype)
from gptlab.weights import raw_model

# ----------------------------------------------------------------------------- data files

HELLASWAG_SPLITS = ("val", "train", "test")
# The HellaSwag authors' repository; GPTLAB_HELLASWAG_URL (a template with {split}) overrides it,
# e.g. for a mirror.
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
# sha256 and size of the authors' files, as pinned by Hugging Face `datasets` for its `hellaswag`
# builder (datasets/hellaswag/dataset_infos.json, download_checksums). The val hash is also the
# one that several independent projects pin for hellaswag_val.jsonl (10,042 items).
HELLASWAG_SHA256 = {
    "val": "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
    "train": "dae5e69249868cb9fe4e23ff925c60b66169564cfb7072d793cd7356a2b69f8d",
    "test": "da082b00543e422b8d25394614d102944586986def4de5cd1bd36d86bcb76261",
}
HELLASWAG_BYTES = {"val": 12246618, "train": 47496131, "test": 11752147}
HELLASWAG_VAL_ITEMS = 10042


def find_hellaswag(
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    split: str = "val",
    download: bool = True,
    *,
    url: str | None = None,
    expected_sha256: str | None = None,
    show_progress: bool = True,
) -> Path:
    """The HellaSwag jsonl to read: `path` if given (a local file in the authors' format), else the
    cached copy of `split` under the cache directory, else (with download) a fresh download checked
    against the pinned sha256. `url` (a template with {split}; default $GPTLAB_HELLASWAG_URL or the
    authors' GitHub) and `expected_sha256` (default: the pinned hash of that split) are for mirrors
    and tests. A cached copy with the wrong hash is fetched again. UserError when unavailable."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"{p}: no such HellaSwag file")
        if not p.is_file():
            raise UserError(f"{p}: is not a file")
        return p
    if split not in HELLASWAG_SPLITS:
        raise UserError(f"unknown HellaSwag split {split!r}; choose one of {', '.join(HELLASWAG_SPLITS)}")
    want = expected_sha256 or HELLASWAG_SHA256[split]
    dest = downloads.cache_dir(cache_dir) / "hellaswag" / f"hellaswag_{split}.jsonl"
    if dest.is_file():
        if sha256_file(dest) == want:
            return dest
        if not download:
            raise UserError(f"{dest}: cached copy has the wrong sha256 (expected {want}); delete it to fetch it again")
    elif not download:
        raise UserError(f"HellaSwag {split} split is not in the cache ({dest}); pass --hellaswag-file PATH")
    template = url or os.environ.get("GPTLAB_HELLASWAG_URL") or HELLASWAG_URL
    src = template.format(split=split)
    downloads.download(src, dest, want, show_progress=show_progress,
                       hint="; pass --hellaswag-file PATH to use a local copy")
    return dest


# ----------------------------------------------------------------------------- items

@dataclass(frozen=True)
class HellaSwagItem:
    """One HellaSwag item: the fields both scoring styles need."""

    ctx: str
    endings: tuple[str, ...]
    label: int
    activity_label: str
    ctx_a: str
    ctx_b: str
    where: str = ""
    """file:line (or item index) for error messages."""


_TEXT_FIELDS = ("ctx", "activity_label", "ctx_a", "ctx_b")


def parse_item(obj: Any, where: str) -> HellaSwagItem:
    """Check one decoded JSON object and make an item of it; UserError naming `where` otherwise."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in (*_TEXT_FIELDS, "endings", "label") if k not in obj]
    if missing:
        hint = " (HellaSwag's test split has no labels)" if missing == ["label"] else ""
        raise UserError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}{hint}")
    for k in _TEXT_FIELDS:
        if not isinstance(obj[k], str):
            raise UserError(f"{where}: field {k} must be a string")
    endings = obj["endings"]
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: endings must be a list of 4 strings")
    label = obj["label"]
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # the Hugging Face copy stores labels as strings
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
        raise UserError(f"{where}: label must be 0, 1, 2 or 3, got {obj['label']!r}")
    return HellaSwagItem(obj["ctx"], tuple(endings), label, obj["activity_label"], obj["ctx_a"],
                         obj["ctx_b"], where)


def load_hellaswag(path: str | Path, limit: int | None = None) -> list[HellaSwagItem]:
    """Items of a HellaSwag jsonl file (the first `limit` of them); errors name the line."""
    path = Path(path)
    items: list[HellaSwagItem] = []
    for where, obj in itertools.islice(jsonl.rows(path, "HellaSwag file"), limit):  # none read past `limit`
        items.append(parse_item(obj, where))
    if not items:
        raise UserError(f"{path}: no HellaSwag items in the file")
    return items


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag text cleaning: WikiHow items carry markers such as
    "[title]" and "[header]"; " [title]" becomes a sentence break and other [...] tags go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def harness_query(item: HellaSwagItem) -> str:
    """The harness's context: activity label, then ctx_a and the capitalised ctx_b, cleaned."""
    return harness_preprocess(item.activity_label + ": " + item.ctx_a + " " + item.ctx_b.capitalize())


# ----------------------------------------------------------------------------- rendering

@dataclass(frozen=True)
class RenderedItem:
    """An item as token rows. rows[0:4] are the completion style's endings, rows[4:8] the
    harness's; each row is (context + continuation ids, number of continuation ids at its end)."""

    label: int
    rows: tuple[tuple[tuple[int, ...], int], ...]
    harness_chars: tuple[int, ...]
    """len(cleaned ending) per ending: the harness's acc_norm divisor."""
    where: str
    tokenizer: str = "gpt2"
    """the name of the tokenizer whose ids the rows hold"""


def _harness_rows(enc, query: str, continuations: Sequence[str], eot: int = EOT_TOKEN) -> list[tuple[int, ...]]:
    """Token rows of query + each continuation as the harness (v0.4) makes them: trailing spaces
    of the context move to the continuation, context + continuation is encoded as one string, and
    the continuation's ids are what follows the context's own ids. An empty context becomes the
    end-of-text token. Returns rows of context ids + continuation ids, with len(continuation ids)."""
    if query == "":
        return [((eot, *enc.encode_ordinary(c)), len(enc.encode_ordinary(c))) for c in continuations]
    n_spaces = len(query) - len(query.rstrip())
    context, moved = (query[:-n_spaces], query[-n_spaces:]) if n_spaces else (query, "")
    ctx = enc.encode_ordinary(context)
    rows = []
    for c in continuations:
        whole = enc.encode_ordinary(context + moved + c)
        rows.append((tuple(ctx + whole[len(ctx):]), len(whole) - len(ctx)))
    return rows


def render_item(item: HellaSwagItem, tokenizer=None) -> RenderedItem:
    """item's 8 rows in the ids of tokenizer (a gptlab Tokenizer: GPT-2's by default, or the
    model's own trained one, whose end-of-text id stands in for an empty context)."""
    if tokenizer is None:
        from gptlab.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    enc, eot = tokenizer.enc, tokenizer.eot
    rows = []
    # completion style (build-nanogpt): ctx, then " " + ending
    ctx = enc.encode_ordinary(item.ctx) or [eot]  # an empty context: condition on end-of-text
    for e in item.endings:
        cont = enc.encode_ordinary(" " + e)
        rows.append((tuple(ctx + cont), len(cont)))
    # harness style: cleaned query, then " " + cleaned ending
    choices = [harness_preprocess(e) for e in item.endings]
    rows.extend(_harness_rows(enc, harness_query(item), [" " + c for c in choices], eot))
    # a choice that cleans to "" would divide by zero in the harness; count it as 1 character
    return RenderedItem(item.label, tuple(rows), tuple(max(1, len(c)) for c in choices), item.where, tokenizer.name)


def render_hellaswag(items: Iterable[HellaSwagItem | dict], tokenizer=None) -> list[RenderedItem]:
    """Tokenize items once with tokenizer (default GPT-2's; give the model's own, see
    tokenizer.model_tokenizer), and pass the result to evaluate_hellaswag."""
    from gptlab.tokenizer import get_tokenizer

    tokenizer = tokenizer or get_tokenizer()
    out = []
    for i, it in enumerate(items):
        if isinstance(it, dict):
            it = parse_item(it, f"item {i}")
        out.append(render_item(it, tokenizer))
    return out



# ----------------------------------------------------------------------------- scoring

def _crop(row: tuple[int, ...], T: int | None) -> tuple[tuple[int, ...], bool]:
    """Keep the last T + 1 tokens: the model reads row[:-1] (at most T) and predicts row[1:]."""
    if T is None or len(row) <= T + 1:
        return row, False
    return row[len(row) - (T + 1):], True


# ----------------------------------------------------------------------------- HellaSwag scoring

def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy's and torch's argmax/argmin)."""
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def _predictions(sums: Sequence[float], counts: Sequence[int], chars: Sequence[int]) -> tuple[int, int, int, int]:
    """(completion acc, completion acc_norm, harness acc, harness acc_norm) predictions of one
    item's 8 row scores. Lowest loss = highest log-likelihood."""
    c, h = sums[:4], sums[4:]
    return (
        _argmax(c),
        _argmax([s / n for s, n in zip(c, counts[:4])]),  # mean loss per token
        _argmax(h),
        _argmax([s / n for s, n in zip(h, chars)]),  # per character of the cleaned ending
    )


@functools.lru_cache(maxsize=1)
def _rendered_file(path: str, size: int, mtime_ns: int, limit: int | None, tokenizer) -> tuple[RenderedItem, ...]:
    """The rendered items of a file, kept for the next call with the same unchanged file and
    tokenizer: the trainer evaluates the same file every few hundred steps, and tokenizing 10,042
    items takes seconds. size and mtime_ns are part of the key so that an edited file is read again."""
    return tuple(render_hellaswag(load_hellaswag(path, limit), tokenizer))


def _prepare_items(items_or_path, limit: int | None, tokenizer) -> list[RenderedItem]:
    """Rendered items (in tokenizer's ids) from a path, items, or already rendered items."""
    if isinstance(items_or_path, (str, Path)):
        path = find_hellaswag(items_or_path).resolve()
        st = path.stat()
        return list(_rendered_file(str(path), st.st_size, st.st_mtime_ns, limit, tokenizer))
    items = list(items_or_path)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise UserError("no HellaSwag items to evaluate")
    if all(isinstance(it, RenderedItem) for it in items):
        other = {it.tokenizer for it in items} - {tokenizer.name}
        if other:
            raise UserError(f"HellaSwag items were tokenized with {', '.join(sorted(other))}, but the model "
                            f"uses {tokenizer.name}: render them with the model's tokenizer")
        return items
    return render_hellaswag(items, tokenizer)


def _crop_items(rendered: Sequence[RenderedItem], T: int | None) -> tuple[list[tuple], list[bool]]:
    """Every item's rows cropped to the model's context, and whether any row of it was. Run on
    every rank, so that an item that cannot fit fails everywhere before any collective."""
    rows_out, flags = [], []
    for it in rendered:
        rows, any_cropped = [], False
        for ids, n_cont in it.rows:
            if T is not None and n_cont > T:
                raise UserError(
                    f"{it.where}: an ending of {n_cont} tokens does not fit the model's context of {T} tokens"
                )
            ids2, was = _crop(ids, T)
            rows.append((ids2, n_cont))
            any_cropped |= was
        rows_out.append(tuple(rows))
        flags.append(any_cropped)
    return rows_out, flags


@dataclass(frozen=True)
class _Batch:
    """One forward's work: whole rows of `items` (score_rows), or context `groups` (score_shared)
    whose continuations are the rows `slots` [(item, row)], in order."""

    items: tuple[int, ...] = ()
    groups: tuple[ContextGroup, ...] = ()
    slots: tuple[tuple[int, int], ...] = ()


def _plan_hellaswag(rows: Sequence[tuple], shared: Sequence[bool], batch_size: int) -> list[_Batch]:
    """All batches, cut the same way for any world size. Items with `shared` set share each
    context across its endings (the 2 styles give 2 contexts an item); the others (cropped items,
    whose rows crop differently, or models without GPT.hidden) run as whole rows, items sorted
    by their longest row, batch_size items a batch."""
    groups: list[ContextGroup] = []
    slots: list[list[tuple[int, int]]] = []
    for i, item_rows in enumerate(rows):
        if not shared[i]:
            continue
        by_ctx: dict[tuple[int, ...], int] = {}
        for k, (ids, n_cont) in enumerate(item_rows):
            ctx, cont = tuple(ids[:-n_cont]), tuple(ids[-n_cont:])
            if ctx not in by_ctx:
                by_ctx[ctx] = len(groups)
                groups.append(ContextGroup(ctx, ()))
                slots.append([])
            g = by_ctx[ctx]
            groups[g] = ContextGroup(ctx, groups[g].continuations + (cont,))
            slots[g].append((i, k))
    plan = [_Batch(groups=tuple(groups[g] for g in b), slots=tuple(s for g in b for s in slots[g]))
            for b in plan_shared_batches(groups, 8 * batch_size)]
    whole = sorted((i for i in range(len(rows)) if not shared[i]),
                   key=lambda i: (max(len(r) for r, _ in rows[i]), i))
    plan += [_Batch(items=tuple(whole[j:j + batch_size])) for j in range(0, len(whole), batch_size)]
    return plan


def _score_hellaswag_batch(net, batch: _Batch, rows: Sequence[tuple], scores: torch.Tensor, device,
                           n_chunks: int | None = None, write: bool = True) -> None:
    """Write the batch's row log-likelihoods into scores (items, 8) (unless `write` is False: a
    sharded model's padding batch, run only so that every rank makes the same calls)."""
    if batch.groups:
        sums, _ = score_shared(net, batch.groups, device)
        items = torch.tensor([i for i, _ in batch.slots])
        ks = torch.tensor([k for _, k in batch.slots])
    else:
        sums, _ = score_rows(net, [r for i in batch.items for r in rows[i]], device, n_chunks)
        items = torch.tensor(batch.items).repeat_interleave(8)
        ks = torch.arange(8).repeat(len(batch.items))
    if not write:
        return
    scores[items.to(scores.device), ks.to(scores.device)] = sums.to(scores.device)


def _tally_hellaswag(rendered: Sequence[RenderedItem], scores: Sequence[Sequence[float]],
                     cropped: Sequence[bool]) -> dict:
    hits = [0, 0, 0, 0]  # completion acc, completion acc_norm, harness acc, harness acc_norm
    for it, s in zip(rendered, scores):
        for k, p in enumerate(_predictions(s, [n for _, n in it.rows], it.harness_chars)):
            hits[k] += int(p == it.label)
    n = len(rendered)
    return {
        "completion": {"acc": hits[0] / n, "acc_norm": hits[1] / n, "n": n},
        "harness": {"acc": hits[2] / n, "acc_norm": hits[3] / n, "n": n},
        "cropped": sum(cropped),
    }


def hellaswag_row_scores(net: torch.nn.Module, rendered: Sequence[RenderedItem], rows: Sequence[tuple],
                         shared: Sequence[bool], *, device, batch_size: int = 16,
                         autocast: Callable[[], Any] | None = None, show_progress: bool = False) -> torch.Tensor:
    """Summed log-likelihood of every item's 8 rows -> (items, 8) float64 on `device`, the same on
    every rank. rows: _crop_items' rows; shared[i]: item i shares its contexts (a GPT only)."""
    rank, world = rank_world()
    mine, n_chunks = _rank_plan(_plan_hellaswag(rows, shared, batch_size), rows, rank, world, _sharded(net))
    # every rank fills its own items' rows and zeros elsewhere; one sum makes the whole table, exactly
    scores = torch.zeros(len(rendered), 8, dtype=sum_dtype(device), device=device)
    ctx = autocast_or_null(autocast)
    with progress(sum(len(b.slots) or 8 * len(b.items) for b, w in mine if w) / 8, "hellaswag", "item",
                  show_progress and rank == 0) as bar, eval_mode(net), torch.no_grad():
        for batch, write in mine:
            with ctx():
                _score_hellaswag_batch(net, batch, rows, scores, device, n_chunks, write)
            bar.update((len(batch.slots) or 8 * len(batch.items)) / 8 if write else 0)
    if dist.is_initialized():
        dist.all_reduce_sum(scores)  # once, after every rank has finished its (possibly fewer) batches
    return scores


# Under FSDP every forward call (hidden, and each logits call) gathers parameters from all ranks: a
# collective, so every rank must make the same calls. A sharded model scores whole rows (no shared
# contexts, whose calls vary with the batch), the ranks run the same number of batches (a rank with
# fewer runs the first batch again without writing it) and split the output layer into the same
# number of calls. Which items a rank writes is unchanged, so the result is the 1-rank one.

def _sharded(net: torch.nn.Module) -> bool:
    if not dist.is_initialized():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def _rank_plan(plan: list[_Batch], rows: Sequence[tuple], rank: int, world: int, sharded: bool):
    """This rank's batches as (batch, write) and the output-layer calls per batch (None: as needed)."""
    mine = [(b, True) for b in plan[rank::world]]
    if not sharded or not plan:
        return mine, None
    rounds = -(-len(plan) // world)
    mine += [(plan[0], False)] * (rounds - len(mine))
    scored = max(sum(n for i in b.items for _, n in rows[i]) for b in plan)
    return mine, max(1, -(-scored // 2048))


def evaluate_hellaswag(
    model: torch.nn.Module,
    items_or_path,
    *,
    device,
    limit: int | None = None,
    batch_size: int = 16,
    autocast: Callable[[], Any] | None = None,
    show_progress: bool = True,
    share_context: bool = True,
) -> dict:
    """HellaSwag accuracy in both scoring styles.

    items_or_path: a jsonl path, a list of HellaSwagItem or item dicts, or render_hellaswag's
    output. batch_size: items per forward pass (8 rows each). autocast: a context manager factory
    (e.g. Runtime.autocast) or None, entered per batch. share_context (a gptlab GPT only): run
    each item's 2 contexts once, each packed with its 4 endings in one row (False: 8 whole rows an
    item, the former path, kept for comparison). When a process group is up every rank must call
    this; the ranks share the batches and the result is the same on every rank.
    Items longer than the model's context are cropped from the left and counted in "cropped".
    Text is tokenized with the model's own tokenizer (GPT-2's, or the trained one it carries).
    Returns {"completion": {"acc", "acc_norm", "n"}, "harness": {...}, "cropped": k}."""
    from gptlab.tokenizer import model_tokenizer

    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    net = raw_model(model)
    rendered = _prepare_items(items_or_path, limit, model_tokenizer(net))
    rows, cropped = _crop_items(rendered, context_len(net))
    shared = [share_context and isinstance(net, GPT) and not c and not _sharded(net) for c in cropped]
    scores = hellaswag_row_scores(net, rendered, rows, shared, device=device, batch_size=batch_size,
                                  autocast=autocast, show_progress=show_progress)
    return _tally_hellaswag(rendered, scores.tolist(), cropped)



# ----------------------------------------------------------------------------- references

GPT2_NAMES = {"gpt2": "OpenAI GPT-2 124M", "gpt2-medium": "OpenAI GPT-2 350M",
              "gpt2-large": "OpenAI GPT-2 774M", "gpt2-xl": "OpenAI GPT-2 1558M"}


def _fmt(v: float | None) -> str:
    """A score in the report's tables, '-' for none."""
    return "     -" if v is None else f"{v:.4f}"


def format_hellaswag(hs: dict, *, preset: str | None = None, split: str = "val") -> list[str]:
    """The report's lines for evaluate_hellaswag's result, with the references of `preset`."""
    lines = []
    refs = HELLASWAG_REFERENCES.get(preset or "", {})
    n = hs["completion"]["n"]
    lines.append(f"{'HellaSwag ' + split + f', {n:,} items':<40} {'acc':>7} {'acc_norm':>9}")
    for style, title in (("completion", "completion (build-nanogpt style)"),
                         ("harness", "harness (lm-eval-harness style)")):
        lines.append(f"  {title:<38} {_fmt(hs[style]['acc']):>7} {_fmt(hs[style]['acc_norm']):>9}")
        if style in refs:
            acc, acc_norm = refs[style]
            lines.append(f"    {GPT2_NAMES[preset]:<36} {_fmt(acc):>7} {_fmt(acc_norm):>9}")
    if "gpt3" in refs:
        name, value = refs["gpt3"]
        lines.append(f"  {name + ' (paper, zero-shot)':<38} {_fmt(None):>7} {_fmt(value):>9}")
    if hs.get("cropped"):
        lines.append(f"  note: {hs['cropped']} items were longer than the model's context and were "
                     "cropped from the left")
    return lines


# ----------------------------------------------------------------------------- under torchrun

def find_on_all_ranks(env, device, **kwargs) -> Path:
    """find_hellaswag where only one process per node may download: local rank 0 fetches, the
    others wait for it and read the cached copy; a failure anywhere fails every rank."""
    if not dist.is_initialized() or kwargs.get("path") is not None:
        return find_hellaswag(**kwargs)
    err, path = None, None
    if env.local_rank == 0:
        try:
            path = find_hellaswag(**kwargs, download=True, show_progress=env.is_main)
        except UserError as e:
            err = str(e)
    flag = torch.tensor([1 if err else 0], dtype=torch.int64, device=device)
    dist.all_reduce_max(flag)
    if flag.item():
        raise UserError(err or "HellaSwag data is unavailable (see rank 0's error)")
    return path or find_hellaswag(**kwargs, download=False)

