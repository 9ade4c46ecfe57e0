"""gptlab prepare chat: conversations -> one chat template -> token shards with loss masks."""

import json

import numpy as np
import pytest

from conftest import CHAT_CONVERSATIONS as CONVS
from conftest import write_chat_jsonl as write_jsonl
from gptlab import chat
from gptlab.data import shards as sh
from gptlab.data.prepare_chat import prepare_chat
from gptlab.tokenizer import get_tokenizer



def test_template_ids_and_mask():
    tok = get_tokenizer()
    ids, mask = chat.render(tok, CONVS[1])
    enc = tok.encode
    want = [50256, 50258, *enc("Two plus two?"), 50260, 50259, *enc("Four."), 50260,
            50258, *enc("And three?"), 50260, 50259, *enc("Five, well, six."), 50260]
    assert ids == want
    # only the assistant contents and their <|end|> are trained on
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == [*enc("Four."), 50260, *enc("Five, well, six."), 50260]
    prompt, _ = chat.render(tok, CONVS[1][:1], add_generation_prompt=True)
    assert prompt == [50256, 50258, *enc("Two plus two?"), 50260, 50259]
    assert chat.chat_format(tok).vocab_size == 50261


def test_prepare_chat_writes_llmc_shards_and_masks(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", CONVS * 4)
    r = prepare_chat([src], tmp_path / "out")
    assert r["status"] == "prepared" and r["documents"] == 12
    ds = sh.open_dataset(tmp_path / "out")
    assert ds.chat["template"] == "gptlab-chat-v1" and ds.chat["special_tokens"]["<|end|>"] == 50260
    tok = get_tokenizer()
    stream, masks = [], []
    for s in ds.split("val") + ds.split("train"):
        raw = s.path.read_bytes()  # the token shard is an llm.c shard: magic, version 1, uint16 tokens
        assert list(np.frombuffer(raw[:12], "<i4")) == [20240520, 1, s.tokens]
        assert s.mask.name == s.path.name.replace(".bin", ".mask")
        stream += sh.read_tokens(s.path).tolist()
        masks += np.array(sh.open_checked_mask(s)).tolist()
    want_ids, want_mask = [], []
    for m in CONVS * 4:
        i, k = chat.render(tok, m)
        want_ids += i
        want_mask += k
    assert stream == want_ids and masks == want_mask
    assert sh.verify_dataset(tmp_path / "out", progress=False)["hashed"]
    assert prepare_chat([src], tmp_path / "out")["status"] == "done"  # the same files again: nothing to do


@pytest.mark.parametrize("messages, says", [
    ([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "message 1 (user) has empty content"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([], "non-empty list"),
])
def test_malformed_conversation_is_one_line_naming_file_and_line(tmp_path, cli, messages, says):
    src = write_jsonl(tmp_path / "c.jsonl", CONVS[:1])
    with open(src, "a") as f:
        f.write(json.dumps({"messages": messages}) + "\n")
    r = cli("prepare", "chat", src, "--out", tmp_path / "out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{src}:2:" in lines[0] and says in lines[0], r.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_prepare_chat_cli_and_data_info(tmp_path, cli):
    src = write_jsonl(tmp_path / "c.jsonl", CONVS * 3)
    r = cli("prepare", "chat", src, "--out", tmp_path / "out")
    assert r.returncode == 0 and "9 conversations" in r.stdout, r.stderr
    r = cli("data", "info", tmp_path / "out")
    assert "chat: 9 conversations with loss masks" in r.stdout
    (tmp_path / "out" / "chat_train_000001.mask").write_bytes(b"junk")
    r = cli("data", "verify", tmp_path / "out")
    assert r.returncode == 2 and "mask" in r.stderr


def test_a_chat_dataset_is_not_streamed(tmp_path):
    """Its masks are not streamed: training from a URL would train on every token, so it is refused."""
    from shard_server import ShardServer

    from gptlab.data import stream
    from gptlab.errors import UserError

    prepare_chat([write_jsonl(tmp_path / "c.jsonl", CONVS * 4)], tmp_path / "www" / "chat")
    srv = ShardServer(tmp_path / "www")
    try:
        for call in (lambda: stream.open_stream(srv.url + "/chat", cache=tmp_path / "cache", budget="1GB"),
                     lambda: stream.val_split(srv.url + "/chat")):
            with pytest.raises(UserError, match="chat dataset .* local directory only"):
                call()
    finally:
        srv.stop()
