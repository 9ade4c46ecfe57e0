"""gptlab: reproduce GPT-2 from scratch, as a tool and as a library.

    from gptlab import GPT
    model = GPT.from_pretrained("gpt2")          # or a run directory, checkpoint, HF directory
    out = model.generate(idx, max_new_tokens=50, temperature=0.8, top_k=50)

    import gptlab
    gptlab.train(model="tiny", max_steps=20, out="runs/tiny")   # the tiny preset's recipe, as the CLI

Importing the package is cheap: torch is imported only by the modules that need it, and the names
below are imported on first use (PEP 562).
"""

import importlib
import os

# Intel MKL picks matmul code paths by memory alignment, so two runs of the same training can differ
# in the last bits. Conditional numerical reproducibility makes a resumed CPU run bit-identical to an
# unbroken one, for a few percent of speed. It must be set before MKL's first call; a user's own
# setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

# name -> the module that defines it ("train" is the module gptlab.train itself, which is callable)
_EXPORTS = {
    "GPT": "gptlab.model",
    "ModelConfig": "gptlab.config",
    "TrainConfig": "gptlab.config",
    "PRESETS": "gptlab.config",
    "resolve_train_config": "gptlab.config",
    "UserError": "gptlab.errors",
    "load_model": "gptlab.checkpoint",
    "get_tokenizer": "gptlab.tokenizer",
    "sample_text": "gptlab.generate",
    "plot_run": "gptlab.plot",
    "plot_runs": "gptlab.plot",
}

__all__ = sorted([*_EXPORTS, "train", "__version__"])


def __getattr__(name: str):
    if name == "train":
        return importlib.import_module("gptlab.train")  # callable: gptlab.train(model="tiny", ...)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "GPT" and value._loader is None:
        value._loader = importlib.import_module("gptlab.checkpoint").load_model  # GPT.from_pretrained
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
