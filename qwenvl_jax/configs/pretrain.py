"""Stage 1, pre-training (Qwen-VL section 3.1 and Table 8, column "Pre-training").

Frozen LLM; the ViT (OpenCLIP ViT-bigG init) and the randomly initialised adapter are trained at 224
px on image-text pairs. `--config=configs/pretrain.py:tiny` is the CPU variant."""

from qwenvl_jax.train import stage_config as common


def get_config(arg=None):
    args = common.parse_arg(arg)
    c = common.base()
    c.stage = "pretrain"
    c.data.image_size = 224  # Table 8: image resolution 224^2 (ViT sequence length 256)
    c.data.seq_len = 512  # Table 8: LLM sequence length 512
    c.data.max_images = 1  # image-text pairs: one image per sequence
    c.model.overrides.visual = {"n_queries": 256}  # Table 8: 256 learnable queries
    c.optim.lr = 2e-4  # Table 8: peak LR 2e-4
    c.optim.min_lr = 1e-6  # Table 8: minimum LR 1e-6
    c.optim.warmup_steps = 500  # Table 8: warm-up 500
    c.steps = 50_000  # Table 8: 50k steps
    c.batch_size = 30_720  # Table 8: global batch 30720
    c.grad_accum = 6  # Table 8: gradient accumulation 6
    # 512-token sequences with one 224 px image are light: 8 per data shard per micro-batch.
    c.device_batch = 8
    c.optim.vit_lr_decay = 0.95  # Table 8: ViT LR decay 0.95
    # Section 3.1: "We freeze the large language model and only optimize the vision encoder and VL
    # adapter." The adapter's sin-cos pos_embed stays fixed as the published code builds it.
    c.optim.freeze = ("llm", "adapter_pos_embed")
    # Remat per tower from memory (launch/README.md "Remat"): at 224 px a ViT image is 256 patches,
    # so keeping the weight-matmul outputs ("dots") is small next to the frozen 7B decoder's 512
    # tokens x 8 sequences (its remat "auto", the base default, picks from memory).
    c.model.remat_vit = "dots"
    c.mesh.model = 1  # Table 8: no model parallelism in stage 1
    # Table 8: ViT init Open-CLIP-bigG, LLM init Qwen-7B, adapter random: set both paths (our
    # format).
    c.init.vit_checkpoint = ""
    c.init.llm_checkpoint = ""
    # The dry run's slice (launch/README.md: the 7B stages on v5p-64, 32 chips).
    c.aot.slice = "v5p-64"
    if args.get("tiny"):
        common.tiny(c)
        c.optim.lr = 2e-3
        c.optim.min_lr = 1e-5
    if "res" in args:
        c.data.image_size = int(args["res"])
    return common.finalize(c, args)
