"""config.mesh.model = "auto" (train/model_axis.py), decided by the trainer's compile-to-fit loop
(train/remat.py): model = 1 where its compiled step fits the device memory with a remat policy no
heavier than model = 2's, else 2. On the 8 fake CPU devices, with `config.model.remat_fit_gib`
standing for a device's memory and budgets set between XLA's compiled peaks of the tiny step."""

import contextlib
import io

import pytest
from tiny import set_keys, train_config

from qwenvl_jax.errors import ConfigError
from qwenvl_jax.train import model_axis, remat
from qwenvl_jax.train.aot import aot_compile, compiled_report
from qwenvl_jax.train.state import build
from qwenvl_jax.train.validate import model_axes, validate


def _cfg(fit_gib=0.0, policy="auto", **kw):
    # The tiny mesh is data-parallel (data=-1): with model = 1 every device holds all parameters
    # and Adam's moments, with model = 2 half of the big ones, so model = 2 needs less memory.
    c = train_config(steps=2, batch_size=8, grad_accum=1)
    c.mesh.model = "auto"
    c.model.remat_llm = c.model.remat_vit = policy
    c.model.remat_fit_gib = fit_gib
    return set_keys(c, **kw)


@pytest.fixture(scope="module")
def fits_at_1():
    """`remat.resolve` with room for any step: (setup, compiled step, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        s, compiled = remat.resolve(_cfg(fit_gib=64.0))
    return s, compiled, out.getvalue()


@pytest.fixture(scope="module")
def full_at_1():
    """XLA's compiled peak per device of the tiny step with model = 1 and full remat."""
    c = model_axis.with_model(remat.with_remat(_cfg(), list(remat.TOWERS), "full"), 1)
    return compiled_report(aot_compile(build(c)))["peak_estimate_bytes"]


def test_choices_follow_the_devices_and_the_batch():
    assert model_axis.choices(_cfg(), 8) == [1, 2]
    assert model_axis.choices(_cfg(), 1) == [1]  # a model axis of 2 needs two devices
    assert model_axis.choices(_cfg(**{"mesh.data": 4}), 8) == [2]  # data 4 x model 2 = 8
    # 8 sequences split over 4 data shards but not, with 2 micro-batches, over 8.
    assert model_axis.choices(_cfg(grad_accum=2), 8) == [1, 2]
    assert model_axes(_cfg(grad_accum=2), 8) == [2]
    validate(_cfg(grad_accum=2), devices=8, process_count=1)
    assert model_axis.choices(_cfg(**{"mesh.model": 2}), 1) == [2]  # an integer is as given
    with pytest.raises(ConfigError, match=r"^--config.mesh.model=auto: no model axis of \(1, 2\)"):
        model_axis.choices(_cfg(**{"mesh.data": 3}), 8)


def test_auto_validates_and_a_bad_value_is_named():
    validate(_cfg(), devices=8, process_count=1)
    validate(_cfg(), devices=1, process_count=1)
    with pytest.raises(ConfigError, match=r"^--config.mesh.model='two': must be .* or auto$"):
        validate(_cfg(**{"mesh.model": "two"}), devices=8, process_count=1)


def test_without_device_memory_auto_is_1_and_compiles_nothing(capsys):
    s, compiled = remat.resolve(_cfg())
    assert compiled is None
    assert s.mesh.shape["model"] == 1 and s.cfg.mesh.model == 1
    assert "config.mesh.model=auto: 1 (no device memory to fit)" in capsys.readouterr().out


@pytest.mark.slow  # each compile of the tiny step: ~25 s of CPU on this 2-core host
def test_model_1_fits_with_the_lightest_policy_in_one_compile(fits_at_1):
    s, compiled, printed = fits_at_1
    assert s.mesh.shape["model"] == 1 and s.cfg.mesh.model == 1
    assert (s.cfg.model.remat_llm, s.cfg.model.remat_vit) == ("dots", "dots")
    assert compiled is not None  # the step the run uses: the choice cost no other compile
    line = [ln for ln in printed.splitlines() if ln.startswith("config.mesh.model=auto: ")]
    assert len(line) == 1 and line[0].startswith("config.mesh.model=auto: 1 (compiled peak")
    assert "with remat dots; tried model=1 dots" in line[0] and "model=2" not in line[0]


@pytest.mark.slow
def test_model_1_needing_a_heavier_policy_than_2_gives_2(fits_at_1, full_at_1, capsys):
    # Just too little room for model = 1 with dots (the step fits_at_1 compiled), enough for
    # it with the heavier full remat (the tiny step's activations still order them).
    dots_at_1 = compiled_report(fits_at_1[1])["peak_estimate_bytes"]
    room = dots_at_1 - 2**10
    assert full_at_1 <= room, (full_at_1, dots_at_1)
    s, compiled = remat.resolve(_cfg(fit_gib=room / remat.FRACTION / 2**30))
    # model = 2 with dots fits (the tiny mesh is data-parallel: the model axis halves the big
    # parameters and their Adam moments), so it is chosen over model = 1 with full.
    assert s.mesh.shape["model"] == 2 and s.cfg.mesh.model == 2
    assert (s.cfg.model.remat_llm, s.cfg.model.remat_vit) == ("dots", "dots")
    assert compiled_report(compiled)["peak_estimate_bytes"] <= room
    printed = capsys.readouterr().out
    assert "config.mesh.model=auto: 2 (compiled peak" in printed
    assert "tried model=1 dots" in printed and "model=1 full" not in printed


@pytest.mark.slow
def test_a_fixed_policy_falls_back_to_2_without_compiling_it(fits_at_1, capsys):
    room = compiled_report(fits_at_1[1])["peak_estimate_bytes"] - 2**10
    s, compiled = remat.resolve(_cfg(fit_gib=room / remat.FRACTION / 2**30, policy="dots"))
    assert s.mesh.shape["model"] == 2 and compiled is None  # the run compiles it, as before
    line = "config.mesh.model=auto: 2 (model=1 "  # its compiled peak, then what it does not fit
    assert line in (out := capsys.readouterr().out) and "does not fit" in out
