"""Per-device memory of the 7B fine-tuning steps from an ahead-of-time compile for this host's CPU.

No GPU target is available to JAX without a GPU, so the real train step (7B shapes, bf16
compute, full remat, 2048-token sequences, 2 sequences per micro-batch) is compiled for the local
CPU, with N fake CPU devices standing for N GPUs, and XLA's memory analysis is printed
(peak = arguments + outputs - aliased + temporaries). Nothing is allocated.

  python tools/aot_cpu_memory.py lora        # configs/sft.py:lora, one device
  python tools/aot_cpu_memory.py qlora       # configs/sft.py:qlora, one device
  python tools/aot_cpu_memory.py full 8      # configs/sft.py (full fine-tune), 8 devices
"""

import json
import os
import sys
import time

variant = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
os.environ["JAX_PLATFORMS"] = "cpu"

from qwenvl_jax.train import stage_config  # noqa: E402
from qwenvl_jax.train.aot import aot_compile, compiled_report  # noqa: E402
from qwenvl_jax.train.state import build, describe  # noqa: E402

cfg = stage_config.load("sft:data=random" if variant == "full" else f"sft:{variant},data=random")
cfg.batch_size = 16  # 2 sequences per data shard per micro-batch (device_batch), any accumulation
if variant == "full":
    cfg.mesh.model = 2  # Table 8, the fsdp 4 x model 2 row of launch/README.md (not "auto")
s = build(cfg)
print(describe(s))
t0 = time.time()
rep = compiled_report(aot_compile(s))
rep["compile_s"] = round(time.time() - t0, 1)
gib = {k: (round(v / 2**30, 2) if k.endswith("bytes") else v) for k, v in rep.items()}
print(variant, n, json.dumps(gib))
