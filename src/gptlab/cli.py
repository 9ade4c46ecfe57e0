"""The `gptlab` command line: a table of subcommands.

Each handler parses flags into a config and calls one library function. Heavy modules (torch)
are imported inside handlers, so `gptlab prepare` and `gptlab data` start fast.
A UserError becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from gptlab.errors import UserError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def count(text: str) -> int:
    """An integer with an optional K/M/B suffix: 5B, 100M, 10K, 1e6."""
    t = text.strip().upper().replace("_", "")
    mult = 1
    if t and t[-1] in "KMBG":
        mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}[t[-1]]
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 5B, 100M or 10000, got {text!r}") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole count, got {text!r}")
    return int(value)


def add_device_flags(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    if dtype:
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="compute dtype (default: auto = bf16 where native, fp16 on older GPUs, fp32 on CPU)")


# ===================================================================== sample / export (Foundation)
def add_sample_args(p: argparse.ArgumentParser) -> None:
    pass


def cmd_sample(args: argparse.Namespace) -> int:
    raise NotImplementedError


def add_export_args(p: argparse.ArgumentParser) -> None:
    pass


def cmd_export(args: argparse.Namespace) -> int:
    raise NotImplementedError
# ===================================================================== end sample / export


# ===================================================================== prepare / data (Data)
def add_prepare_args(p: argparse.ArgumentParser) -> None:
    pass


def cmd_prepare(args: argparse.Namespace) -> int:
    raise NotImplementedError


def add_data_args(p: argparse.ArgumentParser) -> None:
    pass


def cmd_data(args: argparse.Namespace) -> int:
    raise NotImplementedError
# ===================================================================== end prepare / data


# ===================================================================== eval (Evaluation)
def add_eval_args(p: argparse.ArgumentParser) -> None:
    pass


def cmd_eval(args: argparse.Namespace) -> int:
    raise NotImplementedError
# ===================================================================== end eval


# ===================================================================== train / plot (Training)
def add_train_args(p: argparse.ArgumentParser) -> None:
    pass


def cmd_train(args: argparse.Namespace) -> int:
    raise NotImplementedError


def add_plot_args(p: argparse.ArgumentParser) -> None:
    pass


def cmd_plot(args: argparse.Namespace) -> int:
    raise NotImplementedError
# ===================================================================== end train / plot


# name -> (help, add_arguments, handler)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "prepare": ("tokenize a corpus into GPT-2 token shards", add_prepare_args, cmd_prepare),
    "data": ("inspect or verify a prepared dataset", add_data_args, cmd_data),
    "train": ("train a GPT-2 (CPU, one GPU, or many through torchrun)", add_train_args, cmd_train),
    "eval": ("HellaSwag and validation loss of a model", add_eval_args, cmd_eval),
    "sample": ("sample text from a model", add_sample_args, cmd_sample),
    "export": ("write a model as a Hugging Face GPT-2 directory", add_export_args, cmd_export),
    "plot": ("draw a run's metrics as PNG charts", add_plot_args, cmd_plot),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptlab", description="Reproduce GPT-2: prepare, train, eval, sample, export, plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from gptlab import __version__

    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_args, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as e:
        print(f"gptlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
