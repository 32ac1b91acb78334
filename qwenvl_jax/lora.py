"""LoRA and Q-LoRA fine-tuning, as the published `finetune.py` sets up PEFT on Qwen-VL.

The published recipe (QwenLM/Qwen-VL finetune.py, `--use_lora`): rank 64, alpha 16, dropout 0.05,
no bias, adapters on the LLM's `c_attn`, `attn.c_proj`, `w1` and `w2`; everything else frozen; for
the base (non-chat) model `wte` and `lm_head` are trained in full (PEFT `modules_to_save`). Q-LoRA
is the same on 4-bit base weights (the published one loads the GPTQ Int4 checkpoint).

Here an adapter is two Params on a targeted `layers.Einsum`: `lora_A` [*contracted dims, r] and
`lora_B` [r, *output dims], so its path is the module's (`transformer.h.3.attn.c_attn.lora_A`)
and the layer computes `base(x) + B(A(dropout(x))) * alpha / r`, PEFT's order. With
`quantize_base`, the decoder blocks' kernels are stored by a codec (`nf4`: QLoRA's NormalFloat
levels, `int4`: symmetric absmax, one float32 `kernel_block_scale` per block of 64 along the
kernel's last axis; `int8` / `fp8`: one `kernel_scale` per output channel) and decoded inside the
layer (inside the layer scan, so one layer's full-precision kernel exists at a time). Adapters,
codecs and the walker that finds the layers are `qwenvl_jax.model.variants` (where the line on
qwix is); this module holds the recipe, the trainable-path trees, the merge and the PEFT export.
lorax (jax-lorax 0.3.1, 2024) wraps a whole function and rewrites every matrix it finds by shape,
without NNX paths, sharding names or scan support.

Trainer view (`qwenvl_jax.train`): the params split into the trainable tree (every `lora_A` /
`lora_B` and the `modules_to_save` leaves: the only ones with optimizer state and the only ones
in the training checkpoints) and the frozen base tree (read from `config.init` at start and on
resume, never written).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from qwenvl_jax import tree as tree_lib
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.model import variants

# finetune.py: LoraArguments defaults and the target list of the Qwen-VL branch.
PUBLISHED_TARGETS = ("c_attn", "attn.c_proj", "w1", "w2")
# As regexes over our module paths (PEFT matches a list by name suffix; these are the same).
DEFAULT_TARGETS = (
    r"^transformer\.h\.(\d+\.)?attn\.c_attn$",
    r"^transformer\.h\.(\d+\.)?attn\.c_proj$",
    r"^transformer\.h\.(\d+\.)?mlp\.w1$",
    r"^transformer\.h\.(\d+\.)?mlp\.w2$",
)
QUANT_MODES = ("none", *variants.CODECS)
# Q-LoRA quantizes the decoder blocks' kernels (the bulk of the 7B; the published Int4 checkpoint
# keeps the embedding, the LM head and the visual tower in 16 bits too).
QUANT_MODULES = r"^transformer\.h\."


# ----------------------------------------------------------------------------- config
def enabled(cfg) -> bool:
    """Whether a training config asks for LoRA (`config.lora.rank > 0`)."""
    lc = cfg.get("lora")
    return bool(lc) and int(lc.get("rank", 0) or 0) > 0


def check_config(lc) -> None:
    """Raises ConfigError naming the `config.lora` key whose value is not usable."""
    if int(lc.rank) <= 0:
        raise ConfigError(f"config.lora.rank={lc.rank}; use a positive rank (64 as published)")
    if float(lc.alpha) <= 0:
        raise ConfigError(f"config.lora.alpha={lc.alpha}; use a positive number (16 as published)")
    if not 0.0 <= float(lc.dropout) < 1.0:
        raise ConfigError(f"config.lora.dropout={lc.dropout}; valid: 0 <= dropout < 1")
    if lc.quantize_base not in QUANT_MODES:
        raise ConfigError(
            f"config.lora.quantize_base={lc.quantize_base!r}; valid: {'|'.join(QUANT_MODES)}"
        )
    for key in ("targets", "modules_to_save"):
        for rx in lc.get(key) or ():
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"config.lora.{key}: {rx!r} is not a regex ({e})") from None


# ----------------------------------------------------------------------------- the model side
def add_adapters(model: nnx.Module, lc, rngs: nnx.Rngs) -> list[str]:
    """Attach LoRA Params to every Einsum whose path matches `lc.targets`; returns their paths.

    A ~ U(+-1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0, so the adapted model starts
    equal to the base (`variants.set_lora`). Stacked (scan_layers) modules get a leading `layers`
    axis.

    Raises:
      ConfigError: a target regex matches no Einsum module.
    """
    unused = variants.unmatched(model, lc.targets)
    if unused:
        paths = [variants.path_str(p) for _, p, _ in variants.find(model)]
        raise ConfigError(
            f"config.lora.targets {unused} match no einsum/linear module (paths look like"
            f" {paths[:3]})"
        )
    done = []
    for k, path, m in list(variants.find(model, lc.targets)):
        variants.set_lora(
            m, rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout), id=k, rngs=rngs
        )
        done.append(variants.path_str(path))
    return done


def quantize_kernels(model: nnx.Module, mode: str) -> list[str]:
    """Store the decoder blocks' Einsums with codec `mode` (codes quantized from the current
    kernels, `variants.set_codec`); returns the paths. "none" leaves the model alone."""
    if mode == "none":
        return []
    codec = variants.CODECS[mode]
    done = []
    for _, path, m in list(variants.find(model, (QUANT_MODULES,))):
        variants.set_codec(m, codec)
        done.append(variants.path_str(path))
    return done


# ----------------------------------------------------------------------------- trees
_ADAPTER = re.compile(r"\.lora_[AB]$")


def trainable_paths(paths: Sequence[str], modules_to_save: Sequence[str]) -> set[str]:
    """The param paths LoRA training updates: adapters and `modules_to_save` matches.

    Raises:
      ConfigError: a modules_to_save regex matches no parameter.
    """
    pats = [re.compile(rx) for rx in modules_to_save]
    out, used = set(), set()
    for p in paths:
        if _ADAPTER.search(p):
            out.add(p)
            continue
        for rx in pats:
            if rx.search(p):
                used.add(rx.pattern)
                out.add(p)
    unused = [rx.pattern for rx in pats if rx.pattern not in used]
    if unused:
        raise ConfigError(
            f"config.lora.modules_to_save {unused} match no parameter path (e.g. '^transformer"
            r"\.wte\.', '^lm_head\.')"
        )
    return out


def split(tree: dict, keep: set[str]) -> tuple[dict, dict]:
    """A nested dict -> (the leaves whose dotted path is in `keep`, the others), same nesting."""
    a, b = {}, {}
    for path, x in tree_lib.flatten(tree).items():
        _put(a if path in keep else b, path, x, tree)
    return a, b


def _put(out: dict, path: str, x, like: dict) -> None:
    node, ref = out, like
    keys = path.split(".")
    for k in keys[:-1]:
        k = _key(ref, k)
        ref = ref[k]
        node = node.setdefault(k, {})
    node[_key(ref, keys[-1])] = x


def _key(ref: dict, k: str):
    return k if k in ref else int(k)


def join(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves (the inverse of `split`)."""
    out = dict(b)
    for k, v in a.items():
        out[k] = join(v, b[k]) if isinstance(v, dict) and k in b else v
    return out


# ----------------------------------------------------------------------------- export
def adapters(params: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module path: (A, B)} of per-layer (unstacked) params holding `lora_A` / `lora_B`."""
    flat = tree_lib.flatten(params)
    n = len(".lora_A")
    return {p[:-n]: (flat[p], flat[p[:-1] + "B"]) for p in flat if p.endswith(".lora_A")}


def delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """B @ A * alpha / r in the kernel's layout, float32: A [*in, r], B [r, *out] -> [*in, *out]."""
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    n_in = a32.ndim - 1
    m = a32.reshape(-1, a32.shape[-1]) @ b32.reshape(b32.shape[0], -1)
    return (m * np.float32(scale)).reshape(a32.shape[:n_in] + b32.shape[1:])


def merge(base: dict, trained: dict, scale: float) -> dict:
    """Full per-layer params: `base` with `modules_to_save` leaves replaced and every adapter's
    delta added to its kernel in float32 (then cast to the base kernel's dtype).

    A base kernel stored by a codec (int8, nf4, ...: it has a `kernel_scale` or
    `kernel_block_scale` next to it) is decoded first, as every such kernel of `base` is: the
    merged params are a full-precision float32 model (quantize it again when loading)."""
    base = variants.decode_params(base)
    flat = tree_lib.flatten(trained)
    plain = {p for p in flat if not _ADAPTER.search(p)}
    # modules_to_save train as float32 masters; the merged model keeps the base's dtypes.
    base_flat, saved = tree_lib.flatten(base), {}
    for p in plain:
        dt = base_flat[p].dtype if p in base_flat else flat[p].dtype
        _put(saved, p, np.asarray(flat[p]).astype(dt), trained)
    out = join(saved, split(base, plain)[1]) if plain else dict(base)
    out = jax.tree.map(lambda x: x, out)  # a copy we may write into
    for path, (a, b) in adapters(trained).items():
        node = out
        keys = path.split(".")
        for k in keys:
            node = node[_key(node, k)]
        w = np.asarray(node["kernel"])
        node["kernel"] = (w.astype(np.float32) + delta(a, b, scale)).astype(w.dtype)
    return out


def peft_key(path: str, which: str) -> str:
    """Our adapter path -> the key PEFT saves for the published model (`get_peft_model_state_dict`
    drops the adapter name): `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`."""
    return f"base_model.model.{path}.lora_{which}.weight"


def peft_state_dict(trained: dict) -> dict[str, np.ndarray]:
    """The adapter weights as PEFT's `adapter_model.safetensors` holds them (torch layout:
    lora_A.weight [r, in_features], lora_B.weight [out_features, r], in_features/out_features
    the torch Linear's, whose order is our kernel dims flattened)."""
    out = {}
    for path, (a, b) in adapters(trained).items():
        a, b = np.asarray(a), np.asarray(b)
        out[peft_key(path, "A")] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
        out[peft_key(path, "B")] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
    return out


@functools.cache
def _hf_module_names() -> dict[str, str]:
    # Our modules_to_save leaves -> the torch module PEFT wraps in ModulesToSaveWrapper.
    return {"transformer.wte": "transformer.wte", "lm_head": "lm_head"}


def adapter_config(lc, base_model_path: str = "") -> dict:
    """PEFT's `adapter_config.json` for the published model with these settings."""
    if tuple(lc.targets) == DEFAULT_TARGETS:
        targets = list(PUBLISHED_TARGETS)
    else:  # PEFT full-matches a string against the torch module names, which are our paths
        targets = "|".join(f"(?:{t})" for t in lc.targets)
    saved = []
    for rx in lc.modules_to_save or ():
        for ours, name in _hf_module_names().items():
            if re.search(rx, ours + ".x") and name.split(".")[-1] not in saved:
                saved.append(name.split(".")[-1])
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": int(lc.rank),
        "lora_alpha": float(lc.alpha),
        "lora_dropout": float(lc.dropout),
        "bias": "none",
        "target_modules": targets,
        "modules_to_save": saved or None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
