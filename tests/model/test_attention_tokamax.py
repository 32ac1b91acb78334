"""attn_impl="tokamax": packed causal attention through tokamax's flash kernels, the first key
of each query's sample given as `k_start`. On a CPU the kernel cannot run, so this checks the
mask construction and the plumbing through tokamax's own XLA reference implementation, which
takes the same Mask object the GPU kernels take: equal to our XLA attention on packed rows,
forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenvl_jax.model import attention

pytest.importorskip("tokamax")


def test_k_start_is_the_first_token_of_each_sample():
    seg = jnp.array([[1, 1, 2, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(
        attention.packed_k_start(seg), [[0, 0, 2, 2, 2, 5, 6, 6], [0, 0, 0, 0, 0, 0, 0, 0]]
    )


def test_tokamax_equals_xla_on_packed_rows_forward_and_gradients():
    b, t, n, h = 2, 48, 4, 16
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(x, (b, t, n, h), jnp.float32) for x in (kq, kk, kv))
    w = jax.random.normal(kw, (b, t, n, h), jnp.float32)
    # Row 0: three samples then padding (id 0) at the tail; row 1: one sample over the row.
    seg = np.zeros((b, t), np.int32)
    seg[0, :10], seg[0, 10:29], seg[0, 29:40] = 1, 2, 3
    seg[1, :] = 7
    seg = jnp.asarray(seg)

    def loss(q, k, v, impl):
        out = attention.dot_product_attention(
            q, k, v, causal=True, scale=h**-0.5, q_segment_ids=seg, kv_segment_ids=seg,
            implementation=impl,
        )  # fmt: skip
        return jnp.sum(out * w), out

    (l_x, out_x), g_x = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "xla")
    (l_t, out_t), g_t = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        q, k, v, "tokamax"
    )
    np.testing.assert_allclose(out_t, out_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_t, l_x, rtol=1e-5)
    for a, b_ in zip(g_t, g_x, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)
    # The packing matters: a plain causal row (no segments) differs from the packed result.
    plain = attention.dot_product_attention(
        q, k, v, causal=True, scale=h**-0.5, implementation="tokamax"
    )
    assert not np.allclose(plain[0, 10:], out_x[0, 10:], atol=1e-3)
    np.testing.assert_allclose(plain[1], out_x[1], rtol=1e-5, atol=1e-5)  # one sample: same
