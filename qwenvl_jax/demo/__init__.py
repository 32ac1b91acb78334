"""The synthetic demo: Qwen-VL's training stages on a generated world of shapes and words, on a CPU.

It uses the library and the trainer and nothing uses it (the trainer's command line runs it when no
`--config` is given). `synthetic` generates the data, `vision_pretrain` stands in for OpenCLIP's
pre-trained ViT, `run` drives the stages and `evaluate` scores the held-out split. What was tried
on the way to the recipe: docs/demo.md.
"""

from qwenvl_jax.demo.run import SETTINGS, run_demo

__all__ = ["SETTINGS", "run_demo"]
