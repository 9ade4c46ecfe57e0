"""The ONLY code that knows the model-directory and checkpoint layouts.

Model directory: config.json (the ModelConfig) + model.safetensors (the raw model's weights, no
`_orig_mod.` or `module.` prefixes, the tied head stored once as transformer.wte.weight).
Checkpoint: a model directory + optimizer.pt (tensors only) + state.json, written whole or not at all.
Where checkpoints live inside a run, and which is `latest`, is rundir.py's.
Nothing is ever unpickled from a file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError as SafetensorsError  # the class is SafetensorError (no s)
from safetensors.torch import load_file, save_file

from gptlab.atomic import replace_dir, write_json
from gptlab.config import ModelConfig, read_json
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.weights import clean_state_dict, load_weights, model_state_dict, raw_model
from gptlab import hf
from gptlab.rundir import RunDir

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def _write_model_files(model: torch.nn.Module, path: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    cfg: ModelConfig = raw_model(model).config
    write_json(path / CONFIG, cfg.to_dict())
    if weights is None:
        weights = model_state_dict(model)
    else:  # already gathered (FSDP): same cleaning
        weights = {k: v.detach().to("cpu").contiguous() for k, v in clean_state_dict(weights).items()}
    save_file(weights, str(path / WEIGHTS), metadata={"format": "pt", "producer": "gptlab"})


def save_model(model: torch.nn.Module, path: str | Path) -> Path:
    """Write a model directory atomically (a temporary directory renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_model_files(model, tmp)
    replace_dir(tmp, path)
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
    return ModelConfig.from_dict(read_json(Path(path) / CONFIG))


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A GPT from a gptlab model (or checkpoint) directory."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such model directory")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise UserError(f"{path}: not a model directory (no {name})")
    cfg = read_model_config(path)
    try:
        sd = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorsError, OSError, ValueError) as e:
        raise UserError(f"{path / WEIGHTS}: unreadable weights ({e})") from None
    model = GPT(cfg)
    load_weights(model, sd, source=str(path / WEIGHTS))
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
    if is_model_dir(path):
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
    """Write a checkpoint directory at `final` whole or not at all (a temporary sibling, flushed,
    then renamed). `state` must be JSON-serialisable. `weights`, when given, is the model's
    already-gathered full state dict (FSDP). Where checkpoints live is the run directory's business."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_model_files(model, tmp, weights)
        state = dict(state)
        if optimizer_state is not None:
            tensors, meta = optimizer_to_files(optimizer_state)
            torch.save(tensors, tmp / OPTIMIZER)
            state["optimizer"] = meta
        write_json(tmp / STATE, state)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint_state(ckpt: str | Path) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """state.json and the optimizer tensors of a checkpoint (weights_only: nothing unpickled)."""
    ckpt = Path(ckpt)
    state = read_json(ckpt / STATE)
    tensors = None
    if (ckpt / OPTIMIZER).is_file():
        try:
            tensors = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True)
        except Exception as e:  # refused (needs pickle) or corrupt
            raise UserError(f"{ckpt / OPTIMIZER}: cannot be loaded safely ({str(e).splitlines()[0]})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise UserError(f"{ckpt / OPTIMIZER}: expected a dict of tensors")
    return state, tensors


def load_checkpoint_weights(ckpt: str | Path, model: torch.nn.Module) -> None:
    ckpt = Path(ckpt)
    try:
        sd = load_file(str(ckpt / WEIGHTS), device="cpu")
    except (SafetensorsError, OSError, ValueError) as e:
        raise UserError(f"{ckpt / WEIGHTS}: unreadable weights ({e})") from None
    load_weights(raw_model(model), sd, source=str(ckpt / WEIGHTS))
