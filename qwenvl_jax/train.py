"""Training entry point: `python -m qwenvl_jax.train --config=configs/X.py[:variant] --workdir=DIR`.

Runs one stage of the paper (configs/pretrain.py, multitask.py, sft.py) on one CPU, one GPU or every
host of a TPU pod slice (run the same command on each host). Without --config it runs the out-of-box
demo (qwenvl_jax.demo.run_demo): synthetic data, the tiny model, the three stages, then evaluation.

Flags: --config (ml_collections file, `--config.a.b=value` overrides), --workdir, --dry_run (print
the resolved config, mesh and per-device bytes without allocating; with `config.aot.topology` set
and the `tpu` extra installed, compile the train step ahead of time for that TPU slice and print its
memory and FLOPs), --coordinator/--num_processes/--process_id (multi-process without a TPU pod).

The train step: float32 master weights, bfloat16 compute (config.model.dtype), loss = sum over
supervised tokens of the cross-entropy / number of supervised tokens of the whole global batch
(docs/architecture.md), gradient accumulation over micro-batches inside one compiled
step (lax.scan), donated params and optimizer state, one compilation per run."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from etils import epath
from flax import nnx
from ml_collections import config_flags

from qwenvl_jax import checkpoint as ckpt_lib
from qwenvl_jax import flops as flops_lib
from qwenvl_jax import optim as optim_lib
from qwenvl_jax import sharding as shd
from qwenvl_jax.config import QWenConfig, get_preset
from qwenvl_jax.metrics import MetricsWriter

# ----------------------------------------------------------------------------- model


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def model_config(cfg: ml_collections.ConfigDict) -> QWenConfig:
    """The QWenConfig of a training config: preset + overrides, at the stage's image size."""
    overrides = cfg.model.overrides.to_dict() if cfg.model.get("overrides") else {}
    visual = dict(overrides.pop("visual", {}) or {})
    visual.setdefault("image_size", int(cfg.data.image_size))
    return get_preset(cfg.model.preset, visual=visual, **overrides)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str, key: str = "config.model.dtype"):
    if name not in _DTYPES:
        raise ValueError(f"{key}={name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def make_model(cfg: ml_collections.ConfigDict, mcfg: QWenConfig, rngs: nnx.Rngs):
    from qwenvl_jax.model.qwenvl import QWenLMHeadModel

    return QWenLMHeadModel(
        mcfg,
        rngs=rngs,
        dtype=_dtype(cfg.model.dtype),
        param_dtype=_dtype(cfg.model.param_dtype, "config.model.param_dtype"),
        scan_layers=bool(cfg.model.scan_layers),
        remat=cfg.model.remat_llm,
        visual_remat=cfg.model.remat_vit,
        attn_impl=cfg.model.get("attn_impl", "xla"),
    )


@dataclasses.dataclass
class Setup:
    """Everything static about a run: model structure, shardings, optimizer."""

    cfg: ml_collections.ConfigDict
    mcfg: QWenConfig
    mesh: jax.sharding.Mesh
    rules: tuple
    graphdef: Any
    state_template: Any  # abstract nnx.State of Params (for merge)
    abstract_params: Any  # pure dict of ShapeDtypeStruct (with sharding)
    param_sharding: Any
    tx: optax.GradientTransformation
    labels: Any
    schedule: Any
    abstract_opt: Any
    opt_sharding: Any
    accum: int  # micro-batches per optimizer step


def build(cfg: ml_collections.ConfigDict, devices=None) -> Setup:
    """Builds the abstract model, shardings and optimizer without allocating parameters."""
    mcfg = model_config(cfg)
    mesh = shd.make_mesh(cfg.mesh, devices)
    accum = grad_accum_steps(cfg, mesh)
    rules = shd.rules_from_config(cfg.sharding.rules)
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(lambda: make_model(cfg, mcfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract_model, nnx.Param)
    logical = nnx.to_pure_dict(shd.logical_axes_of_state(state))
    pure = nnx.to_pure_dict(state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure)
    param_sharding = shd.param_shardings(abstract, logical, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, param_sharding
    )
    ocfg = dict(cfg.optim.to_dict(), total_steps=int(cfg.optim.total_steps))
    tx, labels, schedule = optim_lib.make_optimizer(ocfg, abstract)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_sharding = shd.opt_state_shardings(abstract_opt, param_sharding, mesh)
    abstract_opt = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt, opt_sharding
    )
    return Setup(
        cfg, mcfg, mesh, rules, graphdef, state, abstract, param_sharding, tx, labels, schedule,
        abstract_opt, opt_sharding, accum,
    )  # fmt: skip


def grad_accum_steps(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """Micro-batches per optimizer step.

    With `cfg.device_batch` > 0 (sequences per data-parallel shard per micro-step), the number of
    micro-batches follows from the global batch and the mesh: batch / (device_batch x data x fsdp);
    the paper's per-GPU accumulation (Table 8) only fixes the global batch on a different cluster.
    With `cfg.device_batch` = 0, `cfg.grad_accum` is used as given.
    """
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    b = int(cfg.batch_size)
    db = int(cfg.get("device_batch", 0) or 0)
    if db:
        if b % (db * dp):
            raise ValueError(
                f"batch_size {b} is not a multiple of device_batch {db} x data-parallel size {dp}"
            )
        return b // (db * dp)
    a = int(cfg.grad_accum)
    if b % a or (b // a) % dp:
        raise ValueError(
            f"batch_size {b} / grad_accum {a} must be a whole number of sequences per micro-batch"
            f" and a multiple of the data-parallel size data x fsdp = {dp}"
        )
    return a


def merge_model(s: Setup, params: Any):
    """An NNX model view of pure-dict params (inside jit)."""
    state = jax.tree.map(lambda v: v, s.state_template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(s.graphdef, state)


def init_params(s: Setup, seed: int) -> Any:
    """Random initialisation directly into the parameter shardings."""

    @functools.partial(jax.jit, out_shardings=s.param_sharding)
    def init(key):
        with nnx.use_eager_sharding(False):
            model = make_model(s.cfg, s.mcfg, nnx.Rngs(key))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return init(jax.random.key(seed))


# ----------------------------------------------------------------------------- loss and step


def cross_entropy_sum(
    model, batch: dict, loss_chunk: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum of CE(logits, targets) over supervised tokens, their count, and the correct count.

    The LM head and the float32 log-softmax run in chunks of `loss_chunk` positions (0 = all at
    once) under remat, so the [B, T, V] float32 logits never exist in full.
    """
    images = batch.get("images")
    h = model.transformer(
        batch["input_ids"],
        images=images,
        image_token_index=batch.get("image_token_index") if images is not None else None,
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    targets, mask = batch["targets"], batch["loss_mask"].astype(jnp.float32)

    def chunk_loss(h_c, t_c, m_c):
        logits = model.lm_head(h_c).astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, -1) == t_c).astype(jnp.float32)
        return jnp.sum((logz - tgt) * m_c), jnp.sum(correct * m_c)

    t = h.shape[1]
    if not loss_chunk or loss_chunk >= t:
        loss, correct = chunk_loss(h, targets, mask)
    else:
        if t % loss_chunk:
            raise ValueError(f"seq_len {t} is not a multiple of loss_chunk {loss_chunk}")
        n = t // loss_chunk

        def split(x):
            return jnp.moveaxis(x.reshape(x.shape[0], n, loss_chunk, *x.shape[2:]), 1, 0)

        def body(carry, xs):
            lc, cc = jax.checkpoint(chunk_loss)(*xs)
            return (carry[0] + lc, carry[1] + cc), None

        (loss, correct), _ = jax.lax.scan(
            body, (jnp.float32(0), jnp.float32(0)), (split(h), split(targets), split(mask))
        )
    return loss, jnp.sum(mask), correct


def make_train_step(s: Setup):
    """The jitted step: (params, opt_state, batch[A, b, ...]) -> (params, opt_state, metrics)."""
    cfg = s.cfg
    loss_chunk = int(cfg.get("loss_chunk", 0) or 0)
    frozen = jax.tree.map(lambda lab: lab == "frozen", s.labels)

    def loss_fn(params, mb):
        # Frozen params: no gradient flows, so XLA never computes their weight gradients.
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        model = merge_model(s, params)
        loss, n, correct = cross_entropy_sum(model, mb, loss_chunk)
        return loss, (n, correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, opt_state, batch):
        from qwenvl_jax.model import layers

        with layers.logical_rules(s.mesh, s.rules):

            def micro(carry, mb):
                g_acc, l_acc, n_acc, c_acc = carry
                (loss, (n, correct)), g = grad_fn(params, mb)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, l_acc + loss, n_acc + n, c_acc + correct), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zeros = jax.lax.with_sharding_constraint(zeros, s.param_sharding)
            init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
            (grads, loss_sum, n_tok, correct), _ = jax.lax.scan(micro, init, batch)
            denom = jnp.maximum(n_tok, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            grads = jax.lax.with_sharding_constraint(grads, s.param_sharding)
            updates, new_opt = s.tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "accuracy": correct / denom,
            "supervised_tokens": n_tok,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(new_params),
        }
        return new_params, new_opt, metrics

    batch_sh = batch_shardings(s)
    return jax.jit(
        step,
        in_shardings=(s.param_sharding, s.opt_sharding, batch_sh),
        out_shardings=(s.param_sharding, s.opt_sharding, None),
        donate_argnums=(0, 1),
    )


BATCH_SPEC = {
    "input_ids": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "images": np.float32,
    "image_valid": np.bool_,
    "image_token_index": np.int32,
}


def batch_shapes(cfg, accum: int) -> dict[str, tuple]:
    """Global shapes [A, B/A, ...] of one step's batch (A = accum micro-batches)."""
    a = accum
    b, t = cfg.batch_size // a, int(cfg.data.seq_len)
    m, sz = int(cfg.data.max_images), int(cfg.data.image_size)
    shapes = {k: (a, b, t) for k in ("input_ids", "targets", "loss_mask", "segment_ids")}
    shapes.update(positions=(a, b, t), image_token_index=(a, b, t))
    if m:
        shapes.update(images=(a, b, m, sz, sz, 3), image_valid=(a, b, m))
    return shapes


def batch_shardings(s: Setup) -> dict:
    out = {}
    for k, shp in batch_shapes(s.cfg, s.accum).items():
        spec = jax.sharding.PartitionSpec(None, shd.BATCH_AXES, *([None] * (len(shp) - 2)))
        out[k] = jax.sharding.NamedSharding(s.mesh, spec)
    return out


def abstract_batch(s: Setup) -> dict:
    sh = batch_shardings(s)
    return {
        k: jax.ShapeDtypeStruct(shp, BATCH_SPEC[k], sharding=sh[k])
        for k, shp in batch_shapes(s.cfg, s.accum).items()
    }


# ----------------------------------------------------------------------------- data


class RandomBatches:
    """Deterministic synthetic batches in the batch contract, for smoke tests, benchmarks and
    dry runs: each row packs two samples (segments 1 and 2, positions restarting), each with one
    `<img>` + n_queries + `</img>` span per image slot that fits, then a learnable token pattern
    (arithmetic progressions), supervised outside image spans. State = the number of batches."""

    def __init__(self, cfg, mcfg: QWenConfig, batch_size_per_host: int, shard_index: int):
        # Rows are a function of (seed, batch count, global row), so any number of hosts sees the
        # same global batch: host k holds rows [k * b, (k + 1) * b).
        self.t = int(cfg.data.seq_len)
        self.m = int(cfg.data.max_images)
        self.size = int(cfg.data.image_size)
        self.b = batch_size_per_host
        self.seed = int(cfg.seed)
        self.shard = shard_index
        self.q = mcfg.visual.n_queries
        self.start_id = mcfg.visual.image_start_id
        self.vocab = min(mcfg.vocab_size, 1000)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        count = self.count
        self.count += 1
        t, m, q = self.t, self.m, self.q
        ids = np.zeros((self.b, t), np.int32)
        seg = np.zeros((self.b, t), np.int32)
        pos = np.zeros((self.b, t), np.int32)
        mask = np.zeros((self.b, t), np.float32)
        n_img = np.zeros((self.b,), np.int32)
        half = t // 2
        images = np.zeros((self.b, m, self.size, self.size, 3), np.float32)
        for r in range(self.b):
            rng = np.random.default_rng([self.seed, count, self.shard * self.b + r])
            images[r] = rng.standard_normal(images.shape[1:], np.float32)
            for si, (lo, hi) in enumerate(((0, half), (half, t))):
                seg[r, lo:hi] = si + 1
                pos[r, lo:hi] = np.arange(hi - lo)
                p = lo
                while n_img[r] < m and p + q + 2 + 4 <= hi and si == n_img[r] % 2:
                    ids[r, p] = self.start_id
                    ids[r, p + 1 : p + 1 + q] = self.start_id + 2
                    ids[r, p + 1 + q] = self.start_id + 1
                    p += q + 2
                    n_img[r] += 1
                a, d = rng.integers(1, 50), rng.integers(1, 7)
                ids[r, p:hi] = 10 + (a + d * np.arange(hi - p)) % (self.vocab - 10)
                mask[r, p : hi - 1] = 1.0
        targets = np.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]
        targets *= mask.astype(np.int32)
        from qwenvl_jax.model.qwenvl import image_token_index

        index, _ = image_token_index(ids, self.start_id, q)
        out = dict(
            input_ids=ids,
            targets=targets,
            loss_mask=mask,
            segment_ids=seg,
            positions=pos,
            image_token_index=index,
        )
        if m:
            out["images"] = images
            out["image_valid"] = np.arange(m)[None, :] < n_img[:, None]
        return out

    def get_state(self) -> dict:
        return {"count": self.count}

    def set_state(self, state: dict) -> None:
        self.count = int(state["count"])


def make_data_iterator(cfg, mcfg: QWenConfig, batch_size_per_host: int):
    if cfg.data.kind == "random":
        return RandomBatches(cfg, mcfg, batch_size_per_host, jax.process_index())
    if cfg.data.kind != "pipeline":
        raise ValueError(f"config.data.kind={cfg.data.kind!r}; use 'random' or 'pipeline'")
    from qwenvl_jax.data.pipeline import make_train_iterator
    from qwenvl_jax.tokenizer import load_tokenizer

    # Every <img>...</img> span gets one position per adapter query (256 as published; a smaller
    # model with fewer queries gets a tokenizer with shorter spans).
    tokenizer = load_tokenizer(
        cfg.data.get("tokenizer") or None, image_span=int(mcfg.visual.n_queries)
    )
    return make_train_iterator(
        cfg.data.spec,
        tokenizer,
        seq_len=int(cfg.data.seq_len),
        batch_size_per_host=batch_size_per_host,
        image_size=int(cfg.data.image_size),
        max_images=int(cfg.data.max_images),
        seed=int(cfg.seed),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=int(cfg.data.worker_count),
    )


def to_step_batch(local: dict, s: Setup) -> dict:
    """Host rows [b_local, ...] -> global arrays [A, B/A, ...] sharded over (data, fsdp)."""
    a = s.accum
    sh = batch_shardings(s)
    out = {}
    for k in batch_shapes(s.cfg, s.accum):
        v = np.asarray(local[k], BATCH_SPEC[k])
        if v.shape[0] % a:
            raise ValueError(f"host batch {v.shape[0]} rows is not a multiple of grad_accum {a}")
        v = v.reshape((a, v.shape[0] // a) + v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sh[k], v)
    return out


# ----------------------------------------------------------------------------- init sources


def _check_same_tree(name: str, got: Any, want: Any) -> None:
    gp = dict(_flat_shapes(got))
    wp = dict(_flat_shapes(want))
    missing, extra = sorted(set(wp) - set(gp)), sorted(set(gp) - set(wp))
    bad = [f"{p}: {gp[p]} != {wp[p]}" for p in sorted(set(gp) & set(wp)) if gp[p] != wp[p]]
    if missing or extra or bad:
        raise ValueError(
            f"{name}: parameters do not match the model: missing {missing[:10]} "
            f"({len(missing)}), unexpected {extra[:10]} ({len(extra)}), shape mismatches {bad[:10]}"
        )


def _flat_shapes(tree):
    out = []
    optim_lib.map_with_path_str(lambda p, x: out.append((p, tuple(np.shape(x)))), tree)
    return out


def _load_our_checkpoint(path: str, scan: bool) -> dict:
    """Params of a converted checkpoint (qwenvl_jax.convert.ours format) in the run's layout."""
    from qwenvl_jax.convert import ours

    _, params = ours.load_params(path, scan_layers=scan)
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
    other_flat = {}
    optim_lib.map_with_path_str(lambda p, x: other_flat.__setitem__(p, x), other)
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

    out = optim_lib.map_with_path_str(pick, base)
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
    except FileNotFoundError as e:
        named = [f"config.init.{k}={init.get(k)!r}" for k in _INIT_KEYS if init.get(k)]
        raise FileNotFoundError(f"{', '.join(named)}: {e}") from e


def _initial_params(s: Setup) -> tuple[Any, str]:
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
        loaded = _load_our_checkpoint(init.checkpoint, scan)
        desc = f"checkpoint {init.checkpoint}"
    elif towers:
        # Fresh leaves stay sharded jax arrays: on a pod they span other hosts' devices and
        # cannot be fetched to this host.
        loaded = init_params(s, int(s.cfg.seed))
        if init.get("vit_checkpoint"):
            vit = _load_our_checkpoint(init.vit_checkpoint, scan)
            loaded = _subtree_merge(loaded, vit, "vit", _VIT_FRESH_IF_ABSENT)
        if init.get("llm_checkpoint"):
            llm = _load_our_checkpoint(init.llm_checkpoint, scan)
            loaded = _subtree_merge(loaded, llm, "llm")
        desc = f"towers vit={init.vit_checkpoint or 'random'} llm={init.llm_checkpoint or 'random'}"
    else:
        if not init.get("allow_random"):
            raise ValueError(
                "config.init names no weights (workdir, checkpoint, vit_checkpoint/llm_checkpoint)"
                " and allow_random is False; set one, e.g. --config.init.workdir=<stage-1 workdir>"
            )
        return init_params(s, int(s.cfg.seed)), "random init"
    _check_same_tree(desc, loaded, s.abstract_params)
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


# ----------------------------------------------------------------------------- the loop


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.flag = False
        self._old = None

    def install(self):
        def handler(signum, frame):
            logging.warning("SIGTERM received: will checkpoint after the current step and exit")
            self.flag = True

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None

    def uninstall(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def any(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([self.flag]))))


def _towers_trainable(labels: Any) -> tuple[bool, bool]:
    llm, vit = [], []

    def visit(p, lab):
        if p.startswith("transformer.visual.transformer."):
            vit.append(lab == "train")
        elif p.startswith("transformer.h."):
            llm.append(lab == "train")

    optim_lib.map_with_path_str(visit, labels)
    return any(llm), any(vit)


def step_model_flops(s: Setup) -> float:
    llm_t, vit_t = _towers_trainable(s.labels)
    return flops_lib.step_flops(
        s.mcfg,
        sequences=int(s.cfg.batch_size),
        seq_len=int(s.cfg.data.seq_len),
        images=int(s.cfg.batch_size) * int(s.cfg.data.max_images),
        image_size=int(s.cfg.data.image_size),
        llm_trainable=llm_t,
        vit_trainable=vit_t,
    )


def describe(s: Setup) -> str:
    lines = [
        f"mesh {dict(s.mesh.shape)} over {s.mesh.devices.size} {s.mesh.devices.flat[0].platform}"
        f" devices ({s.mesh.devices.flat[0].device_kind})",
    ]
    counts = optim_lib.count_params(s.abstract_params, s.labels)
    lines.append(
        f"parameters: {counts['total']:,} ({counts['train']:,} trained,"
        f" {counts['frozen']:,} frozen)"
    )
    pb = shd.device_bytes(s.abstract_params, s.param_sharding)
    ob = shd.device_bytes(s.abstract_opt, s.opt_sharding)
    lines.append(
        f"per-device bytes: params {pb / 2**30:.3f} GiB, optimizer state {ob / 2**30:.3f} GiB"
    )
    micro = int(s.cfg.batch_size) // s.accum
    lines.append(
        f"global batch {s.cfg.batch_size} x {s.cfg.data.seq_len} tokens = {s.accum} micro-batches"
        f" of {micro} ({micro // (s.mesh.shape['data'] * s.mesh.shape['fsdp'])} per data shard)"
    )
    lines.append(f"model FLOPs per step: {step_model_flops(s) / 1e12:.2f} TFLOP")
    return "\n".join(lines)


def check_setup(s: Setup) -> None:
    shd.check_no_large_replicated(
        s.abstract_params,
        s.param_sharding,
        s.mesh,
        int(float(s.cfg.sharding.max_replicated_mb) * 2**20),
        tuple(s.cfg.sharding.allow_replicated),
    )


def aot_compile(s: Setup):
    """Lowers and compiles the real train step for the setup's devices with abstract inputs."""
    step = make_train_step(s)
    lowered = step.lower(s.abstract_params, s.abstract_opt, abstract_batch(s))
    return lowered.compile()


def compiled_report(compiled) -> dict:
    out = {}
    mem = compiled.memory_analysis()
    if mem is not None:
        for k in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            out[k] = int(getattr(mem, k, 0) or 0)
        out["peak_estimate_bytes"] = (
            out["argument_size_in_bytes"]
            + out["output_size_in_bytes"]
            - out["alias_size_in_bytes"]
            + out["temp_size_in_bytes"]
        )
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    if cost:
        # XLA counts the body of each while loop (micro-batch scan, layer scans) once.
        out["xla_flops_per_device_loop_bodies_once"] = float(cost.get("flops", 0.0))
    return out


def topology_devices(cfg) -> list | None:
    if not cfg.aot.get("topology"):
        return None
    from jax.experimental import topologies

    bounds = tuple(int(x) for x in str(cfg.aot.chips_per_host).split(","))
    topo = topologies.get_topology_desc(
        platform="tpu",
        topology_name=cfg.aot.topology,
        chip_config_name=cfg.aot.chip_config or "default",
        chips_per_host_bounds=bounds,
        num_slices=1,
    )
    return list(topo.devices)


def dry_run(cfg: ml_collections.ConfigDict) -> dict:
    """Prints config, mesh and per-device bytes; compiles AOT for config.aot.topology if set."""
    print(cfg)
    devices = topology_devices(cfg)
    s = build(cfg, devices)
    print(describe(s))
    check_setup(s)
    out = {"mesh": dict(s.mesh.shape)}
    out["param_bytes"] = shd.device_bytes(s.abstract_params, s.param_sharding)
    out["opt_bytes"] = shd.device_bytes(s.abstract_opt, s.opt_sharding)
    if devices is not None:
        t0 = time.time()
        rep = compiled_report(aot_compile(s))
        out.update(rep)
        print(
            f"AOT compile for {cfg.aot.topology} ({len(devices)} chips) in {time.time() - t0:.0f}s"
        )
        for k, v in rep.items():
            print(f"  {k}: {v / 2**30:.3f} GiB" if k.endswith("bytes") else f"  {k}: {v:.4g}")
        n = len(devices)
        print(
            f"  model FLOPs per device per step: {step_model_flops(s) / n / 1e12:.2f} TFLOP"
            f" ({step_model_flops(s) / n / s.accum / 1e12:.2f} per micro-batch)"
        )
    return out


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_after: int | None = None,
    devices=None,
) -> list[dict]:
    """Runs (or resumes) training in `workdir`. Returns the logged metrics of this invocation.

    Args:
        cfg: a resolved stage config (configs/*.py).
        workdir: output directory (checkpoints, TensorBoard, metrics.jsonl, config.json).
        stop_after: testing aid: return after this many optimizer steps of this invocation.
        devices: devices for the mesh (default all).
    """
    os.makedirs(workdir, exist_ok=True)
    s = build(cfg, devices)
    check_setup(s)
    if jax.process_index() == 0:
        s.mcfg.save_hf_json(os.path.join(workdir, "config.json"))
        with open(os.path.join(workdir, "train_config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    _log(f"config:\n{cfg}")
    _log(describe(s))

    total = int(cfg.steps)
    ckpt = ckpt_lib.Checkpointer(workdir, int(cfg.checkpoint.keep), bool(cfg.checkpoint.async_save))
    restored = ckpt.restore_latest(s.abstract_params, s.abstract_opt)
    if cfg.batch_size % jax.process_count():
        raise ValueError(
            f"batch_size {cfg.batch_size} not divisible by {jax.process_count()} hosts"
        )
    data = make_data_iterator(cfg, s.mcfg, int(cfg.batch_size) // jax.process_count())
    if restored is not None:
        start, params, opt_state, meta = restored
        states = meta.get("data_state")
        if states and len(states) == jax.process_count():
            data.set_state(json.loads(states[jax.process_index()]))
        elif states:
            logging.warning(
                "checkpoint holds data states of %d processes, this run has %d: the data iterator"
                " restarts from its seed (samples may repeat)",
                len(states),
                jax.process_count(),
            )
        _log(f"resumed from {ckpt.directory} step {start}")
    else:
        start = 0
        params, desc = initial_params(s)
        opt_state = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
        _log(f"initialised params from {desc}")

    step_fn = make_train_step(s)
    writer = MetricsWriter(workdir, total)
    flops_step = step_model_flops(s)
    dev = s.mesh.devices.flat[0]
    peak = flops_lib.chip_peak(cfg.get("chip") or None, dev.device_kind)
    n_chips = s.mesh.devices.size
    preempt = _Preemption()
    preempt.install()
    meta = {"seed": int(cfg.seed), "scan_layers": bool(cfg.model.scan_layers), "stage": cfg.stage}
    meta["config"] = json.loads(cfg.to_json_best_effort())
    history = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    t_last, steps_since, wait_since, imgs_since = time.time(), 0, 0.0, 0.0
    step = start
    try:
        while step < total:
            t0 = time.time()
            local = next(data)
            wait = time.time() - t0
            wait_since += wait
            batch = to_step_batch(local, s)
            params, opt_state, m = step_fn(params, opt_state, batch)
            step += 1
            steps_since += 1
            if "image_valid" in local:
                imgs_since += float(np.sum(local["image_valid"]))
            if step % int(cfg.log_every) == 0 or step == total:
                m = jax.device_get(m)
                now = time.time()
                dt = (now - t_last) / steps_since
                rec = {k: float(v) for k, v in m.items()}
                rec.update(
                    step=step,
                    lr=float(s.schedule(step - 1)),
                    step_s=dt,
                    data_wait_s=wait_since / steps_since,
                    tokens_per_s=cfg.batch_size * cfg.data.seq_len / dt,
                    images_per_s=imgs_since * jax.process_count() / (dt * steps_since),
                    model_tflops_per_s=flops_step / dt / 1e12,
                )
                if cfg.optim.vit_lr_decay and cfg.optim.vit_lr_decay != 1.0:
                    nl = s.mcfg.visual.layers
                    rec["lr_vit_first_block"] = rec["lr"] * cfg.optim.vit_lr_decay**nl
                if peak:
                    rec["mfu"] = flops_lib.mfu(flops_step, dt, n_chips, peak)
                if hasattr(data, "metrics"):  # the pipeline's packing efficiency and skips
                    rec.update({k: float(v) for k, v in data.metrics().items()})
                writer.write(step, rec)
                history.append(rec)
                if jax.process_index() == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                t_last, steps_since, wait_since, imgs_since = time.time(), 0, 0.0, 0.0
            stop = preempt.any()
            if step % int(cfg.checkpoint.every_steps) == 0 or step == total or stop:
                ckpt.save(step, params, opt_state, meta, json.dumps(data.get_state()), wait=stop)
            if stop:
                logging.warning("checkpointed step %d after SIGTERM; exiting", step)
                break
            if stop_after is not None and step - start >= stop_after:
                break
        n_compiled = step_fn._cache_size()
        if n_compiled > 1:
            logging.warning("the train step was compiled %d times (expected once)", n_compiled)
    finally:
        ckpt.close()
        writer.close()
        preempt.uninstall()
        if hasattr(data, "close"):  # stops Grain worker processes and prefetch threads
            data.close()
    return history


# ----------------------------------------------------------------------------- flags and main

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. configs/multitask.py:tiny", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (local or gs://).")
_DEMO_SETTING = flags.DEFINE_string(
    "demo_setting", "default", "Without --config: the demo setting (quick, default or long)."
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print config, mesh, per-device bytes (and AOT-compile for aot.topology)."
)
_COORD = flags.DEFINE_string("coordinator", None, "jax.distributed coordinator host:port.")
_NPROC = flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
_PID = flags.DEFINE_integer("process_id", None, "jax.distributed process id.")
_DIST = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)."
)


def main(argv) -> None:
    del argv
    from absl import logging as absl_logging

    # Orbax logs every save at INFO; the progress line is printed, warnings still show.
    absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = _CONFIG.value
    if cfg is None:
        workdir = _WORKDIR.value or os.path.join(os.getcwd(), "qwenvl_demo")
        try:
            from qwenvl_jax.demo import run_demo
        except ImportError as e:
            sys.exit(
                f"no --config given and the built-in demo is unavailable ({e}). Run a stage with"
                " --config=configs/multitask.py:tiny --workdir=/tmp/qwenvl_tiny"
            )
        run_demo(workdir, setting=_DEMO_SETTING.value)
        return
    if _DRY_RUN.value:
        dry_run(cfg)
        return
    if not _WORKDIR.value:
        sys.exit("--workdir is required (where checkpoints, logs and TensorBoard files go)")
    shd.initialize_distributed(_COORD.value, _NPROC.value, _PID.value, auto=_DIST.value)
    train(cfg, _WORKDIR.value)


if __name__ == "__main__":
    # `python -m qwenvl_jax.train` runs this file as __main__; the demo (and anything else) that
    # imports qwenvl_jax.train must get this module, not a second copy that redefines the flags.
    sys.modules.setdefault("qwenvl_jax.train", sys.modules[__name__])
    app.run(main)
