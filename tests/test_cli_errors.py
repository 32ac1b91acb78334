"""User mistakes on the command lines end in one line naming the mistake, exit code 2."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/multitask.py:tiny"

CASES = [
    # (module, args, words the one line must hold)
    ("qwenvl_jax.train", ["--config=configs/nope.py"], ["configs/nope.py", "does not exist"]),
    (
        "qwenvl_jax.train",
        [TINY, "--config.optim.lr_peak=1"],
        ["--config.optim.lr_peak", "no key 'lr_peak'", "warmup_steps"],
    ),
    ("qwenvl_jax.train", [TINY, "--config.optimx.lr=1"], ["no key 'optimx'", "optim"]),
    ("qwenvl_jax.train", ["--config=configs/multitask.py:tiyn"], ["tiyn", "tiny", "res"]),
    ("qwenvl_jax.train", [TINY, "--config.steps=abc"], ["--config.steps=abc"]),
    ("qwenvl_jax.train", [TINY], ["--workdir is required"]),
    ("qwenvl_jax.train", ["--bogus=1"], ["bogus"]),
    ("qwenvl_jax.train", ["--demo_setting=huge"], ["huge", "quick", "default", "long"]),
    ("qwenvl_jax.demo", ["--demo_setting=huge"], ["huge", "quick", "default", "long"]),
    ("qwenvl_jax.demo", ["--setting=long"], ["setting"]),
]


@pytest.mark.parametrize("module,args,words", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_one_line_and_exit_code_2(module, args, words, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
