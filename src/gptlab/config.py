"""Typed configuration: ModelConfig and its presets, the option groups every command's config is
built from (model shape, batch, runtime, launch), the train, bench, serve, sample and eval configs,
their checks and derived values, and JSON round trips.

Config is data, never code. This module does not import torch (TrainConfig.validate reads the
optimizer and schedule names from optim when it runs).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from gptlab.atomic import read_json  # noqa: F401  (re-exported: most readers of config files import it from here)
from gptlab.errors import UserError
from gptlab.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, data_vocab_size


def _from_dict(cls, d: dict[str, Any], what: str):
    """A config dataclass from JSON data, refusing fields it does not know."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise UserError(f"{what}: unknown fields {sorted(unknown)}")
    for f in fields(cls):
        if f.name in d:
            _check_type(f.name, d[f.name], str(f.type), what)
    return cls(**d)


_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "None": "null"}


def _check_type(name: str, value: Any, annotation: str, what: str) -> None:
    """A JSON value against its field's annotation ("int | None", "list[str] | None", ...): a
    config file's "lr": "fast" is one line naming the field, not a TypeError deep in a check."""
    kinds = [k.strip() for k in annotation.split("|")]
    for k in kinds:
        if k.startswith("list"):
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return
        elif isinstance(value, _JSON_TYPES.get(k, (object,))) and (k == "bool" or not isinstance(value, bool)):
            return
    want = " or ".join(_TYPE_WORDS.get(k, "a list of strings" if k.startswith("list") else k) for k in kinds)
    raise UserError(f"{what}: {name} must be {want}, got {json.dumps(value)}")


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
    chat: str | None = None
    """The chat template the model was fine-tuned with ("gptlab-chat-v1", see gptlab.chat), or None
    for a base model; its four special tokens are the last ids of vocab_size."""

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
        d = dataclasses.asdict(self)
        if d["chat"] is None:  # a base model's config.json stays what it always was
            del d["chat"]
        return d

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


# ----------------------------------------------------------------------------- options
# A command's config is a dataclass composed of option groups (ModelShapeOptions, RuntimeOptions,
# LaunchOptions, ...), each defined once here. cli builds every flag, its --help and its parsing
# from these fields; to_dict() writes the saved ones as JSON.

def option(default: Any, help: str, *, parse: str | None = None, choices: tuple[str, ...] | None = None,
           metavar: str | None = None, action: str | None = None, positional: bool = False,
           saved: bool = True, flag: bool = True) -> Any:
    """A config field and its --kebab-case flag, defined together.

    help: the flag's --help text. Where the default is not simply the field's value, the text names
      it ("(default: the preset's)"); otherwise --help appends "(default: VALUE)", once.
    parse: how the flag's text becomes a value, by name (cli.PARSERS): int, float, str, count (5B,
      100M), size (10G bytes), positive_int, nonneg_int, batch_size (N or 'auto'), port, or text (kept as
      typed, checked by the config); by default the field's type.
    action: store_true or append (else a value, or --x/--no-x for a bool).
    saved: False for launch-only options (how the process starts, not what it trains): to_dict()
      leaves them out, so config.json does not record them and a resume takes them from its flags.
    flag: False for a field with no flag."""
    meta = {"help": help, "parse": parse, "choices": choices, "metavar": metavar, "action": action,
            "positional": positional, "saved": saved, "flag": flag}
    return field(default=default, metadata=meta)


def redefault(group: type, name: str, default: Any) -> Any:
    """A group's field with another default, for a config whose command needs one (help unchanged)."""
    return field(default=default, metadata=group.__dataclass_fields__[name].metadata)


def option_groups(cls: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """The fields of a config class that have flags, grouped by the option group that defines each
    (its GROUP title), in field order; the class's own group first."""
    groups: dict[str, list[dataclasses.Field]] = {}
    for f in fields(cls):
        if not f.metadata.get("flag", True):
            continue
        owner = next(c for c in reversed(cls.__mro__) if f.name in c.__dict__.get("__annotations__", {}))
        groups.setdefault(getattr(owner, "GROUP", "options"), []).append(f)
    own = getattr(cls, "GROUP", None)  # the command's own options first
    return sorted(groups.items(), key=lambda item: item[0] != own)


def launch_only(cls: type) -> tuple[str, ...]:
    """The fields of cls that only say how the process is launched (not saved into config.json)."""
    return tuple(f.name for f in fields(cls) if not f.metadata.get("saved", True))


def _check(checks: list[tuple[bool, str]]) -> None:
    """Raise the first failed check's message."""
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


class _Saved:
    """JSON of a composed config: the saved fields only (launch-only ones stay out)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("saved", True)}


@dataclass
class ModelShapeOptions:
    """The model to build: a preset and the overrides of its shape."""

    GROUP = "model shape"
    model: str = option("gpt2", "model preset: " + ", ".join(PRESETS))
    n_layer: int | None = option(None, "override the preset's number of layers")
    n_head: int | None = option(None, "override the preset's number of heads")
    n_embd: int | None = option(None, "override the preset's width")
    seq_len: int | None = option(None, "context length T (default: the preset's)")
    vocab_size: int | None = option(None, "a fresh model's vocabulary, for data whose ids are all below it "
                                          "(default: the data's tokenizer's; GPT-2's 50,257)")

    def model_config(self) -> ModelConfig:
        # the vocabulary follows the data's tokenizer, unless a smaller one is asked for
        data_vocab = data_vocab_size(getattr(self, "data", None))
        if self.vocab_size is not None and data_vocab is not None and self.vocab_size < data_vocab:
            raise UserError(f"--vocab-size {self.vocab_size} is smaller than the data's tokenizer "
                            f"({data_vocab} ids)")
        return model_preset(self.model, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                            seq_len=self.seq_len, vocab_size=self.vocab_size or data_vocab)


@dataclass
class BatchOptions:
    """What every training step draws: the micro-batch and the seed."""

    GROUP = "batch"
    seed: int = option(1337, "random seed: the initial weights, and the data (training: its order and "
                             "dropout; bench: the random tokens)")
    batch_size: int | str = option(32, "micro-batch size per rank, in sequences; 'auto' finds the largest "
                                       "that fits in memory", parse="batch_size")

    def batch_checks(self) -> list[tuple[bool, str]]:
        return [(self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size > 0),
                 "--batch-size must be a positive integer or 'auto'")]


DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class DeviceOptions:
    """Where a model runs, and in which compute dtype."""

    GROUP = "runtime"
    device: str | None = option(None, "cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    dtype: str = option("auto", "compute dtype (auto: bf16 where native, fp16 on older GPUs, fp32 on CPU)",
                        choices=DTYPE_NAMES)


@dataclass
class RuntimeOptions(DeviceOptions):
    """DeviceOptions, and compilation: for the commands that train."""

    compile: bool | None = option(None, "torch.compile the model (default: on for CUDA)")
    compile_backend: str = option("inductor", "torch.compile backend; if compiling fails, one warning and "
                                              "the run goes on uncompiled")


@dataclass
class LaunchOptions:
    """How the processes are started and spread over devices."""

    GROUP = "launch"
    nproc: str | None = option(None, "start torchrun with N processes, or 'auto' for one per visible GPU",
                               saved=False)
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state with FSDP2 (large models; "
                               "needs several processes: torchrun or --nproc)")
    dist_timeout: float = option(600.0, "seconds before a collective gives up when a rank is lost", saved=False)
    max_restarts: int = option(0, "with --nproc: restart the workers up to N times when one fails (needs "
                                  "--resume auto: each restart continues from the latest checkpoint)",
                               parse="nonneg_int", metavar="N", saved=False)


@dataclass
class StallOptions:
    """The stall watchdog of a training run (listed with the launch options)."""

    GROUP = "launch"
    stall_timeout: float | None = option(None, "seconds without a finished step after which every rank writes its "
                                         "Python stacks to RUN/stalls/ and exits with status 3, for the launcher "
                                         "to restart the job; 0: never (default: 1800 with several ranks, "
                                         "none with one)", parse="float", metavar="SECONDS", saved=False)


@dataclass
class PlanOptions:
    """The memory plan printed instead of training."""

    GROUP = "memory plan"
    dry_run: bool = option(False, "print the memory plan per GPU (as `gptlab plan`) and exit without training",
                           saved=False)
    gpu_memory: str | None = option(None, "memory of one GPU for the plan's fits check, e.g. 80GB or 24GiB",
                                    saved=False)
    bench: str | None = option(None, "the plan's tokens/s, time to finish and GPU-hours from this `gptlab bench "
                                     "--json` result (its tokens/s per rank times the ranks planned)", saved=False,
                               metavar="FILE")
    mfu: float | None = option(None, "without --bench: the tokens/s from this model FLOPs utilisation (0.4 is "
                                     "40%) of the peak of --gpu or --peak-tflops", saved=False, metavar="FRACTION")
    gpu: str | None = option(None, "the GPU the plan is for (H100, A100, L4, ...): its datasheet peak, for --mfu",
                             saved=False, metavar="NAME")
    peak_tflops: float | None = option(None, "the device's peak TFLOP/s for MFU where the built-in table has none",
                                       saved=False)
    gpu_hour_price: float | None = option(None, "the plan's cost: this price of one GPU-hour times its GPU-hours",
                                          saved=False, metavar="PRICE")
    json: bool = option(False, "print one JSON object instead of a table", saved=False)


@dataclass
class TrainConfig(_Saved, PlanOptions, StallOptions, LaunchOptions, RuntimeOptions, BatchOptions, ModelShapeOptions):
    """Everything `gptlab train` needs: the shared groups (model shape, batch, runtime, launch, the
    memory plan) and the recipe below. Flags are the --kebab-case forms of the fields; config.json
    holds to_dict(), every field but the launch-only ones."""

    GROUP = "training"
    data: str = option("data/shakespeare", "prepared dataset directory (from `gptlab prepare`), or streamed: an "
                       "http(s) URL of one, or hf://datasets/OWNER/NAME[/DIR] (llm.c shards on the hub)")
    data_cache: str | None = option(None, "streamed --data: where shards wait while in use "
                                          "(default: $GPTLAB_CACHE/data, else ~/.cache/gptlab/data)")
    data_disk_budget: int | str = option("10G", "streamed --data: most disk the cache may hold, val split "
                                                "included (K/M/G suffixes; divided among ranks)", parse="size")
    out: str = option("runs/run", "run directory: config, metrics, checkpoints, plots, samples")
    init_from: str | None = option(None, "start from pretrained weights: a hub id (gpt2), an HF or gptlab model "
                                         "directory")
    total_batch_tokens: int = option(524288, "global batch per optimizer step, in tokens (sets gradient "
                                             "accumulation)", parse="count")
    max_steps: int | None = option(19073, "optimizer steps to run (overridden by --max-tokens or --epochs)",
                                   parse="positive_int")
    max_tokens: int | None = option(None, "train on this many tokens (K/M/B suffixes), instead of --max-steps",
                                    parse="count")
    epochs: float | None = option(None, "train for this many passes over the train split, instead of --max-steps")
    lr: float = option(6e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak")
    schedule: str = option("cosine", "learning-rate schedule: cosine | linear | constant | wsd")
    warmup_steps: int = option(715, "linear warm-up steps")
    warmup_frac: float | None = option(None, "warm-up as a fraction of the steps (overrides --warmup-steps)")
    decay_frac: float = option(0.2, "wsd: fraction of the steps spent decaying at the end")
    weight_decay: float = option(0.1, "AdamW weight decay, on 2-D weights only")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    optimizer: str = option("adamw", "adamw (the GPT-3 recipe) | muon (torch.optim.Muon on the blocks' 2-D "
                            "weights, AdamW with --lr on the embeddings, head, biases and gains)")
    muon_lr: float = option(0.02, "Muon's peak learning rate (Keller Jordan's scale: adjust_lr_fn='original')")
    muon_momentum: float = option(0.95, "Muon's Nesterov momentum")
    muon_weight_decay: float = option(0.0, "Muon's decoupled weight decay (on the blocks' 2-D weights)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 turns clipping off)")
    eval_every: int = option(250, "evaluate (val loss, HellaSwag, samples) every N steps; 0 turns it off")
    eval_tokens: int = option(10_485_760, "validation tokens per evaluation", parse="count")
    hellaswag: bool = option(False, "also run HellaSwag at each evaluation (needs a file or a cached copy)")
    hellaswag_file: str | None = option(None, "local HellaSwag jsonl file")
    hellaswag_limit: int | None = option(None, "evaluate only the first N HellaSwag items")
    eval_tasks: str | None = option(None, "also run these lm-evaluation-harness tasks (T1,T2) at each "
                                          "evaluation, on rank 0 (needs the eval extra)")
    eval_tasks_limit: int = option(100, "--eval-tasks: the first N documents of each task (0: all)")
    eval_include_path: str | None = option(None, "--eval-tasks: a directory of your own task YAML files")
    sample_tokens: int = option(32, "tokens per sample drawn at each evaluation (0 turns samples off)")
    num_samples: int = option(2, "samples per prompt at each evaluation")
    checkpoint_every: int = option(1000, "write a checkpoint every N steps (0: only at the end and on signals)")
    keep_checkpoints: int = option(3, "keep the newest K checkpoints (0 keeps all)")
    overfit_batch: bool = option(False, "sanity check: repeat one batch until the loss is near zero")
    tensorboard: bool = option(False, "also log to TensorBoard in RUN/tensorboard")
    wandb: bool = option(False, "also log to Weights & Biases (set WANDB_MODE=offline to stay offline)")
    wandb_project: str = option("gptlab", "Weights & Biases project")
    skip_nonfinite: int = option(0, "skip up to N steps whose loss or gradient norm is NaN/inf (no update), "
                                    "then stop; 0 stops at the first")
    skip_spikes: float = option(0.0, "skip the update of a step whose loss is more than Z standard deviations "
                                     "above the mean of the last --spike-window applied steps; 0 turns it off",
                                metavar="Z")
    spike_window: int = option(100, "--skip-spikes: how many recent applied steps' losses give the mean and "
                                    "deviation; nothing is skipped before that many are in", parse="positive_int",
                                metavar="N")
    spike_rollback: int = option(0, "--skip-spikes: after K skipped spikes within --spike-rollback-window "
                                    "steps, roll back to the newest scheduled checkpoint before the first of "
                                    "them and go on past their batches; 0 turns it off", metavar="K",
                                 parse="nonneg_int")
    spike_rollback_window: int = option(100, "--spike-rollback: the window of steps in which K skips roll back",
                                        parse="positive_int", metavar="W")

    @classmethod
    def for_model(cls, model: str = "gpt2", **overrides: Any) -> "TrainConfig":
        """The config `gptlab train --model MODEL` starts from: the preset's training defaults
        (TRAIN_PRESETS: tiny trains 60 small steps, not the gpt2 recipe), then `overrides` (fields by
        name; None means the preset's value). What Python code should build a TrainConfig with."""
        return resolve_train_config({**overrides, "model": model})

    def check_recipe(self) -> None:
        """Refuse a config whose training defaults are the gpt2 recipe's while its model is another
        preset: TrainConfig(model="tiny") keeps batch 32, 524,288 tokens a step, 19,073 steps.
        A config from for_model or resolve_train_config (the CLI's) passes as it is."""
        if getattr(self, "_preset_applied", None) == self.model:
            return
        own = TRAIN_PRESETS.get(self.model, {})
        gpt2 = {name: TrainConfig.__dataclass_fields__[name].default for name in own}
        kept = [f"{n}={gpt2[n]!r}" for n, v in own.items() if getattr(self, n) == gpt2[n] != v]
        if kept:
            raise UserError(
                f"TrainConfig(model={self.model!r}) keeps the gpt2 recipe's {', '.join(kept)}; build it with "
                f"TrainConfig.for_model({self.model!r}, ...) for the {self.model} preset's defaults (as "
                f"`gptlab train --model {self.model}`), or set those fields")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """A saved config (config.json's "train"). Launch-only keys, which runs written by earlier
        versions recorded, are dropped: a resume takes them from its own command line."""
        return _from_dict(cls, {k: v for k, v in d.items() if k not in launch_only(cls)}, "train config")

    def validate(self) -> None:
        from gptlab.optim import OPTIMIZERS, SCHEDULES  # (torch) only where a run is about to start

        _check(self.batch_checks() + [
            (self.total_batch_tokens > 0, "--total-batch-tokens must be positive"),
            (self.lr > 0, "--lr must be positive"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.warmup_frac is None or 0 <= self.warmup_frac < 1, "--warmup-frac must be in [0, 1)"),
            (0 < self.decay_frac <= 1, "--decay-frac must be in (0, 1]"),
            (self.max_steps is None or self.max_steps > 0, "--max-steps must be positive"),
            (self.max_tokens is None or self.max_tokens > 0, "--max-tokens must be positive"),
            (self.epochs is None or self.epochs > 0, "--epochs must be positive"),
            (self.eval_every >= 0, "--eval-every must be >= 0"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
            (self.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0"),
            (self.eval_tokens > 0, "--eval-tokens must be positive"),
            (self.sample_tokens >= 0, "--sample-tokens must be >= 0"),
            (self.num_samples > 0, "--num-samples must be positive"),
            (self.skip_nonfinite >= 0, "--skip-nonfinite must be >= 0"),
            (math.isfinite(self.skip_spikes) and self.skip_spikes >= 0,
             "--skip-spikes must be a number >= 0 (0 turns it off)"),
            (self.spike_window >= 2, "--spike-window must be at least 2 (a deviation needs two losses)"),
            (self.spike_rollback >= 0, "--spike-rollback must be >= 0"),
            (self.spike_rollback == 0 or self.skip_spikes > 0,
             "--spike-rollback needs --skip-spikes Z (it counts the spikes that skipped their update)"),
            (self.spike_rollback_window >= 1, "--spike-rollback-window must be positive"),
            (self.stall_timeout is None or self.stall_timeout >= 0, "--stall-timeout must be >= 0 (0: no watchdog)"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.muon_lr > 0 and 0 <= self.muon_momentum < 1 and self.muon_weight_decay >= 0,
             "--muon-lr must be positive, --muon-momentum in [0, 1), --muon-weight-decay >= 0"),
            (self.eval_tasks_limit >= 0, "--eval-tasks-limit must be >= 0"),
            (not (self.fsdp and self.eval_tasks), "--eval-tasks runs the whole model in one process and does "
                                                  "not work with --fsdp; evaluate a checkpoint with "
                                                  "`gptlab eval RUN --tasks`"),
        ])

    def grad_accum_steps(self, seq_len: int, world_size: int, batch_size: int | None = None) -> int:
        """Micro-steps per optimizer step, with a message that says which numbers divide."""
        batch_size = self.batch_size if batch_size is None else batch_size
        total = self.total_batch_tokens
        per_micro = batch_size * seq_len * world_size
        if total % per_micro != 0:
            if total % (seq_len * world_size) != 0:
                raise UserError(
                    f"--total-batch-tokens {total} is not a multiple of seq_len x ranks = {seq_len} x "
                    f"{world_size} = {seq_len * world_size}; try "
                    f"{max(1, total // (seq_len * world_size)) * seq_len * world_size}"
                )
            seqs = total // (seq_len * world_size)  # sequences per rank per step
            options = [b for b in range(1, seqs + 1) if seqs % b == 0]
            shown = ", ".join(str(b) for b in options if b <= 1024)
            raise UserError(
                f"--batch-size {batch_size} does not divide the global batch: {total} tokens = "
                f"{seqs} sequences of {seq_len} per rank over {world_size} rank(s); use a batch size in: {shown}"
            )
        return total // per_micro

    def total_steps(self, tokens_per_epoch: int) -> int:
        """Optimizer steps of the run: from --max-tokens, else --epochs, else --max-steps."""
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / self.total_batch_tokens))
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * tokens_per_epoch / self.total_batch_tokens))
        assert self.max_steps is not None
        return self.max_steps

    def warmup_for(self, steps: int) -> int:
        """Warm-up steps of a run of `steps` steps: --warmup-frac of them, else --warmup-steps."""
        if self.warmup_frac is not None:
            return int(round(self.warmup_frac * steps))
        return self.warmup_steps


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
MODEL_FIELDS = tuple(f.name for f in fields(ModelShapeOptions)) + ("init_from",)
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
    cfg = _from_dict(TrainConfig, values, "train config")  # launch options from flags or --config kept
    cfg._preset_applied = model  # check_recipe: the preset's defaults are in
    return cfg


@dataclass
class BenchConfig(LaunchOptions, RuntimeOptions, BatchOptions, ModelShapeOptions):
    """What `gptlab bench` measures. Flags are the --kebab-case forms of the fields."""

    GROUP = "bench"
    seed: int = redefault(BatchOptions, "seed", 0)
    batch_size: int | str = redefault(BatchOptions, "batch_size", 8)
    steps: int = option(10, "timed training steps", parse="positive_int")
    warmup: int = option(3, "untimed steps first (compilation happens here)", parse="nonneg_int")
    peak_tflops: float | None = option(None, "the device's peak TFLOP/s for MFU where the built-in table has none")
    json: bool = option(False, "print one JSON object instead of a table")

    def validate(self) -> None:
        _check(self.batch_checks() + [
            (self.steps >= 1 and self.warmup >= 0, "--steps must be >= 1 and --warmup >= 0"),
            (self.peak_tflops is None or self.peak_tflops > 0, "--peak-tflops must be positive"),
        ])


MODEL_HELP = ("a run directory (its latest checkpoint), a checkpoint or model directory, a local Hugging Face "
              "GPT-2 directory, or a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, owner/name)")


@dataclass
class ServeConfig(DeviceOptions):
    """What `gptlab serve` serves, and the limits on what a request may ask."""

    GROUP = "serving"
    model: str = option("", MODEL_HELP, positional=True, metavar="MODEL")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "port to listen on, 0 to 65535 (0: any free port)", parse="port")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 requests (default: none)",
                                 metavar="KEY")
    max_batch: int = option(32, "sequences decoded together; more wait for a free row", parse="positive_int",
                            metavar="N")
    max_tokens_cap: int = option(1024, "the largest max_tokens a request may ask for", parse="positive_int",
                                 metavar="N")
    max_n: int = option(16, "the largest n (completions per prompt) a request may ask for; also at most "
                            "--max-batch", parse="positive_int", metavar="N")
    max_prompts: int = option(64, "largest list of prompts in one request", flag=False)
    max_body_bytes: int = option(1 << 20, "request bodies above this get 413", flag=False)
    model_name: str | None = option(None, "the model id /v1/models reports (default: MODEL's last path part)",
                                    metavar="NAME")

    def validate(self) -> None:
        _check([(self.max_batch >= 1, f"--max-batch must be at least 1, got {self.max_batch}"),
                (0 <= self.port <= 65535, f"--port must be from 0 to 65535, got {self.port}")])


def _flag_value(flags: dict[str, Any], name: str, default: Any, cast: Callable, ok: Callable, want: str):
    """A flag's text as a value, checked here rather than by argparse so that a bad value is one
    line (a UserError); None (not given) is the default."""
    text = flags.get(name)
    if text is None:
        return default
    try:
        value = cast(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not ok(value):
        raise UserError(f"--{name.replace('_', '-')}: expected {want}, got {text!r}")
    return value


@dataclass
class SampleConfig(DeviceOptions):
    """What `gptlab sample` draws."""

    GROUP = "sampling"
    model: str = option("", MODEL_HELP, positional=True, metavar="MODEL")
    prompt: list[str] | None = option(None, "text to continue; repeat for several prompts (default: none, start "
                                            "from <|endoftext|>)", action="append", parse="text", metavar="TEXT")
    prompt_file: list[str] | None = option(None, "a file whose whole content is one prompt; repeatable, after "
                                                 "any --prompt", action="append", parse="text", metavar="FILE")
    num_samples: int = option(1, "samples per prompt, drawn together as one batch", parse="text", metavar="N")
    max_new_tokens: int = option(100, "new tokens per sample (fewer if the context fills up or the sample ends "
                                      "with <|endoftext|>)", parse="text", metavar="N")
    temperature: float = option(1.0, "softmax temperature; 0 is greedy decoding", parse="text", metavar="T")
    top_k: int = option(50, "sample among the K most likely tokens; 0 turns it off", parse="text", metavar="K")
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens holding P of the probability; "
                               "1 turns it off", parse="text", metavar="P")
    seed: int | None = option(None, "random seed for reproducible samples (default: a new draw each run)",
                              parse="text", metavar="N")
    json: bool = option(False, 'print one JSON object {"model", "samples": [{"prompt", "text", "tokens"}]} '
                               'instead of streaming text', action="store_true")

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> "SampleConfig":
        """The config from parsed flags (None: not given); the sampling numbers, given as text, are
        checked here so that a bad value is one line and exit status 2."""
        d = {f.name: f.default for f in fields(cls)}

        def num(name: str, cast: Callable, ok: Callable, want: str):
            return _flag_value(flags, name, d[name], cast, ok, want)

        return cls(**{**d, **{k: v for k, v in flags.items() if v is not None},
                      "num_samples": num("num_samples", int, lambda v: v >= 1, "an integer >= 1"),
                      "max_new_tokens": num("max_new_tokens", int, lambda v: v >= 1, "an integer >= 1"),
                      "temperature": num("temperature", float, lambda v: math.isfinite(v) and v >= 0,
                                         "a number >= 0 (0 is greedy)"),
                      "top_k": num("top_k", int, lambda v: v >= 0, "an integer >= 0 (0 turns it off)"),
                      "top_p": num("top_p", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                      "seed": num("seed", int, lambda v: 0 <= v < 2**63, "a non-negative integer")})

    def sampling(self) -> dict[str, Any]:
        """The keyword arguments of generate.sample_text."""
        return dict(num_samples=self.num_samples, max_new_tokens=self.max_new_tokens,
                    temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass
class EvalConfig(DeviceOptions):
    """What `gptlab eval` measures. None means a flag was not given (the default its text names)."""

    GROUP = "evaluation"
    model: str = option("", "a run directory (its latest checkpoint), a checkpoint or model directory, a Hugging "
                            "Face directory, or a hub id such as gpt2", positional=True, metavar="MODEL")
    hellaswag: bool = option(False, "HellaSwag accuracy, completion and harness scoring (downloads the data "
                                    "once)", action="store_true")
    hellaswag_file: str | None = option(None, "read HellaSwag items from this local jsonl file (implies "
                                              "--hellaswag)", metavar="PATH")
    split: str = option("val", "which HellaSwag split to download (the test split has no labels)",
                        choices=("val", "train", "test"))
    cache_dir: str | None = option(None, "where downloads are kept (default: $GPTLAB_CACHE, else "
                                         "~/.cache/gptlab)", metavar="DIR")
    limit: int | None = option(None, "only the first N HellaSwag items, and N documents of each --tasks task "
                                     "(default: all)", parse="positive_int", metavar="N")
    val: str | None = option(None, "validation loss over the val split of this prepared dataset", metavar="DIR")
    val_tokens: int | None = option(None, "at most N val tokens, e.g. 10M (default: the whole split)",
                                    parse="count", metavar="N")
    batch_size: int | None = option(None, "HellaSwag items per forward pass (default 16); val windows per batch "
                                          "(default 8); task continuations per forward pass (default 32)",
                                    parse="positive_int", metavar="N")
    tasks: str | None = option(None, "lm-evaluation-harness tasks, groups or tags, comma-separated (needs "
                                     "gptlab[eval]; hub tasks download their datasets)", metavar="T1,T2")
    include_path: str | None = option(None, "also read harness task YAML files from DIR (with --tasks)",
                                      metavar="DIR")
    num_fewshot: int | None = option(None, "few-shot examples per task prompt (default: each task's own)",
                                     parse="nonneg_int", metavar="K")
    json: bool = option(False, "print one JSON object instead of a table", action="store_true")

    def task_names(self) -> tuple[str, ...] | None:
        """The --tasks names; None without --tasks. The task-only flags need --tasks."""
        names = tuple(t.strip() for t in (self.tasks or "").split(",") if t.strip())
        if names:
            return names
        for flag in ("include_path", "num_fewshot"):
            if getattr(self, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} applies to harness tasks; add --tasks T1,T2")
        if self.tasks is not None:
            raise UserError("--tasks needs at least one task name")
        return None
