"""Stage 2, multi-task pre-training (Qwen-VL section 3.2, Table 8 "Multi-task Pre-training").

All parameters trained at 448 px on 7 tasks packed into 2048-token sequences, initialised from
stage 1's workdir (`--config.init.workdir=...`). `--config=configs/multitask.py:tiny` is the CPU
variant.
"""

from qwenvl_jax.train import stage_config as common


def get_config(arg=None):
    args = common.parse_arg(arg)
    c = common.base()
    c.stage = "multitask"
    c.data.image_size = 448  # Table 8: 448^2 (ViT sequence length 1024)
    c.data.seq_len = 2048  # Table 8: LLM sequence length 2048; section 3.2: packed to 2048
    c.model.overrides.visual = {"n_queries": 256}  # Table 8: 256 learnable queries
    # Packed sequences hold several samples; each image takes 256 + 2 positions. As many image
    # slots as the tokens allow (2048 // 258 = 7), so a row of one-image samples runs out of
    # tokens, not slots: the real (non-padding) tokens of the shipped mixture's caption, VQA and
    # grounding rows go from 54-64 % with 4 slots to 93-98 % (`python -m qwenvl_jax.data.bench
    # --config=configs/multitask.py`), for 1.75x the ViT work of 4 slots (+26 % model FLOPs per
    # step, +43 % real tokens per step).
    c.data.max_images = c.data.seq_len // (256 + 2)
    c.optim.lr = 5e-5  # Table 8: peak LR 5e-5
    c.optim.min_lr = 1e-5  # Table 8: minimum LR 1e-5
    c.optim.warmup_steps = 400  # Table 8: warm-up 400
    c.steps = 19_000  # Table 8: 19k steps
    c.batch_size = 4096  # Table 8: global batch 4096
    c.grad_accum = 8  # Table 8: gradient accumulation 8
    c.optim.vit_lr_decay = 0.95  # Table 8: ViT LR decay 0.95
    # Section 3.2: "We unlocked the large language model and trained the whole model."
    c.optim.freeze = ("adapter_pos_embed",)
    # Table 8: model parallelism 2 (--config.mesh.model=2). "auto": 1 where the step fits with a
    # remat policy no heavier than 2's (v5p-64: the same policy, 64 -> 26 synchronous collectives),
    # else 2 (v6e-64); decided by compiling (train/model_axis.py, docs/performance.md).
    c.mesh.model = "auto"
    # Table 8: ViT and adapter from stage 1, LLM Qwen-7B (unchanged by stage 1, which froze it).
    c.init.workdir = ""
    # The dry run's slice (launch/README.md: the 7B stages on v5p-64, 32 chips).
    c.aot.slice = "v5p-64"
    if args.get("tiny"):
        common.tiny(c)
        c.data.image_size = 56
        c.data.seq_len = 128
        c.data.max_images = 2
        c.optim.lr = 1e-3
        c.optim.min_lr = 1e-4
    if "res" in args:
        c.data.image_size = int(args["res"])
    return common.finalize(c, args)
