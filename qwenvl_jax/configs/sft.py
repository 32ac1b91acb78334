"""Stage 3, supervised fine-tuning (Qwen-VL section 3.3, Table 8 "Supervised Fine-tuning").

ChatML dialogues; the ViT is frozen, the LLM and adapter are trained; initialised from stage 2's
workdir (`--config.init.workdir=...`) or a converted Qwen-VL checkpoint
(`--config.init.checkpoint=...`). `--config=configs/sft.py:tiny` is the CPU variant.

`:lora` / `:qlora` (combinable with `tiny`): the published finetune.py's LoRA and Q-LoRA
(finetune/finetune_lora_ds.sh, finetune_qlora_ds.sh): adapters r=64, alpha=16, dropout 0.05 on the
LLM's c_attn, attn.c_proj, w1, w2, everything else frozen; Q-LoRA on 4-bit (NF4) base kernels. For
the base (non-chat) Qwen-VL the published script also trains wte and lm_head:
`--config.lora.modules_to_save='("^transformer\\.wte\\.", "^lm_head\\.")'`."""

from qwenvl_jax import lora as lora_lib
from qwenvl_jax.train import stage_config as common

LORA_VARIANTS = ("lora", "qlora")


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    variant = [p for p in parts if p in LORA_VARIANTS]
    args = common.parse_arg(",".join(p for p in parts if p not in LORA_VARIANTS))
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
    # activations and remat would only add work. The decoder's is "auto" (launch/README.md).
    c.model.remat_vit = "none"
    # Table 8: model parallelism 2 (--config.mesh.model=2). "auto": 1 where the step fits with a
    # remat policy no heavier than 2's, else 2; decided by compiling (train/model_axis.py; the
    # multi-task step's measurements on v5p-64 and v6e-64: docs/performance.md).
    c.mesh.model = "auto"
    c.init.workdir = ""  # Table 8: everything from Qwen-VL 2nd stage
    # The dry run's slice (launch/README.md: the 7B stages on v5p-64, 32 chips).
    c.aot.slice = "v5p-64"
    c.lora = lora_config(variant[-1] if variant else "")
    if variant:
        # finetune_lora_ds.sh / finetune_qlora_ds.sh: lr 1e-5 (as above), AdamW beta2 0.95,
        # weight decay 0.1; the base fits one GPU, so no model parallelism.
        c.optim.b2 = 0.95
        c.optim.weight_decay = 0.1
        c.mesh.model = 1
        # The frozen base is stored in bf16 as the published runs load it (--bf16); the adapters
        # and modules_to_save keep float32 masters (train.state.build), as DeepSpeed's do.
        c.model.param_dtype = "bfloat16"
        c.aot.slice = "1xh100"  # launch/README.md "Fine-tuning memory": fits one 80 GB GPU
    if args.get("tiny"):
        common.tiny(c)
        c.data.seq_len = 128
        c.data.max_images = 2
        c.optim.lr = 1e-3
        c.optim.min_lr = 1e-4
    if "res" in args:
        c.data.image_size = int(args["res"])
    return common.finalize(c, args)


def lora_config(variant: str):
    """`config.lora`: rank 0 (off) unless the variant is lora / qlora."""
    import ml_collections as mlc

    lc = mlc.ConfigDict()
    lc.rank = 64 if variant else 0  # finetune.py LoraArguments.lora_r
    lc.alpha = 16.0  # lora_alpha
    lc.dropout = 0.05  # lora_dropout
    # Regexes over our module paths; the published target_modules c_attn, attn.c_proj, w1, w2.
    lc.targets = lora_lib.DEFAULT_TARGETS
    # Trained in full with the adapters (the published base-model run: wte and lm_head).
    lc.modules_to_save = ()
    lc.quantize_base = "nf4" if variant == "qlora" else "none"  # none | lora.QUANT_MODES
    return lc
