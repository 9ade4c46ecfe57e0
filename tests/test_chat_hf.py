"""A chat model's template travels: its model directory and its Hugging Face export carry the
special tokens and a chat_template, so transformers renders exactly gptlab's ids and greedy
generation through transformers equals gptlab's."""

import json

import pytest
import torch

from conftest import random_gptlab
from gptlab import chat
from gptlab import checkpoint as ck
from gptlab.generate import generate_ids
from gptlab.hf import export_hf
from gptlab.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")

MESSAGES = [
    [{"role": "system", "content": "Be <b>nice</b>  \n"}, {"role": "user", "content": " Hi  there\n\n"}],
    [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "naïve café — 東京? 🙂"}],
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    model = random_gptlab(seed=4, noise=0.3, vocab_size=50261, chat=chat.TEMPLATE)
    path = tmp_path_factory.mktemp("chat")
    ck.save_model(model, path / "model")
    export_hf(model, path / "hf")
    return model, path


def hf_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_model_dir_carries_the_template(chat_model):
    model, path = chat_model
    rec = json.loads((path / "model" / chat.CHAT_FILE).read_text())
    assert rec["special_tokens"] == {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}
    assert rec["chat_template"] == chat.CHAT_TEMPLATE
    loaded, _ = ck.load_model(path / "model")
    assert chat.model_chat(loaded) == chat.chat_format(get_tokenizer())


@pytest.mark.parametrize("messages", MESSAGES)
def test_apply_chat_template_gives_gptlab_ids(chat_model, messages):
    _, path = chat_model
    tok = transformers.AutoTokenizer.from_pretrained(path / "hf")
    want, _ = chat.render(get_tokenizer(), messages, add_generation_prompt=True)
    assert hf_ids(tok, messages) == want


def test_greedy_generation_through_transformers_equals_gptlab(chat_model):
    model, path = chat_model
    hf = transformers.GPT2LMHeadModel.from_pretrained(path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(path / "hf")
    for bias in (0.0, 3.0):  # 3.0: <|end|> is likely, so both must stop at the same step
        with torch.no_grad():
            model.lm_head.weight[50260] += bias * model.transformer.ln_f.weight  # (tied to wte)
            hf.transformer.wte.weight.copy_(model.transformer.wte.weight[:50261])
        prompt = hf_ids(tok, MESSAGES[1])
        ours = generate_ids(model, prompt, max_new_tokens=12, temperature=0.0, stop_token=50260)[0]
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        theirs = out[0, len(prompt):].tolist()
        assert ours == theirs
    assert ours[-1] == 50260  # the biased run stopped at <|end|>


def test_a_trained_tokenizer_carries_the_template_too(tmp_path):
    """`gptlab tokenizer train` -> prepare chat -> train -> export: the chat tokens are the ids after
    its <|endoftext|>, and transformers renders and generates exactly as gptlab."""
    from gptlab.config import resolve_train_config
    from gptlab.data.prepare_chat import prepare_chat
    from gptlab.data.sources import shakespeare_source
    from gptlab.tokenizer import load_tokenizer
    from gptlab.tokenizer_train import train_tokenizer
    from gptlab.train import train

    train_tokenizer(shakespeare_source(), tmp_path / "tok", 500, max_docs=4, progress=False)
    tok = load_tokenizer(tmp_path / "tok")
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"messages": [*m, {"role": "assistant", "content": "Well met."}]}) + "\n"
                           for m in MESSAGES * 4))
    prepare_chat([src], tmp_path / "data", tokenizer=str(tmp_path / "tok"))
    train(resolve_train_config(dict(model="tiny", n_layer=2, n_head=4, n_embd=32, seq_len=64, data=str(tmp_path / "data"),
                                    out=str(tmp_path / "run"), batch_size=2, total_batch_tokens=128, max_steps=2,
                                    eval_every=0, sample_tokens=0, checkpoint_every=0, device="cpu")))
    model, _ = ck.load_model(tmp_path / "run")
    fmt = chat.model_chat(model)
    assert fmt is not None and fmt.base == tok.vocab_size and model.config.vocab_size == tok.vocab_size + 4
    export_hf(model, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in MESSAGES:
        want, _ = chat.render(tok, messages, add_generation_prompt=True)
        assert hf_ids(hf_tok, messages) == want
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompt = hf_ids(hf_tok, MESSAGES[1])
    ours = generate_ids(model.eval(), prompt, max_new_tokens=8, temperature=0.0, stop_token=fmt.end)[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert ours == theirs
