"""Weight-only int8 for inference: every `layers.Einsum` kernel as int8 with per-channel scales.

`QwenVL.from_pretrained(path, quantize="int8")` stores each matrix of the decoder, the visual
tower and the adapter (every `layers.Einsum` / `layers.Linear`, `lm_head` included) as symmetric
absmax int8 with one float32 scale per output channel (the maximum over the contracted axes of
the kernel / 127), and dequantizes it inside the layer (`Int8Einsum`), so one layer's
full-precision kernel exists at a time. Embeddings, norms, biases and the position tables keep
the model dtype. The weights are quantized on the host before they are placed on the devices, so
the full-precision model never sits on a device: Qwen-VL's 9.6B parameters take 10.3 GB
(int8 matrices, bfloat16 `wte`; counted from the abstract model, vs 19.3 GB in bfloat16).

Why by hand and not qwix (0.1.8, resolves with jax 0.10.2 / flax 0.12.8): qwix's PTQ provider
intercepts `jnp.einsum` and swaps the weight for a quantized `WithAux` wrapper, but our layers cast
the kernel to the compute dtype before the einsum (`kernel.astype(dtype)`), and `WithAux.astype`
fails on a quantized array (`qwix.quantize_model(model, qwix.PtqProvider([QuantizationRule(
module_path=".*", weight_qtype="int8")]), ids)` then a forward on the tiny model: "ValueError:
Unsupported type: QArray" in `WithAux.astype`). Changing every layer for the library is a bigger
edit than the layer below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.errors import ConfigError
from qwenvl_jax.model import layers

MODES = ("int8",)


class Int8Einsum(layers.Einsum):
    """`layers.Einsum` whose `kernel` is int8 and `kernel_scale` the per-output-channel scale."""

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype) * self.kernel_scale[...].astype(self.dtype)
        y = jnp.einsum(self.eqn, x.astype(self.dtype), kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _contracted(eqn: str) -> tuple[int, ...]:
    """Kernel axes summed over by `eqn` (`"btd,dsnh->btsnh"` -> (0,)): the scale is per the rest."""
    inputs, out = eqn.replace("...", "").split("->")
    kernel = inputs.split(",")[1]
    return tuple(i for i, c in enumerate(kernel) if c not in out)


def targets(model: nnx.Module) -> dict[tuple, str]:
    """Path (a tuple of attribute names / indices) -> einsum string of every quantizable layer."""
    return {
        tuple(path): m.eqn
        for path, m in nnx.iter_graph(model)
        if isinstance(m, layers.Einsum) and not isinstance(m, Int8Einsum)
    }


def quantize_array(w: np.ndarray, eqn: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 scales with the contracted axes kept as size 1) of a kernel."""
    w = np.asarray(w, np.float32)
    scale = np.max(np.abs(w), axis=_contracted(eqn), keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def quantize_params(params: dict, where: dict[tuple, str]) -> dict:
    """The pure param dict with each target's `kernel` replaced by int8 + `kernel_scale` (host)."""
    params = dict(params)
    for path, eqn in where.items():
        node = params
        for k in path[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        leaf = dict(node[path[-1]])
        leaf["kernel"], leaf["kernel_scale"] = quantize_array(leaf["kernel"], eqn)
        node[path[-1]] = leaf
    return params


def convert_modules(model: nnx.Module, mode: str) -> dict[tuple, str]:
    """Turn every Einsum of an (abstract) model into an Int8Einsum, in place; returns the targets.

    The kernels become int8 Params and each layer gains a float32 `kernel_scale` Param whose
    logical axis names are the kernel's with the contracted axes unnamed (they are size 1).
    """
    if mode not in MODES:
        raise ConfigError(f"quantize={mode!r} is not supported; choose from {MODES} or None")
    where = targets(model)
    for path, eqn in where.items():
        m = model
        for k in path:
            m = m[k] if isinstance(k, int) else getattr(m, k)
        names = tuple(m.kernel.get_metadata().get("out_sharding") or (None,) * m.kernel.ndim)
        shape = tuple(m.kernel.shape)
        axes = _contracted(eqn)
        scale_shape = tuple(1 if i in axes else d for i, d in enumerate(shape))
        scale_names = tuple(None if i in axes else n for i, n in enumerate(names))
        kw = dict(eager_sharding=False)  # names only, as `layers.param`
        m.kernel = nnx.Param(jax.ShapeDtypeStruct(shape, jnp.int8), out_sharding=names, **kw)
        m.kernel_scale = nnx.Param(
            jax.ShapeDtypeStruct(scale_shape, jnp.float32), out_sharding=scale_names, **kw
        )
        m.__class__ = Int8Einsum
    return where
