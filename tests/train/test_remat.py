"""remat "auto": the lightest policy whose compiled train step fits the device (train/remat.py)."""

import jax
import numpy as np
import pytest
from tiny import train_config

from qwenvl_jax.errors import ConfigError
from qwenvl_jax.train import remat
from qwenvl_jax.train.aot import aot_compile, compiled_report
from qwenvl_jax.train.state import build


def _cfg(fit_gib=0.0, steps=4, **kw):
    c = train_config(steps=steps, batch_size=4, grad_accum=2, **{"checkpoint.every_steps": 100})
    c.model.remat_llm = c.model.remat_vit = "auto"
    c.model.remat_fit_gib = fit_gib
    c.optim.warmup_steps = 1
    for k, v in kw.items():
        c.model[k] = v
    return c


def _peak(cfg, policy, devices):
    s = build(remat.with_remat(cfg, list(remat.TOWERS), policy), devices)
    return compiled_report(aot_compile(s))["peak_estimate_bytes"]


def test_without_a_device_memory_auto_is_dots_and_compiles_nothing():
    s, compiled = remat.resolve(_cfg(), jax.devices()[:1])
    assert (s.cfg.model.remat_llm, s.cfg.model.remat_vit) == ("dots", "dots")
    assert compiled is None
    # Only the towers set to auto move.
    s, _ = remat.resolve(_cfg(remat_vit="none"), jax.devices()[:1])
    assert (s.cfg.model.remat_llm, s.cfg.model.remat_vit) == ("dots", "none")


def test_a_run_uses_the_compiled_step_of_the_first_policy_that_fits(tmp_path, capsys):
    from qwenvl_jax.train.loop import train

    hist = train(_cfg(fit_gib=64.0, steps=2), str(tmp_path / "w"), devices=jax.devices()[:1])
    # (two steps: the compiled step's outputs are the next step's inputs)
    out = capsys.readouterr().out
    assert "config.model.remat_llm/config.model.remat_vit=auto: dots (compiled peak" in out
    assert "train step compiled in" not in out and "compiled 2 times" not in out
    assert [r["step"] for r in hist] == [1, 2] and all(np.isfinite(r["loss"]) for r in hist)


def test_policies_that_do_not_fit_are_passed_over():
    devices = jax.devices()[:1]
    peaks = {p: _peak(_cfg(), p, devices) for p in remat.LADDER}
    # The tiny model's activations still order the policies: full keeps the least.
    assert peaks["full"] < min(peaks["dots"], peaks["save_attn"]), peaks
    # Room for full only: dots and save_attn are compiled, measured and passed over.
    fit = (peaks["full"] + 2**10) / remat.FRACTION / 2**30
    s, compiled = remat.resolve(_cfg(fit_gib=fit), devices)
    assert (s.cfg.model.remat_llm, s.cfg.model.remat_vit) == ("full", "full")
    assert compiled_report(compiled)["peak_estimate_bytes"] == peaks["full"]


def test_nothing_fits_and_bad_names_are_config_errors():
    peaks = r"dots [\d.]+ MiB, save_attn [\d.]+ MiB, full [\d.]+ MiB"
    fits = r"no remat policy fits 90% of the 0.0 MiB"
    with pytest.raises(ConfigError, match=rf"{fits} .*{peaks}"):
        remat.resolve(_cfg(fit_gib=1e-6), jax.devices()[:1])
    with pytest.raises(
        ConfigError, match=r"config\.model\.remat_vit='fast': choose auto or one of"
    ):
        remat.resolve(_cfg(remat_vit="fast"), jax.devices()[:1])
