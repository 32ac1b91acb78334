"""Kernel variants of `layers.Einsum`: how its kernel is stored (a codec) and what adds to its
output (a LoRA adapter). One module owns both; one walker (`find`) finds the layers by path.

A layer's variant is one static `Variant` in its `variant` slot (None for a plain layer). The
Params a variant needs sit on the layer next to `kernel`, so their paths are the layer's
(`transformer.h.3.attn.c_attn.lora_A`):

| variant | `kernel` holds | Params it adds | used by |
|---|---|---|---|
| int8 | int8, scale absmax / 127 per output channel | `kernel_scale` | `quantize="int8"` |
| fp8 | float8_e4m3fn, absmax / 448 per channel | `kernel_scale` | `quantize="fp8"` |
| nf4 | QLoRA's NormalFloat (uint4), blocks of 64 | `kernel_block_scale` | Q-LoRA base |
| int4 | int4 in [-7, 7], blocks of 64 | `kernel_block_scale` | Q-LoRA base |
| LoRA | (any of the above, or the plain kernel) | `lora_A`, `lora_B` | `config.lora` |

(`quantize=` of `QwenVL.from_pretrained`, every Einsum; `config.lora.quantize_base`, the decoder
blocks; any codec may be a LoRA base.)

Scale layouts are named by their shape: `kernel_scale` has the kernel's rank with the contracted
axes of size 1 (it broadcasts against the kernel); `kernel_block_scale` is [..., K / block], one
scale per block of 64 along the kernel's last axis (fewer when K is smaller). A new storage
format is one `Codec` entry in `CODECS` (its qwix type, the code that absmax maps to, per channel
or blockwise); the walker, the layer, the host-side quantizer and `decode_params` need no change.

The codecs are qwix's (`qwix.quantize` / `qwix.dequantize` on the kernel array, with our two
layouts as qwix's channelwise / tiled axes; NF4 codes and scales are bit-identical to the
hand-written QLoRA NF4 they replace). qwix's model-level providers are not used: our layer stack
runs each block as an `nnx.merge` copy (lazily created LoRA Params never reach the model) and
casts the kernel before the einsum (`WithAux.astype` fails on a QArray: "Unsupported type:
QArray"), measured with 0.1.8.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

# Private: qwix's bound per type, to map absmax to our qmax (tests recompute the scales in numpy).
from qwix._src.core import numerics as _qwix_numerics

from qwenvl_jax.model import layers

QUANT_BLOCK = 64  # QLoRA's block size
SCALE_NAMES = ("kernel_scale", "kernel_block_scale")


# ----------------------------------------------------------------------------- codecs
@dataclasses.dataclass(frozen=True)
class Codec:
    """How a kernel is stored: codes of the kernel's shape and float32 scales.

    Attributes:
      name: the user-facing mode (`quantize="int8"`, `config.lora.quantize_base="nf4"`).
      qtype: qwix's logical type of the codes.
      storage: the dtype the codes are stored in.
      qmax: the code that a channel's (block's) absmax maps to, so scale = absmax / qmax; None
        keeps qwix's bound (float8's largest finite value, NF4's 1).
      block: None for one scale per output channel (`kernel_scale`); else the block size along
        the kernel's last axis (`kernel_block_scale`).
    """

    name: str
    qtype: Any
    storage: Any
    qmax: float | None
    block: int | None = None

    @property
    def scale_name(self) -> str:
        return "kernel_scale" if self.block is None else "kernel_block_scale"

    def scale_shape(self, shape: Sequence[int], contracted: Sequence[int]) -> tuple[int, ...]:
        """The scale's shape for a kernel of `shape` whose axes `contracted` the einsum sums."""
        if self.block is None:
            return tuple(1 if i in contracted else int(d) for i, d in enumerate(shape))
        last = int(shape[-1])
        return tuple(int(d) for d in shape[:-1]) + (last // math.gcd(self.block, last),)

    def encode(self, w: jax.Array, scale_shape: Sequence[int]) -> tuple[jax.Array, jax.Array]:
        """w -> (codes of w's shape in `storage`, float32 scales of `scale_shape`).

        Axes where the scale is as long as w get one scale per index, axes where it is 1 are
        reduced, axes in between are cut into blocks; a zero channel (block) gets scale 1."""
        w = jnp.asarray(w, jnp.float32)
        if len(scale_shape) != w.ndim:
            raise ValueError(f"{self.name}: scale shape {scale_shape} for a kernel {w.shape}")
        pairs = list(enumerate(zip(w.shape, scale_shape, strict=True)))
        channel = tuple(i for i, (d, s) in pairs if s == d)
        tiled = {i: d // s for i, (d, s) in pairs if 1 < s < d}
        calibration = "absmax"
        if self.qmax is not None:  # qwix maps absmax to its bound; ours maps it to qmax
            calibration += f",{_qwix_numerics.get_symmetric_bound(self.qtype) / self.qmax!r}"
        q = qwix.quantize(
            w, self.qtype, channelwise_axes=channel, tiled_axes=tiled,
            calibration_method=calibration,
        )  # fmt: skip
        if q.qvalue.dtype != jnp.dtype(self.storage) or tuple(q.scale.shape) != tuple(scale_shape):
            raise ValueError(
                f"{self.name}: qwix made {q.qvalue.dtype} codes, {q.scale.shape} scales"
            )
        return q.qvalue, q.scale.astype(jnp.float32)

    def decode(self, codes: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
        """The kernel in `dtype` (codes times their scale, the product in `dtype`)."""
        return qwix.dequantize(qwix.QArray(codes, scale.astype(dtype), None, self.qtype))


CODECS = {
    c.name: c
    for c in (
        Codec("int8", jnp.int8, jnp.int8, qmax=127.0),
        Codec("fp8", jnp.float8_e4m3fn, jnp.float8_e4m3fn, qmax=None),
        Codec("nf4", "nf4", jnp.uint4, qmax=None, block=QUANT_BLOCK),
        Codec("int4", jnp.int4, jnp.int4, qmax=7.0, block=QUANT_BLOCK),
    )
}


@functools.cache
def nf4_levels() -> np.ndarray:
    """QLoRA's 16 NormalFloat levels as the nf4 codec decodes codes 0..15 (computed on first use:
    no JAX computation at import)."""
    codes = jnp.arange(16, dtype=jnp.uint4).reshape(1, 16)
    return np.asarray(CODECS["nf4"].decode(codes, jnp.ones((1, 1), jnp.float32)))[0]


def codec_of(codes_dtype, scale_name: str) -> Codec:
    """The codec that stored a kernel, from its dtype and its scale's name."""
    for c in CODECS.values():
        if np.dtype(c.storage) == np.dtype(codes_dtype) and c.scale_name == scale_name:
            return c
    raise ValueError(f"no codec stores {np.dtype(codes_dtype)} kernels with a {scale_name}")


# ----------------------------------------------------------------------------- LoRA
@dataclasses.dataclass(frozen=True)
class LoRA:
    """A low-rank adapter: the layer's output gains `B(A(dropout(x))) * scale` (PEFT's order).

    Attributes:
      eqns: the einsums of A (`btd,dr->btr`) and B (`btr,rsnh->btsnh`).
      scale: alpha / r.
      dropout: the dropout rate on the adapter's input (on under `layers.dropout_rng`).
      id: folded into the dropout key, so each adapter draws its own mask.
    """

    eqns: tuple[str, str]
    scale: float
    dropout: float
    id: int

    def __call__(self, layer: layers.Einsum, x: jax.Array) -> jax.Array:
        h = x
        key = layers.dropout_key(self.id) if self.dropout else None
        if key is not None:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(layer.dtype)
        h = jnp.einsum(self.eqns[0], h, layer.lora_A[...].astype(layer.dtype))
        h = jnp.einsum(self.eqns[1], h, layer.lora_B[...].astype(layer.dtype))
        return (h * self.scale).astype(layer.dtype)


def lora_eqns(eqn: str, kernel_ndim: int) -> tuple[str, str, int]:
    """The two einsums of an adapter on `layers.Einsum(eqn)`, and how many leading kernel dims
    are contracted.

    `btd,dsnh->btsnh` gives (`btd,dr->btr`, `btr,rsnh->btsnh`, 1): A takes the kernel's
    contracted dims, B its output dims, in the kernel's order."""
    ins, out = eqn.split("->")
    lhs, rhs = ins.split(",")
    if len(rhs) != kernel_ndim:
        raise ValueError(f"einsum {eqn}: kernel spec {rhs!r} for a {kernel_ndim}-d kernel")
    n_in = 0
    while n_in < len(rhs) and rhs[n_in] in lhs and rhs[n_in] not in out:
        n_in += 1
    contracted, outputs = rhs[:n_in], rhs[n_in:]
    if not contracted or any(c in lhs or c not in out for c in outputs):
        raise ValueError(f"einsum {eqn}: kernel is not [contracted dims..., output dims...]")
    r = next(c for c in "rzyxwv" if c not in eqn)
    rest = "".join(c for c in lhs if c not in contracted)
    return f"{lhs},{contracted}{r}->{rest}{r}", f"{rest}{r},{r}{outputs}->{out}", n_in


# ----------------------------------------------------------------------------- the slot
@dataclasses.dataclass(frozen=True)
class Variant:
    """What sits in `layers.Einsum.variant`: a storage codec, an adapter, or both."""

    codec: Codec | None = None
    lora: LoRA | None = None

    def kernel(self, layer: layers.Einsum) -> jax.Array:
        """The layer's kernel in its compute dtype (decoded when a codec stores it)."""
        if self.codec is None:
            return layer.kernel[...].astype(layer.dtype)
        scale = getattr(layer, self.codec.scale_name)[...]
        return self.codec.decode(layer.kernel[...], scale, layer.dtype)

    def adapt(self, layer: layers.Einsum, x: jax.Array, y: jax.Array) -> jax.Array:
        """The layer's output `y` (of input `x`, in the compute dtype) with the adapter added."""
        return y if self.lora is None else y + self.lora(layer, x)


# ----------------------------------------------------------------------------- the walker
def path_str(path: Sequence[Any]) -> str:
    return ".".join(str(k) for k in path)


def find(
    model: nnx.Module, patterns: Sequence[str] = (".*",)
) -> Iterator[tuple[int, tuple, layers.Einsum]]:
    """(index among all Einsums, module path, layer) of every Einsum / Linear whose dotted path
    (`transformer.h.0.attn.c_attn`; `transformer.h.attn.c_attn` when stacked) matches one of
    the regexes (`re.search`). The index is stable across calls (the model's order)."""
    rx = [re.compile(p) for p in patterns]
    k = 0
    for path, m in nnx.iter_modules(model):
        if isinstance(m, layers.Einsum):
            if any(r.search(path_str(path)) for r in rx):
                yield k, tuple(path), m
            k += 1


def unmatched(model: nnx.Module, patterns: Sequence[str]) -> list[str]:
    """The patterns that match no Einsum of the model."""
    paths = [path_str(p) for _, p, _ in find(model)]
    return [p for p in patterns if not any(re.search(p, q) for q in paths)]


def _names(p: nnx.Param) -> tuple:
    return tuple(getattr(p, "out_sharding", None) or (None,) * p.ndim)


def _kernel_spec(layer: layers.Einsum) -> tuple[int, str]:
    """(1 if the layer is scan-stacked (a leading `layers` axis) else 0, the eqn's kernel
    letters). Not the rank difference: the resampler's packed q/k/v kernel [D, 3, N, H] is applied
    a third at a time with `...d,dnh->...nh`."""
    spec = layer.eqn.replace("...", "").split("->")[0].split(",")[1]
    return int(_names(layer.kernel)[0] == "layers"), spec


def contracted_axes(layer: layers.Einsum) -> tuple[int, ...]:
    """Kernel axes the layer's einsum sums over (`btd,dsnh->btsnh` -> (0,), or (1,) stacked)."""
    lead, spec = _kernel_spec(layer)
    out = layer.eqn.split("->")[1]
    return tuple(lead + i for i, c in enumerate(spec) if c not in out)


def set_codec(layer: layers.Einsum, codec: Codec, *, encode: bool = True) -> None:
    """Store the layer's kernel with `codec`: codes in `kernel`, scales in `codec.scale_name`.

    encode=True quantizes the current kernel (a concrete or traced model); encode=False only
    declares the shapes and dtypes (an abstract model whose values come later, from
    `encode_params`). Sharding names: the kernel's; the scale's axes that are 1 or blocked
    are unnamed."""
    if layer.variant is not None and layer.variant.codec is not None:
        raise ValueError(f"{layer.eqn} layer is already stored as {layer.variant.codec.name}")
    names, shape = _names(layer.kernel), tuple(layer.kernel.shape)
    sshape = codec.scale_shape(shape, contracted_axes(layer))
    snames = tuple(n if s == d else None for n, s, d in zip(names, sshape, shape, strict=True))
    if encode:
        codes, scale = codec.encode(layer.kernel[...], sshape)
    else:
        codes = jax.ShapeDtypeStruct(shape, jnp.dtype(codec.storage))
        scale = jax.ShapeDtypeStruct(sshape, jnp.float32)
    kw = dict(eager_sharding=False)  # names only, as `layers.param`
    layer.kernel = nnx.Param(codes, out_sharding=names, **kw)
    setattr(layer, codec.scale_name, nnx.Param(scale, out_sharding=snames, **kw))
    layer.variant = dataclasses.replace(layer.variant or Variant(), codec=codec)


def set_lora(
    layer: layers.Einsum, *, rank: int, alpha: float, dropout: float, id: int, rngs: nnx.Rngs
) -> None:
    """Attach a LoRA adapter: `lora_A` [*contracted dims, r] ~ U(+-1/sqrt(fan_in)) (PEFT's
    kaiming_uniform(a=sqrt(5))) and `lora_B` [r, *output dims] = 0, so the layer starts equal
    to its base; float32 masters whatever the base's dtype. Stacked layers keep their leading
    `layers` axis."""
    names, kshape = _names(layer.kernel), tuple(layer.kernel.shape)
    lead, _ = _kernel_spec(layer)
    eqn_a, eqn_b, n_in = lora_eqns(layer.eqn, len(kshape) - lead)
    in_dims, out_dims = kshape[lead : lead + n_in], kshape[lead + n_in :]
    in_names, out_names = names[lead : lead + n_in], names[lead + n_in :]
    bound = 1.0 / math.sqrt(math.prod(in_dims))
    a_shape = kshape[:lead] + in_dims + (rank,)
    b_shape = kshape[:lead] + (rank,) + out_dims
    layer.lora_A = layers.param(
        rngs, layers.uniform(bound), a_shape, names[:lead] + in_names + (None,), jnp.float32
    )
    layer.lora_B = layers.param(
        rngs, layers.zeros, b_shape, names[:lead] + (None,) + out_names, jnp.float32
    )
    lora = LoRA((eqn_a, eqn_b), float(alpha) / rank, float(dropout), id)
    layer.variant = dataclasses.replace(layer.variant or Variant(), lora=lora)


# ----------------------------------------------------------------------------- parameter trees
def encode_params(params: dict, plan: dict[tuple, tuple[Codec, tuple]]) -> dict:
    """A pure param dict with each planned layer's `kernel` encoded (on the host when there is a
    CPU backend, so a full-precision kernel never reaches an accelerator).

    Args:
      params: the full-precision pure dict (numpy or jax leaves).
      plan: module path -> (codec, scale shape), e.g. from `quantize.convert_modules`.
    """
    params = dict(params)
    with _host():
        for path, (codec, sshape) in plan.items():
            node = params
            for k in path[:-1]:
                node[k] = dict(node[k])
                node = node[k]
            leaf = dict(node[path[-1]])
            codes, scale = codec.encode(np.asarray(leaf["kernel"], np.float32), sshape)
            leaf["kernel"], leaf[codec.scale_name] = np.asarray(codes), np.asarray(scale)
            node[path[-1]] = leaf
    return params


def decode_params(tree: dict) -> dict:
    """A pure param dict with every codec-stored kernel decoded to float32 and its scale dropped
    (full precision again: what a plain model holds)."""
    if not isinstance(tree, dict):
        return tree
    out = {k: decode_params(v) for k, v in tree.items()}
    for name in SCALE_NAMES:
        if name in out and "kernel" in out:
            codec = codec_of(out["kernel"].dtype, name)
            with _host():
                w = codec.decode(jnp.asarray(out["kernel"]), jnp.asarray(out.pop(name)))
            out["kernel"] = np.asarray(w, np.float32)
    return out


def _host():
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:  # JAX_PLATFORMS without cpu: encode where the arrays are
        return contextlib.nullcontext()
