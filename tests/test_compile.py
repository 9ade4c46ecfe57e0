"""Compile hygiene, counted on the CPU (issue 23): the graphs torch.compile builds for training are
static, there is no recompile after the first step (through the batch-size search, evaluation and
sampling), and the training forward has no graph break. A recording backend (dynamo's graphs, run by
aot_eager) counts the graphs; torch._dynamo's own counters count the breaks."""

import pytest
import torch
from torch._dynamo.utils import counters

from gptlab import train as train_module
from gptlab.config import ModelConfig
from gptlab.dist import DistEnv
from gptlab.model import GPT
from gptlab.parallel import place
from gptlab.runtime import get_runtime
from gptlab.train import find_batch_size, train_step

MICRO = ModelConfig(n_layer=2, n_head=4, n_embd=32, seq_len=16, vocab_size=320)
BACKEND = "gptlab_graph_log"


class GraphLog:
    """What the recording backend saw: one entry per graph dynamo compiled, with the batch sizes it
    was compiled for (None for a symbolic size) and the code it came from. A compiled graph given
    token ids of more than `oom_above` rows raises an OutOfMemoryError when it runs, as a GPU would."""

    def __init__(self):
        self.graphs: list[dict] = []
        self.oom_above: int | None = None

    def backend(self, gm, example_inputs):
        from torch._dynamo import lookup_backend

        sizes = [t.shape[0] if isinstance(t.shape[0], int) else None
                 for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() >= 2 and not t.is_floating_point()]
        symbolic = any(isinstance(t, torch.SymInt) for t in example_inputs) or any(
            not isinstance(s, int) for t in example_inputs if isinstance(t, torch.Tensor) for s in t.shape)
        self.graphs.append({"batch": sizes, "symbolic": symbolic})
        run = lookup_backend("aot_eager")(gm, example_inputs)

        def guarded(*args):
            rows = [a.size(0) for a in args if isinstance(a, torch.Tensor) and a.dim() == 2 and not a.is_floating_point()]
            if self.oom_above is not None and any(r > self.oom_above for r in rows):
                raise torch.OutOfMemoryError("out of memory (simulated by the test backend)")
            return run(*args)

        return guarded


LOG = GraphLog()


@pytest.fixture
def log():
    """A fresh log, torch's compile caches and counters cleared (they are per process)."""
    from torch._dynamo import list_backends, register_backend

    if BACKEND not in list_backends(exclude_tags=()):
        register_backend(name=BACKEND, compiler_fn=lambda gm, inputs: LOG.backend(gm, inputs))
    torch.compiler.reset()
    counters.clear()
    LOG.graphs.clear()
    LOG.oom_above = None
    yield LOG
    torch.compiler.reset()


def _placed_micro(seed: int = 0):
    torch.manual_seed(seed)
    rt = get_runtime("cpu", "fp32", True)
    return place(GPT(MICRO), rt, DistEnv(), compile_backend=BACKEND), rt


def _batch(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 320, (b, 16), generator=g), torch.randint(0, 320, (b, 16), generator=g)


def test_batch_size_search_leaves_one_static_graph_for_training(log):
    """The search compiles each size it tries as a static graph (no symbolic batch dimension), with
    distinct input and target tensors as training has them, so the first real step runs the graph of
    the chosen size: no recompile after the search (before: the second size made the batch dimension
    symbolic, and the first step recompiled on an `idx is targets` aliasing guard)."""
    placed, rt = _placed_micro()
    log.oom_above = 6
    # 16 tokens x 24 sequences: the divisors 24, 12, 8, 6 are tried, 6 fits
    assert find_batch_size(placed, rt, 24 * 16, DistEnv(), probe=True) == 6
    assert [g["batch"] for g in log.graphs] == [[24, 24], [12, 12], [8, 8], [6, 6]]
    assert not any(g["symbolic"] for g in log.graphs)
    searched = len(log.graphs)
    opt = torch.optim.AdamW(placed.model.parameters(), lr=1e-3)
    for step in range(3):
        train_step(placed, rt, [_batch(6, step)], 1, opt)
    assert len(log.graphs) == searched  # the chosen size's graph is the training graph
    assert placed.compiled and placed.guard.active
    assert not counters["graph_break"]
