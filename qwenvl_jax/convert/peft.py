"""Export of a LoRA / Q-LoRA training workdir: merged full weights, or a PEFT adapter directory.

A LoRA workdir's checkpoints hold only the trainable leaves (adapters `lora_A` / `lora_B` and any
`modules_to_save`); the base weights are those of the run's `config.init` (recorded in the
workdir's `train_config.json`), read here again. Two exports:

- merged (`convert export WORKDIR OUT`): base + B @ A * alpha / r added to each targeted kernel in
  float32, modules_to_save replaced; then the ordinary HF export, which the published code loads.
  For Q-LoRA the base is the full-precision init checkpoint (the adapters were trained against
  its 4-bit rounding; merging onto the original weights is what PEFT's merge_and_unload of a
  dequantized base gives as well).
- PEFT (`convert export WORKDIR OUT --peft`): `adapter_config.json` + `adapter_model.safetensors`
  with the keys PEFT writes for the published model (`base_model.model.transformer.h.0.attn.
  c_attn.lora_A.weight`, `...lora_B.weight`; modules_to_save as
  `base_model.model.lm_head.weight`), loadable with `PeftModel.from_pretrained(published, OUT)`.

Workdirs, base checkpoints and OUT may be local or `gs://` (`qwenvl_jax.fileio`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from qwenvl_jax import fileio
from qwenvl_jax.config import QWenConfig
from qwenvl_jax.convert.errors import CheckpointError


def train_config(workdir: str) -> dict | None:
    """The workdir's resolved training config (train_config.json), or None if absent."""
    path = fileio.join(workdir, "train_config.json")
    if not fileio.isfile(path):
        return None
    return json.loads(fileio.read_text(path))


def lora_settings(workdir: str) -> dict | None:
    """`config.lora` of a LoRA workdir (rank > 0), else None."""
    tc = train_config(workdir)
    lc = (tc or {}).get("lora") or {}
    return lc if int(lc.get("rank", 0) or 0) > 0 else None


class _Lc:
    """`config.lora` as attributes (what `qwenvl_jax.lora.adapter_config` reads)."""

    def __init__(self, d: dict):
        self.rank, self.alpha, self.dropout = d["rank"], d["alpha"], d["dropout"]
        self.targets = tuple(d.get("targets") or ())
        self.modules_to_save = tuple(d.get("modules_to_save") or ())


def base_params(workdir: str) -> tuple[Any, str]:
    """The per-layer base params a LoRA workdir was trained on (its config.init) and their source.

    Raises:
      CheckpointError: the run started from random weights or its init source is gone.
    """
    init = (train_config(workdir) or {}).get("init") or {}
    if init.get("checkpoint"):
        from qwenvl_jax.convert import ours

        src = init["checkpoint"]
        if not fileio.isdir(src):
            raise CheckpointError(f"{workdir}: its base checkpoint {src} (config.init) is gone")
        _, params = ours.load_params(src, scan_layers=False)
        return params, src
    if init.get("workdir"):
        from qwenvl_jax import checkpoint

        src = init["workdir"]
        _, params = checkpoint.latest_params(src, scan_layers=False)
        return params, src
    raise CheckpointError(
        f"{workdir} is a LoRA run from random base weights (no config.init.checkpoint/workdir):"
        " there is no base to merge the adapters onto"
    )


def load_merged(workdir: str, step: int | None = None) -> tuple[QWenConfig, dict, int]:
    """(config, merged per-layer params, step) of a LoRA workdir."""
    from qwenvl_jax import lora
    from qwenvl_jax.convert.workdir import load_workdir_params

    lc = lora_settings(workdir)
    cfg, trained, step = load_workdir_params(workdir, step)
    base, _ = base_params(workdir)
    base = _as_numpy(base)
    return cfg, lora.merge(base, trained, float(lc["alpha"]) / int(lc["rank"])), step


def export_peft(workdir: str, out_dir: str, step: int | None = None) -> list[str]:
    """Write `adapter_config.json` and `adapter_model.safetensors` (float32) into `out_dir`."""
    from safetensors.numpy import save

    from qwenvl_jax import lora
    from qwenvl_jax.convert.workdir import load_workdir_params

    lc = lora_settings(workdir)
    _, trained, step = load_workdir_params(workdir, step)
    tensors = lora.peft_state_dict(trained)
    for path, x in _modules_to_save(trained).items():
        tensors[f"base_model.model.{path}"] = x
    init = (train_config(workdir) or {}).get("init") or {}
    conf = lora.adapter_config(_Lc(lc), init.get("checkpoint") or init.get("workdir") or "")
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    # In memory, then one write (local or gs://): adapters are a small fraction of the model.
    data = save(tensors, {"format": "pt"})
    fileio.write_bytes(fileio.join(out_dir, "adapter_model.safetensors"), data)
    fileio.write_text(fileio.join(out_dir, "adapter_config.json"), json.dumps(conf, indent=2))
    return ["adapter_config.json", "adapter_model.safetensors"]


def _modules_to_save(trained: dict) -> dict[str, np.ndarray]:
    """Trained full leaves as HF keys (torch layout): `transformer.wte.weight`, `lm_head.weight`."""
    out = {}
    if "lm_head" in trained:
        out["lm_head.weight"] = np.asarray(trained["lm_head"]["kernel"]).T
    wte = trained.get("transformer", {}).get("wte")
    if wte:
        out["transformer.wte.weight"] = np.asarray(wte["embedding"])
    return out


def _as_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)
