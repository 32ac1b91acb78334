"""The notebooks: quickstart runs top to bottom; its install cell works in a fresh environment."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(quick_run, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the test extra (nbformat) is not installed")
    nbclient = pytest.importorskip("nbclient", reason="the test extra (nbclient) is not installed")
    workdir, _ = quick_run  # the suite's one quick demo run: the notebook loads it
    monkeypatch.setenv("QWENVL_DEMO_SETTING", "quick")
    monkeypatch.setenv("QWENVL_DEMO_WORKDIR", workdir)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "loaded the finished run" in text
    assert "grounding acc" in text and "assistant:" in text and "IoU with the true box" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the picture, the drawn box, boxes.png, the loss curve


def _first_code_cell(path: str) -> str:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_install_cell_works_unmodified_in_a_fresh_environment(tmp_path):
    # A fresh virtual environment without qwenvl_jax (as a Colab runtime), the repository URL
    # pointing at a local clone of this repository: the cell clones, installs and imports it.
    clone = tmp_path / "origin"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["QWENVL_JAX_REPO"] = str(clone)
    done = subprocess.run(
        [python, "-c", _first_code_cell(NOTEBOOK)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"qwenvl_jax from {work / 'qwenvl_jax_repo' / 'qwenvl_jax'}" in done.stdout
    # The demo extra came with it: the notebook's next cells need sentencepiece and matplotlib.
    check = "import sentencepiece, matplotlib, qwenvl_jax.demo; print('ok')"
    done = subprocess.run([python, "-c", check], cwd=work, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_requirements_keep_a_newer_jax():
    # Exact pins would replace the JAX of a Colab, GPU or TPU environment with the pinned CPU
    # build; ranges keep it. (The package index here has no JAX newer than 0.10.2, so this checks
    # the installed metadata rather than installing a newer JAX.)
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in importlib.metadata.requires("qwenvl_jax")]
    base = [r for r in reqs if r.marker is None]
    for r in base:
        assert not any(s.operator in ("==", "===", "~=") for s in r.specifier), str(r)
    jax = next(r for r in base if r.name == "jax")
    assert "0.12.0" in jax.specifier and "0.10.2" in jax.specifier
    assert importlib.metadata.metadata("qwenvl_jax")["Requires-Python"] == ">=3.11"
