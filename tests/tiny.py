"""The tests' tiny trainable config: one definition that every training test starts from."""

from qwenvl_jax.train import stage_config

# A 1024-token vocabulary and 16 image queries keep the tiny model's embeddings, LM head and
# image spans small; image_start_id must lie inside the vocabulary.
TINY_MODEL = {"vocab_size": 1024, "visual": {"n_queries": 16, "image_start_id": 1000}}


def train_config(stage: str = "multitask", steps: int = 4, variant: str = "tiny", **overrides):
    """`configs/<stage>.py:<variant>` with the tiny vocabulary, `steps` steps, a log line and an
    async checkpoint every 2 steps; `overrides` set dotted keys ("optim.lr"=1e-3 as optim__lr or
    via a dict: train_config(**{"optim.lr": 1e-3}))."""
    c = stage_config.load(f"{stage}:{variant}")
    c.model.overrides.vocab_size = TINY_MODEL["vocab_size"]
    c.model.overrides.visual = dict(TINY_MODEL["visual"])
    c.steps = steps
    c.optim.warmup_steps = min(int(c.optim.warmup_steps), steps - 1)  # warmup < steps
    c.log_every = 1
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = True
    return set_keys(c, **{k.replace("__", "."): v for k, v in overrides.items()})


def set_keys(c, **dotted):
    """Sets dotted config keys ("optim.lr") on `c` and returns it."""
    for key, value in dotted.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


# The same model on the command line (`python -m qwenvl_jax.train --config=...:tiny`).
TINY_FLAGS = [
    f"--config.model.overrides.vocab_size={TINY_MODEL['vocab_size']}",
    f"--config.model.overrides.visual.n_queries={TINY_MODEL['visual']['n_queries']}",
    f"--config.model.overrides.visual.image_start_id={TINY_MODEL['visual']['image_start_id']}",
]
