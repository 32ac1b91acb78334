"""Leaf layers shared by the three towers, parameter helpers and the logical-sharding context.

Every parameter is created through `param`, which attaches its logical axis names as the Param's
`out_sharding` metadata (not sharded eagerly), so `nnx.get_partition_spec(nnx.state(model))` under
`flax.linen.logical_axis_rules(rules)` (or inside `logical_rules(mesh, rules)`) yields mesh specs.

Activations are constrained at block boundaries with `shard_activation(x, names)`. It is the
identity unless a `logical_rules(mesh, rules)` context is active, so the model runs unchanged on
one device:

    rules = (("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ...)
    with logical_rules(mesh, rules):
        logits = jax.jit(step)(...)   # trace inside the context

The context must be active while the model is *traced* (it is read at trace time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx
from jax.ad_checkpoint import checkpoint_name

# Closed vocabulary of logical axis names (docs/architecture.md). None means "never sharded".
PARAM_AXES = frozenset(
    {
        "vocab", "embed", "mlp", "heads", "head_dim", "qkv", "layers", "vit_embed", "vit_mlp",
        "vit_heads", "patch", "channels", "queries", "norm",
    }
)  # fmt: skip
ACTIVATION_AXES = frozenset(
    {"act_batch", "act_seq", "act_embed", "act_heads", "act_mlp", "act_vocab"}
)

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


# ----------------------------------------------------------------------------- sharding context
@dataclasses.dataclass(frozen=True)
class _Rules:
    mesh: jax.sharding.Mesh
    rules: tuple


_ACTIVE: list[_Rules] = []


@contextlib.contextmanager
def logical_rules(mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, str | Sequence[str] | None]]):
    """Activate logical-axis -> mesh-axis rules for activations and parameter specs.

    Args:
      mesh: the device mesh that `shard_activation` constrains to.
      rules: pairs `(logical_name, mesh_axis | tuple of mesh axes | None)`, as for
        `flax.linen.logical_axis_rules`. Names without a rule are replicated.

    Inside the context, `shard_activation` applies `jax.lax.with_sharding_constraint`, and
    `nnx.get_partition_spec` maps parameter names through the same rules.
    """
    rules = tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)
    # nnx.get_partition_spec keeps names that no rule matches; map the rest of the vocabulary to
    # None (replicated) so specs only ever name mesh axes.
    given = {name for name, _ in rules}
    rules += tuple((n, None) for n in sorted(PARAM_AXES | ACTIVATION_AXES) if n not in given)
    _ACTIVE.append(_Rules(mesh, rules))
    try:
        with linen.logical_axis_rules(rules):
            yield
    finally:
        _ACTIVE.pop()


def current_rules() -> _Rules | None:
    """The innermost active `logical_rules` context, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def logical_to_spec(names: Sequence[str | None], rules) -> jax.sharding.PartitionSpec:
    """Map logical axis names to a mesh PartitionSpec with `rules` (unmapped names replicate)."""
    return linen.logical_to_mesh_axes(tuple(names), rules)


def shard_activation(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain activation `x` to the sharding its logical `names` map to, when rules are active.

    Args:
      x: any array; `len(names) == x.ndim`.
      names: one logical activation name (`act_*`) or None per axis.
    """
    if len(names) != x.ndim:
        raise ValueError(f"shard_activation: {len(names)} names {names} for an array {x.shape}")
    ctx = current_rules()
    if ctx is None:
        return x
    spec = logical_to_spec(names, ctx.rules)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(ctx.mesh, spec))


# ----------------------------------------------------------------------------- dropout keys
# LoRA dropout (the only dropout in training): `with dropout_rng(key):` around the traced forward
# turns it on; each adapter folds in its own id and the index of the layer that runs it (set by
# `run_stack`, a traced scalar under scan), so every adapter of every layer draws its own mask.
_DROPOUT: list[dict] = []


@contextlib.contextmanager
def dropout_rng(key: jax.Array):
    """Turn LoRA dropout on for forwards traced inside the context, drawing masks from `key`."""
    _DROPOUT.append({"key": key, "layer": 0})
    try:
        yield
    finally:
        _DROPOUT.pop()


@contextlib.contextmanager
def _layer_index(i):
    if not _DROPOUT:
        yield
        return
    ctx = _DROPOUT[-1]
    old, ctx["layer"] = ctx["layer"], i
    try:
        yield
    finally:
        ctx["layer"] = old


def dropout_key(module_id: int) -> jax.Array | None:
    """The dropout key of adapter `module_id` in the current layer, or None (dropout off)."""
    if not _DROPOUT:
        return None
    ctx = _DROPOUT[-1]
    return jax.random.fold_in(jax.random.fold_in(ctx["key"], module_id), ctx["layer"])


# ----------------------------------------------------------------------------- parameters
def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    param_dtype: jnp.dtype,
) -> nnx.Param:
    """A Param initialised by `init`, carrying logical axis `names` as sharding metadata."""
    if len(names) != len(shape):
        raise ValueError(f"param of shape {tuple(shape)} given {len(names)} axis names {names}")
    bad = [n for n in names if n is not None and n not in PARAM_AXES]
    if bad:
        raise ValueError(f"logical axis names {bad} are not in the vocabulary {sorted(PARAM_AXES)}")
    value = init(rngs.params(), tuple(shape), param_dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


normal = nnx.initializers.normal
zeros = nnx.initializers.zeros
ones = nnx.initializers.ones


def uniform(bound: float) -> Initializer:
    """U(-bound, bound), e.g. PyTorch's default Linear/Conv init with bound 1/sqrt(fan_in)."""

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def c_proj_std(init_std: float, num_llm_layers: int) -> float:
    """The published init of every `c_proj` weight (decoder and ViT): std / sqrt(2 L), L the
    decoder's layer count (QWenPreTrainedModel._init_weights)."""
    return init_std / math.sqrt(2 * num_llm_layers)


def constant(array: np.ndarray) -> Initializer:
    """An initializer that returns a fixed (precomputed) array."""

    def init(key, shape, dtype):
        del key
        if tuple(shape) != array.shape:
            raise ValueError(f"constant initializer of shape {array.shape} asked for {shape}")
        return jnp.asarray(array, dtype)

    return init


# ----------------------------------------------------------------------------- layers
class Einsum(nnx.Module):
    """A linear map `einsum(eqn, x, kernel) (+ bias)` with an arbitrary kernel shape.

    Attributes:
      kernel: Param of `kernel_shape`; bias: Param of `bias_shape` (if given), added to the output.
    """

    def __init__(
        self,
        eqn: str,
        kernel_shape: Sequence[int],
        kernel_names: Sequence[str | None],
        *,
        bias_shape: Sequence[int] | None = None,
        bias_names: Sequence[str | None] = (),
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.eqn = eqn
        self.dtype = dtype
        kernel_init = normal(0.02) if kernel_init is None else kernel_init
        self.kernel = param(rngs, kernel_init, kernel_shape, kernel_names, param_dtype)
        if bias_shape is not None:
            self.bias = param(rngs, zeros, bias_shape, bias_names, param_dtype)
        else:
            self.bias = None

    # The kernel-variant slot (`qwenvl_jax.model.variants`): None for a plain layer, else a static
    # `variants.Variant` saying how `kernel` is stored (a codec: int8 / fp8 codes with
    # `kernel_scale`, nf4 / int4 codes with `kernel_block_scale`) and which adapter adds to the
    # output (LoRA: `lora_A`, `lora_B`). `variants.set_codec` / `set_lora` fill it; the Params
    # sit on the layer, so their paths are the layer's.
    variant = None
    kernel_scale = None  # Param, the kernel's rank with the contracted axes 1 (int8, fp8)
    kernel_block_scale = None  # Param [..., K / 64] (nf4, int4)
    lora_A = None  # Param [*contracted dims of kernel, r]
    lora_B = None  # Param [r, *output dims of kernel]

    def kernel_value(self) -> jax.Array:
        """The kernel in the compute dtype (decoded when a codec stores it)."""
        if self.variant is None:
            return self.kernel[...].astype(self.dtype)
        return self.variant.kernel(self)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.einsum(self.eqn, x, self.kernel_value())
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.variant is not None:
            y = self.variant.adapt(self, x, y)
        return y


class Linear(Einsum):
    """`x @ kernel (+ bias)` on the last axis; kernel [in, out] (torch's weight transposed)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        names: tuple[str | None, str | None],
        *,
        use_bias: bool,
        rngs: nnx.Rngs,
        kernel_init: Initializer | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        super().__init__(
            "...i,io->...o",
            (in_features, out_features),
            names,
            bias_shape=(out_features,) if use_bias else None,
            bias_names=names[1:],
            kernel_init=kernel_init,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics and affine in float32, output in `dtype`.

    PyTorch's layer_norm on bf16 input computes in float32 and rounds the affine output once.
    """

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, ones, (features,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros, (features,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """Qwen's RMSNorm: normalise in float32, cast to the compute dtype, then multiply by weight."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, ones, (features,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # QWEN-QUIRK: the cast back to the activation dtype happens before the weight multiply.
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        init_std: float = 0.02,
    ):
        self.dtype = dtype
        self.embedding = param(
            rngs, normal(init_std), (num_embeddings, features), ("vocab", "embed"), param_dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


# ----------------------------------------------------------------------------- position tables
# PyTorch's bicubic convolution constant (upsample_bicubic2d); jax.image.resize uses -0.5.
BICUBIC_A = -0.75


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The [out_size, in_size] float32 matrix of PyTorch's 1-D bicubic resize.

    Matches `F.interpolate(mode="bicubic", align_corners=False)` without antialiasing: source
    coordinate `(dst + 0.5) * in/out - 0.5` (not clamped), taps `floor(src) - 1 .. floor(src) + 2`
    clamped to the border, cubic convolution with A = -0.75; arithmetic in float32 as ATen does.
    """
    f32 = np.float32
    a = f32(BICUBIC_A)
    scale = f32(in_size) / f32(out_size)
    m = np.zeros((out_size, in_size), np.float32)
    for dst in range(out_size):
        src = scale * (f32(dst) + f32(0.5)) - f32(0.5)
        i0 = int(np.floor(src))
        t = f32(src - f32(i0))

        def cc1(x):  # |x| <= 1
            return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

        def cc2(x):  # 1 < |x| < 2
            return ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a

        weights = (cc2(t + f32(1)), cc1(t), cc1(f32(1) - t), cc2(f32(2) - t))
        for tap, w in zip(range(i0 - 1, i0 + 3), weights, strict=True):
            m[dst, min(max(tap, 0), in_size - 1)] += w
    return m


@functools.lru_cache(maxsize=None)
def pos_resize_matrix(src_len: int, tgt_len: int) -> np.ndarray:
    """K = kron(M, M) [tgt_len, src_len]: bicubic resize of a row-major square grid, as a matrix."""
    src, tgt = math.isqrt(src_len), math.isqrt(tgt_len)
    if src * src != src_len or tgt * tgt != tgt_len:
        raise ValueError(f"position tables must be square grids, got {src_len} -> {tgt_len}")
    m = bicubic_matrix(src, tgt)
    return np.kron(m, m).astype(np.float32)


def resize_pos_table(table: jax.Array, tgt_len: int) -> jax.Array:
    """Qwen-VL's `get_abs_pos`: resize a [L, C] square-grid table to [tgt_len, C].

    Identity when the grids agree; otherwise PyTorch bicubic in float32, cast back to table's dtype.
    """
    if table.shape[0] == tgt_len:
        return table
    k = jnp.asarray(pos_resize_matrix(table.shape[0], tgt_len))
    out = jnp.dot(k, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(table.dtype)


# ----------------------------------------------------------------------------- layer stacks
# Names on the big activations of a block (decoder and ViT alike), for policies that keep some:
# `qkv_proj` the fused q/k/v projection [B, T, 3, N, H], `attn_out` the attention output before
# its projection [B, T, N, H] (keeping it skips recomputing attention), `mlp_hidden` the MLP's
# activated hidden [B, T, F] (the widest).
REMAT_NAMES = ("qkv_proj", "attn_out", "mlp_hidden")


def remat_name(x: jax.Array, name: str) -> jax.Array:
    """Tags an activation for the named remat policies (identity otherwise)."""
    if name not in REMAT_NAMES:
        raise ValueError(f"remat name {name!r}: not in {REMAT_NAMES}")
    return checkpoint_name(x, name)


_save = jax.checkpoint_policies.save_only_these_names
# Per block, from most memory to least: "none" keeps every activation; "dots" the outputs of the
# weight matmuls (attention scores and elementwise ops are recomputed); "save_attn_mlp" the three
# named tensors; "save_attn" only q/k/v and the attention output (the MLP is recomputed, attention
# is not); "full" only the block's input (everything recomputed: one more forward). The stage
# configs pick per tower from memory (launch/README.md).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_mlp": _save("qkv_proj", "attn_out", "mlp_hidden"),
    "save_attn": _save("qkv_proj", "attn_out"),
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


# Remat "auto" (train/remat.py) tries these in turn; a model built outside it gets the first.
REMAT_AUTO_LADDER = ("dots", "save_attn", "full")


def check_remat(remat: str) -> str:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose from {sorted(REMAT_POLICIES)}")
    return remat


def maybe_remat(fn: Callable, remat: str) -> Callable:
    """`fn` wrapped in `jax.checkpoint` with the named policy ("none" leaves it alone)."""
    if check_remat(remat) == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat])


def make_stacked(make_block: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs):
    """One module whose Params have a leading `layers` axis of size n (`run_stack` with scan)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r):
        return make_block(r)

    return create(rngs)


def run_stack(
    blocks,
    x: jax.Array,
    xs=None,
    *,
    scan: bool,
    remat: str,
    call: Callable,
):
    """Apply a stack of blocks to carry `x`, with optional per-layer inputs/outputs `xs`.

    Args:
      blocks: an `nnx.List` of blocks (`scan=False`) or one stacked module (`scan=True`).
      x: the carry (the residual stream).
      xs: None or a pytree whose leaves have a leading layer axis (e.g. a KV cache).
      scan: run with `jax.lax.scan` over the stacked parameters.
      remat: a `REMAT_POLICIES` name applied to each block call.
      call: `call(block, x, xs_i) -> (x, ys_i)`.

    Returns:
      (x, ys) with ys stacked along a leading layer axis (None if the blocks return None).
    """
    if scan:
        graphdef, state = nnx.split(blocks)
        n = jax.tree.leaves(state)[0].shape[0]

        def body(carry, inputs):
            st, xi, i = inputs
            with _layer_index(i):
                return call(nnx.merge(graphdef, st), carry, xi)

        return jax.lax.scan(
            maybe_remat(body, remat), x, (state, xs, jnp.arange(n, dtype=jnp.int32))
        )
    ys = []
    for i in range(len(blocks)):
        st_i = nnx.state(blocks[i])
        graphdef_i = nnx.graphdef(blocks[i])
        xi = None if xs is None else jax.tree.map(lambda a, i=i: a[i], xs)

        def body_i(carry, inputs, graphdef_i=graphdef_i, i=i):
            st, xin = inputs
            with _layer_index(i):
                return call(nnx.merge(graphdef_i, st), carry, xin)

        x, y = maybe_remat(body_i, remat)(x, (st_i, xi))
        ys.append(y)
    if all(y is None for y in ys):
        return x, None
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)
