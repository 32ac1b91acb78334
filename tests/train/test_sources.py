"""train/sources: an init checkpoint that does not fit the run names itself and its misfits."""

import jax
import numpy as np
import pytest
from tiny import train_config

from qwenvl_jax import train, tree
from qwenvl_jax.convert import ours


def _tiny(**lora):
    c = train_config("sft")
    for k, v in lora.items():
        c.lora[k] = v
    return c


@pytest.fixture(scope="module")
def bad_checkpoint(tmp_path_factory):
    """The tiny run's own parameters with ln_f dropped, one leaf added and lm_head re-shaped."""
    s = train.build(_tiny(), jax.devices()[:1])
    flat = tree.flatten(jax.device_get(train.init_params(s, 0)))
    want_head = flat["lm_head.kernel"].shape
    del flat["transformer.ln_f.scale"]
    flat["transformer.extra.kernel"] = np.zeros((2, 2), np.float32)
    flat["lm_head.kernel"] = np.zeros((want_head[0], want_head[1] + 1), np.float32)
    path = str(tmp_path_factory.mktemp("init") / "bad")
    ours.save_params(path, tree.unflatten(flat), s.mcfg)
    return path, want_head


def test_full_run_init_checkpoint_that_does_not_fit(bad_checkpoint):
    path, (d, v) = bad_checkpoint
    c = _tiny()
    c.init.checkpoint = path
    with pytest.raises(tree.TreeMismatchError) as e:
        train.initial_params(train.build(c, jax.devices()[:1]))
    assert str(e.value) == (
        f"checkpoint {path}: does not fit the model: 1 missing (first transformer.ln_f.scale),"
        f" 1 unexpected (first transformer.extra.kernel), 1 mis-shaped (first lm_head.kernel:"
        f" ({d}, {v + 1}) vs the model's ({d}, {v}))"
    )


def test_lora_base_init_checkpoint_that_does_not_fit(bad_checkpoint):
    # The frozen base and the trained modules_to_save both come from the source: lm_head is one.
    path, (d, v) = bad_checkpoint
    c = _tiny(rank=4, modules_to_save=[r"^lm_head\."])
    c.init.checkpoint = path
    s = train.build(c, jax.devices()[:1])
    assert s.lora and "lm_head.kernel" in tree.flatten(s.abstract_params)
    with pytest.raises(tree.TreeMismatchError) as e:
        train.initial_params(s)
    assert str(e.value) == (
        f"checkpoint {path}: does not fit the model: 1 missing (first transformer.ln_f.scale),"
        f" 1 unexpected (first transformer.extra.kernel), 1 mis-shaped (first lm_head.kernel:"
        f" ({d}, {v + 1}) vs the model's ({d}, {v}))"
    )
