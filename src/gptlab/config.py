"""Typed configuration: ModelConfig and its presets, TrainConfig, and JSON round trips.

Config is data, never code. This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gptlab.errors import UserError

GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256


def pad_to_multiple(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


@dataclass
class ModelConfig:
    """The shape of a GPT-2 network."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    seq_len: int = 1024
    """Context length T: the number of learned positions."""
    vocab_size: int = GPT2_VOCAB_SIZE
    """Real vocabulary size; only ids below it are ever sampled or exported."""
    vocab_multiple: int = 64
    """The embedding table is padded to a multiple of this for faster matmuls."""
    dropout: float = 0.0
    """Dropout on attention, residual and embedding outputs (0 for pretraining, as GPT-3)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "seq_len", "vocab_size", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: vocab_size rounded up to vocab_multiple (50257 -> 50304)."""
        return pad_to_multiple(self.vocab_size, self.vocab_multiple)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count of the network (tied head counted once)."""
        d, L = self.n_embd, self.n_layer
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        n = L * block + 2 * d
        if include_embeddings:
            n += self.padded_vocab_size * d + self.seq_len * d
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 * N (non-embedding params plus the output layer) + 12 * L * d * T for attention."""
        T = seq_len or self.seq_len
        n = self.num_params(include_embeddings=False) + self.padded_vocab_size * self.n_embd
        return 6.0 * n + 12.0 * self.n_layer * self.n_embd * T

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"model config: unknown fields {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # A small GPT-2-shaped model that learns visibly on a 2-core CPU in minutes.
    # The padded output layer (50304 x n_embd) dominates its cost.
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, seq_len=128),
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768, seq_len=1024),
    "gpt2-medium": ModelConfig(n_layer=24, n_head=16, n_embd=1024, seq_len=1024),
    "gpt2-large": ModelConfig(n_layer=36, n_head=20, n_embd=1280, seq_len=1024),
    "gpt2-xl": ModelConfig(n_layer=48, n_head=25, n_embd=1600, seq_len=1024),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with any fields overridden (None means keep the preset's value)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = dataclasses.asdict(PRESETS[name])
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**base)


def preset_for_shape(cfg: ModelConfig) -> str | None:
    """The gpt2* preset with this depth and width, for picking reference numbers."""
    for name, p in PRESETS.items():
        if name.startswith("gpt2") and (p.n_layer, p.n_embd) == (cfg.n_layer, cfg.n_embd):
            return name
    return None


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    tmp.replace(path)
