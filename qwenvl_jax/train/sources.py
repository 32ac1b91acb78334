"""A run's first parameters: a previous stage, a checkpoint, two towers, or random."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from qwenvl_jax import checkpoint as ckpt_lib
from qwenvl_jax import optim as optim_lib
from qwenvl_jax import tree as tree_lib
from qwenvl_jax.errors import CheckpointError, ConfigError, MissingPathError
from qwenvl_jax.model.factory import load_params
from qwenvl_jax.train.state import Setup, init_base_params, init_params


def _load_checkpoint(path: str, scan: bool) -> dict:
    """Params of any checkpoint `model.factory.load_params` reads (our format, HF weights
    converted in memory, a workdir's latest step) in the run's layer layout."""
    _, params = load_params(path, scan_layers=scan)
    return jax.tree.map(np.asarray, params)


# Qwen-VL's post-adapter ln_post / proj sit in the "vit" group but have no OpenCLIP counterpart: a
# ViT tower from `convert import-vit` lacks them, and they keep their fresh init.
_VIT_FRESH_IF_ABSENT = r"^transformer\.visual\.(ln_post\.|proj$)"


def _subtree_merge(base: dict, other: dict, pattern: str, fresh_if_absent: str = "") -> dict:
    """base with every leaf whose path matches `pattern` taken from `other`.

    Leaves matching `fresh_if_absent` that `other` lacks keep base's value (logged).
    """
    import re

    rx = re.compile(optim_lib.GROUPS.get(pattern, pattern))
    fresh = re.compile(fresh_if_absent) if fresh_if_absent else None
    kept = []
    other_flat = tree_lib.flatten(other)
    taken = []

    def pick(p, x):
        if rx.search(p):
            if p not in other_flat:
                if fresh is not None and fresh.search(p):
                    kept.append(p)
                    return x
                raise ValueError(f"init checkpoint lacks {p}")
            taken.append(p)
            return other_flat[p]
        return x

    out = tree_lib.map_with_path(pick, base)
    if not taken:
        raise ValueError(f"no parameter matched {pattern!r} when merging init checkpoints")
    if kept:
        logging.info("init: %s not in the %s checkpoint; fresh init kept", kept, pattern)
    return out


_INIT_KEYS = ("workdir", "checkpoint", "vit_checkpoint", "llm_checkpoint")


def initial_params(s: Setup) -> tuple[Any, str]:
    """Params from config.init (previous workdir, our checkpoint, separate towers) or random.

    Raises:
        FileNotFoundError: naming the `config.init` key whose path holds no usable weights.
    """
    init = s.cfg.init
    for key in _INIT_KEYS:
        path = init.get(key)
        if path and not epath.Path(path).exists():
            raise FileNotFoundError(f"config.init.{key}={path!r} does not exist")
    try:
        return _initial_params(s)
    except tree_lib.TreeMismatchError:
        raise  # its message starts with the source's path already
    except (FileNotFoundError, CheckpointError) as e:
        named = [f"config.init.{k}={init.get(k)!r}" for k in _INIT_KEYS if init.get(k)]
        raise MissingPathError(f"{', '.join(named)}: {e}") from e


def _initial_params(s: Setup) -> tuple[Any, str]:
    if s.lora:
        return _lora_initial_params(s)
    return _place(s, *_load(s))


def _place(s: Setup, loaded: Any, desc: str) -> tuple[Any, str]:
    if loaded is None:
        return init_params(s, int(s.cfg.seed)), desc
    tree_lib.check_fits(loaded, s.abstract_params, source=desc)
    params = jax.tree.map(
        lambda x, a: (
            x
            if isinstance(x, jax.Array) and x.sharding == a.sharding
            else jax.device_put(np.asarray(x, a.dtype), a.sharding)
        ),
        loaded,
        s.abstract_params,
    )
    return params, desc


def _load(s: Setup) -> tuple[Any, str]:
    """The init source's full parameter tree (None for random init) and its description."""
    init = s.cfg.init
    scan = bool(s.cfg.model.scan_layers)
    sources = [k for k in ("workdir", "checkpoint") if init.get(k)]
    towers = [k for k in ("vit_checkpoint", "llm_checkpoint") if init.get(k)]
    if len(sources) + bool(towers) > 1:
        raise ValueError(f"config.init: set only one of workdir, checkpoint, towers; got {init}")
    if init.get("workdir"):
        _, loaded = ckpt_lib.latest_params(init.workdir, scan_layers=scan)
        desc = f"previous stage {init.workdir}"
    elif init.get("checkpoint"):
        loaded = _load_checkpoint(init.checkpoint, scan)
        desc = f"checkpoint {init.checkpoint}"
    elif towers:
        # Fresh leaves stay sharded jax arrays: on a pod they span other hosts' devices and
        # cannot be fetched to this host.
        loaded = init_params(s, int(s.cfg.seed))
        if init.get("vit_checkpoint"):
            vit = _load_checkpoint(init.vit_checkpoint, scan)
            loaded = _subtree_merge(loaded, vit, "vit", _VIT_FRESH_IF_ABSENT)
        if init.get("llm_checkpoint"):
            llm = _load_checkpoint(init.llm_checkpoint, scan)
            loaded = _subtree_merge(loaded, llm, "llm")
        desc = f"towers vit={init.vit_checkpoint or 'random'} llm={init.llm_checkpoint or 'random'}"
    else:
        if not init.get("allow_random"):
            raise ValueError(
                "config.init names no weights (workdir, checkpoint, vit_checkpoint/llm_checkpoint)"
                " and allow_random is False; set one, e.g. --config.init.workdir=<stage-1 workdir>"
            )
        return None, "random init"
    return loaded, desc


def _lora_initial_params(s: Setup) -> tuple[Any, str]:
    """LoRA: fresh adapters (B = 0) + modules_to_save from the init source; the frozen base from
    the same source is kept in `s.base` (quantized when `config.lora.quantize_base` says so)."""
    if s.cfg.init.get("vit_checkpoint") or s.cfg.init.get("llm_checkpoint"):
        raise ConfigError(
            "config.lora: LoRA fine-tunes one model; set config.init.checkpoint or"
            " config.init.workdir, not vit_checkpoint/llm_checkpoint"
        )
    loaded, desc = _load(s)
    trainable = init_params(s, int(s.cfg.seed))
    if loaded is None:
        s.base = init_base_params(s, int(s.cfg.seed))
        return trainable, desc
    s.base = _lora_base(s, loaded, desc)
    flat = tree_lib.flatten(loaded)
    abstract = tree_lib.flatten(s.abstract_params)

    def from_source(p, x):
        if p.endswith((".lora_A", ".lora_B")):
            return x
        return jax.device_put(np.asarray(flat[p], abstract[p].dtype), abstract[p].sharding)

    trainable = tree_lib.map_with_path(from_source, trainable)
    return trainable, f"{desc} (base frozen) + fresh LoRA adapters"


def base_params(s: Setup) -> Any:
    """The frozen base of a LoRA run, loaded from `config.init` once per process (cached)."""
    if s.base is None:
        loaded, desc = _load(s)
        s.base = (
            init_base_params(s, int(s.cfg.seed)) if loaded is None else _lora_base(s, loaded, desc)
        )
    return s.base


def _lora_base(s: Setup, loaded: Any, desc: str) -> Any:
    """The base tree on its shardings: the init source's leaves, 4-bit where the run quantizes."""
    # The source holds every base leaf at full precision (a 4-bit kernel's codes have its shape;
    # its scales are made here) and the trained modules_to_save, but no adapters.
    from qwenvl_jax.model import variants

    abstract = tree_lib.flatten(s.abstract_base)
    want = {p: a for p, a in abstract.items() if not p.endswith(variants.SCALE_NAMES)}
    want.update(
        (p, a)
        for p, a in tree_lib.flatten(s.abstract_params).items()
        if not p.endswith((".lora_A", ".lora_B"))
    )
    tree_lib.check_fits(loaded, want, source=desc)
    flat = tree_lib.flatten(loaded)
    codec = variants.CODECS.get(s.cfg.lora.quantize_base)
    encode = jax.jit(codec.encode, static_argnums=1) if codec else None

    def leaf(p, a):
        if p.endswith(variants.SCALE_NAMES):
            return "scale"  # filled in with its kernel's codes
        sp = p[: -len("kernel")] + codec.scale_name if codec and p.endswith(".kernel") else ""
        if sp in abstract:  # a codec-stored kernel: encode the source's
            x = jnp.asarray(np.asarray(flat[p], np.float32))
            codes, scales[sp] = encode(x, tuple(abstract[sp].shape))
            return jax.device_put(codes, a.sharding)
        return jax.device_put(np.asarray(flat[p], a.dtype), a.sharding)

    scales: dict[str, Any] = {}
    out = tree_lib.map_with_path(leaf, s.abstract_base)
    shard = tree_lib.flatten(s.base_sharding)
    return tree_lib.map_with_path(
        lambda p, x: jax.device_put(scales[p], shard[p]) if isinstance(x, str) else x,
        out,
    )
