"""The documentation read as a checker would: every relative link in README.md and docs/*.md leads
to a file (and a heading) that exists, every test it names exists, every `gptlab` flag it shows is
one the parser has, and the README stays a short front door."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from gptlab.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 16 * 1024  # bytes: the README is the front door, the guide is in docs/

# Flags that belong to other programs the docs run beside gptlab.
FOREIGN_FLAGS = {
    "--standalone", "--nnodes", "--node_rank", "--nproc_per_node", "--master_addr", "--master_port",
    "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id",  # torchrun
    "--no-deps",  # pip
    "--directory",  # python -m http.server
    "--cov",  # pytest-cov
    "--model_args",  # lm_eval
    "--nodes", "--gpus-per-node", "--cpus-per-task", "--time", "--requeue", "--open-mode", "--signal",  # sbatch
}

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
TEST_REF = re.compile(r"(?:(test_\w+\.py))?::(test_\w+)")
TEST_FILE = re.compile(r"(?<![\w/])(?:tests/)?(test_\w+\.py)")
COMMAND = re.compile(r"(?<![\w-])gptlab ([a-z]+)(?: (info|verify|train))?\b")


def doc_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): lines inside ``` fences are code."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_code(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """Each relative link of one Markdown file whose file or heading does not exist."""
    prose, _ = split_code(path.read_text())
    bad = []
    for line in prose:
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                bad.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{path.name}: {target} (no such heading)")
    return bad


def functions_in(test_file: Path) -> set[str]:
    tree = ast.parse(test_file.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def missing_tests(path: Path, tests_dir: Path) -> list[str]:
    """Each test file or `file.py::test_name` the text names that tests_dir does not hold.
    `::test_name` alone means the file named last before it on the line."""
    bad = []
    for line in path.read_text().splitlines():
        for name in set(TEST_FILE.findall(line)):
            if not (tests_dir / name).exists():
                bad.append(f"{path.name}: {name} (no such test file)")
        current = None
        for file_name, func in TEST_REF.findall(line):
            current = file_name or current
            if current is None or not (tests_dir / current).exists():
                continue  # reported above, or no file to look in
            if func not in functions_in(tests_dir / current):
                bad.append(f"{path.name}: {current}::{func} (no such test)")
    return bad


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


def all_options(parser: argparse.ArgumentParser) -> set[str]:
    out = options(parser)
    for sub in subparsers(parser).values():
        out |= all_options(sub)
    return out


def command_lines(path: Path) -> list[str]:
    """Code lines (comments dropped) and inline code spans: where a command is written out."""
    prose, code = split_code(path.read_text())
    lines = [re.split(r"\s#\s", line)[0] for line in code]
    for line in prose:
        lines += re.findall(r"`([^`]+)`", line)
    return lines


def unknown_flags(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """Flags written after `gptlab CMD` that CMD does not take, and any other flag the text
    mentions that no gptlab command, benchmark script or listed foreign program has."""
    bad = []
    commands = subparsers(parser)
    for line in command_lines(path):
        for m in COMMAND.finditer(line):
            sub = commands.get(m.group(1))
            if sub is None:
                continue
            if m.group(2):
                sub = subparsers(sub).get(m.group(2), sub)
            rest = re.split(r"&&|\||;", line[m.end():])[0]
            for flag in FLAG.findall(rest):
                if flag not in options(sub):
                    bad.append(f"{path.name}: {m.group(0)} {flag}")
    known = all_options(parser) | FOREIGN_FLAGS
    bench_source = "".join(p.read_text() for p in (ROOT / "benchmarks").glob("*.py"))
    for flag in set(FLAG.findall(path.read_text())):
        if flag not in known and f'"{flag}"' not in bench_source:
            bad.append(f"{path.name}: {flag} (no command has it)")
    return bad


# ----------------------------------------------------------------------------- the docs themselves

def test_readme_is_a_short_front_door():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/ (limit {README_LIMIT})"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ holds no pages"
    unlinked = [p.name for p in pages if f"(docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.name)
def test_named_tests_exist(page):
    assert missing_tests(page, ROOT / "tests") == []


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.name)
def test_flags_exist_in_the_parser(page):
    assert unknown_flags(page, build_parser()) == []


# ----------------------------------------------------------------------------- the checkers can fail

def test_checkers_catch_a_broken_link_a_missing_test_and_an_unknown_flag(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `gptlab` heading: two\n")
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    (tests_dir / "test_real.py").write_text("def test_here():\n    pass\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-gptlab-heading-two) [ok](#title) [web](https://example.org/x)\n"
        "# Title\n"
        "[gone](missing.md) [gone](other.md#no-such-heading)\n"
        "`test_real.py::test_here`, `::test_gone`, `test_absent.py`\n"
        "```bash\n"
        "gptlab train --model tiny --no-such-flag   # --in-a-comment is ignored\n"
        "[not a link](inside-code.md)\n"
        "```\n"
        "`gptlab data info --tokens` and `--made-up`\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)",
                                  "page.md: other.md#no-such-heading (no such heading)"]
    assert sorted(missing_tests(page, tests_dir)) == ["page.md: test_absent.py (no such test file)",
                                                     "page.md: test_real.py::test_gone (no such test)"]
    assert sorted(unknown_flags(page, build_parser())) == [
        "page.md: --in-a-comment (no command has it)",  # the command check skips comments; this one does not
        "page.md: --made-up (no command has it)",
        "page.md: --no-such-flag (no command has it)",
        "page.md: gptlab data info --tokens",  # `data info` has no --tokens (prepare has)
        "page.md: gptlab train --no-such-flag",
    ]

def test_slug_follows_github():
    assert slug("Muon: `--optimizer muon`") == "muon---optimizer-muon"
    assert slug("Sampling and export: `gptlab sample`, `gptlab export`") == \
        "sampling-and-export-gptlab-sample-gptlab-export"
