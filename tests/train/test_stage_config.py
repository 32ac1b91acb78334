"""Where `--config=configs/<stage>.py` comes from: the checkout's file, your own, or the copy
installed with the package (`stage_config.resolve`)."""

import os

import pytest

from qwenvl_jax.errors import MissingPathError
from qwenvl_jax.train import stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGED = os.path.join(ROOT, "qwenvl_jax", "configs")


def test_checkout_configs_is_the_packaged_directory():
    # One copy of each file: the checkout's configs/ is a link to the package's.
    assert os.path.islink(os.path.join(ROOT, "configs"))
    assert os.path.realpath(os.path.join(ROOT, "configs")) == PACKAGED
    assert os.path.realpath(stage_config.CONFIGS_DIR) == PACKAGED
    for stage in stage_config.STAGES:
        assert os.path.isfile(os.path.join(PACKAGED, f"{stage}.py"))


def test_configs_path_resolves_to_the_installed_copy_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    got = stage_config.resolve("configs/sft.py:lora,tiny")
    assert got == os.path.join(stage_config.CONFIGS_DIR, "sft.py") + ":lora,tiny"
    assert stage_config.resolve("./configs/data/finetune_example.json") == os.path.join(
        stage_config.CONFIGS_DIR, "data", "finetune_example.json"
    )
    assert stage_config.resolve("multitask:tiny").startswith(stage_config.CONFIGS_DIR)
    c = stage_config.load("configs/sft.py:lora,tiny")
    assert c.stage == "sft" and c.lora.rank == 64 and c.model.preset == "tiny"


def test_a_file_that_exists_is_taken_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sft.py").write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'stage': 'mine', 'arg': arg})\n"
    )
    assert stage_config.resolve("configs/sft.py:x") == "configs/sft.py:x"
    assert stage_config.load("configs/sft.py:x").to_dict() == {"stage": "mine", "arg": "x"}
    # Only the configs/ directory falls back to the package; other paths are the user's.
    assert stage_config.resolve("other/sft.py") == "other/sft.py"


def test_a_config_that_exists_nowhere_names_the_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stage_config.resolve("configs/nope.py") == "configs/nope.py"
    with pytest.raises(MissingPathError, match=r"'configs/nope.py' does not exist.*configs/sft.py"):
        stage_config.load("configs/nope.py")
