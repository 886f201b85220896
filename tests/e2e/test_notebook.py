"""CI executes the batch-inference notebook end to end (fresh kernel, this virtualenv's Python)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.conftest import require

NOTEBOOK = Path(__file__).resolve().parents[2] / "experiments" / "notebooks" / "batch_inference.ipynb"


def test_batch_inference_notebook_runs(tmp_path):
    require("nbclient")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_path = os.path.dirname(sys.executable)
    os.environ["PATH"] = env_path + os.pathsep + os.environ.get("PATH", "")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "batch invariance holds" in outputs
    assert "300 rows" in outputs and "continuous batching equals each row alone" in outputs
    assert "int8 weights:" in outputs and "greedy tokens shared with the float model" in outputs
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
