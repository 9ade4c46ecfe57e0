"""Compile hygiene, counted on the CPU (issue 23): the graphs torch.compile builds for training are
static, there is no recompile after the first step (through the batch-size search, evaluation and
sampling), and the training forward has no graph break. A recording backend (dynamo's graphs, run by
aot_eager) counts the graphs; torch._dynamo's own counters count the breaks."""

import socket

import pytest
import torch
import torch.distributed as tdist
from torch._dynamo.utils import counters

from gptlab import train as train_module
from gptlab.config import ModelConfig
from gptlab.dist import DistEnv
from gptlab.generate import generate_ids
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
        ops = {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op in ("call_function", "call_module")}
        self.graphs.append({"batch": sizes, "symbolic": symbolic, "ops": ops})
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



def test_a_run_compiles_once_across_steps_evaluation_and_sampling(log, tmp_path, monkeypatch):
    """`gptlab train --batch-size auto --compile` as a library call, the search probing as on CUDA:
    the sizes tried compile once each, then nothing more over 4 steps with validation, a checkpoint
    and samples between them; every graph static, no graph break."""
    from conftest import make_toy_data, metrics_by_step
    from gptlab.config import resolve_train_config

    real = train_module.find_batch_size
    monkeypatch.setattr(train_module, "find_batch_size", lambda *a, **kw: real(*a, **{**kw, "probe": True}))
    after_step = []
    real_step = train_module.Trainer.train_step

    def counted_step(self, *a):
        loss = real_step(self, *a)
        after_step.append(len(log.graphs))
        return loss

    monkeypatch.setattr(train_module.Trainer, "train_step", counted_step)
    log.oom_above = 4
    run = tmp_path / "run"
    cfg = resolve_train_config(dict(
        model="tiny", n_layer=2, n_head=4, n_embd=32, seq_len=16, batch_size="auto", total_batch_tokens=128,
        lr=1e-2, warmup_steps=1, max_steps=4, eval_every=2, eval_tokens=128, checkpoint_every=2,
        sample_tokens=4, num_samples=1, device="cpu", compile=True, compile_backend=BACKEND,
        data=str(make_toy_data(tmp_path / "data", 2_000, 10_000)), out=str(run)))
    train_module.train(cfg)
    # 128 tokens / 16 = 8 sequences: 8 does not fit, 4 does; validation runs the compiled model:
    # one more graph (eval mode, no gradients, the training batch's shape) at the first evaluation,
    # then nothing more (before, validation ran the uncompiled model: no third graph)
    assert [g["batch"] for g in log.graphs] == [[8, 8], [4, 4], [4, 4]]
    assert after_step == [2, 2, 3, 3]
    assert not any(g["symbolic"] for g in log.graphs) and not counters["graph_break"]
    assert sorted(metrics_by_step(run, "val")) == [2, 4]
    assert "=== step 4 ===" in (run / "samples.txt").read_text()

def test_validation_through_the_compiled_model_adds_one_graph(log, tmp_path):
    """Val loss through the compiled forward (as training runs it, bf16 autocast): one graph for
    eval mode, reused by a second evaluation and by the short last batch (padded with ignored
    targets to the static shape); the loss is the raw module's."""
    from conftest import make_toy_data
    from gptlab.evaluate import evaluate_val_loss

    torch.manual_seed(0)
    rt = get_runtime("cpu", "bf16", True)
    placed = place(GPT(MICRO), rt, DistEnv(), compile_backend=BACKEND)
    train_step(placed, rt, [_batch(4, 0)], 1, torch.optim.AdamW(placed.model.parameters(), lr=1e-3))
    trained = len(log.graphs)
    data = make_toy_data(tmp_path / "data", 2_000, 10_000)
    seen = []

    def forward(x, y):
        seen.append((x.shape[0], torch.is_autocast_enabled("cpu")))
        return compiled(x, y)

    compiled = placed.eval_forward()

    kw = dict(device="cpu", seq_len=16, batch_size=4, max_tokens=16 * 6, autocast=rt.autocast)  # batches of 4, 2
    got = [evaluate_val_loss(placed.model, data, forward=forward, **kw) for _ in range(2)]
    assert len(log.graphs) == trained + 1 and not any(g["symbolic"] for g in log.graphs)
    assert seen == [(4, True)] * 4  # the short batch ran padded, under the run's autocast
    ref = evaluate_val_loss(placed.model, data, **kw)
    assert got[0]["tokens"] == got[1]["tokens"] == ref["tokens"] == 6 * 16
    assert abs(got[0]["loss"] - ref["loss"]) < 1e-2 and got[0]["loss"] == got[1]["loss"]
    assert placed.model.training  # its mode restored


# ----------------------------------------------------------------------------- FSDP: each block compiled

@pytest.fixture
def one_rank_group():
    """A gloo group of one rank in this process: FSDP2 needs a group, even of one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def _fsdp_micro(backend: str | None):
    torch.manual_seed(0)
    rt = get_runtime("cpu", "fp32", backend is not None)
    # place() asks the environment only whether sharding is possible: the 1-rank group stands in for 2
    return place(GPT(MICRO), rt, DistEnv(world_size=2), fsdp=True, compile_backend=backend or "inductor"), rt


def _steps(placed, rt, seeds, opt=None) -> list[float]:
    opt = opt or torch.optim.AdamW(placed.model.parameters(), lr=1e-3)
    return [train_step(placed, rt, [_batch(4, s)], 1, opt).loss for s in seeds]


def test_fsdp_compiles_each_block_once_without_graph_breaks(log, one_rank_group):
    """FSDP compiles the blocks, not the root: one static graph that both blocks share, no graph break
    (compiling the root, dynamo broke the graph at each FSDP hook), the embeddings left to eager. The
    losses are the uncompiled FSDP model's; evaluation and sampling run the blocks eager, and later
    steps compile nothing more."""
    eager, rt = _fsdp_micro(None)
    ref = _steps(eager, rt, [0, 1, 2, 3])
    placed, rt = _fsdp_micro(BACKEND)
    assert placed.compiled and not placed.compiled_head  # the head takes the fused loss
    opt = torch.optim.AdamW(placed.model.parameters(), lr=1e-3)
    got = _steps(placed, rt, [0, 1], opt)
    assert len(log.graphs) == 1 and not log.graphs[0]["symbolic"]
    assert "layer_norm" in log.graphs[0]["ops"] and "embedding" not in log.graphs[0]["ops"]
    model = placed.model
    model.eval()
    with torch.no_grad():
        model(*_batch(3, 9))  # another batch size, no gradients: eager
    model.train()
    assert len(generate_ids(model, [1, 2, 3], max_new_tokens=4, seed=0)[0]) == 4  # a KV cache: eager
    got += _steps(placed, rt, [2, 3], opt)
    assert len(log.graphs) == 1
    assert not counters["graph_break"]
    assert got == pytest.approx(ref, rel=1e-5)


def test_fsdp_block_compile_failure_falls_back_with_one_warning(one_rank_group, capsys):
    from test_precision import _register_failing_backends

    _register_failing_backends()
    eager, rt = _fsdp_micro(None)
    ref = _steps(eager, rt, [0, 1])
    placed, rt = _fsdp_micro("gptlab_fail_fw")
    assert _steps(placed, rt, [0, 1]) == pytest.approx(ref, rel=1e-6)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "continuing uncompiled" in warnings[0]
    assert not placed.compiled
    assert all("forward" not in vars(b) for b in placed.model.transformer.h)  # the blocks are eager again


def test_fsdp_validation_runs_the_compiled_blocks_with_one_more_graph(log, one_rank_group, tmp_path):
    """Under FSDP, val loss during training (Placed.eval_forward) runs the compiled blocks in eval
    mode: one more graph, none at a second evaluation, the eager model's loss; sampling and other
    forwards still run the blocks eager."""
    from conftest import make_toy_data
    from gptlab.evaluate import evaluate_val_loss

    placed, rt = _fsdp_micro(BACKEND)
    _steps(placed, rt, [0])
    trained = len(log.graphs)
    data = make_toy_data(tmp_path / "data", 2_000, 10_000)
    kw = dict(device="cpu", seq_len=16, batch_size=4, max_tokens=16 * 8)
    got = [evaluate_val_loss(placed.model, data, forward=placed.eval_forward(), **kw) for _ in range(2)]
    assert len(log.graphs) == trained + 1 and not counters["graph_break"]
    ref = evaluate_val_loss(placed.model, data, **kw)  # the blocks eager: no graph
    assert len(log.graphs) == trained + 1
    assert got[0]["loss"] == pytest.approx(ref["loss"], abs=1e-5) and got[0]["loss"] == got[1]["loss"]
    assert all(not b.__dict__["forward"].always for b in placed.model.transformer.h)
