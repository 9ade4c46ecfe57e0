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


def _from_dict(cls, d: dict[str, Any], what: str):
    """A config dataclass from JSON data, refusing fields it does not know."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise UserError(f"{what}: unknown fields {sorted(unknown)}")
    return cls(**d)


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
        return _from_dict(cls, d, "model config")


PRESETS: dict[str, ModelConfig] = {
    # A small GPT-2-shaped model that learns visibly on a 2-core CPU in minutes.
    # The padded output layer (50304 x n_embd) dominates its cost.
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, seq_len=128),
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768, seq_len=1024),
    "gpt2-medium": ModelConfig(n_layer=24, n_head=16, n_embd=1024, seq_len=1024),
    "gpt2-large": ModelConfig(n_layer=36, n_head=20, n_embd=1280, seq_len=1024),
    "gpt2-xl": ModelConfig(n_layer=48, n_head=25, n_embd=1600, seq_len=1024),
}


# Published HellaSwag (val, 10,042 items, zero-shot) numbers by the GPT-2 size they belong to.
# GPT-2 "completion": (acc, acc_norm) from build-nanogpt's hellaswag.py docstring (gpt2, gpt2-xl);
#   for gpt2-medium/-large only acc_norm is published, by llm.c's dev/vislog.ipynb baselines
#   (0.375224, 0.431986, measured with llm.c's completion-style evaluation).
# GPT-2 "harness": (acc, acc_norm) from lm-evaluation-harness as quoted in build-nanogpt's hellaswag.py.
# GPT-3: the GPT-3 paper's zero-shot accuracy of the nearest size (Brown et al. 2020; the same
#   values as llm.c's vislog baselines). GPT-3 normalises per token, so it sits under acc_norm.
HELLASWAG_REFERENCES: dict[str, dict[str, Any]] = {
    "gpt2": {"completion": (0.2859, 0.2955), "harness": (0.2892, 0.3114), "gpt3": ("GPT-3 Small 125M", 0.337)},
    "gpt2-medium": {"completion": (None, 0.3752), "gpt3": ("GPT-3 Medium 350M", 0.436)},
    "gpt2-large": {"completion": (None, 0.4320), "gpt3": ("GPT-3 Large 760M", 0.510)},
    "gpt2-xl": {"completion": (0.3842, 0.4893), "harness": (0.4004, 0.5089), "gpt3": ("GPT-3 XL 1.3B", 0.547)},
}
# OpenAI GPT-2 124M's loss on FineWeb-Edu's first 100M val tokens (build-nanogpt; DESIGN.md). It is
# a reference for that dataset only.
VAL_LOSS_REFERENCES = {"gpt2": 3.2924}


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


def read_json(path: str | Path, max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON object from a file; max_bytes refuses a file too large to be what it claims."""
    path = Path(path)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes, too large for this file "
                            f"(at most {max_bytes:,} expected)")
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


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field whose help text becomes the flag's --help."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything `gptlab train` needs beyond the model's shape. Flags are --kebab-case forms."""

    model: str = _f("gpt2", "model preset: " + ", ".join(PRESETS))
    n_layer: int | None = _f(None, "override the preset's number of layers")
    n_head: int | None = _f(None, "override the preset's number of heads")
    n_embd: int | None = _f(None, "override the preset's width")
    seq_len: int | None = _f(None, "context length T (default: the preset's)")
    data: str = _f("data/shakespeare", "prepared dataset directory (from `gptlab prepare`), or streamed: an "
                   "http(s) URL of one, or hf://datasets/OWNER/NAME[/DIR] (llm.c shards on the hub)")
    data_cache: str | None = _f(None, "streamed --data: where shards wait while in use "
                                      "(default: $GPTLAB_CACHE/data, else ~/.cache/gptlab/data)")
    data_disk_budget: int | str = _f("10G", "streamed --data: most disk the cache may hold, val split included "
                                            "(K/M/G suffixes; divided among ranks)")
    out: str = _f("runs/run", "run directory: config, metrics, checkpoints, plots, samples")
    init_from: str | None = _f(None, "start from pretrained weights: a hub id (gpt2), an HF or gptlab model directory")
    seed: int = _f(1337, "seed for initialisation, data order and dropout")
    batch_size: int | str = _f(32, "micro-batch size per rank, in sequences; 'auto' finds the largest that fits in memory")
    total_batch_tokens: int = _f(524288, "global batch per optimizer step, in tokens (sets gradient accumulation)")
    max_steps: int | None = _f(19073, "optimizer steps to run (overridden by --max-tokens or --epochs)")
    max_tokens: int | None = _f(None, "train on this many tokens (K/M/B suffixes), instead of --max-steps")
    epochs: float | None = _f(None, "train for this many passes over the train split, instead of --max-steps")
    lr: float = _f(6e-4, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    schedule: str = _f("cosine", "learning-rate schedule: cosine | linear | constant | wsd")
    warmup_steps: int = _f(715, "linear warm-up steps")
    warmup_frac: float | None = _f(None, "warm-up as a fraction of the steps (overrides --warmup-steps)")
    decay_frac: float = _f(0.2, "wsd: fraction of the steps spent decaying at the end")
    weight_decay: float = _f(0.1, "AdamW weight decay, on 2-D weights only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    optimizer: str = _f("adamw", "adamw (the GPT-3 recipe) | muon (torch.optim.Muon on the blocks' 2-D weights, "
                        "AdamW with --lr on the embeddings, head, biases and gains)")
    muon_lr: float = _f(0.02, "Muon's peak learning rate (Keller Jordan's scale: adjust_lr_fn='original')")
    muon_momentum: float = _f(0.95, "Muon's Nesterov momentum")
    muon_weight_decay: float = _f(0.0, "Muon's decoupled weight decay (on the blocks' 2-D weights)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 turns clipping off)")
    device: str | None = _f(None, "cpu, cuda, cuda:N or mps (default: the best available)")
    dtype: str = _f("auto", "auto | fp32 | bf16 | fp16 (auto: bf16 where native, fp16 on older GPUs, fp32 on CPU)")
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA)")
    compile_backend: str = _f("inductor", "torch.compile backend; if compiling fails, one warning and training goes on uncompiled")
    eval_every: int = _f(250, "evaluate (val loss, HellaSwag, samples) every N steps; 0 turns it off")
    eval_tokens: int = _f(10_485_760, "validation tokens per evaluation")
    hellaswag: bool = _f(False, "also run HellaSwag at each evaluation (needs a file or a cached copy)")
    hellaswag_file: str | None = _f(None, "local HellaSwag jsonl file")
    hellaswag_limit: int | None = _f(None, "evaluate only the first N HellaSwag items")
    eval_tasks: str | None = _f(None, "also run these lm-evaluation-harness tasks (T1,T2) at each evaluation, "
                                      "on rank 0 (needs the eval extra)")
    eval_tasks_limit: int = _f(100, "--eval-tasks: the first N documents of each task (0: all)")
    eval_include_path: str | None = _f(None, "--eval-tasks: a directory of your own task YAML files")
    sample_tokens: int = _f(32, "tokens per sample drawn at each evaluation (0 turns samples off)")
    num_samples: int = _f(2, "samples per prompt at each evaluation")
    checkpoint_every: int = _f(1000, "write a checkpoint every N steps (0: only at the end and on signals)")
    keep_checkpoints: int = _f(3, "keep the newest K checkpoints (0 keeps all)")
    overfit_batch: bool = _f(False, "sanity check: repeat one batch until the loss is near zero")
    tensorboard: bool = _f(False, "also log to TensorBoard in RUN/tensorboard")
    wandb: bool = _f(False, "also log to Weights & Biases (set WANDB_MODE=offline to stay offline)")
    wandb_project: str = _f("gptlab", "Weights & Biases project")
    nproc: str | None = _f(None, "start torchrun with N processes, or 'auto' for one per visible GPU")
    fsdp: bool = _f(False, "shard parameters, gradients and optimizer state with FSDP2 (large models)")
    dist_timeout: float = _f(600.0, "seconds before a collective gives up when a rank is lost")
    dry_run: bool = _f(False, "print the memory plan per GPU (as `gptlab plan`) and exit without training")
    gpu_memory: str | None = _f(None, "memory of one GPU for the plan's fits check, e.g. 80GB or 24GiB")
    skip_nonfinite: int = _f(0, "skip up to N steps whose loss or gradient norm is NaN/inf (no update), "
                                "then stop; 0 stops at the first")

    def model_config(self) -> ModelConfig:
        return model_preset(self.model, n_layer=self.n_layer, n_head=self.n_head,
                            n_embd=self.n_embd, seq_len=self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d, "train config")


# Training defaults that differ from the GPT-3 Small recipe (TrainConfig's own defaults), by preset.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # Learns visibly on a 2-core CPU within a few minutes: small batches, short warm-up, high lr.
    # On Shakespeare, 60 steps (246K tokens, about 4 minutes on 2 cores) take val loss from 10.8 to about 6.2.
    "tiny": dict(batch_size=16, total_batch_tokens=4096, max_steps=60, lr=3e-3, warmup_steps=10,
                 eval_every=20, eval_tokens=40960, checkpoint_every=20, sample_tokens=32),
    "gpt2": {},
    "gpt2-medium": dict(lr=3e-4),
    "gpt2-large": dict(lr=2.5e-4),
    "gpt2-xl": dict(lr=2e-4),
}
# model-shape fields: a resume refuses to change them
MODEL_FIELDS = ("model", "n_layer", "n_head", "n_embd", "seq_len", "init_from")
# fields that fix the data order: changing them on resume would break exactness
DATA_FIELDS = ("data", "seed", "total_batch_tokens")


def resolve_train_config(flags: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """TrainConfig from: its defaults < the preset's training defaults < --config file < flags
    (flags whose value is None were not given)."""
    file_values = read_json(config_file) if config_file else {}
    if "train" in file_values and isinstance(file_values["train"], dict):
        file_values = file_values["train"]  # a RUN/config.json works as --config too
    model = flags.get("model") or file_values.get("model") or TrainConfig.model
    if model not in PRESETS:
        raise UserError(f"unknown model preset {model!r}; choose one of {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(TRAIN_PRESETS.get(model, {}))
    values.update(file_values)
    values.update({k: v for k, v in flags.items() if v is not None})
    values["model"] = model
    return TrainConfig.from_dict(values)


@dataclass
class BenchConfig:
    """What `gptlab bench` measures. Flags are the --kebab-case forms of the fields."""

    model: str = _f("gpt2", "model preset: " + ", ".join(PRESETS))
    n_layer: int | None = _f(None, "override the preset's number of layers")
    n_head: int | None = _f(None, "override the preset's number of heads")
    n_embd: int | None = _f(None, "override the preset's width")
    seq_len: int | None = _f(None, "context length T (default: the preset's)")
    batch_size: int | str = _f(8, "micro-batch per rank, in sequences, or 'auto' (the largest that fits)")
    steps: int = _f(10, "timed training steps")
    warmup: int = _f(3, "untimed steps first (compilation happens here)")
    device: str | None = _f(None, "cpu, cuda, cuda:N or mps (default: the best available)")
    dtype: str = _f("auto", "auto | fp32 | bf16 | fp16")
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA)")
    compile_backend: str = _f("inductor", "torch.compile backend")
    fsdp: bool = _f(False, "shard with FSDP2 (needs torchrun or --nproc)")
    nproc: str | None = _f(None, "start torchrun with N processes, or 'auto' for one per visible GPU")
    peak_tflops: float | None = _f(None, "the device's peak TFLOP/s for MFU where the built-in table has none")
    seed: int = _f(0, "seed for the weights and the random tokens")
    json: bool = _f(False, "print one JSON object instead of a table")

    def validate(self) -> None:
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size > 0)):
            raise UserError("--batch-size must be a positive integer or 'auto'")
        if self.steps < 1 or self.warmup < 0:
            raise UserError("--steps must be >= 1 and --warmup >= 0")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise UserError("--peak-tflops must be positive")
