"""notebooks/qwen_vl_chat.ipynb: runs top to bottom on a tiny random HF checkpoint.

The notebook's code path is the one Colab runs with the published weights (the HF directory given
by QWENVL_CHAT_DIR instead of the download, converted, loaded on a mesh of 8 fake CPU devices); only
the checkpoint differs. Its install cell is quickstart's, with other packages.
"""

import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "qwen_vl_chat.ipynb")
QUICKSTART = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_chat_notebook_executes_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the test extra (nbformat) is not installed")
    nbclient = pytest.importorskip("nbclient", reason="the test extra (nbclient) is not installed")
    from qwenvl_jax import QwenVL

    hf_dir = tmp_path / "hf"
    QwenVL.random("tiny", seed=0).save_pretrained(str(hf_dir))  # weights, config, tokenizer
    picture = tmp_path / "picture.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(picture)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("QWENVL_CHAT_DIR", str(hf_dir))
    monkeypatch.setenv("QWENVL_DEMO_IMAGE", str(picture))
    # The kernel sees 8 devices, as on a TPU v2-8: the notebook picks mesh="fsdp=8".
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # none saved
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"HF checkpoint: {hf_dir}" in text
    assert "8 x cpu: mesh=fsdp=8, quantize=None" in text
    assert os.path.isdir(work / "qwen-vl-chat-jax" / "params")  # converted once, then loaded
    assert "user: What is in this picture?\nassistant:" in text
    assert 'user: Output the detection box of "the dog"\nassistant:' in text
    # A random model gives no box; the cell says so rather than failing.
    assert "no box in the answer" in text or "image/png" in str(outputs)
    assert text.count("(VQA accuracy ") == 5
    assert "TextVQA-style VQA score: " in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the picture, a sign


def test_install_cell_is_quickstarts_with_other_packages():
    nbformat = pytest.importorskip("nbformat", reason="the test extra (nbformat) is not installed")

    def first_code(path):
        cells = nbformat.read(path, as_version=4).cells
        return next(c.source for c in cells if c.cell_type == "code")

    ours, quick = first_code(NOTEBOOK), first_code(QUICKSTART)
    quick = quick.replace('"qwenvl_jax_repo[demo]"]', '"qwenvl_jax_repo", "huggingface_hub"]')

    def code_lines(src):  # the comment at the top names what is installed
        return [line for line in src.splitlines() if not line.startswith("#")]

    assert code_lines(ours) == code_lines(quick)
    assert '"qwenvl_jax_repo", "huggingface_hub"]' in ours
