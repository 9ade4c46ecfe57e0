"""gptlab chat MODEL: a terminal chat that keeps the history; replies equal gptlab's generation."""

import io

import pytest
import torch

from conftest import random_gptlab
from gptlab import chat
from gptlab.chat_repl import fit_history
from gptlab.checkpoint import save_model
from gptlab.generate import generate_ids
from gptlab.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    model = random_gptlab(seed=5, noise=0.3, vocab_size=50261, chat=chat.TEMPLATE)
    with torch.no_grad():
        model.lm_head.weight[50260] += 2.0 * model.transformer.ln_f.weight
    path = tmp_path_factory.mktemp("repl") / "chat-model"
    save_model(model, path)
    return model, path


def greedy(model, messages, n):
    tok = get_tokenizer()
    prompt = fit_history(tok, messages, model.config.seq_len, n)
    return chat.decode_reply(tok, generate_ids(model, prompt, temperature=0, max_new_tokens=n, stop_token=50260)[0])


def test_two_turns_with_history(chat_model, cli, monkeypatch):
    model, path = chat_model
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nTell me more\n/reset\nHello\n"))
    r = cli("chat", path, "--temperature", "0", "--max-new-tokens", "8", "--system", "Be brief.", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    first = greedy(model, messages, 8)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more"}]
    second = greedy(model, messages, 8)
    # after /reset the history is the system message again: the first reply once more
    assert r.stdout == f"assistant> {first}\nassistant> {second}\nassistant> {first}\n"


def test_the_oldest_turns_go_when_the_context_is_full():
    tok = get_tokenizer()
    messages = [{"role": "system", "content": "S"}]
    for i in range(30):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last"})
    ids = fit_history(tok, messages, 64, 16)
    assert len(ids) + 16 <= 65
    assert ids[:3] == [50256, 50257, *tok.encode("S")]  # the system message stays
    assert tok.decode([i for i in ids if i < 50257]).endswith("last")


def test_a_base_model_is_refused_in_one_line(cli, gptlab_model_dir):
    r = cli("chat", gptlab_model_dir, "--device", "cpu")
    assert r.returncode == 2 and "no chat template" in r.stderr and len(r.stderr.strip().splitlines()) == 1
