"""One command-line convention (qwenvl_jax/cli.py) across the tools: `--help` lists the flags,
exit 0; a user mistake ends in one line naming it, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest

from qwenvl_jax.eval import benchmarks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/multitask.py:tiny"
SEVEN_B = "--config=configs/multitask.py"
EXPORT = ["export", "src", "out"]

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
    ("qwenvl_jax.train", [TINY, "extra"], ["unexpected argument 'extra'", "--name=value"]),
    ("qwenvl_jax.train", ["--demo_setting=huge"], ["huge", "quick", "default", "long"]),
    (
        "qwenvl_jax.train",
        [SEVEN_B, "--dry_run", "--config.aot.slice=v5p-7"],
        ["config.aot.slice='v5p-7'", "v5p-64", "8xh100"],
    ),
    (
        "qwenvl_jax.train",  # the tests' 8 CPU devices do not hold a 3-way model axis
        [SEVEN_B, "--dry_run", "--config.aot.slice=local", "--config.mesh.model=3"],
        ["config.mesh", "does not divide 8 devices", "--config.aot.slice=v5p-64"],
    ),
    ("qwenvl_jax.demo", ["--demo_setting=huge"], ["huge", "quick", "default", "long"]),
    ("qwenvl_jax.demo", ["--setting=long"], ["setting"]),
    (
        "qwenvl_jax.evaluate",
        ["--checkpoint=c", "--benchmark=textvqa"],
        ["--benchmark", "invalid choice: 'textvqa'", "textvqa_val"],
    ),
    (
        "qwenvl_jax.evaluate",
        ["--checkpoint=c", "--benchmark=nocaps", "--batch_size=abc"],
        ["--batch_size", "'abc'"],
    ),
    (
        "qwenvl_jax.evaluate",  # no abbreviations: --bench is not --benchmark
        ["--checkpoint=c", "--bench=nocaps"],
        ["required", "--benchmark"],
    ),
    ("qwenvl_jax.evaluate", ["--benchmark=nocaps"], ["required", "--checkpoint"]),
    ("qwenvl_jax.convert", ["nope"], ["invalid choice: 'nope'", "import", "export"]),
    ("qwenvl_jax.convert", [*EXPORT, "--max_shard_size=2XB"], ["--max_shard_size", "'2XB'"]),
    ("qwenvl_jax.convert", [*EXPORT, "--bogus"], ["unrecognized arguments: --bogus"]),
    ("qwenvl_jax.bench", ["--shape=huge"], ["huge", "ref8", "tiny"]),
    ("qwenvl_jax.bench", ["--bogus=1"], ["bogus"]),
    ("qwenvl_jax.bench", ["extra"], ["unexpected argument 'extra'"]),
]


def _run(module, args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "module,args,words", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES]
)
def test_one_line_and_exit_code_2(module, args, words):
    done = _run(module, args)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])


HELP = [
    # (module, args, what the help must list)
    ("qwenvl_jax.train", [], ["--config:", "--workdir:", "--[no]dry_run:", "--config.aot.slice"]),
    ("qwenvl_jax.demo", [], ["--demo_setting:", "--workdir:", "--[no]shuffle_labels:"]),
    ("qwenvl_jax.bench", [], ["--shape:", "--mode:", "--attn_impl:", "--remat:"]),
    (
        "qwenvl_jax.evaluate",
        [],
        ["--checkpoint=DIR", "--benchmark=NAME", "--data_dir=DIR", "--batch_size=N", "--chat"],
    ),
    ("qwenvl_jax.convert", [], ["import", "export", "import-llm", "import-vit"]),
    ("qwenvl_jax.convert", ["export"], ["--step=", "--dtype=", "--max_shard_size=", "--peft"]),
]


@pytest.mark.parametrize("module,args,flags", HELP, ids=[f"{h[0]} {' '.join(h[1])}" for h in HELP])
def test_help_lists_the_flags(module, args, flags, tmp_path):
    done = _run(module, [*args, "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for f in flags:
        assert f in done.stdout, (f, done.stdout[-3000:])


def test_evaluate_help_lists_every_benchmark(tmp_path):
    done = _run("qwenvl_jax.evaluate", ["--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = done.stdout.split("benchmarks (--benchmark", 1)[1]
    names = {
        n.strip(" *") for line in listed.splitlines()[1:] for n in line.split(":")[-1].split(",")
    }
    # The eval_mm scripts' --dataset names (a few by hand), and the whole registry.
    assert {"vqav2_val", "textvqa_val", "refcoco+_testB", "scienceqa_test_img", "nocaps"} <= names
    assert set(benchmarks.BENCHMARKS) <= names
