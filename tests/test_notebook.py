"""notebooks/quickstart.ipynb runs top to bottom (on the quick demo setting), so it cannot rot."""

import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the test extra (nbformat) is not installed")
    nbclient = pytest.importorskip("nbclient", reason="the test extra (nbclient) is not installed")
    # The kernel inherits the environment: the quick setting, a fresh workdir.
    monkeypatch.setenv("QWENVL_DEMO_SETTING", "quick")
    monkeypatch.setenv("QWENVL_DEMO_WORKDIR", str(tmp_path / "demo"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "grounding acc" in text and "assistant:" in text and "IoU with the true box" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the picture, the drawn box, boxes.png, the loss curve
    assert os.path.isfile(tmp_path / "demo" / "results.json")
