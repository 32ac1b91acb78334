"""The static side of a run: model config and options (`model.factory.make_model` builds it),
mesh, shardings, optimizer (`Setup`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from qwenvl_jax import flops as flops_lib
from qwenvl_jax import lora as lora_lib
from qwenvl_jax import optim as optim_lib
from qwenvl_jax import sharding as shd
from qwenvl_jax import tree as tree_lib
from qwenvl_jax.config import QWenConfig, get_preset
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.model.factory import make_model
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.train import model_axis


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def model_config(cfg: ml_collections.ConfigDict) -> QWenConfig:
    """The QWenConfig of a training config: preset + overrides, at the stage's image size."""
    overrides = cfg.model.overrides.to_dict()
    visual = dict(overrides.pop("visual", {}) or {})
    visual.setdefault("image_size", int(cfg.data.image_size))
    return get_preset(cfg.model.preset, visual=visual, **overrides)


def _lora(cfg: ml_collections.ConfigDict):
    """The `config.lora` block when LoRA is enabled (`make_model` attaches its adapters)."""
    return cfg.lora if lora_lib.enabled(cfg) else None


@dataclasses.dataclass
class Setup:
    """Everything static about a run: model structure, shardings, optimizer."""

    cfg: ml_collections.ConfigDict
    mcfg: QWenConfig
    options: ModelOptions  # how the model is built (`ModelOptions.from_config(cfg)`)
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
    # LoRA (`config.lora.rank` > 0): params / opt state above hold only the trainable leaves
    # (adapters, modules_to_save); the frozen base (4-bit codes with quantize_base) is a second
    # tree passed to the step, loaded from config.init once (`sources.base_params`).
    abstract_base: Any = None
    base_sharding: Any = None
    base: Any = None

    @property
    def lora(self) -> bool:
        return self.abstract_base is not None


def build(
    cfg: ml_collections.ConfigDict, devices=None, *, options: ModelOptions | None = None
) -> Setup:
    """Builds the abstract model, shardings and optimizer without allocating parameters.

    Args:
      cfg: the training config.
      devices: the devices of the mesh (default: all), or a `jax.sharding.AbstractMesh` of the
        config's mesh shape: shardings laid out for devices that are not here (the dry run of a
        named slice, `train.aot.slice_dry_run`).
      options: the model options; default `ModelOptions.from_config(cfg)`. The setup keeps them
        and every model of the run (abstract, initialised, merged) is built with this object.
    """
    if lora_lib.enabled(cfg):
        lora_lib.check_config(cfg.lora)
    mcfg = model_config(cfg)
    if options is None:
        options = ModelOptions.from_config(cfg)
    if isinstance(devices, jax.sharding.AbstractMesh):
        mesh = devices
    else:
        # mesh.model "auto" unresolved (`remat.resolve` decides it): its first choice
        devices = jax.devices() if devices is None else devices
        mesh = shd.make_mesh(model_axis.mesh_sizes(cfg, devices), devices)
    accum = grad_accum_steps(cfg, mesh)
    rules = shd.rules_from_config(cfg.sharding.rules)
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(
            lambda: make_model(mcfg, options, nnx.Rngs(0), lora=_lora(cfg))
        )
    graphdef, state = nnx.split(abstract_model, nnx.Param)
    logical = nnx.to_pure_dict(shd.logical_axes_of_state(state))
    pure = nnx.to_pure_dict(state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure)
    param_sharding = shd.param_shardings(abstract, logical, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, param_sharding
    )
    abstract_base = base_sharding = None
    if lora_lib.enabled(cfg):
        keep = lora_lib.trainable_paths(
            list(tree_lib.flatten(abstract)), tuple(cfg.lora.modules_to_save or ())
        )
        abstract, abstract_base = lora_lib.split(abstract, keep)
        param_sharding, base_sharding = lora_lib.split(param_sharding, keep)
        # Every trained leaf keeps a float32 master, modules_to_save too (as DeepSpeed's bf16
        # runs of finetune.py do): a bf16 wte would round away Adam steps of lr 1e-5.
        abstract = jax.tree.map(
            lambda a: (
                jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding)
                if jnp.issubdtype(a.dtype, jnp.floating)
                else a
            ),
            abstract,
        )
    ocfg = dict(cfg.optim.to_dict(), total_steps=int(cfg.optim.total_steps))
    if abstract_base is not None:
        # PEFT freezes everything but the adapters and modules_to_save: optim.freeze (the
        # stage's fix_vit) has nothing left to freeze.
        ocfg["freeze"] = ()
    tx, labels, schedule = optim_lib.make_optimizer(ocfg, abstract)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_sharding = shd.opt_state_shardings(abstract_opt, param_sharding, mesh)
    abstract_opt = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt, opt_sharding
    )
    return Setup(
        cfg, mcfg, options, mesh, rules, graphdef, state, abstract, param_sharding, tx, labels,
        schedule, abstract_opt, opt_sharding, accum, abstract_base, base_sharding,
    )  # fmt: skip


def grad_accum_steps(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | dict) -> int:
    """Micro-batches per optimizer step.

    With `cfg.device_batch` > 0 (sequences per data-parallel shard per micro-step), the number of
    micro-batches follows from the global batch and the mesh: batch / (device_batch x data x fsdp);
    the paper's per-GPU accumulation (Table 8) only fixes the global batch on a different cluster.
    With `cfg.device_batch` = 0, `cfg.grad_accum` is used as given.

    Args:
      cfg: the training config.
      mesh: the run's mesh, or its {axis: size} (`train.validate` asks before any mesh exists).

    Raises:
      ConfigError: the batch does not split so (one line naming the keys to change).
    """
    shape = getattr(mesh, "shape", mesh)
    dp = shape["data"] * shape["fsdp"]
    b = int(cfg.batch_size)
    db = int(cfg.device_batch)
    if db:
        if b % (db * dp):
            raise ConfigError(
                f"--config.batch_size={b}: must be a multiple of --config.device_batch={db} x the"
                f" data-parallel size data x fsdp = {dp} (or set --config.device_batch=0 and"
                " --config.grad_accum)"
            )
        return b // (db * dp)
    a = int(cfg.grad_accum)
    if b % a or (b // a) % dp:
        raise ConfigError(
            f"--config.batch_size={b}: must be a multiple of --config.grad_accum={a} x the"
            f" data-parallel size data x fsdp = {dp} (a whole number of sequences per micro-batch"
            " on every data shard)"
        )
    return a


def merge_model(s: Setup, params: Any, base: Any = None):
    """An NNX model view of pure-dict params (inside jit); LoRA runs also pass the base tree."""
    if base is not None:
        params = lora_lib.join(params, base)
    state = jax.tree.map(lambda v: v, s.state_template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(s.graphdef, state)


def init_params(s: Setup, seed: int) -> Any:
    """Random initialisation directly into the parameter shardings."""

    return _init(s, seed, s.abstract_params, s.param_sharding)


def init_base_params(s: Setup, seed: int) -> Any:
    """LoRA runs: a random frozen base (the same draw as the full model of `seed`)."""
    return _init(s, seed, s.abstract_base, s.base_sharding)


def _init(s: Setup, seed: int, like: Any, sharding: Any) -> Any:
    keep = set(tree_lib.flatten(like))

    @functools.partial(jax.jit, out_shardings=sharding)
    def init(key):
        with nnx.use_eager_sharding(False):
            model = make_model(s.mcfg, s.options, nnx.Rngs(key), lora=_lora(s.cfg))
        full = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # LoRA: only the requested part leaves the jit (XLA drops the rest of the draw).
        out = lora_lib.split(full, keep)[0] if s.lora else full
        return jax.tree.map(lambda x, a: x.astype(a.dtype), out, like)

    return init(jax.random.key(seed))


def _towers_trainable(labels: Any) -> tuple[bool, bool]:
    llm, vit = [], []

    def visit(p, lab):
        if p.startswith("transformer.visual.transformer."):
            vit.append(lab == "train")
        elif p.startswith("transformer.h."):
            llm.append(lab == "train")

    tree_lib.map_with_path(visit, labels)
    return any(llm), any(vit)


def encoded_images(s: Setup) -> int:
    """Images the step encodes: every static slot, or `data.image_budget` per micro-batch."""
    slots = int(s.cfg.batch_size) * int(s.cfg.data.max_images)
    budget = int(s.cfg.data.image_budget)
    return min(slots, budget * s.accum) if budget and slots else slots


def step_model_flops(s: Setup, images: float | None = None, work: dict | None = None) -> float:
    """Model FLOPs of one step, counting `images` images (default: those encoded, `encoded_images`;
    the trainer also logs MFU counting only the real images of the batch). `work`: count only the
    real work of a step instead (`data.batch.real_work` of its batch: tokens, attended, images)."""
    llm_t, vit_t = _towers_trainable(s.labels)
    if work is not None:
        return flops_lib.work_flops(
            s.mcfg,
            tokens=work["tokens"],
            attended=work["attended"],
            images=work["images"],
            image_size=int(s.cfg.data.image_size),
            llm_trainable=llm_t,
            vit_trainable=vit_t,
        )
    return flops_lib.step_flops(
        s.mcfg,
        sequences=int(s.cfg.batch_size),
        seq_len=int(s.cfg.data.seq_len),
        images=encoded_images(s) if images is None else images,
        image_size=int(s.cfg.data.image_size),
        llm_trainable=llm_t,
        vit_trainable=vit_t,
    )


def describe(s: Setup) -> str:
    if isinstance(s.mesh, jax.sharding.AbstractMesh):  # a named slice's layout, no devices
        where = f"{s.mesh.size} devices (laid out abstractly: none allocated, none needed)"
    else:
        dev = s.mesh.devices.flat[0]
        where = f"{s.mesh.devices.size} {dev.platform} devices ({dev.device_kind})"
    lines = [f"mesh {dict(s.mesh.shape)} over {where}"]
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
    if s.lora:
        lc = s.cfg.lora
        bb = shd.device_bytes(s.abstract_base, s.base_sharding)
        lines.append(
            f"LoRA r={lc.rank} alpha={lc.alpha} dropout={lc.dropout} base {lc.quantize_base}:"
            f" frozen base {bb / 2**30:.3f} GiB per device (not checkpointed)"
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
