"""Weight conversion, in one place: gptlab's state dict <-> Hugging Face GPT-2's, the tied head,
wrapper prefixes, and the shape checks on loading. checkpoint.py and hf.py both use it.

gptlab's parameter names are GPT-2's, so the translation to Hugging Face is:
- keys: HF may or may not prefix them with `transformer.`; its causal-mask buffers
  (`attn.bias`, `attn.masked_bias`) are not weights; `lm_head.weight` is the tied embedding;
- Conv1D: HF's GPT-2 stores attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj as (in, out), the
  transpose of nn.Linear's (out, in). `_swap_conv1d` is the one place that transposes, both ways;
- vocabulary: HF has 50257 embedding rows, gptlab pads to config.padded_vocab_size (zeros).
"""

from __future__ import annotations

import torch

from gptlab.config import ModelConfig
from gptlab.errors import UserError
from gptlab.model import GPT

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DDP
_TIED = "lm_head.weight"
# Weights that HF's GPT-2 keeps in Conv1D layout (in_features, out_features).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-weight buffers older transformers versions saved with the model (causal mask, -1e4).
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
_PREFIX = "transformer."
_WTE = "transformer.wte.weight"


def raw_model(model: torch.nn.Module) -> torch.nn.Module:
    """Unwrap DDP / FSDP-free wrappers and torch.compile to the GPT module itself."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and drop the tied head (it is the token embedding)."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k == _TIED:
            continue
        out[k] = v
    return out


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = clean_state_dict(raw_model(model).state_dict())
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def load_weights(model: GPT, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load a cleaned state dict into model, with one clear error for any mismatch."""
    sd = clean_state_dict(sd)
    own = {k: v for k, v in model.state_dict().items() if k != _TIED}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, config wants {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def _swap_conv1d(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv1D (in, out) <-> nn.Linear (out, in) for the four projection weights of every block.
    Transposing is its own inverse, so import and export both call this, and only this."""
    return {k: (v.t().contiguous() if k.endswith(_CONV1D) else v) for k, v in sd.items()}


def hf_to_gptlab_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> gptlab's state dict (without the tied lm_head)."""
    out: dict[str, torch.Tensor] = {}
    lm_head = None
    for k, v in sd.items():
        if k.endswith(_HF_BUFFERS):
            continue
        if k == _TIED:
            lm_head = v
            continue
        # GPT2LMHeadModel saves transformer.h.0..., GPT2Model (and the original OpenAI files) h.0...
        out[k if k.startswith(_PREFIX) else _PREFIX + k] = v
    out = _swap_conv1d(out)
    wte = out.get(_WTE)
    if wte is None:
        raise UserError(f"{source}: no token embedding ({_WTE})")
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise UserError(f"{source}: lm_head.weight differs from the token embedding; gptlab's GPT-2 ties them")
    V, padded = cfg.vocab_size, cfg.padded_vocab_size
    if wte.size(0) != V:
        raise UserError(f"{source}: {_WTE} has {wte.size(0)} rows, config vocab_size is {V}")
    if padded > V:
        # (V, C) -> (padded V, C); the padded rows are never sampled (model masks them)
        out[_WTE] = torch.cat([wte, wte.new_zeros(padded - V, wte.size(1))], dim=0)
    return out


def gptlab_to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """gptlab weights -> HF GPT2LMHeadModel tensors: `transformer.*` keys, Conv1D layout,
    the embedding cut back to the real vocabulary, lm_head left out (tied)."""
    cfg: ModelConfig = raw_model(model).config
    sd = _swap_conv1d(model_state_dict(model))
    # (padded V, C) -> (V, C); clone so the file does not hold the padded storage
    sd[_WTE] = sd[_WTE][: cfg.vocab_size].clone()
    return sd
