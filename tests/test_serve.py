"""gptlab serve: the official openai client against a live server on 127.0.0.1, dynamic batching
(greedy text equal to `gptlab sample --temperature 0`, alone or batched), streaming, bad inputs,
the API key, faults, and the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from conftest import post_json, random_gptlab, run_gptlab, serve_in_background  # noqa: E402
from gptlab.checkpoint import save_model  # noqa: E402
from gptlab.generate import generate_ids  # noqa: E402
from gptlab.serve_engine import Engine, SamplingParams, Sequence, TextState  # noqa: E402
from gptlab.tokenizer import get_tokenizer  # noqa: E402

PROMPTS = ["Hello world", "The cat", "Once upon a time", "", "x", "1 2 3 4 5", "Über naïve café",
           "<|endoftext|>The", "A much longer prompt, with some punctuation; and more words to chew on."]
MAX_NEW = 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model, noisy enough that greedy text differs from prompt to prompt."""
    path = tmp_path_factory.mktemp("serve") / "tiny-serve"
    save_model(random_gptlab(seed=1, noise=0.2), path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """{prompt: text} from `gptlab sample --temperature 0`, the command line users already trust."""
    args = ["sample", str(model_dir), "--temperature", "0", "--device", "cpu", "--max-new-tokens", str(MAX_NEW),
            "--json", *[f"--prompt={p}" for p in PROMPTS]]
    out = run_gptlab(*args, timeout=120)
    assert out.returncode == 0, out.stderr
    samples = json.loads(out.stdout)["samples"]
    assert [s["prompt"] for s in samples] == PROMPTS
    return {s["prompt"]: s["text"] for s in samples}


@pytest.fixture(scope="module")
def server(model_dir):
    bg = serve_in_background(model_dir, max_tokens_cap=48, max_n=4, max_body_bytes=64 * 1024)
    with bg as url:
        yield bg, url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


# ----------------------------------------------------------------------------- the openai client
def test_plain_completion_equals_cli_sample(client, reference):
    tok = get_tokenizer()
    for prompt in ["Hello world", "Über naïve café"]:
        r = client.completions.create(model="tiny-serve", prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        assert r.object == "text_completion" and len(r.choices) == 1
        assert r.choices[0].text == reference[prompt]
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(tok.encode(prompt))
        assert r.usage.completion_tokens == MAX_NEW
        assert r.usage.total_tokens == r.usage.prompt_tokens + MAX_NEW


def test_streaming_equals_plain_and_ends_with_done(client, server, reference):
    chunks = list(client.completions.create(model="m", prompt="The cat", max_tokens=MAX_NEW, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference["The cat"]
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # the raw event stream: one `data:` line per event, the last one [DONE]
    req = urllib.request.Request(server[1] + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "x", "max_tokens": 5, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_list_of_prompts_echo_and_token_ids(client, reference):
    prompts = ["Hello world", "The cat", "Once upon a time"]
    r = client.completions.create(model="m", prompt=prompts, max_tokens=MAX_NEW, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [reference[p] for p in prompts]
    r = client.completions.create(model="m", prompt="The cat", max_tokens=MAX_NEW, temperature=0, echo=True)
    assert r.choices[0].text == "The cat" + reference["The cat"]
    ids = get_tokenizer().encode("Hello world")
    r = client.completions.create(model="m", prompt=ids, max_tokens=MAX_NEW, temperature=0)
    assert r.choices[0].text == reference["Hello world"]


def test_n_choices_seeded(client):
    kw = dict(model="m", prompt=["Hello world", "The cat"], max_tokens=12, temperature=1.0, n=3, seed=11)
    a = client.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    texts = [c.text for c in a.choices]
    assert len(set(texts)) == 6  # each choice is its own draw
    assert a.usage.completion_tokens == 6 * 12
    b = client.completions.create(**kw)
    assert [c.text for c in b.choices] == texts  # a seed reproduces them
    c = client.completions.create(**{**kw, "seed": 12})
    assert [x.text for x in c.choices] != texts
    streamed = ["", "", "", "", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    assert streamed == texts


def test_stop_strings(client, reference):
    full = reference["Hello world"]
    stop = full[7:10]
    cut = full[: full.find(stop)]
    r = client.completions.create(model="m", prompt="Hello world", max_tokens=MAX_NEW, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="m", prompt="Hello world", max_tokens=MAX_NEW, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-serve"]
    with urllib.request.urlopen(server[1] + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


# ----------------------------------------------------------------------------- batching
def test_many_concurrent_clients_each_get_their_own_answer(server, reference):
    bg, url = server
    bg.engine.max_seen_batch = 0
    jobs = [(PROMPTS[i % len(PROMPTS)], i % 3 == 0) for i in range(24)]

    def one(job):
        prompt, stream = job
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        if stream:
            parts = c.completions.create(model="m", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True)
            return "".join(p.choices[0].text for p in parts)
        return c.completions.create(model="m", prompt=prompt, max_tokens=MAX_NEW, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    assert got == [reference[p] for p, _ in jobs]
    assert bg.engine.max_seen_batch > 1  # they really shared decode steps


def test_engine_joins_at_step_boundary_with_rows_of_different_lengths():
    """A sequence that arrives while another decodes joins its batch; both equal `generate`."""
    model = random_gptlab(seed=2, noise=0.2)
    tok = get_tokenizer()
    engine = Engine(model, tok, max_batch=4)
    try:
        a_ids, b_ids = tok.encode("A long first prompt that is decoding already"), tok.encode("Hi")
        got_a, got_b = threading.Event(), threading.Event()
        a_three = threading.Event()
        a = Sequence(a_ids, SamplingParams(max_tokens=50, temperature=0),
                     lambda ev: (len(a.tokens) >= 3 and a_three.set(), ev[0] == "end" and got_a.set()))
        b = Sequence(b_ids, SamplingParams(max_tokens=12, temperature=0), lambda ev: ev[0] == "end" and got_b.set())
        engine.submit([a])
        assert a_three.wait(30)
        engine.submit([b])
        assert got_a.wait(60) and got_b.wait(60)
        assert engine.max_seen_batch == 2
        assert a.tokens == generate_ids(model, a_ids, temperature=0, max_new_tokens=50)[0]
        assert b.tokens == generate_ids(model, b_ids, temperature=0, max_new_tokens=12)[0]
    finally:
        engine.close()


def test_event_loop_is_not_blocked_by_decoding(model_dir):
    bg = serve_in_background(model_dir)
    hidden = bg.engine.model.hidden

    def slow_hidden(*a, **k):  # every model step takes 0.3 s (in the worker thread): 3.6 s a request
        time.sleep(0.3)
        return hidden(*a, **k)

    bg.engine.model.hidden = slow_hidden
    with bg as url:
        t = threading.Thread(target=post_json, args=(url + "/v1/completions", {"prompt": "x", "max_tokens": 12}))
        t.start()
        time.sleep(0.5)
        assert bg.engine.active  # the request is decoding now
        t0 = time.perf_counter()
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200
        assert time.perf_counter() - t0 < 1.0  # a loop that ran the model would answer seconds later
        t.join()


def test_a_client_that_leaves_frees_its_rows(model_dir):
    bg = serve_in_background(model_dir)
    hidden = bg.engine.model.hidden

    def slow_hidden(*a, **k):
        time.sleep(0.1)
        return hidden(*a, **k)

    bg.engine.model.hidden = slow_hidden
    with bg as url:
        host, port = url[len("http://"):].split(":")
        for stream in (False, True):
            body = json.dumps({"prompt": "x", "max_tokens": 40, "stream": stream}).encode()
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                deadline = time.monotonic() + 10
                while not bg.engine.active and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert bg.engine.active
            # 40 steps would take 4 s; the rows go within about a second of the client leaving
            t0 = time.monotonic()
            while bg.engine.active and time.monotonic() - t0 < 3:
                time.sleep(0.02)
            assert not bg.engine.active, f"stream={stream}: still decoding for a client that left"


# ----------------------------------------------------------------------------- streaming text
def test_text_state_never_splits_characters_or_leaks_stop_prefixes():
    data = "a𝄞b漢é".encode()
    for cut in range(1, len(data)):
        ts = TextState(())
        parts = [ts.feed(data[:cut])[0], ts.feed(data[cut:])[0], ts.feed(b"", final=True)[0]]
        assert "".join(parts) == "a𝄞b漢é" and "\ufffd" not in "".join(parts)
    ts = TextState(("STOP",))
    assert ts.feed(b"abc ST") == ("abc ", False)  # "ST" may begin STOP: held back
    assert ts.feed(b"O") == ("", False)
    assert ts.feed(b"Px") == ("", True)  # found: nothing after it is sent
    assert ts.text == "abc "
    ts = TextState(("STOP",))
    assert ts.feed(b"ST") == ("", False)
    assert ts.feed(b"ay") == ("STay", False)  # not a stop string after all


def test_streamed_utf8_characters_are_never_split(model_dir):
    """Force the model to emit the byte-level tokens of 4-byte characters; every event is whole text."""
    tok = get_tokenizer()
    script = tok.encode("a𝄞b𝄞漢")
    assert any("\ufffd" in tok.decode([t]) for t in script)  # some tokens are partial characters
    bg = serve_in_background(model_dir)
    logits, step = bg.engine.model.logits, iter(script)

    def scripted(h):
        out = logits(h)
        forced = torch.full_like(out, -1e9)
        forced[..., next(step)] = 0.0
        return forced

    bg.engine.model.logits = scripted
    with bg as url:
        req = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "x", "max_tokens": len(script), "stream": True,
                                                      "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            events = [e[6:] for e in r.read().decode("utf-8").split("\n\n") if e]
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == "a𝄞b𝄞漢"
    assert len(texts) == len(script) + 1  # a chunk per token, then the finish_reason
    assert not any("\ufffd" in t for t in texts)


# ----------------------------------------------------------------------------- errors
def assert_openai_error(status: int, body, want_status: int, param: str | None = None) -> dict:
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    text = json.dumps(body)
    assert "Traceback" not in text and "File \"" not in text and "/tmp" not in text and ".py" not in text
    return err


@pytest.mark.parametrize("body, param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", 3]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "a", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_k": "many"}, "top_k"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stop": [1]}, "stop"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": [99999999]}, "prompt"),
    ({"prompt": "a", "logprobs": 2}, "logprobs"),
])
def test_bad_inputs_get_400_in_openai_shape(server, body, param):
    status, got = post_json(server[1] + "/v1/completions", body)
    assert_openai_error(status, got, 400, param)


def test_caps_context_json_and_body_size(server, client):
    url = server[1] + "/v1/completions"
    err = assert_openai_error(*post_json(url, {"prompt": "a", "max_tokens": 49}), 400, "max_tokens")
    assert "48" in err["message"]  # names the cap
    err = assert_openai_error(*post_json(url, {"prompt": "a", "n": 5}), 400, "n")
    assert "4" in err["message"]
    long_prompt = " word" * 50  # 50 tokens + 20 new > context 64: over by 6
    err = assert_openai_error(*post_json(url, {"prompt": long_prompt, "max_tokens": 20}), 400, "prompt")
    assert err["code"] == "context_length_exceeded" and "by 6" in err["message"]
    assert_openai_error(*post_json(url, None, raw=b'{"prompt": "a",'), 400)
    assert_openai_error(*post_json(url, None, raw=b'["a list"]'), 400)
    assert_openai_error(*post_json(url, None, raw=b"\xff\xfe"), 400)
    assert_openai_error(*post_json(url, {"prompt": "a" * 70_000}), 413)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="a", temperature=-1)
    status, body = post_json(server[1] + "/no/such/path", {})
    assert_openai_error(status, body, 404)
    # the server still answers afterwards
    assert client.completions.create(model="m", prompt="a", max_tokens=2).usage.completion_tokens == 2


def test_api_key(model_dir):
    with serve_in_background(model_dir, api_key="s3cret") as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="m", prompt="a", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        status, body = post_json(url + "/v1/completions", {"prompt": "a"})
        assert_openai_error(status, body, 401)
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="m", prompt="a", max_tokens=2).usage.completion_tokens == 2
        with urllib.request.urlopen(url + "/health", timeout=10) as r:  # health and the page stay open
            assert r.status == 200


def test_a_fault_is_a_500_and_the_server_keeps_serving(model_dir, caplog):
    bg = serve_in_background(model_dir)
    hidden, calls = bg.engine.model.hidden, []

    def faulty(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # fail in the middle of a decode
            raise RuntimeError("simulated fault in /some/secret/path.py")
        return hidden(*a, **k)

    bg.engine.model.hidden = faulty
    with bg as url:
        status, body = post_json(url + "/v1/completions", {"prompt": "x", "max_tokens": 8})
        err = assert_openai_error(status, body, 500)
        assert "secret" not in err["message"]
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert c.completions.create(model="m", prompt="x", max_tokens=8).usage.completion_tokens == 8
        chunks = list(c.completions.create(model="m", prompt="y", max_tokens=4, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"


def test_playground_page_is_self_contained(server):
    with urllib.request.urlopen(server[1] + "/", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/html")
        page = r.read().decode()
    for needed in ('id="prompt"', 'id="generate"', 'id="stop"', 'id="max_tokens"', 'id="temperature"',
                   'id="top_k"', 'id="top_p"', 'id="seed"', "tokens/s"):
        assert needed in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing from elsewhere
    assert "@import" not in page


# ----------------------------------------------------------------------------- the command line
def test_cli_serve_binds_loopback_and_serves(model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(model_dir), "--port", "0",
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        deadline = time.monotonic() + 90
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "gptlab serve exited early"
            m = re.search(r"on (http://[\d.]+:\d+)", line)
            url = m and m.group(1)
        assert url and url.startswith("http://127.0.0.1:")
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny-serve"]
        assert c.completions.create(model="tiny-serve", prompt="a", max_tokens=3).usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode in (0, 130)


def test_cli_serve_port_taken_is_one_line_exit_2(gptlab_cli, model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = gptlab_cli("serve", model_dir, "--port", port, "--device", "cpu")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "cannot listen" in r.stderr and "Traceback" not in r.stderr
