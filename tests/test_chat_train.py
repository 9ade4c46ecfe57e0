"""SFT on a chat dataset: the loss is cross-entropy over the assistant tokens only, one conversation
a row (no attention across conversations), and resume stays exact."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import CHAT_CONVERSATIONS as CONVS
from conftest import random_gptlab, read_metrics, write_chat_jsonl
from gptlab import checkpoint as ck
from gptlab.config import resolve_train_config
from gptlab.data.prepare_chat import prepare_chat
from gptlab.tokenizer import get_tokenizer
from gptlab.train import train

ROLE_ID = {"system": 50257, "user": 50258, "assistant": 50259}
END = 50260


def dataset(tmp_path, convs, name="data", val_fraction=0.0):
    src = write_chat_jsonl(tmp_path / f"{name}.jsonl", convs)
    return prepare_chat([src], tmp_path / name, val_fraction=val_fraction)["directory"]


def pre_model(tmp_path, zero_attention=False):
    model = random_gptlab(seed=2, noise=0.3)
    if zero_attention:  # every position then sees only its own token and position
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.zero_()
                block.attn.c_proj.bias.zero_()
    ck.save_model(model, tmp_path / "pre")
    return model


def sft(data, out, pre, **kw):
    cfg = dict(data=str(data), out=str(out), init_from=str(pre), batch_size=len(CONVS) * 2, seq_len=64,
               total_batch_tokens=len(CONVS) * 2 * 64, max_steps=1, lr=1e-3, warmup_steps=0, eval_every=0,
               sample_tokens=0, checkpoint_every=0, device="cpu", eval_tokens=64)
    train(resolve_train_config({**cfg, **kw}))
    return [r["loss"] for r in read_metrics(out, "train")]


def independent_loss(model, convs):
    """Mean cross-entropy over assistant tokens and their end token, each conversation run alone."""
    tok = get_tokenizer()
    total, n = 0.0, 0
    for messages in convs:
        ids, targets = [50256], []
        for m in messages:
            body = tok.encode(m["content"])
            ids += [ROLE_ID[m["role"]], *body, END]
            targets += [False] + [m["role"] == "assistant"] * (len(body) + 1)
        x = torch.tensor([ids[:-1]])
        with torch.no_grad():
            logits = model.lm_head(model.hidden(x))[0, :, :50261].double()
        y = torch.tensor(ids[1:])
        keep = torch.tensor(targets)
        total += F.cross_entropy(logits[keep], y[keep], reduction="sum").item()
        n += int(keep.sum())
    return total / n


def test_loss_is_cross_entropy_over_assistant_tokens(tmp_path):
    convs = CONVS * 2
    model = pre_model(tmp_path)
    (loss,) = sft(dataset(tmp_path, convs), tmp_path / "run", tmp_path / "pre")
    assert loss == pytest.approx(independent_loss(model, convs), rel=1e-5)
    tuned, _ = ck.load_model(tmp_path / "run")
    assert tuned.config.chat == "gptlab-chat-v1" and tuned.config.vocab_size == 50261


def test_loss_is_unchanged_by_what_the_user_turns_say(tmp_path):
    pre_model(tmp_path, zero_attention=True)
    tok = get_tokenizer()
    other = [[dict(m) for m in c] for c in CONVS]
    swaps = {"Hi there": "Yo friend", "Two plus two?": "Six minus one?", "And three?": "And seven?",
             "Name a colour": "Name a fruit"}
    for c in other:
        for m in c:
            if m["role"] == "user":
                assert len(tok.encode(m["content"])) == len(tok.encode(swaps[m["content"]]))
                m["content"] = swaps[m["content"]]
    a = sft(dataset(tmp_path, CONVS * 2, "a"), tmp_path / "ra", tmp_path / "pre")
    b = sft(dataset(tmp_path, other * 2, "b"), tmp_path / "rb", tmp_path / "pre")
    assert a == b
    # and the assistant turns do count
    said = [[{**m, "content": "Nope."} if m["role"] == "assistant" else m for m in c] for c in CONVS]
    c = sft(dataset(tmp_path, said * 2, "c"), tmp_path / "rc", tmp_path / "pre")
    assert c != a


def test_chat_resume_is_exact(tmp_path):
    pre_model(tmp_path)
    data = dataset(tmp_path, CONVS * 5, val_fraction=0.2)  # 3 val conversations, 12 to train on
    kw = dict(batch_size=3, total_batch_tokens=3 * 64, max_steps=6, eval_every=3)
    full = sft(data, tmp_path / "full", tmp_path / "pre", **kw)
    sft(data, tmp_path / "part", tmp_path / "pre", **{**kw, "checkpoint_every": 3})
    ckdir = tmp_path / "part" / "checkpoints"
    shutil.rmtree(ckdir / "step_000006")
    (ckdir / "latest").write_text("step_000003\n")
    train(resolve_train_config({"out": str(tmp_path / "part")}), resume=True, resume_flags={})
    part = [r["loss"] for r in read_metrics(tmp_path / "part", "train")]
    assert part[-6:] == full and len(set(full)) == 6
    # the val loss is over the val conversations' assistant tokens, the same after the resume
    vals = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full", "val")}
    assert set(vals) >= {3, 6} and vals == {r["step"]: r["loss"] for r in read_metrics(tmp_path / "part", "val")}


@pytest.mark.slow
def test_chat_two_ranks_equal_one(tmp_path):
    """1 rank x 2 micro-batches == 2 ranks x 1: each micro-batch's loss is the mean over its own
    assistant tokens, and steps average micro-batches alike however they are spread."""
    import os
    import subprocess
    import sys

    from conftest import run_gptlab

    pre_model(tmp_path)
    data = dataset(tmp_path, CONVS * 6, val_fraction=0.2)
    common = ["train", "--init-from", tmp_path / "pre", "--data", data, "--seq-len", "64", "--batch-size", "2",
              "--total-batch-tokens", "256", "--max-steps", "4", "--lr", "1e-3", "--warmup-steps", "0",
              "--eval-every", "2", "--eval-tokens", "128", "--sample-tokens", "0", "--checkpoint-every", "0",
              "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = run_gptlab(*common, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "gptlab", *map(str, common), "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    for kind in ("train", "val"):
        a = [m["loss"] for m in read_metrics(tmp_path / "one", kind)]
        b = [m["loss"] for m in read_metrics(tmp_path / "two", kind)]
        assert a and b == pytest.approx(a, rel=1e-5)
