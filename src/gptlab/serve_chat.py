"""POST /v1/chat/completions: OpenAI's chat request and response shapes around the completions
engine. The messages are rendered through the model's chat template (gptlab.chat) with the
generation prompt; the reply is generated like a completion and ends at <|end|> (the
end-of-turn token), at a stop string or at max_tokens. serve.py owns the HTTP side; this module
turns messages into a prompt and completion objects into chat objects.
"""

from __future__ import annotations

from typing import Any

from gptlab import chat
from gptlab.errors import UserError

NOT_CHAT = ("this model has no chat template (a base model); fine-tune it on conversations first "
            "(gptlab prepare chat FILES --out DIR, then gptlab train --init-from MODEL --data DIR) "
            "or use /v1/completions")


class ChatError(Exception):
    """A request problem, answered by serve.py in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None, code: str):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _text(content: Any) -> Any:
    """OpenAI's content: a string, or a list of parts of which the text parts are joined."""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p for p in content if p.get("type") == "text"]
        if len(parts) == len(content) and all(isinstance(p.get("text"), str) for p in parts):
            return "".join(p["text"] for p in parts)
    return content


def chat_prompt(body: dict, tok, fmt: chat.ChatFormat | None) -> list[int]:
    """The prompt ids of a chat request's messages (template + generation prompt)."""
    if fmt is None:
        raise ChatError(400, NOT_CHAT, "model", "model_not_chat")
    messages = body.get("messages")
    if messages is None:
        raise ChatError(400, "'messages' is required", "messages", "missing_required_parameter")
    if isinstance(messages, list):
        messages = [{**m, "content": _text(m.get("content"))} if isinstance(m, dict) else m for m in messages]
    try:
        checked = chat.check_messages(messages, "messages", need_assistant=False)
    except UserError as e:
        raise ChatError(400, str(e), "messages", "invalid_value") from None
    ids, _ = chat.render(tok, checked, add_generation_prompt=True)
    return ids


def chat_completion(obj: dict) -> dict:
    """A text_completion object as a chat.completion object."""
    choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                "logprobs": None, "finish_reason": c["finish_reason"]} for c in obj["choices"]]
    return {**obj, "object": "chat.completion", "choices": choices}


def chunk_shaper():
    """A function from a text_completion stream chunk to a chat.completion.chunk: each choice's
    first delta carries the role, the last one only the finish_reason."""
    started: set[int] = set()

    def shape(obj: dict) -> dict:
        choices = []
        for c in obj["choices"]:
            delta: dict[str, str] = {}
            if c["index"] not in started:
                started.add(c["index"])
                delta["role"] = "assistant"
            if c["finish_reason"] is None or c["text"]:
                delta["content"] = c["text"]
            choices.append({"index": c["index"], "delta": delta, "logprobs": None,
                            "finish_reason": c["finish_reason"]})
        return {**obj, "object": "chat.completion.chunk", "choices": choices}

    return shape
