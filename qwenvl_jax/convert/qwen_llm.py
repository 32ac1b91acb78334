"""Import a text-only HF Qwen (e.g. Qwen-7B) as a decoder-only tower checkpoint for stage 1.

Qwen-7B's state dict uses the decoder key names of Qwen-VL (`transformer.wte`,
`transformer.h.{i}.*`, `transformer.ln_f`, `lm_head`), so the decoder rules of
`qwenvl_jax.convert.mapping` apply unchanged; only the rules under `transformer.visual.` are left
out. Every key of the checkpoint must be consumed exactly once (a visual key is "unexpected").

The result is a partial parameter tree (no `transformer.visual`), saved in our format with a
`config.json` whose LLM fields are Qwen-7B's and whose `visual` section is Qwen-VL's default
ViT-bigG (the model the tower will be merged into; stage 1 takes only the LLM paths from it), and
`tower.json` = {"tower": "llm", ...}.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from qwenvl_jax import config as config_lib
from qwenvl_jax.config import QWenConfig, VisualConfig
from qwenvl_jax.convert import hf, mapping
from qwenvl_jax.convert.errors import CheckpointError
from qwenvl_jax.errors import MissingPathError

TOWER_JSON = "tower.json"


def is_llm_rule(rule: mapping.Rule) -> bool:
    """The decoder tensors: everything outside `transformer.visual.`."""
    return not rule.hf_key.startswith("transformer.visual.")


def llm_config(d: dict, *, source: str = "config.json", visual: VisualConfig | None = None):
    """A QWenConfig from a text-only Qwen `config.json` dict.

    Args:
      d: the parsed config.json of the text-only model.
      source: the file name, for messages.
      visual: the ViT/adapter config to attach (default: Qwen-VL's, with output_dim = hidden_size).

    Raises:
      CheckpointError: the config is not a Qwen model, is a Qwen-VL one (has `visual`), or a field
        is out of `config.BOUNDS` (named, with the file).
    """
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: holds a JSON {type(d).__name__}, not a config object")
    if d.get("model_type", "qwen") != "qwen":
        raise CheckpointError(f"{source}: model_type={d.get('model_type')!r}, expected 'qwen'")
    if "visual" in d:
        raise CheckpointError(
            f"{source} has a 'visual' section: this is a Qwen-VL checkpoint; use"
            " `python -m qwenvl_jax.convert import` instead"
        )
    names = {f.name for f in dataclasses.fields(QWenConfig)} - {"visual"}
    kwargs = {k: v for k, v in d.items() if k in names}
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}: not a Qwen config.json")
    try:
        # The LLM fields first, so a bad one is named as itself, not as the ViT's output_dim.
        config_lib.check_bounds(kwargs)
        hidden = kwargs["hidden_size"]
        kwargs.setdefault("kv_channels", hidden // kwargs["num_attention_heads"])
        if visual is None:
            visual = VisualConfig(output_dim=hidden)
        return QWenConfig(visual=visual, **kwargs)
    except ValueError as e:  # ConfigError: a field out of bounds or inconsistent
        raise CheckpointError(f"{source}: {e}") from None


def import_qwen_llm(
    path: str,
    *,
    scan_layers: bool = False,
    dtype: Any = None,
    progress: hf.Progress = None,
) -> tuple[QWenConfig, dict]:
    """Read a text-only HF Qwen directory into a decoder-only parameter tree.

    Args:
      path: directory with config.json and model*.safetensors / pytorch_model*.bin (indexed or not).
      scan_layers: return the decoder layers stacked.
      dtype: cast every tensor (None keeps the stored dtype).
      progress: called with one line per shard.

    Returns:
      (config, {"transformer": {"wte", "h", "ln_f"}, "lm_head": ...}) of numpy arrays.

    Raises:
      MissingPathError (a FileNotFoundError): `path` is not a directory.
      CheckpointError: a bad config.json or weight file; StateDictMismatchError (one): a missing,
        unexpected (e.g. visual), duplicated or mis-shaped key.
    """
    if not os.path.isdir(path):
        what = "a file" if os.path.exists(path) else "does not exist"
        raise MissingPathError(
            f"{path}: {what}; expected the Qwen-7B directory (config.json + weight shards)"
        )
    cfg_path = os.path.join(path, "config.json")
    try:
        d = config_lib.read_config_json(cfg_path)
    except ValueError as e:  # not JSON
        raise CheckpointError(str(e)) from None
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no config.json (a Qwen-7B directory holds config.json and the weights)"
        ) from None
    cfg = llm_config(d, source=cfg_path)
    _, params = hf.import_hf(
        path, config=cfg, scan_layers=scan_layers, dtype=dtype, progress=progress, only=is_llm_rule
    )
    return cfg, params


def write_tower_json(out_dir: str, info: dict) -> None:
    """Write `tower.json`: which tower a partial checkpoint holds and where it came from."""
    with open(os.path.join(out_dir, TOWER_JSON), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")


__all__ = ["import_qwen_llm", "is_llm_rule", "llm_config", "write_tower_json"]
