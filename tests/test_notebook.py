"""docs/tutorial.ipynb: the stored outputs are an execution's (what a reader sees on GitHub), and
the notebook runs from nothing, offline, on a CPU (executed here with nbclient, in a fresh directory)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "tutorial.ipynb"


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def text_of(cell: dict) -> str:
    """A cell's stream and text outputs as one string."""
    parts = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            parts.append("".join(o["text"]))
        elif "data" in o and "text/plain" in o["data"]:
            parts.append("".join(o["data"]["text/plain"]))
    return "".join(parts)


def check_outputs(nb: dict) -> None:
    """What an executed tutorial shows: every cell ran, in order, without an error, the loss plot
    inline, the loss fell, and transformers loaded the export and agrees with gptlab."""
    cells = code_cells(nb)
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1)), "not executed top to bottom"
    assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    out = "\n".join(text_of(c) for c in cells)
    assert "Traceback" not in out
    assert any("image/png" in o.get("data", {}) for c in cells for o in c["outputs"]), "no inline plot"
    m = re.search(r"steps 30, last train loss ([\d.]+), val loss ([\d.]+)", out)
    assert m and float(m.group(2)) < 8.0, out  # from ~10.9 at the start
    assert "same token ids as gptlab's tokenizer: True" in out
    assert "same greedy continuation: True" in out
    diff = float(re.search(r"largest logit difference: ([\d.e+-]+)", out).group(1))
    assert diff < 1e-3
    assert re.search(r"completion acc [\d.]+  acc_norm [\d.]+  \(n=6\)", out)


def test_stored_outputs_are_an_execution():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    check_outputs(nb)
    stored = json.dumps([c.get("outputs", []) for c in code_cells(nb)])
    for where in ("/tmp/", "/home/", "/work/", "/root/", "site-packages"):
        assert where not in stored, f"a machine path in the stored outputs: {where}"


@pytest.mark.slow
def test_notebook_runs_from_nothing(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    for cell in code_cells(nb):
        cell["outputs"], cell["execution_count"] = [], None
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    check_outputs(json.loads(nbformat.writes(nb)))
    assert (tmp_path / "hf" / "tiny" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "tiny" / "plots" / "loss.png").is_file()
