"""HellaSwag scoring (both styles) and its data files, checked against independent reference
computations on hand-made models and data."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab import hellaswag as ev, scoring
from gptlab.errors import UserError
from gptlab.tokenizer import get_encoding

V = 50257


# ----------------------------------------------------------------------------- helpers

def item(ctx, endings, label, activity="Doing things", ctx_a=None, ctx_b=""):
    return {"ind": 0, "activity_label": activity, "ctx_a": ctx if ctx_a is None else ctx_a, "ctx_b": ctx_b,
            "ctx": ctx, "endings": list(endings), "label": label, "split": "val"}


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return path


def some_items(n: int, seed: int = 0):
    """n HellaSwag-like items of varied lengths, ActivityNet and WikiHow style."""
    words = ("the man woman dog runs jumps into water slowly then picks up a ball and throws it far "
             "away while people watch from shore laughing kids play grass field sun").split()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ctx = " ".join(rng.choice(words, size=int(rng.integers(3, 25))))
        ends = [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) + "." for _ in range(4)]
        if i % 3 == 2:  # WikiHow markers that only the harness cleans
            ctx_a = "[header] How to " + ctx + " [title] Start."
            ends = [("[substeps] " if (i + j) % 2 else "") + e for j, e in enumerate(ends)]
            out.append(item(ctx_a, ends, int(rng.integers(0, 4)),
                            activity="Home and Garden", ctx_a=ctx_a))
        else:
            a, _, b = ctx.rpartition(" ")
            out.append(item(ctx, ends, int(rng.integers(0, 4)), ctx_a=a, ctx_b=b))
    return out


class Unigram(torch.nn.Module):
    """A stub with GPT's call signature whose next-token distribution ignores the context:
    softmax(w) at every position. Its preferences are known exactly."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, idx, targets=None):
        B, T = idx.shape
        return self.w.expand(B, T, -1), None


class Delegate(torch.nn.Module):
    """Not a GPT: forces the generic (full-logits) scoring path on a real network."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, idx, targets=None):
        return self.inner(idx, targets)


def reference_scores(w: torch.Tensor, it: dict) -> tuple[int, int, int, int]:
    """The 4 predictions for a context-free unigram model, written from the two definitions."""
    enc = get_encoding()
    logp = torch.log_softmax(w.double(), -1)
    completion = [[logp[t].item() for t in enc.encode_ordinary(" " + e)] for e in it["endings"]]
    clean = [ev.harness_preprocess(e) for e in it["endings"]]
    harness = [sum(logp[t].item() for t in enc.encode_ordinary(" " + c)) for c in clean]
    losses = [-sum(c) for c in completion]
    mean_losses = [-sum(c) / len(c) for c in completion]
    return (int(np.argmin(losses)), int(np.argmin(mean_losses)), int(np.argmax(harness)),
            int(np.argmax([h / len(c) for h, c in zip(harness, clean)])))


# ----------------------------------------------------------------------------- harness text

def test_harness_preprocess_matches_the_harness_rules():
    p = ev.harness_preprocess
    assert p("  Heat the grill. ") == "Heat the grill."
    # tags go, and a space they leave at the start stays (the harness strips before it removes tags)
    assert p("[header] How to clean a grill [title] Heat the grill.") == " How to clean a grill. Heat the grill."
    assert p("[substeps] Use a brush.  It works.") == " Use a brush. It works."
    # "  " -> " " is a single pass: four spaces become two
    assert p("a    b") == "a  b"
    assert p("x [step] y") == "x y"


def test_harness_query_joins_label_and_capitalised_ctx_b():
    it = ev.parse_item(item("", ["a", "b", "c", "d"], 0, activity="Roof shingle removal",
                            ctx_a="A man is sitting on a roof.", ctx_b="he"), "t")
    assert ev.harness_query(it) == "Roof shingle removal: A man is sitting on a roof. He"
    # str.capitalize lowers the rest, as in the harness
    it = ev.parse_item(item("", ["a"] * 4, 0, activity="Fun", ctx_a="Kids play.", ctx_b="THE Dog"), "t")
    assert ev.harness_query(it) == "Fun: Kids play. The dog"
    # an empty ctx_b leaves no trailing space; WikiHow markers are cleaned
    it = ev.parse_item(item("", ["a"] * 4, 0, activity="Home and Garden",
                            ctx_a="[header] How to clean a grill [title] Heat the grill.", ctx_b=""), "t")
    assert ev.harness_query(it) == "Home and Garden: How to clean a grill. Heat the grill."


def test_rendered_rows_split_context_and_continuation():
    enc = get_encoding()
    it = ev.parse_item(item("A man is sitting on a roof. he", ["is using wrap.", "b", "c", "d"], 0,
                            activity="Roofing", ctx_a="A man is sitting on a roof.", ctx_b="he"), "t")
    r = ev.render_item(it)
    ids, n = r.rows[0]
    assert list(ids) == enc.encode_ordinary("A man is sitting on a roof. he") + enc.encode_ordinary(" is using wrap.")
    assert n == len(enc.encode_ordinary(" is using wrap."))
    ids, n = r.rows[4]
    assert enc.decode(list(ids)) == "Roofing: A man is sitting on a roof. He is using wrap."
    assert enc.decode(list(ids[-n:])) == " is using wrap."
    assert r.harness_chars == (len("is using wrap."), 1, 1, 1)


# ----------------------------------------------------------------------------- scoring

def test_known_preferences_pick_the_favoured_endings():
    enc = get_encoding()
    items = some_items(12, seed=1)
    w = torch.zeros(V)
    for it in items:  # every token of every gold ending is strongly preferred
        for t in enc.encode_ordinary(" " + it["endings"][it["label"]]):
            w[t] = 8.0
    # make the distractors share no favoured token: rewrite them with unfavoured words
    for it in items:
        for j in range(4):
            if j != it["label"]:
                it["endings"][j] = "zebra quartz xylophone"
    res = ev.evaluate_hellaswag(Unigram(w), items, device="cpu", batch_size=5, show_progress=False)
    for style in ("completion", "harness"):
        assert res[style] == {"acc": 1.0, "acc_norm": 1.0, "n": 12}
    assert res["cropped"] == 0


def test_unigram_model_matches_the_reference_definitions():
    """acc vs acc_norm and token vs character normalisation, against a direct computation."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, generator=g) * 3
    items = some_items(30, seed=2)
    # endings of very different lengths make the 4 rules disagree
    items.append(item("x", ["ok", "extraordinarily incomprehensible", "a b c d e f g h", "[title] Yes ok"], 1))
    refs = [reference_scores(w, it) for it in items]
    preds = list(zip(*refs))
    assert len({tuple(p) for p in preds}) == 4, "the data must tell the four rules apart"
    labels = [it["label"] for it in items]
    want = [sum(p == y for p, y in zip(col, labels)) / len(items) for col in preds]
    res = ev.evaluate_hellaswag(Unigram(w), items, device="cpu", batch_size=4, show_progress=False)
    got = [res["completion"]["acc"], res["completion"]["acc_norm"], res["harness"]["acc"], res["harness"]["acc_norm"]]
    assert got == want


def test_batched_scoring_equals_one_row_at_a_time(make_gptlab):
    model = make_gptlab(seed=3)
    rendered = ev.render_hellaswag(some_items(6, seed=3))
    rows = [r for it in rendered for r in it.rows]
    with torch.no_grad():
        sums, counts = scoring.score_rows(model, rows, "cpu")
        for i, row in enumerate(rows):
            s1, c1 = scoring.score_rows(model, [row], "cpu")
            assert s1[0].item() == pytest.approx(sums[i].item(), rel=1e-5, abs=1e-4)
            assert c1[0] == counts[i] == row[1]
            # and from the definition: the full forward's log-probabilities of the continuation
            ids, n = row
            x = torch.tensor([ids[:-1]])
            logp = model(x)[0][0].log_softmax(-1)  # (T, V)
            direct = sum(logp[p, ids[p + 1]].item() for p in range(len(ids) - 1 - n, len(ids) - 1))
            assert s1[0].item() == pytest.approx(direct, rel=1e-5, abs=1e-4)
    a = ev.evaluate_hellaswag(model, rendered, device="cpu", batch_size=1, show_progress=False)
    b = ev.evaluate_hellaswag(model, rendered, device="cpu", batch_size=6, show_progress=False)
    assert a == b


def test_output_layer_shortcut_equals_the_full_forward(make_gptlab):
    """The GPT path runs only scored positions through the output layer; a non-GPT wrapper of
    the same network takes the full forward. They must agree (this also keeps GPT.hidden in
    step with model.py)."""
    model = make_gptlab(seed=4)
    rows = [r for it in ev.render_hellaswag(some_items(4, seed=4)) for r in it.rows]
    with torch.no_grad():
        fast, _ = scoring.score_rows(model, rows, "cpu")
        slow, _ = scoring.score_rows(Delegate(model), rows, "cpu")
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-4)


def test_long_items_are_cropped_from_the_left_and_counted(make_gptlab):
    model = make_gptlab(seed=5, seq_len=16)
    items = some_items(8, seed=5)
    items[0]["ctx"] = items[0]["ctx_a"] = " ".join(["water"] * 40)
    rendered = ev.render_hellaswag(items)
    n_long = sum(any(len(ids) > 17 for ids, _ in r.rows) for r in rendered)
    assert n_long >= 1
    res = ev.evaluate_hellaswag(model, rendered, device="cpu", batch_size=3, show_progress=False)
    assert res["cropped"] == n_long
    # cropping keeps the last seq_len + 1 tokens of each row
    cropped = [ev.RenderedItem(r.label, tuple((ids[-17:], n) for ids, n in r.rows), r.harness_chars, r.where)
               for r in rendered]
    res2 = ev.evaluate_hellaswag(model, cropped, device="cpu", batch_size=3, show_progress=False)
    assert res2["completion"] == res["completion"] and res2["harness"] == res["harness"]
    assert res2["cropped"] == 0


def test_an_ending_longer_than_the_context_is_a_clear_error(make_gptlab):
    model = make_gptlab(seed=5, seq_len=8)
    items = [item("a b", ["one two three four five six seven eight nine ten eleven", "b", "c", "d"], 0)]
    with pytest.raises(UserError, match="does not fit the model's context of 8"):
        ev.evaluate_hellaswag(model, items, device="cpu", show_progress=False)


def test_train_mode_is_restored_and_wrappers_are_unwrapped(make_gptlab):
    model = make_gptlab(seed=6)
    items = some_items(5, seed=6)
    want = ev.evaluate_hellaswag(model, items, device="cpu", show_progress=False)
    model.train()
    model.transformer.h[0].eval()  # a mixed state must come back as it was
    compiled = torch.compile(model)  # never run: evaluation uses the raw module
    got = ev.evaluate_hellaswag(compiled, items, device="cpu", show_progress=False)
    assert got == want
    assert model.training and not model.transformer.h[0].training and model.transformer.h[1].training


def test_limit_and_autocast_factory(make_gptlab):
    model = make_gptlab(seed=7)
    items = some_items(9, seed=7)
    calls = []

    def autocast():
        calls.append(1)
        return torch.autocast("cpu", enabled=False)

    res = ev.evaluate_hellaswag(model, items, device="cpu", limit=4, batch_size=2, autocast=autocast,
                                show_progress=False, share_context=False)
    assert res["completion"]["n"] == res["harness"]["n"] == 4
    assert len(calls) == 2  # whole rows: 2 batches of 2 items
    calls.clear()
    shared = ev.evaluate_hellaswag(model, items, device="cpu", limit=4, batch_size=2, autocast=autocast,
                                   show_progress=False)
    assert shared == res
    # shared contexts: each batch of packed rows entered once
    rows, cropped = ev._crop_items(ev.render_hellaswag(items[:4]), 64)
    assert len(calls) == len(ev._plan_hellaswag(rows, [True] * 4, 2)) >= 2


# ----------------------------------------------------------------------------- shared contexts

def test_shared_contexts_equal_whole_rows_within_1e5(make_gptlab):
    """The faster path (each context once, endings from its keys/values) against the former one
    (8 whole rows an item): every row's log-likelihood within 1e-5, and the same accuracies."""
    model = make_gptlab(seed=11, noise=0.3)
    items = some_items(40, seed=11)
    items.append(item("", ["a", "b", "c d", "e"], 2))  # an empty context conditions on end-of-text
    rendered = ev.render_hellaswag(items)
    rows, cropped = ev._crop_items(rendered, model.config.seq_len)
    assert not any(cropped)
    old = ev.hellaswag_row_scores(model, rendered, rows, [False] * len(rows), device="cpu", batch_size=5)
    new = ev.hellaswag_row_scores(model, rendered, rows, [True] * len(rows), device="cpu", batch_size=5)
    assert old.abs().min() > 1.0  # real log-likelihoods, not an untouched table
    # per-token log-probabilities in float32, summed in float64: the bound, 1e-5, absolute
    assert new.dtype == torch.float64
    torch.testing.assert_close(new, old, rtol=0, atol=1e-5)
    for bs in (1, 3, 16):
        assert ev.evaluate_hellaswag(model, rendered, device="cpu", batch_size=bs, show_progress=False) == \
            ev.evaluate_hellaswag(model, rendered, device="cpu", batch_size=bs, show_progress=False,
                                  share_context=False)


@pytest.mark.parametrize("pack_tokens", [1024, 9])
def test_score_shared_equals_the_full_forward_with_greedy_flags(make_gptlab, monkeypatch, pack_tokens):
    """Continuations of length 1 and more after contexts of different lengths, packed into rows
    of different lengths (and, with pack_tokens 9, groups cut into several rows), against
    log_softmax of the full forward over context + continuation; greedy flags against the argmax."""
    monkeypatch.setattr(scoring, "PACK_TOKENS", pack_tokens)
    model = make_gptlab(seed=12, noise=0.3)
    g = torch.Generator().manual_seed(12)
    groups = [scoring.ContextGroup(tuple(torch.randint(0, 1000, (n_ctx,), generator=g).tolist()),
                              tuple(tuple(torch.randint(0, 1000, (n,), generator=g).tolist()) for n in ns))
              for n_ctx, ns in ((7, (1, 3, 5)), (2, (2,)), (5, (4, 1)), (1, (6, 6, 2, 3)))]
    # make one continuation the model's own greedy choice, so a True flag is exercised
    with torch.no_grad():
        ctx = list(groups[1].context)
        greedy_cont = []
        for _ in range(3):
            greedy_cont.append(int(model(torch.tensor([ctx + greedy_cont]))[0][0, -1].argmax()))
        groups[1] = scoring.ContextGroup(groups[1].context, groups[1].continuations + (tuple(greedy_cont),))
        sums, hits = scoring.score_shared(model, groups, "cpu", greedy=True)
        r = 0
        for grp in groups:
            for cont in grp.continuations:
                ids = list(grp.context) + list(cont)
                logp = model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)  # (T, V)
                pos = range(len(grp.context) - 1, len(ids) - 1)
                want = sum(logp[p, ids[p + 1]].item() for p in pos)
                assert sums[r].item() == pytest.approx(want, abs=1e-5)
                assert bool(hits[r]) == all(int(logp[p].argmax()) == ids[p + 1] for p in pos)
                r += 1
    assert hits.tolist().count(True) >= 1 and hits.tolist().count(False) >= 1


def test_plan_sorts_by_packed_length_and_bounds_rows():
    groups = [scoring.ContextGroup(tuple(range(n)), ((1, 2),) * k) for n, k in ((3, 4), (5, 4), (3, 4), (3, 9), (5, 1))]
    plan = scoring.plan_shared_batches(groups, max_rows=8)
    assert sorted(g for b in plan for g in b) == list(range(5))
    order = [g for b in plan for g in b]
    assert [groups[g].packed_len for g in order] == sorted(g.packed_len for g in groups)
    for b in plan:
        assert sum(len(groups[g].continuations) for g in b) <= 8 or len(b) == 1


def test_packed_rows_keep_continuations_apart():
    """The mask of one packed row (context of 2, continuations of 3 and 2 inputs, one pad): each
    continuation sees the context and itself causally, never the other; the pad sees token 0."""
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 2, -1]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 0]])
    mask = scoring.PackedRows(pos, seg).attn_mask[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
    ]


# ----------------------------------------------------------------------------- files

def test_load_reports_malformed_lines_with_their_number(tmp_path):
    good = json.dumps(item("a", ["b", "c", "d", "e"], 1))
    p = tmp_path / "bad.jsonl"
    p.write_text(good + "\n\n" + good + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:4: not valid JSON"):
        ev.load_hellaswag(p)
    assert len(ev.load_hellaswag(p, limit=2)) == 2  # stops before the bad line
    no_label = dict(json.loads(good))
    del no_label["label"]
    p.write_text(good + "\n" + json.dumps(no_label) + "\n")
    with pytest.raises(UserError, match=r":2: missing field label \(HellaSwag's test split has no labels\)"):
        ev.load_hellaswag(p)
    p.write_text(json.dumps(item("a", ["b", "c"], 0)) + "\n")
    with pytest.raises(UserError, match=":1: endings must be a list of 4 strings"):
        ev.load_hellaswag(p)
    p.write_text(json.dumps(item("a", ["b", "c", "d", "e"], 4)) + "\n")
    with pytest.raises(UserError, match=":1: label must be 0, 1, 2 or 3"):
        ev.load_hellaswag(p)
    p.write_text(json.dumps({**item("a", ["b", "c", "d", "e"], "2")}) + "\n")
    assert ev.load_hellaswag(p)[0].label == 2  # the Hugging Face copy's string labels
    p.write_text("")
    with pytest.raises(UserError, match="no HellaSwag items"):
        ev.load_hellaswag(p)


def test_a_file_is_tokenized_once_until_it_changes(tmp_path):
    p = write_jsonl(tmp_path / "hs.jsonl", some_items(3))
    model = Unigram(torch.zeros(V))
    ev._rendered_file.cache_clear()
    assert ev.evaluate_hellaswag(model, p, device="cpu", show_progress=False)["completion"]["n"] == 3
    ev.evaluate_hellaswag(model, str(p), device="cpu", show_progress=False)
    assert ev._rendered_file.cache_info().hits == 1
    write_jsonl(p, some_items(5))  # a changed file is read again
    assert ev.evaluate_hellaswag(model, p, device="cpu", show_progress=False)["completion"]["n"] == 5


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such HellaSwag file"):
        ev.find_hellaswag(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="no such HellaSwag file"):
        ev.evaluate_hellaswag(torch.nn.Linear(1, 1), tmp_path / "nope.jsonl", device="cpu")
    with pytest.raises(UserError, match="not in the cache"):
        ev.find_hellaswag(cache_dir=tmp_path, download=False)
    with pytest.raises(UserError, match="unknown HellaSwag split"):
        ev.find_hellaswag(cache_dir=tmp_path, split="dev")


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A local HTTP server over tmp_path/www; yields its root, base URL and a list of paths whose
    next GET fails once with HTTP 503 (each entry is used up by one failure). Downloads are
    retried quickly here."""
    monkeypatch.setenv("GPTLAB_STREAM_RETRIES", "2")
    monkeypatch.setenv("GPTLAB_STREAM_BACKOFF", "0.01")
    root = tmp_path / "www"
    root.mkdir()
    fail_once: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path in fail_once:
                fail_once.remove(self.path)
                self.send_error(503)
                return
            super().do_GET()

        def log_message(self, *a, **k):
            pass
    handler = functools.partial(Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", fail_once
    finally:
        server.shutdown()
        server.server_close()


def test_download_checks_sha256_and_caches(tmp_path, http_server, monkeypatch):
    root, base, _ = http_server
    write_jsonl(root / "hellaswag_val.jsonl", some_items(3))
    digest = hashlib.sha256((root / "hellaswag_val.jsonl").read_bytes()).hexdigest()
    url = base + "/hellaswag_{split}.jsonl"
    cache = tmp_path / "cache"

    # the pinned hash of the real file does not match this one: refused, and nothing is cached
    with pytest.raises(UserError, match="sha256"):
        ev.find_hellaswag(cache_dir=cache, url=url, show_progress=False)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # not even a temporary

    got = ev.find_hellaswag(cache_dir=cache, url=url, expected_sha256=digest, show_progress=False)
    assert got == cache / "hellaswag" / "hellaswag_val.jsonl"
    assert got.read_bytes() == (root / "hellaswag_val.jsonl").read_bytes()
    (root / "hellaswag_val.jsonl").unlink()  # the cached copy is used from now on
    assert ev.find_hellaswag(cache_dir=cache, url=url, expected_sha256=digest, download=False) == got

    # GPTLAB_CACHE and GPTLAB_HELLASWAG_URL are the defaults for cache_dir and url
    write_jsonl(root / "hellaswag_train.jsonl", some_items(2))
    digest = hashlib.sha256((root / "hellaswag_train.jsonl").read_bytes()).hexdigest()
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setenv("GPTLAB_HELLASWAG_URL", url)
    got = ev.find_hellaswag(split="train", expected_sha256=digest, show_progress=False)
    assert got == tmp_path / "envcache" / "hellaswag" / "hellaswag_train.jsonl"

    with pytest.raises(UserError, match="cannot download"):
        ev.find_hellaswag(cache_dir=cache, split="test", url=url, show_progress=False)  # 404


def test_a_download_that_fails_once_is_retried(tmp_path, http_server):
    """Downloads go through the retrying HTTP layer (they were fetched once, without retries)."""
    root, base, fail_once = http_server
    write_jsonl(root / "hellaswag_val.jsonl", some_items(3))
    digest = hashlib.sha256((root / "hellaswag_val.jsonl").read_bytes()).hexdigest()
    fail_once.append("/hellaswag_val.jsonl")
    got = ev.find_hellaswag(cache_dir=tmp_path / "c", url=base + "/hellaswag_{split}.jsonl",
                            expected_sha256=digest, show_progress=False)
    assert got.read_bytes() == (root / "hellaswag_val.jsonl").read_bytes() and not fail_once
    assert [p.name for p in (tmp_path / "c").rglob("*") if p.is_file()] == ["hellaswag_val.jsonl"]
    fail_once += ["/hellaswag_train.jsonl"] * 2  # as often as the 2 attempts allowed: one clear error
    with pytest.raises(UserError, match=r"cannot download .*HTTP 503.*gave up after 2 attempts"):
        ev.find_hellaswag(cache_dir=tmp_path / "c", split="train", url=base + "/hellaswag_{split}.jsonl",
                          show_progress=False)
    assert [p.name for p in (tmp_path / "c").rglob("*") if p.is_file()] == ["hellaswag_val.jsonl"]  # no temporary


def test_pinned_hashes_are_well_formed():
    """Every split has its own pin: 64 lowercase hex digits (what hashlib's hexdigest compares
    against), and a size; the val pin is the published file's."""
    import re

    pins = [ev.HELLASWAG_SHA256[split] for split in ev.HELLASWAG_SPLITS]
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in pins), pins
    assert len(set(pins)) == len(pins)
    assert set(ev.HELLASWAG_BYTES) == set(ev.HELLASWAG_SPLITS) and all(n > 10**7 for n in ev.HELLASWAG_BYTES.values())
    assert ev.HELLASWAG_SHA256["val"].startswith("0aa3b888")
