"""Hugging Face GPT-2 in (a hub id or a local directory) and out (a directory transformers loads).

The tensor translation (names, Conv1D transposes, the tied head, vocabulary padding) is weights.py's.

This module owns the Hugging Face directory format; checkpoint.py owns gptlab's own.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

from gptlab.atomic import file_mode, staged_dir
from gptlab.config import EOT_TOKEN, ModelConfig, read_json
from gptlab.errors import UserError
from gptlab.hf_config import GPT2_HUB_NAMES, HF_CONFIG, HF_SAFETENSORS, model_config_from_hf
from gptlab.model import GPT
from gptlab.weights import gptlab_to_hf_state_dict, hf_to_gptlab_state_dict, load_weights, raw_model

HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_PYTORCH_BIN = "pytorch_model.bin"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

_PRODUCER = "gptlab"  # safetensors metadata of our exports: what export_hf may overwrite
CONFIG_MAX_BYTES = 1 << 20  # a GPT-2 config.json is about 1 KB


def note_dtypes(sd: dict[str, torch.Tensor], source: str, say=None) -> None:
    """Say (one line on stderr) when weights are not stored as float32: they are converted to the
    model's float32, which is exact for fp16/bf16 but means integer tensors are not weights at all."""
    kinds = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values() if v.dtype != torch.float32})
    if not kinds:
        return
    ints = [k for k in kinds if not getattr(torch, k).is_floating_point]
    what = "converted to float32" + (" (integer tensors as weights: is this the right file?)" if ints else "")
    (say or (lambda m: print(m, file=sys.stderr)))(f"gptlab: note: {source} stores {', '.join(kinds)} weights; {what}")


# ----------------------------------------------------------------------------- shared pieces

def looks_like_hub_id(s: str) -> bool:
    """True for gpt2, gpt2-medium, gpt2-large, gpt2-xl and any "owner/name" repository id, unless
    "owner" is a local directory: then "runs/typo" is a mistyped path, not something to download."""
    if s in GPT2_HUB_NAMES:
        return True
    return bool(_HUB_ID.match(s)) and ".." not in s and not Path(s.split("/")[0]).is_dir()


def _canonical_repo(repo_id: str) -> str:
    return f"openai-community/{repo_id}" if repo_id in GPT2_HUB_NAMES else repo_id


# ----------------------------------------------------------------------------- in

def load_hub(repo_id: str, revision: str | None = None) -> GPT:
    """Download config.json and the weights of a hub repository (or find them in the local
    Hugging Face cache) and load them exactly as a local directory."""
    import huggingface_hub
    from huggingface_hub import errors

    # the file is missing from the repository (not merely from an offline cache)
    missing_remote = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    repo = _canonical_repo(repo_id)

    def fetch(filename: str) -> Path:
        return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision))

    try:
        config_path = fetch(HF_CONFIG)
        try:
            fetch(HF_SAFETENSORS)
        except missing_remote:
            # older repositories only have the pickle-free-loadable PyTorch file
            fetch(HF_PYTORCH_BIN)
    except Exception as e:  # network, missing repo, gated repo, offline mode, disk: all one message
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise UserError(
            f"could not download {repo!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
            "check the name and the network, or pass a local directory with config.json and model.safetensors"
        ) from None
    # hf_hub_download puts every file of one revision in the same snapshot directory
    return load_hf_dir(config_path.parent)


def _read_hf_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a HF directory (safetensors, sharded safetensors or pytorch_model.bin)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if (path / HF_SAFETENSORS).is_file():
            return load_file(str(path / HF_SAFETENSORS), device="cpu"), str(path / HF_SAFETENSORS)
        if (path / HF_SAFETENSORS_INDEX).is_file():
            index = read_json(path / HF_SAFETENSORS_INDEX)
            shards = sorted(set(index.get("weight_map", {}).values()))
            if not shards:
                raise UserError(f"{path / HF_SAFETENSORS_INDEX}: no weight_map")
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(load_file(str(path / shard), device="cpu"))
            return sd, str(path / HF_SAFETENSORS_INDEX)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable safetensors weights ({e})") from None
    if (path / HF_PYTORCH_BIN).is_file():
        source = str(path / HF_PYTORCH_BIN)
        try:
            # weights_only: tensors and plain containers only; anything needing pickle is refused
            sd = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, zip errors: all mean "not loadable safely"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"{source}: refused or unreadable (only plain tensors are loaded, nothing is unpickled): {first}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise UserError(f"{source}: not a state dict of tensors")
        return sd, source
    raise UserError(f"{path}: not a model directory (no {HF_SAFETENSORS} or {HF_PYTORCH_BIN})")


def load_hf_dir(path: str | Path) -> GPT:
    """A GPT from a local Hugging Face GPT-2 directory (as written by save_pretrained or export_hf)."""
    path = Path(path)
    if not (path / HF_CONFIG).is_file():
        raise UserError(f"{path}: not a model directory (no {HF_CONFIG})")
    cfg = model_config_from_hf(path, read_json(path / HF_CONFIG, max_bytes=CONFIG_MAX_BYTES))
    sd, source = _read_hf_weights(path)
    note_dtypes(sd, source)
    sd = hf_to_gptlab_state_dict(sd, cfg, source)
    stored = sum(v.numel() for v in sd.values())  # the model is allocated only if it fits them
    if stored != cfg.num_params():
        raise UserError(f"{source}: weights do not match the config ({HF_CONFIG} describes a model of "
                        f"{cfg.num_params():,} parameters, the weights hold {stored:,} values)")
    model = GPT(cfg)
    load_weights(model, sd, source=source)
    model.eval()
    return model


# ----------------------------------------------------------------------------- out

def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, eot: int | None = EOT_TOKEN) -> dict:
    """A transformers GPT2Config dict for cfg (eot: the tokenizer's end-of-text id)."""
    eot = eot if eot is not None and cfg.vocab_size > eot else None
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_ctx": cfg.seq_len,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation, as GPT-2 and gptlab use
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "summary_first_dropout": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _chat_tokenizer_config(fmt) -> dict:
    """A chat model's added special tokens (at their ids) and the chat template, as transformers'
    tokenizer_config.json keys: apply_chat_template then gives exactly gptlab's ids."""
    from gptlab import chat

    added = {str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": True} for t, i in fmt.ids.items()}
    return {"added_tokens_decoder": added, "additional_special_tokens": list(chat.SPECIAL_TOKENS),
            "chat_template": chat.CHAT_TEMPLATE}


def _tokenizer_files(seq_len: int, tok=None, fmt=None) -> dict[str, bytes]:
    from gptlab.tokenizer import FileTokenizer, gpt2_hf_files

    eot = "<|endoftext|>"
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    tok_config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_prefix_space": False,
        "add_bos_token": False,
        "model_max_length": seq_len,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }
    dump = lambda d: (json.dumps(d, indent=2) + "\n").encode()  # noqa: E731
    extra = {}
    if fmt is not None:
        tok_config.update(_chat_tokenizer_config(fmt))
        special = {**special, "additional_special_tokens": tok_config["additional_special_tokens"]}
        # a reply ends at <|end|>: generate() stops there, as gptlab's chat does. pad = eos, because a
        # pad id found in the prompt (every prompt opens with <|endoftext|>) would be masked out
        extra["generation_config.json"] = dump({"bos_token_id": fmt.eot, "eos_token_id": fmt.end,
                                                "pad_token_id": fmt.end})
    return {**extra,
        # GPT-2's encoder.json and vocab.bpe are HF's vocab.json and merges.txt; a trained tokenizer's
        # files are in that format already
        **(tok.hf_files() if isinstance(tok, FileTokenizer) else gpt2_hf_files()),
        "tokenizer_config.json": dump(tok_config),
        "special_tokens_map.json": dump(special),
    }


def _is_replaceable(out: Path) -> bool:
    """An output directory may be replaced when it is empty or an earlier export by gptlab (its
    weights say so), never a directory of someone else's files."""
    from safetensors import SafetensorError, safe_open

    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        with safe_open(str(out / HF_SAFETENSORS), framework="pt") as f:
            return (f.metadata() or {}).get("producer") == _PRODUCER
    except (SafetensorError, OSError, ValueError):
        return False


def export_hf(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write model as a Hugging Face GPT-2 directory (GPT2LMHeadModel + GPT2Tokenizer), whole or
    not at all: everything goes to a temporary sibling directory that is then renamed into place
    (atomic.staged_dir)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.exists() and not _is_replaceable(out):
        raise UserError(f"{out}: exists and is not empty or an earlier export; refusing to overwrite it")
    from gptlab.chat import model_chat
    from gptlab.tokenizer import model_tokenizer

    cfg: ModelConfig = raw_model(model).config
    tok = model_tokenizer(raw_model(model))  # the model's own tokenizer goes with it
    sd = gptlab_to_hf_state_dict(model)
    dtype = sd["transformer.wte.weight"].dtype
    with staged_dir(out) as tmp:
        save_file(sd, str(tmp / HF_SAFETENSORS), metadata={"format": "pt", "producer": _PRODUCER})
        os.chmod(tmp / HF_SAFETENSORS, file_mode())  # safetensors creates it 0600; readable as its neighbours
        files = {HF_CONFIG: (json.dumps(hf_config(cfg, dtype, tok.eot), indent=2) + "\n").encode()}
        files.update(_tokenizer_files(cfg.seq_len, tok, model_chat(raw_model(model))))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return out
