"""The loss and the jitted train step, and host batches -> sharded step batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwenvl_jax import optim as optim_lib
from qwenvl_jax import sharding as shd
from qwenvl_jax.data.batch import BATCH_SPEC, batch_shapes
from qwenvl_jax.train.state import Setup, merge_model


def cross_entropy_sum(
    model, batch: dict, loss_chunk: int = 0, image_budget: int = 0, image_groups: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum of CE(logits, targets) over supervised tokens, their count, and the correct count.

    The LM head and the float32 log-softmax run in chunks of `loss_chunk` positions (0 = all at
    once) under remat, so the [B, T, V] float32 logits never exist in full. With `image_budget`
    K > 0 only the first K valid image slots of each of `image_groups` row blocks are encoded
    (`image_budget_of`; 0 = every slot).
    """
    images = batch.get("images")
    budget = dict(image_valid=batch.get("image_valid"), image_budget=image_budget or None)
    h = model.hidden_states(
        batch["input_ids"],
        images=images,
        image_token_index=batch.get("image_token_index") if images is not None else None,
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        **(dict(budget, image_groups=image_groups) if image_budget and images is not None else {}),
    )
    targets, mask = batch["targets"], batch["loss_mask"].astype(jnp.float32)

    def chunk_loss(h_c, t_c, m_c):
        logits = model.logits(h_c).astype(jnp.float32)
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


def make_train_step(s: Setup, compiled=None):
    """The jitted step: (params, opt_state, batch[A, b, ...]) -> (params, opt_state, metrics).

    LoRA runs: params and opt_state are the trainable leaves only; the frozen base is the step's
    fourth argument, bound by `LoraStep` so the loop calls both kinds alike. `compiled`: this
    step already compiled ahead of time (`aot_compile`, as remat "auto" does), used as it is."""
    if compiled is not None:
        return LoraStep(compiled, s) if s.lora else compiled
    cfg = s.cfg
    loss_chunk = int(cfg.loss_chunk)
    budget, groups = image_budget_of(s)
    frozen = jax.tree.map(lambda lab: lab == "frozen", s.labels)
    dropout = s.lora and float(cfg.lora.dropout) > 0

    def loss_fn(params, mb, base, key):
        from qwenvl_jax.model import layers

        # Frozen params: no gradient flows, so XLA never computes their weight gradients.
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        model = merge_model(s, params, None if base is None else jax.lax.stop_gradient(base))
        if key is None:
            loss, n, correct = cross_entropy_sum(model, mb, loss_chunk, budget, groups)
        else:
            with layers.dropout_rng(key):
                loss, n, correct = cross_entropy_sum(model, mb, loss_chunk, budget, groups)
        return loss, (n, correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, opt_state, batch, base=None):
        from qwenvl_jax.model import layers

        # LoRA dropout masks: one key per optimizer step (optax's count, so a resumed run draws
        # the same masks) and micro-batch.
        key = None
        if dropout:
            key = jax.random.fold_in(jax.random.key(int(cfg.seed)), _update_count(opt_state))
        n_micro = jax.tree.leaves(batch)[0].shape[0]

        with layers.logical_rules(s.mesh, s.rules):

            def micro(carry, inputs):
                mb, i = inputs
                g_acc, l_acc, n_acc, c_acc = carry
                k = None if key is None else jax.random.fold_in(key, i)
                (loss, (n, correct)), g = grad_fn(params, mb, base, k)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, l_acc + loss, n_acc + n, c_acc + correct), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zeros = jax.lax.with_sharding_constraint(zeros, s.param_sharding)
            init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
            (grads, loss_sum, n_tok, correct), _ = jax.lax.scan(
                micro, init, (batch, jnp.arange(n_micro))
            )
            denom = jnp.maximum(n_tok, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            grads = jax.lax.with_sharding_constraint(grads, s.param_sharding)
            loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
            # Non-finite steps are skipped on the device (optim.skip_nonfinite: also when the
            # update would make a parameter non-finite) and counted in the optimizer state; the
            # host reads the count only where it syncs anyway (train/nonfinite.py).
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, new_opt = s.tx.update(grads, opt_state, params, finite=finite)
            skipped = optim_lib.nonfinite_steps(new_opt) > optim_lib.nonfinite_steps(opt_state)
            # The previous values exactly (p + 0 would turn -0.0 into +0.0).
            new_params = jax.tree.map(
                lambda c, p: jnp.where(skipped, p, c), optax.apply_updates(params, updates), params
            )
            # The state leaves keep their dtypes (optax's moments follow float32 gradients):
            # a changed dtype would compile the step a second time.
            new_params, new_opt = jax.tree.map(
                lambda x, a: x.astype(a.dtype), (new_params, new_opt),
                (s.abstract_params, s.abstract_opt),
            )  # fmt: skip
        metrics = {
            "loss": loss,
            "accuracy": correct / denom,
            "supervised_tokens": n_tok,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_params),
            # The LR this step used (skipped steps do not advance the schedule's count).
            "lr": s.schedule(_update_count(opt_state)),
            # Steps skipped so far in the run (checkpointed with the optimizer state).
            "nonfinite_steps": optim_lib.nonfinite_steps(new_opt),
        }
        return new_params, new_opt, metrics

    batch_sh = batch_shardings(s)
    in_sh = (s.param_sharding, s.opt_sharding, batch_sh)
    jitted = jax.jit(
        step,
        in_shardings=in_sh + ((s.base_sharding,) if s.lora else ()),
        out_shardings=(s.param_sharding, s.opt_sharding, None),
        donate_argnums=(0, 1),
    )
    return LoraStep(jitted, s) if s.lora else jitted


def _update_count(opt_state) -> jax.Array:
    """Optimizer updates applied so far (optax's count: skipped steps not included)."""
    return optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]


class LoraStep:
    """A LoRA run's jitted step with its frozen base bound as the fourth argument (loaded from
    `config.init` on first use, so a fresh run and a resumed one get it the same way)."""

    def __init__(self, jitted, s: Setup):
        self.jitted, self.s = jitted, s

    def __call__(self, params, opt_state, batch):
        from qwenvl_jax.train.sources import base_params

        return self.jitted(params, opt_state, batch, base_params(self.s))

    def lower(self, params, opt_state, batch):
        return self.jitted.lower(params, opt_state, batch, self.s.abstract_base)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()


def make_eval_step(s: Setup):
    """The jitted held-out step: (params, batch[A, b, ...]) -> {loss_sum, tokens, correct}, the
    train step's loss (`cross_entropy_sum`) forward only, summed over the micro-batches."""
    loss_chunk = int(s.cfg.loss_chunk)

    def step(params, batch, base=None):
        from qwenvl_jax.model import layers

        with layers.logical_rules(s.mesh, s.rules):
            model = merge_model(s, params, base)

            def micro(carry, mb):
                loss, n, correct = cross_entropy_sum(model, mb, loss_chunk, *image_budget_of(s))
                return (carry[0] + loss, carry[1] + n, carry[2] + correct), None

            zero = jnp.float32(0)
            (loss, n, correct), _ = jax.lax.scan(micro, (zero, zero, zero), batch)
        return {"loss_sum": loss, "tokens": n, "correct": correct}

    in_sh = (s.param_sharding, batch_shardings(s))
    if not s.lora:
        return jax.jit(step, in_shardings=in_sh, out_shardings=None)
    jitted = jax.jit(step, in_shardings=in_sh + (s.base_sharding,), out_shardings=None)

    def with_base(params, batch):
        from qwenvl_jax.train.sources import base_params

        return jitted(params, batch, base_params(s))

    return with_base


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


def image_budget_of(s: Setup) -> tuple[int, int]:
    """(images encoded per data shard per micro-batch, data shards) of `config.data.image_budget`
    (images encoded per micro-batch, over all data shards; 0 = every slot: (0, shards)).

    The budget is split evenly over the data-parallel shards (data x fsdp) so that picking the
    valid slots never moves pixels between devices.
    """
    dp = s.mesh.shape["data"] * s.mesh.shape["fsdp"]
    k = int(s.cfg.data.image_budget)
    if not k or not int(s.cfg.data.max_images):
        return 0, dp
    if k % dp:
        raise ValueError(
            f"config.data.image_budget={k} is not a multiple of the data-parallel size"
            f" data x fsdp = {dp} (each shard encodes budget / {dp} images)"
        )
    return k // dp, dp


def check_image_budget(image_valid: np.ndarray, s: Setup) -> None:
    """Refuses host rows [b_local, M] whose micro-batch holds more images on one data shard than
    the budget: the step would drop them (a clear stop instead of a silent loss of images).

    Raises:
        ValueError: naming the micro-batch, the count and the config keys to change.
    """
    k, dp = image_budget_of(s)
    if not k:
        return
    a = s.accum
    rows = int(s.cfg.batch_size) // a // dp  # rows per data shard per micro-batch
    v = np.asarray(image_valid, bool)
    counts = v.reshape(a, -1, rows * v.shape[-1]).sum(-1)  # [A, local shards]
    if counts.max() > k:
        i = int(np.argmax(counts.max(1)))
        raise ValueError(
            f"micro-batch {i} holds {int(counts[i].max())} images on one data shard, over the"
            f" image budget of {k} per shard (config.data.image_budget={k * dp} per micro-batch"
            f" over {dp} shards): raise config.data.image_budget, lower config.data.max_images,"
            " or set the budget to 0 to encode every slot"
        )


def to_step_batch(local: dict, s: Setup) -> dict:
    """Host rows [b_local, ...] -> global arrays [A, B/A, ...] sharded over (data, fsdp)."""
    a = s.accum
    sh = batch_shardings(s)
    if "image_valid" in local:
        check_image_budget(local["image_valid"], s)
    out = {}
    for k in batch_shapes(s.cfg, s.accum):
        v = np.asarray(local[k], BATCH_SPEC[k])
        if v.shape[0] % a:
            raise ValueError(f"host batch {v.shape[0]} rows is not a multiple of grad_accum {a}")
        v = v.reshape((a, v.shape[0] // a) + v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sh[k], v)
    return out


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
