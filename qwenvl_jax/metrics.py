"""Training metrics: a console progress line and TensorBoard event files in the workdir.

Only process 0 writes. Scalars are pulled from device once per logged step (never every step), so
logging does not serialise the step pipeline.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import jax


class MetricsWriter:
    """Writes scalars to `<workdir>/tensorboard` and prints one progress line per logged step."""

    def __init__(self, workdir: str | None, total_steps: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self._tb = None
        self._t0 = time.time()
        if self.enabled and workdir:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Logs `scalars` (python floats) for optimizer step `step` (1-based)."""
        if not self.enabled:
            return
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        print(self.progress_line(step, scalars), flush=True)

    def progress_line(self, step: int, s: Mapping[str, float]) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        fmt = (
            ("loss", "loss {:.4f}"),
            ("lr", "lr {:.3g}"),
            ("grad_norm", "|g| {:.3g}"),
            ("tokens_per_s", "{:,.0f} tok/s"),
            ("images_per_s", "{:,.1f} img/s"),
            ("model_tflops_per_s", "{:.1f} TFLOP/s"),
            ("mfu", "MFU {:.1%}"),
            ("data_wait_s", "data wait {:.3f}s"),
            ("step_s", "{:.3f} s/step"),
        )
        for key, f in fmt:
            if key in s and s[key] is not None:
                parts.append(f.format(s[key]))
        if s.get("nonfinite_steps"):  # only once a step was skipped (train/nonfinite.py)
            parts.append(f"{s['nonfinite_steps']:.0f} non-finite steps skipped")
        elapsed = time.time() - self._t0
        parts.append(f"[{elapsed:.0f}s]")
        return " | ".join(parts)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
