# Developer shortcuts. The README's commands are the reference; these wrap them.
PY ?= python
WORKDIR ?= workdir_demo
# make dry-run DRY_RUN_FLAGS=--config.aot.slice=v6e-64
DRY_RUN_FLAGS ?=

.PHONY: test test-fast lint format demo demo-quick bench bench-tiny aot dry-run

test:  ## the whole suite (as CI runs it)
	$(PY) -m pytest -q

test-fast:  ## everything not marked slow
	$(PY) -m pytest -q -m "not slow"

# configs/ is a link to qwenvl_jax/configs, linted with the package.
lint:
	ruff check qwenvl_jax tests tools
	ruff format --check qwenvl_jax tests tools

format:
	ruff format qwenvl_jax tests tools

demo:  ## the out-of-box run: synthetic data, tiny model, three stages, evaluation
	$(PY) -m qwenvl_jax.train --workdir=$(WORKDIR)

demo-quick:  ## one tiny stage on random batches (seconds to a minute on a CPU)
	$(PY) -m qwenvl_jax.train --config=configs/multitask.py:tiny --workdir=$(WORKDIR)_tiny

bench:  ## the PyTorch reference's shape on the local accelerator
	$(PY) -m qwenvl_jax.bench --shape=ref8

bench-tiny:
	$(PY) -m qwenvl_jax.bench --shape=tiny --steps=2

dry-run:  ## config, mesh and per-device bytes of the 7B multi-task stage on v5p-64 (any machine)
	$(PY) -m qwenvl_jax.train --config=configs/multitask.py --dry_run $(DRY_RUN_FLAGS)

aot:  ## compile the 7B multi-task step for v5p-64 and v6e-64 on this CPU host (needs .[tpu])
	launch/aot_7b.sh
