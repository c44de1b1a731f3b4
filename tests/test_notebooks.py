"""The notebooks run top to bottom: notebooks/gru-en.py and gru-zh.py, jupytext sources, each turned
into a notebook and executed cell by cell in a Python kernel (nbclient), as a reader would run it.

They run with GRULAB_NOTEBOOK_QUICK=1 (the same cells on budgets of seconds and a smaller model),
one compute thread and without the kernel autotuning, so both together take well under a minute or
two; their files go to a temporary directory.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from grulab.lm import plots

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["gru-en", "gru-zh"])
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext", reason="pip install -e '.[test]' (jupytext, nbclient, ipykernel)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (jupytext, nbclient, ipykernel)")
    pytest.importorskip("ipykernel", reason="pip install -e '.[test]' (jupytext, nbclient, ipykernel)")
    for key, value in dict(GRULAB_NOTEBOOK_QUICK="1", GRULAB_NOTEBOOK_OUT=str(tmp_path), OMP_NUM_THREADS="1",
                           GRULAB_AUTOTUNE="0", MPLBACKEND="Agg").items():
        monkeypatch.setenv(key, value)  # the kernel is a child process: it inherits them
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert not any(cell.get("outputs") for cell in notebook.cells)  # sources only: no outputs in git
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    streams = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "stream"]
    stderr = "".join(o["text"] for o in streams if o["name"] == "stderr")
    assert "Traceback" not in stderr
    if plots.cjk_fonts():  # with a CJK font, no character of any figure is missing
        assert "missing from font" not in stderr and "empty boxes" not in stderr, stderr
    for path in ("d2l/checkpoint", "d2l-zh/checkpoint", "gates.html", "gates.png", "catmouse/catmouse.png",
                 "rnn-vs-gru/perplexity.png", "sweep/perplexity.png"):
        assert (tmp_path / path).exists(), path
    shown = sum(1 for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {}))
    assert shown >= 5  # perplexity, heatmap, cat/mouse, the two exercises
