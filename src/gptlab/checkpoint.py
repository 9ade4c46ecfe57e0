"""The ONLY code that knows the model-directory and checkpoint layouts.

Model directory: config.json (the ModelConfig) + model.safetensors (the raw model's weights, no
`_orig_mod.` or `module.` prefixes, the tied head stored once as transformer.wte.weight).
Checkpoint: a model directory + optimizer.pt (tensors only) + state.json, written whole or not at all.
Sharded checkpoint (FSDP runs): config.json + state.json + one DCP shard per rank + DCP's index (below).
state.json is a TrainState (the step, data position, RNG states, ...); its `format_version` is the
version of the whole checkpoint directory (STATE_VERSION; a state.json without one is version 1,
written before versions, and loads as it is). Where checkpoints live inside a run is rundir.py's;
the Checkpointer writes them, then marks `latest` and prunes, for both formats.
Nothing is ever unpickled from a file.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import random
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from safetensors import SafetensorError as SafetensorsError  # the class is SafetensorError (no s)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptlab import dist
from gptlab.atomic import DiskFullError, StagedDir, file_mode, staged_dir, write_json
from gptlab.config import ModelConfig, read_json
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.parallel import full_optimizer_state, gradients_set_aside
from gptlab.weights import clean_state_dict, load_weights, model_state_dict, raw_model
from gptlab import hf
from gptlab import tokenizer
from gptlab.rundir import RunDir

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
CONFIG_MAX_BYTES = 1 << 20  # a model config is a few hundred bytes; anything near this is not one


def _write_model_files(model: torch.nn.Module, path: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    cfg: ModelConfig = raw_model(model).config
    write_json(path / CONFIG, cfg.to_dict())
    if weights is None:
        weights = model_state_dict(model)
    else:  # already gathered (FSDP): same cleaning
        weights = {k: v.detach().to("cpu").contiguous() for k, v in clean_state_dict(weights).items()}
    save_file(weights, str(path / WEIGHTS), metadata={"format": "pt", "producer": "gptlab"})
    tokenizer.copy_tokenizer(tokenizer.model_tokenizer(raw_model(model)), path / tokenizer.DATA_TOKENIZER_DIR)
    _write_chat(model, path)
    os.chmod(path / WEIGHTS, file_mode())  # safetensors creates it 0600; readable as config.json beside it


def _write_chat(model: torch.nn.Module, path: Path) -> None:
    """A chat model's chat.json: its template, special tokens and Jinja chat_template."""
    from gptlab import chat

    record = chat.chat_record(raw_model(model))
    if record is not None:
        write_json(path / chat.CHAT_FILE, record)


def save_model(model: torch.nn.Module, path: str | Path) -> Path:
    """Write a model directory whole or not at all (atomic.staged_dir)."""
    path = Path(path)
    with staged_dir(path) as tmp:
        _write_model_files(model, tmp)
    return path


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        return False
    try:
        cfg = read_json(path / CONFIG)
    except UserError:
        return False
    return "model_type" not in cfg and "n_layer" in cfg


def read_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a model directory, checked against its weights file before anything of
    that size is allocated: a crafted config cannot ask for a model its weights do not hold."""
    path = Path(path)
    cfg = ModelConfig.from_dict(read_json(path / CONFIG, max_bytes=CONFIG_MAX_BYTES))
    if (path / WEIGHTS).is_file():
        stored = _stored_numel(path / WEIGHTS)
        if stored != cfg.num_params():
            raise UserError(f"{path / WEIGHTS}: weights do not match the config ({CONFIG} describes a model of "
                            f"{cfg.num_params():,} parameters, the weights hold {stored:,} values)")
    return cfg


def _stored_numel(weights: Path) -> int:
    """Values in a safetensors file, from its header alone (nothing is loaded)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (SafetensorsError, OSError, ValueError) as e:
        raise UserError(f"{weights}: unreadable weights ({e})") from None


def check_finite(model: torch.nn.Module, source: str) -> None:
    """One line if any weight is NaN or infinite: such a model can only produce NaN."""
    bad = [n for n, p in raw_model(model).named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"{source}: non-finite weights (NaN or inf) in {len(bad)} tensor(s), first {bad[0]}; "
                        f"this model is unusable: use an earlier checkpoint")


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A GPT from a gptlab model (or checkpoint) directory."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such model directory")
    if is_sharded_checkpoint(path):  # an FSDP run's checkpoint: consolidated here, on the CPU
        return load_sharded_model(path).to(device)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise UserError(f"{path}: not a model directory (no {name})")
    cfg = read_model_config(path)
    try:
        sd = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorsError, OSError, ValueError) as e:
        raise UserError(f"{path / WEIGHTS}: unreadable weights ({e})") from None
    hf.note_dtypes(sd, str(path / WEIGHTS))
    model = GPT(cfg)
    load_weights(model, sd, source=str(path / WEIGHTS))
    check_finite(model, str(path / WEIGHTS))
    tokenizer.set_model_tokenizer(model, tokenizer.read_model_dir_tokenizer(path))
    return model.to(device)


# ----------------------------------------------------------------------------- MODEL specs

def resolve_model_path(spec: str | Path) -> Path | None:
    """The model directory that `spec` names if it is a gptlab run, checkpoint or model
    directory; None if it is something else (a Hugging Face directory or hub id)."""
    path = Path(spec)
    if not path.exists():
        return None
    if RunDir(path).is_run():
        ckpt = RunDir(path).latest_checkpoint()
        if ckpt is None:
            raise UserError(f"{path}: run directory has no complete checkpoint yet")
        return ckpt
    if is_model_dir(path) or is_sharded_checkpoint(path):
        return path
    if (path / "model").is_dir() and is_model_dir(path / "model"):
        return path / "model"
    return None


def load_model(spec: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, str]:
    """A GPT from anything the CLI accepts as MODEL: a run directory (its latest checkpoint), a
    checkpoint or model directory, a local Hugging Face directory, or a hub id.
    Returns the model (eval mode, on device) and a description of where it came from."""
    local = resolve_model_path(spec)
    if local is not None:
        model = load_model_dir(local, device)
        where = str(local)
    else:
        path = Path(spec)
        if path.exists():
            if path.is_dir() and (path / "config.json").is_file():
                model = hf.load_hf_dir(path)
            elif path.is_dir():
                raise UserError(f"{path}: not a model directory (no config.json and model weights)")
            else:
                raise UserError(f"{path}: is a file, not a model directory")
            where = str(path)
        elif hf.looks_like_hub_id(str(spec)):
            model = hf.load_hub(str(spec))
            where = f"hub:{spec}"
        else:
            raise UserError(f"{spec}: no such model directory, and not a Hugging Face hub id")
        check_finite(model, where)
        model = model.to(device)
    model.eval()
    return model, where


# ----------------------------------------------------------------------------- training checkpoints

def optimizer_to_files(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for optimizer.pt) and plain JSON (param groups
    and any non-tensor per-parameter values), so optimizer.pt holds tensors only. Keys are
    parameter names (torch.distributed.checkpoint's full state dict), so DDP, FSDP and a single
    process all read and write the same files."""
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict] = {}
    for idx, pstate in opt_state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                plain_state.setdefault(str(idx), {})[name] = value
    groups = []
    for g in opt_state["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "plain_state": plain_state}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    def key(idx: str):
        return int(idx) if idx.isdigit() else idx

    state: dict = {}
    for k, value in tensors.items():
        idx, name = k.split("/", 1)
        state.setdefault(key(idx), {})[name] = value
    for idx, values in meta.get("plain_state", {}).items():
        state.setdefault(key(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(final: str | Path, model: torch.nn.Module, optimizer_state: dict | None, state: dict,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint directory at `final` whole or not at all (atomic.staged_dir: a temporary
    sibling, flushed, then renamed). `state` must be JSON-serialisable. `weights`, when given, is
    the model's already-gathered full state dict (FSDP). Where checkpoints live is the run
    directory's business. A full disk is one DiskFullError naming it; the temporary directory is
    removed either way."""
    final = Path(final)
    with staged_dir(final) as tmp:
        _write_model_files(model, tmp, weights)
        state = dict(state)
        if optimizer_state is not None:
            tensors, meta = optimizer_to_files(optimizer_state)
            # the names and shapes, so a resume can tell a truncated or swapped optimizer.pt
            meta["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
            with open(tmp / OPTIMIZER, "wb") as f:  # a file object: a failed write is an OSError
                torch.save(tensors, f)
            state["optimizer"] = meta
        write_json(tmp / STATE, state)
    return final


def load_checkpoint_state(ckpt: str | Path, param_shapes: dict[str, tuple[int, ...]] | None = None,
                          ) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """state.json and the optimizer tensors of a checkpoint (weights_only: nothing unpickled),
    every value checked before it is used. With param_shapes (parameter name -> shape), the
    optimizer state is required and must fit those parameters: a resume is exact or refused."""
    ckpt = Path(ckpt)
    state = read_json(ckpt / STATE)
    check_state(state, ckpt / STATE, RESUME_KEYS if param_shapes is not None else ("step",))
    tensors = None
    opt_path = ckpt / OPTIMIZER
    if opt_path.is_file():
        if opt_path.stat().st_size == 0:
            raise UserError(f"{opt_path}: empty; the optimizer state of this checkpoint is lost")
        try:
            tensors = torch.load(opt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # refused (needs pickle) or corrupt
            raise UserError(f"{opt_path}: cannot be loaded safely ({str(e).splitlines()[0]})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise UserError(f"{opt_path}: expected a dict of tensors")
    if param_shapes is not None:
        if tensors is None or "optimizer" not in state:
            missing = OPTIMIZER if tensors is None else f"the optimizer entry of {STATE}"
            raise UserError(f"{ckpt}: no optimizer state ({missing} is missing); a resume would restart AdamW "
                            f"and not continue the run exactly. Start a new run with --init-from {ckpt} instead")
        check_optimizer(tensors, state["optimizer"], param_shapes, opt_path)
    return state, tensors


def checkpoint_step(ckpt: str | Path) -> int:
    """The step a checkpoint was saved at (state.json, checked)."""
    state = read_json(Path(ckpt) / STATE)
    check_state(state, Path(ckpt) / STATE)
    return state["step"]


def load_checkpoint_weights(ckpt: str | Path, model: torch.nn.Module) -> None:
    ckpt = Path(ckpt)
    try:
        sd = load_file(str(ckpt / WEIGHTS), device="cpu")
    except (SafetensorsError, OSError, ValueError) as e:
        raise UserError(f"{ckpt / WEIGHTS}: unreadable weights ({e})") from None
    load_weights(raw_model(model), sd, source=str(ckpt / WEIGHTS))
    check_finite(model, str(ckpt / WEIGHTS))


# ----------------------------------------------------------------------------- state.json: TrainState

STATE_VERSION = 2
"""The checkpoint format this gptlab writes. 1: state.json without `format_version` (gptlab before
versions); 2: the same fields, with `format_version` (the --skip-spikes fields were added to 2 with
defaults, so a state.json without them loads as before). Both load."""


@dataclass
class TrainState:
    """Everything beyond weights and optimizer tensors that a resume restores: state.json."""

    step: int
    tokens: int = 0
    nonfinite_skipped: int = 0
    """Steps whose update a non-finite loss or gradient norm kept out (--skip-nonfinite)."""
    data_fingerprint: str | None = None
    """The dataset's content digest (data.fingerprint); None for streamed data."""
    loader: dict = field(default_factory=dict)
    """The data loader's position (TrainLoader.state_dict)."""
    grad_scaler: dict | None = None
    config: dict = field(default_factory=dict)
    """{"model": ..., "train": ...} as the run was configured at this step."""
    world_size: int = 1
    rng: list = field(default_factory=list)
    """Every rank's RNG states (rng_state), so a same-size resume is exact on every rank."""
    optimizer: dict | None = None
    """The optimizer's param groups and plain values (written by save_checkpoint / the sharded writer)."""
    format: str | None = None
    """The layout: SHARDED_FORMAT ("dcp") for a sharded checkpoint, None for the single-file one."""
    spike_losses: list = field(default_factory=list)
    """--skip-spikes: the losses of the recent applied steps (oldest first) that the next step's loss
    is compared with."""
    spike_skipped: int = 0
    """Steps whose update --skip-spikes kept out."""
    spike_recent: list = field(default_factory=list)
    """--spike-rollback: the steps skipped as spikes since the last rollback, within its window."""
    rollbacks: list = field(default_factory=list)
    """--spike-rollback: every rollback so far, {"step", "checkpoint_step", "skips", "discarded":
    [first, last]} (the steps whose batches and updates it discarded)."""
    format_version: int = STATE_VERSION

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None or k in ("data_fingerprint", "grad_scaler")}

    @classmethod
    def from_json(cls, d: dict, path: Path, required: tuple[str, ...] = ("step",)) -> "TrainState":
        """A checked TrainState from state.json's object, of any version this gptlab knows."""
        check_state(d, path, required)  # version 1 (no format_version) has the same fields
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known}, "format_version": STATE_VERSION})

    def restore_rng(self, rank: int, world_size: int, seed: int) -> None:
        """This rank's saved RNG states; a resume on another world size reseeds instead."""
        if rank < len(self.rng) and self.world_size == world_size:
            set_rng_state(self.rng[rank])
        else:
            torch.manual_seed(seed + rank + self.step)


def read_train_state(ckpt: str | Path, param_shapes: dict[str, tuple[int, ...]] | None = None,
                     ) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """A checkpoint's TrainState and optimizer tensors, checked (see load_checkpoint_state)."""
    state, tensors = load_checkpoint_state(ckpt, param_shapes)
    required = RESUME_KEYS if param_shapes is not None else ("step",)
    return TrainState.from_json(state, Path(ckpt) / STATE, required), tensors


def rng_state() -> dict:
    """This process's RNG states (torch, Python, CUDA where initialised) as JSON."""
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": _py_state_to_json(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_py_state_from_json(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def all_rng_states() -> list[dict]:
    """Every rank's rng_state(), in rank order (collective when a process group exists)."""
    local = rng_state()
    if not (tdist.is_available() and tdist.is_initialized()):
        return [local]
    states: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(states, local)
    return states


def _py_state_to_json(s) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _py_state_from_json(s) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


# ----------------------------------------------------------------------------- checks on loaded state

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _bytes_list(v: Any, n: int | None = None) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(_is_int(b) and 0 <= b < 256 for b in v))


def _rng_ok(r: Any) -> bool:
    """One rank's RNG states as rng_state writes them."""
    if not isinstance(r, dict) or not _bytes_list(r.get("torch"), torch.get_rng_state().numel()):
        return False
    py = r.get("python")
    if not (isinstance(py, list) and len(py) == 3 and _is_int(py[0]) and isinstance(py[1], list)
            and len(py[1]) == 625 and all(_is_int(x) and 0 <= x < 2**32 for x in py[1])
            and (py[2] is None or _is_num(py[2]))):
        return False
    return all(_bytes_list(c) for c in r.get("cuda", []))


RESUME_KEYS = ("step", "tokens", "loader")  # what a resume cannot do without


def check_state(state: dict, path: Path, required: tuple[str, ...] = ("step",)) -> None:
    """Every value a resume reads from state.json, checked: one line naming the first bad one."""
    def bad(key: str, want: str) -> UserError:
        shown = repr(state.get(key))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return UserError(f"{path}: {key} must be {want}, got {shown}")

    version = state.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise bad("format_version", "a positive integer")
    if version > STATE_VERSION:
        raise UserError(f"{path}: checkpoint format {version} is newer than this gptlab reads "
                        f"(up to {STATE_VERSION}); upgrade gptlab to load it")
    for key in required:
        if key not in state:
            raise UserError(f"{path}: no {key!r}; not the state of a training checkpoint")
    for key in ("step", "tokens"):
        if key in state and (not _is_int(state[key]) or state[key] < 0):
            raise bad(key, "a non-negative integer")
    if "loader" in state and not isinstance(state["loader"], dict):
        raise bad("loader", "an object (the data loader's position)")
    if "world_size" in state and (not _is_int(state["world_size"]) or state["world_size"] < 1):
        raise bad("world_size", "a positive integer")
    if state.get("grad_scaler") is not None and not isinstance(state["grad_scaler"], dict):
        raise bad("grad_scaler", "an object or null")
    if not isinstance(state.get("rng", []), list) or not all(_rng_ok(r) for r in state.get("rng", [])):
        raise bad("rng", "a list of RNG states, one per rank")
    if "nonfinite_skipped" in state and (not _is_int(state["nonfinite_skipped"]) or state["nonfinite_skipped"] < 0):
        raise bad("nonfinite_skipped", "a non-negative integer")
    if "optimizer" in state:
        _check_optimizer_meta(state["optimizer"], path)
    _check_spike_state(state, bad)


def _check_spike_state(state: dict, bad) -> None:
    """The --skip-spikes / --spike-rollback fields (absent in checkpoints written before them)."""
    if not (isinstance(state.get("spike_losses", []), list) and all(_is_num(x) for x in state.get("spike_losses", []))):
        raise bad("spike_losses", "a list of finite numbers")
    if "spike_skipped" in state and (not _is_int(state["spike_skipped"]) or state["spike_skipped"] < 0):
        raise bad("spike_skipped", "a non-negative integer")
    recent = state.get("spike_recent", [])
    if not (isinstance(recent, list) and all(_is_int(s) and s > 0 for s in recent)):
        raise bad("spike_recent", "a list of step numbers")
    rollbacks = state.get("rollbacks", [])
    ok = isinstance(rollbacks, list) and all(
        isinstance(r, dict) and all(_is_int(r.get(k)) and r[k] >= 0 for k in ("step", "checkpoint_step"))
        and isinstance(r.get("skips"), list) and all(_is_int(s) for s in r["skips"])
        and isinstance(r.get("discarded"), list) and len(r["discarded"]) == 2 and all(_is_int(s) for s in r["discarded"])
        for r in rollbacks)
    if not ok:
        raise bad("rollbacks", 'a list of {"step", "checkpoint_step", "skips", "discarded"} objects')


def _check_optimizer_meta(meta: Any, path: Path) -> None:
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise UserError(f"{path}: optimizer.param_groups must be a non-empty list of objects")
    for g in groups:
        for key in ("lr", "eps", "weight_decay"):
            if key in g and not (_is_num(g[key]) and g[key] >= 0):
                raise UserError(f"{path}: optimizer {key} must be a finite number >= 0, got {g[key]!r}")
        betas = g.get("betas", [0.9, 0.95])
        if not (isinstance(betas, list) and len(betas) == 2 and all(_is_num(b) and 0 <= b < 1 for b in betas)):
            raise UserError(f"{path}: optimizer betas must be two numbers in [0, 1), got {betas!r}")
        if not isinstance(g.get("params"), list):
            raise UserError(f"{path}: optimizer param_groups need their list of params")
    if not isinstance(meta.get("plain_state", {}), dict):
        raise UserError(f"{path}: optimizer.plain_state must be an object")


def check_optimizer(tensors: dict[str, torch.Tensor], meta: dict, param_shapes: dict[str, tuple[int, ...]],
                    path: Path) -> None:
    """The optimizer tensors fit the model: AdamW's moments have their parameter's shape, every
    parameter in the param groups is a model parameter, and (for checkpoints that record them)
    the file holds exactly the tensors written."""
    listed = meta.get("tensors")
    if isinstance(listed, dict):
        got = {k: list(v.shape) for k, v in tensors.items()}
        if got != listed:
            diff = sorted(set(listed) ^ set(got)) or [k for k in listed if listed[k] != got.get(k)]
            raise UserError(f"{path}: holds other tensors than the checkpoint recorded (first difference: "
                            f"{diff[0]}); the file is damaged or from another checkpoint")
    for g in meta["param_groups"]:
        for name in g["params"]:
            if name not in param_shapes:
                raise UserError(f"{path}: optimizer state for {name!r}, which the model does not have")
    for key, value in tensors.items():
        name, _, kind = key.rpartition("/")
        if name not in param_shapes:
            raise UserError(f"{path}: optimizer tensor {key!r} belongs to no parameter of the model")
        if kind in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != tuple(param_shapes[name]):
            raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, the parameter has "
                            f"{tuple(param_shapes[name])}")
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise UserError(f"{path}: {key} is not a finite floating-point tensor")


# ----------------------------------------------------------------------------- sharded checkpoints (FSDP)
#
# A sharded checkpoint is a directory like the single-file one, except for the tensors:
#   config.json            the ModelConfig (rank 0)
#   state.json             step, loader, RNG, ... and the optimizer's param groups (rank 0)
#   __R_0.distcp           rank R's shard of the weights and AdamW moments (torch.distributed.checkpoint)
#   .metadata              DCP's index of every shard (global shapes, offsets, files)
# Every rank writes its own shard, from a background thread (async_save) after a copy to host memory,
# so training goes on meanwhile. The directory is written under a temporary name and renamed once
# the last shard and the index are on disk; `latest` and pruning follow, as for single files.
# Loading reshards to any world size, with or without FSDP; without a process group it reads the
# full tensors on the CPU (consolidation, for export/sample/eval).

DCP_METADATA = ".metadata"
SHARDED_FORMAT = "dcp"
_TIED_KEY = "lm_head.weight"  # the token embedding again: saved once, as transformer.wte.weight
_OPT_PREFIX = "optim/"

# what a DCP .metadata pickle may name: its own dataclasses, torch sizes/dtypes, plain containers
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any class of that module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch": {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
              "uint8", "bool", "strided", "contiguous_format", "preserve_format", "channels_last"},
    "torch.serialization": {"_get_layout"},  # a layout from its name
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "getattr"},
    "datetime": {"datetime", "timedelta", "timezone"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's index and nothing else: any other global in the file is refused."""

    def find_class(self, module: str, name: str):
        allowed = _METADATA_GLOBALS.get(module, set())
        if (allowed is None and module.startswith("torch.distributed.checkpoint")) or (allowed and name in allowed):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


@functools.lru_cache(maxsize=1)
def _safe_reader_class() -> type:
    """DCP's file reader, with its index read by the restricted unpickler above. Built on first use:
    torch.distributed.checkpoint takes 0.7 s to import, which every command that never reads a
    sharded checkpoint (sample, eval, a single-process train) should not pay."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / DCP_METADATA
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
                raise UserError(f"{path}: not a readable checkpoint index ({e})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def safe_reader(path: str | Path):
    return _safe_reader_class()(str(path))


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / DCP_METADATA).is_file() and (path / CONFIG).is_file()


def _sharded_tensors(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, list]:
    """The flat dict DCP reads and writes: model.<name> (DTensors under FSDP, plain tensors
    otherwise) and optim/<name>/<moment> (AdamW's moments, Muon's momentum buffers); plus every
    optimizer's param groups, in order (JSON, not DCP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items() if k != _TIED_KEY}
    groups: list = []
    if optimizers:
        osd = get_optimizer_state_dict(model, optimizers)
        for name, pstate in osd["state"].items():
            for moment, value in pstate.items():
                flat[f"{_OPT_PREFIX}{name}/{moment}"] = value
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return flat, groups


class ShardedWriter:
    """Writes sharded checkpoints; at most one save is in flight. Every rank calls save()
    (collective); rank 0 also writes the JSON files and renames the finished directory into
    place. Marking `latest` and pruning are the Checkpointer's."""

    def __init__(self, rank: int, use_async: bool = True):
        self.rank, self.use_async = rank, use_async
        self.pending: tuple[Any, Path, Path] | None = None  # (future, temp dir, final dir)
        self._stage: StagedDir | None = None  # rank 0: the directory being written
        self.group = None
        if tdist.is_available() and tdist.is_initialized():
            # the background writer's own gloo group: its collectives never interleave with training's
            self.group = tdist.new_group(backend="gloo")

    def save(self, final: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
             state: dict) -> None:
        """Start writing (the previous save must be finished: see wait)."""
        assert self.pending is None, "wait() for the save in flight first"
        tmp = self._temp_dir(final)
        flat, groups = _sharded_tensors(model, optimizers)
        if self.rank == 0:
            write_json(tmp / CONFIG, raw_model(model).config.to_dict())
            tokenizer.copy_tokenizer(tokenizer.model_tokenizer(raw_model(model)), tmp / tokenizer.DATA_TOKENIZER_DIR)
            _write_chat(model, tmp)
            write_json(tmp / STATE, {**state, "format": SHARDED_FORMAT, "optimizer": {"param_groups": groups}})
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
        if self.use_async:
            # stages a host copy of every shard now (so the next steps may change the weights),
            # then writes it from a thread
            fut = dcp.async_save(flat, storage_writer=writer, process_group=self.group)
        else:
            dcp.save(flat, storage_writer=writer, process_group=self.group)
            fut = None
        self.pending = (fut, tmp, final)

    def done(self) -> bool:
        return self.pending is not None and (self.pending[0] is None or self.pending[0].done())

    def wait(self) -> Path | None:
        """Block until the save in flight is written; rank 0 renames it into place. Its path, or None."""
        if self.pending is None:
            return None
        fut, _, final = self.pending
        self.pending = None
        try:
            if fut is not None:
                fut.result()
        except BaseException:
            if self.rank == 0:
                self._stage.discard()
            raise
        if self.rank == 0:
            self._stage.publish()
        return final

    def _temp_dir(self, final: Path) -> Path:
        """One temporary directory for every rank: rank 0 names and creates it, then tells the others."""
        name = [""]
        if self.rank == 0:
            self._stage = StagedDir(final)
            name[0] = self._stage.create().name
        if self.group is not None:
            tdist.broadcast_object_list(name, src=0, group=self.group)  # also: the directory exists now
        return final.parent / name[0]


class Checkpointer:
    """Writes the checkpoints of one run, in either format, and is the one place that marks
    `latest` and prunes (keep the newest `keep`, 0 keeps all), always after a checkpoint is whole.

    save() is collective: every rank calls it. Single-file (DDP or one process): the optimizer
    state is gathered by parameter name, rank 0 writes, every rank waits for it. Sharded (FSDP):
    every rank writes its shard, in the background unless `wait`; poll() publishes a finished
    background save, wait() blocks for it. `last` is the newest checkpoint saved by this process."""

    def __init__(self, run: RunDir, keep: int, rank: int, sharded: bool = False, use_async: bool = True):
        self.run, self.keep, self.rank, self.sharded = run, keep, rank, sharded
        self.writer = ShardedWriter(rank, use_async) if sharded else None
        self.last: Path | None = None

    @property
    def pending(self):
        return self.writer.pending if self.writer is not None else None

    def last_good(self) -> Path | None:
        """The newest checkpoint known good: saved by this process, else the run's latest."""
        return self.last or self.run.latest_checkpoint()

    def save(self, step: int, model: torch.nn.Module, optimizers: Any, state: TrainState | dict,
             wait: bool = True) -> Path | None:
        """A checkpoint of `step` (its path; None on ranks other than 0 in the single-file format),
        with every optimizer's state (AdamW's, and Muon's beside it) in either format."""
        final = self.run.checkpoint_path(step)
        record = state.to_json() if isinstance(state, TrainState) else dict(state)
        record.setdefault("format_version", STATE_VERSION)
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers or [])
        if self.writer is not None:
            self.wait()  # the previous save is complete (and published) before the next starts
            self.writer.save(final, model, opts, record)
            if wait or self.writer.pending[0] is None:
                self.wait()
            self.last = final
            return final
        opt_state = full_optimizer_state(model, opts) if opts else None  # every rank (collective under FSDP)

        def write() -> Path:  # rank 0 alone; the others wait outside any collective (no --dist-timeout)
            try:
                path = save_checkpoint(final, model, opt_state, record)
            except DiskFullError as e:
                good = self.last_good()
                if good is None:  # nothing to resume from: the run starts again
                    raise UserError(f"{e}; step {step} was not checkpointed and no checkpoint was saved before "
                                    f"it. Free some space, then start the run again (the same command, or "
                                    f"--resume auto)") from None
                raise UserError(f"{e}; step {step} was not checkpointed, the last checkpoint {good} "
                                f"is intact. Free some space, then continue with: gptlab train --out "
                                f"{self.run.path} --resume") from None
            self._publish(path)
            return path

        if dist.is_initialized():
            path = dist.rank0_only("checkpoint", write)
        else:
            path = write() if self.rank == 0 else None
        self.last = path
        return path

    def poll(self) -> Path | None:
        """Publish a finished background save (no collective); its path when one was published."""
        if self.writer is not None and self.writer.done():
            return self.wait()
        return None

    def wait(self) -> Path | None:
        """Block until the save in flight is written, then publish it."""
        if self.writer is None:
            return None
        final = self.writer.wait()
        if final is not None and self.rank == 0:
            self._publish(final)
        return final

    def _publish(self, ckpt: Path) -> None:
        self.run.mark_latest(ckpt)
        self.run.prune(self.keep)


def load_sharded_checkpoint(ckpt: str | Path, model: torch.nn.Module, optimizer: Any = None,
                            state: dict | None = None) -> None:
    """Read a sharded checkpoint into a placed model (and its optimizer, or list of optimizers):
    each rank reads the pieces of its own shards, whatever world size and sharding wrote them.
    Collective when a process group exists; otherwise a single-process read of full tensors."""
    ckpt = Path(ckpt)
    opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer or [])
    with gradients_set_aside(model):
        _load_sharded(ckpt, model, opts, state)


def _load_sharded(ckpt: Path, model: torch.nn.Module, opts: list, state: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    flat, _ = _sharded_tensors(model, opts)
    _dcp_load(flat, ckpt, no_dist=not (tdist.is_available() and tdist.is_initialized()))
    set_model_state_dict(model, {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")},
                         options=StateDictOptions(strict=False))  # the tied head is the embedding
    if not opts:
        return
    if state is None:
        state = read_json(ckpt / STATE)
    osd: dict = {"state": {}, "param_groups": []}
    for key, value in flat.items():
        if key.startswith(_OPT_PREFIX):
            name, moment = key[len(_OPT_PREFIX):].rsplit("/", 1)
            osd["state"].setdefault(name, {})[moment] = value
    for g in state["optimizer"]["param_groups"]:
        osd["param_groups"].append({k: (tuple(v) if k == "betas" else v) for k, v in g.items()})
    if len(osd["param_groups"]) != sum(len(o.param_groups) for o in opts):
        raise UserError(f"{ckpt}: the optimizer state has {len(osd['param_groups'])} param groups, this run's "
                        f"optimizers {sum(len(o.param_groups) for o in opts)}; resume with the run's own --optimizer")
    # the saving device's implementation choices must not override this device's
    groups = [g for o in opts for g in o.param_groups]
    keep = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in groups]
    set_optimizer_state_dict(model, opts, osd)
    for g, kept in zip([g for o in opts for g in o.param_groups], keep):  # loading replaced the group dicts
        g.update(kept)


def _dcp_load(flat: dict, ckpt: Path, no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp

    safe_reader(ckpt).read_metadata()  # a bad index is one clear error here, not one per rank inside DCP
    try:
        dcp.load(flat, storage_reader=safe_reader(ckpt), no_dist=no_dist)
    except UserError:
        raise
    except Exception as e:  # DCP wraps each rank's failure (CheckpointException, AssertionError, ...)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{ckpt}: cannot read the sharded checkpoint ({first})") from None


def load_sharded_model(ckpt: str | Path) -> GPT:
    """Consolidate a sharded checkpoint into a plain GPT on the CPU, without a process group."""
    ckpt = Path(ckpt)
    model = GPT(read_model_config(ckpt))
    flat = {f"model.{k}": v for k, v in model.state_dict().items() if k != _TIED_KEY}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP says it assumes a single process: that is the point
        _dcp_load(flat, ckpt, no_dist=True)
    tokenizer.set_model_tokenizer(model, tokenizer.read_model_dir_tokenizer(ckpt))
    return model
