"""lm-evaluation-harness tasks through gptlab's own model.

GptlabLM is an `lm_eval` model registered as `gptlab`, so both of these run a harness task on a
gptlab run, checkpoint, model directory, Hugging Face directory or hub id:

    gptlab eval RUN --tasks lambada_openai,arc_easy
    lm_eval --model gptlab --model_args pretrained=RUN --tasks lambada_openai

(the second through gptlab_lm_eval_plugin, which an installed gptlab loads at start-up). The
three request types:

- loglikelihood: requests become context groups (scoring.ContextGroup): each distinct context
  runs once, packed in one row with its continuations (scoring.PackedRows); groups are sorted
  by packed length and batched (--batch-size continuations a forward pass). A context +
  continuation longer than the model's context keeps its last seq_len + 1 tokens, as the
  harness's HFLM does.
- loglikelihood_rolling: the harness's own windows (utils.get_rolling_token_windows with
  context_len=1, made disjoint), scored as loglikelihood requests and summed per document.
- generate_until: gptlab.generate's KV-cache loop, one request at a time, greedy unless the task
  asks to sample; it stops at end-of-text, at max_gen_toks, or once a stop sequence appears, and
  the text is cut at the first stop sequence (the harness's own post-processing).

Tokenization is the model's own (tiktoken): GPT-2's BPE, as the harness's Hugging Face GPT-2 tokenizer
encodes text, or the trained tokenizer the model carries.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from gptlab.checkpoint import load_model
from gptlab.errors import UserError
from gptlab.generate import generate
from gptlab.model import GPT
from gptlab.runtime import get_runtime
from gptlab.scoring import ContextGroup, plan_shared_batches, score_shared
from gptlab.tokenizer import model_tokenizer

DEFAULT_BATCH_SIZE = 32  # continuations a forward pass
# generation settings that gptlab's sampler understands; others are reported once and ignored
_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "seed"}


@register_model("gptlab")
class GptlabLM(TemplateLM):
    """A gptlab GPT as an lm_eval model. pretrained: any MODEL spec gptlab.checkpoint.load_model
    reads; or pass an already loaded GPT as `model`. batch_size: continuations per forward pass
    ("auto" means the default). device/dtype as in `gptlab eval`."""

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 max_gen_toks: int = 256, model: GPT | None = None, quiet: bool = False) -> None:
        super().__init__()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line asks for cuda:0 unless told otherwise; like its HFLM, use what exists
            warnings.warn(f"device {device} asked for, but CUDA is not available; choosing the device "
                          "automatically", stacklevel=2)
            device = None
        # runtime.DTYPES reads Hugging Face style names (float32, bfloat16, float16) as well as gptlab's;
        # lm_eval's --model_args spell "no dtype" as the string None
        rt = get_runtime(device, None if str(dtype) == "None" else dtype, compile=False)
        if model is None:
            if pretrained is None:
                raise UserError("the gptlab model needs pretrained=MODEL (a run, checkpoint or model directory)")
            model, self.where = load_model(pretrained, rt.device)
        else:
            self.where = pretrained or "a model in memory"
        self.model = model.to(rt.device).eval()
        self._device = rt.device
        self._autocast = rt.autocast
        self._tok = model_tokenizer(model)  # GPT-2's, or the trained one the model carries
        self.enc = self._tok.enc
        self.batch_size = _parse_batch_size(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self.quiet = quiet  # no progress bars (the trainer's own bar is on screen)

    # -------------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self._tok.eot

    @property
    def max_length(self) -> int:
        return self.model.config.seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self._tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.enc.encode_ordinary(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.enc.decode(list(tokens))

    # -------------------------------------------------------------------- loglikelihood

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each (request key, context ids, continuation ids)."""
        T = self.max_length
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise UserError("a loglikelihood request needs a non-empty context and continuation")
            if len(cont) > T:
                raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's context of {T}")
            whole = (list(ctx) + list(cont))[-(T + 1):]  # the model reads whole[:-1], at most T tokens
            by_context.setdefault(tuple(whole[:-len(cont)]), []).append(i)
        owners = list(by_context.values())
        groups = [ContextGroup(c, tuple(tuple(requests[i][2]) for i in idx)) for c, idx in by_context.items()]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or self.quiet or self.rank != 0)
        with bar, torch.no_grad():
            for batch in plan_shared_batches(groups, self.batch_size):
                with self._autocast():
                    sums, greedy = score_shared(self.model, [groups[g] for g in batch], self._device, greedy=True)
                slots = [i for g in batch for i in owners[g]]
                for i, s, ok in zip(slots, sums.tolist(), greedy.tolist()):
                    out[i] = (s, bool(ok))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
                bar.update(len(slots))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's summed log-likelihood over the harness's disjoint rolling windows."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += lp  # window by window, in order, as the harness sums them
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        eos = self.tok_decode([self.eot_token_id])
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm or self.quiet or self.rank != 0):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise UserError(f"max_gen_toks {max_gen} leaves no room for a prompt in the model's "
                                f"context of {self.max_length}")
            # the prompt keeps its last (context - max_gen) tokens, as the harness's HFLM does
            prompt = self.tok_encode(context)[-(self.max_length - max_gen):] or [self.eot_token_id]
            text = postprocess_generated_text(self._generate(prompt, max_gen, until, kwargs), until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def _generate(self, prompt: list[int], max_gen: int, until: list[str], kwargs: dict) -> str:
        """New text after prompt: up to end-of-text, max_gen tokens, or the first stop sequence."""
        unknown = sorted(set(kwargs) - _SAMPLING_KEYS)
        if unknown:
            warnings.warn(f"gptlab ignores these generation settings: {', '.join(unknown)}", stacklevel=2)
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        # seeded from torch's generator, which lm_eval seeds, so sampled tasks are reproducible
        seed = kwargs.get("seed", int(torch.randint(0, 2**62, ()).item()))
        tokens: list[int] = []
        steps = generate(self.model, prompt, max_new_tokens=max_gen, temperature=temperature,
                         top_k=kwargs.get("top_k") or None, top_p=float(kwargs.get("top_p") or 1.0),
                         seed=seed, stop_token=self.eot_token_id)
        with self._autocast():
            for (tok,) in steps:
                if tok is None or tok == self.eot_token_id:
                    break
                tokens.append(tok)
                if any(s and s in self.tok_decode(tokens[-64:]) for s in until):
                    break
        steps.close()
        return self.tok_decode(tokens)

    def get_model_info(self) -> dict:
        return {"model": str(self.where), "model_num_parameters": self.model.num_params()}


def _parse_batch_size(value: int | str | None) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"batch size must be a positive integer or auto, got {value!r}") from None
    if n <= 0:
        raise UserError(f"batch size must be positive, got {n}")
    return n


# ----------------------------------------------------------------------------- running tasks

def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's results: numbers only, with the harness's
    metric names less the ",none" filter suffix (other filters keep theirs)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias", "N/A" stderrs
            row[key[:-len(",none")] if key.endswith(",none") else key] = float(value)
        out[task] = row
    return out


class TaskRunner:
    """Harness tasks (names, groups or tags; plus the YAML tasks under include_path), checked once
    and run as often as asked: by `gptlab eval --tasks` once, by the trainer (--eval-tasks) at each
    evaluation on the model it is training. Unknown task names are a UserError."""

    def __init__(self, tasks: Sequence[str], *, include_path: str | None = None, limit: int | None = None,
                 num_fewshot: int | None = None) -> None:
        from lm_eval.tasks import TaskManager

        self.manager = TaskManager(include_path=include_path)  # indexing every task: seconds, so once
        known = set(self.manager.all_tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            where = f" or under {include_path}" if include_path else ""
            raise UserError(f"unknown harness task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                            f"(not among lm_eval's tasks{where}; `lm_eval ls tasks` lists them)")
        self.tasks, self.limit, self.num_fewshot = list(tasks), limit, num_fewshot

    def run(self, lm: GptlabLM, bootstrap_iters: int = 100_000) -> dict[str, dict[str, float]]:
        """task_metrics of one run of the tasks on `lm` (bootstrap_iters 0: no stderrs, faster)."""
        from lm_eval import evaluator

        results = evaluator.simple_evaluate(model=lm, tasks=self.tasks, num_fewshot=self.num_fewshot,
                                            limit=self.limit, task_manager=self.manager, log_samples=False,
                                            bootstrap_iters=bootstrap_iters)
        return task_metrics(results)

    def run_during_training(self, model: GPT, device, dtype: str | None) -> dict[str, dict[str, float]]:
        """The tasks on a model that is being trained: quietly (no progress bars, the harness's log
        at warnings), without stderrs, and leaving every random number generator as it was (the
        harness seeds python's, numpy's and torch's), so that training goes on exactly as without."""
        import logging
        import random

        import numpy as np

        states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                  torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        log = logging.getLogger("lm_eval")
        level = log.level
        log.setLevel(logging.WARNING)
        try:
            lm = GptlabLM(model=model, device=str(device), dtype=dtype, quiet=True)
            return self.run(lm, bootstrap_iters=0)
        finally:
            log.setLevel(level)
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
            if states[3] is not None:
                torch.cuda.set_rng_state_all(states[3])


def run_tasks(lm: GptlabLM, tasks: Sequence[str], *, include_path: str | None = None, limit: int | None = None,
              num_fewshot: int | None = None, bootstrap_iters: int = 100_000) -> dict[str, dict[str, float]]:
    """Run harness tasks once on `lm` (see TaskRunner); returns task_metrics of the results."""
    return TaskRunner(tasks, include_path=include_path, limit=limit, num_fewshot=num_fewshot).run(
        lm, bootstrap_iters=bootstrap_iters)


def format_tasks(metrics: dict[str, dict[str, float]]) -> str:
    """A table: one line per task and metric (sample_len: the documents scored), with its stderr
    beside it when there is one."""
    lines = [f"{'task':<28} {'metric':<22} {'value':>10} {'stderr':>9}"]
    for task, row in metrics.items():
        for name, value in row.items():
            if name.endswith("_stderr") or "_stderr," in name:
                continue
            err = row.get(name.replace(",", "_stderr,", 1) if "," in name else name + "_stderr")
            err_s = "" if err is None or math.isnan(err) else f"{err:.4f}"
            lines.append(f"{task:<28} {name:<22} {value:>10.4f} {err_s:>9}")
    return "\n".join(lines)
