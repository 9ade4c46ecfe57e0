"""Makes `lm_eval --model gptlab` work: registers gptlab's harness model with lm-evaluation-harness.

The harness finds models in a table of its own (lm_eval.models) and has no plug-in mechanism, so
gptlab installs `gptlab-lm-eval.pth` beside this module; Python runs that file's one line at
start-up, and it calls install(). Nothing heavy happens then: install() only puts a finder on
sys.meta_path that waits for `lm_eval.models` to be imported, and right after it adds the name
`gptlab` to the harness's model registry as a lazy entry ("gptlab.harness:GptlabLM"), which the
harness imports only when a run asks for it. Without lm_eval the finder never fires.
"""

from __future__ import annotations

import importlib.abc
import sys

WATCHED = "lm_eval.models"
MODEL_NAME = "gptlab"
TARGET = "gptlab.harness:GptlabLM"


def register() -> None:
    """Add the lazy `gptlab` entry to lm_eval's model registry (once)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisterAfterImport(importlib.abc.Loader):
    """Wraps the real loader of lm_eval.models: runs the module, then register()."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:  # the spec the import would get without us
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterImport(spec.loader)
                return spec
        return None


def install() -> None:
    """Watch for lm_eval.models (or register at once if it is already imported)."""
    if WATCHED in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
