"""The playground in a real browser: Debian's chromium driven by Playwright, against a live server
on 127.0.0.1. Skipped where chromium or Playwright is missing, except under CI (CI=true), where
that is a failure: `make test` installs chromium."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from conftest import chat_test_model, random_gptlab, serve_in_background
from gptlab.checkpoint import save_model

CHROMIUM = "/usr/bin/chromium"
UNDER_CI = os.environ.get("CI", "").lower() == "true"


def need(ok: bool, why: str) -> None:
    if not ok:
        if UNDER_CI:
            pytest.fail(f"{why}; under CI the browser test must run (make test installs chromium)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    need(sync_playwright is not None, "playwright is not installed")
    need(Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing (apt-get install -y chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic", "--disable-default-apps",
            "--disable-extensions", "--metrics-recording-only"]
    with sync_playwright() as p:
        # a fresh profile directory (Playwright passes it as --user-data-dir)
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=args)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def slow_server(tmp_path):
    """A tiny model served with every decode step slowed to 60 ms, so streaming is visible."""
    save_model(random_gptlab(seed=1, noise=0.2), tmp_path / "tiny")
    bg = serve_in_background(tmp_path / "tiny", step_delay=0.06)
    with bg as url:
        yield url, bg.engine


def test_playground_streams_text_and_stops(browser, slow_server):
    from gptlab.generate import generate_ids
    from gptlab.tokenizer import get_tokenizer

    url, engine = slow_server
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    page.fill("#prompt", "Hello world")
    page.fill("#max_tokens", "24")
    page.fill("#temperature", "0")
    page.fill("#top_k", "0")
    page.click("#generate")
    # the text grows while the request streams: seen partly done, then finished
    partial = set()
    deadline = time.monotonic() + 60
    while "finished" not in page.inner_text("#stats") and time.monotonic() < deadline:
        partial.add(page.inner_text("#completion"))
        time.sleep(0.05)
    stats = page.inner_text("#stats")
    final = page.inner_text("#completion")
    assert "24 tokens" in stats and "tokens/s" in stats and "finished: length" in stats
    assert len([t for t in partial if t and t != final]) >= 2, partial  # shown as it streamed
    model = engine.model
    with torch.no_grad():
        want = generate_ids(model, get_tokenizer().encode("Hello world"), temperature=0, max_new_tokens=24)[0]
    # innerText may normalise whitespace at the ends; the words are the model's greedy text
    assert final.strip() == get_tokenizer().decode(want).strip() and final.strip()
    assert page.inner_text("#shown-prompt") == "Hello world"
    assert page.inner_text("#error") == ""

    # Stop: the stream is aborted and the server frees the sequence
    page.fill("#max_tokens", "40")
    page.click("#generate")
    page.wait_for_function("document.getElementById('completion').textContent.length > 0")
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_function("document.getElementById('stats').textContent.includes('stopped')")
    deadline = time.monotonic() + 10
    while (engine.active or engine.pending) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.active and not engine.pending
    assert page.is_enabled("#generate")
    page.close()


@pytest.fixture
def slow_chat_server(tmp_path):
    """A tiny chat model (its <|end|> made likely) served with every decode step slowed to 60 ms."""
    model = chat_test_model(seed=5)
    save_model(model, tmp_path / "tiny-chat")
    bg = serve_in_background(tmp_path / "tiny-chat", step_delay=0.06)
    with bg as url:
        yield url, bg.engine, model


def test_chat_view_holds_a_multi_turn_history_streams_and_stops(browser, slow_chat_server):
    from gptlab import chat
    from gptlab.generate import generate_ids
    from gptlab.tokenizer import get_tokenizer

    url, engine, model = slow_chat_server
    tok = get_tokenizer()

    def greedy(messages, n):
        prompt, _ = chat.render(tok, messages, add_generation_prompt=True)
        with torch.no_grad():
            ids = generate_ids(model, prompt, temperature=0, max_new_tokens=n, stop_token=50260)[0]
        return chat.decode_reply(tok, ids)

    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("!document.getElementById('tab-chat').disabled")
    page.click("#tab-chat")
    assert page.is_visible("#message") and not page.is_visible("#prompt")
    page.fill("#max_tokens", "12")
    page.fill("#temperature", "0")
    page.fill("#top_k", "0")
    page.fill("#system", "Be brief.")
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in ("Hello", "Tell me more"):
        page.fill("#message", turn)
        page.click("#send")
        page.wait_for_function("document.getElementById('chat-stats').textContent.includes('finished')", timeout=60_000)
        messages.append({"role": "user", "content": turn})
        reply = greedy(messages, 12)
        messages.append({"role": "assistant", "content": reply})
        texts = page.locator("#history .msg .text").all_inner_texts()
        assert texts[-2] == turn and texts[-1].strip() == reply.strip() and reply.strip()
        assert page.inner_text("#chat-error") == ""
    # the second reply was generated with the whole history: two turns each
    assert page.locator("#history .msg.user").count() == 2 and page.locator("#history .msg.assistant").count() == 2

    # Clear starts a new conversation (the context is 64 tokens)
    page.click("#clear")
    assert page.locator("#history .msg").count() == 0
    # Stop: the stream is aborted and the server frees the sequence; the partial reply stays a turn
    page.fill("#max_tokens", "40")
    page.fill("#system", "")
    # a message whose greedy reply is long enough to be stopped while it streams
    long = next(m for m in ("Go on", "Why?", "And then", "Say more", "Once upon a time", "Hm")
                if len(tok.encode(greedy([{"role": "user", "content": m}], 40))) >= 10)
    page.fill("#message", long)
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('#history .msg').length == 2 && "
                           "document.querySelector('#history .msg:last-child .text').textContent.length > 0")
    page.click("#chat-stop")
    page.wait_for_function("document.getElementById('chat-stats').textContent.includes('stopped')")
    deadline = time.monotonic() + 10
    while (engine.active or engine.pending) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.active and not engine.pending and page.is_enabled("#send")
    assert page.locator("#history .msg").count() == 2 and page.inner_text("#chat-error") == ""
    page.close()


def test_chat_tab_is_off_for_a_base_model(browser, slow_server):
    page = browser.new_page()
    page.goto(slow_server[0] + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    assert page.is_disabled("#tab-chat") and "no chat template" in page.get_attribute("#tab-chat", "title")
    page.close()
