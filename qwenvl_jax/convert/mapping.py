"""The HF (PyTorch) state-dict keys of Qwen-VL and how each maps onto our NNX parameter paths.

This is docs/architecture.md's parameter-path table as code: one `Rule` per HF key, with the NNX
path, both shapes and the two lossless layout changes (reshapes and transposes only, so a bf16
round trip is bit-exact). Letters: D hidden, N heads, H head dim, F MLP width, V vocab; W ViT
width, n ViT heads, h ViT head dim, Fv ViT MLP width, p patch; Dr resampler width, Nr resampler
heads, Hr resampler head dim, Q queries.

Layer rules carry `layer=i`: with `scan_layers=False` the NNX path is `prefix + (i,) + rest`, with
`scan_layers=True` it is `prefix + rest` and the tensor is index i of a leading layer axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from qwenvl_jax.config import QWenConfig

Path = tuple  # of str / int


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one HF tensor maps onto one NNX leaf (or one layer of a stacked leaf)."""

    hf_key: str
    hf_shape: tuple[int, ...]
    prefix: Path  # NNX path up to the layer list (the whole path when layer is None)
    layer: int | None
    rest: Path  # NNX path below the layer index
    shape: tuple[int, ...]  # our shape (of one layer)
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    def path(self, scan_layers: bool) -> Path:
        """The NNX path of this tensor's leaf in the given layout."""
        if self.layer is None:
            return self.prefix
        if scan_layers:
            return self.prefix + self.rest
        return self.prefix + (self.layer,) + self.rest


def _same(a):
    return a


def _t(a):
    return np.swapaxes(a, 0, 1)


def _linear(prefix, layer, rest, hf_key, out_dim, in_dim):
    """nn.Linear weight [out, in] <-> kernel [in, out]."""
    return Rule(hf_key, (out_dim, in_dim), prefix, layer, rest, (in_dim, out_dim), _t, _t)


def _vector(prefix, layer, rest, hf_key, n):
    return Rule(hf_key, (n,), prefix, layer, rest, (n,), _same, _same)


def _fused_qkv(prefix, layer, rest, hf_key, d_in, n, h):
    """[Wq; Wk; Wv] rows, head-major: weight [3*n*h, d_in] <-> kernel [d_in, 3, n, h]."""
    return Rule(
        hf_key,
        (3 * n * h, d_in),
        prefix,
        layer,
        rest,
        (d_in, 3, n, h),
        lambda a: a.reshape(3, n, h, d_in).transpose(3, 0, 1, 2),
        lambda a: a.transpose(1, 2, 3, 0).reshape(3 * n * h, d_in),
    )


def _fused_qkv_bias(prefix, layer, rest, hf_key, n, h):
    return Rule(
        hf_key,
        (3 * n * h,),
        prefix,
        layer,
        rest,
        (3, n, h),
        lambda a: a.reshape(3, n, h),
        lambda a: a.reshape(3 * n * h),
    )


def _out_proj(prefix, layer, rest, hf_key, n, h, d_out):
    """Attention output weight [d_out, n*h] (input ordered (head, dim)) <-> kernel [n, h, d_out]."""
    return Rule(
        hf_key,
        (d_out, n * h),
        prefix,
        layer,
        rest,
        (n, h, d_out),
        lambda a: a.T.reshape(n, h, d_out),
        lambda a: a.reshape(n * h, d_out).T,
    )


def rules(cfg: QWenConfig) -> list[Rule]:
    """Every tensor of the HF checkpoint of `cfg`, in the reference `state_dict()` order."""
    D, N, H, F, V = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.kv_channels,
        cfg.mlp_width,
        cfg.vocab_size,
    )
    vc = cfg.visual
    W, n, h, Fv, p = vc.width, vc.heads, vc.head_dim, vc.mlp_width, vc.patch_size
    Dr, Nr = vc.output_dim, vc.resampler_heads
    Hr, Q, G = Dr // Nr, vc.n_queries, vc.pos_grid_size**2
    out: list[Rule] = [
        Rule(
            "transformer.wte.weight",
            (V, D),
            ("transformer", "wte", "embedding"),
            None,
            (),
            (V, D),
            _same,
            _same,
        )
    ]
    hp = ("transformer", "h")
    for i in range(cfg.num_hidden_layers):
        k = f"transformer.h.{i}."
        out += [
            _vector(hp, i, ("ln_1", "scale"), k + "ln_1.weight", D),
            _fused_qkv(hp, i, ("attn", "c_attn", "kernel"), k + "attn.c_attn.weight", D, N, H),
            _fused_qkv_bias(hp, i, ("attn", "c_attn", "bias"), k + "attn.c_attn.bias", N, H),
            _out_proj(hp, i, ("attn", "c_proj", "kernel"), k + "attn.c_proj.weight", N, H, D),
            _vector(hp, i, ("ln_2", "scale"), k + "ln_2.weight", D),
            _linear(hp, i, ("mlp", "w1", "kernel"), k + "mlp.w1.weight", F, D),
            # QWEN-QUIRK: w2 is the SiLU gate; the names are kept as they are.
            _linear(hp, i, ("mlp", "w2", "kernel"), k + "mlp.w2.weight", F, D),
            _linear(hp, i, ("mlp", "c_proj", "kernel"), k + "mlp.c_proj.weight", D, F),
        ]
    out.append(_vector(("transformer", "ln_f", "scale"), None, (), "transformer.ln_f.weight", D))

    v = ("transformer", "visual")
    vk = "transformer.visual."
    out += [
        Rule(
            vk + "positional_embedding",
            (G, W),
            v + ("positional_embedding",),
            None,
            (),
            (G, W),
            _same,
            _same,
        ),  # fmt: skip
        # QWEN-QUIRK: proj is used as x @ proj, so it is already [in, out]: no transpose.
        Rule(vk + "proj", (Dr, Dr), v + ("proj",), None, (), (Dr, Dr), _same, _same),
        Rule(
            vk + "conv1.weight",
            (W, 3, p, p),
            v + ("conv1", "kernel"),
            None,
            (),
            (p, p, 3, W),
            lambda a: a.transpose(2, 3, 1, 0),  # OIHW -> HWIO
            lambda a: a.transpose(3, 2, 0, 1),
        ),
        _vector(v + ("ln_pre", "scale"), None, (), vk + "ln_pre.weight", W),
        _vector(v + ("ln_pre", "bias"), None, (), vk + "ln_pre.bias", W),
    ]
    rp = v + ("transformer", "resblocks")
    for i in range(vc.layers):
        k = f"{vk}transformer.resblocks.{i}."
        out += [
            _vector(rp, i, ("ln_1", "scale"), k + "ln_1.weight", W),
            _vector(rp, i, ("ln_1", "bias"), k + "ln_1.bias", W),
            _vector(rp, i, ("ln_2", "scale"), k + "ln_2.weight", W),
            _vector(rp, i, ("ln_2", "bias"), k + "ln_2.bias", W),
            # QWEN-QUIRK: ViT q/k/v rows are interleaved per head: o = head*3h + s*h + d.
            Rule(
                k + "attn.in_proj.weight",
                (3 * W, W),
                rp,
                i,
                ("attn", "in_proj", "kernel"),
                (W, n, 3, h),
                lambda a, n=n, h=h, W=W: a.reshape(n, 3, h, W).transpose(3, 0, 1, 2),
                lambda a, n=n, h=h, W=W: a.transpose(1, 2, 3, 0).reshape(3 * W, W),
            ),
            Rule(
                k + "attn.in_proj.bias",
                (3 * W,),
                rp,
                i,
                ("attn", "in_proj", "bias"),
                (n, 3, h),
                lambda a, n=n, h=h: a.reshape(n, 3, h),
                lambda a, W=W: a.reshape(3 * W),
            ),
            _out_proj(rp, i, ("attn", "out_proj", "kernel"), k + "attn.out_proj.weight", n, h, W),
            _vector(rp, i, ("attn", "out_proj", "bias"), k + "attn.out_proj.bias", W),
            _linear(rp, i, ("mlp", "c_fc", "kernel"), k + "mlp.c_fc.weight", Fv, W),
            _vector(rp, i, ("mlp", "c_fc", "bias"), k + "mlp.c_fc.bias", Fv),
            _linear(rp, i, ("mlp", "c_proj", "kernel"), k + "mlp.c_proj.weight", W, Fv),
            _vector(rp, i, ("mlp", "c_proj", "bias"), k + "mlp.c_proj.bias", W),
        ]
    ap = v + ("attn_pool",)
    ak = vk + "attn_pool."
    out += [
        Rule(ak + "pos_embed", (Q, Dr), ap + ("pos_embed",), None, (), (Q, Dr), _same, _same),
        Rule(ak + "query", (Q, Dr), ap + ("query",), None, (), (Q, Dr), _same, _same),
    ]
    if W != Dr:
        # QWEN-QUIRK: kv_proj is nn.Identity (no weight) when the ViT width equals output_dim.
        out.append(_linear(ap + ("kv_proj", "kernel"), None, (), ak + "kv_proj.weight", Dr, W))
    out += [
        # nn.MultiheadAttention packs the standard [Wq; Wk; Wv] rows.
        _fused_qkv(
            ap + ("attn", "in_proj", "kernel"), None, (), ak + "attn.in_proj_weight", Dr, Nr, Hr
        ),  # fmt: skip
        _fused_qkv_bias(
            ap + ("attn", "in_proj", "bias"), None, (), ak + "attn.in_proj_bias", Nr, Hr
        ),
        _out_proj(
            ap + ("attn", "out_proj", "kernel"), None, (), ak + "attn.out_proj.weight", Nr, Hr, Dr
        ),  # fmt: skip
        _vector(ap + ("attn", "out_proj", "bias"), None, (), ak + "attn.out_proj.bias", Dr),
        _vector(ap + ("ln_q", "scale"), None, (), ak + "ln_q.weight", Dr),
        _vector(ap + ("ln_q", "bias"), None, (), ak + "ln_q.bias", Dr),
        _vector(ap + ("ln_kv", "scale"), None, (), ak + "ln_kv.weight", Dr),
        _vector(ap + ("ln_kv", "bias"), None, (), ak + "ln_kv.bias", Dr),
        _vector(v + ("ln_post", "scale"), None, (), vk + "ln_post.weight", Dr),
        _vector(v + ("ln_post", "bias"), None, (), vk + "ln_post.bias", Dr),
        _linear(("lm_head", "kernel"), None, (), "lm_head.weight", V, D),
    ]
    return out


def hf_shapes(cfg: QWenConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> PyTorch shape of every tensor of the checkpoint, in state_dict order."""
    return {r.hf_key: r.hf_shape for r in rules(cfg)}


def layer_counts(cfg: QWenConfig) -> dict[Path, int]:
    """Number of layers under each layer-list prefix."""
    return {
        ("transformer", "h"): cfg.num_hidden_layers,
        ("transformer", "visual", "transformer", "resblocks"): cfg.visual.layers,
    }


# Buffers some Qwen checkpoints carry that are not parameters; the reference ignores them on load.
IGNORED_HF_SUFFIXES = (".attn.masked_bias", ".rotary_emb.inv_freq")
