"""The ONLY code that knows the model-directory and checkpoint layouts.

Model directory: config.json (the ModelConfig) + model.safetensors (the raw model's weights, no
`_orig_mod.` or `module.` prefixes, the tied head stored once as transformer.wte.weight).
Checkpoint: a model directory + optimizer.pt (tensors only) + state.json, written whole or not at all.
Sharded checkpoint (FSDP runs): config.json + state.json + one DCP shard per rank + DCP's index (below).
Where checkpoints live inside a run, and which is `latest`, is rundir.py's.
Nothing is ever unpickled from a file.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from safetensors import SafetensorError as SafetensorsError  # the class is SafetensorError (no s)
from safetensors.torch import load_file, save_file

from gptlab.atomic import replace_dir, write_json
from gptlab.config import ModelConfig, read_json
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.weights import clean_state_dict, load_weights, model_state_dict, raw_model
from gptlab import hf
from gptlab.rundir import TMP_PREFIX, RunDir

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


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with its index read by the restricted unpickler above."""

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


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / DCP_METADATA).is_file() and (path / CONFIG).is_file()


def _sharded_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, list]:
    """The flat dict DCP reads and writes: model.<name> (DTensors under FSDP, plain tensors
    otherwise) and optim/<name>/<moment>; plus the optimizer's param groups (JSON, not DCP)."""
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items() if k != _TIED_KEY}
    groups: list = []
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        for name, pstate in osd["state"].items():
            for moment, value in pstate.items():
                flat[f"{_OPT_PREFIX}{name}/{moment}"] = value
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return flat, groups


class ShardedSaver:
    """Writes sharded checkpoints of one run; at most one save is in flight. Every rank calls
    save() (collective); rank 0 also writes the JSON files and publishes the finished directory."""

    def __init__(self, run: RunDir, keep: int, rank: int, use_async: bool = True):
        self.run, self.keep, self.rank, self.use_async = run, keep, rank, use_async
        self.pending: tuple[Any, Path, Path] | None = None  # (future, temp dir, final dir)
        self.group = None
        if tdist.is_available() and tdist.is_initialized():
            # the background writer's own gloo group: its collectives never interleave with training's
            self.group = tdist.new_group(backend="gloo")

    def save(self, final: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             state: dict, wait: bool = False) -> Path:
        self.wait()  # the previous save is complete (and published) before the next starts
        tmp = self._temp_dir(final)
        flat, groups = _sharded_tensors(model, optimizer)
        if self.rank == 0:
            write_json(tmp / CONFIG, raw_model(model).config.to_dict())
            write_json(tmp / STATE, {**state, "format": SHARDED_FORMAT, "optimizer": {"param_groups": groups}})
        writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
        if self.use_async:
            # stages a host copy of every shard now (so the next steps may change the weights),
            # then writes it from a thread
            fut = dcp.async_save(flat, storage_writer=writer, process_group=self.group)
        else:
            dcp.save(flat, storage_writer=writer, process_group=self.group)
            fut = None
        self.pending = (fut, tmp, final)
        if wait or fut is None:
            self.wait()
        return final

    def poll(self) -> Path | None:
        """Publish a finished background save (no collective); the path when one was published."""
        if self.pending is not None and (self.pending[0] is None or self.pending[0].done()):
            return self.wait()
        return None

    def wait(self) -> Path | None:
        """Block until the save in flight is written, then publish it (rank 0)."""
        if self.pending is None:
            return None
        fut, tmp, final = self.pending
        self.pending = None
        try:
            if fut is not None:
                fut.result()
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.rank == 0:
            replace_dir(tmp, final)
            self.run.mark_latest(final)
            self.run.prune(self.keep)
        return final

    def _temp_dir(self, final: Path) -> Path:
        """One temporary directory for every rank: rank 0 names and creates it, then tells the others."""
        name = [f"{TMP_PREFIX}{final.name}-{os.getpid()}"]
        if self.rank == 0:
            tmp = final.parent / name[0]
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        if self.group is not None:
            tdist.broadcast_object_list(name, src=0, group=self.group)  # also: the directory exists now
        return final.parent / name[0]


def load_sharded_checkpoint(ckpt: str | Path, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer | None = None, state: dict | None = None) -> None:
    """Read a sharded checkpoint into a placed model (and optimizer): each rank reads the pieces
    of its own shards, whatever world size and sharding wrote them. Collective when a process
    group exists; otherwise a single-process read of full tensors."""
    ckpt = Path(ckpt)
    flat, _ = _sharded_tensors(model, optimizer)
    _dcp_load(flat, ckpt, no_dist=not (tdist.is_available() and tdist.is_initialized()))
    set_model_state_dict(model, {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")},
                         options=StateDictOptions(strict=False))  # the tied head is the embedding
    if optimizer is None:
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
    # the saving device's implementation choices must not override this device's
    keep = [{k: g.get(k) for k in ("fused", "foreach", "capturable")} for g in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, osd)
    for g, kept in zip(optimizer.param_groups, keep):
        g.update(kept)


def _dcp_load(flat: dict, ckpt: Path, no_dist: bool) -> None:
    SafeReader(str(ckpt)).read_metadata()  # a bad index is one clear error here, not one per rank inside DCP
    try:
        dcp.load(flat, storage_reader=SafeReader(str(ckpt)), no_dist=no_dist)
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
    return model
