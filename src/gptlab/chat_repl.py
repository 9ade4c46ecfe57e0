"""`gptlab chat MODEL`: a terminal chat with a model fine-tuned on conversations.

Each line you type is a user turn; the reply streams as it is generated and ends at <|end|> (or at
--max-new-tokens). The history is kept and sent whole each turn (the oldest turns are dropped when
it no longer fits in the context). `/reset` starts over, `/exit` or end of input (Ctrl-D) ends.
"""

from __future__ import annotations

import codecs
import sys
from typing import TextIO

from gptlab import chat
from gptlab.errors import UserError


def add_cli_args(p) -> None:
    p.add_argument("model", help="a chat model: a run directory, a checkpoint or a model directory "
                                 "(fine-tuned with `gptlab train --init-from ... --data CHAT_DATA`)")
    p.add_argument("--system", default=None, help="a system message that opens the conversation (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0: no cut)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set holding p")
    p.add_argument("--seed", type=int, default=None, help="random seed of the replies (default: random)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")


def fit_history(tok, messages: list[dict[str, str]], seq_len: int, max_new: int) -> list[int]:
    """The prompt of the conversation, its oldest user/assistant turns dropped until it leaves
    room for max_new tokens (the system message and the last user turn are kept)."""
    head = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(head):]
    while True:
        ids, _ = chat.render(tok, head + turns, add_generation_prompt=True)
        if len(ids) + max_new <= seq_len + 1 or len(turns) <= 1:
            return ids
        turns = turns[2:] if len(turns) > 2 else turns[-1:]


def reply(model, tok, fmt: chat.ChatFormat, prompt: list[int], args, out: TextIO) -> str:
    """Generate one reply, writing its text to `out` as it comes; returns the text."""
    from gptlab.generate import generate

    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    room = max(1, model.config.seq_len - len(prompt) + 1)
    for step in generate(model, prompt, max_new_tokens=min(args.max_new_tokens, room), temperature=args.temperature,
                         top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, stop_token=fmt.end):
        t = step[0]
        if t is None or t == fmt.end:
            break
        piece = utf8.decode(tok.decode_bytes([t]) if t < fmt.base else b"")
        text += piece
        out.write(piece)
        out.flush()
    tail = utf8.decode(b"", final=True)
    out.write(tail + "\n")
    return text + tail


def run_cli(args, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    from gptlab.checkpoint import load_model
    from gptlab.generate import check_sampling
    from gptlab.runtime import get_runtime
    from gptlab.tokenizer import model_tokenizer

    stdin, out = stdin or sys.stdin, out or sys.stdout
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    rt = get_runtime(device=args.device, compile=False)
    model, where = load_model(args.model, rt.device)
    fmt = chat.model_chat(model)
    if fmt is None:
        raise UserError(f"{where} has no chat template (a base model); fine-tune it on conversations first: "
                        f"gptlab prepare chat FILES --out DIR, then gptlab train --init-from {args.model} --data DIR")
    model.eval()
    tok = model_tokenizer(model)
    start = [{"role": "system", "content": args.system}] if args.system and args.system.strip() else []
    messages = list(start)
    interactive = stdin.isatty()
    print(f"gptlab chat: {where}; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            chat.check_messages(messages, "your message", need_assistant=False)
        except UserError as e:
            print(f"gptlab chat: {e}", file=sys.stderr)
            messages.pop()
            continue
        prompt = fit_history(tok, messages, model.config.seq_len, args.max_new_tokens)
        out.write("assistant> ")
        text = reply(model, tok, fmt, prompt, args, out)
        if text.strip():
            messages.append({"role": "assistant", "content": text})
        else:
            messages.pop()  # no reply: the turn is not kept (an empty turn cannot be sent back)
