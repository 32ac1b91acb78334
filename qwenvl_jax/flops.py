"""Model FLOPs per training step and MFU.

PaLM convention (comparable with MaxText and levanter): a training step costs `6 x (matmul
parameters) x tokens + 12 x layers x width x T^2 x sequences` for the decoder (attention over the
full square, embedding lookups not counted, the LM head counted), plus the same for the ViT over its
patches per image, plus the adapter's projections. A frozen tower needs no weight gradients: the
frozen LLM of stage 1 costs 4x (forward + activation gradients, since the ViT below it trains) and
the frozen ViT of stage 3 costs 2x (forward only)."""

from __future__ import annotations

from qwenvl_jax.config import QWenConfig

# Dense bf16 peak per chip, TFLOP/s (docs/performance.md).
PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "v4": 275.0,
    "v5e": 197.0,
    "v5p": 459.0,
    "v6e": 918.0,
}
# Memory per chip: as the vendors state it (GB), except v6e's, which is what XLA:TPU reports
# available when it refuses a program (31.25 GiB).
CHIP_HBM_BYTES = {
    "h100": 80 * 10**9,
    "h200": 141 * 10**9,
    "v4": 32 * 10**9,
    "v5e": 16 * 10**9,
    "v5p": 95 * 10**9,
    "v6e": int(31.25 * 2**30),
}


def decoder_matmul_params(cfg: QWenConfig) -> int:
    """c_attn, c_proj, w1, w2, mlp.c_proj per layer, times layers, plus the LM head."""
    d, f = cfg.hidden_size, cfg.mlp_width
    per_layer = 3 * d * d + d * d + 3 * d * f
    return cfg.num_hidden_layers * per_layer + d * cfg.vocab_size


def vit_matmul_params(cfg: QWenConfig) -> int:
    """Patch embedding, in_proj, out_proj, c_fc, c_proj per layer, times layers."""
    v = cfg.visual
    w = v.width
    per_layer = 4 * w * w + 2 * w * v.mlp_width
    return v.patch_size**2 * 3 * w + v.layers * per_layer


def adapter_matmul_flops_fwd(cfg: QWenConfig, image_size: int) -> float:
    """Forward FLOPs of the adapter's projections for one image (kv_proj, q/k/v/out, proj)."""
    v = cfg.visual
    d, p, q = v.output_dim, (image_size // v.patch_size) ** 2, v.n_queries
    macs = v.width * d * p + d * d * q + 2 * d * d * p + d * d * q + d * d * q
    return 2.0 * macs


def step_flops(
    cfg: QWenConfig,
    *,
    sequences: int,
    seq_len: int,
    images: float,
    image_size: int,
    llm_trainable: bool = True,
    vit_trainable: bool = True,
) -> float:
    """Model FLOPs of one optimizer step, counting every position of every row (padding too).

    Args:
        cfg: model config.
        sequences: sequences per step (all micro-batches).
        seq_len: tokens per sequence T.
        images: images encoded per step (the static image slots, all micro-batches).
        image_size: pixels per side S.
        llm_trainable / vit_trainable: False for a frozen tower (see the module docstring).
    """
    return work_flops(
        cfg,
        tokens=sequences * seq_len,
        attended=sequences * seq_len**2,
        images=images,
        image_size=image_size,
        llm_trainable=llm_trainable,
        vit_trainable=vit_trainable,
    )


def work_flops(
    cfg: QWenConfig,
    *,
    tokens: float,
    attended: float,
    images: float,
    image_size: int,
    llm_trainable: bool = True,
    vit_trainable: bool = True,
) -> float:
    """Model FLOPs of `tokens` decoder positions and `images` images.

    With every position of B rows of T (`tokens` = B * T, `attended` = B * T^2) this is
    `step_flops`. Counting only real work: `tokens` = the non-padding tokens, `attended` = the sum
    over packed samples of (sample length)^2 (attention never crosses a sample, and the packed
    kernels skip the blocks it would), `images` = the valid images (`data.batch.real_work`).

    Args:
        cfg: model config.
        tokens: decoder positions.
        attended: the decoder's attention square, summed over sequences (or samples).
        images: images through the ViT and adapter.
        image_size: pixels per side S.
        llm_trainable / vit_trainable: False for a frozen tower (see the module docstring).
    """
    llm_mult = 6.0 if llm_trainable else 4.0
    vit_mult = 6.0 if vit_trainable else 2.0
    d = cfg.hidden_size
    dec = llm_mult * decoder_matmul_params(cfg) * tokens
    dec += (llm_mult / 6.0) * 12.0 * cfg.num_hidden_layers * d * attended
    p = (image_size // cfg.visual.patch_size) ** 2
    vit = vit_mult * vit_matmul_params(cfg) * p * images
    vit += (vit_mult / 6.0) * 12.0 * cfg.visual.layers * cfg.visual.width * p**2 * images
    # The adapter trains in every stage of the paper.
    adapter = 3.0 * adapter_matmul_flops_fwd(cfg, image_size) * images
    return dec + vit + adapter


def chip_peak(name: str | None = None, device_kind: str | None = None) -> float | None:
    """Peak TFLOP/s from an explicit chip name, else guessed from `jax.Device.device_kind`."""
    if name:
        key = name.lower()
        if key not in PEAK_TFLOPS:
            raise ValueError(f"unknown chip {name!r}; known: {sorted(PEAK_TFLOPS)}")
        return PEAK_TFLOPS[key]
    guess = chip_name(device_kind)
    return PEAK_TFLOPS.get(guess) if guess else None


def chip_name(device_kind: str | None) -> str | None:
    """The key of PEAK_TFLOPS / CHIP_HBM_BYTES for a `jax.Device.device_kind`, or None."""
    kind = (device_kind or "").lower().replace(" ", "")
    for key, guess in (
        ("h200", "h200"),
        ("h100", "h100"),
        ("tpuv6", "v6e"),
        ("tpu7x", None),
        ("tpuv5lite", "v5e"),
        ("tpuv5e", "v5e"),
        ("tpuv5p", "v5p"),
        ("tpuv5", "v5p"),
        ("tpuv4", "v4"),
    ):
        if key in kind:
            return guess
    return None


def chip_hbm_bytes(device_kind: str | None) -> int | None:
    """The chip's memory by its device kind (for ahead-of-time devices, which report none)."""
    name = chip_name(device_kind)
    return CHIP_HBM_BYTES.get(name) if name else None


def mfu(
    flops_per_step: float, seconds_per_step: float, num_chips: int, peak_tflops: float
) -> float:
    """Model FLOP utilisation: model FLOP/s over the chips' dense bf16 peak."""
    return flops_per_step / seconds_per_step / (num_chips * peak_tflops * 1e12)
