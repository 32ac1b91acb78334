"""The paper's optimizer: AdamW, norm clipping, warm-up + cosine, ViT layer-wise LR decay, freezing.

Qwen-VL Table 8: AdamW (β1 0.9, β2 0.98, eps 1e-6), weight decay 0.05, gradient clip 1.0, a linear
warm-up then cosine decay from the peak to the minimum LR, and a layer-wise LR decay of 0.95 inside
the ViT.

Parameters are a pure nested dict (`nnx.to_pure_dict` of the model's `nnx.Param` state); every
function here keys on the dotted path of a leaf (`qwenvl_jax.tree.path_str`), e.g.
`transformer.visual.transformer.resblocks.3.attn.in_proj.kernel` (unstacked) or
`transformer.visual.transformer.resblocks.attn.in_proj.kernel` with a leading layer axis L (stacked
for `nnx.scan`).

Decisions (documented here because the paper does not state them):
- **Weight-decay mask**: decay applies to the matrices that multiply activations: every `kernel`,
  the ViT's output `proj`, the token embedding `wte.embedding`, and LoRA's `lora_A` / `lora_B`
  (finetune.py's HF Trainer decays every weight but biases and norms, adapters included). No
  decay on biases, norm scales, the ViT's learned `positional_embedding`, the adapter's `query`
  and `pos_embed` (position tables and learned queries are "embedding-like" parameters, excluded
  as in CLIP/BEiT training recipes).
- **Layer-wise LR decay** (BEiT convention): with L ViT blocks, block k (0 = nearest the pixels)
  gets `decay ** (L - k)`, the patch embedding, position table and `ln_pre` get `decay ** (L + 1)`,
  and everything after the trunk (`ln_post`, `proj`, the adapter) and the whole LLM get 1. So
  consecutive ViT blocks differ by exactly one factor of `decay`, and deeper blocks learn faster.
  The scale multiplies the whole AdamW update (weight decay included), as a per-parameter LR would.
  For stacked layers the scale is a [L, 1, ..., 1] array, so each layer's slice of the update gets
  its own factor.
- **Group LR scales** (`optim.lr_scale`, not in the paper): a mapping from a group name or regex
  to a positive multiplier of that group's update, e.g. `{"adapter": 0.1}`; the first matching
  entry wins and it multiplies the layer-wise decay. From-scratch training of tiny models needs
  it: a freshly initialised adapter trained at the decoder's LR collapses (see demo.py).
- **Freezing**: a frozen parameter gets no optimizer state at all (`optax.multi_transform` with
  `optax.set_to_zero()` on the frozen partition, whose inner optimizer only sees `MaskedNode`s), and
  its update is exactly zero, so it stays bit-identical. The trainer also stops its gradient so XLA
  never computes the weight gradient.
- **Non-finite steps** (not in the paper): the whole optimizer is wrapped in `skip_nonfinite`, so a
  step the trainer flags as non-finite leaves the moments and step counts as they were (the LR
  schedule does not advance on a skipped step) and counts it in the state."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwenvl_jax.tree import map_with_path

# Named parameter groups (regexes over dotted paths) usable in `optim.freeze`.
GROUPS: dict[str, str] = {
    # The LLM: token embedding, decoder blocks, final norm, LM head.
    "llm": r"^(transformer\.(wte|h|ln_f)\.|lm_head\.)",
    # The ViT trunk and its head, NOT the adapter. QWEN-QUIRK: finetune.py's fix_vit freezes
    # `ln_post`
    # and `proj` together with the trunk (only `attn_pool` is re-enabled), so they belong to "vit".
    "vit": r"^transformer\.visual\.(?!attn_pool\.)",
    # The position-aware vision-language adapter (Resampler).
    "adapter": r"^transformer\.visual\.attn_pool\.",
    # QWEN-QUIRK: the adapter's 2-D sin-cos `pos_embed` is built with requires_grad=False;
    # finetune.py
    # re-enables it only by calling attn_pool.requires_grad_(True) in the SFT stage.
    "adapter_pos_embed": r"^transformer\.visual\.attn_pool\.pos_embed$",
}

_VIT_BLOCK = re.compile(r"^transformer\.visual\.transformer\.resblocks\.(?:(\d+)\.)?")
_VIT_STEM = re.compile(r"^transformer\.visual\.(conv1|positional_embedding|ln_pre)\b")
_DECAY = re.compile(
    r"(\.kernel|\.lora_[AB]|^transformer\.visual\.proj|^transformer\.wte\.embedding)$"
)


def _resolve(pattern: str) -> re.Pattern:
    return re.compile(GROUPS.get(pattern, pattern))


def frozen_labels(params: Any, freeze: Sequence[str]) -> Any:
    """Label tree: 'frozen' where a path matches a group name or regex in `freeze`, else 'train'.

    Raises:
        ValueError: if a pattern matches no parameter (a typo would otherwise silently train
        everything).
    """
    pats = [(p, _resolve(p)) for p in freeze]
    used = set()

    def label(path, _):
        for name, rx in pats:
            if rx.search(path):
                used.add(name)
                return "frozen"
        return "train"

    labels = map_with_path(label, params)
    unused = [p for p, _ in pats if p not in used]
    if unused:
        raise ValueError(f"optim.freeze patterns {unused} match no parameter path")
    return labels


def decay_mask(params: Any) -> Any:
    """True where weight decay applies (see the module docstring)."""
    return map_with_path(lambda p, _: bool(_DECAY.search(p)), params)


def _num_vit_layers(params: Any, stacked_vit: bool) -> int:
    n = 0

    def visit(path, x):
        nonlocal n
        m = _VIT_BLOCK.match(path)
        if m:
            n = max(n, x.shape[0] if m.group(1) is None else int(m.group(1)) + 1)

    map_with_path(visit, params)
    return n


def vit_lr_scales(params: Any, decay: float) -> Any:
    """Per-leaf LR multipliers for the ViT layer-wise decay (see the module docstring).

    Returns:
        A tree like `params` with python floats, or for stacked ViT leaves [L, ...] a float32 array
        of
        shape [L, 1, ..., 1] holding `decay ** (L - k)` for layer k.
    """
    num = _num_vit_layers(params, stacked_vit=True)

    def scale(path, x):
        m = _VIT_BLOCK.match(path)
        if m:
            if m.group(1) is not None:
                return float(decay ** (num - int(m.group(1))))
            k = np.arange(x.shape[0])
            s = (decay ** (num - k)).astype(np.float32)
            return jnp.asarray(s.reshape((-1,) + (1,) * (len(x.shape) - 1)))
        if _VIT_STEM.match(path):
            return float(decay ** (num + 1))
        return 1.0

    return map_with_path(scale, params)


def group_lr_scales(params: Any, scales: Mapping[str, float]) -> Any:
    """Per-leaf LR multipliers from `{group name or regex: multiplier}` (first match wins, else 1).

    Raises:
        ValueError: if a multiplier is not positive (use `optim.freeze` to stop a group) or a
        pattern matches no parameter.
    """
    pats = []
    for name, mult in scales.items():
        if not float(mult) > 0:
            raise ValueError(
                f"optim.lr_scale[{name!r}] = {mult}: multipliers must be > 0 (to stop a group"
                " from training, list it in optim.freeze)"
            )
        pats.append((name, _resolve(name), float(mult)))
    used = set()

    def scale(path, _):
        for name, rx, mult in pats:
            if rx.search(path):
                used.add(name)
                return mult
        return 1.0

    out = map_with_path(scale, params)
    unused = [p for p, _, _ in pats if p not in used]
    if unused:
        raise ValueError(f"optim.lr_scale patterns {unused} match no parameter path")
    return out


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update leaf by the matching leaf of `scales` (floats or broadcastable
    arrays)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        out = jax.tree.map(
            lambda u, s: u if isinstance(u, optax.MaskedNode) else (u * s).astype(u.dtype),
            updates,
            scales,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
        return out, state

    return optax.GradientTransformation(init, update)


class SkipNonFiniteState(NamedTuple):
    """`skip_nonfinite`'s state: the inner optimizer's state and how many updates were skipped
    (a device scalar, checkpointed with the rest, so a resumed run keeps counting)."""

    nonfinite_steps: jax.Array  # int32 []
    inner_state: Any


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner`, but a step that would bring a non-finite value changes nothing and is counted.

    `update(grads, state, params, finite=flag)` skips the step when `flag` (a device bool the
    caller computed: the trainer's covers the loss and the gradient norm; default: every gradient
    leaf is finite) is False, or when `params + updates` holds a non-finite value. A skipped step
    returns zero updates, keeps the inner state (moments and step counts, so the LR schedule does
    not advance) and adds one to `nonfinite_steps`; no host sync. Unlike `optax.apply_if_finite`
    (gradients only, and after `max_consecutive_errors` skips it applies the non-finite update),
    nothing non-finite is ever applied here: the host decides when to stop (train/nonfinite.py).
    """

    def init(params):
        return SkipNonFiniteState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None, *, finite=None, **extra):
        del extra  # the inner chain takes none
        ok = _all_finite(updates) if finite is None else jnp.asarray(finite, bool)
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        if params is not None:
            ok = ok & _all_finite(optax.apply_updates(params, new_updates))
        new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_inner, state.inner_state)
        count = state.nonfinite_steps + jnp.where(ok, 0, 1).astype(jnp.int32)
        return new_updates, SkipNonFiniteState(count, new_inner)

    return optax.GradientTransformationExtraArgs(init, update)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def nonfinite_steps(opt_state: Any) -> jax.Array:
    """The count of skipped steps held in a `skip_nonfinite` state (or a tree containing one)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "nonfinite_steps")
    if not found:
        raise ValueError("the optimizer state has no skip_nonfinite counter")
    return found[0][1]


def lr_schedule(peak: float, minimum: float, warmup: int, total: int) -> Callable:
    """Linear warm-up to `peak`, then cosine decay to `minimum` at step `total`.

    Step n is 1-based (the n-th update; optax's count is n - 1):
      n <= warmup: peak * n / warmup;
      n >  warmup: minimum + (peak - minimum) * (1 + cos(pi * (n - warmup) / (total - warmup))) / 2,
    held at `minimum` after `total`.
    """
    if not 0 <= warmup < total:
        raise ValueError(f"need 0 <= warmup ({warmup}) < total steps ({total})")

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) + 1.0
        warm = peak * n / max(warmup, 1)
        frac = jnp.clip((n - warmup) / (total - warmup), 0.0, 1.0)
        cos = minimum + (peak - minimum) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(n <= warmup, warm, cos)

    return schedule


def make_optimizer(cfg: Mapping, params: Any) -> tuple[optax.GradientTransformation, Any, Callable]:
    """Builds the training optimizer for `params` (concrete arrays or ShapeDtypeStructs).

    Args:
        cfg: the `optim` section: lr, min_lr, warmup_steps, total_steps, b1, b2, eps, weight_decay,
            grad_clip (0 disables), vit_lr_decay (1.0 or None disables), lr_scale (optional
            {group name or regex: multiplier}), freeze (group names/regexes).
        params: pure nested dict of parameters.

    Returns:
        (optimizer, labels tree 'train'/'frozen', schedule function of optax's 0-based count).
        The optimizer is `skip_nonfinite(...)`: its update takes an optional `finite=` flag.
    """
    schedule = lr_schedule(cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["total_steps"])
    labels = frozen_labels(params, list(cfg.get("freeze", ()) or ()))
    chain = []
    if cfg.get("grad_clip"):
        chain.append(optax.clip_by_global_norm(cfg["grad_clip"]))
    chain.append(optax.scale_by_adam(b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"]))
    if cfg.get("weight_decay"):
        chain.append(optax.add_decayed_weights(cfg["weight_decay"], mask=decay_mask(params)))
    decay = cfg.get("vit_lr_decay")
    if decay and decay != 1.0:
        chain.append(scale_by_tree(vit_lr_scales(params, decay)))
    lr_scale = dict(cfg.get("lr_scale") or {})
    if lr_scale:
        chain.append(scale_by_tree(group_lr_scales(params, lr_scale)))
    chain.append(optax.scale_by_learning_rate(schedule))
    train = optax.chain(*chain)
    tx = optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)
    return skip_nonfinite(tx), labels, schedule


def count_params(params: Any, labels: Any | None = None) -> dict[str, int]:
    """Number of parameters in total and, with labels, trainable/frozen."""
    sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), params)
    out = {"total": sum(jax.tree.leaves(sizes))}
    if labels is not None:
        flat = zip(jax.tree.leaves(sizes), jax.tree.leaves(labels), strict=True)
        out["train"] = 0
        out["frozen"] = 0
        for n, lab in flat:
            out[lab] += n
    return out
