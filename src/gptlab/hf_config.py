"""A Hugging Face GPT-2 config (transformers' GPT2Config, config.json) as gptlab's ModelConfig,
refusing the variants gptlab cannot run: the one mapping, read by hf.py (import) and by the memory
plan (the shape of --init-from). No torch here.
"""

from __future__ import annotations

from pathlib import Path

from gptlab.config import ModelConfig
from gptlab.errors import UserError

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"

# The four bare names OpenAI published, now under the openai-community organisation.
GPT2_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def model_config_from_hf(path: str | Path, hf: dict) -> ModelConfig:
    """gptlab's ModelConfig from a transformers GPT2Config dict, refusing what gptlab cannot run."""
    model_type = hf.get("model_type")
    if model_type is None:
        if "seq_len" in hf and "n_layer" in hf:
            raise UserError(f"{path}: a gptlab model directory without its weights ({HF_SAFETENSORS})")
        raise UserError(f"{path}: {HF_CONFIG} has no model_type; not a Hugging Face GPT-2 directory")
    if model_type != "gpt2":
        raise UserError(f"{path}: model_type {model_type!r} is not supported; gptlab loads GPT-2 models (model_type 'gpt2')")
    n_embd = hf.get("n_embd", 768)
    unsupported = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function {hf['activation_function']!r}")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner {hf['n_inner']} (gptlab uses 4 * n_embd)")
    if abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_epsilon {hf['layer_norm_epsilon']}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("non-standard attention scaling")
    if hf.get("add_cross_attention", False):
        unsupported.append("cross-attention")
    if unsupported:
        raise UserError(f"{path}: this GPT-2 variant is not supported: {', '.join(unsupported)}")
    # defaults are GPT2Config's, which transformers also applies to a missing field
    return ModelConfig(
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        seq_len=hf.get("n_positions", 1024),
        vocab_size=hf.get("vocab_size", 50257),
    )
