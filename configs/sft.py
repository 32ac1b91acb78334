"""Stage 3, supervised fine-tuning (Qwen-VL section 3.3, Table 8 "Supervised Fine-tuning").

ChatML dialogues; the ViT is frozen, the LLM and adapter are trained; initialised from stage 2's
workdir (`--config.init.workdir=...`) or a converted Qwen-VL checkpoint
(`--config.init.checkpoint=...`). `--config=configs/sft.py:tiny` is the CPU variant."""

from qwenvl_jax.train import stage_config as common


def get_config(arg=None):
    args = common.parse_arg(arg)
    c = common.base()
    c.stage = "sft"
    c.data.image_size = 448  # Table 8: 448^2 (ViT sequence length 1024)
    c.data.seq_len = 2048  # Table 8: LLM sequence length 2048
    c.data.max_images = 2  # multi-image dialogues (section 3.3)
    c.model.overrides.visual = {"n_queries": 256}  # Table 8: 256 learnable queries
    c.optim.lr = 1e-5  # Table 8: peak LR 1e-5
    c.optim.min_lr = 1e-6  # Table 8: minimum LR 1e-6
    c.optim.warmup_steps = 3000  # Table 8: warm-up 3k
    c.steps = 8000  # Table 8: 8k steps
    c.batch_size = 128  # Table 8: global batch 128
    c.grad_accum = 8  # Table 8: gradient accumulation 8
    c.optim.vit_lr_decay = 1.0  # Table 8: no ViT LR decay (the ViT is frozen)
    # Section 3.3: "we freeze the visual encoder and optimize the language model and adapter
    # module".
    # QWEN-QUIRK (finetune.py fix_vit): ln_post and proj freeze with the ViT; attn_pool, pos_embed
    # included, is trained.
    c.optim.freeze = ("vit",)
    # The frozen ViT is the bottom of the graph: no gradient flows through it, so it saves no
    # activations and remat would only add work. The decoder keeps "full" (launch/README.md).
    c.model.remat_vit = "none"
    c.mesh.model = 2  # Table 8: model parallelism 2
    c.init.workdir = ""  # Table 8: everything from Qwen-VL 2nd stage
    if args.get("tiny"):
        common.tiny(c)
        c.data.seq_len = 128
        c.data.max_images = 2
        c.optim.lr = 1e-3
        c.optim.min_lr = 1e-4
    if "res" in args:
        c.data.image_size = int(args["res"])
    return common.finalize(c, args)
