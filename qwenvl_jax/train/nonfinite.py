"""Non-finite steps: what the host does about them, deciding only where it syncs anyway.

The device side needs no host: the train step flags a step whose loss or gradient norm is not
finite (train/step.py), and `optim.skip_nonfinite` then applies nothing (nor an update that would
make a parameter non-finite) and counts the step in the optimizer state, so the count is
checkpointed and a resumed run goes on counting. Parameters and optimizer state after a skipped
step are exactly those before it; the LR schedule does not advance.

The host keeps every step's metrics (device scalars) unread and calls `NonFiniteGuard.check` where
the loop reads a step's metrics anyway (every `log_every` steps) and before every checkpoint. If
the count grew, it reads the kept metrics to name the steps, then applies `config.optim.nonfinite`:

- "skip" (default): a warning per skipped step; more than `config.optim.max_nonfinite_steps` in
  the run stops it.
- "stop": the first skipped step stops the run.

A stop caused by step k is therefore raised at the first log or checkpoint step >= k, before that
step's checkpoint is written: no checkpoint is written after a non-finite step without this check,
and every checkpoint holds finite values (a skipped step leaves the state as it was). The stop is a
`NonFiniteError`: one line naming the step, what was not finite, the LR and the last checkpoint
(the command line prints it and exits 2).
"""

from __future__ import annotations

import logging
import math

import jax
import ml_collections

from qwenvl_jax import optim as optim_lib
from qwenvl_jax.errors import ConfigError, UserError

POLICIES = ("skip", "stop")
_KEYS = ("loss", "grad_norm", "lr", "nonfinite_steps")  # the step metrics a message needs


class NonFiniteError(UserError, FloatingPointError):
    """Training produced non-finite values and the policy stops the run (the message says where)."""


def policy_of(cfg: ml_collections.ConfigDict) -> tuple[str, int]:
    """(`config.optim.nonfinite`, `config.optim.max_nonfinite_steps`), checked.

    Raises:
        ConfigError: naming the key and the values it takes.
    """
    policy = cfg.optim.nonfinite
    if policy not in POLICIES:
        raise ConfigError(
            f"--config.optim.nonfinite={policy!r}: must be one of"
            f" {', '.join(repr(p) for p in POLICIES)}"
        )
    limit = cfg.optim.max_nonfinite_steps
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(
            f"--config.optim.max_nonfinite_steps={limit!r}: must be an integer >= 0 (skipped"
            " steps a run may have before it stops)"
        )
    return policy, limit


def _what(m: dict) -> str:
    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
    if not math.isfinite(loss):
        what = f"the loss is not finite ({loss})"
    elif not math.isfinite(gnorm):
        what = f"the gradient norm is not finite ({gnorm})"
    else:
        what = "the update would make a parameter non-finite"
    return f"{what} at learning rate {float(m['lr']):.3g}"


class NonFiniteGuard:
    """Applies the non-finite policy at the loop's sync points (see the module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.policy, self.limit = policy_of(cfg)
        self.seen = 0  # skipped steps the host has accounted for
        self._pending: list[tuple[int, dict]] = []  # (step, unread device metrics)

    def start(self, opt_state) -> None:
        """Takes the count of a restored optimizer state (one read, at start)."""
        self.seen = int(jax.device_get(optim_lib.nonfinite_steps(opt_state)))
        self._pending = []

    def record(self, step: int, metrics: dict) -> None:
        """Keeps step `step`'s metrics (device arrays) unread, for naming a skipped step later."""
        self._pending.append((step, {k: metrics[k] for k in _KEYS}))

    def check(self, last_checkpoint: int | None) -> None:
        """Reads the count (the latest step's; the caller syncs here anyway) and applies the policy.

        Args:
            last_checkpoint: the newest step saved or restored by this run, None if none.

        Raises:
            NonFiniteError: policy "stop" and a step was skipped, or more skipped steps than the
                limit.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        count = int(jax.device_get(pending[-1][1]["nonfinite_steps"]))
        if count <= self.seen:
            return
        fetched = jax.device_get([m for _, m in pending])
        prev = self.seen
        self.seen = count
        where = (
            "no checkpoint was written"
            if last_checkpoint is None
            else f"the last finite checkpoint is step {last_checkpoint}"
        )
        for (step, _), m in zip(pending, fetched, strict=True):
            n = int(m["nonfinite_steps"])
            if n <= prev:
                continue
            prev = n
            if self.policy == "stop":
                raise NonFiniteError(
                    f"step {step}: {_what(m)}; the update was not applied and the run stops"
                    f" (config.optim.nonfinite='stop'); {where}"
                )
            if n > self.limit:
                raise NonFiniteError(
                    f"step {step}: {_what(m)}; {n} steps were skipped, more than"
                    f" config.optim.max_nonfinite_steps={self.limit}, so the run stops; {where}"
                )
            logging.warning(
                "step %d: %s; the update was skipped (%d of at most %d skipped steps,"
                " config.optim.max_nonfinite_steps)",
                step, _what(m), n, self.limit,
            )  # fmt: skip
