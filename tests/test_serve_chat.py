"""/v1/chat/completions with the official openai client: plain, streaming, n with a seed, stop
strings, concurrent clients, the end-of-turn token, OpenAI-shaped errors, a base model refused."""

from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from conftest import chat_test_model, post_json, random_gptlab, serve_in_background  # noqa: E402
from gptlab import chat  # noqa: E402
from gptlab.checkpoint import save_model  # noqa: E402
from gptlab.generate import generate_ids  # noqa: E402
from gptlab.tokenizer import get_tokenizer  # noqa: E402

MAX_NEW = 16
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}],
    [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And three?"}],
    [{"role": "user", "content": "Über naïve café"}],
    [{"role": "user", "content": "x"}],
    [{"role": "user", "content": "Once upon a time"}],
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    model = chat_test_model(seed=5)
    path = tmp_path_factory.mktemp("serve-chat") / "chat-model"
    save_model(model, path)
    return model, path


def reference(model, messages):
    """(reply text, whether it ended at <|end|>) by greedy gptlab generation."""
    tok = get_tokenizer()
    prompt, _ = chat.render(tok, messages, add_generation_prompt=True)
    ids = generate_ids(model, prompt, max_new_tokens=MAX_NEW, temperature=0.0, stop_token=50260)[0]
    return chat.decode_reply(tok, ids), ids[-1] == 50260


@pytest.fixture(scope="module")
def server(chat_model):
    with serve_in_background(chat_model[1], max_tokens_cap=48, max_n=4) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_plain_reply_equals_gptlab_greedy_and_ends_at_end_of_turn(client, chat_model):
    ended = 0
    for messages in CONVERSATIONS:
        want, stopped = reference(chat_model[0], messages)
        r = client.chat.completions.create(model="chat-model", messages=messages, max_tokens=MAX_NEW, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == ("stop" if stopped else "length")
        ended += stopped
    assert ended >= 1  # some reply did end at <|end|>


def test_streaming_equals_plain(client, chat_model):
    messages = CONVERSATIONS[2]
    want, _ = reference(chat_model[0], messages)
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_NEW, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_n_seed_top_p_and_stop(client):
    kw = dict(model="m", messages=CONVERSATIONS[0], max_tokens=MAX_NEW, temperature=1.0, top_p=0.9, n=3, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert len(a.choices) == 3 and [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    text = a.choices[0].message.content
    if len(text) > 3:  # a stop string cuts the reply before it
        cut = client.chat.completions.create(**{**kw, "n": 1, "stop": [text[2:4]]})
        assert cut.choices[0].message.content == text[:text.index(text[2:4])]


def test_concurrent_clients_each_get_their_own_reply(server, chat_model):
    def one(messages):
        c = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="m", messages=messages, max_tokens=MAX_NEW, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
        got = list(pool.map(one, CONVERSATIONS * 2))
    assert got == [reference(chat_model[0], m)[0] for m in CONVERSATIONS * 2]


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
])
def test_bad_requests_get_openai_errors(server, body, param):
    status, err = post_json(server + "/v1/chat/completions", body)
    assert status == 400 and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"


def test_base_model_is_refused_in_one_line(tmp_path):
    save_model(random_gptlab(seed=1), tmp_path / "base")
    with serve_in_background(tmp_path / "base") as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="m", messages=CONVERSATIONS[0])
        msg = e.value.body["message"]
        assert "no chat template" in msg and "gptlab prepare chat" in msg and "\n" not in msg
        assert c.completions.create(model="m", prompt="Hi", max_tokens=2).choices[0].text is not None
