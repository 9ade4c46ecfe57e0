"""The chat template: conversations ({"messages": [...]}) -> token ids and a loss mask.

One template, `gptlab-chat-v1`, for every tokenizer. Four special tokens follow the tokenizer's
own ids: for GPT-2 the spare padded ids 50257..50260 (the embedding table has 50,304 rows and the
BPE never produces these), for a trained tokenizer the ids right after its <|endoftext|>:

    <|system|>  <|user|>  <|assistant|>  <|end|>

A conversation is <|endoftext|> (the document separator every shard opens a document with), then
each message as <|ROLE|> CONTENT <|end|>. A reply is generated after <|assistant|> and ends at
<|end|>. The contents are tokenized on their own (special-token text as plain text), which is
what a Hugging Face tokenizer does with the rendered string once the four are its added special
tokens, so `apply_chat_template` (CHAT_TEMPLATE below, a Jinja string) gives the same ids.

The loss mask is 1 on the tokens a model is trained to produce: each assistant message's content
and its <|end|>; 0 elsewhere (the separator, system and user turns, the role tokens).

This module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gptlab.errors import UserError

TEMPLATE = "gptlab-chat-v1"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
EOT_TEXT = "<|endoftext|>"
END_TEXT = "<|end|>"

# Hugging Face's chat_template (tokenizer_config.json): the same rendering, as text
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """The template's ids for one tokenizer: the four chat tokens start at `base` (the
    tokenizer's vocabulary size); `eot` is its <|endoftext|>."""

    base: int
    eot: int

    @property
    def ids(self) -> dict[str, int]:
        return {t: self.base + i for i, t in enumerate(SPECIAL_TOKENS)}

    def role_id(self, role: str) -> int:
        return self.base + ROLES.index(role)

    @property
    def assistant(self) -> int:
        return self.base + 2

    @property
    def end(self) -> int:
        return self.base + 3

    @property
    def vocab_size(self) -> int:
        """The real vocabulary a chat model needs: the tokenizer's ids and the four."""
        return self.base + len(SPECIAL_TOKENS)

    def info(self) -> dict[str, Any]:
        """What a dataset manifest records of the template."""
        return {"template": TEMPLATE, "special_tokens": self.ids, "end_token": self.end}

    def token_text(self, i: int) -> str | None:
        """The text of a chat token id, None for any other id."""
        k = i - self.base
        return SPECIAL_TOKENS[k] if 0 <= k < len(SPECIAL_TOKENS) else None


def chat_format(tok) -> ChatFormat:
    """The template's ids for a tokenizer (gptlab.tokenizer.Tokenizer or FileTokenizer)."""
    return ChatFormat(base=int(tok.vocab_size), eot=int(tok.eot))


def check_messages(messages: Any, where: str, need_assistant: bool = True) -> list[dict[str, str]]:
    """The messages of one conversation, checked: a non-empty list of {"role", "content"} with a
    known role and non-empty text content, and (for training) at least one assistant turn.
    UserError naming `where` (file:line) and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: \"messages\" must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {i + 1} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: message {i + 1} has an unknown role {role!r} "
                            f"(expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i + 1} ({role}) has no text content")
        if not content.strip():
            raise UserError(f"{where}: message {i + 1} ({role}) has empty content")
        for special in (*SPECIAL_TOKENS, EOT_TEXT):
            if special in content:
                raise UserError(f"{where}: message {i + 1} ({role}) contains the special token text {special}")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant turn (nothing to train on)")
    return out


def render(tok, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a checked conversation and its loss mask (same length). With
    add_generation_prompt, <|assistant|> is appended (mask 0): the prompt of a reply."""
    fmt = chat_format(tok)
    ids, mask = [fmt.eot], [0]
    for m in messages:
        body = tok.encode(m["content"], allow_special=False)
        train = 1 if m["role"] == "assistant" else 0
        ids += [fmt.role_id(m["role"]), *body, fmt.end]
        mask += [0, *([train] * len(body)), train]
    if add_generation_prompt:
        ids.append(fmt.assistant)
        mask.append(0)
    return ids, mask


def render_arrays(tok, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = render(tok, messages)
    return np.asarray(ids, dtype=np.uint16), np.asarray(mask, dtype=np.uint8)


def decode_reply(tok, ids: list[int]) -> str:
    """The text of generated ids, chat tokens dropped (a reply ends before <|end|>)."""
    fmt = chat_format(tok)
    return tok.decode([i for i in ids if fmt.token_text(int(i)) is None and int(i) < fmt.base])


def bind_chat(net, data_dir, where: str) -> ChatFormat | None:
    """Before training `net` (a raw GPT, from `where`) on data_dir: a chat dataset makes it a chat
    model, its real vocabulary grown by the four chat tokens into the embedding table's spare
    padded rows (50257 -> 50261 of GPT-2's 50,304: no weight changes shape). Plain data: None."""
    from gptlab.tokenizer import chat_vocab_size, dataset_tokenizer

    need = chat_vocab_size(data_dir)
    if need is None:
        return None
    cfg = net.config
    fmt = chat_format(dataset_tokenizer(data_dir))
    if cfg.vocab_size not in (fmt.base, need):
        raise UserError(f"{where} has a vocabulary of {cfg.vocab_size:,} ids, but the chat data {data_dir} "
                        f"needs its tokenizer's {fmt.base:,} and the chat tokens {fmt.base}..{need - 1}")
    if need > cfg.padded_vocab_size:
        raise UserError(f"{where} has no spare rows for the chat tokens (vocabulary {cfg.vocab_size:,} fills "
                        f"its {cfg.padded_vocab_size:,}-row embedding table)")
    cfg.vocab_size, cfg.chat = need, TEMPLATE
    return fmt


def model_chat(net) -> ChatFormat | None:
    """The chat format of a model fine-tuned on conversations, None for a base model."""
    from gptlab.tokenizer import model_tokenizer

    cfg = getattr(net, "config", None)
    if cfg is None or getattr(cfg, "chat", None) != TEMPLATE:
        return None
    return chat_format(model_tokenizer(net))


CHAT_FILE = "chat.json"  # in a chat model's directory: the template, its tokens, the Jinja text


def chat_record(net) -> dict[str, Any] | None:
    """What a chat model's directory carries beside config.json (which alone decides: its "chat"
    field and vocab_size); None for a base model."""
    fmt = model_chat(net)
    if fmt is None:
        return None
    return {**fmt.info(), "eot_token": fmt.eot, "chat_template": CHAT_TEMPLATE}
