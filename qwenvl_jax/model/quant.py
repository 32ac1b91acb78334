"""4-bit weight storage for Q-LoRA: blockwise int4 (absmax) and NF4 (QLoRA's NormalFloat).

A kernel [..., K] is quantized in blocks of 64 along its last axis (fewer when K is smaller): codes
of the kernel's shape (int4 / uint4, which XLA stores packed) and one float32 scale per block
[..., K / block]. `layers.Einsum` dequantizes on the fly when `quant` is set (`qwenvl_jax.lora`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

QUANT_BLOCK = 64  # QLoRA's block size


def _nf4_levels() -> np.ndarray:
    """QLoRA's 16 NormalFloat levels: quantiles of N(0, 1) with an exact zero, scaled to [-1, 1].

    8 positive levels at quantiles linspace(delta, 1/2, 9)[:-1] and 7 negative ones at
    linspace(delta, 1/2, 8)[:-1], delta = (1/2)(1/32 + 1/30) (Dettmers et al. 2023, section 3)."""
    from scipy.special import ndtri

    delta = 0.5 * (1 / 32 + 1 / 30)
    pos = ndtri(np.linspace(1 - delta, 0.5, 9)[:-1])
    neg = -ndtri(np.linspace(1 - delta, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return (v / np.max(np.abs(v))).astype(np.float32)


NF4_LEVELS = _nf4_levels()


def quant_layout(shape: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """(block size, scale shape) of a kernel quantized in blocks along its last axis."""
    last = int(shape[-1])
    block = math.gcd(QUANT_BLOCK, last)
    return block, tuple(shape[:-1]) + (last // block,)


def quantize(w: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """w [..., K] -> (codes [..., K] int4 / uint4, float32 scales [..., K / block]).

    int4: scale = absmax / 7, codes = round(w / scale) in [-7, 7]. nf4: scale = absmax, codes =
    the nearest NF4 level of w / scale."""
    block, sshape = quant_layout(w.shape)
    wb = w.astype(jnp.float32).reshape(sshape + (block,))
    absmax = jnp.max(jnp.abs(wb), axis=-1, keepdims=True)
    if mode == "int4":
        scale = jnp.where(absmax > 0, absmax / 7.0, 1.0)
        codes = jnp.clip(jnp.round(wb / scale), -7, 7).astype(jnp.int4)
    elif mode == "nf4":
        scale = jnp.where(absmax > 0, absmax, 1.0)
        levels = jnp.asarray(NF4_LEVELS)
        codes = jnp.argmin(jnp.abs((wb / scale)[..., None] - levels), axis=-1).astype(jnp.uint4)
    else:
        raise ValueError(f"quantize mode {mode!r}; use int4 or nf4")
    return codes.reshape(w.shape), scale[..., 0]


def dequantize(codes: jax.Array, scale: jax.Array, mode: str) -> jax.Array:
    """The float32 kernel of `quantize`'s codes and scales."""
    block = codes.shape[-1] // scale.shape[-1]
    cb = codes.reshape(scale.shape + (block,))
    if mode == "int4":
        vals = cb.astype(jnp.float32)
    else:
        vals = jnp.asarray(NF4_LEVELS)[cb.astype(jnp.int32)]
    return (vals * scale[..., None]).reshape(codes.shape)
