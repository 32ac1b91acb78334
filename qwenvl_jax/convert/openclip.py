"""Import an OpenCLIP ViT (ViT-bigG-14 for the paper) as Qwen-VL's ViT trunk, for stage 1.

OpenCLIP's vision tower (keys under `visual.`) maps onto Qwen-VL's `transformer.visual.` trunk:

- `visual.conv1.weight` [W, 3, p, p] -> `transformer.visual.conv1.weight`;
- `visual.positional_embedding` [1+G*G, W] -> `transformer.visual.positional_embedding` [G*G, W]
  (row 0, the class token's, dropped);
- `visual.ln_pre.*` -> `transformer.visual.ln_pre.*`;
- `visual.transformer.resblocks.{i}.attn.in_proj_weight` [3W, W] (rows [Wq; Wk; Wv]) and
  `in_proj_bias` [3W] -> `...attn.in_proj.{weight,bias}` with the rows re-interleaved per head
  (head, {q,k,v}, dim), Qwen-VL's layout;
- `...resblocks.{i}.{ln_1,ln_2,attn.out_proj,mlp.c_fc,mlp.c_proj}.*` -> the same names;
- `visual.class_embedding`, `visual.ln_post.*`, `visual.proj` -> dropped (reported);
- every key not under `visual.` (text tower, `logit_scale`) -> ignored (counted, reported).

Qwen-VL's ViT has no class token, so the class embedding and its position row go; for the 224 px
image with a 16x16 grid the remaining 256 rows are exactly Qwen-VL's learned 16x16 table. OpenCLIP's
`ln_post` [W] and `proj` [W, E] produce the contrastive embedding; Qwen-VL replaces them by its
adapter (`attn_pool`) followed by its own `ln_post` [D] and `proj` [D, D], so those start from a
fresh init in stage 1 (train.py keeps them random when the ViT tower lacks them).

Note: OpenCLIP's LayerNorms use eps 1e-5; Qwen-VL's ViT, which the paper initialises from these
weights, uses 1e-6 (config `layer_norm_epsilon`); the tower keeps Qwen-VL's value.

The rules of `qwenvl_jax.convert.mapping` do the final layout change; this module only renames,
re-interleaves and drops, and every `visual.` key is consumed exactly once.
"""

from __future__ import annotations

import glob
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from qwenvl_jax.config import QWenConfig
from qwenvl_jax.convert import hf, mapping, tensor_io
from qwenvl_jax.convert.errors import CheckpointError
from qwenvl_jax.errors import MissingPathError

VISUAL = "visual."
OURS = "transformer.visual."
# OpenCLIP vision keys with no counterpart in Qwen-VL's ViT trunk.
DROPPED = ("visual.class_embedding", "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj")
_TRUNK = re.compile(r"^transformer\.visual\.(conv1\.|positional_embedding$|ln_pre\.|transformer\.)")
_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")
# ViT-bigG-14: head_width 104, width 1664 -> 16 heads (open_clip model_configs/ViT-bigG-14.json).
BIGG_HEADS = 16


def is_trunk_rule(rule: mapping.Rule) -> bool:
    """Qwen-VL's ViT trunk: conv1, positional_embedding, ln_pre and the resblocks."""
    return bool(_TRUNK.match(rule.hf_key))


def openclip_file(path: str) -> str:
    """The weight file: `path`, or the one open_clip*.safetensors / *.bin in directory `path`."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise MissingPathError(f"no OpenCLIP checkpoint at {path}: it does not exist")
    for pattern in ("open_clip*.safetensors", "open_clip*.bin"):
        found = sorted(glob.glob(os.path.join(path, pattern)))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"{path} holds several {pattern} files: {found}; name one")
    raise MissingPathError(
        f"{path} holds no open_clip_pytorch_model.bin or open_clip_model.safetensors"
    )


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of a .safetensors or torch .bin file, reading no data."""
    if path.endswith(".safetensors"):
        return tensor_io.safetensors_shapes(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return {k: tuple(t.shape) for k, t in tensor_io.read_torch_bin(path).items()}
    raise CheckpointError(f"{path}: unknown weight file type (expected .safetensors or .bin)")


def _iter_visual(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) of the `visual.` tensors only (the text tower is never materialised)."""
    if path.endswith(".safetensors"):
        for k, a in tensor_io.iter_safetensors(path):  # one tensor read at a time
            if k.startswith(VISUAL):
                yield k, a
        return
    for k, t in tensor_io.read_torch_bin(path).items():
        if k.startswith(VISUAL):
            yield k, t.numpy(k)


def vit_config(
    shapes: dict[str, tuple[int, ...]],
    *,
    heads: int = BIGG_HEADS,
    base: QWenConfig | None = None,
    source: str = "checkpoint",
) -> QWenConfig:
    """The QWenConfig whose ViT fields are read from an OpenCLIP vision tower's shapes.

    Width, patch size, depth, MLP width and the position grid come from the tensors; the head count
    is not stored in the weights and is passed (16 for ViT-bigG-14). Image size = grid * patch
    (224 for ViT-bigG-14). The LLM fields and the adapter come from `base` (default: Qwen-VL 7B).

    Raises:
      StateDictMismatchError: a key needed to read the shapes is missing, or shapes disagree.
    """
    need = ("visual.conv1.weight", "visual.positional_embedding", "visual.class_embedding")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise hf.StateDictMismatchError(
            f"{source}: not an OpenCLIP ViT checkpoint: missing {missing}"
            f" (has {sum(k.startswith(VISUAL) for k in shapes)} 'visual.' keys)"
        )
    conv = shapes["visual.conv1.weight"]
    if len(conv) != 4 or conv[1] != 3 or conv[2] != conv[3]:
        raise hf.StateDictMismatchError(
            f"{source}: visual.conv1.weight has shape {conv}; expected [W, 3, p, p]"
        )
    width, patch = conv[0], conv[2]
    pos = shapes["visual.positional_embedding"]
    rows = pos[0] if len(pos) == 2 else 0
    grid = math.isqrt(max(rows - 1, 0))
    if rows < 2 or grid * grid != rows - 1:
        raise hf.StateDictMismatchError(
            f"{source}: visual.positional_embedding has shape {pos}; expected [1 + G*G, W]"
            " (class token + a square grid)"
        )
    layers = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise hf.StateDictMismatchError(
            f"{source}: visual resblocks are not numbered 0..L-1: {layers[:8]}..."
        )
    fc = shapes.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    if fc is None:
        raise hf.StateDictMismatchError(
            f"{source}: missing key 'visual.transformer.resblocks.0.mlp.c_fc.weight'"
        )
    if len(fc) != 2:
        raise hf.StateDictMismatchError(
            f"{source}: visual.transformer.resblocks.0.mlp.c_fc.weight has shape {fc}; expected"
            " [F, W]"
        )
    if width % heads:
        raise CheckpointError(f"{source}: width {width} does not split into {heads} heads")
    base = base or QWenConfig()
    try:  # the shapes are the file's word: out of `config.BOUNDS` is the file's fault
        return base.replace(
            visual=dict(
                width=width,
                patch_size=patch,
                layers=len(layers),
                heads=heads,
                mlp_width=fc[0],
                mlp_ratio=round(fc[0] / width, 4) if width else 0,
                pos_grid_size=grid,
                image_size=grid * patch,
            )
        )
    except ValueError as e:  # ConfigError, naming the visual field
        raise CheckpointError(
            f"{source}: the ViT read from its shapes is out of bounds: {e}"
        ) from None


def interleave_qkv(a: np.ndarray, heads: int) -> np.ndarray:
    """Standard [Wq; Wk; Wv] rows (or bias) -> Qwen-VL's per-head interleaved rows.

    Row `s*W + n*h + d` of the input becomes row `n*3h + s*h + d` (s in {q, k, v}, n the head, d
    the head dim). Works for the weight [3W, W] and the bias [3W].
    """
    three_w = a.shape[0]
    h = three_w // 3 // heads
    return a.reshape((3, heads, h) + a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def to_qwenvl_key(key: str, arr: np.ndarray, heads: int) -> tuple[str, np.ndarray]:
    """One OpenCLIP vision tensor -> (Qwen-VL HF key, Qwen-VL layout array)."""
    new = OURS + key[len(VISUAL) :]
    if key == "visual.positional_embedding":
        return new, arr[1:]  # drop the class token's row
    for ours, theirs in ((".attn.in_proj.weight", ".attn.in_proj_weight"),
                         (".attn.in_proj.bias", ".attn.in_proj_bias")):  # fmt: skip
        if key.endswith(theirs):
            new = new[: -len(theirs)] + ours
            if arr.ndim and arr.shape[0] % (3 * heads) == 0:
                arr = interleave_qkv(np.asarray(arr), heads)
            # else: left as is; the shape check of import_tensors names the key
    return new, arr


def import_openclip(
    path: str,
    *,
    heads: int = BIGG_HEADS,
    base: QWenConfig | None = None,
    scan_layers: bool = False,
    dtype: Any = None,
    progress: hf.Progress = None,
) -> tuple[QWenConfig, dict, dict]:
    """Read an OpenCLIP checkpoint's vision tower into Qwen-VL's ViT trunk (our layout).

    Args:
      path: open_clip_pytorch_model.bin / open_clip_model.safetensors, or a directory holding one.
      heads: attention heads of the ViT (not stored in the weights; 16 for ViT-bigG-14).
      base: config for the LLM and adapter fields (default: Qwen-VL 7B).
      scan_layers: return the ViT blocks stacked.
      dtype: cast every tensor (None keeps the stored dtype; OpenCLIP bigG is float32).
      progress: called with a summary line.

    Returns:
      (config, {"transformer": {"visual": {conv1, positional_embedding, ln_pre, transformer}}},
       report) where report = {"converted": n, "dropped": [keys], "ignored_non_visual": n,
       "ignored_examples": [a few keys]}.

    Raises:
      StateDictMismatchError: a vision key is missing, unexpected, duplicated or mis-shaped.
    """
    f = openclip_file(path)
    name = os.path.basename(f)
    t0 = time.time()
    shapes = tensor_shapes(f)
    cfg = vit_config(shapes, heads=heads, base=base, source=name)
    non_visual = [k for k in shapes if not k.startswith(VISUAL)]
    dropped: list[str] = []

    def stream():
        for key, arr in _iter_visual(f):
            if key in DROPPED:
                dropped.append(key)
                continue
            new, out = to_qwenvl_key(key, arr, heads)
            yield new, out, f"{name} (OpenCLIP key {key!r})"

    params = hf.import_tensors(
        stream(), cfg, scan_layers=scan_layers, dtype=dtype, only=is_trunk_rule
    )
    absent = [k for k in DROPPED if k not in shapes]
    if absent:
        raise hf.StateDictMismatchError(
            f"{name}: missing OpenCLIP keys {absent} (an OpenCLIP ViT always has them)"
        )
    n_trunk = sum(1 for r in mapping.rules(cfg) if is_trunk_rule(r))
    report = {
        "converted": n_trunk,
        "dropped": dropped,
        "ignored_non_visual": len(non_visual),
        "ignored_examples": non_visual[:5],
    }
    if progress:
        v = cfg.visual
        progress(
            f"{name}: ViT width {v.width}, {v.layers} layers, {v.heads} heads, MLP {v.mlp_width},"
            f" patch {v.patch_size}, grid {v.pos_grid_size}x{v.pos_grid_size};"
            f" {n_trunk} tensors converted, {len(dropped)} dropped ({', '.join(dropped)}),"
            f" {len(non_visual)} non-visual (text tower) keys ignored; {time.time() - t0:.1f} s"
        )
    return cfg, params, report


__all__ = [
    "DROPPED",
    "import_openclip",
    "interleave_qkv",
    "is_trunk_rule",
    "openclip_file",
    "tensor_shapes",
    "to_qwenvl_key",
    "vit_config",
]
